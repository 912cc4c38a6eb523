//! The kernel stack through the plug-in traits (`Stack`, `StackSocket`), on
//! real loopback sockets, for both I/O modes and both address families.
//!
//! Every test runs its body once per `(IoMode, Family)` pair through
//! [`each`]. An instance asked for io_uring must really get it here (these
//! machines allow io_uring); the refusal path has its own test binary,
//! `uring_fallback`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use dmm::stack::kernel::{IoMode, KernelStack, Protocol, IPPROTO_MPTCP};
use dmm::stack::{Counters, Family, SockKind, Stack, StackSocket};

const MODES: [IoMode; 2] = [IoMode::Syscall, IoMode::Uring];
const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

type Sock = Box<dyn StackSocket>;

/// A kernel instance in `io` mode, checked to really be in that mode.
fn instance(protocol: Protocol, io: IoMode) -> KernelStack {
    let stack = KernelStack::new(format!("{protocol:?}-{io:?}").to_lowercase(), protocol, io);
    assert_eq!(
        stack.io_mode(),
        io,
        "asked for {io:?}, got {:?} (io_uring refused: {:?}); is /proc/sys/kernel/io_uring_disabled set?",
        stack.io_mode(),
        stack.uring_refused()
    );
    assert_eq!(stack.uring_refused(), None);
    stack
}

/// Runs `body` for every I/O mode and address family, on a TCP instance.
fn each(body: impl Fn(&KernelStack, Family)) {
    for io in MODES {
        let stack = instance(Protocol::Tcp, io);
        for family in FAMILIES {
            eprintln!("-- {io:?} {family:?}");
            body(&stack, family);
        }
    }
}

fn loopback(family: Family) -> SocketAddr {
    let ip = match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Family::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    SocketAddr::new(ip, 0)
}

/// A listening stream socket on loopback and its address.
fn listener(stack: &dyn Stack, family: Family) -> (Sock, SocketAddr) {
    let l = stack.socket(family, SockKind::Stream).unwrap();
    l.bind(loopback(family)).unwrap();
    l.listen(16).unwrap();
    let addr = l.local_addr().unwrap();
    assert_ne!(addr.port(), 0);
    assert_eq!(addr.ip(), loopback(family).ip());
    (l, addr)
}

/// A connected `(client, server)` pair; the connect completes from the
/// listener's backlog, so one thread is enough.
fn pair(stack: &dyn Stack, family: Family) -> (Sock, Sock) {
    let (l, addr) = listener(stack, family);
    let c = stack.socket(family, SockKind::Stream).unwrap();
    c.connect(addr).unwrap();
    let (s, peer) = l.accept().unwrap();
    assert_eq!(peer, c.local_addr().unwrap());
    (c, s)
}

fn raw(err: &io::Error) -> Option<i32> {
    err.raw_os_error()
}

fn counter(counters: &Counters, name: &str) -> u64 {
    counters
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no counter {name:?} in {counters:?}"))
}

/// Deterministic, non-repeating test data (xorshift64).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a, 64 bit, fed incrementally.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Reads until EOF; returns (bytes, checksum).
fn drain(sock: &dyn StackSocket) -> (usize, u64) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    let mut sum = Fnv::new();
    loop {
        let n = sock.recv(&mut buf, 0).unwrap();
        if n == 0 {
            return (total, sum.0);
        }
        assert!(n <= buf.len());
        sum.update(&buf[..n]);
        total += n;
    }
}

/// Sends `data` from `client` in a thread (then shuts down its write side)
/// while `server` reads to EOF here; returns the client and what arrived.
fn transfer(client: Sock, server: &dyn StackSocket, data: Vec<u8>) -> (Sock, usize, u64) {
    let sender = thread::spawn(move || {
        client.send_all(&data, 0).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        client
    });
    let (n, sum) = drain(server);
    let client = sender.join().expect("sender thread panicked");
    (client, n, sum)
}

/// Polls `cond` until it holds, for at most 5 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// How many io_uring instances this process has open.
fn uring_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy() == "anon_inode:[io_uring]")
        .count()
}

const BIG: usize = 8 << 20;

#[test]
fn transfer_8_mib_with_checksum_then_eof() {
    each(|stack, family| {
        let (l, addr) = listener(stack, family);
        let c = stack.socket(family, SockKind::Stream).unwrap();
        c.connect(addr).unwrap();
        let (s, peer) = l.accept().unwrap();

        // Addresses: both ends agree, and they are loopback of this family.
        let c_local = c.local_addr().unwrap();
        assert_eq!(peer, c_local);
        assert_eq!(c.peer_addr().unwrap(), addr);
        assert_eq!(s.local_addr().unwrap(), addr);
        assert_eq!(s.peer_addr().unwrap(), c_local);
        assert_eq!(Family::of(&c_local), family);
        assert_eq!(
            l.peer_addr().unwrap_err().raw_os_error(),
            Some(libc::ENOTCONN)
        );

        let data = pattern(BIG, 0x9e37_79b9_7f4a_7c15 ^ addr.port() as u64);
        let mut want = Fnv::new();
        want.update(&data);

        let (c, n, sum) = transfer(c, &*s, data);
        assert_eq!(n, BIG);
        assert_eq!(sum, want.0, "checksum mismatch");
        if stack.io_mode() == IoMode::Uring {
            // The reads above went through this thread's ring.
            assert!(
                uring_fds() > 0,
                "no io_uring fd in this process after a uring transfer"
            );
        }

        // EOF is sticky.
        let mut buf = [0u8; 16];
        assert_eq!(s.recv(&mut buf, 0).unwrap(), 0);
        assert_eq!(s.recv(&mut buf, 0).unwrap(), 0);

        // TCP_INFO counters saw the transfer on both ends. The last ACKs
        // may still be on their way when the reader sees EOF.
        wait_for("every byte acked", || {
            counter(&c.counters(), "bytes_acked") >= BIG as u64
        });
        let cc = c.counters();
        let sc = s.counters();
        assert!(counter(&cc, "bytes_sent") >= BIG as u64, "client {cc:?}");
        assert!(counter(&cc, "packets_sent") > 0, "client {cc:?}");
        assert!(counter(&cc, "packets_received") > 0, "client {cc:?}");
        assert!(
            counter(&sc, "bytes_received") >= BIG as u64,
            "server {sc:?}"
        );
        assert!(counter(&sc, "packets_received") > 0, "server {sc:?}");
        assert!(counter(&sc, "packets_sent") > 0, "server {sc:?}");
    });
}

#[test]
fn server_sends_to_client_too() {
    // The other direction: the accepted socket sends, the connecting one reads.
    each(|stack, family| {
        let (c, s) = pair(stack, family);
        let data = pattern(1 << 20, 7);
        let mut want = Fnv::new();
        want.update(&data);
        let (_s, n, sum) = transfer(s, &*c, data);
        assert_eq!((n, sum), (1 << 20, want.0));
    });
}

#[test]
fn eof_after_shutdown_write_and_data_still_flows_back() {
    each(|stack, family| {
        let (c, s) = pair(stack, family);
        c.send_all(b"last words", 0).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        loop {
            let n = s.recv(&mut buf, 0).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"last words");
        // The half-closed client still reads.
        s.send_all(b"reply", 0).unwrap();
        let n = c.recv(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"reply");
        // Sending after shutdown(Write) is EPIPE (no SIGPIPE: MSG_NOSIGNAL).
        assert_eq!(raw(&c.send(b"x", 0).unwrap_err()), Some(libc::EPIPE));
    });
}

#[test]
fn recv_timeout_is_timed_out_without_errno() {
    each(|stack, family| {
        let (c, s) = pair(stack, family);
        s.set_timeout(Some(Duration::from_millis(50))).unwrap();
        assert_eq!(s.timeout(), Some(Duration::from_millis(50)));
        let start = Instant::now();
        let mut buf = [0u8; 16];
        let err = s.recv(&mut buf, 0).unwrap_err();
        let took = start.elapsed();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err:?}");
        assert_eq!(
            err.raw_os_error(),
            None,
            "a socket timeout has no errno: {err:?}"
        );
        assert!(took >= Duration::from_millis(45), "returned after {took:?}");
        assert!(took < Duration::from_secs(2), "returned after {took:?}");
        // Back to blocking: data arrives normally.
        s.set_timeout(None).unwrap();
        assert_eq!(s.timeout(), None);
        c.send_all(b"hi", 0).unwrap();
        let n = s.recv(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"hi");
    });
}

#[test]
fn non_blocking_connect_is_einprogress_then_writable() {
    each(|stack, family| {
        let (l, addr) = listener(stack, family);
        let c = stack.socket(family, SockKind::Stream).unwrap();
        c.set_timeout(Some(Duration::ZERO)).unwrap();
        let err = c.connect(addr).unwrap_err();
        assert_eq!(raw(&err), Some(libc::EINPROGRESS), "{err:?}");
        wait_for("the connect to finish", || c.readiness().writable);
        assert!(!c.readiness().error);
        let so_error = c.get_option(libc::SOL_SOCKET, libc::SO_ERROR, 4).unwrap();
        assert_eq!(so_error, 0i32.to_ne_bytes());
        assert_eq!(c.peer_addr().unwrap(), addr);
        // The connection is real: a byte crosses it.
        let (s, _) = l.accept().unwrap();
        assert_eq!(c.send(b"z", 0).unwrap(), 1);
        let mut buf = [0u8; 4];
        assert_eq!(s.recv(&mut buf, 0).unwrap(), 1);
        assert_eq!(buf[0], b'z');
    });
}

#[test]
fn non_blocking_recv_is_eagain_then_readable() {
    each(|stack, family| {
        let (c, s) = pair(stack, family);
        s.set_timeout(Some(Duration::ZERO)).unwrap();
        let mut buf = [0u8; 16];
        let err = s.recv(&mut buf, 0).unwrap_err();
        assert_eq!(raw(&err), Some(libc::EAGAIN), "{err:?}");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(!s.readiness().readable);
        c.send_all(b"ready", 0).unwrap();
        wait_for("data", || s.readiness().readable);
        let n = s.recv(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"ready");
        // A non-blocking accept with nothing pending is EAGAIN too.
        let (l, _) = listener(stack, family);
        l.set_timeout(Some(Duration::ZERO)).unwrap();
        assert_eq!(raw(&l.accept().err().unwrap()), Some(libc::EAGAIN));
    });
}

#[test]
fn connect_to_a_closed_port_is_econnrefused() {
    each(|stack, family| {
        // A bound socket that does not listen: its port answers SYN with RST,
        // and no other test can take the port meanwhile.
        let holder = stack.socket(family, SockKind::Stream).unwrap();
        holder.bind(loopback(family)).unwrap();
        let addr = holder.local_addr().unwrap();
        let c = stack.socket(family, SockKind::Stream).unwrap();
        let err = c.connect(addr).unwrap_err();
        assert_eq!(raw(&err), Some(libc::ECONNREFUSED), "{err:?}");
    });
}

#[test]
fn everything_is_ebadf_after_close() {
    each(|stack, family| {
        let (c, _s) = pair(stack, family);
        c.close().unwrap();
        let mut buf = [0u8; 8];
        let ebadf = Some(libc::EBADF);
        assert_eq!(raw(&c.send(b"x", 0).unwrap_err()), ebadf);
        assert_eq!(raw(&c.send_all(b"x", 0).unwrap_err()), ebadf);
        assert_eq!(raw(&c.recv(&mut buf, 0).unwrap_err()), ebadf);
        assert_eq!(raw(&c.recv_from(&mut buf, 0).unwrap_err()), ebadf);
        assert_eq!(raw(&c.local_addr().unwrap_err()), ebadf);
        assert_eq!(raw(&c.peer_addr().unwrap_err()), ebadf);
        assert_eq!(raw(&c.shutdown(Shutdown::Both).unwrap_err()), ebadf);
        assert_eq!(raw(&c.set_timeout(None).unwrap_err()), ebadf);
        assert_eq!(
            raw(&c
                .get_option(libc::SOL_SOCKET, libc::SO_ERROR, 4)
                .unwrap_err()),
            ebadf
        );
        assert!(c.readiness().error);
        // Closing twice is harmless.
        c.close().unwrap();
    });
}

#[test]
fn udp_send_to_and_recv_from() {
    each(|stack, family| {
        assert!(stack.supports(family, SockKind::Dgram));
        let a = stack.socket(family, SockKind::Dgram).unwrap();
        let b = stack.socket(family, SockKind::Dgram).unwrap();
        a.bind(loopback(family)).unwrap();
        b.bind(loopback(family)).unwrap();
        let a_addr = a.local_addr().unwrap();
        let b_addr = b.local_addr().unwrap();
        assert_ne!(a_addr, b_addr);

        assert_eq!(a.send_to(b"ping", 0, b_addr).unwrap(), 4);
        let mut buf = [0u8; 64];
        let (n, from) = b.recv_from(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(from, Some(a_addr));

        // Connected datagram sockets: send/recv (the io_uring path when on).
        assert_eq!(raw(&a.peer_addr().unwrap_err()), Some(libc::ENOTCONN));
        a.connect(b_addr).unwrap();
        assert_eq!(a.peer_addr().unwrap(), b_addr);
        assert_eq!(a.send(b"pong!", 0).unwrap(), 5);
        let n = b.recv(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"pong!");
        // Datagram boundaries hold: a short buffer truncates one datagram.
        b.send_to(b"0123456789", 0, a_addr).unwrap();
        b.send_to(b"ab", 0, a_addr).unwrap();
        let mut small = [0u8; 4];
        assert_eq!(a.recv(&mut small, 0).unwrap(), 4);
        assert_eq!(&small, b"0123");
        assert_eq!(a.recv(&mut small, 0).unwrap(), 2);
        assert_eq!(&small[..2], b"ab");
        // An empty UDP socket times out like a stream one.
        b.set_timeout(Some(Duration::from_millis(20))).unwrap();
        let err = b.recv_from(&mut buf, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.raw_os_error(), None);
        // Datagram sockets have no TCP_INFO counters.
        assert!(a.counters().is_empty());
    });
}

#[test]
fn instance_counts_sockets() {
    let stack = instance(Protocol::Tcp, IoMode::Syscall);
    let before = counter(&stack.counters(), "sockets");
    let _a = stack.socket(Family::V4, SockKind::Stream).unwrap();
    let _b = stack.socket(Family::V6, SockKind::Dgram).unwrap();
    assert_eq!(counter(&stack.counters(), "sockets"), before + 2);
    assert_eq!(stack.name(), "tcp-syscall");
    assert!(
        stack.describe().contains("syscalls"),
        "{}",
        stack.describe()
    );
    let uring = instance(Protocol::Tcp, IoMode::Uring);
    assert!(
        uring.describe().contains("io_uring"),
        "{}",
        uring.describe()
    );
}

fn so_protocol(sock: &dyn StackSocket) -> i32 {
    let v = sock
        .get_option(libc::SOL_SOCKET, libc::SO_PROTOCOL, 4)
        .unwrap();
    i32::from_ne_bytes(v.as_slice().try_into().expect("4 bytes"))
}

#[test]
fn mptcp_instance_makes_mptcp_sockets_and_no_datagrams() {
    assert_eq!(IPPROTO_MPTCP, 262);
    for io in MODES {
        let tcp = instance(Protocol::Tcp, io);
        let mptcp = instance(Protocol::Mptcp, io);
        assert_eq!(mptcp.protocol(), Protocol::Mptcp);
        for family in FAMILIES {
            eprintln!("-- {io:?} {family:?}");
            assert!(mptcp.supports(family, SockKind::Stream));
            assert!(!mptcp.supports(family, SockKind::Dgram));
            assert!(tcp.supports(family, SockKind::Dgram));

            let plain = tcp.socket(family, SockKind::Stream).unwrap();
            assert_eq!(so_protocol(&*plain), libc::IPPROTO_TCP);
            let m = mptcp.socket(family, SockKind::Stream).unwrap();
            assert_eq!(so_protocol(&*m), 262);

            // And it carries data, in this I/O mode too.
            let (c, s) = pair(&mptcp, family);
            assert_eq!(so_protocol(&*c), 262);
            assert_eq!(so_protocol(&*s), 262);
            let data = pattern(1 << 20, 3);
            let mut want = Fnv::new();
            want.update(&data);
            let (_c, n, sum) = transfer(c, &*s, data);
            assert_eq!((n, sum), (1 << 20, want.0));
        }
    }
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// The state letter of thread `tid` of this process (`S` = sleeping).
fn thread_state(tid: libc::pid_t) -> char {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    after.trim_start().chars().next().unwrap()
}

#[test]
fn one_signal_interrupts_a_blocked_recv() {
    // A handler installed without SA_RESTART, as CPython installs its own:
    // a blocked recv must come back with EINTR after a single signal, in
    // both I/O modes, so that Python can run its handlers (Ctrl-C).
    // SAFETY: installs a handler that does nothing; sa_flags has no SA_RESTART.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    each(|stack, family| {
        let (c, s) = pair(stack, family);
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let mut buf = [0u8; 16];
            let res = s.recv(&mut buf, 0).map(|n| buf[..n].to_vec());
            tx.send(0).unwrap();
            res
        });
        let tid = rx.recv().unwrap();
        wait_for("the reader to block", || thread_state(tid) == 'S');
        thread::sleep(Duration::from_millis(50));
        // SAFETY: tid is a live thread of this process (it has not reported back).
        let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) };
        assert_eq!(rc, 0);
        let answered = rx.recv_timeout(Duration::from_secs(2)).is_ok();
        if !answered {
            // Unblock the reader so the test fails instead of hanging.
            c.send_all(b"unblock", 0).unwrap();
        }
        let res = reader.join().unwrap();
        assert!(
            answered,
            "one signal did not interrupt recv (got {res:?} only after data came)"
        );
        let err = res.expect_err("recv returned data although none was sent");
        assert_eq!(err.kind(), io::ErrorKind::Interrupted, "{err:?}");
        assert_eq!(err.raw_os_error(), Some(libc::EINTR));
        // The socket is still usable, and nothing was lost.
        c.send_all(b"after", 0).unwrap();
    });
}
