//! `CoreSocket`: one socket on any stack, for the Python facade.
//!
//! Blocking calls run with the GIL released. When a call is interrupted by a
//! signal, the GIL is taken back, Python's signal handlers run (so Ctrl-C
//! raises `KeyboardInterrupt`), and the call is retried, as CPython does.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyMemoryError, PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::error::to_py;
use crate::stack::StackSocket;

/// A socket on one stack instance (kernel, user space, FillP).
#[pyclass(module = "dmm._core", frozen)]
pub struct CoreSocket {
    inner: Box<dyn StackSocket>,
    stack: String,
}

impl CoreSocket {
    /// Wraps a stack socket for Python.
    pub fn new(inner: Box<dyn StackSocket>, stack: String) -> CoreSocket {
        CoreSocket { inner, stack }
    }
}

/// A raw buffer that may cross into a GIL-free closure: the Python object
/// that owns the memory is kept alive (and its buffer export held) by the
/// caller for the whole call.
#[derive(Clone, Copy)]
struct RawBuf {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: see the type docs: the memory outlives the closure, and Python
// code cannot resize an exported buffer while the export is held.
unsafe impl Send for RawBuf {}
// SAFETY: as above; the closures only read the pointer and length.
unsafe impl Sync for RawBuf {}

impl RawBuf {
    /// SAFETY: the caller guarantees the memory is alive and not aliased
    /// mutably elsewhere during the call.
    unsafe fn slice<'a>(self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.ptr, self.len)
    }

    /// SAFETY: as for `slice`, and the memory must be writable.
    unsafe fn slice_mut<'a>(self) -> &'a mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.ptr, self.len)
    }
}

/// A held buffer export of a bytes-like object.
struct Held {
    _buf: PyBuffer<u8>,
    raw: RawBuf,
}

fn hold(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Held> {
    let buf = match PyBuffer::<u8>::get(obj) {
        Ok(b) => b,
        // Any buffer is bytes to a socket (array('i'), ...): view it as bytes.
        Err(_) => {
            let view = obj
                .py()
                .import("builtins")?
                .getattr("memoryview")?
                .call1((obj,))?;
            PyBuffer::<u8>::get(&view.call_method1("cast", ("B",))?)?
        }
    };
    if !buf.is_c_contiguous() {
        return Err(PyTypeError::new_err(
            "a contiguous bytes-like object is required",
        ));
    }
    if writable && buf.readonly() {
        return Err(PyTypeError::new_err(
            "a writable bytes-like object is required",
        ));
    }
    let raw = RawBuf {
        ptr: buf.buf_ptr().cast(),
        len: buf.len_bytes(),
    };
    Ok(Held { _buf: buf, raw })
}

/// Runs a blocking operation without the GIL; on `EINTR`, runs the signal
/// handlers and tries again.
fn blocking<T: Send>(py: Python<'_>, mut op: impl FnMut() -> io::Result<T> + Send) -> PyResult<T> {
    loop {
        match py.detach(&mut op) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => py.check_signals()?,
            other => return other.map_err(to_py),
        }
    }
}

fn parse_sockaddr(addr: &Bound<'_, PyAny>) -> PyResult<SocketAddr> {
    let host: String = addr.get_item(0)?.extract()?;
    let port: u16 = addr.get_item(1)?.extract()?;
    let host = host.split('%').next().unwrap_or_default();
    let ip = host.parse().map_err(|_| {
        PyValueError::new_err(format!(
            "a numeric IP address is required here, got {host:?}"
        ))
    })?;
    Ok(SocketAddr::new(ip, port))
}

/// The stack family for an `AF_*` number from Python.
pub fn family(raw: i32) -> PyResult<crate::stack::Family> {
    match raw {
        libc::AF_INET => Ok(crate::stack::Family::V4),
        libc::AF_INET6 => Ok(crate::stack::Family::V6),
        other => Err(PyValueError::new_err(format!(
            "address family {other} is not IPv4 or IPv6"
        ))),
    }
}

/// Counters as a Python dict.
pub fn counters_dict<'py>(
    py: Python<'py>,
    counters: crate::stack::Counters,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in counters {
        d.set_item(k, v)?;
    }
    Ok(d)
}

/// The stdlib's address tuple: `(host, port)` or `(host, port, flowinfo, scope_id)`.
pub fn sockaddr_to_py(py: Python<'_>, addr: SocketAddr) -> PyResult<Py<PyAny>> {
    let obj = match addr {
        SocketAddr::V4(a) => (a.ip().to_string(), a.port()).into_pyobject(py)?.into_any(),
        SocketAddr::V6(a) => (a.ip().to_string(), a.port(), a.flowinfo(), a.scope_id())
            .into_pyobject(py)?
            .into_any(),
    };
    Ok(obj.unbind())
}

#[pymethods]
impl CoreSocket {
    /// The name of the stack instance carrying this socket.
    #[getter]
    fn stack(&self) -> &str {
        &self.stack
    }

    fn bind(&self, py: Python<'_>, addr: &Bound<'_, PyAny>) -> PyResult<()> {
        let addr = parse_sockaddr(addr)?;
        blocking(py, || self.inner.bind(addr))
    }

    fn listen(&self, py: Python<'_>, backlog: i32) -> PyResult<()> {
        blocking(py, || self.inner.listen(backlog))
    }

    /// Returns `(CoreSocket, address)`.
    fn accept(&self, py: Python<'_>) -> PyResult<(CoreSocket, Py<PyAny>)> {
        let (sock, peer) = blocking(py, || self.inner.accept())?;
        Ok((
            CoreSocket::new(sock, self.stack.clone()),
            sockaddr_to_py(py, peer)?,
        ))
    }

    fn connect(&self, py: Python<'_>, addr: &Bound<'_, PyAny>) -> PyResult<()> {
        let addr = parse_sockaddr(addr)?;
        blocking(py, || self.inner.connect(addr))
    }

    #[pyo3(signature = (data, flags = 0))]
    fn send(&self, py: Python<'_>, data: &Bound<'_, PyAny>, flags: i32) -> PyResult<usize> {
        let held = hold(data, false)?;
        let raw = held.raw;
        // SAFETY: `held` keeps the buffer exported until we return.
        blocking(py, || self.inner.send(unsafe { raw.slice() }, flags))
    }

    #[pyo3(signature = (data, flags = 0))]
    fn sendall(&self, py: Python<'_>, data: &Bound<'_, PyAny>, flags: i32) -> PyResult<()> {
        let held = hold(data, false)?;
        let mut sent = 0usize;
        let raw = held.raw;
        // CPython's sendall: the timeout covers the whole call, not each send.
        let deadline = self
            .inner
            .timeout()
            .filter(|t| !t.is_zero())
            .map(|t| Instant::now() + t);
        loop {
            // SAFETY: `held` keeps the buffer exported until we return.
            let rest = RawBuf {
                ptr: unsafe { raw.ptr.add(sent) },
                len: raw.len - sent,
            };
            if rest.len == 0 {
                return Ok(());
            }
            match py.detach(|| {
                self.inner
                    .send_until(unsafe { rest.slice() }, flags, deadline)
            }) {
                Ok(n) => sent += n.min(rest.len),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => py.check_signals()?,
                Err(e) => return Err(to_py(e)),
            }
        }
    }

    #[pyo3(signature = (data, flags, address))]
    fn sendto(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        flags: i32,
        address: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let addr = parse_sockaddr(address)?;
        let held = hold(data, false)?;
        let raw = held.raw;
        // SAFETY: `held` keeps the buffer exported until we return.
        blocking(py, || {
            self.inner.send_to(unsafe { raw.slice() }, flags, addr)
        })
    }

    #[pyo3(signature = (bufsize, flags = 0))]
    fn recv<'py>(
        &self,
        py: Python<'py>,
        bufsize: isize,
        flags: i32,
    ) -> PyResult<Bound<'py, PyBytes>> {
        if bufsize < 0 {
            return Err(PyValueError::new_err("negative buffersize in recv"));
        }
        let mut buf = zeroed(bufsize as usize)?;
        let n = blocking(py, || self.inner.recv(&mut buf, flags))?;
        Ok(PyBytes::new(py, &buf[..n]))
    }

    #[pyo3(signature = (buffer, nbytes = 0, flags = 0))]
    fn recv_into(
        &self,
        py: Python<'_>,
        buffer: &Bound<'_, PyAny>,
        nbytes: isize,
        flags: i32,
    ) -> PyResult<usize> {
        let held = hold(buffer, true)?;
        let raw = limit(held.raw, nbytes, "recv_into")?;
        // SAFETY: `held` keeps the writable buffer exported until we return.
        blocking(py, || self.inner.recv(unsafe { raw.slice_mut() }, flags))
    }

    #[pyo3(signature = (bufsize, flags = 0))]
    fn recvfrom<'py>(
        &self,
        py: Python<'py>,
        bufsize: isize,
        flags: i32,
    ) -> PyResult<(Bound<'py, PyBytes>, Py<PyAny>)> {
        if bufsize < 0 {
            return Err(PyValueError::new_err("negative buffersize in recvfrom"));
        }
        let mut buf = zeroed(bufsize as usize)?;
        let (n, from) = blocking(py, || self.inner.recv_from(&mut buf, flags))?;
        let from = match from {
            Some(a) => sockaddr_to_py(py, a)?,
            None => py.None(),
        };
        Ok((PyBytes::new(py, &buf[..n]), from))
    }

    #[pyo3(signature = (buffer, nbytes = 0, flags = 0))]
    fn recvfrom_into(
        &self,
        py: Python<'_>,
        buffer: &Bound<'_, PyAny>,
        nbytes: isize,
        flags: i32,
    ) -> PyResult<(usize, Py<PyAny>)> {
        let held = hold(buffer, true)?;
        let raw = limit(held.raw, nbytes, "recvfrom_into")?;
        // SAFETY: `held` keeps the writable buffer exported until we return.
        let (n, from) = blocking(py, || {
            self.inner.recv_from(unsafe { raw.slice_mut() }, flags)
        })?;
        let from = match from {
            Some(a) => sockaddr_to_py(py, a)?,
            None => py.None(),
        };
        Ok((n, from))
    }

    fn shutdown(&self, how: i32) -> PyResult<()> {
        let how = match how {
            libc::SHUT_RD => Shutdown::Read,
            libc::SHUT_WR => Shutdown::Write,
            libc::SHUT_RDWR => Shutdown::Both,
            _ => return Err(to_py(io::Error::from_raw_os_error(libc::EINVAL))),
        };
        self.inner.shutdown(how).map_err(to_py)
    }

    fn close(&self) -> PyResult<()> {
        self.inner.close().map_err(to_py)
    }

    /// `None` blocks, `0.0` is non-blocking, a positive float is a timeout.
    fn settimeout(&self, timeout: Option<f64>) -> PyResult<()> {
        let t = match timeout {
            None => None,
            Some(s) if s.is_nan() => {
                return Err(PyValueError::new_err("Invalid value NaN (not a number)"))
            }
            Some(s) if s < 0.0 => return Err(PyValueError::new_err("Timeout value out of range")),
            // As the stdlib: a timeout no clock can hold (inf included) overflows.
            Some(s) => Some(
                Duration::try_from_secs_f64(s)
                    .map_err(|_| PyOverflowError::new_err("timeout value too large"))?,
            ),
        };
        self.inner.set_timeout(t).map_err(to_py)
    }

    fn gettimeout(&self) -> Option<f64> {
        self.inner.timeout().map(|t| t.as_secs_f64())
    }

    fn setsockopt(&self, level: i32, name: i32, value: &[u8]) -> PyResult<()> {
        self.inner.set_option(level, name, value).map_err(to_py)
    }

    fn getsockopt<'py>(
        &self,
        py: Python<'py>,
        level: i32,
        name: i32,
        buflen: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let v = self.inner.get_option(level, name, buflen).map_err(to_py)?;
        Ok(PyBytes::new(py, &v))
    }

    fn getsockname(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        sockaddr_to_py(py, self.inner.local_addr().map_err(to_py)?)
    }

    fn getpeername(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        sockaddr_to_py(py, self.inner.peer_addr().map_err(to_py)?)
    }

    /// The fd that polls readable when this socket is readable.
    fn poll_fd(&self) -> i32 {
        self.inner.poll_fd()
    }

    /// The fd that polls readable exactly while this socket is writable,
    /// or None when `poll_fd` itself polls writable (kernel sockets).
    fn write_poll_fd(&self) -> PyResult<Option<i32>> {
        self.inner.write_poll_fd().map_err(to_py)
    }

    /// `(readable, writable, error)` now.
    fn readiness(&self) -> (bool, bool, bool) {
        let r = self.inner.readiness();
        (r.readable, r.writable, r.error)
    }

    /// Per-socket counters as a dict.
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        counters_dict(py, self.inner.counters())
    }
}

/// Applies the `nbytes` argument of `recv_into`: 0 means the whole buffer.
/// The most one `recv` hands back: more than any user-space stack buffers
/// (a stream receive may return less than asked; a datagram is under 64 KiB).
const RECV_CAP: usize = 16 << 20;

/// A receive buffer for `recv(n)`: `MemoryError` where the stdlib's would
/// fail to allocate `n` bytes (where `vec![0; n]` would abort the process),
/// else zeroed and at most [`RECV_CAP`] long, so a huge `n` touches no more
/// memory than can be filled.
fn zeroed(n: usize) -> PyResult<Vec<u8>> {
    if n > RECV_CAP {
        let mut probe = Vec::<u8>::new();
        probe.try_reserve_exact(n).map_err(|_| {
            PyMemoryError::new_err(format!("cannot allocate a {n}-byte receive buffer"))
        })?;
    }
    Ok(vec![0; n.min(RECV_CAP)])
}

fn limit(raw: RawBuf, nbytes: isize, what: &str) -> PyResult<RawBuf> {
    match nbytes {
        n if n < 0 => Err(PyValueError::new_err(format!(
            "negative buffersize in {what}"
        ))),
        0 => Ok(raw),
        n if n as usize > raw.len => Err(PyValueError::new_err(format!(
            "buffer too small for requested bytes in {what}"
        ))),
        n => Ok(RawBuf {
            ptr: raw.ptr,
            len: n as usize,
        }),
    }
}
