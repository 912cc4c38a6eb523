//! The `dmm._core` extension module: glue between Python and the Rust core.
//!
//! Nothing here decides anything; it converts arguments, releases the GIL
//! around blocking calls and maps errors (see [`error`]).

mod error;
mod fillp;
mod kernel;
mod linkem;
mod route;
mod smol;
mod socket;

use pyo3::prelude::*;

/// The compiled core of dmm. Private: use the `dmm` package.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<route::Router>()?;
    m.add_class::<socket::CoreSocket>()?;
    m.add_class::<kernel::PyKernelStack>()?;
    m.add_class::<fillp::PyFillpStack>()?;
    m.add_class::<smol::PySmolStack>()?;
    m.add_function(wrap_pyfunction!(kernel::tcp_info, m)?)?;
    m.add_function(wrap_pyfunction!(kernel::uring_available, m)?)?;
    linkem::register(m)?;
    Ok(())
}
