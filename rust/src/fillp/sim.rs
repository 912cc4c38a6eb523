//! Deterministic network simulation for tests and benchmarks.
//!
//! A [`Link`] is one direction of a path with a virtual clock: a drop-tail
//! queue in front of a rate-limited serializer, then loss on the wire
//! (Bernoulli or Gilbert-Elliott), propagation delay with jitter, occasional
//! extra delay (reordering) and duplication. A [`Pair`] joins a client and a
//! server [`Endpoint`] by two links and steps time from event to event; its
//! step loop is bounded and reports livelock instead of hanging.
//!
//! Everything is driven by a seeded generator: the same seed gives the same run.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::connection::{CloseReason, Event, ReadError, WriteError};
use super::endpoint::{ConnectionHandle, Endpoint, EndpointConfig};

/// SplitMix64: small, fast, good enough for simulation.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// Loss model, applied on the wire after the bottleneck queue (lost packets
/// have used link capacity, as on a lossy radio hop).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    /// No loss.
    None,
    /// Each packet lost independently with this probability.
    Bernoulli(f64),
    /// Two-state burst loss.
    GilbertElliott {
        /// Per packet, good -> bad.
        good_to_bad: f64,
        /// Per packet, bad -> good.
        bad_to_good: f64,
        /// Loss probability in the good state.
        loss_good: f64,
        /// Loss probability in the bad state.
        loss_bad: f64,
    },
}

/// One direction of a simulated path.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Extra delay uniform in [0, jitter) per packet (reorders if larger
    /// than the packet spacing).
    pub jitter: Duration,
    /// Loss model.
    pub loss: Loss,
    /// Probability that a packet is held back by `reorder_delay`.
    pub reorder: f64,
    /// Extra delay for reordered packets.
    pub reorder_delay: Duration,
    /// Probability that a packet is delivered twice.
    pub duplicate: f64,
    /// Bottleneck rate in bytes/s (`None`: unlimited, no queue).
    pub rate: Option<u64>,
    /// Drop-tail queue limit in bytes.
    pub queue: usize,
}

impl LinkConfig {
    /// `delay` one way, nothing else.
    pub fn ideal(delay: Duration) -> Self {
        LinkConfig {
            delay,
            jitter: Duration::ZERO,
            loss: Loss::None,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
            duplicate: 0.0,
            rate: None,
            queue: usize::MAX,
        }
    }
}

/// Counters of one link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets offered.
    pub sent: u64,
    /// Dropped by the full queue.
    pub queue_drops: u64,
    /// Lost on the wire.
    pub lost: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Packets handed to the receiver.
    pub delivered: u64,
}

/// A simulated one-way link.
#[derive(Debug)]
pub struct Link {
    cfg: LinkConfig,
    rng: SimRng,
    bad: bool,
    busy_until: Option<Instant>,
    queue: VecDeque<(Instant, usize)>,
    queued: usize,
    seq: u64,
    in_flight: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    /// Counters.
    pub stats: LinkStats,
}

impl Link {
    /// Changes the bottleneck rate from now on (a path that opens up or
    /// narrows while a transfer runs).
    pub fn set_rate(&mut self, rate: Option<u64>) {
        self.cfg.rate = rate;
    }

    /// A link with its own seeded generator.
    pub fn new(cfg: LinkConfig, seed: u64) -> Self {
        Link {
            cfg,
            rng: SimRng::new(seed),
            bad: false,
            busy_until: None,
            queue: VecDeque::new(),
            queued: 0,
            seq: 0,
            in_flight: BinaryHeap::new(),
            stats: LinkStats::default(),
        }
    }

    fn lost(&mut self) -> bool {
        match self.cfg.loss {
            Loss::None => false,
            Loss::Bernoulli(p) => self.rng.chance(p),
            Loss::GilbertElliott {
                good_to_bad,
                bad_to_good,
                loss_good,
                loss_bad,
            } => {
                let flip = if self.bad { bad_to_good } else { good_to_bad };
                if self.rng.chance(flip) {
                    self.bad = !self.bad;
                }
                self.rng.chance(if self.bad { loss_bad } else { loss_good })
            }
        }
    }

    /// Offer a datagram at `now`.
    pub fn send(&mut self, now: Instant, data: Vec<u8>) {
        self.stats.sent += 1;
        let depart = match self.cfg.rate {
            None => now,
            Some(rate) => {
                while self.queue.front().is_some_and(|&(t, _)| t <= now) {
                    let (_, n) = self.queue.pop_front().unwrap_or((now, 0));
                    self.queued -= n;
                }
                if self.queued + data.len() > self.cfg.queue {
                    self.stats.queue_drops += 1;
                    return;
                }
                let start = self.busy_until.map_or(now, |b| b.max(now));
                let tx = Duration::from_nanos((data.len() as u64 * 1_000_000_000) / rate.max(1));
                let depart = start + tx;
                self.busy_until = Some(depart);
                self.queue.push_back((depart, data.len()));
                self.queued += data.len();
                depart
            }
        };
        if self.lost() {
            self.stats.lost += 1;
            return;
        }
        let copies = if self.rng.chance(self.cfg.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut at = depart + self.cfg.delay;
            if !self.cfg.jitter.is_zero() {
                at += self.cfg.jitter.mul_f64(self.rng.unit());
            }
            if self.rng.chance(self.cfg.reorder) {
                at += self.cfg.reorder_delay;
            }
            self.seq += 1;
            self.in_flight.push(Reverse((at, self.seq, data.clone())));
        }
    }

    /// Remove the datagrams in flight for which `f` is true (for tests that
    /// need one particular packet lost). Returns how many.
    pub fn drop_where(&mut self, mut f: impl FnMut(&[u8]) -> bool) -> usize {
        let before = self.in_flight.len();
        let kept: Vec<_> = self
            .in_flight
            .drain()
            .filter(|Reverse((_, _, d))| !f(d))
            .collect();
        self.in_flight.extend(kept);
        let n = before - self.in_flight.len();
        self.stats.lost += n as u64;
        n
    }

    /// When the next datagram arrives.
    pub fn next_arrival(&self) -> Option<Instant> {
        self.in_flight.peek().map(|Reverse((t, _, _))| *t)
    }

    /// A datagram that has arrived by `now`.
    pub fn recv(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.next_arrival()? <= now {
            self.stats.delivered += 1;
            self.in_flight.pop().map(|Reverse((_, _, d))| d)
        } else {
            None
        }
    }
}

/// Why a simulation run failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimError {
    /// The step bound was reached.
    Livelock {
        /// Steps taken.
        steps: u64,
    },
    /// Nothing was scheduled but the goal was not reached.
    Stalled,
    /// Simulated time passed the deadline.
    Deadline,
}

/// A client endpoint and a server endpoint joined by two links.
#[derive(Debug)]
pub struct Pair {
    /// Client endpoint.
    pub client: Endpoint,
    /// Server endpoint.
    pub server: Endpoint,
    /// Client's address.
    pub client_addr: SocketAddr,
    /// Server's address.
    pub server_addr: SocketAddr,
    /// Client to server.
    pub c2s: Link,
    /// Server to client.
    pub s2c: Link,
    /// Virtual time.
    pub now: Instant,
    /// Start of the run.
    pub epoch: Instant,
    /// Steps taken.
    pub steps: u64,
    buf: Vec<u8>,
    /// Payload pieces of a datagram sent with `poll_transmit_parts`.
    body: Vec<Bytes>,
    /// Datagrams sent and delivered so far: every other one goes the
    /// driver's way (gathered from shared pieces, received as a shared
    /// buffer) and the rest the copying way, so every test covers both.
    moved: u64,
}

impl Pair {
    /// Build a pair; `seed` drives both links and both endpoints.
    pub fn new(
        seed: u64,
        client: EndpointConfig,
        mut server: EndpointConfig,
        c2s: LinkConfig,
        s2c: LinkConfig,
    ) -> Self {
        // The only clock read: an arbitrary origin for virtual time.
        let now = Instant::now();
        server.server = true;
        let mut rng = SimRng::new(seed);
        Pair {
            client: Endpoint::new(client, now, rng.next_u64()),
            server: Endpoint::new(server, now, rng.next_u64()),
            client_addr: "10.0.0.1:4000".parse().expect("literal"),
            server_addr: "10.0.0.2:5000".parse().expect("literal"),
            c2s: Link::new(c2s, rng.next_u64()),
            s2c: Link::new(s2c, rng.next_u64()),
            now,
            epoch: now,
            steps: 0,
            buf: Vec::with_capacity(2048),
            body: Vec::new(),
            moved: 0,
        }
    }

    /// The next datagram `ep` sends, as one buffer, built by
    /// `poll_transmit_parts` or `poll_transmit` in turn.
    fn transmit(
        ep: &mut Endpoint,
        now: Instant,
        buf: &mut Vec<u8>,
        body: &mut Vec<Bytes>,
        moved: &mut u64,
    ) -> Option<(SocketAddr, Vec<u8>)> {
        *moved += 1;
        let t = if moved.is_multiple_of(2) {
            let t = ep.poll_transmit_parts(now, buf, body)?;
            for piece in body.drain(..) {
                buf.extend_from_slice(&piece);
            }
            t
        } else {
            ep.poll_transmit(now, buf)?
        };
        Some((t.destination, buf[..t.size].to_vec()))
    }

    /// Hands `d` to `ep`, shared or to copy, in turn.
    fn deliver(ep: &mut Endpoint, now: Instant, from: SocketAddr, d: Vec<u8>, moved: &mut u64) {
        *moved += 1;
        if moved.is_multiple_of(2) {
            ep.handle_datagram_shared(now, from, &Bytes::from(d));
        } else {
            ep.handle_datagram(now, from, &d);
        }
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.epoch
    }

    /// Sends what both endpoints have to send now, without advancing the
    /// clock (as [`Pair::step`] does first).
    pub fn flush(&mut self) {
        let now = self.now;
        // Bounded so a runaway sender shows up as livelock, not a hang.
        let (buf, body, moved) = (&mut self.buf, &mut self.body, &mut self.moved);
        for _ in 0..10_000 {
            let Some((to, d)) = Self::transmit(&mut self.client, now, buf, body, moved) else {
                break;
            };
            if to == self.server_addr {
                self.c2s.send(now, d);
            }
        }
        for _ in 0..10_000 {
            let Some((to, d)) = Self::transmit(&mut self.server, now, buf, body, moved) else {
                break;
            };
            if to == self.client_addr {
                self.s2c.send(now, d);
            }
        }
    }

    /// The earliest timer of either endpoint or arrival on either link.
    pub fn next_event(&mut self) -> Option<Instant> {
        [
            self.client.poll_timeout(),
            self.server.poll_timeout(),
            self.c2s.next_arrival(),
            self.s2c.next_arrival(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// One step: send what the applications queued, advance the clock to the
    /// next event (if nothing is due now), deliver what has arrived, run
    /// expired timers and send the results. Returns `false` when nothing at
    /// all is scheduled.
    pub fn step(&mut self) -> bool {
        self.steps += 1;
        self.flush();
        let Some(next) = self.next_event() else {
            return false;
        };
        self.now = self.now.max(next);
        let now = self.now;
        while let Some(d) = self.c2s.recv(now) {
            Self::deliver(&mut self.server, now, self.client_addr, d, &mut self.moved);
        }
        while let Some(d) = self.s2c.recv(now) {
            Self::deliver(&mut self.client, now, self.server_addr, d, &mut self.moved);
        }
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
        }
        self.flush();
        true
    }

    /// Step until `done` returns true, failing after `max_steps` steps, when
    /// nothing is scheduled, or when simulated time passes `limit`.
    pub fn run_until(
        &mut self,
        max_steps: u64,
        limit: Duration,
        mut done: impl FnMut(&mut Pair) -> bool,
    ) -> Result<(), SimError> {
        let start = self.steps;
        loop {
            if done(self) {
                return Ok(());
            }
            if self.steps - start >= max_steps {
                return Err(SimError::Livelock {
                    steps: self.steps - start,
                });
            }
            if self.elapsed() > limit {
                return Err(SimError::Deadline);
            }
            if !self.step() {
                return if done(self) {
                    Ok(())
                } else {
                    Err(SimError::Stalled)
                };
            }
        }
    }

    /// Connect the client to the server; returns (client, server) handles.
    pub fn connect(
        &mut self,
        max_steps: u64,
    ) -> Result<(ConnectionHandle, ConnectionHandle), SimError> {
        let now = self.now;
        let addr = self.server_addr;
        let ch = self
            .client
            .connect(now, addr)
            .map_err(|_| SimError::Stalled)?;
        let mut sh = None;
        self.run_until(max_steps, Duration::from_secs(60), |p| {
            if sh.is_none() {
                sh = p.server.accept();
            }
            sh.is_some() && p.client.connection(ch).is_some_and(|c| c.is_established())
        })?;
        sh.map(|s| (ch, s)).ok_or(SimError::Stalled)
    }
}

/// One side of a bulk transfer: bytes to write, bytes read, how it ended.
#[derive(Debug, Default, Clone)]
pub struct Side {
    /// What this side sends.
    pub outgoing: Vec<u8>,
    /// How much of it was accepted by `write`.
    pub written: usize,
    /// Whether `shutdown_write` was called.
    pub shut: bool,
    /// What this side read.
    pub incoming: Vec<u8>,
    /// `read` returned EOF.
    pub eof: bool,
    /// The `Closed` event's reason.
    pub closed: Option<CloseReason>,
    /// Calls to `pump` so far: every other one writes and reads through the
    /// shared-buffer calls (`write_shared`, `read_shared`), as the driver
    /// does, and the rest through the copying ones.
    turn: u64,
}

impl Side {
    /// A side that sends `data` then FIN.
    pub fn sending(data: Vec<u8>) -> Self {
        Side {
            outgoing: data,
            ..Side::default()
        }
    }

    /// Write, read and collect events for connection `h` of `ep`.
    pub fn pump(&mut self, ep: &mut Endpoint, h: ConnectionHandle) {
        let Some(c) = ep.connection_mut(h) else {
            return;
        };
        // As an application waiting for writability would: after a short
        // write, not again until the connection says so.
        self.turn += 1;
        let shared = self.turn.is_multiple_of(2);
        while self.written < self.outgoing.len() && c.is_writable() {
            let rest = &self.outgoing[self.written..];
            let r = if shared {
                c.write_shared(&Bytes::copy_from_slice(&rest[..rest.len().min(1 << 16)]))
            } else {
                c.write(rest)
            };
            match r {
                Ok(n) => self.written += n,
                Err(WriteError::Blocked) | Err(_) => break,
            }
        }
        if self.written == self.outgoing.len() && !self.shut {
            c.shutdown_write();
            self.shut = true;
        }
        let mut buf = [0u8; 16384];
        let mut pieces = Vec::new();
        loop {
            let r = if shared {
                c.read_shared(buf.len(), &mut pieces)
            } else {
                c.read(&mut buf)
            };
            match r {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(_) if shared => {
                    for p in pieces.drain(..) {
                        self.incoming.extend_from_slice(&p);
                    }
                }
                Ok(n) => self.incoming.extend_from_slice(&buf[..n]),
                Err(ReadError::Blocked) | Err(_) => break,
            }
        }
        while let Some(e) = c.poll_event() {
            if let Event::Closed { reason } = e {
                self.closed = Some(reason);
            }
        }
    }
}

/// Run a full transfer in both directions until both sides have closed.
/// Each side writes as soon as it has its connection: the client from
/// `connect` (its data follows the CONN_REQ), the server from `accept`.
pub fn transfer(
    pair: &mut Pair,
    client: &mut Side,
    server: &mut Side,
    max_steps: u64,
    limit: Duration,
) -> Result<(), SimError> {
    let ch = pair
        .client
        .connect(pair.now, pair.server_addr)
        .map_err(|_| SimError::Stalled)?;
    let mut sh = None;
    pair.run_until(max_steps, limit, |p| {
        if sh.is_none() {
            sh = p.server.accept();
        }
        client.pump(&mut p.client, ch);
        if let Some(h) = sh {
            server.pump(&mut p.server, h);
        }
        client.closed.is_some() && server.closed.is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fillp::wire::RateMode;

    fn cfg() -> EndpointConfig {
        EndpointConfig {
            cookie_secret: [3; 32],
            ..EndpointConfig::default()
        }
    }

    #[test]
    fn link_rate_and_queue() {
        let t0 = Instant::now();
        let mut l = Link::new(
            LinkConfig {
                rate: Some(1_000_000),
                queue: 5000,
                ..LinkConfig::ideal(Duration::from_millis(10))
            },
            1,
        );
        for _ in 0..10 {
            l.send(t0, vec![0; 1000]);
        }
        assert_eq!(l.stats.queue_drops, 5);
        assert_eq!(l.next_arrival(), Some(t0 + Duration::from_millis(11)));
        let mut n = 0;
        while l.recv(t0 + Duration::from_millis(15)).is_some() {
            n += 1;
        }
        assert_eq!(n, 5);
    }

    #[test]
    fn small_transfer_both_ways() {
        let mut p = Pair::new(
            7,
            cfg(),
            cfg(),
            LinkConfig::ideal(Duration::from_millis(5)),
            LinkConfig::ideal(Duration::from_millis(5)),
        );
        let a: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let b: Vec<u8> = (0..50_000u32).map(|i| (i * 7) as u8).collect();
        let mut c = Side::sending(a.clone());
        let mut s = Side::sending(b.clone());
        transfer(&mut p, &mut c, &mut s, 200_000, Duration::from_secs(60)).unwrap();
        assert_eq!(s.incoming, a);
        assert_eq!(c.incoming, b);
        assert_eq!(c.closed, Some(CloseReason::Finished));
        assert_eq!(s.closed, Some(CloseReason::Finished));
    }

    #[test]
    fn concurrent_connections_share_endpoints() {
        let link = LinkConfig {
            loss: Loss::Bernoulli(0.05),
            rate: Some(2_000_000),
            queue: 100_000,
            ..LinkConfig::ideal(Duration::from_millis(10))
        };
        let mut p = Pair::new(11, cfg(), cfg(), link, link);
        let now = p.now;
        let addr = p.server_addr;
        let clients: Vec<ConnectionHandle> = (0..4)
            .map(|_| p.client.connect(now, addr).unwrap())
            .collect();
        let mut sides: Vec<Side> = (0..4u8)
            .map(|i| Side::sending(vec![i; 30_000 + usize::from(i) * 7_000]))
            .collect();
        let mut servers: Vec<(ConnectionHandle, Side)> = Vec::new();
        p.run_until(2_000_000, Duration::from_secs(600), |p| {
            while let Some(h) = p.server.accept() {
                servers.push((h, Side::sending(Vec::new())));
            }
            for (h, s) in clients.iter().zip(sides.iter_mut()) {
                s.pump(&mut p.client, *h);
            }
            for (h, s) in servers.iter_mut() {
                s.pump(&mut p.server, *h);
            }
            servers.len() == 4
                && sides.iter().all(|s| s.closed.is_some())
                && servers.iter().all(|(_, s)| s.closed.is_some())
        })
        .unwrap();
        let mut got: Vec<Vec<u8>> = servers.into_iter().map(|(_, s)| s.incoming).collect();
        got.sort();
        let mut want: Vec<Vec<u8>> = sides.into_iter().map(|s| s.outgoing).collect();
        want.sort();
        assert_eq!(got, want);
    }

    /// Lose exactly the DATA packets numbered `lose` of a 10-packet transfer
    /// and return the sender's stats after a clean finish.
    fn lose_packets(lose: &[u32]) -> crate::fillp::connection::ConnectionStats {
        lose_packets_and_nacks(lose, false, 10)
    }

    /// The same for a `packets`-long transfer, optionally losing every NACK.
    fn lose_packets_and_nacks(
        lose: &[u32],
        lose_nacks: bool,
        packets: usize,
    ) -> crate::fillp::connection::ConnectionStats {
        use crate::fillp::wire::{Body, Repr};
        // A bottleneck spaces the first flight's back-to-back train, so the
        // packet to lose is still in flight when the next step looks.
        let link = LinkConfig {
            rate: Some(2_000_000),
            queue: 1 << 20,
            ..LinkConfig::ideal(Duration::from_millis(20))
        };
        let mut p = Pair::new(21, cfg(), cfg(), link, link);
        let (ch, sh) = p.connect(1000).unwrap();
        let data = vec![9u8; 1374 * packets];
        let mut c = Side::sending(data.clone());
        let mut s = Side::sending(Vec::new());
        let mut dropped = Vec::new();
        p.run_until(100_000, Duration::from_secs(60), |p| {
            c.pump(&mut p.client, ch);
            s.pump(&mut p.server, sh);
            p.c2s.drop_where(|d| match Repr::parse_bytes(d) {
                Ok(Repr {
                    body: Body::Data(x),
                    ..
                }) if lose.contains(&x.pn) && !dropped.contains(&x.pn) => {
                    dropped.push(x.pn);
                    true
                }
                _ => false,
            });
            if lose_nacks {
                p.s2c.drop_where(|d| d.get(1) == Some(&7));
            }
            c.closed.is_some() && s.closed.is_some()
        })
        .unwrap();
        assert_eq!(s.incoming, data);
        assert_eq!(dropped.len(), lose.len());
        p.client.connection(ch).unwrap().stats()
    }

    #[test]
    fn nack_repairs_a_hole_without_timers() {
        let st = lose_packets(&[3]);
        assert!(st.nacks_received >= 1, "{st:?}");
        assert_eq!(
            (st.retransmissions, st.tail_probes, st.rto_count),
            (1, 0, 0),
            "{st:?}"
        );
    }

    #[test]
    fn sack_hole_repairs_when_nacks_are_lost() {
        // Long enough (200 packets at the initial 10 Mbit/s) for PACKs to
        // keep arriving after the hole is older than an RTT.
        let st = lose_packets_and_nacks(&[3], true, 200);
        assert_eq!(st.nacks_received, 0, "{st:?}");
        assert_eq!(
            (st.retransmissions, st.tail_probes, st.rto_count),
            (1, 0, 0),
            "{st:?}"
        );
    }

    #[test]
    fn tail_probe_repairs_a_lost_tail() {
        // pn 9 carries the last data and FIN: no later packet reveals its loss.
        let st = lose_packets(&[9]);
        assert_eq!((st.tail_probes, st.rto_count), (1, 0), "{st:?}");
        assert_eq!(st.retransmissions, 1, "{st:?}");
    }

    #[test]
    fn rto_is_the_last_resort() {
        // The tail and its probe both lost: only the RTO is left.
        let st = lose_packets(&[9, 10]);
        assert_eq!((st.tail_probes, st.rto_count), (1, 1), "{st:?}");
    }

    /// Type byte of a datagram (offset 1 of the common header).
    fn is_type(d: &[u8], ty: u8) -> bool {
        d.get(1) == Some(&ty)
    }
    const CONN_REQ: u8 = 3;

    /// A client that writes before the handshake completes: `hook` runs
    /// every step (to drop or hold packets); returns the pair and both sides
    /// after a transfer of `len` bytes from the client.
    fn early_upload(
        len: usize,
        server_cfg: EndpointConfig,
        mut hook: impl FnMut(&mut Pair),
    ) -> (Pair, Side, Side, Result<(), SimError>) {
        let link = LinkConfig {
            rate: Some(2_000_000),
            queue: 1 << 20,
            ..LinkConfig::ideal(Duration::from_millis(25))
        };
        let mut p = Pair::new(5, cfg(), server_cfg, link, link);
        let data: Vec<u8> = (0..len as u32).map(|i| (i % 253) as u8).collect();
        let mut c = Side::sending(data);
        let mut s = Side::sending(Vec::new());
        let ch = p.client.connect(p.now, p.server_addr).unwrap();
        let mut sh = None;
        let r = p.run_until(200_000, Duration::from_secs(30), |p| {
            hook(p);
            sh = sh.or_else(|| p.server.accept());
            c.pump(&mut p.client, ch);
            if let Some(h) = sh {
                s.pump(&mut p.server, h);
            }
            c.closed.is_some() && s.closed.is_some()
        });
        (p, c, s, r)
    }

    #[test]
    fn early_data_reaches_the_server_with_the_conn_req() {
        let mut first_read = None;
        let (p, c, s, r) = early_upload(300_000, cfg(), |_| {});
        r.unwrap();
        assert_eq!(s.incoming, c.outgoing);
        assert_eq!(s.closed, Some(CloseReason::Finished));
        // Replay to find when the server first had data: 1.5 RTT (75 ms)
        // plus serialization, not 2 RTT.
        let (_, _, _, r2) = early_upload(300_000, cfg(), |p| {
            if first_read.is_none()
                && p.server
                    .connection(ConnectionHandle(0))
                    .is_some_and(|x| x.readable_bytes() > 0)
            {
                first_read = Some(p.elapsed());
            }
        });
        r2.unwrap();
        let t = first_read.expect("server read data");
        assert!(t < Duration::from_millis(90), "{t:?}");
        assert_eq!(p.server.stats().unknown_cid, 0);
    }

    #[test]
    fn conn_req_lost_with_data_behind_it() {
        let mut lost = false;
        let (p, c, s, r) = early_upload(300_000, cfg(), |p| {
            if !lost {
                lost = p.c2s.drop_where(|d| is_type(d, CONN_REQ)) > 0;
            }
        });
        r.unwrap();
        assert!(lost);
        // Every byte exactly once, in order, and a clean close.
        assert_eq!(s.incoming, c.outgoing);
        assert_eq!(
            (c.closed, s.closed),
            (Some(CloseReason::Finished), Some(CloseReason::Finished))
        );
        // The early data reached a server without state and was dropped...
        assert!(p.server.stats().unknown_cid > 0);
        assert_eq!(p.server.stats().accepted, 1);
        // ... and was recovered by a probe behind the retransmitted CONN_REQ
        // and the server's NACKs, not by the RTO.
        let st = p.client.connection(ConnectionHandle(0)).unwrap().stats();
        assert!(st.tail_probes >= 1, "{st:?}");
        assert_eq!(st.rto_count, 0, "{st:?}");
    }

    #[test]
    fn data_overtaking_the_conn_req() {
        // Hold the CONN_REQ back until data has reached the server.
        let mut held: Option<Vec<u8>> = None;
        let mut done = false;
        let (p, c, s, r) = early_upload(200_000, cfg(), |p| {
            if done {
                return;
            }
            if held.is_none() {
                p.c2s.drop_where(|d| {
                    let hit = is_type(d, CONN_REQ);
                    if hit {
                        held = Some(d.to_vec());
                    }
                    hit
                });
            } else if p.server.stats().unknown_cid >= 3 {
                let d = held.take().unwrap_or_default();
                let (now, from) = (p.now, p.client_addr);
                p.server.handle_datagram(now, from, &d);
                done = true;
            }
        });
        r.unwrap();
        assert!(done);
        assert_eq!(s.incoming, c.outgoing);
        assert_eq!(
            (c.closed, s.closed),
            (Some(CloseReason::Finished), Some(CloseReason::Finished))
        );
        assert_eq!(p.server.stats().accepted, 1);
    }

    #[test]
    fn a_full_server_refuses_the_init_before_any_data() {
        let server = EndpointConfig {
            max_connections: 0,
            ..cfg()
        };
        use crate::fillp::wire::{Body, Repr};
        let mut pns = std::collections::HashSet::new();
        let (p, c, _, r) = early_upload(1_000_000, server, |p| {
            // Note (and let through) every DATA transmission of the client.
            p.c2s.drop_where(|d| {
                if let Ok(Repr {
                    body: Body::Data(x),
                    ..
                }) = Repr::parse_bytes(d)
                {
                    pns.insert(x.pn);
                }
                false
            });
        });
        // The server never has the connection.
        assert!(r.is_err());
        assert_eq!(p.server.connection_count(), 0);
        assert!(p.server.stats().refused > 0);
        // A server at its limit says so (RST) to the INIT, as a kernel
        // backlog with tcp_abort_on_overflow does: the client fails in its
        // first round trip, inside connect(), having sent no data.
        assert_eq!(c.closed, Some(CloseReason::PeerReset));
        assert_eq!(pns.len(), 0);
    }

    #[test]
    fn reset_during_the_handshake_stops_early_data() {
        use crate::fillp::wire::{Body, Repr};
        let mut sent_at_reset = None;
        let (p, c, _, _) = early_upload(1_000_000, cfg(), |p| {
            // Only the INIT gets through: the server mints a cookie but
            // never sees the CONN_REQ, and the client sends its early data.
            p.c2s.drop_where(|d| {
                !matches!(
                    Repr::parse_bytes(d),
                    Ok(Repr {
                        body: Body::Init { .. },
                        ..
                    })
                )
            });
            let Some(conn) = p.client.connection(ConnectionHandle(0)) else {
                return;
            };
            if sent_at_reset.is_none() && conn.remote_cid() != 0 {
                let mut rst = Vec::new();
                Repr {
                    dst_cid: conn.local_cid(),
                    body: Body::Reset,
                }
                .emit(&mut rst);
                let (now, from) = (p.now, p.server_addr);
                p.client.handle_datagram(now, from, &rst);
                sent_at_reset = Some(p.c2s.stats.sent);
            }
        });
        assert_eq!(c.closed, Some(CloseReason::PeerReset));
        // Nothing at all after the RST.
        assert_eq!(sent_at_reset, Some(p.c2s.stats.sent));
    }

    /// Bulk download over `link` for `secs`: (bytes read per 100 ms from the
    /// first INIT, bottleneck queue drops in the first 2 s, in all).
    fn download(link: LinkConfig, secs: u64) -> (Vec<u64>, u64, u64) {
        download_with(3, cfg(), link, secs)
    }

    fn download_with(
        seed: u64,
        cfg: EndpointConfig,
        link: LinkConfig,
        secs: u64,
    ) -> (Vec<u64>, u64, u64) {
        let mut p = Pair::new(seed, cfg.clone(), cfg, link, link);
        let ch = p.client.connect(p.now, p.server_addr).unwrap();
        let mut sh = None;
        let chunk = vec![7u8; 65536];
        let mut buf = vec![0u8; 65536];
        let mut per_tick = vec![0u64; (secs * 10) as usize];
        let end = Duration::from_secs(secs);
        let mut early_drops = 0;
        let _ = p.run_until(20_000_000, end, |p| {
            if p.elapsed() <= Duration::from_secs(2) {
                early_drops = p.s2c.stats.queue_drops;
            }
            sh = sh.or_else(|| p.server.accept());
            if let Some(s) = sh.and_then(|h| p.server.connection_mut(h)) {
                while s.is_writable() && s.write(&chunk).is_ok_and(|n| n > 0) {}
            }
            let tick = (p.elapsed().as_millis() / 100) as usize;
            if let (Some(c), Some(slot)) = (p.client.connection_mut(ch), per_tick.get_mut(tick)) {
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    *slot += n as u64;
                }
            }
            p.elapsed() >= end
        });
        (per_tick, early_drops, p.s2c.stats.queue_drops)
    }

    fn bottleneck(rate: u64, rtt_ms: u64, queue: usize) -> LinkConfig {
        LinkConfig {
            rate: Some(rate),
            queue,
            ..LinkConfig::ideal(Duration::from_millis(rtt_ms / 2))
        }
    }

    #[test]
    fn large_datagrams_fill_a_fast_short_path() {
        // Loopback-like: 64 KiB datagrams, 10 Gbit/s, 100 µs RTT, 8 MiB
        // queue. Every seed must be at the link rate within 0.3 s.
        let mut c = cfg();
        c.connection.mtu = 65_507;
        let rate = 1_250_000_000;
        for seed in 1..=12 {
            let (ticks, _, _) = download_with(seed, c.clone(), fast_short_path(), 1);
            let late: u64 = ticks[3..].iter().sum();
            assert!(late >= rate / 10 * 7 * 8 / 10, "seed {seed}: {ticks:?}");
        }
    }

    /// Loopback-like: 64 KiB datagrams, 10 Gbit/s, 100 µs RTT, 8 MiB queue.
    fn fast_short_path() -> LinkConfig {
        LinkConfig {
            rate: Some(1_250_000_000),
            queue: 8 << 20,
            ..LinkConfig::ideal(Duration::from_micros(50))
        }
    }

    #[test]
    fn a_small_send_buffer_fills_a_fast_short_path() {
        // PACKs count bytes, not datagrams: counted in 64 KiB datagrams
        // they came every 2 MiB, and a sender with a 256 KiB buffer waited
        // for the PACK timer on every refill (0.2 Gbit/s over loopback).
        let mut c = cfg();
        c.connection.mtu = 65_507;
        c.connection.send_buffer = 256 << 10;
        let rate = 1_250_000_000;
        let (ticks, _, _) = download_with(4, c, fast_short_path(), 1);
        let late: u64 = ticks[3..].iter().sum();
        assert!(late >= rate / 10 * 7 * 7 / 10, "{ticks:?}");
    }

    #[test]
    fn a_writer_that_came_up_short_hears_when_half_the_buffer_is_free() {
        let mut c = cfg();
        c.connection.mtu = 65_507;
        let max = c.connection.send_buffer;
        let link = fast_short_path();
        let mut p = Pair::new(2, c.clone(), c, link, link);
        let ch = p.client.connect(p.now, p.server_addr).unwrap();
        let chunk = vec![1u8; 1 << 20];
        let mut buf = vec![0u8; 1 << 16];
        let (mut blocked, mut wakes, mut largest) = (false, 0, 0);
        let mut sh = None;
        let _ = p.run_until(2_000_000, Duration::from_millis(100), |p| {
            while let Some((_, ev)) = p.client.poll_event() {
                if ev == Event::Writable && blocked {
                    let c = p.client.connection_mut(ch).unwrap();
                    // Half the buffer was free when the PACK came; the
                    // buffer may have grown since, and the socket stays
                    // writable regardless (see `Connection::is_writable`).
                    assert!(c.is_writable());
                    assert!(c.send_space() > 0);
                    blocked = false;
                    wakes += 1;
                }
            }
            let c = p.client.connection_mut(ch).unwrap();
            largest = largest.max(c.send_capacity());
            // From the handshake on: before it, Writable also means "may
            // send early data" (see `Event::Writable`).
            if !blocked && c.is_established() {
                // A writer does not try while the socket is not writable.
                assert!(c.is_writable());
                let n = c.write(&chunk).unwrap_or(0);
                if n < chunk.len() {
                    blocked = true;
                    assert!(!c.is_writable());
                }
            }
            sh = sh.or_else(|| p.server.accept());
            if let Some(s) = sh.and_then(|h| p.server.connection_mut(h)) {
                while s.read(&mut buf).is_ok_and(|n| n > 0) {}
            }
            false
        });
        assert!(wakes >= 20, "{wakes} wakes");
        // Sized from the path, far below the 16 MiB maximum.
        assert!(largest <= max / 4, "{largest}");
    }

    #[test]
    fn a_writer_waiting_for_writability_keeps_a_lossy_long_path_full() {
        // 100 Mbit/s, 100 ms, 1% loss; the writer waits for writability
        // after a short write, as applications do. Woken at half of the
        // whole buffer, including what loss holds back, it ran out of new
        // data behind the holes (0.81 of the link over 10 s, 0.94 now).
        let rate = 12_500_000;
        let link = LinkConfig {
            loss: Loss::Bernoulli(0.01),
            ..bottleneck(rate, 100, 1_250_000)
        };
        let (ticks, _, _) = download(link, 6);
        let late: u64 = ticks[30..].iter().sum();
        assert!(late as f64 >= rate as f64 * 3.0 * 0.99 * 0.9, "{ticks:?}");
    }

    #[test]
    fn a_large_mtu_still_fills_a_slow_link() {
        // 64 KiB datagrams allowed on a 10 Mbit/s, 20 ms path: whole-MTU
        // packets would leave every 52 ms, longer than a round, and rate
        // control would learn almost nothing; sized from the rate, packets
        // stay small there and the link is full after startup.
        let mut c = cfg();
        c.connection.mtu = 65_507;
        let rate = 1_250_000;
        let (ticks, _, _) = download_with(5, c, bottleneck(rate, 20, 64 * 1024), 4);
        let late: u64 = ticks[20..].iter().sum();
        assert!(late >= rate * 2 * 9 / 10, "{ticks:?}");
    }

    #[test]
    fn startup_fills_a_long_path_in_one_round() {
        // 100 Mbit/s, 200 ms, a one-BDP queue. The first data reaches the
        // client at 0.4 s (2 RTT); the train measures the link one RTT
        // later, so from 0.8 s on the link is full.
        let rate = 12_500_000;
        let (ticks, _, drops) = download(bottleneck(rate, 200, 2_500_000), 3);
        let full = rate / 10 * 9 / 10;
        assert!(ticks[..4].iter().all(|&b| b == 0), "{ticks:?}");
        assert!(ticks[8..].iter().all(|&b| b >= full), "{ticks:?}");
        assert_eq!(drops, 0);
    }

    #[test]
    fn startup_does_not_overshoot_a_slow_link() {
        // 10 Mbit/s (the initial rate) and 5 Mbit/s (half of it), long and
        // short paths, queues of one BDP but at least 64 KiB: the train
        // measures the link, so startup paces near it instead of probing
        // past it. Only startup, whose first round is paced at the initial
        // rate before anything is measured, may overfill the queue where the
        // link is slower than that: at 5 Mbit/s and 200 ms by (10 - 5)
        // Mbit/s x 0.2 s + the train - the queue = ~30 packets. After
        // startup (2 s) at most a few drops from ProbeBW's probing.
        for (rate, rtt) in [
            (1_250_000, 200),
            (1_250_000, 20),
            (625_000, 200),
            (625_000, 20),
        ] {
            let bdp = (rate * rtt / 1000) as usize;
            let (ticks, in_startup, drops) = download(bottleneck(rate, rtt, bdp.max(64 * 1024)), 5);
            let bound = if rate < 1_250_000 { 40 } else { 0 };
            assert!(in_startup <= bound, "{rate} B/s, {rtt} ms: {in_startup}");
            assert!(drops - in_startup <= 3, "{rate} B/s, {rtt} ms: {drops}");
            let late: u64 = ticks[20..].iter().sum();
            assert!(late >= rate * 3 * 9 / 10, "{rate} B/s, {rtt} ms: {ticks:?}");
        }
    }

    #[test]
    fn lossy_transfer() {
        for seed in 0..4 {
            let link = LinkConfig {
                delay: Duration::from_millis(20),
                jitter: Duration::from_millis(3),
                loss: Loss::Bernoulli(0.3),
                reorder: 0.05,
                reorder_delay: Duration::from_millis(10),
                duplicate: 0.05,
                rate: Some(2_000_000),
                queue: 200_000,
            };
            let mut p = Pair::new(seed, cfg(), cfg(), link, link);
            let a: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let mut c = Side::sending(a.clone());
            let mut s = Side::sending(b"pong".to_vec());
            let r = transfer(&mut p, &mut c, &mut s, 2_000_000, Duration::from_secs(600));
            let cs = p.client.connection(ConnectionHandle(0)).map(|c| c.stats());
            eprintln!(
                "seed {seed}: {r:?} t={:?} steps={} client={cs:?}",
                p.elapsed(),
                p.steps
            );
            r.unwrap();
            assert_eq!(s.incoming, a);
            assert_eq!(c.incoming, b"pong");
            assert_eq!(
                (c.closed, s.closed),
                (Some(CloseReason::Finished), Some(CloseReason::Finished))
            );
        }
    }

    /// Round trips of 1-byte messages over a 50 µs path: one per RTT in
    /// every rate mode. Pacing must not hold them back: they were paced
    /// at the estimate of an application-limited flow (the messages' own
    /// trickle, or a fixed guess), which held them to ~2,300 a second, and
    /// the loss estimate read their 27-byte datagrams as 96% loss.
    #[test]
    fn small_messages_go_at_one_round_trip_each() {
        for mode in [RateMode::Bbr, RateMode::Fillp, RateMode::Fixed] {
            let mut cfg = cfg();
            cfg.connection.mode = mode;
            let link = LinkConfig::ideal(Duration::from_micros(25));
            let mut p = Pair::new(7, cfg.clone(), cfg, link, link);
            let (ch, sh) = p.connect(100_000).unwrap();
            let start = p.now;
            let mut buf = [0u8; 16];
            let mut round_trips = 0u64;
            p.client.connection_mut(ch).unwrap().write(b"?").unwrap();
            p.run_until(1_000_000, Duration::from_secs(5), |p| {
                let s = p.server.connection_mut(sh).unwrap();
                if let Ok(n @ 1..) = s.read(&mut buf) {
                    s.write(&buf[..n]).unwrap();
                }
                let c = p.client.connection_mut(ch).unwrap();
                if let Ok(1..) = c.read(&mut buf) {
                    round_trips += 1;
                    c.write(b"?").unwrap();
                }
                p.now - start >= Duration::from_secs(1)
            })
            .unwrap();
            // 20,000 at one RTT each.
            assert!(round_trips >= 19_500, "{mode:?}: {round_trips}");
        }
    }

    /// A reader slower than the path: the window closes, the sender stops,
    /// and no data comes to carry a PACK. Reading must reopen it: before,
    /// the sender waited for its zero-window probe (an RTO, 200 ms) each
    /// time, and 4 MiB through a 256 KiB window to a reader of 64 KiB per
    /// ms took seconds instead of ~64 ms.
    #[test]
    fn a_slow_reader_reopens_the_window_without_a_probe() {
        let mut server = cfg();
        server.connection.recv_window = 256 << 10;
        let link = LinkConfig::ideal(Duration::from_micros(100));
        let mut p = Pair::new(9, cfg(), server, link, link);
        let (ch, sh) = p.connect(100_000).unwrap();
        let data = vec![7u8; 4 << 20];
        let start = p.now;
        let (mut written, mut got) = (0, 0);
        let mut next_read = p.now;
        let mut buf = vec![0u8; 64 << 10];
        while got < data.len() {
            assert!(p.now - start < Duration::from_secs(5), "stuck at {got}");
            let c = p.client.connection_mut(ch).unwrap();
            while written < data.len() {
                match c.write(&data[written..]) {
                    Ok(n) => written += n,
                    Err(_) => break,
                }
            }
            if p.now >= next_read {
                if let Ok(n) = p.server.connection_mut(sh).unwrap().read(&mut buf) {
                    got += n;
                }
                next_read += Duration::from_millis(1);
            }
            p.flush();
            if p.next_event().is_none_or(|t| t > next_read) {
                p.now = p.now.max(next_read);
                continue;
            }
            p.step();
        }
        let took = p.now - start;
        // 64 reads, one a millisecond; a probe alone would be 200 ms.
        assert!(took < Duration::from_millis(150), "{took:?}");
        assert_eq!(p.client.connection(ch).unwrap().stats().rto_count, 0);
    }
}
