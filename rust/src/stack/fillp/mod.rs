//! FillP as a dmm stack: reliable byte streams over UDP, driven by the
//! sans-IO core in [`crate::fillp`].
//!
//! # Design
//!
//! * **One driver thread per instance** owns the UDP sockets and runs the
//!   polling loop of [`crate::fillp`] (receive, timers, events, transmit).
//!   It waits in `ppoll` (nanosecond timeouts, for pacing) on an epoll set
//!   of the UDP sockets and on an eventfd that application threads write to
//!   wake it. Datagrams move in `recvmmsg`/`sendmmsg` batches; a full
//!   socket buffer keeps the rest queued and waits for `POLLOUT` instead of
//!   dropping.
//! * **Work in proportion to what happens.** A wake costs O(ready sockets)
//!   (epoll), and a turn runs only the slots that received, were changed by
//!   an application call, have a timer due (a heap of slot deadlines) or
//!   still have more to send; within a slot the endpoint
//!   ([`crate::fillp::Endpoint`]) keeps the connections touched since it
//!   last looked (by a datagram, a timer, a transmit or the application) in
//!   ready sets, and every connection's deadline in a heap, so a turn looks
//!   only at connections that changed or are due, however many share the
//!   socket. Idle
//!   connections (keepalive every 5 s) cost 1.5% of a core per 1000 pairs
//!   in one process, against 28% when every wake walked every socket
//!   (`benches/results/fillp_idle.md`).
//! * **Segmentation offload** ([`FillpOptions::offload`], on by default):
//!   consecutive datagrams to one peer leave as one GSO `sendmmsg` entry
//!   (`UDP_SEGMENT`, up to 64 datagrams / 64 KiB) and arrive as one GRO
//!   entry (`UDP_GRO`), cut back into datagrams by the driver; over
//!   loopback the kernel then handles one buffer per run, not per datagram.
//!   Measured over loopback, one connection: per-datagram kernel work was
//!   ~4.8 µs of the driver's ~6.2 µs per data packet before (both ends in
//!   one driver thread), and what is left is mostly copying
//!   (`benches/results/fillp_loopback.md`). GSO is probed per socket and
//!   switched off for a socket whose path refuses it (`EIO` from a device
//!   without checksum offload, `EMSGSIZE` for a segment above the device
//!   MTU, ...): the refused datagrams are sent again without it, none lost.
//!   Details in `udp.rs`.
//! * **Datagram size from the route** ([`FillpOptions::path_mtu`], on by
//!   default): a connection offers the route MTU to its peer less the IP
//!   and UDP headers (65,507 bytes over loopback, 8972 on a 9000-byte
//!   route; 1400 on Ethernet-sized routes, less on smaller ones, see
//!   [`path_datagram_size`]), as TCP derives its MSS; the listener takes
//!   the client's offer, and each accepted connection sends no more than
//!   the listener's own route back carries. Over loopback that doubled
//!   throughput and halved the CPU per byte
//!   (`benches/results/fillp_loopback.md`).
//! * **Readers receive inline.** A reader blocked in `recv` waits on its
//!   UDP socket as well as on its readiness eventfd, and when datagrams
//!   arrive it receives and processes them itself (for every connection of
//!   that socket), then sends what is due: the data it waits for reaches it
//!   with no hop through the driver thread and no lock contention with it.
//!   While a reader watches a socket, and for `WATCH_LEASE` (500 µs)
//!   after it leaves, the driver leaves that socket out of its poll set, so
//!   a bulk reader, back within microseconds, is not raced for every batch;
//!   the driver is woken if it would sleep past the lease. The price: a
//!   datagram that arrives in a lease with no reader back waits up to
//!   500 µs for the driver. After a `recv` the reader also sends its
//!   connection's window update itself. A `send` that finds nothing
//!   waiting to go (a request, a reply) sends it itself too; other writers
//!   hand off to the driver (it transmits while the writer copies), and
//!   hear of space only once half the send buffer is free. Measured over
//!   loopback (one connection, instance per end, medians of six passes):
//!   CPU per Gbit 0.32 -> 0.27 s, 5.1 -> 5.3 Gbit/s, context switches per
//!   256 MiB ~25k -> ~13k (`benches/results/fillp_loopback.md`). A reader
//!   watches only while its connection has at most 64 KiB in flight: a
//!   sender blocked in `recv` for the reply that ran its own ACK clock this
//!   way sent its last 16 MiB at ~65% of the link over a 100 ms emulated
//!   path (cause not found). With both, a 1-byte request/response exchange
//!   over loopback wakes no driver thread. A blocking `connect` does the
//!   same for its handshake: it sends the INIT itself and watches its UDP
//!   socket for the COOKIE and the CONN_ACK (not toward a listener of its
//!   own instance, whose driver runs both ends in one turn). Over loopback
//!   between two processes: 2.3-2.4k -> 2.9-3.5k connects/s.
//! * **Two copies in user space, as few as the kernel's own TCP makes in
//!   all.** The application's bytes are copied into the send buffer once;
//!   a datagram then carries them as shared slices of that buffer
//!   ([`crate::fillp::byte_queue`]), which `sendmmsg` gathers as iovecs
//!   behind the header, outside the lock. A received datagram of 16 KiB or
//!   more (loopback-sized, or a GRO run) is lent to its connection whole:
//!   the payload stays a slice of the receive buffer until the application
//!   reads it, and the buffer then serves a later `recvmmsg`. Before, each
//!   byte was also copied into its datagram and into the reassembly queue,
//!   both under the lock. Over loopback, one connection, 10 launches each,
//!   median FillP / kernel TCP went 0.36 -> 0.49 and the slowest launch
//!   0.17 -> 0.40; with the pacer's larger bursts for large datagrams
//!   ([`crate::fillp::pacer`]) 0.39 -> 0.64, 22 Gbit/s
//!   (`benches/results/fillp_loopback.md`).
//! * **Lock holds are short**: application `send`/`recv` move at most
//!   64 KiB per hold of the state lock, and copy it outside the lock (a
//!   `send` under 16 KiB copies inside), so the driver, which takes the
//!   lock for every batch, does not wait behind the application's copies.
//! * **State is shared behind one `Mutex`** (endpoints, sockets, accept
//!   queues) rather than driven by commands over a channel: application
//!   `send`/`recv` then copy straight into and out of the connection's
//!   buffers with no extra copy or hand-off latency, and every operation sees
//!   a consistent state. System calls (`ppoll`, `recvmmsg`, `sendmmsg`) run
//!   outside the lock. The driver is woken only when it sleeps (a flag set
//!   under the lock), so a busy transfer costs no eventfd writes.
//! * **UDP sockets**: one per listener, bound to the listener's port (so
//!   FillP port P pairs with TCP port P) and carrying every connection it
//!   accepts; and one per outgoing connection (its bound port, else an
//!   ephemeral one), so that `(local, peer)` tells connections apart as
//!   with TCP: applications (and asyncio's tests) key their clients by it.
//!   With [`FillpOptions::shared_client_port`] the unbound client
//!   connections of one local IP share one UDP socket instead, told apart
//!   by connection ID: no socket per connect, and one fd per client end.
//!   Each UDP socket has its own `Endpoint`. `bind` reserves the UDP
//!   port at once, so `EADDRINUSE` shows up where a kernel socket would
//!   report it.
//!   `IP_RECVERR` makes an ICMP port-unreachable fail a handshake with
//!   `ECONNREFUSED` at once and reset an established connection whose peer
//!   went away.
//! * **Resumption** ([`FillpOptions::resumption`], on by default): the
//!   ticket of each server's latest CONN_ACK is kept per server address for
//!   30 s ([`tickets`]), and a connect to that address sends CONN_REQ with
//!   it, with no INIT: over loopback, where a connect waits for the
//!   CONN_ACK, that is one round trip instead of two. Measured between two
//!   processes, connect+accept+close: 4.4-4.5k -> 7.2-7.7k/s, connect()
//!   194 -> 116 µs (`benches/results/kernel.md`). A server that refuses the
//!   ticket answers RST and the connect goes on with a full handshake; a
//!   connect that fails drops the ticket.
//! * **Cookie secrets** come from `getrandom`: the first one when an
//!   endpoint is made, then 32 fresh bytes after each rotation of a
//!   listening endpoint's secret (every 60 s, when the core asks through
//!   `Endpoint::wants_cookie_secret`).
//! * **Backlog**: completed handshakes move into the listener's queue up to
//!   `backlog`; the rest wait, established, in the endpoint's own queue (as in
//!   a kernel accept queue, their connects complete) and move up as `accept`
//!   makes room. Closing a listener resets whatever was never accepted.
//! * **Readiness**, as in the smoltcp stack (both are built on the
//!   user-space socket core, `stack::userspace`; this stack's part of its
//!   blocking loop is the inline work above): each socket has two eventfds,
//!   kept in line with its state under the lock. `ready` is readable
//!   exactly while the socket is readable (data, EOF, error, pending
//!   accept); it is the [`StackSocket::poll_fd`] and what blocking
//!   `recv`/`accept` wait on.
//!   `wake` is readable exactly while the socket is writable (connected
//!   with send-buffer room, or an error to report; after a short write,
//!   writable again when the connection says so, at half its path-sized
//!   buffer free: [`crate::fillp::Connection::is_writable`]); it is the
//!   [`StackSocket::write_poll_fd`] and what blocking `send`/`connect` wait
//!   on.
//!   Waits use `poll(2)`, so a signal returns `EINTR` to the caller; the
//!   driver thread blocks all signals so that they reach application threads.
//!
//! # Not supported
//!
//! * Datagram sockets (`supports` is streams only), `MSG_OOB` (`MSG_PEEK` is supported).
//! * Zero-copy between the application and the stack: `send` copies into
//!   the send buffer and `recv` out of the received datagrams (and the
//!   kernel once each way), four copies per byte against kernel TCP's two.
//!   Small received datagrams are still copied into the reassembly queue.
//! * Idle connections at no cost: a wake reconciles the epoll interest
//!   only of slots whose interest may change (new, watched, leased,
//!   waiting for `POLLOUT`), but every connection keeps a keepalive timer,
//!   so 10,000 idle connections cost 5-8% of a core on each side
//!   (`benches/fillp_idle.rs`).
//! * Spreading one instance over several driver threads: one thread runs
//!   every endpoint of an instance; run several instances to use more cores.
//! * A socket closed with no unread data closes gracefully; new data that
//!   arrives after the close resets the connection, as in TCP; with unread
//!   data or `SO_LINGER` at {on, 0 s}, close is an abort (RST). A linger time above zero is kept but `close` does
//!   not wait for it: the stack finishes sending in the background.

#![warn(missing_docs)]

mod config;
mod driver;
mod inline;
mod options;
mod routes;
mod socket;
mod state;
mod tickets;
mod udp;

pub use config::KIND;
pub use options::{parse_rate_mode, path_datagram_size, FillpOptions};
pub use socket::FillpSocket;
pub use udp::UDP_PAYLOAD_MAX;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use std::net::{IpAddr, SocketAddr};

use super::{errno, Counters, Family, SockKind, Stack, StackSocket};
use crate::fillp::{EndpointStats, RateMode};
use crate::stack::userspace::{lock, SockFds};
use crate::sys::event::EventFd;
use driver::{Driver, Pump};
use state::{Role, SockState, State};

/// A FillP stack instance: one driver thread and its UDP sockets.
pub struct FillpStack {
    name: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the driver and application threads share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the driver.
    wake: EventFd,
    /// Set (under the lock) while the driver is about to sleep or sleeps.
    sleeping: AtomicBool,
    stop: AtomicBool,
    opts: FillpOptions,
    sockets: AtomicU64,
    connects: AtomicU64,
    /// Client handshakes done with a ticket, and tickets servers refused.
    resumed: AtomicU64,
    resumptions_refused: AtomicU64,
    accepted: AtomicU64,
    udp_sent: AtomicU64,
    udp_received: AtomicU64,
    udp_send_errors: AtomicU64,
    /// Sockets whose path refused GSO (turned off for them).
    gso_disabled: AtomicU64,
    icmp_errors: AtomicU64,
    /// When the sleeping driver will wake on its own, in nanoseconds since
    /// `epoch` (`u64::MAX`: not before an event).
    driver_wake_at: AtomicU64,
    epoch: Instant,
    /// Spare pumps for readers that receive inline.
    pumps: Mutex<Vec<Pump>>,
    /// The kernel's recent answers on routes to peers.
    routes: routes::RouteCache,
}

impl Shared {
    /// Makes the driver run slot `slot`'s turn: marks it and wakes the
    /// driver if it sleeps. Called with the lock held (`st`) after changing
    /// a connection; the driver checks for marked slots under the lock
    /// before it sleeps, so no change is missed and a busy driver costs no
    /// eventfd write.
    fn kick(&self, st: &mut State, slot: usize) {
        st.mark(slot);
        if self.sleeping.load(Ordering::SeqCst) {
            self.wake.set();
        }
    }
}

impl FillpStack {
    /// Creates an instance and starts its driver thread.
    pub fn new(name: impl Into<String>, opts: FillpOptions) -> io::Result<FillpStack> {
        let name = name.into();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: EventFd::new()?,
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            opts,
            sockets: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            resumptions_refused: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            udp_sent: AtomicU64::new(0),
            udp_received: AtomicU64::new(0),
            udp_send_errors: AtomicU64::new(0),
            gso_disabled: AtomicU64::new(0),
            icmp_errors: AtomicU64::new(0),
            driver_wake_at: AtomicU64::new(0),
            epoch: Instant::now(),
            pumps: Mutex::new(Vec::new()),
            routes: routes::RouteCache::default(),
        });
        let s2 = Arc::clone(&shared);
        let epoll = udp::Epoll::new()?;
        let thread = std::thread::Builder::new()
            .name(format!("fillp-{name}"))
            .spawn(move || Driver::new(s2, epoll).run())?;
        Ok(FillpStack {
            name,
            shared,
            thread: Some(thread),
        })
    }

    /// The options in effect.
    pub fn options(&self) -> &FillpOptions {
        &self.shared.opts
    }
}

impl Drop for FillpStack {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.set();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Stack for FillpStack {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn protocol(&self) -> &'static str {
        "fillp"
    }

    /// Streams of the family its UDP sockets bind in.
    fn carries(&self, family: Family, kind: SockKind) -> Result<(), String> {
        if kind != SockKind::Stream {
            return Err("FillP carries stream sockets only".into());
        }
        let own = Family::of(&SocketAddr::new(self.shared.opts.bind_ip, 0));
        if family != own {
            let name = if own == Family::V6 { "IPv6" } else { "IPv4" };
            return Err(format!("this instance's UDP sockets are {name}"));
        }
        Ok(())
    }

    /// The wildcard becomes the instance's own bind address.
    fn bind_address(&self, _family: Family, requested: IpAddr) -> IpAddr {
        if requested.is_unspecified() {
            self.shared.opts.bind_ip
        } else {
            requested
        }
    }

    fn socket(&self, family: Family, kind: SockKind) -> io::Result<Box<dyn StackSocket>> {
        if kind != SockKind::Stream {
            return Err(errno(libc::EPROTONOSUPPORT));
        }
        let fds = SockFds::new()?;
        let mut st = lock(&self.shared.state);
        let id = st.next_id;
        st.next_id += 1;
        st.socks
            .insert(id, SockState::new(Arc::clone(&fds), Role::Fresh));
        drop(st);
        self.shared.sockets.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(FillpSocket::new(
            Arc::clone(&self.shared),
            id,
            fds,
            family,
        )))
    }

    fn counters(&self) -> Counters {
        let s = &self.shared;
        let st = lock(&s.state);
        let mut e = EndpointStats::default();
        let mut conns = 0u64;
        for slot in st.slots.values() {
            let x = slot.ep.stats();
            e.datagrams += x.datagrams;
            e.malformed += x.malformed;
            e.unknown_cid += x.unknown_cid;
            e.wrong_address += x.wrong_address;
            e.bad_cookies += x.bad_cookies;
            e.stale_cookies += x.stale_cookies;
            e.cookie_rotations += x.cookie_rotations;
            e.resumed += x.resumed;
            e.bad_tickets += x.bad_tickets;
            e.stale_tickets += x.stale_tickets;
            e.refused += x.refused;
            e.discovery_queries += x.discovery_queries;
            e.discovery_answers += x.discovery_answers;
            conns += slot.ep.connection_count() as u64;
        }
        let udp_sockets = st.slots.len() as u64;
        let tickets = st.tickets.servers() as u64;
        drop(st);
        vec![
            ("sockets", s.sockets.load(Ordering::Relaxed)),
            ("connects", s.connects.load(Ordering::Relaxed)),
            ("resumed", s.resumed.load(Ordering::Relaxed)),
            (
                "resumptions_refused",
                s.resumptions_refused.load(Ordering::Relaxed),
            ),
            ("accepted", s.accepted.load(Ordering::Relaxed)),
            ("connections", conns),
            ("udp_sockets", udp_sockets),
            ("tickets", tickets),
            ("packets_sent", s.udp_sent.load(Ordering::Relaxed)),
            ("packets_received", s.udp_received.load(Ordering::Relaxed)),
            ("udp_send_errors", s.udp_send_errors.load(Ordering::Relaxed)),
            ("gso_disabled", s.gso_disabled.load(Ordering::Relaxed)),
            ("icmp_errors", s.icmp_errors.load(Ordering::Relaxed)),
            ("malformed", e.malformed),
            ("unknown_cid", e.unknown_cid),
            ("wrong_address", e.wrong_address),
            ("bad_cookies", e.bad_cookies),
            ("stale_cookies", e.stale_cookies),
            ("cookie_rotations", e.cookie_rotations),
            ("accepted_resumed", e.resumed),
            ("bad_tickets", e.bad_tickets),
            ("stale_tickets", e.stale_tickets),
            ("refused", e.refused),
            ("discovery_queries", e.discovery_queries),
            ("discovery_answers", e.discovery_answers),
        ]
    }

    fn describe(&self) -> String {
        let c = &self.shared.opts.connection;
        let mode = match c.mode {
            RateMode::Bbr => "bbr",
            RateMode::Fillp => "fillp",
            RateMode::Fixed => "fixed",
        };
        let size = if self.shared.opts.path_mtu {
            "datagrams sized from the route".to_string()
        } else {
            format!("{}-byte datagrams", c.mtu)
        };
        format!(
            "fillp over UDP on {}, rate control {mode}, {size}",
            self.shared.opts.bind_ip
        )
    }
}
