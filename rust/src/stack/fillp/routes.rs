//! The kernel's routes to recent peers, remembered for a second.
//!
//! Reading a route takes a probe socket: six system calls
//! ([`udp::route_to`]). Every connect and every accepted connection asks for
//! one (the datagram size and the source address come from it), and a client
//! connecting to one server in a loop asked the same question thousands of
//! times a second, under the stack's lock. An answer is kept for
//! [`ROUTE_TTL`], so a route that changes (a path MTU lowered by ICMP, a
//! device removed) is seen within that time; failures are not kept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::udp::{self, Route};
use crate::stack::userspace::lock;

/// How long an answer is used.
pub const ROUTE_TTL: Duration = Duration::from_secs(1);
/// Peers kept at most; past it, expired entries go, then all of them.
const MAX_ENTRIES: usize = 1024;

/// Recent [`udp::route_to`] answers, by peer address (port zeroed: routing
/// does not look at it).
#[derive(Debug, Default)]
pub struct RouteCache {
    entries: Mutex<HashMap<SocketAddr, (Instant, Route)>>,
}

impl RouteCache {
    /// The route to `peer`: a remembered one younger than [`ROUTE_TTL`], or
    /// a fresh read (`None` if the kernel has no route).
    pub fn route_to(&self, peer: SocketAddr) -> Option<Route> {
        let now = Instant::now();
        let mut key = peer;
        key.set_port(0);
        if let Some(&(at, route)) = lock(&self.entries).get(&key) {
            if now.saturating_duration_since(at) < ROUTE_TTL {
                return Some(route);
            }
        }
        // Read outside the cache's lock: concurrent misses each probe once.
        let route = udp::route_to(peer).ok()?;
        let mut entries = lock(&self.entries);
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (at, _)| now.saturating_duration_since(*at) < ROUTE_TTL);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, (now, route));
        Some(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_match_the_kernel_and_are_kept_per_address() {
        let cache = RouteCache::default();
        let a = SocketAddr::from(([127, 0, 0, 1], 9));
        let direct = udp::route_to(a).unwrap();
        assert_eq!(cache.route_to(a), Some(direct));
        // Another port to the same address is the same entry.
        assert_eq!(
            cache.route_to(SocketAddr::from(([127, 0, 0, 1], 80))),
            Some(direct)
        );
        assert_eq!(lock(&cache.entries).len(), 1);
        cache
            .route_to(SocketAddr::from(([127, 0, 0, 2], 9)))
            .unwrap();
        assert_eq!(lock(&cache.entries).len(), 2);
    }

    #[test]
    fn an_old_answer_is_read_again() {
        let cache = RouteCache::default();
        let a = SocketAddr::from(([127, 0, 0, 1], 9));
        let mut key = a;
        key.set_port(0);
        let stale = Route {
            source: "192.0.2.1".parse().unwrap(),
            mtu: Some(1),
        };
        let old = Instant::now() - ROUTE_TTL - Duration::from_millis(1);
        lock(&cache.entries).insert(key, (old, stale));
        assert_eq!(cache.route_to(a), Some(udp::route_to(a).unwrap()));
        // A young one is used as it is.
        lock(&cache.entries).insert(key, (Instant::now(), stale));
        assert_eq!(cache.route_to(a), Some(stale));
    }

    #[test]
    fn the_table_stays_bounded() {
        let cache = RouteCache::default();
        let old = Instant::now() - ROUTE_TTL;
        let route = udp::route_to(SocketAddr::from(([127, 0, 0, 1], 9))).unwrap();
        for i in 0..MAX_ENTRIES as u32 {
            let ip = std::net::Ipv4Addr::from(0x7f00_0000 + 1 + i);
            lock(&cache.entries).insert(SocketAddr::from((ip, 0)), (old, route));
        }
        cache
            .route_to(SocketAddr::from(([127, 0, 0, 1], 9)))
            .unwrap();
        assert_eq!(lock(&cache.entries).len(), 1);
    }
}
