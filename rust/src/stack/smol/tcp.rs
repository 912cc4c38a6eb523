//! TCP stream sockets of a smoltcp instance (see the module docs of `smol`
//! for the design: shared state, inline polling, readiness eventfds,
//! listener pools).

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpListenEndpoint};

use super::ports::Proto;
use super::socket::SockCore;
use super::state::{Phase, Role, SockState, State, MAX_BACKLOG, SYN_TIMEOUT};
use super::{lock, MAX_BUFFER, MIN_BUFFER};
use crate::stack::userspace::{record, record_mut, shut, unspecified, Try, Wait};
use crate::stack::{errno, Counters, Family, Readiness, StackSocket};
use crate::stack::{int_at, int_option};

/// The common start of `send` and `recv`: a pending error, then `shut`
/// (the result for a shut-down direction), then the connection's handle,
/// or `Block` while the handshake runs.
fn established<T>(s: &mut SockState, shut: Option<io::Result<T>>) -> Result<SocketHandle, Try<T>> {
    if let Some(e) = s.error.take().or(s.fatal) {
        return Err(Try::Done(Err(errno(e))));
    }
    if let Some(r) = shut {
        return Err(Try::Done(r));
    }
    match s.role {
        Role::Conn {
            h,
            phase: Phase::Established,
        } => Ok(h),
        Role::Conn {
            phase: Phase::Connecting(_),
            ..
        } => Err(Try::Block),
        _ => Err(Try::Done(Err(errno(libc::ENOTCONN)))),
    }
}

core_socket!(
    /// One TCP socket on a smoltcp instance.
    TcpSocket
);

impl TcpSocket {
    /// Reserves a local port for this socket: `addr`'s (0: ephemeral).
    fn bind_locked(&self, st: &mut State, addr: SocketAddr) -> io::Result<()> {
        let s = self.bindable(st, addr)?;
        let ip = addr.ip();
        if !matches!(s.role, Role::Fresh) || s.port.is_some() {
            return Err(errno(libc::EINVAL));
        }
        let port = st.ports.reserve(Proto::Tcp, addr.port())?;
        if let Some(s) = st.socks.get_mut(&self.id) {
            s.port = Some((Proto::Tcp, port));
            s.local = Some(SocketAddr::new(ip, port));
            s.role = Role::Bound;
        }
        Ok(())
    }

    /// Starts a handshake to `addr` (under the lock).
    fn start_connect(&self, st: &mut State, addr: SocketAddr) -> io::Result<()> {
        st.check_up()?;
        let s = record(&st.socks, self.id)?;
        if let Some(e) = s.fatal {
            return Err(errno(e));
        }
        let old = match s.role {
            Role::Conn {
                phase: Phase::Established,
                ..
            } => return Err(errno(libc::EISCONN)),
            Role::Conn {
                phase: Phase::Connecting(_),
                ..
            } => return Err(errno(libc::EALREADY)),
            Role::Conn { h, .. } => Some(h),
            Role::Listening { .. } | Role::Udp { .. } => return Err(errno(libc::EINVAL)),
            Role::Fresh | Role::Bound => None,
        };
        let opts = s.opts;
        let bound_ip = s.local.map(|l| l.ip()).filter(|ip| !ip.is_unspecified());
        let (port, fresh_port) = match s.port {
            Some((_, p)) => (p, false),
            None => (st.ports.reserve(Proto::Tcp, 0)?, true),
        };
        if let Some(h) = old {
            st.sockets.remove(h);
        }
        let mut t = opts.tcp_socket();
        t.set_timeout(Some(SYN_TIMEOUT));
        let local = IpListenEndpoint {
            addr: bound_ip.map(IpAddress::from),
            port,
        };
        if let Err(e) = t.connect(st.iface.context(), addr, local) {
            if fresh_port {
                st.ports.release(Proto::Tcp, port);
            }
            return Err(match e {
                tcp::ConnectError::InvalidState => errno(libc::EISCONN),
                // No source address for that destination.
                tcp::ConnectError::Unaddressable => errno(libc::ENETUNREACH),
            });
        }
        let local = t
            .local_endpoint()
            .map(SocketAddr::from)
            .unwrap_or_else(|| SocketAddr::new(unspecified(self.family).ip(), port));
        let now = st.now();
        let h = st.sockets.add_tcp(t);
        if let Some(s) = st.socks.get_mut(&self.id) {
            s.role = Role::Conn {
                h,
                phase: Phase::Connecting(now),
            };
            s.port = Some((Proto::Tcp, port));
            s.local = Some(local);
            s.peer = Some(addr);
            s.error = None;
        }
        Ok(())
    }
}

impl StackSocket for TcpSocket {
    socket_common!();

    fn listen(&self, backlog: i32) -> io::Result<()> {
        self.check_open()?;
        let backlog = backlog.clamp(1, MAX_BACKLOG) as usize;
        let mut st = lock(&self.shared.state);
        st.check_up()?;
        let fresh = matches!(st.socks.get(&self.id).map(|s| &s.role), Some(Role::Fresh));
        if fresh {
            // Like the kernel, listening unbound binds an ephemeral port.
            self.bind_locked(&mut st, unspecified(self.family))?;
        }
        let s = record_mut(&mut st.socks, self.id)?;
        match &mut s.role {
            Role::Bound => {
                let local = s.local.unwrap_or_else(|| unspecified(self.family));
                let endpoint = IpListenEndpoint {
                    addr: (!local.ip().is_unspecified()).then(|| IpAddress::from(local.ip())),
                    port: local.port(),
                };
                s.role = Role::Listening {
                    endpoint,
                    pool: Vec::new(),
                    queue: VecDeque::new(),
                    backlog,
                };
            }
            Role::Listening { backlog: b, .. } => *b = backlog,
            _ => return Err(errno(libc::EINVAL)),
        }
        st.refill(self.id);
        Ok(())
    }

    fn accept(&self) -> io::Result<(Box<dyn StackSocket>, SocketAddr)> {
        let (id, fds, peer) = self.accept_next(|st, changed| {
            st.refill(self.id);
            // Room in the queue may release a held-back SYN-ACK.
            *changed = true;
        })?;
        self.shared.sockets.fetch_add(1, Ordering::Relaxed);
        let sock = TcpSocket::new(SockCore::new(
            Arc::clone(&self.shared),
            id,
            fds,
            self.family,
        ));
        Ok((Box::new(sock), peer))
    }

    fn connect(&self, addr: SocketAddr) -> io::Result<()> {
        self.check_open()?;
        if Family::of(&addr) != self.family {
            return Err(errno(libc::EAFNOSUPPORT));
        }
        if addr.ip().is_unspecified() || addr.port() == 0 {
            // No loopback in a smoltcp instance.
            return Err(errno(libc::ECONNREFUSED));
        }
        {
            let mut st = lock(&self.shared.state);
            self.start_connect(&mut st, addr)?;
            self.shared.connects.fetch_add(1, Ordering::Relaxed);
            self.shared.poll_inline(&mut st);
            st.sync(self.id);
        }
        if self.timeout.get().is_some_and(|t| t.is_zero()) {
            return Err(errno(libc::EINPROGRESS));
        }
        self.run(Wait::Connect, false, |st, _| {
            let Some(s) = st.socks.get_mut(&self.id) else {
                return Try::Done(Err(errno(libc::EBADF)));
            };
            if let Some(e) = s.error.take().or(s.fatal) {
                return Try::Done(Err(errno(e)));
            }
            match s.role {
                Role::Conn {
                    phase: Phase::Established,
                    ..
                } => Try::Done(Ok(())),
                Role::Conn {
                    phase: Phase::Connecting(_),
                    ..
                } => Try::Block,
                _ => Try::Done(Err(errno(libc::ECONNABORTED))),
            }
        })
    }

    fn send(&self, buf: &[u8], flags: i32) -> io::Result<usize> {
        self.send_until(buf, flags, None)
    }

    fn send_until(
        &self,
        buf: &[u8],
        flags: i32,
        deadline: Option<std::time::Instant>,
    ) -> io::Result<usize> {
        let nonblock = flags & libc::MSG_DONTWAIT != 0;
        self.run_until(Wait::Write, nonblock, deadline, |st, changed| {
            let st = &mut *st;
            let Some(s) = st.socks.get_mut(&self.id) else {
                return Try::Done(Err(errno(libc::EBADF)));
            };
            let shut = s.shut_wr.then(|| Err(errno(libc::EPIPE)));
            let h = match established(s, shut) {
                Ok(h) => h,
                Err(t) => return t,
            };
            let Some(t) = st.sockets.tcp_mut(h) else {
                return Try::Done(Err(errno(libc::EPIPE)));
            };
            if !t.may_send() {
                // Not closed by us (shut_wr is false): reset or timed out.
                return Try::Done(Err(errno(libc::ECONNRESET)));
            }
            if buf.is_empty() {
                return Try::Done(Ok(0));
            }
            match t.send_slice(buf) {
                Ok(0) => Try::Block,
                Ok(n) => {
                    s.bytes_sent += n as u64;
                    *changed = true;
                    Try::Done(Ok(n))
                }
                Err(tcp::SendError::InvalidState) => Try::Done(Err(errno(libc::ECONNRESET))),
            }
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
        let peek = flags & libc::MSG_PEEK != 0;
        self.run(Wait::Read, nonblock, |st, changed| {
            let st = &mut *st;
            let Some(s) = st.socks.get_mut(&self.id) else {
                return Try::Done(Err(errno(libc::EBADF)));
            };
            let shut = s.shut_rd.then_some(Ok(0));
            let h = match established(s, shut) {
                Ok(h) => h,
                Err(t) => return t,
            };
            let Some(t) = st.sockets.tcp_mut(h) else {
                return Try::Done(Ok(0));
            };
            if buf.is_empty() {
                return Try::Done(Ok(0));
            }
            let r = if peek {
                match t.peek_slice(buf) {
                    Ok(0) => t.peek(0).map(|_| 0),
                    r => r,
                }
            } else {
                t.recv_slice(buf)
            };
            match r {
                Ok(0) if t.state() == tcp::State::Closed && !t.can_recv() => {
                    Try::Done(Err(errno(libc::ECONNRESET)))
                }
                Ok(0) => Try::Block,
                Ok(n) => {
                    if !peek {
                        s.bytes_received += n as u64;
                        // The window opened: smoltcp may owe an update.
                        *changed = true;
                    }
                    Try::Done(Ok(n))
                }
                Err(tcp::RecvError::Finished) => Try::Done(Ok(0)),
                Err(tcp::RecvError::InvalidState) => Try::Done(Err(errno(libc::ECONNRESET))),
            }
        })
    }

    fn recv_from(&self, buf: &mut [u8], flags: i32) -> io::Result<(usize, Option<SocketAddr>)> {
        let n = self.recv(buf, flags)?;
        Ok((n, self.peer_addr().ok()))
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut st = self.lock()?;
        let st = &mut *st;
        let s = record_mut(&mut st.socks, self.id)?;
        if let Some(e) = s.fatal {
            return Err(errno(e));
        }
        let Role::Conn {
            h,
            phase: Phase::Established,
        } = s.role
        else {
            return Err(errno(libc::ENOTCONN));
        };
        if shut(how, &mut s.shut_rd, &mut s.shut_wr) {
            if let Some(t) = st.sockets.tcp_mut(h) {
                // The FIN follows the data still queued.
                t.close();
            }
        }
        self.shared.poll_inline(st);
        st.sync(self.id);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        if !self.mark_closed() {
            return Ok(());
        }
        let mut st = lock(&self.shared.state);
        let st = &mut *st;
        let Some(s) = st.socks.remove(&self.id) else {
            return Ok(());
        };
        match s.role {
            Role::Conn { h, .. } => {
                if let Some(t) = st.sockets.tcp_mut(h) {
                    // Unread data makes close an abort (RST), as in TCP.
                    if t.recv_queue() > 0 {
                        t.abort();
                    } else {
                        t.close();
                    }
                }
                st.orphan(h, s.port);
            }
            Role::Listening {
                pool,
                queue,
                endpoint,
                ..
            } => {
                if let Some(dev) = st.dev.as_mut() {
                    dev.gate_mut().remove(endpoint);
                }
                for h in pool {
                    if let Some(t) = st.sockets.tcp_mut(h) {
                        t.abort();
                    }
                    st.orphan(h, None);
                }
                for id in queue {
                    if let Some(Role::Conn { h, .. }) = st.socks.remove(&id).map(|c| c.role) {
                        if let Some(t) = st.sockets.tcp_mut(h) {
                            t.abort();
                        }
                        st.orphan(h, None);
                    }
                }
                if let Some((p, n)) = s.port {
                    st.ports.release(p, n);
                }
            }
            Role::Bound | Role::Fresh | Role::Udp { .. } => {
                if let Some((p, n)) = s.port {
                    st.ports.release(p, n);
                }
            }
        }
        self.wake_all();
        self.shared.poll_inline(st);
        Ok(())
    }

    fn set_option(&self, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
        self.check_open()?;
        let v = int_at(value, 0)?;
        let mut st = lock(&self.shared.state);
        let st = &mut *st;
        let s = record_mut(&mut st.socks, self.id)?;
        let o = &mut s.opts;
        let size = || (v.max(0) as usize).clamp(MIN_BUFFER, MAX_BUFFER);
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => o.rcvbuf = size(),
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => o.sndbuf = size(),
            (libc::SOL_SOCKET, libc::SO_REUSEADDR) => o.reuseaddr = v != 0,
            (libc::SOL_SOCKET, libc::SO_REUSEPORT) => o.reuseport = v != 0,
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) => o.v6only = v != 0,
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => o.keepalive = v != 0,
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => o.nodelay = v != 0,
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE) => {
                if v < 1 {
                    return Err(errno(libc::EINVAL));
                }
                o.keepidle = v as u32;
            }
            _ => return Err(errno(libc::ENOPROTOOPT)),
        }
        let opts = s.opts;
        if let Role::Conn { h, .. } = s.role {
            if let Some(t) = st.sockets.tcp_mut(h) {
                opts.apply(t);
            }
        }
        Ok(())
    }

    fn get_option(&self, level: i32, name: i32, len: usize) -> io::Result<Vec<u8>> {
        let mut st = self.lock()?;
        let s = record_mut(&mut st.socks, self.id)?;
        let o = s.opts;
        let v: i32 = match (level, name) {
            (libc::SOL_SOCKET, libc::SO_ERROR) => {
                let e = s.error.take().unwrap_or(0);
                st.sync(self.id);
                e
            }
            (libc::SOL_SOCKET, libc::SO_TYPE) => libc::SOCK_STREAM,
            (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => {
                i32::from(matches!(s.role, Role::Listening { .. }))
            }
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => o.rcvbuf.min(i32::MAX as usize) as i32,
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => o.sndbuf.min(i32::MAX as usize) as i32,
            (libc::SOL_SOCKET, libc::SO_REUSEADDR) => i32::from(o.reuseaddr),
            (libc::SOL_SOCKET, libc::SO_REUSEPORT) => i32::from(o.reuseport),
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) => i32::from(o.v6only),
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => i32::from(o.keepalive),
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => i32::from(o.nodelay),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE) => o.keepidle as i32,
            _ => return Err(errno(libc::ENOPROTOOPT)),
        };
        Ok(int_option(&[v], len))
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        let st = self.lock()?;
        let s = record(&st.socks, self.id)?;
        match (&s.role, s.peer) {
            (
                Role::Conn {
                    phase: Phase::Established,
                    ..
                },
                Some(p),
            ) => Ok(p),
            _ => Err(errno(libc::ENOTCONN)),
        }
    }

    fn counters(&self) -> Counters {
        let st = lock(&self.shared.state);
        let Some(s) = st.socks.get(&self.id) else {
            return Vec::new();
        };
        let (sendq, recvq) = match s.role {
            Role::Conn { h, .. } => st
                .sockets
                .tcp(h)
                .map_or((0, 0), |t| (t.send_queue(), t.recv_queue())),
            _ => (0, 0),
        };
        vec![
            ("bytes_sent", s.bytes_sent),
            ("bytes_received", s.bytes_received),
            ("min_rtt_us", s.connect_rtt_us),
            ("send_queue", sendq as u64),
            ("recv_queue", recvq as u64),
        ]
    }
}
