//! FillP-style reliable transport over UDP (sans-IO core).
pub mod cookie;
pub mod wire;
