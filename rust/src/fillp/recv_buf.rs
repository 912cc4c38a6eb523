//! Receiver reassembly: in-order bytes ready for the application, out-of-order
//! segments held until the gap fills, and the final size once FIN arrives.

use std::collections::{BTreeMap, VecDeque};

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
    /// Offset of `ready[0]`: next byte the application reads.
    read: u64,
    ready: VecDeque<u8>,
    /// Non-overlapping segments beyond the in-order frontier.
    ooo: BTreeMap<u64, Vec<u8>>,
    ooo_bytes: usize,
    fin: Option<u64>,
    window: u64,
}

impl RecvBuf {
    /// Accept at most `window` bytes beyond the read position.
    pub fn new(window: u64) -> Self {
        RecvBuf {
            read: 0,
            ready: VecDeque::new(),
            ooo: BTreeMap::new(),
            ooo_bytes: 0,
            fin: None,
            window,
        }
    }

    /// Next byte expected in order (the cumulative ack).
    pub fn cum(&self) -> u64 {
        self.read + self.ready.len() as u64
    }

    /// The highest offset (exclusive) the sender may send.
    pub fn limit(&self) -> u64 {
        self.read + self.window
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
        self.fin == Some(self.read)
    }

    /// Insert a segment.
    pub fn insert(&mut self, offset: u64, data: &[u8], fin: bool) -> Result<Inserted, RecvError> {
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
            let piece = &data[(start - offset) as usize..(stop - offset) as usize];
            self.ready.extend(piece);
            out.new_bytes = piece.len();
            out.advanced = !piece.is_empty();
            while let Some(seg) = self.ooo.remove(&self.cum()) {
                self.ooo_bytes -= seg.len();
                self.ready.extend(&seg);
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
            let piece = &data[(s - offset) as usize..(next - offset) as usize];
            out.new_bytes += piece.len();
            self.ooo_bytes += piece.len();
            self.ooo.insert(s, piece.to_vec());
            s = next;
        }
        // Move whatever is now contiguous into the ready queue.
        while let Some(seg) = self.ooo.remove(&self.cum()) {
            self.ooo_bytes -= seg.len();
            self.ready.extend(&seg);
            out.advanced = true;
        }
        Ok(out)
    }

    /// Copy readable bytes into `buf`.
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.ready.len());
        let (a, b) = self.ready.as_slices();
        let na = n.min(a.len());
        buf[..na].copy_from_slice(&a[..na]);
        buf[na..n].copy_from_slice(&b[..n - na]);
        self.ready.drain(..n);
        self.read += n as u64;
        n
    }

    /// Gives back the ready queue's memory if it is empty. Not done on every
    /// read that empties it: a streaming reader empties it thousands of
    /// times a second, and regrowing it each time costs a reallocation
    /// chain per read (the connection calls this once the flow has paused).
    pub fn shrink_if_empty(&mut self) {
        if self.ready.is_empty() && self.ready.capacity() > 0 {
            self.ready = VecDeque::new();
        }
    }

    /// Drop readable bytes (after a local close).
    pub fn discard(&mut self) {
        self.read += self.ready.len() as u64;
        self.ready = VecDeque::new();
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
        self.ready.capacity() + self.ooo_bytes + self.ooo.len() * 48
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
