//! A BBR-like controller: model the path as bottleneck bandwidth x min RTT,
//! pace at a gain-cycled multiple of the bandwidth, cap in-flight data near
//! twice the bandwidth-delay product.
//!
//! Changes from BBR v1 for lossy, long paths:
//! * **Random loss is not congestion.** While no queue stands at the
//!   bottleneck (the round's smallest RTT is within 1/8 of the minimum),
//!   delivery-rate samples are divided by `1 - loss`, with `loss` the
//!   smoothed per-round loss (byte-counted, rounds of at least 16 packets).
//!   Once a queue stands, samples are taken as they are, so the estimate
//!   cannot run away past a bottleneck that really is full.
//! * **Back off only on heavy loss or growing delay.** Once three rounds of
//!   loss have been measured, a round that ends with the smoothed loss above
//!   [`HEAVY_LOSS`], or whose smallest RTT is over [`DELAY_FACTOR`] x min RTT,
//!   cuts the bandwidth estimate by [`BACKOFF`] (and ends startup).
//! * **Delay ends startup and drains standing queues.** Startup ends after
//!   four consecutive RTT samples above 1.25 x min RTT + 2 ms (a queue is
//!   forming) as well as on the usual bandwidth plateau. In ProbeBW a round
//!   whose smallest RTT shows such a queue is followed by pacing at 0.85
//!   instead of the gain cycle: v1's cycle would keep the queue startup left.
//!
//! * **Startup never goes backwards.** Its pacing and in-flight cap use the
//!   highest estimate startup has reached (as Linux BBR keeps its pacing
//!   rate until the pipe is full): the first round's delivery samples span
//!   the first RTT, in which nothing could be delivered, and read low. Until
//!   the first RTT sample the in-flight cap is off (a BDP from a guessed RTT
//!   stalled a 200 ms path for half of its first round); pacing at the
//!   initial rate is the limit.
//!
//! * **Startup from a measured capacity.** The first flight leaves as a
//!   back-to-back train of [`TRAIN_PACKETS`]; one RTT later the connection
//!   reports the rate at which the bottleneck drained it
//!   ([`RateController::on_capacity_hint`]). Startup then paces at
//!   [`HINT_GAIN`] x that rate instead of doubling from `initial_rate` for
//!   several rounds, with the in-flight cap at [`CWND_GAIN`] x its BDP, and
//!   ends as usual on a delay rise or a bandwidth plateau. Delivery samples
//!   clearly above the hint prove it low (e.g. competing traffic left when
//!   the train passed) and restore the usual startup gain; a hint below what
//!   was already measured is ignored. A hint that reads high is bounded by
//!   the in-flight cap, and the queue it builds ends startup within a round.
//!
//! * **The bandwidth filter ages in measured rounds.** Rounds are timed (an
//!   srtt, at least 1 ms) rather than counted in delivered packets, so they
//!   run on while the application leaves the pipe empty; the max filter's
//!   ten rounds count only rounds with a sample not limited by the
//!   application, as BBR's packet-timed rounds would.
//!
//! * **Unmeasured, the estimate is an initial window per RTT.** Until a
//!   sample not limited by the application exists, the bandwidth is
//!   `initial_rate / 3` or ten packets per min RTT, whichever is more, as
//!   BBR starts from its initial window over the handshake's RTT. A
//!   connection that only exchanges small messages never measures the
//!   path, and is paced at this.
//!
//! Not implemented: ProbeRTT (min RTT is a plain 10 s windowed minimum),
//! app-limited phases beyond ignoring app-limited samples that would lower the
//! estimate, and BBRv2's inflight_hi/lo bounds.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::super::wire::DATA_HEADER_LEN;
use super::{AckSample, CcConfig, RateController, RateMode};

/// Startup pacing and window gain (2 / ln 2).
const STARTUP_GAIN: f64 = 2.885;
/// Startup in-flight cap over the BDP estimate. (2.0, as in BBRv3, avoided
/// some startup drops in the simulator but slowed startup more than the drops
/// cost at 200 ms RTT.)
const STARTUP_CWND_GAIN: f64 = 2.885;
/// Packets of the first-flight train: the default `pack_every` + 1, so the
/// receiver's count-triggered reports (every 8 packets at the start of a
/// connection) fall on its first and last packet.
pub const TRAIN_PACKETS: u32 = 33;
/// Packets a window holds before the path is measured (TCP's initial
/// window, RFC 6928): with the min RTT, the estimate until the first sample.
const INITIAL_WINDOW: u64 = 10;
/// Startup pacing gain over a measured capacity: probes for more (a train
/// can read low) while building at most a quarter BDP of queue per round.
pub const HINT_GAIN: f64 = 1.25;
/// Delivery samples this far above the hint prove it low.
const HINT_EXCEEDED: f64 = 1.15;
/// ProbeBW pacing-gain cycle, one phase per min RTT.
const CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// ProbeBW pacing gain while a queue stands.
const DRAIN_GAIN: f64 = 0.85;
/// In-flight cap as a multiple of the BDP in ProbeBW.
const CWND_GAIN: f64 = 2.0;
/// Rounds the bandwidth maximum is kept over.
const BW_ROUNDS: u64 = 10;
/// EWMA gain of the per-round loss.
const LOSS_GAIN: f64 = 0.25;
/// Loss above this in a round means congestion.
pub const HEAVY_LOSS: f64 = 0.3;
/// Smallest-RTT-in-round over min RTT above which the queue is growing.
pub const DELAY_FACTOR: f64 = 2.5;
/// Multiplicative cut on heavy loss or growing delay.
pub const BACKOFF: f64 = 0.85;
/// Compensation stops at this loss (beyond it the path is too broken).
const MAX_FLOOR: f64 = 0.5;
/// A round's loss counts only once this many packets were resolved.
const MIN_ROUND_PACKETS: u64 = 16;
/// Min RTT expires after this long without a lower sample.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Startup,
    Drain,
    ProbeBw,
}

/// BBR-like state.
#[derive(Debug, Clone)]
pub struct Bbr {
    state: State,
    mtu: u64,
    floor_rate: u64,
    max_rate: u64,
    initial_rate: u64,
    /// Monotonic deque of (sampled round, sample) for the windowed max.
    bw: VecDeque<(u64, u64)>,
    /// Rounds that carried a delivery sample not limited by the
    /// application: the bandwidth filter's clock (see `end_round`).
    sampled_rounds: u64,
    /// The current round has such a sample.
    round_sampled: bool,
    min_rtt: Option<(Duration, Instant)>,
    round: u64,
    round_start: Option<Instant>,
    round_resolved: u64,
    round_delivered: u64,
    round_min_rtt: Option<Duration>,
    last_round_min_rtt: Option<Duration>,
    queue_standing: bool,
    loss_ewma: Option<f64>,
    loss_rounds: u32,
    round_samples: u32,
    high_rtt_run: u32,
    full_bw: u64,
    full_bw_count: u32,
    cycle_idx: usize,
    cycle_start: Option<Instant>,
    in_flight: u64,
    /// Highest bandwidth estimate of startup, which startup's pacing and
    /// in-flight cap never fall below (as in Linux BBR: the first round's
    /// samples, taken while the pipe is still filling, read low).
    startup_bw: u64,
    /// The first flight's measured capacity, while startup trusts it.
    hint: Option<u64>,
}

impl Bbr {
    /// From the configuration.
    pub fn new(cfg: &CcConfig) -> Self {
        let floor_rate = super::floor_rate(cfg.mtu);
        let mut b = Bbr {
            state: State::Startup,
            mtu: u64::from(cfg.mtu),
            floor_rate,
            max_rate: cfg.max_rate.max(floor_rate),
            initial_rate: cfg.initial_rate.max(floor_rate),
            bw: VecDeque::new(),
            sampled_rounds: 0,
            round_sampled: false,
            min_rtt: None,
            round: 0,
            round_start: None,
            round_resolved: 0,
            round_delivered: 0,
            round_min_rtt: None,
            last_round_min_rtt: None,
            queue_standing: false,
            loss_ewma: None,
            loss_rounds: 0,
            round_samples: 0,
            high_rtt_run: 0,
            full_bw: 0,
            full_bw_count: 0,
            cycle_idx: 2,
            cycle_start: None,
            in_flight: 0,
            startup_bw: 0,
            hint: None,
        };
        b.startup_bw = b.btl_bw();
        b
    }

    /// Bottleneck bandwidth estimate, bytes/s.
    pub fn btl_bw(&self) -> u64 {
        self.bw
            .front()
            .map(|&(_, b)| b)
            .unwrap_or_else(|| self.unmeasured_bw())
            .clamp(self.floor_rate, self.max_rate)
    }

    /// The estimate before any sample measured the path: what startup
    /// begins from (`initial_rate` after its gain), or, once an RTT is
    /// known, an initial window per min RTT if that is more, as BBR starts
    /// from its initial cwnd over the handshake's RTT. A connection that
    /// only ever exchanges small messages stays here, and paced at a fixed
    /// guess, 1-byte request/response round trips over loopback were held
    /// to that rate over ~27 bytes a packet: 2,300 a second.
    fn unmeasured_bw(&self) -> u64 {
        let guess = self.initial_rate / 3;
        match self.min_rtt {
            Some((rtt, _)) if !rtt.is_zero() => {
                let payload = self.mtu.saturating_sub(DATA_HEADER_LEN as u64);
                let window = INITIAL_WINDOW * payload;
                guess.max((window as f64 / rtt.as_secs_f64()) as u64)
            }
            _ => guess,
        }
    }

    /// The bandwidth pacing and the in-flight cap are based on: the
    /// estimate, and in startup never less than startup has reached.
    fn model_bw(&self) -> u64 {
        match self.state {
            State::Startup => self.btl_bw().max(self.startup_bw),
            _ => self.btl_bw(),
        }
    }

    fn min_rtt(&self) -> Duration {
        self.min_rtt
            .map(|(d, _)| d)
            .unwrap_or(Duration::from_millis(100))
    }

    /// Loss to compensate delivery samples for: the smoothed round loss,
    /// bounded.
    fn random_loss(&self) -> f64 {
        self.loss_ewma.unwrap_or(0.0).min(MAX_FLOOR)
    }

    /// No standing queue: the round's smallest RTT is near the minimum.
    fn queue_free(&self) -> bool {
        match (self.round_min_rtt.or(self.last_round_min_rtt), self.min_rtt) {
            (Some(r), Some((m, _))) => r <= m + m / 8 + Duration::from_millis(2),
            _ => true,
        }
    }

    /// Datagram bytes for `payload` bytes of full-size DATA packets: the
    /// model counts stream payload (delivery samples), the pacer and the
    /// in-flight count whole datagrams; without this, pacing at 1.0 x the
    /// model fills only 98% of a link (at a 1400-byte MTU).
    fn on_wire(&self, payload: u64) -> u64 {
        let payload_mtu = self.mtu.saturating_sub(DATA_HEADER_LEN as u64).max(1);
        (payload as f64 * self.mtu as f64 / payload_mtu as f64) as u64
    }

    fn bdp(&self) -> u64 {
        (self.model_bw() as f64 * self.min_rtt().as_secs_f64()) as u64
    }

    fn push_bw(&mut self, v: u64) {
        while self.bw.back().is_some_and(|&(_, b)| b <= v) {
            self.bw.pop_back();
        }
        self.bw.push_back((self.sampled_rounds, v));
    }

    fn scale_bw(&mut self, f: f64) {
        let v = ((self.btl_bw() as f64) * f) as u64;
        self.bw.clear();
        self.bw
            .push_back((self.sampled_rounds, v.max(self.floor_rate)));
    }

    fn pacing_gain(&self) -> f64 {
        match self.state {
            State::Startup if self.hint.is_some() => HINT_GAIN,
            State::Startup => STARTUP_GAIN,
            State::Drain => 1.0 / STARTUP_GAIN,
            // A queue stood through the last round: drain it instead of
            // cycling (BBRv1 can otherwise keep a BDP of queue for ever).
            State::ProbeBw if self.queue_standing => DRAIN_GAIN,
            State::ProbeBw => CYCLE[self.cycle_idx],
        }
    }

    fn end_round(&mut self, now: Instant) {
        self.round += 1;
        // The bandwidth filter ages only in rounds that measured the path.
        // Rounds here are timed (an srtt, at least 1 ms), and run on while
        // the pipe is empty: a writer that started 10 ms late on loopback
        // let ten empty rounds expire a 2 Gbit/s estimate, leaving a
        // 5 Mbit/s sample, and ProbeBw's 1.25 x cycles took ~600 ms to climb
        // back (BBR's packet-timed rounds do not advance without data).
        if std::mem::take(&mut self.round_sampled) {
            self.sampled_rounds += 1;
            while self
                .bw
                .front()
                .is_some_and(|&(r, _)| r + BW_ROUNDS <= self.sampled_rounds)
            {
                self.bw.pop_front();
            }
        }
        // Byte-weighted over the round; rounds with too few packets carry
        // over, so a handful of packets cannot fake heavy loss.
        let full_payload = self.mtu.saturating_sub(DATA_HEADER_LEN as u64).max(1);
        let enough = self.round_resolved >= MIN_ROUND_PACKETS * full_payload;
        let loss = if enough {
            (1.0 - self.round_delivered as f64 / self.round_resolved as f64).clamp(0.0, 1.0)
        } else {
            0.0
        };
        if enough {
            self.loss_ewma = Some(match self.loss_ewma {
                None => loss,
                Some(e) => e + (loss - e) * LOSS_GAIN,
            });
        }
        if enough {
            self.loss_rounds = self.loss_rounds.saturating_add(1);
        }
        // Judge only a warmed-up average: one unlucky early round is noise.
        let heavy =
            enough && self.loss_rounds >= 3 && self.loss_ewma.is_some_and(|l| l > HEAVY_LOSS);
        let delayed = match (self.round_min_rtt, self.min_rtt) {
            (Some(r), Some((m, _))) => r.as_secs_f64() > DELAY_FACTOR * m.as_secs_f64() + 0.005,
            _ => false,
        };
        if heavy || delayed {
            self.scale_bw(BACKOFF);
            if self.state == State::Startup {
                self.state = State::Drain;
            }
        }
        if self.state == State::Startup {
            let bw = self.btl_bw();
            if bw as f64 >= self.full_bw as f64 * 1.25 {
                self.full_bw = bw;
                self.full_bw_count = 0;
            } else {
                self.full_bw_count += 1;
                if self.full_bw_count >= 3 {
                    self.state = State::Drain;
                }
            }
        }
        if self.state == State::Drain && self.in_flight <= self.bdp() {
            self.state = State::ProbeBw;
            self.cycle_idx = 2;
            self.cycle_start = Some(now);
        }
        if enough {
            self.round_resolved = 0;
            self.round_delivered = 0;
        }
        if self.round_min_rtt.is_some() {
            self.last_round_min_rtt = self.round_min_rtt;
        }
        self.queue_standing = match (self.round_min_rtt, self.min_rtt) {
            (Some(r), Some((m, _))) => r > m + m / 4 + Duration::from_millis(2),
            _ => false,
        };
        self.round_min_rtt = None;
        self.round_samples = 0;
        self.round_start = Some(now);
    }
}

impl RateController for Bbr {
    fn on_ack(&mut self, s: &AckSample) {
        self.in_flight = s.in_flight;
        if let Some(rtt) = s.rtt {
            let expired = self.min_rtt.is_none_or(|(m, t)| {
                rtt <= m || s.now.saturating_duration_since(t) > MIN_RTT_WINDOW
            });
            if expired {
                self.min_rtt = Some((rtt, s.now));
            }
            self.round_min_rtt = Some(self.round_min_rtt.map_or(rtt, |r| r.min(rtt)));
            self.round_samples += 1;
        }
        // Startup: once several consecutive samples show a queue, the pipe
        // is full; leave now rather than at the end of a round that the
        // growing RTT keeps stretching.
        if let (Some(rtt), Some((m, _))) = (s.rtt, self.min_rtt) {
            if rtt > m + m / 4 + Duration::from_millis(2) {
                self.high_rtt_run += 1;
            } else {
                self.high_rtt_run = 0;
            }
        }
        if self.state == State::Startup && self.high_rtt_run >= 4 {
            self.state = State::Drain;
        }
        self.round_resolved += s.resolved_payload;
        self.round_delivered += s.delivered_bytes;
        if let Some(rate) = s.delivery_rate {
            // Loss while no queue stands is the path's, not ours: scale it
            // out. With a queue, the sample is taken as it is.
            let comp = if self.queue_free() {
                (rate as f64 / (1.0 - self.random_loss())) as u64
            } else {
                rate
            };
            if !s.app_limited || comp > self.btl_bw() {
                self.push_bw(comp);
            }
            self.round_sampled |= !s.app_limited;
        }
        let round_len = s.srtt.max(Duration::from_millis(1));
        match self.round_start {
            None => self.round_start = Some(s.now),
            Some(t) if s.now.saturating_duration_since(t) >= round_len => self.end_round(s.now),
            _ => {}
        }
        if self.state == State::Drain && s.in_flight <= self.bdp() {
            self.state = State::ProbeBw;
            self.cycle_idx = 2;
            self.cycle_start = Some(s.now);
        }
        if self.state == State::Startup {
            self.startup_bw = self.startup_bw.max(self.btl_bw());
            if self
                .hint
                .is_some_and(|h| self.btl_bw() as f64 > h as f64 * HINT_EXCEEDED)
            {
                self.hint = None;
            }
        }
        if self.state == State::ProbeBw {
            let phase = self.min_rtt().max(Duration::from_millis(1));
            let start = *self.cycle_start.get_or_insert(s.now);
            if s.now.saturating_duration_since(start) >= phase {
                self.cycle_idx = (self.cycle_idx + 1) % CYCLE.len();
                self.cycle_start = Some(s.now);
            }
        }
    }

    fn on_rto(&mut self, _now: Instant) {
        // Keep the model (BBR does), but forget that we ever filled the pipe
        // so the estimate must be re-earned by fresh samples.
        self.scale_bw(0.5);
        self.hint = None;
    }

    fn pacing_rate(&self) -> u64 {
        let rate = self.on_wire((self.model_bw() as f64 * self.pacing_gain()) as u64);
        rate.clamp(self.floor_rate, self.max_rate)
    }

    fn inflight_cap(&self) -> u64 {
        if self.min_rtt.is_none() {
            // No RTT sample yet: a BDP from a guessed RTT (100 ms) would stall
            // a long path for most of the first round. Pacing at the
            // initial rate is the only limit until the first PACK.
            return u64::MAX / 4;
        }
        let gain = match self.state {
            State::Startup if self.hint.is_some() => CWND_GAIN,
            State::Startup | State::Drain => STARTUP_CWND_GAIN,
            State::ProbeBw => CWND_GAIN,
        };
        self.on_wire((self.bdp() as f64 * gain) as u64) + 4 * self.mtu
    }

    fn mode(&self) -> RateMode {
        RateMode::Bbr
    }

    fn startup_train(&self) -> u32 {
        TRAIN_PACKETS
    }

    fn on_capacity_hint(&mut self, _now: Instant, rate: u64) {
        let rate = rate.clamp(self.floor_rate, self.max_rate);
        // Only startup uses it, and only if the samples have not already
        // shown more (then the train read low).
        if self.state != State::Startup || self.bw.front().is_some_and(|&(_, b)| b >= rate) {
            return;
        }
        // Replaces startup's floor even if lower: on a slow link the
        // measurement beats pacing from the configured initial rate.
        self.startup_bw = rate;
        self.hint = Some(rate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CcConfig {
        CcConfig {
            mode: RateMode::Bbr,
            initial_rate: 1_000_000,
            max_rate: u64::MAX,
            fixed_rate: 0,
            mtu: 1400,
        }
    }

    fn feed(b: &mut Bbr, t0: Instant, ms: u64, rate: u64, loss: f64) {
        feed_limited(b, t0, ms, rate, loss, false);
    }

    fn feed_limited(b: &mut Bbr, t0: Instant, ms: u64, rate: u64, loss: f64, app_limited: bool) {
        for i in 0..ms / 10 {
            b.on_ack(&AckSample {
                now: t0 + Duration::from_millis(i * 10),
                delivery_rate: Some(rate),
                app_limited,
                rtt: Some(Duration::from_millis(20)),
                srtt: Duration::from_millis(20),
                recv_rate: rate,
                loss,
                resolved_payload: ((rate / 100) as f64 / (1.0 - loss)) as u64,
                delivered_bytes: rate / 100,
                in_flight: 0,
            });
        }
    }

    /// Rounds in which the application kept the pipe short do not age the
    /// bandwidth estimate; rounds that measure the path do.
    #[test]
    fn an_application_limited_spell_keeps_the_estimate() {
        let t0 = Instant::now();
        let mut b = Bbr::new(&cfg());
        feed(&mut b, t0, 1000, 10_000_000, 0.0);
        let full = b.btl_bw();
        assert!(full >= 9_000_000, "{full}");
        let t1 = t0 + Duration::from_millis(1000);
        feed_limited(&mut b, t1, 2000, 100_000, 0.0, true);
        assert_eq!(b.btl_bw(), full, "30+ rounds app-limited");
        let t2 = t1 + Duration::from_millis(2000);
        feed(&mut b, t2, 1000, 2_000_000, 0.0);
        assert!(b.btl_bw() < 2_500_000, "{}", b.btl_bw());
    }

    #[test]
    fn random_loss_is_compensated() {
        let t0 = Instant::now();
        let mut b = Bbr::new(&cfg());
        // 10 MB/s link with 20% random loss delivers 8 MB/s.
        feed(&mut b, t0, 2000, 8_000_000, 0.2);
        let bw = b.btl_bw();
        assert!((9_500_000..=10_500_000).contains(&bw), "{bw}");
        assert_eq!(b.state, State::ProbeBw);
    }

    #[test]
    fn capacity_hint_sets_startup_pacing() {
        let t0 = Instant::now();
        let mut b = Bbr::new(&cfg());
        // A first-round sample that reads low, then a 10 MB/s train.
        feed(&mut b, t0, 10, 300_000, 0.0);
        b.on_capacity_hint(t0, 10_000_000);
        let wire = b.on_wire(10_000_000);
        assert_eq!(b.state, State::Startup);
        assert_eq!(b.pacing_rate(), (wire as f64 * HINT_GAIN) as u64);
        // A hint below what was measured is ignored.
        let mut c = Bbr::new(&cfg());
        feed(&mut c, t0, 10, 3_000_000, 0.0);
        let before = c.pacing_rate();
        c.on_capacity_hint(t0, 2_000_000);
        assert_eq!(c.pacing_rate(), before);
        // Delivery well above the hint proves it low: back to the usual gain.
        feed(&mut b, t0 + Duration::from_millis(10), 10, 12_000_000, 0.0);
        assert!(b.hint.is_none());
        assert!(
            b.pacing_rate() > b.on_wire(12_000_000) * 2,
            "{}",
            b.pacing_rate()
        );
    }

    #[test]
    fn heavy_loss_backs_off() {
        let t0 = Instant::now();
        let mut b = Bbr::new(&cfg());
        feed(&mut b, t0, 500, 8_000_000, 0.0);
        let before = b.btl_bw();
        let mut late = t0 + Duration::from_millis(600);
        for _ in 0..20 {
            late += Duration::from_millis(25);
            b.on_ack(&AckSample {
                now: late,
                delivery_rate: None,
                app_limited: false,
                rtt: Some(Duration::from_millis(20)),
                srtt: Duration::from_millis(20),
                recv_rate: 0,
                loss: 0.6,
                resolved_payload: 100_000,
                delivered_bytes: 40_000,
                in_flight: 0,
            });
        }
        assert!(b.btl_bw() < before / 2, "{} vs {before}", b.btl_bw());
    }
}
