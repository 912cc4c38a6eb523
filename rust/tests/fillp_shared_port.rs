//! FillP client connections sharing one UDP socket
//! (`FillpOptions::shared_client_port`), on real UDP over 127.0.0.1: they
//! are told apart by connection ID alone, so data, resets and ICMP errors
//! must reach the right connection, and the socket must go when its last
//! connection has.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dmm::stack::fillp::{FillpOptions, FillpStack};
use dmm::stack::{Family, SockKind, Stack, StackSocket};

type Sock = Box<dyn StackSocket>;

fn shared_stack(name: &str) -> Arc<FillpStack> {
    let opts = FillpOptions {
        shared_client_port: true,
        ..FillpOptions::default()
    };
    Arc::new(FillpStack::new(name, opts).expect("stack"))
}

fn lo(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

fn listener(stack: &dyn Stack) -> (Sock, SocketAddr) {
    let l = stack.socket(Family::V4, SockKind::Stream).unwrap();
    l.bind(lo(0)).unwrap();
    l.listen(64).unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// A server stack with a listener, and a client stack (both shared-port).
fn two_stacks() -> (Arc<FillpStack>, Arc<FillpStack>, Sock, SocketAddr) {
    let server = shared_stack("fillp-server");
    let (l, addr) = listener(&*server);
    (server, shared_stack("fillp-client"), l, addr)
}

fn connect(stack: &dyn Stack, addr: SocketAddr) -> io::Result<Sock> {
    let c = stack.socket(Family::V4, SockKind::Stream).unwrap();
    c.set_timeout(Some(Duration::from_secs(10))).unwrap();
    c.connect(addr)?;
    Ok(c)
}

fn counter(st: &dyn Stack, name: &str) -> u64 {
    st.counters()
        .iter()
        .find(|(k, _)| *k == name)
        .map_or(0, |(_, v)| *v)
}

/// `msg` sent on `from` arrives whole on `to`.
fn assert_delivers(from: &dyn StackSocket, to: &dyn StackSocket, msg: &[u8]) {
    from.send_all(msg, 0).unwrap();
    to.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = vec![0u8; msg.len()];
    let mut n = 0;
    while n < msg.len() {
        let k = to.recv(&mut got[n..], 0).unwrap();
        assert_ne!(k, 0, "EOF after {n} bytes");
        n += k;
    }
    assert_eq!(got, msg);
}

fn recv_to_eof(s: &dyn StackSocket) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.recv(&mut buf, 0).unwrap() {
            0 => return out,
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn connections_share_one_port_and_keep_their_own_bytes() {
    const N: usize = 32;
    let (_server, client, l, addr) = two_stacks();
    let clients: Vec<Sock> = (0..N).map(|_| connect(&*client, addr).unwrap()).collect();
    let local = clients[0].local_addr().unwrap();
    assert_ne!(local.port(), 0);
    for c in &clients {
        assert_eq!(c.local_addr().unwrap(), local, "one port for all");
    }
    assert_eq!(counter(&*client, "udp_sockets"), 1);
    let servers: Vec<Sock> = (0..N).map(|_| l.accept().unwrap().0).collect();
    // Every client writes a different message at once; each server end
    // (accepted in connect order) must read exactly its own, then echo it.
    thread::scope(|s| {
        for (i, c) in clients.iter().enumerate() {
            s.spawn(move || {
                let msg = vec![i as u8; 20_000 + i * 997];
                c.send_all(&msg, 0).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                assert_eq!(recv_to_eof(&**c), msg, "client {i}");
            });
        }
        for (i, sv) in servers.iter().enumerate() {
            s.spawn(move || {
                sv.set_timeout(Some(Duration::from_secs(10))).unwrap();
                let got = recv_to_eof(&**sv);
                assert_eq!(got, vec![i as u8; 20_000 + i * 997], "server end {i}");
                sv.send_all(&got, 0).unwrap();
                sv.shutdown(Shutdown::Write).unwrap();
            });
        }
    });
}

#[test]
fn a_reset_or_close_of_one_leaves_the_others_up_and_the_last_frees_the_port() {
    let (_server, client, l, addr) = two_stacks();
    let a = connect(&*client, addr).unwrap();
    let b = connect(&*client, addr).unwrap();
    let (sa, _) = l.accept().unwrap();
    let (sb, _) = l.accept().unwrap();
    // An abortive close of `a` (zero linger) resets only `a`.
    a.set_option(libc::SOL_SOCKET, libc::SO_LINGER, &[1, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    a.close().unwrap();
    sa.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let e = sa.recv(&mut [0u8; 4], 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ECONNRESET), "{e:?}");
    assert_delivers(&*b, &*sb, b"still here");
    // A new connection meanwhile takes the same port.
    let c = connect(&*client, addr).unwrap();
    assert_eq!(c.local_addr().unwrap(), b.local_addr().unwrap());
    let (sc, _) = l.accept().unwrap();
    // With no connection left the socket goes (aborted ones at once;
    // gracefully closed ones would linger for the idle timeout first).
    for s in [&b, &c] {
        s.set_option(libc::SOL_SOCKET, libc::SO_LINGER, &[1, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
    }
    drop((c, b, sc));
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(&*client, "udp_sockets") > 0 {
        assert!(Instant::now() < deadline, "{:?}", client.counters());
        thread::sleep(Duration::from_millis(50));
    }
    // And the next connect makes a new one that works.
    let d = connect(&*client, addr).unwrap();
    let (sd, _) = l.accept().unwrap();
    assert_delivers(&*d, &*sd, b"x");
}

#[test]
fn a_refused_peer_fails_only_the_connects_to_it() {
    let (_server, client, l, addr) = two_stacks();
    let up = connect(&*client, addr).unwrap();
    let (s_up, _) = l.accept().unwrap();
    // A port that nobody listens on: the ICMP port-unreachable arrives on
    // the shared socket and must fail this connect, not the live one.
    let dead = {
        let u = std::net::UdpSocket::bind(lo(0)).unwrap();
        u.local_addr().unwrap().port()
    };
    let t0 = Instant::now();
    let e = connect(&*client, lo(dead)).map(|_| ()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_delivers(&*up, &*s_up, b"ok");
}

#[test]
fn a_bound_client_keeps_its_own_port() {
    let (_server, client, l, addr) = two_stacks();
    let shared = connect(&*client, addr).unwrap();
    let own = client.socket(Family::V4, SockKind::Stream).unwrap();
    own.bind(lo(0)).unwrap();
    let port = own.local_addr().unwrap().port();
    own.connect(addr).unwrap();
    assert_eq!(own.local_addr().unwrap().port(), port);
    assert_ne!(port, shared.local_addr().unwrap().port());
    assert_eq!(counter(&*client, "udp_sockets"), 2);
    let (s1, p1) = l.accept().unwrap();
    let (s2, p2) = l.accept().unwrap();
    assert_eq!(p1, shared.local_addr().unwrap());
    assert_eq!(p2.port(), port);
    drop((s1, s2));
}
