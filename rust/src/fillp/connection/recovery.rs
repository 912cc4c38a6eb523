//! What the peer's reports do to the sender: acknowledgements, SACK and
//! NACK loss marking, delivery-rate samples.

use std::time::{Duration, Instant};

use super::super::cc::AckSample;
use super::super::wire::{NackRepr, PackRepr, DATA_HEADER_LEN};
use super::handshake::Hs;
use super::transmit::BASE_DATAGRAM;
use super::{us_since, Connection, Event, Role, State};

/// Peer loss smoothing weight.
const LOSS_EWMA: f64 = 0.125;

impl Connection {
    pub(super) fn on_pack(&mut self, now: Instant, p: &PackRepr) -> bool {
        if self.role == Role::Client && self.state == State::Handshake {
            if self.remote_cid == 0 || matches!(self.hs, Hs::Init) {
                return false;
            }
            self.on_established(now);
        }
        if !matches!(self.state, State::Established | State::Draining) {
            return false;
        }
        self.stats.packs_received += 1;
        let sent_any = self.next_pn > 0;
        let fresh = sent_any
            && p.highest_pn < self.next_pn
            && self.peer_highest.is_none_or(|h| p.highest_pn > h);
        // Flow control: the limit only ever grows.
        self.peer_limit = self
            .peer_limit
            .max(p.cum_ack.saturating_add(u64::from(p.window)));
        let newly = self.send.on_cum_ack(p.cum_ack, p.fin_received);
        self.stats.bytes_acked += newly;
        for s in p.sacks() {
            // Saturating: a forged cum_ack near 2^64 must not wrap.
            let start = p.cum_ack.saturating_add(u64::from(s.start));
            self.send
                .on_sack(start, start.saturating_add(u64::from(s.len)));
        }
        let mut progress = newly > 0;
        let mut rate_sample = None;
        let mut app_limited = false;
        let mut rtt_sample = None;
        let mut resolved = 0u64;
        let mut train_bytes = 0u64;
        let mut delivered_now = 0u64;
        if fresh {
            progress = true;
            let sample = us_since(self.epoch, now)
                .wrapping_sub(p.echo_ts)
                .wrapping_sub(p.ack_delay_us);
            if sample < 60_000_000 {
                let d = Duration::from_micros(u64::from(sample));
                self.rtt.update(d);
                rtt_sample = Some(d);
            }
            delivered_now = p.rx_bytes.saturating_sub(self.delivered);
            self.delivered = self.delivered.max(p.rx_bytes);
            while let Some(front) = self.pipe.front().copied() {
                if front.pn > p.highest_pn {
                    break;
                }
                self.pipe.pop_front();
                self.pipe_bytes -= u64::from(front.bytes);
                let payload = u64::from(front.bytes).saturating_sub(DATA_HEADER_LEN as u64);
                resolved += payload;
                if self.train.contains(front.pn) {
                    train_bytes += payload;
                }
                if front.pn == p.highest_pn {
                    let ack_elapsed = now.saturating_duration_since(front.delivered_time);
                    let send_elapsed = front.sent.saturating_duration_since(front.first_sent);
                    let interval = ack_elapsed.max(send_elapsed);
                    let bytes = self.delivered.saturating_sub(front.delivered);
                    // At least 1 ms, or 100 µs when the sample spans 16
                    // Ethernet-sized packets: PACKs come every `pack_every`
                    // such packets, so on a sub-millisecond path a 1 ms
                    // floor leaves no samples above pack_every x 1400 bytes
                    // per ms (0.36 Gbit/s) and the estimate can never grow
                    // past that.
                    let long_enough = interval >= Duration::from_millis(1)
                        || (interval >= Duration::from_micros(100)
                            && bytes >= 16 * u64::from(BASE_DATAGRAM));
                    if long_enough && bytes > 0 {
                        rate_sample = Some((bytes as f64 / interval.as_secs_f64()) as u64);
                    }
                    app_limited = front.app_limited;
                    self.first_sent = front.sent;
                }
            }
            self.delivered_time = now;
            self.peer_highest = Some(p.highest_pn);
            // When the reported packet reached the peer, on our clock less
            // the return delay (the same for every report of the train).
            let arrival = now
                .checked_sub(Duration::from_micros(u64::from(p.ack_delay_us)))
                .unwrap_or(now);
            if let Some(rate) = self.train.on_pack(p.highest_pn, arrival, train_bytes) {
                self.cc.on_capacity_hint(now, rate);
            }
        }
        let loss = f64::from(p.loss) / 65536.0;
        self.stats.loss = self.stats.loss * (1.0 - LOSS_EWMA) + loss * LOSS_EWMA;
        if let Some(r) = rate_sample {
            self.stats.delivery_rate = r;
        }
        // Holes under SACKed data older than an RTT are lost even if the NACK was.
        let age = self.rtt.srtt() + self.rtt.srtt() / 4 + self.config.pack_interval;
        self.send.mark_holes(now, age);
        self.cc.on_ack(&AckSample {
            now,
            delivery_rate: rate_sample,
            app_limited,
            rtt: rtt_sample,
            srtt: self.rtt.srtt(),
            recv_rate: u64::from(p.rate),
            loss,
            resolved_payload: resolved,
            delivered_bytes: delivered_now,
            in_flight: self.pipe_bytes,
        });
        if progress {
            self.timer_base = if self.send.in_flight_segments() > 0 {
                Some(now)
            } else {
                None
            };
            self.rto_backoff = 0;
            self.tlp_done = false;
        }
        // A blocked writer hears of space once half the buffer is free (less
        // what loss holds back, see `send_wake_space`), as the kernel and
        // smoltcp do, not on every PACK: a bulk sender then wakes once per
        // half buffer instead of every 32 packets.
        if self.write_blocked && self.send_space() >= self.send_wake_space() {
            self.write_blocked = false;
            self.events.push_back(Event::Writable);
        }
        self.maybe_finish(now);
        true
    }

    pub(super) fn on_nack(&mut self, _now: Instant, n: &NackRepr) -> bool {
        if !matches!(self.state, State::Established | State::Draining) {
            return false;
        }
        self.stats.nacks_received += 1;
        for r in n.ranges() {
            // Walk only the packet numbers still mapped to segments, so a
            // forged range costs no more than what is in flight.
            let nacked = self.send.mapped_pns(r.first, r.last);
            for pn in nacked {
                self.send.on_nack(pn);
            }
        }
        true
    }
}
