//! The driver thread of an instance: turns of `Interface::poll` whenever a
//! frame arrives, a smoltcp timer is due, or an application thread kicks it.
//!
//! It waits outside the lock in `ppoll` on the TAP fd and the wake eventfd,
//! with smoltcp's `poll_at` as the timeout. `POLLERR`/`POLLHUP`/`POLLNVAL`
//! on the TAP fd mean the device is gone: the instance goes down at once
//! (a read would say the same a moment later). While the instance is down
//! the driver only waits for a restart or stop.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{device_fd, lock, Shared};
use crate::sys::event::{block_all_signals, wait};

/// Runs the driver until the stack stops.
pub(crate) fn run(shared: Arc<Shared>) {
    block_all_signals();
    let mut pfds = [
        libc::pollfd {
            fd: shared.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: -1,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        let timeout = {
            let mut st = lock(&shared.state);
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            st.turn();
            let next = st.poll_at();
            st.driver_deadline = next;
            pfds[1].fd = device_fd(&st).unwrap_or(-1);
            shared.sleeping.store(true, Ordering::SeqCst);
            let now = st.now();
            next.map(|t| {
                if t > now {
                    Duration::from_micros((t - now).total_micros())
                } else {
                    Duration::ZERO
                }
            })
        };
        pfds[0].revents = 0;
        pfds[1].revents = 0;
        // Signals are blocked, so EINTR cannot happen; any other error is a
        // bad fd, which the next turn's state replaces.
        let _ = wait(&mut pfds, timeout);
        shared.sleeping.store(false, Ordering::SeqCst);
        if pfds[0].revents != 0 {
            shared.wake.clear();
        }
        let bad = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
        if pfds[1].fd >= 0 && pfds[1].revents & bad != 0 {
            let mut st = lock(&shared.state);
            // Only the device this poll was about (not one a restart put
            // in place meanwhile).
            if device_fd(&st) == Some(pfds[1].fd) {
                if let Some(dev) = st.dev.as_mut() {
                    dev.fail(io::Error::from_raw_os_error(libc::ENODEV));
                }
                st.go_down(libc::ENETDOWN);
            }
        }
    }
}
