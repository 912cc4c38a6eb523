//! One connection over loopback, FillP versus the kernel's TCP in the same
//! run, interleaved rounds. Two FillP contenders: `fillp`, the default,
//! sizes its datagrams from the route (65,507 bytes on lo, as TCP sizes its
//! segments from the MTU), and `fillp-fixed` uses 1400 bytes on every route
//! (FillP's size on Ethernet-sized paths, and on every path before path
//! sizing). A third reference, `raw udp`, is the kernel's UDP path alone
//! (65,507-byte datagrams, no protocol): the ceiling of any transport over
//! UDP here. Prints Gbit/s and CPU seconds per Gbit (the whole process:
//! application threads, the FillP driver and the kernel work done on their
//! behalf), median and spread; asserts only that every byte arrived.
//!
//! `cargo bench --bench fillp_loopback`. Environment: `FILLP_BENCH_MIB`
//! (size, default 256), `FILLP_BENCH_ROUNDS` (default 3),
//! `FILLP_BENCH_MODE` (`bbr`, `fillp`, `fixed`), `FILLP_BENCH_FIXED_MBPS`
//! (fixed rate, implies `fixed`), `FILLP_BENCH_ONLY` (`kernel`, `udp`,
//! `fillp` or `fillp-fixed`: run one contender only, for profiling),
//! `FILLP_BENCH_OFFLOAD=0` (no UDP GSO/GRO), `FILLP_BENCH_PACK_EVERY` (the receiver's
//! acknowledgement cadence, in 1400-byte units), `FILLP_BENCH_INSTANCES=2`
//! (client and server on two FillP instances, each with its own driver
//! thread, as in two processes; the default is one instance whose driver
//! runs both ends), `FILLP_BENCH_MTU` (`fillp-fixed`'s datagram size,
//! default 1400), `FILLP_BENCH_FRESH=1` (new FillP instances every round),
//! `FILLP_BENCH_TRACE=1` (each round's progress every 20 ms).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use dmm::stack::fillp::{FillpOptions, FillpStack};
use dmm::stack::kernel::{IoMode, KernelStack, Protocol};
use dmm::stack::{Family, SockKind, Stack};

/// User plus system CPU time of the whole process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF covers every thread.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A page-aligned buffer. The application buffers are page-aligned in
/// every round: from `vec!` they were in the first round (glibc mmaps them)
/// and not in later ones (its raised mmap threshold serves them from the
/// heap), and the copies in and out of the stacks ran up to ~30% slower
/// for that alone.
struct AlignedBuf {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + 4096];
        let offset = storage.as_ptr().align_offset(4096).min(4096);
        AlignedBuf {
            storage,
            offset,
            len,
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// One transfer's outcome.
#[derive(Clone, Copy)]
struct Sample {
    gbps: f64,
    cpu_per_gbit: f64,
}

/// Sends `total` bytes over one connection from `client` to `server` (the
/// same stack or two instances); returns Gbit/s at the receiver
/// and the process CPU seconds per Gbit moved.
fn run(server: &dyn Stack, client: &dyn Stack, total: usize) -> Sample {
    let l = server.socket(Family::V4, SockKind::Stream).expect("socket");
    l.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind");
    l.listen(1).expect("listen");
    let addr = l.local_addr().expect("local_addr");
    let c = client.socket(Family::V4, SockKind::Stream).expect("socket");
    c.connect(addr).expect("connect");
    let c = std::sync::Arc::new(c);
    let sender = std::sync::Arc::clone(&c);
    let (s, _) = l.accept().expect("accept");
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let writer = thread::spawn(move || {
        let c = sender;
        let mut chunk_buf = AlignedBuf::new(1 << 20);
        let chunk = chunk_buf.as_mut();
        chunk.fill(0x5a);
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            c.send_all(&chunk[..n], 0).expect("send");
            left -= n;
        }
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let mut buf_a = AlignedBuf::new(1 << 20);
    let buf = buf_a.as_mut();
    let mut got = 0usize;
    // (ms since start, MiB received, the sender's pacing rate and last
    // delivery sample in Mbit/s) every 20 ms, printed with FILLP_BENCH_TRACE:
    // tells a pause from a slow steady rate, and a rate held by the pacer
    // from one held by the receiver.
    let mut progress: Vec<(u128, usize, u64, u64)> = Vec::new();
    let mut next_mark = t0;
    loop {
        let n = s.recv(buf, 0).expect("recv");
        if n == 0 {
            break;
        }
        got += n;
        let now = Instant::now();
        if now >= next_mark {
            let rate = |k: &str| {
                c.counters()
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map_or(0, |(_, v)| *v)
            };
            progress.push((
                (now - t0).as_millis(),
                got >> 20,
                rate("send_rate_bps") / 1_000_000,
                rate("delivery_rate_bps") / 1_000_000,
            ));
            next_mark = now + Duration::from_millis(20);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if std::env::var_os("FILLP_BENCH_TRACE").is_some() {
        let marks: Vec<String> = progress
            .iter()
            .map(|(t, m, r, d)| format!("{t}:{m}:{r}:{d}"))
            .collect();
        println!(
            "  trace, ms:MiB received:pacing:delivery sample Mbit/s: {}",
            marks.join(" ")
        );
    }
    let cpu = (cpu_time() - cpu0).as_secs_f64();
    writer.join().expect("writer");
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
    let gbit = total as f64 * 8.0 / 1e9;
    Sample {
        gbps: gbit / secs,
        cpu_per_gbit: cpu / gbit,
    }
}

/// The ceiling any transport over UDP meets here: `total` bytes as
/// 65,507-byte datagrams (FillP's size on loopback) from a writer thread
/// straight into a reader's 64 KiB buffer, no protocol, no flow control.
/// Returns the goodput over the reader's first to last datagram and the
/// share of datagrams lost (the writer can outrun the reader).
fn raw_udp(total: usize) -> (Sample, f64) {
    const SIZE: usize = 65_507;
    let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    // Large enough that the reader, not the socket buffer, is the limit.
    let _ = dmm::sys::setsockopt(
        rx.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        &(8i32 << 20).to_ne_bytes(),
    );
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    tx.connect(rx.local_addr().expect("addr")).expect("connect");
    let count = total / SIZE;
    let cpu0 = cpu_time();
    let writer = thread::spawn(move || {
        let mut buf = AlignedBuf::new(SIZE);
        buf.as_mut().fill(0x5a);
        let mut sent = 0;
        while sent < count {
            if tx.send(buf.as_mut()).is_ok() {
                sent += 1;
            }
        }
    });
    let mut buf = AlignedBuf::new(1 << 16);
    let (mut got, mut first, mut last) = (0usize, None, Instant::now());
    while let Ok(n) = rx.recv(buf.as_mut()) {
        last = Instant::now();
        first.get_or_insert(last);
        got += n;
        if got >= count * SIZE {
            break;
        }
    }
    writer.join().expect("writer");
    let cpu = (cpu_time() - cpu0).as_secs_f64();
    let secs = last
        .duration_since(first.unwrap_or(last))
        .as_secs_f64()
        .max(1e-6);
    let gbit = got as f64 * 8.0 / 1e9;
    let sample = Sample {
        gbps: gbit / secs,
        cpu_per_gbit: cpu / gbit.max(1e-9),
    };
    (sample, 1.0 - got as f64 / (count * SIZE) as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// A FillP contender: its instances (one, or one per end) and its name.
struct Fillp {
    name: &'static str,
    opts: FillpOptions,
    server: FillpStack,
    client: Option<FillpStack>,
    samples: Vec<Sample>,
}

impl Fillp {
    fn new(name: &'static str, opts: FillpOptions, two: bool) -> Fillp {
        let (server, client) = Fillp::instances(&opts, two);
        Fillp {
            name,
            opts,
            server,
            client,
            samples: Vec::new(),
        }
    }

    fn instances(opts: &FillpOptions, two: bool) -> (FillpStack, Option<FillpStack>) {
        let server = FillpStack::new("fillp", opts.clone()).expect("fillp stack");
        let client = two.then(|| FillpStack::new("fillp2", opts.clone()).expect("fillp stack"));
        (server, client)
    }
}

fn main() {
    let mib: usize = env("FILLP_BENCH_MIB").unwrap_or(256);
    let rounds: usize = env("FILLP_BENCH_ROUNDS").unwrap_or(3).max(1);
    let only: Option<String> = env("FILLP_BENCH_ONLY");
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let total = mib << 20;
    let kernel = KernelStack::new("kernel", Protocol::Tcp, IoMode::Syscall);
    let mut opts = FillpOptions::default();
    if let Some(m) = std::env::var("FILLP_BENCH_MODE")
        .ok()
        .and_then(|m| dmm::stack::fillp::parse_rate_mode(&m))
    {
        opts.connection.mode = m;
    }
    if let Some(r) = env::<u64>("FILLP_BENCH_FIXED_MBPS") {
        opts.connection.mode = dmm::fillp::RateMode::Fixed;
        opts.connection.fixed_rate = r * 1_000_000 / 8;
    }
    if env::<u8>("FILLP_BENCH_OFFLOAD") == Some(0) {
        opts.offload = false;
    }
    if let Some(kib) = env::<usize>("FILLP_BENCH_SNDBUF_KIB") {
        opts.connection.send_buffer = kib << 10;
    }
    if let Some(n) = env::<u32>("FILLP_BENCH_PACK_EVERY") {
        opts.connection.pack_every = n;
    }
    if let Some(kib) = env::<u32>("FILLP_BENCH_WINDOW_KIB") {
        opts.connection.recv_window = kib << 10;
    }
    // The default sizes datagrams from the route (65,507 bytes on lo); the
    // second contender keeps one size for every route (1400 unless
    // FILLP_BENCH_MTU says otherwise), as FillP did before.
    let mut fixed = opts.clone();
    fixed.path_mtu = false;
    fixed.connection.mtu = env::<u16>("FILLP_BENCH_MTU").unwrap_or(1400);
    // Both ends on one FillP instance (one driver thread runs both), or, with
    // FILLP_BENCH_INSTANCES=2, one instance each, as two processes would be.
    let two = env::<u8>("FILLP_BENCH_INSTANCES") == Some(2);
    let mut fillps: Vec<Fillp> = [("fillp", opts), ("fillp-fixed", fixed)]
        .into_iter()
        .filter(|(name, _)| wanted(name))
        .map(|(name, o)| Fillp::new(name, o, two))
        .collect();
    // FILLP_BENCH_FRESH=1: new instances every round (the connections of
    // earlier rounds otherwise linger, draining, for the idle timeout).
    let fresh = env::<u8>("FILLP_BENCH_FRESH") == Some(1);
    let (mut ks, mut us) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        if wanted("kernel") {
            let k = run(&kernel, &kernel, total);
            println!(
                "round {round} kernel tcp:  {mib} MiB at {:.2} Gbit/s, {:.3} CPU s/Gbit",
                k.gbps, k.cpu_per_gbit
            );
            ks.push(k);
        }
        if wanted("udp") {
            let (u, loss) = raw_udp(total);
            println!(
                "round {round} raw udp:     {mib} MiB at {:.2} Gbit/s, {:.3} CPU s/Gbit, {:.1}% lost",
                u.gbps,
                u.cpu_per_gbit,
                loss * 100.0
            );
            us.push(u);
        }
        for f in &mut fillps {
            if fresh && round > 1 {
                (f.server, f.client) = Fillp::instances(&f.opts, two);
            }
            let client: &dyn Stack = f.client.as_ref().map_or(&f.server, |s| s);
            let x = run(&f.server, client, total);
            println!(
                "round {round} {:<12} {mib} MiB at {:.2} Gbit/s, {:.3} CPU s/Gbit",
                format!("{}:", f.name),
                x.gbps,
                x.cpu_per_gbit
            );
            f.samples.push(x);
        }
    }
    let line = |name: &str, v: &[Sample]| {
        if v.is_empty() {
            return None;
        }
        let g: Vec<f64> = v.iter().map(|s| s.gbps).collect();
        let c: Vec<f64> = v.iter().map(|s| s.cpu_per_gbit).collect();
        let ((glo, ghi), (clo, chi)) = (spread(&g), spread(&c));
        let gm = median(g);
        println!(
            "{name:<12}: median {gm:.2} Gbit/s (min {glo:.2}, max {ghi:.2}), \
             {:.3} CPU s/Gbit (min {clo:.3}, max {chi:.3})",
            median(c)
        );
        Some(gm)
    };
    println!("{rounds} rounds of {mib} MiB:");
    let k = line("kernel tcp", &ks);
    let u = line("raw udp", &us);
    if let (Some(k), Some(u)) = (k, u) {
        println!("raw udp / kernel: median of medians {:.3}", u / k);
    }
    for f in &fillps {
        let m = line(f.name, &f.samples);
        if let (Some(u), Some(m)) = (u, m) {
            println!("{} / raw udp: median of medians {:.3}", f.name, m / u);
        }
        if let (Some(k), Some(m)) = (k, m) {
            // Each round's FillP sample over the kernel's of the same round.
            let per_round = |of: fn(&Sample) -> f64| -> Vec<f64> {
                ks.iter()
                    .zip(&f.samples)
                    .map(|(k, x)| of(x) / of(k))
                    .collect()
            };
            let (lo, hi) = spread(&per_round(|s| s.gbps));
            println!(
                "{} / kernel: median of medians {:.3}, per round {lo:.3}..{hi:.3}",
                f.name,
                m / k
            );
            // CPU per Gbit against the kernel's, paired by round: the
            // steadier figure on a VM whose speed drifts between rounds.
            let cpu = per_round(|s| s.cpu_per_gbit);
            let (clo, chi) = spread(&cpu);
            println!(
                "{} CPU s/Gbit / kernel's: median of rounds {:.3}, per round {clo:.3}..{chi:.3}",
                f.name,
                median(cpu)
            );
        }
    }
}
