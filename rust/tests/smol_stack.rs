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
