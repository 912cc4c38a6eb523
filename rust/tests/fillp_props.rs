//! Property tests of the FillP core over the deterministic simulator.
//!
//! Sized so the whole file runs in well under a minute in a debug build.

use std::time::Duration;

use dmm::fillp::connection::{CloseReason, Config};
use dmm::fillp::endpoint::EndpointConfig;
use dmm::fillp::sim::{transfer, LinkConfig, Loss, Pair, Side, SimRng};
use dmm::fillp::wire::{Body, Packet, RateMode, Repr};
use proptest::prelude::*;

fn cfg(mode: RateMode) -> EndpointConfig {
    EndpointConfig {
        connection: Config {
            mode,
            // Small buffers exercise flow control and the window probe.
            recv_window: 64 * 1024,
            send_buffer: 48 * 1024,
            // At 30% loss in bursts a handshake can need many tries; the
            // property is about delivery, not about giving up.
            handshake_timeout: Duration::from_secs(120),
            ..Config::default()
        },
        cookie_secret: [5; 32],
        ..EndpointConfig::default()
    }
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut r = SimRng::new(seed);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

fn mode_of(i: u8) -> RateMode {
    match i % 3 {
        0 => RateMode::Bbr,
        1 => RateMode::Fillp,
        _ => RateMode::Fixed,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    /// Every byte arrives exactly once and in order, both ways, and both ends
    /// see a clean close, for loss up to 30% with reordering and duplication.
    #[test]
    fn delivers_exactly_once_in_order(
        seed in any::<u64>(),
        loss in 0.0f64..0.30,
        burst in any::<bool>(),
        reorder in 0.0f64..0.1,
        dup in 0.0f64..0.1,
        jitter_ms in 0u64..5,
        delay_ms in 1u64..60,
        up in 0usize..150_000,
        down in 0usize..20_000,
        mode in 0u8..3,
    ) {
        let loss_model = if burst && loss > 0.0 {
            // Same mean loss, in bursts of about four packets: the bad state
            // loses 3/4. (Transitions are per packet, so long bursts would
            // black out a handshake for seconds: a different test.)
            let bad_share = (loss / 0.75).min(0.9);
            Loss::GilbertElliott {
                good_to_bad: 0.25 * bad_share / (1.0 - bad_share),
                bad_to_good: 0.25,
                loss_good: 0.0,
                loss_bad: 0.75,
            }
        } else {
            Loss::Bernoulli(loss)
        };
        let link = LinkConfig {
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::from_millis(jitter_ms),
            loss: loss_model,
            reorder,
            reorder_delay: Duration::from_millis(7),
            duplicate: dup,
            rate: Some(4_000_000),
            queue: 256 * 1024,
        };
        let m = mode_of(mode);
        let mut pair = Pair::new(seed, cfg(m), cfg(m), link, link);
        let a = data(seed, up);
        let b = data(!seed, down);
        let mut client = Side::sending(a.clone());
        let mut server = Side::sending(b.clone());
        let r = transfer(&mut pair, &mut client, &mut server, 3_000_000, Duration::from_secs(900));
        prop_assert_eq!(r, Ok(()), "t={:?}", pair.elapsed());
        prop_assert!(server.incoming == a, "client->server bytes differ");
        prop_assert!(client.incoming == b, "server->client bytes differ");
        prop_assert!(client.eof && server.eof);
        prop_assert_eq!(client.closed, Some(CloseReason::Finished));
        prop_assert_eq!(server.closed, Some(CloseReason::Finished));
    }

    /// The parser takes any bytes without panicking, and what it accepts
    /// re-emits to the same bytes (INIT padding aside).
    #[test]
    fn parser_total(bytes in proptest::collection::vec(any::<u8>(), 0..200), ty in 1u8..10) {
        let _ = Repr::parse_bytes(&bytes);
        // Also with a valid version and type, to get past the first checks.
        let mut b = bytes.clone();
        if b.len() >= 2 {
            b[0] = 1;
            b[1] = ty;
        }
        let p = Packet::new_unchecked(&b[..]);
        let _ = (p.payload(), p.pack_sack(3), p.mac(), p.nack_range(7), p.data_offset());
        if let Ok(r) = Repr::parse_bytes(&b) {
            let mut out = Vec::new();
            r.emit(&mut out);
            if ty != 1 {
                prop_assert_eq!(&out, &b);
            }
        }
    }

    /// Junk thrown at both endpoints during a transfer (random bytes, random
    /// packets with plausible headers, and real packets replayed from a
    /// stranger's address) neither panics nor disturbs the transfer.
    #[test]
    fn junk_does_not_break_a_transfer(seed in any::<u64>(), every in 3u64..40) {
        let link = LinkConfig {
            loss: Loss::Bernoulli(0.05),
            rate: Some(4_000_000),
            queue: 256 * 1024,
            ..LinkConfig::ideal(Duration::from_millis(10))
        };
        let mut pair = Pair::new(seed, cfg(RateMode::Bbr), cfg(RateMode::Bbr), link, link);
        let a = data(seed, 60_000);
        let mut client = Side::sending(a.clone());
        let mut server = Side::sending(Vec::new());
        let (ch, sh) = pair.connect(100_000).expect("connect");
        let stranger: std::net::SocketAddr = "10.9.9.9:9".parse().unwrap();
        let mut rng = SimRng::new(seed ^ 0x5a5a);
        let mut n = 0u64;
        let r = pair.run_until(3_000_000, Duration::from_secs(900), |p| {
            client.pump(&mut p.client, ch);
            server.pump(&mut p.server, sh);
            n += 1;
            if n.is_multiple_of(every) {
                let now = p.now;
                let len = (rng.next_u64() % 120) as usize;
                let mut junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                if junk.len() >= 8 && rng.chance(0.5) {
                    junk[0] = 1;
                    junk[1] = 1 + (rng.next_u64() % 9) as u8;
                }
                let (caddr, saddr) = (p.client_addr, p.server_addr);
                p.server.handle_datagram(now, caddr, &junk);
                p.client.handle_datagram(now, saddr, &junk);
                // A well-formed packet with the right connection ID, from elsewhere.
                if let Some(cid) = p.server.connection(sh).map(|c| c.local_cid()) {
                    let body = if rng.chance(0.5) { Body::Reset } else { Body::Keepalive };
                    let mut buf = Vec::new();
                    Repr { dst_cid: cid, body }.emit(&mut buf);
                    p.server.handle_datagram(now, stranger, &buf);
                }
            }
            client.closed.is_some() && server.closed.is_some()
        });
        prop_assert_eq!(r, Ok(()));
        prop_assert!(server.incoming == a);
        prop_assert_eq!(client.closed, Some(CloseReason::Finished));
        prop_assert_eq!(server.closed, Some(CloseReason::Finished));
        prop_assert!(pair.server.stats().wrong_address > 0 || n < every);
    }
}

/// A random but well-formed packet for connection `cid`.
fn forged(rng: &mut SimRng, cid: u32, payload: &[u8]) -> Vec<u8> {
    use dmm::fillp::wire::{DataRepr, HsParams, NackRepr, PackRepr, PnRange, SackRange};
    let small = |rng: &mut SimRng| (rng.next_u64() % 3000) as u32;
    // Mostly near the stream, sometimes at the very end of the offset space
    // (where a careless `offset + len` overflows).
    let offset = |rng: &mut SimRng| {
        if rng.chance(0.05) {
            u64::MAX - u64::from(small(rng))
        } else {
            rng.next_u64() % 200_000
        }
    };
    let body = match rng.next_u64() % 7 {
        0 => Body::Data(DataRepr {
            pn: small(rng),
            offset: offset(rng),
            timestamp: rng.next_u64() as u32,
            fin: rng.chance(0.1),
            payload: &payload[..(rng.next_u64() % 1300) as usize],
        }),
        1 => {
            let mut sack = [SackRange::default(); 16];
            let n = (rng.next_u64() % 17) as usize;
            let mut at = 0u32;
            for s in sack.iter_mut().take(n) {
                at += 1 + small(rng);
                let len = 1 + small(rng);
                *s = SackRange { start: at, len };
                at += len;
            }
            Body::Pack(PackRepr {
                cum_ack: offset(rng),
                fin_received: rng.chance(0.1),
                highest_pn: small(rng),
                echo_ts: rng.next_u64() as u32,
                ack_delay_us: rng.next_u64() as u32,
                rx_bytes: rng.next_u64() >> 20,
                rate: rng.next_u64() as u32,
                loss: rng.next_u64() as u16,
                window: rng.next_u64() as u32,
                sack_len: n as u8,
                sack,
            })
        }
        2 => {
            let mut ranges = [PnRange::default(); 32];
            let n = 1 + (rng.next_u64() % 32) as usize;
            for r in ranges.iter_mut().take(n) {
                let first = rng.next_u64() as u32;
                *r = PnRange {
                    first,
                    last: first.saturating_add(small(rng)),
                };
            }
            Body::Nack(NackRepr {
                len: n as u8,
                ranges,
            })
        }
        3 => Body::Keepalive,
        4 => Body::ConnAck {
            server_cid: 1 + small(rng),
            ticket: rng.chance(0.5).then(|| dmm::fillp::wire::Ticket {
                time: small(rng),
                mac: [0; 16],
            }),
        },
        5 => Body::ConnReq {
            client_cid: 1 + small(rng),
            params: HsParams {
                mtu: 1400,
                window: 1 << 16,
                mode: RateMode::Bbr,
            },
            cookie_time: 0,
            mac: [0; 16],
        },
        _ => Body::Cookie {
            server_cid: 1 + small(rng),
            params: HsParams {
                mtu: 1400,
                window: 1 << 16,
                mode: RateMode::Bbr,
            },
            echo: 0,
            cookie_time: 0,
            mac: [0; 16],
        },
    };
    let mut out = Vec::new();
    Repr { dst_cid: cid, body }.emit(&mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    /// Well-formed forgeries with the right connection ID and address (what an
    /// on-path attacker can send; the protocol does not authenticate them) may
    /// break the transfer, but never panic and never livelock the endpoints.
    #[test]
    fn forged_packets_never_panic(seed in any::<u64>(), every in 1u64..20) {
        let link = LinkConfig {
            rate: Some(4_000_000),
            queue: 256 * 1024,
            ..LinkConfig::ideal(Duration::from_millis(10))
        };
        let mut pair = Pair::new(seed, cfg(RateMode::Bbr), cfg(RateMode::Bbr), link, link);
        let mut client = Side::sending(data(seed, 100_000));
        let mut server = Side::sending(data(seed, 10_000));
        let (ch, sh) = pair.connect(100_000).expect("connect");
        let mut rng = SimRng::new(seed);
        let payload = vec![7u8; 1400];
        let mut n = 0u64;
        let r = pair.run_until(500_000, Duration::from_secs(900), |p| {
            client.pump(&mut p.client, ch);
            server.pump(&mut p.server, sh);
            n += 1;
            if n.is_multiple_of(every) && n < 3000 {
                let now = p.now;
                let (caddr, saddr) = (p.client_addr, p.server_addr);
                if let Some(cid) = p.server.connection(sh).map(|c| c.local_cid()) {
                    let f = forged(&mut rng, cid, &payload);
                    p.server.handle_datagram(now, caddr, &f);
                }
                if let Some(cid) = p.client.connection(ch).map(|c| c.local_cid()) {
                    let f = forged(&mut rng, cid, &payload);
                    p.client.handle_datagram(now, saddr, &f);
                }
            }
            client.closed.is_some() && server.closed.is_some()
        });
        prop_assert!(!matches!(r, Err(dmm::fillp::sim::SimError::Livelock { .. })), "{:?}", r);
    }
}

fn cookie_fields(client_cid: u32, time_ms: u32) -> dmm::fillp::cookie::CookieFields {
    dmm::fillp::cookie::CookieFields {
        remote: "10.0.0.1:4000".parse().expect("address"),
        client_cid,
        server_cid: 9,
        params: dmm::fillp::wire::HsParams {
            mtu: 1400,
            window: 1 << 20,
            mode: RateMode::Bbr,
        },
        time_ms,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Cookie rotation, as a rule: a cookie minted at `mint` and returned
    /// at `mint + wait` is good exactly when it is within its lifetime and
    /// at most one rotation old; with a bit of its MAC flipped it never is;
    /// any mint time and MAC are checked without panicking.
    #[test]
    fn cookie_rotation_rule(
        secret in any::<[u8; 32]>(),
        period in 1u64..200_000,
        mint in 0u64..(1 << 40),
        // Mostly near the period and lifetime, sometimes past the 32-bit
        // mint time's wrap.
        wait in prop_oneof![4 => 0u64..400_000, 1 => 0u64..(1 << 33)],
        lifetime in prop_oneof![4 => 0u64..200_000, 1 => 0u64..(1 << 33)],
        flip in 0usize..128,
        junk_time in any::<u32>(),
        junk_mac in any::<[u8; 16]>(),
    ) {
        use dmm::fillp::cookie::{CookieCheck, CookieKeys};
        let mut keys = CookieKeys::new(secret, Some(Duration::from_millis(period)));
        let mut f = cookie_fields(1, 0);
        let mac = keys.mint(mint, &mut f);
        let at = mint + wait;
        let mut bad = mac;
        bad[flip / 8] ^= 1 << (flip % 8);
        let good = wait < (1 << 32) && wait <= lifetime && at / period - mint / period <= 1;
        let got = keys.check(at, &f, &mac, lifetime);
        prop_assert_eq!(matches!(got, CookieCheck::Valid { .. }), good, "{:?}", got);
        let forged = keys.check(at, &f, &bad, lifetime);
        let forged_ok = matches!(forged, CookieCheck::Valid { .. });
        prop_assert!(!forged_ok, "{:?}", forged);
        let junk = cookie_fields(2, junk_time);
        let _ = keys.check(at, &junk, &junk_mac, lifetime);
    }
}
