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
                    ticket: self.hs.ticket,
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::super::wire::HsParams;
    use super::super::testing::*;
    use super::super::Config;
    use super::*;

    const SEG: usize = 1400 - DATA_HEADER_LEN;

    #[test]
    fn control_packets_go_before_data() {
        let clk = Clock::new();
        let mut s = server(fixed(125_000_000), clk.t0, 1 << 20);
        s.write(&[1; 2000]).unwrap();
        // Data from the client too, so a PACK is due.
        s.handle_datagram(clk.t0, &data(SERVER_CID, 0, 0, b"x", false, 0));
        let kinds: Vec<_> = drain(&mut s, clk.t0)
            .iter()
            .map(|d| match parse(d).body {
                Body::ConnAck { .. } => "conn_ack",
                Body::Pack(_) => "pack",
                Body::Data(_) => "data",
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["conn_ack", "pack", "data", "data"]);
        // A reset goes first of all, and alone.
        s.write(&[1; 2000]).unwrap();
        s.reset();
        let sent = drain(&mut s, clk.t0);
        assert_eq!(sent.len(), 1);
        assert!(matches!(parse(&sent[0]).body, Body::Reset));
    }

    #[test]
    fn data_stops_at_the_peers_window() {
        let clk = Clock::new();
        let mut s = server(fixed(125_000_000), clk.t0, 5000);
        s.write(&[3; 20_000]).unwrap();
        let sent = data_of(&drain(&mut s, clk.t0));
        let want = [(0, 0, SEG), (1, SEG as u64, SEG), (2, 2 * SEG as u64, SEG)];
        assert_eq!(sent[..3], want);
        assert_eq!(sent[3], (3, 3 * SEG as u64, 5000 - 3 * SEG));
        assert_eq!(sent.len(), 4);
        assert!(!s.has_unsent());
        // The window moves on with the cumulative ack.
        let more = Report {
            cum_ack: 5000,
            highest_pn: 3,
            rx_bytes: 5000,
            window: 3000,
            ..Report::default()
        };
        s.handle_datagram(clk.at(20), &pack(SERVER_CID, more));
        let sent = data_of(&drain(&mut s, clk.at(20)));
        let at = |i: usize| 5000 + (i * SEG) as u64;
        assert_eq!(
            sent,
            [(4, at(0), SEG), (5, at(1), SEG), (6, at(2), 3000 - 2 * SEG)]
        );
    }

    #[test]
    fn pacing_spaces_packets_at_the_rate() {
        let clk = Clock::new();
        // 1.4 MB/s: one 1400-byte datagram a millisecond after a burst of two.
        let mut s = server(fixed(1_400_000), clk.t0, 1 << 20);
        s.write(&[0; 100_000]).unwrap();
        assert_eq!(data_of(&drain(&mut s, clk.t0)).len(), 2);
        assert_eq!(s.poll_timeout(), Some(clk.at(1)));
        let per_ms: Vec<_> = (1..=10)
            .map(|t| {
                let early = drain(&mut s, clk.at(t) - Duration::from_micros(1));
                assert!(early.is_empty());
                data_of(&drain(&mut s, clk.at(t))).len()
            })
            .collect();
        assert_eq!(per_ms, [1; 10]);
        assert_eq!(s.stats().bytes_sent, 12 * 1400 + 12);
    }

    #[test]
    fn large_datagrams_wait_for_a_rate_that_fills_them() {
        let clk = Clock::new();
        let big = |rate| {
            let cfg = Config {
                mtu: 9000,
                ..fixed(rate)
            };
            let params = HsParams {
                mtu: 9000,
                window: 1 << 20,
                mode: cfg.mode,
            };
            let mut s = Connection::new_server(
                cfg,
                clk.t0,
                peer(),
                SERVER_CID,
                CLIENT_CID,
                params,
                Some(ms(HS_RTT)),
            );
            s.write(&[0; 20_000]).unwrap();
            data_of(&drain(&mut s, clk.t0))[0].2
        };
        // A quarter of a millisecond at the rate, within 1400..=9000 bytes
        // of datagram.
        assert_eq!(big(1_250_000), SEG);
        assert_eq!(big(20_000_000), 5000);
        assert_eq!(big(1_000_000_000), 9000 - DATA_HEADER_LEN);
    }

    #[test]
    fn a_route_limit_caps_new_datagrams() {
        let clk = Clock::new();
        let mut s = server(fixed(125_000_000), clk.t0, 1 << 20);
        s.limit_datagram(1000);
        assert_eq!(s.stats().mtu, 1000);
        s.write(&[0; 3000]).unwrap();
        let lens: Vec<_> = data_of(&drain(&mut s, clk.t0))
            .iter()
            .map(|d| d.2)
            .collect();
        let seg = 1000 - DATA_HEADER_LEN;
        assert_eq!(lens, [seg, seg, seg, 3000 - 3 * seg]);
    }

    #[test]
    fn the_in_flight_floor_covers_two_pack_intervals() {
        let clk = Clock::new();
        let s = server(fixed(12_500_000), clk.t0, 1 << 20);
        // 125 kB per 10 ms interval, capped at two PACK quanta (2 x 32 x
        // 1400 bytes), plus two quanta.
        let quantum = 32 * 1400;
        assert_eq!(s.report_cadence(), 2 * quantum + 2 * quantum);
        let slow = server(fixed(1_250_000), clk.t0, 1 << 20);
        assert_eq!(slow.report_cadence(), 12_500 + 2 * quantum);
        // `fixed` has no cap of its own.
        assert_eq!(slow.inflight_limit(), u64::MAX);
    }

    #[test]
    fn an_established_client_sends_to_its_server() {
        let clk = Clock::new();
        let mut c = established_client(fixed(125_000_000), clk.t0, 1 << 20);
        c.write(b"hi").unwrap();
        let sent = drain(&mut c, clk.at(40));
        assert_eq!(sent.len(), 1);
        let r = parse(&sent[0]);
        assert_eq!(r.dst_cid, SERVER_CID);
        assert!(matches!(r.body, Body::Data(d) if d.payload == b"hi" && d.pn == 0));
    }
}
