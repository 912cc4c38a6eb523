//! Round-trip time estimation (RFC 6298 smoothing plus a running minimum).

use std::time::Duration;

/// Lower bound of the retransmission timeout.
pub const MIN_RTO: Duration = Duration::from_millis(200);
/// Upper bound of the (backed-off) retransmission timeout. Kept low so a
/// connection recovers quickly after a blackout and the closing handshake
/// retries often enough under heavy loss.
pub const MAX_RTO: Duration = Duration::from_secs(2);

/// Smoothed RTT, variance, latest and minimum samples.
#[derive(Debug, Clone, Copy)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    latest: Duration,
    min: Duration,
    initial: Duration,
}

impl RttEstimator {
    /// Start with `initial` as the guess until the first sample.
    pub fn new(initial: Duration) -> Self {
        RttEstimator {
            srtt: None,
            rttvar: initial / 2,
            latest: initial,
            min: Duration::MAX,
            initial,
        }
    }

    /// Feed one sample (already corrected for the peer's ack delay).
    pub fn update(&mut self, sample: Duration) {
        let sample = sample.max(Duration::from_micros(1));
        self.latest = sample;
        self.min = self.min.min(sample);
        match self.srtt {
            None => {
                self.srtt = Some(sample);
                self.rttvar = sample / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(sample);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((s * 7 + sample) / 8);
            }
        }
    }

    /// Whether any sample has been taken.
    pub fn has_sample(&self) -> bool {
        self.srtt.is_some()
    }
    /// Smoothed RTT (the initial guess before any sample).
    pub fn srtt(&self) -> Duration {
        self.srtt.unwrap_or(self.initial)
    }
    /// RTT variation.
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }
    /// Most recent sample.
    pub fn latest(&self) -> Duration {
        self.latest
    }
    /// Smallest sample seen (the initial guess before any).
    pub fn min(&self) -> Duration {
        if self.min == Duration::MAX {
            self.initial
        } else {
            self.min
        }
    }
    /// Retransmission timeout before backoff.
    pub fn rto(&self) -> Duration {
        (self.srtt() + 4 * self.rttvar).clamp(MIN_RTO, MAX_RTO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing() {
        let mut r = RttEstimator::new(Duration::from_millis(100));
        assert_eq!(r.srtt(), Duration::from_millis(100));
        r.update(Duration::from_millis(40));
        assert_eq!(r.srtt(), Duration::from_millis(40));
        assert_eq!(r.rttvar(), Duration::from_millis(20));
        r.update(Duration::from_millis(80));
        assert_eq!(r.srtt(), Duration::from_millis(45));
        assert_eq!(r.min(), Duration::from_millis(40));
        assert_eq!(r.rto(), Duration::from_millis(200));
    }
}
