//! Idle connections at scale, through the stacks: N connections over
//! loopback from this process (the clients) to a listener in a child
//! process (the servers: this bench run again with `FILLP_IDLE_ROLE=server`),
//! all accepted, left idle, for FillP (its client connections on one shared
//! UDP socket, and each on its own) and for kernel TCP made the same way
//! through dmm's kernel stack. Prints, per connection end, on each side:
//!
//! * **fds**: growth of `/proc/self/fd`;
//! * **RSS**: growth of `VmRSS`, which counts everything the process
//!   touched, allocator slack included;
//! * **heap**: growth of live heap bytes, counted by this bench's global
//!   allocator (what the stacks' data structures really hold);
//! * **idle CPU**: the process's CPU time over the idle period (keepalives
//!   and the driver's timer turns), as a share of one core;
//! * **kernel**, per connection (both ends): growth of the kernel's socket
//!   buffer memory (`/proc/net/sockstat` `mem` pages of the stack's own
//!   protocol) and of the slab caches that hold sockets and open files
//!   (`/proc/slabinfo`: `TCP`, `UDP`, `sock_inode_cache`, `filp`...,
//!   system-wide, so other processes add noise).
//!
//! The baselines are taken after one warm-up connection, so that
//! per-process and per-instance costs (driver thread, batch buffers) are not
//! spread over the N connections. Asserts only that every connection is
//! still up at the end (one byte each way on a sample of them). A count
//! that needs more fds than the process may open is capped, and says so.
//!
//! `cargo bench --bench fillp_idle`. Environment: `FILLP_IDLE_N` (comma-
//! separated counts, default `1000,10000`), `FILLP_IDLE_SETTLE_S` (idle
//! time before measuring, default 7: past the 5 s keepalive, so the idle
//! path has run), `FILLP_IDLE_ONLY` (`fillp` or `kernel`).
//! Results and method: `benches/results/fillp_idle.md`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
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
#[derive(Clone, Copy, Debug, Default)]
struct Snapshot {
    fds: i64,
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
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64);
    Snapshot {
        fds,
        rss_kib,
        heap: LIVE.load(Ordering::Relaxed) as i64,
        tcp_mem_pages: mem("TCP:"),
        udp_mem_pages: mem("UDP:"),
        slab_kib: slab_bytes / 1024,
    }
}

impl Snapshot {
    fn minus(self, b: Snapshot) -> Snapshot {
        Snapshot {
            fds: self.fds - b.fds,
            rss_kib: self.rss_kib - b.rss_kib,
            heap: self.heap - b.heap,
            tcp_mem_pages: self.tcp_mem_pages - b.tcp_mem_pages,
            udp_mem_pages: self.udp_mem_pages - b.udp_mem_pages,
            slab_kib: self.slab_kib - b.slab_kib,
        }
    }
}

/// Raise the open-file limit as far as the kernel lets us.
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

/// The stacks measured: the client side's, and the kind the server child
/// runs.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    FillpShared,
    FillpOwnPort,
    Kernel,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::FillpShared => "FillP, shared client port",
            Mode::FillpOwnPort => "FillP, a port per client",
            Mode::Kernel => "kernel TCP",
        }
    }

    fn server_kind(self) -> &'static str {
        match self {
            Mode::Kernel => "kernel",
            _ => "fillp",
        }
    }

    /// Fds a client end is expected to hold, to cap N below the limit.
    fn client_fds(self) -> u64 {
        match self {
            Mode::FillpOwnPort => 2,
            _ => 1,
        }
    }

    fn stack(self, n: usize) -> Arc<dyn Stack> {
        let fillp = |shared| {
            let opts = FillpOptions {
                shared_client_port: shared,
                max_connections: n + 16,
                ..FillpOptions::default()
            };
            Arc::new(FillpStack::new("fillp", opts).expect("fillp stack")) as Arc<dyn Stack>
        };
        match self {
            Mode::FillpShared => fillp(true),
            Mode::FillpOwnPort => fillp(false),
            Mode::Kernel => Arc::new(KernelStack::new("kernel", Protocol::Tcp, IoMode::Syscall)),
        }
    }
}

fn settle() -> Duration {
    Duration::from_secs(
        std::env::var("FILLP_IDLE_SETTLE_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(7),
    )
}

/// The server child: listens, accepts `FILLP_IDLE_COUNT` + 1 connections,
/// and measures itself when the parent says so (one command per line on
/// stdin, one answer per line on stdout).
fn serve() {
    raise_nofile();
    let n: usize = std::env::var("FILLP_IDLE_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("FILLP_IDLE_COUNT");
    let mode = match std::env::var("FILLP_IDLE_KIND").as_deref() {
        Ok("kernel") => Mode::Kernel,
        _ => Mode::FillpShared,
    };
    let stack = mode.stack(n);
    let l = stack.socket(Family::V4, SockKind::Stream).expect("socket");
    l.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind");
    l.listen(4096).expect("listen");
    let mut out = std::io::stdout().lock();
    let say = |out: &mut std::io::StdoutLock, line: String| {
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .expect("stdout");
    };
    say(
        &mut out,
        format!("port {}", l.local_addr().expect("addr").port()),
    );
    let warm = l.accept().expect("accept").0;
    let mut conns = Vec::with_capacity(n);
    let (mut base, mut cpu0) = (snapshot(), cpu_time());
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        match line.as_str() {
            "base" => {
                base = snapshot();
                say(&mut out, "ok".into());
                while conns.len() < n {
                    conns.push(l.accept().expect("accept").0);
                }
                say(&mut out, "accepted".into());
            }
            "idle" => {
                cpu0 = cpu_time();
                say(&mut out, "ok".into());
            }
            "measure" => {
                let cpu = (cpu_time() - cpu0).as_secs_f64();
                let d = snapshot().minus(base);
                say(
                    &mut out,
                    format!("{} {} {} {cpu}", d.fds, d.rss_kib, d.heap),
                );
            }
            "check" => {
                let mut b = [0u8; 1];
                for s in conns.iter().step_by((n / 50).max(1)) {
                    s.set_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    assert_eq!(s.recv(&mut b, 0).expect("recv"), 1);
                    assert_eq!(s.send(b"y", 0).expect("send"), 1);
                }
                say(&mut out, "checked".into());
            }
            _ => break,
        }
    }
    drop(warm);
}

/// The parent's end of a server child.
struct Server {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl Server {
    fn spawn(mode: Mode, n: usize) -> Server {
        let mut child = Command::new(std::env::current_exe().expect("current_exe"))
            .env("FILLP_IDLE_ROLE", "server")
            .env("FILLP_IDLE_KIND", mode.server_kind())
            .env("FILLP_IDLE_COUNT", n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the server child");
        let to = child.stdin.take().expect("stdin");
        let from = BufReader::new(child.stdout.take().expect("stdout"));
        Server { child, to, from }
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.from.read_line(&mut l).expect("child stdout");
        assert!(!l.is_empty(), "the server child exited");
        l.trim().to_string()
    }

    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.to, "{cmd}").expect("child stdin");
        self.line()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = writeln!(self.to, "quit");
        let _ = self.child.wait();
    }
}

struct Row {
    mode: Mode,
    n: usize,
    open_s: f64,
    client: Snapshot,
    /// The server child's growth (fds, RSS, heap only).
    server: Snapshot,
    cpu_client: f64,
    cpu_server: f64,
}

fn measure(mode: Mode, n: usize) -> Row {
    let stack = mode.stack(n);
    let mut server = Server::spawn(mode, n);
    let port: u16 = server
        .line()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .expect("port line");
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let connect = || {
        let c = stack.socket(Family::V4, SockKind::Stream).expect("socket");
        c.set_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        c.connect(addr).expect("connect");
        c
    };
    let warm = connect();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(server.ask("base"), "ok");
    let before = snapshot();
    let t = Instant::now();
    let clients: Vec<Box<dyn StackSocket>> = (0..n).map(|_| connect()).collect();
    assert_eq!(server.line(), "accepted");
    let open_s = t.elapsed().as_secs_f64();
    let cpu0 = cpu_time();
    assert_eq!(server.ask("idle"), "ok");
    let settle = settle();
    thread::sleep(settle);
    let cpu_client = (cpu_time() - cpu0).as_secs_f64() / settle.as_secs_f64();
    let after = snapshot();
    let reply = server.ask("measure");
    let f: Vec<f64> = reply
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!(f.len(), 4, "measure reply: {reply}");
    let server_d = Snapshot {
        fds: f[0] as i64,
        rss_kib: f[1] as i64,
        heap: f[2] as i64,
        ..Snapshot::default()
    };
    // One byte each way on a sample, in the order the child accepted them.
    writeln!(server.to, "check").expect("child stdin");
    let mut b = [0u8; 1];
    for c in clients.iter().step_by((n / 50).max(1)) {
        assert_eq!(c.send(b"x", 0).expect("send"), 1);
        assert_eq!(c.recv(&mut b, 0).expect("recv"), 1);
    }
    assert_eq!(server.line(), "checked");
    drop(clients);
    drop(warm);
    Row {
        mode,
        n,
        open_s,
        client: after.minus(before),
        server: server_d,
        cpu_client,
        cpu_server: f[3] / settle.as_secs_f64(),
    }
}

fn print(r: &Row) {
    let n = r.n as f64;
    let own = match r.mode {
        Mode::Kernel => r.client.tcp_mem_pages,
        _ => r.client.udp_mem_pages,
    };
    println!(
        "| {} | {} | {:.1} | {:.2} / {:.2} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1}% / {:.1}% | {:.0} | {:.0} |",
        r.mode.name(),
        r.n,
        r.open_s,
        r.client.fds as f64 / n,
        r.server.fds as f64 / n,
        r.client.rss_kib as f64 * 1024.0 / n,
        r.server.rss_kib as f64 * 1024.0 / n,
        r.client.heap as f64 / n,
        r.server.heap as f64 / n,
        r.cpu_client * 100.0,
        r.cpu_server * 100.0,
        own as f64 * 4096.0 / n,
        r.client.slab_kib as f64 * 1024.0 / n,
    );
}

fn main() {
    if std::env::var("FILLP_IDLE_ROLE").as_deref() == Ok("server") {
        serve();
        return;
    }
    let counts: Vec<usize> = std::env::var("FILLP_IDLE_N")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let only = std::env::var("FILLP_IDLE_ONLY").ok();
    let nofile = raise_nofile();
    println!("open-file limit {nofile} per process; clients here, servers in a child process");
    println!(
        "| stack | N | open s | fds per end client / server | RSS per end client / server, B | heap per end client / server, B | idle CPU client / server | kernel socket mem per connection, B | slab per connection, B |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &want in &counts {
        for mode in [Mode::FillpShared, Mode::FillpOwnPort, Mode::Kernel] {
            let fillp = mode != Mode::Kernel;
            if only.as_deref() == Some(if fillp { "kernel" } else { "fillp" }) {
                continue;
            }
            let fit = (nofile.saturating_sub(64) / mode.client_fds()) as usize;
            let n = want.min(fit);
            if n < want {
                println!(
                    "({}: N = {want} needs {} fds in the client process; capped at {n})",
                    mode.name(),
                    want as u64 * mode.client_fds()
                );
            }
            print(&measure(mode, n));
        }
    }
}
