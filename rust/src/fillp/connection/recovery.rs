//! What the peer's reports do to the sender: acknowledgements, SACK and
//! NACK loss marking, delivery-rate samples.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::super::cc::AckSample;
use super::super::train::Train;
use super::super::wire::{NackRepr, PackRepr, DATA_HEADER_LEN};
use super::transmit::BASE_DATAGRAM;
use super::{us_since, Connection, Event, State};

/// Peer loss smoothing weight.
const LOSS_EWMA: f64 = 0.125;

/// One transmitted DATA packet still "in the pipe" (above the peer's highest
/// reported packet number), with what delivery-rate sampling needs.
#[derive(Debug, Clone, Copy)]
struct SentPkt {
    pn: u32,
    /// Datagram bytes.
    bytes: u32,
    sent: Instant,
    /// The pipe's `delivered`, `delivered_time` and `first_sent` when it
    /// left: the start of the interval its acknowledgement samples.
    delivered: u64,
    delivered_time: Instant,
    first_sent: Instant,
    /// Nothing waited to be sent behind it.
    app_limited: bool,
}

/// The DATA packets in flight, and delivery-rate sampling over them (as
/// BBR's: each packet remembers how much had been delivered when it left,
/// and the report that covers it measures the rate since).
#[derive(Debug)]
pub(super) struct Pipe {
    pkts: VecDeque<SentPkt>,
    /// Datagram bytes in flight.
    pub(super) bytes: u64,
    /// Highest packet number the peer has reported.
    peer_highest: Option<u32>,
    /// Payload bytes the peer reports having received.
    delivered: u64,
    /// When `delivered` last moved (or the pipe last started from empty).
    delivered_time: Instant,
    /// When the newest packet sampled so far was sent.
    first_sent: Instant,
}

/// What a fresh report took out of the [`Pipe`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Delivery {
    /// Payload bytes newly received by the peer (its total, less the last).
    pub(super) delivered_now: u64,
    /// Payload bytes of the packets the report resolved (arrived or lost).
    pub(super) resolved: u64,
    /// Of those, the first-flight train's.
    pub(super) train_bytes: u64,
    /// Delivery rate, bytes/s, if the interval was long enough to measure.
    pub(super) rate_sample: Option<u64>,
    /// The sample's packet left with nothing queued behind it.
    pub(super) app_limited: bool,
}

impl Pipe {
    pub(super) fn new(now: Instant) -> Self {
        Pipe {
            pkts: VecDeque::new(),
            bytes: 0,
            peer_highest: None,
            delivered: 0,
            delivered_time: now,
            first_sent: now,
        }
    }

    /// Whether a report up to `highest_pn` is news: for a packet we sent
    /// (`next_pn` is the next number), above the highest reported.
    pub(super) fn is_fresh(&self, highest_pn: u32, next_pn: u32) -> bool {
        next_pn > 0 && highest_pn < next_pn && self.peer_highest.is_none_or(|h| highest_pn > h)
    }

    /// A DATA packet of `size` datagram bytes left at `now`.
    pub(super) fn on_sent(&mut self, pn: u32, size: usize, now: Instant, app_limited: bool) {
        if self.pkts.is_empty() {
            // Nothing in flight: a delivery interval starts now.
            self.first_sent = now;
            self.delivered_time = now;
        }
        self.pkts.push_back(SentPkt {
            pn,
            bytes: size as u32,
            sent: now,
            delivered: self.delivered,
            delivered_time: self.delivered_time,
            first_sent: self.first_sent,
            app_limited,
        });
        self.bytes += size as u64;
    }

    /// A fresh report ([`Pipe::is_fresh`]): the peer has `rx_bytes` in all
    /// and packets up to `highest_pn` are resolved. `train` tells which of
    /// them were the first flight's; `min_rtt` is the path's.
    pub(super) fn on_report(
        &mut self,
        now: Instant,
        highest_pn: u32,
        rx_bytes: u64,
        train: &Train,
        min_rtt: Duration,
    ) -> Delivery {
        let mut d = Delivery {
            delivered_now: rx_bytes.saturating_sub(self.delivered),
            ..Delivery::default()
        };
        self.delivered = self.delivered.max(rx_bytes);
        while let Some(front) = self.pkts.front().copied() {
            if front.pn > highest_pn {
                break;
            }
            self.pkts.pop_front();
            self.bytes -= u64::from(front.bytes);
            let payload = u64::from(front.bytes).saturating_sub(DATA_HEADER_LEN as u64);
            d.resolved += payload;
            if train.contains(front.pn) {
                d.train_bytes += payload;
            }
            if front.pn == highest_pn {
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
                // Or, as Linux takes its samples, at least the path's min
                // RTT for a packet or more: a flow whose datagrams each
                // leave after the last was acknowledged (below ~17 Gbit/s
                // with 64 KiB datagrams on a 30 us loopback) restarts the
                // interval at every send, so it spans one RTT; without
                // this rule such a flow had no samples at all, and an
                // estimate that once fell low stayed there for up to half a
                // second (2 Gbit/s rounds in the loopback bench).
                let long_enough = interval >= Duration::from_millis(1)
                    || (interval >= Duration::from_micros(100)
                        && bytes >= 16 * u64::from(BASE_DATAGRAM))
                    || (!min_rtt.is_zero()
                        && interval >= min_rtt
                        && bytes >= u64::from(BASE_DATAGRAM));
                if long_enough && bytes > 0 {
                    d.rate_sample = Some((bytes as f64 / interval.as_secs_f64()) as u64);
                }
                d.app_limited = front.app_limited;
                self.first_sent = front.sent;
            }
        }
        self.delivered_time = now;
        self.peer_highest = Some(highest_pn);
        d
    }

    /// Forgets what is in flight (an RTO: all of it is presumed lost).
    pub(super) fn clear(&mut self) {
        self.pkts.clear();
        self.bytes = 0;
    }

    /// Gives back the queue's memory if it is empty.
    pub(super) fn shrink_if_empty(&mut self) {
        if self.pkts.is_empty() {
            self.pkts = VecDeque::new();
        }
    }

    /// Heap held, bytes.
    pub(super) fn heap_bytes(&self) -> usize {
        self.pkts.capacity() * std::mem::size_of::<SentPkt>()
    }
}

impl Connection {
    /// PACK: cumulative and selective acknowledgements, the peer's window,
    /// an RTT and delivery-rate sample for the controller, holes under
    /// SACKed data marked lost, and a wake-up for a blocked writer.
    pub(super) fn on_pack(&mut self, now: Instant, p: &PackRepr) -> bool {
        if !self.accept_stream_packet(now) {
            return false;
        }
        self.stats.packs_received += 1;
        let fresh = self.pipe.is_fresh(p.highest_pn, self.tx.next_pn);
        // Flow control: the limit only ever grows.
        self.tx.peer_limit = self
            .tx
            .peer_limit
            .max(p.cum_ack.saturating_add(u64::from(p.window)));
        let newly = self.tx.buf.on_cum_ack(p.cum_ack, p.fin_received);
        self.stats.bytes_acked += newly;
        for s in p.sacks() {
            // Saturating: a forged cum_ack near 2^64 must not wrap.
            let start = p.cum_ack.saturating_add(u64::from(s.start));
            self.tx
                .buf
                .on_sack(start, start.saturating_add(u64::from(s.len)));
        }
        let mut progress = newly > 0;
        let mut rtt_sample = None;
        let mut delivery = Delivery::default();
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
            delivery = self.pipe.on_report(
                now,
                p.highest_pn,
                p.rx_bytes,
                &self.tx.train,
                self.rtt.min(),
            );
            // When the reported packet reached the peer, on our clock less
            // the return delay (the same for every report of the train).
            let arrival = now
                .checked_sub(Duration::from_micros(u64::from(p.ack_delay_us)))
                .unwrap_or(now);
            if let Some(rate) = self
                .tx
                .train
                .on_pack(p.highest_pn, arrival, delivery.train_bytes)
            {
                self.tx.cc.on_capacity_hint(now, rate);
            }
        }
        let loss = f64::from(p.loss) / 65536.0;
        self.stats.loss = self.stats.loss * (1.0 - LOSS_EWMA) + loss * LOSS_EWMA;
        if let Some(r) = delivery.rate_sample {
            self.stats.delivery_rate = r;
        }
        // Holes under SACKed data older than an RTT are lost even if the NACK was.
        let age = self.rtt.srtt() + self.rtt.srtt() / 4 + self.config.pack_interval;
        self.tx.buf.mark_holes(now, age);
        self.tx.cc.on_ack(&AckSample {
            now,
            delivery_rate: delivery.rate_sample,
            app_limited: delivery.app_limited,
            rtt: rtt_sample,
            srtt: self.rtt.srtt(),
            recv_rate: u64::from(p.rate),
            loss,
            resolved_payload: delivery.resolved,
            delivered_bytes: delivery.delivered_now,
            in_flight: self.pipe.bytes,
        });
        if progress {
            self.timers
                .on_progress(now, self.tx.buf.in_flight_segments() > 0);
        }
        // A blocked writer hears of space once half the buffer is free (less
        // what loss holds back, see `send_wake_space`), as the kernel and
        // smoltcp do, not on every PACK: a bulk sender then wakes once per
        // half buffer instead of every 32 packets.
        if self.tx.write_blocked && self.send_space() >= self.send_wake_space() {
            self.tx.write_blocked = false;
            self.events.push_back(Event::Writable);
        }
        self.maybe_finish(now);
        true
    }

    /// NACK: the transmissions it names are lost and go back in the
    /// retransmission queue.
    pub(super) fn on_nack(&mut self, _now: Instant, n: &NackRepr) -> bool {
        if !matches!(self.state, State::Established | State::Draining) {
            return false;
        }
        self.stats.nacks_received += 1;
        for r in n.ranges() {
            // Walk only the packet numbers still mapped to segments, so a
            // forged range costs no more than what is in flight.
            let nacked = self.tx.buf.mapped_pns(r.first, r.last);
            for pn in nacked {
                self.tx.buf.on_nack(pn);
            }
        }
        true
    }

    /// The RTO fired: everything in flight is presumed lost and resent
    /// (a probe first, even into a full window), the controller is told,
    /// and the next RTO waits twice as long.
    pub(super) fn on_rto(&mut self, now: Instant) {
        self.tx.buf.on_rto();
        self.stats.rto_count += 1;
        self.tx.probe_pending = true;
        self.pipe.clear();
        self.tx.train.abandon();
        self.tx.cc.on_rto(now);
        self.timers.rto_backoff += 1;
        self.timers.tlp_done = true;
        self.timers.loss_base = Some(now);
    }

    /// The tail-loss probe timer fired: resend the last segment (once per
    /// loss period) to draw a report for a lost tail, before the RTO.
    pub(super) fn on_tail_probe_timer(&mut self) {
        self.timers.tlp_done = true;
        if self.tx.buf.probe_tail() {
            self.stats.tail_probes += 1;
            self.tx.probe_pending = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::Event;
    use super::*;

    /// Payload of a full-sized DATA packet at the default MTU.
    const SEG: u64 = 1400 - DATA_HEADER_LEN as u64;

    /// A server at 1 Gbit/s `fixed` (no pacing in the way of a few packets)
    /// that sent `n` full segments at `t0`, packet numbers 0..n.
    fn sender(clk: &Clock, n: u64) -> Connection {
        let mut s = server(fixed(125_000_000), clk.t0, 1 << 24);
        let len = (n * SEG) as usize;
        assert_eq!(s.write(&vec![9; len]), Ok(len));
        let sent = data_of(&drain(&mut s, clk.t0));
        let want: Vec<_> = (0..n).map(|i| (i as u32, i * SEG, SEG as usize)).collect();
        assert_eq!(sent, want);
        events(&mut s);
        s
    }

    #[test]
    fn a_nack_resends_the_named_transmissions_only() {
        let clk = Clock::new();
        let mut s = sender(&clk, 10);
        s.handle_datagram(clk.at(20), &nack(SERVER_CID, &[(3, 3), (6, 7)]));
        let resent = data_of(&drain(&mut s, clk.at(20)));
        // Under new packet numbers, oldest first.
        let want = [(10, 3 * SEG), (11, 6 * SEG), (12, 7 * SEG)];
        let got: Vec<_> = resent.iter().map(|&(pn, off, _)| (pn, off)).collect();
        assert_eq!(got, want);
        let st = s.stats();
        assert_eq!((st.retransmissions, st.nacks_received), (3, 1));
        // The same numbers again name transmissions already repaired.
        s.handle_datagram(clk.at(21), &nack(SERVER_CID, &[(3, 3), (6, 7)]));
        assert!(drain(&mut s, clk.at(21)).is_empty());
        // So does a range far beyond what was sent.
        s.handle_datagram(clk.at(21), &nack(SERVER_CID, &[(100, u32::MAX)]));
        assert!(drain(&mut s, clk.at(21)).is_empty());
        assert_eq!(s.stats().retransmissions, 3);
    }

    #[test]
    fn a_segment_lost_after_retransmissions_goes_twice() {
        let clk = Clock::new();
        let mut s = sender(&clk, 2);
        s.handle_datagram(clk.at(20), &nack(SERVER_CID, &[(0, 0)]));
        assert_eq!(data_of(&drain(&mut s, clk.at(20))), [(2, 0, SEG as usize)]);
        s.handle_datagram(clk.at(40), &nack(SERVER_CID, &[(2, 2)]));
        // Its third transmission, and a copy right behind it.
        let again = data_of(&drain(&mut s, clk.at(40)));
        assert_eq!(again, [(3, 0, SEG as usize), (4, 0, SEG as usize)]);
        assert_eq!(s.stats().retransmissions, 3);
    }

    #[test]
    fn a_hole_under_sacked_data_is_resent_once_it_is_old() {
        let clk = Clock::new();
        let mut s = sender(&clk, 10);
        // Segment 3 is missing; 4..10 arrived.
        let report = Report {
            cum_ack: 3 * SEG,
            highest_pn: 9,
            rx_bytes: 9 * SEG,
            sacks: &[(SEG as u32, 6 * SEG as u32)],
            ..Report::default()
        };
        s.handle_datagram(clk.at(20), &pack(SERVER_CID, report));
        assert_eq!(s.unacked() as u64, 7 * SEG);
        // Lost once older than 1.25 srtt + pack interval: 35 ms.
        assert!(data_of(&drain(&mut s, clk.at(20))).is_empty());
        s.handle_datagram(clk.at(34), &pack(SERVER_CID, report));
        assert!(data_of(&drain(&mut s, clk.at(34))).is_empty());
        s.handle_datagram(clk.at(35), &pack(SERVER_CID, report));
        assert_eq!(
            data_of(&drain(&mut s, clk.at(35))),
            [(10, 3 * SEG, SEG as usize)]
        );
        assert_eq!(s.stats().retransmissions, 1);
    }

    #[test]
    fn the_tail_loss_probe_resends_the_last_segment_once() {
        let clk = Clock::new();
        let mut s = sender(&clk, 5);
        // 2 srtt + pack interval after the first send.
        assert_eq!(s.poll_timeout(), Some(clk.at(50)));
        s.handle_timeout(clk.at(49));
        assert!(drain(&mut s, clk.at(49)).is_empty());
        s.handle_timeout(clk.at(50));
        assert_eq!(
            data_of(&drain(&mut s, clk.at(50))),
            [(5, 4 * SEG, SEG as usize)]
        );
        assert_eq!(s.stats().tail_probes, 1);
        // Once per loss period: the RTO comes next.
        assert_eq!(s.poll_timeout(), Some(clk.at(200)));
    }

    #[test]
    fn a_pack_acknowledges_samples_and_restarts_the_loss_timers() {
        let clk = Clock::new();
        let mut s = sender(&clk, 10);
        let report = Report {
            cum_ack: 4 * SEG,
            highest_pn: 3,
            echo_ts: 0,
            rx_bytes: 4 * SEG,
            window: 1 << 24,
            ..Report::default()
        };
        s.handle_datagram(clk.at(30), &pack(SERVER_CID, report));
        let st = s.stats();
        assert_eq!((st.bytes_acked, st.packs_received), (4 * SEG, 1));
        assert_eq!(s.unacked() as u64, 6 * SEG);
        // The echo gives a 30 ms sample: srtt 7/8 x 20 + 1/8 x 30 ms.
        assert_eq!(st.rtt, Duration::from_micros(21_250));
        // Four packets delivered over the 30 ms since the first left.
        assert_eq!(st.delivery_rate, (4 * SEG) * 1000 / 30);
        assert_eq!(s.pipe.bytes, 6 * 1400);
        // The window: up to cum_ack + window.
        assert_eq!(s.tx.peer_limit, 4 * SEG + (1 << 24));
        // Progress restarts the loss timers: TLP at 30 + 2 x 21.25 + 10 ms.
        assert_eq!(
            s.poll_timeout(),
            Some(clk.at(82) + Duration::from_micros(500))
        );
        // A stale report (not above the highest reported) takes no sample.
        let stale = Report {
            highest_pn: 2,
            ..report
        };
        s.handle_datagram(clk.at(40), &pack(SERVER_CID, stale));
        assert_eq!(s.stats().rtt, Duration::from_micros(21_250));
        assert_eq!(s.pipe.bytes, 6 * 1400);
        // Nor does its smaller window shrink the limit: it only grows.
        assert_eq!(s.tx.peer_limit, 4 * SEG + (1 << 24));
    }

    #[test]
    fn a_blocked_writer_hears_when_acknowledgements_free_half_the_buffer() {
        let clk = Clock::new();
        let mut s = server(fixed(12_500_000), clk.t0, 1 << 24);
        let cap = s.send_capacity();
        let n = s.write(&vec![1; 2 * cap]).unwrap();
        assert_eq!(n, cap);
        assert!(!s.is_writable());
        // Paced out over a few tens of ms (no timers run here).
        let mut sent_bytes = 0;
        for t in 0..1000 {
            let sent = data_of(&drain(&mut s, clk.at(t)));
            sent_bytes += sent.iter().map(|&(_, _, l)| l).sum::<usize>();
        }
        assert_eq!(sent_bytes, cap);
        events(&mut s);
        // Echoes that keep the RTT at 20 ms, and so the buffer's size.
        let ack = |cum_ack: u64, highest_pn, at_ms: u32| Report {
            cum_ack,
            highest_pn,
            echo_ts: (at_ms - 20) * 1000,
            rx_bytes: cum_ack,
            ..Report::default()
        };
        // Just under half: nothing.
        let half = (cap / 2) as u64;
        let pn_at = |off: u64| (off / SEG) as u32;
        let report = ack(half - 1, pn_at(half), 1000);
        s.handle_datagram(clk.at(1000), &pack(SERVER_CID, report));
        assert!(!s.is_writable() && events(&mut s).is_empty());
        assert_eq!(s.send_capacity(), cap);
        let report = ack(half, pn_at(half) + 1, 1001);
        s.handle_datagram(clk.at(1001), &pack(SERVER_CID, report));
        assert!(s.is_writable());
        assert_eq!(events(&mut s), [Event::Writable]);
    }

    #[test]
    fn the_pipe_samples_the_delivery_rate() {
        let clk = Clock::new();
        let mut p = Pipe::new(clk.t0);
        for pn in 0..10u32 {
            p.on_sent(pn, 1400, clk.at(u64::from(pn)), pn == 9);
        }
        assert_eq!(p.bytes, 14_000);
        assert!(p.is_fresh(4, 10) && !p.is_fresh(10, 10) && !p.is_fresh(0, 0));
        let train = Train::default();
        let d = p.on_report(clk.at(20), 4, 5 * SEG, &train, Duration::from_millis(20));
        // Five packets resolved; 5 x SEG delivered over the 20 ms since the
        // pipe started (the ack interval is longer than the send interval).
        let want = Delivery {
            delivered_now: 5 * SEG,
            resolved: 5 * SEG,
            train_bytes: 0,
            rate_sample: Some(5 * SEG * 1000 / 20),
            app_limited: false,
        };
        assert_eq!(d, want);
        assert_eq!(p.bytes, 7000);
        assert!(!p.is_fresh(4, 10) && p.is_fresh(5, 10));
        // The rest, reported 10 ms later: packet 9 left at 9 ms with 0
        // delivered, so its sample spans 30 ms; it was app-limited.
        let d = p.on_report(clk.at(30), 9, 10 * SEG, &train, Duration::from_millis(20));
        assert_eq!(d.rate_sample, Some(10 * SEG * 1000 / 30));
        assert_eq!(
            (d.delivered_now, d.app_limited, p.bytes),
            (5 * SEG, true, 0)
        );
        p.clear();
        p.shrink_if_empty();
        assert_eq!(p.heap_bytes(), 0);
    }

    /// A datagram sent into an empty pipe and acknowledged one RTT later
    /// (30 us on loopback) is a sample, as in Linux; shorter than the min
    /// RTT, or too small to time, it is not.
    #[test]
    fn a_packet_sent_into_an_empty_pipe_is_sampled_over_its_rtt() {
        let t0 = Instant::now();
        let us = |n: u64| t0 + Duration::from_micros(n);
        let train = Train::default();
        let min_rtt = Duration::from_micros(25);
        let mut p = Pipe::new(t0);
        let big = 65_507usize;
        let payload = (big - DATA_HEADER_LEN) as u64;
        // Each datagram leaves 240 us after the last and is acknowledged
        // after 30 us: nothing is in flight when the next one leaves.
        let mut delivered = 0;
        for (i, pn) in (0..3u32).enumerate() {
            let sent = 240 * i as u64;
            p.on_sent(pn, big, us(sent), false);
            delivered += payload;
            let d = p.on_report(us(sent + 30), pn, delivered, &train, min_rtt);
            let want = (payload as f64 / 30e-6) as u64;
            let got = d.rate_sample.expect("a sample every datagram");
            assert!(got.abs_diff(want) <= want / 100, "{got} vs {want}");
        }
        // Acknowledged faster than the min RTT: no sample.
        p.on_sent(3, big, us(1000), false);
        delivered += payload;
        let d = p.on_report(us(1020), 3, delivered, &train, min_rtt);
        assert_eq!(d.rate_sample, None);
        // A small packet over its RTT: too little to time.
        p.on_sent(4, 200, us(2000), false);
        delivered += 200 - DATA_HEADER_LEN as u64;
        let d = p.on_report(us(2030), 4, delivered, &train, min_rtt);
        assert_eq!(d.rate_sample, None);
    }
}
