//! What every user-space stack's sockets share: the socket skeleton that
//! the `smoltcp` and FillP stack kinds are both built on.
//!
//! A user-space stack keeps its connections in memory behind one `Mutex`
//! (the instance's state) and runs a driver thread for timers and input.
//! Its sockets are not kernel sockets, yet they must behave like them (see
//! the contract in [`crate::stack`]): block, time out or fail with `EAGAIN`
//! as the timeout mode says, return `EINTR` on a signal, `EBADF` once
//! closed, and offer a kernel fd that polls readable when the socket is.
//! This module is that skeleton, written once:
//!
//! * [`fds`]: a socket's two eventfds ([`SockFds`]): `ready`, readable
//!   exactly while the socket is (its `poll_fd`), and `wake`, readable
//!   while it is writable (its `write_poll_fd`, and what blocked writers
//!   wait on); and [`Mirror`], the copy of their levels kept in the
//!   socket's record, which sets or clears an eventfd only when the level
//!   changes (no system call otherwise).
//! * [`blocking`]: [`SockCore`], the per-socket handle (instance, id,
//!   eventfds, family, timeout mode, closed flag), and its blocking loop
//!   [`SockCore::run`]: try the operation under the lock; if it would
//!   block, fail with `EAGAIN` (non-blocking), or wait on the socket's
//!   eventfd with `poll(2)` up to the deadline
//!   ([`timed_out`](crate::stack::timed_out) after it), then try again.
//! * [`accept`]: [`SockCore::accept_next`], `accept` over a listener's
//!   queue of connection ids, for a state that implements [`Listeners`].
//!
//! # What a stack implements
//!
//! The loop is generic over a [`Host`]: the instance's shared part, which
//! owns the state `Mutex` and adds what its stack does around an attempt.
//! A stack writes:
//!
//! * the operations, as closures `op(&mut State, &mut Effects) ->` [`Try`]
//!   that [`SockCore::run`] calls under the lock: [`Try::Done`] with the
//!   result, or [`Try::Block`] when the call must wait. An operation records
//!   in `Effects` what the host must do about it (smoltcp: "a connection
//!   changed, run a turn now"; FillP: "kick the driver for this slot",
//!   "flush this connection after the lock");
//! * [`Host::after_attempt`], run under the same hold of the lock after
//!   every attempt: act on the effects that need the state, and bring the
//!   socket's [`Mirror`] in line with it, so its eventfds are right before
//!   the lock is released;
//! * optionally [`Host::finish`] (after the attempt that ends the call; it
//!   gets the guard, so it may release the lock first and then send),
//!   [`Host::stopped`] (the instance has stopped: a call that would block
//!   fails with `ENETDOWN`), and [`Host::watch`] / [`Host::arrived`]: a
//!   further fd a blocked reader waits on besides its `ready` eventfd
//!   (smoltcp: the TAP device; FillP: its UDP socket), and what the reader
//!   does when input arrives there (process it itself, where the driver
//!   would, so the reply it waits for reaches it without a thread hop).
//!
//! A stack with listening sockets keeps, per listener, a queue of the ids
//! of connections ready to be accepted, and implements [`Listeners`] on
//! its state: `accept` is then [`SockCore::accept_next`].
//!
//! The state keeps one [`Mirror`] per socket and shows every change of the
//! socket's readable and writable state on it under the lock (the driver
//! too, for changes it makes), and sets both eventfds when a socket is
//! closed or fails, so every blocked caller wakes.
//!
//! The least a stack writes, for a stack with no driver work to do inline
//! (`sync` brings a socket's [`Mirror`] in line with its state):
//!
//! ```text
//! impl Host for Shared {
//!     type State = State;
//!     type Effects = ();
//!     type Watch<'a> = RawFd; // never made: `watch` keeps its default
//!
//!     fn state(&self) -> &Mutex<State> {
//!         &self.state
//!     }
//!
//!     fn after_attempt(&self, st: &mut State, id: u64, _: &mut ()) {
//!         st.sync(id);
//!     }
//! }
//!
//! // In `StackSocket::recv`, with `core: SockCore<Shared>`:
//! let nonblock = flags & libc::MSG_DONTWAIT != 0;
//! self.core.run(Wait::Read, nonblock, |st, _| match st.read(self.core.id, buf) {
//!     Some(n) => Try::Done(Ok(n)), // data, or 0 at end of stream
//!     None => Try::Block,
//! })
//! ```
//!
//! # What the core guarantees
//!
//! * A closed socket's calls fail with `EBADF` before they start, and
//!   after every wait: a socket closed by another thread (which sets both
//!   eventfds) wakes its blocked callers with `EBADF`.
//! * The timeout mode is read once per call: `None` blocks without limit,
//!   zero (or `nonblock`, for `MSG_DONTWAIT`) fails with `EAGAIN` after one
//!   attempt, otherwise the call fails with
//!   [`timed_out`](crate::stack::timed_out) at the deadline (one timeout
//!   from the call's start, or the caller's own deadline, for `sendall`).
//! * Waits are `ppoll(2)` with the thread's own signal mask, so a signal
//!   returns `EINTR` to the caller, which runs the Python handlers and
//!   calls again; the core never retries it.
//! * The core takes the lock once per attempt and runs the operation,
//!   [`Host::after_attempt`] and [`Host::finish`] within that one hold
//!   ([`Host::arrived`] hands over the guard it took instead of the core
//!   locking again). Nothing is allocated, boxed or dispatched
//!   dynamically: the loop is monomorphised per host and per operation.

pub(crate) mod accept;
pub(crate) mod blocking;
pub(crate) mod fds;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::{errno, int_at, int_option, Family};

pub(crate) use accept::Listeners;
pub(crate) use blocking::{Host, SockCore, Try, Wait};
pub(crate) use fds::{Mirror, SockFds};

/// A socket's record in its instance's table; `EBADF` once it is gone
/// (closed, or removed by a reset).
pub(crate) fn record<V>(socks: &HashMap<u64, V>, id: u64) -> io::Result<&V> {
    socks.get(&id).ok_or_else(|| errno(libc::EBADF))
}

/// [`record`], mutable.
pub(crate) fn record_mut<V>(socks: &mut HashMap<u64, V>, id: u64) -> io::Result<&mut V> {
    socks.get_mut(&id).ok_or_else(|| errno(libc::EBADF))
}

/// Locks an instance's state. A poisoned lock (a thread panicked holding
/// it, which the stack contract rules out) is taken as it is rather than
/// failing every later call.
pub(crate) fn lock<S>(m: &Mutex<S>) -> MutexGuard<'_, S> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The unspecified address of a family, port 0: what `getsockname` reports
/// before `bind`.
pub(crate) fn unspecified(family: Family) -> SocketAddr {
    match family {
        Family::V4 => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        Family::V6 => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// Records `shutdown(how)` in a socket's flags. Returns whether `how`
/// shuts the write side, which the stack then closes (a FIN after the data
/// still queued).
pub(crate) fn shut(how: Shutdown, shut_rd: &mut bool, shut_wr: &mut bool) -> bool {
    let (rd, wr) = (
        matches!(how, Shutdown::Read | Shutdown::Both),
        matches!(how, Shutdown::Write | Shutdown::Both),
    );
    *shut_rd |= rd;
    *shut_wr |= wr;
    wr
}

/// A socket's `SO_LINGER`, kept as user-space stacks need it: only "is
/// `close` an abort" changes what they do (a linger time above zero is
/// kept for `getsockopt` but `close` does not wait).
#[derive(Debug)]
pub(crate) struct Linger(AtomicI64);

impl Linger {
    /// Off, as for a new socket.
    pub fn new() -> Linger {
        Linger(AtomicI64::new(-1))
    }

    /// `setsockopt(SO_LINGER)` with a `struct linger` (`EINVAL` if short).
    pub fn set(&self, value: &[u8]) -> io::Result<()> {
        let (on, secs) = (int_at(value, 0)?, int_at(value, 4)?);
        let v = if on == 0 { -1 } else { i64::from(secs.max(0)) };
        self.0.store(v, Ordering::Relaxed);
        Ok(())
    }

    /// `getsockopt(SO_LINGER)`: a `struct linger` in at most `len` bytes.
    pub fn get(&self, len: usize) -> Vec<u8> {
        let v = self.0.load(Ordering::Relaxed);
        let (on, secs) = if v < 0 {
            (0, 0)
        } else {
            (1, v.min(i64::from(i32::MAX)) as i32)
        };
        int_option(&[on, secs], len)
    }

    /// On with a zero time: `close` resets the connection, as in TCP.
    pub fn aborts(&self) -> bool {
        self.0.load(Ordering::Relaxed) == 0
    }
}

/// Integer socket options a user-space stack accepts without acting on
/// them (`SO_REUSEPORT`, `SO_KEEPALIVE`, ...), kept per socket so that
/// `getsockopt` returns what was set: programs and the stdlib's own tests
/// check. A handful of entries, so a list rather than a map.
#[derive(Debug, Default)]
pub(crate) struct KeptOptions(Mutex<Vec<((i32, i32), i32)>>);

impl KeptOptions {
    /// Records `value` for `(level, name)`.
    pub fn set(&self, key: (i32, i32), value: i32) {
        let mut kept = lock(&self.0);
        match kept.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => kept.push((key, value)),
        }
    }

    /// What was set for `(level, name)`, if anything.
    pub fn get(&self, key: (i32, i32)) -> Option<i32> {
        lock(&self.0)
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }
}
