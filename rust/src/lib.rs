//! dmm core.
pub mod route;
