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

use super::connection::{Config, Connection, Event, Resumption, Transmit};
use super::cookie::{CookieCheck, CookieFields, CookieKeys};
use super::discovery::{self, Discovery, Entry};
use super::wire::{Body, HsParams, Repr, Ticket, CONN_REQ_LEN};

/// Cookies older than this are refused.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(10);

/// Resumption tickets older than this are refused (and, like cookies, any
/// minted two key rotations ago). A client should stop using one well
/// before: a refused ticket costs it a round trip.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(60);

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
    /// A server gives each client a resumption ticket in its CONN_ACK and
    /// takes tickets in CONN_REQ (see [`super::connection`]'s handshake);
    /// off, it gives none and answers a ticket with RST.
    pub resumption: bool,
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
            resumption: true,
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
    /// Connections accepted on a resumption ticket (no INIT before them).
    pub resumed: u64,
    /// CONN_REQs with a ticket that has a bad MAC or came from another
    /// address (answered with RST: the client starts over with an INIT).
    pub bad_tickets: u64,
    /// CONN_REQs with an expired ticket, or one refused for another reason
    /// than its MAC (resumption off, parameters this server would not agree
    /// to); answered with RST as well.
    pub stale_tickets: u64,
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

/// SplitMix64's finaliser: a cheap, well-spread 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
    /// Keys the connection IDs of resumed connections (see `resumed_cid`).
    cid_key: u64,
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
            cid_key: seed.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15,
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

    /// [`Endpoint::connect_with`], resuming with `r` from an earlier
    /// connection to the same server: the handshake starts with CONN_REQ
    /// and takes one round trip (two if the server refuses the ticket).
    pub fn connect_resumed(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        config: Config,
        r: &Resumption,
    ) -> Result<ConnectionHandle, ConnectError> {
        if self.conns.len() >= self.config.max_connections {
            return Err(ConnectError::TooManyConnections);
        }
        let cid = self.fresh_cid();
        let conn = Connection::new_resumed(config, now, remote, cid, r);
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
        if server_cid == 0 {
            let ticket = Ticket {
                time: cookie_time,
                mac,
            };
            return self.on_resume(now, remote, client_cid, params, ticket);
        }
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
        self.accept_conn(now, remote, server_cid, client_cid, params, Some(rtt));
    }

    /// A CONN_REQ with a resumption ticket: checked like a cookie (so still
    /// no state before it), then the connection is made with a connection
    /// ID derived from the request, so that a retransmitted CONN_REQ finds
    /// it. Anything that stops the resumption is answered with RST, which
    /// sends the client back to INIT; an RST is smaller than the CONN_REQ,
    /// so a spoofed one amplifies nothing.
    fn on_resume(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        client_cid: u32,
        params: HsParams,
        ticket: Ticket,
    ) {
        let now_ms = self.now_ms(now);
        let Some(keys) = self.keys.as_deref_mut() else {
            self.stats.unknown_cid += 1;
            return;
        };
        let lifetime = u64::try_from(TICKET_LIFETIME.as_millis()).unwrap_or(u64::MAX);
        let check = keys.check_ticket(now_ms, remote.ip(), &ticket, lifetime);
        let agreed = self.agreed(params);
        let ok = match check {
            CookieCheck::Forged => {
                self.stats.bad_tickets += 1;
                false
            }
            // The client must propose what this server would agree to now
            // (its CONN_ACK does not carry parameters).
            CookieCheck::Valid { .. } if self.config.resumption && agreed == params => true,
            _ => {
                self.stats.stale_tickets += 1;
                false
            }
        };
        let cid = self.resumed_cid(remote, client_cid, ticket.time);
        if ok {
            if let Some(&h) = self.by_cid.get(&cid) {
                // A retransmitted CONN_REQ (its CONN_ACK was lost): answer
                // again. Another connection with this ID: start over.
                let again = self
                    .conns
                    .get(&h)
                    .is_some_and(|c| c.remote() == remote && c.remote_cid() == client_cid);
                if let Some(c) = self.conns.get_mut(&h).filter(|_| again) {
                    let retry = Repr {
                        dst_cid: cid,
                        body: Body::ConnReq {
                            client_cid,
                            params,
                            cookie_time: ticket.time,
                            mac: ticket.mac,
                        },
                    };
                    c.handle_repr(now, CONN_REQ_LEN, retry, None);
                }
                if again {
                    self.touch(h);
                    return;
                }
            } else if !self.full() {
                self.stats.resumed += 1;
                self.accept_conn(now, remote, cid, client_cid, params, None);
                return;
            } else {
                self.stats.refused += 1;
            }
        }
        if self.stateless.len() < self.config.max_stateless_queue {
            self.queue_reset(remote, client_cid);
        }
    }

    /// The connection ID of a connection resumed by `client_cid` at
    /// `remote` with a ticket minted at `ticket_time`: the same for every
    /// retransmission of its CONN_REQ, unpredictable without `cid_key`,
    /// never 0.
    fn resumed_cid(&self, remote: SocketAddr, client_cid: u32, ticket_time: u32) -> u32 {
        let ip = match remote.ip() {
            std::net::IpAddr::V4(a) => u128::from(u32::from(a)),
            std::net::IpAddr::V6(a) => u128::from(a),
        };
        let mut h = self.cid_key;
        for word in [
            ip as u64,
            (ip >> 64) as u64,
            u64::from(remote.port()) << 32 | u64::from(client_cid),
            u64::from(ticket_time),
        ] {
            h = mix(h ^ word);
        }
        (h as u32).max(1)
    }

    /// Makes the server connection for a CONN_REQ the cookie or ticket
    /// vouched for, with its ticket for the client, and queues it for
    /// `accept`.
    fn accept_conn(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        server_cid: u32,
        client_cid: u32,
        params: HsParams,
        rtt: Option<Duration>,
    ) {
        let mut conn = Connection::new_server(
            self.config.connection.clone(),
            now,
            remote,
            server_cid,
            client_cid,
            params,
            rtt,
        );
        if self.config.resumption {
            let now_ms = self.now_ms(now);
            conn.set_ticket(
                self.keys
                    .as_deref_mut()
                    .map(|k| k.mint_ticket(now_ms, remote.ip())),
            );
        }
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
mod tests;
