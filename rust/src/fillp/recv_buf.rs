//! Receiver reassembly: in-order bytes ready for the application, out-of-order
//! segments held until the gap fills, and the final size once FIN arrives.
//!
//! A segment given as [`Bytes`] ([`RecvBuf::insert_shared`]) is kept as a
//! slice of the received datagram, not copied: the one copy left between the
//! kernel and the application is the application's read. Held segments join
//! the ready queue the same way when the gap before them fills.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::byte_queue::ByteQueue;
use super::wire::{SackRange, MAX_SACK_RANGES};

/// Why a segment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// Data beyond the final size, or a second, different final size.
    FinalSize,
}

/// Result of inserting a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Inserted {
    /// Bytes not seen before.
    pub new_bytes: usize,
    /// The in-order frontier moved.
    pub advanced: bool,
}

/// Reassembly buffer.
#[derive(Debug)]
pub struct RecvBuf {
    /// In-order bytes not yet read; starts at the next byte the application
    /// reads and ends at the cumulative ack.
    ready: ByteQueue,
    /// Non-overlapping segments beyond the in-order frontier.
    ooo: BTreeMap<u64, Bytes>,
    ooo_bytes: usize,
    fin: Option<u64>,
    window: u64,
}

impl RecvBuf {
    /// Accept at most `window` bytes beyond the read position.
    pub fn new(window: u64) -> Self {
        RecvBuf {
            ready: ByteQueue::new(0),
            ooo: BTreeMap::new(),
            ooo_bytes: 0,
            fin: None,
            window,
        }
    }

    /// Next byte expected in order (the cumulative ack).
    pub fn cum(&self) -> u64 {
        self.ready.end()
    }

    /// The highest offset (exclusive) the sender may send.
    pub fn limit(&self) -> u64 {
        self.ready.start() + self.window
    }

    /// Window to advertise beyond `cum`.
    pub fn advertised(&self) -> u32 {
        (self.limit() - self.cum()).min(u64::from(u32::MAX)) as u32
    }

    /// Bytes readable now.
    pub fn readable(&self) -> usize {
        self.ready.len()
    }

    /// FIN and every byte before it have arrived.
    pub fn fin_complete(&self) -> bool {
        self.fin == Some(self.cum())
    }

    /// The application has read everything up to the FIN.
    pub fn at_eof(&self) -> bool {
        self.fin == Some(self.ready.start())
    }

    /// Insert a segment, copying what is kept.
    pub fn insert(&mut self, offset: u64, data: &[u8], fin: bool) -> Result<Inserted, RecvError> {
        self.insert_from(offset, data, None, fin)
    }

    /// Insert a segment, keeping slices of `data` rather than copies.
    pub fn insert_shared(
        &mut self,
        offset: u64,
        data: &Bytes,
        fin: bool,
    ) -> Result<Inserted, RecvError> {
        self.insert_from(offset, data, Some(data), fin)
    }

    /// `data` is the segment; `shared`, if given, holds the same bytes.
    fn insert_from(
        &mut self,
        offset: u64,
        data: &[u8],
        shared: Option<&Bytes>,
        fin: bool,
    ) -> Result<Inserted, RecvError> {
        let keep = |r: std::ops::Range<usize>| match shared {
            Some(b) => b.slice(r),
            None => Bytes::copy_from_slice(&data[r]),
        };
        let Some(end) = offset.checked_add(data.len() as u64) else {
            // Beyond any window: a forged or corrupt offset, ignored.
            return Ok(Inserted::default());
        };
        if let Some(f) = self.fin {
            if end > f || (fin && end != f) {
                return Err(RecvError::FinalSize);
            }
        }
        if fin {
            if end < self.cum()
                || self
                    .ooo
                    .keys()
                    .next_back()
                    .is_some_and(|&o| o + self.ooo[&o].len() as u64 > end)
            {
                return Err(RecvError::FinalSize);
            }
            self.fin = Some(end);
        }
        let mut out = Inserted::default();
        // Clip to what is new and what the window allows.
        let start = offset.max(self.cum());
        let stop = end.min(self.limit());
        if start >= stop {
            return Ok(out);
        }
        // Fast path, the common case: in order with nothing held beyond.
        // Straight into the ready queue, without a held copy.
        if start == self.cum()
            && self
                .ooo
                .range(start..)
                .next()
                .is_none_or(|(&o, _)| o >= stop)
        {
            let r = (start - offset) as usize..(stop - offset) as usize;
            out.new_bytes = r.len();
            out.advanced = !r.is_empty();
            match shared {
                Some(b) => self.ready.push(b.slice(r)),
                None => self.ready.extend_from_slice(&data[r]),
            }
            while let Some(seg) = self.ooo.remove(&self.cum()) {
                self.ooo_bytes -= seg.len();
                self.ready.push(seg);
            }
            return Ok(out);
        }
        let mut s = start;
        while s < stop {
            // Skip bytes some held segment already covers.
            if let Some((&o, seg)) = self.ooo.range(..=s).next_back() {
                let e = o + seg.len() as u64;
                if e > s {
                    s = e;
                    continue;
                }
            }
            let next = self
                .ooo
                .range(s + 1..)
                .next()
                .map(|(&o, _)| o)
                .unwrap_or(u64::MAX)
                .min(stop);
            let piece = keep((s - offset) as usize..(next - offset) as usize);
            out.new_bytes += piece.len();
            self.ooo_bytes += piece.len();
            self.ooo.insert(s, piece);
            s = next;
        }
        // Move whatever is now contiguous into the ready queue.
        while let Some(seg) = self.ooo.remove(&self.cum()) {
            self.ooo_bytes -= seg.len();
            self.ready.push(seg);
            out.advanced = true;
        }
        Ok(out)
    }

    /// Copy readable bytes into `buf`.
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        self.ready.read(buf)
    }

    /// Moves up to `max` readable bytes onto `out` as shared pieces, for
    /// the caller to copy out later; returns how many.
    pub fn read_shared(&mut self, max: usize, out: &mut Vec<Bytes>) -> usize {
        self.ready.take_front(max, out)
    }

    /// Pushes up to `max` readable bytes onto `out` as shared pieces and
    /// leaves them readable (`MSG_PEEK`); returns how many.
    pub fn peek_shared(&mut self, max: usize, out: &mut Vec<Bytes>) -> usize {
        let start = self.ready.start();
        self.ready.slices(start, max, out)
    }

    /// Gives back the ready queue's memory if it is empty. Not done on every
    /// read that empties it: a streaming reader empties it thousands of
    /// times a second, and regrowing it each time costs a reallocation
    /// chain per read (the connection calls this once the flow has paused).
    pub fn shrink_if_empty(&mut self) {
        self.ready.release();
    }

    /// Drop readable bytes (after a local close).
    pub fn discard(&mut self) {
        self.ready.advance_to(self.ready.end());
        self.ready.release();
    }

    /// Up to [`MAX_SACK_RANGES`] held ranges, lowest first, relative to `cum`.
    pub fn sack_ranges(&self) -> ([SackRange; MAX_SACK_RANGES], u8) {
        let mut out = [SackRange::default(); MAX_SACK_RANGES];
        let mut n = 0usize;
        let cum = self.cum();
        for (&o, seg) in &self.ooo {
            let start = (o - cum) as u32;
            let len = seg.len() as u32;
            if n > 0 && out[n - 1].start + out[n - 1].len == start {
                out[n - 1].len += len;
                continue;
            }
            if n == MAX_SACK_RANGES {
                break;
            }
            out[n] = SackRange { start, len };
            n += 1;
        }
        (out, n as u8)
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.ready.heap_bytes() + self.ooo_bytes + self.ooo.len() * 48
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reassembles_out_of_order_and_overlaps() {
        let mut r = RecvBuf::new(1000);
        assert_eq!(r.insert(10, &[2; 10], false).unwrap().new_bytes, 10);
        assert_eq!(r.sack_ranges().1, 1);
        // Overlaps both sides of the held segment.
        let i = r.insert(5, &[9; 20], false).unwrap();
        assert_eq!(i.new_bytes, 10);
        assert!(!i.advanced);
        let i = r.insert(0, &[1; 6], false).unwrap();
        assert!(i.advanced);
        assert_eq!(r.cum(), 25);
        let mut b = [0; 30];
        assert_eq!(r.read(&mut b), 25);
        // First arrival wins where copies overlap.
        assert_eq!(&b[..5], &[1; 5]);
        assert_eq!(&b[5..10], &[9; 5]);
        assert_eq!(&b[10..20], &[2; 10]);
        assert_eq!(r.insert(25, &[], true).unwrap().new_bytes, 0);
        assert!(r.fin_complete() && r.at_eof());
        assert_eq!(r.insert(26, &[1], false), Err(RecvError::FinalSize));
    }

    /// Shared and copied segments mix: out of order, overlapping, and the
    /// sources changed after insertion (a shared one cannot be, a copied
    /// one was copied), the reader gets the stream.
    #[test]
    fn shared_and_copied_segments_reassemble_alike() {
        let stream: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
        let mut r = RecvBuf::new(10_000);
        let shared = |a: usize, b: usize| Bytes::copy_from_slice(&stream[a..b]);
        r.insert_shared(1000, &shared(1000, 2000), false).unwrap();
        let mut copied = stream[500..1500].to_vec();
        r.insert(500, &copied, false).unwrap();
        copied.fill(0);
        r.insert_shared(2500, &shared(2500, 3000), true).unwrap();
        assert_eq!(r.cum(), 0);
        r.insert_shared(0, &shared(0, 600), false).unwrap();
        assert_eq!(r.cum(), 2000);
        r.insert(1900, &stream[1900..2600], false).unwrap();
        assert!(r.fin_complete());
        let mut out = vec![0; 4000];
        let mut n = 0;
        while n < 3000 {
            let k = r.read(&mut out[n..n + 700]);
            assert!(k > 0);
            n += k;
        }
        assert_eq!(&out[..3000], &stream[..]);
        assert!(r.at_eof());
    }

    #[test]
    fn offsets_at_the_end_of_the_space_are_ignored() {
        let mut r = RecvBuf::new(1000);
        assert_eq!(
            r.insert(u64::MAX - 5, &[1; 10], false),
            Ok(Inserted::default())
        );
        assert_eq!(
            r.insert(u64::MAX - 5, &[1; 10], true),
            Ok(Inserted::default())
        );
        assert_eq!(r.cum(), 0);
    }

    #[test]
    fn window_clips() {
        let mut r = RecvBuf::new(8);
        assert_eq!(r.insert(4, &[0; 10], false).unwrap().new_bytes, 4);
        assert_eq!(r.advertised(), 8);
        r.insert(0, &[0; 4], false).unwrap();
        assert_eq!(r.advertised(), 0);
    }
}
