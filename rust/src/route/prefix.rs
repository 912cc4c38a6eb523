//! IP prefixes: parsing, validation, containment and the canonical form the
//! table indexes by.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP network: an address and a prefix length, with no host bits set.
///
/// A bare address parses as a host route (`/32` or `/128`).
///
/// Equality is on the address as written: `::ffff:10.0.0.0/104` and
/// `10.0.0.0/8` are different values, but they contain the same addresses
/// and the routing table treats them as the same prefix (see [`super`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// Why a prefix was rejected. Part of [`PrefixError`].
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixErrorKind {
    /// The input was empty.
    Empty,
    /// The part before `/` is not an IPv4 or IPv6 address.
    BadAddress,
    /// The part after `/` is not a decimal number.
    BadLength,
    /// The length is larger than the family allows.
    TooLong {
        /// 32 for IPv4, 128 for IPv6.
        max: u8,
    },
    /// Bits after the prefix length are set in the address.
    HostBitsSet {
        /// The network the caller probably meant (host bits cleared).
        network: Prefix,
    },
}

/// A prefix that could not be parsed or built; its message names the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixError {
    input: String,
    kind: PrefixErrorKind,
}

/// What a valid prefix looks like, appended to parse errors.
const EXPECTED: &str = "expected an address with an optional /length, \
                        such as \"10.0.0.0/8\", \"fe80::/10\" or \"192.0.2.1\"";

impl PrefixError {
    fn new(input: impl Into<String>, kind: PrefixErrorKind) -> Self {
        PrefixError {
            input: input.into(),
            kind,
        }
    }

    /// The rejected input, as given (for [`Prefix::new`], `addr/len`).
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Why it was rejected.
    pub fn kind(&self) -> PrefixErrorKind {
        self.kind
    }
}

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let input = &self.input;
        match self.kind {
            PrefixErrorKind::Empty => write!(f, "invalid prefix \"\": empty; {EXPECTED}"),
            PrefixErrorKind::BadAddress => {
                let addr = input.split_once('/').map_or(input.as_str(), |(a, _)| a);
                write!(
                    f,
                    "invalid prefix {input:?}: {addr:?} is not an IPv4 or IPv6 address; {EXPECTED}"
                )
            }
            PrefixErrorKind::BadLength => {
                let len = input.split_once('/').map_or("", |(_, l)| l);
                write!(
                    f,
                    "invalid prefix {input:?}: length {len:?} is not a decimal number \
                     (0 to 32 for IPv4, 0 to 128 for IPv6)"
                )
            }
            PrefixErrorKind::TooLong { max } => {
                let family = if max == 32 { "IPv4" } else { "IPv6" };
                write!(
                    f,
                    "invalid prefix {input:?}: length is larger than {max}, the maximum for {family}"
                )
            }
            PrefixErrorKind::HostBitsSet { network } => write!(
                f,
                "invalid prefix {input:?}: host bits are set after the prefix length; \
                 expected the network address, {network}"
            ),
        }
    }
}

impl std::error::Error for PrefixError {}

/// A prefix or address reduced to one family, IPv4-mapped IPv6 counted as
/// IPv4. The table keys on this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Canonical {
    /// Address bits (host bits zero for a prefix) and length.
    V4(u32, u8),
    /// Address bits (host bits zero for a prefix) and length.
    V6(u128, u8),
}

/// Network mask of `len` leading ones; `len` must be at most 32.
#[inline]
pub(crate) fn mask_v4(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

/// Network mask of `len` leading ones; `len` must be at most 128.
#[inline]
pub(crate) fn mask_v6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

/// Length of `::ffff:0:0/96`, the IPv4-mapped block.
const MAPPED_LEN: u8 = 96;

/// An address in canonical form; the length is the host-route length.
#[inline]
pub(crate) fn canonical_addr(ip: IpAddr) -> Canonical {
    match ip {
        IpAddr::V4(a) => Canonical::V4(u32::from(a), 32),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(a) => Canonical::V4(u32::from(a), 32),
            None => Canonical::V6(u128::from(a), 128),
        },
    }
}

impl Prefix {
    /// Builds a prefix, checking that `len` fits the family and that no
    /// host bits are set (`10.0.0.1/8` is refused; its error names
    /// `10.0.0.0/8`).
    pub fn new(addr: IpAddr, len: u8) -> Result<Prefix, PrefixError> {
        let err = |kind| Err(PrefixError::new(format!("{addr}/{len}"), kind));
        let (max, bits_ok, network) = match addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let net = bits & mask_v4(len.min(32));
                (32, bits == net, IpAddr::V4(Ipv4Addr::from(net)))
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let net = bits & mask_v6(len.min(128));
                (128, bits == net, IpAddr::V6(Ipv6Addr::from(net)))
            }
        };
        if len > max {
            return err(PrefixErrorKind::TooLong { max });
        }
        if !bits_ok {
            let network = Prefix { addr: network, len };
            return err(PrefixErrorKind::HostBitsSet { network });
        }
        Ok(Prefix { addr, len })
    }

    /// A host route: the address with length 32 or 128. Never fails.
    pub fn host(addr: IpAddr) -> Prefix {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Prefix { addr, len }
    }

    /// The network address, as given.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits, as given (counting the 96 mapped bits for
    /// an IPv4-mapped IPv6 prefix).
    // A prefix is never "empty" (`/0` holds every address), so no is_empty.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` lies in this network.
    ///
    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), as address or as
    /// prefix of length 96 or more, counts as the IPv4 address: so
    /// `10.0.0.0/8` contains `::ffff:10.1.2.3`, and `::ffff:10.0.0.0/104`
    /// contains `10.1.2.3`. Families never mix otherwise: `::/0` does not
    /// contain `10.1.2.3` nor `::ffff:10.1.2.3`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.canonical(), canonical_addr(ip)) {
            (Canonical::V4(net, len), Canonical::V4(a, _)) => a & mask_v4(len) == net,
            (Canonical::V6(net, len), Canonical::V6(a, _)) => a & mask_v6(len) == net,
            _ => false,
        }
    }

    /// The same network written in its own family: an IPv4-mapped IPv6
    /// prefix of length 96 or more becomes the IPv4 prefix; any other
    /// prefix is returned unchanged.
    pub fn unmapped(&self) -> Prefix {
        match self.canonical() {
            Canonical::V4(net, len) if self.addr.is_ipv6() => Prefix {
                addr: IpAddr::V4(Ipv4Addr::from(net)),
                len,
            },
            _ => *self,
        }
    }

    /// The key the table indexes this prefix by.
    pub(crate) fn canonical(&self) -> Canonical {
        match self.addr {
            IpAddr::V4(a) => Canonical::V4(u32::from(a), self.len),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                // Below /96 the prefix also covers non-mapped addresses, so
                // it stays an IPv6 prefix.
                Some(v4) if self.len >= MAPPED_LEN => {
                    Canonical::V4(u32::from(v4), self.len - MAPPED_LEN)
                }
                _ => Canonical::V6(u128::from(a), self.len),
            },
        }
    }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    /// Parses `addr/len` or a bare address (a host route). The length is
    /// plain decimal digits; no spaces, signs or zone ids.
    fn from_str(s: &str) -> Result<Prefix, PrefixError> {
        if s.is_empty() {
            return Err(PrefixError::new(s, PrefixErrorKind::Empty));
        }
        let (addr_text, len_text) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr = IpAddr::from_str(addr_text)
            .map_err(|_| PrefixError::new(s, PrefixErrorKind::BadAddress))?;
        let Some(len_text) = len_text else {
            return Ok(Prefix::host(addr));
        };
        // u8::from_str would accept "+8"; only digits are a length here.
        let digits_ok = !len_text.is_empty() && len_text.bytes().all(|b| b.is_ascii_digit());
        if !digits_ok {
            return Err(PrefixError::new(s, PrefixErrorKind::BadLength));
        }
        let max = if addr.is_ipv4() { 32 } else { 128 };
        // Too many digits for a u8 is still just "too long".
        let len = match len_text.parse::<u8>() {
            Ok(len) => len,
            Err(_) => return Err(PrefixError::new(s, PrefixErrorKind::TooLong { max })),
        };
        Prefix::new(addr, len).map_err(|e| PrefixError::new(s, e.kind))
    }
}

impl fmt::Display for Prefix {
    /// `addr/len`, always with the length; parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_good_prefixes() {
        let cases = [
            ("10.0.0.0/8", "10.0.0.0", 8),
            ("0.0.0.0/0", "0.0.0.0", 0),
            ("192.0.2.1", "192.0.2.1", 32),
            ("192.0.2.1/32", "192.0.2.1", 32),
            ("::/0", "::", 0),
            ("fe80::/10", "fe80::", 10),
            ("2001:db8::1", "2001:db8::1", 128),
            ("::ffff:10.0.0.0/104", "::ffff:10.0.0.0", 104),
            ("10.0.0.0/008", "10.0.0.0", 8),
        ];
        for (s, addr, len) in cases {
            let got = p(s);
            assert_eq!((got.addr(), got.len()), (ip(addr), len), "{s}");
            // Display round-trips.
            assert_eq!(p(&got.to_string()), got, "{s}");
        }
    }

    #[test]
    fn rejects_bad_prefixes_with_clear_messages() {
        let cases: [(&str, PrefixErrorKind, &str); 12] = [
            ("", PrefixErrorKind::Empty, "empty"),
            ("10.0.0/8", PrefixErrorKind::BadAddress, "\"10.0.0\" is not"),
            ("foo", PrefixErrorKind::BadAddress, "\"foo\" is not"),
            ("/8", PrefixErrorKind::BadAddress, "\"\" is not"),
            (
                "fe80::1%eth0/64",
                PrefixErrorKind::BadAddress,
                "fe80::1%eth0",
            ),
            ("10.0.0.0/", PrefixErrorKind::BadLength, "length \"\""),
            ("10.0.0.0/+8", PrefixErrorKind::BadLength, "\"+8\""),
            ("10.0.0.0/8/9", PrefixErrorKind::BadLength, "\"8/9\""),
            ("10.0.0.0/ 8", PrefixErrorKind::BadLength, "\" 8\""),
            ("10.0.0.0/33", PrefixErrorKind::TooLong { max: 32 }, "32"),
            ("::/129", PrefixErrorKind::TooLong { max: 128 }, "IPv6"),
            ("::/99999", PrefixErrorKind::TooLong { max: 128 }, "128"),
        ];
        for (s, kind, needle) in cases {
            let err = s.parse::<Prefix>().expect_err(s);
            assert_eq!(err.kind(), kind, "{s}");
            assert_eq!(err.input(), s);
            let msg = err.to_string();
            assert!(msg.contains(needle), "{s}: {msg}");
            assert!(msg.contains(&format!("{s:?}")), "{s}: {msg}");
        }
    }

    #[test]
    fn host_bits_error_names_the_network() {
        let err = "10.1.2.3/8".parse::<Prefix>().unwrap_err();
        assert_eq!(
            err.kind(),
            PrefixErrorKind::HostBitsSet {
                network: p("10.0.0.0/8")
            }
        );
        assert!(err.to_string().contains("10.0.0.0/8"), "{err}");
        let err = Prefix::new(ip("fe80::1"), 10).unwrap_err();
        assert_eq!(err.input(), "fe80::1/10");
        assert!(err.to_string().contains("fe80::/10"), "{err}");
    }

    #[test]
    fn new_checks_length_before_host_bits() {
        let err = Prefix::new(ip("10.0.0.1"), 40).unwrap_err();
        assert_eq!(err.kind(), PrefixErrorKind::TooLong { max: 32 });
        assert!(Prefix::new(ip("::"), 255).is_err());
        assert!(Prefix::new(ip("255.255.255.255"), 32).is_ok());
    }

    #[test]
    fn contains_within_family() {
        assert!(p("10.0.0.0/8").contains(ip("10.255.0.1")));
        assert!(!p("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(p("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(!p("0.0.0.0/0").contains(ip("::1")));
        assert!(p("fe80::/10").contains(ip("febf::1")));
        assert!(!p("fe80::/10").contains(ip("fec0::1")));
        assert!(!p("::/0").contains(ip("1.2.3.4")));
        assert!(p("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!p("192.0.2.7").contains(ip("192.0.2.8")));
    }

    #[test]
    fn mapped_addresses_count_as_ipv4() {
        // Mapped query against an IPv4 prefix, and the reverse.
        assert!(p("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(p("::ffff:10.0.0.0/104").contains(ip("10.1.2.3")));
        assert!(p("::ffff:10.0.0.0/104").contains(ip("::ffff:10.9.9.9")));
        assert!(!p("::ffff:10.0.0.0/104").contains(ip("11.0.0.1")));
        // ::ffff:0:0/96 is every IPv4 address.
        assert!(p("::ffff:0.0.0.0/96").contains(ip("8.8.8.8")));
        // A mapped address is IPv4, so IPv6-wide prefixes miss it.
        assert!(!p("::/0").contains(ip("::ffff:10.1.2.3")));
        assert!(!p("::fffe:0:0/95").contains(ip("::ffff:10.1.2.3")));
        // IPv4-compatible (::a.b.c.d, deprecated) is not mapped.
        assert!(!p("10.0.0.0/8").contains(ip("::10.1.2.3")));
        assert_eq!(p("::ffff:10.0.0.0/104").unmapped(), p("10.0.0.0/8"));
        assert_eq!(p("::fffe:0:0/95").unmapped(), p("::fffe:0:0/95"));
        assert_eq!(p("10.0.0.0/8").unmapped(), p("10.0.0.0/8"));
    }

    #[test]
    fn masks() {
        assert_eq!(mask_v4(0), 0);
        assert_eq!(mask_v4(8), 0xff00_0000);
        assert_eq!(mask_v4(32), u32::MAX);
        assert_eq!(mask_v6(0), 0);
        assert_eq!(mask_v6(1), 1 << 127);
        assert_eq!(mask_v6(128), u128::MAX);
    }
}
