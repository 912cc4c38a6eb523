//! A user-space socket's handle and its blocking loop (see the module docs
//! of [`super`] for the contract between the loop and a stack).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::fds::{SockFds, WakeHold};
use super::lock;
use crate::stack::{errno, timed_out, Family, TimeoutCell};
use crate::sys;

/// What a blocked operation waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// The `ready` eventfd: the socket became readable (`recv`, `accept`).
    Read,
    /// The `wake` eventfd: a writer may go on (`send`).
    Write,
    /// As `Write`, for `connect`: the `wake` eventfd made for the wait is
    /// closed again after it, unless the application was given it (an
    /// idle connection then holds one fd fewer).
    Connect,
}

/// The outcome of one attempt of an operation.
#[derive(Debug)]
pub(crate) enum Try<T> {
    /// The call is over, with this result.
    Done(io::Result<T>),
    /// The call must wait and try again.
    Block,
}

/// What a user-space stack adds to the blocking loop: the instance's shared
/// part, which owns the state `Mutex`. See the module docs of [`super`].
pub(crate) trait Host {
    /// Everything behind the instance's lock.
    type State;

    /// What one attempt asks of the host once it has run (a flag, or a few
    /// fields), fresh for each attempt.
    type Effects: Default;

    /// A blocked reader's claim on a further fd to wait on besides its
    /// `ready` eventfd (`Drop` releases the claim). A stack that has none
    /// names any fd type and keeps the default [`Host::watch`].
    type Watch<'a>: AsRawFd
    where
        Self: 'a;

    /// The instance's state.
    fn state(&self) -> &Mutex<Self::State>;

    /// Runs under the lock after every attempt on socket `id`, done or
    /// blocked: acts on `fx` where that needs the state, and brings the
    /// socket's eventfds in line with it.
    fn after_attempt(&self, st: &mut Self::State, id: u64, fx: &mut Self::Effects);

    /// Ends a call after its last attempt: releases the lock (`st`) and
    /// does what `fx` leaves for after it (send outside the lock).
    fn finish(&self, st: MutexGuard<'_, Self::State>, fx: Self::Effects) {
        drop(st);
        drop(fx);
    }

    /// Whether the instance has stopped: a call that would block fails
    /// with `ENETDOWN` instead of waiting for a driver that is gone.
    fn stopped(&self) -> bool {
        false
    }

    /// Under the lock, for socket `id`'s reader about to block: a further
    /// fd to wait on (input that the reader can process itself). `None`:
    /// only the `ready` eventfd.
    fn watch<'a>(&'a self, st: &mut Self::State, id: u64) -> Option<Self::Watch<'a>> {
        let _ = (st, id);
        None
    }

    /// As [`Host::watch`], for socket `id`'s writer about to block (a
    /// connect waiting for its handshake). `None`: only the `wake` eventfd.
    fn watch_write<'a>(&'a self, st: &mut Self::State, id: u64) -> Option<Self::Watch<'a>> {
        let _ = (st, id);
        None
    }

    /// The wait saw `revents` on `watch`'s fd: take what arrived (or not,
    /// for an error the driver handles), releasing the watch, and return
    /// the state locked for the next attempt, whose effects `fx` are.
    fn arrived<'a>(
        &'a self,
        watch: Self::Watch<'a>,
        revents: libc::c_short,
        id: u64,
        fx: &mut Self::Effects,
    ) -> MutexGuard<'a, Self::State> {
        let _ = (revents, id, fx);
        drop(watch);
        lock(self.state())
    }
}

/// One user-space socket's handle: its instance, its id in the instance's
/// state, its eventfds, its family, its timeout mode and whether it was
/// closed. Stacks wrap it in their socket types.
pub(crate) struct SockCore<H> {
    /// The instance's shared part.
    pub shared: Arc<H>,
    /// The socket's key in the instance's state.
    pub id: u64,
    /// The socket's eventfds (its record in the state sets them).
    pub fds: Arc<SockFds>,
    /// The socket's address family.
    pub family: Family,
    /// The timeout mode (`set_timeout`).
    pub timeout: TimeoutCell,
    closed: AtomicBool,
}

impl<H: Host> SockCore<H> {
    /// A handle for socket `id` of `shared`, blocking (no timeout).
    pub fn new(shared: Arc<H>, id: u64, fds: Arc<SockFds>, family: Family) -> Self {
        SockCore {
            shared,
            id,
            fds,
            family,
            timeout: TimeoutCell::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// `EBADF` once the socket is closed.
    pub fn check_open(&self) -> io::Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(errno(libc::EBADF));
        }
        Ok(())
    }

    /// The instance's state, locked, if the socket is open.
    pub fn lock(&self) -> io::Result<MutexGuard<'_, H::State>> {
        self.check_open()?;
        Ok(lock(self.shared.state()))
    }

    /// Marks the socket closed (once): later calls fail with `EBADF`.
    /// Returns whether this call closed it.
    pub fn mark_closed(&self) -> bool {
        !self.closed.swap(true, Ordering::AcqRel)
    }

    /// Wakes every thread blocked on this socket (after close: they see
    /// `EBADF`).
    pub fn wake_all(&self) {
        self.fds.wake_all();
    }

    /// The `ready` eventfd (the `poll_fd`).
    pub fn ready_fd(&self) -> RawFd {
        self.fds.ready.as_raw_fd()
    }

    /// The `wake` eventfd (the `write_poll_fd`), made on first use.
    pub fn write_fd(&self) -> io::Result<RawFd> {
        self.fds.wake_fd()
    }

    /// Sets the timeout mode (`EBADF` once closed).
    pub fn set_timeout_mode(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.check_open()?;
        self.timeout.set(timeout);
        Ok(())
    }

    /// Runs `op` under the lock until it is done, waiting on `wait` between
    /// attempts as the timeout mode says (`nonblock` forces non-blocking).
    pub fn run<T>(
        &self,
        wait: Wait,
        nonblock: bool,
        op: impl FnMut(&mut H::State, &mut H::Effects) -> Try<T>,
    ) -> io::Result<T> {
        self.run_until(wait, nonblock, None, op)
    }

    /// [`Self::run`], with `until` (when given, and the socket has a
    /// timeout) as the deadline instead of one timeout from now: `sendall`
    /// spreads one timeout over all its sends.
    pub fn run_until<T>(
        &self,
        wait: Wait,
        nonblock: bool,
        until: Option<Instant>,
        mut op: impl FnMut(&mut H::State, &mut H::Effects) -> Try<T>,
    ) -> io::Result<T> {
        self.check_open()?;
        let timeout = if nonblock {
            Some(Duration::ZERO)
        } else {
            self.timeout.get()
        };
        let nonblocking = timeout.is_some_and(|t| t.is_zero());
        let deadline = match (timeout, until) {
            (Some(t), Some(u)) if !t.is_zero() => Some(u),
            _ => sys::deadline(timeout),
        };
        // A blocked reader's watch, and the events its last wait saw on it.
        let mut watch: Option<H::Watch<'_>> = None;
        let mut revents: libc::c_short = 0;
        // Held from the first wait on `wake` until the call returns.
        let mut wake: Option<WakeHold> = None;
        loop {
            let mut fx = H::Effects::default();
            // The watch ends here, before the next attempt (its lock hold
            // comes first); if input arrived, the host takes it and hands
            // over the lock for the attempt.
            let mut st = match watch.take() {
                Some(w) if revents != 0 => self.shared.arrived(w, revents, self.id, &mut fx),
                w => {
                    drop(w);
                    lock(self.shared.state())
                }
            };
            let r = op(&mut st, &mut fx);
            self.shared.after_attempt(&mut st, self.id, &mut fx);
            if let Try::Done(r) = r {
                self.shared.finish(st, fx);
                return r;
            }
            if self.shared.stopped() {
                return Err(errno(libc::ENETDOWN));
            }
            if nonblocking {
                return Err(errno(libc::EAGAIN));
            }
            watch = match wait {
                Wait::Read => self.shared.watch(&mut st, self.id),
                Wait::Write | Wait::Connect => self.shared.watch_write(&mut st, self.id),
            };
            drop(st);
            let fd = match wait {
                Wait::Read => self.fds.ready.as_raw_fd(),
                _ => match &wake {
                    Some(held) => held.fd,
                    None => wake.insert(self.fds.hold_wake(wait == Wait::Connect)?).fd,
                },
            };
            let also = watch.as_ref().map(|w| w.as_raw_fd());
            let Some(events) = sys::wait_readable_or(fd, also, deadline)? else {
                return Err(timed_out());
            };
            revents = events;
            self.check_open()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::userspace::{Listeners, Mirror};
    use crate::sys::event::EventFd;
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::atomic::AtomicUsize;
    use std::thread;

    /// A one-socket "stack": the socket is readable while `data` is set
    /// or a connection waits in `queue` (while `listening`), and never
    /// writable.
    struct Data {
        data: bool,
        listening: bool,
        queue: VecDeque<u64>,
        mirror: Mirror,
    }

    impl Listeners for Data {
        fn listener(&mut self, id: u64) -> Option<(Option<i32>, Option<&mut VecDeque<u64>>)> {
            let queue = self.listening.then_some(&mut self.queue);
            (id == 1).then_some((None, queue))
        }

        fn accepted(&self, id: u64) -> Option<(&Arc<SockFds>, Option<SocketAddr>)> {
            // Every accepted connection shares the listener's eventfds here.
            (id > 1).then(|| (self.mirror.fds(), None))
        }
    }

    #[derive(Default)]
    struct Fx {
        flush: bool,
    }

    struct TestHost {
        state: Mutex<Data>,
        stopped: AtomicBool,
        /// An fd a blocked reader watches, if set: input there makes the
        /// data ready (as a TAP frame or a datagram does).
        input: Option<EventFd>,
        arrivals: AtomicUsize,
        flushes: AtomicUsize,
    }

    impl Host for TestHost {
        type State = Data;
        type Effects = Fx;
        type Watch<'a> = RawFd;

        fn state(&self) -> &Mutex<Data> {
            &self.state
        }

        fn after_attempt(&self, st: &mut Data, _id: u64, _fx: &mut Fx) {
            let ready = st.data || !st.queue.is_empty();
            st.mirror.show(ready, false);
        }

        fn finish(&self, st: MutexGuard<'_, Data>, fx: Fx) {
            drop(st);
            if fx.flush {
                self.flushes.fetch_add(1, Ordering::Relaxed);
            }
        }

        fn stopped(&self) -> bool {
            self.stopped.load(Ordering::Relaxed)
        }

        fn watch(&self, _st: &mut Data, _id: u64) -> Option<RawFd> {
            self.input.as_ref().map(|e| e.as_raw_fd())
        }

        fn arrived<'a>(
            &'a self,
            _watch: RawFd,
            revents: libc::c_short,
            _id: u64,
            _fx: &mut Fx,
        ) -> MutexGuard<'a, Data> {
            let mut st = lock(&self.state);
            if revents & libc::POLLIN != 0 {
                if let Some(e) = &self.input {
                    e.clear();
                }
                st.data = true;
                self.arrivals.fetch_add(1, Ordering::Relaxed);
            }
            st
        }
    }

    fn core(input: bool) -> Arc<SockCore<TestHost>> {
        let fds = SockFds::new().unwrap();
        let host = TestHost {
            state: Mutex::new(Data {
                data: false,
                listening: false,
                queue: VecDeque::new(),
                mirror: Mirror::new(Arc::clone(&fds)),
            }),
            stopped: AtomicBool::new(false),
            input: input.then(|| EventFd::new().unwrap()),
            arrivals: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
        };
        Arc::new(SockCore::new(Arc::new(host), 1, fds, Family::V4))
    }

    /// Takes the data if there is any, else blocks.
    fn read(c: &SockCore<TestHost>) -> io::Result<u8> {
        c.run(Wait::Read, false, |st, fx| {
            if st.data {
                st.data = false;
                fx.flush = true;
                Try::Done(Ok(1))
            } else {
                Try::Block
            }
        })
    }

    /// Makes the data ready from another thread, as a driver would.
    fn provide(c: &SockCore<TestHost>) {
        let mut st = lock(&c.shared.state);
        st.data = true;
        st.mirror.show(true, false);
    }

    fn readable(fd: RawFd) -> bool {
        sys::poll_until(fd, libc::POLLIN, Some(Instant::now())).unwrap() & libc::POLLIN != 0
    }

    #[test]
    fn a_blocked_call_wakes_when_another_thread_makes_it_ready() {
        let c = core(false);
        let c2 = Arc::clone(&c);
        let waker = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            provide(&c2);
        });
        let t0 = Instant::now();
        assert_eq!(read(&c).unwrap(), 1);
        assert!(t0.elapsed() >= Duration::from_millis(40));
        waker.join().unwrap();
        // The attempt that took the data lowered `ready` again, and
        // `finish` saw the attempt's effects.
        assert!(!readable(c.ready_fd()));
        assert!(!readable(c.write_fd().unwrap()));
        assert_eq!(c.shared.flushes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_timeout_ends_the_wait_with_timed_out() {
        let c = core(false);
        c.set_timeout_mode(Some(Duration::from_millis(50))).unwrap();
        let t0 = Instant::now();
        let e = read(&c).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(e.raw_os_error(), None);
        assert!(t0.elapsed() >= Duration::from_millis(50));
        // A caller's own deadline wins over the timeout (sendall).
        c.set_timeout_mode(Some(Duration::from_secs(30))).unwrap();
        let t0 = Instant::now();
        let until = Some(t0 + Duration::from_millis(50));
        let r = c.run_until(Wait::Write, false, until, |_, _| Try::<()>::Block);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn non_blocking_fails_with_eagain_after_one_attempt() {
        let c = core(true);
        let attempts = AtomicUsize::new(0);
        let op = |_: &mut Data, _: &mut Fx| {
            attempts.fetch_add(1, Ordering::Relaxed);
            Try::<()>::Block
        };
        let e = c.run(Wait::Read, true, op).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
        c.set_timeout_mode(Some(Duration::ZERO)).unwrap();
        let e = c.run(Wait::Read, false, op).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
        assert_eq!(attempts.load(Ordering::Relaxed), 2);
        provide(&c);
        assert_eq!(read(&c).unwrap(), 1);
    }

    #[test]
    fn close_from_another_thread_wakes_a_blocked_call_with_ebadf() {
        let c = core(false);
        let c2 = Arc::clone(&c);
        let closer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            assert!(c2.mark_closed());
            c2.wake_all();
        });
        let e = read(&c).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        closer.join().unwrap();
        assert!(!c.mark_closed());
        let e = c.set_timeout_mode(None).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        assert!(c.lock().is_err());
    }

    #[test]
    fn a_stopped_instance_fails_a_call_that_would_block_with_enetdown() {
        let c = core(false);
        c.shared.stopped.store(true, Ordering::Relaxed);
        let e = read(&c).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENETDOWN));
    }

    #[test]
    fn a_blocked_reader_takes_input_on_its_watch_itself() {
        let c = core(true);
        let c2 = Arc::clone(&c);
        let sender = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            // Input on the watched fd only: `ready` stays unset, so only
            // the reader's own `arrived` can make the data ready.
            c2.shared.input.as_ref().unwrap().set();
        });
        assert_eq!(read(&c).unwrap(), 1);
        sender.join().unwrap();
        assert_eq!(c.shared.arrivals.load(Ordering::Relaxed), 1);
        // A writer does not watch.
        c.set_timeout_mode(Some(Duration::from_millis(20))).unwrap();
        c.shared.input.as_ref().unwrap().set();
        let r = c.run(Wait::Write, false, |_, _| Try::<()>::Block);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(c.shared.arrivals.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn accept_waits_for_a_queued_connection_and_takes_it() {
        let c = core(false);
        let e = c.accept_next(|_, _| {}).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        lock(&c.shared.state).listening = true;
        let c2 = Arc::clone(&c);
        let driver = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            let mut st = lock(&c2.shared.state);
            st.queue.push_back(7);
            st.mirror.show(true, false);
        });
        let mut took = 0;
        let (id, _, peer) = c.accept_next(|_, _| took += 1).unwrap();
        driver.join().unwrap();
        assert_eq!((id, took), (7, 1));
        assert_eq!(peer, crate::stack::userspace::unspecified(Family::V4));
        // The queue is empty again, and so `ready` is clear.
        assert!(!readable(c.ready_fd()));
    }

    extern "C" fn ignore_signal(_: libc::c_int) {}

    #[test]
    fn a_signal_interrupts_a_blocked_call_with_eintr() {
        // A handler without SA_RESTART, as CPython installs its own.
        // SAFETY: installs a handler that does nothing.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
        }
        let c = core(false);
        let done = Arc::new(AtomicBool::new(false));
        let (c2, done2) = (Arc::clone(&c), Arc::clone(&done));
        let reader = thread::spawn(move || {
            let r = read(&c2);
            done2.store(true, Ordering::SeqCst);
            r
        });
        // A signal that lands before the reader is in poll(2) only runs the
        // handler: signal until one interrupts the wait.
        let t0 = Instant::now();
        while !done.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(10) {
            // SAFETY: the thread is alive until it is joined below.
            unsafe { libc::pthread_kill(reader.as_pthread_t(), libc::SIGUSR2) };
            thread::sleep(Duration::from_millis(20));
        }
        if !done.load(Ordering::SeqCst) {
            provide(&c);
        }
        let e = reader.join().unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINTR));
    }
}
