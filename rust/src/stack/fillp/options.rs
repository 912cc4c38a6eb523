//! The options of a FillP instance, and how it sizes its datagrams.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::udp;
use crate::fillp::{Config, RateMode};

/// Settings of a FillP instance.
#[derive(Debug, Clone)]
pub struct FillpOptions {
    /// Local IP the UDP sockets bind to (unspecified: all addresses). Also
    /// the address a listener binds to when `listen` is called unbound.
    pub bind_ip: IpAddr,
    /// Settings of every connection (rate mode, windows, timeouts).
    pub connection: Config,
    /// Use UDP segmentation offload where the kernel has it: GSO on send,
    /// GRO on receive (see the module docs of [`crate::stack::fillp`]). On
    /// by default; off sends and receives one datagram per
    /// `sendmmsg`/`recvmmsg` entry.
    pub offload: bool,
    /// Size each connection's datagrams from the route to its peer, as TCP
    /// sizes its segments (see [`path_datagram_size`]); `connection.mtu` is
    /// then the size on routes of 1500 bytes or less and where the route's
    /// MTU cannot be read. On by default; off, every connection offers
    /// `connection.mtu`.
    pub path_mtu: bool,
    /// Connections a listener holds at most; a client beyond them is
    /// refused at `connect()` (ECONNREFUSED).
    pub max_connections: usize,
    /// Client connections of a socket that was not bound share one UDP
    /// socket per local address, told apart by their connection IDs (as
    /// QUIC endpoints do): one fd and one port for all of them, and a
    /// connect makes no socket. Off by default: each gets a UDP port of
    /// its own, so that `(local address, peer address)` names one
    /// connection as in TCP, which servers (and asyncio's tests) key
    /// their clients by.
    pub shared_client_port: bool,
    /// Session resumption (on by default): a listener gives each client a
    /// ticket in its CONN_ACK, and a client that holds a recent one for a
    /// server sends CONN_REQ with it at once, with no INIT/COOKIE round
    /// trip (see [`super::tickets`]). Off, a listener gives none and
    /// refuses them, and clients keep none.
    pub resumption: bool,
}

impl Default for FillpOptions {
    fn default() -> Self {
        FillpOptions {
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            connection: Config::default(),
            offload: true,
            path_mtu: true,
            max_connections: 4096,
            shared_client_port: false,
            resumption: true,
        }
    }
}

impl FillpOptions {
    /// The largest datagram a connection of this instance may use: what a
    /// listener accepts, and what receive buffers must hold.
    pub(super) fn max_datagram(&self) -> u16 {
        if self.path_mtu {
            udp::UDP_PAYLOAD_MAX as u16
        } else {
            self.connection.mtu
        }
    }

    /// With [`FillpOptions::path_mtu`], the datagram size for `route`, the
    /// kernel's route to `peer`; `None` when off or the route has no MTU.
    pub(super) fn size_for(&self, route: Option<udp::Route>, peer: SocketAddr) -> Option<u16> {
        let mtu = route?.mtu.filter(|_| self.path_mtu)?;
        Some(path_datagram_size(mtu, peer.is_ipv6(), self.connection.mtu))
    }
}

/// The FillP datagram size (UDP payload) for a route of MTU `route_mtu`
/// (IP bytes; `v6`: IPv6 headers).
///
/// The whole MTU less the IP and UDP headers, like TCP's MSS, where the route
/// is larger than Ethernet's 1500 (loopback's 64 KiB, jumbo frames): there
/// per-datagram work, not bandwidth, limits a user-space transport. On
/// Ethernet-sized routes `fallback` (the configured size, 1400 by default)
/// caps it, since tunnels further along the path often carry less than the
/// first hop. A datagram that still meets a smaller link is fragmented by
/// the kernel (Linux's default `IP_PMTUDISC_WANT`) once the ICMP
/// "fragmentation needed" arrives.
pub fn path_datagram_size(route_mtu: u32, v6: bool, fallback: u16) -> u16 {
    let headers = if v6 { 40 + 8 } else { 20 + 8 };
    let payload = route_mtu
        .saturating_sub(headers)
        .min(udp::UDP_PAYLOAD_MAX as u32) as u16;
    let size = if route_mtu <= 1500 {
        payload.min(fallback)
    } else {
        payload
    };
    size.max(crate::fillp::wire::MIN_MTU)
}

/// Parses a rate-control name: `bbr`, `fillp` or `fixed`.
pub fn parse_rate_mode(name: &str) -> Option<RateMode> {
    match name {
        "bbr" => Some(RateMode::Bbr),
        "fillp" => Some(RateMode::Fillp),
        "fixed" => Some(RateMode::Fixed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::path_datagram_size;

    #[test]
    fn datagram_size_follows_large_routes_and_keeps_1400_on_ethernet() {
        assert_eq!(path_datagram_size(65535, false, 1400), 65507);
        assert_eq!(path_datagram_size(65535, true, 1400), 65487);
        assert_eq!(path_datagram_size(9000, false, 1400), 8972);
        assert_eq!(path_datagram_size(9000, true, 1400), 8952);
        assert_eq!(path_datagram_size(1500, false, 1400), 1400);
        assert_eq!(path_datagram_size(1420, false, 1400), 1392); // WireGuard
        assert_eq!(path_datagram_size(1280, true, 1400), 1232);
        // Nonsense from the kernel still gives a usable size.
        assert_eq!(path_datagram_size(0, false, 1400), 128);
    }
}
