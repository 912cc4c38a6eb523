//! Timers: RTO, tail-loss probe, PACK, keepalive, idle timeout, draining,
//! and the handshake's; [`Connection::poll_timeout`] and
//! [`Connection::handle_timeout`].

use std::time::{Duration, Instant};

use super::super::rtt::{RttEstimator, MAX_RTO};
use super::{CloseReason, Connection, State};

/// Receive memory is given back once nothing has arrived for this long.
const IDLE_SHRINK: Duration = Duration::from_secs(1);

/// The connection's clocks: the loss timers (RTO and tail-loss probe,
/// running from the last progress), when we last sent and heard anything,
/// and the end of the linger after a finished close.
#[derive(Debug)]
pub(super) struct Timers {
    /// Start of the loss timers: the last forward progress with segments
    /// in flight (or the first send); `None` with nothing in flight.
    pub(super) loss_base: Option<Instant>,
    /// RTOs in a row without progress: the RTO doubles with each.
    pub(super) rto_backoff: u32,
    /// The tail-loss probe of this loss period was sent (or an RTO fired).
    pub(super) tlp_done: bool,
    /// Last datagram sent (the keepalive runs from here).
    pub(super) last_tx: Instant,
    /// Last datagram accepted (the idle timeout runs from here).
    pub(super) last_rx: Instant,
    /// Draining: forget the connection at this time.
    pub(super) drain_until: Option<Instant>,
}

impl Timers {
    pub(super) fn new(now: Instant) -> Self {
        Timers {
            loss_base: None,
            rto_backoff: 0,
            tlp_done: false,
            last_tx: now,
            last_rx: now,
            drain_until: None,
        }
    }

    /// When the RTO fires: `rto` doubled per RTO in a row (at most 2^6),
    /// capped at [`MAX_RTO`].
    pub(super) fn rto_deadline(&self, rtt: &RttEstimator) -> Option<Instant> {
        let base = self.loss_base?;
        let rto = (rtt.rto() * (1u32 << self.rto_backoff.min(6))).min(MAX_RTO);
        Some(base + rto)
    }

    /// When the tail-loss probe goes: 2 srtt + the peer's PACK interval
    /// after the last progress, once per loss period.
    pub(super) fn tlp_deadline(&self, srtt: Duration, pack_interval: Duration) -> Option<Instant> {
        if self.tlp_done {
            return None;
        }
        let base = self.loss_base?;
        Some(base + 2 * srtt + pack_interval)
    }

    /// Forward progress at `now`: the loss timers restart (or stop, with
    /// nothing in flight) and the RTO backoff resets.
    pub(super) fn on_progress(&mut self, now: Instant, in_flight: bool) {
        self.loss_base = if in_flight { Some(now) } else { None };
        self.rto_backoff = 0;
        self.tlp_done = false;
    }
}

impl Connection {
    /// When the RTO fires (see [`Timers::rto_deadline`]).
    fn rto_deadline(&self) -> Option<Instant> {
        self.timers.rto_deadline(&self.rtt)
    }

    /// When the tail-loss probe goes (see [`Timers::tlp_deadline`]).
    fn tlp_deadline(&self) -> Option<Instant> {
        self.timers
            .tlp_deadline(self.rtt.srtt(), self.config.pack_interval)
    }

    /// When a PACK is due by time (see `Receiver::pack_deadline`).
    pub(super) fn pack_deadline(&self) -> Option<Instant> {
        self.rx
            .pack_deadline(self.timers.last_rx, self.config.pack_interval)
    }

    /// Silence after which we send a KEEPALIVE: `keepalive`, or the RTO
    /// while the peer's window holds data back (the KEEPALIVE is then the
    /// zero-window probe).
    pub(super) fn keepalive_interval(&self) -> Duration {
        if self.tx.buf.flow_blocked(self.tx.peer_limit) {
            // Doubles as a zero-window probe.
            self.rtt.rto()
        } else {
            self.config.keepalive
        }
    }

    /// When [`Connection::handle_timeout`] (or `poll_transmit`) next needs to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut put = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        match self.state {
            State::Closed => {
                if self.send_reset {
                    put(Some(self.timers.last_rx));
                }
                return t;
            }
            State::Handshake => {
                put(Some(self.hs.next));
                put(Some(self.epoch + self.config.handshake_timeout));
                put(self.tx.pace_at);
                return t;
            }
            State::Draining => {
                put(self.timers.drain_until);
                put(self.pack_deadline());
                return t;
            }
            State::Established => {}
        }
        if self.hs.send_conn_ack || self.finish_pending {
            put(Some(self.timers.last_rx));
        }
        put(self.pack_deadline());
        put(self.rx.nack_check);
        put(self.tx.pace_at);
        put(self.rto_deadline());
        put(self.tlp_deadline());
        put(Some(self.timers.last_tx + self.keepalive_interval()));
        put(Some(self.timers.last_rx + self.config.idle_timeout));
        t
    }

    /// Run expired timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Closed => {}
            State::Handshake => {
                if now >= self.epoch + self.config.handshake_timeout {
                    self.enter_closed(CloseReason::HandshakeTimeout);
                }
                if self.tx.pace_at.is_some_and(|p| now >= p) {
                    self.tx.pace_at = None;
                }
            }
            State::Draining => {
                if self.timers.drain_until.is_some_and(|d| now >= d) {
                    self.state = State::Closed;
                }
            }
            State::Established => {
                if self.finish_pending {
                    self.maybe_finish(now);
                    if self.state != State::Established {
                        return;
                    }
                }
                if now >= self.timers.last_rx + self.config.idle_timeout {
                    self.enter_closed(CloseReason::IdleTimeout);
                    return;
                }
                if now.saturating_duration_since(self.timers.last_rx) >= IDLE_SHRINK {
                    // The flow paused (the keepalive timer brings us here):
                    // give the drained queues' memory back.
                    self.give_back_idle_memory();
                }
                if self.rto_deadline().is_some_and(|d| now >= d) {
                    self.on_rto(now);
                } else if self.tlp_deadline().is_some_and(|d| now >= d) {
                    self.on_tail_probe_timer();
                }
                if self.tx.pace_at.is_some_and(|p| now >= p) {
                    self.tx.pace_at = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::wire::Body;
    use super::super::testing::*;
    use super::super::{Config, Event};
    use super::*;

    fn keepalives(sent: &[Vec<u8>]) -> usize {
        sent.iter()
            .filter(|d| matches!(parse(d).body, Body::Keepalive))
            .count()
    }

    #[test]
    fn the_rto_fires_after_the_probe_and_doubles_up_to_its_cap() {
        let clk = Clock::new();
        let mut s = server(fixed(125_000_000), clk.t0, 1 << 24);
        s.write(&[5; 3000]).unwrap();
        assert_eq!(data_of(&drain(&mut s, clk.t0)).len(), 3);
        // Tail probe at 50 ms, then the RTO (srtt 20 ms: its 200 ms floor)
        // from the first send, then 400, 800, 1600 ms and the 2 s cap.
        let (mut fired, mut resent_per_timer) = (Vec::new(), Vec::new());
        for _ in 0..6 {
            let t = s.poll_timeout().unwrap();
            s.handle_timeout(t - Duration::from_micros(1));
            assert!(drain(&mut s, t - Duration::from_micros(1)).is_empty());
            s.handle_timeout(t);
            resent_per_timer.push(data_of(&drain(&mut s, t)).len());
            fired.push(t.duration_since(clk.t0).as_millis());
        }
        assert_eq!(fired, [50, 200, 600, 1400, 3000, 5000]);
        // The probe resends the last segment; each RTO all three, and from
        // their third transmission on each twice.
        assert_eq!(resent_per_timer, [1, 4, 6, 6, 6, 6]);
        let st = s.stats();
        assert_eq!(
            (st.tail_probes, st.rto_count, st.retransmissions),
            (1, 5, 29)
        );
    }

    #[test]
    fn progress_resets_the_rto_backoff() {
        let clk = Clock::new();
        let mut t = Timers::new(clk.t0);
        let rtt = RttEstimator::new(ms(100));
        assert_eq!(t.rto_deadline(&rtt), None);
        t.loss_base = Some(clk.t0);
        t.rto_backoff = 3;
        // 100 ms + 4 x 50 ms = 300 ms, x 8, capped at 2 s.
        assert_eq!(t.rto_deadline(&rtt), Some(clk.at(2000)));
        t.rto_backoff = 1;
        assert_eq!(t.rto_deadline(&rtt), Some(clk.at(600)));
        t.tlp_done = true;
        assert_eq!(t.tlp_deadline(ms(100), ms(10)), None);
        t.on_progress(clk.at(50), true);
        assert_eq!(t.rto_deadline(&rtt), Some(clk.at(350)));
        assert_eq!(t.tlp_deadline(ms(100), ms(10)), Some(clk.at(260)));
        t.on_progress(clk.at(60), false);
        assert_eq!(
            (t.rto_deadline(&rtt), t.tlp_deadline(ms(100), ms(10))),
            (None, None)
        );
    }

    #[test]
    fn a_silent_connection_sends_keepalives_and_times_out() {
        let clk = Clock::new();
        let cfg = Config::default();
        let (every, idle) = (cfg.keepalive, cfg.idle_timeout);
        let mut s = server(cfg, clk.t0, 1 << 20);
        drain(&mut s, clk.t0);
        events(&mut s);
        let mut sent_at = Vec::new();
        while let Some(t) = s.poll_timeout() {
            s.handle_timeout(t);
            if keepalives(&drain(&mut s, t)) == 1 {
                sent_at.push(t.duration_since(clk.t0).as_secs());
            }
            if s.is_closed() {
                assert_eq!(t, clk.t0 + idle);
                break;
            }
        }
        assert_eq!(every.as_secs(), 5);
        assert_eq!(sent_at, [5, 10, 15, 20, 25]);
        assert_eq!(
            events(&mut s),
            [Event::Closed {
                reason: super::super::CloseReason::IdleTimeout
            }]
        );
    }

    #[test]
    fn anything_from_the_peer_restarts_the_idle_timeout() {
        let clk = Clock::new();
        let mut s = server(Config::default(), clk.t0, 1 << 20);
        drain(&mut s, clk.t0);
        s.handle_datagram(clk.at(20_000), &keepalive(SERVER_CID));
        // Answered with a PACK (it doubles as a window probe).
        assert_eq!(packs_of(&drain(&mut s, clk.at(20_000))).len(), 1);
        s.handle_timeout(clk.at(30_000));
        assert!(!s.is_closed());
        s.handle_timeout(clk.at(49_999));
        assert!(!s.is_closed());
        s.handle_timeout(clk.at(50_000));
        assert!(s.is_closed());
    }

    #[test]
    fn a_zero_window_is_probed_every_rto() {
        let clk = Clock::new();
        let mut s = server(Config::default(), clk.t0, 0);
        s.write(&[1; 100]).unwrap();
        let sent = drain(&mut s, clk.t0);
        assert!(data_of(&sent).is_empty() && keepalives(&sent) == 0);
        assert_eq!(s.poll_timeout(), Some(clk.at(200)));
        assert_eq!(keepalives(&drain(&mut s, clk.at(199))), 0);
        assert_eq!(keepalives(&drain(&mut s, clk.at(200))), 1);
        // The window opens: the data goes.
        let open = Report {
            window: 1000,
            ..Report::default()
        };
        s.handle_datagram(clk.at(220), &pack(SERVER_CID, open));
        assert_eq!(data_of(&drain(&mut s, clk.at(220))), [(0, 0, 100)]);
    }

    #[test]
    fn a_finished_connection_lingers_for_the_idle_timeout() {
        let clk = Clock::new();
        let mut s = server(Config::default(), clk.t0, 1 << 20);
        drain(&mut s, clk.t0);
        // The peer's FIN, read to EOF; ours, sent and acknowledged.
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, b"", true, 0));
        assert_eq!(s.read(&mut [0; 4]), Ok(0));
        s.shutdown_write();
        assert_eq!(data_of(&drain(&mut s, clk.at(1))), [(0, 0, 0)]);
        let fin_ack = Report {
            fin: true,
            ..Report::default()
        };
        s.handle_datagram(clk.at(20), &pack(SERVER_CID, fin_ack));
        assert!(s.is_closed() && !s.is_drained());
        assert_eq!(s.close_reason(), Some(super::super::CloseReason::Finished));
        assert_eq!(s.poll_timeout(), Some(clk.at(30_020)));
        // A retransmitted FIN restarts the linger and is acknowledged.
        s.handle_datagram(clk.at(1000), &data(SERVER_CID, 1, 0, b"", true, 0));
        assert!(packs_of(&drain(&mut s, clk.at(1000)))[0].fin_received);
        assert_eq!(s.poll_timeout(), Some(clk.at(31_000)));
        s.handle_timeout(clk.at(30_999));
        assert!(!s.is_drained());
        s.handle_timeout(clk.at(31_000));
        assert!(s.is_drained());
    }
}
