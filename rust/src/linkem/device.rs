//! The two device mechanisms the relay can use, and their setup and cleanup.
//!
//! - [`DeviceKind::Tap`]: two TAP devices. Created without `TUNSETOFFLOAD`
//!   flags they have no TSO/GSO/checksum offload, so the kernel hands us
//!   finished MTU-sized frames; closing the fd removes the device wherever
//!   it lives, so cleanup is automatic even after a crash.
//! - [`DeviceKind::VethPacket`]: two veth pairs; one end of each goes into
//!   the namespace, the other (named `<dev>r`) stays here and is read and
//!   written with an AF_PACKET socket. Offloads are switched off with the
//!   ethtool ioctl. Frames carry a kernel receive timestamp, so the time a
//!   frame waited for the relay thread to wake counts as part of its delay
//!   instead of adding to it. The pairs must be deleted explicitly.
//!
//! Both give the relay one fd per end on which `read` returns one Ethernet
//! frame and `write` sends one, so the relay loop is the same for both.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use crate::sys::context::context;
use crate::sys::cvt;
use crate::sys::tap::Tap;

/// How the emulator attaches to the two namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// Two TAP devices (the default; see the module docs).
    #[default]
    Tap,
    /// Two veth pairs read and written through AF_PACKET sockets.
    VethPacket,
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<DeviceKind, String> {
        match s {
            "tap" => Ok(DeviceKind::Tap),
            "veth" => Ok(DeviceKind::VethPacket),
            _ => Err(format!("device kind must be 'tap' or 'veth', got '{s}'")),
        }
    }
}

fn check_name(name: &str, max: usize) -> io::Result<()> {
    if name.is_empty() || name.len() > max || name.contains(['/', ' ', ':', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad device name '{name}' (1-{max} bytes, no '/', ':' or spaces)"),
        ));
    }
    Ok(())
}

/// Runs `ip ARGS...`; a failure becomes an error carrying ip's message.
pub(crate) fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| context(e, "running 'ip' (iproute2)"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Sets MTU and queue length, moves `dev` into `netns` and brings it up.
fn place(dev: &str, netns: Option<&str>, mtu: u32, qlen: u32) -> io::Result<()> {
    let (mtu, qlen) = (mtu.to_string(), qlen.to_string());
    ip(&["link", "set", "dev", dev, "mtu", &mtu, "txqueuelen", &qlen])?;
    match netns {
        Some(ns) => {
            ip(&["link", "set", "dev", dev, "netns", ns])?;
            ip(&["-n", ns, "link", "set", "dev", dev, "up"])
        }
        None => ip(&["link", "set", "dev", dev, "up"]),
    }
}

/// Opens a new non-persistent TAP device (see [`crate::sys::tap`]: no
/// packet-info header, no offloads, so frames are complete and at most
/// MTU-sized).
fn open_tap(name: &str) -> io::Result<OwnedFd> {
    check_name(name, 15)?;
    Ok(Tap::open(name)?.into_fd())
}

// Legacy ethtool commands (linux/ethtool.h); each takes a struct ethtool_value.
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_SSG: u32 = 0x19;
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_SGSO: u32 = 0x24;
const ETHTOOL_SGRO: u32 = 0x2c;
// linux/if_packet.h
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// Switches off segmentation, GRO and checksum offloads on `dev` (in this
/// namespace), so every frame is complete and MTU-sized when we see it.
fn no_offloads(dev: &str) -> io::Result<()> {
    // SAFETY: plain socket call.
    let s = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: s is a new fd owned by nobody else.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    for cmd in [
        ETHTOOL_STSO,
        ETHTOOL_SGSO,
        ETHTOOL_SGRO,
        ETHTOOL_STXCSUM,
        ETHTOOL_SSG,
    ] {
        let mut value = [cmd, 0u32];
        let mut ifr = [0u8; 40];
        ifr[..dev.len()].copy_from_slice(dev.as_bytes());
        ifr[16..24].copy_from_slice(&(value.as_mut_ptr() as usize).to_ne_bytes());
        // SAFETY: ifr holds the name and a pointer to `value`; both outlive the call.
        cvt(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCETHTOOL, ifr.as_mut_ptr()) })
            .map_err(|e| context(e, format!("ethtool {cmd:#x} on {dev}")))?;
    }
    Ok(())
}

fn ifindex(dev: &str) -> io::Result<libc::c_int> {
    let c = CString::new(dev).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i as libc::c_int)
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v lives across the call and len matches its size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            len,
        )
    })
    .map(drop)
}

/// An AF_PACKET socket bound to `dev` that sees the frames arriving on it
/// (not the ones we send), with kernel receive timestamps.
fn packet_socket(dev: &str) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    let ty = libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain socket call.
    let fd = cvt(unsafe { libc::socket(libc::AF_PACKET, ty, proto as libc::c_int) })?;
    // SAFETY: fd is new and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
    // Room for bursts while the thread sleeps; FORCE needs CAP_NET_ADMIN, which we have.
    let _ = setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20);
    let _ = setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 4 << 20);
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex(dev)?;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: sll is a valid sockaddr_ll of the given length.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            len,
        )
    })?;
    Ok(fd)
}

/// Devices to delete on [`Cleanup::run`] or drop, once the relay has
/// stopped using them.
#[derive(Debug, Default)]
pub(crate) struct Cleanup {
    /// (namespace, device) pairs; `None` is the caller's namespace.
    owned: Vec<(Option<String>, String)>,
}

impl Cleanup {
    /// Deletes the devices. Idempotent.
    pub fn run(&mut self) {
        for (ns, dev) in self.owned.drain(..) {
            let _ = match ns {
                Some(ns) => ip(&["-n", &ns, "link", "del", "dev", &dev]),
                None => ip(&["link", "del", "dev", &dev]),
            };
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// What [`open`] returns: the fds of ends A and B, whether reads on them
/// carry kernel receive timestamps, and what to delete afterwards.
pub(crate) type Opened = (OwnedFd, OwnedFd, bool, Cleanup);

/// Creates both ends and places them; on error, removes what it created.
pub(crate) fn open(
    kind: DeviceKind,
    names: [&str; 2],
    netns: [Option<&str>; 2],
    mtu: u32,
    qlen: u32,
) -> io::Result<Opened> {
    let mut cleanup = Cleanup::default();
    match kind {
        DeviceKind::Tap => {
            let a = open_tap(names[0])?;
            let b = open_tap(names[1])?;
            place(names[0], netns[0], mtu, qlen)?;
            place(names[1], netns[1], mtu, qlen)?;
            // A TAP goes with its last fd, but a process forked meanwhile
            // (any `ip` we or another thread spawn) holds a copy until it
            // execs; deleting explicitly makes `stop` synchronous.
            for (name, ns) in names.iter().zip(netns) {
                cleanup
                    .owned
                    .push((ns.map(str::to_string), name.to_string()));
            }
            Ok((a, b, false, cleanup))
        }
        DeviceKind::VethPacket => {
            // On error, `cleanup` drops here and deletes the pairs made so far.
            let a = veth_end(names[0], netns[0], mtu, qlen, &mut cleanup)?;
            let b = veth_end(names[1], netns[1], mtu, qlen, &mut cleanup)?;
            Ok((a, b, true, cleanup))
        }
    }
}

/// Makes veth pair `name` (into `netns`) / `<name>r` (stays here) and
/// returns a packet socket on the end that stays.
fn veth_end(
    name: &str,
    netns: Option<&str>,
    mtu: u32,
    qlen: u32,
    cleanup: &mut Cleanup,
) -> io::Result<OwnedFd> {
    check_name(name, 14)?;
    let here = format!("{name}r");
    ip(&["link", "add", name, "type", "veth", "peer", "name", &here])?;
    cleanup.owned.push((None, here.clone()));
    no_offloads(name)?;
    no_offloads(&here)?;
    // The end that stays here carries only relayed frames: no addresses,
    // no ARP, no IPv6 of its own.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{here}/disable_ipv6"), "1");
    ip(&[
        "link",
        "set",
        "dev",
        &here,
        "arp",
        "off",
        "mtu",
        &mtu.to_string(),
    ])?;
    ip(&["link", "set", "dev", &here, "up"])?;
    place(name, netns, mtu, qlen)?;
    packet_socket(&here)
}
