//! Routing table (under construction).
