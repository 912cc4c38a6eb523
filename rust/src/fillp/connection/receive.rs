//! Receiving DATA: reassembly, the packet-number gaps behind NACKs, and the
//! PACK and NACK reports.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::super::wire::{DataRepr, NackRepr, PackRepr, PnRange, DATA_HEADER_LEN, MAX_NACK_RANGES};
use super::handshake::Hs;
use super::transmit::BASE_DATAGRAM;
use super::{CloseReason, Connection, Event, Role, State};

#[derive(Debug, Clone, Copy)]
pub(super) struct Missing {
    since: Instant,
    nacks: u8,
    last_nack: Option<Instant>,
}

/// A NACK names a packet at most this many times.
const MAX_NACKS: u8 = 3;
/// Bound on tracked missing packet numbers (the rest falls to PACK holes/RTO).
const MAX_MISSING: usize = 4096;
/// A packet number this far ahead of the highest seen is refused.
const MAX_PN_JUMP: u32 = 1 << 16;
/// The first data packets of a connection are acknowledged every
/// [`QUICK_PACK_EVERY`] instead of every `pack_every` (as TCP's quick-ack
/// at connection start): the sender measures its first-flight train from
/// these reports, and one lost PACK should not void the measurement.
pub(super) const QUICK_PACKETS: u64 = 64;
/// See [`QUICK_PACKETS`].
pub(super) const QUICK_PACK_EVERY: u32 = 8;

/// `part` as a slice of `whole` (no copy), if it lies within it.
fn subslice(whole: &Bytes, part: &[u8]) -> Option<Bytes> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then(|| whole.slice(start..end))
}

/// How many Ethernet-sized packets a DATA payload of `len` bytes counts as
/// towards [`Config::pack_every`]: at least one. With 64 KiB datagrams
/// (loopback) a count of packets alone acknowledged every 2 MiB, and a
/// sender with a smaller send buffer waited for the PACK timer on every
/// refill (measured: 0.22 Gbit/s with a 256 KiB buffer).
fn pack_units(len: usize) -> u32 {
    let unit = usize::from(BASE_DATAGRAM) - DATA_HEADER_LEN;
    len.div_ceil(unit).clamp(1, u32::MAX as usize) as u32
}

impl Connection {
    pub(super) fn on_data(
        &mut self,
        now: Instant,
        d: DataRepr<'_>,
        shared: Option<&Bytes>,
    ) -> bool {
        if self.role == Role::Client && self.state == State::Handshake {
            // Data from the server proves our CONN_REQ arrived.
            if self.remote_cid == 0 || matches!(self.hs, Hs::Init) {
                return false;
            }
            self.on_established(now);
        }
        if !matches!(self.state, State::Established | State::Draining) {
            return false;
        }
        let pn = d.pn;
        if self.rx_any && pn >= self.rx_next_pn && pn - self.rx_next_pn > MAX_PN_JUMP {
            return false;
        }
        let inserted = match shared.and_then(|b| subslice(b, d.payload)) {
            Some(p) => self.recv.insert_shared(d.offset, &p, d.fin),
            None => self.recv.insert(d.offset, d.payload, d.fin),
        };
        let inserted = match inserted {
            Ok(i) => i,
            Err(_) => {
                // The peer changed its final size: nothing sane can follow.
                self.send_reset = true;
                self.enter_closed(CloseReason::ProtocolViolation);
                return true;
            }
        };
        self.rx_bytes += d.payload.len() as u64;
        self.rx_data_pkts += 1;
        self.stats.duplicate_bytes += (d.payload.len() - inserted.new_bytes) as u64;
        self.rx_pkts_since_pack += 1;
        self.rx_data_since_pack = self
            .rx_data_since_pack
            .saturating_add(pack_units(d.payload.len()));
        if !self.rx_any || pn >= self.rx_next_pn {
            let first_new = if self.rx_any { self.rx_next_pn } else { 0 };
            // Record the gap, newest numbers first if it is huge.
            let from = first_new.max(pn.saturating_sub(MAX_MISSING as u32));
            let mut any_gap = false;
            for m in from..pn {
                self.missing.insert(
                    m,
                    Missing {
                        since: now,
                        nacks: 0,
                        last_nack: None,
                    },
                );
                any_gap = true;
            }
            while self.missing.len() > MAX_MISSING {
                self.missing.pop_first();
            }
            if any_gap {
                let due = now + self.reorder_delay();
                self.nack_check = Some(self.nack_check.map_or(due, |c| c.min(due)));
            }
            self.rx_any = true;
            self.rx_next_pn = pn.wrapping_add(1);
            self.rx_highest_ts = d.timestamp;
            self.rx_highest_at = now;
        } else {
            self.missing.remove(&pn);
        }
        if inserted.new_bytes == 0 && !d.payload.is_empty() {
            // A resend of data we have: our PACK was probably lost.
            self.pack_now = true;
        }
        if d.fin {
            self.pack_now = true;
        }
        if self.recv.readable() > 0 && !self.readable_signalled && !self.local_close {
            self.readable_signalled = true;
            self.events.push_back(Event::Readable);
        }
        if self.recv.fin_complete() && !self.finished_signalled {
            self.finished_signalled = true;
            self.pack_now = true;
            self.events.push_back(Event::Finished);
            if !self.readable_signalled && !self.local_close {
                self.readable_signalled = true;
                self.events.push_back(Event::Readable);
            }
        }
        self.maybe_finish(now);
        true
    }

    pub(super) fn reorder_delay(&self) -> Duration {
        (self.rtt.srtt() / 8).clamp(Duration::from_millis(2), Duration::from_millis(50))
    }

    pub(super) fn build_nack(&mut self, now: Instant) -> Option<NackRepr> {
        let reorder = self.reorder_delay();
        let renack =
            (self.rtt.srtt() + self.rtt.srtt() / 2 + reorder).max(Duration::from_millis(20));
        let mut ranges = [PnRange::default(); MAX_NACK_RANGES];
        let mut n = 0usize;
        let mut next_check: Option<Instant> = None;
        let mut expired = Vec::new();
        for (&pn, m) in self.missing.iter_mut() {
            let due = match m.last_nack {
                None => m.since + reorder,
                Some(t) => t + renack,
            };
            if now < due || n == MAX_NACK_RANGES && ranges[n - 1].last.wrapping_add(1) != pn {
                next_check = Some(next_check.map_or(due, |c| c.min(due)));
                continue;
            }
            m.nacks += 1;
            m.last_nack = Some(now);
            if m.nacks >= MAX_NACKS {
                expired.push(pn);
            } else {
                let again = now + renack;
                next_check = Some(next_check.map_or(again, |c| c.min(again)));
            }
            if n > 0 && ranges[n - 1].last.wrapping_add(1) == pn {
                ranges[n - 1].last = pn;
            } else {
                ranges[n] = PnRange {
                    first: pn,
                    last: pn,
                };
                n += 1;
            }
        }
        for pn in expired {
            self.missing.remove(&pn);
        }
        self.nack_check = next_check;
        if n == 0 {
            return None;
        }
        Some(NackRepr {
            len: n as u8,
            ranges,
        })
    }

    pub(super) fn build_pack(&mut self, now: Instant) -> PackRepr {
        let highest = self.rx_next_pn.wrapping_sub(1);
        let advance = if self.rx_any {
            highest
                .wrapping_sub(self.pn_at_last_pack)
                .wrapping_add(u32::from(self.last_pack.is_none()))
        } else {
            0
        };
        let loss = if advance > 0 {
            (1.0 - f64::from(self.rx_pkts_since_pack) / f64::from(advance)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        // Receive rate over the last few reports, smoother than one interval.
        self.rate_hist.push_back((now, self.rx_bytes));
        while self.rate_hist.len() > 5 {
            self.rate_hist.pop_front();
        }
        let rate = match self.rate_hist.front() {
            Some(&(t, b)) if now > t => {
                ((self.rx_bytes - b) as f64 / now.duration_since(t).as_secs_f64()) as u64
            }
            _ => 0,
        };
        let (sack, sack_len) = self.recv.sack_ranges();
        self.limit_sent = self.recv.limit();
        self.pn_at_last_pack = highest;
        self.rx_pkts_since_pack = 0;
        self.rx_data_since_pack = 0;
        self.pack_now = false;
        self.last_pack = Some(now);
        PackRepr {
            cum_ack: self.recv.cum(),
            fin_received: self.recv.fin_complete(),
            highest_pn: highest,
            echo_ts: self.rx_highest_ts,
            ack_delay_us: now
                .saturating_duration_since(self.rx_highest_at)
                .as_micros()
                .min(u128::from(u32::MAX)) as u32,
            rx_bytes: self.rx_bytes,
            rate: rate.min(u64::from(u32::MAX)) as u32,
            loss: (loss * 65535.0) as u16,
            window: self.recv.advertised(),
            sack_len,
            sack,
        }
    }

    pub(super) fn pack_deadline(&self) -> Option<Instant> {
        if self.pack_now {
            return Some(self.last_rx);
        }
        if self.rx_data_since_pack == 0 {
            return None;
        }
        Some(match self.last_pack {
            Some(t) => t + self.config.pack_interval,
            None => self.last_rx,
        })
    }
}
