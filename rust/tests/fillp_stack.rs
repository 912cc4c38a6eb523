//! The FillP stack through the plug-in traits (`Stack`, `StackSocket`), on
//! real UDP over 127.0.0.1.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dmm::stack::fillp::{FillpOptions, FillpStack};
use dmm::stack::{Family, SockKind, Stack, StackSocket};

mod common;

type Sock = Box<dyn StackSocket>;

fn stack() -> Arc<FillpStack> {
    stack_with(FillpOptions::default())
}

fn stack_with(opts: FillpOptions) -> Arc<FillpStack> {
    Arc::new(FillpStack::new("fillp-test", opts).expect("stack"))
}

fn lo(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

fn listener(stack: &dyn Stack, backlog: i32) -> (Sock, SocketAddr) {
    listener_on(stack, backlog, lo(0))
}

fn listener_on(stack: &dyn Stack, backlog: i32, at: SocketAddr) -> (Sock, SocketAddr) {
    let l = stack.socket(Family::of(&at), SockKind::Stream).unwrap();
    l.bind(at).unwrap();
    l.listen(backlog).unwrap();
    let addr = l.local_addr().unwrap();
    assert_ne!(addr.port(), 0);
    (l, addr)
}

/// A connected (client, server) pair; the two may be on different stacks.
fn pair(client_stack: &dyn Stack, server_stack: &dyn Stack) -> (Sock, Sock) {
    pair_on(client_stack, server_stack, lo(0))
}

/// A connected pair through a listener bound to `at`.
fn pair_on(client_stack: &dyn Stack, server_stack: &dyn Stack, at: SocketAddr) -> (Sock, Sock) {
    let (l, addr) = listener_on(server_stack, 8, at);
    let c = client_stack
        .socket(Family::of(&addr), SockKind::Stream)
        .unwrap();
    c.connect(addr).unwrap();
    let (s, peer) = l.accept().unwrap();
    assert_eq!(peer, c.local_addr().unwrap());
    (c, s)
}

fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

/// Deterministic test data.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn recv_to_eof(s: &dyn StackSocket) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = s.recv(&mut buf, 0).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Polls `fd` for readability for at most `ms`.
fn fd_readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: p is valid for the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0 && p.revents & libc::POLLIN != 0
}

#[test]
fn listen_accept_connect() {
    let st = stack();
    assert!(st.supports(Family::V4, SockKind::Stream));
    assert!(!st.supports(Family::V4, SockKind::Dgram));
    let (c, s) = pair(&*st, &*st);
    assert_eq!(c.peer_addr().unwrap(), s.local_addr().unwrap());
    assert_eq!(s.peer_addr().unwrap(), c.local_addr().unwrap());
    c.send_all(b"hello", 0).unwrap();
    let mut buf = [0u8; 16];
    let n = s.recv(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"hello");
    // send_to on a connected stream ignores the address; recv_from names the peer.
    s.send_to(b"back", 0, lo(1)).unwrap();
    let (n, from) = c.recv_from(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"back");
    assert_eq!(from, Some(s.local_addr().unwrap()));
    assert!(st
        .counters()
        .iter()
        .any(|(k, v)| *k == "accepted" && *v == 1));
    assert!(c
        .counters()
        .iter()
        .any(|(k, v)| *k == "bytes_sent" && *v > 0));
}

#[test]
fn bind_in_use_and_options() {
    let st = stack();
    let (_l, addr) = listener(&*st, 4);
    let other = st.socket(Family::V4, SockKind::Stream).unwrap();
    let e = other.bind(addr).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EADDRINUSE));
    let s = st.socket(Family::V4, SockKind::Stream).unwrap();
    let ty = s.get_option(libc::SOL_SOCKET, libc::SO_TYPE, 4).unwrap();
    assert_eq!(
        i32::from_ne_bytes(ty[..4].try_into().unwrap()),
        libc::SOCK_STREAM
    );
    s.set_option(libc::IPPROTO_TCP, libc::TCP_NODELAY, &1i32.to_ne_bytes())
        .unwrap();
    s.set_option(
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        &(1i32 << 20).to_ne_bytes(),
    )
    .unwrap();
    let e = s
        .set_option(libc::IPPROTO_IP, libc::IP_TTL, &1i32.to_ne_bytes())
        .unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::ENOPROTOOPT));
    let e = s.peer_addr().unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::ENOTCONN));
    let e = s.send(b"x", 0).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::ENOTCONN));
}

/// Sends `len` bytes each way at once over one connection of `st` and
/// checks every byte.
fn transfer_each_way(st: &dyn Stack, len: usize) {
    transfer_each_way_on(st, len, lo(0));
}

/// [`transfer_each_way`] through a listener bound to `at`.
fn transfer_each_way_on(st: &dyn Stack, len: usize, at: SocketAddr) {
    let (c, s) = pair_on(st, st, at);
    let (c, s): (Arc<Sock>, Arc<Sock>) = (Arc::new(c), Arc::new(s));
    let up = pattern(len, 1);
    let down = pattern(len, 2);
    let (up_sum, down_sum) = (checksum(&up), checksum(&down));
    let t0 = Instant::now();
    let writers = [(Arc::clone(&c), up), (Arc::clone(&s), down)].map(|(sock, data)| {
        thread::spawn(move || {
            sock.send_all(&data, 0).unwrap();
            sock.shutdown(Shutdown::Write).unwrap();
        })
    });
    let readers =
        [Arc::clone(&s), Arc::clone(&c)].map(|sock| thread::spawn(move || recv_to_eof(&**sock)));
    for w in writers {
        w.join().unwrap();
    }
    let [got_up, got_down] = readers.map(|r| r.join().unwrap());
    eprintln!("2 x {len} bytes in {:?}", t0.elapsed());
    assert_eq!(got_up.len(), len);
    assert_eq!(got_down.len(), len);
    assert_eq!(checksum(&got_up), up_sum);
    assert_eq!(checksum(&got_down), down_sum);
}

/// The stack-wide counter `name`.
fn counter(st: &dyn Stack, name: &str) -> u64 {
    find(&st.counters(), name)
}

/// The socket's counter `name`.
fn counter_of(s: &dyn StackSocket, name: &str) -> u64 {
    find(&s.counters(), name)
}

fn find(counters: &[(&'static str, u64)], name: &str) -> u64 {
    counters
        .iter()
        .find(|(k, _)| *k == name)
        .map_or(0, |(_, v)| *v)
}

#[test]
fn transfer_16mib_each_way() {
    // UDP GSO and GRO on (the default).
    let st = stack();
    transfer_each_way(&*st, 16 << 20);
    assert_eq!(counter(&*st, "gso_disabled"), 0);
}

#[test]
fn transfer_over_ipv6_with_offload() {
    let st = stack();
    let at = SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 0);
    transfer_each_way_on(&*st, 4 << 20, at);
    assert_eq!(counter(&*st, "gso_disabled"), 0);
}

#[test]
fn transfer_without_offload() {
    let st = stack_with(FillpOptions {
        offload: false,
        ..FillpOptions::default()
    });
    transfer_each_way(&*st, 4 << 20);
}

/// Runs `f` in a network namespace of a thread's own whose loopback has
/// MTU 1280 (needs CAP_NET_ADMIN).
fn on_loopback_of_mtu_1280(f: impl FnOnce() + Send + 'static) {
    common::require_net_admin();
    let t = thread::spawn(|| {
        // SAFETY: unshare affects only this thread (and what it starts).
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "mtu", "1280", "up"])
            .status();
        assert!(
            up.as_ref().is_ok_and(|s| s.success()),
            "ip link set lo: {up:?}"
        );
        f();
    });
    t.join().unwrap();
}

/// A path that refuses GSO turns it off for that socket and resends the
/// refused datagrams one by one: nothing is lost. The path: loopback with
/// a 1280-byte MTU, where 1400-byte segments (a size fixed by
/// configuration, not taken from the route) fail with EMSGSIZE; the
/// datagrams alone are fragmented and pass.
#[test]
#[ignore = "needs root: a network namespace"]
fn gso_refused_falls_back_without_loss() {
    on_loopback_of_mtu_1280(|| {
        let st = stack_with(FillpOptions {
            path_mtu: false,
            ..FillpOptions::default()
        });
        transfer_each_way(&*st, 2 << 20);
        assert!(counter(&*st, "gso_disabled") >= 1, "{:?}", st.counters());
        assert_eq!(counter(&*st, "udp_send_errors"), 0);
    });
}

/// Sized from the route, the same path gets 1252-byte datagrams (1280 less
/// the IP and UDP headers): no fragments, and GSO stays on.
#[test]
#[ignore = "needs root: a network namespace"]
fn datagrams_sized_from_a_small_route_fit_it() {
    on_loopback_of_mtu_1280(|| {
        let st = stack();
        let (c, s) = pair(&*st, &*st);
        c.send_all(&[7u8; 300_000], 0).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(recv_to_eof(&*s).len(), 300_000);
        assert_eq!(counter_of(&*c, "mtu"), 1252);
        assert_eq!(counter_of(&*s, "mtu"), 1252);
        assert_eq!(counter(&*st, "gso_disabled"), 0, "{:?}", st.counters());
    });
}

#[test]
fn eof_after_shutdown_write() {
    let st = stack();
    let (c, s) = pair(&*st, &*st);
    c.send_all(b"last words", 0).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(recv_to_eof(&*s), b"last words");
    let mut buf = [0u8; 4];
    assert_eq!(s.recv(&mut buf, 0).unwrap(), 0);
    // Writing after our own shutdown is EPIPE; the other direction still works.
    assert_eq!(errno_of(&c.send(b"x", 0).unwrap_err()), Some(libc::EPIPE));
    s.send_all(b"reply", 0).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(recv_to_eof(&*c), b"reply");
}

#[test]
fn recv_timeout() {
    let st = stack();
    let (c, _s) = pair(&*st, &*st);
    c.set_timeout(Some(Duration::from_millis(200))).unwrap();
    assert_eq!(c.timeout(), Some(Duration::from_millis(200)));
    let t0 = Instant::now();
    let e = c.recv(&mut [0u8; 8], 0).unwrap_err();
    let took = t0.elapsed();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert_eq!(e.raw_os_error(), None);
    assert!(took >= Duration::from_millis(190), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn nonblocking_connect_and_recv() {
    let st = stack();
    let (l, addr) = listener(&*st, 4);
    let c = st.socket(Family::V4, SockKind::Stream).unwrap();
    c.set_timeout(Some(Duration::ZERO)).unwrap();
    let e = c.connect(addr).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EINPROGRESS));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.readiness().writable {
        assert!(Instant::now() < deadline, "connect never completed");
        thread::sleep(Duration::from_millis(2));
    }
    let err = c.get_option(libc::SOL_SOCKET, libc::SO_ERROR, 4).unwrap();
    assert_eq!(i32::from_ne_bytes(err[..4].try_into().unwrap()), 0);
    assert_eq!(errno_of(&c.connect(addr).unwrap_err()), Some(libc::EISCONN));
    let e = c.recv(&mut [0u8; 8], 0).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert_eq!(errno_of(&e), Some(libc::EAGAIN));
    // Non-blocking accept: the connection is queued by now.
    l.set_timeout(Some(Duration::ZERO)).unwrap();
    let (s, _) = l.accept().unwrap();
    let e = l.accept().err().unwrap();
    assert_eq!(errno_of(&e), Some(libc::EAGAIN));
    s.send_all(b"hi", 0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 8];
    loop {
        match c.recv(&mut buf, 0) {
            Ok(n) => {
                assert_eq!(&buf[..n], b"hi");
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline);
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn refused_when_no_listener() {
    let st = stack();
    // A port that nobody listens on: bind a UDP socket, note it, close it.
    let port = {
        let u = std::net::UdpSocket::bind(lo(0)).unwrap();
        u.local_addr().unwrap().port()
    };
    let c = st.socket(Family::V4, SockKind::Stream).unwrap();
    let t0 = Instant::now();
    let e = c.connect(lo(port)).unwrap_err();
    assert!(
        matches!(errno_of(&e), Some(libc::ECONNREFUSED | libc::ETIMEDOUT)),
        "{e:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(11), "{:?}", t0.elapsed());
    eprintln!("refused after {:?}: {e}", t0.elapsed());
}

#[test]
fn poll_fd_tracks_readability() {
    let st = stack();
    let (c, s) = pair(&*st, &*st);
    let fd = s.poll_fd();
    assert!(fd >= 0);
    assert!(!fd_readable(fd, 0));
    assert!(!s.readiness().readable);
    c.send_all(&[7u8; 10_000], 0).unwrap();
    assert!(fd_readable(fd, 5000), "poll_fd never became readable");
    assert!(s.readiness().readable);
    let mut got = 0;
    let mut buf = [0u8; 4096];
    while got < 10_000 {
        got += s.recv(&mut buf, 0).unwrap();
    }
    assert!(!fd_readable(fd, 0), "poll_fd still readable after draining");
    assert!(!s.readiness().readable);
    assert!(s.readiness().writable);
    // EOF makes it readable again.
    c.shutdown(Shutdown::Write).unwrap();
    assert!(fd_readable(fd, 5000));
    assert_eq!(s.recv(&mut buf, 0).unwrap(), 0);
    // The listener's fd is readable while a connection waits.
    let (l, addr) = listener(&*st, 4);
    assert!(!fd_readable(l.poll_fd(), 0));
    let c2 = st.socket(Family::V4, SockKind::Stream).unwrap();
    c2.connect(addr).unwrap();
    assert!(fd_readable(l.poll_fd(), 5000));
    let _ = l.accept().unwrap();
    assert!(!fd_readable(l.poll_fd(), 0));
}

#[test]
fn many_concurrent_connections() {
    const N: usize = 200;
    let st = stack();
    let (l, addr) = listener(&*st, N as i32);
    let clients: Vec<thread::JoinHandle<()>> = (0..N)
        .map(|i| {
            let st = Arc::clone(&st);
            thread::spawn(move || {
                let c = st.socket(Family::V4, SockKind::Stream).unwrap();
                c.connect(addr).unwrap();
                let msg = format!("client {i}");
                c.send_all(msg.as_bytes(), 0).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                assert_eq!(recv_to_eof(&*c), msg.as_bytes());
            })
        })
        .collect();
    let mut servers = Vec::new();
    for _ in 0..N {
        let (s, _) = l.accept().unwrap();
        servers.push(thread::spawn(move || {
            let got = recv_to_eof(&*s);
            s.send_all(&got, 0).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            assert!(got.starts_with(b"client "));
        }));
    }
    for t in clients.into_iter().chain(servers) {
        t.join().unwrap();
    }
}

/// A blocking call ran out of the socket's timeout (as opposed to failing).
fn is_socket_timeout(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut && e.raw_os_error().is_none()
}

/// Sends until an error, returning it (or panics after `limit`).
fn send_until_error(c: &dyn StackSocket, limit: Duration) -> io::Error {
    let chunk = vec![1u8; 64 << 10];
    let t0 = Instant::now();
    c.set_timeout(Some(Duration::from_millis(200))).unwrap();
    loop {
        match c.send(&chunk, 0) {
            Ok(_) => {}
            // The socket's own timeout (no errno), not ETIMEDOUT from a
            // connection that timed out, which is also `TimedOut`.
            Err(e) if is_socket_timeout(&e) => {}
            Err(e) => return e,
        }
        assert!(t0.elapsed() < limit, "no error after {limit:?}");
    }
}

#[test]
fn peer_socket_dropped_mid_transfer() {
    let st = stack();
    let (c, s) = pair(&*st, &*st);
    c.send_all(&[0u8; 100_000], 0).unwrap();
    assert!(fd_readable(s.poll_fd(), 5000));
    drop(s); // unread data: an abort (RST)
    let e = send_until_error(&*c, Duration::from_secs(10));
    assert_eq!(errno_of(&e), Some(libc::ECONNRESET), "{e:?}");
}

#[test]
fn peer_stack_dropped_mid_transfer() {
    let mut opts = FillpOptions::default();
    opts.connection.keepalive = Duration::from_millis(500);
    opts.connection.idle_timeout = Duration::from_secs(3);
    let a = stack_with(opts.clone());
    let b = stack_with(opts);
    let (c, s) = pair(&*a, &*b);
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        // Reads until the stack goes away under it.
        while let Ok(n) = s.recv(&mut buf, 0) {
            if n == 0 {
                break;
            }
        }
        s
    });
    c.send_all(&[0u8; 1 << 20], 0).unwrap();
    drop(b); // the whole peer instance: its UDP port closes
    let t0 = Instant::now();
    let e = send_until_error(&*c, Duration::from_secs(10));
    eprintln!("survivor error after {:?}: {e}", t0.elapsed());
    assert!(
        matches!(
            errno_of(&e),
            Some(libc::ECONNRESET | libc::ETIMEDOUT | libc::ECONNREFUSED)
        ),
        "{e:?}"
    );
    let s = reader.join().unwrap();
    assert_eq!(
        errno_of(&s.recv(&mut [0u8; 4], 0).unwrap_err()),
        Some(libc::ENETDOWN)
    );
}

/// A UDP relay between one client and `server` that can be cut: it then
/// drops everything but keeps its port open, so no ICMP error tells anyone
/// (a peer host that died, a path that went away).
struct Relay {
    addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Relay {
    fn new(server: SocketAddr) -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering};
        let sock = std::net::UdpSocket::bind(lo(0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, s2) = (cut.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut client = None;
            while !s2.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if c2.load(Ordering::Relaxed) {
                    continue;
                }
                let to = if from == server {
                    client
                } else {
                    client = Some(from);
                    Some(server)
                };
                if let Some(to) = to {
                    let _ = sock.send_to(&buf[..n], to);
                }
            }
        });
        Relay {
            addr,
            cut,
            stop,
            thread: Some(thread),
        }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `f` on a thread and fails the test if it takes longer than
/// `limit`, instead of hanging.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|e| panic!("not done within {limit:?}: {e}"))
}

/// The documented bound: a connection that hears nothing for
/// `idle_timeout` closes (keepalives notwithstanding) and its socket
/// reports `ETIMEDOUT`. Mid-transfer, the path is cut silently (no ICMP);
/// both survivors, the sender and the reader, must fail within the bound,
/// and not much before it.
#[test]
fn silent_peer_mid_transfer_times_out_within_the_idle_bound() {
    const IDLE: Duration = Duration::from_secs(2);
    // Detection is timer-driven: the driver wakes at the core's deadline,
    // and the test's own calls poll every 200 ms.
    const SLACK: Duration = Duration::from_millis(1000);
    within(Duration::from_secs(30), || {
        let mut opts = FillpOptions::default();
        opts.connection.keepalive = Duration::from_millis(300);
        opts.connection.idle_timeout = IDLE;
        let a = stack_with(opts.clone());
        let b = stack_with(opts);
        let (l, addr) = listener(&*b, 8);
        let relay = Relay::new(addr);
        let c = a.socket(Family::V4, SockKind::Stream).unwrap();
        c.set_timeout(Some(Duration::from_secs(5))).unwrap();
        c.connect(relay.addr).unwrap();
        let (s, _) = l.accept().unwrap();
        // The reader reads until an error, and says when it got it.
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let read2 = read.clone();
        let reader = thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            s.set_timeout(Some(Duration::from_millis(200))).unwrap();
            let t0 = Instant::now();
            let mut got = 0usize;
            loop {
                match s.recv(&mut buf, 0) {
                    Ok(0) => return (Err(None), got),
                    Ok(n) => {
                        got += n;
                        read2.store(got, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) if is_socket_timeout(&e) => {}
                    Err(e) => return (Ok((Instant::now(), errno_of(&e))), got),
                }
                if t0.elapsed() > Duration::from_secs(20) {
                    return (Err(Some(t0.elapsed())), got);
                }
            }
        });
        // Mid-transfer: 4 MiB queued, the path goes silent once 256 KiB
        // have been read.
        c.send_all(&vec![5u8; 4 << 20], 0).unwrap();
        let t = Instant::now();
        while read.load(std::sync::atomic::Ordering::Relaxed) < 256 << 10 {
            assert!(t.elapsed() < Duration::from_secs(10), "transfer stalled");
            thread::sleep(Duration::from_millis(1));
        }
        relay.cut();
        let cut_at = Instant::now();
        let e = send_until_error(&*c, Duration::from_secs(15));
        let sender_after = cut_at.elapsed();
        let (res, got) = reader.join().unwrap();
        let (reader_at, reader_errno) = res.unwrap_or_else(|r| panic!("reader: {r:?}"));
        let reader_after = reader_at.saturating_duration_since(cut_at);
        eprintln!(
            "cut after {got} bytes read; sender failed after {sender_after:?} ({e}), \
             reader after {reader_after:?}"
        );
        assert_eq!(errno_of(&e), Some(libc::ETIMEDOUT), "{e:?}");
        assert_eq!(reader_errno, Some(libc::ETIMEDOUT));
        for after in [sender_after, reader_after] {
            // The last datagram heard came at most a few ms before the cut.
            assert!(after >= IDLE - Duration::from_millis(200), "{after:?}");
            assert!(after <= IDLE + SLACK, "{after:?}");
        }
    });
}

#[test]
fn closed_socket_is_ebadf() {
    let st = stack();
    let (c, _s) = pair(&*st, &*st);
    c.close().unwrap();
    c.close().unwrap();
    assert_eq!(errno_of(&c.send(b"x", 0).unwrap_err()), Some(libc::EBADF));
    assert_eq!(
        errno_of(&c.recv(&mut [0u8; 4], 0).unwrap_err()),
        Some(libc::EBADF)
    );
    assert_eq!(errno_of(&c.local_addr().unwrap_err()), Some(libc::EBADF));
    assert_eq!(
        errno_of(&c.set_timeout(None).unwrap_err()),
        Some(libc::EBADF)
    );
}

#[test]
fn graceful_close_delivers_everything() {
    let st = stack();
    let (c, s) = pair(&*st, &*st);
    let data = pattern(1 << 20, 9);
    c.send_all(&data, 0).unwrap();
    c.close().unwrap();
    let got = recv_to_eof(&*s);
    assert_eq!(checksum(&got), checksum(&data));
}

#[test]
fn connects_beyond_the_backlog_wait_in_the_accept_queue() {
    let st = stack();
    let (l, addr) = listener(&*st, 4);
    // More clients than the backlog connect before anyone accepts (as with
    // kernel TCP, their connects complete).
    let clients: Vec<Sock> = (0..50)
        .map(|_| {
            let c = st.socket(Family::V4, SockKind::Stream).unwrap();
            c.connect(addr).unwrap();
            c
        })
        .collect();
    for _ in 0..clients.len() {
        let (s, peer) = l.accept().unwrap();
        assert!(clients.iter().any(|c| c.local_addr().unwrap() == peer));
        drop(s);
    }
    assert!(!fd_readable(l.poll_fd(), 0));
}

/// A listener bound to the wildcard answers from the address the client
/// wrote to (IP_PKTINFO), not from whatever routing picks: a client of
/// 127.0.0.3 gets its replies from 127.0.0.3 although 127.0.0.1 would be
/// the routed source.
#[test]
fn wildcard_listener_replies_from_the_address_written_to() {
    let server = stack();
    let client = stack();
    let l = server.socket(Family::V4, SockKind::Stream).expect("socket");
    l.bind("0.0.0.0:0".parse().unwrap()).expect("bind");
    l.listen(8).expect("listen");
    let port = l.local_addr().expect("addr").port();
    let c = client.socket(Family::V4, SockKind::Stream).expect("socket");
    c.set_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.connect(SocketAddr::from(([127, 0, 0, 3], port)))
        .expect("connect via 127.0.0.3");
    let (a, _) = l.accept().expect("accept");
    c.send_all(b"ping", 0).expect("send");
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        got += a.recv(&mut buf[got..], 0).expect("recv");
    }
    assert_eq!(&buf, b"ping");
    assert_eq!(c.peer_addr().expect("peer").ip().to_string(), "127.0.0.3");
}

/// `SO_LINGER` {on, 0 s}: close aborts, the peer reads a reset, and the
/// client's UDP socket and connection are gone at once instead of lingering
/// for the idle timeout (a client opening and closing connections piled up
/// thousands, and every driver wake walked them).
#[test]
fn zero_linger_close_resets_and_frees_the_socket() {
    let (client, server) = (stack(), stack());
    let (l, addr) = listener(&*server, 64);
    let linger = [1i32.to_ne_bytes(), 0i32.to_ne_bytes()].concat();
    let mut accepted = Vec::new();
    for _ in 0..20 {
        let c = client.socket(Family::V4, SockKind::Stream).unwrap();
        c.set_option(libc::SOL_SOCKET, libc::SO_LINGER, &linger)
            .unwrap();
        assert_eq!(
            c.get_option(libc::SOL_SOCKET, libc::SO_LINGER, 8).unwrap(),
            linger
        );
        c.connect(addr).unwrap();
        accepted.push(l.accept().unwrap().0);
        c.close().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while counter(&*client, "udp_sockets") + counter(&*client, "connections") > 0 {
        assert!(
            Instant::now() < deadline,
            "{} UDP sockets, {} connections left",
            counter(&*client, "udp_sockets"),
            counter(&*client, "connections")
        );
        thread::sleep(Duration::from_millis(10));
    }
    for s in &accepted {
        s.set_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 8];
        let e = s.recv(&mut buf, 0).unwrap_err();
        assert_eq!(errno_of(&e), Some(libc::ECONNRESET), "{e}");
    }
}

fn int_opt(s: &dyn StackSocket, level: i32, name: i32) -> i32 {
    let raw = s.get_option(level, name, 4).unwrap();
    i32::from_ne_bytes(raw[..4].try_into().unwrap())
}

#[test]
fn msg_peek_leaves_the_bytes_for_the_next_recv() {
    let st = stack();
    let (c, s) = pair(&*st, &*st);
    c.send_all(b"hello world", 0).unwrap();
    let mut buf = [0u8; 5];
    // Peeked twice, the same bytes; then read once.
    for _ in 0..2 {
        let n = s.recv(&mut buf, libc::MSG_PEEK).unwrap();
        assert_eq!(&buf[..n], &b"hello world"[..n]);
    }
    let mut all = Vec::new();
    while all.len() < 11 {
        let mut b = [0u8; 64];
        let n = s.recv(&mut b, 0).unwrap();
        all.extend_from_slice(&b[..n]);
    }
    assert_eq!(all, b"hello world");
    s.set_timeout(Some(Duration::ZERO)).unwrap();
    let e = s.recv(&mut buf, libc::MSG_PEEK).unwrap_err();
    assert_eq!(errno_of(&e), Some(libc::EAGAIN));
    // At the end of the stream a peek sees it too.
    c.shutdown(Shutdown::Write).unwrap();
    s.set_timeout(None).unwrap();
    assert_eq!(s.recv(&mut buf, libc::MSG_PEEK).unwrap(), 0);
    assert_eq!(s.recv(&mut buf, 0).unwrap(), 0);
}

#[test]
fn so_reuseport_lets_two_listeners_share_a_port_as_in_tcp() {
    let st = stack();
    let on = 1i32.to_ne_bytes();
    let a = st.socket(Family::V4, SockKind::Stream).unwrap();
    assert_eq!(int_opt(&*a, libc::SOL_SOCKET, libc::SO_REUSEPORT), 0);
    a.set_option(libc::SOL_SOCKET, libc::SO_REUSEPORT, &on)
        .unwrap();
    assert_eq!(int_opt(&*a, libc::SOL_SOCKET, libc::SO_REUSEPORT), 1);
    a.bind(lo(0)).unwrap();
    a.listen(8).unwrap();
    let addr = a.local_addr().unwrap();
    // Without the option the port is taken; with it on both, shared.
    let plain = st.socket(Family::V4, SockKind::Stream).unwrap();
    assert_eq!(
        errno_of(&plain.bind(addr).unwrap_err()),
        Some(libc::EADDRINUSE)
    );
    let b = st.socket(Family::V4, SockKind::Stream).unwrap();
    b.set_option(libc::SOL_SOCKET, libc::SO_REUSEPORT, &on)
        .unwrap();
    b.bind(addr).unwrap();
    b.listen(8).unwrap();
    // SO_REUSEADDR is kept for getsockopt but shares nothing (TCP's does not).
    plain
        .set_option(libc::SOL_SOCKET, libc::SO_REUSEADDR, &on)
        .unwrap();
    assert_eq!(int_opt(&*plain, libc::SOL_SOCKET, libc::SO_REUSEADDR), 1);
    assert_eq!(
        errno_of(&plain.bind(addr).unwrap_err()),
        Some(libc::EADDRINUSE)
    );
}

#[test]
fn an_ipv6_listener_takes_ipv4_clients_unless_ipv6_only() {
    let st = stack();
    let any6 = SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0);
    for v6only in [0, 1] {
        let l = st.socket(Family::V6, SockKind::Stream).unwrap();
        assert_eq!(int_opt(&*l, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY), 0);
        if v6only == 1 {
            l.set_option(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &1i32.to_ne_bytes())
                .unwrap();
        }
        l.bind(any6).unwrap();
        l.listen(4).unwrap();
        let port = l.local_addr().unwrap().port();
        let c = st.socket(Family::V4, SockKind::Stream).unwrap();
        c.set_timeout(Some(Duration::from_secs(2))).unwrap();
        let got = c.connect(lo(port));
        if v6only == 0 {
            got.unwrap();
            let (_s, peer) = l.accept().unwrap();
            // The client, as the kernel shows it: IPv4-mapped.
            assert_eq!(peer.ip().to_string(), "::ffff:127.0.0.1");
        } else {
            // No UDP socket takes the datagrams: refused (ICMP port unreachable).
            let e = got.unwrap_err();
            assert!(
                matches!(errno_of(&e), Some(libc::ECONNREFUSED | libc::ETIMEDOUT)),
                "{e}"
            );
        }
    }
}
