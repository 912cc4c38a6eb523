//! The relay between real TAP devices in two network namespaces.
//!
//! Needs root (CAP_NET_ADMIN): every test is ignored unless run with
//! `--include-ignored`, and then fails without the privilege. Each test makes its own namespaces with unique names and
//! removes them, also when it fails (the guard's Drop).

use dmm::linkem::{parse_duplex, DeviceKind, Direction, Linkem, LinkemConfig, Params};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod common;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {:?}: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces and the names of the devices that will join them.
struct Net {
    ns: [String; 2],
    dev: [String; 2],
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Net {
    fn new() -> Net {
        let id = format!(
            "{}x{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let net = Net {
            ns: [format!("lkt-{id}-a"), format!("lkt-{id}-b")],
            dev: [format!("lkt{id}a"), format!("lkt{id}b")],
        };
        for ns in &net.ns {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn start(&self, params: &str) -> Linkem {
        self.start_with(params, DeviceKind::Tap)
    }

    fn start_with(&self, params: &str, device: DeviceKind) -> Linkem {
        let (ab, ba) = parse_duplex(params).unwrap();
        let mut cfg = LinkemConfig::new(&self.dev[0], &self.dev[1]);
        cfg.device = device;
        cfg.netns_a = Some(self.ns[0].clone());
        cfg.netns_b = Some(self.ns[1].clone());
        cfg.params_ab = ab;
        cfg.params_ba = ba;
        let link = Linkem::start(cfg).expect("start linkem");
        let addrs = ["10.201.250.1", "10.201.250.2"];
        for (i, addr) in addrs.iter().enumerate() {
            let cidr = format!("{addr}/24");
            ip(&["-n", &self.ns[i], "addr", "add", &cidr, "dev", &self.dev[i]]);
        }
        // Static neighbours: a lost ARP exchange would otherwise stall the
        // first second of a test (and "100% loss" would poison the cache).
        for i in 0..2 {
            let mac = self.mac(1 - i);
            let (ns, dev) = (&self.ns[i], &self.dev[i]);
            ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                addrs[1 - i],
                "lladdr",
                &mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        link
    }

    fn mac(&self, i: usize) -> String {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.ns[i],
                "-br",
                "link",
                "show",
                "dev",
                &self.dev[i],
            ])
            .output()
            .expect("run ip");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace()
            .nth(2)
            .expect("mac in ip -br output")
            .to_string()
    }

    /// Runs `f` on a thread that has entered namespace `i`.
    fn in_ns<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.ns[i]);
        std::thread::spawn(move || {
            let file = std::fs::File::open(path).expect("open netns");
            // SAFETY: setns on this thread only, with a valid netns fd.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Sends `n` UDP probes from A to an echo server in B, `gap` apart; returns
/// the round-trip times of those that came back.
fn udp_ping(net: &Net, n: usize, gap: Duration) -> Vec<Duration> {
    let server = net.in_ns(1, || {
        let s = UdpSocket::bind("10.201.250.2:7").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 2048];
        while let Ok((len, from)) = s.recv_from(&mut buf) {
            if &buf[..len] == b"quit" {
                break;
            }
            s.send_to(&buf[..len], from).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let client = net.in_ns(0, move || {
        let s = UdpSocket::bind("10.201.250.1:0").unwrap();
        let dst: SocketAddr = "10.201.250.2:7".parse().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let t0 = Instant::now();
        let mut rtts = Vec::new();
        let mut buf = [0u8; 64];
        let drain = |s: &UdpSocket, rtts: &mut Vec<Duration>, buf: &mut [u8]| {
            while let Ok(len) = s.recv(buf) {
                if len == 16 {
                    let sent = u128::from_ne_bytes(buf[..16].try_into().unwrap());
                    rtts.push(t0.elapsed() - Duration::from_nanos(sent as u64));
                }
            }
        };
        for i in 0..n {
            while t0.elapsed() < gap * i as u32 {
                drain(&s, &mut rtts, &mut buf);
            }
            let stamp = t0.elapsed().as_nanos().to_ne_bytes();
            s.send_to(&stamp, dst).unwrap();
        }
        let end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < end {
            drain(&s, &mut rtts, &mut buf);
        }
        s.send_to(b"quit", dst).unwrap();
        rtts
    });
    let rtts = client.join().unwrap();
    server.join().unwrap();
    rtts
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
#[ignore = "needs root: TAP devices and network namespaces"]
fn perfect_link_relays_both_ways() {
    common::require_net_admin();
    perfect_link(DeviceKind::Tap);
}

#[test]
#[ignore = "needs root: TAP devices and network namespaces"]
fn veth_perfect_link_relays_both_ways() {
    common::require_net_admin();
    perfect_link(DeviceKind::VethPacket);
}

fn perfect_link(kind: DeviceKind) {
    let net = Net::new();
    let link = net.start_with("", kind);
    let mut rtts = udp_ping(&net, 200, Duration::from_millis(1));
    assert!(rtts.len() == 200, "only {} of 200 came back", rtts.len());
    assert!(
        median(&mut rtts) < Duration::from_millis(2),
        "rtt {:?}",
        median(&mut rtts)
    );
    let st = link.stats();
    assert!(st.ab.frames_out >= 198 && st.ba.frames_out >= 198, "{st:?}");
    assert_eq!(
        st.ab.dropped_loss + st.ab.dropped_queue + st.ab.tx_errors,
        0
    );
}

#[test]
#[ignore = "needs root: TAP devices and network namespaces"]
fn delay_and_loss_show_up() {
    common::require_net_admin();
    delay_and_loss(DeviceKind::Tap);
}

#[test]
#[ignore = "needs root: TAP devices and network namespaces"]
fn veth_delay_and_loss_show_up() {
    common::require_net_admin();
    delay_and_loss(DeviceKind::VethPacket);
}

fn delay_and_loss(kind: DeviceKind) {
    let net = Net::new();
    let link = net.start_with("delay=20ms,ab.loss=10%,seed=3", kind);
    let mut rtts = udp_ping(&net, 400, Duration::from_millis(2));
    let m = median(&mut rtts);
    assert!(
        m >= Duration::from_millis(40) && m < Duration::from_millis(42),
        "rtt {m:?}"
    );
    let lost = 400 - rtts.len();
    assert!((20..=65).contains(&lost), "lost {lost} of 400 at 10%");
    let st = link.stats();
    assert!(
        st.ab.dropped_loss >= 20 && st.ba.dropped_loss == 0,
        "{st:?}"
    );
}

#[test]
#[ignore = "needs root: TAP devices and network namespaces"]
fn params_change_while_running() {
    common::require_net_admin();
    let net = Net::new();
    let link = net.start("ab.loss=100%");
    assert!(udp_ping(&net, 20, Duration::from_millis(1)).is_empty());
    link.set_params(Direction::AtoB, Params::parse("delay=5ms").unwrap())
        .unwrap();
    let mut rtts = udp_ping(&net, 50, Duration::from_millis(1));
    assert!(rtts.len() >= 49, "{} came back", rtts.len());
    let m = median(&mut rtts);
    assert!(
        m >= Duration::from_millis(5) && m < Duration::from_millis(7),
        "rtt {m:?}"
    );
    assert_eq!(link.params(Direction::AtoB).delay, Duration::from_millis(5));
    assert!(link
        .set_params(
            Direction::BtoA,
            Params {
                loss: 2.0,
                ..Params::default()
            }
        )
        .is_err());
}

/// Whether `ip ARGS` fails (the device is gone) within 2 s. The kernel
/// unregisters a closed TAP device asynchronously, so it can still be listed
/// for a moment after the fd is closed.
fn gone_soon(args: &[&str]) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let listed = Command::new("ip")
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !listed {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs root: TAP devices and network namespaces"]
fn stop_removes_devices_and_errors_are_clean() {
    common::require_net_admin();
    let net = Net::new();
    let mut link = net.start("");
    assert!(link.is_running());
    link.stop();
    assert!(!link.is_running());
    assert!(
        gone_soon(&["-n", &net.ns[0], "link", "show", &net.dev[0]]),
        "device still there after stop"
    );
    // A namespace that does not exist is an error, not a panic, and leaves no device.
    let mut cfg = LinkemConfig::new(&net.dev[0], &net.dev[1]);
    cfg.netns_a = Some("lkt-no-such-ns".into());
    let e = Linkem::start(cfg).unwrap_err();
    assert!(e.to_string().contains("lkt-no-such-ns"), "{e}");
    assert!(
        gone_soon(&["link", "show", &net.dev[0]]),
        "device left behind after a failed start"
    );
    let e = Linkem::start(LinkemConfig::new("this-name-is-too-long", "x")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
#[ignore = "needs root: TAP devices and network namespaces"]
fn veth_pairs_are_deleted() {
    common::require_net_admin();
    let net = Net::new();
    let mut link = net.start_with("", DeviceKind::VethPacket);
    let here = format!("{}r", net.dev[0]);
    assert!(Command::new("ip")
        .args(["link", "show", &here])
        .output()
        .unwrap()
        .status
        .success());
    link.stop();
    for dev in [format!("{}r", net.dev[0]), format!("{}r", net.dev[1])] {
        let out = Command::new("ip")
            .args(["link", "show", &dev])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{dev} still there after stop");
    }
    // A failed start (second namespace missing) removes the first pair too.
    let mut cfg = LinkemConfig::new(&net.dev[0], &net.dev[1]);
    cfg.device = DeviceKind::VethPacket;
    cfg.netns_a = Some(net.ns[0].clone());
    cfg.netns_b = Some("lkt-no-such-ns".into());
    assert!(Linkem::start(cfg).is_err());
    let out = Command::new("ip")
        .args(["link", "show", &here])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{here} left behind after a failed start"
    );
}

#[test]
#[ignore = "needs root: TAP devices and network namespaces"]
fn queue_overflow_drops_at_the_rate_limit() {
    common::require_net_admin();
    let net = Net::new();
    // 10 Mbit/s with a 30 KB queue; 1000 datagrams of 1400 bytes sent as
    // fast as possible (about 11 Mbit in a few ms) must overflow it.
    let link = net.start("ab.rate=10mbit,ab.queue=30kb");
    let sender = net.in_ns(0, || {
        let s = UdpSocket::bind("10.201.250.1:0").unwrap();
        let payload = [7u8; 1400];
        for _ in 0..1000 {
            // A full device queue may refuse some (ENOBUFS); that is fine.
            let _ = s.send_to(&payload, "10.201.250.2:9");
        }
    });
    sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let st = link.stats().ab;
    assert!(st.dropped_queue > 500, "{st:?}");
    assert_eq!(
        st.frames_in,
        st.frames_out + st.dropped_queue + st.tx_errors
    );
    // What got through was at most a queue's worth plus what the link
    // serialized meanwhile.
    assert!(st.frames_out < 400, "{st:?}");
}
