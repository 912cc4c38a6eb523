//! smoltcp's [`phy::Device`] over a [`Tap`], with one receive and one
//! transmit buffer reused for every frame (no allocation per packet), or
//! over a [`Link::Loopback`]: frames the instance sends come back to it, so
//! it reaches its own addresses without a TAP device or privilege (local
//! delivery, as the kernel's `lo`). The loopback keeps every code path of
//! the TAP one but the syscalls, which is what the conformance suite runs
//! the smoltcp socket layer through.
//!
//! On a TAP opened with offloads ([`Tap::open_offload`]) every frame travels
//! behind a virtio-net header: smoltcp builds TCP segments of up to 64 KiB
//! and leaves their checksums to the kernel, which cuts them to the MTU, and
//! the kernel hands over TCP super-frames ([`offload`](super::offload) does
//! the header and checksum work). A frame then costs one syscall per 64 KiB
//! instead of per MTU.
//!
//! smoltcp's own `TunTapInterface` panics on I/O errors other than
//! `WouldBlock`; here an error is stored in [`TapDevice::failure`] and the
//! device then behaves as an empty, silent link until the driver notices and
//! takes the instance down.

use std::collections::VecDeque;
use std::io;
use std::num::NonZeroUsize;

use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium, PacketMeta};
use smoltcp::time::Instant;

use super::offload::{self, VnetHdr, MAX_FRAME, VNET_HDR_LEN};
use super::syn_gate::SynGate;
use crate::sys::tap::Tap;

/// Ethernet header length (no VLAN tags: the TAP carries none of ours).
pub const ETH_HEADER: usize = 14;

/// Frame and byte counts of a device.
#[derive(Debug, Default, Clone, Copy)]
pub struct DeviceStats {
    /// Frames read from the TAP.
    pub frames_in: u64,
    /// Frames written to the TAP.
    pub frames_out: u64,
    /// Bytes read (whole frames).
    pub bytes_in: u64,
    /// Bytes written (whole frames).
    pub bytes_out: u64,
    /// Frames dropped because the TAP's queue was full.
    pub tx_dropped: u64,
    /// SYNs dropped because their listener had no room for them.
    pub syn_dropped: u64,
    /// Frames dropped because their TCP or UDP checksum was wrong (checked
    /// here only on an offload device; smoltcp checks them otherwise).
    pub csum_dropped: u64,
    /// Frames sent as TCP super-frames for the kernel to segment.
    pub tso_frames: u64,
}

/// Frames a loopback link holds at most; beyond, sends are dropped and
/// counted (TCP resends), as a full TAP queue would.
const LOOPBACK_QUEUE: usize = 4096;

/// What carries an instance's frames.
#[derive(Debug)]
pub enum Link {
    /// A TAP device.
    Tap(Tap),
    /// Frames sent come back as received, in order.
    Loopback(VecDeque<Vec<u8>>),
}

impl Link {
    /// Reads one frame into `buf`: its length, or `None` if none waits. The
    /// header goes to `head` on a TAP with one; elsewhere `head` is left as
    /// is.
    fn read(
        &mut self,
        head: &mut [u8; VNET_HDR_LEN],
        buf: &mut Vec<u8>,
    ) -> io::Result<Option<usize>> {
        match self {
            Link::Tap(tap) if tap.vnet() => tap.read_parts(head, buf),
            Link::Tap(tap) => tap.read(buf),
            Link::Loopback(q) => Ok(q.pop_front().map(|frame| {
                let n = frame.len();
                // The received frame becomes the buffer: no copy.
                *buf = frame;
                n
            })),
        }
    }

    /// Sends one frame, behind `head` on a TAP with a header: `false` if
    /// it was dropped (queue full).
    fn write(&mut self, head: &VnetHdr, frame: &[u8]) -> io::Result<bool> {
        match self {
            Link::Tap(tap) if tap.vnet() => tap.write_parts(&head.encode(), frame),
            Link::Tap(tap) => tap.write(frame),
            Link::Loopback(q) if q.len() >= LOOPBACK_QUEUE => Ok(false),
            Link::Loopback(q) => {
                q.push_back(frame.to_vec());
                Ok(true)
            }
        }
    }
}

/// A TAP device (or a loopback link) as smoltcp sees it.
#[derive(Debug)]
pub struct TapDevice {
    link: Link,
    /// Ethernet on a TAP; bare IP on the loopback, which needs no neighbour
    /// discovery (smoltcp resolves no link address for `::1`).
    medium: Medium,
    mtu: usize,
    /// Whether frames carry a virtio-net header and offloads are used.
    offload: bool,
    rx: Vec<u8>,
    tx: Vec<u8>,
    failure: Option<io::Error>,
    stats: DeviceStats,
    gate: SynGate,
}

impl TapDevice {
    /// Wraps `tap` whose MTU (IP packet size) is `mtu`.
    pub fn new(tap: Tap, mtu: usize) -> TapDevice {
        TapDevice::over(Link::Tap(tap), Medium::Ethernet, mtu)
    }

    /// A loopback link of MTU `mtu`, carrying bare IP packets.
    pub fn loopback(mtu: usize) -> TapDevice {
        TapDevice::over(Link::Loopback(VecDeque::new()), Medium::Ip, mtu)
    }

    fn over(link: Link, medium: Medium, mtu: usize) -> TapDevice {
        let offload = matches!(&link, Link::Tap(tap) if tap.vnet());
        let frame = if offload { MAX_FRAME } else { mtu + ETH_HEADER };
        TapDevice {
            link,
            medium,
            mtu,
            offload,
            rx: vec![0; frame],
            tx: vec![0; frame],
            failure: None,
            stats: DeviceStats::default(),
            gate: SynGate::default(),
        }
    }

    /// The TAP device (`None` on a loopback link).
    pub fn tap(&self) -> Option<&Tap> {
        match &self.link {
            Link::Tap(tap) => Some(tap),
            Link::Loopback(_) => None,
        }
    }

    /// Whether frames wait to be received without a poll of any fd: a
    /// loopback link's own sends. The driver then turns again at once.
    pub fn pending(&self) -> bool {
        matches!(&self.link, Link::Loopback(q) if !q.is_empty())
    }

    /// The first I/O error the device hit, if any (then it is dead).
    pub fn failure(&self) -> Option<&io::Error> {
        self.failure.as_ref()
    }

    /// Marks the device dead (for example on `POLLERR`/`POLLHUP`).
    pub fn fail(&mut self, e: io::Error) {
        self.failure.get_or_insert(e);
    }

    /// The gate that drops SYNs to listeners with a full queue.
    pub fn gate_mut(&mut self) -> &mut SynGate {
        &mut self.gate
    }

    /// Counters so far.
    pub fn stats(&self) -> DeviceStats {
        self.stats
    }

    /// Whether the device offloads checksums and TCP segmentation to the
    /// kernel (a TAP opened with [`Tap::open_offload`]).
    pub fn offload(&self) -> bool {
        self.offload
    }
}

/// One received frame, borrowed from the device's receive buffer.
pub struct RxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.frame)
    }
}

/// Room for one frame to send, written to the link when filled.
pub struct TxToken<'a> {
    link: &'a mut Link,
    buf: &'a mut Vec<u8>,
    failure: &'a mut Option<io::Error>,
    stats: &'a mut DeviceStats,
    offload: bool,
    meta: PacketMeta,
}

impl<'a> TxToken<'a> {
    /// A token over the device's parts (its fields, borrowed one by one so
    /// that a received frame can stay borrowed beside it).
    fn new(
        link: &'a mut Link,
        buf: &'a mut Vec<u8>,
        failure: &'a mut Option<io::Error>,
        stats: &'a mut DeviceStats,
        offload: bool,
    ) -> TxToken<'a> {
        TxToken {
            link,
            buf,
            failure,
            stats,
            offload,
            meta: PacketMeta::default(),
        }
    }
}

impl phy::TxToken for TxToken<'_> {
    fn set_meta(&mut self, meta: PacketMeta) {
        self.meta = meta;
    }

    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // smoltcp never asks for more than the MTU we announced, but a
        // short buffer must not panic: grow it instead.
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        let frame = &mut self.buf[..len];
        let r = f(frame);
        let head = if self.offload {
            let segment = self.meta.segmentation_offload_size.map(|s| s.get());
            self.stats.tso_frames += u64::from(segment.is_some());
            offload::tx_header(frame, segment)
        } else {
            VnetHdr::default()
        };
        if self.failure.is_none() {
            match self.link.write(&head, frame) {
                Ok(true) => {
                    self.stats.frames_out += 1;
                    self.stats.bytes_out += len as u64;
                }
                Ok(false) => self.stats.tx_dropped += 1,
                // EIO: the host side of the TAP is down (an administrator
                // took it down, or it is moving to another namespace). Like
                // an unplugged cable, the frame is lost and TCP will resend;
                // only a deleted device (EBADFD, POLLERR) kills the instance.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => self.stats.tx_dropped += 1,
                Err(e) => *self.failure = Some(e),
            }
        }
        r
    }
}

impl phy::Device for TapDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if self.failure.is_some() {
            return None;
        }
        let n = loop {
            let mut head = [0; VNET_HDR_LEN];
            let n = match self.link.read(&mut head, &mut self.rx) {
                Ok(Some(n)) => n,
                Ok(None) => return None,
                Err(e) => {
                    self.failure = Some(e);
                    return None;
                }
            };
            self.stats.frames_in += 1;
            self.stats.bytes_in += n as u64;
            let packet = self.rx.get(..n)?;
            if self.offload && !offload::rx_ok(&VnetHdr::decode(&head), packet) {
                self.stats.csum_dropped += 1;
                continue;
            }
            let admitted = match self.medium {
                Medium::Ip => self.gate.admits_ip(packet),
                _ => self.gate.admits(packet),
            };
            if admitted {
                break n;
            }
            self.stats.syn_dropped += 1;
        };
        let frame = self.rx.get(..n)?;
        let tx = TxToken::new(
            &mut self.link,
            &mut self.tx,
            &mut self.failure,
            &mut self.stats,
            self.offload,
        );
        Some((RxToken { frame }, tx))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.failure.is_some() {
            return None;
        }
        Some(TxToken::new(
            &mut self.link,
            &mut self.tx,
            &mut self.failure,
            &mut self.stats,
            self.offload,
        ))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = self.medium;
        caps.max_transmission_unit = match self.medium {
            Medium::Ip => self.mtu,
            _ => self.mtu + ETH_HEADER,
        };
        // The driver drains the whole queue each turn.
        caps.max_burst_size = None;
        if self.offload {
            // The kernel finishes TCP checksums (smoltcp must not, or a
            // super-frame could not be cut) and hands us partial ones, which
            // smoltcp would take for bad ones; `receive` checks the rest.
            // UDP smoltcp still fills in, but cannot check.
            caps.checksum.tcp = Checksum::None;
            caps.checksum.udp = Checksum::Tx;
            // IPv4 only: smoltcp 0.14 drops IPv6 packets over the MTU even
            // when it asked for them to be segmented.
            caps.segmentation.tcpv4 = NonZeroUsize::new(MAX_FRAME);
        }
        caps
    }
}
