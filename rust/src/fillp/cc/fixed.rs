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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(rate: u64, mtu: u16) -> u64 {
        Fixed::new(&CcConfig {
            mode: RateMode::Fixed,
            initial_rate: 1_250_000,
            max_rate: 10_000_000_000,
            fixed_rate: rate,
            mtu,
        })
        .pacing_rate()
    }

    #[test]
    fn large_datagrams_do_not_raise_the_floor() {
        // 4 Mbit/s with loopback's 64 KiB datagrams stays 4 Mbit/s.
        assert_eq!(fixed(500_000, 65_507), 500_000);
        assert_eq!(fixed(500_000, 1400), 500_000);
        // Below the floor of 4 Ethernet-sized packets per 100 ms.
        assert_eq!(fixed(1000, 65_507), 60_000);
    }
}
