//! Choosing and building the next datagram: control packets, then DATA
//! (paced, capped in flight and by the peer's window), then KEEPALIVE.

use std::time::Instant;

use bytes::Bytes;

use super::super::cc::RateController;
use super::super::pacer::Pacer;
use super::super::send_buf::{NextSegment, SendBuf};
use super::super::train::Train;
use super::super::wire::{Body, DataRepr, Repr, DATA_HEADER_LEN};
use super::{us_since, Connection, State, Transmit};

/// Before the handshake is confirmed, a client sends at most this many
/// packets (or one round at the pacing rate, if more) of early data: a
/// server that refuses must not be sent more.
const EARLY_FLIGHT_PACKETS: u64 = 40;

/// The datagram size below which [`Connection::segment_payload`] does not
/// shrink packets: FillP's default, room for a tunnel on Ethernet paths.
pub(super) const BASE_DATAGRAM: u16 = 1400;

/// The sending half: the send buffer, the peer's window, rate control and
/// pacing, and what the next DATA packet must be.
pub(super) struct Sender {
    pub(super) buf: SendBuf,
    /// Stream offset the peer's window lets us send up to (only grows).
    pub(super) peer_limit: u64,
    /// Packet number of the next DATA packet.
    pub(super) next_pn: u32,
    pub(super) cc: Box<dyn RateController>,
    pub(super) pacer: Pacer,
    /// While the pacer holds the next DATA packet back: when it may go.
    pub(super) pace_at: Option<Instant>,
    /// The first flight's back-to-back train.
    pub(super) train: Train,
    /// A tail-loss or RTO probe is queued: it goes even into a full window.
    pub(super) probe_pending: bool,
    /// Offset of a segment lost again after a retransmission: a second
    /// copy goes right behind it.
    pub(super) dup_next: Option<u64>,
    /// A write came up short: the writer waits for [`super::Event::Writable`].
    pub(super) write_blocked: bool,
}

impl Sender {
    pub(super) fn new(send_buffer: usize, cc: Box<dyn RateController>) -> Self {
        Sender {
            buf: SendBuf::new(send_buffer),
            peer_limit: 0,
            next_pn: 0,
            cc,
            pacer: Pacer::new(),
            pace_at: None,
            train: Train::default(),
            probe_pending: false,
            dup_next: None,
            write_blocked: false,
        }
    }
}

impl Connection {
    /// Builds the next datagram into `buf` (and `body`, see
    /// [`Connection::poll_transmit_parts`]) and counts it.
    pub(super) fn transmit(
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
        self.timers.last_tx = now;
        Some(Transmit {
            destination: self.remote,
            size,
        })
    }

    /// Returns `Some((Some(repr), 0))` to emit `repr`, `Some((None, n))` if
    /// the packet was already written into `buf` (with `n` payload bytes in
    /// `body`, if given), `None` if there is nothing to send.
    pub(super) fn next_packet(
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
    pub(super) fn next_data(
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
        if self.state == State::Established
            && now >= self.timers.last_tx + self.keepalive_interval()
        {
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
    pub(super) fn next_control(&mut self, now: Instant) -> Option<Repr<'static>> {
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
        if self.hs.send_conn_ack {
            self.hs.send_conn_ack = false;
            return Some(Repr {
                dst_cid: dst,
                body: Body::ConnAck {
                    server_cid: self.local_cid,
                },
            });
        }
        if self.rx.nack_check.is_some_and(|t| now >= t) {
            if let Some(n) = self.rx.build_nack(now, self.rtt.srtt()) {
                self.stats.nacks_sent += 1;
                return Some(Repr {
                    dst_cid: dst,
                    body: Body::Nack(n),
                });
            }
        }
        let pack_due = self.rx.pack_due(
            now,
            self.timers.last_rx,
            self.config.pack_interval,
            self.config.pack_every,
        );
        if pack_due {
            let p = self.rx.build_pack(now);
            self.stats.packs_sent += 1;
            return Some(Repr {
                dst_cid: dst,
                body: Body::Pack(p),
            });
        }
        None
    }

    /// In flight needed to keep sending between two of the peer's PACKs:
    /// it sends one every `pack_every` Ethernet-sized packets (at least one
    /// datagram) or `pack_interval`, whichever comes first; twice that.
    pub(super) fn report_cadence(&self) -> u64 {
        let per_interval =
            (self.tx.cc.pacing_rate() as f64 * self.config.pack_interval.as_secs_f64()) as u64;
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
    pub(super) fn inflight_limit(&self) -> u64 {
        let mtu = u64::from(self.mtu);
        let cap = self.tx.cc.inflight_cap().max(self.report_cadence());
        if self.state == State::Handshake {
            // Early data: one round at the pacing rate (the srtt is the
            // COOKIE exchange's), at least a first flight.
            let round = (self.tx.cc.pacing_rate() as f64 * self.rtt.srtt().as_secs_f64()) as u64;
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
    pub(super) fn segment_payload(&self) -> usize {
        let mtu = self.send_mtu();
        let full = usize::from(mtu) - DATA_HEADER_LEN;
        let base = usize::from(mtu.min(BASE_DATAGRAM)) - DATA_HEADER_LEN;
        let quarter_ms = (self.tx.cc.pacing_rate() / 4000) as usize;
        quarter_ms.clamp(base, full)
    }

    /// Writes the next DATA packet's header into `buf` and its payload
    /// into `body` as shared slices if given, else into `buf` too. Returns
    /// the bytes put in `body`.
    pub(super) fn data_packet(
        &mut self,
        now: Instant,
        buf: &mut Vec<u8>,
        body: Option<&mut Vec<Bytes>>,
    ) -> Option<usize> {
        if !self.tx.buf.has_pending(self.tx.peer_limit) && self.tx.dup_next.is_none() {
            self.tx.pace_at = None;
            return None;
        }
        // A probe goes out even into a full window: it is what unblocks it.
        if self.pipe.bytes >= self.inflight_limit() && !self.tx.probe_pending {
            self.tx.pace_at = None;
            return None;
        }
        let max_payload = self.segment_payload();
        let size = max_payload + DATA_HEADER_LEN;
        if self.tx.next_pn == 0 {
            self.tx.train.plan(self.tx.cc.startup_train());
        }
        // The first flight's train skips pacing; the pacer still counts it,
        // so the round's average rate is unchanged.
        let burst = self.tx.train.may_burst(now);
        if !burst {
            if let Some(t) = self
                .tx
                .pacer
                .delay(now, self.tx.cc.pacing_rate(), size, size)
            {
                self.tx.pace_at = Some(t);
                return None;
            }
        }
        self.tx.pace_at = None;
        // A segment lost again after a retransmission goes out twice: on a
        // lossy path this cuts the tail of repeated losses that holds up the
        // cumulative ack (and with it the window) for several RTTs.
        let dup = self.tx.dup_next.take().and_then(|o| self.tx.buf.copy_of(o));
        let is_dup = dup.is_some();
        let seg: NextSegment = match dup {
            Some(d) => d,
            None => self.tx.buf.next_segment(max_payload, self.tx.peer_limit)?,
        };
        let pn = self.tx.next_pn;
        self.tx.next_pn = self.tx.next_pn.wrapping_add(1);
        self.tx.probe_pending = false;
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
                let n = self.tx.buf.slices(seg.offset, len, body);
                (n, n)
            }
            None => (self.tx.buf.copy(seg.offset, len, buf), 0),
        };
        if got != len {
            // The buffer clamps a stale range (never expected): keep the
            // length field true to what is sent rather than send a bad packet.
            if let Some(f) = buf.get_mut(DATA_HEADER_LEN - 2..DATA_HEADER_LEN) {
                f.copy_from_slice(&(got as u16).to_be_bytes());
            }
        }
        let size = DATA_HEADER_LEN + got;
        self.tx.pacer.on_sent(size);
        self.tx.train.on_sent(now, burst);
        if seg.retransmit {
            self.stats.retransmissions += 1;
        }
        if self.timers.loss_base.is_none() {
            self.timers.loss_base = Some(now);
        }
        self.tx.buf.on_sent(&seg, pn, now);
        // Judged after this packet left: nothing else waits to go.
        let app_limited = !self.tx.buf.has_pending(self.tx.peer_limit);
        self.pipe.on_sent(pn, size, now, app_limited);
        if seg.retransmit && !is_dup && self.tx.buf.tx_count(seg.offset) >= 3 {
            self.tx.dup_next = Some(seg.offset);
        }
        Some(in_body)
    }
}
