//! The per-connection state machine.
//!
//! Inputs: [`Connection::handle_datagram`], [`Connection::handle_timeout`] and
//! the application calls ([`Connection::write`], [`Connection::read`],
//! [`Connection::shutdown_write`], [`Connection::close`], [`Connection::reset`]).
//! Outputs: [`Connection::poll_transmit`], [`Connection::poll_timeout`],
//! [`Connection::poll_event`]. Time is always passed in; nothing here reads a
//! clock or touches a socket.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::cc::{self, AckSample, CcConfig, RateController};
use super::pacer::Pacer;
use super::recv_buf::RecvBuf;
use super::rtt::{RttEstimator, MAX_RTO};
use super::send_buf::{NextSegment, SendBuf};
use super::train::Train;
use super::wire::{
    Body, DataRepr, HsParams, NackRepr, PackRepr, PnRange, RateMode, Repr, DATA_HEADER_LEN,
    MAC_LEN, MAX_NACK_RANGES, MIN_MTU,
};

/// Per-connection settings (each side uses its own; MTU and mode are negotiated).
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest UDP payload we send or accept, bytes (the smaller of the two
    /// sides' values is used).
    pub mtu: u16,
    /// Receive window: bytes we buffer beyond what the application has read.
    pub recv_window: u32,
    /// Send buffer: unacknowledged bytes `write` accepts.
    pub send_buffer: usize,
    /// Rate control the client proposes (the server may override, see
    /// [`Config::force_mode`]).
    pub mode: RateMode,
    /// Server only: use this mode whatever the client proposes.
    pub force_mode: Option<RateMode>,
    /// Rate before the first measurement, bytes/s.
    pub initial_rate: u64,
    /// Upper bound on the pacing rate, bytes/s.
    pub max_rate: u64,
    /// Rate of [`RateMode::Fixed`], bytes/s.
    pub fixed_rate: u64,
    /// PACK at least this often while data arrives.
    pub pack_interval: Duration,
    /// ... or after this many data packets, whichever is first. A packet
    /// larger than an Ethernet-sized datagram counts as as many of those
    /// as it carries, so the cadence is the same in bytes whatever the MTU.
    pub pack_every: u32,
    /// RTT guess before any sample.
    pub initial_rtt: Duration,
    /// Send a KEEPALIVE after this long without sending anything.
    pub keepalive: Duration,
    /// Close after this long without receiving anything.
    pub idle_timeout: Duration,
    /// Give up a handshake after this long.
    pub handshake_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mtu: 1400,
            recv_window: 16 << 20,
            send_buffer: 16 << 20,
            mode: RateMode::Bbr,
            force_mode: None,
            initial_rate: 1_250_000,
            max_rate: 10_000_000_000,
            fixed_rate: 1_250_000,
            pack_interval: Duration::from_millis(10),
            pack_every: 32,
            initial_rtt: Duration::from_millis(100),
            keepalive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

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

/// Counters and estimates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ConnectionStats {
    /// Datagrams sent.
    pub packets_sent: u64,
    /// Datagrams accepted.
    pub packets_received: u64,
    /// Bytes sent, UDP payload.
    pub bytes_sent: u64,
    /// Bytes received, UDP payload.
    pub bytes_received: u64,
    /// Stream bytes acknowledged by the peer.
    pub bytes_acked: u64,
    /// Stream bytes delivered to the application.
    pub bytes_read: u64,
    /// DATA packets that resent a segment.
    pub retransmissions: u64,
    /// Retransmissions caused by an RTO.
    pub rto_count: u64,
    /// Tail-loss probes sent.
    pub tail_probes: u64,
    /// NACK packets sent.
    pub nacks_sent: u64,
    /// NACK packets received.
    pub nacks_received: u64,
    /// PACK packets sent.
    pub packs_sent: u64,
    /// PACK packets received.
    pub packs_received: u64,
    /// Datagrams dropped as malformed or out of place.
    pub dropped: u64,
    /// DATA payload bytes received again.
    pub duplicate_bytes: u64,
    /// Largest datagram this end sends (UDP payload bytes): the negotiated
    /// size, or less where its own route carries less.
    pub mtu: u16,
    /// Smoothed RTT.
    pub rtt: Duration,
    /// Minimum RTT.
    pub min_rtt: Duration,
    /// Current pacing rate, bytes/s.
    pub send_rate: u64,
    /// Latest delivery-rate sample, bytes/s.
    pub delivery_rate: u64,
    /// Loss reported by the peer (smoothed), 0..=1.
    pub loss: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

#[derive(Debug, Clone, Copy)]
enum Hs {
    /// Client: sending INIT.
    Init,
    /// Client: echoing the cookie.
    ConnReq {
        params: HsParams,
        cookie_time: u32,
        mac: [u8; MAC_LEN],
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Handshake,
    Established,
    /// Both directions finished; linger to answer retransmitted FINs.
    Draining,
    Closed,
}

/// One transmitted DATA packet still "in the pipe" (above the peer's highest
/// reported packet number), with what delivery-rate sampling needs.
#[derive(Debug, Clone, Copy)]
struct SentPkt {
    pn: u32,
    bytes: u32,
    sent: Instant,
    delivered: u64,
    delivered_time: Instant,
    first_sent: Instant,
    app_limited: bool,
}

#[derive(Debug, Clone, Copy)]
struct Missing {
    since: Instant,
    nacks: u8,
    last_nack: Option<Instant>,
}

/// A NACK names a packet at most this many times.
const MAX_NACKS: u8 = 3;
/// Bound on tracked missing packet numbers (the rest falls to PACK holes/RTO).
const MAX_MISSING: usize = 4096;
/// A packet number this far ahead of the highest seen is refused.
const MAX_PN_JUMP: u32 = 1 << 16;
/// Receive memory is given back once nothing has arrived for this long.
const IDLE_SHRINK: Duration = Duration::from_secs(1);
/// Peer loss smoothing weight.
const LOSS_EWMA: f64 = 0.125;
/// The first data packets of a connection are acknowledged every
/// [`QUICK_PACK_EVERY`] instead of every `pack_every` (as TCP's quick-ack
/// at connection start): the sender measures its first-flight train from
/// these reports, and one lost PACK should not void the measurement.
const QUICK_PACKETS: u64 = 64;
/// See [`QUICK_PACKETS`].
const QUICK_PACK_EVERY: u32 = 8;
/// Before the handshake is confirmed, a client sends at most this many
/// packets (or one round at the pacing rate, if more) of early data: a
/// server that refuses must not be sent more.
const EARLY_FLIGHT_PACKETS: u64 = 40;

/// A FillP connection.
pub struct Connection {
    role: Role,
    local_cid: u32,
    remote_cid: u32,
    remote: SocketAddr,
    config: Config,
    epoch: Instant,
    state: State,
    hs: Hs,
    hs_start: Instant,
    hs_next: Instant,
    hs_backoff: u32,
    close_reason: Option<CloseReason>,
    send_conn_ack: bool,
    send_reset: bool,
    local_close: bool,
    peer_reset: bool,
    mtu: u16,
    /// Largest datagram we send, when our own route carries less than the
    /// agreed `mtu` (see [`Connection::limit_datagram`]).
    datagram_cap: u16,
    mode: RateMode,

    // Sending.
    send: SendBuf,
    peer_limit: u64,
    next_pn: u32,
    cc: Box<dyn RateController>,
    pacer: Pacer,
    pace_at: Option<Instant>,
    rtt: RttEstimator,
    pipe: VecDeque<SentPkt>,
    pipe_bytes: u64,
    peer_highest: Option<u32>,
    delivered: u64,
    delivered_time: Instant,
    first_sent: Instant,
    timer_base: Option<Instant>,
    rto_backoff: u32,
    tlp_done: bool,
    probe_pending: bool,
    dup_next: Option<u64>,
    train: Train,
    finish_pending: bool,
    write_blocked: bool,
    last_tx: Instant,

    // Receiving.
    recv: RecvBuf,
    rx_next_pn: u32,
    rx_any: bool,
    rx_highest_ts: u32,
    rx_highest_at: Instant,
    missing: BTreeMap<u32, Missing>,
    nack_check: Option<Instant>,
    rx_bytes: u64,
    rx_data_pkts: u64,
    rx_pkts_since_pack: u32,
    rx_data_since_pack: u32,
    pn_at_last_pack: u32,
    rate_hist: VecDeque<(Instant, u64)>,
    pack_now: bool,
    last_pack: Option<Instant>,
    readable_signalled: bool,
    /// The receive limit (highest offset the peer may send) as of the last
    /// PACK: what the peer knows of our window.
    limit_sent: u64,
    finished_signalled: bool,
    last_rx: Instant,
    drain_until: Option<Instant>,

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

/// The datagram size below which [`Connection::segment_payload`] does not
/// shrink packets: FillP's default, room for a tunnel on Ethernet paths.
const BASE_DATAGRAM: u16 = 1400;

/// The smallest send buffer [`Connection::send_capacity`] sizes.
const MIN_SEND_BUFFER: usize = 256 << 10;

/// `part` as a slice of `whole` (no copy), if it lies within it.
fn subslice(whole: &Bytes, part: &[u8]) -> Option<Bytes> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then(|| whole.slice(start..end))
}

/// How many Ethernet-sized packets a DATA payload of `len` bytes counts as
/// towards [`Config::pack_every`]: at least one. With 64 KiB datagrams
/// (loopback) a count of packets alone acknowledged every 2 MiB, and a
/// sender with a smaller send buffer waited for the PACK timer on every
/// refill (measured: 0.22 Gbit/s with a 256 KiB buffer).
fn pack_units(len: usize) -> u32 {
    let unit = usize::from(BASE_DATAGRAM) - DATA_HEADER_LEN;
    len.div_ceil(unit).clamp(1, u32::MAX as usize) as u32
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
            hs: Hs::Init,
            hs_start: now,
            hs_next: now,
            hs_backoff: 0,
            close_reason: None,
            send_conn_ack: false,
            send_reset: false,
            local_close: false,
            peer_reset: false,
            mtu: config.mtu,
            datagram_cap: u16::MAX,
            mode: config.mode,
            send: SendBuf::new(config.send_buffer),
            peer_limit: 0,
            next_pn: 0,
            cc: cc::build(&cc_cfg),
            pacer: Pacer::new(),
            pace_at: None,
            rtt: RttEstimator::new(config.initial_rtt),
            pipe: VecDeque::new(),
            pipe_bytes: 0,
            peer_highest: None,
            delivered: 0,
            delivered_time: now,
            first_sent: now,
            timer_base: None,
            rto_backoff: 0,
            tlp_done: false,
            probe_pending: false,
            dup_next: None,
            train: Train::default(),
            finish_pending: false,
            write_blocked: false,
            last_tx: now,
            recv: RecvBuf::new(u64::from(config.recv_window)),
            rx_next_pn: 0,
            rx_any: false,
            rx_highest_ts: 0,
            rx_highest_at: now,
            missing: BTreeMap::new(),
            nack_check: None,
            rx_bytes: 0,
            rx_data_pkts: 0,
            rx_pkts_since_pack: 0,
            rx_data_since_pack: 0,
            pn_at_last_pack: 0,
            rate_hist: VecDeque::new(),
            pack_now: false,
            last_pack: None,
            readable_signalled: false,
            limit_sent: u64::from(config.recv_window),
            finished_signalled: false,
            last_rx: now,
            drain_until: None,
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
        handshake_rtt: Duration,
    ) -> Self {
        let mut config = config;
        config.mode = params.mode;
        let mut c = Self::new(config, now, remote, Role::Server, local_cid);
        c.remote_cid = remote_cid;
        c.mtu = params.mtu;
        c.peer_limit = u64::from(params.window);
        c.rtt.update(handshake_rtt);
        c.state = State::Established;
        c.send_conn_ack = true;
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
        self.is_established()
            || (self.state == State::Handshake && matches!(self.hs, Hs::ConnReq { .. }))
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

    /// Approximate heap use, bytes (buffers, maps, controller).
    pub fn heap_bytes(&self) -> usize {
        self.send.heap_bytes()
            + self.recv.heap_bytes()
            + self.pipe.capacity() * std::mem::size_of::<SentPkt>()
            + self.missing.len() * 40
            + self.rate_hist.capacity() * 24
            + self.events.capacity() * std::mem::size_of::<Event>()
            + 512
    }

    /// Drop the capacity of the receive, in-flight and event queues where
    /// they are empty (they grow again on demand).
    fn give_back_idle_memory(&mut self) {
        self.recv.shrink_if_empty();
        if self.pipe.is_empty() {
            self.pipe = VecDeque::new();
        }
        if self.events.is_empty() {
            self.events = VecDeque::new();
        }
    }

    /// Counters and estimates.
    pub fn stats(&self) -> ConnectionStats {
        let mut s = self.stats;
        s.mtu = self.send_mtu();
        s.rtt = self.rtt.srtt();
        s.min_rtt = self.rtt.min();
        s.send_rate = self.cc.pacing_rate();
        s
    }

    /// Next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---------------------------------------------------------------- app API

    /// Queue bytes for sending; returns how many were accepted.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, WriteError> {
        self.write_with(data.len(), |send, n| send.write(&data[..n]))
    }

    /// [`Connection::write`] of bytes the caller has already copied into a
    /// buffer of its own (outside whatever guards the connection): what is
    /// accepted is kept as a slice of `data`, not copied again.
    pub fn write_shared(&mut self, data: &Bytes) -> Result<usize, WriteError> {
        self.write_with(data.len(), |send, n| send.write_shared(&data.slice(..n)))
    }

    /// An allocation freed by acknowledged data, for the caller to copy its
    /// next [`Connection::write_shared`] into instead of allocating.
    pub fn take_spare_buffer(&mut self) -> Option<BytesMut> {
        self.send.take_spare()
    }

    /// A write of `len` bytes, of which `put` appends the first `n` (as many
    /// as fit) to the send buffer.
    fn write_with(
        &mut self,
        len: usize,
        put: impl FnOnce(&mut SendBuf, usize) -> usize,
    ) -> Result<usize, WriteError> {
        if self.is_closed() || self.local_close {
            return Err(WriteError::Closed);
        }
        if self.send.is_finished() {
            return Err(WriteError::Finished);
        }
        let room = len.min(self.send_space());
        let n = put(&mut self.send, room);
        // A write that did not fit hears of space through Writable, whether
        // it took nothing (Blocked) or a part: a non-blocking writer that
        // got a short count waits for writability just the same.
        if n < len {
            self.write_blocked = true;
        }
        if n == 0 && len > 0 {
            return Err(WriteError::Blocked);
        }
        Ok(n)
    }

    /// Read in-order bytes; `Ok(0)` means EOF (the peer's FIN).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, ReadError> {
        self.read_with(buf.len(), |r| r.read(buf))
    }

    /// [`Connection::read`] of up to `max` bytes, moved onto `out` as shared
    /// pieces of the receive buffers instead of copied: the caller copies
    /// them out later, without holding whatever guards the connection.
    pub fn read_shared(&mut self, max: usize, out: &mut Vec<Bytes>) -> Result<usize, ReadError> {
        self.read_with(max, |r| r.read_shared(max, out))
    }

    /// A read of up to `max` bytes, taken from the receive buffer by `take`.
    fn read_with(
        &mut self,
        max: usize,
        take: impl FnOnce(&mut RecvBuf) -> usize,
    ) -> Result<usize, ReadError> {
        if self.peer_reset {
            return Err(ReadError::Reset);
        }
        if self.local_close || self.state == State::Closed && !self.recv.at_eof() {
            return Err(ReadError::Closed);
        }
        if self.recv.readable() == 0 {
            if self.recv.at_eof() {
                return Ok(0);
            }
            self.readable_signalled = false;
            return Err(ReadError::Blocked);
        }
        if max == 0 {
            return Ok(0);
        }
        let n = take(&mut self.recv);
        if self.recv.at_eof() {
            // Reading the last byte may complete the close; timers run it.
            self.finish_pending = true;
        }
        self.stats.bytes_read += n as u64;
        if self.recv.readable() == 0 {
            self.readable_signalled = false;
        }
        // Tell a sender that may be held by our window that it grew, as
        // TCP does once the window would double: data that stopped coming
        // brings no PACK, and the sender would wait for its zero-window
        // probe (an RTO, 200 ms at least; measured in the demo: a 64 MiB
        // loopback transfer to a hashing reader took 0.25 s, not 0.06, in
        // about one run of four). Two datagrams at least: no silly windows.
        let w = u64::from(self.config.recv_window);
        let known = self.limit_sent.saturating_sub(self.recv.cum());
        let growth = self.recv.limit().saturating_sub(self.limit_sent);
        let least = 2 * u64::from(self.mtu);
        if known < w / 2 && growth >= known.max(least) {
            self.pack_now = true;
        }
        Ok(n)
    }

    /// Half-close: send FIN after the buffered data. Reading continues.
    pub fn shutdown_write(&mut self) {
        if !self.is_closed() {
            self.send.finish();
        }
    }

    /// Graceful close: FIN our side and discard whatever still arrives. The
    /// connection reports [`Event::Closed`] once both FINs are acknowledged.
    pub fn close(&mut self) {
        self.shutdown_write();
        self.local_close = true;
        self.recv.discard();
        self.finish_pending = true;
    }

    /// Abort: send RST and close at once.
    pub fn reset(&mut self) {
        if self.state == State::Closed {
            return;
        }
        self.send_reset = self.remote_cid != 0;
        self.enter_closed(CloseReason::LocalReset);
    }

    fn enter_closed(&mut self, reason: CloseReason) {
        if self.close_reason.is_none() {
            self.close_reason = Some(reason);
            self.events.push_back(Event::Closed { reason });
        }
        self.state = State::Closed;
        self.drain_until = None;
    }

    fn maybe_finish(&mut self, now: Instant) {
        self.finish_pending = false;
        if self.state != State::Established {
            return;
        }
        if self.local_close {
            self.recv.discard();
        }
        if self.send.fin_acked() && self.recv.at_eof() {
            self.state = State::Draining;
            // Everything was read: nothing to keep the receive queue for.
            self.recv.shrink_if_empty();
            // Linger as long as the peer may still retry (its idle timeout,
            // restarted by each of its datagrams), so a peer whose FIN-ack
            // was lost still gets one. Buffers are empty by now.
            self.drain_until = Some(now + self.config.idle_timeout);
            self.close_reason = Some(CloseReason::Finished);
            self.events.push_back(Event::Closed {
                reason: CloseReason::Finished,
            });
        }
    }

    // ---------------------------------------------------------------- input

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
            Body::ConnAck { server_cid } => {
                if self.role == Role::Client && server_cid == self.remote_cid {
                    self.on_established(now);
                    true
                } else {
                    false
                }
            }
            Body::ConnReq { client_cid, .. } => {
                // A retransmitted CONN_REQ: our CONN_ACK was lost.
                if self.role == Role::Server && client_cid == self.remote_cid {
                    self.send_conn_ack = true;
                    true
                } else {
                    false
                }
            }
            Body::Data(d) => self.on_data(now, d, shared),
            Body::Pack(p) => self.on_pack(now, &p),
            Body::Nack(n) => self.on_nack(now, &n),
            Body::Keepalive => {
                if self.state == State::Established || self.state == State::Draining {
                    // Answer with a PACK: doubles as a window probe reply.
                    self.pack_now = true;
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
                if self.remote_cid != 0 {
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
            self.last_rx = now;
            if self.state == State::Draining {
                self.drain_until = Some(now + self.config.idle_timeout);
            }
        } else {
            self.stats.dropped += 1;
        }
    }

    fn on_cookie(
        &mut self,
        now: Instant,
        server_cid: u32,
        params: HsParams,
        echo: u32,
        cookie_time: u32,
        mac: [u8; MAC_LEN],
    ) -> bool {
        if self.role != Role::Client
            || self.state != State::Handshake
            || !matches!(self.hs, Hs::Init)
        {
            return false;
        }
        if params.mtu > self.config.mtu {
            return false;
        }
        let sample = us_since(self.epoch, now).wrapping_sub(echo);
        if u64::from(sample) < 60_000_000 {
            self.rtt.update(Duration::from_micros(u64::from(sample)));
        }
        self.remote_cid = server_cid;
        self.mtu = params.mtu;
        self.peer_limit = u64::from(params.window);
        if params.mode != self.mode {
            self.mode = params.mode;
            self.cc = cc::build(&CcConfig {
                mode: params.mode,
                initial_rate: self.config.initial_rate,
                max_rate: self.config.max_rate,
                fixed_rate: self.config.fixed_rate,
                mtu: self.mtu,
            });
        }
        self.hs = Hs::ConnReq {
            params: HsParams {
                mtu: params.mtu,
                window: self.config.recv_window,
                mode: params.mode,
            },
            cookie_time,
            mac,
        };
        self.hs_next = now;
        self.hs_backoff = 0;
        // Data written from now on leaves behind the CONN_REQ: a driver
        // can report the connect done, as TCP does at its SYN-ACK.
        self.events.push_back(Event::Writable);
        true
    }

    fn on_established(&mut self, now: Instant) {
        if self.state == State::Handshake {
            self.state = State::Established;
            self.events.push_back(Event::Connected);
            self.last_tx = now;
            // Early data's loss timers start now: they do not run during the
            // handshake, where the CONN_REQ's retransmission is the probe.
            if self.timer_base.is_some() {
                self.timer_base = Some(now);
            }
        }
    }

    /// A client that has the server's cookie: it knows the connection ID,
    /// MTU, mode and window, and sends data behind its CONN_REQ.
    fn early_data_allowed(&self) -> bool {
        self.role == Role::Client && matches!(self.hs, Hs::ConnReq { .. })
    }

    fn on_data(&mut self, now: Instant, d: DataRepr<'_>, shared: Option<&Bytes>) -> bool {
        if self.role == Role::Client && self.state == State::Handshake {
            // Data from the server proves our CONN_REQ arrived.
            if self.remote_cid == 0 || matches!(self.hs, Hs::Init) {
                return false;
            }
            self.on_established(now);
        }
        if !matches!(self.state, State::Established | State::Draining) {
            return false;
        }
        let pn = d.pn;
        if self.rx_any && pn >= self.rx_next_pn && pn - self.rx_next_pn > MAX_PN_JUMP {
            return false;
        }
        let inserted = match shared.and_then(|b| subslice(b, d.payload)) {
            Some(p) => self.recv.insert_shared(d.offset, &p, d.fin),
            None => self.recv.insert(d.offset, d.payload, d.fin),
        };
        let inserted = match inserted {
            Ok(i) => i,
            Err(_) => {
                // The peer changed its final size: nothing sane can follow.
                self.send_reset = true;
                self.enter_closed(CloseReason::ProtocolViolation);
                return true;
            }
        };
        self.rx_bytes += d.payload.len() as u64;
        self.rx_data_pkts += 1;
        self.stats.duplicate_bytes += (d.payload.len() - inserted.new_bytes) as u64;
        self.rx_pkts_since_pack += 1;
        self.rx_data_since_pack = self
            .rx_data_since_pack
            .saturating_add(pack_units(d.payload.len()));
        if !self.rx_any || pn >= self.rx_next_pn {
            let first_new = if self.rx_any { self.rx_next_pn } else { 0 };
            // Record the gap, newest numbers first if it is huge.
            let from = first_new.max(pn.saturating_sub(MAX_MISSING as u32));
            let mut any_gap = false;
            for m in from..pn {
                self.missing.insert(
                    m,
                    Missing {
                        since: now,
                        nacks: 0,
                        last_nack: None,
                    },
                );
                any_gap = true;
            }
            while self.missing.len() > MAX_MISSING {
                self.missing.pop_first();
            }
            if any_gap {
                let due = now + self.reorder_delay();
                self.nack_check = Some(self.nack_check.map_or(due, |c| c.min(due)));
            }
            self.rx_any = true;
            self.rx_next_pn = pn.wrapping_add(1);
            self.rx_highest_ts = d.timestamp;
            self.rx_highest_at = now;
        } else {
            self.missing.remove(&pn);
        }
        if inserted.new_bytes == 0 && !d.payload.is_empty() {
            // A resend of data we have: our PACK was probably lost.
            self.pack_now = true;
        }
        if d.fin {
            self.pack_now = true;
        }
        if self.recv.readable() > 0 && !self.readable_signalled && !self.local_close {
            self.readable_signalled = true;
            self.events.push_back(Event::Readable);
        }
        if self.recv.fin_complete() && !self.finished_signalled {
            self.finished_signalled = true;
            self.pack_now = true;
            self.events.push_back(Event::Finished);
            if !self.readable_signalled && !self.local_close {
                self.readable_signalled = true;
                self.events.push_back(Event::Readable);
            }
        }
        self.maybe_finish(now);
        true
    }

    fn reorder_delay(&self) -> Duration {
        (self.rtt.srtt() / 8).clamp(Duration::from_millis(2), Duration::from_millis(50))
    }

    fn on_pack(&mut self, now: Instant, p: &PackRepr) -> bool {
        if self.role == Role::Client && self.state == State::Handshake {
            if self.remote_cid == 0 || matches!(self.hs, Hs::Init) {
                return false;
            }
            self.on_established(now);
        }
        if !matches!(self.state, State::Established | State::Draining) {
            return false;
        }
        self.stats.packs_received += 1;
        let sent_any = self.next_pn > 0;
        let fresh = sent_any
            && p.highest_pn < self.next_pn
            && self.peer_highest.is_none_or(|h| p.highest_pn > h);
        // Flow control: the limit only ever grows.
        self.peer_limit = self
            .peer_limit
            .max(p.cum_ack.saturating_add(u64::from(p.window)));
        let newly = self.send.on_cum_ack(p.cum_ack, p.fin_received);
        self.stats.bytes_acked += newly;
        for s in p.sacks() {
            // Saturating: a forged cum_ack near 2^64 must not wrap.
            let start = p.cum_ack.saturating_add(u64::from(s.start));
            self.send
                .on_sack(start, start.saturating_add(u64::from(s.len)));
        }
        let mut progress = newly > 0;
        let mut rate_sample = None;
        let mut app_limited = false;
        let mut rtt_sample = None;
        let mut resolved = 0u64;
        let mut train_bytes = 0u64;
        let mut delivered_now = 0u64;
        if fresh {
            progress = true;
            let sample = us_since(self.epoch, now)
                .wrapping_sub(p.echo_ts)
                .wrapping_sub(p.ack_delay_us);
            if sample < 60_000_000 {
                let d = Duration::from_micros(u64::from(sample));
                self.rtt.update(d);
                rtt_sample = Some(d);
            }
            delivered_now = p.rx_bytes.saturating_sub(self.delivered);
            self.delivered = self.delivered.max(p.rx_bytes);
            while let Some(front) = self.pipe.front().copied() {
                if front.pn > p.highest_pn {
                    break;
                }
                self.pipe.pop_front();
                self.pipe_bytes -= u64::from(front.bytes);
                let payload = u64::from(front.bytes).saturating_sub(DATA_HEADER_LEN as u64);
                resolved += payload;
                if self.train.contains(front.pn) {
                    train_bytes += payload;
                }
                if front.pn == p.highest_pn {
                    let ack_elapsed = now.saturating_duration_since(front.delivered_time);
                    let send_elapsed = front.sent.saturating_duration_since(front.first_sent);
                    let interval = ack_elapsed.max(send_elapsed);
                    let bytes = self.delivered.saturating_sub(front.delivered);
                    // At least 1 ms, or 100 µs when the sample spans 16
                    // Ethernet-sized packets: PACKs come every `pack_every`
                    // such packets, so on a sub-millisecond path a 1 ms
                    // floor leaves no samples above pack_every x 1400 bytes
                    // per ms (0.36 Gbit/s) and the estimate can never grow
                    // past that.
                    let long_enough = interval >= Duration::from_millis(1)
                        || (interval >= Duration::from_micros(100)
                            && bytes >= 16 * u64::from(BASE_DATAGRAM));
                    if long_enough && bytes > 0 {
                        rate_sample = Some((bytes as f64 / interval.as_secs_f64()) as u64);
                    }
                    app_limited = front.app_limited;
                    self.first_sent = front.sent;
                }
            }
            self.delivered_time = now;
            self.peer_highest = Some(p.highest_pn);
            // When the reported packet reached the peer, on our clock less
            // the return delay (the same for every report of the train).
            let arrival = now
                .checked_sub(Duration::from_micros(u64::from(p.ack_delay_us)))
                .unwrap_or(now);
            if let Some(rate) = self.train.on_pack(p.highest_pn, arrival, train_bytes) {
                self.cc.on_capacity_hint(now, rate);
            }
        }
        let loss = f64::from(p.loss) / 65536.0;
        self.stats.loss = self.stats.loss * (1.0 - LOSS_EWMA) + loss * LOSS_EWMA;
        if let Some(r) = rate_sample {
            self.stats.delivery_rate = r;
        }
        // Holes under SACKed data older than an RTT are lost even if the NACK was.
        let age = self.rtt.srtt() + self.rtt.srtt() / 4 + self.config.pack_interval;
        self.send.mark_holes(now, age);
        self.cc.on_ack(&AckSample {
            now,
            delivery_rate: rate_sample,
            app_limited,
            rtt: rtt_sample,
            srtt: self.rtt.srtt(),
            recv_rate: u64::from(p.rate),
            loss,
            resolved_payload: resolved,
            delivered_bytes: delivered_now,
            in_flight: self.pipe_bytes,
        });
        if progress {
            self.timer_base = if self.send.in_flight_segments() > 0 {
                Some(now)
            } else {
                None
            };
            self.rto_backoff = 0;
            self.tlp_done = false;
        }
        // A blocked writer hears of space once half the buffer is free (less
        // what loss holds back, see `send_wake_space`), as the kernel and
        // smoltcp do, not on every PACK: a bulk sender then wakes once per
        // half buffer instead of every 32 packets.
        if self.write_blocked && self.send_space() >= self.send_wake_space() {
            self.write_blocked = false;
            self.events.push_back(Event::Writable);
        }
        self.maybe_finish(now);
        true
    }

    fn on_nack(&mut self, _now: Instant, n: &NackRepr) -> bool {
        if !matches!(self.state, State::Established | State::Draining) {
            return false;
        }
        self.stats.nacks_received += 1;
        for r in n.ranges() {
            // Walk only the packet numbers still mapped to segments, so a
            // forged range costs no more than what is in flight.
            let nacked = self.send.mapped_pns(r.first, r.last);
            for pn in nacked {
                self.send.on_nack(pn);
            }
        }
        true
    }

    // ---------------------------------------------------------------- timers

    fn rto_deadline(&self) -> Option<Instant> {
        let base = self.timer_base?;
        let rto = (self.rtt.rto() * (1u32 << self.rto_backoff.min(6))).min(MAX_RTO);
        Some(base + rto)
    }

    fn tlp_deadline(&self) -> Option<Instant> {
        if self.tlp_done {
            return None;
        }
        let base = self.timer_base?;
        Some(base + 2 * self.rtt.srtt() + self.config.pack_interval)
    }

    fn pack_deadline(&self) -> Option<Instant> {
        if self.pack_now {
            return Some(self.last_rx);
        }
        if self.rx_data_since_pack == 0 {
            return None;
        }
        Some(match self.last_pack {
            Some(t) => t + self.config.pack_interval,
            None => self.last_rx,
        })
    }

    fn keepalive_interval(&self) -> Duration {
        if self.send.flow_blocked(self.peer_limit) {
            // Doubles as a zero-window probe.
            self.rtt.rto()
        } else {
            self.config.keepalive
        }
    }

    /// When [`Connection::handle_timeout`] (or `poll_transmit`) next needs to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut put = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        match self.state {
            State::Closed => {
                if self.send_reset {
                    put(Some(self.last_rx));
                }
                return t;
            }
            State::Handshake => {
                put(Some(self.hs_next));
                put(Some(self.hs_start + self.config.handshake_timeout));
                put(self.pace_at);
                return t;
            }
            State::Draining => {
                put(self.drain_until);
                put(self.pack_deadline());
                return t;
            }
            State::Established => {}
        }
        if self.send_conn_ack || self.finish_pending {
            put(Some(self.last_rx));
        }
        put(self.pack_deadline());
        put(self.nack_check);
        put(self.pace_at);
        put(self.rto_deadline());
        put(self.tlp_deadline());
        put(Some(self.last_tx + self.keepalive_interval()));
        put(Some(self.last_rx + self.config.idle_timeout));
        t
    }

    /// Run expired timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Closed => {}
            State::Handshake => {
                if now >= self.hs_start + self.config.handshake_timeout {
                    self.enter_closed(CloseReason::HandshakeTimeout);
                }
                if self.pace_at.is_some_and(|p| now >= p) {
                    self.pace_at = None;
                }
            }
            State::Draining => {
                if self.drain_until.is_some_and(|d| now >= d) {
                    self.state = State::Closed;
                }
            }
            State::Established => {
                if self.finish_pending {
                    self.maybe_finish(now);
                    if self.state != State::Established {
                        return;
                    }
                }
                if now >= self.last_rx + self.config.idle_timeout {
                    self.enter_closed(CloseReason::IdleTimeout);
                    return;
                }
                if now.saturating_duration_since(self.last_rx) >= IDLE_SHRINK {
                    // The flow paused (the keepalive timer brings us here):
                    // give the drained queues' memory back.
                    self.give_back_idle_memory();
                }
                if self.rto_deadline().is_some_and(|d| now >= d) {
                    self.send.on_rto();
                    self.stats.rto_count += 1;
                    self.probe_pending = true;
                    self.pipe.clear();
                    self.pipe_bytes = 0;
                    self.train.abandon();
                    self.cc.on_rto(now);
                    self.rto_backoff += 1;
                    self.tlp_done = true;
                    self.timer_base = Some(now);
                } else if self.tlp_deadline().is_some_and(|d| now >= d) {
                    self.tlp_done = true;
                    if self.send.probe_tail() {
                        self.stats.tail_probes += 1;
                        self.probe_pending = true;
                    }
                }
                if self.pace_at.is_some_and(|p| now >= p) {
                    self.pace_at = None;
                }
            }
        }
    }

    // ---------------------------------------------------------------- output

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

    fn transmit(
        &mut self,
        now: Instant,
        buf: &mut Vec<u8>,
        body: Option<&mut Vec<Bytes>>,
    ) -> Option<Transmit> {
        buf.clear();
        let (repr, payload) = self.next_packet(now, buf, body)?;
        if let Some(r) = repr {
            r.emit(buf);
        }
        let size = buf.len() + payload;
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += size as u64;
        self.last_tx = now;
        Some(Transmit {
            destination: self.remote,
            size,
        })
    }

    /// Returns `Some((Some(repr), 0))` to emit `repr`, `Some((None, n))` if
    /// the packet was already written into `buf` (with `n` payload bytes in
    /// `body`, if given), `None` if there is nothing to send.
    fn next_packet(
        &mut self,
        now: Instant,
        buf: &mut Vec<u8>,
        body: Option<&mut Vec<Bytes>>,
    ) -> Option<(Option<Repr<'static>>, usize)> {
        self.next_control(now)
            .map(|r| (Some(r), 0))
            .or_else(|| self.next_data(now, buf, body))
    }

    /// A DATA packet (or a keepalive when there is none): see
    /// [`Connection::next_packet`].
    fn next_data(
        &mut self,
        now: Instant,
        buf: &mut Vec<u8>,
        body: Option<&mut Vec<Bytes>>,
    ) -> Option<(Option<Repr<'static>>, usize)> {
        let sendable = match self.state {
            State::Handshake => self.early_data_allowed(),
            State::Established => true,
            _ => false,
        };
        if !sendable {
            return None;
        }
        if let Some(n) = self.data_packet(now, buf, body) {
            return Some((None, n));
        }
        if self.state == State::Established && now >= self.last_tx + self.keepalive_interval() {
            return Some((
                Some(Repr {
                    dst_cid: self.remote_cid,
                    body: Body::Keepalive,
                }),
                0,
            ));
        }
        None
    }

    /// The next packet other than DATA and keepalives, if one is due.
    fn next_control(&mut self, now: Instant) -> Option<Repr<'static>> {
        let dst = self.remote_cid;
        if self.send_reset {
            self.send_reset = false;
            return Some(Repr {
                dst_cid: dst,
                body: Body::Reset,
            });
        }
        match self.state {
            State::Closed => return None,
            State::Handshake => return self.handshake_packet(now),
            State::Established | State::Draining => {}
        }
        if self.send_conn_ack {
            self.send_conn_ack = false;
            return Some(Repr {
                dst_cid: dst,
                body: Body::ConnAck {
                    server_cid: self.local_cid,
                },
            });
        }
        if self.nack_check.is_some_and(|t| now >= t) {
            if let Some(n) = self.build_nack(now) {
                self.stats.nacks_sent += 1;
                return Some(Repr {
                    dst_cid: dst,
                    body: Body::Nack(n),
                });
            }
        }
        let pack_every = if self.rx_data_pkts <= QUICK_PACKETS {
            self.config.pack_every.min(QUICK_PACK_EVERY)
        } else {
            self.config.pack_every
        };
        if self.pack_deadline().is_some_and(|t| now >= t) || self.rx_data_since_pack >= pack_every {
            let p = self.build_pack(now);
            self.stats.packs_sent += 1;
            return Some(Repr {
                dst_cid: dst,
                body: Body::Pack(p),
            });
        }
        None
    }

    fn handshake_packet(&mut self, now: Instant) -> Option<Repr<'static>> {
        if now < self.hs_next {
            return None;
        }
        // Short, capped backoff: a lost INIT should not cost seconds.
        let backoff = (self.config.initial_rtt.max(Duration::from_millis(200))
            * (1u32 << self.hs_backoff.min(2)))
        .min(Duration::from_secs(1));
        self.hs_next = now + backoff;
        let resend = self.hs_backoff > 0;
        self.hs_backoff += 1;
        if resend && self.early_data_allowed() && self.send.probe_tail() {
            // The early data went nowhere if the CONN_REQ was lost. A probe
            // right behind the retransmitted CONN_REQ draws a PACK (and the
            // NACKs for the rest) from the new server connection, which
            // completes the handshake even if its CONN_ACK is lost.
            self.stats.tail_probes += 1;
            self.probe_pending = true;
        }
        let repr = match self.hs {
            Hs::Init => Repr {
                dst_cid: 0,
                body: Body::Init {
                    client_cid: self.local_cid,
                    params: HsParams {
                        mtu: self.config.mtu,
                        window: self.config.recv_window,
                        mode: self.config.mode,
                    },
                    timestamp: us_since(self.epoch, now),
                },
            },
            Hs::ConnReq {
                params,
                cookie_time,
                mac,
            } => Repr {
                dst_cid: self.remote_cid,
                body: Body::ConnReq {
                    client_cid: self.local_cid,
                    params,
                    cookie_time,
                    mac,
                },
            },
        };
        Some(repr)
    }

    fn build_nack(&mut self, now: Instant) -> Option<NackRepr> {
        let reorder = self.reorder_delay();
        let renack =
            (self.rtt.srtt() + self.rtt.srtt() / 2 + reorder).max(Duration::from_millis(20));
        let mut ranges = [PnRange::default(); MAX_NACK_RANGES];
        let mut n = 0usize;
        let mut next_check: Option<Instant> = None;
        let mut expired = Vec::new();
        for (&pn, m) in self.missing.iter_mut() {
            let due = match m.last_nack {
                None => m.since + reorder,
                Some(t) => t + renack,
            };
            if now < due || n == MAX_NACK_RANGES && ranges[n - 1].last.wrapping_add(1) != pn {
                next_check = Some(next_check.map_or(due, |c| c.min(due)));
                continue;
            }
            m.nacks += 1;
            m.last_nack = Some(now);
            if m.nacks >= MAX_NACKS {
                expired.push(pn);
            } else {
                let again = now + renack;
                next_check = Some(next_check.map_or(again, |c| c.min(again)));
            }
            if n > 0 && ranges[n - 1].last.wrapping_add(1) == pn {
                ranges[n - 1].last = pn;
            } else {
                ranges[n] = PnRange {
                    first: pn,
                    last: pn,
                };
                n += 1;
            }
        }
        for pn in expired {
            self.missing.remove(&pn);
        }
        self.nack_check = next_check;
        if n == 0 {
            return None;
        }
        Some(NackRepr {
            len: n as u8,
            ranges,
        })
    }

    fn build_pack(&mut self, now: Instant) -> PackRepr {
        let highest = self.rx_next_pn.wrapping_sub(1);
        let advance = if self.rx_any {
            highest
                .wrapping_sub(self.pn_at_last_pack)
                .wrapping_add(u32::from(self.last_pack.is_none()))
        } else {
            0
        };
        let loss = if advance > 0 {
            (1.0 - f64::from(self.rx_pkts_since_pack) / f64::from(advance)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        // Receive rate over the last few reports, smoother than one interval.
        self.rate_hist.push_back((now, self.rx_bytes));
        while self.rate_hist.len() > 5 {
            self.rate_hist.pop_front();
        }
        let rate = match self.rate_hist.front() {
            Some(&(t, b)) if now > t => {
                ((self.rx_bytes - b) as f64 / now.duration_since(t).as_secs_f64()) as u64
            }
            _ => 0,
        };
        let (sack, sack_len) = self.recv.sack_ranges();
        self.limit_sent = self.recv.limit();
        self.pn_at_last_pack = highest;
        self.rx_pkts_since_pack = 0;
        self.rx_data_since_pack = 0;
        self.pack_now = false;
        self.last_pack = Some(now);
        PackRepr {
            cum_ack: self.recv.cum(),
            fin_received: self.recv.fin_complete(),
            highest_pn: highest,
            echo_ts: self.rx_highest_ts,
            ack_delay_us: now
                .saturating_duration_since(self.rx_highest_at)
                .as_micros()
                .min(u128::from(u32::MAX)) as u32,
            rx_bytes: self.rx_bytes,
            rate: rate.min(u64::from(u32::MAX)) as u32,
            loss: (loss * 65535.0) as u16,
            window: self.recv.advertised(),
            sack_len,
            sack,
        }
    }

    /// In flight needed to keep sending between two of the peer's PACKs:
    /// it sends one every `pack_every` Ethernet-sized packets (at least one
    /// datagram) or `pack_interval`, whichever comes first; twice that.
    fn report_cadence(&self) -> u64 {
        let per_interval =
            (self.cc.pacing_rate() as f64 * self.config.pack_interval.as_secs_f64()) as u64;
        let quantum =
            (u64::from(self.config.pack_every) * u64::from(BASE_DATAGRAM)).max(u64::from(self.mtu));
        per_interval.min(2 * quantum) + 2 * quantum
    }

    /// The controller's in-flight cap, but never below what the peer's
    /// report cadence needs: it acknowledges every `pack_every` packets or
    /// `pack_interval`. On a sub-millisecond path a BDP-sized cap is a few
    /// packets, acks then come only once per `pack_interval`, and the rate
    /// collapses to a few packets per interval (measured: 10 Mbit/s over
    /// loopback).
    fn inflight_limit(&self) -> u64 {
        let mtu = u64::from(self.mtu);
        let cap = self.cc.inflight_cap().max(self.report_cadence());
        if self.state == State::Handshake {
            // Early data: one round at the pacing rate (the srtt is the
            // COOKIE exchange's), at least a first flight.
            let round = (self.cc.pacing_rate() as f64 * self.rtt.srtt().as_secs_f64()) as u64;
            return cap.min(round.max(EARLY_FLIGHT_PACKETS * mtu));
        }
        cap
    }

    /// Payload of a new DATA packet: the MTU's, once the pacing rate
    /// carries at least four such packets per millisecond; below that,
    /// smaller, down to an Ethernet-sized [`BASE_DATAGRAM`].
    ///
    /// Rate control learns per packet (a delivery sample per PACK, ProbeBW
    /// phases of a min RTT). With loopback's 64 KiB datagrams at a low rate,
    /// a packet every 160 ms at 3 Mbit/s, a probing phase saw no packet at
    /// all and a connection that started low stayed there for tens of
    /// seconds (one round in ~30 of the loopback bench). TCP sizes its TSO
    /// bursts from the pacing rate for the same reason.
    fn segment_payload(&self) -> usize {
        let mtu = self.send_mtu();
        let full = usize::from(mtu) - DATA_HEADER_LEN;
        let base = usize::from(mtu.min(BASE_DATAGRAM)) - DATA_HEADER_LEN;
        let quarter_ms = (self.cc.pacing_rate() / 4000) as usize;
        quarter_ms.clamp(base, full)
    }

    /// Writes the next DATA packet's header into `buf` and its payload
    /// into `body` as shared slices if given, else into `buf` too. Returns
    /// the bytes put in `body`.
    fn data_packet(
        &mut self,
        now: Instant,
        buf: &mut Vec<u8>,
        body: Option<&mut Vec<Bytes>>,
    ) -> Option<usize> {
        if !self.send.has_pending(self.peer_limit) && self.dup_next.is_none() {
            self.pace_at = None;
            return None;
        }
        // A probe goes out even into a full window: it is what unblocks it.
        if self.pipe_bytes >= self.inflight_limit() && !self.probe_pending {
            self.pace_at = None;
            return None;
        }
        let max_payload = self.segment_payload();
        let size = max_payload + DATA_HEADER_LEN;
        if self.next_pn == 0 {
            self.train.plan(self.cc.startup_train());
        }
        // The first flight's train skips pacing; the pacer still counts it,
        // so the round's average rate is unchanged.
        let burst = self.train.may_burst(now);
        if !burst {
            if let Some(t) = self.pacer.delay(now, self.cc.pacing_rate(), size, size) {
                self.pace_at = Some(t);
                return None;
            }
        }
        self.pace_at = None;
        // A segment lost again after a retransmission goes out twice: on a
        // lossy path this cuts the tail of repeated losses that holds up the
        // cumulative ack (and with it the window) for several RTTs.
        let dup = self.dup_next.take().and_then(|o| self.send.copy_of(o));
        let is_dup = dup.is_some();
        let seg: NextSegment = match dup {
            Some(d) => d,
            None => self.send.next_segment(max_payload, self.peer_limit)?,
        };
        let pn = self.next_pn;
        self.next_pn = self.next_pn.wrapping_add(1);
        self.probe_pending = false;
        // Header, then the payload: shared slices of the send buffer, or
        // copied once from it.
        let data = DataRepr {
            pn,
            offset: seg.offset,
            timestamp: us_since(self.epoch, now),
            fin: seg.fin,
            payload: &[],
        };
        // A retransmission keeps its segment's length, which may exceed
        // today's `max_payload`, never the MTU.
        let len = seg.len.min(usize::from(self.mtu) - DATA_HEADER_LEN);
        data.emit_header(self.remote_cid, len as u16, buf);
        let (got, in_body) = match body {
            Some(body) => {
                let n = self.send.slices(seg.offset, len, body);
                (n, n)
            }
            None => (self.send.copy(seg.offset, len, buf), 0),
        };
        if got != len {
            // The buffer clamps a stale range (never expected): keep the
            // length field true to what is sent rather than send a bad packet.
            if let Some(f) = buf.get_mut(DATA_HEADER_LEN - 2..DATA_HEADER_LEN) {
                f.copy_from_slice(&(got as u16).to_be_bytes());
            }
        }
        let size = DATA_HEADER_LEN + got;
        self.pacer.on_sent(size);
        self.train.on_sent(now, burst);
        if seg.retransmit {
            self.stats.retransmissions += 1;
        }
        if self.timer_base.is_none() {
            self.timer_base = Some(now);
        }
        if self.pipe.is_empty() {
            // Nothing in flight: a delivery interval starts now.
            self.first_sent = now;
            self.delivered_time = now;
        }
        self.send.on_sent(&seg, pn, now);
        // Judged after this packet left: nothing else waits to go.
        let app_limited = !self.send.has_pending(self.peer_limit);
        self.pipe.push_back(SentPkt {
            pn,
            bytes: size as u32,
            sent: now,
            delivered: self.delivered,
            delivered_time: self.delivered_time,
            first_sent: self.first_sent,
            app_limited,
        });
        self.pipe_bytes += size as u64;
        if seg.retransmit && !is_dup && self.send.tx_count(seg.offset) >= 3 {
            self.dup_next = Some(seg.offset);
        }
        Some(in_body)
    }
}

impl Connection {
    #[doc(hidden)]
    /// Debug dump of the rate controller (for the simulator tools).
    pub fn controller_debug(&self) -> String {
        format!("{:?}", self.cc)
    }

    /// Whether events are waiting.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// In-order bytes `read` would return now (for readiness reporting).
    pub fn readable_bytes(&self) -> usize {
        self.recv.readable()
    }

    /// The peer's FIN has been reached by `read` (the next read is EOF).
    pub fn at_eof(&self) -> bool {
        self.recv.at_eof()
    }

    /// Send-buffer space: how much `write` would take now.
    pub fn send_space(&self) -> usize {
        self.send_capacity().saturating_sub(self.send.unacked())
    }

    /// The send buffer's size now: three times what may be in flight, plus
    /// what loss holds back (sent data neither in flight nor acknowledged
    /// in order: SACKed, or waiting to be resent), at least
    /// 256 KiB, at most [`Config::send_buffer`] (as Linux grows
    /// a TCP socket's send buffer with its congestion window). Three, not
    /// Linux's two: a writer is woken at half of it (less the held-back
    /// part), and with two a flight at its cap left no unsent data by the
    /// time the writer was woken. A short, fast path keeps a small buffer
    /// the caches hold; over loopback a full 16 MiB buffer made every copy
    /// in and out of it miss them (measured: 7.8 Gbit/s against 9.9 with
    /// 256 KiB). Without the held-back part, at 20% loss and 200 ms the
    /// sender ran out of new data behind its holes (goodput 0.66 of the
    /// link against 0.76).
    pub fn send_capacity(&self) -> usize {
        let held = self.send_held();
        let want = self.send_flight().saturating_mul(3).saturating_add(held);
        let want = usize::try_from(want).unwrap_or(usize::MAX);
        want.max(MIN_SEND_BUFFER).min(self.send.capacity())
    }

    /// Sent bytes that loss holds back: neither in flight nor acknowledged
    /// in order (SACKed, or waiting to be resent).
    fn send_held(&self) -> u64 {
        self.send.sent_span().saturating_sub(self.pipe_bytes)
    }

    /// Free space at which a writer that came up short is woken: half the
    /// buffer, less what loss holds back. Half of all of it would wait for
    /// the holes to be repaired, and a lossy long path ran out of new data
    /// meanwhile (measured over the emulated 200 ms path at 5% loss: 63
    /// Mbit/s against 82 with a 16 MiB buffer).
    fn send_wake_space(&self) -> usize {
        let held = usize::try_from(self.send_held()).unwrap_or(usize::MAX);
        (self.send_capacity().saturating_sub(held) / 2).max(1)
    }

    /// What the buffer must keep ready to send: the in-flight limit, or
    /// what the pacing rate keeps in flight over one smoothed RTT if that is
    /// less (modes without an in-flight cap, and BBR before its first RTT
    /// sample, when it has none).
    fn send_flight(&self) -> u64 {
        let round = (self.cc.pacing_rate() as f64 * self.rtt.srtt().as_secs_f64()) as u64;
        self.inflight_limit()
            .min(round.saturating_add(self.report_cadence()))
    }

    /// Whether a writer should try `write` (readiness for `POLLOUT`). Once a
    /// write came up short, not until half the buffer is free again (the
    /// kernel's `sk_stream_wspace` rule), so a bulk writer wakes once per
    /// half buffer rather than once per PACK. The connection decides this
    /// when a PACK frees space, not its user later: the buffer's size moves
    /// with the rate, and a threshold checked again at another moment could
    /// miss the one [`Event::Writable`] and leave a writer asleep for good.
    /// (If the buffer shrank under a writer that had not come up short, a
    /// write may still find no room: it gets [`WriteError::Blocked`] and
    /// then waits for the event.)
    pub fn is_writable(&self) -> bool {
        !self.write_blocked
    }

    /// Whether written data waits to be sent (new, or to be resent) and the
    /// peer's window lets it go.
    pub fn has_unsent(&self) -> bool {
        self.send.has_pending(self.peer_limit)
    }

    /// Bytes written and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.send.unacked()
    }

    /// The peer reset the connection.
    pub fn peer_reset(&self) -> bool {
        self.peer_reset
    }
}
