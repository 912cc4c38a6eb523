//! The state an instance shares between its driver thread and application
//! threads (behind one `Mutex`): the smoltcp interface, its socket set, the
//! TAP device, the port table and dmm's view of every socket.
//!
//! [`State::turn`] is one round of work: `Interface::poll` (read every
//! queued frame, run timers, send what the sockets have), then bring dmm's
//! sockets in line with what changed: listener pools refilled, connects
//! completed or failed, readiness eventfds set or cleared, blocked writers
//! woken, closed connections reaped. Both the driver and application threads
//! (right after they queue data) run it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::{Duration as SmolDuration, Instant};
use smoltcp::wire::{IpEndpoint, IpListenEndpoint, IpVersion};

use super::device::TapDevice;
use super::ports::{Ports, Proto};
use crate::stack::userspace::{Listeners, Mirror, SockFds};
use crate::stack::{errno, Family};

/// Extra polls a turn makes while a loopback link holds frames.
const LOOPBACK_ROUNDS: usize = 16;

/// How long a connect may wait for its handshake before `ETIMEDOUT` (as
/// Linux with `tcp_syn_retries` = 6).
pub const SYN_TIMEOUT: SmolDuration = SmolDuration::from_secs(127);

/// How long a closed connection may linger, sending what it still has and
/// its FIN, before it is given up.
pub const LINGER: SmolDuration = SmolDuration::from_secs(60);

/// The delayed-ACK timer (see the module docs of `smol` for the choice).
pub const ACK_DELAY: SmolDuration = SmolDuration::from_millis(10);

/// Largest listen backlog (Linux' `SOMAXCONN`).
pub const MAX_BACKLOG: i32 = 4096;

/// Default idle time before keepalive probes (`TCP_KEEPIDLE`), as Linux.
pub const KEEPIDLE_DEFAULT: u32 = 7200;

/// The socket set, with a record of which handles are live and what they
/// are, so a stale handle yields `None` instead of smoltcp's panic.
pub struct Sockets {
    pub set: SocketSet<'static>,
    tcp: HashSet<SocketHandle>,
    udp: HashSet<SocketHandle>,
}

impl Sockets {
    fn new() -> Sockets {
        Sockets {
            set: SocketSet::new(Vec::new()),
            tcp: HashSet::new(),
            udp: HashSet::new(),
        }
    }

    /// Adds a TCP socket.
    pub fn add_tcp(&mut self, s: tcp::Socket<'static>) -> SocketHandle {
        let h = self.set.add(s);
        self.tcp.insert(h);
        h
    }

    /// Adds a UDP socket.
    pub fn add_udp(&mut self, s: udp::Socket<'static>) -> SocketHandle {
        let h = self.set.add(s);
        self.udp.insert(h);
        h
    }

    /// The TCP socket `h`, if live.
    pub fn tcp(&self, h: SocketHandle) -> Option<&tcp::Socket<'static>> {
        self.tcp
            .contains(&h)
            .then(|| self.set.get::<tcp::Socket>(h))
    }

    /// The TCP socket `h`, if live, for changes.
    pub fn tcp_mut(&mut self, h: SocketHandle) -> Option<&mut tcp::Socket<'static>> {
        if self.tcp.contains(&h) {
            Some(self.set.get_mut::<tcp::Socket>(h))
        } else {
            None
        }
    }

    /// The UDP socket `h`, if live.
    pub fn udp(&self, h: SocketHandle) -> Option<&udp::Socket<'static>> {
        self.udp
            .contains(&h)
            .then(|| self.set.get::<udp::Socket>(h))
    }

    /// The UDP socket `h`, if live, for changes.
    pub fn udp_mut(&mut self, h: SocketHandle) -> Option<&mut udp::Socket<'static>> {
        if self.udp.contains(&h) {
            Some(self.set.get_mut::<udp::Socket>(h))
        } else {
            None
        }
    }

    /// Removes `h` if live.
    pub fn remove(&mut self, h: SocketHandle) {
        if self.tcp.remove(&h) || self.udp.remove(&h) {
            self.set.remove(h);
        }
    }

    /// Removes every socket.
    fn clear(&mut self) {
        let all: Vec<SocketHandle> = self.tcp.iter().chain(self.udp.iter()).copied().collect();
        for h in all {
            self.remove(h);
        }
    }

    /// Live TCP sockets.
    pub fn tcp_count(&self) -> usize {
        self.tcp.len()
    }
}

/// Options set on a socket before its smoltcp socket exists, and applied
/// when it is made (accepted sockets inherit the listener's).
#[derive(Clone, Copy, Debug)]
pub struct SockOpts {
    pub rcvbuf: usize,
    pub sndbuf: usize,
    pub nodelay: bool,
    pub keepalive: bool,
    pub keepidle: u32,
    pub reuseaddr: bool,
    /// `SO_REUSEPORT` and `IPV6_V6ONLY` as set, for `getsockopt`: smoltcp's
    /// ports are the instance's own, so neither changes what binds.
    pub reuseport: bool,
    pub v6only: bool,
}

impl SockOpts {
    /// Applies the options that smoltcp can change on a live socket.
    pub fn apply(&self, t: &mut tcp::Socket<'static>) {
        t.set_nagle_enabled(!self.nodelay);
        t.set_keep_alive(
            self.keepalive
                .then(|| SmolDuration::from_secs(u64::from(self.keepidle.max(1)))),
        );
    }

    /// A new smoltcp TCP socket with these options.
    pub fn tcp_socket(&self) -> tcp::Socket<'static> {
        // Zeroed vectors come from calloc: pages are only touched when data
        // fills them, so idle listener pools and connections cost little.
        let mut t = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.rcvbuf]),
            tcp::SocketBuffer::new(vec![0; self.sndbuf]),
        );
        t.set_congestion_control(tcp::CongestionControl::Cubic);
        t.set_ack_delay(Some(ACK_DELAY));
        self.apply(&mut t);
        t
    }
}

/// Where a connection is in its life, as dmm reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The handshake is under way (since the given time).
    Connecting(Instant),
    /// The handshake completed (or the socket was accepted).
    Established,
    /// The handshake failed (the error is in `SockState::error`).
    Failed,
}

/// What a socket is.
pub enum Role {
    /// Neither bound nor connected.
    Fresh,
    /// Bound (the port is reserved in `SockState::port`).
    Bound,
    /// Listening: a pool of smoltcp sockets listening on the port and the
    /// established connections not yet accepted.
    Listening {
        endpoint: IpListenEndpoint,
        pool: Vec<SocketHandle>,
        queue: VecDeque<u64>,
        backlog: usize,
    },
    /// A TCP connection.
    Conn { h: SocketHandle, phase: Phase },
    /// A UDP socket (bound: it has a smoltcp socket).
    Udp { h: SocketHandle },
}

impl Role {
    /// A listener's queue of accepted connections not yet taken.
    pub fn queue(&mut self) -> Option<&mut VecDeque<u64>> {
        match self {
            Role::Listening { queue, .. } => Some(queue),
            _ => None,
        }
    }
}

/// dmm's view of one socket.
pub struct SockState {
    /// Its eventfds: `ready` readable exactly while the socket is (the
    /// `poll_fd`), `wake` exactly while it is writable (the
    /// `write_poll_fd`, and what blocked `send`/`connect` wait on), with
    /// the half-buffer rule of [`wake_writer`] once it was full.
    pub mirror: Mirror,
    pub family: Family,
    pub role: Role,
    /// `SO_ERROR`: a failed connect, consumed by `SO_ERROR` or the next call.
    pub error: Option<i32>,
    /// An error every later call reports (the instance went down).
    pub fatal: Option<i32>,
    pub shut_rd: bool,
    pub shut_wr: bool,
    pub opts: SockOpts,
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    /// The reserved local port, released when the socket is done with it.
    pub port: Option<(Proto, u16)>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// How long this socket's connect handshake took, microseconds (0: not
    /// a completed connect): one round trip, the path's RTT as dmm sees it
    /// (smoltcp keeps its own RTT estimate private).
    pub connect_rtt_us: u64,
    /// A datagram socket (a fresh one is writable).
    pub dgram: bool,
}

impl SockState {
    /// A fresh socket.
    pub fn new(fds: Arc<SockFds>, family: Family, opts: SockOpts) -> SockState {
        SockState {
            mirror: Mirror::new(fds),
            family,
            role: Role::Fresh,
            error: None,
            fatal: None,
            shut_rd: false,
            shut_wr: false,
            opts,
            local: None,
            peer: None,
            port: None,
            bytes_sent: 0,
            bytes_received: 0,
            connect_rtt_us: 0,
            dgram: false,
        }
    }
}

/// TCP states in which the receive side is still open (no FIN, no reset).
fn rx_open(s: tcp::State) -> bool {
    use tcp::State::*;
    matches!(s, SynSent | SynReceived | Established | FinWait1 | FinWait2)
}

/// Whether socket `s` is readable (data, EOF, error, pending connection).
pub fn readable(s: &SockState, set: &Sockets) -> bool {
    if s.fatal.is_some() || s.error.is_some() || s.shut_rd {
        return true;
    }
    match &s.role {
        Role::Fresh | Role::Bound => false,
        Role::Listening { queue, .. } => !queue.is_empty(),
        Role::Conn { h, .. } => set
            .tcp(*h)
            .is_none_or(|t| t.can_recv() || !rx_open(t.state())),
        Role::Udp { h } => set.udp(*h).is_none_or(|u| u.can_recv()),
    }
}

/// Whether socket `s` is writable (room to send, connect done, error).
pub fn writable(s: &SockState, set: &Sockets) -> bool {
    if s.fatal.is_some() || s.error.is_some() {
        return true;
    }
    match &s.role {
        Role::Conn { h, phase } => match (set.tcp(*h), phase) {
            (None, _) | (_, Phase::Failed) => true,
            (Some(_), Phase::Connecting(_)) => false,
            (Some(t), Phase::Established) => s.shut_wr || t.can_send() || !t.may_send(),
        },
        Role::Udp { h } => set.udp(*h).is_none_or(|u| u.can_send()),
        Role::Fresh => s.dgram,
        _ => false,
    }
}

/// Whether a writer blocked on `s` should wake: like [`writable`], but a
/// connection must have half its send buffer free (as the kernel's
/// `sk_stream_wspace` rule), so a bulk sender wakes once per half buffer,
/// not once per ACK.
fn wake_writer(s: &SockState, set: &Sockets) -> bool {
    match &s.role {
        Role::Conn {
            h,
            phase: Phase::Established,
        } if s.fatal.is_none() && s.error.is_none() && !s.shut_wr => set.tcp(*h).is_none_or(|t| {
            !t.may_send()
                || t.send_capacity().saturating_sub(t.send_queue()) >= t.send_capacity() / 2
        }),
        _ => writable(s, set),
    }
}

/// A closed connection still draining (FIN, TIME-WAIT) after its socket was
/// closed; its port stays reserved until smoltcp lets go.
struct Orphan {
    h: SocketHandle,
    port: Option<(Proto, u16)>,
}

/// Everything behind the instance's lock.
pub struct State {
    pub iface: Interface,
    /// The device; `None` once the instance is stopped.
    pub dev: Option<TapDevice>,
    pub sockets: Sockets,
    pub socks: HashMap<u64, SockState>,
    pub ports: Ports,
    orphans: Vec<Orphan>,
    /// The errno every socket reports while the instance is down.
    pub down: Option<i32>,
    pub next_id: u64,
    epoch: std::time::Instant,
    /// When the driver will next wake by itself (`None`: only when kicked).
    pub driver_deadline: Option<Instant>,
    /// Connections accepted so far.
    pub accepted: u64,
    /// Turns run so far (driver and inline): a stack at rest runs none.
    pub turns: u64,
}

impl State {
    /// A state around `iface` and `dev`.
    pub fn new(iface: Interface, dev: TapDevice, epoch: std::time::Instant, seed: u64) -> State {
        State {
            iface,
            dev: Some(dev),
            sockets: Sockets::new(),
            socks: HashMap::new(),
            ports: Ports::new(seed),
            orphans: Vec::new(),
            down: None,
            next_id: 1,
            epoch,
            driver_deadline: None,
            accepted: 0,
            turns: 0,
        }
    }

    /// smoltcp's clock: microseconds since the instance started.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros().min(i64::MAX as u128) as i64)
    }

    /// Adds a socket and returns its id.
    pub fn insert(&mut self, s: SockState) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.socks.insert(id, s);
        id
    }

    /// One round of work (see the module docs).
    pub fn turn(&mut self) {
        if self.down.is_some() {
            return;
        }
        let now = self.now();
        let Some(dev) = self.dev.as_mut() else {
            return;
        };
        self.turns += 1;
        self.iface.poll(now, dev, &mut self.sockets.set);
        // A loopback link's sends are this instance's next input: deliver
        // them now (a handshake and its ACK take a few rounds), bounded so
        // a turn stays short; poll_at says "now" for what is left.
        let mut rounds = 0;
        while dev.pending() && rounds < LOOPBACK_ROUNDS {
            self.iface.poll(now, dev, &mut self.sockets.set);
            rounds += 1;
        }
        if dev.failure().is_some() {
            self.go_down(libc::ENETDOWN);
            return;
        }
        self.after_poll(now);
    }

    /// When smoltcp next needs a turn (`None`: only on input).
    pub fn poll_at(&mut self) -> Option<Instant> {
        if self.down.is_some() || self.dev.is_none() {
            return None;
        }
        let now = self.now();
        if self.dev.as_ref().is_some_and(|d| d.pending()) {
            return Some(now);
        }
        self.iface.poll_at(now, &self.sockets.set)
    }

    fn after_poll(&mut self, now: Instant) {
        let listeners: Vec<u64> = self
            .socks
            .iter()
            .filter(|(_, s)| matches!(s.role, Role::Listening { .. }))
            .map(|(id, _)| *id)
            .collect();
        for id in listeners {
            self.refill(id);
        }
        let State { socks, sockets, .. } = self;
        for s in socks.values_mut() {
            step(s, sockets, now);
        }
        let State {
            orphans,
            sockets,
            ports,
            ..
        } = self;
        orphans.retain(|o| {
            let done = sockets
                .tcp(o.h)
                .is_none_or(|t| t.state() == tcp::State::Closed);
            if done {
                sockets.remove(o.h);
                if let Some((p, n)) = o.port {
                    ports.release(p, n);
                }
            }
            !done
        });
    }

    /// Moves listener `id`'s established connections to its accept queue
    /// and tops its pool of listening sockets up. The device's
    /// [`SynGate`](super::syn_gate::SynGate) then admits only as many SYNs
    /// as the queue has room for; clients beyond it retransmit and wait, as
    /// with a full kernel queue.
    pub fn refill(&mut self, id: u64) {
        let mut born = Vec::new();
        let opts;
        let family;
        {
            let Some(s) = self.socks.get_mut(&id) else {
                return;
            };
            if s.fatal.is_some() {
                return;
            }
            opts = s.opts;
            family = s.family;
            let Role::Listening {
                endpoint,
                pool,
                queue,
                backlog,
            } = &mut s.role
            else {
                return;
            };
            let mut i = 0;
            while i < pool.len() {
                let h = pool[i];
                match self.sockets.tcp_mut(h).map(|t| (t.state(), t)) {
                    None => {
                        pool.swap_remove(i);
                    }
                    Some((tcp::State::Listen | tcp::State::SynReceived, _)) => i += 1,
                    Some((tcp::State::Closed, t)) => {
                        // A half-open connection timed out: listen again.
                        if t.listen(*endpoint).is_err() {
                            pool.swap_remove(i);
                            self.sockets.remove(h);
                        } else {
                            i += 1;
                        }
                    }
                    Some(_) => {
                        pool.swap_remove(i);
                        born.push(h);
                    }
                }
            }
            // As many sockets listen as the gate below can admit SYNs.
            while pool.len() < *backlog {
                let mut t = opts.tcp_socket();
                if t.listen(*endpoint).is_err() {
                    break;
                }
                pool.push(self.sockets.add_tcp(t));
            }
            // Until the next turn, the gate admits as many SYNs as the
            // queue has room for beyond the handshakes under way, and no
            // more than there are sockets listening to take them.
            let (listening, handshakes) = pool.iter().fold((0, 0), |(l, h), &sh| {
                match self.sockets.tcp(sh).map(|t| t.state()) {
                    Some(tcp::State::Listen) => (l + 1, h),
                    Some(tcp::State::SynReceived) => (l, h + 1),
                    _ => (l, h),
                }
            });
            let room = backlog
                .saturating_sub(queue.len() + born.len() + handshakes)
                .min(listening);
            if let Some(dev) = self.dev.as_mut() {
                dev.gate_mut().set(*endpoint, room);
            }
            // An IPv4 listener on the wildcard of an instance that also has
            // IPv6 addresses must refuse IPv6 clients (smoltcp's wildcard
            // takes both): its SYN-ACKs wait for this screening, which runs
            // in the same turn, and an IPv6 handshake is reset before it
            // ever completes.
            let screen = family == Family::V4
                && endpoint.addr.is_none()
                && self
                    .iface
                    .ip_addrs()
                    .iter()
                    .any(|c| c.address().version() == IpVersion::Ipv6);
            for &h in pool.iter() {
                let Some(t) = self.sockets.tcp_mut(h) else {
                    continue;
                };
                match t.state() {
                    tcp::State::SynReceived
                        if screen
                            && t.remote_endpoint()
                                .is_some_and(|e| e.addr.version() == IpVersion::Ipv6) =>
                    {
                        // RST now; the next refill listens again.
                        t.abort();
                    }
                    tcp::State::SynReceived => t.pause_synack(false),
                    tcp::State::Listen => t.pause_synack(screen),
                    _ => {}
                }
            }
        }
        for h in born {
            // A listener bound to the wildcard hears both families. An IPv4
            // listener refuses IPv6 connections; an IPv6 one takes IPv4
            // connections with v4-mapped addresses, as a dual-stack kernel
            // socket does.
            let v6_on_v4 = self
                .sockets
                .tcp(h)
                .and_then(|t| t.remote_endpoint())
                .is_some_and(|e| family == Family::V4 && e.addr.version() == IpVersion::Ipv6);
            if v6_on_v4 {
                if let Some(t) = self.sockets.tcp_mut(h) {
                    t.abort();
                }
                self.orphans.push(Orphan { h, port: None });
                continue;
            }
            let Ok(fds) = SockFds::new() else {
                // Out of fds: refuse the connection, as the kernel would.
                if let Some(t) = self.sockets.tcp_mut(h) {
                    t.abort();
                }
                self.orphans.push(Orphan { h, port: None });
                continue;
            };
            let mut c = SockState::new(fds, family, opts);
            if let Some(t) = self.sockets.tcp(h) {
                let as_family = |e: IpEndpoint| match (family, SocketAddr::from(e)) {
                    (Family::V6, SocketAddr::V4(a)) => {
                        SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port())
                    }
                    (_, a) => a,
                };
                c.local = t.local_endpoint().map(as_family);
                c.peer = t.remote_endpoint().map(as_family);
            }
            c.role = Role::Conn {
                h,
                phase: Phase::Established,
            };
            let cid = self.insert(c);
            self.accepted += 1;
            if let Some(Role::Listening { queue, .. }) =
                self.socks.get_mut(&id).map(|s| &mut s.role)
            {
                queue.push_back(cid);
            }
        }
        self.sync(id);
    }

    /// Brings socket `id`'s readiness eventfds in line with its state.
    pub fn sync(&mut self, id: u64) {
        let now = self.now();
        if let Some(s) = self.socks.get_mut(&id) {
            step(s, &mut self.sockets, now);
        }
    }

    /// Hands socket `h` to the reaper: it finishes closing on its own and
    /// then gives its port back.
    pub fn orphan(&mut self, h: SocketHandle, port: Option<(Proto, u16)>) {
        if let Some(t) = self.sockets.tcp_mut(h) {
            t.set_timeout(Some(LINGER));
            self.orphans.push(Orphan { h, port });
        } else {
            self.sockets.remove(h);
            if let Some((p, n)) = port {
                self.ports.release(p, n);
            }
        }
    }

    /// Takes the instance down: every connection is dropped and every socket
    /// fails from now on with `err`, blocked callers included.
    pub fn go_down(&mut self, err: i32) {
        self.down = Some(err);
        self.sockets.clear();
        for o in self.orphans.drain(..) {
            if let Some((p, n)) = o.port {
                self.ports.release(p, n);
            }
        }
        for s in self.socks.values_mut() {
            s.fatal = Some(err);
            // Forget the handles: smoltcp reuses handle numbers, and a
            // socket made after a restart must never be reached through an
            // old one. `fatal` answers every call from now on.
            s.role = Role::Fresh;
            s.mirror.show(true, true);
        }
    }

    /// Whether the instance is down, as an error.
    pub fn check_up(&self) -> io::Result<()> {
        match self.down {
            Some(e) => Err(errno(e)),
            None => Ok(()),
        }
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

/// Brings one socket up to date: connect completion or failure, the
/// `ready` and `wake` eventfds.
fn step(s: &mut SockState, set: &mut Sockets, now: Instant) {
    if let Role::Conn { h, phase } = &mut s.role {
        if let Phase::Connecting(since) = *phase {
            match set.tcp_mut(*h) {
                None => {
                    *phase = Phase::Failed;
                    s.error = Some(libc::ENETDOWN);
                }
                Some(t) => match t.state() {
                    tcp::State::SynSent | tcp::State::SynReceived => {}
                    tcp::State::Closed => {
                        *phase = Phase::Failed;
                        // smoltcp does not say why: a close before the SYN
                        // timeout can only be a reset (or an ICMP error).
                        let timed_out = now >= since + SYN_TIMEOUT - SmolDuration::from_secs(1);
                        s.error = Some(if timed_out {
                            libc::ETIMEDOUT
                        } else {
                            libc::ECONNREFUSED
                        });
                    }
                    _ => {
                        *phase = Phase::Established;
                        s.connect_rtt_us = (now - since).total_micros();
                        t.set_timeout(None);
                        s.local = t.local_endpoint().map(SocketAddr::from).or(s.local);
                    }
                },
            }
        }
    }
    let want_r = readable(s, set);
    // Once unwritable, writable again only by the half-buffer rule.
    let want_w = if s.mirror.writable() {
        writable(s, set)
    } else {
        wake_writer(s, set)
    };
    s.mirror.show(want_r, want_w);
}
