//! The routing table: rule storage, ids, and lookups.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::family::{Entry, Family};
use super::hash::FastBuild;
use super::prefix::{canonical_addr, Canonical};
use super::rule::{Filter, Query, Rule, StackId};

/// Names a rule in one [`RouteTable`], from [`RouteTable::insert`] until
/// [`RouteTable::remove`].
///
/// Ids count up from 0 and are not reused while the table holds the rule
/// they name; only after 2^32 inserts do they wrap (skipping ids in use).
/// Their order is insertion order until then.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(u32);

impl RuleId {
    /// The number, e.g. to hand to Python.
    pub fn as_u32(self) -> u32 {
        self.0
    }

    /// Rebuilds an id from [`RuleId::as_u32`]. A number the table never
    /// gave out just finds nothing.
    pub fn from_u32(n: u32) -> RuleId {
        RuleId(n)
    }
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The outcome of [`RouteTable::lookup`].
#[derive(Clone, Copy, Debug)]
pub struct Decision<'a> {
    /// The winning rule, or `None` when no rule matched and the default
    /// route applies.
    pub rule: Option<RuleId>,
    /// The stacks to try, in order: the winning rule's or the default.
    pub stacks: &'a [StackId],
}

#[derive(Clone, Debug)]
struct Slot {
    id: RuleId,
    /// Insertion order, never wraps; [`Family`] relies on it for ties.
    seq: u64,
    rule: Rule,
}

/// Rules indexed for longest-prefix lookup. See the [module docs](super).
#[derive(Clone, Default)]
pub struct RouteTable {
    /// Rule storage; entries in the families point here by index. Freed
    /// slots are reused so the storage stays as large as the live set.
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    by_id: HashMap<u32, u32, FastBuild>,
    /// seq -> slot, for iteration in insertion order.
    order: BTreeMap<u64, u32>,
    next_id: u32,
    next_seq: u64,
    v4: Family<u32>,
    v6: Family<u128>,
    default: Vec<StackId>,
}

impl RouteTable {
    /// An empty table whose default route is the empty stack list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a rule and returns its id. Any rule is accepted, duplicates
    /// too; among otherwise equal rules the earlier inserted wins.
    pub fn insert(&mut self, rule: Rule) -> RuleId {
        // Skip ids still in use; only reachable after 2^32 inserts.
        while self.by_id.contains_key(&self.next_id) {
            self.next_id = self.next_id.wrapping_add(1);
        }
        let id = RuleId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        let seq = self.next_seq;
        self.next_seq += 1;

        let filter = Filter::of(&rule);
        let priority = rule.priority;
        let key = rule.prefix.canonical();
        let new = Slot { id, seq, rule };
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(new);
                s
            }
            None => {
                // Fewer than 2^32 slots: each holds a Rule, so memory runs
                // out long before this could truncate.
                self.slots.push(Some(new));
                (self.slots.len() - 1) as u32
            }
        };
        let entry = Entry {
            filter,
            priority,
            slot,
        };
        match key {
            Canonical::V4(net, len) => self.v4.insert(net, len, entry),
            Canonical::V6(net, len) => self.v6.insert(net, len, entry),
        }
        self.by_id.insert(id.0, slot);
        self.order.insert(seq, slot);
        id
    }

    /// Removes a rule, returning it; `None` if the id is not in the table.
    pub fn remove(&mut self, id: RuleId) -> Option<Rule> {
        let slot = self.by_id.remove(&id.0)?;
        let s = self.slots.get_mut(slot as usize)?.take()?;
        match s.rule.prefix.canonical() {
            Canonical::V4(net, len) => self.v4.remove(net, len, slot),
            Canonical::V6(net, len) => self.v6.remove(net, len, slot),
        };
        self.order.remove(&s.seq);
        self.free.push(slot);
        Some(s.rule)
    }

    /// The rule with this id, if the table holds it.
    pub fn get(&self, id: RuleId) -> Option<&Rule> {
        let slot = *self.by_id.get(&id.0)?;
        self.slot(slot).map(|s| &s.rule)
    }

    /// Number of rules (the default route not counted).
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether the table holds no rules.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The rules in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (RuleId, &Rule)> {
        self.order
            .values()
            .filter_map(|&slot| self.slot(slot))
            .map(|s| (s.id, &s.rule))
    }

    /// Sets the stacks used when no rule matches.
    pub fn set_default(&mut self, stacks: Vec<StackId>) {
        self.default = stacks;
    }

    /// The stacks used when no rule matches.
    pub fn default_stacks(&self) -> &[StackId] {
        &self.default
    }

    /// The best rule for `q`, or the default route when none matches.
    #[inline]
    pub fn lookup(&self, q: &Query) -> Decision<'_> {
        let qbits = Filter::query_bits(q);
        let slot = match canonical_addr(q.addr) {
            Canonical::V4(a, _) => self.v4.best(a, q.port, qbits),
            Canonical::V6(a, _) => self.v6.best(a, q.port, qbits),
        };
        match slot.and_then(|s| self.slot(s)) {
            Some(s) => Decision {
                rule: Some(s.id),
                stacks: &s.rule.stacks,
            },
            None => Decision {
                rule: None,
                stacks: &self.default,
            },
        }
    }

    /// Every rule matching `q`, best first: the first is what
    /// [`lookup`](Self::lookup) picks. Empty when the default applies.
    pub fn candidates(&self, q: &Query) -> Vec<RuleId> {
        let qbits = Filter::query_bits(q);
        let mut slots = Vec::new();
        match canonical_addr(q.addr) {
            Canonical::V4(a, _) => self.v4.all(a, q.port, qbits, &mut slots),
            Canonical::V6(a, _) => self.v6.all(a, q.port, qbits, &mut slots),
        }
        slots
            .into_iter()
            .filter_map(|s| self.slot(s))
            .map(|s| s.id)
            .collect()
    }

    #[inline]
    fn slot(&self, slot: u32) -> Option<&Slot> {
        self.slots.get(slot as usize)?.as_ref()
    }
}

impl fmt::Debug for RouteTable {
    /// The rules in insertion order and the default, not the index.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable")
            .field("rules", &DebugRules(self))
            .field("default", &self.default)
            .finish()
    }
}

struct DebugRules<'a>(&'a RouteTable);

impl fmt::Debug for DebugRules<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Prefix, Role, SockKind};

    fn rule(prefix: &str, stacks: &[StackId]) -> Rule {
        Rule::new(prefix.parse().unwrap(), stacks.to_vec())
    }

    fn q(addr: &str) -> Query {
        Query::new(addr.parse().unwrap(), 443, SockKind::Stream, Role::Connect)
    }

    #[test]
    fn empty_table_uses_default() {
        let mut t = RouteTable::new();
        assert!(t.is_empty());
        let d = t.lookup(&q("10.0.0.1"));
        assert_eq!((d.rule, d.stacks), (None, &[][..]));
        t.set_default(vec![7, 8]);
        assert_eq!(t.default_stacks(), &[7, 8]);
        let d = t.lookup(&q("::1"));
        assert_eq!((d.rule, d.stacks), (None, &[7, 8][..]));
        assert!(t.candidates(&q("::1")).is_empty());
    }

    #[test]
    fn longest_prefix_wins_over_priority() {
        let mut t = RouteTable::new();
        let mut wide = rule("10.0.0.0/8", &[1]);
        wide.priority = 100;
        let wide = t.insert(wide);
        let narrow = t.insert(rule("10.1.0.0/16", &[2]));
        let d = t.lookup(&q("10.1.2.3"));
        assert_eq!((d.rule, d.stacks), (Some(narrow), &[2][..]));
        assert_eq!(t.lookup(&q("10.2.0.1")).rule, Some(wide));
        assert_eq!(t.candidates(&q("10.1.2.3")), vec![narrow, wide]);
    }

    #[test]
    fn priority_then_insertion_order_break_ties() {
        let mut t = RouteTable::new();
        let a = t.insert(rule("10.0.0.0/8", &[1]));
        let b = t.insert(rule("10.0.0.0/8", &[2]));
        let mut hi = rule("10.0.0.0/8", &[3]);
        hi.priority = 5;
        let c = t.insert(hi);
        let mut lo = rule("10.0.0.0/8", &[4]);
        lo.priority = -5;
        let d = t.insert(lo);
        let e = t.insert(rule("10.0.0.0/8", &[5]));
        assert_eq!(t.candidates(&q("10.9.9.9")), vec![c, a, b, e, d]);
        assert_eq!(t.lookup(&q("10.9.9.9")).stacks, &[3]);
        t.remove(c);
        assert_eq!(t.lookup(&q("10.9.9.9")).rule, Some(a));
        t.remove(a);
        assert_eq!(t.lookup(&q("10.9.9.9")).rule, Some(b));
    }

    #[test]
    fn ports_kind_role_fall_through_to_shorter_prefixes() {
        let mut t = RouteTable::new();
        let mut web = rule("10.1.0.0/16", &[1]);
        web.ports = 443..=443;
        web.kind = Some(SockKind::Stream);
        web.role = Some(Role::Connect);
        let web = t.insert(web);
        let any = t.insert(rule("10.0.0.0/8", &[2]));
        let mut query = q("10.1.0.9");
        assert_eq!(t.lookup(&query).rule, Some(web));
        query.port = 80;
        assert_eq!(t.lookup(&query).rule, Some(any));
        query.port = 443;
        query.kind = SockKind::Dgram;
        assert_eq!(t.lookup(&query).rule, Some(any));
        query.kind = SockKind::Stream;
        query.role = Role::Listen;
        assert_eq!(t.lookup(&query).rule, Some(any));
    }

    #[test]
    fn mapped_prefixes_and_queries_share_the_ipv4_index() {
        let mut t = RouteTable::new();
        let v4 = t.insert(rule("10.0.0.0/8", &[1]));
        let mapped = t.insert(rule("::ffff:10.0.0.0/104", &[2]));
        let v6 = t.insert(rule("::/0", &[3]));
        // Same effective length: insertion order decides, for both spellings.
        assert_eq!(t.candidates(&q("10.1.1.1")), vec![v4, mapped]);
        assert_eq!(t.candidates(&q("::ffff:10.1.1.1")), vec![v4, mapped]);
        assert_eq!(t.candidates(&q("2001:db8::1")), vec![v6]);
        assert_eq!(t.lookup(&q("11.0.0.1")).rule, None);
    }

    #[test]
    fn remove_get_iter() {
        let mut t = RouteTable::new();
        let ids: Vec<RuleId> = (0..5)
            .map(|i| t.insert(rule(&format!("10.{i}.0.0/16"), &[i])))
            .collect();
        assert_eq!(t.len(), 5);
        let removed = t.remove(ids[1]).unwrap();
        assert_eq!(removed.prefix, "10.1.0.0/16".parse::<Prefix>().unwrap());
        assert_eq!(t.remove(ids[1]), None);
        assert_eq!(t.get(ids[1]), None);
        assert_eq!(t.lookup(&q("10.1.0.1")).rule, None);
        // The freed slot is reused; the new rule still iterates last.
        let late = t.insert(rule("10.9.0.0/16", &[9]));
        let order: Vec<RuleId> = t.iter().map(|(id, _)| id).collect();
        assert_eq!(order, vec![ids[0], ids[2], ids[3], ids[4], late]);
        assert_eq!(t.get(late).map(|r| r.stacks.clone()), Some(vec![9]));
        assert_eq!(t.len(), 5);
        for id in order {
            assert!(t.remove(id).is_some());
        }
        assert!(t.is_empty());
        assert_eq!(t.v4.level_count(), 0, "empty levels are dropped");
        assert_eq!(t.remove(RuleId::from_u32(12345)), None);
    }

    #[test]
    fn ids_wrap_without_colliding_or_breaking_ties() {
        let mut t = RouteTable::new();
        let zero = t.insert(rule("10.0.0.0/8", &[0]));
        assert_eq!(zero.as_u32(), 0);
        t.next_id = u32::MAX;
        let last = t.insert(rule("10.0.0.0/8", &[1]));
        let wrapped = t.insert(rule("10.0.0.0/8", &[2]));
        assert_eq!(last.as_u32(), u32::MAX);
        assert_eq!(wrapped.as_u32(), 1, "0 is in use and skipped");
        // Ties still follow insertion order, not id order.
        assert_eq!(t.candidates(&q("10.0.0.1")), vec![zero, last, wrapped]);
    }

    #[test]
    fn clone_is_independent_and_debug_lists_rules() {
        let mut t = RouteTable::new();
        let id = t.insert(rule("192.0.2.0/24", &[4]));
        let copy = t.clone();
        t.remove(id);
        assert_eq!(copy.lookup(&q("192.0.2.1")).rule, Some(id));
        let text = format!("{copy:?}");
        assert!(
            text.contains("192.0.2.0") && text.contains("default"),
            "{text}"
        );
    }
}
