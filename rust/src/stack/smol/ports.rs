//! Local port bookkeeping of one instance, per protocol.
//!
//! smoltcp keeps no port table: two sockets may listen on one port and
//! `connect` wants the local port from the caller. So the instance reserves
//! ports here: `bind` (explicit or ephemeral), and the ephemeral port of an
//! unbound `connect`. A port is one owner's until released; a closed TCP
//! socket releases it only once smoltcp has let go of its connection (after
//! TIME-WAIT), so a new connection never reuses a live four-tuple.
//! Addresses are not part of the key: an instance has few addresses and a
//! port bound on one of them is taken on all, a simplification of the
//! kernel's rules that errs on the safe side (`EADDRINUSE`).

use std::collections::HashSet;
use std::io;

use crate::stack::errno;

/// First port of the ephemeral range (as IANA and Linux' default).
pub const EPHEMERAL_FIRST: u16 = 32768;
/// Last port of the ephemeral range.
pub const EPHEMERAL_LAST: u16 = 60999;

/// The transport protocol a port belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// The reserved ports of an instance.
#[derive(Debug)]
pub struct Ports {
    used: HashSet<(Proto, u16)>,
    /// Where the next ephemeral search starts (moves on, so ports are not
    /// reused at once).
    cursor: u16,
}

impl Ports {
    /// An empty table; `seed` picks where ephemeral allocation starts.
    pub fn new(seed: u64) -> Ports {
        let span = u64::from(EPHEMERAL_LAST - EPHEMERAL_FIRST) + 1;
        Ports {
            used: HashSet::new(),
            cursor: EPHEMERAL_FIRST + (seed % span) as u16,
        }
    }

    /// Reserves `port` (0: a free ephemeral one) and returns it.
    pub fn reserve(&mut self, proto: Proto, port: u16) -> io::Result<u16> {
        if port != 0 {
            return if self.used.insert((proto, port)) {
                Ok(port)
            } else {
                Err(errno(libc::EADDRINUSE))
            };
        }
        let span = u32::from(EPHEMERAL_LAST - EPHEMERAL_FIRST) + 1;
        for _ in 0..span {
            let p = self.cursor;
            self.cursor = if p >= EPHEMERAL_LAST {
                EPHEMERAL_FIRST
            } else {
                p + 1
            };
            if self.used.insert((proto, p)) {
                return Ok(p);
            }
        }
        Err(errno(libc::EADDRNOTAVAIL))
    }

    /// Gives `port` back.
    pub fn release(&mut self, proto: Proto, port: u16) {
        self.used.remove(&(proto, port));
    }

    /// How many ports are reserved.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Whether no port is reserved.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_twice_is_in_use() {
        let mut p = Ports::new(0);
        assert_eq!(p.reserve(Proto::Tcp, 80).unwrap(), 80);
        let e = p.reserve(Proto::Tcp, 80).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
        assert_eq!(p.reserve(Proto::Udp, 80).unwrap(), 80);
        p.release(Proto::Tcp, 80);
        assert_eq!(p.reserve(Proto::Tcp, 80).unwrap(), 80);
    }

    #[test]
    fn ephemeral_ports_are_distinct_and_in_range() {
        let mut p = Ports::new(u64::MAX);
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let port = p.reserve(Proto::Tcp, 0).unwrap();
            assert!((EPHEMERAL_FIRST..=EPHEMERAL_LAST).contains(&port));
            assert!(seen.insert(port));
        }
    }

    #[test]
    fn exhaustion_is_an_error() {
        let mut p = Ports::new(1);
        let span = usize::from(EPHEMERAL_LAST - EPHEMERAL_FIRST) + 1;
        for _ in 0..span {
            p.reserve(Proto::Udp, 0).unwrap();
        }
        let e = p.reserve(Proto::Udp, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL));
    }
}
