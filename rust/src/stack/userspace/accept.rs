//! `accept` on a user-space listener: wait for an established connection
//! in the listener's queue and take it.
//!
//! A user-space stack keeps, per listening socket, a queue of the ids of
//! connections its driver (or an inline turn) completed and recorded as
//! sockets of their own. `accept` pops the next one under the lock and
//! makes a handle for it from its record.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use super::blocking::{Host, SockCore, Try, Wait};
use super::fds::SockFds;
use super::unspecified;
use crate::stack::errno;

/// What `accept` needs from a stack's socket records.
pub(crate) trait Listeners {
    /// Socket `id`'s record, if there is one, as `accept` reads it: its
    /// fatal error (the instance went down) and, while it listens, its
    /// queue of accepted connections not yet taken.
    fn listener(&mut self, id: u64) -> Option<(Option<i32>, Option<&mut VecDeque<u64>>)>;

    /// Connection `id`'s eventfds and peer, if its record is still there.
    fn accepted(&self, id: u64) -> Option<(&Arc<SockFds>, Option<SocketAddr>)>;
}

impl<H: Host> SockCore<H>
where
    H::State: Listeners,
{
    /// Takes the next connection from this listener's queue, blocking as
    /// the timeout mode says. `took` runs under the same hold of the lock
    /// after a connection left the queue (room for another: refill a pool,
    /// admit one the endpoint holds back). Returns the connection's id,
    /// eventfds and peer (the unspecified address if it has none).
    pub fn accept_next(
        &self,
        mut took: impl FnMut(&mut H::State, &mut H::Effects),
    ) -> io::Result<(u64, Arc<SockFds>, SocketAddr)> {
        self.run(Wait::Read, false, |st, fx| {
            // No record (closed), a fatal error, not listening: in that order.
            let id = match st.listener(self.id) {
                None => return Try::Done(Err(errno(libc::EBADF))),
                Some((Some(e), _)) => return Try::Done(Err(errno(e))),
                Some((None, None)) => return Try::Done(Err(errno(libc::EINVAL))),
                Some((None, Some(queue))) => match queue.pop_front() {
                    Some(id) => id,
                    None => return Try::Block,
                },
            };
            took(st, fx);
            match st.accepted(id) {
                Some((fds, peer)) => Try::Done(Ok((
                    id,
                    Arc::clone(fds),
                    peer.unwrap_or_else(|| unspecified(self.family)),
                ))),
                None => Try::Block,
            }
        })
    }
}
