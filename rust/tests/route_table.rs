//! Property tests: the indexed table against a linear-scan reference.

use std::cmp::Reverse;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dmm::route::{Prefix, Query, Role, RouteTable, Rule, RuleId, SockKind, StackId};
use proptest::prelude::*;

/// Address spellings the generators draw from.
#[derive(Clone, Copy, Debug)]
enum Fam {
    V4,
    V6,
    /// IPv4 written as `::ffff:a.b.c.d`.
    Mapped,
}

/// An address from a small neighbourhood so that prefixes overlap often:
/// `seed` picks one of a few bases and `bits` perturbs its low bits.
fn make_addr(fam: Fam, seed: u8, bits: u128) -> IpAddr {
    let v4 = |seed: u8, bits: u128| {
        let bases = [0x0a00_0000u32, 0x0a01_0000, 0xc0a8_0100, 0x0000_0000];
        let base = bases[usize::from(seed) % bases.len()];
        // Perturb high bits too, sometimes, so short prefixes differ.
        let hi = if seed & 4 != 0 {
            (bits as u32 & 3) << 30
        } else {
            0
        };
        Ipv4Addr::from(base ^ hi ^ (bits as u32 >> 16 & 0x0303))
    };
    match fam {
        Fam::V4 => IpAddr::V4(v4(seed, bits)),
        Fam::Mapped => IpAddr::V6(v4(seed, bits).to_ipv6_mapped()),
        Fam::V6 => {
            let bases = [
                0x2001_0db8_0000_0000_0000_0000_0000_0000u128,
                0x2001_0db8_0001_0000_0000_0000_0000_0000,
                0xfe80_0000_0000_0000_0000_0000_0000_0000,
                // Next to the mapped block, to catch family confusion.
                0x0000_0000_0000_0000_0000_fffe_0000_0000,
            ];
            let base = bases[usize::from(seed) % bases.len()];
            let hi = if seed & 4 != 0 { (bits & 3) << 126 } else { 0 };
            IpAddr::V6(Ipv6Addr::from(base ^ hi ^ (bits & 0x0303_0000_0000_0303)))
        }
    }
}

/// Clears host bits so any address and length make a valid prefix.
fn network(addr: IpAddr, len: u8) -> Prefix {
    let masked = match addr {
        IpAddr::V4(a) => {
            let len = len.min(32);
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            (IpAddr::V4(Ipv4Addr::from(u32::from(a) & m)), len)
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            (IpAddr::V6(Ipv6Addr::from(u128::from(a) & m)), len)
        }
    };
    Prefix::new(masked.0, masked.1).expect("masked prefix is valid")
}

fn fam() -> impl Strategy<Value = Fam> {
    prop_oneof![Just(Fam::V4), Just(Fam::V6), Just(Fam::Mapped)]
}

fn kind() -> impl Strategy<Value = SockKind> {
    prop_oneof![Just(SockKind::Stream), Just(SockKind::Dgram)]
}

fn role() -> impl Strategy<Value = Role> {
    // Accept is rarer: only rules naming it match it.
    prop_oneof![
        3 => Just(Role::Connect),
        3 => Just(Role::Listen),
        3 => Just(Role::SendTo),
        1 => Just(Role::Accept),
    ]
}

fn ports() -> impl Strategy<Value = std::ops::RangeInclusive<u16>> {
    prop_oneof![
        4 => Just(0..=u16::MAX),
        1 => Just(443..=443),
        1 => Just(0..=1023),
        1 => Just(1000..=2000),
        1 => Just(std::ops::RangeInclusive::new(5, 3)), // empty
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        fam(),
        any::<u8>(),
        any::<u128>(),
        any::<u8>(),
        ports(),
        proptest::option::weighted(0.3, kind()),
        proptest::option::weighted(0.3, role()),
        prop_oneof![3 => Just(0i32), 1 => -2i32..=2, 1 => any::<i32>()],
        proptest::collection::vec(any::<StackId>(), 0..3),
        any::<u32>(),
    )
        .prop_map(
            |(fam, seed, bits, len, ports, kind, role, priority, stacks, tag)| {
                // Lengths concentrate near the bases' differing bits.
                let len = match fam {
                    Fam::V4 => len % 33,
                    Fam::V6 => len % 129,
                    Fam::Mapped => 96 + len % 33,
                };
                Rule {
                    prefix: network(make_addr(fam, seed, bits), len),
                    ports,
                    kind,
                    role,
                    priority,
                    stacks,
                    tag,
                }
            },
        )
}

#[derive(Clone, Debug)]
enum Op {
    Insert(Rule),
    /// Removes the live rule at this index (modulo the live count).
    Remove(usize),
    /// Inserts a copy of a live rule with another priority: duplicate prefixes.
    Reinsert(usize, i32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => rule().prop_map(Op::Insert),
        2 => any::<usize>().prop_map(Op::Remove),
        2 => (any::<usize>(), -3i32..=3).prop_map(|(i, p)| Op::Reinsert(i, p)),
    ]
}

#[derive(Clone, Debug)]
enum QuerySpec {
    /// Inside the prefix of the live rule at this index (modulo the count).
    InRule(usize, u128, bool),
    /// Anywhere near the bases.
    Near(Fam, u8, u128),
}

fn query_spec() -> impl Strategy<Value = (QuerySpec, u16, SockKind, Role)> {
    let spec = prop_oneof![
        3 => (any::<usize>(), any::<u128>(), any::<bool>())
            .prop_map(|(i, b, m)| QuerySpec::InRule(i, b, m)),
        1 => (fam(), any::<u8>(), any::<u128>()).prop_map(|(f, s, b)| QuerySpec::Near(f, s, b)),
    ];
    let port = prop_oneof![
        Just(443u16),
        Just(80),
        Just(1500),
        Just(0),
        Just(u16::MAX),
        any::<u16>()
    ];
    (spec, port, kind(), role())
}

/// The query address for a spec: host bits of the chosen rule's prefix
/// filled from `bits`; `remap` switches an IPv4 address between its plain
/// and mapped spellings.
fn query_addr(spec: &QuerySpec, live: &[(RuleId, Rule)]) -> IpAddr {
    match *spec {
        QuerySpec::InRule(i, bits, remap) if !live.is_empty() => {
            let p = live[i % live.len()].1.prefix;
            let addr = match p.addr() {
                IpAddr::V4(a) => {
                    let host = u32::MAX.checked_shr(u32::from(p.len())).unwrap_or(0);
                    IpAddr::V4(Ipv4Addr::from(u32::from(a) | (bits as u32 & host)))
                }
                IpAddr::V6(a) => {
                    let host = u128::MAX.checked_shr(u32::from(p.len())).unwrap_or(0);
                    IpAddr::V6(Ipv6Addr::from(u128::from(a) | (bits & host)))
                }
            };
            match (addr, remap) {
                (IpAddr::V4(a), true) => IpAddr::V6(a.to_ipv6_mapped()),
                (IpAddr::V6(a), true) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
                _ => addr,
            }
        }
        QuerySpec::InRule(_, bits, _) => make_addr(Fam::V4, 0, bits),
        QuerySpec::Near(fam, seed, bits) => make_addr(fam, seed, bits),
    }
}

/// (is IPv4, bits left-aligned in a u128, length), with mapped IPv6 as IPv4.
/// Written apart from the crate's own code on purpose.
fn reference_net(addr: IpAddr, len: u8) -> (bool, u128, u8) {
    match addr {
        IpAddr::V4(a) => (true, u128::from(u32::from(a)) << 96, len),
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mapped = bits >> 32 == 0xffff;
            if mapped && len >= 96 {
                (true, bits << 96, len - 96)
            } else {
                (false, bits, len)
            }
        }
    }
}

fn reference_matches(r: &Rule, q: &Query) -> bool {
    let (pv4, pbits, plen) = reference_net(r.prefix.addr(), r.prefix.len());
    let (qv4, qbits, _) = reference_net(q.addr, 128);
    let mask = if plen == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(plen))
    };
    pv4 == qv4
        && qbits & mask == pbits
        && *r.ports.start() <= q.port
        && q.port <= *r.ports.end()
        && r.kind.is_none_or(|k| k == q.kind)
        // A rule without a role matches every role but accept.
        && r.role.map_or(q.role != Role::Accept, |x| x == q.role)
}

/// Every matching rule, best first, by a linear scan. `live` is in
/// insertion order, so a stable sort leaves ties in insertion order.
fn reference_candidates(live: &[(RuleId, Rule)], q: &Query) -> Vec<RuleId> {
    let mut hits: Vec<&(RuleId, Rule)> = live
        .iter()
        .filter(|(_, r)| reference_matches(r, q))
        .collect();
    hits.sort_by_key(|(_, r)| {
        let (_, _, len) = reference_net(r.prefix.addr(), r.prefix.len());
        (Reverse(len), Reverse(r.priority))
    });
    hits.into_iter().map(|(id, _)| *id).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn table_agrees_with_linear_scan(
        ops in proptest::collection::vec(op(), 0..80),
        queries in proptest::collection::vec(query_spec(), 1..40),
        default in proptest::collection::vec(any::<StackId>(), 0..3),
    ) {
        let mut table = RouteTable::new();
        table.set_default(default.clone());
        let mut live: Vec<(RuleId, Rule)> = Vec::new();
        for op in ops {
            match op {
                Op::Insert(rule) => live.push((table.insert(rule.clone()), rule)),
                Op::Remove(i) if !live.is_empty() => {
                    let (id, rule) = live.remove(i % live.len());
                    prop_assert_eq!(table.remove(id), Some(rule));
                    prop_assert_eq!(table.remove(id), None);
                }
                Op::Remove(_) => {}
                Op::Reinsert(i, priority) if !live.is_empty() => {
                    let mut rule = live[i % live.len()].1.clone();
                    rule.priority = priority;
                    live.push((table.insert(rule.clone()), rule));
                }
                Op::Reinsert(..) => {}
            }
        }

        prop_assert_eq!(table.len(), live.len());
        prop_assert_eq!(table.is_empty(), live.is_empty());
        let listed: Vec<(RuleId, Rule)> = table.iter().map(|(id, r)| (id, r.clone())).collect();
        prop_assert_eq!(&listed, &live);
        for (id, rule) in &live {
            prop_assert_eq!(table.get(*id), Some(rule));
        }

        for (spec, port, kind, role) in queries {
            let q = Query::new(query_addr(&spec, &live), port, kind, role);
            let expected = reference_candidates(&live, &q);
            prop_assert_eq!(&table.candidates(&q), &expected, "query {:?}", q);
            let d = table.lookup(&q);
            prop_assert_eq!(d.rule, expected.first().copied(), "query {:?}", q);
            let stacks = match d.rule {
                Some(id) => &live.iter().find(|(i, _)| *i == id).expect("winner is live").1.stacks,
                None => &default,
            };
            prop_assert_eq!(d.stacks, &stacks[..]);
            for (_, r) in &live {
                prop_assert_eq!(r.matches(&q), reference_matches(r, &q), "{:?} {:?}", r, q);
            }
        }
    }
}

/// Queries hit rules: guards against generators that only ever miss, which
/// would make the property above pass vacuously.
#[test]
fn generated_queries_mostly_hit() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut hits, mut multi, mut total) = (0, 0, 0);
    for _ in 0..200 {
        let rules = proptest::collection::vec(rule(), 1..40)
            .new_tree(&mut runner)
            .expect("strategy")
            .current();
        let mut table = RouteTable::new();
        let live: Vec<(RuleId, Rule)> = rules
            .into_iter()
            .map(|r| (table.insert(r.clone()), r))
            .collect();
        let (spec, port, kind, role) = query_spec()
            .new_tree(&mut runner)
            .expect("strategy")
            .current();
        if role == Role::Accept {
            continue; // matched only by the few rules naming it
        }
        let q = Query::new(query_addr(&spec, &live), port, kind, role);
        let n = table.candidates(&q).len();
        total += 1;
        hits += usize::from(n > 0);
        multi += usize::from(n > 1);
    }
    assert!(hits * 2 > total, "only {hits}/{total} queries hit a rule");
    assert!(
        multi * 5 > total,
        "only {multi}/{total} queries hit several rules"
    );
}
