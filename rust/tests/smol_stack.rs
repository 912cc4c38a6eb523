//! The smoltcp stack over real TAP devices, against kernel TCP peers and
//! against another smoltcp instance.
//!
//! Needs root (CAP_NET_ADMIN) and `ip` (iproute2). Every test makes its own
//! TAP device (named `dmmt<tag><pid>`) and subnet `10.99.<n>.0/24`: the
//! kernel side of the TAP gets `.1`, smoltcp `.2` (smoltcp's own address is
//! never given to the host side). A TAP device made by the stack disappears
//! when the stack is dropped, so cleanup is automatic.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dmm::stack::smol::{IpCidr, SmolOptions, SmolStack};
use dmm::stack::{Family, SockKind, Stack, StackSocket};

mod common;

type Sock = Box<dyn StackSocket>;

const MB: usize = 1 << 20;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn dev_name(tag: &str) -> String {
    format!("dmmt{tag}{}", std::process::id() % 100_000)
}

fn v4(n: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 99, n, host))
}

fn cidr(s: &str) -> IpCidr {
    s.parse().expect("cidr")
}

/// A stack on a new TAP `dmmt<tag><pid>` with 10.99.n.2/24; the host side
/// gets 10.99.n.1/24.
fn setup(tag: &str, n: u8) -> (SmolStack, String) {
    common::require_net_admin();
    let dev = dev_name(tag);
    let opts = SmolOptions::new(&dev, vec![cidr(&format!("10.99.{n}.2/24"))]);
    let stack = SmolStack::new(format!("t{tag}"), opts).expect("stack");
    ip(&["addr", "add", &format!("10.99.{n}.1/24"), "dev", &dev]);
    (stack, dev)
}

/// Deterministic test data: a xorshift stream.
struct Gen(u64);

impl Gen {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

/// A cheap running checksum (FNV-style over 8-byte words; byte tail).
#[derive(Default)]
struct Sum(u64, usize);

impl Sum {
    fn add(&mut self, buf: &[u8]) {
        // Feed byte-wise so chunk boundaries do not matter.
        for &b in buf {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        self.1 += buf.len();
    }
}

fn send_stream(mut write: impl FnMut(&[u8]) -> io::Result<()>, total: usize, seed: u64) -> Sum {
    let mut g = Gen(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut sum = Sum::default();
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len());
        g.fill(&mut buf[..n]);
        sum.add(&buf[..n]);
        write(&buf[..n]).expect("send");
        left -= n;
    }
    sum
}

fn recv_stream(mut read: impl FnMut(&mut [u8]) -> io::Result<usize>) -> Sum {
    let mut buf = vec![0u8; 64 * 1024];
    let mut sum = Sum::default();
    loop {
        let n = read(&mut buf).expect("recv");
        if n == 0 {
            return sum;
        }
        sum.add(&buf[..n]);
    }
}

fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

fn smol_listener(stack: &SmolStack, n: u8, backlog: i32) -> (Sock, SocketAddr) {
    let l = stack.socket(Family::V4, SockKind::Stream).unwrap();
    l.bind(SocketAddr::new(v4(n, 2), 0)).unwrap();
    l.listen(backlog).unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

#[test]
#[ignore = "needs root: TAP devices"]
fn kernel_client_to_smol_server_100mb_each_way() {
    let (stack, _dev) = setup("a", 1);
    let (l, addr) = smol_listener(&stack, 1, 8);
    assert_eq!(addr.ip(), v4(1, 2));
    let client = thread::spawn(move || {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        let mut c2 = c.try_clone().unwrap();
        let up = thread::spawn(move || {
            let s = send_stream(|b| c2.write_all(b), 100 * MB, 7);
            c2.shutdown(Shutdown::Write).unwrap();
            s
        });
        let down = recv_stream(|b| c.read(b));
        (up.join().unwrap(), down)
    });
    let (s, peer) = l.accept().unwrap();
    assert_eq!(peer.ip(), v4(1, 1));
    let s: Arc<Sock> = Arc::new(s);
    let s2 = Arc::clone(&s);
    let t0 = Instant::now();
    let up = thread::spawn(move || {
        let sum = send_stream(|b| s2.send_all(b, 0), 100 * MB, 9);
        s2.shutdown(Shutdown::Write).unwrap();
        sum
    });
    let got = recv_stream(|b| s.recv(b, 0));
    let sent = up.join().unwrap();
    let (k_sent, k_got) = client.join().unwrap();
    eprintln!("200 MB in {:?}", t0.elapsed());
    assert_eq!(got.1, 100 * MB);
    assert_eq!((got.0, got.1), (k_sent.0, k_sent.1));
    assert_eq!((k_got.0, k_got.1), (sent.0, sent.1));
    s.close().unwrap();
}

#[test]
#[ignore = "needs root: TAP devices"]
fn smol_client_to_kernel_server_100mb_each_way() {
    let (stack, _dev) = setup("b", 2);
    let l = TcpListener::bind(SocketAddr::new(v4(2, 1), 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut c, peer) = l.accept().unwrap();
        assert_eq!(peer.ip(), v4(2, 2));
        let mut c2 = c.try_clone().unwrap();
        let up = thread::spawn(move || {
            let s = send_stream(|b| c2.write_all(b), 100 * MB, 3);
            c2.shutdown(Shutdown::Write).unwrap();
            s
        });
        let down = recv_stream(|b| c.read(b));
        (up.join().unwrap(), down)
    });
    let s = stack.socket(Family::V4, SockKind::Stream).unwrap();
    s.connect(addr).unwrap();
    assert_eq!(s.peer_addr().unwrap(), addr);
    assert_eq!(s.local_addr().unwrap().ip(), v4(2, 2));
    let s: Arc<Sock> = Arc::new(s);
    let s2 = Arc::clone(&s);
    let up = thread::spawn(move || {
        let sum = send_stream(|b| s2.send_all(b, 0), 100 * MB, 5);
        s2.shutdown(Shutdown::Write).unwrap();
        sum
    });
    let got = recv_stream(|b| s.recv(b, 0));
    let sent = up.join().unwrap();
    let (k_sent, k_got) = server.join().unwrap();
    assert_eq!(got.1, 100 * MB);
    assert_eq!((got.0, got.1), (k_sent.0, k_sent.1));
    assert_eq!((k_got.0, k_got.1), (sent.0, sent.1));
}

/// Raises the open-file limit to `want` (or the hard limit).
fn raise_nofile(want: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    if r.rlim_cur < want {
        r.rlim_cur = want.min(r.rlim_max);
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    }
}

#[test]
#[ignore = "needs root: TAP devices"]
fn thousand_concurrent_connections_to_one_listener() {
    const N: usize = 1000;
    raise_nofile(8192);
    let (stack, _dev) = setup("c", 3);
    let (l, addr) = smol_listener(&stack, 3, 128);
    let clients = thread::spawn(move || {
        let mut conns = Vec::with_capacity(N);
        for i in 0..N {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("connect {i}: {e}"));
            c.write_all(&(i as u32).to_le_bytes()).unwrap();
            conns.push(c);
        }
        // Every connection stays open until each got its echo.
        for (i, c) in conns.iter_mut().enumerate() {
            let mut b = [0u8; 4];
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            c.read_exact(&mut b).unwrap();
            assert_eq!(u32::from_le_bytes(b), i as u32 + 1);
        }
        conns
    });
    // A bounded wait: a client that failed must fail the test, not hang it.
    l.set_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut accepted = Vec::with_capacity(N);
    for i in 0..N {
        let (s, _) = l
            .accept()
            .unwrap_or_else(|e| panic!("accept {i}: {e}; {:?}", stack.counters()));
        accepted.push(s);
    }
    for s in &accepted {
        let mut b = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let n = s.recv(&mut b[got..], 0).unwrap();
            assert!(n > 0);
            got += n;
        }
        let v = u32::from_le_bytes(b) + 1;
        s.send_all(&v.to_le_bytes(), 0).unwrap();
    }
    let conns = clients.join().unwrap();
    let counters = stack.counters();
    let get = |k: &str| counters.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
    assert_eq!(get("accepted"), Some(N as u64));
    drop(conns);
    // Every accepted socket sees EOF.
    for s in &accepted {
        let mut b = [0u8; 8];
        s.set_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(s.recv(&mut b, 0).unwrap(), 0);
    }
}

#[test]
#[ignore = "needs root: TAP devices"]
fn connect_to_closed_port_is_refused() {
    let (stack, _dev) = setup("d", 4);
    // A smoltcp client to a kernel port nobody listens on: kernel RST.
    let s = stack.socket(Family::V4, SockKind::Stream).unwrap();
    let e = s.connect(SocketAddr::new(v4(4, 1), 9)).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::ECONNREFUSED), "{e}");
    // A kernel client to a smoltcp port nobody listens on: smoltcp RST.
    let e = TcpStream::connect_timeout(&SocketAddr::new(v4(4, 2), 9), Duration::from_secs(5))
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
}

#[test]
#[ignore = "needs root: TAP devices"]
fn nonblocking_connect_eof_eagain_and_timeouts() {
    let (stack, _dev) = setup("e", 5);
    let l = TcpListener::bind(SocketAddr::new(v4(5, 1), 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let s = stack.socket(Family::V4, SockKind::Stream).unwrap();
    s.set_timeout(Some(Duration::ZERO)).unwrap();
    let e = s.connect(addr).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EINPROGRESS));
    // Completion shows as writability and SO_ERROR 0.
    let t0 = Instant::now();
    while !s.readiness().writable {
        assert!(t0.elapsed() < Duration::from_secs(5));
        thread::sleep(Duration::from_millis(1));
    }
    let err = s.get_option(libc::SOL_SOCKET, libc::SO_ERROR, 4).unwrap();
    assert_eq!(err, 0i32.to_ne_bytes());
    let (mut k, _) = l.accept().unwrap();
    // Nothing to read: EAGAIN, and not readable.
    let mut b = [0u8; 16];
    let e = s.recv(&mut b, 0).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EAGAIN));
    assert!(!s.readiness().readable);
    // A timeout: "timed out" without errno.
    s.set_timeout(Some(Duration::from_millis(100))).unwrap();
    let t0 = Instant::now();
    let e = s.recv(&mut b, 0).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert_eq!(errno_of(&e), None);
    assert!(t0.elapsed() >= Duration::from_millis(100));
    // Data makes it readable; the poll fd follows.
    k.write_all(b"hello").unwrap();
    let t0 = Instant::now();
    while !s.readiness().readable {
        assert!(t0.elapsed() < Duration::from_secs(5));
        thread::sleep(Duration::from_millis(1));
    }
    let mut pfd = libc::pollfd {
        fd: s.poll_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is valid.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1);
    assert_eq!(s.recv(&mut b, libc::MSG_PEEK).unwrap(), 5);
    assert_eq!(s.recv(&mut b, 0).unwrap(), 5);
    assert_eq!(&b[..5], b"hello");
    pfd.revents = 0;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
    // EOF: Ok(0), readable.
    k.shutdown(Shutdown::Write).unwrap();
    s.set_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(s.recv(&mut b, 0).unwrap(), 0);
    assert!(s.readiness().readable);
    // Our side can still send after the peer's FIN.
    s.send_all(b"bye", 0).unwrap();
    let mut kb = [0u8; 3];
    k.read_exact(&mut kb).unwrap();
    assert_eq!(&kb, b"bye");
    s.close().unwrap();
    assert_eq!(k.read(&mut kb).unwrap(), 0);
    // Closed socket: EBADF.
    let e = s.send(b"x", 0).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EBADF));
}

#[test]
#[ignore = "needs root: TAP devices"]
fn accept_timeout_bind_in_use_and_options() {
    let (stack, _dev) = setup("f", 6);
    let (l, addr) = smol_listener(&stack, 6, 4);
    l.set_timeout(Some(Duration::from_millis(50))).unwrap();
    let e = l.accept().err().expect("accept timed out");
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    l.set_timeout(Some(Duration::ZERO)).unwrap();
    let e = l.accept().err().expect("accept would block");
    assert_eq!(errno_of(&e), Some(libc::EAGAIN));
    // The port is taken.
    let s = stack.socket(Family::V4, SockKind::Stream).unwrap();
    let e = s.bind(addr).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EADDRINUSE));
    // An address that is not ours.
    let e = s.bind(SocketAddr::new(v4(6, 1), 0)).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EADDRNOTAVAIL));
    // Options.
    let one = 1i32.to_ne_bytes();
    s.set_option(libc::IPPROTO_TCP, libc::TCP_NODELAY, &one)
        .unwrap();
    assert_eq!(
        s.get_option(libc::IPPROTO_TCP, libc::TCP_NODELAY, 4)
            .unwrap(),
        one
    );
    s.set_option(libc::SOL_SOCKET, libc::SO_KEEPALIVE, &one)
        .unwrap();
    s.set_option(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, &60i32.to_ne_bytes())
        .unwrap();
    s.set_option(libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)
        .unwrap();
    s.set_option(libc::SOL_SOCKET, libc::SO_RCVBUF, &65536i32.to_ne_bytes())
        .unwrap();
    assert_eq!(
        s.get_option(libc::SOL_SOCKET, libc::SO_RCVBUF, 4).unwrap(),
        65536i32.to_ne_bytes()
    );
    let e = s
        .set_option(libc::IPPROTO_IP, libc::IP_TOS, &one)
        .unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::ENOPROTOOPT));
    // A small receive buffer still carries a transfer (window scaling off).
    let k = thread::spawn(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        send_stream(|b| c.write_all(b), 4 * MB, 11)
    });
    l.set_timeout(None).unwrap();
    let (a, _) = l.accept().unwrap();
    let got = recv_stream(|b| a.recv(b, 0));
    let sent = k.join().unwrap();
    assert_eq!((got.0, got.1), (sent.0, sent.1));
    // Peer and local addresses of an accepted socket.
    assert_eq!(a.local_addr().unwrap(), addr);
}

#[test]
#[ignore = "needs root: TAP devices"]
fn device_deleted_under_a_live_connection() {
    let (stack, dev) = setup("g", 7);
    let (l, addr) = smol_listener(&stack, 7, 4);
    let k = thread::spawn(move || TcpStream::connect(addr).unwrap());
    let (s, _) = l.accept().unwrap();
    let _k = k.join().unwrap();
    let s: Arc<Sock> = Arc::new(s);
    let s2 = Arc::clone(&s);
    let blocked = thread::spawn(move || {
        let mut b = [0u8; 16];
        let t0 = Instant::now();
        (s2.recv(&mut b, 0), t0.elapsed())
    });
    thread::sleep(Duration::from_millis(200));
    ip(&["link", "del", &dev]);
    let (r, took) = blocked.join().unwrap();
    let e = r.unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::ENETDOWN), "{e}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Later calls fail the same way; new sockets cannot connect.
    let e = s.send(b"x", 0).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::ENETDOWN));
    let e = l.accept().err().expect("listener is down");
    assert_eq!(errno_of(&e), Some(libc::ENETDOWN));
    assert!(stack.describe().ends_with("down"));
    // A restart re-creates the device; new sockets work again.
    stack.restart().unwrap();
    ip(&["addr", "add", "10.99.7.1/24", "dev", &dev]);
    let (l2, addr2) = smol_listener(&stack, 7, 4);
    let k = thread::spawn(move || {
        let mut c = TcpStream::connect_timeout(&addr2, Duration::from_secs(5)).unwrap();
        c.write_all(b"again").unwrap();
        c
    });
    let (s3, _) = l2.accept().unwrap();
    let mut b = [0u8; 5];
    s3.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = 0;
    while got < 5 {
        got += s3.recv(&mut b[got..], 0).unwrap();
    }
    assert_eq!(&b, b"again");
    // Closing the old sockets must not touch the new connection (smoltcp
    // reuses socket handles), and the old listener cannot listen again.
    let e = l.listen(4).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::ENETDOWN));
    l.close().unwrap();
    drop(s);
    s3.send_all(b"still here", 0).unwrap();
    let mut kc = k.join().unwrap();
    let mut kb = [0u8; 10];
    kc.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    kc.read_exact(&mut kb).unwrap();
    assert_eq!(&kb, b"still here");
    // Stop: the driver is joined, old sockets fail, the device goes away.
    stack.stop();
    let e = s3.recv(&mut b, 0).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::ENETDOWN));
}

#[test]
#[ignore = "needs root: TAP devices"]
fn bad_parameters_are_errors() {
    let dev = dev_name("h");
    let ok = SmolOptions::new(&dev, vec![cidr("10.99.8.2/24")]);
    let cases: Vec<SmolOptions> = vec![
        SmolOptions {
            addresses: vec![],
            ..ok.clone()
        },
        SmolOptions {
            mtu: 100,
            ..ok.clone()
        },
        SmolOptions {
            mtu: 70000,
            ..ok.clone()
        },
        SmolOptions {
            mac: Some([1, 2, 3, 4, 5, 6]),
            ..ok.clone()
        },
        SmolOptions {
            gateways: vec!["fd00:99::1".parse().unwrap()],
            ..ok.clone()
        },
        SmolOptions {
            rx_buffer: 10,
            ..ok.clone()
        },
        SmolOptions {
            device: "a/b".into(),
            ..ok.clone()
        },
        SmolOptions {
            device: "much-too-long-device-name".into(),
            ..ok.clone()
        },
        SmolOptions {
            addresses: vec![cidr("0.0.0.0/0")],
            ..ok.clone()
        },
    ];
    for o in cases {
        let e = SmolStack::new("bad", o.clone()).err().expect("an error");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{o:?}: {e}");
    }
    // A family without an address is not supported.
    let stack = SmolStack::new("good", ok).unwrap();
    assert!(!stack.supports(Family::V6, SockKind::Stream));
    assert!(stack.socket(Family::V6, SockKind::Stream).is_err());
    let s = stack.socket(Family::V4, SockKind::Stream).unwrap();
    let e = s.connect("[fd00:99::1]:80".parse().unwrap()).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EAFNOSUPPORT));
    let e = s.send(b"x", 0).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::ENOTCONN));
}

#[test]
#[ignore = "needs root: TAP devices"]
fn smol_to_smol_over_a_bridge_v4_and_v6() {
    let br = dev_name("br");
    let (da, db) = (dev_name("i"), dev_name("j"));
    ip(&["link", "add", &br, "type", "bridge"]);
    struct DelBridge(String);
    impl Drop for DelBridge {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
    let _guard = DelBridge(br.clone());
    ip(&["link", "set", &br, "up"]);
    let mk = |dev: &str, host: u8| {
        let opts = SmolOptions::new(
            dev,
            vec![
                cidr(&format!("10.99.9.{host}/24")),
                cidr(&format!("fd00:99::{host}/64")),
            ],
        );
        let s = SmolStack::new(format!("s{host}"), opts).unwrap();
        ip(&["link", "set", dev, "master", &br]);
        s
    };
    let a = mk(&da, 2);
    let b = mk(&db, 3);
    for family in [Family::V4, Family::V6] {
        let (ip_b, any): (IpAddr, IpAddr) = match family {
            Family::V4 => (v4(9, 3), IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            Family::V6 => ("fd00:99::3".parse().unwrap(), "::".parse().unwrap()),
        };
        let l = b.socket(family, SockKind::Stream).unwrap();
        l.bind(SocketAddr::new(any, 5000)).unwrap();
        l.listen(4).unwrap();
        let server = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let got = recv_stream(|buf| s.recv(buf, 0));
            s.send_all(&got.0.to_le_bytes(), 0).unwrap();
            s.close().unwrap();
            got
        });
        let c = a.socket(family, SockKind::Stream).unwrap();
        c.set_timeout(Some(Duration::from_secs(10))).unwrap();
        c.connect(SocketAddr::new(ip_b, 5000)).unwrap();
        // 100 MB over IPv4; IPv6 repeats the path with less data.
        let size = if family == Family::V4 {
            100 * MB
        } else {
            20 * MB
        };
        let sent = send_stream(|buf| c.send_all(buf, 0), size, 13);
        c.shutdown(Shutdown::Write).unwrap();
        let mut echo = [0u8; 8];
        let mut n = 0;
        while n < 8 {
            let k = c.recv(&mut echo[n..], 0).unwrap();
            assert!(k > 0);
            n += k;
        }
        assert_eq!(c.recv(&mut echo, 0).unwrap(), 0);
        let got = server.join().unwrap();
        assert_eq!((got.0, got.1), (sent.0, sent.1));
        assert_eq!(u64::from_le_bytes(echo), sent.0);
    }
}

#[test]
#[ignore = "needs root: TAP devices"]
fn udp_with_a_kernel_peer() {
    let (stack, _dev) = setup("k", 10);
    let k = std::net::UdpSocket::bind(SocketAddr::new(v4(10, 1), 0)).unwrap();
    k.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let kaddr = k.local_addr().unwrap();
    let u = stack.socket(Family::V4, SockKind::Dgram).unwrap();
    assert!(u.readiness().writable);
    // send without a peer: EDESTADDRREQ; send_to binds implicitly.
    let e = u.send(b"x", 0).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EDESTADDRREQ));
    assert_eq!(u.send_to(b"ping", 0, kaddr).unwrap(), 4);
    let mut b = [0u8; 64];
    let (n, from) = k.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"ping");
    assert_eq!(from.ip(), v4(10, 2));
    assert_eq!(u.local_addr().unwrap().port(), from.port());
    // Replies, one truncated.
    k.send_to(b"pong", from).unwrap();
    k.send_to(b"0123456789", from).unwrap();
    u.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let (n, src) = u.recv_from(&mut b, 0).unwrap();
    assert_eq!((&b[..n], src), (&b"pong"[..], Some(kaddr)));
    let mut small = [0u8; 4];
    assert_eq!(u.recv(&mut small, 0).unwrap(), 4);
    assert_eq!(&small, b"0123");
    // Non-blocking: EAGAIN; too large: EMSGSIZE.
    let e = u.recv(&mut b, libc::MSG_DONTWAIT).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EAGAIN));
    let e = u.send_to(&vec![0u8; 2000], 0, kaddr).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EMSGSIZE));
    // Connected: default peer, others dropped.
    u.connect(kaddr).unwrap();
    assert_eq!(u.peer_addr().unwrap(), kaddr);
    let other = std::net::UdpSocket::bind(SocketAddr::new(v4(10, 1), 0)).unwrap();
    other.send_to(b"noise", from).unwrap();
    k.send_to(b"real", from).unwrap();
    let n = u.recv(&mut b, 0).unwrap();
    assert_eq!(&b[..n], b"real");
    for i in 0..100u32 {
        u.send(&i.to_le_bytes(), 0).unwrap();
    }
    let mut seen = 0;
    while let Ok(n) = k.recv(&mut b) {
        assert_eq!(n, 4);
        seen += 1;
        if seen == 100 {
            break;
        }
    }
    assert_eq!(seen, 100);
    u.close().unwrap();
}

#[test]
#[ignore = "needs root: TAP devices"]
fn nonblocking_connect_refused_shows_in_so_error() {
    let (stack, _dev) = setup("l", 11);
    let s = stack.socket(Family::V4, SockKind::Stream).unwrap();
    s.set_timeout(Some(Duration::ZERO)).unwrap();
    let e = s.connect(SocketAddr::new(v4(11, 1), 9)).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EINPROGRESS));
    let t0 = Instant::now();
    while !s.readiness().error {
        assert!(t0.elapsed() < Duration::from_secs(5));
        thread::sleep(Duration::from_millis(1));
    }
    let r = s.readiness();
    assert!(r.readable && r.writable);
    let err = s.get_option(libc::SOL_SOCKET, libc::SO_ERROR, 4).unwrap();
    assert_eq!(err, libc::ECONNREFUSED.to_ne_bytes());
    // Consumed: the next read says 0.
    let err = s.get_option(libc::SOL_SOCKET, libc::SO_ERROR, 4).unwrap();
    assert_eq!(err, 0i32.to_ne_bytes());
}

extern "C" fn on_sigusr1(_: libc::c_int) {}

#[test]
#[ignore = "needs root: TAP devices"]
fn a_signal_interrupts_a_blocked_recv_with_eintr() {
    let (stack, _dev) = setup("m", 12);
    let (l, addr) = smol_listener(&stack, 12, 4);
    let k = thread::spawn(move || TcpStream::connect(addr).unwrap());
    let (s, _) = l.accept().unwrap();
    let _k = k.join().unwrap();
    // A handler without SA_RESTART, as CPython installs them.
    // SAFETY: the handler does nothing; sa is fully initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    let s: Arc<Sock> = Arc::new(s);
    let s2 = Arc::clone(&s);
    let (tx, rx) = std::sync::mpsc::channel();
    let blocked = thread::spawn(move || {
        // SAFETY: pthread_self has no preconditions.
        tx.send(unsafe { libc::pthread_self() }).unwrap();
        let mut b = [0u8; 8];
        s2.recv(&mut b, 0)
    });
    let tid = rx.recv().unwrap();
    thread::sleep(Duration::from_millis(200));
    // SAFETY: tid is a live thread (it is blocked in recv).
    unsafe { libc::pthread_kill(tid, libc::SIGUSR1) };
    let e = blocked.join().unwrap().unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Interrupted, "{e}");
}

#[test]
#[ignore = "needs root: TAP devices"]
fn jumbo_mtu_with_a_kernel_peer() {
    let dev = dev_name("n");
    let mut opts = SmolOptions::new(&dev, vec![cidr("10.99.13.2/24")]);
    opts.mtu = 9000;
    let stack = SmolStack::new("jumbo", opts).unwrap();
    ip(&["addr", "add", "10.99.13.1/24", "dev", &dev]);
    let l = TcpListener::bind(SocketAddr::new(v4(13, 1), 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        recv_stream(|b| c.read(b))
    });
    let s = stack.socket(Family::V4, SockKind::Stream).unwrap();
    s.connect(addr).unwrap();
    let sent = send_stream(|b| s.send_all(b, 0), 32 * MB, 21);
    s.close().unwrap();
    let got = server.join().unwrap();
    assert_eq!((got.0, got.1), (sent.0, sent.1));
    let c = stack.counters();
    let frames = c
        .iter()
        .find(|(k, _)| *k == "packets_sent")
        .map(|(_, v)| *v);
    // Jumbo frames: far fewer than 32 MiB / 1460.
    assert!(
        frames.unwrap_or(u64::MAX) < (32 * MB / 4000) as u64,
        "{c:?}"
    );
}

#[test]
#[ignore = "needs root: TAP devices"]
fn a_full_accept_queue_holds_clients_back_instead_of_refusing() {
    const CLIENTS: usize = 6;
    let (stack, _dev) = setup("o", 14);
    let (l, addr) = smol_listener(&stack, 14, 2);
    let get = |k: &str| {
        let c = stack.counters();
        c.iter().find(|(n, _)| *n == k).map(|(_, v)| *v).unwrap()
    };
    // Two fill the queue; the SYNs of the rest are dropped (and
    // retransmitted by their kernel) until the application accepts.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            thread::spawn(move || {
                let t0 = Instant::now();
                let c = TcpStream::connect_timeout(&addr, Duration::from_secs(10));
                (c.map(|_| ()), t0.elapsed())
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    assert!(get("syn_dropped") > 0);
    assert_eq!(get("accepted"), 2);
    // While clients are held back, the stack is at rest: a held-back
    // handshake must not keep the driver turning (a spin holds the lock
    // that `accept` needs). A few turns for delayed ACKs, not thousands.
    let turns = get("turns");
    thread::sleep(Duration::from_millis(500));
    let spent = get("turns") - turns;
    assert!(spent < 100, "{spent} turns while at rest");
    let mut accepted = Vec::new();
    l.set_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..CLIENTS {
        accepted.push(l.accept().unwrap());
    }
    for c in clients {
        let (r, took) = c.join().unwrap();
        assert!(r.is_ok(), "{r:?} after {took:?}");
    }
}

#[test]
#[ignore = "needs root: TAP devices"]
fn close_with_unread_data_resets_and_shutdown_read_gives_eof() {
    let (stack, _dev) = setup("p", 15);
    let (l, addr) = smol_listener(&stack, 15, 4);
    let k = thread::spawn(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"unread").unwrap();
        c
    });
    let (s, _) = l.accept().unwrap();
    let mut kc = k.join().unwrap();
    let t0 = Instant::now();
    while !s.readiness().readable {
        assert!(t0.elapsed() < Duration::from_secs(5));
        thread::sleep(Duration::from_millis(1));
    }
    s.close().unwrap();
    kc.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 8];
    let e = kc.read(&mut b).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");

    // SHUT_RD: recv returns 0 at once, sending still works.
    let k = thread::spawn(move || TcpStream::connect(addr).unwrap());
    let (s, _) = l.accept().unwrap();
    let mut kc = k.join().unwrap();
    s.shutdown(Shutdown::Read).unwrap();
    assert_eq!(s.recv(&mut b, 0).unwrap(), 0);
    s.send_all(b"ok", 0).unwrap();
    let mut two = [0u8; 2];
    kc.read_exact(&mut two).unwrap();
    assert_eq!(&two, b"ok");
    // SHUT_WR: the peer sees EOF; send fails with EPIPE.
    s.shutdown(Shutdown::Write).unwrap();
    kc.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(kc.read(&mut b).unwrap(), 0);
    let e = s.send(b"x", 0).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EPIPE));
}

#[test]
#[ignore = "needs root: TAP devices"]
fn wildcard_listeners_and_the_other_family() {
    let dev = dev_name("q");
    let opts = SmolOptions::new(&dev, vec![cidr("10.99.16.2/24"), cidr("fd00:99:16::2/64")]);
    let stack = SmolStack::new("dual", opts).unwrap();
    ip(&["addr", "add", "10.99.16.1/24", "dev", &dev]);
    ip(&[
        "-6",
        "addr",
        "add",
        "fd00:99:16::1/64",
        "dev",
        &dev,
        "nodad",
    ]);
    // An IPv6 listener on "::" takes an IPv4 client with v4-mapped addresses.
    let l6 = stack.socket(Family::V6, SockKind::Stream).unwrap();
    l6.bind("[::]:7000".parse().unwrap()).unwrap();
    l6.listen(4).unwrap();
    let k = thread::spawn(|| TcpStream::connect("10.99.16.2:7000").unwrap());
    l6.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let (_s, peer) = l6.accept().unwrap();
    let _k = k.join().unwrap();
    assert_eq!(peer.ip(), "::ffff:10.99.16.1".parse::<IpAddr>().unwrap());
    l6.close().unwrap();
    // An IPv4 listener on 0.0.0.0 refuses an IPv6 client.
    let l4 = stack.socket(Family::V4, SockKind::Stream).unwrap();
    l4.bind("0.0.0.0:7001".parse().unwrap()).unwrap();
    l4.listen(4).unwrap();
    let r = TcpStream::connect_timeout(
        &"[fd00:99:16::2]:7001".parse().unwrap(),
        Duration::from_secs(5),
    );
    let e = r.expect_err("refused");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    // An IPv6 client reaches an IPv6 listener.
    let l6 = stack.socket(Family::V6, SockKind::Stream).unwrap();
    l6.bind("[fd00:99:16::2]:7002".parse().unwrap()).unwrap();
    l6.listen(4).unwrap();
    let k = thread::spawn(|| TcpStream::connect("[fd00:99:16::2]:7002").unwrap());
    l6.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let (_s, peer) = l6.accept().unwrap();
    let _k = k.join().unwrap();
    assert_eq!(peer.ip(), "fd00:99:16::1".parse::<IpAddr>().unwrap());
}
