//! The memory kind through its public face: the registry, [`Stack`] and
//! [`StackSocket`], as the Python facade drives it.

use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::stack::options::{Options, Value};
use crate::stack::registry;
use crate::stack::{Family, SockKind, Stack, StackSocket};
use crate::sys;

fn stack(buffer: i64) -> Arc<dyn Stack> {
    let opts = Options::default().with("buffer_size", Value::Int(buffer));
    registry::open("memory", "mem", &opts).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.raw_os_error().expect("an errno"),
    }
}

/// A listener on `port` and a client connected to it, and the accepted end.
fn pair(
    st: &dyn Stack,
) -> (
    Box<dyn StackSocket>,
    Box<dyn StackSocket>,
    Box<dyn StackSocket>,
) {
    let l = st.socket(Family::V4, SockKind::Stream).unwrap();
    l.bind(addr("127.0.0.1:0")).unwrap();
    l.listen(8).unwrap();
    let c = st.socket(Family::V4, SockKind::Stream).unwrap();
    c.connect(l.local_addr().unwrap()).unwrap();
    let (a, peer) = l.accept().unwrap();
    assert_eq!(peer, c.local_addr().unwrap());
    assert_eq!(a.peer_addr().unwrap(), c.local_addr().unwrap());
    assert_eq!(c.peer_addr().unwrap(), l.local_addr().unwrap());
    (l, c, a)
}

fn readable(fd: std::os::fd::RawFd) -> bool {
    sys::poll_until(fd, libc::POLLIN, Some(Instant::now())).unwrap() & libc::POLLIN != 0
}

#[test]
fn bad_config_is_refused_with_the_field_named() {
    let opts = Options::default().with("buffer_size", Value::Int(0));
    let e = registry::parse("memory", &opts).unwrap_err();
    assert_eq!(e.field, "buffer_size");
    let opts = Options::default().with("mtu", Value::Int(1500));
    assert_eq!(registry::parse("memory", &opts).unwrap_err().field, "mtu");
    let st = stack(1024);
    assert!(st.carries(Family::V6, SockKind::Stream).is_ok());
    assert!(st.carries(Family::V4, SockKind::Dgram).is_err());
    assert_eq!(
        errno_of(st.socket(Family::V4, SockKind::Dgram)),
        libc::EPROTONOSUPPORT
    );
}

#[test]
fn bytes_flow_both_ways_and_shutdown_gives_eof() {
    let st = stack(1 << 16);
    let (_l, c, a) = pair(&*st);
    c.send_all(b"hello", 0).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(a.recv(&mut buf, libc::MSG_PEEK).unwrap(), 5);
    assert_eq!(a.recv(&mut buf[..3], 0).unwrap(), 3);
    assert_eq!(&buf[..3], b"hel");
    assert_eq!(a.recv(&mut buf, 0).unwrap(), 2);
    a.send_all(b"back", 0).unwrap();
    assert_eq!(c.recv(&mut buf, 0).unwrap(), 4);
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(a.recv(&mut buf, 0).unwrap(), 0);
    assert_eq!(errno_of(c.send(b"x", 0)), libc::EPIPE);
    // The other direction still works after a half close.
    a.send_all(b"late", 0).unwrap();
    assert_eq!(c.recv(&mut buf, 0).unwrap(), 4);
    let counters = a.counters();
    assert!(counters.contains(&("bytes_received", 5)) && counters.contains(&("bytes_sent", 8)));
    assert!(st.counters().contains(&("pairs_made", 1)));
}

#[test]
fn a_full_peer_blocks_send_until_it_reads() {
    let st = stack(1000);
    let (_l, c, a) = pair(&*st);
    assert_eq!(c.send(&[7; 4000], 0).unwrap(), 1000);
    assert_eq!(errno_of(c.send(&[7; 10], libc::MSG_DONTWAIT)), libc::EAGAIN);
    assert!(!readable(c.write_poll_fd().unwrap().unwrap()));
    c.set_timeout(Some(Duration::from_millis(30))).unwrap();
    let e = c.send(&[7; 10], 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    c.set_timeout(None).unwrap();
    let reader = thread::spawn(move || {
        let mut got = 0;
        let mut buf = [0u8; 300];
        while got < 5000 {
            let n = a.recv(&mut buf, 0).unwrap();
            assert!(n > 0);
            got += n;
        }
        got
    });
    c.send_all(&[7; 4000], 0).unwrap();
    assert_eq!(reader.join().unwrap(), 5000);
}

#[test]
fn close_gives_eof_unread_data_or_linger_zero_a_reset() {
    let st = stack(1 << 16);
    let mut buf = [0u8; 8];
    let (_l, c, a) = pair(&*st);
    c.send_all(b"bye", 0).unwrap();
    c.close().unwrap();
    assert!(readable(a.poll_fd()));
    assert_eq!(a.recv(&mut buf, 0).unwrap(), 3);
    assert_eq!(a.recv(&mut buf, 0).unwrap(), 0);
    assert_eq!(errno_of(a.send(b"x", 0)), libc::EPIPE);
    assert_eq!(errno_of(c.recv(&mut buf, 0)), libc::EBADF);

    let (_l, c, a) = pair(&*st);
    // `a` closes with bytes it never read: an abort, as in TCP.
    c.send_all(b"unread", 0).unwrap();
    a.close().unwrap();
    assert_eq!(errno_of(c.recv(&mut buf, 0)), libc::ECONNRESET);
    assert!(c.readiness().error);

    let (_l, c, a) = pair(&*st);
    let linger: Vec<u8> = [1i32, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
    c.set_option(libc::SOL_SOCKET, libc::SO_LINGER, &linger)
        .unwrap();
    assert_eq!(
        c.get_option(libc::SOL_SOCKET, libc::SO_LINGER, 8).unwrap(),
        linger
    );
    c.close().unwrap();
    assert_eq!(errno_of(a.recv(&mut buf, 0)), libc::ECONNRESET);
}

#[test]
fn refused_ports_taken_ports_and_a_closed_listener() {
    let st = stack(1024);
    let c = st.socket(Family::V4, SockKind::Stream).unwrap();
    assert_eq!(errno_of(c.connect(addr("127.0.0.1:9"))), libc::ECONNREFUSED);
    let l = st.socket(Family::V4, SockKind::Stream).unwrap();
    l.bind(addr("0.0.0.0:7000")).unwrap();
    let other = st.socket(Family::V4, SockKind::Stream).unwrap();
    assert_eq!(
        errno_of(other.bind(addr("127.0.0.1:7000"))),
        libc::EADDRINUSE
    );
    assert_eq!(errno_of(other.bind(addr("[::1]:7001"))), libc::EAFNOSUPPORT);
    // Bound but not listening: refused, as in TCP.
    assert_eq!(
        errno_of(c.connect(addr("127.0.0.1:7000"))),
        libc::ECONNREFUSED
    );
    l.listen(1).unwrap();
    c.connect(addr("127.0.0.1:7000")).unwrap();
    assert_eq!(errno_of(c.connect(addr("127.0.0.1:7000"))), libc::EISCONN);
    // The backlog of one is full.
    assert_eq!(
        errno_of(other.connect(addr("127.0.0.1:7000"))),
        libc::ECONNREFUSED
    );
    // Closing the listener resets the connection nobody accepted, and
    // frees the port.
    l.close().unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(errno_of(c.recv(&mut buf, 0)), libc::ECONNRESET);
    other.bind(addr("127.0.0.1:7000")).unwrap();
    assert!(st.counters().contains(&("open_sockets", 2)));
}

#[test]
fn accept_blocks_until_a_connect_and_close_wakes_it() {
    let st = stack(1024);
    let l: Arc<dyn StackSocket> = Arc::from(st.socket(Family::V6, SockKind::Stream).unwrap());
    l.bind(addr("[::1]:0")).unwrap();
    l.listen(4).unwrap();
    let to = l.local_addr().unwrap();
    assert!(!readable(l.poll_fd()));
    let st2 = Arc::clone(&st);
    let connector = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        let c = st2.socket(Family::V6, SockKind::Stream).unwrap();
        c.connect(to).unwrap();
        c
    });
    let (a, _) = l.accept().unwrap();
    let _c = connector.join().unwrap();
    assert!(a.readiness().writable && !a.readiness().readable);
    let l2 = Arc::clone(&l);
    let closer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        l2.close().unwrap();
    });
    assert_eq!(errno_of(l.accept()), libc::EBADF);
    closer.join().unwrap();
}

#[test]
fn options_programs_set_are_kept_and_the_rest_refused() {
    let st = stack(4096);
    let s = st.socket(Family::V4, SockKind::Stream).unwrap();
    let one = 1i32.to_ne_bytes();
    s.set_option(libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)
        .unwrap();
    s.set_option(libc::IPPROTO_TCP, libc::TCP_NODELAY, &one)
        .unwrap();
    assert_eq!(
        s.get_option(libc::SOL_SOCKET, libc::SO_REUSEADDR, 4)
            .unwrap(),
        one
    );
    assert_eq!(
        s.get_option(libc::SOL_SOCKET, libc::SO_RCVBUF, 4).unwrap(),
        4096i32.to_ne_bytes()
    );
    assert_eq!(
        s.get_option(libc::SOL_SOCKET, libc::SO_ERROR, 4).unwrap(),
        0i32.to_ne_bytes()
    );
    assert_eq!(
        errno_of(s.set_option(libc::IPPROTO_IP, libc::IP_TTL, &one)),
        libc::ENOPROTOOPT
    );
    assert_eq!(
        errno_of(s.set_option(libc::SOL_SOCKET, libc::SO_REUSEADDR, &[1])),
        libc::EINVAL
    );
    let offer = b"fillp:1";
    let e = s.set_option(crate::stack::SOL_DMM, crate::stack::DMM_OFFER, offer);
    assert!(e.is_err());
}
