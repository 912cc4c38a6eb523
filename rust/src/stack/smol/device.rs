//! smoltcp's [`phy::Device`] over a [`Tap`], with one receive and one
//! transmit buffer reused for every frame (no allocation per packet), or
//! over a [`Link::Loopback`]: frames the instance sends come back to it, so
//! it reaches its own addresses without a TAP device or privilege (local
//! delivery, as the kernel's `lo`). The loopback keeps every code path of
//! the TAP one but the syscalls, which is what the conformance suite runs
//! the smoltcp socket layer through.
//!
//! smoltcp's own `TunTapInterface` panics on I/O errors other than
//! `WouldBlock`; here an error is stored in [`TapDevice::failure`] and the
//! device then behaves as an empty, silent link until the driver notices and
//! takes the instance down.

use std::collections::VecDeque;
use std::io;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

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
    /// Reads one frame into `buf`: its length, or `None` if none waits.
    fn read(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        match self {
            Link::Tap(tap) => tap.read(buf),
            Link::Loopback(q) => Ok(q.pop_front().map(|frame| {
                let n = frame.len();
                // The received frame becomes the buffer: no copy.
                *buf = frame;
                n
            })),
        }
    }

    /// Sends one frame: `false` if it was dropped (queue full).
    fn write(&mut self, frame: &[u8]) -> io::Result<bool> {
        match self {
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
        let frame = mtu + ETH_HEADER;
        TapDevice {
            link,
            medium,
            mtu,
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
}

impl phy::TxToken for TxToken<'_> {
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
        if self.failure.is_none() {
            match self.link.write(frame) {
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
            let n = match self.link.read(&mut self.rx) {
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
        Some((
            RxToken { frame },
            TxToken {
                link: &mut self.link,
                buf: &mut self.tx,
                failure: &mut self.failure,
                stats: &mut self.stats,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.failure.is_some() {
            return None;
        }
        Some(TxToken {
            link: &mut self.link,
            buf: &mut self.tx,
            failure: &mut self.failure,
            stats: &mut self.stats,
        })
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
        caps
    }
}
