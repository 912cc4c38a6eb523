//! smoltcp over a TAP device against kernel TCP over a veth pair, in the
//! same run and the same topology: the peer is kernel TCP in a network
//! namespace; the side under test runs in this process in the root
//! namespace (a smoltcp instance whose TAP was moved into the namespace, or
//! a kernel socket on the root end of a veth pair).
//!
//! Measures bulk Gbit/s in both directions and 1-byte ping-pong round trips
//! per second, each next to a kernel run made just before it, prints a
//! table with ratios and writes it to
//! `benches/results/smol_tap.md`. Needs root. `cargo bench --bench smol_tap`.
//! Environment: `SMOL_BENCH_MIB` (bulk size, default 256),
//! `SMOL_BENCH_SECS` (ping-pong time, default 2).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use dmm::stack::kernel::{IoMode, KernelStack, Protocol};
use dmm::stack::smol::{SmolOptions, SmolStack};
use dmm::stack::{Family, SockKind, Stack};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespace, veth pair and TAP of the run; removed on drop.
struct Topology {
    ns: String,
    veth: String,
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Runs `f` in a thread that entered namespace `ns`.
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on a valid fd affects only this thread.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// The ports of the kernel peer in the namespace: a sink (reads to EOF), a
/// source (sends `total` bytes) and an echo server. It listens on every
/// address, so it serves the veth and the TAP path alike.
struct Peer {
    sink: u16,
    source: u16,
    echo: u16,
}

impl Peer {
    fn at(&self, ip: Ipv4Addr) -> [SocketAddr; 3] {
        [self.sink, self.source, self.echo].map(|p| SocketAddr::from((ip, p)))
    }
}

fn start_peer(ns: &str, total: usize) -> Peer {
    let ip = Ipv4Addr::UNSPECIFIED;
    let (tx, rx) = mpsc::channel();
    in_ns(ns, move || {
        let sink = TcpListener::bind((ip, 0)).expect("bind");
        let source = TcpListener::bind((ip, 0)).expect("bind");
        let echo = TcpListener::bind((ip, 0)).expect("bind");
        tx.send((
            sink.local_addr().unwrap().port(),
            source.local_addr().unwrap().port(),
            echo.local_addr().unwrap().port(),
        ))
        .unwrap();
        thread::spawn(move || {
            for c in sink.incoming() {
                let Ok(mut c) = c else { return };
                thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 20];
                    while c.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
                });
            }
        });
        thread::spawn(move || {
            for c in source.incoming() {
                let Ok(mut c) = c else { return };
                thread::spawn(move || {
                    let buf = vec![0x5au8; 1 << 20];
                    let mut left = total;
                    while left > 0 {
                        let n = left.min(buf.len());
                        if c.write_all(&buf[..n]).is_err() {
                            return;
                        }
                        left -= n;
                    }
                    let _ = c.shutdown(Shutdown::Write);
                });
            }
        });
        for c in echo.incoming() {
            let Ok(mut c) = c else { return };
            c.set_nodelay(true).unwrap();
            thread::spawn(move || {
                let mut b = [0u8; 1];
                while c.read_exact(&mut b).is_ok() {
                    if c.write_all(&b).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (sink, source, echo) = rx.recv().expect("peer started");
    Peer { sink, source, echo }
}

/// Sends `total` bytes to the sink; Gbit/s until the peer has all (its
/// close after our FIN).
fn bulk_send(stack: &dyn Stack, to: SocketAddr, total: usize) -> f64 {
    let c = stack.socket(Family::V4, SockKind::Stream).expect("socket");
    c.connect(to).expect("connect");
    let chunk = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        c.send_all(&chunk[..n], 0).expect("send");
        left -= n;
    }
    c.shutdown(Shutdown::Write).expect("shutdown");
    let mut b = [0u8; 16];
    // The sink closes once it has read everything.
    while c.recv(&mut b, 0).expect("recv") > 0 {}
    (total * 8) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// Receives everything from the source; Gbit/s.
fn bulk_recv(stack: &dyn Stack, from: SocketAddr, total: usize) -> f64 {
    let c = stack.socket(Family::V4, SockKind::Stream).expect("socket");
    c.connect(from).expect("connect");
    let mut buf = vec![0u8; 1 << 20];
    let t0 = Instant::now();
    let mut got = 0;
    loop {
        let n = c.recv(&mut buf, 0).expect("recv");
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, total);
    (total * 8) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

/// 1-byte round trips per second for `secs`.
fn ping_pong(stack: &dyn Stack, to: SocketAddr, secs: f64) -> f64 {
    let c = stack.socket(Family::V4, SockKind::Stream).expect("socket");
    c.connect(to).expect("connect");
    c.set_option(libc::IPPROTO_TCP, libc::TCP_NODELAY, &1i32.to_ne_bytes())
        .expect("nodelay");
    let mut b = [0u8; 1];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..100 {
            c.send_all(b"x", 0).expect("send");
            while c.recv(&mut b, 0).expect("recv") == 0 {}
        }
        n += 100;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let mib: usize = std::env::var("SMOL_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let secs: f64 = std::env::var("SMOL_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0);
    let total = mib << 20;
    let pid = std::process::id() % 100_000;
    let ns = format!("dmmtbn{pid}");
    let tap = format!("dmmtbt{pid}");
    let veth = format!("dmmtbv{pid}");
    ip(&["netns", "add", &ns]);
    let topo = Topology {
        ns: ns.clone(),
        veth: veth.clone(),
    };
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    // Kernel path: veth, root end 10.99.21.2, namespace end 10.99.21.1.
    ip(&[
        "link", "add", &veth, "type", "veth", "peer", "name", "eth9", "netns", &ns,
    ]);
    ip(&["addr", "add", "10.99.21.2/24", "dev", &veth]);
    ip(&["link", "set", &veth, "up"]);
    ip(&["-n", &ns, "addr", "add", "10.99.21.1/24", "dev", "eth9"]);
    ip(&["-n", &ns, "link", "set", "eth9", "up"]);
    let kernel = KernelStack::new("kernel", Protocol::Tcp, IoMode::Syscall);

    let mk = |inline: bool, mtu: u32, name: &str| {
        let mut o = SmolOptions::new(&tap, vec!["10.99.20.2/24".parse().unwrap()]);
        o.inline_poll = inline;
        o.mtu = mtu;
        let s = SmolStack::new(name, o).expect("smol stack");
        // The namespace end of the TAP: the kernel peer's address.
        ip(&["link", "set", &tap, "netns", &ns]);
        ip(&["-n", &ns, "addr", "add", "10.99.20.1/24", "dev", &tap]);
        ip(&["-n", &ns, "link", "set", &tap, "up"]);
        s
    };
    let peer = start_peer(&ns, total);
    let [k_sink, k_source, k_echo] = peer.at(Ipv4Addr::new(10, 99, 21, 1));
    let [s_sink, s_source, s_echo] = peer.at(Ipv4Addr::new(10, 99, 20, 1));

    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    for (inline, mtu) in [(true, 1500), (false, 1500), (true, 9000)] {
        let label = format!(
            "{}, mtu {mtu}",
            if inline { "inline poll" } else { "driver only" }
        );
        let label = label.as_str();
        let smol = mk(inline, mtu, label);
        // The kernel baseline next to each configuration: this machine is
        // shared and noisy, so only side-by-side figures compare.
        let k_send = bulk_send(&kernel, k_sink, total);
        let k_recv = bulk_recv(&kernel, k_source, total);
        let k_pp = ping_pong(&kernel, k_echo, secs);
        let s_send = bulk_send(&smol, s_sink, total);
        let s_recv = bulk_recv(&smol, s_source, total);
        let s_pp = ping_pong(&smol, s_echo, secs);
        rows.push((format!("bulk send, Gbit/s ({label})"), s_send, k_send));
        rows.push((format!("bulk recv, Gbit/s ({label})"), s_recv, k_recv));
        rows.push((format!("ping-pong, round trips/s ({label})"), s_pp, k_pp));
        eprintln!("{}", smol.describe());
        eprintln!("{:?}", smol.counters());
        drop(smol);
        // The TAP (made by the stack) disappears with it.
        thread::sleep(Duration::from_millis(200));
    }
    let mut out = String::new();
    out.push_str(&format!(
        "# smoltcp over TAP vs kernel TCP over veth ({mib} MiB bulk, {secs} s ping-pong)\n\n"
    ));
    out.push_str("| measure | smoltcp | kernel | ratio |\n|---|---:|---:|---:|\n");
    for (name, s, k) in &rows {
        out.push_str(&format!("| {name} | {s:.2} | {k:.2} | {:.2} |\n", s / k));
    }
    print!("{out}");
    let _ = std::fs::create_dir_all("benches/results");
    let _ = std::fs::write("benches/results/smol_tap.md", &out);
    drop(topo);
}
