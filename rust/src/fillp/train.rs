//! The first flight as a packet train: the bottleneck rate from its
//! dispersion.
//!
//! A connection's first few DATA packets leave back to back (unpaced). The
//! bottleneck spaces them at its own rate, the peer acknowledges them as
//! they arrive, and the spacing of those acknowledgements at the peer (the
//! PACK's arrival at the sender minus its reported ack delay, so the return
//! path's constant delay cancels out) gives the rate at which the
//! bottleneck drained the train: about its capacity, one RTT after the
//! first data instead of the several rounds a doubling startup needs.
//!
//! Bytes are counted by packet number (the highest number each PACK
//! reports), so packets lost after the bottleneck count as well: the
//! estimate is of capacity, not of goodput.

use std::time::{Duration, Instant};

/// Packets sent within this time of the first one count as back to back
/// (a driver may read its clock per datagram).
const BURST_WINDOW: Duration = Duration::from_millis(1);
/// A measurement must span at least this many packets: fewer are within
/// the noise of timer granularity and acknowledgement scheduling.
const MIN_SPAN: u32 = 8;

/// First-flight train state of one sender. Packet numbers start at 0, so the
/// train is packets `0..sent`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Train {
    /// Packets to send back to back; 0 when the controller wants no train.
    planned: u32,
    /// Packets sent as part of the train.
    sent: u32,
    /// When the first one was sent.
    start: Option<Instant>,
    /// The train has ended: a packet went out paced, or it was measured or
    /// abandoned.
    closed: bool,
    /// The first PACK inside the train: highest packet number it reported
    /// and when that packet reached the peer (on our clock, shifted by the
    /// return delay).
    first: Option<(u32, Instant)>,
    /// Payload bytes of train packets reported after `first`.
    bytes: u64,
    /// Best estimate so far, bytes/s of payload.
    estimate: Option<u64>,
    /// The estimate was handed out (or never will be).
    done: bool,
}

impl Train {
    /// Plan a train of `packets` (0: none). Only before anything was sent.
    pub(crate) fn plan(&mut self, packets: u32) {
        if self.start.is_none() {
            self.planned = packets;
        }
    }

    /// Whether the next data packet may skip pacing as part of the train.
    pub(crate) fn may_burst(&self, now: Instant) -> bool {
        !self.closed
            && self.sent < self.planned
            && self
                .start
                .is_none_or(|s| now.saturating_duration_since(s) <= BURST_WINDOW)
    }

    /// A data packet went out, `burst` if it skipped pacing.
    pub(crate) fn on_sent(&mut self, now: Instant, burst: bool) {
        if burst && !self.closed {
            self.start.get_or_insert(now);
            self.sent += 1;
        } else {
            self.closed = true;
        }
    }

    /// Whether packet `pn` belongs to the train.
    pub(crate) fn contains(&self, pn: u32) -> bool {
        pn < self.sent
    }

    /// Give up the measurement (e.g. the in-flight record was cleared).
    pub(crate) fn abandon(&mut self) {
        self.closed = true;
        self.done = true;
    }

    /// A fresh PACK reported `highest`, which reached the peer at `arrival`;
    /// `train_bytes` is the payload of the train packets it newly reported.
    /// Returns the capacity estimate, bytes/s, once the whole train has been
    /// reported (at most once).
    pub(crate) fn on_pack(
        &mut self,
        highest: u32,
        arrival: Instant,
        train_bytes: u64,
    ) -> Option<u64> {
        if self.done || self.sent == 0 {
            return None;
        }
        if !self.contains(highest) {
            // The report reaches past the train: paced packets would
            // dilute the spacing, so the last in-train report decides.
            self.done = true;
            return self.estimate;
        }
        match self.first {
            None => self.first = Some((highest, arrival)),
            Some((pn, t0)) => {
                self.bytes += train_bytes;
                let dt = arrival.saturating_duration_since(t0);
                if highest - pn >= MIN_SPAN && !dt.is_zero() {
                    self.estimate = Some((self.bytes as f64 / dt.as_secs_f64()) as u64);
                }
            }
        }
        if self.closed && highest + 1 == self.sent {
            self.done = true;
            return self.estimate;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispersion_gives_the_rate() {
        let t0 = Instant::now();
        let mut t = Train::default();
        t.plan(33);
        for _ in 0..33 {
            assert!(t.may_burst(t0));
            t.on_sent(t0, true);
        }
        assert!(!t.may_burst(t0));
        t.on_sent(t0, false);
        // 1000 payload bytes every 100 µs: 10 MB/s.
        let at = |pn: u32| t0 + Duration::from_micros(100 * u64::from(pn));
        assert_eq!(t.on_pack(0, at(0), 1000), None);
        assert_eq!(t.on_pack(4, at(4), 4000), None);
        let e = t.on_pack(32, at(32), 28_000).expect("estimate");
        assert!((9_900_000..=10_100_000).contains(&e), "{e}");
        // Only once.
        assert_eq!(t.on_pack(40, at(40), 0), None);
    }

    #[test]
    fn short_spans_and_late_reports_give_nothing() {
        let t0 = Instant::now();
        let mut t = Train::default();
        t.plan(33);
        for _ in 0..33 {
            t.on_sent(t0, true);
        }
        t.on_sent(t0, false);
        assert_eq!(t.on_pack(28, t0, 1000), None);
        // Span of 4 packets only, then a report past the train.
        assert_eq!(t.on_pack(32, t0 + Duration::from_millis(1), 4000), None);
        let mut u = Train::default();
        u.plan(33);
        u.on_sent(t0, true);
        // A packet sent later than the burst window is not part of it.
        assert!(!u.may_burst(t0 + Duration::from_millis(5)));
    }
}
