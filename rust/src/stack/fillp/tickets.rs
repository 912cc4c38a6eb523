//! Resumption tickets a client instance holds, by server address.
//!
//! A FillP listener gives each client a ticket in its CONN_ACK (see the
//! handshake docs in [`crate::fillp::connection`]). With a ticket for a
//! server, the next connect to it sends CONN_REQ at once: one round trip
//! instead of two, and over loopback, where a connect waits for the
//! CONN_ACK (the server's accept queue then holds the connection, as
//! after a kernel connect), that halves its latency. A ticket is used for
//! [`TICKET_USE`], well inside the server's [`TICKET_LIFETIME`]: one the
//! server refuses anyway (it restarted, its secret rotated twice) costs
//! that connect one more round trip and is dropped.
//!
//! The cache lives in the instance's state, behind its lock, which every
//! connect and every completed handshake hold already.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::fillp::endpoint::TICKET_LIFETIME;
use crate::fillp::Resumption;

/// How long a client uses a ticket after it got it: half the server's
/// lifetime, so clock drift and a slow handshake never make it stale.
pub const TICKET_USE: Duration = Duration::from_secs(TICKET_LIFETIME.as_secs() / 2);

/// Servers remembered at most; past it, expired entries go, then all.
const MAX_ENTRIES: usize = 1024;

/// The latest ticket from each server this instance connected to.
#[derive(Debug, Default)]
pub struct TicketCache {
    entries: HashMap<SocketAddr, (Instant, Resumption)>,
}

impl TicketCache {
    /// A ticket for `server` younger than [`TICKET_USE`] at `now`.
    pub fn get(&self, server: SocketAddr, now: Instant) -> Option<Resumption> {
        let &(at, r) = self.entries.get(&server)?;
        (now.saturating_duration_since(at) < TICKET_USE).then_some(r)
    }

    /// Remembers the ticket `server` gave at `now`.
    pub fn put(&mut self, server: SocketAddr, r: Resumption, now: Instant) {
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&server) {
            self.entries
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < TICKET_USE);
            if self.entries.len() >= MAX_ENTRIES {
                self.entries.clear();
            }
        }
        self.entries.insert(server, (now, r));
    }

    /// Forgets `server`'s ticket (it refused it).
    pub fn forget(&mut self, server: SocketAddr) {
        self.entries.remove(&server);
    }

    /// Servers with a ticket kept (expired ones included until evicted).
    pub(super) fn servers(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fillp::wire::{HsParams, RateMode, Ticket};

    fn ticket(time: u32) -> Resumption {
        Resumption {
            params: HsParams {
                mtu: 1400,
                window: 1 << 20,
                mode: RateMode::Bbr,
            },
            ticket: Ticket {
                time,
                mac: [time as u8; 16],
            },
        }
    }

    #[test]
    fn a_ticket_is_used_for_a_while_per_server() {
        let t0 = Instant::now();
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.1:81".parse().unwrap(),
        );
        let mut c = TicketCache::default();
        c.put(a, ticket(1), t0);
        assert_eq!(c.get(a, t0 + TICKET_USE / 2), Some(ticket(1)));
        assert_eq!(c.get(b, t0), None);
        assert_eq!(c.get(a, t0 + TICKET_USE), None);
        // A newer ticket replaces the old one; a refused one is forgotten.
        c.put(a, ticket(2), t0 + TICKET_USE);
        assert_eq!(c.get(a, t0 + TICKET_USE), Some(ticket(2)));
        c.forget(a);
        assert!(c.get(a, t0 + TICKET_USE).is_none() && c.servers() == 0);
    }

    #[test]
    fn the_cache_is_bounded() {
        let t0 = Instant::now();
        let mut c = TicketCache::default();
        for port in 0..MAX_ENTRIES as u16 {
            c.put(SocketAddr::from(([10, 0, 0, 1], port)), ticket(1), t0);
        }
        assert_eq!(c.servers(), MAX_ENTRIES);
        // Full of live entries: all go for the new one.
        let late = t0 + Duration::from_secs(1);
        c.put("10.0.0.2:1".parse().unwrap(), ticket(2), late);
        assert_eq!(c.servers(), 1);
    }
}
