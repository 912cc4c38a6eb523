//! The system calls of the FillP driver: non-blocking UDP sockets with
//! `recvmmsg`/`sendmmsg` batches, the ICMP error queue, and eventfds.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sys::{self, sockaddr::RawAddr};

/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 64;

/// Receive buffer per datagram: above any MTU FillP negotiates.
pub const DGRAM_MAX: usize = 2048;

/// Socket buffer size asked for (the kernel caps it unless we are root).
const SOCK_BUF: i32 = 8 << 20;

/// A non-blocking UDP socket bound to `addr`, with large buffers and ICMP
/// errors queued (`IP_RECVERR`) so a refused or dead peer is noticed at once.
pub fn bind(addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain syscall.
    let fd = sys::cvt(unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_UDP,
        )
    })?;
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    let val = SOCK_BUF.to_ne_bytes();
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // FORCE needs CAP_NET_ADMIN; without it the capped size still helps.
        if sys::setsockopt(raw, libc::SOL_SOCKET, force, &val).is_err() {
            let _ = sys::setsockopt(raw, libc::SOL_SOCKET, plain, &val);
        }
    }
    let on = 1i32.to_ne_bytes();
    let _ = match addr {
        SocketAddr::V4(_) => sys::setsockopt(raw, libc::IPPROTO_IP, libc::IP_RECVERR, &on),
        SocketAddr::V6(_) => sys::setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, &on),
    };
    // Learn each datagram's destination address, so that a socket bound to
    // a wildcard answers from the address the peer wrote to (see `send_batch`).
    let _ = match addr {
        SocketAddr::V4(_) => sys::setsockopt(raw, libc::IPPROTO_IP, libc::IP_PKTINFO, &on),
        SocketAddr::V6(_) => sys::setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, &on),
    };
    let ra = RawAddr::from(&addr);
    // SAFETY: ra is a valid address of ra.len bytes.
    sys::cvt(unsafe { libc::bind(raw, ra.as_ptr(), ra.len) })?;
    Ok(fd)
}

/// The bound address of a socket.
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    let mut raw = RawAddr::empty();
    // SAFETY: raw has room for any address.
    sys::cvt(unsafe { libc::getsockname(fd, raw.as_mut_ptr(), &mut raw.len) })?;
    raw.to_socket_addr()
}

/// Room for one `IP_PKTINFO`/`IPV6_PKTINFO` control message, 8-byte aligned.
type Cmsg = [u64; 8];

/// Reusable buffers for one `recvmmsg` batch.
pub struct RecvBatch {
    bufs: Vec<[u8; DGRAM_MAX]>,
    addrs: Vec<RawAddr>,
    lens: Vec<usize>,
    ctrl: Vec<Cmsg>,
    ctrl_lens: Vec<usize>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![[0u8; DGRAM_MAX]; BATCH],
            addrs: (0..BATCH).map(|_| RawAddr::empty()).collect(),
            lens: vec![0; BATCH],
            ctrl: vec![[0u64; 8]; BATCH],
            ctrl_lens: vec![0; BATCH],
        }
    }
}

impl RecvBatch {
    /// Receives up to [`BATCH`] datagrams; `Ok(0)` when none is waiting.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: zeroed iovec/mmsghdr are valid; every pointer set below
        // points into `self`, which outlives the call.
        let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for i in 0..BATCH {
            iovs[i].iov_base = self.bufs[i].as_mut_ptr().cast();
            iovs[i].iov_len = DGRAM_MAX;
            self.addrs[i] = RawAddr::empty();
            hdrs[i].msg_hdr.msg_name = self.addrs[i].as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_namelen = self.addrs[i].len;
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_control = self.ctrl[i].as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_controllen = mem::size_of::<Cmsg>();
        }
        // SAFETY: hdrs describes BATCH valid, writable buffers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                _ => Err(e),
            };
        }
        let n = n as usize;
        for (i, h) in hdrs[..n].iter().enumerate() {
            self.lens[i] = h.msg_len as usize;
            self.addrs[i].len = h.msg_hdr.msg_namelen;
            self.ctrl_lens[i] = h.msg_hdr.msg_controllen;
        }
        Ok(n)
    }

    /// The local address datagram `i` of the last batch was sent to, from
    /// its `IP_PKTINFO`/`IPV6_PKTINFO` control message.
    pub fn local(&self, i: usize) -> Option<IpAddr> {
        let ctrl = self.ctrl.get(i)?;
        let len = (*self.ctrl_lens.get(i)?).min(mem::size_of::<Cmsg>());
        // SAFETY: a zeroed msghdr is valid; we only point it at `ctrl`, whose
        // first `len` bytes the kernel filled with control messages.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_control = ctrl.as_ptr() as *mut libc::c_void;
        msg.msg_controllen = len;
        // SAFETY: the CMSG_* macros stay within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                        let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                        return Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            info.ipi_addr.s_addr,
                        ))));
                    }
                    (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                        let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                        return Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        None
    }

    /// Datagram `i` of the last batch and its source.
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        let from = self.addrs.get(i)?.to_socket_addr().ok()?;
        let len = (*self.lens.get(i)?).min(DGRAM_MAX);
        Some((from, &self.bufs.get(i)?[..len]))
    }
}

/// Sends `pkts` with `sendmmsg`; returns how many the kernel took (it stops
/// at the first failure). A full socket buffer returns `Ok` with fewer.
///
/// `source` gives, per destination, the local address to send from: the one
/// the peer wrote to. Without it, a socket bound to a wildcard would answer
/// from whatever address routing picks, and a peer that wrote to another of
/// our addresses would drop the reply.
pub fn send_batch(
    fd: RawFd,
    pkts: &[(SocketAddr, Vec<u8>)],
    source: impl Fn(&SocketAddr) -> Option<IpAddr>,
) -> io::Result<usize> {
    let n = pkts.len().min(BATCH);
    if n == 0 {
        return Ok(0);
    }
    let addrs: Vec<RawAddr> = pkts[..n].iter().map(|(a, _)| RawAddr::from(a)).collect();
    let mut ctrl: Vec<Cmsg> = vec![[0u64; 8]; n];
    let ctrl_lens: Vec<usize> = pkts[..n]
        .iter()
        .zip(ctrl.iter_mut())
        .map(|((dest, _), buf)| source(dest).map_or(0, |src| pktinfo(buf, src)))
        .collect();
    // SAFETY: zeroed iovec/mmsghdr are valid; pointers below point into
    // `pkts` and `addrs`, which outlive the call.
    let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    for i in 0..n {
        iovs[i].iov_base = pkts[i].1.as_ptr() as *mut libc::c_void;
        iovs[i].iov_len = pkts[i].1.len();
        hdrs[i].msg_hdr.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
        hdrs[i].msg_hdr.msg_namelen = addrs[i].len;
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
        if ctrl_lens[i] > 0 {
            hdrs[i].msg_hdr.msg_control = ctrl[i].as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_controllen = ctrl_lens[i];
        }
    }
    // SAFETY: hdrs describes n valid, readable buffers.
    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(0),
            _ => Err(e),
        };
    }
    Ok(r as usize)
}

/// Writes a `IP_PKTINFO`/`IPV6_PKTINFO` control message asking to send from
/// `src` into `buf`; returns its length.
fn pktinfo(buf: &mut Cmsg, src: IpAddr) -> usize {
    // SAFETY: a zeroed msghdr is valid; `buf` has room for one pktinfo
    // message of either family (checked by the CMSG_SPACE sums below).
    unsafe {
        let mut msg: libc::msghdr = mem::zeroed();
        msg.msg_control = buf.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of::<Cmsg>();
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() {
            return 0;
        }
        match src {
            IpAddr::V4(ip) => {
                let space = libc::CMSG_SPACE(mem::size_of::<libc::in_pktinfo>() as u32) as usize;
                if space > mem::size_of::<Cmsg>() {
                    return 0;
                }
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<libc::in_pktinfo>() as u32) as usize;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                space
            }
            IpAddr::V6(ip) => {
                let space = libc::CMSG_SPACE(mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
                if space > mem::size_of::<Cmsg>() {
                    return 0;
                }
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                space
            }
        }
    }
}

/// Drains the ICMP error queue: the destinations that were refused or
/// unreachable, with the errno the kernel reported.
pub fn drain_errors(fd: RawFd) -> Vec<(SocketAddr, i32)> {
    let mut out = Vec::new();
    for _ in 0..BATCH {
        let mut addr = RawAddr::empty();
        let mut data = [0u8; 64];
        let mut ctrl = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: zeroed msghdr is valid; pointers set point to locals.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = addr.as_mut_ptr().cast();
        msg.msg_namelen = addr.len;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctrl.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&ctrl);
        // SAFETY: msg describes valid local buffers.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            break;
        }
        addr.len = msg.msg_namelen;
        let mut code = libc::ECONNREFUSED;
        // SAFETY: the CMSG macros walk the control buffer the kernel filled.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let lvl = (*c).cmsg_level;
                let ty = (*c).cmsg_type;
                if (lvl == libc::IPPROTO_IP && ty == libc::IP_RECVERR)
                    || (lvl == libc::IPPROTO_IPV6 && ty == libc::IPV6_RECVERR)
                {
                    let ee = libc::CMSG_DATA(c) as *const libc::sock_extended_err;
                    code = std::ptr::read_unaligned(ee).ee_errno as i32;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if let Ok(a) = addr.to_socket_addr() {
            out.push((a, code));
        }
    }
    out
}

/// A non-blocking eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = sys::cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes an eventfd readable (adds 1).
pub fn signal(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a local; a full counter (EAGAIN) is still readable.
    unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
}

/// Makes an eventfd unreadable (reads the counter to zero).
pub fn drain(fd: RawFd) {
    let mut buf = [0u8; 8];
    // SAFETY: reads 8 bytes into a local; EAGAIN means already empty.
    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 8) };
}

/// `ppoll` with nanosecond precision. `timeout` None blocks. Returns the
/// number of ready fds; `EINTR` is returned to the caller.
pub fn ppoll(fds: &mut [libc::pollfd], timeout: Option<std::time::Duration>) -> io::Result<usize> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: fds is a valid slice of pollfd; tsp is null or points to a local.
    let n = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            tsp,
            std::ptr::null(),
        )
    };
    sys::cvt(n).map(|n| n as usize)
}

/// Blocks every signal in the calling thread, so signals go to application
/// threads (whose blocking calls then return `EINTR`), never to the driver.
pub fn block_signals() {
    // SAFETY: sigset_t is plain data; the calls only touch locals.
    unsafe {
        let mut set: libc::sigset_t = mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// 8 random bytes from the kernel (connection-ID seed, cookie secret).
pub fn random_bytes(out: &mut [u8]) {
    // SAFETY: out is valid for its length. On failure (no entropy syscall)
    // we fall back to the clock below.
    let n = unsafe { libc::getrandom(out.as_mut_ptr().cast(), out.len(), 0) };
    if n < out.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, b) in out.iter_mut().enumerate() {
            *b ^= (t >> ((i % 16) * 8)) as u8;
        }
    }
}

/// The source IP the kernel routes to `dest` from (what a kernel socket
/// bound to the unspecified address reports after `connect`).
pub fn source_ip_for(dest: SocketAddr) -> io::Result<std::net::IpAddr> {
    let probe = std::net::UdpSocket::bind(match dest {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    })?;
    // UDP connect sends nothing; it only picks the route.
    probe.connect(dest)?;
    Ok(probe.local_addr()?.ip())
}
