//! One direction's impairment pipeline, sans-IO.
//!
//! [`Impairment::on_frame`] takes the time a frame arrived and its length and
//! says whether it is dropped or when it must leave. It never reads a clock
//! and never touches a device, so it runs the same under a virtual clock in
//! tests as in the relay. Decisions depend only on the seed and the sequence
//! of `(now, len)` inputs.
//!
//! Order of the stages, per frame:
//!
//! 1. loss: Bernoulli, then Gilbert-Elliott (both may be on);
//! 2. duplication: a survivor is copied with probability `dup`; the copy goes
//!    through the following stages as a frame of its own;
//! 3. drop-tail queue + rate limit: a single FIFO server. `busy_until` is the
//!    time the serializer finishes the last accepted frame; the bytes still
//!    waiting are `(busy_until - now) * rate`, and a frame that would push
//!    them over the limit is dropped. Otherwise it leaves the serializer at
//!    `max(now, busy_until) + len * 8 / rate`;
//! 4. delay: fixed delay plus uniform jitter. Without reordering the release
//!    time is clamped to be no earlier than the previous frame's, as on a
//!    real wire where jitter comes from queueing.

use super::params::Params;

/// Nanoseconds on whatever clock the caller uses (monotonic in the relay,
/// virtual in tests).
pub type Nanos = u64;

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Random loss (Bernoulli or Gilbert-Elliott).
    Loss,
    /// The drop-tail queue was full.
    Queue,
}

/// What happens to one frame (or to its duplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Discarded.
    Drop(DropReason),
    /// To be sent at this time.
    Release(Nanos),
}

/// The outcome for one input frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The frame itself.
    pub frame: Verdict,
    /// A duplicate, when one was made.
    pub duplicate: Option<Verdict>,
}

/// A small, fast, seedable generator (xoshiro256**, seeded by splitmix64).
/// Statistical quality is ample for loss decisions; it is not for secrets.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `p`; never draws when `p` is 0, so a perfect
    /// link does not spend time on random numbers.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (p >= 1.0 || self.next_f64() < p)
    }
}

/// The state of one direction of an emulated link.
#[derive(Debug, Clone)]
pub struct Impairment {
    params: Params,
    queue_limit: Option<u64>,
    rng: Rng,
    ge_bad: bool,
    busy_until: Nanos,
    last_release: Nanos,
}

impl Impairment {
    /// A pipeline with these parameters (assumed validated) and an empty queue.
    pub fn new(params: Params) -> Impairment {
        Impairment {
            queue_limit: params.queue_bytes(),
            rng: Rng::new(params.seed),
            params,
            ge_bad: false,
            busy_until: 0,
            last_release: 0,
        }
    }

    /// The parameters in force.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Changes the parameters while frames are in flight. The queue, the
    /// Gilbert-Elliott state and the ordering guarantee carry over; the
    /// generator is reseeded only when the seed changes.
    pub fn set_params(&mut self, params: Params) {
        if params.seed != self.params.seed {
            self.rng = Rng::new(params.seed);
        }
        self.queue_limit = params.queue_bytes();
        self.params = params;
    }

    /// Bytes waiting for the serializer at `now` (0 without a rate limit).
    pub fn backlog_bytes(&self, now: Nanos) -> u64 {
        match self.params.rate_bps {
            Some(rate) if self.busy_until > now => {
                ((self.busy_until - now) as u128 * rate as u128 / 8_000_000_000) as u64
            }
            _ => 0,
        }
    }

    fn lost(&mut self) -> bool {
        let bernoulli = self.rng.chance(self.params.loss);
        let ge = match self.params.ge {
            Some(g) => {
                // Move the chain first, then decide in the new state.
                self.ge_bad = if self.ge_bad {
                    !self.rng.chance(g.r)
                } else {
                    self.rng.chance(g.p)
                };
                let survive = if self.ge_bad { g.h } else { g.k };
                !self.rng.chance(survive)
            }
            None => false,
        };
        bernoulli || ge
    }

    fn schedule(&mut self, now: Nanos, len: usize) -> Verdict {
        let depart = match self.params.rate_bps {
            Some(rate) => {
                if let Some(limit) = self.queue_limit {
                    if self.backlog_bytes(now) + len as u64 > limit {
                        return Verdict::Drop(DropReason::Queue);
                    }
                }
                let ser = (len as u128 * 8_000_000_000 / rate as u128) as Nanos;
                self.busy_until = self.busy_until.max(now) + ser;
                self.busy_until
            }
            None => now,
        };
        let mut delay = self.params.delay.as_nanos() as i128;
        let jitter = self.params.jitter.as_nanos() as i128;
        if jitter > 0 {
            delay += (self.rng.next_f64() * (2 * jitter) as f64) as i128 - jitter;
        }
        let mut release = depart + delay.max(0) as Nanos;
        if !self.params.reorder {
            release = release.max(self.last_release);
        }
        self.last_release = self.last_release.max(release);
        Verdict::Release(release)
    }

    /// Decides the fate of a frame of `len` bytes that arrived at `now`.
    ///
    /// `now` must not go backwards between calls.
    pub fn on_frame(&mut self, now: Nanos, len: usize) -> Decision {
        if self.lost() {
            return Decision {
                frame: Verdict::Drop(DropReason::Loss),
                duplicate: None,
            };
        }
        let dup = self.rng.chance(self.params.dup);
        let frame = self.schedule(now, len);
        let duplicate = if dup {
            Some(self.schedule(now, len))
        } else {
            None
        };
        Decision { frame, duplicate }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linkem::params::{GilbertElliott, QueueLimit};
    use std::time::Duration;

    const MS: Nanos = 1_000_000;

    fn params(s: &str) -> Params {
        Params::parse(s).unwrap()
    }

    fn release(v: Verdict) -> Option<Nanos> {
        match v {
            Verdict::Release(t) => Some(t),
            Verdict::Drop(_) => None,
        }
    }

    #[test]
    fn perfect_link_passes_everything_at_once() {
        let mut imp = Impairment::new(Params::default());
        for i in 0..1000 {
            let d = imp.on_frame(i * 10, 1514);
            assert_eq!(
                d,
                Decision {
                    frame: Verdict::Release(i * 10),
                    duplicate: None
                }
            );
        }
    }

    #[test]
    fn bernoulli_loss_rate() {
        for seed in 1..4 {
            let mut imp = Impairment::new(params(&format!("loss=1%,seed={seed}")));
            let n = 400_000;
            let lost = (0..n)
                .filter(|&i| release(imp.on_frame(i, 100).frame).is_none())
                .count();
            let rate = lost as f64 / n as f64;
            // sigma = sqrt(0.01 * 0.99 / n) = 0.00016; allow ~4 sigma.
            assert!((rate - 0.01).abs() < 0.0007, "seed {seed}: loss {rate}");
        }
    }

    fn mean_burst(lost: &[bool]) -> f64 {
        let (mut bursts, mut total, mut run) = (0usize, 0usize, 0usize);
        for &l in lost.iter().chain(std::iter::once(&false)) {
            if l {
                run += 1;
            } else if run > 0 {
                bursts += 1;
                total += run;
                run = 0;
            }
        }
        total as f64 / bursts.max(1) as f64
    }

    #[test]
    fn gilbert_elliott_is_bursty() {
        let mut p = Params::default();
        p.ge = Some(GilbertElliott {
            p: 0.01,
            r: 0.25,
            h: 0.0,
            k: 1.0,
        });
        let want = p.expected_loss();
        let mut ge = Impairment::new(p);
        let mut bern = Impairment::new(params(&format!("loss={want}")));
        let n = 500_000;
        let ge_lost: Vec<bool> = (0..n)
            .map(|i| release(ge.on_frame(i, 100).frame).is_none())
            .collect();
        let b_lost: Vec<bool> = (0..n)
            .map(|i| release(bern.on_frame(i, 100).frame).is_none())
            .collect();
        let rate = ge_lost.iter().filter(|&&l| l).count() as f64 / n as f64;
        assert!(
            (rate - want).abs() / want < 0.1,
            "GE loss {rate}, want {want}"
        );
        // With h = 0 every Bad-state frame is lost: bursts last 1/r = 4 frames.
        let burst = mean_burst(&ge_lost);
        assert!((burst - 4.0).abs() < 0.3, "GE mean burst {burst}");
        let b_burst = mean_burst(&b_lost);
        assert!(b_burst < 1.1, "Bernoulli mean burst {b_burst}");
    }

    #[test]
    fn same_seed_same_decisions() {
        let p = params("loss=5%,dup=5%,jitter=1ms,delay=5ms,rate=10mbit,ge=p:1%/r:20%/h:50%");
        let run = || {
            let mut imp = Impairment::new(p.clone());
            (0..10_000)
                .map(|i| imp.on_frame(i * 50_000, 1000))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn rate_limit_accuracy() {
        for (rate, s) in [(100e6, "100mbit"), (1e9, "1gbit"), (10e9, "10gbit")] {
            // Offer 1514-byte frames at twice the rate, with a queue that never fills.
            let mut imp = Impairment::new(params(&format!("rate={s},queue=1000mb")));
            let gap = (1514.0 * 8.0 / rate * 1e9 / 2.0) as Nanos;
            let n = 20_000u64;
            let mut last = 0;
            for i in 0..n {
                last = release(imp.on_frame(i * gap, 1514).frame).unwrap();
            }
            let measured = (n * 1514 * 8) as f64 / (last as f64 / 1e9);
            assert!((measured - rate).abs() / rate < 0.001, "{s}: {measured}");
        }
    }

    #[test]
    fn queue_drops_excess_and_bounds_delay() {
        // 10 Mbit/s, 30 KB queue, offered 20 Mbit/s: about half is dropped and
        // no frame waits longer than the queue takes to drain.
        let mut p = params("rate=10mbit,delay=5ms");
        p.queue = QueueLimit::Bytes(30_000);
        let mut imp = Impairment::new(p);
        let gap = 1514 * 8 * 1000 / 20; // ns between frames at 20 Mbit/s
        let (mut dropped, n) = (0, 20_000u64);
        let max_wait = 30_000 * 8 * 100 + 1514 * 800; // ns: queue + one frame
        for i in 0..n {
            let now = i * gap;
            match imp.on_frame(now, 1514).frame {
                Verdict::Drop(DropReason::Queue) => dropped += 1,
                Verdict::Drop(DropReason::Loss) => panic!("no loss configured"),
                Verdict::Release(t) => assert!(t - now - 5 * MS <= max_wait),
            }
        }
        let frac = dropped as f64 / n as f64;
        assert!((frac - 0.5).abs() < 0.01, "dropped {frac}");
    }

    #[test]
    fn bdp_queue() {
        let p = params("rate=100mbit,delay=40ms,queue=1bdp");
        assert_eq!(p.queue_bytes(), Some(1_000_000));
        let p = params("rate=100mbit,delay=40ms,queue=0.5bdp");
        assert_eq!(p.queue_bytes(), Some(500_000));
        assert_eq!(params("delay=1ms").queue_bytes(), None);
        // Tiny BDPs are raised to a floor.
        let p = params("rate=1gbit,delay=1us");
        assert_eq!(
            p.queue_bytes(),
            Some(crate::linkem::params::MIN_QUEUE_BYTES)
        );
    }

    #[test]
    fn no_reordering_unless_asked() {
        let run = |reorder: &str| {
            let mut imp =
                Impairment::new(params(&format!("delay=10ms,jitter=5ms,reorder={reorder}")));
            let out: Vec<Nanos> = (0..10_000)
                .map(|i| release(imp.on_frame(i * 100_000, 1000).frame).unwrap())
                .collect();
            out.windows(2).filter(|w| w[1] < w[0]).count()
        };
        assert_eq!(run("off"), 0);
        assert!(run("on") > 1000);
    }

    #[test]
    fn jitter_stays_in_range() {
        let mut imp = Impairment::new(params("delay=10ms,jitter=2ms,reorder=on"));
        let mut sum = 0.0;
        let n = 10_000;
        for i in 0..n {
            let now = i * MS;
            let d = release(imp.on_frame(now, 100).frame).unwrap() - now;
            assert!((8 * MS..=12 * MS).contains(&d));
            sum += d as f64;
        }
        assert!((sum / n as f64 - 10e6).abs() < 0.05e6);
    }

    #[test]
    fn duplication_rate() {
        let mut imp = Impairment::new(params("dup=10%"));
        let n = 100_000;
        let dups = (0..n)
            .filter(|&i| imp.on_frame(i, 100).duplicate.is_some())
            .count();
        assert!((dups as f64 / n as f64 - 0.1).abs() < 0.005);
    }

    #[test]
    fn set_params_keeps_the_queue() {
        let mut imp = Impairment::new(params("rate=8mbit,queue=1mb"));
        for _ in 0..10 {
            imp.on_frame(0, 1000);
        }
        // 10 kB at 1 byte/us: 10 ms of backlog.
        assert_eq!(imp.backlog_bytes(0), 10_000);
        imp.set_params(params("rate=8mbit,queue=1mb,delay=1ms"));
        assert_eq!(imp.backlog_bytes(0), 10_000);
        // Serialized behind the 10 frames (11 ms), then the new 1 ms delay.
        let t = release(imp.on_frame(0, 1000).frame).unwrap();
        assert_eq!(t, 12 * MS);
        assert_eq!(imp.params().delay, Duration::from_millis(1));
    }
}
