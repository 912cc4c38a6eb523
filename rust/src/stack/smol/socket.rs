//! What TCP and UDP sockets of an instance share: the id and eventfds of
//! a socket, its timeout mode, and the loop of a blocking call (try under
//! the lock, run a turn if the call changed a connection, wait on an
//! eventfd with `poll(2)` so signals return `EINTR`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::state::{readable, writable, SockFds, State};
use super::{device_fd, lock, Shared};
use crate::stack::{errno, timed_out, Family, Readiness, TimeoutCell};
use crate::sys;

/// What a blocked operation waits for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// The `ready` eventfd (level: the socket is readable).
    Read,
    /// The `wake` eventfd (set when a waiting writer may go on).
    Write,
}

/// The outcome of one attempt of an operation.
pub(super) enum Try<T> {
    Done(io::Result<T>),
    Block,
}

/// The unspecified address of a family, port 0.
pub(super) fn unspecified(family: Family) -> SocketAddr {
    match family {
        Family::V4 => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        Family::V6 => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// Defines a socket type around a [`SockCore`]: the struct, `new`, deref
/// to the core, and close on drop.
macro_rules! core_socket {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name {
            core: SockCore,
        }

        impl $name {
            pub(super) fn new(core: SockCore) -> Self {
                $name { core }
            }
        }

        impl std::ops::Deref for $name {
            type Target = SockCore;
            fn deref(&self) -> &SockCore {
                &self.core
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                let _ = StackSocket::close(self);
            }
        }
    };
}

/// The [`StackSocket`](crate::stack::StackSocket) methods every socket
/// type answers from its [`SockCore`] alone, and `bind` through the
/// type's own `bind_locked`.
macro_rules! socket_common {
    () => {
        fn bind(&self, addr: SocketAddr) -> io::Result<()> {
            self.check_open()?;
            if Family::of(&addr) != self.family {
                return Err(errno(libc::EAFNOSUPPORT));
            }
            let mut st = lock(&self.shared.state);
            self.bind_locked(&mut st, addr)
        }

        fn local_addr(&self) -> io::Result<SocketAddr> {
            self.local()
        }

        fn poll_fd(&self) -> RawFd {
            self.ready_fd()
        }

        fn write_poll_fd(&self) -> Option<RawFd> {
            Some(self.write_fd())
        }

        fn readiness(&self) -> Readiness {
            self.readiness_now()
        }

        fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
            self.set_timeout_mode(timeout)
        }

        fn timeout(&self) -> Option<Duration> {
            self.timeout.get()
        }
    };
}

/// What every socket of an instance has: its id in the shared state, its
/// eventfds, its timeout mode, and the blocking-call loop.
pub struct SockCore {
    pub(super) shared: Arc<Shared>,
    pub(super) id: u64,
    pub(super) fds: Arc<SockFds>,
    pub(super) family: Family,
    pub(super) timeout: TimeoutCell,
    pub(super) closed: AtomicBool,
}

impl SockCore {
    pub(super) fn new(shared: Arc<Shared>, id: u64, fds: Arc<SockFds>, family: Family) -> Self {
        SockCore {
            shared,
            id,
            fds,
            family,
            timeout: TimeoutCell::new(),
            closed: AtomicBool::new(false),
        }
    }

    pub(super) fn check_open(&self) -> io::Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(errno(libc::EBADF));
        }
        Ok(())
    }

    /// Runs `op` under the lock until it is done, waiting on `wait` between
    /// attempts as the timeout mode says (`nonblock` forces non-blocking).
    /// `op` sets its flag when it changed the connection: a turn then runs
    /// at once in this thread.
    pub(super) fn run<T>(
        &self,
        wait: Wait,
        nonblock: bool,
        op: impl FnMut(&mut State, &mut bool) -> Try<T>,
    ) -> io::Result<T> {
        self.run_until(wait, nonblock, None, op)
    }

    /// [`Self::run`], with `until` (when given, and the socket has a
    /// timeout) as the deadline instead of one timeout from now: `sendall`
    /// spreads one timeout over all its sends.
    pub(super) fn run_until<T>(
        &self,
        wait: Wait,
        nonblock: bool,
        until: Option<std::time::Instant>,
        mut op: impl FnMut(&mut State, &mut bool) -> Try<T>,
    ) -> io::Result<T> {
        self.check_open()?;
        let timeout = if nonblock {
            Some(Duration::ZERO)
        } else {
            self.timeout.get()
        };
        let deadline = match (timeout, until) {
            (Some(t), Some(u)) if !t.is_zero() => Some(u),
            _ => sys::deadline(timeout),
        };
        // The TAP fd, while a reader also watches it (see below).
        let mut tap: Option<RawFd> = None;
        let mut tap_ready = false;
        loop {
            {
                let mut st = lock(&self.shared.state);
                if tap_ready {
                    // A frame arrived while we waited: take it ourselves.
                    self.shared.poll_inline(&mut st);
                }
                let mut changed = false;
                let r = op(&mut st, &mut changed);
                if changed {
                    self.shared.poll_inline(&mut st);
                }
                st.sync(self.id);
                if let Try::Done(r) = r {
                    return r;
                }
                // A blocked reader with inline polling also watches the
                // TAP, so the reply it waits for reaches it without a hop
                // through the driver thread.
                if wait == Wait::Read && self.shared.opts.inline_poll {
                    tap = device_fd(&st);
                }
            }
            if timeout.is_some_and(|t| t.is_zero()) {
                return Err(errno(libc::EAGAIN));
            }
            let fd = match wait {
                Wait::Read => self.fds.ready.as_raw_fd(),
                Wait::Write => self.fds.wake.as_raw_fd(),
            };
            let Some(revents) = sys::wait_readable_or(fd, tap, deadline)? else {
                return Err(timed_out());
            };
            // An error on the TAP is the driver's to handle; stop watching.
            let bad = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
            tap_ready = revents & libc::POLLIN != 0 && revents & bad == 0;
            if revents & bad != 0 {
                tap = None;
            }
            self.check_open()?;
        }
    }

    /// Checks that this socket may bind to `addr` (instance up, address
    /// ours, socket not failed) and returns its state.
    pub(super) fn bindable<'a>(
        &self,
        st: &'a State,
        addr: SocketAddr,
    ) -> io::Result<&'a super::state::SockState> {
        st.check_up()?;
        let ip = addr.ip();
        if !ip.is_unspecified()
            && !st
                .iface
                .ip_addrs()
                .iter()
                .any(|c| c.address() == smoltcp::wire::IpAddress::from(ip))
        {
            return Err(errno(libc::EADDRNOTAVAIL));
        }
        let s = st.socks.get(&self.id).ok_or_else(|| errno(libc::EBADF))?;
        match s.fatal {
            Some(e) => Err(errno(e)),
            None => Ok(s),
        }
    }

    /// The bound local address (unspecified before `bind`/`connect`).
    pub(super) fn local(&self) -> io::Result<SocketAddr> {
        self.check_open()?;
        let st = lock(&self.shared.state);
        let s = st.socks.get(&self.id).ok_or_else(|| errno(libc::EBADF))?;
        Ok(s.local.unwrap_or_else(|| unspecified(self.family)))
    }

    /// The `ready` eventfd.
    pub(super) fn ready_fd(&self) -> RawFd {
        self.fds.ready.as_raw_fd()
    }

    /// The fd readable exactly while the socket is writable.
    pub(super) fn write_fd(&self) -> RawFd {
        self.fds.wake.as_raw_fd()
    }

    /// The exact readiness now.
    pub(super) fn readiness_now(&self) -> Readiness {
        if self.check_open().is_err() {
            return Readiness::default();
        }
        let st = lock(&self.shared.state);
        let Some(s) = st.socks.get(&self.id) else {
            return Readiness::default();
        };
        Readiness {
            readable: readable(s, &st.sockets),
            writable: writable(s, &st.sockets),
            error: s.error.is_some() || s.fatal.is_some(),
        }
    }

    /// Sets the timeout mode.
    pub(super) fn set_timeout_mode(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.check_open()?;
        self.timeout.set(timeout);
        Ok(())
    }

    /// Marks the socket closed (once): later calls fail with `EBADF`.
    /// Returns whether this call closed it.
    pub(super) fn mark_closed(&self) -> bool {
        !self.closed.swap(true, Ordering::AcqRel)
    }

    /// Wakes every thread blocked on this socket (after close: they see
    /// `EBADF`).
    pub(super) fn wake_all(&self) {
        self.fds.ready.set();
        self.fds.wake.set();
    }
}
