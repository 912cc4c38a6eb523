//! A TAP device: open or create it, set its MTU, bring it up, and move
//! single Ethernet frames in and out without blocking. The `smoltcp` stack
//! kind runs over one; the link emulator (`linkem`) relays between two.
//!
//! [`Tap::open`] opens the device with `IFF_TAP | IFF_NO_PI` and no
//! `TUNSETOFFLOAD` flags, so the kernel hands us finished frames of at most
//! MTU bytes (no GSO super-frames, no partial checksums) that a relay which
//! delays and drops whole frames (`linkem`) can take as they are.
//! [`Tap::open_offload`] adds `IFF_VNET_HDR` and asks for checksum and TCP
//! segmentation offload: every frame then travels behind a virtio-net header
//! ([`Tap::read_parts`], [`Tap::write_parts`]), and one frame may carry up to
//! 64 KiB of TCP that the kernel segments to the MTU, which is what lets
//! smoltcp move 64 KiB per syscall on a 1500-byte link. A device created
//! here is not persistent: closing the fd removes it. An existing
//! persistent device (`ip tuntap add mode tap`) is attached to.
//!
//! Errors are returned, never panicked on: a read or write that fails with
//! anything but `EAGAIN` (the device was deleted: `EBADFD`, ...) is
//! reported to the caller. The smoltcp stack takes the instance down then,
//! except for `EIO` on a write: the host side is down (or moving to another
//! namespace), and its device layer counts the frame as lost.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sys::context::context;
use crate::sys::{cvt, cvt_size};

/// Longest interface name the kernel takes (`IFNAMSIZ` minus the NUL).
const NAME_MAX: usize = libc::IFNAMSIZ - 1;

/// Largest MTU a TAP device accepts (`ETH_MAX_MTU` less the headers the tun
/// driver reserves: 65535 is refused with EINVAL, 65521 is taken).
pub const MTU_MAX: u32 = 65521;

/// Smallest MTU that carries IPv4 (68) and IPv6 (1280) packets. IPv6 needs
/// 1280; we ask for that much so both families always work.
pub const MTU_MIN: u32 = 1280;

/// `TUNSETOFFLOAD` flags (`linux/if_tun.h`): the kernel may hand us frames
/// with partial checksums (`TUN_F_CSUM`) and TCP super-frames over IPv4 and
/// IPv6 (`TUN_F_TSO4`, `TUN_F_TSO6`).
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// Whether frames travel behind a virtio-net header.
    vnet: bool,
}

/// An `ifreq` naming `name`, everything else zero.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() > NAME_MAX || name.bytes().any(|b| b <= b' ' || b == b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad device name {name:?} (1-{NAME_MAX} bytes, no '/' or spaces)"),
        ));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// Runs one `SIOC*` interface ioctl through a throwaway datagram socket.
fn if_ioctl(req: &mut libc::ifreq, op: libc::c_ulong) -> io::Result<()> {
    // SAFETY: plain syscall.
    let s = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: s was just created and is owned by nobody else.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: req is a valid ifreq that outlives the call.
    cvt(unsafe { libc::ioctl(s.as_raw_fd(), op as _, req as *mut libc::ifreq) })?;
    Ok(())
}

impl Tap {
    /// Opens the TAP device `name`, creating it if it does not exist.
    pub fn open(name: &str) -> io::Result<Tap> {
        Tap::open_flags(name, false)
    }

    /// Opens `name` as [`Tap::open`] does, with a virtio-net header on
    /// every frame and checksum and TCP segmentation offload on. A kernel
    /// that refuses to send us offloaded frames sends complete ones; the
    /// header stays, and what we send behind it is still taken.
    pub fn open_offload(name: &str) -> io::Result<Tap> {
        Tap::open_flags(name, true)
    }

    fn open_flags(name: &str, offload: bool) -> io::Result<Tap> {
        let mut req = ifreq(name)?;
        let flags = libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC;
        // SAFETY: the path is a NUL-terminated literal.
        let fd = cvt(unsafe { libc::open(c"/dev/net/tun".as_ptr(), flags) })
            .map_err(|e| context(e, "opening /dev/net/tun"))?;
        // SAFETY: fd was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let vnet = if offload { libc::IFF_VNET_HDR } else { 0 };
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | vnet) as libc::c_short;
        // SAFETY: req is a valid ifreq that outlives the call.
        cvt(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETIFF,
                &mut req as *mut libc::ifreq,
            )
        })
        .map_err(|e| context(e, format!("opening TAP device {name:?}")))?;
        // SAFETY: TUNSETOFFLOAD takes an integer by value.
        let set_offload = |flags: libc::c_ulong| unsafe {
            libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags)
        };
        // What the kernel may send us; what we send behind the header (partial
        // checksums, super-frames) it takes whatever this says. Without
        // offloads it must give us complete frames.
        let flags = if offload {
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        } else {
            0
        };
        if set_offload(flags) < 0 {
            cvt(set_offload(0))?;
        }
        Ok(Tap {
            fd,
            name: name.to_owned(),
            vnet: offload,
        })
    }

    /// Whether every frame travels behind a virtio-net header (see
    /// [`Tap::open_offload`]).
    pub fn vnet(&self) -> bool {
        self.vnet
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fd alone, for a caller that reads and writes it itself (the
    /// device goes when the fd is closed).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sets the MTU (`SIOCSIFMTU`).
    pub fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        let mut req = ifreq(&self.name)?;
        req.ifr_ifru.ifru_mtu = mtu.min(i32::MAX as u32) as libc::c_int;
        if_ioctl(&mut req, libc::SIOCSIFMTU)
            .map_err(|e| context(e, format!("setting MTU {mtu} on {}", self.name)))
    }

    /// Brings the link up (`IFF_UP`), keeping the other flags.
    pub fn set_up(&self) -> io::Result<()> {
        let mut req = ifreq(&self.name)?;
        if_ioctl(&mut req, libc::SIOCGIFFLAGS)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        if_ioctl(&mut req, libc::SIOCSIFFLAGS)
            .map_err(|e| context(e, format!("bringing {} up", self.name)))
    }

    /// Reads one frame into `buf`: `Ok(None)` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is valid for writes of its length.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match cvt_size(r) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one frame: `Ok(false)` when the kernel would block (the frame
    /// is dropped; TCP repairs the loss).
    pub fn write(&self, frame: &[u8]) -> io::Result<bool> {
        // SAFETY: frame is valid for reads of its length.
        let r = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        match cvt_size(r) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads one frame behind its `head` (the virtio-net header on an
    /// offload device) with one `readv`: the frame's length without the
    /// head, or `Ok(None)` when none is queued.
    pub fn read_parts(&self, head: &mut [u8], buf: &mut [u8]) -> io::Result<Option<usize>> {
        let iov = [
            libc::iovec {
                iov_base: head.as_mut_ptr().cast(),
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
        ];
        // SAFETY: both iovecs point at buffers valid for writes of their length.
        let r = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        match cvt_size(r) {
            Ok(n) => Ok(Some(n.saturating_sub(head.len()))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `head` and `frame` as one frame with one `writev`; `Ok(false)`
    /// as [`Tap::write`].
    pub fn write_parts(&self, head: &[u8], frame: &[u8]) -> io::Result<bool> {
        let iov = [
            libc::iovec {
                iov_base: head.as_ptr().cast_mut().cast(),
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point at buffers valid for reads of their
        // length; writev does not write through them.
        let r = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        match cvt_size(r) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
