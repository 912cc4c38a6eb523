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
    fn rto_deadline(&self) -> Option<Instant> {
        self.timers.rto_deadline(&self.rtt)
    }

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
