//! One connection over loopback, 256 MiB, FillP versus the kernel's TCP in
//! the same run. Prints Gbit/s; asserts only that every byte arrived.
//!
//! `cargo bench --bench fillp_loopback`. Environment: `FILLP_BENCH_MIB`
//! (size), `FILLP_BENCH_MODE` (`bbr`, `fillp`, `fixed`),
//! `FILLP_BENCH_FIXED_MBPS` (fixed rate, implies `fixed`).

use std::net::{Ipv4Addr, SocketAddr};
use std::thread;
use std::time::Instant;

use dmm::stack::fillp::{FillpOptions, FillpStack};
use dmm::stack::kernel::{IoMode, KernelStack, Protocol};
use dmm::stack::{Family, SockKind, Stack};

/// Sends `total` bytes over one connection; returns Gbit/s at the receiver.
fn run(stack: &dyn Stack, total: usize) -> f64 {
    let l = stack.socket(Family::V4, SockKind::Stream).expect("socket");
    l.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind");
    l.listen(1).expect("listen");
    let addr = l.local_addr().expect("local_addr");
    let c = stack.socket(Family::V4, SockKind::Stream).expect("socket");
    c.connect(addr).expect("connect");
    let (s, _) = l.accept().expect("accept");
    let t0 = Instant::now();
    let writer = thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            c.send_all(&chunk[..n], 0).expect("send");
            left -= n;
        }
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        c
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let n = s.recv(&mut buf, 0).expect("recv");
        if n == 0 {
            break;
        }
        got += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    let c = writer.join().expect("writer");
    assert_eq!(got, total);
    let stats: Vec<String> = c
        .counters()
        .iter()
        .filter(|(k, _)| {
            matches!(
                *k,
                "retransmits"
                    | "nacks_received"
                    | "rtt_us"
                    | "send_rate_bps"
                    | "delivery_rate_bps"
                    | "rto_count"
                    | "tail_probes"
            )
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !stats.is_empty() {
        println!("  sender: {}", stats.join(" "));
    }
    total as f64 * 8.0 / secs / 1e9
}

fn main() {
    let mib: usize = std::env::var("FILLP_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let total = mib << 20;
    let kernel = KernelStack::new("kernel", Protocol::Tcp, IoMode::Syscall);
    let mut opts = FillpOptions::default();
    if let Some(m) = std::env::var("FILLP_BENCH_MODE")
        .ok()
        .and_then(|m| dmm::stack::fillp::parse_rate_mode(&m))
    {
        opts.connection.mode = m;
    }
    if let Ok(r) = std::env::var("FILLP_BENCH_FIXED_MBPS") {
        if let Ok(r) = r.parse::<u64>() {
            opts.connection.mode = dmm::fillp::RateMode::Fixed;
            opts.connection.fixed_rate = r * 1_000_000 / 8;
        }
    }
    let fillp = FillpStack::new("fillp", opts).expect("fillp stack");
    let k = run(&kernel, total);
    println!("kernel tcp: {mib} MiB at {k:.2} Gbit/s");
    let f = run(&fillp, total);
    println!(
        "fillp:      {mib} MiB at {f:.2} Gbit/s ({:.0}% of kernel)",
        100.0 * f / k
    );
}
