//! A user-space socket's eventfds and the record of their levels.
//!
//! A user-space socket has no kernel socket to poll, so it offers eventfds
//! in its place: `ready` is readable exactly while the socket is (data,
//! EOF, an error, a pending connection), and `wake` exactly while it is
//! writable. Applications poll them (`poll_fd`, `write_poll_fd`); blocked
//! calls of the socket wait on them too. The stack keeps them in step with
//! the socket's state through its [`Mirror`], under the instance's lock.
//!
//! `wake` is made on first use (a `write_poll_fd` call, or a writer that
//! has to wait): most connections never wait to write, and an fd each
//! would cap how many a process can hold (issue 19: a FillP client end
//! cost four). Until then only its level is recorded. A blocking
//! `connect` waits on it and then lets it go again, unless the
//! application was given it meanwhile: a connection that is only ever
//! written to with room in its buffer keeps just `ready`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

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
    /// `write_poll_fd`, and what blocked `send`/`connect` wait on. Behind
    /// its own small lock because it is made outside the instance's lock.
    wake: Mutex<Wake>,
}

/// The `wake` eventfd once made, and the level it shows (or will show).
#[derive(Debug, Default)]
struct Wake {
    fd: Option<EventFd>,
    writable: bool,
    /// Handed out as a `write_poll_fd`: then it stays for good.
    exported: bool,
    /// Blocked calls polling it now ([`WakeHold`]s).
    waiters: usize,
}

/// A blocked call's use of `wake`; when the last one that asked for it
/// ends, an fd nobody else was given is closed again.
pub(crate) struct WakeHold {
    fds: Arc<SockFds>,
    release: bool,
    /// The `wake` eventfd, open while this hold lasts.
    pub fd: RawFd,
}

impl Drop for WakeHold {
    fn drop(&mut self) {
        let mut w = self.fds.wake();
        w.waiters -= 1;
        if self.release && w.waiters == 0 && !w.exported {
            w.fd = None;
        }
    }
}

impl SockFds {
    /// A new, unset `ready` eventfd; `wake` comes when first asked for.
    pub fn new() -> io::Result<Arc<SockFds>> {
        Ok(Arc::new(SockFds {
            ready: EventFd::new()?,
            wake: Mutex::default(),
        }))
    }

    fn wake(&self) -> std::sync::MutexGuard<'_, Wake> {
        self.wake.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The `wake` eventfd for the application (`write_poll_fd`), made now
    /// at the recorded level if it was not yet (`EMFILE` and the like if
    /// that fails). It stays until the socket is dropped.
    pub fn wake_fd(&self) -> io::Result<RawFd> {
        let mut w = self.wake();
        let fd = made(&mut w)?;
        w.exported = true;
        Ok(fd)
    }

    /// The `wake` eventfd for a blocked call to poll while it holds the
    /// returned [`WakeHold`]. With `release`, the fd is closed when the
    /// last such call ends, unless the application was given it.
    pub fn hold_wake(self: &Arc<Self>, release: bool) -> io::Result<WakeHold> {
        let mut w = self.wake();
        let fd = made(&mut w)?;
        w.waiters += 1;
        Ok(WakeHold {
            fds: Arc::clone(self),
            release,
            fd,
        })
    }

    /// Whether `wake` exists now.
    #[cfg(test)]
    pub fn has_wake(&self) -> bool {
        self.wake().fd.is_some()
    }

    /// Records whether the socket is writable, and shows it on `wake` if
    /// that exists.
    fn set_writable(&self, want: bool) {
        let mut w = self.wake();
        w.writable = want;
        if let Some(fd) = &w.fd {
            if want {
                fd.set();
            } else {
                fd.clear();
            }
        }
    }

    /// Sets both, whatever the state says: a closed socket's blocked
    /// callers then wake and see `EBADF`.
    pub fn wake_all(&self) {
        self.ready.set();
        self.set_writable(true);
    }
}

/// `w`'s eventfd, made at its recorded level if it was not yet.
fn made(w: &mut Wake) -> io::Result<RawFd> {
    if let Some(fd) = &w.fd {
        return Ok(fd.as_raw_fd());
    }
    let fd = EventFd::new()?;
    if w.writable {
        fd.set();
    }
    let raw = fd.as_raw_fd();
    w.fd = Some(fd);
    Ok(raw)
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
        if self.writable != writable {
            self.writable = writable;
            self.fds.set_writable(writable);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys;
    use std::time::Instant;

    fn readable(fd: RawFd) -> bool {
        sys::poll_until(fd, libc::POLLIN, Some(Instant::now())).unwrap() & libc::POLLIN != 0
    }

    #[test]
    fn wake_is_made_on_first_use_at_the_level_shown_so_far() {
        let fds = SockFds::new().unwrap();
        let mut m = Mirror::new(Arc::clone(&fds));
        m.show(false, true);
        assert!(!fds.has_wake(), "showing a level makes no fd");
        let w = fds.wake_fd().unwrap();
        assert!(readable(w), "made while writable: readable at once");
        assert_eq!(fds.wake_fd().unwrap(), w, "made once");
        m.show(true, false);
        assert!(readable(fds.ready.as_raw_fd()));
        assert!(!readable(w));
        m.show(true, true);
        assert!(readable(w));
        m.show(false, false);
        fds.wake_all();
        assert!(readable(w) && readable(fds.ready.as_raw_fd()));
    }

    #[test]
    fn a_connect_lets_its_wake_go_unless_it_was_handed_out() {
        let fds = SockFds::new().unwrap();
        let hold_a = fds.hold_wake(true).unwrap();
        let hold_b = fds.hold_wake(true).unwrap();
        assert_eq!(hold_a.fd, hold_b.fd, "one fd for every waiter");
        drop(hold_a);
        assert!(fds.has_wake(), "kept while a waiter polls it");
        drop(hold_b);
        assert!(!fds.has_wake(), "closed after the last waiter");
        // A writer's wait (no release) keeps it.
        drop(fds.hold_wake(false).unwrap());
        assert!(fds.has_wake());
        // Once handed out it stays, whoever waits.
        let fds = SockFds::new().unwrap();
        let w = fds.wake_fd().unwrap();
        let hold = fds.hold_wake(true).unwrap();
        assert_eq!(hold.fd, w);
        drop(hold);
        assert!(fds.has_wake());
    }

    #[test]
    fn a_wake_made_after_a_write_stall_starts_unreadable() {
        let fds = SockFds::new().unwrap();
        let mut m = Mirror::new(Arc::clone(&fds));
        m.show(true, true);
        m.show(true, false);
        assert!(!readable(fds.wake_fd().unwrap()));
    }
}
