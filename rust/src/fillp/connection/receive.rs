//! Receiving DATA: reassembly, the packet-number gaps behind NACKs, and the
//! PACK and NACK reports.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::super::recv_buf::RecvBuf;
use super::super::wire::{DataRepr, NackRepr, PackRepr, PnRange, DATA_HEADER_LEN, MAX_NACK_RANGES};
use super::transmit::BASE_DATAGRAM;
use super::{CloseReason, Connection, Event};

/// A packet number not yet received, to be named in NACKs.
#[derive(Debug, Clone, Copy)]
struct Missing {
    /// When the gap was seen.
    since: Instant,
    /// NACKs that named it so far.
    nacks: u8,
    last_nack: Option<Instant>,
}

/// A NACK names a packet at most this many times.
const MAX_NACKS: u8 = 3;
/// Bound on tracked missing packet numbers (the rest falls to PACK holes/RTO).
const MAX_MISSING: usize = 4096;
/// A packet number this far ahead of the highest seen is refused.
const MAX_PN_JUMP: u32 = 1 << 16;
/// The first data packets of a connection are acknowledged every
/// [`QUICK_PACK_EVERY`] instead of every `pack_every` (as TCP's quick-ack
/// at connection start): the sender measures its first-flight train from
/// these reports, and one lost PACK should not void the measurement.
const QUICK_PACKETS: u64 = 64;
/// See [`QUICK_PACKETS`].
const QUICK_PACK_EVERY: u32 = 8;

/// `part` as a slice of `whole` (no copy), if it lies within it.
fn subslice(whole: &Bytes, part: &[u8]) -> Option<Bytes> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then(|| whole.slice(start..end))
}

/// How many Ethernet-sized packets a DATA payload of `len` bytes counts as
/// towards [`Config::pack_every`](super::Config::pack_every): at least one. With 64 KiB datagrams
/// (loopback) a count of packets alone acknowledged every 2 MiB, and a
/// sender with a smaller send buffer waited for the PACK timer on every
/// refill (measured: 0.22 Gbit/s with a 256 KiB buffer).
fn pack_units(len: usize) -> u32 {
    let unit = usize::from(BASE_DATAGRAM) - DATA_HEADER_LEN;
    len.div_ceil(unit).clamp(1, u32::MAX as usize) as u32
}

/// The receiving half: the reassembly buffer, what the next PACK and NACK
/// report, and which readiness events the application has had.
#[derive(Debug)]
pub(super) struct Receiver {
    pub(super) buf: RecvBuf,
    /// One past the highest packet number received.
    next_pn: u32,
    /// Whether any DATA arrived (before, `next_pn` means nothing).
    any: bool,
    /// Timestamp of the highest-numbered packet (echoed in PACK) and when
    /// it arrived (the ack delay).
    highest_ts: u32,
    highest_at: Instant,
    /// Packet numbers below `next_pn` not received yet.
    missing: BTreeMap<u32, Missing>,
    /// When a NACK may next be due.
    pub(super) nack_check: Option<Instant>,
    /// DATA payload bytes received, duplicates included.
    bytes: u64,
    /// DATA packets received.
    data_pkts: u64,
    /// Since the last PACK: DATA packets, and the same counted in
    /// Ethernet-sized units ([`pack_units`]).
    pkts_since_pack: u32,
    data_since_pack: u32,
    /// Highest packet number as of the last PACK.
    pn_at_last_pack: u32,
    /// (time, `bytes`) at the last few PACKs: the reported receive rate.
    rate_hist: VecDeque<(Instant, u64)>,
    /// A PACK is due at once (FIN, duplicate, keepalive, window reopened).
    pub(super) pack_now: bool,
    last_pack: Option<Instant>,
    /// [`Event::Readable`] was queued and not yet answered by a read that
    /// emptied the buffer.
    pub(super) readable_signalled: bool,
    /// The receive limit (highest offset the peer may send) as of the last
    /// PACK: what the peer knows of our window.
    pub(super) limit_sent: u64,
    /// [`Event::Finished`] was queued.
    finished_signalled: bool,
}

impl Receiver {
    pub(super) fn new(window: u32, now: Instant) -> Self {
        Receiver {
            buf: RecvBuf::new(u64::from(window)),
            next_pn: 0,
            any: false,
            highest_ts: 0,
            highest_at: now,
            missing: BTreeMap::new(),
            nack_check: None,
            bytes: 0,
            data_pkts: 0,
            pkts_since_pack: 0,
            data_since_pack: 0,
            pn_at_last_pack: 0,
            rate_hist: VecDeque::new(),
            pack_now: false,
            last_pack: None,
            readable_signalled: false,
            limit_sent: u64::from(window),
            finished_signalled: false,
        }
    }

    /// A packet number so far ahead of the highest seen that it is refused.
    fn too_far_ahead(&self, pn: u32) -> bool {
        self.any && pn >= self.next_pn && pn - self.next_pn > MAX_PN_JUMP
    }

    /// Counts a DATA packet of `len` payload bytes towards the next PACK.
    fn count(&mut self, len: usize) {
        self.bytes += len as u64;
        self.data_pkts += 1;
        self.pkts_since_pack += 1;
        self.data_since_pack = self.data_since_pack.saturating_add(pack_units(len));
    }

    /// Records the packet number of an accepted DATA packet sent at
    /// `timestamp`: one past the highest leaves the numbers it skipped to
    /// be NACKed after `reorder`; an older one fills its gap.
    fn on_pn(&mut self, pn: u32, timestamp: u32, now: Instant, reorder: Duration) {
        if self.any && pn < self.next_pn {
            self.missing.remove(&pn);
            return;
        }
        let first_new = if self.any { self.next_pn } else { 0 };
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
            let due = now + reorder;
            self.nack_check = Some(self.nack_check.map_or(due, |c| c.min(due)));
        }
        self.any = true;
        self.next_pn = pn.wrapping_add(1);
        self.highest_ts = timestamp;
        self.highest_at = now;
    }

    /// Heap held besides the reassembly buffer (approximate).
    pub(super) fn tracking_heap_bytes(&self) -> usize {
        self.missing.len() * 40 + self.rate_hist.capacity() * 24
    }

    /// The NACK due at `now`, if any: every missing number whose reordering
    /// delay (first time) or re-NACK interval has passed, at most
    /// [`MAX_NACKS`] times each. Sets when the next one may be due.
    pub(super) fn build_nack(&mut self, now: Instant, srtt: Duration) -> Option<NackRepr> {
        let reorder = reorder_delay(srtt);
        let renack = (srtt + srtt / 2 + reorder).max(Duration::from_millis(20));
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

    /// The PACK to send now; restarts the counts of the next one.
    pub(super) fn build_pack(&mut self, now: Instant) -> PackRepr {
        let highest = self.next_pn.wrapping_sub(1);
        let advance = if self.any {
            highest
                .wrapping_sub(self.pn_at_last_pack)
                .wrapping_add(u32::from(self.last_pack.is_none()))
        } else {
            0
        };
        let loss = if advance > 0 {
            (1.0 - f64::from(self.pkts_since_pack) / f64::from(advance)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        // Receive rate over the last few reports, smoother than one interval.
        self.rate_hist.push_back((now, self.bytes));
        while self.rate_hist.len() > 5 {
            self.rate_hist.pop_front();
        }
        let rate = match self.rate_hist.front() {
            Some(&(t, b)) if now > t => {
                ((self.bytes - b) as f64 / now.duration_since(t).as_secs_f64()) as u64
            }
            _ => 0,
        };
        let (sack, sack_len) = self.buf.sack_ranges();
        self.limit_sent = self.buf.limit();
        self.pn_at_last_pack = highest;
        self.pkts_since_pack = 0;
        self.data_since_pack = 0;
        self.pack_now = false;
        self.last_pack = Some(now);
        PackRepr {
            cum_ack: self.buf.cum(),
            fin_received: self.buf.fin_complete(),
            highest_pn: highest,
            echo_ts: self.highest_ts,
            ack_delay_us: now
                .saturating_duration_since(self.highest_at)
                .as_micros()
                .min(u128::from(u32::MAX)) as u32,
            rx_bytes: self.bytes,
            rate: rate.min(u64::from(u32::MAX)) as u32,
            loss: (loss * 65535.0) as u16,
            window: self.buf.advertised(),
            sack_len,
            sack,
        }
    }

    /// When a PACK is due by time: at once (`pack_now`, counted from the
    /// last datagram in), or `pack_interval` after the last one while data
    /// arrives.
    pub(super) fn pack_deadline(
        &self,
        last_rx: Instant,
        pack_interval: Duration,
    ) -> Option<Instant> {
        if self.pack_now {
            return Some(last_rx);
        }
        if self.data_since_pack == 0 {
            return None;
        }
        Some(match self.last_pack {
            Some(t) => t + pack_interval,
            None => last_rx,
        })
    }

    /// Whether a PACK is due at `now`: by time, or after `pack_every`
    /// units of data (fewer for the first [`QUICK_PACKETS`]).
    pub(super) fn pack_due(
        &self,
        now: Instant,
        last_rx: Instant,
        pack_interval: Duration,
        pack_every: u32,
    ) -> bool {
        let pack_every = if self.data_pkts <= QUICK_PACKETS {
            pack_every.min(QUICK_PACK_EVERY)
        } else {
            pack_every
        };
        self.pack_deadline(last_rx, pack_interval)
            .is_some_and(|t| now >= t)
            || self.data_since_pack >= pack_every
    }
}

impl Connection {
    /// DATA: reassembly, the gap bookkeeping for NACKs, when to PACK, and
    /// the Readable / Finished events.
    pub(super) fn on_data(
        &mut self,
        now: Instant,
        d: DataRepr<'_>,
        shared: Option<&Bytes>,
    ) -> bool {
        if !self.accept_stream_packet(now) {
            return false;
        }
        let pn = d.pn;
        if self.rx.too_far_ahead(pn) {
            return false;
        }
        let inserted = match shared.and_then(|b| subslice(b, d.payload)) {
            Some(p) => self.rx.buf.insert_shared(d.offset, &p, d.fin),
            None => self.rx.buf.insert(d.offset, d.payload, d.fin),
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
        if self.local_close && inserted.new_bytes > 0 {
            // New data after close(): nobody will read it. TCP answers with
            // RST; a silent discard would let the sender write forever.
            self.rx.buf.discard();
            self.send_reset = true;
            self.enter_closed(CloseReason::LocalReset);
            return true;
        }
        self.rx.count(d.payload.len());
        self.stats.duplicate_bytes += (d.payload.len() - inserted.new_bytes) as u64;
        let reorder = reorder_delay(self.rtt.srtt());
        self.rx.on_pn(pn, d.timestamp, now, reorder);
        if inserted.new_bytes == 0 && !d.payload.is_empty() {
            // A resend of data we have: our PACK was probably lost.
            self.rx.pack_now = true;
        }
        if d.fin {
            self.rx.pack_now = true;
        }
        if self.rx.buf.readable() > 0 && !self.rx.readable_signalled && !self.local_close {
            self.rx.readable_signalled = true;
            self.events.push_back(Event::Readable);
        }
        if self.rx.buf.fin_complete() && !self.rx.finished_signalled {
            self.rx.finished_signalled = true;
            self.rx.pack_now = true;
            self.events.push_back(Event::Finished);
            if !self.rx.readable_signalled && !self.local_close {
                self.rx.readable_signalled = true;
                self.events.push_back(Event::Readable);
            }
        }
        self.maybe_finish(now);
        true
    }
}

/// How long a gap may be reordering before it is NACKed: srtt/8 within
/// 2..50 ms.
fn reorder_delay(srtt: Duration) -> Duration {
    (srtt / 8).clamp(Duration::from_millis(2), Duration::from_millis(50))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::super::wire::{Body, SackRange};
    use super::super::testing::*;
    use super::super::{CloseReason, Config, Event, ReadError};
    use super::*;

    /// A server (it receives the client's DATA) that has sent its CONN_ACK.
    fn receiver(clk: &Clock) -> Connection {
        let mut s = server(Config::default(), clk.t0, 1 << 20);
        drain(&mut s, clk.t0);
        events(&mut s);
        s
    }

    fn read_all(c: &mut Connection) -> Vec<u8> {
        let mut out = vec![0; 1 << 16];
        let n = c.read(&mut out).unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn in_order_data_is_readable_and_acknowledged_at_once() {
        let clk = Clock::new();
        let mut s = receiver(&clk);
        s.handle_datagram(clk.at(5), &data(SERVER_CID, 0, 0, b"hello", false, 1234));
        assert_eq!(events(&mut s), [Event::Readable]);
        assert_eq!(s.readable_bytes(), 5);
        // The first PACK goes at once; its echo and counts are this packet's.
        let packs = packs_of(&drain(&mut s, clk.at(7)));
        assert_eq!(packs.len(), 1);
        let p = packs[0];
        assert_eq!(
            (
                p.cum_ack,
                p.highest_pn,
                p.echo_ts,
                p.ack_delay_us,
                p.rx_bytes
            ),
            (5, 0, 1234, 2000, 5)
        );
        assert_eq!((p.loss, p.sack_len, p.fin_received), (0, 0, false));
        assert_eq!(p.window, Config::default().recv_window - 5);
        assert_eq!(read_all(&mut s), b"hello");
        assert_eq!(s.read(&mut [0; 8]), Err(ReadError::Blocked));
    }

    #[test]
    fn out_of_order_data_is_reassembled() {
        let clk = Clock::new();
        let mut s = receiver(&clk);
        let seg = |i: u8| [i; 100];
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, &seg(0), false, 0));
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 2, 200, &seg(2), false, 0));
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 3, 300, &seg(3), false, 0));
        // Only the in-order prefix is readable; the rest is SACKed.
        assert_eq!(s.readable_bytes(), 100);
        let p = packs_of(&drain(&mut s, clk.at(1)))[0];
        assert_eq!((p.cum_ack, p.highest_pn), (100, 3));
        assert_eq!(
            p.sacks(),
            [SackRange {
                start: 100,
                len: 200
            }]
        );
        // One of the four packet numbers so far is missing.
        assert_eq!(p.loss, (65535.0 / 4.0) as u16);
        s.handle_datagram(clk.at(2), &data(SERVER_CID, 1, 100, &seg(1), false, 0));
        assert_eq!(s.readable_bytes(), 400);
        let got = read_all(&mut s);
        let want: Vec<u8> = (0..4).flat_map(seg).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_duplicate_is_counted_and_acknowledged_at_once() {
        let clk = Clock::new();
        let mut s = receiver(&clk);
        let d = data(SERVER_CID, 0, 0, &[1; 300], false, 0);
        s.handle_datagram(clk.at(1), &d);
        assert_eq!(packs_of(&drain(&mut s, clk.at(1))).len(), 1);
        // New data 1 ms later waits for the PACK cadence ...
        s.handle_datagram(clk.at(2), &data(SERVER_CID, 1, 300, &[2; 300], false, 0));
        assert!(drain(&mut s, clk.at(2)).is_empty());
        // ... a resend of what we have means our PACK was lost: at once.
        s.handle_datagram(clk.at(3), &data(SERVER_CID, 2, 0, &[1; 300], false, 0));
        assert_eq!(s.stats().duplicate_bytes, 300);
        let packs = packs_of(&drain(&mut s, clk.at(3)));
        assert_eq!((packs.len(), packs[0].cum_ack), (1, 600));
        assert_eq!(s.readable_bytes(), 600);
    }

    #[test]
    fn the_first_packets_are_acknowledged_every_eight() {
        let clk = Clock::new();
        let mut s = receiver(&clk);
        let mut pack_after = Vec::new();
        for pn in 0..20u32 {
            let d = data(SERVER_CID, pn, u64::from(pn) * 100, &[0; 100], false, 0);
            s.handle_datagram(clk.at(1), &d);
            if !packs_of(&drain(&mut s, clk.at(1))).is_empty() {
                pack_after.push(pn);
            }
        }
        // The first at once, then every QUICK_PACK_EVERY packets.
        assert_eq!(pack_after, [0, 8, 16]);
    }

    #[test]
    fn the_pack_timer_runs_from_the_last_pack() {
        let clk = Clock::new();
        let mut s = receiver(&clk);
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, &[0; 10], false, 0));
        drain(&mut s, clk.at(1));
        s.handle_datagram(clk.at(3), &data(SERVER_CID, 1, 10, &[0; 10], false, 0));
        // pack_interval (10 ms) after the PACK at 1 ms.
        assert_eq!(s.poll_timeout(), Some(clk.at(11)));
        assert!(drain(&mut s, clk.at(10)).is_empty());
        assert_eq!(packs_of(&drain(&mut s, clk.at(11))).len(), 1);
    }

    #[test]
    fn a_gap_is_nacked_after_the_reordering_delay_three_times() {
        let clk = Clock::new();
        let mut s = receiver(&clk);
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, &[0; 10], false, 0));
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 3, 30, &[0; 10], false, 0));
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 5, 50, &[0; 10], false, 0));
        assert!(nacks_of(&drain(&mut s, clk.at(1))).is_empty());
        // srtt 20 ms: reordering delay 2.5 ms, then again every
        // max(1.5 srtt + 2.5 ms, 20 ms) = 32.5 ms.
        let t1 = clk.t0 + Duration::from_micros(3500);
        assert_eq!(s.rx.nack_check, Some(t1));
        assert!(nacks_of(&drain(&mut s, t1 - Duration::from_micros(1))).is_empty());
        let mut nacks = Vec::new();
        let mut t = t1;
        for _ in 0..4 {
            nacks.push(nacks_of(&drain(&mut s, t)));
            t += Duration::from_micros(32_500);
        }
        let once = vec![vec![(1, 2), (4, 4)]];
        assert_eq!(nacks, [once.clone(), once.clone(), once, vec![]]);
        assert_eq!(s.rx.nack_check, None);
        assert_eq!(s.stats().nacks_sent, 3);
    }

    #[test]
    fn a_late_packet_fills_its_gap_and_is_not_nacked() {
        let clk = Clock::new();
        let mut s = receiver(&clk);
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, &[0; 10], false, 0));
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 2, 20, &[0; 10], false, 0));
        s.handle_datagram(clk.at(2), &data(SERVER_CID, 1, 10, &[0; 10], false, 0));
        assert!(nacks_of(&drain(&mut s, clk.at(10))).is_empty());
        assert_eq!(s.stats().nacks_sent, 0);
    }

    #[test]
    fn build_nack_merges_runs_and_expires_them() {
        let clk = Clock::new();
        let mut r = Receiver::new(1 << 20, clk.t0);
        r.on_pn(0, 0, clk.t0, ms(2));
        r.on_pn(10, 0, clk.t0, ms(2));
        r.on_pn(7, 0, clk.t0, ms(2));
        assert_eq!(r.nack_check, Some(clk.at(2)));
        // srtt 100 ms: a reordering delay of 12.5 ms, then a re-NACK
        // every 1.5 x 100 + 12.5 ms.
        let srtt = ms(100);
        assert_eq!(r.build_nack(clk.at(12), srtt), None);
        assert_eq!(r.nack_check, Some(clk.at(12) + Duration::from_micros(500)));
        let renack = Duration::from_micros(162_500);
        let mut t = clk.at(13);
        for _ in 0..MAX_NACKS {
            let n = r.build_nack(t, srtt).unwrap();
            let ranges: Vec<_> = n.ranges().iter().map(|r| (r.first, r.last)).collect();
            assert_eq!(ranges, [(1, 6), (8, 9)]);
            assert!(r
                .build_nack(t + renack - Duration::from_micros(1), srtt)
                .is_none());
            t += renack;
        }
        // Named three times: left to the sender's SACK holes and RTO.
        assert!(r.missing.is_empty());
        assert_eq!((r.nack_check, r.build_nack(t, srtt)), (None, None));
    }

    #[test]
    fn a_huge_packet_number_jump_is_refused() {
        let clk = Clock::new();
        let mut s = receiver(&clk);
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, &[0; 10], false, 0));
        let far = MAX_PN_JUMP + 2;
        s.handle_datagram(clk.at(1), &data(SERVER_CID, far, 10, &[0; 10], false, 0));
        assert_eq!((s.stats().dropped, s.readable_bytes()), (1, 10));
        // One less is a (huge) gap, tracked up to MAX_MISSING numbers.
        s.handle_datagram(
            clk.at(1),
            &data(SERVER_CID, far - 1, 10, &[0; 10], false, 0),
        );
        assert_eq!(s.readable_bytes(), 20);
        assert_eq!(s.rx.missing.len(), MAX_MISSING);
        assert_eq!(
            s.rx.missing.keys().next(),
            Some(&(far - 1 - MAX_MISSING as u32))
        );
    }

    #[test]
    fn fin_after_the_data_reads_as_eof() {
        let clk = Clock::new();
        let mut s = receiver(&clk);
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 1, 3, b"", true, 0));
        assert!(events(&mut s).is_empty());
        s.handle_datagram(clk.at(2), &data(SERVER_CID, 0, 0, b"abc", false, 0));
        assert_eq!(events(&mut s), [Event::Readable, Event::Finished]);
        let p = *packs_of(&drain(&mut s, clk.at(2))).last().unwrap();
        assert!(p.fin_received);
        assert_eq!(read_all(&mut s), b"abc");
        assert_eq!(s.read(&mut [0; 8]), Ok(0));
        assert!(s.at_eof());
    }

    #[test]
    fn changing_the_final_size_resets_the_connection() {
        let clk = Clock::new();
        let mut s = receiver(&clk);
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, b"ab", true, 0));
        s.handle_datagram(clk.at(2), &data(SERVER_CID, 1, 2, b"cd", false, 0));
        assert_eq!(s.close_reason(), Some(CloseReason::ProtocolViolation));
        let sent = drain(&mut s, clk.at(2));
        assert_eq!(sent.len(), 1);
        assert!(matches!(parse(&sent[0]).body, Body::Reset));
    }

    #[test]
    fn pack_units_count_ethernet_sized_packets() {
        let unit = usize::from(BASE_DATAGRAM) - DATA_HEADER_LEN;
        assert_eq!(pack_units(0), 1);
        assert_eq!(pack_units(unit), 1);
        assert_eq!(pack_units(unit + 1), 2);
        assert_eq!(pack_units(65_000), 48);
    }
}
