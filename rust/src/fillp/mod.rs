//! FillP-style reliable transport over UDP (sans-IO core).
pub mod cc;
pub mod connection;
pub mod cookie;
pub mod endpoint;
pub mod pacer;
pub mod recv_buf;
pub mod rtt;
pub mod send_buf;
#[doc(hidden)]
pub mod sim;
pub mod wire;
