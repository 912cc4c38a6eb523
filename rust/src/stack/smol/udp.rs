//! UDP datagram sockets of a smoltcp instance.
//!
//! A socket gets its smoltcp socket when it is bound: by `bind`, or
//! implicitly (an ephemeral port, as the kernel does) by the first
//! `send_to` or by `connect`. `connect` only sets the default peer; a
//! connected socket drops datagrams from anyone else, as the kernel does.
//! A datagram longer than the receive buffer is truncated and the rest
//! dropped (`recv` semantics of the kernel). smoltcp here is built without
//! IP fragmentation, so a datagram must fit in one packet: a longer one
//! fails with `EMSGSIZE`.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::RawFd;
use std::time::Duration;

use smoltcp::socket::udp;
use smoltcp::wire::{IpAddress, IpListenEndpoint};

use super::lock;
use super::ports::Proto;
use super::socket::SockCore;
use super::state::{Role, State};
use crate::stack::userspace::{record, record_mut, shut, unspecified, Try, Wait};
use crate::stack::{errno, Counters, Family, Readiness, StackSocket};
use crate::stack::{int_at, int_option};

/// Datagrams a socket buffers per direction.
const PACKETS: usize = 256;

/// Bytes of IP and UDP header in front of a payload.
fn header_len(family: Family) -> usize {
    match family {
        Family::V4 => 20 + 8,
        Family::V6 => 40 + 8,
    }
}

core_socket!(
    /// One UDP socket on a smoltcp instance.
    UdpSocket
);

impl UdpSocket {
    /// Binds to `addr` (port 0: ephemeral) under the lock.
    fn bind_locked(&self, st: &mut State, addr: SocketAddr) -> io::Result<()> {
        let s = self.bindable(st, addr)?;
        let ip = addr.ip();
        if !matches!(s.role, Role::Fresh) {
            return Err(errno(libc::EINVAL));
        }
        let (rcv, snd) = (s.opts.rcvbuf, s.opts.sndbuf);
        let port = st.ports.reserve(Proto::Udp, addr.port())?;
        let mut u = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; PACKETS], vec![0; rcv]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; PACKETS], vec![0; snd]),
        );
        let endpoint = IpListenEndpoint {
            addr: (!ip.is_unspecified()).then(|| IpAddress::from(ip)),
            port,
        };
        if u.bind(endpoint).is_err() {
            st.ports.release(Proto::Udp, port);
            return Err(errno(libc::EINVAL));
        }
        let h = st.sockets.add_udp(u);
        if let Some(s) = st.socks.get_mut(&self.id) {
            s.port = Some((Proto::Udp, port));
            s.local = Some(SocketAddr::new(ip, port));
            s.role = Role::Udp { h };
        }
        Ok(())
    }

    /// Binds to an ephemeral port if not bound yet.
    fn autobind(&self, st: &mut State) -> io::Result<()> {
        let fresh = matches!(st.socks.get(&self.id).map(|s| &s.role), Some(Role::Fresh));
        if fresh {
            self.bind_locked(st, unspecified(self.family))?;
        }
        Ok(())
    }

    fn check_dest(&self, addr: &SocketAddr) -> io::Result<()> {
        if Family::of(addr) != self.family {
            return Err(errno(libc::EAFNOSUPPORT));
        }
        if addr.ip().is_unspecified() || addr.port() == 0 {
            return Err(errno(libc::EINVAL));
        }
        Ok(())
    }

    fn send_dgram(&self, buf: &[u8], flags: i32, to: Option<SocketAddr>) -> io::Result<usize> {
        if let Some(a) = &to {
            self.check_dest(a)?;
        }
        let max = (self.shared.opts.mtu as usize).saturating_sub(header_len(self.family));
        if buf.len() > max {
            return Err(errno(libc::EMSGSIZE));
        }
        {
            let mut st = lock(&self.shared.state);
            self.autobind(&mut st)?;
        }
        let nonblock = flags & libc::MSG_DONTWAIT != 0;
        self.run(Wait::Write, nonblock, |st, changed| {
            let st = &mut *st;
            let Some(s) = st.socks.get_mut(&self.id) else {
                return Try::Done(Err(errno(libc::EBADF)));
            };
            if let Some(e) = s.fatal {
                return Try::Done(Err(errno(e)));
            }
            if s.shut_wr {
                return Try::Done(Err(errno(libc::EPIPE)));
            }
            let Some(dest) = to.or(s.peer) else {
                return Try::Done(Err(errno(libc::EDESTADDRREQ)));
            };
            let Role::Udp { h } = s.role else {
                return Try::Done(Err(errno(libc::EINVAL)));
            };
            let Some(u) = st.sockets.udp_mut(h) else {
                return Try::Done(Err(errno(libc::ENETDOWN)));
            };
            if buf.len() > u.payload_send_capacity() {
                return Try::Done(Err(errno(libc::EMSGSIZE)));
            }
            match u.send_slice(buf, dest) {
                Ok(()) => {
                    s.bytes_sent += buf.len() as u64;
                    *changed = true;
                    Try::Done(Ok(buf.len()))
                }
                Err(udp::SendError::BufferFull) => Try::Block,
                Err(udp::SendError::Unaddressable) => Try::Done(Err(errno(libc::EINVAL))),
            }
        })
    }
}

impl StackSocket for UdpSocket {
    socket_common!();

    fn listen(&self, _backlog: i32) -> io::Result<()> {
        self.check_open()?;
        Err(errno(libc::EOPNOTSUPP))
    }

    fn accept(&self) -> io::Result<(Box<dyn StackSocket>, SocketAddr)> {
        self.check_open()?;
        Err(errno(libc::EOPNOTSUPP))
    }

    fn connect(&self, addr: SocketAddr) -> io::Result<()> {
        self.check_open()?;
        self.check_dest(&addr)?;
        let mut st = lock(&self.shared.state);
        self.autobind(&mut st)?;
        let st = &mut *st;
        let s = record_mut(&mut st.socks, self.id)?;
        s.peer = Some(addr);
        if let (Some(l), Role::Udp { .. }) = (s.local, &s.role) {
            if l.ip().is_unspecified() {
                // Report the source address smoltcp will use, as the kernel does.
                if let Some(src) = st.iface.get_source_address(&IpAddress::from(addr.ip())) {
                    s.local = Some(SocketAddr::new(src.into(), l.port()));
                }
            }
        }
        Ok(())
    }

    fn send(&self, buf: &[u8], flags: i32) -> io::Result<usize> {
        self.send_dgram(buf, flags, None)
    }

    fn send_to(&self, buf: &[u8], flags: i32, addr: SocketAddr) -> io::Result<usize> {
        self.send_dgram(buf, flags, Some(addr))
    }

    fn recv(&self, buf: &mut [u8], flags: i32) -> io::Result<usize> {
        self.recv_from(buf, flags).map(|(n, _)| n)
    }

    fn recv_from(&self, buf: &mut [u8], flags: i32) -> io::Result<(usize, Option<SocketAddr>)> {
        if flags & libc::MSG_OOB != 0 {
            return Err(errno(libc::EOPNOTSUPP));
        }
        let nonblock = flags & libc::MSG_DONTWAIT != 0;
        let peek = flags & libc::MSG_PEEK != 0;
        {
            let mut st = lock(&self.shared.state);
            self.autobind(&mut st)?;
        }
        self.run(Wait::Read, nonblock, |st, _| {
            let st = &mut *st;
            let Some(s) = st.socks.get_mut(&self.id) else {
                return Try::Done(Err(errno(libc::EBADF)));
            };
            if let Some(e) = s.fatal {
                return Try::Done(Err(errno(e)));
            }
            if s.shut_rd {
                return Try::Done(Ok((0, None)));
            }
            let Role::Udp { h } = s.role else {
                return Try::Done(Err(errno(libc::EINVAL)));
            };
            let Some(u) = st.sockets.udp_mut(h) else {
                return Try::Done(Err(errno(libc::ENETDOWN)));
            };
            loop {
                let got = if peek {
                    u.peek().map(|(d, m)| (d, *m))
                } else {
                    u.recv()
                };
                let Ok((data, meta)) = got else {
                    return Try::Block;
                };
                let from = SocketAddr::from(meta.endpoint);
                if s.peer.is_some_and(|p| p != from) {
                    // Not from the connected peer: dropped, as by the kernel.
                    if peek {
                        let _ = u.recv();
                    }
                    continue;
                }
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                if !peek {
                    s.bytes_received += n as u64;
                }
                return Try::Done(Ok((n, Some(from))));
            }
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let mut st = self.lock()?;
        let s = record_mut(&mut st.socks, self.id)?;
        if s.peer.is_none() {
            return Err(errno(libc::ENOTCONN));
        }
        shut(how, &mut s.shut_rd, &mut s.shut_wr);
        st.sync(self.id);
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        if !self.mark_closed() {
            return Ok(());
        }
        let mut st = lock(&self.shared.state);
        if let Some(s) = st.socks.remove(&self.id) {
            // Queued datagrams are dropped, as a kernel close may do.
            if let Role::Udp { h } = s.role {
                st.sockets.remove(h);
            }
            if let Some((p, n)) = s.port {
                st.ports.release(p, n);
            }
        }
        self.wake_all();
        Ok(())
    }

    fn set_option(&self, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
        self.check_open()?;
        int_at(value, 0)?;
        match (level, name) {
            // Accepted; datagram buffers are sized at bind from the
            // instance's buffer size.
            (libc::SOL_SOCKET, libc::SO_RCVBUF | libc::SO_SNDBUF)
            | (libc::SOL_SOCKET, libc::SO_REUSEADDR | libc::SO_REUSEPORT | libc::SO_BROADCAST) => {
                Ok(())
            }
            _ => Err(errno(libc::ENOPROTOOPT)),
        }
    }

    fn get_option(&self, level: i32, name: i32, len: usize) -> io::Result<Vec<u8>> {
        let st = self.lock()?;
        let s = record(&st.socks, self.id)?;
        let v: i32 = match (level, name) {
            (libc::SOL_SOCKET, libc::SO_ERROR) => 0,
            (libc::SOL_SOCKET, libc::SO_TYPE) => libc::SOCK_DGRAM,
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => s.opts.rcvbuf.min(i32::MAX as usize) as i32,
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => s.opts.sndbuf.min(i32::MAX as usize) as i32,
            (libc::SOL_SOCKET, libc::SO_REUSEADDR | libc::SO_BROADCAST) => 0,
            _ => return Err(errno(libc::ENOPROTOOPT)),
        };
        Ok(int_option(&[v], len))
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        let st = self.lock()?;
        let s = record(&st.socks, self.id)?;
        s.peer.ok_or_else(|| errno(libc::ENOTCONN))
    }

    fn counters(&self) -> Counters {
        let st = lock(&self.shared.state);
        let Some(s) = st.socks.get(&self.id) else {
            return Vec::new();
        };
        vec![
            ("bytes_sent", s.bytes_sent),
            ("bytes_received", s.bytes_received),
        ]
    }
}
