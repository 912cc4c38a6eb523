//! The routing table: which stack instances carry a socket.
//!
//! At `connect()`, `listen()` or the first `sendto()`, the socket asks the
//! table with a [`Query`] (address, port, socket kind, role) and gets a
//! [`Decision`]: the winning [`Rule`]'s id and its stacks, in preference
//! order, or the default stacks when no rule matches. Python policy hooks
//! may refine the decision; this module knows nothing of them.
//!
//! # Matching
//!
//! A rule matches a query when all of these hold:
//!
//! - its prefix contains the query's address, in the same family. An
//!   IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) counts as IPv4, both in the
//!   query and in the rule: a mapped prefix of length 96 + n is the IPv4
//!   prefix of length n. IPv6 prefixes shorter than /96 (`::/0` too) never
//!   match IPv4 or mapped addresses, and IPv4 prefixes never match IPv6 ones;
//! - the port is in the rule's inclusive range (`0..=65535` for any);
//! - the socket kind and the role equal the rule's, where the rule has one
//!   (`None` matches any).
//!
//! # Ranking
//!
//! Among matching rules the longest prefix wins (measured after unmapping,
//! so `::ffff:10.0.0.0/104` ties with `10.0.0.0/8`); then the larger
//! priority; then the rule inserted earlier. A longer prefix whose port,
//! kind or role does not fit does not hide a shorter one that does.
//! [`RouteTable::candidates`] lists every matching rule in this order, for
//! `dmm route explain`.
//!
//! # Design
//!
//! Per family, one hash map per prefix length in use, keyed by the network
//! bits (`u32` or `u128`), holding that prefix's rules already in rank order.
//! A lookup masks the address for each length in use, longest first, and
//! stops at the first rule whose port, kind and role fit, so its cost grows
//! with the number of distinct lengths, not of rules. The maps use a
//! multiply-xorshift hasher: the keys come from configuration, not from
//! peers, so SipHash's flooding defence buys nothing here.

mod family;
mod hash;
mod prefix;
mod rule;
mod table;

pub use prefix::{Prefix, PrefixError, PrefixErrorKind};
pub use rule::{Query, Role, Rule, SockKind, StackId};
pub use table::{Decision, RouteTable, RuleId};
