//! The waiting primitives the user-space stacks' drivers share: eventfds
//! (per-socket readiness and a driver's wake-up) and a driver's `ppoll`
//! with signals blocked.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::sys::cvt;

/// A non-blocking eventfd used as a flag: [`EventFd::set`] makes it
/// readable, [`EventFd::clear`] makes it unreadable again.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new, unset eventfd.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: fd was just created and is owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the fd readable. A saturated counter (`EAGAIN`) is readable too,
    /// so the result needs no check.
    pub fn set(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Makes the fd unreadable (`EAGAIN` means it already was).
    pub fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a local.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    /// Keeps the fd readable exactly while `want`: sets or clears it when
    /// `level`, its last known state, differs (no syscall otherwise).
    pub fn set_level(&self, level: &mut bool, want: bool) {
        if *level != want {
            *level = want;
            if want {
                self.set();
            } else {
                self.clear();
            }
        }
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Blocks every signal in the calling thread: signals then go to
/// application threads, whose blocking calls return `EINTR`.
pub fn block_all_signals() {
    // SAFETY: sigset_t is plain data; the calls only touch locals.
    unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
        libc::sigfillset(set.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut());
    }
}

/// Waits for `fds` up to `timeout` (`None`: no limit), with nanosecond
/// precision (smoltcp's timers are in microseconds, FillP paces in
/// nanoseconds; `epoll_wait` counts milliseconds). `EINTR` is returned to
/// the caller.
pub fn wait(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let ts_ptr = match &ts {
        Some(t) => t as *const libc::timespec,
        None => std::ptr::null(),
    };
    // SAFETY: fds is a valid slice; ts_ptr is null or points to a local.
    let n = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as _, ts_ptr, std::ptr::null()) };
    cvt(n).map(|n| n as usize)
}
