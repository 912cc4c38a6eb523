//! FillP as a dmm stack: reliable byte streams over UDP, driven by the
//! sans-IO core in [`crate::fillp`].
//!
//! # Design
//!
//! * **One driver thread per instance** owns the UDP sockets and runs the
//!   polling loop of [`crate::fillp`] (receive, timers, events, transmit).
//!   It waits in `ppoll` (nanosecond timeouts, for pacing) on an epoll set
//!   of the UDP sockets and on an eventfd that application threads write to
//!   wake it. Datagrams move in `recvmmsg`/`sendmmsg` batches; a full
//!   socket buffer keeps the rest queued and waits for `POLLOUT` instead of
//!   dropping.
//! * **Work in proportion to what happens.** A wake costs O(ready sockets)
//!   (epoll), and a turn runs only the slots that received, were changed by
//!   an application call, have a timer due (a heap of slot deadlines) or
//!   still have more to send; within a slot the endpoint looks only at
//!   connections that changed ([`crate::fillp::Endpoint`]). Idle
//!   connections (keepalive every 5 s) cost 1.5% of a core per 1000 pairs
//!   in one process, against 28% when every wake walked every socket
//!   (`benches/results/fillp_idle.md`).
//! * **Segmentation offload** ([`FillpOptions::offload`], on by default):
//!   consecutive datagrams to one peer leave as one GSO `sendmmsg` entry
//!   (`UDP_SEGMENT`, up to 64 datagrams / 64 KiB) and arrive as one GRO
//!   entry (`UDP_GRO`), cut back into datagrams by the driver; over
//!   loopback the kernel then handles one buffer per run, not per datagram.
//!   Measured over loopback, one connection: per-datagram kernel work was
//!   ~4.8 µs of the driver's ~6.2 µs per data packet before (both ends in
//!   one driver thread), and what is left is mostly copying
//!   (`benches/results/fillp_loopback.md`). GSO is probed per socket and
//!   switched off for a socket whose path refuses it (`EIO` from a device
//!   without checksum offload, `EMSGSIZE` for a segment above the device
//!   MTU, ...): the refused datagrams are sent again without it, none lost.
//!   Details in `udp.rs`.
//! * **Datagram size from the route** ([`FillpOptions::path_mtu`], on by
//!   default): a connection offers the route MTU to its peer less the IP
//!   and UDP headers (65,507 bytes over loopback, 8972 on a 9000-byte
//!   route; 1400 on Ethernet-sized routes, less on smaller ones, see
//!   [`path_datagram_size`]), as TCP derives its MSS; the listener takes
//!   the client's offer, and each accepted connection sends no more than
//!   the listener's own route back carries. Over loopback that doubled
//!   throughput and halved the CPU per byte
//!   (`benches/results/fillp_loopback.md`).
//! * **Readers receive inline.** A reader blocked in `recv` waits on its
//!   UDP socket as well as on its readiness eventfd, and when datagrams
//!   arrive it receives and processes them itself (for every connection of
//!   that socket), then sends what is due: the data it waits for reaches it
//!   with no hop through the driver thread and no lock contention with it.
//!   While a reader watches a socket, and for `WATCH_LEASE` (500 µs)
//!   after it leaves, the driver leaves that socket out of its poll set, so
//!   a bulk reader, back within microseconds, is not raced for every batch;
//!   the driver is woken if it would sleep past the lease. The price: a
//!   datagram that arrives in a lease with no reader back waits up to
//!   500 µs for the driver. After a `recv` the reader also sends its
//!   connection's window update itself. A `send` that finds nothing
//!   waiting to go (a request, a reply) sends it itself too; other writers
//!   hand off to the driver (it transmits while the writer copies), and
//!   hear of space only once half the send buffer is free. Measured over
//!   loopback (one connection, instance per end, medians of six passes):
//!   CPU per Gbit 0.32 -> 0.27 s, 5.1 -> 5.3 Gbit/s, context switches per
//!   256 MiB ~25k -> ~13k (`benches/results/fillp_loopback.md`). A reader
//!   watches only while its connection has at most 64 KiB in flight: a
//!   sender blocked in `recv` for the reply that ran its own ACK clock this
//!   way sent its last 16 MiB at ~65% of the link over a 100 ms emulated
//!   path (cause not found). With both, a 1-byte request/response exchange
//!   over loopback wakes no driver thread.
//! * **Two copies in user space, as few as the kernel's own TCP makes in
//!   all.** The application's bytes are copied into the send buffer once;
//!   a datagram then carries them as shared slices of that buffer
//!   ([`crate::fillp::byte_queue`]), which `sendmmsg` gathers as iovecs
//!   behind the header, outside the lock. A received datagram of 16 KiB or
//!   more (loopback-sized, or a GRO run) is lent to its connection whole:
//!   the payload stays a slice of the receive buffer until the application
//!   reads it, and the buffer then serves a later `recvmmsg`. Before, each
//!   byte was also copied into its datagram and into the reassembly queue,
//!   both under the lock. Over loopback, one connection, 10 launches each,
//!   median FillP / kernel TCP went 0.36 -> 0.49 and the slowest launch
//!   0.17 -> 0.40; with the pacer's larger bursts for large datagrams
//!   ([`crate::fillp::pacer`]) 0.39 -> 0.64, 22 Gbit/s
//!   (`benches/results/fillp_loopback.md`).
//! * **Lock holds are short**: application `send`/`recv` move at most
//!   64 KiB per hold of the state lock, and copy it outside the lock (a
//!   `send` under 16 KiB copies inside), so the driver, which takes the
//!   lock for every batch, does not wait behind the application's copies.
//! * **State is shared behind one `Mutex`** (endpoints, sockets, accept
//!   queues) rather than driven by commands over a channel: application
//!   `send`/`recv` then copy straight into and out of the connection's
//!   buffers with no extra copy or hand-off latency, and every operation sees
//!   a consistent state. System calls (`ppoll`, `recvmmsg`, `sendmmsg`) run
//!   outside the lock. The driver is woken only when it sleeps (a flag set
//!   under the lock), so a busy transfer costs no eventfd writes.
//! * **UDP sockets**: one per listener, bound to the listener's port (so
//!   FillP port P pairs with TCP port P) and carrying every connection it
//!   accepts; and one per outgoing connection (its bound port, else an
//!   ephemeral one). A single shared client port was tried first, but then
//!   every client socket reports the same `getsockname()`, and applications
//!   (and the Python tests) tell connections apart by `(local, peer)` as with
//!   TCP. Each UDP socket has its own `Endpoint`, which also keeps the core's
//!   O(connections) scans small. `bind` reserves the UDP port at once, so
//!   `EADDRINUSE` shows up where a kernel socket would report it.
//!   `IP_RECVERR` makes an ICMP port-unreachable fail a handshake with
//!   `ECONNREFUSED` at once and reset an established connection whose peer
//!   went away.
//! * **Cookie secrets** come from `getrandom`: the first one when an
//!   endpoint is made, then 32 fresh bytes after each rotation of a
//!   listening endpoint's secret (every 60 s, when the core asks through
//!   `Endpoint::wants_cookie_secret`).
//! * **Backlog**: completed handshakes move into the listener's queue up to
//!   `backlog`; the rest wait, established, in the endpoint's own queue (as in
//!   a kernel accept queue, their connects complete) and move up as `accept`
//!   makes room. Closing a listener resets whatever was never accepted.
//! * **Readiness**: each socket has two eventfds, kept in line with its
//!   state under the lock. `ready` is readable exactly while the socket is
//!   readable (data, EOF, error, pending accept); it is the
//!   [`StackSocket::poll_fd`] and what blocking `recv`/`accept` wait on.
//!   `wake` is readable exactly while the socket is writable (connected
//!   with send-buffer room, or an error to report; after a short write,
//!   writable again when the connection says so, at half its path-sized
//!   buffer free: [`crate::fillp::Connection::is_writable`]); it is the
//!   [`StackSocket::write_poll_fd`] and what blocking `send`/`connect` wait
//!   on.
//!   Waits use `poll(2)`, so a signal returns `EINTR` to the caller; the
//!   driver thread blocks all signals so that they reach application threads.
//!
//! # Not supported
//!
//! * Datagram sockets (`supports` is streams only), `MSG_PEEK`/`MSG_OOB`.
//! * Zero-copy between the application and the stack: `send` copies into
//!   the send buffer and `recv` out of the received datagrams (and the
//!   kernel once each way), four copies per byte against kernel TCP's two.
//!   Small received datagrams are still copied into the reassembly queue.
//! * Idle connections at no cost: a wake reconciles the epoll interest
//!   only of slots whose interest may change (new, watched, leased,
//!   waiting for `POLLOUT`), but every connection keeps a keepalive timer,
//!   so 3987 idle pairs in one process still cost 3.5% of a core.
//! * Spreading one instance over several driver threads: one thread runs
//!   every endpoint of an instance; run several instances to use more cores.
//! * A socket closed with no unread data closes gracefully and then
//!   silently discards what the peer still sends (TCP would answer with
//!   RST); with unread data or `SO_LINGER` at {on, 0 s}, close is an abort
//!   (RST), as in TCP. A linger time above zero is kept but `close` does
//!   not wait for it: the stack finishes sending in the background.

#![warn(missing_docs)]

mod config;
mod udp;

pub use config::KIND;
pub use udp::UDP_PAYLOAD_MAX;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::{
    errno, int_at, int_option, timed_out, Counters, Family, Readiness, SockKind, Stack,
    StackSocket, TimeoutCell,
};
use crate::fillp::{
    CloseReason, Config, ConnectionHandle, ConnectionStats, Endpoint, EndpointConfig,
    EndpointStats, Event, RateMode, ReadError, Transmit, WriteError,
};
use crate::sys;
use crate::sys::event::{block_all_signals, wait, EventFd};

/// Settings of a FillP instance.
#[derive(Debug, Clone)]
pub struct FillpOptions {
    /// Local IP the UDP sockets bind to (unspecified: all addresses). Also
    /// the address a listener binds to when `listen` is called unbound.
    pub bind_ip: IpAddr,
    /// Settings of every connection (rate mode, windows, timeouts).
    pub connection: Config,
    /// Use UDP segmentation offload where the kernel has it: GSO on send,
    /// GRO on receive (see the module docs). On by default; off sends and
    /// receives one datagram per `sendmmsg`/`recvmmsg` entry.
    pub offload: bool,
    /// Size each connection's datagrams from the route to its peer, as TCP
    /// sizes its segments (see [`path_datagram_size`]); `connection.mtu` is
    /// then the size on routes of 1500 bytes or less and where the route's
    /// MTU cannot be read. On by default; off, every connection offers
    /// `connection.mtu`.
    pub path_mtu: bool,
}

impl Default for FillpOptions {
    fn default() -> Self {
        FillpOptions {
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            connection: Config::default(),
            offload: true,
            path_mtu: true,
        }
    }
}

impl FillpOptions {
    /// The largest datagram a connection of this instance may use: what a
    /// listener accepts, and what receive buffers must hold.
    fn max_datagram(&self) -> u16 {
        if self.path_mtu {
            udp::UDP_PAYLOAD_MAX as u16
        } else {
            self.connection.mtu
        }
    }

    /// With [`FillpOptions::path_mtu`], the datagram size for `route`, the
    /// kernel's route to `peer`; `None` when off or the route has no MTU.
    fn size_for(&self, route: Option<udp::Route>, peer: SocketAddr) -> Option<u16> {
        let mtu = route?.mtu.filter(|_| self.path_mtu)?;
        Some(path_datagram_size(mtu, peer.is_ipv6(), self.connection.mtu))
    }
}

/// The FillP datagram size (UDP payload) for a route of MTU `route_mtu`
/// (IP bytes; `v6`: IPv6 headers).
///
/// The whole MTU less the IP and UDP headers, like TCP's MSS, where the route
/// is larger than Ethernet's 1500 (loopback's 64 KiB, jumbo frames): there
/// per-datagram work, not bandwidth, limits a user-space transport. On
/// Ethernet-sized routes `fallback` (the configured size, 1400 by default)
/// caps it, since tunnels further along the path often carry less than the
/// first hop. A datagram that still meets a smaller link is fragmented by
/// the kernel (Linux's default `IP_PMTUDISC_WANT`) once the ICMP
/// "fragmentation needed" arrives.
pub fn path_datagram_size(route_mtu: u32, v6: bool, fallback: u16) -> u16 {
    let headers = if v6 { 40 + 8 } else { 20 + 8 };
    let payload = route_mtu
        .saturating_sub(headers)
        .min(udp::UDP_PAYLOAD_MAX as u32) as u16;
    let size = if route_mtu <= 1500 {
        payload.min(fallback)
    } else {
        payload
    };
    size.max(crate::fillp::wire::MIN_MTU)
}

/// Parses a rate-control name: `bbr`, `fillp` or `fixed`.
pub fn parse_rate_mode(name: &str) -> Option<RateMode> {
    match name {
        "bbr" => Some(RateMode::Bbr),
        "fillp" => Some(RateMode::Fillp),
        "fixed" => Some(RateMode::Fixed),
        _ => None,
    }
}

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

/// A FillP stack instance: one driver thread and its UDP sockets.
pub struct FillpStack {
    name: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the driver and application threads share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the driver.
    wake: EventFd,
    /// Set (under the lock) while the driver is about to sleep or sleeps.
    sleeping: AtomicBool,
    stop: AtomicBool,
    opts: FillpOptions,
    sockets: AtomicU64,
    connects: AtomicU64,
    accepted: AtomicU64,
    udp_sent: AtomicU64,
    udp_received: AtomicU64,
    udp_send_errors: AtomicU64,
    /// Sockets whose path refused GSO (turned off for them).
    gso_disabled: AtomicU64,
    icmp_errors: AtomicU64,
    /// When the sleeping driver will wake on its own, in nanoseconds since
    /// `epoch` (`u64::MAX`: not before an event).
    driver_wake_at: AtomicU64,
    epoch: Instant,
    /// Spare pumps for readers that receive inline.
    pumps: Mutex<Vec<Pump>>,
}

/// The mutable state behind [`Shared::state`].
#[derive(Default)]
struct State {
    /// UDP sockets with their endpoints. Indices are never reused, so a
    /// `(slot, handle)` pair names one connection forever.
    slots: BTreeMap<usize, Slot>,
    next_slot: usize,
    socks: HashMap<u64, SockState>,
    by_conn: HashMap<(usize, ConnectionHandle), u64>,
    next_id: u64,
    /// Slots an application call changed since the driver last ran them.
    dirty: Vec<usize>,
    /// Slot deadlines, earliest first; an entry is current while it equals
    /// its slot's `deadline` (others are skipped when they come up), so
    /// the driver runs only the slots that are due instead of all of them.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Slots whose epoll interest may be out of date: new, watched or
    /// leased, or with datagrams waiting for `POLLOUT`. The driver
    /// reconciles only these before it sleeps, so a wake costs nothing per
    /// idle or lingering slot (thousands, for a client that opens and
    /// closes connections: each closed one lingers for the idle timeout).
    poll_check: Vec<usize>,
}

/// One UDP socket and the endpoint multiplexed over it.
struct Slot {
    fd: OwnedFd,
    local: SocketAddr,
    ep: Endpoint,
    /// The listening socket, for a listener's slot while it listens.
    listener: Option<u64>,
    /// Datagrams produced but not yet taken by the kernel.
    tx: TxQueue,
    /// Per peer, the local address it last wrote to: replies go out from
    /// it (a wildcard-bound socket would otherwise let routing pick the
    /// source, and the peer would drop the reply).
    reply_from: HashMap<SocketAddr, IpAddr>,
    /// A thread is receiving from the socket, outside the lock.
    rx_busy: bool,
    /// A thread is sending on the socket, outside the lock.
    tx_busy: bool,
    /// Readers blocked in `recv` that watch the socket themselves.
    watchers: usize,
    /// Until then the driver leaves the socket to its last watcher.
    lease: Option<Instant>,
    /// When a datagram last arrived.
    last_rx: Option<Instant>,
    /// The endpoint's next timer as of its last turn (see `State::timers`).
    deadline: Option<Instant>,
    /// The events the driver's epoll set has for the socket (None: not in
    /// it yet).
    interest: Option<u32>,
    /// Listed in [`State::poll_check`].
    poll_listed: bool,
}

impl Slot {
    fn new(fd: OwnedFd, local: SocketAddr, ep: Endpoint, listener: Option<u64>) -> Slot {
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
    fn wanted_events(&self, now: Instant) -> u32 {
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

/// The two eventfds of a socket (see the module docs).
struct SockFds {
    ready: EventFd,
    wake: EventFd,
}

impl SockFds {
    fn new() -> io::Result<Arc<SockFds>> {
        Ok(Arc::new(SockFds {
            ready: EventFd::new()?,
            wake: EventFd::new()?,
        }))
    }
}

enum Role {
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

struct SockState {
    fds: Arc<SockFds>,
    role: Role,
    /// `SO_ERROR`: a failed connect, consumed by `SO_ERROR` or the next call.
    error: Option<i32>,
    /// How the connection ended, once it has.
    closed: Option<CloseReason>,
    /// An error that ends the connection (ICMP, stack stopped).
    fatal: Option<i32>,
    shut_rd: bool,
    shut_wr: bool,
    /// Whether `fds.ready` is signalled now.
    ready: bool,
    /// Whether `fds.wake` is signalled now.
    writable: bool,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    /// Stats at close, for counters after the connection is forgotten.
    stats: ConnectionStats,
}

impl SockState {
    fn new(fds: Arc<SockFds>, role: Role) -> SockState {
        SockState {
            fds,
            role,
            error: None,
            closed: None,
            fatal: None,
            shut_rd: false,
            shut_wr: false,
            ready: false,
            writable: false,
            peer: None,
            local: None,
            stats: ConnectionStats::default(),
        }
    }
}

/// A connected socket's state, as `send` and `recv` start from it.
struct StreamView {
    slot: usize,
    h: ConnectionHandle,
    established: bool,
    closed: Option<CloseReason>,
    shut_rd: bool,
    shut_wr: bool,
}

/// The errno a connection that ended for `reason` reports.
fn reason_errno(reason: CloseReason, established: bool) -> i32 {
    match reason {
        CloseReason::Finished => libc::EPIPE,
        CloseReason::LocalReset => libc::ECONNABORTED,
        CloseReason::PeerReset if established => libc::ECONNRESET,
        CloseReason::PeerReset => libc::ECONNREFUSED,
        CloseReason::IdleTimeout | CloseReason::HandshakeTimeout => libc::ETIMEDOUT,
        CloseReason::ProtocolViolation => libc::EPROTO,
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    fn slot(&self, i: usize) -> Option<&Slot> {
        self.slots.get(&i)
    }

    fn slot_mut(&mut self, i: usize) -> Option<&mut Slot> {
        self.slots.get_mut(&i)
    }

    /// Slot `i` must run a turn soon (an application call changed it).
    fn mark(&mut self, i: usize) {
        self.dirty.push(i);
    }

    /// Slot `i` has a timer at `t` (or earlier): make sure a turn runs by
    /// then.
    fn schedule(&mut self, i: usize, t: Instant) {
        if let Some(sl) = self.slots.get_mut(&i) {
            if sl.deadline.is_none_or(|d| t < d) {
                sl.deadline = Some(t);
                self.timers.push(Reverse((t, i)));
            }
        }
    }

    /// Recomputes slot `i`'s deadline after a turn.
    fn reschedule(&mut self, i: usize) {
        let Some(sl) = self.slots.get_mut(&i) else {
            return;
        };
        sl.deadline = sl.ep.poll_timeout();
        if let Some(t) = sl.deadline {
            self.timers.push(Reverse((t, i)));
        }
    }

    /// The earliest current timer, dropping stale entries on the way.
    fn next_timer(&mut self) -> Option<Instant> {
        while let Some(&Reverse((t, i))) = self.timers.peek() {
            if self.slots.get(&i).is_some_and(|s| s.deadline == Some(t)) {
                return Some(t);
            }
            self.timers.pop();
        }
        None
    }

    /// Pops the slots whose current timer is due at `now` into `out`.
    fn due(&mut self, now: Instant, out: &mut Vec<usize>) {
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

    fn add_slot(&mut self, slot: Slot) -> usize {
        let i = self.next_slot;
        self.next_slot += 1;
        self.slots.insert(i, slot);
        self.check_interest(i);
        i
    }

    /// Slot `i`'s epoll interest may have to change: the driver looks
    /// before it next sleeps.
    fn check_interest(&mut self, i: usize) {
        if let Some(sl) = self.slots.get_mut(&i) {
            if !sl.poll_listed {
                sl.poll_listed = true;
                self.poll_check.push(i);
            }
        }
    }

    /// Whether socket `id` is readable now (see [`Readiness::readable`]).
    fn readable(&self, id: u64) -> bool {
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
    fn stream(&mut self, id: u64) -> io::Result<StreamView> {
        let s = self.socks.get_mut(&id).ok_or_else(|| errno(libc::EBADF))?;
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
    /// ([`Connection::is_writable`]), connect done, or an error to report.
    fn writable(&self, id: u64) -> bool {
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
    fn sync(&mut self, id: u64) {
        let want = self.readable(id);
        let want_w = self.writable(id);
        let Some(s) = self.socks.get_mut(&id) else {
            return;
        };
        s.fds.ready.set_level(&mut s.ready, want);
        s.fds.wake.set_level(&mut s.writable, want_w);
    }

    /// Moves connections the endpoint completed on listener slot `slot`
    /// into the listener's backlog while it has room; returns the listener
    /// if it gained any. The rest wait, established, in the endpoint's own
    /// queue, as in a kernel accept queue: clients' connects complete and
    /// their data is buffered. With no listener left they are reset.
    fn admit(&mut self, slot: usize, shared: &Shared) -> Option<u64> {
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
                if let Some(size) = shared.opts.size_for(udp::route_to(peer).ok(), peer) {
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

    /// A new client slot for one outgoing connection: over the socket's
    /// reserved UDP port if it was bound, else a fresh ephemeral one. One
    /// UDP port per connection keeps `(local address, peer address)` unique
    /// per connection, as applications expect of TCP.
    fn client_slot(
        &mut self,
        opts: &FillpOptions,
        family: Family,
        bound: Option<(OwnedFd, SocketAddr)>,
    ) -> io::Result<usize> {
        let (fd, local) = match bound {
            Some(b) => b,
            None => {
                let ip = match (family, opts.bind_ip) {
                    (Family::V4, ip @ IpAddr::V4(_)) | (Family::V6, ip @ IpAddr::V6(_)) => ip,
                    (f, _) => unspecified(f).ip(),
                };
                let fd = udp::bind(SocketAddr::new(ip, 0), opts.offload)?;
                let local = udp::local_addr(fd.as_raw_fd())?;
                (fd, local)
            }
        };
        let ep = new_endpoint(opts, false);
        Ok(self.add_slot(Slot::new(fd, local, ep, None)))
    }
}

fn new_endpoint(opts: &FillpOptions, server: bool) -> Endpoint {
    let mut secret = [0u8; 32];
    udp::random_bytes(&mut secret);
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
        ..EndpointConfig::default()
    };
    Endpoint::new(config, Instant::now(), u64::from_ne_bytes(seed))
}

impl Shared {
    /// Makes the driver run slot `slot`'s turn: marks it and wakes the
    /// driver if it sleeps. Called with the lock held (`st`) after changing
    /// a connection; the driver checks for marked slots under the lock
    /// before it sleeps, so no change is missed and a busy driver costs no
    /// eventfd write.
    fn kick(&self, st: &mut State, slot: usize) {
        st.mark(slot);
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake.set();
        }
    }
}

impl FillpStack {
    /// Creates an instance and starts its driver thread.
    pub fn new(name: impl Into<String>, opts: FillpOptions) -> io::Result<FillpStack> {
        let name = name.into();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: EventFd::new()?,
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            opts,
            sockets: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            udp_sent: AtomicU64::new(0),
            udp_received: AtomicU64::new(0),
            udp_send_errors: AtomicU64::new(0),
            gso_disabled: AtomicU64::new(0),
            icmp_errors: AtomicU64::new(0),
            driver_wake_at: AtomicU64::new(0),
            epoch: Instant::now(),
            pumps: Mutex::new(Vec::new()),
        });
        let s2 = Arc::clone(&shared);
        let epoll = udp::Epoll::new()?;
        let thread = std::thread::Builder::new()
            .name(format!("fillp-{name}"))
            .spawn(move || Driver::new(s2, epoll).run())?;
        Ok(FillpStack {
            name,
            shared,
            thread: Some(thread),
        })
    }

    /// The options in effect.
    pub fn options(&self) -> &FillpOptions {
        &self.shared.opts
    }
}

impl Drop for FillpStack {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.set();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Stack for FillpStack {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn protocol(&self) -> &'static str {
        "fillp"
    }

    /// Streams of the family its UDP sockets bind in.
    fn carries(&self, family: Family, kind: SockKind) -> Result<(), String> {
        if kind != SockKind::Stream {
            return Err("FillP carries stream sockets only".into());
        }
        let own = Family::of(&SocketAddr::new(self.shared.opts.bind_ip, 0));
        if family != own {
            let name = if own == Family::V6 { "IPv6" } else { "IPv4" };
            return Err(format!("this instance's UDP sockets are {name}"));
        }
        Ok(())
    }

    /// The wildcard becomes the instance's own bind address.
    fn bind_address(&self, _family: Family, requested: IpAddr) -> IpAddr {
        if requested.is_unspecified() {
            self.shared.opts.bind_ip
        } else {
            requested
        }
    }

    fn socket(&self, family: Family, kind: SockKind) -> io::Result<Box<dyn StackSocket>> {
        if kind != SockKind::Stream {
            return Err(errno(libc::EPROTONOSUPPORT));
        }
        let fds = SockFds::new()?;
        let mut st = lock(&self.shared.state);
        let id = st.next_id;
        st.next_id += 1;
        st.socks
            .insert(id, SockState::new(Arc::clone(&fds), Role::Fresh));
        drop(st);
        self.shared.sockets.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(FillpSocket::new(
            Arc::clone(&self.shared),
            id,
            fds,
            family,
        )))
    }

    fn counters(&self) -> Counters {
        let s = &self.shared;
        let st = lock(&s.state);
        let mut e = EndpointStats::default();
        let mut conns = 0u64;
        for slot in st.slots.values() {
            let x = slot.ep.stats();
            e.datagrams += x.datagrams;
            e.malformed += x.malformed;
            e.unknown_cid += x.unknown_cid;
            e.wrong_address += x.wrong_address;
            e.bad_cookies += x.bad_cookies;
            e.stale_cookies += x.stale_cookies;
            e.cookie_rotations += x.cookie_rotations;
            e.refused += x.refused;
            conns += slot.ep.connection_count() as u64;
        }
        let udp_sockets = st.slots.len() as u64;
        drop(st);
        vec![
            ("sockets", s.sockets.load(Ordering::Relaxed)),
            ("connects", s.connects.load(Ordering::Relaxed)),
            ("accepted", s.accepted.load(Ordering::Relaxed)),
            ("connections", conns),
            ("udp_sockets", udp_sockets),
            ("packets_sent", s.udp_sent.load(Ordering::Relaxed)),
            ("packets_received", s.udp_received.load(Ordering::Relaxed)),
            ("udp_send_errors", s.udp_send_errors.load(Ordering::Relaxed)),
            ("gso_disabled", s.gso_disabled.load(Ordering::Relaxed)),
            ("icmp_errors", s.icmp_errors.load(Ordering::Relaxed)),
            ("malformed", e.malformed),
            ("unknown_cid", e.unknown_cid),
            ("wrong_address", e.wrong_address),
            ("bad_cookies", e.bad_cookies),
            ("stale_cookies", e.stale_cookies),
            ("cookie_rotations", e.cookie_rotations),
            ("refused", e.refused),
        ]
    }

    fn describe(&self) -> String {
        let c = &self.shared.opts.connection;
        let mode = match c.mode {
            RateMode::Bbr => "bbr",
            RateMode::Fillp => "fillp",
            RateMode::Fixed => "fixed",
        };
        let size = if self.shared.opts.path_mtu {
            "datagrams sized from the route".to_string()
        } else {
            format!("{}-byte datagrams", c.mtu)
        };
        format!(
            "fillp over UDP on {}, rate control {mode}, {size}",
            self.shared.opts.bind_ip
        )
    }
}

// ------------------------------------------------------------------ driver

/// How long the driver leaves a busy UDP socket to the reader that last
/// watched it (see the module docs): a bulk reader is back within
/// microseconds, and the driver then stays asleep instead of taking every
/// batch from under it. Bounds the extra delay a datagram sees when the
/// reader does not come back.
const WATCH_LEASE: Duration = Duration::from_micros(500);

/// A reader whose connection has more than this unacknowledged does not
/// watch (see [`Watch::new`]); a request or reply of up to this size does.
const WATCH_MAX_UNACKED: usize = 64 << 10;

/// A socket that received within this long counts as busy: the driver
/// wakes for its watch lease. An idle socket's watcher may block for hours
/// without costing the driver a turn.
const BUSY: Duration = Duration::from_millis(20);

/// Scratch buffers for moving datagrams between UDP sockets and endpoints.
/// The driver owns one; a reader doing the work itself borrows one from
/// [`Shared::pumps`].
struct Pump {
    rx: udp::RecvBatch,
    tx: udp::SendBatch,
    /// Emptied datagrams, for their header allocations.
    pool: Vec<udp::Datagram>,
    /// Sockets whose readiness may have changed.
    touched: Vec<u64>,
}

impl Pump {
    fn new(opts: &FillpOptions) -> Pump {
        let large = opts.offload || usize::from(opts.max_datagram()) > udp::DGRAM_MAX;
        Pump {
            rx: udp::RecvBatch::new(large),
            tx: udp::SendBatch::default(),
            pool: Vec::new(),
            touched: Vec::new(),
        }
    }

    /// Syncs the readiness of every touched socket.
    fn sync_touched(&mut self, st: &mut State) {
        self.sync_touched_but(st, None);
    }

    /// [`Pump::sync_touched`], leaving socket `skip` to its caller.
    fn sync_touched_but(&mut self, st: &mut State, skip: Option<u64>) {
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
struct TxQueue {
    q: VecDeque<(SocketAddr, udp::Datagram)>,
    /// Whether sends on this socket use GSO: probed when the socket first
    /// sends, turned off for good if the path refuses it.
    gso: Option<bool>,
}

impl TxQueue {
    /// Queues what `produce` yields (into buffers from `pool`) up to
    /// [`TX_CHUNK`] datagrams; returns whether it stopped for the limit,
    /// with maybe more to come.
    fn fill(
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
fn recycle(pool: &mut Vec<udp::Datagram>, mut d: udp::Datagram) {
    d.clear();
    pool.push(d);
}

impl Shared {
    /// Receives what is queued on slot `i`'s UDP socket (at most
    /// [`RX_ROUNDS`] batches) and feeds its endpoint. One thread at a time
    /// per slot: returns false, doing nothing, if another is at it.
    fn receive(&self, pump: &mut Pump, i: usize, pollerr: bool) -> bool {
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
    fn feed(&self, st: &mut State, pump: &mut Pump, i: usize, n: usize) {
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
    fn icmp(&self, st: &mut State, pump: &mut Pump, fd: RawFd, i: usize) {
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
                        } => s.error = Some(code),
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
    fn turn(&self, st: &mut State, pump: &mut Pump, i: usize, now: Instant) -> bool {
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
                }
                // A client with the server's cookie may send: its connect
                // is done, as TCP's is at the SYN-ACK, and what it writes
                // leaves behind the CONN_REQ, a round trip early.
                Event::Writable => {
                    if let Role::Conn { established, .. } = &mut s.role {
                        *established |= sl.ep.connection(h).is_some_and(|c| c.can_send());
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
    fn send(&self, pump: &mut Pump, i: usize) {
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
    fn wake_driver_by(&self, t: Instant) {
        let at = self.driver_wake_at.load(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) && at > self.stamp(t) {
            self.wake.set();
        }
    }

    /// `t` as nanoseconds since the instance started, for
    /// [`Shared::driver_wake_at`].
    fn stamp(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Takes a pump from the pool, or makes one.
    fn take_pump(&self) -> Pump {
        self.pumps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| Pump::new(&self.opts))
    }

    fn put_pump(&self, pump: Pump) {
        let mut pumps = self.pumps.lock().unwrap_or_else(|p| p.into_inner());
        if pumps.len() < 4 {
            pumps.push(pump);
        }
    }

    /// A reader's turn on its own slot, run where the driver would: receive
    /// what arrived, run the slot's timers and events, send what is due.
    /// Wakes the driver if the slot has more to send at once or its next
    /// deadline moved before the driver's.
    fn pump_inline(&self, i: usize, reader: u64) {
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
    fn flush_inline(&self, mut st: MutexGuard<'_, State>, i: usize, h: ConnectionHandle) {
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
    fn finish_inline(
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

/// The driver thread's own state.
struct Driver {
    shared: Arc<Shared>,
    pump: Pump,
    /// Every slot's UDP socket, with the slot number as token.
    epoll: udp::Epoll,
    events: Vec<libc::epoll_event>,
    ready: Vec<(u64, u32)>,
    /// Slots to run this turn: received on, changed, due, or with more to
    /// send at once after the last turn (`busy`).
    todo: Vec<usize>,
    busy: Vec<usize>,
    /// The slots `prepare_poll` is reconciling (a buffer kept for reuse).
    checking: Vec<usize>,
}

impl Driver {
    fn new(shared: Arc<Shared>, epoll: udp::Epoll) -> Driver {
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

    fn run(mut self) {
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
    fn prepare_poll(&mut self) -> Option<Duration> {
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
    fn process(&mut self) {
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
            let dead = st.slots.get(&i).is_some_and(|s| {
                s.listener.is_none()
                    && s.ep.connection_count() == 0
                    && !s.rx_busy
                    && !s.tx_busy
                    && s.watchers == 0
            });
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
    fn shutdown(&mut self) {
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

// ------------------------------------------------------------------ socket

/// One FillP stream socket.
pub struct FillpSocket {
    shared: Arc<Shared>,
    id: u64,
    fds: Arc<SockFds>,
    family: Family,
    timeout: TimeoutCell,
    closed: AtomicBool,
    /// A buffer for the next large `send` to copy into before it takes the
    /// lock: one the send buffer freed (acknowledged data), so that a bulk
    /// writer reuses a few warm allocations instead of calling `malloc`.
    stage: Mutex<Option<BytesMut>>,
    /// `SO_LINGER`: `-1` off, else the linger time in seconds (0: close
    /// aborts with a RST, as in TCP).
    linger: AtomicI64,
}

/// A `send` piece at least this long is copied before the lock is taken
/// and kept as it is ([`crate::fillp::Connection::write_shared`]); a
/// shorter one is copied into the send buffer under the lock, where it
/// shares an allocation with its neighbours instead of pinning its own.
const STAGE_MIN: usize = 16 << 10;

/// What a blocked operation waits for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The `ready` eventfd (level: readable state).
    Read,
    /// The `wake` eventfd (edge: drained under the lock before waiting).
    Write,
}

/// The outcome of one attempt of an operation.
enum Try<T> {
    Done(io::Result<T>),
    Block,
}

impl FillpSocket {
    fn new(shared: Arc<Shared>, id: u64, fds: Arc<SockFds>, family: Family) -> FillpSocket {
        FillpSocket {
            shared,
            id,
            fds,
            family,
            timeout: TimeoutCell::new(),
            closed: AtomicBool::new(false),
            stage: Mutex::new(None),
            linger: AtomicI64::new(-1),
        }
    }

    fn check_open(&self) -> io::Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(errno(libc::EBADF));
        }
        Ok(())
    }

    /// Runs `op` under the lock until it is done, waiting on `wait` between
    /// attempts as the timeout mode says (`nonblock` forces non-blocking).
    fn run<T>(
        &self,
        wait: Wait,
        nonblock: bool,
        op: impl FnMut(&mut State, &mut SockCtx) -> Try<T>,
    ) -> io::Result<T> {
        self.run_until(wait, nonblock, None, op)
    }

    /// [`Self::run`], with `until` (when given, and the socket has a
    /// timeout) as the deadline instead of one timeout from now.
    fn run_until<T>(
        &self,
        wait: Wait,
        nonblock: bool,
        until: Option<Instant>,
        mut op: impl FnMut(&mut State, &mut SockCtx) -> Try<T>,
    ) -> io::Result<T> {
        self.check_open()?;
        let timeout = if nonblock {
            Some(Duration::ZERO)
        } else {
            self.timeout()
        };
        let deadline = match (timeout, until) {
            (Some(t), Some(u)) if !t.is_zero() => Some(u),
            _ => timeout.map(|t| Instant::now() + t),
        };
        // While a reader waits it also watches its slot's UDP socket, and
        // takes what arrives itself (see the module docs).
        let mut watch: Option<Watch<'_>> = None;
        let mut arrived: Option<usize> = None;
        loop {
            drop(watch.take());
            let pumped = match arrived.take() {
                Some(i) => {
                    self.shared.pump_inline(i, self.id);
                    true
                }
                None => false,
            };
            {
                let mut st = lock(&self.shared.state);
                let mut ctx = SockCtx {
                    kick: None,
                    flush: None,
                };
                let r = op(&mut st, &mut ctx);
                if pumped {
                    // `pump_inline` left this socket's eventfds to us.
                    st.sync(self.id);
                }
                if let Some(i) = ctx.kick {
                    self.shared.kick(&mut st, i);
                }
                if let Try::Done(r) = r {
                    if let Some((i, h)) = ctx.flush {
                        self.shared.flush_inline(st, i, h);
                    }
                    return r;
                }
                if self.shared.stop.load(Ordering::SeqCst) {
                    return Err(errno(libc::ENETDOWN));
                }
                if wait == Wait::Read && timeout.is_none_or(|t| !t.is_zero()) {
                    watch = Watch::new(&self.shared, &mut st, self.id);
                }
            }
            if timeout.is_some_and(|t| t.is_zero()) {
                return Err(errno(libc::EAGAIN));
            }
            let fd = match wait {
                Wait::Read => self.fds.ready.as_raw_fd(),
                Wait::Write => self.fds.wake.as_raw_fd(),
            };
            let Some(also) = sys::wait_readable_or(fd, watch.as_ref().map(|w| w.fd), deadline)?
            else {
                return Err(timed_out());
            };
            if also & (libc::POLLIN | libc::POLLERR) != 0 {
                arrived = watch.as_ref().map(|w| w.slot);
            }
            self.check_open()?;
        }
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, State>> {
        self.check_open()?;
        Ok(lock(&self.shared.state))
    }

    /// One piece of a `send`, under one hold of the lock. A large piece is
    /// copied first, outside it, so the driver does not wait behind the copy.
    fn send_piece(&self, buf: &[u8], nonblock: bool, until: Option<Instant>) -> io::Result<usize> {
        let staged = (buf.len() >= STAGE_MIN).then(|| {
            let mut stage = self
                .stage
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .filter(|b| b.capacity() >= buf.len())
                .unwrap_or_else(|| BytesMut::with_capacity(buf.len()));
            stage.clear();
            stage.extend_from_slice(buf);
            stage.freeze()
        });
        let mut spare = None;
        let r = self.run_until(Wait::Write, nonblock, until, |st, ctx| {
            let v = match st.stream(self.id) {
                Ok(v) => v,
                Err(e) => return Try::Done(Err(e)),
            };
            if v.shut_wr {
                return Try::Done(Err(errno(libc::EPIPE)));
            }
            let StreamView {
                slot,
                h,
                established,
                closed,
                ..
            } = v;
            if !established {
                return match closed {
                    Some(r) => Try::Done(Err(errno(reason_errno(r, false)))),
                    None => Try::Block,
                };
            }
            let Some(conn) = st.slot_mut(slot).and_then(|sl| sl.ep.connection_mut(h)) else {
                let r = closed.unwrap_or(CloseReason::Finished);
                return Try::Done(Err(errno(reason_errno(r, true))));
            };
            if buf.is_empty() {
                return Try::Done(Ok(0));
            }
            // Nothing waited to go: a request or reply. Its sender sends
            // it, as a reader sends its window update, rather than hand it
            // to the driver (a thread wake-up each way per exchange).
            let idle = staged.is_none() && !conn.has_unsent();
            let written = match &staged {
                Some(b) => conn.write_shared(b),
                None => conn.write(buf),
            };
            if spare.is_none() && staged.is_some() {
                spare = conn.take_spare_buffer();
            }
            let r = match written {
                Ok(n) => {
                    if idle {
                        ctx.flush = Some((slot, h));
                    } else {
                        ctx.kick = Some(slot);
                    }
                    Try::Done(Ok(n))
                }
                Err(WriteError::Blocked) => Try::Block,
                Err(WriteError::Finished) => Try::Done(Err(errno(libc::EPIPE))),
                Err(WriteError::Closed) => {
                    // The driver may not have passed the Closed event on yet:
                    // the connection itself knows why it ended (a reset must
                    // read ECONNRESET, not EPIPE).
                    let r = closed
                        .or_else(|| conn.close_reason())
                        .unwrap_or(CloseReason::Finished);
                    Try::Done(Err(errno(reason_errno(r, true))))
                }
            };
            st.sync(self.id);
            r
        });
        if spare.is_some() {
            *self.stage.lock().unwrap_or_else(|p| p.into_inner()) = spare;
        }
        r
    }

    /// One piece of a `recv`, under one hold of the lock.
    fn recv_piece(&self, buf: &mut [u8], nonblock: bool) -> io::Result<usize> {
        // The bytes are taken under the lock as shared pieces and copied
        // into `buf` after it is released, so the driver does not wait
        // behind the copy.
        let mut pieces = Vec::new();
        let n = self.run(Wait::Read, nonblock, |st, ctx| {
            let v = match st.stream(self.id) {
                Ok(v) => v,
                Err(e) => return Try::Done(Err(e)),
            };
            if v.shut_rd {
                return Try::Done(Ok(0));
            }
            let StreamView {
                slot,
                h,
                established,
                closed,
                ..
            } = v;
            let gone = |r: Option<CloseReason>| match r {
                None | Some(CloseReason::Finished) => Try::Done(Ok(0)),
                Some(r) => Try::Done(Err(errno(reason_errno(r, established)))),
            };
            if !established {
                return match closed {
                    Some(_) => gone(closed),
                    None => Try::Block,
                };
            }
            let Some(conn) = st.slot_mut(slot).and_then(|sl| sl.ep.connection_mut(h)) else {
                return gone(closed);
            };
            pieces.clear();
            let r = match conn.read_shared(buf.len(), &mut pieces) {
                Ok(n) => {
                    // Reading opens the window: a PACK may be due, and the
                    // reader sends it rather than wake the driver.
                    if n > 0 {
                        ctx.flush = Some((slot, h));
                    }
                    Try::Done(Ok(n))
                }
                Err(ReadError::Blocked) => match closed {
                    Some(_) => gone(closed),
                    None => Try::Block,
                },
                Err(ReadError::Reset) => Try::Done(Err(errno(libc::ECONNRESET))),
                Err(ReadError::Closed) => gone(closed.or(Some(CloseReason::Finished))),
            };
            st.sync(self.id);
            r
        })?;
        let mut at = 0;
        for p in &pieces {
            // `read_shared` took at most `buf.len()` bytes.
            let Some(dst) = buf.get_mut(at..at + p.len()) else {
                break;
            };
            dst.copy_from_slice(p);
            at += p.len();
        }
        Ok(n.min(at))
    }
}

/// Bytes an application `send` or `recv` copies per hold of the stack lock.
/// A 1 MiB copy holds it for 100 µs or more, and the driver, which needs it
/// for every batch, waited up to 40% of its time (measured over loopback).
const COPY_CHUNK: usize = 64 << 10;

/// Runs a `send`/`recv` of `len` bytes as pieces of at most [`COPY_CHUNK`]
/// (`piece(range, nonblock)`), releasing the lock in between. Only the
/// first piece may block; the call returns what was copied as soon as a
/// piece comes up short or fails (the next call reports the error).
fn chunked(
    len: usize,
    nonblock: bool,
    mut piece: impl FnMut(std::ops::Range<usize>, bool) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut done = 0;
    loop {
        let end = (done + COPY_CHUNK).min(len);
        match piece(done..end, nonblock || done > 0) {
            Ok(n) => {
                let want = end - done;
                done += n.min(want);
                if n < want || done >= len {
                    return Ok(done);
                }
            }
            Err(_) if done > 0 => return Ok(done),
            Err(e) => return Err(e),
        }
    }
}

/// Per-attempt flags an operation sets.
struct SockCtx {
    /// A connection of this slot changed: the driver must run it.
    kick: Option<usize>,
    /// Connection `(slot, handle)` was read from, or written to while idle:
    /// send what it has to send now (see [`Shared::flush_inline`]) instead
    /// of waking the driver.
    flush: Option<(usize, ConnectionHandle)>,
}

/// A blocked reader's claim on its slot's UDP socket: while it lasts, the
/// driver leaves the socket to the reader, and for [`WATCH_LEASE`] after.
struct Watch<'a> {
    shared: &'a Shared,
    slot: usize,
    fd: RawFd,
}

impl<'a> Watch<'a> {
    /// Watches the slot of connected socket `id`, if it has one.
    fn new(shared: &'a Shared, st: &mut State, id: u64) -> Option<Watch<'a>> {
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

impl Drop for FillpSocket {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The unspecified address of a family, port 0.
fn unspecified(family: Family) -> SocketAddr {
    match family {
        Family::V4 => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        Family::V6 => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

impl StackSocket for FillpSocket {
    fn bind(&self, addr: SocketAddr) -> io::Result<()> {
        if Family::of(&addr) != self.family {
            return Err(errno(libc::EAFNOSUPPORT));
        }
        let mut st = self.lock()?;
        let s = st
            .socks
            .get_mut(&self.id)
            .ok_or_else(|| errno(libc::EBADF))?;
        if !matches!(s.role, Role::Fresh) {
            return Err(errno(libc::EINVAL));
        }
        let fd = udp::bind(addr, self.shared.opts.offload)?;
        let local = udp::local_addr(fd.as_raw_fd())?;
        s.local = Some(local);
        s.role = Role::Bound(fd, local);
        Ok(())
    }

    fn listen(&self, backlog: i32) -> io::Result<()> {
        let cap = backlog.clamp(1, 65535) as usize;
        if matches!(
            lock(&self.shared.state)
                .socks
                .get(&self.id)
                .map(|s| &s.role),
            Some(Role::Fresh)
        ) {
            // Like the kernel, listening unbound binds an ephemeral port.
            let ip = match (self.family, self.shared.opts.bind_ip) {
                (Family::V4, ip @ IpAddr::V4(_)) | (Family::V6, ip @ IpAddr::V6(_)) => ip,
                (f, _) => unspecified(f).ip(),
            };
            self.bind(SocketAddr::new(ip, 0))?;
        }
        let mut st = self.lock()?;
        let st = &mut *st;
        let s = st
            .socks
            .get_mut(&self.id)
            .ok_or_else(|| errno(libc::EBADF))?;
        match std::mem::replace(&mut s.role, Role::Fresh) {
            Role::Bound(fd, local) => {
                let ep = new_endpoint(&self.shared.opts, true);
                let slot = st.add_slot(Slot::new(fd, local, ep, Some(self.id)));
                if let Some(s) = st.socks.get_mut(&self.id) {
                    s.role = Role::Listening {
                        slot,
                        backlog: VecDeque::new(),
                        cap,
                    };
                }
                self.shared.kick(st, slot);
                Ok(())
            }
            Role::Listening {
                slot,
                backlog,
                cap: _,
            } => {
                s.role = Role::Listening { slot, backlog, cap };
                Ok(())
            }
            other => {
                s.role = other;
                Err(errno(libc::EINVAL))
            }
        }
    }

    fn accept(&self) -> io::Result<(Box<dyn StackSocket>, SocketAddr)> {
        let (id, fds, peer) = self.run(Wait::Read, false, |st, _| {
            let Some(s) = st.socks.get_mut(&self.id) else {
                return Try::Done(Err(errno(libc::EBADF)));
            };
            if let Some(e) = s.fatal {
                return Try::Done(Err(errno(e)));
            }
            let Role::Listening { backlog, .. } = &mut s.role else {
                return Try::Done(Err(errno(libc::EINVAL)));
            };
            let Some(id) = backlog.pop_front() else {
                return Try::Block;
            };
            let slot = match s.role {
                Role::Listening { slot, .. } => slot,
                _ => usize::MAX,
            };
            st.admit(slot, &self.shared);
            st.sync(self.id);
            match st.socks.get(&id) {
                Some(c) => Try::Done(Ok((
                    id,
                    Arc::clone(&c.fds),
                    c.peer.unwrap_or_else(|| unspecified(self.family)),
                ))),
                None => Try::Block,
            }
        })?;
        self.shared.sockets.fetch_add(1, Ordering::Relaxed);
        let sock = FillpSocket::new(Arc::clone(&self.shared), id, fds, self.family);
        Ok((Box::new(sock), peer))
    }

    fn connect(&self, addr: SocketAddr) -> io::Result<()> {
        if Family::of(&addr) != self.family {
            return Err(errno(libc::EAFNOSUPPORT));
        }
        // Like TCP, connecting to the unspecified address means loopback.
        let addr = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
            }
            _ => addr,
        };
        {
            let mut st = self.lock()?;
            let st = &mut *st;
            let s = st.socks.get(&self.id).ok_or_else(|| errno(libc::EBADF))?;
            match s.role {
                Role::Conn {
                    established: true, ..
                } if s.closed.is_none() => return Err(errno(libc::EISCONN)),
                Role::Conn {
                    established: false, ..
                } if s.closed.is_none() && s.error.is_none() => return Err(errno(libc::EALREADY)),
                Role::Listening { .. } => return Err(errno(libc::EINVAL)),
                _ => {}
            }
            let bound = match st.socks.get_mut(&self.id).map(|s| &mut s.role) {
                Some(role @ Role::Bound(..)) => match std::mem::replace(role, Role::Fresh) {
                    Role::Bound(fd, local) => Some((fd, local)),
                    _ => None,
                },
                _ => None,
            };
            let slot = st.client_slot(&self.shared.opts, self.family, bound)?;
            let sl = st.slot_mut(slot).ok_or_else(|| errno(libc::ENETDOWN))?;
            let route = udp::route_to(addr).ok();
            let opts = &self.shared.opts;
            let mut config = opts.connection.clone();
            if let Some(size) = opts.size_for(route, addr) {
                config.mtu = size;
            }
            let h = sl
                .ep
                .connect_with(Instant::now(), addr, config)
                .map_err(|_| errno(libc::EADDRNOTAVAIL))?;
            let mut local = sl.local;
            if local.ip().is_unspecified() {
                if let Some(r) = route {
                    local.set_ip(r.source);
                }
            }
            if let Some(Role::Conn { slot, h, .. }) = st.socks.get(&self.id).map(|s| &s.role) {
                st.by_conn.remove(&(*slot, *h));
            }
            st.by_conn.insert((slot, h), self.id);
            let s = st
                .socks
                .get_mut(&self.id)
                .ok_or_else(|| errno(libc::EBADF))?;
            s.role = Role::Conn {
                slot,
                h,
                established: false,
            };
            s.peer = Some(addr);
            s.local = Some(local);
            s.error = None;
            s.closed = None;
            s.fatal = None;
            s.stats = ConnectionStats::default();
            st.sync(self.id);
            self.shared.connects.fetch_add(1, Ordering::Relaxed);
            self.shared.kick(st, slot);
        }
        if self.timeout().is_some_and(|t| t.is_zero()) {
            return Err(errno(libc::EINPROGRESS));
        }
        self.run(Wait::Write, false, |st, _| {
            let Some(s) = st.socks.get_mut(&self.id) else {
                return Try::Done(Err(errno(libc::EBADF)));
            };
            if let Some(e) = s.error.take().or(s.fatal) {
                st.sync(self.id);
                return Try::Done(Err(errno(e)));
            }
            match s.role {
                Role::Conn {
                    established: true, ..
                } => Try::Done(Ok(())),
                _ => Try::Block,
            }
        })
    }

    fn send(&self, buf: &[u8], flags: i32) -> io::Result<usize> {
        self.send_until(buf, flags, None)
    }

    fn send_until(&self, buf: &[u8], flags: i32, deadline: Option<Instant>) -> io::Result<usize> {
        let nonblock = flags & libc::MSG_DONTWAIT != 0;
        chunked(buf.len(), nonblock, |r, nb| {
            self.send_piece(&buf[r], nb, deadline)
        })
    }

    fn send_to(&self, buf: &[u8], flags: i32, _addr: SocketAddr) -> io::Result<usize> {
        // A connected stream socket ignores the address, as TCP does.
        self.send(buf, flags)
    }

    fn recv(&self, buf: &mut [u8], flags: i32) -> io::Result<usize> {
        if flags & (libc::MSG_PEEK | libc::MSG_OOB) != 0 {
            return Err(errno(libc::EOPNOTSUPP));
        }
        let nonblock = flags & libc::MSG_DONTWAIT != 0;
        chunked(buf.len(), nonblock, |r, nb| {
            self.recv_piece(&mut buf[r], nb)
        })
    }

    fn recv_from(&self, buf: &mut [u8], flags: i32) -> io::Result<(usize, Option<SocketAddr>)> {
        let n = self.recv(buf, flags)?;
        Ok((n, self.peer_addr().ok()))
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut st = self.lock()?;
        let st = &mut *st;
        let s = st
            .socks
            .get_mut(&self.id)
            .ok_or_else(|| errno(libc::EBADF))?;
        let Role::Conn {
            slot,
            h,
            established: true,
        } = s.role
        else {
            return Err(errno(libc::ENOTCONN));
        };
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            s.shut_rd = true;
        }
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            s.shut_wr = true;
            if let Some(c) = st.slot_mut(slot).and_then(|sl| sl.ep.connection_mut(h)) {
                c.shutdown_write();
            }
        }
        st.sync(self.id);
        self.shared.kick(st, slot);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut st = lock(&self.shared.state);
        let st = &mut *st;
        let Some(s) = st.socks.remove(&self.id) else {
            return Ok(());
        };
        let changed = match s.role {
            Role::Conn { slot, h, .. } => {
                st.by_conn.remove(&(slot, h));
                let abort = self.linger.load(Ordering::Relaxed) == 0;
                if let Some(c) = st.slot_mut(slot).and_then(|sl| sl.ep.connection_mut(h)) {
                    // Unread data, or a zero linger time, makes close an
                    // abort, as in TCP.
                    if abort || c.readable_bytes() > 0 {
                        c.reset();
                    } else {
                        c.close();
                    }
                }
                Some(slot)
            }
            Role::Listening { slot, backlog, .. } => {
                for id in backlog {
                    if let Some(Role::Conn { slot, h, .. }) = st.socks.remove(&id).map(|c| c.role) {
                        st.by_conn.remove(&(slot, h));
                        if let Some(c) = st.slot_mut(slot).and_then(|sl| sl.ep.connection_mut(h)) {
                            c.reset();
                        }
                    }
                }
                if let Some(sl) = st.slot_mut(slot) {
                    sl.listener = None;
                }
                st.admit(slot, &self.shared);
                Some(slot)
            }
            Role::Fresh | Role::Bound(..) => None,
        };
        // Wake any thread blocked on this socket so it sees EBADF.
        self.fds.ready.set();
        self.fds.wake.set();
        if let Some(slot) = changed {
            self.shared.kick(st, slot);
        }
        Ok(())
    }

    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.check_open()?;
        self.timeout.set(timeout);
        Ok(())
    }

    fn timeout(&self) -> Option<Duration> {
        self.timeout.get()
    }

    fn set_option(&self, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
        self.check_open()?;
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_LINGER) => {
                let (on, secs) = (int_at(value, 0)?, int_at(value, 4)?);
                let v = if on == 0 { -1 } else { i64::from(secs.max(0)) };
                self.linger.store(v, Ordering::Relaxed);
                Ok(())
            }
            // Accepted for compatibility; FillP sizes its own buffers.
            (libc::SOL_SOCKET, libc::SO_RCVBUF | libc::SO_SNDBUF)
            | (libc::SOL_SOCKET, libc::SO_REUSEADDR | libc::SO_REUSEPORT | libc::SO_KEEPALIVE)
            | (libc::IPPROTO_TCP, libc::TCP_NODELAY) => Ok(()),
            _ => Err(errno(libc::ENOPROTOOPT)),
        }
    }

    fn get_option(&self, level: i32, name: i32, len: usize) -> io::Result<Vec<u8>> {
        if (level, name) == (libc::SOL_SOCKET, libc::SO_LINGER) {
            self.check_open()?;
            let v = self.linger.load(Ordering::Relaxed);
            let (on, secs) = if v < 0 { (0, 0) } else { (1, v as i32) };
            return Ok(int_option(&[on, secs], len));
        }
        let mut st = self.lock()?;
        let c = &self.shared.opts.connection;
        let v: i32 = match (level, name) {
            (libc::SOL_SOCKET, libc::SO_ERROR) => {
                let e = st
                    .socks
                    .get_mut(&self.id)
                    .and_then(|s| s.error.take())
                    .unwrap_or(0);
                st.sync(self.id);
                e
            }
            (libc::SOL_SOCKET, libc::SO_TYPE) => libc::SOCK_STREAM,
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => c.recv_window.min(i32::MAX as u32) as i32,
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => c.send_buffer.min(i32::MAX as usize) as i32,
            (libc::SOL_SOCKET, libc::SO_REUSEADDR | libc::SO_REUSEPORT | libc::SO_KEEPALIVE) => 0,
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => 1,
            _ => return Err(errno(libc::ENOPROTOOPT)),
        };
        Ok(int_option(&[v], len))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        let st = self.lock()?;
        let s = st.socks.get(&self.id).ok_or_else(|| errno(libc::EBADF))?;
        Ok(s.local.unwrap_or_else(|| unspecified(self.family)))
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        let st = self.lock()?;
        let s = st.socks.get(&self.id).ok_or_else(|| errno(libc::EBADF))?;
        match (&s.role, s.peer) {
            (
                Role::Conn {
                    established: true, ..
                },
                Some(p),
            ) => Ok(p),
            _ => Err(errno(libc::ENOTCONN)),
        }
    }

    fn write_poll_fd(&self) -> Option<RawFd> {
        Some(self.fds.wake.as_raw_fd())
    }

    fn poll_fd(&self) -> RawFd {
        self.fds.ready.as_raw_fd()
    }

    fn readiness(&self) -> Readiness {
        let Ok(st) = self.lock() else {
            return Readiness {
                error: true,
                ..Readiness::default()
            };
        };
        let Some(s) = st.socks.get(&self.id) else {
            return Readiness::default();
        };
        let error = s.error.is_some() || s.fatal.is_some();
        let readable = st.readable(self.id);
        let writable = st.writable(self.id);
        Readiness {
            readable,
            writable,
            error,
        }
    }

    fn counters(&self) -> Counters {
        let Ok(st) = self.lock() else {
            return Vec::new();
        };
        let Some(s) = st.socks.get(&self.id) else {
            return Vec::new();
        };
        let stats = match s.role {
            Role::Conn { slot, h, .. } => st
                .slot(slot)
                .and_then(|sl| sl.ep.connection(h))
                .map_or(s.stats, |c| c.stats()),
            _ => return Vec::new(),
        };
        vec![
            ("bytes_sent", stats.bytes_sent),
            ("bytes_received", stats.bytes_received),
            ("bytes_acked", stats.bytes_acked),
            ("bytes_read", stats.bytes_read),
            ("packets_sent", stats.packets_sent),
            ("packets_received", stats.packets_received),
            ("retransmits", stats.retransmissions),
            ("duplicate_bytes", stats.duplicate_bytes),
            ("dropped", stats.dropped),
            ("rto_count", stats.rto_count),
            ("tail_probes", stats.tail_probes),
            ("nacks_sent", stats.nacks_sent),
            ("nacks_received", stats.nacks_received),
            ("rtt_us", stats.rtt.as_micros() as u64),
            ("min_rtt_us", stats.min_rtt.as_micros() as u64),
            ("send_rate_bps", stats.send_rate.saturating_mul(8)),
            ("delivery_rate_bps", stats.delivery_rate.saturating_mul(8)),
            ("loss_ppm", (stats.loss * 1e6) as u64),
            ("mtu", u64::from(stats.mtu)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::path_datagram_size;

    #[test]
    fn datagram_size_follows_large_routes_and_keeps_1400_on_ethernet() {
        assert_eq!(path_datagram_size(65535, false, 1400), 65507);
        assert_eq!(path_datagram_size(65535, true, 1400), 65487);
        assert_eq!(path_datagram_size(9000, false, 1400), 8972);
        assert_eq!(path_datagram_size(9000, true, 1400), 8952);
        assert_eq!(path_datagram_size(1500, false, 1400), 1400);
        assert_eq!(path_datagram_size(1420, false, 1400), 1392); // WireGuard
        assert_eq!(path_datagram_size(1280, true, 1400), 1232);
        // Nonsense from the kernel still gives a usable size.
        assert_eq!(path_datagram_size(0, false, 1400), 128);
    }
}
