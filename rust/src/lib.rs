//! dmm core.
pub mod fillp;
pub mod route;
