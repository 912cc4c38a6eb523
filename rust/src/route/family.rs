//! The per-family index: one hash map per prefix length in use, visited
//! longest first, with a per-group filter that skips lengths holding no
//! prefix near the address.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;

use super::hash::FastBuild;
use super::prefix::{mask_v4, mask_v6};
use super::rule::Filter;

/// Address bits of one family: `u32` for IPv4, `u128` for IPv6.
pub(crate) trait Bits: Copy + Eq + Hash + Debug {
    /// Bits in an address: 32 or 128.
    const WIDTH: u8;
    /// Lengths per group (see [`Family`]); `WIDTH / STRIDE` groups, the
    /// last one also holding length `WIDTH`. At most 31, so a group's
    /// lengths fit a `u32` bit set.
    const STRIDE: u8;
    /// Mask of `len` leading ones (`len` at most `WIDTH`).
    fn mask(len: u8) -> Self;
    /// Bitwise and.
    fn and(self, other: Self) -> Self;
}

impl Bits for u32 {
    const WIDTH: u8 = 32;
    const STRIDE: u8 = 8;
    #[inline]
    fn mask(len: u8) -> u32 {
        mask_v4(len)
    }
    #[inline]
    fn and(self, other: u32) -> u32 {
        self & other
    }
}

impl Bits for u128 {
    const WIDTH: u8 = 128;
    const STRIDE: u8 = 16;
    #[inline]
    fn mask(len: u8) -> u128 {
        mask_v6(len)
    }
    #[inline]
    fn and(self, other: u128) -> u128 {
        self & other
    }
}

/// A rule as the lookup loop sees it: everything needed to accept or skip
/// it without touching the rule itself, and where the rule lives.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub(crate) filter: Filter,
    pub(crate) priority: i32,
    /// Index into the table's rule slots.
    pub(crate) slot: u32,
}

/// All rules of one prefix length.
#[derive(Clone, Debug)]
struct Level<K> {
    mask: K,
    /// Network bits -> the rules for that exact prefix, best first:
    /// priority descending, then insertion order.
    buckets: HashMap<K, Vec<Entry>, FastBuild>,
}

/// The lengths `anchor_len .. anchor_len + STRIDE` (and `WIDTH` in the
/// last group), with a filter telling which of them hold a prefix under a
/// given address.
#[derive(Clone, Debug)]
struct Group<K> {
    anchor_len: u8,
    anchor_mask: K,
    /// Bit `i`: some prefix of length `anchor_len + i` exists anywhere.
    present: u32,
    /// Address masked to `anchor_len` -> bit `i` set when some prefix of
    /// length `anchor_len + i` lies under it. Probed on every lookup.
    anchors: HashMap<K, u32, FastBuild>,
    /// (anchor, length) -> number of prefixes; only for removal.
    counts: HashMap<(K, u8), u32, FastBuild>,
}

/// The rules of one address family.
///
/// One hash map per prefix length in use. Visiting every length in use on
/// a lookup costs one probe per length, which with many lengths (IPv6 has
/// 129) is too slow; so the lengths are grouped by `STRIDE`, and a lookup
/// first asks each group which of its lengths hold a prefix under the
/// address, then probes only those. A miss then costs about one probe per
/// group, a hit one or two more.
#[derive(Clone, Debug)]
pub(crate) struct Family<K> {
    /// Indexed by prefix length; `None` where no rule has that length.
    levels: Vec<Option<Level<K>>>,
    /// Shortest lengths first.
    groups: Vec<Group<K>>,
}

impl<K: Bits> Default for Family<K> {
    fn default() -> Self {
        let groups = (0..K::WIDTH / K::STRIDE)
            .map(|g| {
                let anchor_len = g * K::STRIDE;
                Group {
                    anchor_len,
                    anchor_mask: K::mask(anchor_len),
                    present: 0,
                    anchors: HashMap::default(),
                    counts: HashMap::default(),
                }
            })
            .collect();
        Family {
            levels: vec![None; usize::from(K::WIDTH) + 1],
            groups,
        }
    }
}

impl<K: Bits> Family<K> {
    /// The group holding `len` and `len`'s bit in it.
    fn group_of(len: u8) -> (usize, u32) {
        let g = (len / K::STRIDE).min(K::WIDTH / K::STRIDE - 1);
        (usize::from(g), 1 << (len - g * K::STRIDE))
    }

    /// Adds a rule for `net/len`. It must be newer than every rule already
    /// here: among equal priorities it goes last.
    pub(crate) fn insert(&mut self, net: K, len: u8, entry: Entry) {
        let Some(level) = self.levels.get_mut(usize::from(len)) else {
            return; // Unreachable: Prefix bounds the length.
        };
        let level = level.get_or_insert_with(|| Level {
            mask: K::mask(len),
            buckets: HashMap::default(),
        });
        let bucket = level.buckets.entry(net).or_default();
        let new_prefix = bucket.is_empty();
        let pos = bucket.partition_point(|e| e.priority >= entry.priority);
        bucket.insert(pos, entry);

        if new_prefix {
            let (g, bit) = Self::group_of(len);
            let group = &mut self.groups[g];
            let anchor = net.and(group.anchor_mask);
            group.present |= bit;
            *group.counts.entry((anchor, len)).or_default() += 1;
            *group.anchors.entry(anchor).or_default() |= bit;
        }
    }

    /// Removes the rule in `slot` from `net/len`; false if it is not there.
    pub(crate) fn remove(&mut self, net: K, len: u8, slot: u32) -> bool {
        let Some(Some(level)) = self.levels.get_mut(usize::from(len)) else {
            return false;
        };
        let Some(bucket) = level.buckets.get_mut(&net) else {
            return false;
        };
        let Some(pos) = bucket.iter().position(|e| e.slot == slot) else {
            return false;
        };
        // `remove`, not `swap_remove`: the order is the ranking.
        bucket.remove(pos);
        if !bucket.is_empty() {
            return true;
        }
        level.buckets.remove(&net);
        let level_empty = level.buckets.is_empty();
        if level_empty {
            self.levels[usize::from(len)] = None;
        }

        let (g, bit) = Self::group_of(len);
        let group = &mut self.groups[g];
        let anchor = net.and(group.anchor_mask);
        if level_empty {
            group.present &= !bit;
        }
        if let Some(n) = group.counts.get_mut(&(anchor, len)) {
            *n -= 1;
            if *n == 0 {
                group.counts.remove(&(anchor, len));
                if let Some(bits) = group.anchors.get_mut(&anchor) {
                    *bits &= !bit;
                    if *bits == 0 {
                        group.anchors.remove(&anchor);
                    }
                }
            }
        }
        true
    }

    /// Calls `visit` with each bucket whose prefix contains `addr`, longest
    /// prefix first, until it returns `Some`.
    #[inline]
    fn walk<T>(&self, addr: K, mut visit: impl FnMut(&[Entry]) -> Option<T>) -> Option<T> {
        for group in self.groups.iter().rev() {
            let mut lens = match group.present {
                0 => continue,
                // One length in use: probing the level directly is as cheap
                // as asking the filter.
                p if p & (p - 1) == 0 => p,
                _ => match group.anchors.get(&addr.and(group.anchor_mask)) {
                    Some(&bits) => bits,
                    None => continue,
                },
            };
            while lens != 0 {
                let i = 31 - lens.leading_zeros();
                lens &= !(1 << i);
                let len = usize::from(group.anchor_len) + i as usize;
                let Some(Some(level)) = self.levels.get(len) else {
                    continue;
                };
                if let Some(bucket) = level.buckets.get(&addr.and(level.mask)) {
                    if let Some(found) = visit(bucket) {
                        return Some(found);
                    }
                }
            }
        }
        None
    }

    /// The slot of the best rule matching `addr`, `port` and `qbits`.
    #[inline]
    pub(crate) fn best(&self, addr: K, port: u16, qbits: u8) -> Option<u32> {
        self.walk(addr, |bucket| {
            bucket
                .iter()
                .find(|e| e.filter.accepts(port, qbits))
                .map(|e| e.slot)
        })
    }

    /// Appends the slots of every matching rule to `out`, best first.
    pub(crate) fn all(&self, addr: K, port: u16, qbits: u8, out: &mut Vec<u32>) {
        self.walk(addr, |bucket| {
            out.extend(
                bucket
                    .iter()
                    .filter(|e| e.filter.accepts(port, qbits))
                    .map(|e| e.slot),
            );
            None::<()>
        });
    }

    #[cfg(test)]
    pub(crate) fn level_count(&self) -> usize {
        let n = self.levels.iter().flatten().count();
        let groups_clean = self.groups.iter().all(|g| {
            g.anchors.is_empty() == g.counts.is_empty() && (g.present == 0) == g.anchors.is_empty()
        });
        assert!(groups_clean, "group filters out of step with levels");
        n
    }
}
