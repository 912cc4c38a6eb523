//! Many connections over one UDP socket: demultiplexing by connection ID and
//! the server's stateless cookie handshake.
//!
//! An INIT costs the server one MAC computation and one queued COOKIE, and no
//! per-peer state; only a CONN_REQ carrying a valid, fresh cookie for its own
//! source address creates a [`Connection`].
//!
//! The cookie secret rotates every [`EndpointConfig::cookie_rotation`]
//! (60 s) of the endpoint's clock, lazily, when a cookie is minted or checked
//! (see [`super::cookie`]). A cookie minted under the previous secret is
//! accepted until it expires; older ones count as `stale_cookies`. The
//! driver keeps the rotation fed with OS randomness: whenever
//! [`Endpoint::wants_cookie_secret`] is true, it calls
//! [`Endpoint::supply_cookie_secret`] with 32 fresh random bytes (without
//! them the secrets still rotate, by a one-way HMAC ratchet).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::ops::Bound::{Excluded, Unbounded};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::connection::{Config, Connection, Event, Transmit};
use super::cookie::{CookieCheck, CookieFields, CookieKeys};
use super::discovery::{self, Discovery, Entry};
use super::wire::{Body, HsParams, Repr};

/// Cookies older than this are refused.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(10);

/// Default period of the cookie-secret rotation.
pub const COOKIE_ROTATION: Duration = Duration::from_secs(60);

/// Endpoint settings.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Settings for every connection.
    pub connection: Config,
    /// Accept incoming connections.
    pub server: bool,
    /// Secret for the cookie MAC: fill from the OS's random source.
    pub cookie_secret: [u8; 32],
    /// Period of the cookie-secret rotation (`None`: never rotate). A cookie
    /// stays good for [`COOKIE_LIFETIME`] but never past the rotation after
    /// the one that follows its minting, so keep this above the lifetime.
    pub cookie_rotation: Option<Duration>,
    /// Refuse new connections beyond this many.
    pub max_connections: usize,
    /// Bound on queued stateless replies (COOKIEs); INITs beyond are dropped.
    pub max_stateless_queue: usize,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            connection: Config::default(),
            server: false,
            cookie_secret: [0; 32],
            cookie_rotation: Some(COOKIE_ROTATION),
            max_connections: 4096,
            max_stateless_queue: 256,
        }
    }
}

/// Identifies a connection within its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionHandle(pub u64);

/// Errors from [`Endpoint::connect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// `max_connections` reached.
    TooManyConnections,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("too many connections")
    }
}
impl std::error::Error for ConnectError {}

/// Endpoint-level counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Datagrams handed to `handle_datagram`.
    pub datagrams: u64,
    /// Refused by the parser.
    pub malformed: u64,
    /// For a connection ID we do not have.
    pub unknown_cid: u64,
    /// For a known connection ID but from another address.
    pub wrong_address: u64,
    /// INITs received (server).
    pub inits: u64,
    /// COOKIEs queued.
    pub cookies_sent: u64,
    /// INITs dropped because the stateless queue was full.
    pub stateless_dropped: u64,
    /// CONN_REQs with a bad MAC (or a mint time we cannot have given).
    pub bad_cookies: u64,
    /// CONN_REQs with an expired cookie, or one minted two or more key
    /// rotations ago.
    pub stale_cookies: u64,
    /// Cookie-secret rotations so far.
    pub cookie_rotations: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// INITs and valid CONN_REQs refused because `max_connections` was
    /// reached (each answered with a RST, so the client's connect fails at
    /// once).
    pub refused: u64,
    /// DISCOVER queries received ([`super::discovery`]).
    pub discovery_queries: u64,
    /// OFFERs queued in answer.
    pub discovery_answers: u64,
}

/// xorshift64*: deterministic connection IDs from a seed.
#[derive(Debug, Clone)]
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A set of connections sharing one socket.
#[derive(Debug)]
pub struct Endpoint {
    config: EndpointConfig,
    /// Only a server mints cookies; a client endpoint carries none.
    keys: Option<Box<CookieKeys>>,
    epoch: Instant,
    rng: Rng,
    next_handle: u64,
    /// Boxed: a B-tree node holds 11 values, and an endpoint often has one
    /// connection (the stack gives every outgoing connection its own), so
    /// inline ~1.2 KB connections would cost ~13 KB a node.
    conns: BTreeMap<ConnectionHandle, Box<Connection>>,
    by_cid: HashMap<u32, ConnectionHandle>,
    stateless: VecDeque<(SocketAddr, Vec<u8>)>,
    accept_queue: VecDeque<ConnectionHandle>,
    rr_after: Option<ConnectionHandle>,
    stats: EndpointStats,
    /// What a listening endpoint offers to DISCOVER queries (`None`: it
    /// does not answer them).
    offer: Option<Vec<Entry>>,
    // With many connections, mostly idle, scanning all of them on every
    // call made each keepalive cost O(connections). A connection changes
    // only when it gets a datagram, a timer fires, it transmits or the
    // application reaches it through `connection_mut`: those "touch" it,
    // and the calls below look at touched connections only.
    /// Touched since they last had nothing to send.
    tx_ready: BTreeSet<ConnectionHandle>,
    /// Touched since they last had no events (or were checked for reaping).
    ev_ready: BTreeSet<ConnectionHandle>,
    /// Touched since their deadline was last computed.
    retime: HashSet<ConnectionHandle>,
    /// Each connection's deadline as last computed, and the same in a heap
    /// (an entry that no longer matches `deadlines` is skipped).
    deadlines: HashMap<ConnectionHandle, Instant>,
    timers: BinaryHeap<Reverse<(Instant, ConnectionHandle)>>,
}

impl Endpoint {
    /// A new endpoint; `seed` drives connection-ID choice (use OS randomness
    /// outside tests).
    pub fn new(config: EndpointConfig, now: Instant, seed: u64) -> Self {
        Endpoint {
            keys: config.server.then(|| {
                Box::new(CookieKeys::new(
                    config.cookie_secret,
                    config.cookie_rotation,
                ))
            }),
            config,
            epoch: now,
            rng: Rng(seed | 1),
            next_handle: 0,
            conns: BTreeMap::new(),
            by_cid: HashMap::new(),
            stateless: VecDeque::new(),
            accept_queue: VecDeque::new(),
            rr_after: None,
            stats: EndpointStats::default(),
            offer: None,
            tx_ready: BTreeSet::new(),
            ev_ready: BTreeSet::new(),
            retime: HashSet::new(),
            deadlines: HashMap::new(),
            timers: BinaryHeap::new(),
        }
    }

    /// Connection `h` may have changed: look at it again for transmits,
    /// events and its deadline.
    fn touch(&mut self, h: ConnectionHandle) {
        self.tx_ready.insert(h);
        self.ev_ready.insert(h);
        self.retime.insert(h);
    }

    /// Forgets connection `h` everywhere.
    fn forget(&mut self, h: ConnectionHandle) {
        if let Some(c) = self.conns.remove(&h) {
            self.by_cid.remove(&c.local_cid());
        }
        self.tx_ready.remove(&h);
        self.ev_ready.remove(&h);
        self.retime.remove(&h);
        self.deadlines.remove(&h);
    }

    fn fresh_cid(&mut self) -> u32 {
        loop {
            let c = self.rng.next() as u32;
            if c != 0 && !self.by_cid.contains_key(&c) {
                return c;
            }
        }
    }

    fn insert(&mut self, conn: Connection) -> ConnectionHandle {
        let h = ConnectionHandle(self.next_handle);
        self.next_handle += 1;
        self.by_cid.insert(conn.local_cid(), h);
        self.conns.insert(h, Box::new(conn));
        self.touch(h);
        h
    }

    /// Start a connection to `remote` with the endpoint's connection settings.
    pub fn connect(
        &mut self,
        now: Instant,
        remote: SocketAddr,
    ) -> Result<ConnectionHandle, ConnectError> {
        self.connect_with(now, remote, self.config.connection.clone())
    }

    /// Start a connection to `remote` with its own settings (a driver that
    /// knows the route, for instance, sets the MTU per peer).
    pub fn connect_with(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        config: Config,
    ) -> Result<ConnectionHandle, ConnectError> {
        if self.conns.len() >= self.config.max_connections {
            return Err(ConnectError::TooManyConnections);
        }
        let cid = self.fresh_cid();
        let conn = Connection::new_client(config, now, remote, cid);
        Ok(self.insert(conn))
    }

    /// Process one datagram from `remote`. Never panics; invalid input only
    /// bumps a counter.
    pub fn handle_datagram(&mut self, now: Instant, remote: SocketAddr, data: &[u8]) {
        self.handle(now, remote, data, None);
    }

    /// [`Endpoint::handle_datagram`] for a datagram the caller can share: a
    /// DATA payload is kept as a slice of `data` until the application has
    /// read it, instead of copied. Worth it for large datagrams (or GRO
    /// runs) in their own buffers; a small datagram would pin a large one.
    pub fn handle_datagram_shared(&mut self, now: Instant, remote: SocketAddr, data: &Bytes) {
        self.handle(now, remote, data, Some(data));
    }

    /// Sets what this (server) endpoint answers to DISCOVER queries: the
    /// protocols and ports its listener accepts on. `None` stops answering.
    pub fn set_offer(&mut self, offer: Option<Vec<Entry>>) {
        self.offer = offer;
    }

    fn handle(&mut self, now: Instant, remote: SocketAddr, data: &[u8], shared: Option<&Bytes>) {
        self.stats.datagrams += 1;
        if discovery::is_discovery(data) {
            self.on_discovery(remote, data);
            return;
        }
        let repr = match Repr::parse_bytes(data) {
            Ok(r) => r,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        if let Some(&h) = self.by_cid.get(&repr.dst_cid) {
            let Some(conn) = self.conns.get_mut(&h) else {
                return;
            };
            if conn.remote() != remote {
                self.stats.wrong_address += 1;
                return;
            }
            conn.handle_repr(now, data.len(), repr, shared);
            self.touch(h);
            return;
        }
        match repr.body {
            Body::Init {
                client_cid,
                params,
                timestamp,
            } => self.on_init(now, remote, client_cid, params, timestamp),
            Body::ConnReq {
                client_cid,
                params,
                cookie_time,
                mac,
            } => self.on_conn_req(
                now,
                remote,
                repr.dst_cid,
                client_cid,
                params,
                cookie_time,
                mac,
            ),
            _ => self.stats.unknown_cid += 1,
        }
    }

    /// Answers a DISCOVER statelessly, never with more bytes than it had.
    fn on_discovery(&mut self, remote: SocketAddr, data: &[u8]) {
        let nonce = match discovery::parse(data) {
            Ok(Discovery::Query { nonce }) => nonce,
            Ok(Discovery::Offer { .. }) => {
                self.stats.unknown_cid += 1;
                return;
            }
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        self.stats.discovery_queries += 1;
        let Some(offer) = self.offer.as_deref().filter(|_| self.keys.is_some()) else {
            return;
        };
        if self.stateless.len() >= self.config.max_stateless_queue {
            self.stats.stateless_dropped += 1;
            return;
        }
        let mut buf = Vec::with_capacity(data.len());
        discovery::emit_offer(&nonce, offer, data.len(), &mut buf);
        self.stateless.push_back((remote, buf));
        self.stats.discovery_answers += 1;
    }

    fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn agreed(&self, offered: HsParams) -> HsParams {
        let c = &self.config.connection;
        HsParams {
            mtu: offered.mtu.min(c.mtu),
            window: offered.window,
            mode: c.force_mode.unwrap_or(offered.mode),
        }
    }

    fn on_init(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        client_cid: u32,
        params: HsParams,
        ts: u32,
    ) {
        self.stats.inits += 1;
        if self.keys.is_none() {
            return;
        }
        if self.stateless.len() >= self.config.max_stateless_queue {
            self.stats.stateless_dropped += 1;
            return;
        }
        if self.full() {
            // Full: tell the client while it is still in connect(). (The
            // check at CONN_REQ stays, for INITs racing for the last place.)
            self.stats.refused += 1;
            self.queue_reset(remote, client_cid);
            return;
        }
        let agreed = self.agreed(params);
        // A CID not in use now; uniqueness is re-checked when the cookie returns.
        let server_cid = self.fresh_cid();
        let now_ms = self.now_ms(now);
        let mut fields = CookieFields {
            remote,
            client_cid,
            server_cid,
            params: agreed,
            time_ms: 0,
        };
        let Some(keys) = self.keys.as_deref_mut() else {
            return;
        };
        let mac = keys.mint(now_ms, &mut fields);
        let time_ms = fields.time_ms;
        let reply = Repr {
            dst_cid: client_cid,
            body: Body::Cookie {
                server_cid,
                params: HsParams {
                    window: self.config.connection.recv_window,
                    ..agreed
                },
                echo: ts,
                cookie_time: time_ms,
                mac,
            },
        };
        let mut buf = Vec::with_capacity(reply.buffer_len());
        reply.emit(&mut buf);
        self.stateless.push_back((remote, buf));
        self.stats.cookies_sent += 1;
    }

    /// Whether a new connection would pass `max_connections`. Lingering
    /// connections (closed, answering retransmissions, as TCP's TIME_WAIT)
    /// do not count, up to three times the limit of them (the scan runs
    /// only once the table has reached the limit).
    fn full(&self) -> bool {
        let max = self.config.max_connections;
        let all = self.conns.len();
        all >= max
            && (all >= max.saturating_mul(4)
                || self.conns.values().filter(|c| !c.is_lingering()).count() >= max)
    }

    /// Queues a stateless RST to the client `cid` at `remote`.
    fn queue_reset(&mut self, remote: SocketAddr, cid: u32) {
        let reset = Repr {
            dst_cid: cid,
            body: Body::Reset,
        };
        let mut buf = Vec::with_capacity(reset.buffer_len());
        reset.emit(&mut buf);
        self.stateless.push_back((remote, buf));
    }

    #[allow(clippy::too_many_arguments)]
    fn on_conn_req(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        server_cid: u32,
        client_cid: u32,
        params: HsParams,
        cookie_time: u32,
        mac: [u8; super::wire::MAC_LEN],
    ) {
        let now_ms = self.now_ms(now);
        let Some(keys) = self.keys.as_deref_mut() else {
            self.stats.unknown_cid += 1;
            return;
        };
        let fields = CookieFields {
            remote,
            client_cid,
            server_cid,
            params,
            time_ms: cookie_time,
        };
        let lifetime = u64::try_from(COOKIE_LIFETIME.as_millis()).unwrap_or(u64::MAX);
        let age = match keys.check(now_ms, &fields, &mac, lifetime) {
            CookieCheck::Valid { age_ms } => age_ms,
            CookieCheck::Forged => {
                self.stats.bad_cookies += 1;
                return;
            }
            CookieCheck::Stale => {
                self.stats.stale_cookies += 1;
                return;
            }
        };
        if self.full() {
            // The cookie proved the client's address: tell it, as a full
            // kernel backlog with tcp_abort_on_overflow does, instead of
            // letting its connect succeed into silence.
            self.stats.refused += 1;
            if self.stateless.len() < self.config.max_stateless_queue {
                self.queue_reset(remote, client_cid);
            }
            return;
        }
        let rtt = Duration::from_millis(u64::from(age.max(1)));
        let conn = Connection::new_server(
            self.config.connection.clone(),
            now,
            remote,
            server_cid,
            client_cid,
            params,
            rtt,
        );
        let h = self.insert(conn);
        self.accept_queue.push_back(h);
        self.stats.accepted += 1;
    }

    /// Next datagram to send: stateless replies first, then connections in
    /// round-robin order.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.transmit(now, buf, None)
    }

    /// [`Endpoint::poll_transmit`] with a DATA payload pushed onto `body` as
    /// shared slices of the send buffer instead of copied into `head`
    /// ([`Connection::poll_transmit_parts`]).
    pub fn poll_transmit_parts(
        &mut self,
        now: Instant,
        head: &mut Vec<u8>,
        body: &mut Vec<Bytes>,
    ) -> Option<Transmit> {
        self.transmit(now, head, Some(body))
    }

    fn transmit(
        &mut self,
        now: Instant,
        buf: &mut Vec<u8>,
        mut body: Option<&mut Vec<Bytes>>,
    ) -> Option<Transmit> {
        if let Some((dest, data)) = self.stateless.pop_front() {
            buf.clear();
            buf.extend_from_slice(&data);
            return Some(Transmit {
                destination: dest,
                size: buf.len(),
            });
        }
        // Round-robin over the connections that may send, from the one
        // after the one served last, without allocating: each step looks
        // up the next key.
        let mut cursor = self.rr_after;
        for _ in 0..self.tx_ready.len() {
            let next = match cursor {
                Some(c) => self
                    .tx_ready
                    .range((Excluded(c), Unbounded))
                    .next()
                    .or_else(|| self.tx_ready.first()),
                None => self.tx_ready.first(),
            };
            let Some(&h) = next else {
                break;
            };
            cursor = Some(h);
            let Some(c) = self.conns.get_mut(&h) else {
                self.tx_ready.remove(&h);
                continue;
            };
            let sent = match body.as_deref_mut() {
                Some(b) => c.poll_transmit_parts(now, buf, b),
                None => c.poll_transmit(now, buf),
            };
            // A closed connection whose last packet (its RST) just left has
            // nothing more to do and no timer to come back for: forgotten
            // now, or nothing would ever forget it.
            let done = c.is_drained() && !c.has_events();
            self.retime.insert(h);
            match sent {
                Some(t) => {
                    if done {
                        self.forget(h);
                    } else {
                        self.ev_ready.insert(h);
                    }
                    self.rr_after = Some(h);
                    return Some(t);
                }
                None => {
                    self.tx_ready.remove(&h);
                }
            }
        }
        None
    }

    /// Earliest timer over all connections (`now` is fine if replies wait).
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        if !self.stateless.is_empty() {
            return Some(self.epoch);
        }
        for h in std::mem::take(&mut self.retime) {
            match self.conns.get(&h).and_then(|c| c.poll_timeout()) {
                Some(t) => {
                    if self.deadlines.insert(h, t) != Some(t) {
                        self.timers.push(Reverse((t, h)));
                    }
                }
                None => {
                    self.deadlines.remove(&h);
                }
            }
        }
        while let Some(&Reverse((t, h))) = self.timers.peek() {
            if self.deadlines.get(&h) == Some(&t) {
                return Some(t);
            }
            self.timers.pop();
        }
        None
    }

    /// Run every connection's expired timers and forget drained ones.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.poll_timeout(); // brings the heap up to date
        while let Some(&Reverse((t, h))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if self.deadlines.get(&h) != Some(&t) {
                continue;
            }
            self.deadlines.remove(&h);
            if let Some(c) = self.conns.get_mut(&h) {
                c.handle_timeout(now);
                self.touch(h);
            }
        }
        self.reap();
    }

    /// Forgets the touched connections that are drained with no events
    /// left.
    fn reap(&mut self) {
        let dead: Vec<ConnectionHandle> = self
            .ev_ready
            .iter()
            .filter(|h| {
                self.conns
                    .get(h)
                    .is_none_or(|c| c.is_drained() && !c.has_events())
            })
            .copied()
            .collect();
        for h in dead {
            self.forget(h);
        }
    }

    /// Next application event from any connection. Connections that are
    /// closed, drained and have no events left are forgotten here (and in
    /// `handle_timeout`): a closed connection has no timer to wake it.
    pub fn poll_event(&mut self) -> Option<(ConnectionHandle, Event)> {
        while let Some(&h) = self.ev_ready.first() {
            let Some(c) = self.conns.get_mut(&h) else {
                self.ev_ready.remove(&h);
                continue;
            };
            if let Some(e) = c.poll_event() {
                return Some((h, e));
            }
            if c.is_drained() {
                self.forget(h);
            } else {
                self.ev_ready.remove(&h);
            }
        }
        None
    }

    /// Next newly accepted server connection.
    pub fn accept(&mut self) -> Option<ConnectionHandle> {
        self.accept_queue.pop_front()
    }

    /// A connection by handle.
    pub fn connection(&self, h: ConnectionHandle) -> Option<&Connection> {
        self.conns.get(&h).map(|c| &**c)
    }

    /// A connection by handle, mutable (for `write`, `read`, `close`, ...).
    /// (The connection counts as touched: whatever the caller does to it
    /// is seen by the next `poll_*`.)
    pub fn connection_mut(&mut self, h: ConnectionHandle) -> Option<&mut Connection> {
        if !self.conns.contains_key(&h) {
            return None;
        }
        self.touch(h);
        self.conns.get_mut(&h).map(|c| &mut **c)
    }

    /// Connections held (including those lingering after close).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Counters.
    pub fn stats(&self) -> EndpointStats {
        EndpointStats {
            cookie_rotations: self.keys.as_ref().map_or(0, |k| k.rotations()),
            ..self.stats
        }
    }

    /// Whether the cookie rotation wants fresh random bytes for its next
    /// secret (a server endpoint with rotation on, once after each rotation).
    pub fn wants_cookie_secret(&self) -> bool {
        self.keys.as_ref().is_some_and(|k| k.wants_secret())
    }

    /// Hand in 32 bytes from the OS's random source for the next cookie
    /// secret. Ignored by a client endpoint.
    pub fn supply_cookie_secret(&mut self, fresh: [u8; 32]) {
        if let Some(k) = self.keys.as_deref_mut() {
            k.supply_secret(fresh);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fillp::connection::{CloseReason, Event};
    use crate::fillp::sim::{LinkConfig, Pair, SimRng};
    use crate::fillp::wire::RateMode;

    fn server_cfg() -> EndpointConfig {
        EndpointConfig {
            server: true,
            cookie_secret: [1; 32],
            ..EndpointConfig::default()
        }
    }

    fn init(cid: u32) -> Vec<u8> {
        let mut b = Vec::new();
        Repr {
            dst_cid: 0,
            body: Body::Init {
                client_cid: cid,
                params: HsParams {
                    mtu: 1400,
                    window: 1 << 20,
                    mode: RateMode::Bbr,
                },
                timestamp: 0,
            },
        }
        .emit(&mut b);
        b
    }

    #[test]
    fn discovery_is_answered_by_listeners_only_and_never_amplified() {
        let t0 = Instant::now();
        let peer: SocketAddr = "10.0.0.9:4000".parse().unwrap();
        let offer = vec![
            Entry {
                protocol: "fillp".into(),
                port: 9000,
            },
            Entry {
                protocol: "mptcp".into(),
                port: 9000,
            },
        ];
        let mut query = Vec::new();
        discovery::emit_query(&[5; discovery::NONCE_LEN], &mut query);
        let mut buf = Vec::new();
        // A client endpoint, and a server without an offer, stay silent.
        for cfg in [EndpointConfig::default(), server_cfg()] {
            let mut ep = Endpoint::new(cfg, t0, 1);
            ep.handle_datagram(t0, peer, &query);
            assert!(ep.poll_transmit(t0, &mut buf).is_none());
        }
        let mut ep = Endpoint::new(server_cfg(), t0, 1);
        ep.set_offer(Some(offer.clone()));
        ep.handle_datagram(t0, peer, &query);
        let t = ep.poll_transmit(t0, &mut buf).expect("an offer");
        assert_eq!(t.destination, peer);
        assert!(buf.len() <= query.len());
        assert_eq!(
            discovery::parse(&buf),
            Ok(Discovery::Offer {
                nonce: [5; discovery::NONCE_LEN],
                entries: offer
            })
        );
        // A short query gets nothing: it is not a query.
        ep.handle_datagram(t0, peer, &query[..40]);
        assert!(ep.poll_transmit(t0, &mut buf).is_none());
        let st = ep.stats();
        assert_eq!(
            (st.discovery_queries, st.discovery_answers, st.malformed),
            (1, 1, 1)
        );
    }

    fn reset_to(ep: &mut Endpoint, now: Instant) -> Option<(SocketAddr, u32)> {
        let mut buf = Vec::new();
        let t = ep.poll_transmit(now, &mut buf)?;
        let r = Repr::parse_bytes(&buf).ok()?;
        matches!(r.body, Body::Reset).then_some((t.destination, r.dst_cid))
    }

    #[test]
    fn a_full_server_resets_a_valid_conn_req() {
        // Two cookies minted while there was room; the second CONN_REQ
        // finds the last place taken.
        let t0 = Instant::now();
        let cfg = EndpointConfig {
            max_connections: 1,
            ..server_cfg()
        };
        let mut ep = Endpoint::new(cfg, t0, 1);
        let alice: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let bob: SocketAddr = "10.0.0.2:1".parse().unwrap();
        let ma = cookie_at(&mut ep, t0, alice, 7);
        let mb = cookie_at(&mut ep, t0, bob, 8);
        ep.handle_datagram(t0, alice, &conn_req(7, &ma));
        ep.handle_datagram(t0, bob, &conn_req(8, &mb));
        assert_eq!((ep.connection_count(), ep.stats().refused), (1, 1));
        assert_eq!(reset_to(&mut ep, t0), Some((bob, 8)));
    }

    #[test]
    fn a_full_server_answers_an_init_with_a_reset() {
        let t0 = Instant::now();
        let cfg = EndpointConfig {
            max_connections: 0,
            ..server_cfg()
        };
        let mut ep = Endpoint::new(cfg, t0, 1);
        let alice: SocketAddr = "10.0.0.1:1".parse().unwrap();
        ep.handle_datagram(t0, alice, &init(7));
        assert_eq!((ep.stats().cookies_sent, ep.stats().refused), (0, 1));
        assert_eq!(reset_to(&mut ep, t0), Some((alice, 7)));
    }

    #[test]
    fn init_flood_allocates_nothing() {
        let t0 = Instant::now();
        let mut ep = Endpoint::new(server_cfg(), t0, 1);
        let mut buf = Vec::new();
        for i in 0..10_000u32 {
            let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 1000));
            ep.handle_datagram(t0, addr, &init(i + 1));
            // The driver drains replies as it goes; the queue stays bounded either way.
            if i % 2 == 0 {
                while ep.poll_transmit(t0, &mut buf).is_some() {}
            }
        }
        assert_eq!(ep.connection_count(), 0);
        assert_eq!(ep.stats().inits, 10_000);
        assert!(ep.stateless.len() <= ep.config.max_stateless_queue);
        assert_eq!(
            ep.stats().cookies_sent + ep.stats().stateless_dropped,
            10_000
        );
    }

    #[test]
    fn cookie_must_match_address_and_be_fresh() {
        let t0 = Instant::now();
        let mut ep = Endpoint::new(server_cfg(), t0, 1);
        let alice: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let mallory: SocketAddr = "10.0.0.66:1".parse().unwrap();
        let m = cookie_at(&mut ep, t0, alice, 7);
        let req = |mac: [u8; 16]| conn_req(7, &Minted { mac, ..m });
        let mac = m.mac;
        // Replayed from another address: refused.
        ep.handle_datagram(t0, mallory, &req(mac));
        let mut bad = mac;
        bad[0] ^= 1;
        ep.handle_datagram(t0, alice, &req(bad));
        assert_eq!(ep.stats().bad_cookies, 2);
        // Too old.
        ep.handle_datagram(
            t0 + COOKIE_LIFETIME + Duration::from_secs(1),
            alice,
            &req(mac),
        );
        assert_eq!(ep.stats().stale_cookies, 1);
        assert_eq!(ep.connection_count(), 0);
        // Good.
        ep.handle_datagram(t0 + Duration::from_millis(5), alice, &req(mac));
        assert_eq!(ep.connection_count(), 1);
        let h = ep.accept().unwrap();
        assert_eq!(ep.poll_event(), Some((h, Event::Connected)));
        // Unknown connection IDs and garbage are counted and ignored.
        let mut ka = Vec::new();
        Repr {
            dst_cid: 12345,
            body: Body::Keepalive,
        }
        .emit(&mut ka);
        ep.handle_datagram(t0, alice, &ka);
        ep.handle_datagram(t0, alice, &[1, 2, 3]);
        assert_eq!(ep.stats().unknown_cid, 1);
        assert_eq!(ep.stats().malformed, 1);
    }

    /// What a COOKIE carries back to the client.
    #[derive(Clone, Copy)]
    struct Minted {
        server_cid: u32,
        params: HsParams,
        cookie_time: u32,
        mac: [u8; 16],
    }

    /// Send an INIT for `cid` from `from` at `t` and take the COOKIE.
    fn cookie_at(ep: &mut Endpoint, t: Instant, from: SocketAddr, cid: u32) -> Minted {
        ep.handle_datagram(t, from, &init(cid));
        let mut buf = Vec::new();
        assert!(ep.poll_transmit(t, &mut buf).is_some());
        match Repr::parse_bytes(&buf) {
            Ok(Repr {
                body:
                    Body::Cookie {
                        server_cid,
                        params,
                        cookie_time,
                        mac,
                        ..
                    },
                ..
            }) => Minted {
                server_cid,
                params: HsParams {
                    window: 1 << 20,
                    ..params
                },
                cookie_time,
                mac,
            },
            other => panic!("no cookie: {other:?}"),
        }
    }

    fn conn_req(cid: u32, m: &Minted) -> Vec<u8> {
        let mut b = Vec::new();
        Repr {
            dst_cid: m.server_cid,
            body: Body::ConnReq {
                client_cid: cid,
                params: m.params,
                cookie_time: m.cookie_time,
                mac: m.mac,
            },
        }
        .emit(&mut b);
        b
    }

    #[test]
    fn cookie_survives_one_rotation_not_two() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let alice: SocketAddr = "10.0.0.1:1".parse().unwrap();
        // Default period (60 s): minted 1 ms before the rotation, returned
        // 2 s after it.
        let mut ep = Endpoint::new(server_cfg(), t0, 1);
        let m = cookie_at(&mut ep, t0 + COOKIE_ROTATION - ms(1), alice, 7);
        ep.handle_datagram(t0 + COOKIE_ROTATION + ms(2_000), alice, &conn_req(7, &m));
        assert_eq!(ep.connection_count(), 1);
        assert_eq!(ep.stats().cookie_rotations, 1);

        // A 4 s period, under the 10 s lifetime, so that only the rotation
        // can refuse a cookie 4.2 s old.
        let cfg = EndpointConfig {
            cookie_rotation: Some(ms(4_000)),
            ..server_cfg()
        };
        let mut ep = Endpoint::new(cfg, t0, 1);
        let a = cookie_at(&mut ep, t0 + ms(3_900), alice, 8);
        let b = cookie_at(&mut ep, t0 + ms(3_950), alice, 9);
        // One rotation later: good.
        ep.handle_datagram(t0 + ms(4_100), alice, &conn_req(8, &a));
        assert_eq!(ep.stats().accepted, 1);
        // Two rotations after minting: refused as stale, no connection.
        ep.handle_datagram(t0 + ms(8_100), alice, &conn_req(9, &b));
        assert_eq!(ep.stats().stale_cookies, 1);
        assert_eq!(ep.stats().accepted, 1);
        assert_eq!(ep.stats().cookie_rotations, 2);
        // A forged MAC in the current epoch: bad, not stale.
        let mut f = cookie_at(&mut ep, t0 + ms(8_200), alice, 10);
        f.mac[15] ^= 1;
        ep.handle_datagram(t0 + ms(8_300), alice, &conn_req(10, &f));
        // A forged cookie claiming a mint time in the future: bad.
        f.cookie_time = 9_000;
        ep.handle_datagram(t0 + ms(8_300), alice, &conn_req(10, &f));
        assert_eq!(ep.stats().bad_cookies, 2);
        assert_eq!(ep.stats().stale_cookies, 1);
        assert_eq!(ep.connection_count(), 1);
    }

    #[test]
    fn init_flood_across_rotations_allocates_nothing() {
        let t0 = Instant::now();
        let period = Duration::from_secs(1);
        let cfg = EndpointConfig {
            cookie_rotation: Some(period),
            ..server_cfg()
        };
        let mut ep = Endpoint::new(cfg, t0, 1);
        let mut buf = Vec::new();
        let mut supplied = 0;
        for i in 0..5_000u32 {
            // 1 ms apart: five rotations over the flood.
            let t = t0 + Duration::from_millis(u64::from(i));
            let addr = SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 1000));
            ep.handle_datagram(t, addr, &init(i + 1));
            if i % 3 == 0 {
                while ep.poll_transmit(t, &mut buf).is_some() {}
            }
            // What the driver does each turn.
            if ep.wants_cookie_secret() {
                ep.supply_cookie_secret([i as u8; 32]);
                supplied += 1;
            }
        }
        assert_eq!(ep.stats().cookie_rotations, 4);
        assert_eq!(supplied, 5, "one at start, one after each rotation");
        assert_eq!(ep.connection_count(), 0);
        assert!(ep.by_cid.is_empty() && ep.accept_queue.is_empty());
        assert!(ep.stateless.len() <= ep.config.max_stateless_queue);
        // A client endpoint has no keys and asks for nothing.
        let client = Endpoint::new(EndpointConfig::default(), t0, 1);
        assert!(client.keys.is_none() && !client.wants_cookie_secret());
    }

    /// A client and a server endpoint over an ideal 10 ms-RTT link, with
    /// one connection established.
    fn connected_pair(seed: u64) -> (Pair, ConnectionHandle, ConnectionHandle) {
        let link = LinkConfig::ideal(Duration::from_millis(5));
        let mut p = Pair::new(seed, EndpointConfig::default(), server_cfg(), link, link);
        let (ch, sh) = p.connect(1000).unwrap();
        (p, ch, sh)
    }

    #[test]
    fn idle_connection_memory() {
        let (mut p, ch, sh) = connected_pair(3);
        // A little traffic, then idle.
        p.client
            .connection_mut(ch)
            .unwrap()
            .write(&[0; 5000])
            .unwrap();
        let _ = p.run_until(10_000, Duration::from_secs(60), |p| {
            p.elapsed() > Duration::from_secs(2)
        });
        let mut b = [0u8; 8192];
        assert_eq!(p.server.connection_mut(sh).unwrap().read(&mut b), Ok(5000));
        // Past the first keepalive (5 s), which gives idle buffers back.
        let _ = p.run_until(10_000, Duration::from_secs(60), |p| {
            p.elapsed() > Duration::from_secs(8)
        });
        for c in [
            p.client.connection(ch).unwrap(),
            p.server.connection(sh).unwrap(),
        ] {
            let total = std::mem::size_of::<Connection>() + c.heap_bytes();
            eprintln!(
                "idle connection: size_of {} + heap ~{} = {} bytes",
                std::mem::size_of::<Connection>(),
                c.heap_bytes(),
                total
            );
            assert!(total <= 4 * 1024, "{total}");
        }
    }

    #[test]
    fn reset_and_idle_timeout() {
        let mk = || {
            Pair::new(
                4,
                EndpointConfig::default(),
                server_cfg(),
                LinkConfig::ideal(Duration::from_millis(5)),
                LinkConfig::ideal(Duration::from_millis(5)),
            )
        };
        let mut p = mk();
        let (ch, sh) = p.connect(1000).unwrap();
        p.client.connection_mut(ch).unwrap().reset();
        let mut seen = None;
        p.run_until(1000, Duration::from_secs(5), |p| {
            // One event per step: an empty poll would already reap it.
            if let Some((h, e)) = p.server.poll_event() {
                if h == sh {
                    if let Event::Closed { reason } = e {
                        seen = Some(reason);
                    }
                }
            }
            seen.is_some()
        })
        .unwrap();
        assert_eq!(seen, Some(CloseReason::PeerReset));

        assert_eq!(
            p.server.connection_mut(sh).map(|c| c.read(&mut [0; 4])),
            Some(Err(crate::fillp::connection::ReadError::Reset))
        );
        // Both sides forget the connection once its events are taken.
        while p.client.poll_event().is_some() {}
        while p.server.poll_event().is_some() {}
        assert_eq!(p.client.connection_count(), 0);
        assert_eq!(p.server.connection_count(), 0);

        // Cut the path: both sides time out, keepalives notwithstanding.
        let mut p = mk();
        let (ch, _sh) = p.connect(1000).unwrap();
        p.c2s = crate::fillp::sim::Link::new(
            LinkConfig {
                loss: crate::fillp::sim::Loss::Bernoulli(1.0),
                ..LinkConfig::ideal(Duration::from_millis(5))
            },
            1,
        );
        let mut reason = None;
        p.run_until(100_000, Duration::from_secs(120), |p| {
            while let Some((h, e)) = p.client.poll_event() {
                if let (true, Event::Closed { reason: r }) = (h == ch, e) {
                    reason = Some(r);
                }
            }
            reason.is_some()
        })
        .unwrap();
        assert_eq!(reason, Some(CloseReason::IdleTimeout));
        // Keepalives alone kept nothing alive one way: 30 s default.
        assert!(p.elapsed() >= Duration::from_secs(30));
    }

    /// A driver takes a connection's events before it transmits: a reset
    /// connection whose `Closed` event went first is forgotten when its RST
    /// leaves, with no later call to notice it (it has no timer). Before,
    /// every such connection stayed for good, with its UDP socket.
    #[test]
    fn a_reset_connection_goes_with_its_rst() {
        let (mut p, ch, _sh) = connected_pair(5);
        while p.client.poll_event().is_some() {}
        p.client.connection_mut(ch).unwrap().reset();
        assert!(matches!(
            p.client.poll_event(),
            Some((h, Event::Closed { reason: CloseReason::LocalReset })) if h == ch
        ));
        assert!(p.client.poll_event().is_none());
        assert_eq!(p.client.connection_count(), 1, "the RST has not left");
        let mut buf = Vec::new();
        let t = p.client.poll_transmit(p.now, &mut buf).expect("the RST");
        assert_eq!(
            buf.get(1),
            Some(&(crate::fillp::wire::PacketType::Reset as u8))
        );
        assert!(t.size > 0);
        assert_eq!(p.client.connection_count(), 0);
    }

    #[test]
    fn server_can_force_mode_and_clamp_mtu() {
        let mut client = EndpointConfig::default();
        client.connection.mode = RateMode::Fillp;
        client.connection.mtu = 1200;
        let mut server = server_cfg();
        server.connection.force_mode = Some(RateMode::Fixed);
        let mut p = Pair::new(
            5,
            client,
            server,
            LinkConfig::ideal(Duration::from_millis(5)),
            LinkConfig::ideal(Duration::from_millis(5)),
        );
        let (ch, sh) = p.connect(1000).unwrap();
        for c in [
            p.client.connection(ch).unwrap(),
            p.server.connection(sh).unwrap(),
        ] {
            assert_eq!(c.mode(), RateMode::Fixed);
            assert_eq!(c.mtu(), 1200);
        }
    }

    /// A finished connection lingers (draining) for the idle timeout; it
    /// must not keep the receive queue it grew during the transfer.
    #[test]
    fn finished_connection_gives_its_buffers_back() {
        let (mut p, ch, sh) = connected_pair(4);
        let data = vec![3u8; 2 << 20];
        let (mut sent, mut got) = (0, 0);
        let mut b = vec![0u8; 1 << 20];
        let r = p.run_until(2_000_000, Duration::from_secs(60), |p| {
            let c = p.client.connection_mut(ch).unwrap();
            if sent < data.len() {
                sent += c.write(&data[sent..]).unwrap_or(0);
                if sent == data.len() {
                    c.shutdown_write();
                }
            }
            while let Ok(n) = c.read(&mut b) {
                if n == 0 {
                    break;
                }
            }
            // The server reads only once everything has arrived, so its
            // receive queue grows to the whole 2 MiB first.
            let late = p.elapsed() > Duration::from_secs(2);
            let s = p.server.connection_mut(sh).unwrap();
            while let Some(Ok(n)) = late.then(|| s.read(&mut b)) {
                if n == 0 {
                    s.shutdown_write();
                    break;
                }
                got += n;
            }
            p.server.connection(sh).is_some_and(|c| c.is_closed())
                && p.client.connection(ch).is_some_and(|c| c.is_closed())
        });
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(got, data.len());
        for c in [
            p.client.connection(ch).unwrap(),
            p.server.connection(sh).unwrap(),
        ] {
            // What is left is bookkeeping (the pipe's capacity), not the
            // megabytes of data buffers the transfer used.
            eprintln!("finished connection: heap ~{} bytes", c.heap_bytes());
            assert!(c.heap_bytes() <= 128 * 1024, "{}", c.heap_bytes());
        }
    }

    #[test]
    fn half_close_and_flow_control() {
        // The client writes 1 MB against a 64 KiB window and a server that
        // reads slowly, then half-closes; the server answers after EOF.
        let mut server = server_cfg();
        server.connection.recv_window = 64 * 1024;
        let mut p = Pair::new(
            6,
            EndpointConfig::default(),
            server,
            LinkConfig::ideal(Duration::from_millis(10)),
            LinkConfig::ideal(Duration::from_millis(10)),
        );
        let (ch, sh) = p.connect(1000).unwrap();
        let mut rng = SimRng::new(1);
        let data: Vec<u8> = (0..1_000_000).map(|_| rng.next_u64() as u8).collect();
        let mut sent = 0;
        let mut got = Vec::new();
        let mut answered = false;
        let mut reply = Vec::new();
        let mut steps = 0u64;
        p.run_until(2_000_000, Duration::from_secs(300), |p| {
            steps += 1;
            let c = p.client.connection_mut(ch).unwrap();
            if sent < data.len() {
                if let Ok(n) = c.write(&data[sent..]) {
                    sent += n;
                }
                if sent == data.len() {
                    c.shutdown_write();
                    assert_eq!(
                        c.write(b"x"),
                        Err(crate::fillp::connection::WriteError::Finished)
                    );
                }
            }
            let mut b = [0u8; 4096];
            while let Ok(n) = c.read(&mut b) {
                if n == 0 {
                    return true;
                }
                reply.extend_from_slice(&b[..n]);
            }
            let s = p.server.connection_mut(sh).unwrap();
            // Read slowly: one small chunk every other step, so the window
            // closes and has to be reopened by window updates.
            if steps.is_multiple_of(2) {
                match s.read(&mut b[..2048]) {
                    Ok(0) if !answered => {
                        s.write(b"done").unwrap();
                        s.shutdown_write();
                        answered = true;
                    }
                    Ok(n) => got.extend_from_slice(&b[..n]),
                    Err(_) => {}
                }
            }
            false
        })
        .unwrap();
        assert!(got == data);
        assert_eq!(reply, b"done");
    }
}
