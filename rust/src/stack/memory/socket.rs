//! A memory stack's socket: the user-space socket core over the instance's
//! [`State`], with every operation complete under one hold of the lock.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::state::{Role, Sock, State};
use super::{unbound, Shared};
use crate::stack::userspace::{
    self, lock, record, record_mut, Host, KeptOptions, Linger, SockFds, Try, Wait,
};
use crate::stack::{errno, int_at, int_option, Counters, Family, Readiness, StackSocket};

type SockCore = userspace::SockCore<Shared>;

impl Host for Shared {
    type State = State;
    /// Nothing to do after the lock: there is no driver to kick.
    type Effects = ();
    /// Never made: a memory socket waits on its own eventfds only.
    type Watch<'a> = RawFd;

    fn state(&self) -> &Mutex<State> {
        &self.state
    }

    fn after_attempt(&self, st: &mut State, id: u64, _: &mut ()) {
        st.sync(id);
    }
}

/// Options a program may set that change nothing here; they are kept so
/// `getsockopt` returns what was set, as programs check.
const KEPT: &[(i32, i32)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_RCVBUF),
    (libc::SOL_SOCKET, libc::SO_SNDBUF),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
];

/// One socket of a memory instance.
pub struct MemorySocket {
    core: SockCore,
    linger: Linger,
    kept: KeptOptions,
}

impl MemorySocket {
    pub(super) fn new(core: SockCore) -> MemorySocket {
        MemorySocket {
            core,
            linger: Linger::new(),
            kept: KeptOptions::default(),
        }
    }

    fn id(&self) -> u64 {
        self.core.id
    }

    /// Binds `id` to `addr` (port 0: a free one) under the lock.
    fn bind_locked(st: &mut State, id: u64, addr: SocketAddr) -> io::Result<SocketAddr> {
        let port = match addr.port() {
            0 => st.free_port().ok_or_else(|| errno(libc::EADDRINUSE))?,
            p if st.ports.contains_key(&p) => return Err(errno(libc::EADDRINUSE)),
            p => p,
        };
        let s = record_mut(&mut st.socks, id)?;
        if !matches!(s.role, Role::Fresh) {
            return Err(errno(libc::EINVAL));
        }
        let local = SocketAddr::new(addr.ip(), port);
        s.local = Some(local);
        s.role = Role::Bound;
        st.ports.insert(port, id);
        Ok(local)
    }

    /// The listener a connection to `addr` from a `family` socket reaches,
    /// if one has room in its queue.
    fn listener_for(st: &State, family: Family, addr: SocketAddr) -> Option<u64> {
        let &id = st.ports.get(&addr.port())?;
        let l = st.socks.get(&id)?;
        let bound_ip = l.local?.ip();
        let ip_matches = bound_ip.is_unspecified() || bound_ip == addr.ip();
        match &l.role {
            Role::Listening { queue, backlog } if l.family == family && ip_matches => {
                (queue.len() < *backlog).then_some(id)
            }
            _ => None,
        }
    }

    fn with_sock<T>(&self, f: impl FnOnce(&mut Sock) -> io::Result<T>) -> io::Result<T> {
        let mut st = self.core.lock()?;
        f(record_mut(&mut st.socks, self.id())?)
    }

    /// One `send` attempt: as much of `buf` as the peer has room for.
    fn send_once(&self, st: &mut State, buf: &[u8]) -> Try<usize> {
        let cap = st.capacity;
        let Some(s) = st.socks.get(&self.id()) else {
            return Try::Done(Err(errno(libc::EBADF)));
        };
        let peer = match s.role {
            _ if s.reset => return Try::Done(Err(errno(libc::ECONNRESET))),
            _ if s.shut_wr => return Try::Done(Err(errno(libc::EPIPE))),
            Role::Conn { peer } => peer,
            _ => return Try::Done(Err(errno(libc::ENOTCONN))),
        };
        let Some(p) = st.socks.get_mut(&peer) else {
            return Try::Done(Err(errno(libc::EPIPE)));
        };
        let n = cap.saturating_sub(p.rx.len()).min(buf.len());
        if n == 0 && !buf.is_empty() {
            return Try::Block;
        }
        p.rx.extend(&buf[..n]);
        st.sync(peer);
        if let Some(s) = st.socks.get_mut(&self.id()) {
            s.bytes_sent += n as u64;
        }
        Try::Done(Ok(n))
    }
}

/// Copies the front of `rx` into `buf`, draining it unless `peek`.
fn take(rx: &mut VecDeque<u8>, buf: &mut [u8], peek: bool) -> usize {
    let n = rx.len().min(buf.len());
    let (a, b) = rx.as_slices();
    let from_a = a.len().min(n);
    buf[..from_a].copy_from_slice(&a[..from_a]);
    buf[from_a..n].copy_from_slice(&b[..n - from_a]);
    if !peek {
        rx.drain(..n);
    }
    n
}

impl StackSocket for MemorySocket {
    fn bind(&self, addr: SocketAddr) -> io::Result<()> {
        if Family::of(&addr) != self.core.family {
            return Err(errno(libc::EAFNOSUPPORT));
        }
        let mut st = self.core.lock()?;
        Self::bind_locked(&mut st, self.id(), addr).map(drop)
    }

    fn listen(&self, backlog: i32) -> io::Result<()> {
        let mut st = self.core.lock()?;
        let id = self.id();
        if matches!(st.socks.get(&id).map(|s| &s.role), Some(Role::Fresh)) {
            Self::bind_locked(&mut st, id, unbound(self.core.family))?;
        }
        let s = record_mut(&mut st.socks, id)?;
        let backlog = backlog.clamp(1, 4096) as usize;
        match &mut s.role {
            Role::Bound => {
                s.role = Role::Listening {
                    queue: VecDeque::new(),
                    backlog,
                }
            }
            Role::Listening { backlog: b, .. } => *b = backlog,
            _ => return Err(errno(libc::EINVAL)),
        }
        Ok(())
    }

    fn accept(&self) -> io::Result<(Box<dyn StackSocket>, SocketAddr)> {
        let (id, fds, peer) = self.core.accept_next(|_, _| {})?;
        let core = SockCore::new(Arc::clone(&self.core.shared), id, fds, self.core.family);
        Ok((Box::new(MemorySocket::new(core)), peer))
    }

    fn connect(&self, addr: SocketAddr) -> io::Result<()> {
        if Family::of(&addr) != self.core.family {
            return Err(errno(libc::EAFNOSUPPORT));
        }
        // The accepted end's eventfds, made before the lock is taken.
        let fds = SockFds::new()?;
        let mut st = self.core.lock()?;
        let id = self.id();
        match st.socks.get(&id).map(|s| &s.role) {
            Some(Role::Fresh | Role::Bound) => {}
            Some(Role::Conn { .. }) => return Err(errno(libc::EISCONN)),
            Some(Role::Listening { .. }) => return Err(errno(libc::EINVAL)),
            None => return Err(errno(libc::EBADF)),
        }
        let Some(listener) = Self::listener_for(&st, self.core.family, addr) else {
            return Err(errno(libc::ECONNREFUSED));
        };
        let local = match st.socks.get(&id).and_then(|s| s.local) {
            Some(l) => l,
            None => Self::bind_locked(&mut st, id, SocketAddr::new(addr.ip(), 0))?,
        };
        let server = st.insert(self.core.family, fds);
        for (end, peer, local, remote) in [(server, id, addr, local), (id, server, local, addr)] {
            if let Some(s) = st.socks.get_mut(&end) {
                s.role = Role::Conn { peer };
                s.local = Some(local);
                s.peer_addr = Some(remote);
            }
        }
        if let Some(Role::Listening { queue, .. }) =
            st.socks.get_mut(&listener).map(|l| &mut l.role)
        {
            queue.push_back(server);
        }
        st.sync(listener);
        st.sync(id);
        self.core.shared.connects.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn send(&self, buf: &[u8], flags: i32) -> io::Result<usize> {
        self.send_until(buf, flags, None)
    }

    fn send_until(&self, buf: &[u8], flags: i32, deadline: Option<Instant>) -> io::Result<usize> {
        let nonblock = flags & libc::MSG_DONTWAIT != 0;
        self.core
            .run_until(Wait::Write, nonblock, deadline, |st, _| {
                self.send_once(st, buf)
            })
    }

    fn send_all(&self, buf: &[u8], flags: i32) -> io::Result<()> {
        // One deadline for the whole call, as CPython's sendall has.
        let deadline = self.core.timeout.get().map(|t| Instant::now() + t);
        let mut rest = buf;
        while !rest.is_empty() {
            let n = self.send_until(rest, flags, deadline)?;
            rest = &rest[n..];
        }
        Ok(())
    }

    fn send_to(&self, buf: &[u8], flags: i32, _addr: SocketAddr) -> io::Result<usize> {
        // A connected stream socket ignores the address, as TCP does.
        self.send(buf, flags)
    }

    fn recv(&self, buf: &mut [u8], flags: i32) -> io::Result<usize> {
        let nonblock = flags & libc::MSG_DONTWAIT != 0;
        let peek = flags & libc::MSG_PEEK != 0;
        let id = self.id();
        self.core.run(Wait::Read, nonblock, |st, _| {
            let Some(s) = st.socks.get_mut(&id) else {
                return Try::Done(Err(errno(libc::EBADF)));
            };
            let Role::Conn { peer } = s.role else {
                return Try::Done(Err(errno(libc::ENOTCONN)));
            };
            if s.reset {
                return Try::Done(Err(errno(libc::ECONNRESET)));
            }
            if buf.is_empty() || s.shut_rd {
                return Try::Done(Ok(0));
            }
            if s.rx.is_empty() {
                return if s.eof { Try::Done(Ok(0)) } else { Try::Block };
            }
            let n = take(&mut s.rx, buf, peek);
            if !peek {
                s.bytes_received += n as u64;
                // Room in our queue: the peer's blocked send may go on.
                st.sync(peer);
            }
            Try::Done(Ok(n))
        })
    }

    fn recv_from(&self, buf: &mut [u8], flags: i32) -> io::Result<(usize, Option<SocketAddr>)> {
        let n = self.recv(buf, flags)?;
        Ok((n, self.peer_addr().ok()))
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut st = self.core.lock()?;
        let id = self.id();
        let s = record_mut(&mut st.socks, id)?;
        let Role::Conn { peer } = s.role else {
            return Err(errno(libc::ENOTCONN));
        };
        if userspace::shut(how, &mut s.shut_rd, &mut s.shut_wr) {
            if let Some(p) = st.socks.get_mut(&peer) {
                p.eof = true;
            }
            st.sync(peer);
        }
        st.sync(id);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        if !self.core.mark_closed() {
            return Ok(());
        }
        let abort = self.linger.aborts();
        lock(&self.core.shared.state).remove(self.id(), abort);
        self.core.wake_all();
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
        if (level, name) == (libc::SOL_SOCKET, libc::SO_LINGER) {
            return self.linger.set(value);
        }
        let v = int_at(value, 0)?;
        if !KEPT.contains(&(level, name)) {
            return Err(errno(libc::ENOPROTOOPT));
        }
        self.kept.set((level, name), v);
        Ok(())
    }

    fn get_option(&self, level: i32, name: i32, len: usize) -> io::Result<Vec<u8>> {
        let (listening, capacity) = {
            let st = self.core.lock()?;
            let s = record(&st.socks, self.id())?;
            (matches!(s.role, Role::Listening { .. }), st.capacity)
        };
        let v = match (level, name) {
            (libc::SOL_SOCKET, libc::SO_ERROR) => 0, // connects fail at once
            (libc::SOL_SOCKET, libc::SO_TYPE) => libc::SOCK_STREAM,
            (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => i32::from(listening),
            (libc::SOL_SOCKET, libc::SO_LINGER) => return Ok(self.linger.get(len)),
            (libc::SOL_SOCKET, libc::SO_RCVBUF | libc::SO_SNDBUF) => {
                let kept = self.kept.get((level, name));
                kept.unwrap_or(capacity.min(i32::MAX as usize) as i32)
            }
            key if KEPT.contains(&key) => self.kept.get(key).unwrap_or(0),
            _ => return Err(errno(libc::ENOPROTOOPT)),
        };
        Ok(int_option(&[v], len))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.with_sock(|s| Ok(s.local.unwrap_or_else(|| unbound(s.family))))
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.with_sock(|s| match (&s.role, s.peer_addr) {
            (Role::Conn { .. }, Some(p)) => Ok(p),
            _ => Err(errno(libc::ENOTCONN)),
        })
    }

    fn poll_fd(&self) -> RawFd {
        self.core.ready_fd()
    }

    fn write_poll_fd(&self) -> io::Result<Option<RawFd>> {
        self.core.write_fd().map(Some)
    }

    fn readiness(&self) -> Readiness {
        if self.core.check_open().is_err() {
            return Readiness::default();
        }
        let st = lock(&self.core.shared.state);
        let id = self.id();
        Readiness {
            readable: st.readable(id),
            writable: st.writable(id),
            error: st.socks.get(&id).is_some_and(|s| s.reset),
        }
    }

    fn counters(&self) -> Counters {
        let st = lock(&self.core.shared.state);
        let Some(s) = st.socks.get(&self.id()) else {
            return Vec::new();
        };
        vec![
            ("bytes_sent", s.bytes_sent),
            ("bytes_received", s.bytes_received),
            ("recv_queue", s.rx.len() as u64),
        ]
    }
}

impl Drop for MemorySocket {
    fn drop(&mut self) {
        let _ = StackSocket::close(self);
    }
}
