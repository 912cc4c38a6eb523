//! The state an instance shares between its driver thread and application
//! threads, behind one `Mutex`: the slots (a UDP socket and the endpoint
//! multiplexed over it), dmm's record of every socket, the connections'
//! owners, and the driver's bookkeeping (changed slots, the timer heap,
//! slots whose epoll interest may be stale).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::driver::TxQueue;
use super::options::FillpOptions;
use super::tickets::TicketCache;
use super::{udp, Shared};
use crate::fillp::{CloseReason, ConnectionHandle, ConnectionStats, Endpoint, EndpointConfig};
use crate::stack::userspace::{record_mut, unspecified, Listeners, Mirror, SockFds};
use crate::stack::{errno, Family};

/// The mutable state behind [`Shared::state`].
#[derive(Default)]
pub(super) struct State {
    /// UDP sockets with their endpoints. Indices are never reused, so a
    /// `(slot, handle)` pair names one connection forever.
    pub(super) slots: BTreeMap<usize, Slot>,
    pub(super) next_slot: usize,
    pub(super) socks: HashMap<u64, SockState>,
    pub(super) by_conn: HashMap<(usize, ConnectionHandle), u64>,
    pub(super) next_id: u64,
    /// Slots an application call changed since the driver last ran them.
    pub(super) dirty: Vec<usize>,
    /// Slot deadlines, earliest first; an entry is current while it equals
    /// its slot's `deadline` (others are skipped when they come up), so
    /// the driver runs only the slots that are due instead of all of them.
    pub(super) timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Slots whose epoll interest may be out of date: new, watched or
    /// leased, or with datagrams waiting for `POLLOUT`. The driver
    /// reconciles only these before it sleeps, so a wake costs nothing per
    /// idle or lingering slot (thousands, for a client that opens and
    /// closes connections: each closed one lingers for the idle timeout).
    pub(super) poll_check: Vec<usize>,
    /// Slots that were made to listen (some may have stopped since: see
    /// [`State::listens_here`], which drops those).
    pub(super) listening: Vec<usize>,
    /// The client slot each local IP's unbound connections share
    /// ([`FillpOptions::shared_client_port`]); an entry whose slot the
    /// driver has forgotten (no connection left) is replaced on next use.
    pub(super) client_slots: HashMap<IpAddr, usize>,
    /// Resumption tickets from the servers this instance connected to.
    pub(super) tickets: TicketCache,
}

/// One UDP socket and the endpoint multiplexed over it.
pub(super) struct Slot {
    pub(super) fd: OwnedFd,
    pub(super) local: SocketAddr,
    pub(super) ep: Endpoint,
    /// The listening socket, for a listener's slot while it listens.
    pub(super) listener: Option<u64>,
    /// Datagrams produced but not yet taken by the kernel.
    pub(super) tx: TxQueue,
    /// Per peer, the local address it last wrote to: replies go out from
    /// it (a wildcard-bound socket would otherwise let routing pick the
    /// source, and the peer would drop the reply).
    pub(super) reply_from: HashMap<SocketAddr, IpAddr>,
    /// A thread is receiving from the socket, outside the lock.
    pub(super) rx_busy: bool,
    /// A thread is sending on the socket, outside the lock.
    pub(super) tx_busy: bool,
    /// Readers blocked in `recv` that watch the socket themselves.
    pub(super) watchers: usize,
    /// Until then the driver leaves the socket to its last watcher.
    pub(super) lease: Option<Instant>,
    /// When a datagram last arrived.
    pub(super) last_rx: Option<Instant>,
    /// The endpoint's next timer as of its last turn (see `State::timers`).
    pub(super) deadline: Option<Instant>,
    /// The events the driver's epoll set has for the socket (None: not in
    /// it yet).
    pub(super) interest: Option<u32>,
    /// Listed in [`State::poll_check`].
    pub(super) poll_listed: bool,
}

impl Slot {
    /// Nothing uses the slot any more: no listener, no connection, and no
    /// thread receiving, sending or watching on its fd. What may still be
    /// pending (queued datagrams, a reader's lease) is the caller's to weigh.
    pub(super) fn unused(&self) -> bool {
        self.listener.is_none()
            && self.ep.connection_count() == 0
            && !self.rx_busy
            && !self.tx_busy
            && self.watchers == 0
    }

    pub(super) fn new(fd: OwnedFd, local: SocketAddr, ep: Endpoint, listener: Option<u64>) -> Slot {
        Slot {
            fd,
            local,
            ep,
            listener,
            tx: TxQueue::default(),
            reply_from: HashMap::new(),
            rx_busy: false,
            tx_busy: false,
            watchers: 0,
            lease: None,
            last_rx: None,
            deadline: None,
            interest: None,
            poll_listed: false,
        }
    }

    /// The epoll events the driver wants for the socket now: none while a
    /// reader watches it or holds its lease (except `POLLOUT`).
    pub(super) fn wanted_events(&self, now: Instant) -> u32 {
        let mut events = libc::EPOLLIN as u32;
        if self.watchers > 0 || self.lease.is_some_and(|l| l > now) {
            events = 0;
        }
        if !self.tx.q.is_empty() {
            events |= libc::EPOLLOUT as u32;
        }
        events
    }
}

pub(super) enum Role {
    Fresh,
    /// Bound: the UDP port is reserved.
    Bound(OwnedFd, SocketAddr),
    Listening {
        slot: usize,
        backlog: VecDeque<u64>,
        cap: usize,
    },
    Conn {
        slot: usize,
        h: ConnectionHandle,
        established: bool,
    },
}

impl Role {
    /// A listener's queue of accepted connections not yet taken.
    pub(super) fn queue(&mut self) -> Option<&mut VecDeque<u64>> {
        match self {
            Role::Listening { backlog, .. } => Some(backlog),
            _ => None,
        }
    }
}

pub(super) struct SockState {
    /// Its eventfds (see "Readiness" in [`super`]).
    pub(super) mirror: Mirror,
    pub(super) role: Role,
    /// `SO_ERROR`: a failed connect, consumed by `SO_ERROR` or the next call.
    pub(super) error: Option<i32>,
    /// How the connection ended, once it has.
    pub(super) closed: Option<CloseReason>,
    /// An error that ends the connection (ICMP, stack stopped).
    pub(super) fatal: Option<i32>,
    pub(super) shut_rd: bool,
    pub(super) shut_wr: bool,
    pub(super) peer: Option<SocketAddr>,
    pub(super) local: Option<SocketAddr>,
    /// Stats at close, for counters after the connection is forgotten.
    pub(super) stats: ConnectionStats,
}

impl SockState {
    pub(super) fn new(fds: Arc<SockFds>, role: Role) -> SockState {
        SockState {
            mirror: Mirror::new(fds),
            role,
            error: None,
            closed: None,
            fatal: None,
            shut_rd: false,
            shut_wr: false,
            peer: None,
            local: None,
            stats: ConnectionStats::default(),
        }
    }
}

/// A connected socket's state, as `send` and `recv` start from it.
pub(super) struct StreamView {
    pub(super) slot: usize,
    pub(super) h: ConnectionHandle,
    pub(super) established: bool,
    pub(super) closed: Option<CloseReason>,
    pub(super) shut_rd: bool,
    pub(super) shut_wr: bool,
}

/// The errno a connection that ended for `reason` reports.
pub(super) fn reason_errno(reason: CloseReason, established: bool) -> i32 {
    match reason {
        CloseReason::Finished => libc::EPIPE,
        CloseReason::LocalReset => libc::ECONNABORTED,
        CloseReason::PeerReset if established => libc::ECONNRESET,
        CloseReason::PeerReset => libc::ECONNREFUSED,
        CloseReason::IdleTimeout | CloseReason::HandshakeTimeout => libc::ETIMEDOUT,
        CloseReason::ProtocolViolation => libc::EPROTO,
    }
}

impl State {
    pub(super) fn slot(&self, i: usize) -> Option<&Slot> {
        self.slots.get(&i)
    }

    pub(super) fn slot_mut(&mut self, i: usize) -> Option<&mut Slot> {
        self.slots.get_mut(&i)
    }

    /// Slot `i` must run a turn soon (an application call changed it).
    pub(super) fn mark(&mut self, i: usize) {
        self.dirty.push(i);
    }

    /// Slot `i` has a timer at `t` (or earlier): make sure a turn runs by
    /// then.
    pub(super) fn schedule(&mut self, i: usize, t: Instant) {
        if let Some(sl) = self.slots.get_mut(&i) {
            if sl.deadline.is_none_or(|d| t < d) {
                sl.deadline = Some(t);
                self.timers.push(Reverse((t, i)));
            }
        }
    }

    /// Recomputes slot `i`'s deadline after a turn.
    pub(super) fn reschedule(&mut self, i: usize) {
        let Some(sl) = self.slots.get_mut(&i) else {
            return;
        };
        sl.deadline = sl.ep.poll_timeout();
        if let Some(t) = sl.deadline {
            self.timers.push(Reverse((t, i)));
        }
    }

    /// The earliest current timer, dropping stale entries on the way.
    pub(super) fn next_timer(&mut self) -> Option<Instant> {
        while let Some(&Reverse((t, i))) = self.timers.peek() {
            if self.slots.get(&i).is_some_and(|s| s.deadline == Some(t)) {
                return Some(t);
            }
            self.timers.pop();
        }
        None
    }

    /// Pops the slots whose current timer is due at `now` into `out`.
    pub(super) fn due(&mut self, now: Instant, out: &mut Vec<usize>) {
        while let Some(&Reverse((t, i))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if let Some(sl) = self.slots.get_mut(&i) {
                if sl.deadline == Some(t) {
                    sl.deadline = None;
                    out.push(i);
                }
            }
        }
    }

    pub(super) fn add_slot(&mut self, slot: Slot) -> usize {
        let i = self.next_slot;
        self.next_slot += 1;
        self.slots.insert(i, slot);
        self.check_interest(i);
        i
    }

    /// Slot `i`'s epoll interest may have to change: the driver looks
    /// before it next sleeps.
    pub(super) fn check_interest(&mut self, i: usize) {
        if let Some(sl) = self.slots.get_mut(&i) {
            if !sl.poll_listed {
                sl.poll_listed = true;
                self.poll_check.push(i);
            }
        }
    }

    /// Whether socket `id` is readable now (see
    /// [`Readiness::readable`](crate::stack::Readiness::readable)).
    pub(super) fn readable(&self, id: u64) -> bool {
        let Some(s) = self.socks.get(&id) else {
            return true;
        };
        if s.error.is_some() || s.fatal.is_some() || s.shut_rd || s.closed.is_some() {
            return true;
        }
        match &s.role {
            Role::Fresh | Role::Bound(..) => false,
            Role::Listening { backlog, .. } => !backlog.is_empty(),
            Role::Conn { slot, h, .. } => {
                match self.slot(*slot).and_then(|sl| sl.ep.connection(*h)) {
                    None => true,
                    Some(c) => {
                        c.readable_bytes() > 0 || c.at_eof() || c.peer_reset() || c.is_closed()
                    }
                }
            }
        }
    }

    /// Socket `id` as a stream for `send`/`recv`: `EBADF`, its pending
    /// error (consumed), its fatal error or `ENOTCONN` first.
    pub(super) fn stream(&mut self, id: u64) -> io::Result<StreamView> {
        let s = record_mut(&mut self.socks, id)?;
        if let Some(e) = s.error.take() {
            self.sync(id);
            return Err(errno(e));
        }
        if let Some(e) = s.fatal {
            return Err(errno(e));
        }
        match s.role {
            Role::Conn {
                slot,
                h,
                established,
            } => Ok(StreamView {
                slot,
                h,
                established,
                closed: s.closed,
                shut_rd: s.shut_rd,
                shut_wr: s.shut_wr,
            }),
            _ => Err(errno(libc::ENOTCONN)),
        }
    }

    /// Whether socket `id` is writable now: room in the send buffer
    /// ([`crate::fillp::Connection::is_writable`]), connect done, or an
    /// error to report.
    pub(super) fn writable(&self, id: u64) -> bool {
        let Some(s) = self.socks.get(&id) else {
            return true;
        };
        if s.error.is_some() || s.fatal.is_some() || s.shut_wr || s.closed.is_some() {
            return true;
        }
        match &s.role {
            Role::Fresh | Role::Bound(..) | Role::Listening { .. } => false,
            Role::Conn {
                established: false, ..
            } => false,
            Role::Conn { slot, h, .. } => {
                match self.slot(*slot).and_then(|sl| sl.ep.connection(*h)) {
                    None => true,
                    Some(c) if c.is_closed() => true,
                    Some(c) => c.is_writable(),
                }
            }
        }
    }

    /// Brings socket `id`'s eventfds in line with its state: `ready` is
    /// readable exactly while the socket is readable, `wake` while it is
    /// writable.
    pub(super) fn sync(&mut self, id: u64) {
        let want = self.readable(id);
        let want_w = self.writable(id);
        let Some(s) = self.socks.get_mut(&id) else {
            return;
        };
        s.mirror.show(want, want_w);
    }

    /// Moves connections the endpoint completed on listener slot `slot`
    /// into the listener's backlog while it has room; returns the listener
    /// if it gained any. The rest wait, established, in the endpoint's own
    /// queue, as in a kernel accept queue: clients' connects complete and
    /// their data is buffered. With no listener left they are reset.
    pub(super) fn admit(&mut self, slot: usize, shared: &Shared) -> Option<u64> {
        let sl = self.slots.get_mut(&slot)?;
        let lid = sl.listener;
        let mut added = false;
        loop {
            let room = lid.and_then(|l| match self.socks.get(&l).map(|s| &s.role) {
                Some(Role::Listening { backlog, cap, .. }) => Some(backlog.len() < *cap),
                _ => None,
            });
            match room {
                Some(false) => break,
                Some(true) => {}
                None => {
                    while let Some(h) = sl.ep.accept() {
                        if let Some(c) = sl.ep.connection_mut(h) {
                            c.reset();
                        }
                    }
                    break;
                }
            }
            let Some(h) = sl.ep.accept() else {
                break;
            };
            if let Some(c) = sl.ep.connection_mut(h) {
                // The agreed size is the client's route MTU; ours back to
                // it may be smaller (a jumbo client behind a router).
                let peer = c.remote();
                if let Some(size) = shared.opts.size_for(shared.routes.route_to(peer), peer) {
                    c.limit_datagram(size);
                }
            }
            let Ok(fds) = SockFds::new() else {
                // Out of fds: refuse this one, as the kernel would.
                if let Some(c) = sl.ep.connection_mut(h) {
                    c.reset();
                }
                continue;
            };
            let id = self.next_id;
            self.next_id += 1;
            let mut s = SockState::new(
                fds,
                Role::Conn {
                    slot,
                    h,
                    established: true,
                },
            );
            s.peer = sl.ep.connection(h).map(|c| c.remote());
            s.local = Some(sl.local);
            if let Some(c) = sl.ep.connection(h) {
                // Closed while queued: the socket reports it when accepted.
                if let Some(r) = c.close_reason() {
                    s.closed = Some(r);
                    s.stats = c.stats();
                }
            }
            self.socks.insert(id, s);
            self.by_conn.insert((slot, h), id);
            if let Some(Role::Listening { backlog, .. }) = lid
                .and_then(|l| self.socks.get_mut(&l))
                .map(|s| &mut s.role)
            {
                backlog.push_back(id);
            }
            shared.accepted.fetch_add(1, Ordering::Relaxed);
            added = true;
        }
        if added {
            lid
        } else {
            None
        }
    }

    /// Whether one of this instance's listeners serves `addr`: a connect
    /// to it then leaves the handshake to the driver, which runs both ends
    /// in one turn, instead of handing every packet between threads.
    pub(super) fn listens_here(&mut self, addr: SocketAddr) -> bool {
        let slots = &self.slots;
        self.listening
            .retain(|i| slots.get(i).is_some_and(|sl| sl.listener.is_some()));
        self.listening.iter().any(|i| {
            slots.get(i).is_some_and(|sl| {
                sl.local.port() == addr.port()
                    && (sl.local.ip().is_unspecified() || sl.local.ip() == addr.ip())
            })
        })
    }

    /// The client slot for one outgoing connection: over the socket's
    /// reserved UDP port if it was bound; else the local IP's shared slot
    /// ([`FillpOptions::shared_client_port`]), made on first use; else a
    /// fresh ephemeral port of its own, which keeps `(local address, peer
    /// address)` unique per connection, as in TCP.
    pub(super) fn client_slot(
        &mut self,
        opts: &FillpOptions,
        family: Family,
        bound: Option<(OwnedFd, SocketAddr)>,
    ) -> io::Result<usize> {
        if let Some((fd, local)) = bound {
            let ep = new_endpoint(opts, false);
            return Ok(self.add_slot(Slot::new(fd, local, ep, None)));
        }
        let ip = match (family, opts.bind_ip) {
            (Family::V4, ip @ IpAddr::V4(_)) | (Family::V6, ip @ IpAddr::V6(_)) => ip,
            (f, _) => unspecified(f).ip(),
        };
        if opts.shared_client_port {
            if let Some(&i) = self.client_slots.get(&ip) {
                if self.slots.contains_key(&i) {
                    return Ok(i);
                }
            }
        }
        let fd = udp::bind(SocketAddr::new(ip, 0), opts.offload)?;
        let local = udp::local_addr(fd.as_raw_fd())?;
        let ep = new_endpoint(opts, false);
        let i = self.add_slot(Slot::new(fd, local, ep, None));
        if opts.shared_client_port {
            self.client_slots.insert(ip, i);
        }
        Ok(i)
    }
}

impl Listeners for State {
    fn listener(&mut self, id: u64) -> Option<(Option<i32>, Option<&mut VecDeque<u64>>)> {
        self.socks.get_mut(&id).map(|s| (s.fatal, s.role.queue()))
    }

    fn accepted(&self, id: u64) -> Option<(&Arc<SockFds>, Option<SocketAddr>)> {
        self.socks.get(&id).map(|c| (c.mirror.fds(), c.peer))
    }
}

pub(super) fn new_endpoint(opts: &FillpOptions, server: bool) -> Endpoint {
    // Only a server mints cookies; a client endpoint has no use for a
    // secret (and saves the `getrandom` a connect would pay for it).
    let mut secret = [0u8; 32];
    if server {
        udp::random_bytes(&mut secret);
    }
    let mut seed = [0u8; 8];
    udp::random_bytes(&mut seed);
    let mut connection = opts.connection.clone();
    if server {
        // A listener takes the client's offer up to the largest datagram:
        // the client sized it from its route to us.
        connection.mtu = opts.max_datagram();
    }
    let config = EndpointConfig {
        connection,
        server,
        cookie_secret: secret,
        // A listener's limit; a process's own connections are bounded by
        // its fds, as with kernel sockets.
        max_connections: if server {
            opts.max_connections
        } else {
            usize::MAX
        },
        resumption: opts.resumption,
        ..EndpointConfig::default()
    };
    Endpoint::new(config, Instant::now(), u64::from_ne_bytes(seed))
}
