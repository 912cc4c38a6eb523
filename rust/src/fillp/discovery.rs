//! Resource discovery over a FillP port: "which stacks do you accept on?"
//!
//! A client that does not know what a server speaks sends a DISCOVER to
//! the server's FillP (UDP) port; a listening endpoint with an
//! advertisement answers OFFER: the protocols it accepts connections on, and
//! their ports. One datagram each way, and no state on either side beyond
//! the client's wait for the answer.
//!
//! Two rules keep it from being a weapon or a lie:
//!
//! * **No amplification.** A DISCOVER is padded to [`QUERY_LEN`] bytes and
//!   an OFFER is never longer than the DISCOVER it answers (an offer that
//!   would be is cut to the entries that fit), so a spoofed query makes the
//!   server send no more than the attacker did.
//! * **No forged answers.** The query carries 16 random bytes that the OFFER
//!   echoes; the client takes only an offer with its own nonce from the
//!   address it asked, so an off-path attacker cannot plant one.
//!
//! | type | offset: size field ... | length |
//! |---|---|---|
//! | DISCOVER (10) | common header (CID 0), 8:16 nonce, zero padding | [`QUERY_LEN`] |
//! | OFFER (11) | common header (CID 0), 8:16 nonce, 24:1 n, 25: n x (1 name length, name, 2 port) | <= the query |
//!
//! Like [`super::wire`], parsing never panics and rejects anything that is
//! not exactly well formed.

use super::wire::{WireError, HEADER_LEN, VERSION};

/// Packet type of a query (byte 1 of the common header).
pub const DISCOVER: u8 = 10;
/// Packet type of an answer.
pub const OFFER: u8 = 11;
/// Length of a DISCOVER: room for an offer of [`MAX_ENTRIES`] entries of
/// 8-byte names, so that a full answer fits without amplifying.
pub const QUERY_LEN: usize = 128;
/// Length of the nonce.
pub const NONCE_LEN: usize = 16;
/// Most entries an offer carries.
pub const MAX_ENTRIES: usize = 8;
/// Longest protocol name.
pub const MAX_NAME: usize = 15;
const NONCE_AT: usize = HEADER_LEN;
const COUNT_AT: usize = NONCE_AT + NONCE_LEN;

/// Whether `data` is a discovery packet (either type), by its header alone:
/// the endpoint hands these here instead of to the connection parser.
pub fn is_discovery(data: &[u8]) -> bool {
    data.len() >= HEADER_LEN && data[0] == VERSION && matches!(data[1], DISCOVER | OFFER)
}

/// One protocol a listener accepts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The wire protocol: `"tcp"`, `"mptcp"`, `"fillp"`, ...
    pub protocol: String,
    /// Its port.
    pub port: u16,
}

impl Entry {
    fn encoded_len(&self) -> usize {
        1 + self.protocol.len() + 2
    }
}

/// Reads an offer written as `"fillp:8080,mptcp:8080"` (how the Python
/// side hands a listener's advertisement down); `None` if any entry is
/// malformed or there are more than [`MAX_ENTRIES`].
pub fn parse_entries(text: &str) -> Option<Vec<Entry>> {
    let mut out = Vec::new();
    for item in text.split(',').filter(|i| !i.is_empty()) {
        let (name, port) = item.split_once(':')?;
        let ok = (1..=MAX_NAME).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return None;
        }
        out.push(Entry {
            protocol: name.to_string(),
            port: port.parse().ok()?,
        });
    }
    (out.len() <= MAX_ENTRIES).then_some(out)
}

/// A discovery packet, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// "Which stacks do you accept on?"
    Query {
        /// Echoed by the answer.
        nonce: [u8; NONCE_LEN],
    },
    /// "These."
    Offer {
        /// The query's nonce.
        nonce: [u8; NONCE_LEN],
        /// What the listener accepts on.
        entries: Vec<Entry>,
    },
}

fn header(ty: u8, out: &mut Vec<u8>) {
    out.push(VERSION);
    out.push(ty);
    out.extend_from_slice(&[0; 6]); // flags, destination CID: both 0
}

/// Appends a DISCOVER with `nonce` to `out`.
pub fn emit_query(nonce: &[u8; NONCE_LEN], out: &mut Vec<u8>) {
    let start = out.len();
    header(DISCOVER, out);
    out.extend_from_slice(nonce);
    out.resize(start + QUERY_LEN, 0);
}

/// Appends the OFFER answering a query of `query_len` bytes: the entries
/// that fit in `query_len` (and [`MAX_ENTRIES`]), in order; entries with
/// an empty or over-long name are left out. Returns how many were written.
pub fn emit_offer(
    nonce: &[u8; NONCE_LEN],
    entries: &[Entry],
    query_len: usize,
    out: &mut Vec<u8>,
) -> usize {
    let start = out.len();
    header(OFFER, out);
    out.extend_from_slice(nonce);
    out.push(0);
    let mut n = 0u8;
    for e in entries.iter().take(MAX_ENTRIES) {
        let name = e.protocol.as_bytes();
        if name.is_empty() || name.len() > MAX_NAME {
            continue;
        }
        if out.len() - start + e.encoded_len() > query_len {
            break;
        }
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&e.port.to_be_bytes());
        n += 1;
    }
    out[start + COUNT_AT] = n;
    usize::from(n)
}

/// Parses a discovery packet.
pub fn parse(data: &[u8]) -> Result<Discovery, WireError> {
    if data.len() < COUNT_AT {
        return Err(WireError::Truncated);
    }
    if data[0] != VERSION {
        return Err(WireError::Version);
    }
    if data[2..8] != [0; 6] {
        return Err(WireError::Malformed);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&data[NONCE_AT..COUNT_AT]);
    match data[1] {
        DISCOVER => {
            if data.len() != QUERY_LEN {
                return Err(WireError::Truncated);
            }
            Ok(Discovery::Query { nonce })
        }
        OFFER => {
            let n = usize::from(*data.get(COUNT_AT).ok_or(WireError::Truncated)?);
            if n > MAX_ENTRIES {
                return Err(WireError::Malformed);
            }
            let mut at = COUNT_AT + 1;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let len = usize::from(*data.get(at).ok_or(WireError::Truncated)?);
                if len == 0 || len > MAX_NAME {
                    return Err(WireError::Malformed);
                }
                let name = data.get(at + 1..at + 1 + len).ok_or(WireError::Truncated)?;
                let port = data
                    .get(at + 1 + len..at + 3 + len)
                    .ok_or(WireError::Truncated)?;
                let protocol = std::str::from_utf8(name)
                    .ok()
                    .filter(|s| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
                    .ok_or(WireError::Malformed)?;
                entries.push(Entry {
                    protocol: protocol.to_string(),
                    port: u16::from_be_bytes([port[0], port[1]]),
                });
                at += 3 + len;
            }
            if at != data.len() {
                return Err(WireError::Truncated);
            }
            Ok(Discovery::Offer { nonce, entries })
        }
        _ => Err(WireError::Type),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<Entry> {
        [("mptcp", 8080), ("fillp", 8080), ("tcp", 8081)]
            .iter()
            .map(|(p, port)| Entry {
                protocol: p.to_string(),
                port: *port,
            })
            .collect()
    }

    #[test]
    fn offers_parse_from_text() {
        assert_eq!(
            parse_entries("mptcp:8080,fillp:8080,tcp:8081"),
            Some(entries())
        );
        assert_eq!(parse_entries(""), Some(vec![]));
        for bad in [
            "fillp",
            "fillp:70000",
            "fi llp:1",
            ":80",
            "a:1,b:2,c:3,d:4,e:5,f:6,g:7,h:8,i:9",
        ] {
            assert_eq!(parse_entries(bad), None, "{bad}");
        }
    }

    #[test]
    fn query_and_offer_round_trip() {
        let nonce = [7u8; NONCE_LEN];
        let mut q = Vec::new();
        emit_query(&nonce, &mut q);
        assert_eq!(q.len(), QUERY_LEN);
        assert!(is_discovery(&q));
        assert_eq!(parse(&q), Ok(Discovery::Query { nonce }));
        let mut a = Vec::new();
        assert_eq!(emit_offer(&nonce, &entries(), q.len(), &mut a), 3);
        assert!(a.len() <= q.len());
        assert_eq!(
            parse(&a),
            Ok(Discovery::Offer {
                nonce,
                entries: entries()
            })
        );
    }

    #[test]
    fn an_offer_never_outgrows_its_query() {
        let nonce = [1u8; NONCE_LEN];
        let many: Vec<Entry> = (0..20)
            .map(|i| Entry {
                protocol: "abcdefghijklmno".into(),
                port: i,
            })
            .collect();
        for query_len in [COUNT_AT + 1, 40, 64, QUERY_LEN] {
            let mut a = Vec::new();
            let n = emit_offer(&nonce, &many, query_len, &mut a);
            assert!(
                a.len() <= query_len.max(COUNT_AT + 1),
                "{query_len}: {}",
                a.len()
            );
            assert!(n <= MAX_ENTRIES);
            assert!(
                matches!(parse(&a), Ok(Discovery::Offer { entries, .. }) if entries.len() == n)
            );
        }
    }

    #[test]
    fn malformed_packets_are_errors() {
        let nonce = [3u8; NONCE_LEN];
        let mut a = Vec::new();
        emit_offer(&nonce, &entries(), QUERY_LEN, &mut a);
        // Every truncation, and every single-byte change of the structure,
        // is refused or parses to something consistent; never a panic.
        for cut in 0..a.len() {
            assert!(parse(&a[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = a.clone();
        long.push(0);
        assert_eq!(parse(&long), Err(WireError::Truncated));
        let mut bad = a.clone();
        bad[COUNT_AT] = 9;
        assert!(parse(&bad).is_err());
        let mut bad = a.clone();
        bad[COUNT_AT + 2] = b' ';
        assert_eq!(parse(&bad), Err(WireError::Malformed));
        let mut q = Vec::new();
        emit_query(&nonce, &mut q);
        q.truncate(64);
        assert_eq!(parse(&q), Err(WireError::Truncated));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse(&data);
        }
    }
}
