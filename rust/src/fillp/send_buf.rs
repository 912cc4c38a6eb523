//! Sender state for the byte stream: unacknowledged data, the segments in
//! flight, and the retransmission queue.
//!
//! Data is cut into segments at first transmission; a retransmission resends
//! the same segment under a new packet number, so every packet number maps to
//! exactly one segment (`pn_map`) and a NACK names precisely one transmission.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::byte_queue::ByteQueue;

/// One transmitted segment awaiting acknowledgement.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// Payload length (0 only for a bare FIN).
    pub len: u32,
    /// Packet number of its latest transmission.
    pub pn: u32,
    /// When it was last transmitted.
    pub last_sent: Instant,
    /// Selectively acknowledged: the peer has it, do not resend.
    pub sacked: bool,
    /// Carries the FIN.
    pub fin: bool,
    /// Transmissions so far.
    pub tx: u32,
}

/// What to send next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextSegment {
    /// Stream offset.
    pub offset: u64,
    /// Payload length.
    pub len: usize,
    /// Sets FIN.
    pub fin: bool,
    /// A retransmission.
    pub retransmit: bool,
}

/// Unacknowledged data and in-flight bookkeeping.
#[derive(Debug)]
pub struct SendBuf {
    /// Written and not yet acknowledged in order; its start is `base`.
    data: ByteQueue,
    /// Offset of the first byte held: everything below is cumulatively
    /// acknowledged.
    base: u64,
    /// Next offset never sent.
    next: u64,
    fin: Option<u64>,
    fin_sent: bool,
    fin_acked: bool,
    segs: BTreeMap<u64, Segment>,
    /// Segments in `segs` with `sacked` set: with none (no loss, the common
    /// case) `mark_holes` returns at once instead of scanning every segment
    /// in flight on every PACK.
    sacked: usize,
    lost: BTreeSet<u64>,
    pn_map: BTreeMap<u32, u64>,
    capacity: usize,
}

impl SendBuf {
    /// A buffer that accepts up to `capacity` unacknowledged bytes.
    pub fn new(capacity: usize) -> Self {
        SendBuf {
            data: ByteQueue::new(0),
            base: 0,
            next: 0,
            fin: None,
            fin_sent: false,
            fin_acked: false,
            segs: BTreeMap::new(),
            sacked: 0,
            lost: BTreeSet::new(),
            pn_map: BTreeMap::new(),
            capacity,
        }
    }

    /// Append as much of `buf` as fits; returns the count.
    pub fn write(&mut self, buf: &[u8]) -> usize {
        let n = buf.len().min(self.capacity.saturating_sub(self.data.len()));
        self.data.extend_from_slice(&buf[..n]);
        n
    }

    /// [`SendBuf::write`] of `buf` without a copy: appends as much of it
    /// as fits as a slice; returns the count.
    pub fn write_shared(&mut self, buf: &Bytes) -> usize {
        let n = buf.len().min(self.capacity.saturating_sub(self.data.len()));
        self.data.push(buf.slice(..n));
        n
    }

    /// A spare allocation of acknowledged data, for the next write to fill
    /// ([`ByteQueue::take_spare`]).
    pub fn take_spare(&mut self) -> Option<BytesMut> {
        self.data.take_spare()
    }

    /// Bytes `write` accepts when the buffer is empty (the most the
    /// connection's path-sized buffer may grow to).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes written but not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.data.len()
    }

    /// Bytes sent and not yet acknowledged in order: in flight, SACKed or
    /// waiting to be resent.
    pub fn sent_span(&self) -> u64 {
        self.next - self.base
    }

    /// Mark the end of the stream at the current write position.
    pub fn finish(&mut self) {
        if self.fin.is_none() {
            self.fin = Some(self.end());
        }
    }

    /// Whether `finish` was called.
    pub fn is_finished(&self) -> bool {
        self.fin.is_some()
    }

    /// The FIN and all data have been acknowledged.
    pub fn fin_acked(&self) -> bool {
        self.fin_acked
    }

    fn end(&self) -> u64 {
        self.base + self.data.len() as u64
    }

    /// Segments sent and not yet acknowledged (cumulatively).
    pub fn in_flight_segments(&self) -> usize {
        self.segs.len()
    }

    /// Whether there is anything to (re)send, given the peer's flow limit.
    pub fn has_pending(&self, limit: u64) -> bool {
        !self.lost.is_empty()
            || (self.next < self.end() && self.next < limit)
            || (self.fin == Some(self.next) && !self.fin_sent)
    }

    /// Whether new data is waiting only because of the peer's window.
    pub fn flow_blocked(&self, limit: u64) -> bool {
        self.lost.is_empty() && self.next < self.end() && self.next >= limit
    }

    /// Choose the next segment: retransmissions first, then new data.
    pub fn next_segment(&mut self, max_len: usize, limit: u64) -> Option<NextSegment> {
        while let Some(&off) = self.lost.iter().next() {
            self.lost.remove(&off);
            if let Some(s) = self.segs.get(&off) {
                if !s.sacked {
                    return Some(NextSegment {
                        offset: off,
                        len: s.len as usize,
                        fin: s.fin,
                        retransmit: true,
                    });
                }
            }
        }
        let end = self.end();
        if self.next < end && self.next < limit {
            let len = (end - self.next).min(limit - self.next).min(max_len as u64) as usize;
            let fin = self.fin == Some(self.next + len as u64);
            return Some(NextSegment {
                offset: self.next,
                len,
                fin,
                retransmit: false,
            });
        }
        if self.fin == Some(self.next) && !self.fin_sent {
            return Some(NextSegment {
                offset: self.next,
                len: 0,
                fin: true,
                retransmit: false,
            });
        }
        None
    }

    /// Appends a copy of a segment's payload to `out`; returns its length.
    /// Clamped, so a stale offset can only yield a short copy, never a panic.
    pub fn copy(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> usize {
        self.data.copy_to(offset, len, out)
    }

    /// Pushes a segment's payload onto `out` as shared slices of the buffer
    /// (no copy); returns its length, clamped as [`SendBuf::copy`]'s.
    pub fn slices(&mut self, offset: u64, len: usize, out: &mut Vec<Bytes>) -> usize {
        self.data.slices(offset, len, out)
    }

    /// Record the transmission of `seg` as packet `pn`.
    pub fn on_sent(&mut self, seg: &NextSegment, pn: u32, now: Instant) {
        if seg.fin {
            self.fin_sent = true;
        }
        if !seg.retransmit {
            self.next = seg.offset + seg.len as u64;
        }
        let s = self.segs.entry(seg.offset).or_insert(Segment {
            len: seg.len as u32,
            pn,
            last_sent: now,
            sacked: false,
            fin: seg.fin,
            tx: 0,
        });
        self.pn_map.remove(&s.pn);
        s.pn = pn;
        s.last_sent = now;
        s.tx += 1;
        self.pn_map.insert(pn, seg.offset);
    }

    /// Packet numbers in `first..=last` that still name a segment.
    pub fn mapped_pns(&self, first: u32, last: u32) -> Vec<u32> {
        if first > last {
            return Vec::new();
        }
        self.pn_map.range(first..=last).map(|(&pn, _)| pn).collect()
    }

    /// How often the segment at `offset` has been sent (0 if unknown).
    pub fn tx_count(&self, offset: u64) -> u32 {
        self.segs.get(&offset).map_or(0, |s| s.tx)
    }

    /// The segment at `offset` if it still needs delivering (a copy to send).
    pub fn copy_of(&self, offset: u64) -> Option<NextSegment> {
        let s = self.segs.get(&offset)?;
        (!s.sacked).then_some(NextSegment {
            offset,
            len: s.len as usize,
            fin: s.fin,
            retransmit: true,
        })
    }

    /// Cumulative acknowledgement up to `cum` (and the FIN if `fin`).
    /// Returns the number of bytes newly acknowledged.
    pub fn on_cum_ack(&mut self, cum: u64, fin: bool) -> u64 {
        // Never trust an ack for data we did not send.
        let cum = cum.min(self.next);
        let mut newly = 0;
        if cum > self.base {
            newly = cum - self.base;
            self.data.advance_to(cum);
            self.base = cum;
            // Give the memory back while idle.
            self.data.release();
        }
        if fin && self.fin_sent && self.fin == Some(cum) {
            self.fin_acked = true;
        }
        // Drop what is acknowledged. A segment the ack cuts through (only a
        // forged or confused peer does that) keeps its unacknowledged tail,
        // re-keyed at `base`, so every key stays >= base and `copy` in range.
        while let Some((&off, &s)) = self.segs.iter().next() {
            let end = off + u64::from(s.len);
            let fin_left = s.fin && !self.fin_acked;
            if off >= self.base && !(off == self.base && s.len == 0 && !fin_left) {
                break;
            }
            self.segs.remove(&off);
            self.sacked -= usize::from(s.sacked);
            self.pn_map.remove(&s.pn);
            let was_lost = self.lost.remove(&off);
            if (end > self.base || fin_left) && off < self.base {
                let tail = Segment {
                    len: end.saturating_sub(self.base) as u32,
                    ..s
                };
                if let std::collections::btree_map::Entry::Vacant(v) = self.segs.entry(self.base) {
                    v.insert(tail);
                    self.sacked += usize::from(tail.sacked);
                    self.pn_map.insert(s.pn, self.base);
                    if was_lost {
                        self.lost.insert(self.base);
                    }
                }
                break;
            }
        }
        newly
    }

    /// Selective acknowledgement of `[start, end)`.
    pub fn on_sack(&mut self, start: u64, end: u64) {
        if start >= end {
            return; // empty (and `range` refuses start > end)
        }
        for (o, s) in self.segs.range_mut(start..end) {
            if *o + u64::from(s.len) <= end && !s.sacked {
                s.sacked = true;
                self.sacked += 1;
                self.lost.remove(o);
            }
        }
    }

    /// A NACK names `pn`: queue its segment if that was its latest transmission.
    /// Returns whether anything was queued.
    pub fn on_nack(&mut self, pn: u32) -> bool {
        let Some(off) = self.pn_map.remove(&pn) else {
            return false;
        };
        match self.segs.get(&off) {
            Some(s) if s.pn == pn && !s.sacked => self.lost.insert(off),
            _ => false,
        }
    }

    /// Queue unacknowledged segments below the highest SACKed byte whose
    /// latest transmission is older than `age`. Returns how many.
    pub fn mark_holes(&mut self, now: Instant, age: Duration) -> usize {
        if self.sacked == 0 {
            return 0;
        }
        let Some(top) = self
            .segs
            .iter()
            .rev()
            .find(|(_, s)| s.sacked)
            .map(|(o, _)| *o)
        else {
            return 0;
        };
        let mut n = 0;
        for (&o, s) in self.segs.range(..top) {
            if !s.sacked && now.saturating_duration_since(s.last_sent) >= age && self.lost.insert(o)
            {
                n += 1;
            }
        }
        n
    }

    /// Retransmission timeout: queue every unacknowledged segment.
    pub fn on_rto(&mut self) -> usize {
        let mut n = 0;
        for (&o, s) in &self.segs {
            if !s.sacked && self.lost.insert(o) {
                n += 1;
            }
        }
        n
    }

    /// Tail-loss probe: queue the highest unacknowledged segment.
    pub fn probe_tail(&mut self) -> bool {
        match self.segs.iter().rev().find(|(_, s)| !s.sacked) {
            Some((&o, _)) => self.lost.insert(o),
            None => false,
        }
    }

    /// Bytes of heap this buffer holds (capacity, approximate for maps).
    pub fn heap_bytes(&self) -> usize {
        self.data.heap_bytes() + (self.segs.len() + self.lost.len() + self.pn_map.len()) * 48
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_retransmit_and_ack() {
        let t = Instant::now();
        let mut b = SendBuf::new(100);
        assert_eq!(b.write(&[1; 150]), 100);
        b.finish();
        let s1 = b.next_segment(40, u64::MAX).unwrap();
        b.on_sent(&s1, 0, t);
        let s2 = b.next_segment(40, u64::MAX).unwrap();
        b.on_sent(&s2, 1, t);
        let s3 = b.next_segment(40, u64::MAX).unwrap();
        assert_eq!((s3.offset, s3.len, s3.fin), (80, 20, true));
        b.on_sent(&s3, 2, t);
        assert!(b.next_segment(40, u64::MAX).is_none());
        assert!(b.on_nack(0));
        assert!(!b.on_nack(0), "a pn is nacked once");
        let r = b.next_segment(40, u64::MAX).unwrap();
        assert_eq!((r.offset, r.retransmit), (0, true));
        b.on_sent(&r, 3, t);
        assert!(!b.on_nack(0), "stale pn");
        let mut out = Vec::new();
        b.copy(40, 40, &mut out);
        assert_eq!(out.len(), 40);
        assert_eq!(b.on_cum_ack(80, false), 80);
        assert!(!b.fin_acked());
        b.on_cum_ack(100, true);
        assert!(b.fin_acked());
        assert_eq!(b.in_flight_segments(), 0);
    }

    #[test]
    fn reversed_or_empty_sack_is_ignored() {
        let t = Instant::now();
        let mut b = SendBuf::new(1000);
        b.write(&[0; 300]);
        let s = b.next_segment(100, 300).unwrap();
        b.on_sent(&s, 0, t);
        b.on_sack(50, 10);
        b.on_sack(u64::MAX, u64::MAX);
        assert_eq!(b.mark_holes(t + Duration::from_secs(1), Duration::ZERO), 0);
    }

    #[test]
    fn holes_and_flow_limit() {
        let t = Instant::now();
        let mut b = SendBuf::new(1000);
        b.write(&[0; 300]);
        for pn in 0..3 {
            let s = b.next_segment(100, 300).unwrap();
            b.on_sent(&s, pn, t);
        }
        b.on_sack(200, 300);
        assert_eq!(
            b.mark_holes(t + Duration::from_millis(5), Duration::from_millis(10)),
            0
        );
        assert_eq!(
            b.mark_holes(t + Duration::from_millis(20), Duration::from_millis(10)),
            2
        );
        b.write(&[0; 10]);
        assert!(!b.flow_blocked(300), "retransmissions pending");
        while b.next_segment(100, 300).is_some_and(|s| s.retransmit) {}
        assert!(b.flow_blocked(300));
    }
}
