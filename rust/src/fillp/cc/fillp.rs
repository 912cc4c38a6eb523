//! FillP's rate control: send at the highest rate the receiver reported over
//! the last [`WINDOW`] PACKs, times a probing gain, without backing off on loss.
//!
//! The gain is what lets the rate grow to the path's capacity; with random loss
//! `p` the reported rate is `(1 - p)` times the sending rate, so growth stops
//! near `p = 1 - 1/GAIN` (20%). There is no in-flight cap: the receiver's
//! window is the only limit, as in FillP. Reports taken while the
//! application left the sender idle only ever raise the rate.

use std::collections::VecDeque;
use std::time::Instant;

use super::{AckSample, CcConfig, RateController, RateMode};

/// Number of PACK reports the maximum is taken over.
pub const WINDOW: usize = 11;
/// Probing gain over the windowed maximum.
pub const GAIN: f64 = 1.25;

/// FillP rate control state.
#[derive(Debug, Clone)]
pub struct Fillp {
    reports: VecDeque<u64>,
    rate: u64,
    floor: u64,
    max: u64,
}

impl Fillp {
    /// From the configuration.
    pub fn new(cfg: &CcConfig) -> Self {
        let floor = super::floor_rate(cfg.mtu);
        Fillp {
            reports: VecDeque::with_capacity(WINDOW),
            rate: cfg.initial_rate.max(floor),
            floor,
            max: cfg.max_rate.max(floor),
        }
    }
}

impl RateController for Fillp {
    fn on_ack(&mut self, s: &AckSample) {
        if s.recv_rate == 0 {
            return;
        }
        // A report of what the application sent says nothing about the
        // path: it may raise the rate but not lower it, or request/response
        // traffic would be paced at its own trickle (1-byte round trips
        // over loopback were held to 2,200 a second).
        if s.app_limited && (s.recv_rate as f64 * GAIN) < self.rate as f64 {
            return;
        }
        if self.reports.len() == WINDOW {
            self.reports.pop_front();
        }
        self.reports.push_back(s.recv_rate);
        let best = self.reports.iter().copied().max().unwrap_or(0);
        self.rate = ((best as f64 * GAIN) as u64).clamp(self.floor, self.max);
    }
    fn on_rto(&mut self, _: Instant) {
        // FillP keeps its rate; the reports will tell if the path collapsed.
    }
    fn pacing_rate(&self) -> u64 {
        self.rate
    }
    fn inflight_cap(&self) -> u64 {
        u64::MAX
    }
    fn mode(&self) -> RateMode {
        RateMode::Fillp
    }
}
