//! The kernel stack: sockets are kernel sockets, operations are syscalls.
//!
//! An instance carries TCP (or MPTCP, with [`Protocol::Mptcp`]) and UDP over
//! IPv4 and IPv6. Blocking, non-blocking and timeout modes work the way
//! CPython's socket module does it: with a timeout the fd is non-blocking and
//! each operation waits with `poll(2)` up to the deadline.
//!
//! I/O is plain syscalls, unless the instance is created with
//! [`IoMode::Uring`]; then blocking sends and receives go through io_uring
//! (see [`super::uring`] for when that pays and the fallback).

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::options::{OptionError, Options, Value};
use super::registry::{Kind, StackConfig};
use super::{
    errno, timed_out, uring, Counters, Family, Placement, Readiness, SockKind, Stack, StackSocket,
    TimeoutCell,
};
use crate::sys::{self, sockaddr::RawAddr};

/// `IPPROTO_MPTCP` (not in every libc release).
pub const IPPROTO_MPTCP: i32 = 262;

/// The transport a kernel instance uses for stream sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Plain TCP.
    Tcp,
    /// Multipath TCP (`IPPROTO_MPTCP`); falls back to TCP on the wire when the
    /// peer does not speak it.
    Mptcp,
}

impl Protocol {
    /// The protocol number for `socket(2)` for a stream socket.
    pub fn stream_proto(self) -> i32 {
        match self {
            Protocol::Tcp => libc::IPPROTO_TCP,
            Protocol::Mptcp => IPPROTO_MPTCP,
        }
    }
}

/// How data moves between the application and the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// One syscall per operation.
    Syscall,
    /// io_uring for blocking sends and receives (falls back to syscalls when
    /// the kernel refuses io_uring).
    Uring,
}

/// A kernel stack instance.
pub struct KernelStack {
    name: String,
    protocol: Protocol,
    io: IoMode,
    /// Why io_uring was refused, when it was asked for and refused.
    uring_refused: Option<String>,
    sockets: AtomicU64,
}

impl KernelStack {
    /// Creates an instance. With [`IoMode::Uring`], probes io_uring once and
    /// falls back to syscalls if the kernel refuses it.
    pub fn new(name: impl Into<String>, protocol: Protocol, io: IoMode) -> KernelStack {
        let (io, uring_refused) = match io {
            IoMode::Uring => match uring::probe() {
                Ok(()) => (IoMode::Uring, None),
                Err(e) => (IoMode::Syscall, Some(e.to_string())),
            },
            IoMode::Syscall => (IoMode::Syscall, None),
        };
        KernelStack {
            name: name.into(),
            protocol,
            io,
            uring_refused,
            sockets: AtomicU64::new(0),
        }
    }

    /// The stream protocol of this instance.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The I/O mode in effect (after any fallback).
    pub fn io_mode(&self) -> IoMode {
        self.io
    }

    /// Why io_uring is not in use although it was asked for.
    pub fn uring_refused(&self) -> Option<&str> {
        self.uring_refused.as_deref()
    }

    /// Wraps an existing kernel socket fd (not owned: closing the returned
    /// socket does not close `fd`). Used by the Python facade, which owns
    /// the fd through CPython's socket object.
    pub fn adopt(&self, fd: RawFd, family: Family, kind: SockKind) -> KernelSocket {
        KernelSocket::new(fd, family, kind, self.io, false)
    }
}

impl Stack for KernelStack {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn protocol(&self) -> &'static str {
        match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Mptcp => "mptcp",
        }
    }

    fn carries(&self, _family: Family, kind: SockKind) -> Result<(), String> {
        // MPTCP has no datagram form: an MPTCP instance carries streams only,
        // so the router moves on to the next stack for UDP.
        if kind == SockKind::Dgram && self.protocol == Protocol::Mptcp {
            return Err("MPTCP carries stream sockets only".into());
        }
        Ok(())
    }

    fn placement(&self) -> Placement {
        Placement::KernelFd {
            stream_protocol: self.protocol.stream_proto(),
            adopt: self.io == IoMode::Uring,
        }
    }

    fn adopt(&self, fd: RawFd, family: Family, kind: SockKind) -> io::Result<Box<dyn StackSocket>> {
        Ok(Box::new(KernelStack::adopt(self, fd, family, kind)))
    }

    fn attributes(&self) -> Vec<(&'static str, String)> {
        let io = match self.io {
            IoMode::Syscall => "syscall",
            IoMode::Uring => "uring",
        };
        let mut out = vec![("io", io.to_string())];
        if let Some(why) = &self.uring_refused {
            out.push(("uring_refused", why.clone()));
        }
        out
    }

    fn socket(&self, family: Family, kind: SockKind) -> io::Result<Box<dyn StackSocket>> {
        let (ty, proto) = match kind {
            SockKind::Stream => (libc::SOCK_STREAM, self.protocol.stream_proto()),
            SockKind::Dgram => (libc::SOCK_DGRAM, libc::IPPROTO_UDP),
        };
        // SAFETY: plain syscall.
        let fd = sys::cvt(unsafe { libc::socket(family.raw(), ty | libc::SOCK_CLOEXEC, proto) })?;
        self.sockets.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(KernelSocket::new(fd, family, kind, self.io, true)))
    }

    fn counters(&self) -> Counters {
        vec![("sockets", self.sockets.load(Ordering::Relaxed))]
    }

    fn describe(&self) -> String {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Mptcp => "mptcp",
        };
        let io = match (self.io, &self.uring_refused) {
            (IoMode::Uring, _) => "io_uring".to_string(),
            (IoMode::Syscall, Some(why)) => format!("syscalls (io_uring refused: {why})"),
            (IoMode::Syscall, None) => "syscalls".to_string(),
        };
        format!("kernel {proto}, {io}")
    }
}

/// The `kernel` kind: `protocol = "tcp" | "mptcp"`, `io = "syscall" | "uring"`.
pub static KIND: Kind = Kind {
    name: "kernel",
    summary: "the kernel's TCP/IP (or Multipath TCP), by syscalls or io_uring",
    fields: &["protocol", "io"],
    parse: parse_config,
};

/// The options of a kernel instance.
#[derive(Debug)]
struct KernelConfig {
    protocol: Protocol,
    io: IoMode,
}

fn parse_config(o: &Options) -> Result<Box<dyn StackConfig>, OptionError> {
    let protocol = match o.choice("protocol", &["tcp", "mptcp"])? {
        "mptcp" => Protocol::Mptcp,
        _ => Protocol::Tcp,
    };
    let io = match o.choice("io", &["syscall", "uring"])? {
        "uring" => IoMode::Uring,
        _ => IoMode::Syscall,
    };
    Ok(Box::new(KernelConfig { protocol, io }))
}

impl StackConfig for KernelConfig {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn values(&self) -> Vec<(&'static str, Value)> {
        let protocol = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Mptcp => "mptcp",
        };
        let io = match self.io {
            IoMode::Syscall => "syscall",
            IoMode::Uring => "uring",
        };
        vec![
            ("protocol", Value::Str(protocol.into())),
            ("io", Value::Str(io.into())),
        ]
    }

    fn open(&self, name: &str) -> io::Result<std::sync::Arc<dyn Stack>> {
        Ok(std::sync::Arc::new(KernelStack::new(
            name,
            self.protocol,
            self.io,
        )))
    }
}

/// A kernel socket.
pub struct KernelSocket {
    fd: AtomicI32,
    family: Family,
    kind: SockKind,
    io: IoMode,
    owned: bool,
    timeout: TimeoutCell,
    /// Serializes close against itself; I/O reads the fd atomically.
    close_lock: Mutex<()>,
}

impl KernelSocket {
    fn new(fd: RawFd, family: Family, kind: SockKind, io: IoMode, owned: bool) -> KernelSocket {
        KernelSocket {
            fd: AtomicI32::new(fd),
            family,
            kind,
            io,
            owned,
            timeout: TimeoutCell::new(),
            close_lock: Mutex::new(()),
        }
    }

    /// The fd, or `EBADF` once closed.
    pub fn fd(&self) -> io::Result<RawFd> {
        match self.fd.load(Ordering::Acquire) {
            fd if fd >= 0 => Ok(fd),
            _ => Err(errno(libc::EBADF)),
        }
    }

    /// The socket's family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Runs `op`, waiting for `events` as the timeout mode says.
    fn wait_op<T>(
        &self,
        events: libc::c_short,
        op: impl FnMut(RawFd) -> io::Result<T>,
    ) -> io::Result<T> {
        let fd = self.fd()?;
        let timeout = match self.timeout() {
            None => return self.retry_until(fd, events, None, op),
            Some(t) if t.is_zero() => return self.retry_until(fd, events, None, op),
            Some(t) => t,
        };
        self.retry_until(fd, events, sys::deadline(Some(timeout)), op)
    }

    /// Runs `op`; while it would block and a deadline is given, waits for
    /// `events` until then. Without one, `op`'s result stands (a blocking fd
    /// blocked in the call itself; a non-blocking one says `EAGAIN`).
    fn retry_until<T>(
        &self,
        fd: RawFd,
        events: libc::c_short,
        deadline: Option<Instant>,
        mut op: impl FnMut(RawFd) -> io::Result<T>,
    ) -> io::Result<T> {
        let Some(deadline) = deadline else {
            return op(fd);
        };
        let deadline = Some(deadline);
        loop {
            match op(fd) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sys::poll_until(fd, events, deadline)? == 0 {
                        return Err(timed_out());
                    }
                }
                other => return other,
            }
        }
    }

    fn blocking_uring(&self) -> bool {
        self.io == IoMode::Uring && self.timeout.is_blocking()
    }
}

impl Drop for KernelSocket {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl StackSocket for KernelSocket {
    fn bind(&self, addr: SocketAddr) -> io::Result<()> {
        let raw = RawAddr::from(&addr);
        // SAFETY: raw is a valid address of raw.len bytes.
        sys::cvt(unsafe { libc::bind(self.fd()?, raw.as_ptr(), raw.len) })?;
        Ok(())
    }

    fn listen(&self, backlog: i32) -> io::Result<()> {
        // SAFETY: plain syscall.
        sys::cvt(unsafe { libc::listen(self.fd()?, backlog) })?;
        Ok(())
    }

    fn accept(&self) -> io::Result<(Box<dyn StackSocket>, SocketAddr)> {
        let (fd, addr) = self.wait_op(libc::POLLIN, |fd| {
            let mut raw = RawAddr::empty();
            // SAFETY: raw has room for any address; the kernel writes its length.
            let new = sys::cvt(unsafe {
                libc::accept4(fd, raw.as_mut_ptr(), &mut raw.len, libc::SOCK_CLOEXEC)
            })?;
            Ok((new, raw))
        })?;
        let sock = KernelSocket::new(fd, self.family, self.kind, self.io, true);
        let peer = addr.to_socket_addr()?;
        Ok((Box::new(sock), peer))
    }

    fn connect(&self, addr: SocketAddr) -> io::Result<()> {
        let fd = self.fd()?;
        let raw = RawAddr::from(&addr);
        // SAFETY: raw is a valid address of raw.len bytes.
        let res = sys::cvt(unsafe { libc::connect(fd, raw.as_ptr(), raw.len) });
        match (res, self.timeout()) {
            (Ok(_), _) => Ok(()),
            (Err(e), Some(t)) if !t.is_zero() && e.raw_os_error() == Some(libc::EINPROGRESS) => {
                // Wait for the handshake, then read its outcome.
                if sys::poll_until(fd, libc::POLLOUT, sys::deadline(Some(t)))? == 0 {
                    return Err(timed_out());
                }
                match sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ERROR)? {
                    0 => Ok(()),
                    code => Err(errno(code)),
                }
            }
            (Err(e), _) => Err(e),
        }
    }

    fn send(&self, buf: &[u8], flags: i32) -> io::Result<usize> {
        if self.blocking_uring() {
            return uring::send(self.fd()?, buf, flags | libc::MSG_NOSIGNAL);
        }
        self.wait_op(libc::POLLOUT, |fd| {
            // SAFETY: buf is valid for its length.
            sys::cvt_size(unsafe {
                libc::send(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    flags | libc::MSG_NOSIGNAL,
                )
            })
        })
    }

    fn send_until(&self, buf: &[u8], flags: i32, deadline: Option<Instant>) -> io::Result<usize> {
        if deadline.is_none() || self.timeout.is_blocking() {
            return self.send(buf, flags);
        }
        self.retry_until(self.fd()?, libc::POLLOUT, deadline, |fd| {
            // SAFETY: buf is valid for its length.
            sys::cvt_size(unsafe {
                libc::send(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    flags | libc::MSG_NOSIGNAL,
                )
            })
        })
    }

    fn send_all(&self, buf: &[u8], flags: i32) -> io::Result<()> {
        let mut rest = buf;
        while !rest.is_empty() {
            let n = if self.blocking_uring() {
                uring::send(
                    self.fd()?,
                    rest,
                    flags | libc::MSG_WAITALL | libc::MSG_NOSIGNAL,
                )?
            } else {
                self.send(rest, flags)?
            };
            rest = &rest[n.min(rest.len())..];
        }
        Ok(())
    }

    fn send_to(&self, buf: &[u8], flags: i32, addr: SocketAddr) -> io::Result<usize> {
        let raw = RawAddr::from(&addr);
        self.wait_op(libc::POLLOUT, |fd| {
            // SAFETY: buf and raw are valid for their lengths.
            sys::cvt_size(unsafe {
                libc::sendto(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    flags | libc::MSG_NOSIGNAL,
                    raw.as_ptr(),
                    raw.len,
                )
            })
        })
    }

    fn recv(&self, buf: &mut [u8], flags: i32) -> io::Result<usize> {
        if self.blocking_uring() {
            return uring::recv(self.fd()?, buf, flags);
        }
        self.wait_op(libc::POLLIN, |fd| {
            // SAFETY: buf is valid for writes of its length.
            sys::cvt_size(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) })
        })
    }

    fn recv_from(&self, buf: &mut [u8], flags: i32) -> io::Result<(usize, Option<SocketAddr>)> {
        self.wait_op(libc::POLLIN, |fd| {
            let mut raw = RawAddr::empty();
            // SAFETY: buf and raw are valid for writes of their lengths.
            let n = sys::cvt_size(unsafe {
                libc::recvfrom(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags,
                    raw.as_mut_ptr(),
                    &mut raw.len,
                )
            })?;
            // A connected stream socket reports no address.
            let from = if raw.len == 0 {
                None
            } else {
                raw.to_socket_addr().ok()
            };
            Ok((n, from))
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: plain syscall.
        sys::cvt(unsafe { libc::shutdown(self.fd()?, how) })?;
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        let _guard = self.close_lock.lock().unwrap_or_else(|p| p.into_inner());
        let fd = self.fd.swap(-1, Ordering::AcqRel);
        if fd >= 0 && self.owned {
            // SAFETY: we owned fd and no longer hand it out.
            sys::cvt(unsafe { libc::close(fd) })?;
        }
        Ok(())
    }

    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        sys::set_nonblocking(self.fd()?, timeout.is_some())?;
        self.timeout.set(timeout);
        Ok(())
    }

    fn timeout(&self) -> Option<Duration> {
        self.timeout.get()
    }

    fn set_option(&self, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
        sys::setsockopt(self.fd()?, level, name, value)
    }

    fn get_option(&self, level: i32, name: i32, len: usize) -> io::Result<Vec<u8>> {
        sys::getsockopt(self.fd()?, level, name, len)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        let mut raw = RawAddr::empty();
        // SAFETY: raw has room for any address.
        sys::cvt(unsafe { libc::getsockname(self.fd()?, raw.as_mut_ptr(), &mut raw.len) })?;
        raw.to_socket_addr()
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        let mut raw = RawAddr::empty();
        // SAFETY: raw has room for any address.
        sys::cvt(unsafe { libc::getpeername(self.fd()?, raw.as_mut_ptr(), &mut raw.len) })?;
        raw.to_socket_addr()
    }

    fn poll_fd(&self) -> RawFd {
        self.fd.load(Ordering::Acquire)
    }

    fn readiness(&self) -> Readiness {
        let Ok(fd) = self.fd() else {
            return Readiness {
                error: true,
                ..Readiness::default()
            };
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: pfd is valid for the call; timeout 0 never blocks.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n <= 0 {
            return Readiness::default();
        }
        Readiness {
            readable: pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0,
            writable: pfd.revents & libc::POLLOUT != 0,
            error: pfd.revents & libc::POLLERR != 0,
        }
    }

    fn counters(&self) -> Counters {
        match (self.kind, self.fd()) {
            (SockKind::Stream, Ok(fd)) => tcp_info_counters(fd).unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

/// Per-connection counters from the kernel's `TCP_INFO`, at no cost to the
/// data path. Offsets are those of `struct tcp_info` in `linux/tcp.h`; a
/// shorter struct from an older kernel yields only the fields it has.
pub fn tcp_info_counters(fd: RawFd) -> io::Result<Counters> {
    let info = sys::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, 256)?;
    let u32_at = |off: usize| {
        info.get(off..off + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as u64)
    };
    let u64_at = |off: usize| {
        info.get(off..off + 8)
            .map(|b| u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    };
    let fields: [(&'static str, Option<u64>); 12] = [
        ("bytes_sent", u64_at(200)),
        ("bytes_acked", u64_at(120)),
        ("bytes_received", u64_at(128)),
        ("packets_sent", u32_at(136)),
        ("packets_received", u32_at(140)),
        ("retransmits", u32_at(100)),
        ("bytes_retransmitted", u64_at(208)),
        ("rtt_us", u32_at(68)),
        ("min_rtt_us", u32_at(148)),
        ("cwnd_packets", u32_at(80)),
        (
            "delivery_rate_bps",
            u64_at(160).map(|r| r.saturating_mul(8)),
        ),
        ("pacing_rate_bps", u64_at(104).map(|r| r.saturating_mul(8))),
    ];
    Ok(fields
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect())
}
