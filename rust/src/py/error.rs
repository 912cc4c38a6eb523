//! The one place where Rust errors become Python exceptions.
//!
//! An `io::Error` with an errno becomes `OSError(errno, strerror)`, and
//! CPython's `OSError` constructor picks the subclass from the errno
//! (`ConnectionRefusedError`, `BlockingIOError`, ...), exactly as for the
//! stdlib's sockets. A socket timeout has no errno and becomes
//! `TimeoutError("timed out")`, which is what `socket.timeout` is.

use std::io;

use pyo3::exceptions::{PyOSError, PyTimeoutError, PyValueError};
use pyo3::PyErr;

use crate::sys::context;

/// Converts an `io::Error` into the exception CPython would raise.
pub fn to_py(err: io::Error) -> PyErr {
    if let Some(code) = err.raw_os_error() {
        return PyOSError::new_err((code, strerror(code)));
    }
    if let Some((code, message)) = context::errno_and_message(&err) {
        return PyOSError::new_err((code, message.to_string()));
    }
    match err.kind() {
        io::ErrorKind::TimedOut => PyTimeoutError::new_err("timed out"),
        io::ErrorKind::WouldBlock => PyOSError::new_err((libc::EAGAIN, strerror(libc::EAGAIN))),
        io::ErrorKind::InvalidInput => PyValueError::new_err(err.to_string()),
        _ => PyOSError::new_err(err.to_string()),
    }
}

/// The C library's message for an errno, as CPython shows it.
fn strerror(code: i32) -> String {
    io::Error::from_raw_os_error(code)
        .to_string()
        .split(" (os error")
        .next()
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_drops_the_rust_suffix() {
        assert_eq!(strerror(libc::ECONNREFUSED), "Connection refused");
    }
}
