//! FillP stream sockets: the [`StackSocket`] methods over the shared state.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::inline::Watch;
use super::state::{lock, new_endpoint, reason_errno, Role, Slot, SockFds, State, StreamView};
use super::{udp, Shared};
use crate::fillp::{CloseReason, ConnectionHandle, ConnectionStats, ReadError, WriteError};
use crate::stack::{
    errno, int_at, int_option, timed_out, Counters, Family, Readiness, StackSocket, TimeoutCell,
};
use crate::sys;

/// One FillP stream socket.
pub struct FillpSocket {
    shared: Arc<Shared>,
    id: u64,
    fds: Arc<SockFds>,
    family: Family,
    timeout: TimeoutCell,
    closed: AtomicBool,
    /// A buffer for the next large `send` to copy into before it takes the
    /// lock: one the send buffer freed (acknowledged data), so that a bulk
    /// writer reuses a few warm allocations instead of calling `malloc`.
    stage: Mutex<Option<BytesMut>>,
    /// `SO_LINGER`: `-1` off, else the linger time in seconds (0: close
    /// aborts with a RST, as in TCP).
    linger: AtomicI64,
}

/// A `send` piece at least this long is copied before the lock is taken
/// and kept as it is ([`crate::fillp::Connection::write_shared`]); a
/// shorter one is copied into the send buffer under the lock, where it
/// shares an allocation with its neighbours instead of pinning its own.
const STAGE_MIN: usize = 16 << 10;

/// What a blocked operation waits for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The `ready` eventfd (level: readable state).
    Read,
    /// The `wake` eventfd (edge: drained under the lock before waiting).
    Write,
}

/// The outcome of one attempt of an operation.
enum Try<T> {
    Done(io::Result<T>),
    Block,
}

impl FillpSocket {
    pub(super) fn new(
        shared: Arc<Shared>,
        id: u64,
        fds: Arc<SockFds>,
        family: Family,
    ) -> FillpSocket {
        FillpSocket {
            shared,
            id,
            fds,
            family,
            timeout: TimeoutCell::new(),
            closed: AtomicBool::new(false),
            stage: Mutex::new(None),
            linger: AtomicI64::new(-1),
        }
    }

    fn check_open(&self) -> io::Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(errno(libc::EBADF));
        }
        Ok(())
    }

    /// Runs `op` under the lock until it is done, waiting on `wait` between
    /// attempts as the timeout mode says (`nonblock` forces non-blocking).
    fn run<T>(
        &self,
        wait: Wait,
        nonblock: bool,
        op: impl FnMut(&mut State, &mut SockCtx) -> Try<T>,
    ) -> io::Result<T> {
        self.run_until(wait, nonblock, None, op)
    }

    /// [`Self::run`], with `until` (when given, and the socket has a
    /// timeout) as the deadline instead of one timeout from now.
    fn run_until<T>(
        &self,
        wait: Wait,
        nonblock: bool,
        until: Option<Instant>,
        mut op: impl FnMut(&mut State, &mut SockCtx) -> Try<T>,
    ) -> io::Result<T> {
        self.check_open()?;
        let timeout = if nonblock {
            Some(Duration::ZERO)
        } else {
            self.timeout()
        };
        let deadline = match (timeout, until) {
            (Some(t), Some(u)) if !t.is_zero() => Some(u),
            _ => timeout.map(|t| Instant::now() + t),
        };
        // While a reader waits it also watches its slot's UDP socket, and
        // takes what arrives itself (see "Readers receive inline" in
        // the module docs of `stack::fillp`).
        let mut watch: Option<Watch<'_>> = None;
        let mut arrived: Option<usize> = None;
        loop {
            drop(watch.take());
            let pumped = match arrived.take() {
                Some(i) => {
                    self.shared.pump_inline(i, self.id);
                    true
                }
                None => false,
            };
            {
                let mut st = lock(&self.shared.state);
                let mut ctx = SockCtx {
                    kick: None,
                    flush: None,
                };
                let r = op(&mut st, &mut ctx);
                if pumped {
                    // `pump_inline` left this socket's eventfds to us.
                    st.sync(self.id);
                }
                if let Some(i) = ctx.kick {
                    self.shared.kick(&mut st, i);
                }
                if let Try::Done(r) = r {
                    if let Some((i, h)) = ctx.flush {
                        self.shared.flush_inline(st, i, h);
                    }
                    return r;
                }
                if self.shared.stop.load(Ordering::SeqCst) {
                    return Err(errno(libc::ENETDOWN));
                }
                if wait == Wait::Read && timeout.is_none_or(|t| !t.is_zero()) {
                    watch = Watch::new(&self.shared, &mut st, self.id);
                }
            }
            if timeout.is_some_and(|t| t.is_zero()) {
                return Err(errno(libc::EAGAIN));
            }
            let fd = match wait {
                Wait::Read => self.fds.ready.as_raw_fd(),
                Wait::Write => self.fds.wake.as_raw_fd(),
            };
            let Some(also) = sys::wait_readable_or(fd, watch.as_ref().map(|w| w.fd), deadline)?
            else {
                return Err(timed_out());
            };
            if also & (libc::POLLIN | libc::POLLERR) != 0 {
                arrived = watch.as_ref().map(|w| w.slot);
            }
            self.check_open()?;
        }
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, State>> {
        self.check_open()?;
        Ok(lock(&self.shared.state))
    }

    /// One piece of a `send`, under one hold of the lock. A large piece is
    /// copied first, outside it, so the driver does not wait behind the copy.
    fn send_piece(&self, buf: &[u8], nonblock: bool, until: Option<Instant>) -> io::Result<usize> {
        let staged = (buf.len() >= STAGE_MIN).then(|| {
            let mut stage = self
                .stage
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .filter(|b| b.capacity() >= buf.len())
                .unwrap_or_else(|| BytesMut::with_capacity(buf.len()));
            stage.clear();
            stage.extend_from_slice(buf);
            stage.freeze()
        });
        let mut spare = None;
        let r = self.run_until(Wait::Write, nonblock, until, |st, ctx| {
            let v = match st.stream(self.id) {
                Ok(v) => v,
                Err(e) => return Try::Done(Err(e)),
            };
            if v.shut_wr {
                return Try::Done(Err(errno(libc::EPIPE)));
            }
            let StreamView {
                slot,
                h,
                established,
                closed,
                ..
            } = v;
            if !established {
                return match closed {
                    Some(r) => Try::Done(Err(errno(reason_errno(r, false)))),
                    None => Try::Block,
                };
            }
            let Some(conn) = st.slot_mut(slot).and_then(|sl| sl.ep.connection_mut(h)) else {
                let r = closed.unwrap_or(CloseReason::Finished);
                return Try::Done(Err(errno(reason_errno(r, true))));
            };
            if buf.is_empty() {
                return Try::Done(Ok(0));
            }
            // Nothing waited to go: a request or reply. Its sender sends
            // it, as a reader sends its window update, rather than hand it
            // to the driver (a thread wake-up each way per exchange).
            let idle = staged.is_none() && !conn.has_unsent();
            let written = match &staged {
                Some(b) => conn.write_shared(b),
                None => conn.write(buf),
            };
            if spare.is_none() && staged.is_some() {
                spare = conn.take_spare_buffer();
            }
            let r = match written {
                Ok(n) => {
                    if idle {
                        ctx.flush = Some((slot, h));
                    } else {
                        ctx.kick = Some(slot);
                    }
                    Try::Done(Ok(n))
                }
                Err(WriteError::Blocked) => Try::Block,
                Err(WriteError::Finished) => Try::Done(Err(errno(libc::EPIPE))),
                Err(WriteError::Closed) => {
                    // The driver may not have passed the Closed event on yet:
                    // the connection itself knows why it ended (a reset must
                    // read ECONNRESET, not EPIPE).
                    let r = closed
                        .or_else(|| conn.close_reason())
                        .unwrap_or(CloseReason::Finished);
                    Try::Done(Err(errno(reason_errno(r, true))))
                }
            };
            st.sync(self.id);
            r
        });
        if spare.is_some() {
            *self.stage.lock().unwrap_or_else(|p| p.into_inner()) = spare;
        }
        r
    }

    /// One piece of a `recv`, under one hold of the lock.
    fn recv_piece(&self, buf: &mut [u8], nonblock: bool) -> io::Result<usize> {
        // The bytes are taken under the lock as shared pieces and copied
        // into `buf` after it is released, so the driver does not wait
        // behind the copy.
        let mut pieces = Vec::new();
        let n = self.run(Wait::Read, nonblock, |st, ctx| {
            let v = match st.stream(self.id) {
                Ok(v) => v,
                Err(e) => return Try::Done(Err(e)),
            };
            if v.shut_rd {
                return Try::Done(Ok(0));
            }
            let StreamView {
                slot,
                h,
                established,
                closed,
                ..
            } = v;
            let gone = |r: Option<CloseReason>| match r {
                None | Some(CloseReason::Finished) => Try::Done(Ok(0)),
                Some(r) => Try::Done(Err(errno(reason_errno(r, established)))),
            };
            if !established {
                return match closed {
                    Some(_) => gone(closed),
                    None => Try::Block,
                };
            }
            let Some(conn) = st.slot_mut(slot).and_then(|sl| sl.ep.connection_mut(h)) else {
                return gone(closed);
            };
            pieces.clear();
            let r = match conn.read_shared(buf.len(), &mut pieces) {
                Ok(n) => {
                    // Reading opens the window: a PACK may be due, and the
                    // reader sends it rather than wake the driver.
                    if n > 0 {
                        ctx.flush = Some((slot, h));
                    }
                    Try::Done(Ok(n))
                }
                Err(ReadError::Blocked) => match closed {
                    Some(_) => gone(closed),
                    None => Try::Block,
                },
                Err(ReadError::Reset) => Try::Done(Err(errno(libc::ECONNRESET))),
                Err(ReadError::Closed) => gone(closed.or(Some(CloseReason::Finished))),
            };
            st.sync(self.id);
            r
        })?;
        let mut at = 0;
        for p in &pieces {
            // `read_shared` took at most `buf.len()` bytes.
            let Some(dst) = buf.get_mut(at..at + p.len()) else {
                break;
            };
            dst.copy_from_slice(p);
            at += p.len();
        }
        Ok(n.min(at))
    }
}

/// Bytes an application `send` or `recv` copies per hold of the stack lock.
/// A 1 MiB copy holds it for 100 µs or more, and the driver, which needs it
/// for every batch, waited up to 40% of its time (measured over loopback).
const COPY_CHUNK: usize = 64 << 10;

/// Runs a `send`/`recv` of `len` bytes as pieces of at most [`COPY_CHUNK`]
/// (`piece(range, nonblock)`), releasing the lock in between. Only the
/// first piece may block; the call returns what was copied as soon as a
/// piece comes up short or fails (the next call reports the error).
fn chunked(
    len: usize,
    nonblock: bool,
    mut piece: impl FnMut(std::ops::Range<usize>, bool) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut done = 0;
    loop {
        let end = (done + COPY_CHUNK).min(len);
        match piece(done..end, nonblock || done > 0) {
            Ok(n) => {
                let want = end - done;
                done += n.min(want);
                if n < want || done >= len {
                    return Ok(done);
                }
            }
            Err(_) if done > 0 => return Ok(done),
            Err(e) => return Err(e),
        }
    }
}

/// Per-attempt flags an operation sets.
struct SockCtx {
    /// A connection of this slot changed: the driver must run it.
    kick: Option<usize>,
    /// Connection `(slot, handle)` was read from, or written to while idle:
    /// send what it has to send now (see [`Shared::flush_inline`]) instead
    /// of waking the driver.
    flush: Option<(usize, ConnectionHandle)>,
}

impl Drop for FillpSocket {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The unspecified address of a family, port 0.
pub(super) fn unspecified(family: Family) -> SocketAddr {
    match family {
        Family::V4 => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        Family::V6 => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

impl StackSocket for FillpSocket {
    fn bind(&self, addr: SocketAddr) -> io::Result<()> {
        if Family::of(&addr) != self.family {
            return Err(errno(libc::EAFNOSUPPORT));
        }
        let mut st = self.lock()?;
        let s = st
            .socks
            .get_mut(&self.id)
            .ok_or_else(|| errno(libc::EBADF))?;
        if !matches!(s.role, Role::Fresh) {
            return Err(errno(libc::EINVAL));
        }
        let fd = udp::bind(addr, self.shared.opts.offload)?;
        let local = udp::local_addr(fd.as_raw_fd())?;
        s.local = Some(local);
        s.role = Role::Bound(fd, local);
        Ok(())
    }

    fn listen(&self, backlog: i32) -> io::Result<()> {
        let cap = backlog.clamp(1, 65535) as usize;
        if matches!(
            lock(&self.shared.state)
                .socks
                .get(&self.id)
                .map(|s| &s.role),
            Some(Role::Fresh)
        ) {
            // Like the kernel, listening unbound binds an ephemeral port.
            let ip = match (self.family, self.shared.opts.bind_ip) {
                (Family::V4, ip @ IpAddr::V4(_)) | (Family::V6, ip @ IpAddr::V6(_)) => ip,
                (f, _) => unspecified(f).ip(),
            };
            self.bind(SocketAddr::new(ip, 0))?;
        }
        let mut st = self.lock()?;
        let st = &mut *st;
        let s = st
            .socks
            .get_mut(&self.id)
            .ok_or_else(|| errno(libc::EBADF))?;
        match std::mem::replace(&mut s.role, Role::Fresh) {
            Role::Bound(fd, local) => {
                let ep = new_endpoint(&self.shared.opts, true);
                let slot = st.add_slot(Slot::new(fd, local, ep, Some(self.id)));
                if let Some(s) = st.socks.get_mut(&self.id) {
                    s.role = Role::Listening {
                        slot,
                        backlog: VecDeque::new(),
                        cap,
                    };
                }
                self.shared.kick(st, slot);
                Ok(())
            }
            Role::Listening {
                slot,
                backlog,
                cap: _,
            } => {
                s.role = Role::Listening { slot, backlog, cap };
                Ok(())
            }
            other => {
                s.role = other;
                Err(errno(libc::EINVAL))
            }
        }
    }

    fn accept(&self) -> io::Result<(Box<dyn StackSocket>, SocketAddr)> {
        let (id, fds, peer) = self.run(Wait::Read, false, |st, _| {
            let Some(s) = st.socks.get_mut(&self.id) else {
                return Try::Done(Err(errno(libc::EBADF)));
            };
            if let Some(e) = s.fatal {
                return Try::Done(Err(errno(e)));
            }
            let Role::Listening { backlog, .. } = &mut s.role else {
                return Try::Done(Err(errno(libc::EINVAL)));
            };
            let Some(id) = backlog.pop_front() else {
                return Try::Block;
            };
            let slot = match s.role {
                Role::Listening { slot, .. } => slot,
                _ => usize::MAX,
            };
            st.admit(slot, &self.shared);
            st.sync(self.id);
            match st.socks.get(&id) {
                Some(c) => Try::Done(Ok((
                    id,
                    Arc::clone(&c.fds),
                    c.peer.unwrap_or_else(|| unspecified(self.family)),
                ))),
                None => Try::Block,
            }
        })?;
        self.shared.sockets.fetch_add(1, Ordering::Relaxed);
        let sock = FillpSocket::new(Arc::clone(&self.shared), id, fds, self.family);
        Ok((Box::new(sock), peer))
    }

    fn connect(&self, addr: SocketAddr) -> io::Result<()> {
        if Family::of(&addr) != self.family {
            return Err(errno(libc::EAFNOSUPPORT));
        }
        // Like TCP, connecting to the unspecified address means loopback.
        let addr = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
            }
            _ => addr,
        };
        {
            let mut st = self.lock()?;
            let st = &mut *st;
            let s = st.socks.get(&self.id).ok_or_else(|| errno(libc::EBADF))?;
            match s.role {
                Role::Conn {
                    established: true, ..
                } if s.closed.is_none() => return Err(errno(libc::EISCONN)),
                Role::Conn {
                    established: false, ..
                } if s.closed.is_none() && s.error.is_none() => return Err(errno(libc::EALREADY)),
                Role::Listening { .. } => return Err(errno(libc::EINVAL)),
                _ => {}
            }
            let bound = match st.socks.get_mut(&self.id).map(|s| &mut s.role) {
                Some(role @ Role::Bound(..)) => match std::mem::replace(role, Role::Fresh) {
                    Role::Bound(fd, local) => Some((fd, local)),
                    _ => None,
                },
                _ => None,
            };
            let slot = st.client_slot(&self.shared.opts, self.family, bound)?;
            let sl = st.slot_mut(slot).ok_or_else(|| errno(libc::ENETDOWN))?;
            let route = udp::route_to(addr).ok();
            let opts = &self.shared.opts;
            let mut config = opts.connection.clone();
            if let Some(size) = opts.size_for(route, addr) {
                config.mtu = size;
            }
            let h = sl
                .ep
                .connect_with(Instant::now(), addr, config)
                .map_err(|_| errno(libc::EADDRNOTAVAIL))?;
            let mut local = sl.local;
            if local.ip().is_unspecified() {
                if let Some(r) = route {
                    local.set_ip(r.source);
                }
            }
            if let Some(Role::Conn { slot, h, .. }) = st.socks.get(&self.id).map(|s| &s.role) {
                st.by_conn.remove(&(*slot, *h));
            }
            st.by_conn.insert((slot, h), self.id);
            let s = st
                .socks
                .get_mut(&self.id)
                .ok_or_else(|| errno(libc::EBADF))?;
            s.role = Role::Conn {
                slot,
                h,
                established: false,
            };
            s.peer = Some(addr);
            s.local = Some(local);
            s.error = None;
            s.closed = None;
            s.fatal = None;
            s.stats = ConnectionStats::default();
            st.sync(self.id);
            self.shared.connects.fetch_add(1, Ordering::Relaxed);
            self.shared.kick(st, slot);
        }
        if self.timeout().is_some_and(|t| t.is_zero()) {
            return Err(errno(libc::EINPROGRESS));
        }
        self.run(Wait::Write, false, |st, _| {
            let Some(s) = st.socks.get_mut(&self.id) else {
                return Try::Done(Err(errno(libc::EBADF)));
            };
            if let Some(e) = s.error.take().or(s.fatal) {
                st.sync(self.id);
                return Try::Done(Err(errno(e)));
            }
            match s.role {
                Role::Conn {
                    established: true, ..
                } => Try::Done(Ok(())),
                _ => Try::Block,
            }
        })
    }

    fn send(&self, buf: &[u8], flags: i32) -> io::Result<usize> {
        self.send_until(buf, flags, None)
    }

    fn send_until(&self, buf: &[u8], flags: i32, deadline: Option<Instant>) -> io::Result<usize> {
        let nonblock = flags & libc::MSG_DONTWAIT != 0;
        chunked(buf.len(), nonblock, |r, nb| {
            self.send_piece(&buf[r], nb, deadline)
        })
    }

    fn send_to(&self, buf: &[u8], flags: i32, _addr: SocketAddr) -> io::Result<usize> {
        // A connected stream socket ignores the address, as TCP does.
        self.send(buf, flags)
    }

    fn recv(&self, buf: &mut [u8], flags: i32) -> io::Result<usize> {
        if flags & (libc::MSG_PEEK | libc::MSG_OOB) != 0 {
            return Err(errno(libc::EOPNOTSUPP));
        }
        let nonblock = flags & libc::MSG_DONTWAIT != 0;
        chunked(buf.len(), nonblock, |r, nb| {
            self.recv_piece(&mut buf[r], nb)
        })
    }

    fn recv_from(&self, buf: &mut [u8], flags: i32) -> io::Result<(usize, Option<SocketAddr>)> {
        let n = self.recv(buf, flags)?;
        Ok((n, self.peer_addr().ok()))
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut st = self.lock()?;
        let st = &mut *st;
        let s = st
            .socks
            .get_mut(&self.id)
            .ok_or_else(|| errno(libc::EBADF))?;
        let Role::Conn {
            slot,
            h,
            established: true,
        } = s.role
        else {
            return Err(errno(libc::ENOTCONN));
        };
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            s.shut_rd = true;
        }
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            s.shut_wr = true;
            if let Some(c) = st.slot_mut(slot).and_then(|sl| sl.ep.connection_mut(h)) {
                c.shutdown_write();
            }
        }
        st.sync(self.id);
        self.shared.kick(st, slot);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut st = lock(&self.shared.state);
        let st = &mut *st;
        let Some(s) = st.socks.remove(&self.id) else {
            return Ok(());
        };
        let changed = match s.role {
            Role::Conn { slot, h, .. } => {
                st.by_conn.remove(&(slot, h));
                let abort = self.linger.load(Ordering::Relaxed) == 0;
                if let Some(c) = st.slot_mut(slot).and_then(|sl| sl.ep.connection_mut(h)) {
                    // Unread data, or a zero linger time, makes close an
                    // abort, as in TCP.
                    if abort || c.readable_bytes() > 0 {
                        c.reset();
                    } else {
                        c.close();
                    }
                }
                Some(slot)
            }
            Role::Listening { slot, backlog, .. } => {
                for id in backlog {
                    if let Some(Role::Conn { slot, h, .. }) = st.socks.remove(&id).map(|c| c.role) {
                        st.by_conn.remove(&(slot, h));
                        if let Some(c) = st.slot_mut(slot).and_then(|sl| sl.ep.connection_mut(h)) {
                            c.reset();
                        }
                    }
                }
                if let Some(sl) = st.slot_mut(slot) {
                    sl.listener = None;
                }
                st.admit(slot, &self.shared);
                Some(slot)
            }
            Role::Fresh | Role::Bound(..) => None,
        };
        // Wake any thread blocked on this socket so it sees EBADF.
        self.fds.ready.set();
        self.fds.wake.set();
        if let Some(slot) = changed {
            self.shared.kick(st, slot);
        }
        Ok(())
    }

    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.check_open()?;
        self.timeout.set(timeout);
        Ok(())
    }

    fn timeout(&self) -> Option<Duration> {
        self.timeout.get()
    }

    fn set_option(&self, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
        self.check_open()?;
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_LINGER) => {
                let (on, secs) = (int_at(value, 0)?, int_at(value, 4)?);
                let v = if on == 0 { -1 } else { i64::from(secs.max(0)) };
                self.linger.store(v, Ordering::Relaxed);
                Ok(())
            }
            // Accepted for compatibility; FillP sizes its own buffers.
            (libc::SOL_SOCKET, libc::SO_RCVBUF | libc::SO_SNDBUF)
            | (libc::SOL_SOCKET, libc::SO_REUSEADDR | libc::SO_REUSEPORT | libc::SO_KEEPALIVE)
            | (libc::IPPROTO_TCP, libc::TCP_NODELAY) => Ok(()),
            _ => Err(errno(libc::ENOPROTOOPT)),
        }
    }

    fn get_option(&self, level: i32, name: i32, len: usize) -> io::Result<Vec<u8>> {
        if (level, name) == (libc::SOL_SOCKET, libc::SO_LINGER) {
            self.check_open()?;
            let v = self.linger.load(Ordering::Relaxed);
            let (on, secs) = if v < 0 { (0, 0) } else { (1, v as i32) };
            return Ok(int_option(&[on, secs], len));
        }
        let mut st = self.lock()?;
        let c = &self.shared.opts.connection;
        let v: i32 = match (level, name) {
            (libc::SOL_SOCKET, libc::SO_ERROR) => {
                let e = st
                    .socks
                    .get_mut(&self.id)
                    .and_then(|s| s.error.take())
                    .unwrap_or(0);
                st.sync(self.id);
                e
            }
            (libc::SOL_SOCKET, libc::SO_TYPE) => libc::SOCK_STREAM,
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => c.recv_window.min(i32::MAX as u32) as i32,
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => c.send_buffer.min(i32::MAX as usize) as i32,
            (libc::SOL_SOCKET, libc::SO_REUSEADDR | libc::SO_REUSEPORT | libc::SO_KEEPALIVE) => 0,
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => 1,
            _ => return Err(errno(libc::ENOPROTOOPT)),
        };
        Ok(int_option(&[v], len))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        let st = self.lock()?;
        let s = st.socks.get(&self.id).ok_or_else(|| errno(libc::EBADF))?;
        Ok(s.local.unwrap_or_else(|| unspecified(self.family)))
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        let st = self.lock()?;
        let s = st.socks.get(&self.id).ok_or_else(|| errno(libc::EBADF))?;
        match (&s.role, s.peer) {
            (
                Role::Conn {
                    established: true, ..
                },
                Some(p),
            ) => Ok(p),
            _ => Err(errno(libc::ENOTCONN)),
        }
    }

    fn write_poll_fd(&self) -> Option<RawFd> {
        Some(self.fds.wake.as_raw_fd())
    }

    fn poll_fd(&self) -> RawFd {
        self.fds.ready.as_raw_fd()
    }

    fn readiness(&self) -> Readiness {
        let Ok(st) = self.lock() else {
            return Readiness {
                error: true,
                ..Readiness::default()
            };
        };
        let Some(s) = st.socks.get(&self.id) else {
            return Readiness::default();
        };
        let error = s.error.is_some() || s.fatal.is_some();
        let readable = st.readable(self.id);
        let writable = st.writable(self.id);
        Readiness {
            readable,
            writable,
            error,
        }
    }

    fn counters(&self) -> Counters {
        let Ok(st) = self.lock() else {
            return Vec::new();
        };
        let Some(s) = st.socks.get(&self.id) else {
            return Vec::new();
        };
        let stats = match s.role {
            Role::Conn { slot, h, .. } => st
                .slot(slot)
                .and_then(|sl| sl.ep.connection(h))
                .map_or(s.stats, |c| c.stats()),
            _ => return Vec::new(),
        };
        vec![
            ("bytes_sent", stats.bytes_sent),
            ("bytes_received", stats.bytes_received),
            ("bytes_acked", stats.bytes_acked),
            ("bytes_read", stats.bytes_read),
            ("packets_sent", stats.packets_sent),
            ("packets_received", stats.packets_received),
            ("retransmits", stats.retransmissions),
            ("duplicate_bytes", stats.duplicate_bytes),
            ("dropped", stats.dropped),
            ("rto_count", stats.rto_count),
            ("tail_probes", stats.tail_probes),
            ("nacks_sent", stats.nacks_sent),
            ("nacks_received", stats.nacks_received),
            ("rtt_us", stats.rtt.as_micros() as u64),
            ("min_rtt_us", stats.min_rtt.as_micros() as u64),
            ("send_rate_bps", stats.send_rate.saturating_mul(8)),
            ("delivery_rate_bps", stats.delivery_rate.saturating_mul(8)),
            ("loss_ppm", (stats.loss * 1e6) as u64),
            ("mtu", u64::from(stats.mtu)),
        ]
    }
}
