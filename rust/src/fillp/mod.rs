//! FillP-style reliable transport over UDP (sans-IO core).
pub mod cc;
pub mod cookie;
pub mod pacer;
pub mod rtt;
pub mod wire;
