//! dmm core: several network stacks behind one socket API, and the routing
//! that picks one per connection.
//!
//! * [`stack`]: the plug-in interface every stack implements, and the kernel
//!   stack.
//! * [`route`]: the routing table consulted at `connect()`, `listen()` and the
//!   first `sendto()`.
//! * [`fillp`]: the sans-IO core of a FillP-style reliable transport over UDP.
//! * [`linkem`]: the user-space link emulator (delay, loss, rate, queue)
//!   behind `dmm lab`.
//! * [`sys`]: safe wrappers over the few libc calls we need.
//! * `py` (feature `python`): the PyO3 bindings, glue only.

pub mod fillp;
pub mod linkem;
pub mod route;
pub mod stack;
pub mod sys;

#[cfg(feature = "python")]
mod py;
