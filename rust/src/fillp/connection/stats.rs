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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::Config;

    #[test]
    fn datagrams_are_counted_both_ways() {
        let clk = Clock::new();
        let mut s = server(fixed(125_000_000), clk.t0, 1 << 20);
        s.write(&[0; 5000]).unwrap();
        let sent = drain(&mut s, clk.t0);
        let d = data(SERVER_CID, 0, 0, b"0123456789", false, 0);
        s.handle_datagram(clk.at(1), &d);
        let st = s.stats();
        let bytes: usize = sent.iter().map(Vec::len).sum();
        assert_eq!(
            (st.packets_sent, st.bytes_sent),
            (sent.len() as u64, bytes as u64)
        );
        assert_eq!(
            (st.packets_received, st.bytes_received),
            (1, d.len() as u64)
        );
        // The estimates come from the parts that own them.
        assert_eq!((st.mtu, st.rtt, st.min_rtt), (1400, ms(HS_RTT), ms(HS_RTT)));
        assert_eq!(st.send_rate, 125_000_000);
    }

    #[test]
    fn heap_use_grows_with_buffered_data_and_is_given_back() {
        let clk = Clock::new();
        let mut s = server(Config::default(), clk.t0, 1 << 20);
        let idle = s.heap_bytes();
        assert!(idle < 1024, "{idle}");
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, &[0; 1000], false, 0));
        let full = s.heap_bytes();
        assert!(full >= idle + 1000);
        assert_eq!(s.read(&mut [0; 1000]), Ok(1000));
        // Idle for a keepalive interval: the drained queues are released
        // (the PACK rate history, a few entries, stays).
        drain(&mut s, clk.at(1));
        let read = s.heap_bytes();
        s.handle_timeout(clk.at(5000));
        assert!(s.heap_bytes() < read, "{} of {read}", s.heap_bytes());
        assert!(
            s.heap_bytes() + 1000 <= full,
            "{} of {full}",
            s.heap_bytes()
        );
    }
}
