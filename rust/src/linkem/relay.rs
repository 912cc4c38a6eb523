//! The I/O driver: relays Ethernet frames between the two ends of a link.
//!
//! The ends are TAP devices by default, or veth pairs read with AF_PACKET
//! (see [`super::device`]). Measured on the 2-CPU development machine
//! (benches/results/linkem.md), TAP moved 15-25% more frames per second
//! than veth + AF_PACKET with one frame per syscall on both, and it cleans
//! up after itself, so it is the default. Veth's advantage is the kernel
//! receive timestamp, which lets a frame's delay start when it arrived
//! rather than when the relay thread got to it.
//!
//! Each direction runs on its own thread with its own [`Impairment`]: read
//! frames from the ingress end without blocking, stamp them, ask the
//! pipeline when they may leave, keep them in a release queue ordered by
//! `(release time, arrival order)`, and write them to the egress end when
//! due. To be on time the thread sleeps in `ppoll` (timer slack 1 ns) until
//! `spin` before the next deadline and then polls the ingress fd in a busy
//! loop, which also keeps reading new frames meanwhile. Parameters are
//! re-read (one atomic load) once per loop turn, so a change applies from
//! the next frame read. With `realtime_priority` the threads run under
//! SCHED_FIFO, which is what keeps the delay error within tens of
//! microseconds when the CPUs are busy.

use super::device::{self, Cleanup, DeviceKind};
use super::impair::{DropReason, Impairment, Nanos, Verdict};
use super::params::{ParamError, Params};
use super::stats::Counters;
pub use super::stats::{DirStats, Stats};
use crate::sys::cvt;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Frames read from device A, written to device B.
    AtoB,
    /// Frames read from device B, written to device A.
    BtoA,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::AtoB => 0,
            Direction::BtoA => 1,
        }
    }
}

/// What to create and how to start.
#[derive(Debug, Clone)]
pub struct LinkemConfig {
    /// Name of the TAP device for end A (at most 15 bytes; must not exist).
    pub dev_a: String,
    /// Name of the TAP device for end B.
    pub dev_b: String,
    /// Network namespace to move device A into (`ip netns` name); `None`
    /// leaves it in the caller's namespace.
    pub netns_a: Option<String>,
    /// Network namespace for device B.
    pub netns_b: Option<String>,
    /// Impairments from A to B.
    pub params_ab: Params,
    /// Impairments from B to A.
    pub params_ba: Params,
    /// MTU of both devices.
    pub mtu: u32,
    /// Transmit queue length of both devices: frames the kernel may queue
    /// for us before it drops.
    pub txqueuelen: u32,
    /// Upper bound on frames held in one direction's release queue; past
    /// it frames are dropped (counted as `dropped_overflow`). Bounds memory.
    pub max_in_flight: usize,
    /// How long before a deadline the thread stops sleeping and busy-polls.
    pub spin: Duration,
    /// Run the relay threads under SCHED_FIFO with this priority (1-99);
    /// 0 keeps normal scheduling. Real-time priority keeps delays exact when
    /// the CPUs are busy (other threads cannot preempt the relay), at the
    /// price of starving them while the relay is busy.
    pub realtime_priority: u8,
    /// TAP devices or veth pairs with AF_PACKET sockets.
    pub device: DeviceKind,
}

impl LinkemConfig {
    /// A perfect link between two devices in the current namespace.
    pub fn new(dev_a: &str, dev_b: &str) -> LinkemConfig {
        LinkemConfig {
            dev_a: dev_a.to_string(),
            dev_b: dev_b.to_string(),
            netns_a: None,
            netns_b: None,
            params_ab: Params::default(),
            params_ba: Params::default(),
            mtu: 1500,
            txqueuelen: 1000,
            max_in_flight: 200_000,
            spin: Duration::from_micros(80),
            realtime_priority: 0,
            device: DeviceKind::Tap,
        }
    }
}

/// State shared between the handle and one direction's thread.
struct DirShared {
    params: Mutex<Params>,
    generation: AtomicU64,
    counters: Counters,
    wake: OwnedFd,
}

struct Shared {
    stop: AtomicBool,
    dirs: [DirShared; 2],
}

/// A running link emulator between two TAP devices.
///
/// Dropping it stops the threads and removes both devices.
pub struct Linkem {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    dev_a: String,
    dev_b: String,
    cleanup: Cleanup,
}

impl std::fmt::Debug for Linkem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linkem")
            .field("dev_a", &self.dev_a)
            .field("dev_b", &self.dev_b)
            .finish()
    }
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no pointer arguments; a valid fd is owned once.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: fd was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn params_err(e: ParamError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.0)
}

impl Linkem {
    /// Creates both TAP devices, moves them into their namespaces, brings
    /// them up and starts one relay thread per direction.
    ///
    /// On error nothing is left behind: the devices go away with their fds.
    pub fn start(cfg: LinkemConfig) -> io::Result<Linkem> {
        cfg.params_ab.validate().map_err(params_err)?;
        cfg.params_ba.validate().map_err(params_err)?;
        if !(68..=65535).contains(&cfg.mtu) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("mtu must be in [68, 65535], got {}", cfg.mtu),
            ));
        }
        if cfg.dev_a == cfg.dev_b {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "dev_a and dev_b must differ",
            ));
        }
        let (fd_a, fd_b, timestamps, cleanup) = device::open(
            cfg.device,
            [&cfg.dev_a, &cfg.dev_b],
            [cfg.netns_a.as_deref(), cfg.netns_b.as_deref()],
            cfg.mtu,
            cfg.txqueuelen,
        )?;
        let (tap_a, tap_b) = (Arc::new(fd_a), Arc::new(fd_b));
        let dir = |p: &Params| -> io::Result<DirShared> {
            Ok(DirShared {
                params: Mutex::new(p.clone()),
                generation: AtomicU64::new(0),
                counters: Counters::new(),
                wake: eventfd()?,
            })
        };
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            dirs: [dir(&cfg.params_ab)?, dir(&cfg.params_ba)?],
        });
        let mut link = Linkem {
            shared: shared.clone(),
            threads: Vec::new(),
            dev_a: cfg.dev_a.clone(),
            dev_b: cfg.dev_b.clone(),
            cleanup,
        };
        let origin = Instant::now();
        for (d, rx, tx) in [
            (Direction::AtoB, tap_a.clone(), tap_b.clone()),
            (Direction::BtoA, tap_b.clone(), tap_a.clone()),
        ] {
            let w = Worker {
                shared: shared.clone(),
                dir: d.index(),
                rx,
                tx,
                origin,
                buf_len: cfg.mtu as usize + 64,
                max_in_flight: cfg.max_in_flight,
                spin: cfg.spin.as_nanos() as Nanos,
                timestamps,
            };
            let name = format!("linkem-{}", if d == Direction::AtoB { "ab" } else { "ba" });
            // If the second spawn fails, `link`'s Drop stops the first thread.
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || w.run())?;
            let pthread = t.as_pthread_t();
            link.threads.push(t);
            if cfg.realtime_priority > 0 {
                let prio = cfg.realtime_priority.min(99) as libc::c_int;
                let param = libc::sched_param {
                    sched_priority: prio,
                };
                // SAFETY: the thread is alive (joined only in stop); param outlives the call.
                let r = unsafe { libc::pthread_setschedparam(pthread, libc::SCHED_FIFO, &param) };
                if r != 0 {
                    let e = io::Error::from_raw_os_error(r);
                    return Err(io::Error::new(
                        e.kind(),
                        format!("SCHED_FIFO for the relay: {e}"),
                    ));
                }
            }
        }
        Ok(link)
    }

    /// Names of the two devices (A, B).
    pub fn devices(&self) -> (&str, &str) {
        (&self.dev_a, &self.dev_b)
    }

    /// Replaces one direction's parameters; the relay picks them up before
    /// the next frame it reads. Queue and loss state carry over.
    pub fn set_params(&self, dir: Direction, params: Params) -> Result<(), ParamError> {
        params.validate()?;
        let d = &self.shared.dirs[dir.index()];
        *d.params.lock().unwrap_or_else(|e| e.into_inner()) = params;
        d.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The parameters in force for one direction.
    pub fn params(&self, dir: Direction) -> Params {
        let d = &self.shared.dirs[dir.index()];
        let p = d.params.lock().unwrap_or_else(|e| e.into_inner());
        p.clone()
    }

    /// A snapshot of both directions' counters.
    pub fn stats(&self) -> Stats {
        Stats {
            ab: self.shared.dirs[0].counters.snapshot(),
            ba: self.shared.dirs[1].counters.snapshot(),
        }
    }

    /// Sets every counter and the lateness histogram back to zero.
    pub fn reset_stats(&self) {
        for d in &self.shared.dirs {
            d.counters.reset();
        }
    }

    /// Whether the relay threads are still running.
    pub fn is_running(&self) -> bool {
        !self.threads.is_empty() && self.threads.iter().all(|t| !t.is_finished())
    }

    /// Stops both threads and removes the devices. Idempotent.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for d in &self.shared.dirs {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to our eventfd.
            unsafe { libc::write(d.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The threads held the last references to the fds; now delete the
        // devices (see device::Cleanup for why TAPs too).
        self.cleanup.run();
    }
}

impl Drop for Linkem {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A frame waiting in the release queue.
struct Pending {
    release: Nanos,
    seq: u64,
    buf: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.release, self.seq) == (o.release, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    // Reversed: BinaryHeap is a max-heap and we want the earliest first.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.release, o.seq).cmp(&(self.release, self.seq))
    }
}

/// One direction's thread.
struct Worker {
    shared: Arc<Shared>,
    dir: usize,
    rx: Arc<OwnedFd>,
    tx: Arc<OwnedFd>,
    origin: Instant,
    buf_len: usize,
    max_in_flight: usize,
    spin: Nanos,
    timestamps: bool,
}

/// Frames read per turn with one syscall per frame (TAP) before due frames
/// are looked at again; small, so a burst cannot hold releases back long.
const READ_BATCH_SINGLE: usize = 8;
/// Frames per recvmmsg call on a packet socket.
const READ_BATCH_MMSG: usize = 32;
/// Frames per sendmmsg call on a packet socket.
const SEND_BATCH_MMSG: usize = 256;

impl Worker {
    fn now(&self) -> Nanos {
        self.origin.elapsed().as_nanos() as Nanos
    }

    fn wait(&self, rx: RawFd, wake: RawFd, timeout: Option<Nanos>) {
        let mut fds = [
            libc::pollfd {
                fd: rx,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Without a deadline, still wake now and then: cheap insurance.
        let t = timeout.unwrap_or(200_000_000);
        let ts = libc::timespec {
            tv_sec: (t / 1_000_000_000) as libc::time_t,
            tv_nsec: (t % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: fds and ts are live for the call; no signal mask change.
        unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
    }

    /// Writes the due frames; returns them to the pool.
    fn send(&self, port: &mut Port, tx: RawFd, due: &mut Vec<Pending>, pool: &mut Vec<Vec<u8>>) {
        let c = &self.shared.dirs[self.dir].counters;
        if port.batched {
            let now = self.now();
            for p in due.iter() {
                c.record_late(now - p.release);
            }
            let (sent, bytes) = port.send_batch(tx, due);
            Counters::add(&c.frames_out, sent as u64);
            Counters::add(&c.bytes_out, bytes as u64);
            Counters::add(&c.tx_errors, (due.len() - sent) as u64);
        } else {
            for p in due.iter() {
                // Stamp each write: a burst of single writes takes a while.
                c.record_late(self.now() - p.release);
                if port.send_one(tx, &p.buf) {
                    Counters::add(&c.frames_out, 1);
                    Counters::add(&c.bytes_out, p.buf.len() as u64);
                } else {
                    Counters::add(&c.tx_errors, 1);
                }
            }
        }
        pool.extend(due.drain(..).map(|p| p.buf));
    }

    fn run(self) {
        // Sleeps end within ~1 us of their deadline instead of the default
        // 50 us slack; the spin phase covers the wake-up latency.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
        let ds = &self.shared.dirs[self.dir];
        let c = &ds.counters;
        let (rx, tx, wake) = (
            self.rx.as_raw_fd(),
            self.tx.as_raw_fd(),
            ds.wake.as_raw_fd(),
        );
        // Packet sockets (the ones with timestamps) take batches; TAPs do not.
        let mut rx_port = Port::new(self.timestamps, self.buf_len);
        let mut tx_port = Port::new(self.timestamps, self.buf_len);
        let batch = if self.timestamps {
            READ_BATCH_MMSG
        } else {
            READ_BATCH_SINGLE
        };
        let mut generation = ds.generation.load(Ordering::Acquire);
        let mut imp = Impairment::new(ds.params.lock().unwrap_or_else(|e| e.into_inner()).clone());
        let mut heap: BinaryHeap<Pending> = BinaryHeap::new();
        let mut pool: Vec<Vec<u8>> = Vec::new();
        let mut frames: Vec<(Vec<u8>, Nanos)> = Vec::with_capacity(READ_BATCH_MMSG);
        let mut due: Vec<Pending> = Vec::new();
        let mut seq: u64 = 0;
        let mut rx_failed_at: Option<Nanos> = None;
        let mut last_arrival: Nanos = 0;

        while !self.shared.stop.load(Ordering::Acquire) {
            let g = ds.generation.load(Ordering::Acquire);
            if g != generation {
                generation = g;
                imp.set_params(ds.params.lock().unwrap_or_else(|e| e.into_inner()).clone());
            }

            // Send every frame that is due (again if more fell due meanwhile).
            loop {
                let now = self.now();
                while heap.peek().is_some_and(|p| p.release <= now) {
                    due.push(heap.pop().expect("peeked"));
                }
                if due.is_empty() {
                    break;
                }
                self.send(&mut tx_port, tx, &mut due, &mut pool);
            }

            // Read what is waiting. A failing device (e.g. brought down) is
            // retried every 10 ms, not in a hot loop.
            if rx_failed_at.is_some_and(|t| self.now() < t + 10_000_000) {
                let now = self.now();
                let next = heap
                    .peek()
                    .map_or(1_000_000, |p| p.release.saturating_sub(now));
                if next > self.spin {
                    self.wait(-1, wake, Some((next - self.spin).min(1_000_000)));
                }
                continue;
            }
            rx_failed_at = None;
            match rx_port.recv(rx, batch, &mut pool, &mut frames) {
                Recv::Frames => {}
                Recv::Empty => {}
                Recv::Error => {
                    Counters::add(&c.rx_errors, 1);
                    rx_failed_at = Some(self.now());
                }
            }
            let got = frames.len();
            for (frame, waited) in frames.drain(..) {
                // The frame's clock starts when it reached the device, when
                // the kernel told us; never before the previous frame's.
                let now = self.now().saturating_sub(waited).max(last_arrival);
                last_arrival = now;
                let len = frame.len();
                Counters::add(&c.frames_in, 1);
                Counters::add(&c.bytes_in, len as u64);
                let d = imp.on_frame(now, len);
                let copy = match d.duplicate {
                    Some(Verdict::Release(_)) => {
                        Counters::add(&c.duplicated, 1);
                        Some(frame.clone())
                    }
                    _ => None,
                };
                let mut keep = |v: Verdict, buf: Vec<u8>| match v {
                    Verdict::Release(t) if heap.len() < self.max_in_flight => {
                        seq += 1;
                        heap.push(Pending {
                            release: t,
                            seq,
                            buf,
                        });
                    }
                    Verdict::Release(_) => {
                        Counters::add(&c.dropped_overflow, 1);
                        pool.push(buf);
                    }
                    Verdict::Drop(r) => {
                        let ctr = match r {
                            DropReason::Loss => &c.dropped_loss,
                            DropReason::Queue => &c.dropped_queue,
                        };
                        Counters::add(ctr, 1);
                        pool.push(buf);
                    }
                };
                keep(d.frame, frame);
                if let (Some(v), Some(b)) = (d.duplicate, copy) {
                    keep(v, b);
                }
            }
            if got > 0 {
                continue;
            }

            // Nothing to read: sleep until shortly before the next deadline,
            // or spin when it is close.
            let now = self.now();
            match heap.peek().map(|p| p.release) {
                Some(t) if t <= now + self.spin => std::hint::spin_loop(),
                Some(t) => self.wait(rx, wake, Some(t - now - self.spin)),
                None => self.wait(rx, wake, None),
            }
        }
    }
}

/// How long ago (ns, on CLOCK_REALTIME, as SO_TIMESTAMPNS stamps) the
/// kernel received the frame `msg` came with; 0 without a stamp or with one
/// more than 100 ms old, so a clock step cannot move a frame's clock far.
fn kernel_wait(msg: &libc::msghdr) -> Nanos {
    // SAFETY: msg was filled by recvmsg; the CMSG macros stay inside msg_control.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                let mut now: libc::timespec = std::mem::zeroed();
                libc::clock_gettime(libc::CLOCK_REALTIME, &mut now);
                let ns = |t: &libc::timespec| t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128;
                let waited = ns(&now) - ns(&ts);
                // Implausible (clock stepped, or a stamp on another clock): ignore it.
                return if (0..100_000_000).contains(&waited) {
                    waited as Nanos
                } else {
                    0
                };
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    0
}

enum Recv {
    Frames,
    Empty,
    Error,
}

/// Per-thread scratch space for reading and writing frames on one end:
/// one syscall per frame (TAP), or recvmmsg/sendmmsg batches with kernel
/// timestamps (packet sockets). Holds raw pointers only during a call, but
/// its `mmsghdr`s make it `!Send`, so each thread builds its own.
struct Port {
    batched: bool,
    buf_len: usize,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    ctrl: Vec<[u64; 8]>,
    bufs: Vec<Vec<u8>>,
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Port {
    fn new(batched: bool, buf_len: usize) -> Port {
        let n = if batched {
            READ_BATCH_MMSG.max(SEND_BATCH_MMSG)
        } else {
            0
        };
        Port {
            batched,
            buf_len,
            // SAFETY: mmsghdr is plain data; all-zero is valid.
            hdrs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            // SAFETY: iovec is plain data; all-zero is valid.
            iovs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            ctrl: vec![[0u64; 8]; n],
            bufs: Vec::new(),
        }
    }

    /// Reads up to `max` frames into `out` with how long each waited in the
    /// kernel (0 when unknown). Buffers come from and go back to `pool`.
    fn recv(
        &mut self,
        fd: RawFd,
        max: usize,
        pool: &mut Vec<Vec<u8>>,
        out: &mut Vec<(Vec<u8>, Nanos)>,
    ) -> Recv {
        if !self.batched {
            for _ in 0..max {
                let mut buf = pool.pop().unwrap_or_default();
                buf.clear();
                buf.reserve(self.buf_len);
                // SAFETY: reads at most the buffer's spare capacity into it.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.capacity()) };
                if n > 0 {
                    // SAFETY: the kernel initialised the first n bytes.
                    unsafe { buf.set_len(n as usize) };
                    out.push((buf, 0));
                    continue;
                }
                pool.push(buf);
                return match errno() {
                    libc::EAGAIN | libc::EINTR => Recv::Empty,
                    _ if !out.is_empty() => Recv::Frames,
                    _ => Recv::Error,
                };
            }
            return Recv::Frames;
        }
        let max = max.min(self.hdrs.len());
        while self.bufs.len() < max {
            let mut b = pool.pop().unwrap_or_default();
            b.clear();
            b.reserve(self.buf_len);
            self.bufs.push(b);
        }
        for i in 0..max {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.bufs[i].capacity(),
            };
            let h = &mut self.hdrs[i];
            // SAFETY: msghdr is plain data; all-zero is valid.
            h.msg_hdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.ctrl[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 8]>();
            h.msg_len = 0;
        }
        let n = loop {
            // SAFETY: hdrs[..max] point at live iovecs, buffers and control
            // space, all of the stated sizes, for the duration of the call.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    max as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            match errno() {
                libc::EINTR => continue,
                libc::EAGAIN => return Recv::Empty,
                _ => return Recv::Error,
            }
        };
        // The first n buffers were filled: hand them out, keep the rest.
        let rest = self.bufs.split_off(n);
        for (i, mut b) in std::mem::replace(&mut self.bufs, rest)
            .into_iter()
            .enumerate()
        {
            // SAFETY: the kernel initialised msg_len bytes (at most the capacity).
            unsafe { b.set_len((self.hdrs[i].msg_len as usize).min(b.capacity())) };
            out.push((b, kernel_wait(&self.hdrs[i].msg_hdr)));
        }
        if n == 0 {
            Recv::Empty
        } else {
            Recv::Frames
        }
    }

    /// Writes one frame; false if the kernel refused it.
    fn send_one(&mut self, fd: RawFd, frame: &[u8]) -> bool {
        loop {
            // SAFETY: writes the frame's initialised bytes.
            let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
            if n == frame.len() as isize {
                return true;
            }
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            return false;
        }
    }

    /// Writes the frames with as few sendmmsg calls as it takes; returns
    /// how many frames and bytes the kernel took.
    fn send_batch(&mut self, fd: RawFd, frames: &[Pending]) -> (usize, usize) {
        let (mut done, mut ok, mut bytes) = (0, 0, 0);
        while done < frames.len() {
            let n = (frames.len() - done).min(self.hdrs.len());
            for i in 0..n {
                let f = &frames[done + i].buf;
                self.iovs[i] = libc::iovec {
                    iov_base: f.as_ptr() as *mut _,
                    iov_len: f.len(),
                };
                let h = &mut self.hdrs[i];
                // SAFETY: msghdr is plain data; all-zero is valid.
                h.msg_hdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = &mut self.iovs[i];
                h.msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: hdrs[..n] point at live iovecs over live frames; the
            // kernel only reads them.
            let r = unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
            if r > 0 {
                let r = r as usize;
                ok += r;
                bytes += frames[done..done + r]
                    .iter()
                    .map(|p| p.buf.len())
                    .sum::<usize>();
                done += r;
            } else if r < 0 && errno() == libc::EINTR {
                continue;
            } else {
                // ENOBUFS/EAGAIN: this frame is lost, as on a full wire; go
                // on with the next one.
                done += 1;
            }
        }
        (ok, bytes)
    }
}
