//! A window of a byte stream held as shared, immutable pieces.
//!
//! The send buffer keeps its data here so that a datagram can carry its
//! payload as [`Bytes`] slices of the buffer (a reference count, no copy):
//! the driver then hands header and payload to the kernel as separate
//! iovecs, outside the state lock, and the one copy left on the send side
//! after the application's is the kernel's. A writer appends into a private
//! tail; the tail is frozen into a shared piece only when a datagram needs
//! its bytes, and later writes go on into the rest of its allocation, so
//! pieces stay large and a segment spans few of them.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

/// Largest allocation of a new tail: a bulk writer gets one allocation per
/// 64 KiB (about one loopback-sized datagram), which stays below glibc's
/// mmap threshold and so costs no system call.
const CHUNK: usize = 64 << 10;

/// Smallest allocation of a new tail, for small writes.
const MIN_CHUNK: usize = 4 << 10;

/// Emptied [`CHUNK`]-sized allocations kept for the next tails. A bulk
/// stream frees chunks as fast as it fills new ones; without reuse each new
/// one came from `malloc`, often as fresh pages the kernel had to fault in
/// and zero (measured: slower than copying into the datagrams as before).
const SPARES: usize = 2;

/// Stream bytes `[start, end)`: frozen pieces, then a writable tail.
#[derive(Debug, Default)]
pub struct ByteQueue {
    /// Stream offset of the first byte held.
    start: u64,
    /// Frozen pieces, each with its stream offset; contiguous from `start`.
    pieces: VecDeque<(u64, Bytes)>,
    /// Stream offset just past the last piece: where `tail` begins.
    frozen: u64,
    /// Written bytes no datagram has needed yet.
    tail: BytesMut,
    /// Allocations whose bytes were all dropped, for the next tails.
    spare: Vec<BytesMut>,
}

impl ByteQueue {
    /// An empty queue whose first byte will be stream offset `start`.
    pub fn new(start: u64) -> Self {
        ByteQueue {
            start,
            frozen: start,
            ..ByteQueue::default()
        }
    }

    /// Stream offset of the first byte held.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Stream offset just past the last byte held.
    pub fn end(&self) -> u64 {
        self.frozen + self.tail.len() as u64
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        (self.end() - self.start) as usize
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a copy of `data`.
    pub fn extend_from_slice(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = self.tail.capacity() - self.tail.len();
            if room == 0 {
                // Full: freeze it whole and start a new allocation, rather
                // than let `reserve` copy the unfrozen bytes into a bigger one.
                self.freeze();
                let want = data.len().max(self.len()).next_power_of_two();
                self.tail = match self.spare.pop() {
                    Some(m) if want >= CHUNK => m,
                    _ => BytesMut::with_capacity(want.clamp(MIN_CHUNK, CHUNK)),
                };
                continue;
            }
            let n = room.min(data.len());
            self.tail.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
    }

    /// Appends `piece` without copying it.
    pub fn push(&mut self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        self.freeze();
        let len = piece.len() as u64;
        self.pieces.push_back((self.frozen, piece));
        self.frozen += len;
    }

    /// Moves the tail's bytes into a shared piece; later writes continue in
    /// the rest of its allocation.
    fn freeze(&mut self) {
        if self.tail.is_empty() {
            return;
        }
        let piece = self.tail.split().freeze();
        let len = piece.len() as u64;
        self.pieces.push_back((self.frozen, piece));
        self.frozen += len;
    }

    /// Index of the piece holding stream offset `at` (`at` < `frozen`).
    fn piece_at(&self, at: u64) -> usize {
        self.pieces
            .partition_point(|(o, _)| *o <= at)
            .saturating_sub(1)
    }

    /// Pushes onto `out` the stream bytes `[offset, offset + len)` as slices
    /// of the pieces, clamped to what is held; returns how many bytes.
    pub fn slices(&mut self, offset: u64, len: usize, out: &mut Vec<Bytes>) -> usize {
        let from = offset.max(self.start);
        let to = offset.saturating_add(len as u64).min(self.end());
        if from >= to {
            return 0;
        }
        if to > self.frozen {
            self.freeze();
        }
        let mut at = from;
        let mut i = self.piece_at(at);
        while at < to {
            let Some((o, p)) = self.pieces.get(i) else {
                break;
            };
            let lo = (at - o) as usize;
            let hi = ((to - o) as usize).min(p.len());
            out.push(p.slice(lo..hi));
            at = o + hi as u64;
            i += 1;
        }
        (at - from) as usize
    }

    /// Appends a copy of the stream bytes `[offset, offset + len)`, clamped
    /// to what is held, to `out`; returns how many bytes.
    pub fn copy_to(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> usize {
        let from = offset.max(self.start);
        let to = offset.saturating_add(len as u64).min(self.end());
        if from >= to {
            return 0;
        }
        let mut at = from;
        if at < self.frozen {
            let mut i = self.piece_at(at);
            while at < to.min(self.frozen) {
                let Some((o, p)) = self.pieces.get(i) else {
                    break;
                };
                let hi = ((to - o) as usize).min(p.len());
                out.extend_from_slice(&p[(at - o) as usize..hi]);
                at = o + hi as u64;
                i += 1;
            }
        }
        if at < to && at >= self.frozen {
            let lo = (at - self.frozen) as usize;
            out.extend_from_slice(&self.tail[lo..(to - self.frozen) as usize]);
            at = to;
        }
        (at - from) as usize
    }

    /// Copies bytes from the front into `buf` and drops them; returns how
    /// many.
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            let Some((_, p)) = self.pieces.front() else {
                break;
            };
            let k = p.len().min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&p[..k]);
            n += k;
            self.advance_to(self.start + k as u64);
        }
        if n < buf.len() && !self.tail.is_empty() {
            let k = self.tail.len().min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&self.tail[..k]);
            n += k;
            self.advance_to(self.start + k as u64);
        }
        n
    }

    /// Moves up to `max` bytes from the front onto `out`, as pieces (no
    /// copy); returns how many. The caller can then copy them out without
    /// holding whatever guards the queue.
    pub fn take_front(&mut self, max: usize, out: &mut Vec<Bytes>) -> usize {
        let to = self.start.saturating_add(max as u64).min(self.end());
        if to > self.frozen {
            self.freeze();
        }
        let from = self.start;
        while self.start < to {
            let Some((o, p)) = self.pieces.front_mut() else {
                break;
            };
            let k = ((to - self.start) as usize).min(p.len());
            if k == p.len() {
                if let Some((_, p)) = self.pieces.pop_front() {
                    out.push(p);
                }
            } else {
                out.push(p.split_to(k));
                *o += k as u64;
            }
            self.start += k as u64;
        }
        (self.start - from) as usize
    }

    /// Drops every byte below stream offset `to` (clamped to what is held).
    pub fn advance_to(&mut self, to: u64) {
        let to = to.min(self.end());
        while self.start < to {
            match self.pieces.front_mut() {
                Some((o, p)) => {
                    let k = ((to - self.start) as usize).min(p.len());
                    if k == p.len() {
                        if let Some((_, p)) = self.pieces.pop_front() {
                            self.keep(p);
                        }
                    } else {
                        p.advance(k);
                        *o += k as u64;
                    }
                    self.start += k as u64;
                }
                None => {
                    let k = (to - self.start) as usize;
                    self.tail.advance(k);
                    self.start += k as u64;
                    self.frozen = self.start;
                }
            }
        }
    }

    /// Frees the tail's allocation and the spares if nothing is held, so
    /// that an idle stream holds no buffer. Not done on every emptying: a
    /// streaming reader empties its queue thousands of times a second and
    /// would then allocate again each time.
    pub fn release(&mut self) {
        if self.is_empty() {
            self.tail = BytesMut::new();
            self.spare = Vec::new();
        }
    }

    /// An emptied 64 KiB allocation, if one is spare: for a writer
    /// to fill (without holding whatever guards the queue) and [`push`].
    ///
    /// [`push`]: ByteQueue::push
    pub fn take_spare(&mut self) -> Option<BytesMut> {
        self.spare.pop()
    }

    /// Keeps the allocation of a dropped piece as a spare if that piece was
    /// its last user and it is [`CHUNK`]-sized.
    fn keep(&mut self, piece: Bytes) {
        if self.spare.len() >= SPARES {
            return;
        }
        if let Ok(mut m) = piece.try_into_mut() {
            m.clear();
            // Moves the view back to the start of the allocation, without
            // allocating; refuses a smaller allocation.
            if m.try_reclaim(CHUNK) {
                self.spare.push(m);
            }
        }
    }

    /// Bytes of heap held: the pieces' lengths (their allocations may be
    /// larger, and shared) and the tail's allocation.
    pub fn heap_bytes(&self) -> usize {
        self.pieces.iter().map(|(_, p)| p.len()).sum::<usize>()
            + self.tail.capacity()
            + self.spare.iter().map(BytesMut::capacity).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pattern(from: u64, len: usize) -> Vec<u8> {
        (from..from + len as u64).map(|i| (i % 251) as u8).collect()
    }

    fn gather(q: &mut ByteQueue, offset: u64, len: usize) -> Vec<u8> {
        let mut parts = Vec::new();
        let n = q.slices(offset, len, &mut parts);
        let flat: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(flat.len(), n);
        flat
    }

    #[test]
    fn slices_share_what_was_written_and_later_writes_do_not_disturb_them() {
        let mut q = ByteQueue::new(1000);
        q.extend_from_slice(&pattern(1000, 3000));
        let held = gather(&mut q, 1500, 1000);
        let mut parts = Vec::new();
        q.slices(1000, 3000, &mut parts);
        q.extend_from_slice(&pattern(4000, 200_000));
        let again: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(held, pattern(1500, 1000));
        assert_eq!(again, pattern(1000, 3000));
        assert_eq!(gather(&mut q, 3900, 90_000), pattern(3900, 90_000));
        assert_eq!(q.end(), 204_000);
    }

    #[test]
    fn ranges_outside_the_queue_are_clamped() {
        let mut q = ByteQueue::new(10);
        q.extend_from_slice(&pattern(10, 100));
        assert_eq!(gather(&mut q, 0, 20), pattern(10, 10));
        assert_eq!(gather(&mut q, 100, 50), pattern(100, 10));
        assert!(gather(&mut q, 500, 50).is_empty());
        assert!(gather(&mut q, u64::MAX, usize::MAX).is_empty());
        let mut out = Vec::new();
        assert_eq!(q.copy_to(u64::MAX - 1, 10, &mut out), 0);
    }

    #[test]
    fn an_emptied_queue_gives_its_memory_back() {
        let mut q = ByteQueue::new(0);
        q.extend_from_slice(&[7; 100_000]);
        assert!(q.heap_bytes() >= 100_000);
        q.advance_to(100_000);
        assert!(q.heap_bytes() > 0, "kept for the next writes");
        q.release();
        assert_eq!(q.heap_bytes(), 0);
        assert!(q.is_empty());
        q.extend_from_slice(&[1; 10]);
        assert!(q.heap_bytes() <= MIN_CHUNK, "{}", q.heap_bytes());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(usize),
        Push(usize),
        Slice(u64, usize),
        Copy(u64, usize),
        Read(usize),
        Take(usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..150_000).prop_map(Op::Write),
            (0usize..70_000).prop_map(Op::Push),
            (0u64..400_000, 0usize..140_000).prop_map(|(o, l)| Op::Slice(o, l)),
            (0u64..400_000, 0usize..140_000).prop_map(|(o, l)| Op::Copy(o, l)),
            (0usize..100_000).prop_map(Op::Read),
            (0usize..100_000).prop_map(Op::Take),
            (0u64..400_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Against a plain model (the whole stream, and where it starts),
        /// every way in and out agrees byte for byte.
        #[test]
        fn agrees_with_a_flat_model(ops in proptest::collection::vec(op(), 1..40)) {
            let mut q = ByteQueue::new(0);
            let mut start = 0u64;
            let mut end = 0u64;
            for op in ops {
                match op {
                    Op::Write(n) => {
                        q.extend_from_slice(&pattern(end, n));
                        end += n as u64;
                    }
                    Op::Push(n) => {
                        q.push(Bytes::from(pattern(end, n)));
                        end += n as u64;
                    }
                    Op::Slice(o, l) => {
                        let lo = o.max(start).min(end);
                        let hi = o.saturating_add(l as u64).min(end).max(lo);
                        prop_assert_eq!(gather(&mut q, o, l), pattern(lo, (hi - lo) as usize));
                    }
                    Op::Copy(o, l) => {
                        let lo = o.max(start).min(end);
                        let hi = o.saturating_add(l as u64).min(end).max(lo);
                        let mut out = Vec::new();
                        q.copy_to(o, l, &mut out);
                        prop_assert_eq!(out, pattern(lo, (hi - lo) as usize));
                    }
                    Op::Read(n) => {
                        let mut buf = vec![0; n];
                        let k = q.read(&mut buf);
                        prop_assert_eq!(k as u64, (n as u64).min(end - start));
                        prop_assert_eq!(&buf[..k], &pattern(start, k)[..]);
                        start += k as u64;
                    }
                    Op::Take(n) => {
                        let mut parts = Vec::new();
                        let k = q.take_front(n, &mut parts);
                        let flat: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
                        prop_assert_eq!(k as u64, (n as u64).min(end - start));
                        prop_assert_eq!(flat, pattern(start, k));
                        start += k as u64;
                    }
                    Op::Advance(to) => {
                        q.advance_to(to);
                        start = start.max(to.min(end));
                    }
                }
                prop_assert_eq!((q.start(), q.end()), (start, end));
            }
        }
    }
}
