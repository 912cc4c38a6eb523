//! The kernel stack, seen from Python.

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::error::to_py;
use super::route::parse_kind;
use super::socket::{counters_dict, family, socket_on, CoreSocket};
use crate::stack::kernel::{self, IoMode, KernelStack, Protocol};
use crate::stack::Stack;

/// A kernel stack instance.
#[pyclass(name = "KernelStack", module = "dmm._core", frozen)]
pub struct PyKernelStack {
    inner: Arc<KernelStack>,
}

#[pymethods]
impl PyKernelStack {
    /// `protocol`: "tcp" or "mptcp"; `io`: "syscall" or "uring".
    #[new]
    #[pyo3(signature = (name, protocol = "tcp", io = "syscall"))]
    fn new(name: &str, protocol: &str, io: &str) -> PyResult<Self> {
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "mptcp" => Protocol::Mptcp,
            other => {
                return Err(PyValueError::new_err(format!(
                    "protocol must be 'tcp' or 'mptcp', got {other:?}"
                )))
            }
        };
        let io = match io {
            "syscall" => IoMode::Syscall,
            "uring" => IoMode::Uring,
            other => {
                return Err(PyValueError::new_err(format!(
                    "io must be 'syscall' or 'uring', got {other:?}"
                )))
            }
        };
        Ok(PyKernelStack {
            inner: Arc::new(KernelStack::new(name, protocol, io)),
        })
    }

    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    /// "syscall" or "uring": the mode in effect after any fallback.
    #[getter]
    fn io(&self) -> &'static str {
        match self.inner.io_mode() {
            IoMode::Syscall => "syscall",
            IoMode::Uring => "uring",
        }
    }

    /// Why io_uring was refused, if it was asked for and refused.
    #[getter]
    fn uring_refused(&self) -> Option<&str> {
        self.inner.uring_refused()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    /// A new socket on this instance.
    fn socket(&self, family_: i32, kind: &str) -> PyResult<CoreSocket> {
        socket_on(self.inner.as_ref(), family_, kind)
    }

    /// A core socket over an fd that Python owns (closing it leaves the fd open).
    fn adopt(&self, fd: i32, family_: i32, kind: &str) -> PyResult<CoreSocket> {
        let sock = self.inner.adopt(fd, family(family_)?, parse_kind(kind)?);
        Ok(CoreSocket::new(
            Box::new(sock),
            self.inner.name().to_string(),
        ))
    }

    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        counters_dict(py, self.inner.counters())
    }
}

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
