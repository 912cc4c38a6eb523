//! A link's counters: per direction, atomics the relay thread bumps and
//! anyone reads ([`Counters`]), and the snapshots handed out ([`Stats`]).

use std::sync::atomic::{AtomicU64, Ordering};

/// Lateness histogram resolution: 1 us buckets up to this many, then one
/// overflow bucket.
const LATE_BUCKETS: usize = 4096;

/// Counters of one direction, updated by its thread, read by anyone.
pub(super) struct Counters {
    pub(super) frames_in: AtomicU64,
    pub(super) bytes_in: AtomicU64,
    pub(super) frames_out: AtomicU64,
    pub(super) bytes_out: AtomicU64,
    pub(super) dropped_loss: AtomicU64,
    pub(super) dropped_queue: AtomicU64,
    pub(super) dropped_overflow: AtomicU64,
    pub(super) duplicated: AtomicU64,
    pub(super) rx_errors: AtomicU64,
    pub(super) tx_errors: AtomicU64,
    pub(super) late_max_ns: AtomicU64,
    pub(super) late_sum_ns: AtomicU64,
    late: Vec<AtomicU64>,
}

impl Counters {
    pub(super) fn new() -> Counters {
        let z = || AtomicU64::new(0);
        Counters {
            frames_in: z(),
            bytes_in: z(),
            frames_out: z(),
            bytes_out: z(),
            dropped_loss: z(),
            dropped_queue: z(),
            dropped_overflow: z(),
            duplicated: z(),
            rx_errors: z(),
            tx_errors: z(),
            late_max_ns: z(),
            late_sum_ns: z(),
            late: (0..=LATE_BUCKETS).map(|_| z()).collect(),
        }
    }

    pub(super) fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }

    pub(super) fn record_late(&self, ns: u64) {
        let b = ((ns / 1000) as usize).min(LATE_BUCKETS);
        Self::add(&self.late[b], 1);
        Self::add(&self.late_sum_ns, ns);
        self.late_max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    pub(super) fn reset(&self) {
        for c in [
            &self.frames_in,
            &self.bytes_in,
            &self.frames_out,
            &self.bytes_out,
            &self.dropped_loss,
            &self.dropped_queue,
            &self.dropped_overflow,
            &self.duplicated,
            &self.rx_errors,
            &self.tx_errors,
            &self.late_max_ns,
            &self.late_sum_ns,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        for c in &self.late {
            c.store(0, Ordering::Relaxed);
        }
    }

    pub(super) fn snapshot(&self) -> DirStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let hist: Vec<u64> = self.late.iter().map(g).collect();
        let n: u64 = hist.iter().sum();
        // Upper edge of the bucket holding the q-quantile, in microseconds.
        let quantile = |q: f64| -> f64 {
            if n == 0 {
                return 0.0;
            }
            let want = ((n as f64 * q).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in hist.iter().enumerate() {
                seen += c;
                if seen >= want {
                    return if i == LATE_BUCKETS {
                        g(&self.late_max_ns) as f64 / 1000.0
                    } else {
                        (i + 1) as f64
                    };
                }
            }
            0.0
        };
        DirStats {
            frames_in: g(&self.frames_in),
            bytes_in: g(&self.bytes_in),
            frames_out: g(&self.frames_out),
            bytes_out: g(&self.bytes_out),
            dropped_loss: g(&self.dropped_loss),
            dropped_queue: g(&self.dropped_queue),
            dropped_overflow: g(&self.dropped_overflow),
            duplicated: g(&self.duplicated),
            rx_errors: g(&self.rx_errors),
            tx_errors: g(&self.tx_errors),
            late_p50_us: quantile(0.5),
            late_p99_us: quantile(0.99),
            late_max_us: g(&self.late_max_ns) as f64 / 1000.0,
            late_mean_us: if n == 0 {
                0.0
            } else {
                g(&self.late_sum_ns) as f64 / n as f64 / 1000.0
            },
        }
    }
}

/// A snapshot of one direction's counters.
///
/// "Late" is how long after its computed release time a frame was actually
/// handed to the egress device: the emulator's own delay error. Quantiles
/// are upper bounds at 1 us resolution.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DirStats {
    /// Frames read from the ingress device.
    pub frames_in: u64,
    /// Bytes read from the ingress device.
    pub bytes_in: u64,
    /// Frames written to the egress device (duplicates included).
    pub frames_out: u64,
    /// Bytes written to the egress device.
    pub bytes_out: u64,
    /// Frames dropped by random loss.
    pub dropped_loss: u64,
    /// Frames dropped because the drop-tail queue was full.
    pub dropped_queue: u64,
    /// Frames dropped because the release queue hit `max_in_flight`.
    pub dropped_overflow: u64,
    /// Duplicates made.
    pub duplicated: u64,
    /// Failed reads (other than "nothing to read").
    pub rx_errors: u64,
    /// Failed writes; such frames are lost.
    pub tx_errors: u64,
    /// Median lateness, microseconds.
    pub late_p50_us: f64,
    /// 99th percentile lateness, microseconds.
    pub late_p99_us: f64,
    /// Largest lateness seen, microseconds.
    pub late_max_us: f64,
    /// Mean lateness, microseconds.
    pub late_mean_us: f64,
}

/// Counters of both directions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// A to B.
    pub ab: DirStats,
    /// B to A.
    pub ba: DirStats,
}
