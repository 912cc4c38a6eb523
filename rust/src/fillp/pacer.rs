//! Token-bucket pacer: spreads packets at the controller's rate.
//!
//! When the bucket runs dry at a high rate, the next send is not due as soon
//! as one packet's worth has trickled back, but when [`QUANTUM`] of rate has
//! (if that is at least [`MIN_RUN`] packets). A driver then wakes once per
//! quantum and sends a run of packets (one GSO send) instead of waking for
//! each packet: at 1 Gbit/s that was a timer every 11 µs, each one a driver
//! turn for a packet or two. The long-run rate is unchanged (the bucket
//! keeps counting while the sender waits), and slower flows, all the
//! simulator's included, are paced exactly as before.

use std::time::{Duration, Instant};

/// A token bucket measured in bytes.
#[derive(Debug, Clone)]
pub struct Pacer {
    tokens: f64,
    last: Option<Instant>,
}

/// Burst allowance: about 1 ms at `rate`, at least two packets, at most
/// 64 KiB or [`MIN_RUN`] packets, whichever is more. The packet bound is for
/// large datagrams (64 KiB on loopback): 64 KiB there was two packets, and
/// a driver woke for every second one (19k wakes a second at 20 Gbit/s).
fn burst(rate: u64, mtu: usize) -> f64 {
    let most = 65536.0_f64.max((MIN_RUN * mtu) as f64);
    ((rate / 1000) as f64).clamp(2.0 * mtu as f64, most)
}

/// How much rate a dry bucket waits for before the next send: 250 µs (a
/// quarter of the burst allowance)...
pub const QUANTUM: Duration = Duration::from_micros(250);

/// ... where that is at least this many packets (above ~360 Mbit/s at a
/// 1400-byte MTU); slower flows wait for one packet at a time, as before.
pub const MIN_RUN: usize = 8;

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
        if size as f64 <= self.tokens {
            return None;
        }
        // Dry: wait for a quantum's worth (at most the bucket's capacity)
        // where that is a run of packets; below, for this packet alone, so
        // slow paths keep their fine-grained spacing.
        let quantum = (rate as f64 * QUANTUM.as_secs_f64()).min(burst(rate, mtu));
        let want = if quantum >= (MIN_RUN * size) as f64 {
            quantum
        } else {
            size as f64
        };
        let need = want - self.tokens;
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

    #[test]
    fn dry_bucket_waits_for_a_quantum() {
        let t0 = Instant::now();
        let mut p = Pacer::new();
        // 125 MB/s (1 Gbit/s), 1400-byte packets: a quantum is 31,250
        // bytes, 22 packets; the long-run rate stays 125 MB/s.
        let (rate, size) = (125_000_000, 1400);
        let mut now = t0;
        let (mut sent, mut wakeups) = (0u64, 0u64);
        while now < t0 + Duration::from_millis(100) {
            match p.delay(now, rate, size, size) {
                None => {
                    p.on_sent(size);
                    sent += 1;
                }
                Some(t) => {
                    now = t;
                    wakeups += 1;
                }
            }
        }
        let bytes = sent * size as u64;
        assert!((12_400_000..=12_700_000).contains(&bytes), "{bytes}");
        // One wakeup per quantum (400 in 100 ms), not one per packet (8900).
        assert!(wakeups <= 410, "{wakeups}");
    }
}
