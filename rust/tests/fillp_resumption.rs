//! Session resumption over the simulator: a client that holds a server's
//! ticket connects in one round trip, a lost CONN_ACK is answered again
//! without a second server connection, and every ticket the server will not
//! take (another secret, too old, another address, resumption off) sends
//! the client back to a full handshake instead of failing its connect.

use std::net::SocketAddr;
use std::time::Duration;

use dmm::fillp::connection::Resumption;
use dmm::fillp::endpoint::{ConnectionHandle, Endpoint, EndpointConfig, TICKET_LIFETIME};
use dmm::fillp::sim::{LinkConfig, Pair, Side};
use dmm::fillp::wire::{Body, Repr};

/// One way; a round trip is 20 ms.
const DELAY: Duration = Duration::from_millis(10);

fn pair(server: EndpointConfig) -> Pair {
    let link = LinkConfig::ideal(DELAY);
    Pair::new(7, EndpointConfig::default(), server, link, link)
}

fn server_cfg(secret: u8) -> EndpointConfig {
    EndpointConfig {
        cookie_secret: [secret; 32],
        ..EndpointConfig::default()
    }
}

/// A first connection with the full handshake, closed again; returns what
/// the client may resume with.
fn first_connection(p: &mut Pair) -> Resumption {
    let (ch, _) = p.connect(10_000).expect("first handshake");
    let c = p.client.connection(ch).expect("client connection");
    assert!(!c.resumed());
    c.resumption()
        .expect("the server's CONN_ACK carries a ticket")
}

/// Starts a resumed connect and runs until the client is established and
/// the server has accepted; returns both handles and the time it took.
fn resume(p: &mut Pair, r: &Resumption) -> (ConnectionHandle, ConnectionHandle, Duration) {
    let start = p.elapsed();
    let config = EndpointConfig::default().connection;
    let ch = p
        .client
        .connect_resumed(p.now, p.server_addr, config, r)
        .expect("connect");
    let mut sh = None;
    p.run_until(10_000, start + Duration::from_secs(30), |p| {
        if sh.is_none() {
            sh = p.server.accept();
        }
        sh.is_some() && p.client.connection(ch).is_some_and(|c| c.is_established())
    })
    .expect("resumed handshake");
    (ch, sh.expect("accepted"), p.elapsed() - start)
}

/// A resumed connect the server refuses: RST, then INIT -> COOKIE and
/// CONN_REQ -> CONN_ACK, three round trips in all; returns the client.
fn refused_then_full(p: &mut Pair, r: &Resumption) -> ConnectionHandle {
    let (ch, _, took) = resume(p, r);
    assert_eq!(took, 6 * DELAY);
    let c = p.client.connection(ch).expect("client");
    assert!(c.resumption_refused() && !c.resumed());
    ch
}

/// Datagrams the client has sent so far.
fn client_datagrams(p: &Pair) -> u64 {
    p.c2s.stats.sent
}

#[test]
fn a_resumed_connect_takes_one_round_trip_and_carries_data() {
    let mut p = pair(server_cfg(1));
    let r = first_connection(&mut p);
    let (ch, sh, took) = resume(&mut p, &r);
    // CONN_REQ out, CONN_ACK back: one round trip, where the first took two.
    assert_eq!(took, 2 * DELAY);
    let c = p.client.connection(ch).expect("client");
    assert!(c.resumed() && !c.resumption_refused());
    assert_eq!(p.server.stats().resumed, 1);
    assert_eq!(p.server.stats().inits, 1, "no INIT for the resumed one");
    // The new connection moves data both ways.
    let mut client = Side::sending((0..200_000u32).map(|i| i as u8).collect());
    let mut server = Side::default();
    p.run_until(1_000_000, Duration::from_secs(30), |p| {
        client.pump(&mut p.client, ch);
        server.pump(&mut p.server, sh);
        server.eof
    })
    .expect("transfer");
    assert_eq!(server.incoming, client.outgoing);
    // And it brought a fresh ticket of its own.
    let again = p.client.connection(ch).and_then(|c| c.resumption());
    assert!(again.is_some_and(|a| a.ticket != r.ticket));
}

#[test]
fn a_lost_conn_ack_is_answered_again_without_a_second_connection() {
    let mut p = pair(server_cfg(1));
    let r = first_connection(&mut p);
    let before = p.server.connection_count();
    let sent_before = client_datagrams(&p);
    // Lose the server's first answer to the resumed CONN_REQ.
    let mut dropped = false;
    let config = EndpointConfig::default().connection;
    let ch = p
        .client
        .connect_resumed(p.now, p.server_addr, config, &r)
        .expect("connect");
    let mut sh = None;
    p.run_until(10_000, Duration::from_secs(30), |p| {
        if !dropped && p.s2c.drop_where(|d| d.get(1) == Some(&4)) > 0 {
            dropped = true;
        }
        if sh.is_none() {
            sh = p.server.accept();
        }
        sh.is_some() && p.client.connection(ch).is_some_and(|c| c.is_established())
    })
    .expect("handshake after a lost CONN_ACK");
    assert!(dropped);
    assert!(
        client_datagrams(&p) - sent_before >= 2,
        "the CONN_REQ was resent"
    );
    assert_eq!(p.server.connection_count(), before + 1);
    assert_eq!(
        (p.server.stats().resumed, p.server.stats().accepted),
        (1, 2)
    );
    assert!(p.server.accept().is_none());
}

#[test]
fn a_ticket_from_another_secret_sends_the_client_back_to_init() {
    let mut p = pair(server_cfg(1));
    let r = first_connection(&mut p);
    // The server restarts: a new secret, the old ticket's MAC fails.
    p.server = Endpoint::new(
        EndpointConfig {
            server: true,
            ..server_cfg(2)
        },
        p.now,
        99,
    );
    let ch = refused_then_full(&mut p, &r);
    let c = p.client.connection(ch).expect("client");
    assert_eq!(
        (p.server.stats().bad_tickets, p.server.stats().resumed),
        (1, 0)
    );
    // The full handshake's ticket is good with the new secret.
    let fresh = c.resumption().expect("new ticket");
    let (ch, _, took) = resume(&mut p, &fresh);
    assert_eq!(took, 2 * DELAY);
    assert!(p.client.connection(ch).is_some_and(|c| c.resumed()));
}

#[test]
fn an_expired_ticket_is_refused_as_stale() {
    let mut p = pair(server_cfg(1));
    let r = first_connection(&mut p);
    p.now += TICKET_LIFETIME + Duration::from_secs(1);
    refused_then_full(&mut p, &r);
    assert_eq!(p.server.stats().stale_tickets, 1);
}

#[test]
fn a_ticket_is_bound_to_the_clients_address() {
    let mut p = pair(server_cfg(1));
    let r = first_connection(&mut p);
    // The same CONN_REQ from another host: RST, no state.
    let mut req = Vec::new();
    Repr {
        dst_cid: 0,
        body: Body::ConnReq {
            client_cid: 77,
            params: r.params,
            cookie_time: r.ticket.time,
            mac: r.ticket.mac,
        },
    }
    .emit(&mut req);
    let count = p.server.connection_count();
    let thief: SocketAddr = "10.0.0.66:4000".parse().unwrap();
    p.server.handle_datagram(p.now, thief, &req);
    assert_eq!(p.server.connection_count(), count);
    assert_eq!(p.server.stats().bad_tickets, 1);
    let mut buf = Vec::new();
    let t = p.server.poll_transmit(p.now, &mut buf).expect("an answer");
    assert_eq!(t.destination, thief);
    assert!(matches!(
        Repr::parse_bytes(&buf).map(|r| r.body),
        Ok(Body::Reset)
    ));
    // From the client's own address (another port) it is taken.
    let mut from = p.client_addr;
    from.set_port(4001);
    p.server.handle_datagram(p.now, from, &req);
    assert_eq!(p.server.connection_count(), count + 1);
    assert_eq!(p.server.stats().resumed, 1);
}

#[test]
fn with_resumption_off_a_server_gives_no_ticket_and_takes_none() {
    let off = EndpointConfig {
        resumption: false,
        ..server_cfg(1)
    };
    let mut p = pair(off);
    let (ch, _) = p.connect(10_000).expect("handshake");
    assert!(p
        .client
        .connection(ch)
        .is_some_and(|c| c.resumption().is_none()));
    // A ticket minted while it was on (same secret) is refused now.
    let mut on = pair(server_cfg(1));
    let r = first_connection(&mut on);
    refused_then_full(&mut p, &r);
    assert_eq!(p.server.stats().stale_tickets, 1);
}
