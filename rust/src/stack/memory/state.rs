//! The memory stack's state: its sockets, its ports, and the bytes in
//! flight between connected pairs, behind the instance's lock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::stack::userspace::{Listeners, Mirror, SockFds};
use crate::stack::Family;

/// First port handed out to sockets that connect or listen unbound.
const EPHEMERAL: u16 = 32768;

/// What a socket is now.
#[derive(Debug)]
pub enum Role {
    /// Neither bound nor connected.
    Fresh,
    /// Bound to a port, not yet listening or connected.
    Bound,
    /// Listening: connections made to it, not yet accepted.
    Listening {
        queue: VecDeque<u64>,
        backlog: usize,
    },
    /// One end of a connected pair.
    Conn { peer: u64 },
}

/// One socket's record.
#[derive(Debug)]
pub struct Sock {
    pub role: Role,
    pub family: Family,
    pub local: Option<SocketAddr>,
    pub peer_addr: Option<SocketAddr>,
    /// Bytes the peer sent that this socket has not read yet.
    pub rx: VecDeque<u8>,
    /// The peer shut its write side (or closed): EOF after `rx`.
    pub eof: bool,
    /// This side shut its read side: `recv` reports EOF.
    pub shut_rd: bool,
    /// This side shut its write side.
    pub shut_wr: bool,
    /// The peer was closed with unread data, or aborted: `ECONNRESET`.
    pub reset: bool,
    pub mirror: Mirror,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Everything behind the instance's lock.
#[derive(Debug, Default)]
pub struct State {
    pub socks: HashMap<u64, Sock>,
    next_id: u64,
    /// Bound ports and the socket holding each.
    pub ports: BTreeMap<u16, u64>,
    next_port: u16,
    /// Most bytes waiting in one socket's `rx` before its peer's `send`
    /// blocks.
    pub capacity: usize,
}

impl State {
    /// An empty state with `capacity` bytes per direction and connection.
    pub fn new(capacity: usize) -> State {
        State {
            capacity,
            next_port: EPHEMERAL,
            ..State::default()
        }
    }

    /// Adds a fresh socket; returns its id.
    pub fn insert(&mut self, family: Family, fds: Arc<SockFds>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.socks.insert(
            id,
            Sock {
                role: Role::Fresh,
                family,
                local: None,
                peer_addr: None,
                rx: VecDeque::new(),
                eof: false,
                shut_rd: false,
                shut_wr: false,
                reset: false,
                mirror: Mirror::new(fds),
                bytes_sent: 0,
                bytes_received: 0,
            },
        );
        id
    }

    /// A free port (ephemeral range, wrapping), or `None` if all are taken.
    pub fn free_port(&mut self) -> Option<u16> {
        for _ in 0..=(u16::MAX - EPHEMERAL) {
            let p = self.next_port;
            self.next_port = if p == u16::MAX { EPHEMERAL } else { p + 1 };
            if !self.ports.contains_key(&p) {
                return Some(p);
            }
        }
        None
    }

    /// Whether socket `id` is readable: data, EOF, a reset, a connection to
    /// accept.
    pub fn readable(&self, id: u64) -> bool {
        self.socks.get(&id).is_none_or(|s| match &s.role {
            Role::Listening { queue, .. } => !queue.is_empty(),
            Role::Conn { .. } => !s.rx.is_empty() || s.eof || s.reset || s.shut_rd,
            _ => false,
        })
    }

    /// Whether socket `id` may send: its peer has room (or it failed, and
    /// the send reports why).
    pub fn writable(&self, id: u64) -> bool {
        let Some(s) = self.socks.get(&id) else {
            return true;
        };
        match s.role {
            Role::Conn { peer } => {
                s.reset
                    || s.shut_wr
                    || self
                        .socks
                        .get(&peer)
                        .is_none_or(|p| p.rx.len() < self.capacity)
            }
            _ => false,
        }
    }

    /// Shows socket `id`'s state on its eventfds.
    pub fn sync(&mut self, id: u64) {
        let (r, w) = (self.readable(id), self.writable(id));
        if let Some(s) = self.socks.get_mut(&id) {
            s.mirror.show(r, w);
        }
    }

    /// Forgets socket `id`: frees its port, tells its peer (EOF, or a reset
    /// if `abort` or `id` had unread data), resets connections queued on a
    /// listener.
    pub fn remove(&mut self, id: u64, abort: bool) {
        let Some(s) = self.socks.remove(&id) else {
            return;
        };
        if let Some(local) = s.local {
            if self.ports.get(&local.port()) == Some(&id) {
                self.ports.remove(&local.port());
            }
        }
        match s.role {
            Role::Conn { peer } => {
                if let Some(p) = self.socks.get_mut(&peer) {
                    // As TCP: closing with unread data is an abort.
                    p.reset |= abort || !s.rx.is_empty();
                    p.eof = true;
                    if let Role::Conn { peer: back } = &mut p.role {
                        *back = u64::MAX; // the peer is gone
                    }
                }
                self.sync(peer);
            }
            Role::Listening { queue, .. } => {
                for c in queue {
                    self.remove(c, true);
                }
            }
            _ => {}
        }
        s.mirror.fds().wake_all();
    }
}

impl Listeners for State {
    fn listener(&mut self, id: u64) -> Option<(Option<i32>, Option<&mut VecDeque<u64>>)> {
        let s = self.socks.get_mut(&id)?;
        Some(match &mut s.role {
            Role::Listening { queue, .. } => (None, Some(queue)),
            _ => (None, None),
        })
    }

    fn accepted(&self, id: u64) -> Option<(&Arc<SockFds>, Option<SocketAddr>)> {
        let s = self.socks.get(&id)?;
        Some((s.mirror.fds(), s.peer_addr))
    }
}
