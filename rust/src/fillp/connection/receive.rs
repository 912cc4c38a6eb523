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
/// towards [`Config::pack_every`]: at least one. With 64 KiB datagrams
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
