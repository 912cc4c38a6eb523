//! A user-space socket's eventfds and the record of their levels.
//!
//! A user-space socket has no kernel socket to poll, so it offers eventfds
//! in its place: `ready` is readable exactly while the socket is (data,
//! EOF, an error, a pending connection), and `wake` exactly while it is
//! writable. Applications poll them (`poll_fd`, `write_poll_fd`); blocked
//! calls of the socket wait on them too. The stack keeps them in step with
//! the socket's state through its [`Mirror`], under the instance's lock.

use std::io;
use std::sync::Arc;

use crate::sys::event::EventFd;

/// The two eventfds of a socket, shared by its handle (which waits on
/// them) and its record in the instance's state (which sets them).
#[derive(Debug)]
pub(crate) struct SockFds {
    /// Readable exactly while the socket is readable: its `poll_fd`, and
    /// what blocked `recv`/`accept` wait on.
    pub ready: EventFd,
    /// Readable exactly while the socket is writable (by the stack's rule
    /// for when a full socket counts as writable again): its
    /// `write_poll_fd`, and what blocked `send`/`connect` wait on.
    pub wake: EventFd,
}

impl SockFds {
    /// Two new, unset eventfds.
    pub fn new() -> io::Result<Arc<SockFds>> {
        Ok(Arc::new(SockFds {
            ready: EventFd::new()?,
            wake: EventFd::new()?,
        }))
    }

    /// Sets both, whatever the state says: a closed socket's blocked
    /// callers then wake and see `EBADF`.
    pub fn wake_all(&self) {
        self.ready.set();
        self.wake.set();
    }
}

/// A socket's eventfds with the level each was last given, kept in the
/// socket's record under the instance's lock. Showing a state costs a
/// system call only for an eventfd whose level changes, so the common case
/// (a busy socket that stays readable or writable) costs none.
#[derive(Debug)]
pub(crate) struct Mirror {
    fds: Arc<SockFds>,
    readable: bool,
    writable: bool,
}

impl Mirror {
    /// The record of a new socket's eventfds: neither readable nor
    /// writable yet.
    pub fn new(fds: Arc<SockFds>) -> Mirror {
        Mirror {
            fds,
            readable: false,
            writable: false,
        }
    }

    /// The eventfds, for a handle made from this record (`accept`).
    pub fn fds(&self) -> &Arc<SockFds> {
        &self.fds
    }

    /// Whether `wake` is set now: a stack whose rule for waking a writer
    /// differs from plain writability (half the buffer free) looks here to
    /// pick the rule.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Sets or clears each eventfd to match the socket's state now.
    pub fn show(&mut self, readable: bool, writable: bool) {
        self.fds.ready.set_level(&mut self.readable, readable);
        self.fds.wake.set_level(&mut self.writable, writable);
    }
}
