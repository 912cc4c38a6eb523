//! The `dmm._core` extension module: glue between Python and the Rust core.
//!
//! Nothing here decides anything; it converts arguments, releases the GIL
//! around blocking calls and maps errors (see [`error`]).

mod discovery;
mod error;
mod kernel;
mod linkem;
mod route;
mod socket;
mod stack;

use pyo3::prelude::*;

/// The compiled core of dmm. Private: use the `dmm` package.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<route::Router>()?;
    m.add_class::<socket::CoreSocket>()?;
    m.add_class::<stack::PyStack>()?;
    m.add_class::<stack::PyStackConfig>()?;
    m.add("OptionError", m.py().get_type::<stack::OptionError>())?;
    m.add_function(wrap_pyfunction!(stack::stack_kinds, m)?)?;
    m.add_function(wrap_pyfunction!(stack::parse_stack, m)?)?;
    m.add_function(wrap_pyfunction!(discovery::discovery_query, m)?)?;
    m.add_function(wrap_pyfunction!(discovery::parse_offer, m)?)?;
    m.add_function(wrap_pyfunction!(kernel::tcp_info, m)?)?;
    m.add_function(wrap_pyfunction!(kernel::uring_available, m)?)?;
    linkem::register(m)?;
    Ok(())
}
