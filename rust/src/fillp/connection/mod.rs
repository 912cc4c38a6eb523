//! The per-connection state machine.
//!
//! Inputs: [`Connection::handle_datagram`], [`Connection::handle_timeout`] and
//! the application calls ([`Connection::write`], [`Connection::read`],
//! [`Connection::shutdown_write`], [`Connection::close`], [`Connection::reset`]).
//! Outputs: [`Connection::poll_transmit`], [`Connection::poll_timeout`],
//! [`Connection::poll_event`]. Time is always passed in; nothing here reads a
//! clock or touches a socket.
//!
//! # Layout
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the [`Connection`] type, its constructors and accessors, the input and polling API |
//! | `config.rs` | [`Config`] |
//! | `stats.rs` | [`ConnectionStats`] and memory accounting |
//! | `stream.rs` | the application's `write` / `read` / close, send-buffer sizing and writer wake-ups |
//! | `handshake.rs` | the client's INIT / COOKIE / CONN_REQ exchange and early data |
//! | `receive.rs` | DATA in, the gap tracking behind NACKs, building PACK and NACK |
//! | `recovery.rs` | the peer's PACK and NACK: acknowledgements, loss marking, rate samples |
//! | `timers.rs` | RTO, tail-loss probe, keepalive, idle and drain timers |
//! | `transmit.rs` | choosing and building the next datagram: control, DATA, pacing |
//! | `testing.rs` | fixtures for the unit tests at the bottom of each file (tests only) |
//!
//! The state is grouped the same way: `Handshake`, `Sender` (send buffer,
//! window, controller, pacer), `Pipe` (packets in flight, delivery-rate
//! samples), `Receiver` and `Timers`, each declared in its file; what the
//! connection as a whole owns (identity, lifecycle, negotiated MTU and
//! mode, the RTT estimate both directions use, events, counters) stays on
//! [`Connection`].

mod config;
mod handshake;
mod receive;
mod recovery;
mod stats;
mod stream;
#[cfg(test)]
mod testing;
mod timers;
mod transmit;

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::cc::{self, CcConfig};
use super::rtt::RttEstimator;
use super::wire::{Body, HsParams, RateMode, Repr, MIN_MTU};

pub use config::Config;
use handshake::Handshake;
pub use handshake::Resumption;
use receive::Receiver;
use recovery::Pipe;
pub use stats::ConnectionStats;
use timers::Timers;
use transmit::Sender;

/// A datagram to send: `size` bytes in all, at the start of the caller's
/// buffer (followed, from [`Connection::poll_transmit_parts`], by the
/// payload pieces it pushed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub destination: SocketAddr,
    /// Length in bytes.
    pub size: usize,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides sent FIN and every byte was acknowledged and read.
    Finished,
    /// We called [`Connection::reset`].
    LocalReset,
    /// The peer sent RST.
    PeerReset,
    /// Nothing heard for the idle timeout.
    IdleTimeout,
    /// The handshake did not complete in time.
    HandshakeTimeout,
    /// The peer broke the protocol (e.g. changed the final size).
    ProtocolViolation,
}

/// Something the application should know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The handshake completed.
    Connected,
    /// Bytes (or EOF) can be read.
    Readable,
    /// Half the send buffer (less what loss holds back) is free again after
    /// a write that did not fit
    /// ([`WriteError::Blocked`] or a short count); for a client, also the
    /// moment it may send data (it has the server's cookie, see
    /// [`Connection::can_send`]).
    Writable,
    /// The peer finished its stream and every byte has arrived.
    Finished,
    /// The connection ended.
    Closed {
        /// Why.
        reason: CloseReason,
    },
}

/// Errors from [`Connection::write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteError {
    /// The send buffer is full; wait for [`Event::Writable`].
    Blocked,
    /// The write side was shut down.
    Finished,
    /// The connection is closed.
    Closed,
}

/// Errors from [`Connection::read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// Nothing to read yet; wait for [`Event::Readable`].
    Blocked,
    /// The peer reset the connection.
    Reset,
    /// The connection is closed locally.
    Closed,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
impl std::error::Error for WriteError {}
impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
impl std::error::Error for ReadError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Handshake,
    Established,
    /// Both directions finished; linger to answer retransmitted FINs.
    Draining,
    Closed,
}

/// A FillP connection.
pub struct Connection {
    role: Role,
    local_cid: u32,
    remote_cid: u32,
    remote: SocketAddr,
    config: Config,
    /// When the connection was created: zero of the microsecond timestamps
    /// we send and echo, and the start of the handshake timeout.
    epoch: Instant,
    state: State,
    close_reason: Option<CloseReason>,
    /// An RST is due (our reset, or a protocol violation).
    send_reset: bool,
    /// The application closed: what still arrives is discarded.
    local_close: bool,
    peer_reset: bool,
    /// Something may complete the close (our FIN acked, the peer's read):
    /// the next timer run checks.
    finish_pending: bool,
    mtu: u16,
    /// Largest datagram we send, when our own route carries less than the
    /// agreed `mtu` (see [`Connection::limit_datagram`]).
    datagram_cap: u16,
    mode: RateMode,
    /// The path's RTT, shared by both directions: the sender's RTO and
    /// pacing, the receiver's reordering delay.
    rtt: RttEstimator,
    hs: Handshake,
    tx: Sender,
    pipe: Pipe,
    rx: Receiver,
    timers: Timers,
    events: VecDeque<Event>,
    stats: ConnectionStats,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("role", &self.role)
            .field("local_cid", &self.local_cid)
            .field("remote_cid", &self.remote_cid)
            .field("remote", &self.remote)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn us_since(epoch: Instant, now: Instant) -> u32 {
    now.saturating_duration_since(epoch).as_micros() as u32
}

impl Connection {
    fn new(config: Config, now: Instant, remote: SocketAddr, role: Role, local_cid: u32) -> Self {
        let mut config = config;
        config.mtu = config.mtu.max(MIN_MTU);
        let cc_cfg = CcConfig {
            mode: config.mode,
            initial_rate: config.initial_rate,
            max_rate: config.max_rate,
            fixed_rate: config.fixed_rate,
            mtu: config.mtu,
        };
        Connection {
            role,
            local_cid,
            remote_cid: 0,
            remote,
            epoch: now,
            state: State::Handshake,
            close_reason: None,
            send_reset: false,
            local_close: false,
            peer_reset: false,
            finish_pending: false,
            mtu: config.mtu,
            datagram_cap: u16::MAX,
            mode: config.mode,
            rtt: RttEstimator::new(config.initial_rtt),
            hs: Handshake::new(now),
            tx: Sender::new(config.send_buffer, cc::build(&cc_cfg)),
            pipe: Pipe::new(now),
            rx: Receiver::new(config.recv_window, now),
            timers: Timers::new(now),
            events: VecDeque::new(),
            stats: ConnectionStats::default(),
            config,
        }
    }

    /// A client connection that will start the handshake on the first
    /// [`Connection::poll_transmit`]. `local_cid` must be non-zero and unique
    /// on the local endpoint.
    pub fn new_client(config: Config, now: Instant, remote: SocketAddr, local_cid: u32) -> Self {
        Self::new(config, now, remote, Role::Client, local_cid)
    }

    /// A server connection after a valid cookie (built by the endpoint).
    pub(crate) fn new_server(
        config: Config,
        now: Instant,
        remote: SocketAddr,
        local_cid: u32,
        remote_cid: u32,
        params: HsParams,
        handshake_rtt: Option<Duration>,
    ) -> Self {
        let mut config = config;
        config.mode = params.mode;
        let mut c = Self::new(config, now, remote, Role::Server, local_cid);
        c.remote_cid = remote_cid;
        c.mtu = params.mtu;
        c.tx.peer_limit = u64::from(params.window);
        if let Some(rtt) = handshake_rtt {
            c.rtt.update(rtt);
        }
        c.state = State::Established;
        c.hs.send_conn_ack = true;
        c.events.push_back(Event::Connected);
        c
    }

    /// Our connection ID (what the peer puts in `dst_cid`).
    pub fn local_cid(&self) -> u32 {
        self.local_cid
    }

    /// The peer's connection ID (0 until known).
    pub fn remote_cid(&self) -> u32 {
        self.remote_cid
    }

    /// The peer's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// The agreed rate-control mode.
    pub fn mode(&self) -> RateMode {
        self.mode
    }

    /// The agreed maximum datagram size.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Send datagrams of at most `size` bytes even if more was agreed: the
    /// agreed size is the client's route MTU, and a server whose own route
    /// back is smaller would otherwise have every datagram fragmented.
    /// Retransmissions keep their original size (at most the agreed one).
    pub fn limit_datagram(&mut self, size: u16) {
        self.datagram_cap = size.max(MIN_MTU);
    }

    /// The largest datagram we send: the agreed size, or less after
    /// [`Connection::limit_datagram`].
    fn send_mtu(&self) -> u16 {
        self.mtu.min(self.datagram_cap)
    }

    /// Handshake complete and not closed.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Established, or a client holding the server's cookie: what is
    /// written now is sent at once (behind the CONN_REQ while the handshake
    /// completes), so a driver may report the connect done.
    pub fn can_send(&self) -> bool {
        self.is_established() || (self.state == State::Handshake && self.hs.has_cookie())
    }

    /// Finished or closed, kept only to answer the peer's retransmissions
    /// (as TCP's TIME_WAIT): it holds no place against a connection limit.
    pub fn is_lingering(&self) -> bool {
        matches!(self.state, State::Draining | State::Closed)
    }

    /// Closed (possibly still lingering to answer retransmissions).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed | State::Draining)
    }

    /// Closed and done lingering: the endpoint may forget it.
    pub fn is_drained(&self) -> bool {
        self.state == State::Closed && !self.send_reset
    }

    /// Why it closed, once closed.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason
    }

    /// Drop the capacity of the receive, in-flight and event queues where
    /// they are empty (they grow again on demand).
    fn give_back_idle_memory(&mut self) {
        self.rx.buf.shrink_if_empty();
        self.pipe.shrink_if_empty();
        if self.events.is_empty() {
            self.events = VecDeque::new();
        }
    }

    /// Next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn enter_closed(&mut self, reason: CloseReason) {
        if self.close_reason.is_none() {
            self.close_reason = Some(reason);
            self.events.push_back(Event::Closed { reason });
        }
        self.state = State::Closed;
        self.timers.drain_until = None;
    }

    fn maybe_finish(&mut self, now: Instant) {
        self.finish_pending = false;
        if self.state != State::Established {
            return;
        }
        if self.local_close {
            self.rx.buf.discard();
        }
        if self.tx.buf.fin_acked() && self.rx.buf.at_eof() {
            self.state = State::Draining;
            // Everything was read: nothing to keep the receive queue for.
            self.rx.buf.shrink_if_empty();
            // Linger as long as the peer may still retry (its idle timeout,
            // restarted by each of its datagrams), so a peer whose FIN-ack
            // was lost still gets one. Buffers are empty by now.
            self.timers.drain_until = Some(now + self.config.idle_timeout);
            self.close_reason = Some(CloseReason::Finished);
            self.events.push_back(Event::Closed {
                reason: CloseReason::Finished,
            });
        }
    }

    /// Process one datagram addressed to this connection. Anything invalid is
    /// counted in [`ConnectionStats::dropped`] and otherwise ignored.
    pub fn handle_datagram(&mut self, now: Instant, data: &[u8]) {
        match Repr::parse_bytes(data) {
            Ok(r) if r.dst_cid == self.local_cid => self.handle_repr(now, data.len(), r, None),
            _ => self.stats.dropped += 1,
        }
    }

    /// Processes a parsed datagram of `len` bytes. `shared`, if given, is
    /// the datagram `r` was parsed from: a DATA payload is then kept as a
    /// slice of it instead of copied.
    pub(crate) fn handle_repr(
        &mut self,
        now: Instant,
        len: usize,
        r: Repr<'_>,
        shared: Option<&Bytes>,
    ) {
        if self.state == State::Closed {
            return;
        }
        let accepted = match r.body {
            Body::Cookie {
                server_cid,
                params,
                echo,
                cookie_time,
                mac,
            } => self.on_cookie(now, server_cid, params, echo, cookie_time, mac),
            Body::ConnAck { server_cid, ticket } => self.on_conn_ack(now, server_cid, ticket),
            Body::ConnReq { client_cid, .. } => self.on_conn_req(client_cid),
            Body::Data(d) => self.on_data(now, d, shared),
            Body::Pack(p) => self.on_pack(now, &p),
            Body::Nack(n) => self.on_nack(now, &n),
            Body::Keepalive => {
                if self.state == State::Established || self.state == State::Draining {
                    // Answer with a PACK: doubles as a window probe reply.
                    self.rx.pack_now = true;
                    // The peer has been silent for a keepalive interval (or
                    // probes a zero window, and then our queue is full): the
                    // flow paused. Needed here as well as in the timer,
                    // because the side that answers keepalives has its own
                    // timer reset by each one and may never see an old
                    // `last_rx` there.
                    self.give_back_idle_memory();
                    true
                } else {
                    false
                }
            }
            Body::Reset => {
                // A client still in its handshake takes one too: its server
                // is full. The CID it chose and the address it sent to vouch
                // for the RST, as the acknowledgment does for TCP's in
                // SYN-SENT.
                let refused = self.role == Role::Client && self.state == State::Handshake;
                if refused && self.resume_refused_by_reset(now) {
                    true
                } else if self.remote_cid != 0 || refused {
                    self.peer_reset = true;
                    self.enter_closed(CloseReason::PeerReset);
                    true
                } else {
                    false
                }
            }
            Body::Init { .. } => false,
        };
        if accepted {
            self.stats.packets_received += 1;
            self.stats.bytes_received += len as u64;
            self.timers.last_rx = now;
            if self.state == State::Draining {
                self.timers.drain_until = Some(now + self.config.idle_timeout);
            }
        } else {
            self.stats.dropped += 1;
        }
    }

    /// Write the next datagram into `buf` (cleared first). Order: handshake,
    /// CONN_ACK, RST, NACK, PACK, then DATA (retransmissions before new data,
    /// paced and capped by the in-flight limit and the peer's window), then
    /// KEEPALIVE.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.transmit(now, buf, None)
    }

    /// [`Connection::poll_transmit`] without copying a DATA payload: `head`
    /// gets the header and `body` the payload as shared slices of the send
    /// buffer (see [`super::byte_queue`]), to be sent as `head` followed by
    /// the pieces, `size` bytes in all. What the caller holds stays valid
    /// whatever the connection does next.
    pub fn poll_transmit_parts(
        &mut self,
        now: Instant,
        head: &mut Vec<u8>,
        body: &mut Vec<Bytes>,
    ) -> Option<Transmit> {
        self.transmit(now, head, Some(body))
    }

    #[doc(hidden)]
    /// Debug dump of the rate controller (for the simulator tools).
    pub fn controller_debug(&self) -> String {
        format!("{:?}", self.tx.cc)
    }

    /// Whether events are waiting.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The peer reset the connection.
    pub fn peer_reset(&self) -> bool {
        self.peer_reset
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn rst(dst: u32) -> Vec<u8> {
        emit(Repr {
            dst_cid: dst,
            body: Body::Reset,
        })
    }

    #[test]
    fn malformed_and_misaddressed_datagrams_are_dropped() {
        let clk = Clock::new();
        let mut s = server(Config::default(), clk.t0, 1 << 20);
        let good = data(SERVER_CID, 0, 0, b"abc", false, 0);
        let mut bad_len = good.clone();
        bad_len.push(0);
        let mut bad_version = good.clone();
        bad_version[0] = 2;
        let mut bad_dst = good.clone();
        bad_dst[4..8].copy_from_slice(&(SERVER_CID + 1).to_be_bytes());
        let init = emit(Repr {
            dst_cid: SERVER_CID,
            body: Body::Init {
                client_cid: CLIENT_CID,
                params: HsParams {
                    mtu: 1400,
                    window: 1,
                    mode: RateMode::Bbr,
                },
                timestamp: 0,
            },
        });
        for d in [&b"\x01"[..], &bad_len, &bad_version, &bad_dst, &init] {
            s.handle_datagram(clk.at(1), d);
        }
        let st = s.stats();
        assert_eq!(
            (st.dropped, st.packets_received, s.readable_bytes()),
            (5, 0, 0)
        );
        s.handle_datagram(clk.at(1), &good);
        let st = s.stats();
        assert_eq!((st.dropped, st.packets_received), (5, 1));
        assert_eq!(st.bytes_received, good.len() as u64);
        assert_eq!(s.readable_bytes(), 3);
    }

    #[test]
    fn a_peer_reset_closes_at_once() {
        let clk = Clock::new();
        let mut s = server(Config::default(), clk.t0, 1 << 20);
        events(&mut s);
        s.handle_datagram(clk.at(1), &rst(SERVER_CID));
        assert_eq!(
            events(&mut s),
            [Event::Closed {
                reason: CloseReason::PeerReset
            }]
        );
        assert!(s.is_drained() && s.peer_reset());
        assert_eq!(s.write(b"x"), Err(WriteError::Closed));
        assert!(drain(&mut s, clk.at(1)).is_empty());
        assert_eq!(s.poll_timeout(), None);
        // A client in its handshake is refused by one (a full server).
        let mut c = Connection::new_client(Config::default(), clk.t0, peer(), CLIENT_CID);
        c.handle_datagram(clk.at(1), &rst(CLIENT_CID));
        assert!(c.is_closed());
        assert_eq!(c.close_reason(), Some(CloseReason::PeerReset));
    }

    #[test]
    fn a_local_reset_sends_one_rst_then_is_forgotten() {
        let clk = Clock::new();
        let mut s = server(Config::default(), clk.t0, 1 << 20);
        s.reset();
        assert!(s.is_closed() && !s.is_drained());
        assert_eq!(s.poll_timeout(), Some(clk.t0));
        assert_eq!(drain(&mut s, clk.t0), [rst(CLIENT_CID)]);
        assert!(s.is_drained());
        assert_eq!(s.close_reason(), Some(CloseReason::LocalReset));
        // Only once, whatever comes.
        s.reset();
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, b"x", false, 0));
        assert!(drain(&mut s, clk.at(1)).is_empty());
        // A client that never heard of its server has no one to tell.
        let mut c = Connection::new_client(Config::default(), clk.t0, peer(), CLIENT_CID);
        c.reset();
        assert!(drain(&mut c, clk.t0).is_empty() && c.is_drained());
    }

    #[test]
    fn parts_carry_the_same_datagram_as_one_buffer() {
        let clk = Clock::new();
        let mut a = server(fixed(125_000_000), clk.t0, 1 << 20);
        let mut b = server(fixed(125_000_000), clk.t0, 1 << 20);
        let msg: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        a.write(&msg).unwrap();
        b.write(&msg).unwrap();
        let whole = drain(&mut a, clk.t0);
        let (mut head, mut body) = (Vec::new(), Vec::new());
        for w in &whole {
            body.clear();
            let t = b.poll_transmit_parts(clk.t0, &mut head, &mut body).unwrap();
            let mut joined = head.clone();
            body.iter().for_each(|p| joined.extend_from_slice(p));
            assert_eq!((&joined, t.size), (w, w.len()));
        }
        assert!(b
            .poll_transmit_parts(clk.t0, &mut head, &mut body)
            .is_none());
    }
}
