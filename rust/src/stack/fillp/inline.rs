//! Application threads doing the driver's work: a reader that receives
//! inline on its slot's UDP socket (its [`Watch`] keeps the driver off the
//! socket meanwhile), and a reader or writer that sends what its own call
//! made due, instead of waking the driver for it. They are this stack's
//! part of the user-space socket core's blocking loop: its [`Host`] impl.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::driver::Pump;
use super::state::{Role, State};
use super::Shared;
use crate::fillp::ConnectionHandle;
use crate::stack::userspace::{lock, Host};

/// How long the driver leaves a busy UDP socket to the reader that last
/// watched it (see "Readers receive inline" in [`super`]): a bulk reader
/// is back within microseconds, and the driver then stays asleep instead
/// of taking every batch from under it. Bounds the extra delay a datagram
/// sees when the reader does not come back.
pub(super) const WATCH_LEASE: Duration = Duration::from_micros(500);

/// A reader whose connection has more than this unacknowledged does not
/// watch (see [`Watch::new`]); a request or reply of up to this size does.
const WATCH_MAX_UNACKED: usize = 64 << 10;

/// What one attempt of a socket call asks of the stack once it has run
/// (the [`Host::Effects`] of FillP).
#[derive(Default)]
pub(super) struct Effects {
    /// A connection of this slot changed: the driver must run it.
    pub(super) kick: Option<usize>,
    /// Connection `(slot, handle)` was read from, or written to while idle:
    /// send what it has to send now (see [`Shared::flush_inline`]) instead
    /// of waking the driver.
    pub(super) flush: Option<(usize, ConnectionHandle)>,
    /// The reader ran its slot's turn before this attempt
    /// ([`Shared::pump_inline`]), which left the reader's eventfds to it.
    pumped: bool,
}

impl Host for Shared {
    type State = State;
    type Effects = Effects;
    type Watch<'a> = Watch<'a>;

    fn state(&self) -> &Mutex<State> {
        &self.state
    }

    fn after_attempt(&self, st: &mut State, id: u64, fx: &mut Effects) {
        if fx.pumped {
            st.sync(id);
        }
        if let Some(i) = fx.kick {
            self.kick(st, i);
        }
    }

    fn finish(&self, st: MutexGuard<'_, State>, fx: Effects) {
        if let Some((i, h)) = fx.flush {
            self.flush_inline(st, i, h);
        }
    }

    /// The driver has stopped: nothing would wake a blocked call.
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn watch<'a>(&'a self, st: &mut State, id: u64) -> Option<Watch<'a>> {
        Watch::new(self, st, id)
    }

    /// A connect waiting for its handshake watches its own UDP socket, so
    /// the COOKIE and CONN_ACK reach it with no hop through the driver.
    /// Not toward a listener of this instance: the driver runs both ends.
    fn watch_write<'a>(&'a self, st: &mut State, id: u64) -> Option<Watch<'a>> {
        let s = st.socks.get(&id)?;
        let (
            Role::Conn {
                established: false, ..
            },
            Some(peer),
        ) = (&s.role, s.peer)
        else {
            return None;
        };
        if st.listens_here(peer) {
            return None;
        }
        Watch::new(self, st, id)
    }

    /// Datagrams (or an ICMP error) arrived on the watched socket: end the
    /// watch, then receive and run the slot's turn in this thread.
    fn arrived<'a>(
        &'a self,
        watch: Watch<'a>,
        revents: libc::c_short,
        id: u64,
        fx: &mut Effects,
    ) -> MutexGuard<'a, State> {
        let slot = watch.slot;
        drop(watch);
        if revents & (libc::POLLIN | libc::POLLERR) != 0 {
            self.pump_inline(slot, id);
            fx.pumped = true;
        }
        lock(&self.state)
    }
}

impl Shared {
    /// Takes a pump from the pool, or makes one.
    pub(super) fn take_pump(&self) -> Pump {
        self.pumps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| Pump::new(&self.opts))
    }

    pub(super) fn put_pump(&self, pump: Pump) {
        let mut pumps = self.pumps.lock().unwrap_or_else(|p| p.into_inner());
        if pumps.len() < 4 {
            pumps.push(pump);
        }
    }

    /// A reader's turn on its own slot, run where the driver would: receive
    /// what arrived, run the slot's timers and events, send what is due.
    /// Wakes the driver if the slot has more to send at once or its next
    /// deadline moved before the driver's.
    pub(super) fn pump_inline(&self, i: usize, reader: u64) {
        let mut pump = self.take_pump();
        self.receive(&mut pump, i, false);
        let mut st = lock(&self.state);
        let more = self.turn(&mut st, &mut pump, i, Instant::now());
        // The reader's own eventfds are left as they are: it takes the
        // lock again at once, reads, and brings them in line then. Raising
        // `ready` here only for that read to lower it cost two system calls
        // per message.
        pump.sync_touched_but(&mut st, Some(reader));
        st.reschedule(i);
        let next = st.slot(i).and_then(|sl| sl.deadline);
        self.finish_inline(st, pump, i, more, next);
    }

    /// After a `recv` on connection `h` of slot `i`, or a `send` that found
    /// nothing waiting: what that connection has to send now (a window
    /// update, a request), sent by the calling thread. Only this
    /// connection is asked, so a `recv` costs the same however many
    /// connections share the slot.
    pub(super) fn flush_inline(
        &self,
        mut st: MutexGuard<'_, State>,
        i: usize,
        h: ConnectionHandle,
    ) {
        let now = Instant::now();
        let Some(sl) = st.slot_mut(i) else { return };
        if sl.tx_busy || !sl.tx.q.is_empty() {
            // Another thread is sending the slot's queue: the driver runs
            // the connection after it.
            self.kick(&mut st, i);
            return;
        }
        let Some(c) = sl.ep.connection_mut(h) else {
            return;
        };
        let mut pump = self.take_pump();
        let more = sl.tx.fill(&mut pump.pool, |d| {
            c.poll_transmit_parts(now, &mut d.head, &mut d.body)
        });
        let next = c.poll_timeout();
        if let Some(t) = next {
            st.schedule(i, t);
        }
        self.finish_inline(st, pump, i, more, next);
    }

    /// Ends an inline turn: releases the lock, sends what the turn queued,
    /// and wakes the driver if needed (`more` to send at once, or a
    /// deadline `next` before its own).
    pub(super) fn finish_inline(
        &self,
        mut st: MutexGuard<'_, State>,
        mut pump: Pump,
        i: usize,
        more: bool,
        next: Option<Instant>,
    ) {
        if more {
            self.kick(&mut st, i);
        }
        drop(st);
        self.send(&mut pump, i);
        self.put_pump(pump);
        if let Some(t) = next {
            self.wake_driver_by(t);
        }
    }
}

/// A blocked reader's claim on its slot's UDP socket: while it lasts, the
/// driver leaves the socket to the reader, and for [`WATCH_LEASE`] after.
pub(super) struct Watch<'a> {
    shared: &'a Shared,
    slot: usize,
    fd: RawFd,
}

impl<'a> Watch<'a> {
    /// Watches the slot of connected socket `id`, if it has one.
    pub(super) fn new(shared: &'a Shared, st: &mut State, id: u64) -> Option<Watch<'a>> {
        let Some(&Role::Conn { slot, h, .. }) = st.socks.get(&id).map(|s| &s.role) else {
            return None;
        };
        let sl = st.slot_mut(slot)?;
        // Not while the connection has data of its own in flight: a sender
        // waiting for the reply (or EOF) would then run its ACK clock from
        // this thread, and over a 100 ms emulated path its last 16 MiB went
        // out at ~65% of the link rate (94% with the driver doing it).
        // Traced: the send rate fell to 40-60 Mbit/s while the pacing rate
        // stayed ~97, with no loss, an empty queue, neither the window nor
        // the in-flight cap limiting, the driver's pacing deadlines as
        // punctual as without watching, and inline sends holding the socket
        // under 0.7 ms. What matters is who calls `poll_transmit`: a watcher
        // that only receives (the driver running the turns) gave 93%, one
        // running the turn without transmitting 91%, one queueing the
        // datagrams for the driver 80%. The cause is not pinned down; until
        // it is, readers take over only for connections that are not
        // sending.
        // A request of a few datagrams is not an ACK clock to run: its
        // sender waits for the reply like any reader.
        if sl
            .ep
            .connection(h)
            .is_some_and(|c| c.unacked() > WATCH_MAX_UNACKED)
        {
            return None;
        }
        sl.watchers += 1;
        let fd = sl.fd.as_raw_fd();
        st.check_interest(slot);
        Some(Watch { shared, slot, fd })
    }
}

impl AsRawFd for Watch<'_> {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let lease = Instant::now() + WATCH_LEASE;
        {
            let mut st = lock(&self.shared.state);
            let Some(sl) = st.slot_mut(self.slot) else {
                return;
            };
            sl.watchers -= 1;
            if sl.watchers > 0 {
                return;
            }
            sl.lease = Some(lease);
            st.check_interest(self.slot);
        }
        // The driver left the socket out of its poll set: it must be awake
        // by the end of the lease to take it back.
        self.shared.wake_driver_by(lease);
    }
}
