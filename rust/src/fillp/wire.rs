//! Wire format: zero-copy packet views and validated representations.
//!
//! Two levels, as in smoltcp: [`Packet`] wraps a byte buffer and
//! [`Packet::new_checked`] validates every length the type needs; after that no
//! accessor can panic (they also fall back to 0 on a short buffer, so even an
//! unchecked view is panic-free). [`Repr`] is the parsed, semantically
//! validated form; [`Repr::emit`] writes it back. All integers are big-endian.
//! The layout of every packet type is tabulated in the module docs of
//! [`crate::fillp`].

use core::fmt;

/// The protocol version this implementation speaks.
pub const VERSION: u8 = 1;
/// Length of the header common to every packet.
pub const HEADER_LEN: usize = 8;
/// Length of the DATA header (common header included) before the payload.
pub const DATA_HEADER_LEN: usize = 26;
/// Fixed part of a PACK (common header included), before the SACK ranges.
pub const PACK_FIXED_LEN: usize = 47;
/// Fixed part of a NACK (common header included), before the ranges.
pub const NACK_FIXED_LEN: usize = 9;
/// INITs are padded to at least this size, so a COOKIE (43 bytes) never
/// amplifies what a spoofing attacker sends.
pub const INIT_MIN_LEN: usize = 64;
/// Length of a COOKIE packet.
pub const COOKIE_LEN: usize = 43;
/// Length of a CONN_REQ packet.
pub const CONN_REQ_LEN: usize = 39;
/// Length of a CONN_ACK packet without a ticket.
pub const CONN_ACK_LEN: usize = 12;
/// Length of a CONN_ACK packet carrying a resumption [`Ticket`].
pub const CONN_ACK_TICKET_LEN: usize = CONN_ACK_LEN + 4 + MAC_LEN;
/// Most SACK ranges a PACK may carry.
pub const MAX_SACK_RANGES: usize = 16;
/// Most packet-number ranges a NACK may carry.
pub const MAX_NACK_RANGES: usize = 32;
/// Length of the truncated cookie MAC.
pub const MAC_LEN: usize = 16;

/// DATA flag: this packet ends the sender's byte stream.
pub const FLAG_FIN: u16 = 0x0001;
/// PACK flag: the receiver has the sender's FIN and every byte before it.
pub const FLAG_FIN_RECEIVED: u16 = 0x0001;

/// Why a datagram was rejected by the parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than its type requires, or longer than its length fields say.
    Truncated,
    /// Unknown protocol version.
    Version,
    /// Unknown packet type.
    Type,
    /// A field holds a value the protocol does not allow.
    Malformed,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            WireError::Truncated => "truncated or over-long packet",
            WireError::Version => "unsupported protocol version",
            WireError::Type => "unknown packet type",
            WireError::Malformed => "malformed field",
        };
        f.write_str(s)
    }
}

impl std::error::Error for WireError {}

/// Packet types (byte 1 of the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PacketType {
    /// Client hello; stateless on the server.
    Init = 1,
    /// Server reply to INIT carrying the MAC'd cookie.
    Cookie = 2,
    /// Client echoes the cookie; the server allocates state only now.
    ConnReq = 3,
    /// Server confirms the connection.
    ConnAck = 4,
    /// Stream data (and FIN).
    Data = 5,
    /// Periodic receiver report: cumulative ack, SACK, rate, loss, window.
    Pack = 6,
    /// Missing packet-number ranges.
    Nack = 7,
    /// Liveness probe with no content.
    Keepalive = 8,
    /// Abort the connection.
    Reset = 9,
}

impl PacketType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => PacketType::Init,
            2 => PacketType::Cookie,
            3 => PacketType::ConnReq,
            4 => PacketType::ConnAck,
            5 => PacketType::Data,
            6 => PacketType::Pack,
            7 => PacketType::Nack,
            8 => PacketType::Keepalive,
            9 => PacketType::Reset,
            _ => return None,
        })
    }
}

/// Rate-control mode as carried in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RateMode {
    /// BBR-like model-based control (default).
    #[default]
    Bbr,
    /// FillP: send at the windowed maximum receiver-reported rate.
    Fillp,
    /// A fixed configured rate.
    Fixed,
}

impl RateMode {
    /// Wire encoding.
    pub fn to_u8(self) -> u8 {
        match self {
            RateMode::Bbr => 0,
            RateMode::Fillp => 1,
            RateMode::Fixed => 2,
        }
    }
    /// Decode; `None` for unknown values.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(RateMode::Bbr),
            1 => Some(RateMode::Fillp),
            2 => Some(RateMode::Fixed),
            _ => None,
        }
    }
}

/// A read-only (or read-write) view of a packet in a buffer.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn be16(b: &[u8], off: usize) -> u16 {
    match b.get(off..off + 2) {
        Some(s) => u16::from_be_bytes([s[0], s[1]]),
        None => 0,
    }
}
fn be32(b: &[u8], off: usize) -> u32 {
    match b.get(off..off + 4) {
        Some(s) => u32::from_be_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}
fn be64(b: &[u8], off: usize) -> u64 {
    match b.get(off..off + 8) {
        Some(s) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_be_bytes(a)
        }
        None => 0,
    }
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap without checking; accessors still never panic.
    pub fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Wrap and validate all lengths for the packet's type.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let p = Packet { buffer };
        p.check_len()?;
        Ok(p)
    }

    /// Validate version, type and every length field against the buffer.
    pub fn check_len(&self) -> Result<(), WireError> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[0] != VERSION {
            return Err(WireError::Version);
        }
        let ty = PacketType::from_u8(b[1]).ok_or(WireError::Type)?;
        let ok = match ty {
            PacketType::Init => b.len() >= INIT_MIN_LEN,
            PacketType::Cookie => b.len() == COOKIE_LEN,
            PacketType::ConnReq => b.len() == CONN_REQ_LEN,
            PacketType::ConnAck => b.len() == CONN_ACK_LEN || b.len() == CONN_ACK_TICKET_LEN,
            PacketType::Data => {
                b.len() >= DATA_HEADER_LEN && b.len() == DATA_HEADER_LEN + usize::from(be16(b, 24))
            }
            PacketType::Pack => {
                b.len() >= PACK_FIXED_LEN && b.len() == PACK_FIXED_LEN + 8 * usize::from(b[46])
            }
            PacketType::Nack => {
                b.len() >= NACK_FIXED_LEN && b.len() == NACK_FIXED_LEN + 8 * usize::from(b[8])
            }
            PacketType::Keepalive | PacketType::Reset => b.len() == HEADER_LEN,
        };
        if ok {
            Ok(())
        } else {
            Err(WireError::Truncated)
        }
    }

    /// Unwrap the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Protocol version.
    pub fn version(&self) -> u8 {
        self.b().first().copied().unwrap_or(0)
    }
    /// Packet type, if known.
    pub fn packet_type(&self) -> Option<PacketType> {
        PacketType::from_u8(self.b().get(1).copied().unwrap_or(0))
    }
    /// Flags.
    pub fn flags(&self) -> u16 {
        be16(self.b(), 2)
    }
    /// Destination connection ID (0 on INIT).
    pub fn dst_cid(&self) -> u32 {
        be32(self.b(), 4)
    }
    /// INIT / COOKIE / CONN_REQ / CONN_ACK: the sender's own connection ID.
    pub fn src_cid(&self) -> u32 {
        be32(self.b(), 8)
    }
    /// Handshake: maximum payload size.
    pub fn hs_mtu(&self) -> u16 {
        be16(self.b(), 12)
    }
    /// Handshake: the sender's receive window.
    pub fn hs_window(&self) -> u32 {
        be32(self.b(), 14)
    }
    /// Handshake: raw rate mode byte.
    pub fn hs_mode(&self) -> u8 {
        self.b().get(18).copied().unwrap_or(0)
    }
    /// INIT: client timestamp; COOKIE: echoed client timestamp; CONN_REQ: cookie time.
    pub fn hs_time(&self) -> u32 {
        be32(self.b(), 19)
    }
    /// COOKIE: cookie time (ms on the server's clock).
    pub fn cookie_time(&self) -> u32 {
        be32(self.b(), 23)
    }
    /// CONN_ACK with a ticket: the ticket's time (ms on the server's clock).
    pub fn ticket_time(&self) -> u32 {
        be32(self.b(), 12)
    }
    /// COOKIE (offset 27) / CONN_REQ (offset 23) / CONN_ACK (offset 16,
    /// the ticket's): the MAC.
    pub fn mac(&self) -> [u8; MAC_LEN] {
        let off = match self.packet_type() {
            Some(PacketType::Cookie) => 27,
            Some(PacketType::ConnAck) => 16,
            _ => 23,
        };
        let mut m = [0u8; MAC_LEN];
        if let Some(s) = self.b().get(off..off + MAC_LEN) {
            m.copy_from_slice(s);
        }
        m
    }
    /// DATA: packet number.
    pub fn data_pn(&self) -> u32 {
        be32(self.b(), 8)
    }
    /// DATA: stream offset of the first payload byte.
    pub fn data_offset(&self) -> u64 {
        be64(self.b(), 12)
    }
    /// DATA: sender timestamp (µs, wrapping).
    pub fn data_timestamp(&self) -> u32 {
        be32(self.b(), 20)
    }
    /// DATA: payload (empty if the view is short).
    pub fn payload(&self) -> &[u8] {
        let len = usize::from(be16(self.b(), 24));
        self.b()
            .get(DATA_HEADER_LEN..DATA_HEADER_LEN + len)
            .unwrap_or(&[])
    }
    /// PACK: cumulative ack.
    pub fn pack_cum_ack(&self) -> u64 {
        be64(self.b(), 8)
    }
    /// PACK: highest packet number received.
    pub fn pack_highest_pn(&self) -> u32 {
        be32(self.b(), 16)
    }
    /// PACK: timestamp of the highest-numbered packet, echoed.
    pub fn pack_echo_ts(&self) -> u32 {
        be32(self.b(), 20)
    }
    /// PACK: µs between receiving that packet and sending this PACK.
    pub fn pack_ack_delay(&self) -> u32 {
        be32(self.b(), 24)
    }
    /// PACK: total payload bytes received.
    pub fn pack_rx_bytes(&self) -> u64 {
        be64(self.b(), 28)
    }
    /// PACK: measured receive rate in bytes/s.
    pub fn pack_rate(&self) -> u32 {
        be32(self.b(), 36)
    }
    /// PACK: measured loss, in 1/65536.
    pub fn pack_loss(&self) -> u16 {
        be16(self.b(), 40)
    }
    /// PACK: receive window beyond the cumulative ack.
    pub fn pack_window(&self) -> u32 {
        be32(self.b(), 42)
    }
    /// PACK: number of SACK ranges.
    pub fn pack_sack_count(&self) -> usize {
        usize::from(self.b().get(46).copied().unwrap_or(0))
    }
    /// PACK: SACK range `i` as (start relative to cum ack, length).
    pub fn pack_sack(&self, i: usize) -> (u32, u32) {
        let off = PACK_FIXED_LEN + 8 * i;
        (be32(self.b(), off), be32(self.b(), off + 4))
    }
    /// NACK: number of ranges.
    pub fn nack_count(&self) -> usize {
        usize::from(self.b().get(8).copied().unwrap_or(0))
    }
    /// NACK: range `i` as (first, last) packet numbers, inclusive.
    pub fn nack_range(&self, i: usize) -> (u32, u32) {
        let off = NACK_FIXED_LEN + 8 * i;
        (be32(self.b(), off), be32(self.b(), off + 4))
    }
}

/// Handshake parameters proposed or agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HsParams {
    /// Maximum UDP payload size.
    pub mtu: u16,
    /// Receive window of the packet's sender.
    pub window: u32,
    /// Rate-control mode.
    pub mode: RateMode,
}

/// A SACK range relative to the cumulative ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SackRange {
    /// Start offset minus the cumulative ack.
    pub start: u32,
    /// Length in bytes (non-zero).
    pub len: u32,
}

/// An inclusive packet-number range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PnRange {
    /// First missing packet number.
    pub first: u32,
    /// Last missing packet number.
    pub last: u32,
}

/// A parsed PACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackRepr {
    /// Next byte the receiver expects.
    pub cum_ack: u64,
    /// FIN and all bytes before it are in.
    pub fin_received: bool,
    /// Highest packet number received.
    pub highest_pn: u32,
    /// Timestamp of that packet, echoed.
    pub echo_ts: u32,
    /// Time between its receipt and this PACK, µs.
    pub ack_delay_us: u32,
    /// Total payload bytes received.
    pub rx_bytes: u64,
    /// Receive rate, bytes/s.
    pub rate: u32,
    /// Loss over the last interval, 1/65536.
    pub loss: u16,
    /// Window beyond `cum_ack`.
    pub window: u32,
    /// Number of valid entries in `sack`.
    pub sack_len: u8,
    /// SACK ranges, ascending.
    pub sack: [SackRange; MAX_SACK_RANGES],
}

impl PackRepr {
    /// The valid SACK ranges.
    pub fn sacks(&self) -> &[SackRange] {
        &self.sack[..usize::from(self.sack_len)]
    }
}

/// A parsed NACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NackRepr {
    /// Number of valid entries in `ranges`.
    pub len: u8,
    /// Missing packet-number ranges.
    pub ranges: [PnRange; MAX_NACK_RANGES],
}

impl NackRepr {
    /// The valid ranges.
    pub fn ranges(&self) -> &[PnRange] {
        &self.ranges[..usize::from(self.len)]
    }
}

/// A parsed DATA packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRepr<'a> {
    /// Per-transmission packet number.
    pub pn: u32,
    /// Stream offset of the first payload byte.
    pub offset: u64,
    /// Sender timestamp, µs (wrapping).
    pub timestamp: u32,
    /// Ends the stream at `offset + payload.len()`.
    pub fin: bool,
    /// Payload bytes.
    pub payload: &'a [u8],
}

impl DataRepr<'_> {
    /// Appends a whole DATA header (common header included) for a payload of
    /// `len` bytes, which the caller appends next; `self.payload` is not
    /// used. This lets a sender copy the payload once, straight from its
    /// send buffer into the datagram.
    pub fn emit_header(&self, dst_cid: u32, len: u16, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.push(PacketType::Data as u8);
        let flags: u16 = if self.fin { FLAG_FIN } else { 0 };
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&dst_cid.to_be_bytes());
        self.emit_fields(len, out);
    }

    fn emit_fields(&self, len: u16, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pn.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// The body of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// INIT: client CID, proposed parameters, client timestamp.
    Init {
        /// Client connection ID.
        client_cid: u32,
        /// Proposal.
        params: HsParams,
        /// Client µs timestamp, echoed in COOKIE.
        timestamp: u32,
    },
    /// COOKIE: server CID, agreed parameters, echo, cookie.
    Cookie {
        /// Server connection ID (chosen statelessly).
        server_cid: u32,
        /// Agreed MTU and mode; `window` is the server's.
        params: HsParams,
        /// Echoed client timestamp.
        echo: u32,
        /// Cookie time, ms on the server's clock.
        cookie_time: u32,
        /// Truncated HMAC over the cookie fields.
        mac: [u8; MAC_LEN],
    },
    /// CONN_REQ: the client echoes the cookie; or, sent with destination
    /// connection ID 0 (the server has chosen none yet), a resumption
    /// [`Ticket`] from an earlier connection's CONN_ACK instead, with no
    /// INIT before it.
    ConnReq {
        /// Client connection ID.
        client_cid: u32,
        /// Agreed parameters; `window` is the client's.
        params: HsParams,
        /// Cookie time from COOKIE (or the ticket's time).
        cookie_time: u32,
        /// MAC from COOKIE (or the ticket's).
        mac: [u8; MAC_LEN],
    },
    /// CONN_ACK: server confirms.
    ConnAck {
        /// Server connection ID.
        server_cid: u32,
        /// A ticket for the client's next connections to this server.
        ticket: Option<Ticket>,
    },
    /// Stream data.
    Data(DataRepr<'a>),
    /// Receiver report.
    Pack(PackRepr),
    /// Missing packet numbers.
    Nack(NackRepr),
    /// Liveness.
    Keepalive,
    /// Abort.
    Reset,
}

/// A resumption ticket: the server's proof that the client received at its
/// IP address, which lets a later CONN_REQ skip the INIT/COOKIE round trip
/// (see [`crate::fillp::cookie`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// Mint time, ms on the server's clock.
    pub time: u32,
    /// Truncated HMAC over the client's IP address and `time`.
    pub mac: [u8; MAC_LEN],
}

/// A parsed packet: destination connection ID plus body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr<'a> {
    /// Destination connection ID (0 for INIT).
    pub dst_cid: u32,
    /// The typed body.
    pub body: Body<'a>,
}

fn hs_params<T: AsRef<[u8]>>(p: &Packet<T>) -> Result<HsParams, WireError> {
    let mode = RateMode::from_u8(p.hs_mode()).ok_or(WireError::Malformed)?;
    let mtu = p.hs_mtu();
    if mtu < MIN_MTU {
        return Err(WireError::Malformed);
    }
    Ok(HsParams {
        mtu,
        window: p.hs_window(),
        mode,
    })
}

/// Smallest MTU (UDP payload) a peer may propose.
pub const MIN_MTU: u16 = 128;

impl<'a> Repr<'a> {
    /// Parse and validate a checked packet.
    pub fn parse(p: &Packet<&'a [u8]>) -> Result<Repr<'a>, WireError> {
        p.check_len()?;
        let ty = p.packet_type().ok_or(WireError::Type)?;
        let dst_cid = p.dst_cid();
        let flags = p.flags();
        // Only DATA and PACK define flags; anything else must be zero so the
        // bits stay usable by later versions.
        let allowed = match ty {
            PacketType::Data | PacketType::Pack => FLAG_FIN,
            _ => 0,
        };
        if flags & !allowed != 0 {
            return Err(WireError::Malformed);
        }
        // Only an INIT, or a CONN_REQ with a ticket, names no connection.
        let unaddressed = matches!(ty, PacketType::Init | PacketType::ConnReq);
        if (ty == PacketType::Init && dst_cid != 0) || (!unaddressed && dst_cid == 0) {
            return Err(WireError::Malformed);
        }
        let body = match ty {
            PacketType::Init => Body::Init {
                client_cid: nonzero(p.src_cid())?,
                params: hs_params(p)?,
                timestamp: p.hs_time(),
            },
            PacketType::Cookie => Body::Cookie {
                server_cid: nonzero(p.src_cid())?,
                params: hs_params(p)?,
                echo: p.hs_time(),
                cookie_time: p.cookie_time(),
                mac: p.mac(),
            },
            PacketType::ConnReq => Body::ConnReq {
                client_cid: nonzero(p.src_cid())?,
                params: hs_params(p)?,
                cookie_time: p.hs_time(),
                mac: p.mac(),
            },
            PacketType::ConnAck => Body::ConnAck {
                server_cid: nonzero(p.src_cid())?,
                ticket: (p.buffer.len() == CONN_ACK_TICKET_LEN).then(|| Ticket {
                    time: p.ticket_time(),
                    mac: p.mac(),
                }),
            },
            PacketType::Data => {
                // Slice the underlying buffer so the payload borrows `'a`,
                // not the view.
                let buf: &'a [u8] = p.buffer;
                let len = usize::from(be16(buf, 24));
                let payload = buf
                    .get(DATA_HEADER_LEN..DATA_HEADER_LEN + len)
                    .ok_or(WireError::Truncated)?;
                let offset = p.data_offset();
                // The stream may never pass 2^62 bytes; keeps all offset
                // arithmetic far from overflow.
                if offset
                    .checked_add(payload.len() as u64)
                    .is_none_or(|e| e > MAX_OFFSET)
                {
                    return Err(WireError::Malformed);
                }
                Body::Data(DataRepr {
                    pn: p.data_pn(),
                    offset,
                    timestamp: p.data_timestamp(),
                    fin: flags & FLAG_FIN != 0,
                    payload,
                })
            }
            PacketType::Pack => {
                let n = p.pack_sack_count();
                if n > MAX_SACK_RANGES {
                    return Err(WireError::Malformed);
                }
                let cum_ack = p.pack_cum_ack();
                if cum_ack > MAX_OFFSET {
                    return Err(WireError::Malformed);
                }
                let mut sack = [SackRange::default(); MAX_SACK_RANGES];
                let mut prev_end = 0u64;
                for (i, s) in sack.iter_mut().enumerate().take(n) {
                    let (start, len) = p.pack_sack(i);
                    // Ascending, non-empty, non-adjacent and beyond the cum ack.
                    if len == 0 || u64::from(start) <= prev_end {
                        return Err(WireError::Malformed);
                    }
                    prev_end = u64::from(start) + u64::from(len);
                    *s = SackRange { start, len };
                }
                Body::Pack(PackRepr {
                    cum_ack,
                    fin_received: flags & FLAG_FIN_RECEIVED != 0,
                    highest_pn: p.pack_highest_pn(),
                    echo_ts: p.pack_echo_ts(),
                    ack_delay_us: p.pack_ack_delay(),
                    rx_bytes: p.pack_rx_bytes(),
                    rate: p.pack_rate(),
                    loss: p.pack_loss(),
                    window: p.pack_window(),
                    sack_len: n as u8,
                    sack,
                })
            }
            PacketType::Nack => {
                let n = p.nack_count();
                if n == 0 || n > MAX_NACK_RANGES {
                    return Err(WireError::Malformed);
                }
                let mut ranges = [PnRange::default(); MAX_NACK_RANGES];
                for (i, r) in ranges.iter_mut().enumerate().take(n) {
                    let (first, last) = p.nack_range(i);
                    if first > last {
                        return Err(WireError::Malformed);
                    }
                    *r = PnRange { first, last };
                }
                Body::Nack(NackRepr {
                    len: n as u8,
                    ranges,
                })
            }
            PacketType::Keepalive => Body::Keepalive,
            PacketType::Reset => Body::Reset,
        };
        Ok(Repr { dst_cid, body })
    }

    /// Parse straight from bytes.
    pub fn parse_bytes(data: &'a [u8]) -> Result<Repr<'a>, WireError> {
        Repr::parse(&Packet::new_checked(data)?)
    }

    /// Length of the emitted packet.
    pub fn buffer_len(&self) -> usize {
        match &self.body {
            Body::Init { .. } => INIT_MIN_LEN,
            Body::Cookie { .. } => COOKIE_LEN,
            Body::ConnReq { .. } => CONN_REQ_LEN,
            Body::ConnAck { ticket: None, .. } => CONN_ACK_LEN,
            Body::ConnAck {
                ticket: Some(_), ..
            } => CONN_ACK_TICKET_LEN,
            Body::Data(d) => DATA_HEADER_LEN + d.payload.len(),
            Body::Pack(p) => PACK_FIXED_LEN + 8 * usize::from(p.sack_len),
            Body::Nack(n) => NACK_FIXED_LEN + 8 * usize::from(n.len),
            Body::Keepalive | Body::Reset => HEADER_LEN,
        }
    }

    /// Append the packet to `out`.
    ///
    /// DATA payloads longer than `u16::MAX` and more ranges than the maxima
    /// are the caller's bug; they are truncated rather than emitted corrupt.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let (ty, flags) = match &self.body {
            Body::Init { .. } => (PacketType::Init, 0),
            Body::Cookie { .. } => (PacketType::Cookie, 0),
            Body::ConnReq { .. } => (PacketType::ConnReq, 0),
            Body::ConnAck { .. } => (PacketType::ConnAck, 0),
            Body::Data(d) => (PacketType::Data, if d.fin { FLAG_FIN } else { 0 }),
            Body::Pack(p) => (
                PacketType::Pack,
                if p.fin_received { FLAG_FIN_RECEIVED } else { 0 },
            ),
            Body::Nack(_) => (PacketType::Nack, 0),
            Body::Keepalive => (PacketType::Keepalive, 0),
            Body::Reset => (PacketType::Reset, 0),
        };
        out.push(VERSION);
        out.push(ty as u8);
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&self.dst_cid.to_be_bytes());
        let hs = |out: &mut Vec<u8>, cid: u32, p: &HsParams, t: u32| {
            out.extend_from_slice(&cid.to_be_bytes());
            out.extend_from_slice(&p.mtu.to_be_bytes());
            out.extend_from_slice(&p.window.to_be_bytes());
            out.push(p.mode.to_u8());
            out.extend_from_slice(&t.to_be_bytes());
        };
        match &self.body {
            Body::Init {
                client_cid,
                params,
                timestamp,
            } => {
                let start = out.len() - HEADER_LEN;
                hs(out, *client_cid, params, *timestamp);
                out.resize(start + INIT_MIN_LEN, 0);
            }
            Body::Cookie {
                server_cid,
                params,
                echo,
                cookie_time,
                mac,
            } => {
                hs(out, *server_cid, params, *echo);
                out.extend_from_slice(&cookie_time.to_be_bytes());
                out.extend_from_slice(mac);
            }
            Body::ConnReq {
                client_cid,
                params,
                cookie_time,
                mac,
            } => {
                hs(out, *client_cid, params, *cookie_time);
                out.extend_from_slice(mac);
            }
            Body::ConnAck { server_cid, ticket } => {
                out.extend_from_slice(&server_cid.to_be_bytes());
                if let Some(t) = ticket {
                    out.extend_from_slice(&t.time.to_be_bytes());
                    out.extend_from_slice(&t.mac);
                }
            }
            Body::Data(d) => {
                let len = d.payload.len().min(usize::from(u16::MAX));
                d.emit_fields(len as u16, out);
                out.extend_from_slice(&d.payload[..len]);
            }
            Body::Pack(p) => {
                out.extend_from_slice(&p.cum_ack.to_be_bytes());
                out.extend_from_slice(&p.highest_pn.to_be_bytes());
                out.extend_from_slice(&p.echo_ts.to_be_bytes());
                out.extend_from_slice(&p.ack_delay_us.to_be_bytes());
                out.extend_from_slice(&p.rx_bytes.to_be_bytes());
                out.extend_from_slice(&p.rate.to_be_bytes());
                out.extend_from_slice(&p.loss.to_be_bytes());
                out.extend_from_slice(&p.window.to_be_bytes());
                let n = usize::from(p.sack_len).min(MAX_SACK_RANGES);
                out.push(n as u8);
                for s in &p.sack[..n] {
                    out.extend_from_slice(&s.start.to_be_bytes());
                    out.extend_from_slice(&s.len.to_be_bytes());
                }
            }
            Body::Nack(n) => {
                let k = usize::from(n.len).min(MAX_NACK_RANGES);
                out.push(k as u8);
                for r in &n.ranges[..k] {
                    out.extend_from_slice(&r.first.to_be_bytes());
                    out.extend_from_slice(&r.last.to_be_bytes());
                }
            }
            Body::Keepalive | Body::Reset => {}
        }
    }
}

/// Largest stream offset a peer may use (2^62).
pub const MAX_OFFSET: u64 = 1 << 62;

fn nonzero(cid: u32) -> Result<u32, WireError> {
    if cid == 0 {
        Err(WireError::Malformed)
    } else {
        Ok(cid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[rustfmt::skip]
    const DATA_FIXTURE: [u8; 29] = [
        1, 5, 0x00, 0x01,           // version, DATA, flags = FIN
        0xde, 0xad, 0xbe, 0xef,     // dst cid
        0, 0, 0, 7,                 // pn 7
        0, 0, 0, 0, 0, 0, 0x10, 0,  // offset 4096
        0, 0, 0x03, 0xe8,           // timestamp 1000
        0, 3,                       // length 3
        b'a', b'b', b'c',
    ];

    #[test]
    fn data_fixture_round_trip() {
        let r = Repr::parse_bytes(&DATA_FIXTURE).unwrap();
        assert_eq!(r.dst_cid, 0xdeadbeef);
        let Body::Data(d) = r.body else { panic!() };
        assert_eq!((d.pn, d.offset, d.timestamp, d.fin), (7, 4096, 1000, true));
        assert_eq!(d.payload, b"abc");
        let mut out = Vec::new();
        r.emit(&mut out);
        assert_eq!(out, DATA_FIXTURE);
        assert_eq!(r.buffer_len(), out.len());
    }

    #[test]
    fn data_length_must_match() {
        let mut b = DATA_FIXTURE.to_vec();
        b.push(0);
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            Packet::new_checked(&DATA_FIXTURE[..28]).unwrap_err(),
            WireError::Truncated
        );
    }

    #[rustfmt::skip]
    const PACK_FIXTURE: [u8; 55] = [
        1, 6, 0, 1, 0, 0, 0, 9,
        0, 0, 0, 0, 0, 0, 0x01, 0x00, // cum ack 256
        0, 0, 0, 42,                  // highest pn
        0, 0, 0, 5,                   // echo ts
        0, 0, 0, 100,                 // ack delay
        0, 0, 0, 0, 0, 0, 0x02, 0,    // rx bytes 512
        0, 0x01, 0, 0,                // rate 65536
        0x80, 0,                      // loss 0.5
        0, 0x10, 0, 0,                // window 1 MiB
        1,                            // one SACK range
        0, 0, 0, 10, 0, 0, 0, 20,     // [cum+10, +20)
    ];

    #[test]
    fn pack_fixture_round_trip() {
        let r = Repr::parse_bytes(&PACK_FIXTURE).unwrap();
        let Body::Pack(p) = r.body else { panic!() };
        assert_eq!(p.cum_ack, 256);
        assert!(p.fin_received);
        assert_eq!((p.highest_pn, p.echo_ts, p.ack_delay_us), (42, 5, 100));
        assert_eq!(
            (p.rx_bytes, p.rate, p.loss, p.window),
            (512, 65536, 0x8000, 1 << 20)
        );
        assert_eq!(p.sacks(), &[SackRange { start: 10, len: 20 }]);
        let mut out = Vec::new();
        r.emit(&mut out);
        assert_eq!(out, PACK_FIXTURE);
    }

    #[test]
    fn pack_rejects_unordered_sack() {
        let mut b = PACK_FIXTURE.to_vec();
        b[46] = 2;
        b.extend_from_slice(&[0, 0, 0, 5, 0, 0, 0, 1]); // starts inside the first
        assert_eq!(Repr::parse_bytes(&b).unwrap_err(), WireError::Malformed);
    }

    #[test]
    fn handshake_round_trips() {
        let params = HsParams {
            mtu: 1400,
            window: 65536,
            mode: RateMode::Fillp,
        };
        let all = [
            Repr {
                dst_cid: 0,
                body: Body::Init {
                    client_cid: 3,
                    params,
                    timestamp: 11,
                },
            },
            Repr {
                dst_cid: 3,
                body: Body::Cookie {
                    server_cid: 4,
                    params,
                    echo: 11,
                    cookie_time: 12,
                    mac: [9; MAC_LEN],
                },
            },
            Repr {
                dst_cid: 4,
                body: Body::ConnReq {
                    client_cid: 3,
                    params,
                    cookie_time: 12,
                    mac: [9; MAC_LEN],
                },
            },
            // With a ticket instead of a cookie: no server CID yet.
            Repr {
                dst_cid: 0,
                body: Body::ConnReq {
                    client_cid: 3,
                    params,
                    cookie_time: 13,
                    mac: [8; MAC_LEN],
                },
            },
            Repr {
                dst_cid: 3,
                body: Body::ConnAck {
                    server_cid: 4,
                    ticket: None,
                },
            },
            Repr {
                dst_cid: 3,
                body: Body::ConnAck {
                    server_cid: 4,
                    ticket: Some(Ticket {
                        time: 14,
                        mac: [7; MAC_LEN],
                    }),
                },
            },
            Repr {
                dst_cid: 3,
                body: Body::Keepalive,
            },
            Repr {
                dst_cid: 3,
                body: Body::Reset,
            },
        ];
        for r in all {
            let mut out = Vec::new();
            r.emit(&mut out);
            assert_eq!(out.len(), r.buffer_len());
            assert_eq!(Repr::parse_bytes(&out).unwrap(), r);
        }
    }

    #[test]
    fn init_fixture() {
        let mut b = vec![
            1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0x05, 0x78, 0, 1, 0, 0, 1, 0, 0, 0, 2,
        ];
        b.resize(INIT_MIN_LEN, 0);
        let r = Repr::parse_bytes(&b).unwrap();
        assert_eq!(
            r.body,
            Body::Init {
                client_cid: 5,
                params: HsParams {
                    mtu: 1400,
                    window: 65536,
                    mode: RateMode::Fillp
                },
                timestamp: 2
            }
        );
        // Unpadded INITs are refused (anti-amplification).
        assert!(Repr::parse_bytes(&b[..40]).is_err());
        // INIT must carry destination CID 0.
        b[7] = 1;
        assert_eq!(Repr::parse_bytes(&b).unwrap_err(), WireError::Malformed);
    }

    #[test]
    fn nack_fixture() {
        let b = [1, 7, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 3, 0, 0, 0, 5];
        let r = Repr::parse_bytes(&b).unwrap();
        let Body::Nack(n) = r.body else { panic!() };
        assert_eq!(n.ranges(), &[PnRange { first: 3, last: 5 }]);
        let mut bad = b;
        bad[12] = 6; // first > last
        assert!(Repr::parse_bytes(&bad).is_err());
    }

    #[test]
    fn unchecked_accessors_never_panic() {
        let p = Packet::new_unchecked(&[1u8, 6][..]);
        let _ = (
            p.pack_sack(15),
            p.payload(),
            p.mac(),
            p.pack_rx_bytes(),
            p.nack_range(40),
        );
        assert_eq!(
            Packet::new_checked(&[2u8; 8][..]).unwrap_err(),
            WireError::Version
        );
        assert_eq!(
            Packet::new_checked(&[1u8, 99, 0, 0, 0, 0, 0, 1][..]).unwrap_err(),
            WireError::Type
        );
    }
}
