//! A fixed configured rate, no window: for paths whose capacity is known.

use std::time::Instant;

use super::{AckSample, CcConfig, RateController, RateMode};

/// Paces at `CcConfig::fixed_rate`, whatever happens.
#[derive(Debug, Clone)]
pub struct Fixed {
    rate: u64,
}

impl Fixed {
    /// From the configuration.
    pub fn new(cfg: &CcConfig) -> Self {
        Fixed {
            rate: cfg
                .fixed_rate
                .clamp(super::floor_rate(cfg.mtu), cfg.max_rate.max(1)),
        }
    }
}

impl RateController for Fixed {
    fn on_ack(&mut self, _: &AckSample) {}
    fn on_rto(&mut self, _: Instant) {}
    fn pacing_rate(&self) -> u64 {
        self.rate
    }
    fn inflight_cap(&self) -> u64 {
        u64::MAX
    }
    fn mode(&self) -> RateMode {
        RateMode::Fixed
    }
}
