//! Thin, safe wrappers over the libc calls the stacks and the link emulator
//! need.
//!
//! Every function returns `io::Result` with the raw errno; nothing here
//! retries or interprets errors, so callers keep the exact kernel semantics.

pub mod context;
pub mod event;
pub mod sockaddr;
pub mod tap;

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Converts a libc return value into `io::Result`.
pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Converts a libc `ssize_t` return value into `io::Result<usize>`.
pub fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Sets or clears `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on an fd number has no memory-safety requirements; a
    // stale fd yields EBADF.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, new) })?;
    }
    Ok(())
}

/// Waits until `fd` has one of `events`, or until `deadline`.
///
/// Returns the ready events, `Ok(0)` on timeout, or `EINTR` so the caller can
/// run signal handlers.
pub fn poll_until(
    fd: RawFd,
    events: libc::c_short,
    deadline: Option<Instant>,
) -> io::Result<libc::c_short> {
    let ms = match deadline {
        None => -1,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            // Round up so a sub-millisecond remainder still waits.
            let ms = left.as_nanos().div_ceil(1_000_000);
            ms.min(i32::MAX as u128) as libc::c_int
        }
    };
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd for the duration of the call.
    let n = cvt(unsafe { libc::poll(&mut pfd, 1, ms) })?;
    Ok(if n == 0 { 0 } else { pfd.revents })
}

/// Waits until `fd` is readable or `also` (when given) has an event, or
/// until `deadline`, with nanosecond precision. Returns `None` on timeout,
/// else `also`'s events (0 when it has none). `EINTR` goes to the caller,
/// so it can run signal handlers.
pub fn wait_readable_or(
    fd: RawFd,
    also: Option<RawFd>,
    deadline: Option<Instant>,
) -> io::Result<Option<libc::c_short>> {
    let mut pfds = [fd, also.unwrap_or(-1)].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ts = deadline.map(|d| {
        let left = d.saturating_duration_since(Instant::now());
        libc::timespec {
            tv_sec: left.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(left.subsec_nanos() as i32),
        }
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: pfds is a valid array of pollfd; tsp is null or points to a
    // local; a negative fd is ignored by ppoll.
    let n = cvt(unsafe { libc::ppoll(pfds.as_mut_ptr(), 2, tsp, std::ptr::null()) })?;
    Ok((n > 0).then_some(pfds[1].revents))
}

/// A deadline `timeout` from now, or `None` for no limit.
pub fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.map(|t| Instant::now() + t)
}

/// `getsockopt` into a buffer of at most `len` bytes.
pub fn getsockopt(fd: RawFd, level: i32, name: i32, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut optlen = len as libc::socklen_t;
    // SAFETY: buf is valid for `optlen` bytes and the kernel writes at most that.
    cvt(unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut optlen) })?;
    buf.truncate(optlen as usize);
    Ok(buf)
}

/// `setsockopt` with raw bytes.
pub fn setsockopt(fd: RawFd, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: value is valid for its length.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Reads an `int` socket option.
pub fn getsockopt_int(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
    let v = getsockopt(fd, level, name, 4)?;
    let bytes: [u8; 4] = v.get(..4).and_then(|s| s.try_into().ok()).unwrap_or([0; 4]);
    Ok(i32::from_ne_bytes(bytes))
}
