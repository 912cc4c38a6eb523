//! Token-bucket pacer: spreads packets at the controller's rate.

use std::time::{Duration, Instant};

/// A token bucket measured in bytes.
#[derive(Debug, Clone)]
pub struct Pacer {
    tokens: f64,
    last: Option<Instant>,
}

/// Burst allowance: about 1 ms at `rate`, at least two packets, at most 64 KiB.
fn burst(rate: u64, mtu: usize) -> f64 {
    ((rate / 1000) as f64).clamp(2.0 * mtu as f64, 65536.0_f64.max(2.0 * mtu as f64))
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new()
    }
}

impl Pacer {
    /// An empty bucket that fills from the first call.
    pub fn new() -> Self {
        Pacer {
            tokens: 0.0,
            last: None,
        }
    }

    fn refill(&mut self, now: Instant, rate: u64, mtu: usize) {
        let cap = burst(rate, mtu);
        match self.last {
            None => self.tokens = cap,
            Some(l) => {
                let dt = now.saturating_duration_since(l).as_secs_f64();
                self.tokens = (self.tokens + dt * rate as f64).min(cap);
            }
        }
        self.last = Some(now);
    }

    /// `None` if a packet of `size` may go now, else when it may.
    pub fn delay(&mut self, now: Instant, rate: u64, mtu: usize, size: usize) -> Option<Instant> {
        self.refill(now, rate, mtu);
        let need = size as f64 - self.tokens;
        if need <= 0.0 {
            return None;
        }
        let rate = rate.max(1) as f64;
        // Round up to a whole microsecond so the retry is never too early.
        let us = (need / rate * 1e6).ceil() as u64;
        Some(now + Duration::from_micros(us.max(1)))
    }

    /// Spend tokens for a packet that was sent.
    pub fn on_sent(&mut self, size: usize) {
        self.tokens -= size as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_at_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new();
        let rate = 1_000_000; // 1 MB/s: 1000-byte packets every 1 ms
        let mut now = t0;
        let mut sent = 0;
        while now < t0 + Duration::from_millis(100) {
            match p.delay(now, rate, 1000, 1000) {
                None => {
                    p.on_sent(1000);
                    sent += 1;
                }
                Some(t) => now = t,
            }
        }
        // 2 packets of initial burst plus ~100 paced.
        assert!((100..=103).contains(&sent), "{sent}");
    }
}
