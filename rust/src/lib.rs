//! dmm core.
pub mod linkem;
pub mod route;
