//! The endpoint's unit tests: the stateless handshake, cookies and their
//! rotation, limits and discovery.

use super::*;
use crate::fillp::connection::{CloseReason, Event};
use crate::fillp::sim::{LinkConfig, Pair, SimRng};
use crate::fillp::wire::RateMode;

fn server_cfg() -> EndpointConfig {
    EndpointConfig {
        server: true,
        cookie_secret: [1; 32],
        ..EndpointConfig::default()
    }
}

fn init(cid: u32) -> Vec<u8> {
    let mut b = Vec::new();
    Repr {
        dst_cid: 0,
        body: Body::Init {
            client_cid: cid,
            params: HsParams {
                mtu: 1400,
                window: 1 << 20,
                mode: RateMode::Bbr,
            },
            timestamp: 0,
        },
    }
    .emit(&mut b);
    b
}

#[test]
fn discovery_is_answered_by_listeners_only_and_never_amplified() {
    let t0 = Instant::now();
    let peer: SocketAddr = "10.0.0.9:4000".parse().unwrap();
    let offer = vec![
        Entry {
            protocol: "fillp".into(),
            port: 9000,
        },
        Entry {
            protocol: "mptcp".into(),
            port: 9000,
        },
    ];
    let mut query = Vec::new();
    discovery::emit_query(&[5; discovery::NONCE_LEN], &mut query);
    let mut buf = Vec::new();
    // A client endpoint, and a server without an offer, stay silent.
    for cfg in [EndpointConfig::default(), server_cfg()] {
        let mut ep = Endpoint::new(cfg, t0, 1);
        ep.handle_datagram(t0, peer, &query);
        assert!(ep.poll_transmit(t0, &mut buf).is_none());
    }
    let mut ep = Endpoint::new(server_cfg(), t0, 1);
    ep.set_offer(Some(offer.clone()));
    ep.handle_datagram(t0, peer, &query);
    let t = ep.poll_transmit(t0, &mut buf).expect("an offer");
    assert_eq!(t.destination, peer);
    assert!(buf.len() <= query.len());
    assert_eq!(
        discovery::parse(&buf),
        Ok(Discovery::Offer {
            nonce: [5; discovery::NONCE_LEN],
            entries: offer
        })
    );
    // A short query gets nothing: it is not a query.
    ep.handle_datagram(t0, peer, &query[..40]);
    assert!(ep.poll_transmit(t0, &mut buf).is_none());
    let st = ep.stats();
    assert_eq!(
        (st.discovery_queries, st.discovery_answers, st.malformed),
        (1, 1, 1)
    );
}

fn reset_to(ep: &mut Endpoint, now: Instant) -> Option<(SocketAddr, u32)> {
    let mut buf = Vec::new();
    let t = ep.poll_transmit(now, &mut buf)?;
    let r = Repr::parse_bytes(&buf).ok()?;
    matches!(r.body, Body::Reset).then_some((t.destination, r.dst_cid))
}

#[test]
fn a_full_server_resets_a_valid_conn_req() {
    // Two cookies minted while there was room; the second CONN_REQ
    // finds the last place taken.
    let t0 = Instant::now();
    let cfg = EndpointConfig {
        max_connections: 1,
        ..server_cfg()
    };
    let mut ep = Endpoint::new(cfg, t0, 1);
    let alice: SocketAddr = "10.0.0.1:1".parse().unwrap();
    let bob: SocketAddr = "10.0.0.2:1".parse().unwrap();
    let ma = cookie_at(&mut ep, t0, alice, 7);
    let mb = cookie_at(&mut ep, t0, bob, 8);
    ep.handle_datagram(t0, alice, &conn_req(7, &ma));
    ep.handle_datagram(t0, bob, &conn_req(8, &mb));
    assert_eq!((ep.connection_count(), ep.stats().refused), (1, 1));
    assert_eq!(reset_to(&mut ep, t0), Some((bob, 8)));
}

#[test]
fn a_full_server_answers_an_init_with_a_reset() {
    let t0 = Instant::now();
    let cfg = EndpointConfig {
        max_connections: 0,
        ..server_cfg()
    };
    let mut ep = Endpoint::new(cfg, t0, 1);
    let alice: SocketAddr = "10.0.0.1:1".parse().unwrap();
    ep.handle_datagram(t0, alice, &init(7));
    assert_eq!((ep.stats().cookies_sent, ep.stats().refused), (0, 1));
    assert_eq!(reset_to(&mut ep, t0), Some((alice, 7)));
}

#[test]
fn init_flood_allocates_nothing() {
    let t0 = Instant::now();
    let mut ep = Endpoint::new(server_cfg(), t0, 1);
    let mut buf = Vec::new();
    for i in 0..10_000u32 {
        let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 1000));
        ep.handle_datagram(t0, addr, &init(i + 1));
        // The driver drains replies as it goes; the queue stays bounded either way.
        if i % 2 == 0 {
            while ep.poll_transmit(t0, &mut buf).is_some() {}
        }
    }
    assert_eq!(ep.connection_count(), 0);
    assert_eq!(ep.stats().inits, 10_000);
    assert!(ep.stateless.len() <= ep.config.max_stateless_queue);
    assert_eq!(
        ep.stats().cookies_sent + ep.stats().stateless_dropped,
        10_000
    );
}

#[test]
fn cookie_must_match_address_and_be_fresh() {
    let t0 = Instant::now();
    let mut ep = Endpoint::new(server_cfg(), t0, 1);
    let alice: SocketAddr = "10.0.0.1:1".parse().unwrap();
    let mallory: SocketAddr = "10.0.0.66:1".parse().unwrap();
    let m = cookie_at(&mut ep, t0, alice, 7);
    let req = |mac: [u8; 16]| conn_req(7, &Minted { mac, ..m });
    let mac = m.mac;
    // Replayed from another address: refused.
    ep.handle_datagram(t0, mallory, &req(mac));
    let mut bad = mac;
    bad[0] ^= 1;
    ep.handle_datagram(t0, alice, &req(bad));
    assert_eq!(ep.stats().bad_cookies, 2);
    // Too old.
    ep.handle_datagram(
        t0 + COOKIE_LIFETIME + Duration::from_secs(1),
        alice,
        &req(mac),
    );
    assert_eq!(ep.stats().stale_cookies, 1);
    assert_eq!(ep.connection_count(), 0);
    // Good.
    ep.handle_datagram(t0 + Duration::from_millis(5), alice, &req(mac));
    assert_eq!(ep.connection_count(), 1);
    let h = ep.accept().unwrap();
    assert_eq!(ep.poll_event(), Some((h, Event::Connected)));
    // Unknown connection IDs and garbage are counted and ignored.
    let mut ka = Vec::new();
    Repr {
        dst_cid: 12345,
        body: Body::Keepalive,
    }
    .emit(&mut ka);
    ep.handle_datagram(t0, alice, &ka);
    ep.handle_datagram(t0, alice, &[1, 2, 3]);
    assert_eq!(ep.stats().unknown_cid, 1);
    assert_eq!(ep.stats().malformed, 1);
}

/// What a COOKIE carries back to the client.
#[derive(Clone, Copy)]
struct Minted {
    server_cid: u32,
    params: HsParams,
    cookie_time: u32,
    mac: [u8; 16],
}

/// Send an INIT for `cid` from `from` at `t` and take the COOKIE.
fn cookie_at(ep: &mut Endpoint, t: Instant, from: SocketAddr, cid: u32) -> Minted {
    ep.handle_datagram(t, from, &init(cid));
    let mut buf = Vec::new();
    assert!(ep.poll_transmit(t, &mut buf).is_some());
    match Repr::parse_bytes(&buf) {
        Ok(Repr {
            body:
                Body::Cookie {
                    server_cid,
                    params,
                    cookie_time,
                    mac,
                    ..
                },
            ..
        }) => Minted {
            server_cid,
            params: HsParams {
                window: 1 << 20,
                ..params
            },
            cookie_time,
            mac,
        },
        other => panic!("no cookie: {other:?}"),
    }
}

fn conn_req(cid: u32, m: &Minted) -> Vec<u8> {
    let mut b = Vec::new();
    Repr {
        dst_cid: m.server_cid,
        body: Body::ConnReq {
            client_cid: cid,
            params: m.params,
            cookie_time: m.cookie_time,
            mac: m.mac,
        },
    }
    .emit(&mut b);
    b
}

#[test]
fn cookie_survives_one_rotation_not_two() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let alice: SocketAddr = "10.0.0.1:1".parse().unwrap();
    // Default period (60 s): minted 1 ms before the rotation, returned
    // 2 s after it.
    let mut ep = Endpoint::new(server_cfg(), t0, 1);
    let m = cookie_at(&mut ep, t0 + COOKIE_ROTATION - ms(1), alice, 7);
    ep.handle_datagram(t0 + COOKIE_ROTATION + ms(2_000), alice, &conn_req(7, &m));
    assert_eq!(ep.connection_count(), 1);
    assert_eq!(ep.stats().cookie_rotations, 1);

    // A 4 s period, under the 10 s lifetime, so that only the rotation
    // can refuse a cookie 4.2 s old.
    let cfg = EndpointConfig {
        cookie_rotation: Some(ms(4_000)),
        ..server_cfg()
    };
    let mut ep = Endpoint::new(cfg, t0, 1);
    let a = cookie_at(&mut ep, t0 + ms(3_900), alice, 8);
    let b = cookie_at(&mut ep, t0 + ms(3_950), alice, 9);
    // One rotation later: good.
    ep.handle_datagram(t0 + ms(4_100), alice, &conn_req(8, &a));
    assert_eq!(ep.stats().accepted, 1);
    // Two rotations after minting: refused as stale, no connection.
    ep.handle_datagram(t0 + ms(8_100), alice, &conn_req(9, &b));
    assert_eq!(ep.stats().stale_cookies, 1);
    assert_eq!(ep.stats().accepted, 1);
    assert_eq!(ep.stats().cookie_rotations, 2);
    // A forged MAC in the current epoch: bad, not stale.
    let mut f = cookie_at(&mut ep, t0 + ms(8_200), alice, 10);
    f.mac[15] ^= 1;
    ep.handle_datagram(t0 + ms(8_300), alice, &conn_req(10, &f));
    // A forged cookie claiming a mint time in the future: bad.
    f.cookie_time = 9_000;
    ep.handle_datagram(t0 + ms(8_300), alice, &conn_req(10, &f));
    assert_eq!(ep.stats().bad_cookies, 2);
    assert_eq!(ep.stats().stale_cookies, 1);
    assert_eq!(ep.connection_count(), 1);
}

#[test]
fn init_flood_across_rotations_allocates_nothing() {
    let t0 = Instant::now();
    let period = Duration::from_secs(1);
    let cfg = EndpointConfig {
        cookie_rotation: Some(period),
        ..server_cfg()
    };
    let mut ep = Endpoint::new(cfg, t0, 1);
    let mut buf = Vec::new();
    let mut supplied = 0;
    for i in 0..5_000u32 {
        // 1 ms apart: five rotations over the flood.
        let t = t0 + Duration::from_millis(u64::from(i));
        let addr = SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 1000));
        ep.handle_datagram(t, addr, &init(i + 1));
        if i % 3 == 0 {
            while ep.poll_transmit(t, &mut buf).is_some() {}
        }
        // What the driver does each turn.
        if ep.wants_cookie_secret() {
            ep.supply_cookie_secret([i as u8; 32]);
            supplied += 1;
        }
    }
    assert_eq!(ep.stats().cookie_rotations, 4);
    assert_eq!(supplied, 5, "one at start, one after each rotation");
    assert_eq!(ep.connection_count(), 0);
    assert!(ep.by_cid.is_empty() && ep.accept_queue.is_empty());
    assert!(ep.stateless.len() <= ep.config.max_stateless_queue);
    // A client endpoint has no keys and asks for nothing.
    let client = Endpoint::new(EndpointConfig::default(), t0, 1);
    assert!(client.keys.is_none() && !client.wants_cookie_secret());
}

/// A client and a server endpoint over an ideal 10 ms-RTT link, with
/// one connection established.
fn connected_pair(seed: u64) -> (Pair, ConnectionHandle, ConnectionHandle) {
    let link = LinkConfig::ideal(Duration::from_millis(5));
    let mut p = Pair::new(seed, EndpointConfig::default(), server_cfg(), link, link);
    let (ch, sh) = p.connect(1000).unwrap();
    (p, ch, sh)
}

#[test]
fn idle_connection_memory() {
    let (mut p, ch, sh) = connected_pair(3);
    // A little traffic, then idle.
    p.client
        .connection_mut(ch)
        .unwrap()
        .write(&[0; 5000])
        .unwrap();
    let _ = p.run_until(10_000, Duration::from_secs(60), |p| {
        p.elapsed() > Duration::from_secs(2)
    });
    let mut b = [0u8; 8192];
    assert_eq!(p.server.connection_mut(sh).unwrap().read(&mut b), Ok(5000));
    // Past the first keepalive (5 s), which gives idle buffers back.
    let _ = p.run_until(10_000, Duration::from_secs(60), |p| {
        p.elapsed() > Duration::from_secs(8)
    });
    for c in [
        p.client.connection(ch).unwrap(),
        p.server.connection(sh).unwrap(),
    ] {
        let total = std::mem::size_of::<Connection>() + c.heap_bytes();
        eprintln!(
            "idle connection: size_of {} + heap ~{} = {} bytes",
            std::mem::size_of::<Connection>(),
            c.heap_bytes(),
            total
        );
        assert!(total <= 4 * 1024, "{total}");
    }
}

#[test]
fn reset_and_idle_timeout() {
    let mk = || {
        Pair::new(
            4,
            EndpointConfig::default(),
            server_cfg(),
            LinkConfig::ideal(Duration::from_millis(5)),
            LinkConfig::ideal(Duration::from_millis(5)),
        )
    };
    let mut p = mk();
    let (ch, sh) = p.connect(1000).unwrap();
    p.client.connection_mut(ch).unwrap().reset();
    let mut seen = None;
    p.run_until(1000, Duration::from_secs(5), |p| {
        // One event per step: an empty poll would already reap it.
        if let Some((h, e)) = p.server.poll_event() {
            if h == sh {
                if let Event::Closed { reason } = e {
                    seen = Some(reason);
                }
            }
        }
        seen.is_some()
    })
    .unwrap();
    assert_eq!(seen, Some(CloseReason::PeerReset));

    assert_eq!(
        p.server.connection_mut(sh).map(|c| c.read(&mut [0; 4])),
        Some(Err(crate::fillp::connection::ReadError::Reset))
    );
    // Both sides forget the connection once its events are taken.
    while p.client.poll_event().is_some() {}
    while p.server.poll_event().is_some() {}
    assert_eq!(p.client.connection_count(), 0);
    assert_eq!(p.server.connection_count(), 0);

    // Cut the path: both sides time out, keepalives notwithstanding.
    let mut p = mk();
    let (ch, _sh) = p.connect(1000).unwrap();
    p.c2s = crate::fillp::sim::Link::new(
        LinkConfig {
            loss: crate::fillp::sim::Loss::Bernoulli(1.0),
            ..LinkConfig::ideal(Duration::from_millis(5))
        },
        1,
    );
    let mut reason = None;
    p.run_until(100_000, Duration::from_secs(120), |p| {
        while let Some((h, e)) = p.client.poll_event() {
            if let (true, Event::Closed { reason: r }) = (h == ch, e) {
                reason = Some(r);
            }
        }
        reason.is_some()
    })
    .unwrap();
    assert_eq!(reason, Some(CloseReason::IdleTimeout));
    // Keepalives alone kept nothing alive one way: 30 s default.
    assert!(p.elapsed() >= Duration::from_secs(30));
}

/// A driver takes a connection's events before it transmits: a reset
/// connection whose `Closed` event went first is forgotten when its RST
/// leaves, with no later call to notice it (it has no timer). Before,
/// every such connection stayed for good, with its UDP socket.
#[test]
fn a_reset_connection_goes_with_its_rst() {
    let (mut p, ch, _sh) = connected_pair(5);
    while p.client.poll_event().is_some() {}
    p.client.connection_mut(ch).unwrap().reset();
    assert!(matches!(
        p.client.poll_event(),
        Some((h, Event::Closed { reason: CloseReason::LocalReset })) if h == ch
    ));
    assert!(p.client.poll_event().is_none());
    assert_eq!(p.client.connection_count(), 1, "the RST has not left");
    let mut buf = Vec::new();
    let t = p.client.poll_transmit(p.now, &mut buf).expect("the RST");
    assert_eq!(
        buf.get(1),
        Some(&(crate::fillp::wire::PacketType::Reset as u8))
    );
    assert!(t.size > 0);
    assert_eq!(p.client.connection_count(), 0);
}

#[test]
fn server_can_force_mode_and_clamp_mtu() {
    let mut client = EndpointConfig::default();
    client.connection.mode = RateMode::Fillp;
    client.connection.mtu = 1200;
    let mut server = server_cfg();
    server.connection.force_mode = Some(RateMode::Fixed);
    let mut p = Pair::new(
        5,
        client,
        server,
        LinkConfig::ideal(Duration::from_millis(5)),
        LinkConfig::ideal(Duration::from_millis(5)),
    );
    let (ch, sh) = p.connect(1000).unwrap();
    for c in [
        p.client.connection(ch).unwrap(),
        p.server.connection(sh).unwrap(),
    ] {
        assert_eq!(c.mode(), RateMode::Fixed);
        assert_eq!(c.mtu(), 1200);
    }
}

/// A finished connection lingers (draining) for the idle timeout; it
/// must not keep the receive queue it grew during the transfer.
#[test]
fn finished_connection_gives_its_buffers_back() {
    let (mut p, ch, sh) = connected_pair(4);
    let data = vec![3u8; 2 << 20];
    let (mut sent, mut got) = (0, 0);
    let mut b = vec![0u8; 1 << 20];
    let r = p.run_until(2_000_000, Duration::from_secs(60), |p| {
        let c = p.client.connection_mut(ch).unwrap();
        if sent < data.len() {
            sent += c.write(&data[sent..]).unwrap_or(0);
            if sent == data.len() {
                c.shutdown_write();
            }
        }
        while let Ok(n) = c.read(&mut b) {
            if n == 0 {
                break;
            }
        }
        // The server reads only once everything has arrived, so its
        // receive queue grows to the whole 2 MiB first.
        let late = p.elapsed() > Duration::from_secs(2);
        let s = p.server.connection_mut(sh).unwrap();
        while let Some(Ok(n)) = late.then(|| s.read(&mut b)) {
            if n == 0 {
                s.shutdown_write();
                break;
            }
            got += n;
        }
        p.server.connection(sh).is_some_and(|c| c.is_closed())
            && p.client.connection(ch).is_some_and(|c| c.is_closed())
    });
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(got, data.len());
    for c in [
        p.client.connection(ch).unwrap(),
        p.server.connection(sh).unwrap(),
    ] {
        // What is left is bookkeeping (the pipe's capacity), not the
        // megabytes of data buffers the transfer used.
        eprintln!("finished connection: heap ~{} bytes", c.heap_bytes());
        assert!(c.heap_bytes() <= 128 * 1024, "{}", c.heap_bytes());
    }
}

#[test]
fn half_close_and_flow_control() {
    // The client writes 1 MB against a 64 KiB window and a server that
    // reads slowly, then half-closes; the server answers after EOF.
    let mut server = server_cfg();
    server.connection.recv_window = 64 * 1024;
    let mut p = Pair::new(
        6,
        EndpointConfig::default(),
        server,
        LinkConfig::ideal(Duration::from_millis(10)),
        LinkConfig::ideal(Duration::from_millis(10)),
    );
    let (ch, sh) = p.connect(1000).unwrap();
    let mut rng = SimRng::new(1);
    let data: Vec<u8> = (0..1_000_000).map(|_| rng.next_u64() as u8).collect();
    let mut sent = 0;
    let mut got = Vec::new();
    let mut answered = false;
    let mut reply = Vec::new();
    let mut steps = 0u64;
    p.run_until(2_000_000, Duration::from_secs(300), |p| {
        steps += 1;
        let c = p.client.connection_mut(ch).unwrap();
        if sent < data.len() {
            if let Ok(n) = c.write(&data[sent..]) {
                sent += n;
            }
            if sent == data.len() {
                c.shutdown_write();
                assert_eq!(
                    c.write(b"x"),
                    Err(crate::fillp::connection::WriteError::Finished)
                );
            }
        }
        let mut b = [0u8; 4096];
        while let Ok(n) = c.read(&mut b) {
            if n == 0 {
                return true;
            }
            reply.extend_from_slice(&b[..n]);
        }
        let s = p.server.connection_mut(sh).unwrap();
        // Read slowly: one small chunk every other step, so the window
        // closes and has to be reopened by window updates.
        if steps.is_multiple_of(2) {
            match s.read(&mut b[..2048]) {
                Ok(0) if !answered => {
                    s.write(b"done").unwrap();
                    s.shutdown_write();
                    answered = true;
                }
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(_) => {}
            }
        }
        false
    })
    .unwrap();
    assert!(got == data);
    assert_eq!(reply, b"done");
}
