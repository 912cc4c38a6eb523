//! What TCP and UDP sockets of an instance share: the user-space socket
//! core ([`crate::stack::userspace`]) with this stack's part of its
//! blocking loop (after an attempt that changed a connection, run a turn
//! at once in the calling thread; a blocked reader also watches the TAP
//! and runs the turn itself when a frame arrives), and the socket methods
//! that need only the socket's record.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};

use super::state::{readable, writable, State};
use super::{device_fd, Shared};
use crate::stack::userspace::{self, lock, record, unspecified, Host};
use crate::stack::{errno, Readiness};

/// A socket's handle: the user-space core over this stack's [`Shared`].
pub(super) type SockCore = userspace::SockCore<Shared>;

impl Host for Shared {
    type State = State;
    /// Whether the attempt changed a connection (data queued or read, a
    /// connection accepted, a handshake begun): a turn then runs at once.
    type Effects = bool;
    /// The TAP device's fd.
    type Watch<'a> = RawFd;

    fn state(&self) -> &Mutex<State> {
        &self.state
    }

    fn after_attempt(&self, st: &mut State, id: u64, changed: &mut bool) {
        if *changed {
            self.poll_inline(st);
        }
        st.sync(id);
    }

    /// With inline polling, a blocked reader also watches the TAP, so the
    /// reply it waits for reaches it without a hop through the driver.
    fn watch(&self, st: &mut State, _id: u64) -> Option<RawFd> {
        if self.opts.inline_poll {
            device_fd(st)
        } else {
            None
        }
    }

    fn arrived<'a>(
        &'a self,
        _tap: RawFd,
        revents: libc::c_short,
        _id: u64,
        _changed: &mut bool,
    ) -> MutexGuard<'a, State> {
        let mut st = lock(&self.state);
        // A frame arrived while we waited: take it ourselves. An error on
        // the TAP is the driver's to handle.
        let bad = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
        if revents & libc::POLLIN != 0 && revents & bad == 0 {
            self.poll_inline(&mut st);
        }
        st
    }
}

/// Defines a socket type around a [`SockCore`]: the struct, `new`, deref
/// to the core, and close on drop.
macro_rules! core_socket {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub(crate) struct $name {
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

        fn write_poll_fd(&self) -> io::Result<Option<RawFd>> {
            self.write_fd().map(Some)
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

impl SockCore {
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
        let s = record(&st.socks, self.id)?;
        match s.fatal {
            Some(e) => Err(errno(e)),
            None => Ok(s),
        }
    }

    /// The bound local address (unspecified before `bind`/`connect`).
    pub(super) fn local(&self) -> io::Result<SocketAddr> {
        let st = self.lock()?;
        let s = record(&st.socks, self.id)?;
        Ok(s.local.unwrap_or_else(|| unspecified(self.family)))
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
}
