//! A small, fast hasher for the table's integer keys.
//!
//! SipHash (the std default) guards against attackers who choose the keys.
//! Here the keys are prefixes from the operator's configuration, and queries
//! only probe, never insert, so flooding one bucket would need control of the
//! config. One multiply and one xor-shift per 64-bit word is enough.

use std::hash::{BuildHasherDefault, Hasher};

/// Odd constant with well-spread bits (2^64 / golden ratio).
const K: u64 = 0x9e37_79b9_7f4a_7c15;

/// Multiply-xorshift hasher for integer keys.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FastHasher(u64);

/// `BuildHasher` for maps keyed by prefixes or ids.
pub(crate) type FastBuild = BuildHasherDefault<FastHasher>;

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        // The product's high half depends on every input bit; folding it
        // down gives the low bits (the bucket index) the same quality as the
        // high bits (hashbrown's control tag).
        let x = (self.0 ^ word).wrapping_mul(K);
        self.0 = x ^ (x >> 32);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_u128(&mut self, n: u128) {
        self.add(n as u64);
        self.add((n >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(v: T) -> u64 {
        FastBuild::default().hash_one(v)
    }

    #[test]
    fn masked_prefixes_spread_in_low_and_high_bits() {
        // /8 networks differ only in the top byte; /48s only in the high word.
        let v4: Vec<u64> = (0u32..256).map(|i| hash(i << 24)).collect();
        let v6: Vec<u64> = (0u128..256).map(|i| hash(i << 80)).collect();
        for hs in [v4, v6] {
            let low: HashSet<u64> = hs.iter().map(|h| h & 0xff).collect();
            let high: HashSet<u64> = hs.iter().map(|h| h >> 57).collect();
            assert!(low.len() > 128, "low bits collide: {}", low.len());
            assert!(high.len() > 64, "high bits collide: {}", high.len());
        }
    }

    #[test]
    fn byte_writes_are_deterministic() {
        let mut a = FastHasher::default();
        let mut b = FastHasher::default();
        a.write(b"hello, routing table");
        b.write(b"hello, routing table");
        assert_eq!(a.finish(), b.finish());
        let mut c = FastHasher::default();
        c.write(b"hello, routing tablf");
        assert_ne!(a.finish(), c.finish());
    }
}
