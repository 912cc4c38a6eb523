//! Kernel facts Python asks for outside any stack instance.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::error::to_py;
use super::socket::counters_dict;
use crate::stack::kernel;

/// Counters of a kernel TCP socket from `TCP_INFO`, as a dict.
#[pyfunction]
pub fn tcp_info<'py>(py: Python<'py>, fd: i32) -> PyResult<Bound<'py, PyDict>> {
    counters_dict(py, kernel::tcp_info_counters(fd).map_err(to_py)?)
}

/// `None` if this process may use io_uring, else the reason it may not.
#[pyfunction]
pub fn uring_available() -> Option<String> {
    crate::stack::uring::probe().err().map(|e| e.to_string())
}
