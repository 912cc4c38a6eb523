//! Route lookup cost: one `RouteTable::lookup` per iteration, cycling over
//! 4096 precomputed queries so branch predictors and caches see a realistic
//! mix rather than one hot address.
//!
//! Rule sets are generated from a fixed seed: about 60% IPv4 (lengths 8 to
//! 32, with /16, /24 and /32 the most common), 35% IPv6 (mostly /32, /48,
//! /56, /64, /128, the rest any length from 16 to 128), 5% IPv4-mapped IPv6;
//! about one rule in ten has a port range, a socket kind, a role or a
//! priority. There is no catch-all rule, so "miss" queries, addresses in
//! ranges the generator never uses, fall to the default route after visiting
//! every prefix length of their family: the worst case.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use dmm::route::{Prefix, Query, Role, RouteTable, Rule, SockKind};

/// SplitMix64: tiny, seeded, good enough to spread test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn u128(&mut self) -> u128 {
        (u128::from(self.next()) << 64) | u128::from(self.next())
    }
}

fn v4_net(bits: u32, len: u8) -> Prefix {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    Prefix::new(IpAddr::V4(Ipv4Addr::from(bits & mask)), len).expect("masked")
}

fn v6_net(bits: u128, len: u8) -> Prefix {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    Prefix::new(IpAddr::V6(Ipv6Addr::from(bits & mask)), len).expect("masked")
}

/// IPv4 rules stay below 224.0.0.0 and IPv6 rules inside 2000::/4, so
/// 240.0.0.0/4 and 3000::/4 are guaranteed misses.
fn random_prefix(rng: &mut Rng) -> Prefix {
    let v4_len = |rng: &mut Rng| match rng.below(10) {
        0..=2 => 24,
        3..=4 => 16,
        5 => 32,
        _ => 8 + rng.below(25) as u8,
    };
    let v4_bits = |rng: &mut Rng| (rng.next() as u32) % 0xe000_0000;
    match rng.below(100) {
        0..=59 => v4_net(v4_bits(rng), v4_len(rng)),
        60..=94 => {
            let len = match rng.below(10) {
                0..=1 => 48,
                2..=3 => 64,
                4 => 32,
                5 => 56,
                6 => 128,
                _ => 16 + rng.below(113) as u8,
            };
            let bits = (rng.u128() & (u128::MAX >> 4)) | (2 << 124);
            v6_net(bits, len)
        }
        _ => {
            let v4 = v4_net(v4_bits(rng), v4_len(rng));
            let addr = match v4.addr() {
                IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
                other => other,
            };
            Prefix::new(addr, v4.len() + 96).expect("mapped")
        }
    }
}

fn random_kind(rng: &mut Rng) -> SockKind {
    [SockKind::Stream, SockKind::Dgram][rng.below(2) as usize]
}

fn random_role(rng: &mut Rng) -> Role {
    [Role::Connect, Role::Listen, Role::SendTo][rng.below(3) as usize]
}

fn build(n: usize, rng: &mut Rng) -> RouteTable {
    let mut table = RouteTable::new();
    table.set_default(vec![0]);
    for i in 0..n {
        let mut rule = Rule::new(random_prefix(rng), vec![1 + (i % 7) as u16, 0]);
        if rng.chance(10) {
            let lo = rng.below(60_000) as u16;
            rule.ports = lo..=lo + rng.below(2000) as u16;
        }
        if rng.chance(10) {
            rule.kind = Some(random_kind(rng));
        }
        if rng.chance(5) {
            rule.role = Some(random_role(rng));
        }
        if rng.chance(10) {
            rule.priority = rng.below(5) as i32 - 2;
        }
        rule.tag = i as u32;
        table.insert(rule);
    }
    table
}

/// An address inside `p`, host bits random.
fn inside(p: Prefix, rng: &mut Rng) -> IpAddr {
    match p.addr() {
        IpAddr::V4(a) => {
            let host = u32::MAX.checked_shr(u32::from(p.len())).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) | (rng.next() as u32 & host)))
        }
        IpAddr::V6(a) => {
            let host = u128::MAX.checked_shr(u32::from(p.len())).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) | (rng.u128() & host)))
        }
    }
}

fn random_query(addr: IpAddr, rng: &mut Rng) -> Query {
    let port = if rng.chance(50) {
        443
    } else {
        rng.next() as u16
    };
    Query::new(addr, port, random_kind(rng), random_role(rng))
}

/// Queries aimed at random rules' prefixes (so they hit that rule or a
/// longer or better one).
fn hit_queries(table: &RouteTable, rng: &mut Rng) -> Vec<Query> {
    let prefixes: Vec<Prefix> = table.iter().map(|(_, r)| r.prefix).collect();
    (0..4096)
        .map(|_| {
            let p = prefixes[rng.below(prefixes.len() as u64) as usize];
            let addr = inside(p, rng);
            random_query(addr, rng)
        })
        .collect()
}

/// Half IPv4 in 240.0.0.0/4, half IPv6 in 3000::/4: no rule matches.
fn miss_queries(rng: &mut Rng) -> Vec<Query> {
    (0..4096)
        .map(|i| {
            let addr = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::from(0xf000_0000 | (rng.next() as u32 >> 4)))
            } else {
                IpAddr::V6(Ipv6Addr::from((3 << 124) | (rng.u128() >> 4)))
            };
            random_query(addr, rng)
        })
        .collect()
}

fn bench_case(c: &mut Criterion, name: &str, table: &RouteTable, queries: &[Query]) {
    let mut i = 0;
    c.benchmark_group("route lookup").bench_function(name, |b| {
        b.iter(|| {
            i = (i + 1) % queries.len();
            black_box(table.lookup(black_box(&queries[i])).rule)
        })
    });
}

fn route_lookup(c: &mut Criterion) {
    let mut rng = Rng(0x5eed_d33d);
    let big = build(10_000, &mut rng);
    let small = build(100, &mut rng);
    let big_hits = hit_queries(&big, &mut rng);
    let small_hits = hit_queries(&small, &mut rng);
    let misses = miss_queries(&mut rng);

    // Sanity: the hit sets really hit and the misses really miss.
    let hit_rate = |t: &RouteTable, qs: &[Query]| {
        qs.iter().filter(|q| t.lookup(q).rule.is_some()).count() * 100 / qs.len()
    };
    assert!(hit_rate(&big, &big_hits) > 80, "10k hit rate too low");
    assert!(hit_rate(&small, &small_hits) > 80, "100 hit rate too low");
    assert_eq!(hit_rate(&big, &misses), 0, "miss queries hit");

    bench_case(c, "10k rules", &big, &big_hits);
    bench_case(c, "100 rules", &small, &small_hits);
    bench_case(c, "10k rules, miss", &big, &misses);
}

criterion_group!(benches, route_lookup);
criterion_main!(benches);
