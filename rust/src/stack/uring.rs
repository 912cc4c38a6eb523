//! io_uring for the kernel stack: one ring per thread, used for blocking
//! bulk transfers where one submission replaces a loop of syscalls.
//!
//! What we measured (see `benches/results/kernel.md`): for a single blocking
//! `send`/`recv` io_uring is no faster than the syscall, so the kernel stack
//! uses plain syscalls by default and io_uring only when an instance asks for
//! it (`io = "uring"`). When it is on, `send_all` becomes one `SEND` with
//! `MSG_WAITALL` (the kernel retries short sends itself) and `recv` one `RECV`.
//!
//! The kernel may refuse io_uring (`EPERM` when
//! `/proc/sys/kernel/io_uring_disabled` says so, `ENOSYS` when it is not
//! built, `ENOMEM` under a tight memlock limit). [`probe`] finds out once per
//! stack instance, and the instance falls back to syscalls.
//!
//! Buffers must outlive their completions, cancelled ones too: when waiting
//! is interrupted by a signal, the operation is cancelled and its completion
//! reaped before control returns to the caller, who may free the buffer.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

const RING_ENTRIES: u32 = 8;
const OP: u64 = 1;
const CANCEL: u64 = 2;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Checks that this process may create an io_uring instance.
pub fn probe() -> io::Result<()> {
    IoUring::new(2).map(drop)
}

/// Sends `buf` on a blocking socket; with `MSG_WAITALL` in `flags` the
/// kernel keeps sending until all of it is gone or an error occurs.
pub fn send(fd: RawFd, buf: &[u8], flags: i32) -> io::Result<usize> {
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    let entry = opcode::Send::new(types::Fd(fd), buf.as_ptr(), len)
        .flags(flags)
        .build();
    run(entry)
}

/// Receives into `buf` on a blocking socket.
pub fn recv(fd: RawFd, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    let entry = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), len)
        .flags(flags)
        .build();
    run(entry)
}

/// Submits one operation on this thread's ring and waits for it.
fn run(entry: io_uring::squeue::Entry) -> io::Result<usize> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(IoUring::new(RING_ENTRIES)?);
        }
        let ring = slot
            .as_mut()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSYS))?;
        // SAFETY: the buffer named by `entry` outlives the operation: we do
        // not return before its completion has been reaped (see `reap`).
        unsafe { ring.submission().push(&entry.user_data(OP)) }
            .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
        match reap(ring) {
            Reaped::Done(result) => result,
            Reaped::RingFailed(e) => {
                // Tear the ring down: its fd closes, which cancels whatever
                // it still holds, and no stale entry can reach the next call.
                *slot = None;
                Err(e)
            }
        }
    })
}

/// How waiting for the operation ended.
enum Reaped {
    /// Its completion was reaped: the operation's own result.
    Done(io::Result<usize>),
    /// `io_uring_enter` kept failing in ways that say nothing about the
    /// operation; the ring must not be used again.
    RingFailed(io::Error),
}

/// How many times an unexpected `io_uring_enter` error is retried (1 ms
/// apart, cancelling the operation) before the ring is given up.
const ENTER_RETRIES: u32 = 100;

/// Waits for the completion of the one operation in flight. If the wait is
/// interrupted, cancels it and still waits for its completion, so the
/// caller's buffer is never used after we return.
///
/// `io_uring_enter` reports how many entries it *submitted* even when its
/// wait was cut short by a signal (it returns `EINTR` only when it submitted
/// nothing), so a wait that returns with an empty completion queue was
/// interrupted too. Missing that would leave Ctrl-C unanswered.
///
/// Other `io_uring_enter` errors (`EBUSY`, `EBADR`: completions to drain
/// first; anything else is unexpected) are not returned while the
/// operation may still be in flight: it is cancelled and waited for, and
/// only a ring that keeps failing is given up ([`Reaped::RingFailed`]).
fn reap(ring: &mut IoUring) -> Reaped {
    let mut cancelled = false;
    let mut cancel_reaped = false;
    let mut result = None;
    let mut failures = 0;
    loop {
        let interrupted = match ring.submit_and_wait(1) {
            Ok(_) => false,
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => true,
                // The completion queue overflowed: drain it below.
                Some(libc::EBUSY) | Some(libc::EBADR) => false,
                _ => {
                    failures += 1;
                    if failures > ENTER_RETRIES {
                        return Reaped::RingFailed(e);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    true
                }
            },
        };
        let mut any = false;
        for cqe in ring.completion() {
            any = true;
            match cqe.user_data() {
                OP => result = Some(cqe.result()),
                CANCEL => cancel_reaped = true,
                _ => {}
            }
        }
        if result.is_none() && (interrupted || !any) && !cancelled {
            cancelled = true;
            let cancel = opcode::AsyncCancel::new(OP).build().user_data(CANCEL);
            // SAFETY: a cancel request refers to no buffer.
            unsafe {
                // If the queue is full the cancel waits for the next
                // round; the operation itself is still reaped below.
                let _ = ring.submission().push(&cancel);
            }
            continue;
        }
        // Once a cancel was sent, wait for its completion as well, so that no
        // stale completion is left for the next operation on this ring.
        if let Some(res) = result.filter(|_| !cancelled || cancel_reaped) {
            return Reaped::Done(match res {
                r if r >= 0 => Ok(r as usize),
                r if -r == libc::ECANCELED && cancelled => {
                    Err(io::Error::from_raw_os_error(libc::EINTR))
                }
                r => Err(io::Error::from_raw_os_error(-r)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn send_and_recv_round_trip() {
        if probe().is_err() {
            eprintln!("io_uring refused here; the fallback test covers this machine");
            return;
        }
        let (mut a, b) = UnixStream::pair().unwrap();
        let n = send(b.as_raw_fd(), b"hello", libc::MSG_WAITALL).unwrap();
        assert_eq!(n, 5);
        let mut got = [0u8; 5];
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        a.write_all(b"back").unwrap();
        let mut buf = [0u8; 16];
        let n = recv(b.as_raw_fd(), &mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"back");
    }

    #[test]
    fn errors_carry_the_errno() {
        if probe().is_err() {
            return;
        }
        let err = send(-1, b"x", 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }
}
