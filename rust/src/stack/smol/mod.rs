//! The `smoltcp` stack kind: a smoltcp 0.14 TCP/IP instance over a TAP
//! device, one driver thread per instance.
//!
//! # Design
//!
//! * **Shared state behind one `Mutex`** (`state::State`: the smoltcp
//!   `Interface`, its `SocketSet`, the TAP device, the port table and dmm's
//!   view of each socket), as in the FillP stack: application `send`/`recv`
//!   copy straight into and out of smoltcp's socket buffers, and every
//!   operation sees one consistent state.
//! * **Who polls.** An application call that changes a connection (data
//!   queued or read, connect, close, shutdown) runs a turn of
//!   `Interface::poll` itself, under the lock, before it returns: the
//!   segment leaves at once with no hop to another thread. A reader blocked
//!   in `recv`/`accept` waits on the TAP fd as well as on its readiness
//!   eventfd and runs the turn itself when a frame arrives, so a reply
//!   reaches it without a hop through the driver either. The driver thread
//!   (`driver`) does the rest: it waits in `ppoll` on the TAP fd and a wake
//!   eventfd with smoltcp's `poll_at` as timeout, so delayed ACKs,
//!   retransmissions, keepalives and TIME-WAIT expiry run while the
//!   application is idle; an application turn that moves the next deadline
//!   earlier wakes it. The driver blocks every signal. Measured with
//!   `benches/smol_tap.rs` (both modes in one run, 7 runs on a shared,
//!   noisy 2-core machine): with readers watching the TAP, inline polling
//!   had the higher 1-byte ping-pong rate in 5 of 6 runs (median about 26k
//!   against 14k round trips/s) and the higher bulk send rate in 5 of 7, so
//!   it is the default
//!   (`SmolOptions::inline_poll`).
//! * **Readiness and blocking calls** come from the user-space socket core
//!   that the FillP stack uses too (`stack::userspace`; this stack adds
//!   the inline turns above): each socket has a `ready` eventfd,
//!   readable exactly while the socket is (data, EOF, error, pending
//!   accept), and a `wake` eventfd set for writers blocked in `send` or
//!   `connect`, once half the send buffer is free (as the kernel does), so
//!   a bulk sender wakes once per half buffer rather than once per ACK.
//!   Blocking calls wait on them with `poll(2)`/`ppoll(2)`, so a signal
//!   returns `EINTR`.
//! * **Loopback link.** `device = "loopback"` puts the instance on a link
//!   that hands every frame it sends back to it (`device::Link`): it then
//!   reaches its own addresses (`127.0.0.1/8`, `::1/128`) and nothing else,
//!   with no TAP device and no privilege. A turn delivers what it sent in
//!   a few more polls, so a handshake completes within the connecting
//!   call. This is how the stdlib's suites run on smoltcp in one process.
//! * **Listen backlog.** smoltcp has none: one listening socket takes one
//!   connection. A listener keeps a pool of `backlog` smoltcp sockets
//!   listening on its port; each one that completes a handshake moves to
//!   the accept queue and is replaced after the turn. The device admits only as many SYNs as the
//!   queue has room for (`backlog` less the connections not yet accepted
//!   and the handshakes under way) and drops the rest ([`syn_gate`]), so
//!   clients retransmit and wait, as with a full kernel queue, instead of
//!   being refused, even in a burst.
//! * **Ports** ([`ports`]): smoltcp has no port table and `connect` needs an
//!   explicit local port; dmm reserves ports per instance (`EADDRINUSE`) and
//!   picks ephemeral ones.
//! * **Device failure.** A TAP read or write error other than `EAGAIN`, or
//!   `POLLERR`/`POLLHUP` on its fd (the device was deleted), takes the
//!   instance down: every connection is dropped, blocked calls wake, and
//!   every call on an old socket fails with `ENETDOWN`. Nothing panics.
//!   [`SmolStack::restart`] reopens (re-creates) the device; sockets made
//!   after it work again.
//!
//! # TCP tuning, and why
//!
//! * **Congestion control: CUBIC** (smoltcp's `socket-tcp-cubic`), as the
//!   kernel peers here mostly run. On a TAP link nothing is lost unless a
//!   queue overflows, so it matters little; CUBIC grows the window fastest.
//! * **RTO.** smoltcp 0.14 fixes the minimum and initial RTO at 1 s (RFC
//!   6298; a `const`, not settable) and retransmits go-back-N, ignoring SACK.
//!   Within a TAP link, losses are rare (a full TAP queue) and three
//!   duplicate ACKs trigger a fast retransmit, so the 1 s floor only costs
//!   on a lost tail segment or a lost SYN. We keep smoltcp's value rather
//!   than patch it: a lower floor would make spurious retransmissions under
//!   scheduling noise (two shared cores) likely.
//! * **Delayed ACK: 10 ms** (smoltcp's default, Linux uses 40 ms at least).
//!   smoltcp ACKs at once after every second full segment, so bulk transfer
//!   does not wait for the timer; ping-pong piggybacks ACKs on replies. The
//!   timer only shows when a Nagle sender waits for an ACK of a small
//!   segment, where 10 ms is a quarter of the kernel's wait.
//! * **Nagle** on by default, as in the kernel; `TCP_NODELAY` turns it off.
//! * **Buffers**: 256 KiB per direction and connection by default (window
//!   scaling follows from the receive buffer); `SO_RCVBUF`/`SO_SNDBUF` set
//!   before `connect`/`listen` override it.
//!
//! # Not supported
//!
//! `MSG_OOB`, `TCP_KEEPINTVL`/`TCP_KEEPCNT` (smoltcp probes at the idle
//! interval and never gives up on its own), SACK, binding one port on two
//! addresses of an instance, IPv6 TCP segmentation offload (smoltcp 0.14
//! drops IPv6 packets over the MTU even when it asked for segmentation, so
//! IPv6 TCP goes in MTU-sized frames; checksums are still offloaded).
//!
//! # Offloads
//!
//! By default the TAP is opened with a virtio-net header and checksum and
//! TCP segmentation offload (`SmolOptions::offload`, `offload = false` in a
//! config turns it off): smoltcp builds IPv4 TCP segments of up to 64 KiB,
//! the kernel cuts them to the MTU and merges what it sends us, so a bulk
//! transfer costs one `read`/`write` per 64 KiB rather than per 1,500 bytes
//! while the wire keeps its MTU. smoltcp's MSS stays the wire's. Measured
//! (`benches/smol_sockets.py`, 5 rounds, MTU 1500 against the kernel over a
//! veth): upload 0.61x the kernel with offloads against 0.10x without;
//! download 0.42x against 0.17x when the sending kernel runs BBR (this
//! system's default), 0.63x when it runs CUBIC (`--peer-cc cubic`). BBR
//! paces toward a smoltcp receiver slower than toward a kernel one; with
//! CUBIC and 4 MiB buffers the same download reaches 45 Gbit/s, so the
//! limit is the sender's model of the path, not this side's per-frame
//! cost.

#![warn(missing_docs)]

mod config;
mod device;
mod driver;
mod offload;
pub mod ports;
#[macro_use]
mod socket;
mod state;
mod syn_gate;
mod tcp;
mod udp;

use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use smoltcp::iface::{Config, Interface};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress};

/// The TAP device the instance runs over (it lives in [`crate::sys::tap`],
/// shared with the link emulator).
pub use crate::sys::tap;
pub use config::KIND;
pub use smoltcp::wire::IpCidr;

use super::options::OptionError;
use super::{errno, Counters, Family, SockKind, Stack, StackSocket};
use crate::stack::userspace::{lock, SockFds};
use crate::sys::event::EventFd;
use device::TapDevice;
use state::{SockOpts, SockState, State};

/// Default socket buffer per direction and TCP connection.
pub const DEFAULT_BUFFER: usize = 256 * 1024;

/// Largest socket buffer smoltcp takes (it panics above 1 GiB).
pub const MAX_BUFFER: usize = 1 << 30;

/// Smallest socket buffer we accept.
pub const MIN_BUFFER: usize = 1024;

/// Settings of a smoltcp instance.
#[derive(Debug, Clone)]
pub struct SmolOptions {
    /// TAP device name; created if absent, attached to if it exists.
    pub device: String,
    /// The instance's addresses with prefix lengths (IPv4 and/or IPv6).
    pub addresses: Vec<IpCidr>,
    /// Default gateways, at most one per family.
    pub gateways: Vec<IpAddr>,
    /// IP MTU of the device (set on it with `SIOCSIFMTU`).
    pub mtu: u32,
    /// MAC address; `None` derives a locally administered one from the name.
    pub mac: Option<[u8; 6]>,
    /// TCP receive buffer per connection (bytes).
    pub rx_buffer: usize,
    /// TCP send buffer per connection (bytes).
    pub tx_buffer: usize,
    /// Whether application threads run a turn of `Interface::poll`
    /// themselves after queuing data (default), or leave all polling to the
    /// driver thread. Kept as an option so the benchmark can compare both.
    pub inline_poll: bool,
    /// Whether the TAP offloads TCP segmentation and checksums to the
    /// kernel (default): smoltcp then sends and receives TCP in frames of up
    /// to 64 KiB, which the kernel cuts to the MTU and merges back.
    pub offload: bool,
}

impl SmolOptions {
    /// Options for `device` with `addresses` and every default.
    pub fn new(device: impl Into<String>, addresses: Vec<IpCidr>) -> SmolOptions {
        SmolOptions {
            device: device.into(),
            addresses,
            gateways: Vec::new(),
            mtu: 1500,
            mac: None,
            rx_buffer: DEFAULT_BUFFER,
            tx_buffer: DEFAULT_BUFFER,
            inline_poll: true,
            offload: true,
        }
    }

    /// Checks the options; the error says which one is wrong and why.
    pub fn validate(&self) -> io::Result<()> {
        self.check()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.message))
    }

    /// [`SmolOptions::validate`], naming the config field at fault
    /// (`address`, `gateway`, `mtu`, `mac`, `buffer_size`).
    pub fn check(&self) -> Result<(), OptionError> {
        let bad = |field: &str, msg: String| Err(OptionError::new(field, msg));
        if self.addresses.is_empty() {
            return bad("address", "at least one address is needed".into());
        }
        if self.addresses.len() > 4 {
            return bad(
                "address",
                format!(
                    "at most 4 addresses per instance, got {}",
                    self.addresses.len()
                ),
            );
        }
        for a in &self.addresses {
            let ip = a.address();
            if ip.is_unspecified() || ip.is_multicast() || is_broadcast(ip) {
                return bad("address", format!("{a} is not a unicast address"));
            }
        }
        let has = |f: Family| self.addresses.iter().any(|a| family_of(a.address()) == f);
        let mut seen = Vec::new();
        for g in &self.gateways {
            let f = Family::of(&std::net::SocketAddr::new(*g, 0));
            if !has(f) {
                return bad(
                    "gateway",
                    format!("gateway {g} has no address of its family"),
                );
            }
            if seen.contains(&f) {
                return bad("gateway", format!("two gateways for one family ({g})"));
            }
            if g.is_unspecified() || g.is_multicast() {
                return bad("gateway", format!("gateway {g} is not a unicast address"));
            }
            seen.push(f);
        }
        let min = if has(Family::V6) { tap::MTU_MIN } else { 576 };
        if !(min..=tap::MTU_MAX).contains(&self.mtu) {
            return bad(
                "mtu",
                format!("mtu must be {min}..={}, got {}", tap::MTU_MAX, self.mtu),
            );
        }
        if let Some(m) = self.mac {
            if m[0] & 1 != 0 || m == [0; 6] {
                return bad(
                    "mac",
                    format!("mac {} is not a unicast address", fmt_mac(&m)),
                );
            }
        }
        for (what, n) in [("rx_buffer", self.rx_buffer), ("tx_buffer", self.tx_buffer)] {
            if !(MIN_BUFFER..=MAX_BUFFER).contains(&n) {
                return bad(
                    "buffer_size",
                    format!("{what} must be {MIN_BUFFER}..={MAX_BUFFER} bytes, got {n}"),
                );
            }
        }
        Ok(())
    }

    /// The MAC in use: the configured one, else one derived from `name`
    /// (locally administered, unicast).
    fn mac_for(&self, name: &str) -> [u8; 6] {
        if let Some(m) = self.mac {
            return m;
        }
        // FNV-1a over the name: stable across runs, spread over 40 bits.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes().chain(self.device.bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        let b = h.to_be_bytes();
        [0x02, b[1], b[2], b[3], b[4], b[5]]
    }
}

fn family_of(ip: IpAddress) -> Family {
    match ip {
        IpAddress::Ipv4(_) => Family::V4,
        IpAddress::Ipv6(_) => Family::V6,
    }
}

fn is_broadcast(ip: IpAddress) -> bool {
    matches!(ip, IpAddress::Ipv4(v4) if v4.is_broadcast())
}

fn fmt_mac(m: &[u8; 6]) -> String {
    let mut s = String::new();
    for (i, b) in m.iter().enumerate() {
        let _ = write!(s, "{}{b:02x}", if i == 0 { "" } else { ":" });
    }
    s
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// 8 random bytes for seeds (the clock if `getrandom` fails).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: b is valid for 8 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

/// What the driver and application threads share.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Wakes the driver.
    wake: EventFd,
    /// Set (under the lock) while the driver is about to sleep or sleeps.
    sleeping: AtomicBool,
    stop: AtomicBool,
    opts: SmolOptions,
    name: String,
    sockets: AtomicU64,
    connects: AtomicU64,
    restarts: AtomicU64,
}

impl Shared {
    /// Runs a turn in the calling thread after it changed a connection, and
    /// wakes the driver if that moved smoltcp's next deadline before the
    /// driver's.
    fn poll_inline(&self, st: &mut State) {
        if !self.opts.inline_poll {
            if self.sleeping.load(Ordering::SeqCst) {
                self.wake.set();
            }
            return;
        }
        st.turn();
        if self.sleeping.load(Ordering::SeqCst) {
            let next = st.poll_at();
            let earlier = match (next, st.driver_deadline) {
                (Some(n), Some(d)) => n < d,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if earlier {
                st.driver_deadline = next;
                self.wake.set();
            }
        }
    }
}

/// The `device` that names a loopback link instead of a TAP device.
pub const LOOPBACK: &str = "loopback";

/// Opens the device and sets it up: MTU, link up.
fn open_device(opts: &SmolOptions) -> io::Result<TapDevice> {
    if opts.device == LOOPBACK {
        return Ok(TapDevice::loopback(opts.mtu as usize));
    }
    let tap = if opts.offload {
        tap::Tap::open_offload(&opts.device)?
    } else {
        tap::Tap::open(&opts.device)?
    };
    tap.set_mtu(opts.mtu)?;
    tap.set_up()?;
    Ok(TapDevice::new(tap, opts.mtu as usize))
}

/// A smoltcp instance over a TAP device with its driver thread.
pub struct SmolStack {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl SmolStack {
    /// Opens (or creates) the TAP device, configures the interface and
    /// starts the driver thread.
    pub fn new(name: impl Into<String>, opts: SmolOptions) -> io::Result<SmolStack> {
        let name = name.into();
        opts.validate()?;
        let wake = EventFd::new()?;
        let mac = opts.mac_for(&name);
        let seed = random_u64();
        let mut dev = open_device(&opts)?;
        let hardware = if opts.device == LOOPBACK {
            HardwareAddress::Ip
        } else {
            HardwareAddress::Ethernet(EthernetAddress(mac))
        };
        let mut config = Config::new(hardware);
        config.random_seed = seed;
        let epoch = std::time::Instant::now();
        let mut iface = Interface::new(config, &mut dev, smoltcp::time::Instant::from_micros(0));
        let mut addr_err = None;
        iface.update_ip_addrs(|addrs| {
            for a in &opts.addresses {
                if addrs.push(*a).is_err() {
                    addr_err = Some(*a);
                }
            }
        });
        if let Some(a) = addr_err {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("too many addresses at {a}"),
            ));
        }
        for g in &opts.gateways {
            let r = match g {
                IpAddr::V4(v4) => iface.routes_mut().add_default_ipv4_route(*v4),
                IpAddr::V6(v6) => iface.routes_mut().add_default_ipv6_route(*v6),
            };
            r.map_err(|_| io::Error::other(format!("route table full at gateway {g}")))?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(iface, dev, epoch, seed)),
            wake,
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            opts,
            name,
            sockets: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
        });
        let s2 = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("smol-{}", shared.name))
            .spawn(move || driver::run(s2))?;
        Ok(SmolStack {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The options in effect.
    pub fn options(&self) -> &SmolOptions {
        &self.shared.opts
    }

    /// The TAP device's name.
    pub fn device(&self) -> &str {
        &self.shared.opts.device
    }

    /// Whether the instance is up (device working, not stopped).
    pub fn is_up(&self) -> bool {
        lock(&self.shared.state).down.is_none()
    }

    /// Reopens the device (re-creating it if it was deleted) after the
    /// instance went down. Sockets from before stay failed; new ones work.
    /// Fails if the instance was stopped.
    pub fn restart(&self) -> io::Result<()> {
        if self.shared.stop.load(Ordering::SeqCst) {
            return Err(errno(libc::ESHUTDOWN));
        }
        let mut st = lock(&self.shared.state);
        if st.down.is_none() {
            // Drop every connection first, as a device failure would.
            st.go_down(libc::ENETDOWN);
        }
        st.dev = None;
        st.dev = Some(open_device(&self.shared.opts)?);
        st.down = None;
        self.shared.restarts.fetch_add(1, Ordering::Relaxed);
        drop(st);
        self.shared.wake.set();
        Ok(())
    }

    /// Stops the driver thread and closes the device (a device created by
    /// the instance disappears). Every socket then fails with `ENETDOWN`.
    /// Idempotent; dropping the stack does the same.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.set();
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
        let mut st = lock(&self.shared.state);
        if st.down.is_none() {
            st.go_down(libc::ENETDOWN);
        }
        st.dev = None;
    }
}

impl Drop for SmolStack {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Stack for SmolStack {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn protocol(&self) -> &'static str {
        "tcp"
    }

    /// Streams and datagrams, in each family the instance has an address of.
    fn carries(&self, family: Family, _kind: SockKind) -> Result<(), String> {
        let has = self
            .shared
            .opts
            .addresses
            .iter()
            .any(|a| family_of(a.address()) == family);
        if has {
            return Ok(());
        }
        let family = match family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        };
        Err(format!("the instance has no {family} address"))
    }

    /// The host's addresses are not the instance's: anything but one of
    /// its own means "any of mine".
    fn bind_address(&self, family: Family, requested: IpAddr) -> IpAddr {
        let own = self
            .shared
            .opts
            .addresses
            .iter()
            .any(|a| a.address() == IpAddress::from(requested));
        if own {
            requested
        } else {
            crate::stack::userspace::unspecified(family).ip()
        }
    }

    fn attributes(&self) -> Vec<(&'static str, String)> {
        vec![("device", self.shared.opts.device.clone())]
    }

    fn restart(&self) -> io::Result<()> {
        SmolStack::restart(self)
    }

    fn stop(&self) {
        SmolStack::stop(self)
    }

    fn socket(&self, family: Family, kind: SockKind) -> io::Result<Box<dyn StackSocket>> {
        if !self.supports(family, kind) {
            return Err(errno(libc::EAFNOSUPPORT));
        }
        let fds = SockFds::new()?;
        let opts = SockOpts {
            rcvbuf: self.shared.opts.rx_buffer,
            sndbuf: self.shared.opts.tx_buffer,
            nodelay: false,
            keepalive: false,
            keepidle: state::KEEPIDLE_DEFAULT,
            reuseaddr: false,
            reuseport: false,
            v6only: false,
        };
        let mut st = lock(&self.shared.state);
        st.check_up()?;
        let mut state = SockState::new(Arc::clone(&fds), family, opts);
        state.dgram = kind == SockKind::Dgram;
        let id = st.insert(state);
        drop(st);
        self.shared.sockets.fetch_add(1, Ordering::Relaxed);
        let core = socket::SockCore::new(Arc::clone(&self.shared), id, fds, family);
        Ok(match kind {
            SockKind::Stream => Box::new(tcp::TcpSocket::new(core)),
            SockKind::Dgram => Box::new(udp::UdpSocket::new(core)),
        })
    }

    fn counters(&self) -> Counters {
        let s = &self.shared;
        let st = lock(&s.state);
        let d = st.dev.as_ref().map(|d| d.stats()).unwrap_or_default();
        vec![
            ("sockets", s.sockets.load(Ordering::Relaxed)),
            ("connects", s.connects.load(Ordering::Relaxed)),
            ("accepted", st.accepted),
            ("turns", st.turns),
            ("tcp_sockets", st.sockets.tcp_count() as u64),
            ("ports", st.ports.len() as u64),
            ("packets_received", d.frames_in),
            ("packets_sent", d.frames_out),
            ("bytes_received", d.bytes_in),
            ("bytes_sent", d.bytes_out),
            ("tx_dropped", d.tx_dropped),
            ("syn_dropped", d.syn_dropped),
            ("csum_dropped", d.csum_dropped),
            ("tso_frames", d.tso_frames),
            ("down", u64::from(st.down.is_some())),
            ("restarts", s.restarts.load(Ordering::Relaxed)),
        ]
    }

    fn describe(&self) -> String {
        let o = &self.shared.opts;
        let addrs: Vec<String> = o.addresses.iter().map(|a| a.to_string()).collect();
        let state = if self.is_up() { "up" } else { "down" };
        let offload = lock(&self.shared.state)
            .dev
            .as_ref()
            .is_some_and(|d| d.offload());
        format!(
            "smoltcp on TAP {} ({}), mtu {}{}, mac {}, {state}",
            o.device,
            addrs.join(", "),
            o.mtu,
            if offload { " with offloads" } else { "" },
            fmt_mac(&o.mac_for(&self.shared.name)),
        )
    }
}

/// The raw fd of the device, for the driver's poll set.
fn device_fd(st: &State) -> Option<i32> {
    if st.down.is_some() {
        return None;
    }
    st.dev.as_ref().and_then(|d| d.tap()).map(|t| t.as_raw_fd())
}
