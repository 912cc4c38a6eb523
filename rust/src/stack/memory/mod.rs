//! `kind = "memory"`: byte streams between sockets of one instance, in
//! memory, in one process.
//!
//! A memory instance is a network of its own with no wire: a socket that
//! connects to a port where a socket of the same instance listens gets a
//! connected pair whose bytes move from one socket's send straight into the
//! other's receive queue. It has two uses:
//!
//! * **The worked example of a stack kind** (`CONTRIBUTING.md`, "Writing a
//!   stack"): the whole plug-in seam with nothing else in the way. The
//!   config fields and their parser ([`KIND`]), the instance
//!   ([`MemoryStack`], a [`Stack`]), its sockets ([`MemorySocket`], a
//!   [`crate::stack::StackSocket`] built on the user-space socket core of
//!   [`crate::stack::userspace`]), and one line in
//!   [`crate::stack::registry::KINDS`]. The Python facade needs nothing more:
//!   its placement ([`crate::stack::Placement::Core`]) tells it to hand
//!   sockets over to the core.
//! * **A user-space stack that needs no privilege**: the stdlib-conformance
//!   suites can run the whole user-space socket path (placeholder eventfds,
//!   the blocking loop, `dmm.selectors`, asyncio) without TAP devices.
//!
//! There is no driver thread: every operation completes under the lock in
//! the calling thread, and makes the other end's eventfds right before it
//! lets go. A `connect` completes at once (or is refused at once); a
//! `send` blocks while the peer's receive queue holds `buffer_size` bytes.
//!
//! # Not supported
//!
//! Datagram sockets, socket options beyond `SO_LINGER`/`SO_ERROR`/buffer
//! sizes (accepted and ignored), `MSG_PEEK`/`MSG_OOB`, reaching anything
//! outside the instance.

mod socket;
mod state;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use socket::MemorySocket;
use state::State;

use super::options::{OptionError, Options, Value};
use super::registry::{Kind, StackConfig};
use super::userspace::{lock, SockCore, SockFds};
use super::{Counters, Family, SockKind, Stack, StackSocket};

/// The `memory` kind: `buffer_size`, bytes queued per direction and
/// connection (default 256 KiB).
pub static KIND: Kind = Kind {
    name: "memory",
    summary: "in-process byte streams between sockets of one instance (no wire, no privilege)",
    fields: &["buffer_size"],
    parse: parse_config,
};

const DEFAULT_BUFFER: i64 = 256 << 10;

#[derive(Debug)]
struct MemoryConfig {
    buffer_size: usize,
}

fn parse_config(o: &Options) -> Result<Box<dyn StackConfig>, OptionError> {
    let size = o.int(
        "buffer_size",
        DEFAULT_BUFFER,
        1..=1 << 30,
        "bytes from 1 to 1 GiB",
    )?;
    Ok(Box::new(MemoryConfig {
        buffer_size: size as usize,
    }))
}

impl StackConfig for MemoryConfig {
    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn values(&self) -> Vec<(&'static str, Value)> {
        vec![("buffer_size", Value::Int(self.buffer_size as i64))]
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn Stack>> {
        Ok(Arc::new(MemoryStack::new(name, self.buffer_size)))
    }
}

/// What the instance's sockets share: the state behind one lock.
#[derive(Debug)]
pub struct Shared {
    state: Mutex<State>,
    connects: AtomicU64,
}

/// A memory instance.
#[derive(Debug)]
pub struct MemoryStack {
    name: String,
    shared: Arc<Shared>,
    sockets: AtomicU64,
}

impl MemoryStack {
    /// An instance whose connections queue up to `buffer_size` bytes per
    /// direction.
    pub fn new(name: impl Into<String>, buffer_size: usize) -> MemoryStack {
        MemoryStack {
            name: name.into(),
            shared: Arc::new(Shared {
                state: Mutex::new(State::new(buffer_size.max(1))),
                connects: AtomicU64::new(0),
            }),
            sockets: AtomicU64::new(0),
        }
    }
}

impl Stack for MemoryStack {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        KIND.name
    }

    fn protocol(&self) -> &'static str {
        "memory"
    }

    fn carries(&self, _family: Family, kind: SockKind) -> Result<(), String> {
        match kind {
            SockKind::Stream => Ok(()),
            SockKind::Dgram => Err("the memory stack carries stream sockets only".into()),
        }
    }

    fn socket(&self, family: Family, kind: SockKind) -> io::Result<Box<dyn StackSocket>> {
        if kind != SockKind::Stream {
            return Err(super::errno(libc::EPROTONOSUPPORT));
        }
        let fds = SockFds::new()?;
        let id = lock(&self.shared.state).insert(family, Arc::clone(&fds));
        self.sockets.fetch_add(1, Ordering::Relaxed);
        let core = SockCore::new(Arc::clone(&self.shared), id, fds, family);
        Ok(Box::new(MemorySocket::new(core)))
    }

    fn bind_address(&self, _family: Family, requested: IpAddr) -> IpAddr {
        requested
    }

    fn counters(&self) -> Counters {
        let st = lock(&self.shared.state);
        vec![
            ("core_sockets", self.sockets.load(Ordering::Relaxed)),
            ("pairs_made", self.shared.connects.load(Ordering::Relaxed)),
            ("open_sockets", st.socks.len() as u64),
        ]
    }

    fn describe(&self) -> String {
        let cap = lock(&self.shared.state).capacity;
        format!(
            "memory streams within the process, {} KiB per direction",
            cap >> 10
        )
    }
}

/// The address a socket of `family` reports before it is bound.
fn unbound(family: Family) -> SocketAddr {
    super::userspace::unspecified(family)
}

#[cfg(test)]
mod tests;
