//! Memory per idle connection, through the stacks: N connections over
//! loopback between two FillP instances (both in this process, all
//! accepted), left idle, against N kernel TCP connections made the same way
//! through dmm's kernel stack. Prints, per connection pair and per end
//! (half a pair):
//!
//! * **RSS**: growth of `VmRSS` (`/proc/self/status`), which counts
//!   everything the process touched, allocator slack included;
//! * **heap**: growth of live heap bytes, counted by this bench's global
//!   allocator (what the stacks' data structures really hold);
//! * **idle CPU**: the process's CPU time over the idle period (keepalives
//!   and the driver's timer turns), as a share of one core;
//! * **kernel**: growth of the kernel's socket buffer memory
//!   (`/proc/net/sockstat` `mem` pages, TCP and UDP) and of the slab caches
//!   that hold sockets and open files (`/proc/slabinfo`: `TCP`, `UDP`,
//!   `sock_inode_cache`, `filp`, `eventpoll_pwq`..., system-wide, so other
//!   processes add noise).
//!
//! The baseline is taken after one warm-up connection, so that per-process
//! and per-instance costs (driver thread, batch buffers) are not spread over
//! the N connections. Asserts only that every connection is still up at the
//! end (one byte each way on a sample of them).
//!
//! `cargo bench --bench fillp_idle`. Environment: `FILLP_IDLE_N` (comma-
//! separated counts, default `1000,10000`), `FILLP_IDLE_SETTLE_S` (idle
//! time before measuring, default 7: past the 5 s keepalive, so the idle
//! path has run), `FILLP_IDLE_ONLY` (`fillp` or `kernel`).
//! Results and method: `benches/results/fillp_idle.md`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use dmm::stack::fillp::{FillpOptions, FillpStack};
use dmm::stack::kernel::{IoMode, KernelStack, Protocol};
use dmm::stack::{Family, SockKind, Stack, StackSocket};

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; the counter is a
// side effect only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// What is measured at one moment.
#[derive(Clone, Copy, Default)]
struct Snapshot {
    rss_kib: i64,
    heap: i64,
    tcp_mem_pages: i64,
    udp_mem_pages: i64,
    slab_kib: i64,
}

/// Slab caches that grow with sockets and open files (eventfds included).
const SLABS: &[&str] = &[
    "TCP",
    "TCPv6",
    "UDP",
    "UDPv6",
    "sock_inode_cache",
    "filp",
    "dentry",
    "request_sock_TCP",
    "tw_sock_TCP",
    "skbuff_head_cache",
    "kmalloc-256",
    "kmalloc-192",
    "kmalloc-128",
    "kmalloc-64",
];

fn snapshot() -> Snapshot {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let mem = |proto: &str| -> i64 {
        sockstat
            .lines()
            .find(|l| l.starts_with(proto))
            .and_then(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let i = f.iter().position(|w| *w == "mem")?;
                f.get(i + 1)?.parse().ok()
            })
            .unwrap_or(0)
    };
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    let slab_bytes: i64 = slabinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if !SLABS.contains(f.first()?) {
                return None;
            }
            let objs: i64 = f.get(2)?.parse().ok()?;
            let size: i64 = f.get(3)?.parse().ok()?;
            Some(objs * size)
        })
        .sum();
    Snapshot {
        rss_kib,
        heap: LIVE.load(Ordering::Relaxed) as i64,
        tcp_mem_pages: mem("TCP:"),
        udp_mem_pages: mem("UDP:"),
        slab_kib: slab_bytes / 1024,
    }
}

/// Raise the open-file limit as far as the kernel lets us (each FillP pair
/// holds five descriptors: a UDP socket and four eventfds).
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        for want in [1 << 20, 1 << 18, 1 << 16, r.rlim_max] {
            let t = libc::rlimit {
                rlim_cur: want,
                rlim_max: want.max(r.rlim_max),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &t) == 0 {
                return want;
            }
        }
        r.rlim_cur
    }
}

/// User plus system CPU time of the whole process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF covers every thread.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

type Pairs = Vec<(Box<dyn StackSocket>, Box<dyn StackSocket>)>;

/// Opens `n` connections from `client` to a listener on `server`; returns
/// them (client end, server end).
fn open(server: &dyn Stack, client: &dyn Stack, n: usize) -> Pairs {
    let l = server.socket(Family::V4, SockKind::Stream).expect("socket");
    l.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind");
    l.listen(4096).expect("listen");
    let addr = l.local_addr().expect("local_addr");
    thread::scope(|s| {
        let acc = s.spawn(|| {
            (0..n)
                .map(|_| l.accept().expect("accept").0)
                .collect::<Vec<_>>()
        });
        let clients: Vec<_> = (0..n)
            .map(|_| {
                let c = client.socket(Family::V4, SockKind::Stream).expect("socket");
                c.set_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                c.connect(addr).expect("connect");
                c
            })
            .collect();
        let servers = acc.join().expect("accept thread");
        clients.into_iter().zip(servers).collect()
    })
}

/// One byte each way over every `step`-th pair (they are accepted in
/// order, so pair i's ends belong together).
fn check_alive(pairs: &Pairs, step: usize) {
    let mut b = [0u8; 1];
    for (c, s) in pairs.iter().step_by(step.max(1)) {
        c.set_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.set_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        assert_eq!(c.send(b"x", 0).expect("send"), 1);
        assert_eq!(s.recv(&mut b, 0).expect("recv"), 1);
        assert_eq!(s.send(b"y", 0).expect("send"), 1);
        assert_eq!(c.recv(&mut b, 0).expect("recv"), 1);
    }
}

struct Row {
    name: &'static str,
    n: usize,
    open_s: f64,
    /// Process CPU time over the idle period, as a share of one core.
    idle_cpu: f64,
    d: Snapshot,
}

fn measure(name: &'static str, server: &dyn Stack, client: &dyn Stack, n: usize) -> Row {
    let settle = Duration::from_secs(
        std::env::var("FILLP_IDLE_SETTLE_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(7),
    );
    let warm = open(server, client, 1);
    thread::sleep(Duration::from_millis(200));
    let before = snapshot();
    let t = Instant::now();
    let pairs = open(server, client, n);
    let open_s = t.elapsed().as_secs_f64();
    let cpu0 = cpu_time();
    thread::sleep(settle);
    let idle_cpu = (cpu_time() - cpu0).as_secs_f64() / settle.as_secs_f64().max(1e-9);
    let after = snapshot();
    check_alive(&pairs, (n / 50).max(1));
    drop(pairs);
    drop(warm);
    Row {
        name,
        n,
        open_s,
        idle_cpu,
        d: Snapshot {
            rss_kib: after.rss_kib - before.rss_kib,
            heap: after.heap - before.heap,
            tcp_mem_pages: after.tcp_mem_pages - before.tcp_mem_pages,
            udp_mem_pages: after.udp_mem_pages - before.udp_mem_pages,
            slab_kib: after.slab_kib - before.slab_kib,
        },
    }
}

fn print(r: &Row) {
    let n = r.n as f64;
    let page = 4096.0;
    let per_pair = |bytes: f64| bytes / n;
    let rss = per_pair(r.d.rss_kib as f64 * 1024.0);
    let heap = per_pair(r.d.heap as f64);
    // Only the stack's own protocol: the other one's counter moves with
    // whatever else runs on the machine.
    let own = if r.name == "FillP" {
        r.d.udp_mem_pages
    } else {
        r.d.tcp_mem_pages
    };
    let sock = per_pair(own as f64 * page);
    let slab = per_pair(r.d.slab_kib as f64 * 1024.0);
    println!(
        "| {} | {} | {:.1} | {:.1}% | {:.0} / {:.0} | {:.0} / {:.0} | {:+} / {:+} | {:.0} / {:.0} |",
        r.name,
        r.n,
        r.open_s,
        r.idle_cpu * 100.0,
        rss,
        rss / 2.0,
        heap,
        heap / 2.0,
        r.d.tcp_mem_pages,
        r.d.udp_mem_pages,
        sock,
        slab,
    );
}

fn main() {
    let counts: Vec<usize> = std::env::var("FILLP_IDLE_N")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let only = std::env::var("FILLP_IDLE_ONLY").ok();
    let nofile = raise_nofile();
    println!("open-file limit {nofile}; per pair / per end, bytes");
    println!(
        "| stack | N | open s | idle CPU | RSS pair / end | heap pair / end | sockstat mem pages TCP / UDP | own socket mem / slab per pair |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // Five descriptors per FillP pair, two per TCP pair, and some spare.
    let fit = |per: u64| (nofile.saturating_sub(64) / per) as usize;
    for &want in &counts {
        let n = want.min(fit(5));
        if n < want {
            println!("(N = {want} needs {} descriptors; capped at {n})", want * 5);
        }
        if only.as_deref() != Some("kernel") {
            let a = FillpStack::new("fillp-a", FillpOptions::default()).expect("fillp stack");
            let b = FillpStack::new("fillp-b", FillpOptions::default()).expect("fillp stack");
            print(&measure("FillP", &a, &b, n));
        }
        if only.as_deref() != Some("fillp") {
            let k = KernelStack::new("kernel", Protocol::Tcp, IoMode::Syscall);
            print(&measure("kernel TCP", &k, &k, want.min(fit(2))));
        }
    }
}
