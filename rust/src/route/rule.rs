//! Rules and the queries they are matched against.

use std::net::IpAddr;
use std::ops::{Bound, RangeBounds, RangeInclusive};

use super::Prefix;

/// Identifies a stack instance; the caller assigns the numbers.
pub type StackId = u16;

/// The socket call that asks for a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// `connect()`: the address is the peer.
    Connect,
    /// `listen()`: the address is the local bind address.
    Listen,
    /// The first `sendto()` on an unconnected socket: the address is the peer.
    SendTo,
    /// A connection arriving on a listener: the address is the client's,
    /// the port the listener's. Only rules that name this role match it, so
    /// the ordinary rules (which name no role) never refuse a client.
    Accept,
}

impl Role {
    /// Whether a rule with role `rule` matches a query with role `self`.
    fn matched_by(self, rule: Option<Role>) -> bool {
        match rule {
            None => self != Role::Accept,
            Some(r) => r == self,
        }
    }
}

/// The socket type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SockKind {
    /// `SOCK_STREAM`.
    Stream,
    /// `SOCK_DGRAM`.
    Dgram,
}

/// What a socket asks the table about.
#[derive(Clone, Copy, Debug)]
pub struct Query {
    /// Destination (or, for [`Role::Listen`], the bind address).
    pub addr: IpAddr,
    /// Destination (or bind) port.
    pub port: u16,
    /// Socket type.
    pub kind: SockKind,
    /// The call being routed.
    pub role: Role,
}

impl Query {
    /// Shorthand for the struct literal.
    pub fn new(addr: IpAddr, port: u16, kind: SockKind, role: Role) -> Query {
        Query {
            addr,
            port,
            kind,
            role,
        }
    }
}

/// One routing rule: which queries it matches and which stacks it picks.
///
/// See the [module docs](super) for how rules are ranked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The destination network.
    pub prefix: Prefix,
    /// Ports matched; `0..=65535` matches any. An empty range matches none.
    pub ports: RangeInclusive<u16>,
    /// Socket type matched; `None` matches any.
    pub kind: Option<SockKind>,
    /// Call matched; `None` matches any but [`Role::Accept`].
    pub role: Option<Role>,
    /// Breaks ties between rules with the same prefix length: larger wins.
    pub priority: i32,
    /// Stacks to use, in preference order.
    pub stacks: Vec<StackId>,
    /// Opaque to the table; the caller stores e.g. the config entry's index.
    pub tag: u32,
}

impl Rule {
    /// A rule for `prefix` matching any port, kind and role, priority 0, tag 0.
    pub fn new(prefix: Prefix, stacks: Vec<StackId>) -> Rule {
        Rule {
            prefix,
            ports: 0..=u16::MAX,
            kind: None,
            role: None,
            priority: 0,
            stacks,
            tag: 0,
        }
    }

    /// Whether this rule applies to `q`: the prefix contains the address
    /// (IPv4-mapped IPv6 counted as IPv4), the port is in range, and kind
    /// and role match (`None` matches any kind, and any role but accept).
    pub fn matches(&self, q: &Query) -> bool {
        self.prefix.contains(q.addr)
            && self.ports.contains(&q.port)
            && self.kind.is_none_or(|k| k == q.kind)
            && q.role.matched_by(self.role)
    }
}

/// Bits of [`Filter::bits`]: one per kind, one per role.
const STREAM: u8 = 1 << 0;
const DGRAM: u8 = 1 << 1;
const CONNECT: u8 = 1 << 2;
const LISTEN: u8 = 1 << 3;
const SENDTO: u8 = 1 << 4;
const ACCEPT: u8 = 1 << 5;

fn kind_bit(k: SockKind) -> u8 {
    match k {
        SockKind::Stream => STREAM,
        SockKind::Dgram => DGRAM,
    }
}

fn role_bit(r: Role) -> u8 {
    match r {
        Role::Connect => CONNECT,
        Role::Listen => LISTEN,
        Role::SendTo => SENDTO,
        Role::Accept => ACCEPT,
    }
}

/// The non-address part of a rule, packed so the lookup loop checks it with
/// two compares and one mask test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Filter {
    lo: u16,
    hi: u16,
    /// Kinds and roles accepted; a query matches when all its bits are set.
    bits: u8,
}

impl Filter {
    pub(crate) fn of(rule: &Rule) -> Filter {
        let kinds = rule.kind.map_or(STREAM | DGRAM, kind_bit);
        let roles = rule.role.map_or(CONNECT | LISTEN | SENDTO, role_bit);
        // Go through the bounds rather than start()/end(): a range that was
        // iterated to exhaustion reports its end as excluded.
        let lo = *rule.ports.start();
        let (lo, hi) = match rule.ports.end_bound() {
            Bound::Included(&hi) => (lo, hi),
            Bound::Excluded(&hi) if hi > 0 => (lo, hi - 1),
            // Nothing below 0: an empty range, which lo > hi encodes.
            _ => (1, 0),
        };
        Filter {
            lo,
            hi,
            bits: kinds | roles,
        }
    }

    /// The query's bits, computed once per lookup.
    #[inline]
    pub(crate) fn query_bits(q: &Query) -> u8 {
        kind_bit(q.kind) | role_bit(q.role)
    }

    #[inline]
    pub(crate) fn accepts(&self, port: u16, qbits: u8) -> bool {
        self.lo <= port && port <= self.hi && self.bits & qbits == qbits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(addr: &str, port: u16, kind: SockKind, role: Role) -> Query {
        Query::new(addr.parse().unwrap(), port, kind, role)
    }

    #[test]
    fn rule_new_matches_anything_in_prefix() {
        let r = Rule::new("10.0.0.0/8".parse().unwrap(), vec![1]);
        for kind in [SockKind::Stream, SockKind::Dgram] {
            for role in [Role::Connect, Role::Listen, Role::SendTo] {
                for port in [0, 80, u16::MAX] {
                    assert!(r.matches(&q("10.1.1.1", port, kind, role)));
                    assert!(r.matches(&q("::ffff:10.1.1.1", port, kind, role)));
                    assert!(!r.matches(&q("11.1.1.1", port, kind, role)));
                }
            }
            // Accept queries are for rules that ask for them by name.
            assert!(!r.matches(&q("10.1.1.1", 80, kind, Role::Accept)));
        }
    }

    #[test]
    fn filter_agrees_with_matches() {
        let mut r = Rule::new("::/0".parse().unwrap(), vec![]);
        let kinds = [None, Some(SockKind::Stream), Some(SockKind::Dgram)];
        let roles = [
            None,
            Some(Role::Connect),
            Some(Role::Listen),
            Some(Role::SendTo),
            Some(Role::Accept),
        ];
        let mut exhausted = 5..=6;
        exhausted.by_ref().for_each(drop);
        let mut exhausted_zero = 0..=0;
        exhausted_zero.next();
        let ranges = [
            0..=u16::MAX,
            80..=80,
            1000..=2000,
            RangeInclusive::new(9, 3), // empty: start above end
            exhausted,
            exhausted_zero,
        ];
        for kind in kinds {
            for role in roles {
                for ports in ranges.clone() {
                    r.kind = kind;
                    r.role = role;
                    r.ports = ports;
                    let f = Filter::of(&r);
                    for qk in [SockKind::Stream, SockKind::Dgram] {
                        for qr in [Role::Connect, Role::Listen, Role::SendTo, Role::Accept] {
                            for port in [0, 5, 6, 9, 80, 81, 999, 1000, 2000, 2001, u16::MAX] {
                                let query = q("::1", port, qk, qr);
                                assert_eq!(
                                    f.accepts(port, Filter::query_bits(&query)),
                                    r.matches(&query),
                                    "{r:?} {query:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
