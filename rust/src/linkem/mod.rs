//! A user-space link emulator (what `tc netem` would do, for kernels without
//! sch_netem).
//!
//! - [`params`]: what one direction does to frames, with a compact text form;
//! - [`impair`]: the sans-IO pipeline (loss, duplication, queue, rate, delay),
//!   deterministic for a seed and tested under a virtual clock;
//! - [`device`]: the two ways to attach to the namespaces (TAP devices, or
//!   veth pairs read with AF_PACKET sockets), their setup and cleanup;
//! - [`relay`]: the driver that moves Ethernet frames between the two ends,
//!   one thread per direction, and the public [`Linkem`] handle.
//!
//! ```no_run
//! use dmm::linkem::{parse_duplex, Direction, Linkem, LinkemConfig, Params};
//! let (ab, ba) = parse_duplex("delay=40ms,loss=1%,rate=100mbit").unwrap();
//! let mut cfg = LinkemConfig::new("lk0a", "lk0b");
//! cfg.netns_a = Some("left".into());
//! cfg.netns_b = Some("right".into());
//! (cfg.params_ab, cfg.params_ba) = (ab, ba);
//! let link = Linkem::start(cfg)?;
//! link.set_params(Direction::AtoB, Params::parse("delay=10ms").unwrap()).unwrap();
//! println!("{:?}", link.stats().ab);
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Not supported: rate limits per packet rather than per byte, corruption,
//! slotting, loss correlated with time rather than frame order.

pub mod device;
pub mod impair;
pub mod params;
pub mod relay;
mod stats;

pub use device::DeviceKind;
pub use params::{parse_duplex, ParamError, Params};
pub use relay::{DirStats, Direction, Linkem, LinkemConfig, Stats};
