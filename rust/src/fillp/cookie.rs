//! Stateless handshake cookies: HMAC-SHA-256 (RFC 2104), truncated to 128 bits.
//!
//! Why HMAC-SHA-256 rather than SipHash-2-4-128: it is the standard MAC with
//! widely published test vectors (FIPS 180-4 examples, RFC 4231), its security
//! margin is not in doubt for a long-lived server key, and the cost (two
//! compression-function calls per cookie, about a microsecond) only arises
//! per INIT / CONN_REQ, never per data packet. The crate takes no dependency
//! for it: SHA-256 is implemented here in ~60 lines and tested against the
//! standard vectors.
//!
//! # Key rotation
//!
//! [`CookieKeys`] holds the secret of the current *key epoch* (time since
//! the endpoint started, cut into periods of `period`, 60 s by default) and
//! the previous epoch's. A cookie names its epoch through its mint time
//! (which the MAC covers); one minted in the current or the previous epoch
//! is checked with that epoch's key, anything older is refused unchecked
//! because its key is gone. So a cookie minted just before a rotation stays
//! good for its whole lifetime, and none survives two rotations, whatever
//! the 32-bit mint time says after it wraps (every 49.7 days).
//!
//! The next epoch's secret is `HMAC(current secret, label || epoch ||
//! fresh)`, where `fresh` is 32 bytes the driver hands in from the OS's
//! random source ([`CookieKeys::supply_secret`]; [`CookieKeys::wants_secret`]
//! says when one is due). HMAC being one-way, a secret read out of memory
//! does not give the earlier ones; with fresh bytes it does not give the
//! later ones either. A driver that supplies none still rotates (a one-way
//! ratchet), which is what the deterministic tests use. Rotation is lazy:
//! it happens when a cookie is minted or checked in a new epoch, so an idle
//! endpoint keeps no timer for it. Two keys and one pending secret are all
//! the state there is; an INIT never adds to it.

use std::net::{IpAddr, SocketAddr};

use super::wire::{HsParams, Ticket, MAC_LEN};

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// Incremental SHA-256 (FIPS 180-4).
#[derive(Clone)]
pub struct Sha256 {
    h: [u32; 8],
    block: [u8; 64],
    fill: usize,
    len: u64,
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    /// A fresh hash state.
    pub fn new() -> Self {
        Sha256 {
            h: H0,
            block: [0; 64],
            fill: 0,
            len: 0,
        }
    }

    fn compress(&mut self) {
        let mut w = [0u32; 64];
        for (i, c) in self.block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = self.h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = h
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            h = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in self.h.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *x = x.wrapping_add(y);
        }
    }

    /// Absorb bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len = self.len.wrapping_add(data.len() as u64);
        while !data.is_empty() {
            let n = (64 - self.fill).min(data.len());
            self.block[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill == 64 {
                self.compress();
                self.fill = 0;
            }
        }
    }

    /// Pad and return the digest.
    pub fn finish(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        self.update(&[0x80]);
        while self.fill != 56 {
            self.update(&[0]);
        }
        self.block[56..].copy_from_slice(&bits.to_be_bytes());
        self.compress();
        let mut out = [0u8; 32];
        for (o, h) in out.chunks_exact_mut(4).zip(self.h) {
            o.copy_from_slice(&h.to_be_bytes());
        }
        out
    }

    /// One-shot digest.
    pub fn digest(data: &[u8]) -> [u8; 32] {
        let mut s = Sha256::new();
        s.update(data);
        s.finish()
    }
}

/// HMAC-SHA-256 with a precomputed key schedule.
#[derive(Clone)]
pub struct HmacSha256 {
    inner: Sha256,
    outer: Sha256,
}

impl HmacSha256 {
    /// Prepare for `key` (hashed first if longer than a block).
    pub fn new(key: &[u8]) -> Self {
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let mut inner = Sha256::new();
        let mut outer = Sha256::new();
        inner.update(&k.map(|b| b ^ 0x36));
        outer.update(&k.map(|b| b ^ 0x5c));
        HmacSha256 { inner, outer }
    }

    /// MAC of `parts` concatenated.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut i = self.inner.clone();
        for p in parts {
            i.update(p);
        }
        let mut o = self.outer.clone();
        o.update(&i.finish());
        o.finish()
    }
}

/// Everything the cookie binds: a replayed cookie from another address, for
/// another connection ID or with other parameters fails the MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CookieFields {
    /// The client's address as seen by the server.
    pub remote: SocketAddr,
    /// The client's connection ID.
    pub client_cid: u32,
    /// The server connection ID chosen when the cookie was minted.
    pub server_cid: u32,
    /// Agreed MTU and mode, and the client's window.
    pub params: HsParams,
    /// Mint time, ms on the server's clock.
    pub time_ms: u32,
}

/// Mints and checks cookies with one server secret.
#[derive(Clone)]
pub struct CookieKey {
    hmac: HmacSha256,
}

impl core::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("CookieKey(..)")
    }
}

impl CookieKey {
    /// Use `secret` (should be 32 random bytes from the OS).
    pub fn new(secret: &[u8]) -> Self {
        CookieKey {
            hmac: HmacSha256::new(secret),
        }
    }

    /// The truncated MAC for `f`.
    pub fn mac(&self, f: &CookieFields) -> [u8; MAC_LEN] {
        let mut addr = [0u8; 19];
        let alen = match f.remote {
            SocketAddr::V4(a) => {
                addr[0] = 4;
                addr[1..5].copy_from_slice(&a.ip().octets());
                5
            }
            SocketAddr::V6(a) => {
                addr[0] = 6;
                addr[1..17].copy_from_slice(&a.ip().octets());
                17
            }
        };
        addr[alen..alen + 2].copy_from_slice(&f.remote.port().to_be_bytes());
        let full = self.hmac.mac(&[
            &addr[..alen + 2],
            &f.client_cid.to_be_bytes(),
            &f.server_cid.to_be_bytes(),
            &f.params.mtu.to_be_bytes(),
            &f.params.window.to_be_bytes(),
            &[f.params.mode.to_u8()],
            &f.time_ms.to_be_bytes(),
        ]);
        let mut m = [0u8; MAC_LEN];
        m.copy_from_slice(&full[..MAC_LEN]);
        m
    }

    /// Constant-time comparison of `mac` with the expected MAC for `f`.
    pub fn verify(&self, f: &CookieFields, mac: &[u8; MAC_LEN]) -> bool {
        same(&self.mac(f), mac)
    }

    /// The truncated MAC of a resumption ticket for a client at `ip`,
    /// minted at `time_ms`. It binds the address only, not a port or a
    /// connection ID, so one ticket serves many connections; the label
    /// keeps a ticket from passing as a cookie and the other way round.
    pub fn ticket_mac(&self, ip: IpAddr, time_ms: u32) -> [u8; MAC_LEN] {
        let addr = match ip {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        let full = self
            .hmac
            .mac(&[TICKET_LABEL, &addr, &time_ms.to_be_bytes()]);
        let mut m = [0u8; MAC_LEN];
        m.copy_from_slice(&full[..MAC_LEN]);
        m
    }
}

/// Constant-time equality of two MACs.
fn same(a: &[u8; MAC_LEN], b: &[u8; MAC_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Outcome of [`CookieKeys::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieCheck {
    /// Minted by us, `age_ms` ago, within the lifetime.
    Valid {
        /// Milliseconds since the cookie was minted.
        age_ms: u32,
    },
    /// The MAC does not match (forged, altered, or from another address),
    /// or the mint time is before the keys existed.
    Forged,
    /// Older than the lifetime, or minted two or more key epochs ago (its
    /// key is gone, so it is not checked further).
    Stale,
}

const RATCHET_LABEL: &[u8] = b"dmm fillp cookie epoch";
const TICKET_LABEL: &[u8] = b"dmm fillp ticket";

/// The current and previous cookie keys, rotated every period (see the
/// module docs). Times are milliseconds since the owner's start, passed in.
#[derive(Clone)]
pub struct CookieKeys {
    period_ms: Option<u64>,
    epoch: u64,
    secret: [u8; 32],
    current: CookieKey,
    previous: Option<CookieKey>,
    fresh: Option<[u8; 32]>,
    rotations: u64,
}

impl core::fmt::Debug for CookieKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CookieKeys")
            .field("period_ms", &self.period_ms)
            .field("epoch", &self.epoch)
            .field("rotations", &self.rotations)
            .finish_non_exhaustive()
    }
}

impl CookieKeys {
    /// Keys starting from `secret` (32 random bytes from the OS), rotated
    /// every `period` (`None`: never; a period under 1 ms counts as 1 ms).
    pub fn new(secret: [u8; 32], period: Option<std::time::Duration>) -> Self {
        CookieKeys {
            period_ms: period.map(|p| u64::try_from(p.as_millis()).unwrap_or(u64::MAX).max(1)),
            epoch: 0,
            secret,
            current: CookieKey::new(&secret),
            previous: None,
            fresh: None,
            rotations: 0,
        }
    }

    fn epoch_of(&self, ms: u64) -> u64 {
        self.period_ms.map_or(0, |p| ms / p)
    }

    /// Whether rotation is on and no fresh secret is waiting for the next
    /// rotation: the driver should [`supply_secret`](Self::supply_secret).
    pub fn wants_secret(&self) -> bool {
        self.period_ms.is_some() && self.fresh.is_none()
    }

    /// Random bytes to mix into the next rotation's secret.
    pub fn supply_secret(&mut self, fresh: [u8; 32]) {
        self.fresh = Some(fresh);
    }

    /// Rotations so far.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }

    /// Move to the epoch of `now_ms` if it is a later one. The previous key
    /// is kept only if the new epoch directly follows the current one.
    pub fn advance(&mut self, now_ms: u64) {
        let e = self.epoch_of(now_ms);
        if e <= self.epoch {
            return;
        }
        let fresh = self.fresh.take().unwrap_or([0; 32]);
        let next = HmacSha256::new(&self.secret).mac(&[RATCHET_LABEL, &e.to_be_bytes(), &fresh]);
        let old = std::mem::replace(&mut self.current, CookieKey::new(&next));
        self.previous = (e == self.epoch + 1).then_some(old);
        self.secret = next;
        self.epoch = e;
        self.rotations += 1;
    }

    /// A cookie for `f` minted at `now_ms`: sets `f.time_ms` (the low 32
    /// bits of `now_ms`) and returns the MAC.
    pub fn mint(&mut self, now_ms: u64, f: &mut CookieFields) -> [u8; MAC_LEN] {
        self.advance(now_ms);
        f.time_ms = now_ms as u32;
        self.current.mac(f)
    }

    /// Check a returned cookie at `now_ms` against `lifetime_ms`.
    pub fn check(
        &mut self,
        now_ms: u64,
        f: &CookieFields,
        mac: &[u8; MAC_LEN],
        lifetime_ms: u64,
    ) -> CookieCheck {
        self.check_with(now_ms, f.time_ms, lifetime_ms, |k| k.verify(f, mac))
    }

    /// A resumption ticket for a client at `ip`, minted at `now_ms`.
    pub fn mint_ticket(&mut self, now_ms: u64, ip: IpAddr) -> Ticket {
        self.advance(now_ms);
        let time = now_ms as u32;
        Ticket {
            time,
            mac: self.current.ticket_mac(ip, time),
        }
    }

    /// Check a resumption ticket from a client at `ip` at `now_ms` against
    /// `lifetime_ms`; the same epochs hold as for cookies.
    pub fn check_ticket(
        &mut self,
        now_ms: u64,
        ip: IpAddr,
        t: &Ticket,
        lifetime_ms: u64,
    ) -> CookieCheck {
        self.check_with(now_ms, t.time, lifetime_ms, |k| {
            same(&k.ticket_mac(ip, t.time), &t.mac)
        })
    }

    /// Finds the key of the epoch `time_ms` names and asks `verify` about
    /// it; then checks the age.
    fn check_with(
        &mut self,
        now_ms: u64,
        time_ms: u32,
        lifetime_ms: u64,
        verify: impl FnOnce(&CookieKey) -> bool,
    ) -> CookieCheck {
        self.advance(now_ms);
        let age = (now_ms as u32).wrapping_sub(time_ms);
        // The full mint time, assuming it is less than 2^32 ms ago.
        let Some(minted) = now_ms.checked_sub(u64::from(age)) else {
            return CookieCheck::Forged;
        };
        let key = match self.epoch.checked_sub(self.epoch_of(minted)) {
            Some(0) => &self.current,
            Some(1) => match &self.previous {
                Some(k) => k,
                None => return CookieCheck::Stale,
            },
            _ => return CookieCheck::Stale,
        };
        if !verify(key) {
            return CookieCheck::Forged;
        }
        if u64::from(age) > lifetime_ms {
            return CookieCheck::Stale;
        }
        CookieCheck::Valid { age_ms: age }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fillp::wire::RateMode;
    use std::time::Duration;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn sha256_fips_vectors() {
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&Sha256::digest(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&Sha256::digest(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        // One million 'a', fed in odd-sized pieces to exercise buffering.
        let mut s = Sha256::new();
        let chunk = [b'a'; 997];
        let mut left = 1_000_000;
        while left > 0 {
            let n = left.min(chunk.len());
            s.update(&chunk[..n]);
            left -= n;
        }
        assert_eq!(
            hex(&s.finish()),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    #[test]
    fn hmac_rfc4231() {
        // Test case 1.
        let h = HmacSha256::new(&[0x0b; 20]);
        assert_eq!(
            hex(&h.mac(&[b"Hi There"])),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 2, message split in two parts.
        let h = HmacSha256::new(b"Jefe");
        assert_eq!(
            hex(&h.mac(&[b"what do ya want ", b"for nothing?"])),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: key longer than a block.
        let h = HmacSha256::new(&[0xaa; 131]);
        assert_eq!(
            hex(&h.mac(&[b"Test Using Larger Than Block-Size Key - Hash Key First"])),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn cookie_binds_every_field() {
        let k = CookieKey::new(&[7; 32]);
        let f = fields(99);
        let m = k.mac(&f);
        assert!(k.verify(&f, &m));
        let mut g = f;
        g.remote = "10.0.0.1:5001".parse().unwrap();
        assert!(!k.verify(&g, &m));
        let mut g = f;
        g.params.mode = RateMode::Fixed;
        assert!(!k.verify(&g, &m));
        assert!(!CookieKey::new(&[8; 32]).verify(&f, &m));
    }

    fn fields(time_ms: u32) -> CookieFields {
        CookieFields {
            remote: "10.0.0.1:5000".parse().unwrap(),
            client_cid: 1,
            server_cid: 2,
            params: HsParams {
                mtu: 1400,
                window: 1 << 20,
                mode: RateMode::Bbr,
            },
            time_ms,
        }
    }

    const MIN: u64 = 60_000;
    const LIFE: u64 = 10_000;

    fn minted(k: &mut CookieKeys, at: u64) -> (CookieFields, [u8; MAC_LEN]) {
        let mut f = fields(0);
        let m = k.mint(at, &mut f);
        (f, m)
    }

    #[test]
    fn rotation_keeps_previous_epoch_only() {
        let mut k = CookieKeys::new([7; 32], Some(Duration::from_millis(MIN)));
        // Minted 1 ms before the first rotation, checked 2 s after it.
        let (f, m) = minted(&mut k, MIN - 1);
        assert_eq!(
            k.check(MIN + 2_000, &f, &m, LIFE),
            CookieCheck::Valid { age_ms: 2_001 }
        );
        assert_eq!(k.rotations(), 1);
        // Past its lifetime (still within the previous epoch): stale.
        assert_eq!(k.check(MIN + LIFE + 10, &f, &m, LIFE), CookieCheck::Stale);
        // Two rotations later its key is gone: stale even with an
        // unlimited lifetime.
        assert_eq!(k.check(2 * MIN + 5, &f, &m, u64::MAX), CookieCheck::Stale);
        assert_eq!(k.rotations(), 2);
    }

    #[test]
    fn rotation_changes_the_key_and_refuses_forgeries() {
        let mut k = CookieKeys::new([7; 32], Some(Duration::from_millis(MIN)));
        let (f, m) = minted(&mut k, 5);
        let mut bad = m;
        bad[3] ^= 0x40;
        assert_eq!(k.check(6, &f, &bad, LIFE), CookieCheck::Forged);
        // A cookie made with the starting secret for a time in the next
        // epoch: the key there is a new one.
        let mut g = fields((MIN + 1) as u32);
        let m0 = CookieKey::new(&[7; 32]).mac(&g);
        assert_eq!(k.check(MIN + 2, &g, &m0, LIFE), CookieCheck::Forged);
        // A mint time in the future (wraps to an age > now): never ours.
        g.time_ms = (MIN + 100) as u32;
        let m1 = k.clone().mint(MIN + 100, &mut g.clone());
        assert_eq!(k.check(MIN + 2, &g, &m1, LIFE), CookieCheck::Forged);
    }

    #[test]
    fn mint_time_wrap_does_not_revive_a_cookie() {
        // 2^32 ms later the 32-bit mint time reads as fresh again; the key
        // of that epoch differs, so the MAC fails.
        let mut k = CookieKeys::new([7; 32], Some(Duration::from_millis(MIN)));
        let (f, m) = minted(&mut k, 1_000);
        assert_eq!(
            k.check((1 << 32) + 1_500, &f, &m, LIFE),
            CookieCheck::Forged
        );
        // Without rotation the same replay would pass: what rotation buys.
        let mut k = CookieKeys::new([7; 32], None);
        let (f, m) = minted(&mut k, 1_000);
        assert_eq!(
            k.check((1 << 32) + 1_500, &f, &m, LIFE),
            CookieCheck::Valid { age_ms: 500 }
        );
        assert!(!k.wants_secret());
    }

    #[test]
    fn fresh_secret_is_mixed_in_once() {
        let mk = || CookieKeys::new([7; 32], Some(Duration::from_millis(MIN)));
        let (mut a, mut b) = (mk(), mk());
        assert!(a.wants_secret());
        a.supply_secret([1; 32]);
        assert!(!a.wants_secret());
        b.supply_secret([2; 32]);
        let (f, ma) = minted(&mut a, MIN + 1);
        let (_, mb) = minted(&mut b, MIN + 1);
        assert_ne!(ma, mb);
        // Used up by the rotation: the next one is due.
        assert!(a.wants_secret());
        // Jumping several epochs rotates once and keeps no previous key.
        assert_eq!(a.check(5 * MIN, &f, &ma, u64::MAX), CookieCheck::Stale);
        assert_eq!(a.rotations(), 2);
        let (f, m) = minted(&mut a, 5 * MIN + 3);
        assert_eq!(
            a.check(6 * MIN, &f, &m, LIFE + MIN),
            CookieCheck::Valid {
                age_ms: MIN as u32 - 3
            }
        );
    }

    #[test]
    fn a_ticket_binds_the_address_not_the_port_and_is_no_cookie() {
        let mut k = CookieKeys::new([7; 32], Some(Duration::from_millis(MIN)));
        let alice: IpAddr = "10.0.0.1".parse().unwrap();
        let t = k.mint_ticket(1_000, alice);
        assert_eq!(
            k.check_ticket(3_000, alice, &t, LIFE),
            CookieCheck::Valid { age_ms: 2_000 }
        );
        // Another address, or another time, fails the MAC.
        let bob: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(k.check_ticket(3_000, bob, &t, LIFE), CookieCheck::Forged);
        let moved = Ticket {
            time: t.time + 1,
            ..t
        };
        assert_eq!(
            k.check_ticket(3_000, alice, &moved, LIFE),
            CookieCheck::Forged
        );
        // IPv4 and its IPv6-mapped form are one address.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert!(matches!(
            k.check_ticket(3_000, mapped, &t, LIFE),
            CookieCheck::Valid { .. }
        ));
        // Too old, or two rotations on: stale.
        assert_eq!(
            k.check_ticket(1_000 + LIFE + 1, alice, &t, LIFE),
            CookieCheck::Stale
        );
        // A cookie's MAC does not pass as a ticket, nor a ticket's as a cookie.
        let (f, m) = minted(&mut k, 1_000);
        let as_ticket = Ticket {
            time: f.time_ms,
            mac: m,
        };
        assert_eq!(
            k.check_ticket(2_000, alice, &as_ticket, LIFE),
            CookieCheck::Forged
        );
        assert_eq!(k.check(2_000, &f, &t.mac, LIFE), CookieCheck::Forged);
        assert_eq!(
            k.check_ticket(2 * MIN + 1, alice, &t, u64::MAX),
            CookieCheck::Stale
        );
    }
}
