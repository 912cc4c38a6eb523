//! smoltcp's [`phy::Device`] over a [`Tap`], with one receive and one
//! transmit buffer reused for every frame (no allocation per packet).
//!
//! smoltcp's own `TunTapInterface` panics on I/O errors other than
//! `WouldBlock`; here an error is stored in [`TapDevice::failure`] and the
//! device then behaves as an empty, silent link until the driver notices and
//! takes the instance down.

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

/// A TAP device as smoltcp sees it.
#[derive(Debug)]
pub struct TapDevice {
    tap: Tap,
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
        let frame = mtu + ETH_HEADER;
        TapDevice {
            tap,
            mtu,
            rx: vec![0; frame],
            tx: vec![0; frame],
            failure: None,
            stats: DeviceStats::default(),
            gate: SynGate::default(),
        }
    }

    /// The TAP device.
    pub fn tap(&self) -> &Tap {
        &self.tap
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

/// Room for one frame to send, written to the TAP when filled.
pub struct TxToken<'a> {
    tap: &'a Tap,
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
            match self.tap.write(frame) {
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
            let n = match self.tap.read(&mut self.rx) {
                Ok(Some(n)) => n,
                Ok(None) => return None,
                Err(e) => {
                    self.failure = Some(e);
                    return None;
                }
            };
            self.stats.frames_in += 1;
            self.stats.bytes_in += n as u64;
            if self.gate.admits(self.rx.get(..n)?) {
                break n;
            }
            self.stats.syn_dropped += 1;
        };
        let frame = self.rx.get(..n)?;
        Some((
            RxToken { frame },
            TxToken {
                tap: &self.tap,
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
            tap: &self.tap,
            buf: &mut self.tx,
            failure: &mut self.failure,
            stats: &mut self.stats,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + ETH_HEADER;
        // The driver drains the whole queue each turn.
        caps.max_burst_size = None;
        caps
    }
}
