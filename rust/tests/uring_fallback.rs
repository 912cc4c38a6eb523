//! The real io_uring refusal path: with `/proc/sys/kernel/io_uring_disabled`
//! at 2 the kernel refuses `io_uring_setup` with `EPERM` for everyone, and a
//! kernel instance asked for io_uring must fall back to syscalls, say why,
//! and still move data.
//!
//! This changes a system-wide setting for a moment, so it is one test in its
//! own binary (nothing else runs in this process meanwhile), and a guard puts
//! the old value back, on panic too. It needs root; elsewhere it says why on
//! stderr and returns.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::thread;

use dmm::stack::kernel::{IoMode, KernelStack, Protocol};
use dmm::stack::{uring, Family, SockKind, Stack};

const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

/// Restores the sysctl's old value when dropped (also while unwinding).
struct Restore {
    old: String,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(e) = fs::write(SYSCTL, &self.old) {
            eprintln!("could not restore {SYSCTL} to {:?}: {e}", self.old.trim());
        }
    }
}

/// Sets the sysctl to `value`; the returned guard restores it.
fn set_disabled(value: &str) -> io::Result<Restore> {
    let old = fs::read_to_string(SYSCTL)?;
    fs::write(SYSCTL, value)?;
    Ok(Restore { old })
}

/// One blocking 1 MiB transfer with a byte-sum check on `stack`.
fn transfer(stack: &KernelStack) {
    let l = stack.socket(Family::V4, SockKind::Stream).unwrap();
    l.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    l.listen(4).unwrap();
    let addr = l.local_addr().unwrap();
    let c = stack.socket(Family::V4, SockKind::Stream).unwrap();
    c.connect(addr).unwrap();
    let (s, _) = l.accept().unwrap();

    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let want: u64 = data.iter().map(|&b| u64::from(b)).sum();
    let sender = thread::spawn(move || {
        c.send_all(&data, 0).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
    });
    let mut buf = vec![0u8; 65536];
    let (mut n, mut sum) = (0usize, 0u64);
    loop {
        let k = s.recv(&mut buf, 0).unwrap();
        if k == 0 {
            break;
        }
        n += k;
        sum += buf[..k].iter().map(|&b| u64::from(b)).sum::<u64>();
    }
    sender.join().unwrap();
    assert_eq!((n, sum), (1 << 20, want));
}

#[test]
#[ignore = "needs root: writes /proc/sys/kernel/io_uring_disabled (Linux 6.6+)"]
fn uring_refused_falls_back_to_syscalls() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root to write {SYSCTL}"
    );
    assert!(
        fs::metadata(SYSCTL).is_ok(),
        "{SYSCTL} does not exist (kernel older than 6.6): the refusal path cannot be exercised here"
    );

    let before = fs::read_to_string(SYSCTL).expect("read io_uring_disabled");
    let stack = {
        let _guard = set_disabled("2").expect("write io_uring_disabled");
        // The setting took effect: the kernel itself refuses now.
        let probe = uring::probe().expect_err("io_uring still allowed with io_uring_disabled=2");
        assert_eq!(probe.raw_os_error(), Some(libc::EPERM), "{probe:?}");
        KernelStack::new("k", Protocol::Tcp, IoMode::Uring)
        // The guard restores the old value here: the instance keeps its
        // decision, taken once at creation.
    };

    assert_eq!(stack.io_mode(), IoMode::Syscall);
    let why = stack.uring_refused().expect("uring_refused() must say why");
    let eperm = io::Error::from_raw_os_error(libc::EPERM).to_string();
    assert_eq!(why, eperm, "the reason should be EPERM's message");
    assert!(why.contains("Operation not permitted"), "{why}");
    assert!(why.contains(&format!("os error {}", libc::EPERM)), "{why}");
    let described = stack.describe();
    assert!(
        described.contains("io_uring refused") && described.contains(why),
        "{described}"
    );

    // Data still flows (through syscalls).
    transfer(&stack);

    // With the old setting back, the same request gets io_uring: the
    // fallback above was caused by the refusal, not by something else.
    assert_eq!(
        fs::read_to_string(SYSCTL).unwrap(),
        before,
        "the guard did not restore {SYSCTL}"
    );
    if before.trim() != "0" {
        eprintln!(
            "{SYSCTL} was {:?} before the test: not checking that io_uring works again",
            before.trim()
        );
        return;
    }
    let again = KernelStack::new("k2", Protocol::Tcp, IoMode::Uring);
    assert_eq!(
        again.io_mode(),
        IoMode::Uring,
        "refused: {:?}",
        again.uring_refused()
    );
    assert_eq!(again.uring_refused(), None);
    transfer(&again);
}
