//! Checksum and segmentation offload over a TAP: the virtio-net header that
//! precedes every frame on an offload device, and the checksum work it moves
//! between smoltcp and the kernel. Sans-IO: it reads and edits frames in
//! buffers; the device does the reads and writes.
//!
//! * **Sending.** smoltcp leaves TCP checksums to the device and, with
//!   segmentation offload, builds segments of up to 64 KiB with the MSS it
//!   wants them cut to ([`PacketMeta`](smoltcp::phy::PacketMeta)).
//!   [`tx_header`] writes the pseudo-header sum into the TCP checksum field
//!   and returns the header that tells the kernel where to finish it
//!   (`NEEDS_CSUM`) and how to cut the segment (`gso_type`, `gso_size`), as
//!   a virtio guest does. The wire keeps the TAP's MTU.
//! * **Receiving.** The kernel hands over TCP super-frames and frames whose
//!   TCP or UDP checksum is only partial (`NEEDS_CSUM`: made on this host)
//!   or already checked (`DATA_VALID`). smoltcp cannot tell those from bad
//!   ones, so it checks no TCP or UDP checksum; [`rx_ok`] checks the frames
//!   with neither flag (they came from elsewhere unchecked, say forwarded
//!   from a link emulator) in software.
//!
//! The header's fields are in the host's byte order (the "legacy" virtio
//! layout, the TAP default).

use smoltcp::wire::{
    checksum, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet,
    TcpPacket, UdpPacket,
};

use super::device::ETH_HEADER;

/// Bytes of `struct virtio_net_hdr` before every frame.
pub const VNET_HDR_LEN: usize = 10;

/// Largest frame on an offload device: an Ethernet header and the largest
/// IPv4 packet (a TCP super-frame either way).
pub const MAX_FRAME: usize = ETH_HEADER + 65535;

/// The checksum field from `csum_start + csum_offset` holds only the
/// pseudo-header sum; the kernel (or we) must finish it.
const F_NEEDS_CSUM: u8 = 1;
/// The kernel checked the checksum already.
const F_DATA_VALID: u8 = 2;
/// `gso_type` values: cut a TCP super-frame over IPv4 or IPv6.
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
/// Where the checksum sits in a TCP header.
const TCP_CSUM_OFFSET: u16 = 16;

/// `struct virtio_net_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `NEEDS_CSUM`, `DATA_VALID`.
    pub flags: u8,
    /// How to segment the frame (0: not at all).
    pub gso_type: u8,
    /// Length of the headers each segment repeats.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts, from the frame's first byte.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// The header in `b`.
    pub fn decode(b: &[u8; VNET_HDR_LEN]) -> VnetHdr {
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        }
    }

    /// The header as the kernel reads it.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }
}

/// The transport segment of a frame: where it starts, how long it is, its
/// protocol and the addresses its checksum covers.
struct Transport {
    start: usize,
    len: usize,
    proto: IpProtocol,
    src: IpAddress,
    dst: IpAddress,
}

/// Finds the TCP or UDP segment in an Ethernet frame; `None` for anything
/// else (other protocols, IPv4 fragments, IPv6 extension headers, frames
/// too short to parse: smoltcp judges those itself).
fn transport(frame: &[u8]) -> Option<Transport> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = &frame[ETH_HEADER..];
    let (start, len, proto, src, dst) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let p = Ipv4Packet::new_checked(ip).ok()?;
            if p.more_frags() || p.frag_offset() != 0 {
                return None;
            }
            let hl = usize::from(p.header_len());
            let total = usize::from(p.total_len());
            let (src, dst) = (p.src_addr().into(), p.dst_addr().into());
            (hl, total.checked_sub(hl)?, p.next_header(), src, dst)
        }
        EthernetProtocol::Ipv6 => {
            let p = Ipv6Packet::new_checked(ip).ok()?;
            let (src, dst) = (p.src_addr().into(), p.dst_addr().into());
            let len = usize::from(p.payload_len());
            (40, len, p.next_header(), src, dst)
        }
        _ => return None,
    };
    if !matches!(proto, IpProtocol::Tcp | IpProtocol::Udp) || ip.len() < start + len {
        return None;
    }
    Some(Transport {
        start: ETH_HEADER + start,
        len,
        proto,
        src,
        dst,
    })
}

/// Whether a received frame may go to smoltcp: its header vouches for its
/// transport checksum, or the checksum is right, or it carries no TCP or
/// UDP at all.
pub fn rx_ok(hdr: &VnetHdr, frame: &[u8]) -> bool {
    if hdr.flags & (F_NEEDS_CSUM | F_DATA_VALID) != 0 {
        return true;
    }
    let Some(t) = transport(frame) else {
        return true;
    };
    let seg = &frame[t.start..t.start + t.len];
    match t.proto {
        IpProtocol::Tcp => {
            TcpPacket::new_checked(seg).is_ok_and(|p| p.verify_checksum(&t.src, &t.dst))
        }
        _ => UdpPacket::new_checked(seg).is_ok_and(|p| p.verify_checksum(&t.src, &t.dst)),
    }
}

/// Prepares a frame smoltcp built for sending: a TCP segment gets the
/// pseudo-header sum in its checksum field and a header asking the kernel
/// to finish it, and, when `segment` names the MSS smoltcp wants, to cut
/// the segment into pieces of that size. Other frames are complete already
/// and go with an empty header.
pub fn tx_header(frame: &mut [u8], segment: Option<u16>) -> VnetHdr {
    let Some(t) = transport(frame) else {
        return VnetHdr::default();
    };
    if t.proto != IpProtocol::Tcp || t.len < 20 {
        return VnetHdr::default();
    }
    let partial = checksum::pseudo_header(&t.src, &t.dst, IpProtocol::Tcp, t.len as u32);
    let at = t.start + usize::from(TCP_CSUM_OFFSET);
    frame[at..at + 2].copy_from_slice(&partial.to_be_bytes());
    let mut hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: t.start as u16,
        csum_offset: TCP_CSUM_OFFSET,
        ..VnetHdr::default()
    };
    if let Some(mss) = segment {
        let tcp_header = usize::from(frame[t.start + 12] >> 4) * 4;
        hdr.gso_type = match t.src {
            IpAddress::Ipv4(_) => GSO_TCPV4,
            IpAddress::Ipv6(_) => GSO_TCPV6,
        };
        hdr.gso_size = mss;
        hdr.hdr_len = (t.start + tcp_header) as u16;
    }
    hdr
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetRepr, Ipv4Address, Ipv4Repr, Ipv6Address, Ipv6Repr, TcpControl,
        TcpRepr, TcpSeqNumber, UdpRepr,
    };

    fn tcp_repr(payload: &[u8]) -> TcpRepr<'_> {
        TcpRepr {
            src_port: 40000,
            dst_port: 5201,
            control: TcpControl::Psh,
            seq_number: TcpSeqNumber(7),
            ack_number: Some(TcpSeqNumber(9)),
            window_len: 512,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        }
    }

    /// An Ethernet frame with a TCP segment carrying `payload`, checksums
    /// as `caps` says; IPv6 when `v6`.
    fn tcp_frame(payload: &[u8], v6: bool, caps: &ChecksumCapabilities) -> Vec<u8> {
        let tcp = tcp_repr(payload);
        let ip_len = if v6 { 40 } else { 20 };
        let mut f = vec![0; ETH_HEADER + ip_len + tcp.buffer_len()];
        let eth = EthernetRepr {
            src_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            dst_addr: EthernetAddress([2, 0, 0, 0, 0, 2]),
            ethertype: if v6 {
                EthernetProtocol::Ipv6
            } else {
                EthernetProtocol::Ipv4
            },
        };
        eth.emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
        let (src, dst): (IpAddress, IpAddress) = if v6 {
            let r = Ipv6Repr {
                src_addr: Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 2),
                dst_addr: Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 1),
                next_header: IpProtocol::Tcp,
                payload_len: tcp.buffer_len(),
                hop_limit: 64,
            };
            r.emit(&mut Ipv6Packet::new_unchecked(&mut f[ETH_HEADER..]));
            (r.src_addr.into(), r.dst_addr.into())
        } else {
            let r = Ipv4Repr {
                src_addr: Ipv4Address::new(10, 77, 0, 2),
                dst_addr: Ipv4Address::new(10, 77, 0, 1),
                next_header: IpProtocol::Tcp,
                payload_len: tcp.buffer_len(),
                hop_limit: 64,
            };
            r.emit(
                &mut Ipv4Packet::new_unchecked(&mut f[ETH_HEADER..]),
                &ChecksumCapabilities::default(),
            );
            (r.src_addr.into(), r.dst_addr.into())
        };
        let start = ETH_HEADER + ip_len;
        tcp.emit(
            &mut TcpPacket::new_unchecked(&mut f[start..]),
            &src,
            &dst,
            caps,
        );
        f
    }

    /// Finishes a partial checksum as the kernel does: the sum from
    /// `csum_start` to the end, complemented, at `csum_offset`.
    fn finish(hdr: &VnetHdr, f: &mut [u8]) {
        let start = usize::from(hdr.csum_start);
        let sum = !checksum::data(&f[start..]);
        let at = start + usize::from(hdr.csum_offset);
        f[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }

    fn tcp_ok(f: &[u8], v6: bool) -> bool {
        let t = transport(f).unwrap();
        assert_eq!(t.start, ETH_HEADER + if v6 { 40 } else { 20 });
        TcpPacket::new_checked(&f[t.start..])
            .unwrap()
            .verify_checksum(&t.src, &t.dst)
    }

    #[test]
    fn header_round_trips() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 74,
            gso_size: 1428,
            csum_start: 54,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::decode(&h.encode()), h);
    }

    #[test]
    fn a_partial_checksum_the_kernel_finishes_is_right() {
        for v6 in [false, true] {
            // Odd length: the last byte is padded, as RFC 1071 says.
            let payload: Vec<u8> = (0..1001u32).map(|i| (i * 7) as u8).collect();
            let mut f = tcp_frame(&payload, v6, &ChecksumCapabilities::ignored());
            let hdr = tx_header(&mut f, None);
            assert_eq!(hdr.flags, F_NEEDS_CSUM);
            assert_eq!((hdr.gso_type, hdr.gso_size), (0, 0));
            assert!(!tcp_ok(&f, v6), "partial only");
            finish(&hdr, &mut f);
            assert!(tcp_ok(&f, v6));
        }
    }

    #[test]
    fn a_super_frame_asks_for_segments_of_the_mss() {
        for (v6, gso) in [(false, GSO_TCPV4), (true, GSO_TCPV6)] {
            let payload = vec![0xab; 60000];
            let mut f = tcp_frame(&payload, v6, &ChecksumCapabilities::ignored());
            let hdr = tx_header(&mut f, Some(1448));
            assert_eq!((hdr.gso_type, hdr.gso_size), (gso, 1448));
            assert_eq!(
                usize::from(hdr.hdr_len),
                ETH_HEADER + if v6 { 60 } else { 40 }
            );
        }
    }

    #[test]
    fn received_frames_are_checked_unless_the_header_vouches() {
        let good = tcp_frame(b"hello", false, &ChecksumCapabilities::default());
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        let none = VnetHdr::default();
        assert!(rx_ok(&none, &good));
        assert!(!rx_ok(&none, &bad));
        for flags in [F_NEEDS_CSUM, F_DATA_VALID] {
            let vouched = VnetHdr {
                flags,
                ..VnetHdr::default()
            };
            assert!(rx_ok(&vouched, &bad));
        }
        // Not TCP or UDP, or too short to parse: smoltcp's to judge.
        assert!(rx_ok(&none, &good[..ETH_HEADER + 10]));
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(rx_ok(&none, &arp));
    }

    #[test]
    fn udp_checksums_are_checked_too() {
        let udp = UdpRepr {
            src_port: 53,
            dst_port: 4000,
        };
        let payload = b"datagram";
        let src = Ipv4Address::new(10, 77, 0, 1);
        let dst = Ipv4Address::new(10, 77, 0, 2);
        let mut f = vec![0; ETH_HEADER + 20 + 8 + payload.len()];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Udp,
            payload_len: 8 + payload.len(),
            hop_limit: 64,
        }
        .emit(
            &mut Ipv4Packet::new_unchecked(&mut f[ETH_HEADER..]),
            &ChecksumCapabilities::default(),
        );
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut f[ETH_HEADER + 20..]),
            &src.into(),
            &dst.into(),
            payload.len(),
            |b| b.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        );
        let none = VnetHdr::default();
        assert!(rx_ok(&none, &f));
        *f.last_mut().unwrap() ^= 0x40;
        assert!(!rx_ok(&none, &f));
        // UDP is complete when smoltcp sends it: no header needed.
        assert_eq!(tx_header(&mut f, None), VnetHdr::default());
    }
}
