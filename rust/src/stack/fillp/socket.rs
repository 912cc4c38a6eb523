//! FillP stream sockets: the [`StackSocket`] methods over the shared state,
//! on the user-space socket core (`stack::userspace`; this stack's part of
//! its blocking loop is in `inline.rs`).

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::state::{new_endpoint, reason_errno, Role, Slot, StreamView};
use super::{udp, Shared};
use crate::fillp::{discovery, CloseReason, ConnectionStats, ReadError, WriteError};
use crate::stack::userspace::{
    lock, record, record_mut, shut, unspecified, KeptOptions, Linger, SockCore, SockFds, Try, Wait,
};
use crate::stack::{
    errno, int_at, int_option, Counters, Family, Readiness, StackSocket, DMM_OFFER, SOL_DMM,
};

/// One FillP stream socket.
pub struct FillpSocket {
    core: SockCore<Shared>,
    /// A buffer for the next large `send` to copy into before it takes the
    /// lock: one the send buffer freed (acknowledged data), so that a bulk
    /// writer reuses a few warm allocations instead of calling `malloc`.
    stage: Mutex<Option<BytesMut>>,
    /// `SO_LINGER`: `-1` off, else the linger time in seconds (0: close
    /// aborts with a RST, as in TCP).
    linger: Linger,
    /// `SO_REUSEADDR`, `SO_REUSEPORT`, `SO_KEEPALIVE`, `IPV6_V6ONLY` as set.
    /// The socket's UDP socket carries out `SO_REUSEPORT` (the kernel
    /// spreads peers over the listeners sharing a port) and `IPV6_V6ONLY`
    /// (no IPv4-mapped peers); the other two change nothing (a UDP
    /// `SO_REUSEADDR` would let two listeners share a port, which TCP's
    /// does not, and FillP's keepalive is always on).
    kept: KeptOptions,
}

/// A `send` piece at least this long is copied before the lock is taken
/// and kept as it is ([`crate::fillp::Connection::write_shared`]); a
/// shorter one is copied into the send buffer under the lock, where it
/// shares an allocation with its neighbours instead of pinning its own.
const STAGE_MIN: usize = 16 << 10;

impl FillpSocket {
    /// The kept options the UDP socket must carry out, for its bind.
    fn bind_options(&self) -> Vec<(i32, i32, i32)> {
        let mut out = Vec::new();
        if let Some(v) = self.kept.get((libc::SOL_SOCKET, libc::SO_REUSEPORT)) {
            out.push((libc::SOL_SOCKET, libc::SO_REUSEPORT, v));
        }
        if self.core.family == Family::V6 {
            if let Some(v) = self.kept.get((libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)) {
                out.push((libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v));
            }
        }
        out
    }

    /// `DMM_OFFER`: what this listener answers to DISCOVER (`EINVAL` if it
    /// is not listening or the text is not an offer).
    fn set_offer(&self, value: &[u8]) -> io::Result<()> {
        let entries = std::str::from_utf8(value)
            .ok()
            .and_then(discovery::parse_entries)
            .ok_or_else(|| errno(libc::EINVAL))?;
        let mut st = self.core.lock()?;
        let Some(&Role::Listening { slot, .. }) = st.socks.get(&self.core.id).map(|s| &s.role)
        else {
            return Err(errno(libc::EINVAL));
        };
        let sl = st.slot_mut(slot).ok_or_else(|| errno(libc::EBADF))?;
        sl.ep.set_offer(Some(entries));
        Ok(())
    }

    pub(super) fn new(
        shared: Arc<Shared>,
        id: u64,
        fds: Arc<SockFds>,
        family: Family,
    ) -> FillpSocket {
        FillpSocket {
            core: SockCore::new(shared, id, fds, family),
            stage: Mutex::new(None),
            linger: Linger::new(),
            kept: KeptOptions::default(),
        }
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
        let r = self.core.run_until(Wait::Write, nonblock, until, |st, fx| {
            let v = match st.stream(self.core.id) {
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
                        fx.flush = Some((slot, h));
                    } else {
                        fx.kick = Some(slot);
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
            st.sync(self.core.id);
            r
        });
        if spare.is_some() {
            *self.stage.lock().unwrap_or_else(|p| p.into_inner()) = spare;
        }
        r
    }

    /// One piece of a `recv`, under one hold of the lock.
    /// Reads into `buf` (with `peek`, copies and leaves the bytes, as
    /// `MSG_PEEK`).
    fn recv_piece(&self, buf: &mut [u8], nonblock: bool, peek: bool) -> io::Result<usize> {
        // The bytes are taken under the lock as shared pieces and copied
        // into `buf` after it is released, so the driver does not wait
        // behind the copy.
        let mut pieces = Vec::new();
        let n = self.core.run(Wait::Read, nonblock, |st, fx| {
            let v = match st.stream(self.core.id) {
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
            let read = if peek {
                conn.peek_shared(buf.len(), &mut pieces)
            } else {
                conn.read_shared(buf.len(), &mut pieces)
            };
            let r = match read {
                Ok(n) if peek => Try::Done(Ok(n)),
                Ok(n) => {
                    // Reading opens the window: a PACK may be due, and the
                    // reader sends it rather than wake the driver.
                    if n > 0 {
                        fx.flush = Some((slot, h));
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
            st.sync(self.core.id);
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

impl Drop for FillpSocket {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl StackSocket for FillpSocket {
    fn bind(&self, addr: SocketAddr) -> io::Result<()> {
        if Family::of(&addr) != self.core.family {
            return Err(errno(libc::EAFNOSUPPORT));
        }
        let mut st = self.core.lock()?;
        let s = record_mut(&mut st.socks, self.core.id)?;
        if !matches!(s.role, Role::Fresh) {
            return Err(errno(libc::EINVAL));
        }
        let fd = udp::bind_with(addr, self.core.shared.opts.offload, &self.bind_options())?;
        let local = udp::local_addr(fd.as_raw_fd())?;
        s.local = Some(local);
        s.role = Role::Bound(fd, local);
        Ok(())
    }

    fn listen(&self, backlog: i32) -> io::Result<()> {
        let cap = backlog.clamp(1, 65535) as usize;
        if matches!(
            lock(&self.core.shared.state)
                .socks
                .get(&self.core.id)
                .map(|s| &s.role),
            Some(Role::Fresh)
        ) {
            // Like the kernel, listening unbound binds an ephemeral port.
            let ip = match (self.core.family, self.core.shared.opts.bind_ip) {
                (Family::V4, ip @ IpAddr::V4(_)) | (Family::V6, ip @ IpAddr::V6(_)) => ip,
                (f, _) => unspecified(f).ip(),
            };
            self.bind(SocketAddr::new(ip, 0))?;
        }
        let mut st = self.core.lock()?;
        let st = &mut *st;
        let s = record_mut(&mut st.socks, self.core.id)?;
        match std::mem::replace(&mut s.role, Role::Fresh) {
            Role::Bound(fd, local) => {
                let ep = new_endpoint(&self.core.shared.opts, true);
                let slot = st.add_slot(Slot::new(fd, local, ep, Some(self.core.id)));
                st.listening.push(slot);
                if let Some(s) = st.socks.get_mut(&self.core.id) {
                    s.role = Role::Listening {
                        slot,
                        backlog: VecDeque::new(),
                        cap,
                    };
                }
                self.core.shared.kick(st, slot);
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
        let (id, fds, peer) = self.core.accept_next(|st, _| {
            // Room in the backlog: admit what the endpoint holds back.
            let role = st.socks.get(&self.core.id).map(|s| &s.role);
            if let Some(&Role::Listening { slot, .. }) = role {
                st.admit(slot, &self.core.shared);
            }
            st.sync(self.core.id);
        })?;
        self.core.shared.sockets.fetch_add(1, Ordering::Relaxed);
        let sock = FillpSocket::new(Arc::clone(&self.core.shared), id, fds, self.core.family);
        Ok((Box::new(sock), peer))
    }

    fn connect(&self, addr: SocketAddr) -> io::Result<()> {
        if Family::of(&addr) != self.core.family {
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
            let mut guard = self.core.lock()?;
            let st = &mut *guard;
            let s = record(&st.socks, self.core.id)?;
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
            let bound = match st.socks.get_mut(&self.core.id).map(|s| &mut s.role) {
                Some(role @ Role::Bound(..)) => match std::mem::replace(role, Role::Fresh) {
                    Role::Bound(fd, local) => Some((fd, local)),
                    _ => None,
                },
                _ => None,
            };
            let slot = st.client_slot(&self.core.shared.opts, self.core.family, bound)?;
            let route = self.core.shared.routes.route_to(addr);
            let opts = &self.core.shared.opts;
            let mut config = opts.connection.clone();
            if let Some(size) = opts.size_for(route, addr) {
                config.mtu = size;
            }
            let now = Instant::now();
            let resume = opts.resumption.then(|| st.tickets.get(addr, now)).flatten();
            let sl = st.slot_mut(slot).ok_or_else(|| errno(libc::ENETDOWN))?;
            let h = match resume {
                Some(r) => sl.ep.connect_resumed(now, addr, config, &r),
                None => sl.ep.connect_with(now, addr, config),
            }
            .map_err(|_| errno(libc::EADDRNOTAVAIL))?;
            let mut local = sl.local;
            if local.ip().is_unspecified() {
                if let Some(r) = route {
                    local.set_ip(r.source);
                }
            }
            if let Some(Role::Conn { slot, h, .. }) = st.socks.get(&self.core.id).map(|s| &s.role) {
                st.by_conn.remove(&(*slot, *h));
            }
            st.by_conn.insert((slot, h), self.core.id);
            let s = record_mut(&mut st.socks, self.core.id)?;
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
            st.sync(self.core.id);
            self.core.shared.connects.fetch_add(1, Ordering::Relaxed);
            let blocking = !self.timeout().is_some_and(|t| t.is_zero());
            if blocking && !st.listens_here(addr) {
                // The INIT leaves from this thread, and the connect then
                // watches its UDP socket for the replies (`watch_write`):
                // no driver wake on the way. (The driver adds the socket
                // to its poll set when the watch ends.)
                self.core.shared.flush_inline(guard, slot, h);
            } else {
                // A non-blocking connect is finished by the driver, which
                // must take the new socket into its poll set now.
                self.core.shared.kick(st, slot);
            }
        }
        if self.timeout().is_some_and(|t| t.is_zero()) {
            return Err(errno(libc::EINPROGRESS));
        }
        self.core.run(Wait::Connect, false, |st, _| {
            let Some(s) = st.socks.get_mut(&self.core.id) else {
                return Try::Done(Err(errno(libc::EBADF)));
            };
            if let Some(e) = s.error.take().or(s.fatal) {
                st.sync(self.core.id);
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
        if flags & libc::MSG_OOB != 0 {
            return Err(errno(libc::EOPNOTSUPP));
        }
        let nonblock = flags & libc::MSG_DONTWAIT != 0;
        if flags & libc::MSG_PEEK != 0 {
            // One piece: a peek copies what is there, at most the buffer.
            let len = buf.len().min(COPY_CHUNK);
            return self.recv_piece(&mut buf[..len], nonblock, true);
        }
        chunked(buf.len(), nonblock, |r, nb| {
            self.recv_piece(&mut buf[r], nb, false)
        })
    }

    fn recv_from(&self, buf: &mut [u8], flags: i32) -> io::Result<(usize, Option<SocketAddr>)> {
        let n = self.recv(buf, flags)?;
        Ok((n, self.peer_addr().ok()))
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut st = self.core.lock()?;
        let st = &mut *st;
        let s = record_mut(&mut st.socks, self.core.id)?;
        let Role::Conn {
            slot,
            h,
            established: true,
        } = s.role
        else {
            return Err(errno(libc::ENOTCONN));
        };
        if shut(how, &mut s.shut_rd, &mut s.shut_wr) {
            if let Some(c) = st.slot_mut(slot).and_then(|sl| sl.ep.connection_mut(h)) {
                c.shutdown_write();
            }
        }
        st.sync(self.core.id);
        self.core.shared.kick(st, slot);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        if !self.core.mark_closed() {
            return Ok(());
        }
        let mut st = lock(&self.core.shared.state);
        let st = &mut *st;
        let Some(s) = st.socks.remove(&self.core.id) else {
            return Ok(());
        };
        let changed = match s.role {
            Role::Conn { slot, h, .. } => {
                st.by_conn.remove(&(slot, h));
                let abort = self.linger.aborts();
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
                st.admit(slot, &self.core.shared);
                // Nothing left on its UDP socket: free the port now, as a
                // kernel listener's close does, so that binding it again at
                // once works (asyncio's test_start_server does). Otherwise
                // the driver forgets the slot once its connections are gone.
                let idle = st
                    .slots
                    .get(&slot)
                    .is_some_and(|sl| sl.unused() && sl.lease.is_none() && sl.tx.q.is_empty());
                if idle {
                    st.slots.remove(&slot);
                    None
                } else {
                    Some(slot)
                }
            }
            Role::Fresh | Role::Bound(..) => None,
        };
        // Wake any thread blocked on this socket so it sees EBADF.
        self.core.wake_all();
        if let Some(slot) = changed {
            self.core.shared.kick(st, slot);
        }
        Ok(())
    }

    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.core.set_timeout_mode(timeout)
    }

    fn timeout(&self) -> Option<Duration> {
        self.core.timeout.get()
    }

    fn set_option(&self, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
        self.core.check_open()?;
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_LINGER) => self.linger.set(value),
            // Accepted for compatibility; FillP sizes its own buffers.
            (libc::SOL_SOCKET, libc::SO_RCVBUF | libc::SO_SNDBUF)
            | (libc::IPPROTO_TCP, libc::TCP_NODELAY) => Ok(()),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR | libc::SO_REUSEPORT | libc::SO_KEEPALIVE)
            | (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) => {
                self.kept.set((level, name), int_at(value, 0)?);
                Ok(())
            }
            (SOL_DMM, DMM_OFFER) => self.set_offer(value),
            _ => Err(errno(libc::ENOPROTOOPT)),
        }
    }

    fn get_option(&self, level: i32, name: i32, len: usize) -> io::Result<Vec<u8>> {
        if (level, name) == (libc::SOL_SOCKET, libc::SO_LINGER) {
            self.core.check_open()?;
            return Ok(self.linger.get(len));
        }
        let mut st = self.core.lock()?;
        let c = &self.core.shared.opts.connection;
        let v: i32 = match (level, name) {
            (libc::SOL_SOCKET, libc::SO_ERROR) => {
                let e = st
                    .socks
                    .get_mut(&self.core.id)
                    .and_then(|s| s.error.take())
                    .unwrap_or(0);
                st.sync(self.core.id);
                e
            }
            (libc::SOL_SOCKET, libc::SO_TYPE) => libc::SOCK_STREAM,
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => c.recv_window.min(i32::MAX as u32) as i32,
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => c.send_buffer.min(i32::MAX as usize) as i32,
            (libc::SOL_SOCKET, libc::SO_REUSEADDR | libc::SO_REUSEPORT | libc::SO_KEEPALIVE) => {
                self.kept.get((level, name)).unwrap_or(0)
            }
            // Linux's default (net.ipv6.bindv6only = 0) until set.
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) if self.core.family == Family::V6 => {
                self.kept.get((level, name)).unwrap_or(0)
            }
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => 1,
            _ => return Err(errno(libc::ENOPROTOOPT)),
        };
        Ok(int_option(&[v], len))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        let st = self.core.lock()?;
        let s = record(&st.socks, self.core.id)?;
        Ok(s.local.unwrap_or_else(|| unspecified(self.core.family)))
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        let st = self.core.lock()?;
        let s = record(&st.socks, self.core.id)?;
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

    fn write_poll_fd(&self) -> io::Result<Option<RawFd>> {
        self.core.write_fd().map(Some)
    }

    fn poll_fd(&self) -> RawFd {
        self.core.ready_fd()
    }

    fn readiness(&self) -> Readiness {
        let Ok(st) = self.core.lock() else {
            return Readiness {
                error: true,
                ..Readiness::default()
            };
        };
        let Some(s) = st.socks.get(&self.core.id) else {
            return Readiness::default();
        };
        let error = s.error.is_some() || s.fatal.is_some();
        let readable = st.readable(self.core.id);
        let writable = st.writable(self.core.id);
        Readiness {
            readable,
            writable,
            error,
        }
    }

    fn counters(&self) -> Counters {
        let Ok(st) = self.core.lock() else {
            return Vec::new();
        };
        let Some(s) = st.socks.get(&self.core.id) else {
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
