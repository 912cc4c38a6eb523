//! The listen backlog's gate: admits to each listener only as many
//! connection requests (TCP SYNs without ACK) as it has room for, and
//! drops the rest before smoltcp sees them, as the kernel drops a SYN
//! while the accept queue is full. The client retransmits its SYN and gets
//! in once the application accepts; it is never refused.
//!
//! smoltcp has no gate of its own: a SYN beyond its listening sockets gets
//! an RST, and holding the SYN-ACK back in a socket that took the SYN
//! (`pause_synack`) makes smoltcp's `poll_at` report that socket due now,
//! so the driver would spin, holding the state lock, and starve the very
//! `accept` that would free the queue.
//!
//! Sans-IO: a table of listeners and their room, and a frame parser. The
//! stack sets each listener's room after every turn; each SYN admitted
//! takes one until then, so a burst within one turn cannot overrun it.

use smoltcp::wire::{IpAddress, IpListenEndpoint, Ipv4Address, Ipv6Address};

use super::device::ETH_HEADER;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Listeners and how many new connection requests each has room for.
#[derive(Debug, Default)]
pub struct SynGate {
    room: Vec<(IpListenEndpoint, usize)>,
}

impl SynGate {
    /// Sets the room of the listener on `endpoint`: how many SYNs it may
    /// take until the next call.
    pub fn set(&mut self, endpoint: IpListenEndpoint, room: usize) {
        match self.room.iter_mut().find(|(e, _)| *e == endpoint) {
            Some(entry) => entry.1 = room,
            None => self.room.push((endpoint, room)),
        }
    }

    /// Forgets the listener on `endpoint` (it closed).
    pub fn remove(&mut self, endpoint: IpListenEndpoint) {
        self.room.retain(|(e, _)| *e != endpoint);
    }

    /// Whether `frame` (an Ethernet frame) may go on to smoltcp: anything
    /// but a SYN to a listener without room. An admitted SYN takes one
    /// place. A frame too short or malformed to parse, or a SYN to no
    /// listener of ours, is let through (smoltcp counts or resets it).
    pub fn admits(&mut self, frame: &[u8]) -> bool {
        let ethertype = match (frame.get(12), frame.get(13)) {
            (Some(&a), Some(&b)) => u16::from_be_bytes([a, b]),
            _ => return true,
        };
        match (ethertype, frame.get(ETH_HEADER..)) {
            (ETHERTYPE_IPV4 | ETHERTYPE_IPV6, Some(ip)) => self.admits_ip(ip),
            _ => true,
        }
    }

    /// [`SynGate::admits`] for a bare IP packet (a link without Ethernet
    /// headers: the loopback).
    pub fn admits_ip(&mut self, packet: &[u8]) -> bool {
        if self.room.is_empty() {
            return true;
        }
        let Some((addr, port)) = syn_target(packet) else {
            return true;
        };
        // The listener smoltcp would hand it to: one bound to the address,
        // else one on the wildcard.
        let exact = self
            .room
            .iter()
            .position(|(e, _)| e.port == port && e.addr == Some(addr));
        let at = exact.or_else(|| {
            self.room
                .iter()
                .position(|(e, _)| e.port == port && e.addr.is_none())
        });
        match at.map(|i| &mut self.room[i].1) {
            None => true,
            Some(0) => false,
            Some(room) => {
                *room -= 1;
                true
            }
        }
    }
}

/// The destination of IP packet `ip` if it is a TCP SYN without ACK (a
/// connection request), over IPv4 or IPv6 without extension headers.
fn syn_target(ip: &[u8]) -> Option<(IpAddress, u16)> {
    let (dst, tcp) = match ip.first()? >> 4 {
        4 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            // A fragment's first bytes are not a TCP header at all.
            let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x1fff;
            if *ip.get(9)? != PROTO_TCP || ihl < 20 || frag != 0 {
                return None;
            }
            let d: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (IpAddress::Ipv4(Ipv4Address::from(d)), ip.get(ihl..)?)
        }
        6 => {
            if *ip.get(6)? != PROTO_TCP {
                return None;
            }
            let d: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (IpAddress::Ipv6(Ipv6Address::from(d)), ip.get(40..)?)
        }
        _ => return None,
    };
    let port = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let flags = *tcp.get(13)?;
    (flags & (TCP_SYN | TCP_ACK) == TCP_SYN).then_some((dst, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame to `dst:port` with `flags`.
    fn v4(dst: [u8; 4], port: u16, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HEADER + 20 + 20];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip = &mut f[ETH_HEADER..];
        ip[0] = 0x45;
        ip[9] = PROTO_TCP;
        ip[16..20].copy_from_slice(&dst);
        ip[20 + 2..20 + 4].copy_from_slice(&port.to_be_bytes());
        ip[20 + 13] = flags;
        f
    }

    fn v6(dst: [u8; 16], port: u16, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HEADER + 40 + 20];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        let ip = &mut f[ETH_HEADER..];
        ip[0] = 0x60;
        ip[6] = PROTO_TCP;
        ip[24..40].copy_from_slice(&dst);
        ip[40 + 2..40 + 4].copy_from_slice(&port.to_be_bytes());
        ip[40 + 13] = flags;
        f
    }

    fn endpoint(addr: Option<[u8; 4]>, port: u16) -> IpListenEndpoint {
        IpListenEndpoint {
            addr: addr.map(|a| IpAddress::Ipv4(Ipv4Address::from(a))),
            port,
        }
    }

    #[test]
    fn admits_as_many_syns_as_there_is_room() {
        let mut g = SynGate::default();
        let a = [10, 0, 0, 2];
        assert!(g.admits(&v4(a, 80, TCP_SYN)));
        g.set(endpoint(Some(a), 80), 2);
        assert!(g.admits(&v4(a, 80, TCP_SYN)));
        // Not a connection request, or not to this listener: through, and
        // no place taken.
        for _ in 0..3 {
            assert!(g.admits(&v4(a, 80, TCP_SYN | TCP_ACK)));
            assert!(g.admits(&v4(a, 80, TCP_ACK)));
            assert!(g.admits(&v4(a, 81, TCP_SYN)));
            assert!(g.admits(&v4([10, 0, 0, 3], 80, TCP_SYN)));
        }
        assert!(g.admits(&v4(a, 80, TCP_SYN)));
        assert!(!g.admits(&v4(a, 80, TCP_SYN)));
        g.set(endpoint(Some(a), 80), 1);
        assert!(g.admits(&v4(a, 80, TCP_SYN)));
        assert!(!g.admits(&v4(a, 80, TCP_SYN)));
        g.remove(endpoint(Some(a), 80));
        assert!(g.admits(&v4(a, 80, TCP_SYN)));
    }

    #[test]
    fn a_wildcard_listener_gates_every_address_and_family() {
        let mut g = SynGate::default();
        g.set(endpoint(None, 443), 0);
        assert!(!g.admits(&v4([192, 168, 1, 1], 443, TCP_SYN)));
        let mut d = [0u8; 16];
        d[15] = 1;
        assert!(!g.admits(&v6(d, 443, TCP_SYN)));
        assert!(g.admits(&v6(d, 443, TCP_SYN | TCP_ACK)));
        // A listener bound to the address comes first.
        g.set(endpoint(Some([192, 168, 1, 1]), 443), 1);
        assert!(g.admits(&v4([192, 168, 1, 1], 443, TCP_SYN)));
        assert!(!g.admits(&v4([192, 168, 1, 1], 443, TCP_SYN)));
        assert!(!g.admits(&v4([192, 168, 1, 2], 443, TCP_SYN)));
    }

    #[test]
    fn malformed_or_foreign_frames_pass_to_smoltcp() {
        let mut g = SynGate::default();
        g.set(endpoint(None, 80), 0);
        let syn = v4([10, 0, 0, 2], 80, TCP_SYN);
        for n in 0..syn.len() {
            // Every truncation that cuts the flags off is let through.
            assert_eq!(g.admits(&syn[..n]), n <= ETH_HEADER + 20 + 13);
        }
        let mut frag = syn.clone();
        frag[ETH_HEADER + 7] = 1;
        assert!(g.admits(&frag));
        let mut udp = syn.clone();
        udp[ETH_HEADER + 9] = 17;
        assert!(g.admits(&udp));
        let mut arp = syn;
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(g.admits(&arp));
    }
}
