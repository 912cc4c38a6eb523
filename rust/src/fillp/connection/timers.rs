//! Timers: RTO, tail-loss probe, PACK, keepalive, idle timeout, draining.

use std::time::{Duration, Instant};

use super::super::rtt::MAX_RTO;
use super::{CloseReason, Connection, State};

/// Receive memory is given back once nothing has arrived for this long.
const IDLE_SHRINK: Duration = Duration::from_secs(1);

impl Connection {
    pub(super) fn rto_deadline(&self) -> Option<Instant> {
        let base = self.timer_base?;
        let rto = (self.rtt.rto() * (1u32 << self.rto_backoff.min(6))).min(MAX_RTO);
        Some(base + rto)
    }

    pub(super) fn tlp_deadline(&self) -> Option<Instant> {
        if self.tlp_done {
            return None;
        }
        let base = self.timer_base?;
        Some(base + 2 * self.rtt.srtt() + self.config.pack_interval)
    }

    pub(super) fn keepalive_interval(&self) -> Duration {
        if self.send.flow_blocked(self.peer_limit) {
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
                    put(Some(self.last_rx));
                }
                return t;
            }
            State::Handshake => {
                put(Some(self.hs_next));
                put(Some(self.hs_start + self.config.handshake_timeout));
                put(self.pace_at);
                return t;
            }
            State::Draining => {
                put(self.drain_until);
                put(self.pack_deadline());
                return t;
            }
            State::Established => {}
        }
        if self.send_conn_ack || self.finish_pending {
            put(Some(self.last_rx));
        }
        put(self.pack_deadline());
        put(self.nack_check);
        put(self.pace_at);
        put(self.rto_deadline());
        put(self.tlp_deadline());
        put(Some(self.last_tx + self.keepalive_interval()));
        put(Some(self.last_rx + self.config.idle_timeout));
        t
    }

    /// Run expired timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Closed => {}
            State::Handshake => {
                if now >= self.hs_start + self.config.handshake_timeout {
                    self.enter_closed(CloseReason::HandshakeTimeout);
                }
                if self.pace_at.is_some_and(|p| now >= p) {
                    self.pace_at = None;
                }
            }
            State::Draining => {
                if self.drain_until.is_some_and(|d| now >= d) {
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
                if now >= self.last_rx + self.config.idle_timeout {
                    self.enter_closed(CloseReason::IdleTimeout);
                    return;
                }
                if now.saturating_duration_since(self.last_rx) >= IDLE_SHRINK {
                    // The flow paused (the keepalive timer brings us here):
                    // give the drained queues' memory back.
                    self.give_back_idle_memory();
                }
                if self.rto_deadline().is_some_and(|d| now >= d) {
                    self.send.on_rto();
                    self.stats.rto_count += 1;
                    self.probe_pending = true;
                    self.pipe.clear();
                    self.pipe_bytes = 0;
                    self.train.abandon();
                    self.cc.on_rto(now);
                    self.rto_backoff += 1;
                    self.tlp_done = true;
                    self.timer_base = Some(now);
                } else if self.tlp_deadline().is_some_and(|d| now >= d) {
                    self.tlp_done = true;
                    if self.send.probe_tail() {
                        self.stats.tail_probes += 1;
                        self.probe_pending = true;
                    }
                }
                if self.pace_at.is_some_and(|p| now >= p) {
                    self.pace_at = None;
                }
            }
        }
    }
}
