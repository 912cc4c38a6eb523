//! Counters, estimates and memory accounting.

use std::time::Duration;

use super::{Connection, Event};

/// Counters and estimates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ConnectionStats {
    /// Datagrams sent.
    pub packets_sent: u64,
    /// Datagrams accepted.
    pub packets_received: u64,
    /// Bytes sent, UDP payload.
    pub bytes_sent: u64,
    /// Bytes received, UDP payload.
    pub bytes_received: u64,
    /// Stream bytes acknowledged by the peer.
    pub bytes_acked: u64,
    /// Stream bytes delivered to the application.
    pub bytes_read: u64,
    /// DATA packets that resent a segment.
    pub retransmissions: u64,
    /// Retransmissions caused by an RTO.
    pub rto_count: u64,
    /// Tail-loss probes sent.
    pub tail_probes: u64,
    /// NACK packets sent.
    pub nacks_sent: u64,
    /// NACK packets received.
    pub nacks_received: u64,
    /// PACK packets sent.
    pub packs_sent: u64,
    /// PACK packets received.
    pub packs_received: u64,
    /// Datagrams dropped as malformed or out of place.
    pub dropped: u64,
    /// DATA payload bytes received again.
    pub duplicate_bytes: u64,
    /// Largest datagram this end sends (UDP payload bytes): the negotiated
    /// size, or less where its own route carries less.
    pub mtu: u16,
    /// Smoothed RTT.
    pub rtt: Duration,
    /// Minimum RTT.
    pub min_rtt: Duration,
    /// Current pacing rate, bytes/s.
    pub send_rate: u64,
    /// Latest delivery-rate sample, bytes/s.
    pub delivery_rate: u64,
    /// Loss reported by the peer (smoothed), 0..=1.
    pub loss: f64,
}

impl Connection {
    /// Approximate heap use, bytes (buffers, maps, controller).
    pub fn heap_bytes(&self) -> usize {
        self.tx.buf.heap_bytes()
            + self.rx.buf.heap_bytes()
            + self.pipe.heap_bytes()
            + self.rx.tracking_heap_bytes()
            + self.events.capacity() * std::mem::size_of::<Event>()
            + 512
    }

    /// Counters and estimates.
    pub fn stats(&self) -> ConnectionStats {
        let mut s = self.stats;
        s.mtu = self.send_mtu();
        s.rtt = self.rtt.srtt();
        s.min_rtt = self.rtt.min();
        s.send_rate = self.tx.cc.pacing_rate();
        s
    }
}
