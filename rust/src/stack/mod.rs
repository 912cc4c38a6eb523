//! The stack plug-in interface.
//!
//! A *stack* is one instance of a network stack that can carry sockets: the
//! kernel's TCP/IP (plain or MPTCP), a user-space TCP/IP over a TAP device, a
//! reliable protocol over UDP. Several instances of any kind live side by
//! side, each with its own name; the routing table picks one per socket.
//!
//! Writing a new stack means implementing two traits and registering a kind:
//!
//! * [`Stack`]: the instance. It says what it can carry
//!   ([`Stack::carries`]), how the Python facade places its sockets
//!   ([`Stack::placement`]), creates sockets ([`Stack::socket`]) and keeps
//!   instance-wide counters ([`Stack::counters`]).
//! * [`StackSocket`]: one socket on that instance, with the BSD socket
//!   operations. User-space stacks build theirs on [`userspace`], which
//!   has the placeholder fds and the blocking loop every such socket needs.
//! * A [`registry::Kind`]: the name a config file uses, the fields it takes
//!   and their parser ([`options`]), listed in [`registry::KINDS`].
//!
//! `CONTRIBUTING.md` walks through a whole kind, [`memory`].
//!
//! # The contract every stack keeps
//!
//! The Python facade (`dmm.socket`) promises stdlib semantics, so each
//! [`StackSocket`] must behave like a kernel socket as seen through
//! CPython's `socket` module:
//!
//! * **Blocking modes** follow [`StackSocket::set_timeout`]: `None` blocks
//!   without limit, `Some(Duration::ZERO)` never blocks (an operation that
//!   would block fails with [`io::ErrorKind::WouldBlock`], raw errno
//!   `EAGAIN`; a non-blocking `connect` fails with `EINPROGRESS`), and
//!   `Some(t)` waits at most `t`, then fails with [`timed_out`].
//! * **Errors** are [`io::Error`]s carrying the errno the kernel would give
//!   (`ECONNREFUSED`, `ECONNRESET`, `EPIPE`, `ENOTCONN`, `EADDRINUSE`, ...),
//!   built with [`io::Error::from_raw_os_error`]. The Python boundary maps the
//!   errno to the matching `OSError` subclass, exactly as CPython does.
//! * **Signals**: a blocking operation that is interrupted returns
//!   [`io::ErrorKind::Interrupted`] (`EINTR`). The caller runs the Python
//!   signal handlers and calls again; a stack must not retry `EINTR` itself
//!   while blocked, or Ctrl-C would not work.
//! * **End of stream**: `recv` returns `Ok(0)` once the peer has shut down its
//!   write side and every byte has been read.
//! * **Thread safety**: every method takes `&self`. One thread may block in
//!   `recv` while another sends on the same socket, as with kernel sockets.
//! * **Readiness**: [`StackSocket::poll_fd`] is a kernel fd that polls
//!   readable whenever the socket has data, a pending connection or an error
//!   (for the kernel stack, the socket itself; for user-space stacks, an
//!   eventfd the stack keeps in step). [`StackSocket::readiness`] reports
//!   the exact state without blocking.
//! * **No panics**: no input, from the application or from the network,
//!   may panic. Bad input is an error.

pub mod fillp;
pub mod kernel;
pub mod memory;
pub mod options;
pub mod registry;
pub mod smol;
pub mod uring;
pub(crate) mod userspace;

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use crate::route::SockKind;

/// Address family of a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4 (`AF_INET`).
    V4,
    /// IPv6 (`AF_INET6`), which may also carry IPv4-mapped addresses.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(addr: &SocketAddr) -> Family {
        match addr {
            SocketAddr::V4(_) => Family::V4,
            SocketAddr::V6(_) => Family::V6,
        }
    }

    /// The `AF_*` constant.
    pub fn raw(self) -> i32 {
        match self {
            Family::V4 => libc::AF_INET,
            Family::V6 => libc::AF_INET6,
        }
    }
}

/// How the Python facade places a socket that an instance carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The socket stays the kernel socket on the application's own fd,
    /// and CPython's own methods move its data.
    KernelFd {
        /// The protocol number a stream socket must have on this instance
        /// (`IPPROTO_TCP`, or `IPPROTO_MPTCP`); the facade reopens a stream
        /// socket of another protocol under the same fd number.
        stream_protocol: i32,
        /// Data goes through a core socket over that fd
        /// ([`Stack::adopt`]) instead of CPython's methods (io_uring).
        adopt: bool,
    },
    /// The socket moves into a core socket of this instance
    /// ([`Stack::socket`]); its fd number becomes the core socket's
    /// [`StackSocket::poll_fd`].
    Core,
}

impl Placement {
    /// Whether sockets stay exactly as the stdlib made them: plain kernel
    /// TCP with CPython's methods, nothing to replace or adopt.
    pub fn is_passthrough(self) -> bool {
        self == Placement::KernelFd {
            stream_protocol: libc::IPPROTO_TCP,
            adopt: false,
        }
    }
}

/// Named counters, in a stable order. Stacks choose their own names; the
/// shared ones are `bytes_sent`, `bytes_received`, `packets_sent`,
/// `packets_received`, `retransmits` and `rtt_us`.
pub type Counters = Vec<(&'static str, u64)>;

/// Readiness of a socket at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// `recv`/`accept` would not block (data, EOF, a pending connection).
    pub readable: bool,
    /// `send` would not block, or a pending `connect` has finished.
    pub writable: bool,
    /// An error is pending (read it with `SO_ERROR`).
    pub error: bool,
}

/// The error of an operation that hit the socket's timeout.
///
/// It has no errno, like CPython's `TimeoutError("timed out")`, so the
/// Python boundary can tell it from a kernel `ETIMEDOUT`.
pub fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

/// A socket's timeout mode in one atomic, so `set_timeout` and blocking
/// calls on other threads need no lock: blocking, non-blocking (zero) or a
/// duration in nanoseconds.
#[derive(Debug)]
pub struct TimeoutCell(AtomicU64);

impl TimeoutCell {
    const BLOCKING: u64 = u64::MAX;

    /// A cell in blocking mode (no timeout).
    pub fn new() -> TimeoutCell {
        TimeoutCell(AtomicU64::new(Self::BLOCKING))
    }

    /// Stores a mode: `None` blocks, `Some(ZERO)` is non-blocking.
    pub fn set(&self, timeout: Option<Duration>) {
        let ns = match timeout {
            None => Self::BLOCKING,
            Some(t) => u64::try_from(t.as_nanos())
                .unwrap_or(u64::MAX)
                .min(Self::BLOCKING - 1),
        };
        self.0.store(ns, Ordering::Relaxed);
    }

    /// The stored mode.
    pub fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            Self::BLOCKING => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// Whether the socket blocks without limit.
    pub fn is_blocking(&self) -> bool {
        self.0.load(Ordering::Relaxed) == Self::BLOCKING
    }
}

impl Default for TimeoutCell {
    fn default() -> Self {
        TimeoutCell::new()
    }
}

/// dmm's own socket option level (`dmm.socket.SOL_DMM`), for options no
/// kernel level has.
pub const SOL_DMM: i32 = 0x444D4D;

/// `set_option(SOL_DMM, DMM_OFFER, b"fillp:8080,mptcp:8080")` on a
/// listening user-space socket: the protocols and ports it answers resource
/// discovery queries with (FillP: [`crate::fillp::discovery`]). Kinds that
/// answer no discovery refuse it with `ENOPROTOOPT`.
pub const DMM_OFFER: i32 = 3;

/// An `io::Error` from an errno constant.
pub fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The `int` at byte `at` of a socket option value (`EINVAL` if too short).
pub(crate) fn int_at(value: &[u8], at: usize) -> io::Result<i32> {
    let b: [u8; 4] = value
        .get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| errno(libc::EINVAL))?;
    Ok(i32::from_ne_bytes(b))
}

/// `int`s (one, or a struct of them such as `linger`) as `getsockopt`
/// returns them, in at most `len` bytes.
pub(crate) fn int_option(ints: &[i32], len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = ints.iter().flat_map(|v| v.to_ne_bytes()).collect();
    out.truncate(len);
    out
}

/// One stack instance.
pub trait Stack: Send + Sync {
    /// The instance's name, unique in a process (from the config).
    fn name(&self) -> &str;

    /// The kind's name, as in [`registry::KINDS`].
    fn kind(&self) -> &'static str;

    /// The protocol its connections speak on the wire (`"tcp"`, `"mptcp"`,
    /// `"fillp"`, ...): what a peer must accept for a connection to work,
    /// what servers advertise and resource discovery remembers. Instances
    /// of different kinds may share one (the kernel and smoltcp speak TCP).
    fn protocol(&self) -> &'static str;

    /// Whether this instance can carry a socket of this family and kind;
    /// if not, why not (one clause, for `dmm route explain`). The router
    /// skips instances that cannot, and tries the next one.
    fn carries(&self, family: Family, kind: SockKind) -> Result<(), String>;

    /// [`Stack::carries`] as a yes or no.
    fn supports(&self, family: Family, kind: SockKind) -> bool {
        self.carries(family, kind).is_ok()
    }

    /// How the facade places the sockets of this instance. The default is
    /// a user-space stack's: the socket moves into a core socket.
    fn placement(&self) -> Placement {
        Placement::Core
    }

    /// Creates an unbound, unconnected socket (blocking, no timeout).
    fn socket(&self, family: Family, kind: SockKind) -> io::Result<Box<dyn StackSocket>>;

    /// A core socket over an existing kernel socket `fd` that the caller
    /// keeps owning, for [`Placement::KernelFd`] with `adopt`. Other
    /// instances refuse with `EOPNOTSUPP`.
    fn adopt(&self, fd: RawFd, family: Family, kind: SockKind) -> io::Result<Box<dyn StackSocket>> {
        let _ = (fd, family, kind);
        Err(errno(libc::EOPNOTSUPP))
    }

    /// The address a core socket binds to when the application bound
    /// `requested` before the socket was routed here (it bound a kernel
    /// socket standing in: the wildcard, or one of the host's addresses).
    fn bind_address(&self, family: Family, requested: std::net::IpAddr) -> std::net::IpAddr {
        let _ = family;
        requested
    }

    /// Facts about the instance as `(name, value)` pairs, fixed once it is
    /// open (the kernel's I/O mode after any fallback, a device name).
    fn attributes(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// Brings an instance that went down (its device removed) back up.
    /// Instances that cannot go down refuse with `EOPNOTSUPP`.
    fn restart(&self) -> io::Result<()> {
        Err(errno(libc::EOPNOTSUPP))
    }

    /// Takes the instance down: its sockets fail with `ENETDOWN` from now on.
    /// The default does nothing (the kernel's stack cannot be stopped).
    fn stop(&self) {}

    /// Instance-wide counters (sockets opened, connections, bytes, ...).
    fn counters(&self) -> Counters;

    /// A one-line human description for `dmm stacks`.
    fn describe(&self) -> String;
}

/// One socket on a stack instance. See the module docs for the contract.
pub trait StackSocket: Send + Sync {
    /// Binds to a local address. Port 0 picks an ephemeral port.
    fn bind(&self, addr: SocketAddr) -> io::Result<()>;

    /// Starts listening, with room for `backlog` pending connections.
    fn listen(&self, backlog: i32) -> io::Result<()>;

    /// Takes the next pending connection: a new blocking socket and the
    /// peer's address.
    fn accept(&self) -> io::Result<(Box<dyn StackSocket>, SocketAddr)>;

    /// Connects (stream) or sets the default peer (datagram). In non-blocking
    /// mode a stream connect that cannot finish at once fails with
    /// `EINPROGRESS`; completion is then seen as writability and `SO_ERROR`.
    fn connect(&self, addr: SocketAddr) -> io::Result<()>;

    /// Sends from `buf`, returning how many bytes were taken.
    fn send(&self, buf: &[u8], flags: i32) -> io::Result<usize>;

    /// [`StackSocket::send`], except that when `deadline` is given a blocking
    /// wait ends there instead of after the socket's own timeout. The
    /// Python `sendall` uses it so that its timeout covers the whole call,
    /// as CPython's does. The default ignores `deadline` (each call then
    /// waits up to the socket's timeout); stacks override it.
    fn send_until(&self, buf: &[u8], flags: i32, deadline: Option<Instant>) -> io::Result<usize> {
        let _ = deadline;
        self.send(buf, flags)
    }

    /// Sends all of `buf`, blocking as the timeout allows. On error some
    /// bytes may have been sent; how many is not reported (stdlib semantics).
    fn send_all(&self, buf: &[u8], flags: i32) -> io::Result<()> {
        let mut rest = buf;
        while !rest.is_empty() {
            match self.send(rest, flags) {
                Ok(n) => rest = &rest[n.min(rest.len())..],
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends a datagram (or stream data) to `addr`.
    fn send_to(&self, buf: &[u8], flags: i32, addr: SocketAddr) -> io::Result<usize>;

    /// Receives into `buf`. `Ok(0)` is end of stream (or an empty datagram).
    fn recv(&self, buf: &mut [u8], flags: i32) -> io::Result<usize>;

    /// Receives into `buf` and says who sent it.
    fn recv_from(&self, buf: &mut [u8], flags: i32) -> io::Result<(usize, Option<SocketAddr>)>;

    /// Shuts down one or both directions.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;

    /// Releases the socket. Later calls fail with `EBADF`.
    fn close(&self) -> io::Result<()>;

    /// `None`: block; `Some(ZERO)`: non-blocking; `Some(t)`: wait at most `t`.
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;

    /// The timeout set by [`StackSocket::set_timeout`].
    fn timeout(&self) -> Option<Duration>;

    /// Sets an option, with the same levels, names and value encoding as
    /// `setsockopt(2)`. Stacks map what they support and fail with
    /// `ENOPROTOOPT` otherwise.
    fn set_option(&self, level: i32, name: i32, value: &[u8]) -> io::Result<()>;

    /// Reads an option into at most `len` bytes, as `getsockopt(2)`.
    fn get_option(&self, level: i32, name: i32, len: usize) -> io::Result<Vec<u8>>;

    /// The bound local address.
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// The connected peer's address (`ENOTCONN` if none).
    fn peer_addr(&self) -> io::Result<SocketAddr>;

    /// A kernel fd that polls readable when this socket is readable.
    fn poll_fd(&self) -> RawFd;

    /// For a socket whose [`StackSocket::poll_fd`] is not the socket itself
    /// (user-space stacks): a kernel fd that polls readable exactly while
    /// this socket is writable. `None`: `poll_fd` polls writable as the
    /// socket does (kernel sockets). A user-space stack may make the fd on
    /// the first call, which can then fail (`EMFILE`).
    fn write_poll_fd(&self) -> io::Result<Option<RawFd>> {
        Ok(None)
    }

    /// The socket's readiness now, without blocking.
    fn readiness(&self) -> Readiness;

    /// Per-socket counters.
    fn counters(&self) -> Counters;
}
