//! The system calls of the FillP driver: non-blocking UDP sockets with
//! `recvmmsg`/`sendmmsg` batches, the ICMP error queue, and eventfds.
//!
//! # Segmentation offload
//!
//! Per datagram, the kernel's UDP path (route lookup, socket buffer, the
//! loopback or NIC transmit, the receive softirq, the receive queue) costs
//! several times what the protocol itself does. Linux can move a run of
//! datagrams as one:
//!
//! * **GSO** (`UDP_SEGMENT`, Linux 4.18): one `sendmmsg` entry carries a run
//!   of up to [`GSO_MAX_SEGMENTS`] datagrams to one destination, all of one
//!   size but the last (which may be shorter), as one iovec each, with a
//!   `UDP_SEGMENT` control message giving the size. The kernel cuts it into
//!   datagrams as late as it can (on loopback: not at all when the receiver
//!   has GRO on). [`send_batch`] forms the runs from the queue as it is; the
//!   protocol's order is kept.
//! * **GRO** (`UDP_GRO`, Linux 5.0): the kernel hands a receiver that asked
//!   for it a run of datagrams from one source as one buffer, with a
//!   `UDP_GRO` control message giving the segment size; [`RecvBatch`] cuts it
//!   back into datagrams. Receive buffers are then 64 KiB per entry, or the
//!   kernel would truncate a coalesced run.
//!
//! The kernel's GSO support is asked once per process ([`gso_supported`]),
//! GRO per socket ([`bind`]'s `gro`); GSO is turned off per socket at run time where a device refuses GSO
//! ([`gso_refused`]: the datagrams are then resent without it, none lost).

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};

use bytes::{Bytes, BytesMut};

use crate::sys::{self, sockaddr::RawAddr};

/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 64;

/// Receive buffer per datagram without GRO, when no connection may use
/// datagrams above it (FillP's default size, 1400, fits).
pub const DGRAM_MAX: usize = 2048;

/// The largest UDP payload over IPv4 (65,535 less the IP and UDP headers):
/// the most a FillP datagram may carry.
pub const UDP_PAYLOAD_MAX: usize = 65_507;

/// Receive buffer per entry with GRO on: the largest UDP payload, which a
/// coalesced run never exceeds.
pub const GRO_BUF: usize = 65536;

/// Most datagrams in one GSO send (the kernel's limit is 64 up to 6.8, 128
/// since).
pub const GSO_MAX_SEGMENTS: usize = 64;

/// Most iovecs in one message (the kernel's `UIO_MAXIOV`).
const MAX_IOVS: usize = 1024;

/// Most payload bytes in one GSO send: within the 65,507 bytes of one
/// IPv4 UDP datagram, which is what the kernel builds before cutting.
pub const GSO_MAX_BYTES: usize = 65_000;

/// Most buffers [`RecvBatch::share`] tracks for reuse (4 MiB of 64 KiB
/// entries); past that the oldest is let go (freed when its reader is done).
const MAX_LENT: usize = 64;

/// Entries per `recvmmsg` with 64 KiB entries: a small batch keeps what was
/// received in cache until it is processed.
pub const GRO_BATCH: usize = 4;

/// `UDP_SEGMENT` from `linux/udp.h` (level `SOL_UDP`).
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` from `linux/udp.h` (level `SOL_UDP`).
const UDP_GRO: libc::c_int = 104;

/// Socket buffer size asked for (the kernel caps it unless we are root).
const SOCK_BUF: i32 = 8 << 20;

/// A non-blocking UDP socket bound to `addr`, with large buffers and ICMP
/// errors queued (`IP_RECVERR`) so a refused or dead peer is noticed at once.
/// With `gro`, asks for coalesced receives (`UDP_GRO`) where the kernel has
/// them; callers must then receive into [`GRO_BUF`]-sized buffers.
pub fn bind(addr: SocketAddr, gro: bool) -> io::Result<OwnedFd> {
    bind_with(addr, gro, &[])
}

/// [`bind`], with integer options `(level, name, value)` set before the
/// bind: what an application asked of its stream socket that the UDP
/// socket carries out for it (`SO_REUSEPORT`, `IPV6_V6ONLY`).
pub fn bind_with(addr: SocketAddr, gro: bool, options: &[(i32, i32, i32)]) -> io::Result<OwnedFd> {
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
    if gro {
        // Refused (ENOPROTOOPT) before Linux 5.0: datagrams then come one
        // by one, which the receive path handles the same way.
        let _ = sys::setsockopt(raw, libc::SOL_UDP, UDP_GRO, &on);
    }
    for &(level, name, value) in options {
        sys::setsockopt(raw, level, name, &value.to_ne_bytes())?;
    }
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

/// Room for the control messages of one datagram (`IP_PKTINFO` or
/// `IPV6_PKTINFO`, `UDP_GRO`, `UDP_SEGMENT`), 8-byte aligned. A receive
/// whose messages do not fit loses them (`MSG_CTRUNC`), so with room to spare.
type Cmsg = [u64; 16];

/// `getsockopt(SOL_UDP, UDP_SEGMENT)` answers where the kernel has UDP GSO.
/// The answer is the kernel's, not the socket's, so the first one is kept
/// (a path that refuses GSO is found per socket by [`gso_refused`]).
pub fn gso_supported(fd: RawFd) -> bool {
    // 0: not asked yet, 1: yes, 2: no.
    static KERNEL_GSO: AtomicU8 = AtomicU8::new(0);
    match KERNEL_GSO.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let yes = sys::getsockopt_int(fd, libc::SOL_UDP, UDP_SEGMENT).is_ok();
            KERNEL_GSO.store(if yes { 1 } else { 2 }, Ordering::Relaxed);
            yes
        }
    }
}

/// Whether a send error means the socket's path refuses GSO (a device
/// without checksum offload answers `EIO`; old kernels `EINVAL` or
/// `ENOPROTOOPT`; a segment above the device MTU `EMSGSIZE`, where the same
/// datagram alone would be fragmented and go): turn GSO off for the socket
/// and resend the same datagrams without it.
pub fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// Reusable buffers for one `recvmmsg` batch: [`BATCH`] entries of one
/// datagram each, or with GRO [`GRO_BATCH`] entries of a run of datagrams
/// from one source each.
pub struct RecvBatch {
    /// One buffer per entry, each allocated on its own. Carved from one
    /// allocation, four 64 KiB entries (256 KiB, which glibc serves with
    /// `mmap`) received 64 KiB datagrams on loopback at 5.8-7.8 Gbit/s
    /// where separate ones, or a single entry, reached 8.2-12.0 (perf: the
    /// kernel's copy into them, `_copy_to_iter`, went from 29% of all CPU
    /// to 5.5%). Cause not pinned down: placement, not the entry count,
    /// made the difference.
    ///
    /// An entry's buffer may be lent out ([`RecvBatch::share`]): the
    /// connection keeps the payload as a slice of it until the application
    /// reads it, and the entry gets another buffer.
    bufs: Vec<BytesMut>,
    /// Buffers lent out, oldest first, each with our handle: once a
    /// handle is the only one left (the application read the data), the
    /// buffer is taken back for an entry instead of allocating a new one.
    lent: VecDeque<Bytes>,
    /// Entries per call.
    count: usize,
    /// Bytes per entry: [`DGRAM_MAX`] or [`GRO_BUF`].
    entry: usize,
    addrs: Vec<RawAddr>,
    lens: Vec<usize>,
    ctrl: Vec<Cmsg>,
    ctrl_lens: Vec<usize>,
}

impl RecvBatch {
    /// Buffers for sockets that may receive up to 64 KiB per entry
    /// (`large`: coalesced runs with GRO, or datagrams above [`DGRAM_MAX`]):
    /// [`GRO_BATCH`] entries of [`GRO_BUF`]; otherwise [`BATCH`]
    /// entries of [`DGRAM_MAX`] (128 KiB).
    pub fn new(large: bool) -> Self {
        let entry = if large { GRO_BUF } else { DGRAM_MAX };
        let count = if large { GRO_BATCH } else { BATCH };
        RecvBatch {
            bufs: (0..count).map(|_| BytesMut::with_capacity(entry)).collect(),
            lent: VecDeque::new(),
            count,
            entry,
            addrs: (0..BATCH).map(|_| RawAddr::empty()).collect(),
            lens: vec![0; BATCH],
            ctrl: vec![[0u64; 16]; BATCH],
            ctrl_lens: vec![0; BATCH],
        }
    }

    /// Receives up to [`RecvBatch::capacity`] entries; `Ok(0)` when none is
    /// waiting.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: zeroed iovec/mmsghdr are valid; every pointer set below
        // points into `self`, which outlives the call.
        let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for (i, chunk) in self.bufs.iter_mut().enumerate() {
            chunk.clear();
            // The kernel writes into the spare capacity; `set_len` below
            // covers only what it wrote.
            let spare = chunk.spare_capacity_mut();
            iovs[i].iov_base = spare.as_mut_ptr().cast();
            iovs[i].iov_len = spare.len().min(self.entry);
            self.addrs[i] = RawAddr::empty();
            hdrs[i].msg_hdr.msg_name = self.addrs[i].as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_namelen = self.addrs[i].len;
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_control = self.ctrl[i].as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_controllen = mem::size_of::<Cmsg>();
        }
        // SAFETY: hdrs[..count] describe valid, writable buffers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                self.count as libc::c_uint,
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
            let len = (h.msg_len as usize).min(iovs[i].iov_len);
            // SAFETY: the kernel initialised the first `len` bytes of the
            // spare capacity (`msg_len`, bounded by the iovec it was given).
            unsafe { self.bufs[i].set_len(len) };
            self.lens[i] = len;
            self.addrs[i].len = h.msg_hdr.msg_namelen;
            self.ctrl_lens[i] = h.msg_hdr.msg_controllen;
        }
        Ok(n)
    }

    /// Entries one call receives at most.
    pub fn capacity(&self) -> usize {
        self.count
    }

    /// Entry `i` of the last batch: its source, the local address it was
    /// sent to (from `IP_PKTINFO`/`IPV6_PKTINFO`), and its datagrams (one,
    /// or a coalesced run cut at the `UDP_GRO` segment size).
    pub fn get(&self, i: usize) -> Option<Received<'_>> {
        let from = self.addrs.get(i)?.to_socket_addr().ok()?;
        let len = *self.lens.get(i)?;
        let data = self.bufs.get(i)?.get(..len)?;
        let (local, seg) = self.cmsgs(i);
        Some(Received {
            from,
            local,
            data,
            seg: seg.filter(|&s| s > 0).unwrap_or(len.max(1)),
        })
    }

    /// Entry `i` of the last batch as a shared buffer (see [`RecvBatch::get`]
    /// for its source, local address and datagrams), its place taken by a
    /// buffer back from the application or a new one.
    pub fn share(&mut self, i: usize) -> Option<Bytes> {
        let fresh = self.reclaim();
        let data = std::mem::replace(self.bufs.get_mut(i)?, fresh).freeze();
        if self.lent.len() >= MAX_LENT {
            self.lent.pop_front();
        }
        self.lent.push_back(data.clone());
        Some(data)
    }

    /// The oldest lent buffer if the application is done with it, else a
    /// new one.
    fn reclaim(&mut self) -> BytesMut {
        if self.lent.front().is_some_and(Bytes::is_unique) {
            if let Some(Ok(mut m)) = self.lent.pop_front().map(Bytes::try_into_mut) {
                m.clear();
                if m.try_reclaim(self.entry) {
                    return m;
                }
            }
        }
        BytesMut::with_capacity(self.entry)
    }

    /// Entry `i`'s local address and GRO segment size.
    fn cmsgs(&self, i: usize) -> (Option<IpAddr>, Option<usize>) {
        let (mut local, mut seg) = (None, None);
        let (Some(ctrl), Some(&len)) = (self.ctrl.get(i), self.ctrl_lens.get(i)) else {
            return (local, seg);
        };
        // SAFETY: a zeroed msghdr is valid; we only point it at `ctrl`, whose
        // first `len` bytes (bounded by its size) the kernel filled with
        // control messages.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_control = ctrl.as_ptr() as *mut libc::c_void;
        msg.msg_controllen = len.min(mem::size_of::<Cmsg>());
        // SAFETY: the CMSG_* macros stay within msg_controllen; data is read
        // unaligned, with the size its type says.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                        let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                        local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            info.ipi_addr.s_addr,
                        ))));
                    }
                    (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                        let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                        local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                    }
                    (libc::SOL_UDP, UDP_GRO) => {
                        let size = std::ptr::read_unaligned(data.cast::<libc::c_int>());
                        seg = usize::try_from(size).ok();
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        (local, seg)
    }
}

/// One `recvmmsg` entry: one datagram, or a GRO run of them.
pub struct Received<'a> {
    /// The source address.
    pub from: SocketAddr,
    /// The local address the peer wrote to, if the kernel said.
    pub local: Option<IpAddr>,
    data: &'a [u8],
    seg: usize,
}

impl<'a> Received<'a> {
    /// The datagrams, in order: `seg`-sized pieces, the last maybe shorter.
    pub fn datagrams(&self) -> std::slice::Chunks<'a, u8> {
        self.data.chunks(self.seg)
    }

    /// Bytes in the entry.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// The byte ranges of [`Received::datagrams`] within the entry.
    pub fn ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> {
        let (len, seg) = (self.data.len(), self.seg);
        (0..len).step_by(seg).map(move |a| a..(a + seg).min(len))
    }
}

/// Reusable buffers for [`send_batch`]: one iovec per datagram.
pub struct SendBatch {
    iovs: Vec<libc::iovec>,
    addrs: Vec<RawAddr>,
    ctrl: Vec<Cmsg>,
    /// Per entry: first iovec, iovec count, datagram count, control length.
    entries: Vec<(usize, usize, usize, usize)>,
}

/// A datagram to send: a header, then payload pieces shared with a send
/// buffer. The kernel gathers them (one iovec each), so the payload is
/// never copied next to its header in user space.
#[derive(Debug, Default)]
pub struct Datagram {
    /// The first bytes (the whole datagram if `body` is empty).
    pub head: Vec<u8>,
    /// The bytes after `head`, in order.
    pub body: Vec<Bytes>,
}

impl Datagram {
    /// Length in bytes.
    pub fn size(&self) -> usize {
        self.head.len() + self.body.iter().map(Bytes::len).sum::<usize>()
    }

    /// Empties it, keeping the header's allocation for reuse and letting go
    /// of the payload pieces.
    pub fn clear(&mut self) {
        self.head.clear();
        self.body.clear();
    }
}

// SAFETY: the iovecs point into the caller's datagrams only during a
// `send_batch` call, which rebuilds them first; between calls they are
// stale and never read, so moving the batch to another thread is sound.
unsafe impl Send for SendBatch {}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            iovs: Vec::with_capacity(BATCH * GSO_MAX_SEGMENTS),
            addrs: Vec::with_capacity(BATCH),
            ctrl: vec![[0u64; 16]; BATCH],
            entries: Vec::with_capacity(BATCH),
        }
    }
}

/// Sends `pkts` with `sendmmsg`; returns how many datagrams the kernel took
/// (it stops at the first failure). A full socket buffer returns `Ok` with
/// fewer.
///
/// With `gso`, each run of consecutive datagrams to one destination, of one
/// size but the last, goes as one entry with `UDP_SEGMENT` (at most
/// [`GSO_MAX_SEGMENTS`] datagrams and [`GSO_MAX_BYTES`]); an error then is
/// for the first entry, which [`gso_refused`] tells apart.
///
/// `source` gives, per destination, the local address to send from: the one
/// the peer wrote to. Without it, a socket bound to a wildcard would answer
/// from whatever address routing picks, and a peer that wrote to another of
/// our addresses would drop the reply.
pub fn send_batch(
    b: &mut SendBatch,
    fd: RawFd,
    pkts: &[(SocketAddr, Datagram)],
    gso: bool,
    source: impl Fn(&SocketAddr) -> Option<IpAddr>,
) -> io::Result<usize> {
    b.iovs.clear();
    b.addrs.clear();
    b.entries.clear();
    let mut i = 0;
    while i < pkts.len() && b.entries.len() < BATCH {
        let (dest, first) = (&pkts[i].0, pkts[i].1.size());
        let mut n = 1;
        let mut iovs = 1 + pkts[i].1.body.len();
        if gso && first > 0 {
            let max = GSO_MAX_SEGMENTS.min(GSO_MAX_BYTES / first);
            while n < max {
                let Some((d, p)) = pkts.get(i + n) else { break };
                let len = p.size();
                iovs += 1 + p.body.len();
                if d != dest || len > first || len == 0 || iovs > MAX_IOVS {
                    break;
                }
                n += 1;
                if len < first {
                    break; // a shorter datagram ends the run
                }
            }
        }
        let e = b.entries.len();
        let mut clen = source(dest).map_or(0, |src| pktinfo(&mut b.ctrl[e], src));
        if n > 1 || (gso && std::env::var_os("DMM_SEG1").is_some()) {
            clen = segment_cmsg(&mut b.ctrl[e], clen, first as u16);
        }
        let iov_first = b.iovs.len();
        for (_, p) in &pkts[i..i + n] {
            let pieces = std::iter::once(&p.head[..]).chain(p.body.iter().map(|b| &b[..]));
            for piece in pieces.filter(|x| !x.is_empty()) {
                b.iovs.push(libc::iovec {
                    iov_base: piece.as_ptr() as *mut libc::c_void,
                    iov_len: piece.len(),
                });
            }
        }
        b.addrs.push(RawAddr::from(dest));
        b.entries
            .push((iov_first, b.iovs.len() - iov_first, n, clen));
        i += n;
    }
    let m = b.entries.len();
    if m == 0 {
        return Ok(0);
    }
    // SAFETY: a zeroed mmsghdr is valid; every pointer set below points into
    // `b` or `pkts`, which outlive the call, and neither moves meanwhile.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    for (k, &(first, iovs, _, clen)) in b.entries.iter().enumerate() {
        let h = &mut hdrs[k].msg_hdr;
        h.msg_name = b.addrs[k].as_ptr() as *mut libc::c_void;
        h.msg_namelen = b.addrs[k].len;
        h.msg_iov = b.iovs[first..].as_mut_ptr();
        h.msg_iovlen = iovs;
        if clen > 0 {
            h.msg_control = b.ctrl[k].as_mut_ptr().cast();
            h.msg_controllen = clen;
        }
    }
    // SAFETY: hdrs[..m] describe valid, readable buffers.
    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), m as libc::c_uint, 0) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(0),
            _ => Err(e),
        };
    }
    Ok(b.entries[..(r as usize).min(m)]
        .iter()
        .map(|&(_, _, n, _)| n)
        .sum())
}

/// Appends a `UDP_SEGMENT` control message with `size` to the `used` bytes
/// of control messages in `buf`; returns the new length (unchanged if it
/// does not fit, and the entry then goes as one datagram: callers only use
/// this where it fits).
fn segment_cmsg(buf: &mut Cmsg, used: usize, size: u16) -> usize {
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
    let (space, clen) = unsafe {
        (
            libc::CMSG_SPACE(mem::size_of::<u16>() as u32) as usize,
            libc::CMSG_LEN(mem::size_of::<u16>() as u32) as usize,
        )
    };
    if used + space > mem::size_of::<Cmsg>() {
        return used;
    }
    // SAFETY: `used` is a multiple of the cmsg alignment (every message we
    // write is CMSG_SPACE-sized) and `used + space` fits in `buf`, so the
    // header and data written below stay inside it.
    unsafe {
        let c = buf
            .as_mut_ptr()
            .cast::<u8>()
            .add(used)
            .cast::<libc::cmsghdr>();
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = clen;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size);
    }
    used + space
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

/// An epoll set of UDP sockets, level-triggered, each registered with a
/// `u64` token. The driver waits on its fd with `ppoll` (nanosecond
/// timeouts for pacing; `epoll_wait` counts milliseconds) and then takes
/// the ready entries without blocking: one wake costs O(ready sockets), not
/// O(sockets) as a `ppoll` over every socket did.
pub struct Epoll(OwnedFd);

impl Epoll {
    /// A new, empty set.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = sys::cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: fd was just created and is owned by nobody else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Registers `fd` (`add`) or changes its events to `events`
    /// (`EPOLLIN`/`EPOLLOUT` bits; errors are always reported).
    pub fn set(&self, fd: RawFd, events: u32, token: u64, add: bool) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        let op = if add {
            libc::EPOLL_CTL_ADD
        } else {
            libc::EPOLL_CTL_MOD
        };
        // SAFETY: ev is a valid epoll_event for the call.
        sys::cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    /// Moves the ready entries into `out` (up to its capacity) without
    /// blocking, as `(token, events)`.
    pub fn ready(&self, buf: &mut Vec<libc::epoll_event>, out: &mut Vec<(u64, u32)>) {
        buf.clear();
        let cap = buf.capacity().max(1);
        // SAFETY: the kernel writes at most `cap` entries into buf's spare
        // capacity, and set_len covers exactly what it wrote.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), buf.as_mut_ptr(), cap as i32, 0) };
        if n > 0 {
            // SAFETY: see above; n <= cap.
            unsafe { buf.set_len(n as usize) };
        }
        out.extend(buf.iter().map(|e| (e.u64, e.events)));
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Random bytes from the kernel (connection-ID seed, cookie secrets).
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

/// What the kernel's routing table says about the way to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The source IP the kernel sends from (what a kernel socket bound to
    /// the unspecified address reports after `connect`).
    pub source: IpAddr,
    /// The path MTU the kernel knows (the outgoing device's MTU, or less
    /// once an ICMP "fragmentation needed" lowered it), in IP bytes.
    pub mtu: Option<u32>,
}

/// The route to `dest`, read from a probe socket: UDP `connect` sends
/// nothing, it only picks the route; `IP_MTU` then reads its MTU.
pub fn route_to(dest: SocketAddr) -> io::Result<Route> {
    let probe = std::net::UdpSocket::bind(match dest {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    })?;
    probe.connect(dest)?;
    let (level, name) = match dest {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let mtu = sys::getsockopt_int(probe.as_raw_fd(), level, name)
        .ok()
        .and_then(|m| u32::try_from(m).ok())
        .filter(|&m| m > 0);
    Ok(Route {
        source: probe.local_addr()?.ip(),
        mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lo() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// `data` as a datagram, cut into a header and up to two payload
    /// pieces when `cut` (so that the kernel has to gather it).
    fn dgram(data: &[u8], cut: bool) -> Datagram {
        if !cut || data.len() < 3 {
            return Datagram {
                head: data.to_vec(),
                body: Vec::new(),
            };
        }
        let (a, b) = (data.len() / 3, 2 * data.len() / 3);
        Datagram {
            head: data[..a].to_vec(),
            body: vec![
                Bytes::copy_from_slice(&data[a..b]),
                Bytes::copy_from_slice(&data[b..]),
            ],
        }
    }

    /// Receives on `fd` until `want` datagrams arrived (or 2 s passed).
    fn recv_n(fd: RawFd, gro: bool, want: usize) -> Vec<Vec<u8>> {
        let mut rx = RecvBatch::new(gro);
        let mut out = Vec::new();
        let t0 = std::time::Instant::now();
        while out.len() < want && t0.elapsed() < std::time::Duration::from_secs(2) {
            let n = rx.recv(fd).unwrap();
            for i in 0..n {
                let r = rx.get(i).unwrap();
                assert_eq!(r.local, Some(IpAddr::from([127, 0, 0, 1])));
                out.extend(r.datagrams().map(<[u8]>::to_vec));
            }
            if n == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        out
    }

    /// A buffer lent out with `share` serves an entry again once every
    /// other handle to it is gone, and not before.
    #[test]
    fn a_shared_buffer_comes_back_once_read() {
        let rx = bind(lo(), true).unwrap();
        let tx = bind(lo(), false).unwrap();
        let to = local_addr(rx.as_raw_fd()).unwrap();
        let mut sb = SendBatch::default();
        let mut batch = RecvBatch::new(true);
        let mut next = |k: u8| -> Bytes {
            let d = [(to, dgram(&[k; 40_000], false))];
            assert_eq!(
                send_batch(&mut sb, tx.as_raw_fd(), &d, false, |_| None).unwrap(),
                1
            );
            let t0 = std::time::Instant::now();
            while batch.recv(rx.as_raw_fd()).unwrap() == 0 {
                assert!(t0.elapsed() < std::time::Duration::from_secs(2));
            }
            batch.share(0).unwrap()
        };
        let first = next(1);
        let (p1, held) = (first.as_ptr(), first.slice(10..20));
        drop(first);
        // Still held by a reader: the entry gets a new buffer.
        assert_ne!(next(2).as_ptr(), p1);
        assert_ne!(next(3).as_ptr(), p1);
        drop(held);
        // Read: the next entry but one is received into it again.
        let _ = next(4);
        let again = next(5);
        assert_eq!(again.as_ptr(), p1);
        assert!(again.iter().all(|&b| b == 5) && again.len() == 40_000);
    }

    #[test]
    fn the_route_to_loopback_has_its_mtu_and_source() {
        let r = route_to(SocketAddr::from(([127, 0, 0, 1], 9))).unwrap();
        assert_eq!(r.source, IpAddr::V4(Ipv4Addr::LOCALHOST));
        // lo is 65536, but IP cannot carry more than 65535.
        assert_eq!(r.mtu, Some(65535));
    }

    /// Datagrams of nearly 64 KiB arrive whole and in order, up to
    /// [`GRO_BATCH`] per call.
    #[test]
    fn large_datagrams_arrive_whole() {
        let rx = bind(lo(), true).unwrap();
        let tx = bind(lo(), false).unwrap();
        let to = local_addr(rx.as_raw_fd()).unwrap();
        let data: Vec<Vec<u8>> = (0..6u8)
            .map(|k| vec![k; UDP_PAYLOAD_MAX - usize::from(k)])
            .collect();
        let pkts: Vec<(SocketAddr, Datagram)> = data
            .iter()
            .enumerate()
            .map(|(k, d)| (to, dgram(d, k % 2 == 1)))
            .collect();
        let mut sb = SendBatch::default();
        let mut sent = 0;
        while sent < pkts.len() {
            sent += send_batch(&mut sb, tx.as_raw_fd(), &pkts[sent..], true, |_| None).unwrap();
        }
        let mut batch = RecvBatch::new(true);
        let mut got = Vec::new();
        let t0 = std::time::Instant::now();
        while got.len() < pkts.len() && t0.elapsed() < std::time::Duration::from_secs(2) {
            let n = batch.recv(rx.as_raw_fd()).unwrap();
            assert!(n <= GRO_BATCH);
            for i in 0..n {
                got.extend(batch.get(i).unwrap().datagrams().map(<[u8]>::to_vec));
            }
        }
        assert_eq!(got, data);
    }

    /// Runs of every shape (a shorter last datagram, a change of
    /// destination, more than 64 datagrams, more than 64 KiB, datagrams in
    /// one piece or gathered from three) arrive as the datagrams sent, in
    /// order, with GRO on the receiver or not.
    #[test]
    fn gso_runs_arrive_as_the_datagrams_sent() {
        for gro in [true, false] {
            let (ra, rb) = (bind(lo(), gro).unwrap(), bind(lo(), gro).unwrap());
            let tx = bind(lo(), false).unwrap();
            let a = local_addr(ra.as_raw_fd()).unwrap();
            let b = local_addr(rb.as_raw_fd()).unwrap();
            let mut flat: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
            let mut add = |to: SocketAddr, len: usize, count: usize| {
                for _ in 0..count {
                    let k = flat.len();
                    flat.push((to, (0..len).map(|j| (k * 7 + j) as u8).collect()));
                }
            };
            add(a, 1000, 5);
            add(a, 300, 1);
            add(a, 1000, 3);
            add(b, 700, 2);
            add(a, 100, 70);
            add(a, 1400, 50);
            add(b, 1, 1);
            let pkts: Vec<(SocketAddr, Datagram)> = flat
                .iter()
                .enumerate()
                .map(|(k, (to, d))| (*to, dgram(d, k % 3 == 0)))
                .collect();
            let gso = gso_supported(tx.as_raw_fd());
            let mut sb = SendBatch::default();
            let mut sent = 0;
            while sent < pkts.len() {
                sent += send_batch(&mut sb, tx.as_raw_fd(), &pkts[sent..], gso, |_| None).unwrap();
            }
            let want = |to| -> Vec<Vec<u8>> {
                flat.iter()
                    .filter(|(d, _)| *d == to)
                    .map(|(_, p)| p.clone())
                    .collect()
            };
            let (wa, wb) = (want(a), want(b));
            assert_eq!(recv_n(ra.as_raw_fd(), gro, wa.len()), wa, "gro {gro}");
            assert_eq!(recv_n(rb.as_raw_fd(), gro, wb.len()), wb, "gro {gro}");
        }
    }

    /// A socket that refuses GSO (here: UDP checksums off, which GSO
    /// cannot do without) fails the run with an error `gso_refused` knows;
    /// the same datagrams then go without GSO.
    #[test]
    fn refused_gso_is_recognised() {
        let rx = bind(lo(), false).unwrap();
        let tx = bind(lo(), false).unwrap();
        assert!(
            gso_supported(tx.as_raw_fd()),
            "this kernel has no UDP GSO (Linux 4.18+): the refusal cannot be shown"
        );
        sys::setsockopt(
            tx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            &1i32.to_ne_bytes(),
        )
        .unwrap();
        let to = local_addr(rx.as_raw_fd()).unwrap();
        let pkts: Vec<(SocketAddr, Datagram)> =
            (0..4).map(|i| (to, dgram(&[i; 500], false))).collect();
        let mut sb = SendBatch::default();
        let e = send_batch(&mut sb, tx.as_raw_fd(), &pkts, true, |_| None).unwrap_err();
        assert!(gso_refused(&e), "{e:?}");
        assert_eq!(
            send_batch(&mut sb, tx.as_raw_fd(), &pkts, false, |_| None).unwrap(),
            4
        );
        assert_eq!(recv_n(rx.as_raw_fd(), false, 4).len(), 4);
    }
}
