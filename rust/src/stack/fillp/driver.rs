//! The driver: moving datagrams between the UDP sockets and the endpoints
//! (receive in batches, ICMP errors, a slot's turn, the TX queue and its
//! `sendmmsg`), and the driver thread's loop.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::inline::WATCH_LEASE;
use super::options::FillpOptions;
use super::state::{reason_errno, Role, Slot, State};
use super::{udp, Shared};
use crate::fillp::{CloseReason, ConnectionHandle, Event, Transmit};
use crate::stack::userspace::lock;
use crate::sys::event::{block_all_signals, wait};

/// Datagrams the driver pulls from one endpoint before sending them. With
/// GSO that is a handful of `sendmmsg` entries; more (up to 64 full runs)
/// measured no faster over loopback, and a smaller chunk keeps the
/// datagrams in cache between being written and being sent.
const TX_CHUNK: usize = 4 * udp::BATCH;

/// Received entries at least this long are lent to the connections rather
/// than copied ([`crate::fillp::Endpoint::handle_datagram_shared`]): a
/// loopback-sized datagram or a GRO run. A smaller one would pin a 64 KiB
/// buffer for a few payload bytes until the application read them.
const SHARE_MIN: usize = 16 << 10;

/// Receive batches per UDP socket per loop turn, so timers and sends of the
/// other sockets are not starved by one busy socket.
const RX_ROUNDS: usize = 8;

/// A socket that received within this long counts as busy: the driver
/// wakes for its watch lease. An idle socket's watcher may block for hours
/// without costing the driver a turn.
const BUSY: Duration = Duration::from_millis(20);

/// Scratch buffers for moving datagrams between UDP sockets and endpoints.
/// The driver owns one; a reader doing the work itself borrows one from
/// [`Shared::pumps`].
pub(super) struct Pump {
    pub(super) rx: udp::RecvBatch,
    pub(super) tx: udp::SendBatch,
    /// Emptied datagrams, for their header allocations.
    pub(super) pool: Vec<udp::Datagram>,
    /// Sockets whose readiness may have changed.
    pub(super) touched: Vec<u64>,
}

impl Pump {
    pub(super) fn new(opts: &FillpOptions) -> Pump {
        let large = opts.offload || usize::from(opts.max_datagram()) > udp::DGRAM_MAX;
        Pump {
            rx: udp::RecvBatch::new(large),
            tx: udp::SendBatch::default(),
            pool: Vec::new(),
            touched: Vec::new(),
        }
    }

    /// Syncs the readiness of every touched socket.
    pub(super) fn sync_touched(&mut self, st: &mut State) {
        self.sync_touched_but(st, None);
    }

    /// [`Pump::sync_touched`], leaving socket `skip` to its caller.
    pub(super) fn sync_touched_but(&mut self, st: &mut State, skip: Option<u64>) {
        self.touched.sort_unstable();
        self.touched.dedup();
        for id in self.touched.drain(..) {
            if Some(id) != skip {
                st.sync(id);
            }
        }
    }
}

/// One slot's datagrams waiting for the kernel.
#[derive(Default)]
pub(super) struct TxQueue {
    pub(super) q: VecDeque<(SocketAddr, udp::Datagram)>,
    /// Whether sends on this socket use GSO: probed when the socket first
    /// sends, turned off for good if the path refuses it.
    pub(super) gso: Option<bool>,
}

impl TxQueue {
    /// Queues what `produce` yields (into buffers from `pool`) up to
    /// [`TX_CHUNK`] datagrams; returns whether it stopped for the limit,
    /// with maybe more to come.
    pub(super) fn fill(
        &mut self,
        pool: &mut Vec<udp::Datagram>,
        mut produce: impl FnMut(&mut udp::Datagram) -> Option<Transmit>,
    ) -> bool {
        while self.q.len() < TX_CHUNK {
            let mut d = pool.pop().unwrap_or_default();
            match produce(&mut d) {
                Some(t) => self.q.push_back((t.destination, d)),
                None => {
                    recycle(pool, d);
                    return false;
                }
            }
        }
        true
    }
}

/// Returns a sent (or unsent) datagram to `pool`, emptied: its payload
/// pieces go at once, so that acknowledged send-buffer memory is freed.
pub(super) fn recycle(pool: &mut Vec<udp::Datagram>, mut d: udp::Datagram) {
    d.clear();
    pool.push(d);
}

impl Shared {
    /// Receives what is queued on slot `i`'s UDP socket (at most
    /// [`RX_ROUNDS`] batches) and feeds its endpoint. One thread at a time
    /// per slot: returns false, doing nothing, if another is at it.
    pub(super) fn receive(&self, pump: &mut Pump, i: usize, pollerr: bool) -> bool {
        let fd = {
            let mut st = lock(&self.state);
            let Some(sl) = st.slot_mut(i) else {
                return false;
            };
            if sl.rx_busy {
                return false;
            }
            sl.rx_busy = true;
            let fd = sl.fd.as_raw_fd();
            if pollerr {
                self.icmp(&mut st, pump, fd, i);
            }
            fd
        };
        // The fd stays open meanwhile: a slot is never removed while busy.
        for round in 1.. {
            let got = pump.rx.recv(fd);
            let mut st = lock(&self.state);
            let more = match got {
                // A queued ICMP error surfaces here first.
                Err(_) => {
                    self.icmp(&mut st, pump, fd, i);
                    true
                }
                Ok(n) => {
                    self.feed(&mut st, pump, i, n);
                    n == pump.rx.capacity()
                }
            };
            if !more || round >= RX_ROUNDS {
                if let Some(sl) = st.slot_mut(i) {
                    sl.rx_busy = false;
                }
                break;
            }
        }
        true
    }

    /// Hands the `n` received entries in `pump` to slot `i`'s endpoint.
    pub(super) fn feed(&self, st: &mut State, pump: &mut Pump, i: usize, n: usize) {
        let Some(sl) = st.slot_mut(i) else { return };
        let now = Instant::now();
        if n > 0 {
            sl.last_rx = Some(now);
        }
        // The last (peer, local address) pair recorded: a batch mostly
        // comes from one peer, so the map is touched once.
        let mut seen: Option<(SocketAddr, IpAddr)> = None;
        let mut datagrams = 0u64;
        for k in 0..n {
            let Some(r) = pump.rx.get(k) else { continue };
            let (from, local) = (r.from, r.local);
            if r.len() >= SHARE_MIN {
                // Large: the connection keeps the payload as a slice of
                // the receive buffer, and the entry gets another.
                let ranges = r.ranges();
                if let Some(whole) = pump.rx.share(k) {
                    for range in ranges {
                        sl.ep.handle_datagram_shared(now, from, &whole.slice(range));
                        datagrams += 1;
                    }
                }
            } else {
                for d in r.datagrams() {
                    sl.ep.handle_datagram(now, from, d);
                    datagrams += 1;
                }
            }
            if let Some(local) = local {
                if seen != Some((from, local)) {
                    seen = Some((from, local));
                    if sl.reply_from.get(&from) != Some(&local) {
                        sl.reply_from.insert(from, local);
                    }
                }
            }
        }
        self.udp_received.fetch_add(datagrams, Ordering::Relaxed);
    }

    /// Applies the ICMP errors queued on slot `i`'s socket: handshakes to a
    /// refused address fail with `ECONNREFUSED`, established connections
    /// reset.
    pub(super) fn icmp(&self, st: &mut State, pump: &mut Pump, fd: RawFd, i: usize) {
        let errs = udp::drain_errors(fd);
        if errs.is_empty() {
            return;
        }
        self.icmp_errors
            .fetch_add(errs.len() as u64, Ordering::Relaxed);
        for (addr, code) in errs {
            if code == libc::EMSGSIZE {
                // "Fragmentation needed": the kernel has lowered the path
                // MTU and fragments our later datagrams to fit; the ones
                // dropped are repaired like any loss. Not a dead peer.
                continue;
            }
            let ids: Vec<(ConnectionHandle, u64)> = st
                .by_conn
                .iter()
                .filter(|((s, _), _)| *s == i)
                .map(|((_, h), id)| (*h, *id))
                .collect();
            for (h, id) in ids {
                let Some(sl) = st.slots.get_mut(&i) else {
                    return;
                };
                let Some(conn) = sl.ep.connection_mut(h) else {
                    continue;
                };
                if conn.remote() != addr || conn.is_closed() {
                    continue;
                }
                conn.reset();
                if let Some(s) = st.socks.get_mut(&id) {
                    match s.role {
                        Role::Conn {
                            established: false, ..
                        } => {
                            s.error = Some(code);
                            // No server there now: its ticket is no use.
                            st.tickets.forget(addr);
                        }
                        _ => s.fatal = Some(libc::ECONNRESET),
                    }
                }
                pump.touched.push(id);
            }
        }
    }

    /// Slot `i`'s timers, accepts and events, then its datagrams to send
    /// (unless the kernel is still behind on it, or another thread is
    /// sending). Returns whether the endpoint may have more to send at once.
    pub(super) fn turn(&self, st: &mut State, pump: &mut Pump, i: usize, now: Instant) -> bool {
        let Some(sl) = st.slots.get_mut(&i) else {
            return false;
        };
        if sl.ep.poll_timeout().is_some_and(|t| t <= now) {
            sl.ep.handle_timeout(now);
        }
        // Once per cookie rotation of a listening endpoint.
        if sl.ep.wants_cookie_secret() {
            let mut fresh = [0u8; 32];
            udp::random_bytes(&mut fresh);
            sl.ep.supply_cookie_secret(fresh);
        }
        if let Some(l) = st.admit(i, self) {
            pump.touched.push(l);
        }
        let Some(sl) = st.slots.get_mut(&i) else {
            return false;
        };
        while let Some((h, ev)) = sl.ep.poll_event() {
            let Some(&id) = st.by_conn.get(&(i, h)) else {
                continue;
            };
            let Some(s) = st.socks.get_mut(&id) else {
                continue;
            };
            match ev {
                Event::Connected => {
                    if let Role::Conn { established, .. } = &mut s.role {
                        *established = true;
                    }
                    if let Some(c) = sl.ep.connection(h) {
                        // A client keeps the server's ticket for its next
                        // connects to it (`tickets`).
                        if let Some(r) = c.resumption().filter(|_| self.opts.resumption) {
                            st.tickets.put(c.remote(), r, now);
                        }
                        if c.resumed() {
                            self.resumed.fetch_add(1, Ordering::Relaxed);
                        }
                        if c.resumption_refused() {
                            self.resumptions_refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                // A client with the server's cookie may send: its connect
                // is done, as TCP's is at the SYN-ACK, and what it writes
                // leaves behind the CONN_REQ, a round trip early. Not over
                // loopback: there the kernel's connect() returns with the
                // server's accept queue already holding the connection, and
                // programs count on it (a server closed right after a
                // client's whole exchange has still accepted it).
                Event::Writable => {
                    if let Role::Conn { established, .. } = &mut s.role {
                        *established |= sl
                            .ep
                            .connection(h)
                            .is_some_and(|c| c.can_send() && !is_loopback(c.remote()));
                    }
                }
                Event::Readable | Event::Finished => {}
                Event::Closed { reason } => {
                    s.closed = Some(reason);
                    if let Some(c) = sl.ep.connection(h) {
                        s.stats = c.stats();
                    }
                    if let Role::Conn {
                        established: false, ..
                    } = s.role
                    {
                        if s.error.is_none() && reason != CloseReason::LocalReset {
                            s.error = Some(reason_errno(reason, false));
                            // Whatever ticket it had did not get it through.
                            if let Some(peer) = s.peer {
                                st.tickets.forget(peer);
                            }
                        }
                    }
                }
            }
            pump.touched.push(id);
        }
        if sl.tx_busy || !sl.tx.q.is_empty() {
            return false;
        }
        let ep = &mut sl.ep;
        sl.tx.fill(&mut pump.pool, |d| {
            ep.poll_transmit_parts(now, &mut d.head, &mut d.body)
        })
    }

    /// Hands slot `i`'s queued datagrams to the kernel, outside the lock.
    /// One thread at a time per slot; what the kernel does not take yet
    /// (full socket buffer) stays queued for the driver's `POLLOUT`.
    pub(super) fn send(&self, pump: &mut Pump, i: usize) {
        let (fd, mut q, mut gso, sources) = {
            let mut st = lock(&self.state);
            let Some(sl) = st.slot_mut(i) else { return };
            if sl.tx_busy || sl.tx.q.is_empty() {
                return;
            }
            sl.tx_busy = true;
            let fd = sl.fd.as_raw_fd();
            if sl.tx.gso.is_none() {
                sl.tx.gso = Some(self.opts.offload && udp::gso_supported(fd));
            }
            // The source address per destination, looked up now: the map
            // stays behind the lock, where receivers update it.
            let mut sources: Vec<(SocketAddr, Option<IpAddr>)> = Vec::new();
            for (dest, _) in &sl.tx.q {
                if !sources.iter().any(|(d, _)| d == dest) {
                    sources.push((*dest, sl.reply_from.get(dest).copied()));
                }
            }
            (
                fd,
                std::mem::take(&mut sl.tx.q),
                sl.tx.gso == Some(true),
                sources,
            )
        };
        let source = |dest: &SocketAddr| {
            sources
                .iter()
                .find(|(d, _)| d == dest)
                .and_then(|(_, s)| *s)
        };
        let mut failures = 0;
        let mut refused = false;
        while !q.is_empty() {
            let (a, b) = q.as_slices();
            let batch = if a.is_empty() { b } else { a };
            match udp::send_batch(&mut pump.tx, fd, batch, gso, source) {
                Ok(0) => break, // socket buffer full: wait for POLLOUT
                Ok(n) => {
                    self.udp_sent.fetch_add(n as u64, Ordering::Relaxed);
                    for _ in 0..n {
                        if let Some((_, d)) = q.pop_front() {
                            recycle(&mut pump.pool, d);
                        }
                    }
                }
                Err(e) if gso && udp::gso_refused(&e) => {
                    // The path refuses GSO: off for this socket from now
                    // on, and the same datagrams go again without it.
                    gso = false;
                    refused = true;
                    self.gso_disabled.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    // A pending ICMP error is reported once by the next
                    // send; retry once, then drop the datagram (the
                    // protocol repairs the loss).
                    failures += 1;
                    if failures > 1 {
                        self.udp_send_errors.fetch_add(1, Ordering::Relaxed);
                        if let Some((_, d)) = q.pop_front() {
                            recycle(&mut pump.pool, d);
                        }
                        failures = 0;
                    }
                }
            }
        }
        pump.pool.truncate(TX_CHUNK + udp::BATCH);
        let mut st = lock(&self.state);
        if let Some(sl) = st.slot_mut(i) {
            sl.tx_busy = false;
            if refused {
                sl.tx.gso = Some(false);
            }
            // Nothing was queued meanwhile (`turn` leaves a busy slot alone).
            q.append(&mut sl.tx.q);
            sl.tx.q = q;
            if !sl.tx.q.is_empty() {
                // The kernel's buffer is full: the driver waits for POLLOUT.
                st.check_interest(i);
            }
        }
    }

    /// Wakes the driver if it sleeps past `t`, so that it sees a deadline
    /// (or lease end) an application thread just set.
    pub(super) fn wake_driver_by(&self, t: Instant) {
        let at = self.driver_wake_at.load(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) && at > self.stamp(t) {
            self.wake.set();
        }
    }

    /// `t` as nanoseconds since the instance started, for
    /// [`Shared::driver_wake_at`].
    pub(super) fn stamp(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

/// The driver thread's own state.
pub(super) struct Driver {
    pub(super) shared: Arc<Shared>,
    pub(super) pump: Pump,
    /// Every slot's UDP socket, with the slot number as token.
    pub(super) epoll: udp::Epoll,
    pub(super) events: Vec<libc::epoll_event>,
    pub(super) ready: Vec<(u64, u32)>,
    /// Slots to run this turn: received on, changed, due, or with more to
    /// send at once after the last turn (`busy`).
    pub(super) todo: Vec<usize>,
    pub(super) busy: Vec<usize>,
    /// The slots `prepare_poll` is reconciling (a buffer kept for reuse).
    pub(super) checking: Vec<usize>,
}

impl Driver {
    pub(super) fn new(shared: Arc<Shared>, epoll: udp::Epoll) -> Driver {
        Driver {
            pump: Pump::new(&shared.opts),
            shared,
            epoll,
            events: Vec::with_capacity(256),
            ready: Vec::new(),
            todo: Vec::new(),
            busy: Vec::new(),
            checking: Vec::new(),
        }
    }

    pub(super) fn run(mut self) {
        block_all_signals();
        while !self.shared.stop.load(Ordering::SeqCst) {
            let timeout = self.prepare_poll();
            let mut pfds =
                [self.shared.wake.as_raw_fd(), self.epoll.as_raw_fd()].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            // EINTR cannot happen (signals are blocked).
            let _ = wait(&mut pfds, timeout);
            self.shared.sleeping.store(false, Ordering::SeqCst);
            if pfds[0].revents != 0 {
                self.shared.wake.clear();
            }
            self.ready.clear();
            if pfds[1].revents != 0 {
                self.epoll.ready(&mut self.events, &mut self.ready);
            }
            for k in 0..self.ready.len() {
                let (token, ev) = self.ready[k];
                let i = token as usize;
                let err = ev & libc::EPOLLERR as u32 != 0;
                if err || ev & libc::EPOLLIN as u32 != 0 {
                    self.shared.receive(&mut self.pump, i, err);
                }
                self.todo.push(i);
            }
            self.process();
            // Send for every slot just run (a slot's queue fills only in
            // a turn, and one left over waits for POLLOUT, which runs it).
            for i in self.todo.drain(..) {
                self.shared.send(&mut self.pump, i);
            }
        }
        self.shutdown();
    }

    /// Brings the epoll set in line with the slots, computes the timeout,
    /// and marks the driver asleep. A socket a reader watches (or just
    /// watched, see [`WATCH_LEASE`]) is left to it, except for `POLLOUT`.
    pub(super) fn prepare_poll(&mut self) -> Option<Duration> {
        let mut guard = lock(&self.shared.state);
        let st = &mut *guard;
        self.shared.sleeping.store(true, Ordering::SeqCst);
        let now = Instant::now();
        let mut next = st.next_timer();
        let mut until = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        let mut check = std::mem::take(&mut self.checking);
        std::mem::swap(&mut check, &mut st.poll_check);
        for i in check.drain(..) {
            let Some(slot) = st.slots.get_mut(&i) else {
                continue;
            };
            slot.poll_listed = false;
            if slot.watchers > 0 {
                // A busy socket's watcher may leave at any moment, and its
                // lease then runs out with nobody reading: wake by then.
                if slot.last_rx.is_some_and(|t| now - t < BUSY) {
                    until(now + WATCH_LEASE);
                }
            } else if let Some(lease) = slot.lease {
                if lease > now {
                    until(lease);
                } else {
                    slot.lease = None;
                }
            }
            let events = slot.wanted_events(now);
            if slot.interest != Some(events) {
                let add = slot.interest.is_none();
                // A failure leaves the interest unrecorded: tried again
                // next turn.
                if self
                    .epoll
                    .set(slot.fd.as_raw_fd(), events, i as u64, add)
                    .is_ok()
                {
                    slot.interest = Some(events);
                }
            }
            // Still listed while the interest may change with no call to
            // list it: watched or leased, waiting for (or just done with)
            // POLLOUT, or the update above failed.
            let pollout = events & libc::EPOLLOUT as u32 != 0;
            if slot.watchers > 0 || slot.lease.is_some() || pollout || slot.interest != Some(events)
            {
                slot.poll_listed = true;
                st.poll_check.push(i);
            }
        }
        self.checking = check;
        // Changed slots must run before sleeping: new data sets no timer
        // in the core.
        let work = !self.busy.is_empty() || !st.dirty.is_empty();
        let timeout = if work {
            Some(Duration::ZERO)
        } else {
            next.map(|t| t.saturating_duration_since(now))
        };
        let wake_at = match timeout {
            Some(d) => self.shared.stamp(now + d),
            None => u64::MAX,
        };
        self.shared.driver_wake_at.store(wake_at, Ordering::SeqCst);
        timeout
    }

    /// Runs the turns of the slots that need one: received on, changed by
    /// an application call, due, or busy. Forgets slots with nothing left.
    pub(super) fn process(&mut self) {
        let mut guard = lock(&self.shared.state);
        let st = &mut *guard;
        let now = Instant::now();
        self.todo.append(&mut st.dirty);
        self.todo.append(&mut self.busy);
        st.due(now, &mut self.todo);
        self.todo.sort_unstable();
        self.todo.dedup();
        for &i in &self.todo {
            if self.shared.turn(st, &mut self.pump, i, now) {
                self.busy.push(i);
            }
            st.reschedule(i);
        }
        self.pump.sync_touched(st);
        // Forget slots with no connection left (and, for a listener's, no
        // listener), unless a thread still uses their fd.
        for &i in &self.todo {
            let dead = st.slots.get(&i).is_some_and(Slot::unused);
            // Its sockets' `by_conn` entries go when they close (slot
            // numbers are never reused, so none can be misread meanwhile).
            // Datagrams still queued (a final RST) leave first: one more
            // turn, right after this one's sends, removes the slot.
            if dead {
                if st.slots.get(&i).is_some_and(|s| !s.tx.q.is_empty()) {
                    self.busy.push(i);
                } else {
                    st.slots.remove(&i);
                }
            }
        }
    }

    /// The stack is gone: reset every connection (so peers learn at once)
    /// and fail every socket, so no caller waits forever.
    pub(super) fn shutdown(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            let st = &mut *st;
            let conns: Vec<(usize, ConnectionHandle)> = st.by_conn.keys().copied().collect();
            for (slot, h) in conns {
                if let Some(c) = st.slot_mut(slot).and_then(|sl| sl.ep.connection_mut(h)) {
                    c.reset();
                }
            }
            let ids: Vec<u64> = st.socks.keys().copied().collect();
            for id in ids {
                if let Some(s) = st.socks.get_mut(&id) {
                    s.fatal = Some(libc::ENETDOWN);
                }
                st.sync(id);
            }
            let slots: Vec<usize> = st.slots.keys().copied().collect();
            st.dirty.extend(slots);
        }
        self.process();
        for i in std::mem::take(&mut self.todo) {
            self.shared.send(&mut self.pump, i);
        }
    }
}

/// Whether `peer` is on this host's loopback (IPv4-mapped included).
fn is_loopback(peer: SocketAddr) -> bool {
    match peer.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}
