//! Rate control: one trait, a factory, one file per algorithm.
//!
//! Every controller answers two questions: how fast to pace
//! ([`RateController::pacing_rate`]) and how many bytes may be in the pipe
//! ([`RateController::inflight_cap`]). Input comes once per PACK as an
//! [`AckSample`], and on retransmission timeouts.

use std::fmt;
use std::time::{Duration, Instant};

pub use super::wire::RateMode;

mod bbr;
mod fillp;
mod fixed;

pub use bbr::Bbr;
pub use fillp::Fillp;
pub use fixed::Fixed;

/// What one PACK told the sender.
#[derive(Debug, Clone, Copy)]
pub struct AckSample {
    /// When the PACK arrived.
    pub now: Instant,
    /// Delivery-rate sample (bytes/s) for the newest acknowledged packet, if valid.
    pub delivery_rate: Option<u64>,
    /// That packet was sent while the application had nothing more to send.
    pub app_limited: bool,
    /// RTT sample from the echoed timestamp, if any.
    pub rtt: Option<Duration>,
    /// Smoothed RTT.
    pub srtt: Duration,
    /// Receive rate reported by the peer (bytes/s).
    pub recv_rate: u64,
    /// Loss over the peer's last report interval, 0..=1.
    pub loss: f64,
    /// Stream payload bytes of our packets this PACK showed to have left
    /// the pipe, delivered or lost: those numbered up to the peer's highest.
    /// Payload, like `delivered_bytes`, so that their ratio is the loss
    /// whatever the packets' size (a 1-byte message is 4% of its datagram).
    pub resolved_payload: u64,
    /// Stream payload bytes the peer reports received since the last PACK.
    pub delivered_bytes: u64,
    /// Bytes believed in flight after processing the PACK.
    pub in_flight: u64,
}

/// A rate controller.
pub trait RateController: Send + fmt::Debug {
    /// Process a PACK.
    fn on_ack(&mut self, s: &AckSample);
    /// A retransmission timeout fired: the path may have collapsed.
    fn on_rto(&mut self, now: Instant);
    /// Pacing rate, bytes/s.
    fn pacing_rate(&self) -> u64;
    /// Most bytes that may be in flight.
    fn inflight_cap(&self) -> u64;
    /// Which algorithm this is.
    fn mode(&self) -> RateMode;
    /// Packets the connection should send back to back as its first flight
    /// (unpaced), so that their dispersion measures the bottleneck; 0 for
    /// none (the default).
    fn startup_train(&self) -> u32 {
        0
    }
    /// The first flight's train was measured: the bottleneck drained it at
    /// `rate` bytes/s of payload (lost packets included). Ignored by default.
    fn on_capacity_hint(&mut self, _now: Instant, _rate: u64) {}
}

/// Parameters shared by all controllers.
#[derive(Debug, Clone, Copy)]
pub struct CcConfig {
    /// Algorithm.
    pub mode: RateMode,
    /// Rate before the first measurement, bytes/s.
    pub initial_rate: u64,
    /// Never pace faster than this, bytes/s.
    pub max_rate: u64,
    /// Rate of `RateMode::Fixed`, bytes/s.
    pub fixed_rate: u64,
    /// Maximum packet size, bytes.
    pub mtu: u16,
}

/// Build the controller for `cfg.mode`.
pub fn build(cfg: &CcConfig) -> Box<dyn RateController> {
    match cfg.mode {
        RateMode::Bbr => Box::new(Bbr::new(cfg)),
        RateMode::Fillp => Box::new(Fillp::new(cfg)),
        RateMode::Fixed => Box::new(Fixed::new(cfg)),
    }
}

/// Smallest rate any controller goes down to: 4 packets per 100 ms, counted
/// in Ethernet-sized packets. Counted in the connection's own (on loopback,
/// 64 KiB) datagrams it would be 21 Mbit/s, above rates users ask for.
pub(crate) fn floor_rate(mtu: u16) -> u64 {
    u64::from(mtu.min(1500)) * 40
}
