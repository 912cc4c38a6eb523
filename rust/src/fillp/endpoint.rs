//! Many connections over one UDP socket: demultiplexing by connection ID and
//! the server's stateless cookie handshake.
//!
//! An INIT costs the server one MAC computation and one queued COOKIE, and no
//! per-peer state; only a CONN_REQ carrying a valid, fresh cookie for its own
//! source address creates a [`Connection`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::connection::{Config, Connection, Event, Transmit};
use super::cookie::{CookieFields, CookieKey};
use super::wire::{Body, HsParams, Repr};

/// Cookies older than this are refused.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(10);

/// Endpoint settings.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Settings for every connection.
    pub connection: Config,
    /// Accept incoming connections.
    pub server: bool,
    /// Secret for the cookie MAC: fill from the OS's random source.
    pub cookie_secret: [u8; 32],
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
    /// CONN_REQs with a bad MAC.
    pub bad_cookies: u64,
    /// CONN_REQs with an expired cookie.
    pub stale_cookies: u64,
    /// Connections accepted.
    pub accepted: u64,
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
    key: CookieKey,
    epoch: Instant,
    rng: Rng,
    next_handle: u64,
    conns: BTreeMap<ConnectionHandle, Connection>,
    by_cid: HashMap<u32, ConnectionHandle>,
    stateless: VecDeque<(SocketAddr, Vec<u8>)>,
    accept_queue: VecDeque<ConnectionHandle>,
    rr_after: Option<ConnectionHandle>,
    stats: EndpointStats,
}

impl Endpoint {
    /// A new endpoint; `seed` drives connection-ID choice (use OS randomness
    /// outside tests).
    pub fn new(config: EndpointConfig, now: Instant, seed: u64) -> Self {
        Endpoint {
            key: CookieKey::new(&config.cookie_secret),
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
        }
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
        self.conns.insert(h, conn);
        h
    }

    /// Start a connection to `remote`.
    pub fn connect(
        &mut self,
        now: Instant,
        remote: SocketAddr,
    ) -> Result<ConnectionHandle, ConnectError> {
        if self.conns.len() >= self.config.max_connections {
            return Err(ConnectError::TooManyConnections);
        }
        let cid = self.fresh_cid();
        let conn = Connection::new_client(self.config.connection.clone(), now, remote, cid);
        Ok(self.insert(conn))
    }

    /// Process one datagram from `remote`. Never panics; invalid input only
    /// bumps a counter.
    pub fn handle_datagram(&mut self, now: Instant, remote: SocketAddr, data: &[u8]) {
        self.stats.datagrams += 1;
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
            conn.handle_repr(now, data.len(), repr);
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

    fn now_ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch).as_millis() as u32
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
        if !self.config.server {
            return;
        }
        if self.stateless.len() >= self.config.max_stateless_queue {
            self.stats.stateless_dropped += 1;
            return;
        }
        let agreed = self.agreed(params);
        // A CID not in use now; uniqueness is re-checked when the cookie returns.
        let server_cid = self.fresh_cid();
        let time_ms = self.now_ms(now);
        let mac = self.key.mac(&CookieFields {
            remote,
            client_cid,
            server_cid,
            params: agreed,
            time_ms,
        });
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
        if !self.config.server {
            self.stats.unknown_cid += 1;
            return;
        }
        let fields = CookieFields {
            remote,
            client_cid,
            server_cid,
            params,
            time_ms: cookie_time,
        };
        if !self.key.verify(&fields, &mac) {
            self.stats.bad_cookies += 1;
            return;
        }
        let age = self.now_ms(now).wrapping_sub(cookie_time);
        if u128::from(age) > COOKIE_LIFETIME.as_millis() {
            self.stats.stale_cookies += 1;
            return;
        }
        if self.conns.len() >= self.config.max_connections {
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
        if let Some((dest, data)) = self.stateless.pop_front() {
            buf.clear();
            buf.extend_from_slice(&data);
            return Some(Transmit {
                destination: dest,
                size: buf.len(),
            });
        }
        let start = self.rr_after;
        let order: Vec<ConnectionHandle> = match start {
            Some(s) => self
                .conns
                .range(s..)
                .skip(1)
                .chain(self.conns.range(..=s))
                .map(|(h, _)| *h)
                .collect(),
            None => self.conns.keys().copied().collect(),
        };
        for h in order {
            if let Some(t) = self
                .conns
                .get_mut(&h)
                .and_then(|c| c.poll_transmit(now, buf))
            {
                self.rr_after = Some(h);
                return Some(t);
            }
        }
        None
    }

    /// Earliest timer over all connections (`now` is fine if replies wait).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.stateless.is_empty() {
            return Some(self.epoch);
        }
        self.conns.values().filter_map(|c| c.poll_timeout()).min()
    }

    /// Run every connection's expired timers and forget drained ones.
    pub fn handle_timeout(&mut self, now: Instant) {
        for c in self.conns.values_mut() {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
        self.reap();
    }

    fn reap(&mut self) {
        let dead: Vec<ConnectionHandle> = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_drained() && !c.has_events())
            .map(|(h, _)| *h)
            .collect();
        for h in dead {
            if let Some(c) = self.conns.remove(&h) {
                self.by_cid.remove(&c.local_cid());
            }
        }
    }

    /// Next application event from any connection.
    pub fn poll_event(&mut self) -> Option<(ConnectionHandle, Event)> {
        for (h, c) in self.conns.iter_mut() {
            if let Some(e) = c.poll_event() {
                return Some((*h, e));
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
        self.conns.get(&h)
    }

    /// A connection by handle, mutable (for `write`, `read`, `close`, ...).
    pub fn connection_mut(&mut self, h: ConnectionHandle) -> Option<&mut Connection> {
        self.conns.get_mut(&h)
    }

    /// Connections held (including those lingering after close).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Counters.
    pub fn stats(&self) -> EndpointStats {
        self.stats
    }
}
