//! Per-connection settings.

use std::time::Duration;

use super::super::wire::RateMode;

/// Per-connection settings (each side uses its own; MTU and mode are negotiated).
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest UDP payload we send or accept, bytes (the smaller of the two
    /// sides' values is used).
    pub mtu: u16,
    /// Receive window: bytes we buffer beyond what the application has read.
    pub recv_window: u32,
    /// Send buffer: unacknowledged bytes `write` accepts.
    pub send_buffer: usize,
    /// Rate control the client proposes (the server may override, see
    /// [`Config::force_mode`]).
    pub mode: RateMode,
    /// Server only: use this mode whatever the client proposes.
    pub force_mode: Option<RateMode>,
    /// Rate before the first measurement, bytes/s.
    pub initial_rate: u64,
    /// Upper bound on the pacing rate, bytes/s.
    pub max_rate: u64,
    /// Rate of [`RateMode::Fixed`], bytes/s.
    pub fixed_rate: u64,
    /// PACK at least this often while data arrives.
    pub pack_interval: Duration,
    /// ... or after this many data packets, whichever is first. A packet
    /// larger than an Ethernet-sized datagram counts as as many of those
    /// as it carries, so the cadence is the same in bytes whatever the MTU.
    pub pack_every: u32,
    /// RTT guess before any sample.
    pub initial_rtt: Duration,
    /// Send a KEEPALIVE after this long without sending anything.
    pub keepalive: Duration,
    /// Close after this long without receiving anything.
    pub idle_timeout: Duration,
    /// Give up a handshake after this long.
    pub handshake_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mtu: 1400,
            recv_window: 16 << 20,
            send_buffer: 16 << 20,
            mode: RateMode::Bbr,
            force_mode: None,
            initial_rate: 1_250_000,
            max_rate: 10_000_000_000,
            fixed_rate: 1_250_000,
            pack_interval: Duration::from_millis(10),
            pack_every: 32,
            initial_rtt: Duration::from_millis(100),
            keepalive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The protocol description (`fillp/mod.rs`) quotes these.
    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!((c.mtu, c.pack_every, c.mode), (1400, 32, RateMode::Bbr));
        assert_eq!(c.pack_interval, Duration::from_millis(10));
        assert_eq!(c.keepalive, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!((c.recv_window, c.send_buffer), (16 << 20, 16 << 20));
    }
}
