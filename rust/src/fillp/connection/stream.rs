//! The application's side: writing, reading, closing, and the send-buffer
//! sizing and writer wake-ups that flow control needs.

use bytes::{Bytes, BytesMut};

use super::super::recv_buf::RecvBuf;
use super::super::send_buf::SendBuf;
use super::{CloseReason, Connection, ReadError, State, WriteError};

/// The smallest send buffer [`Connection::send_capacity`] sizes.
const MIN_SEND_BUFFER: usize = 256 << 10;

impl Connection {
    /// Queue bytes for sending; returns how many were accepted.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, WriteError> {
        self.write_with(data.len(), |send, n| send.write(&data[..n]))
    }

    /// [`Connection::write`] of bytes the caller has already copied into a
    /// buffer of its own (outside whatever guards the connection): what is
    /// accepted is kept as a slice of `data`, not copied again.
    pub fn write_shared(&mut self, data: &Bytes) -> Result<usize, WriteError> {
        self.write_with(data.len(), |send, n| send.write_shared(&data.slice(..n)))
    }

    /// An allocation freed by acknowledged data, for the caller to copy its
    /// next [`Connection::write_shared`] into instead of allocating.
    pub fn take_spare_buffer(&mut self) -> Option<BytesMut> {
        self.tx.buf.take_spare()
    }

    /// A write of `len` bytes, of which `put` appends the first `n` (as many
    /// as fit) to the send buffer.
    pub(super) fn write_with(
        &mut self,
        len: usize,
        put: impl FnOnce(&mut SendBuf, usize) -> usize,
    ) -> Result<usize, WriteError> {
        if self.is_closed() || self.local_close {
            return Err(WriteError::Closed);
        }
        if self.tx.buf.is_finished() {
            return Err(WriteError::Finished);
        }
        let room = len.min(self.send_space());
        let n = put(&mut self.tx.buf, room);
        // A write that did not fit hears of space through Writable, whether
        // it took nothing (Blocked) or a part: a non-blocking writer that
        // got a short count waits for writability just the same.
        if n < len {
            self.tx.write_blocked = true;
        }
        if n == 0 && len > 0 {
            return Err(WriteError::Blocked);
        }
        Ok(n)
    }

    /// Read in-order bytes; `Ok(0)` means EOF (the peer's FIN).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, ReadError> {
        self.read_with(buf.len(), |r| r.read(buf))
    }

    /// [`Connection::read`] of up to `max` bytes, moved onto `out` as shared
    /// pieces of the receive buffers instead of copied: the caller copies
    /// them out later, without holding whatever guards the connection.
    pub fn read_shared(&mut self, max: usize, out: &mut Vec<Bytes>) -> Result<usize, ReadError> {
        self.read_with(max, |r| r.read_shared(max, out))
    }

    /// Up to `max` readable bytes pushed onto `out` as shared pieces and
    /// left in the receive buffer (`MSG_PEEK`): the same outcomes as
    /// [`Connection::read_shared`], nothing consumed, no window update.
    pub fn peek_shared(&mut self, max: usize, out: &mut Vec<Bytes>) -> Result<usize, ReadError> {
        if !self.check_readable()? || max == 0 {
            return Ok(0);
        }
        Ok(self.rx.buf.peek_shared(max, out))
    }

    /// Whether a read finds bytes (`false`: the stream is at its end), or
    /// why it cannot run.
    fn check_readable(&mut self) -> Result<bool, ReadError> {
        if self.peer_reset {
            return Err(ReadError::Reset);
        }
        if self.local_close || self.state == State::Closed && !self.rx.buf.at_eof() {
            return Err(ReadError::Closed);
        }
        if self.rx.buf.readable() == 0 {
            if self.rx.buf.at_eof() {
                return Ok(false);
            }
            self.rx.readable_signalled = false;
            return Err(ReadError::Blocked);
        }
        Ok(true)
    }

    /// A read of up to `max` bytes, taken from the receive buffer by `take`.
    pub(super) fn read_with(
        &mut self,
        max: usize,
        take: impl FnOnce(&mut RecvBuf) -> usize,
    ) -> Result<usize, ReadError> {
        if !self.check_readable()? || max == 0 {
            return Ok(0);
        }
        let n = take(&mut self.rx.buf);
        if self.rx.buf.at_eof() {
            // Reading the last byte may complete the close; timers run it.
            self.finish_pending = true;
        }
        self.stats.bytes_read += n as u64;
        if self.rx.buf.readable() == 0 {
            self.rx.readable_signalled = false;
        }
        // Tell a sender that may be held by our window that it grew, as
        // TCP does once the window would double: data that stopped coming
        // brings no PACK, and the sender would wait for its zero-window
        // probe (an RTO, 200 ms at least; measured in the demo: a 64 MiB
        // loopback transfer to a hashing reader took 0.25 s, not 0.06, in
        // about one run of four). Two datagrams at least: no silly windows.
        let w = u64::from(self.config.recv_window);
        let known = self.rx.limit_sent.saturating_sub(self.rx.buf.cum());
        let growth = self.rx.buf.limit().saturating_sub(self.rx.limit_sent);
        let least = 2 * u64::from(self.mtu);
        if known < w / 2 && growth >= known.max(least) {
            self.rx.pack_now = true;
        }
        Ok(n)
    }

    /// Half-close: send FIN after the buffered data. Reading continues.
    pub fn shutdown_write(&mut self) {
        if !self.is_closed() {
            self.tx.buf.finish();
        }
    }

    /// Graceful close: FIN our side and discard whatever still arrives. The
    /// connection reports [`Event::Closed`](super::Event::Closed) once both FINs are acknowledged.
    pub fn close(&mut self) {
        self.shutdown_write();
        self.local_close = true;
        self.rx.buf.discard();
        self.finish_pending = true;
    }

    /// Abort: send RST and close at once.
    pub fn reset(&mut self) {
        if self.state == State::Closed {
            return;
        }
        self.send_reset = self.remote_cid != 0;
        self.enter_closed(CloseReason::LocalReset);
    }

    /// In-order bytes `read` would return now (for readiness reporting).
    pub fn readable_bytes(&self) -> usize {
        self.rx.buf.readable()
    }

    /// The peer's FIN has been reached by `read` (the next read is EOF).
    pub fn at_eof(&self) -> bool {
        self.rx.buf.at_eof()
    }

    /// Send-buffer space: how much `write` would take now.
    pub fn send_space(&self) -> usize {
        self.send_capacity().saturating_sub(self.tx.buf.unacked())
    }

    /// The send buffer's size now: three times what may be in flight, plus
    /// what loss holds back (sent data neither in flight nor acknowledged
    /// in order: SACKed, or waiting to be resent), at least
    /// 256 KiB, at most [`Config::send_buffer`](super::Config::send_buffer) (as Linux grows
    /// a TCP socket's send buffer with its congestion window). Three, not
    /// Linux's two: a writer is woken at half of it (less the held-back
    /// part), and with two a flight at its cap left no unsent data by the
    /// time the writer was woken. A short, fast path keeps a small buffer
    /// the caches hold; over loopback a full 16 MiB buffer made every copy
    /// in and out of it miss them (measured: 7.8 Gbit/s against 9.9 with
    /// 256 KiB). Without the held-back part, at 20% loss and 200 ms the
    /// sender ran out of new data behind its holes (goodput 0.66 of the
    /// link against 0.76).
    pub fn send_capacity(&self) -> usize {
        let held = self.send_held();
        let want = self.send_flight().saturating_mul(3).saturating_add(held);
        let want = usize::try_from(want).unwrap_or(usize::MAX);
        want.max(MIN_SEND_BUFFER).min(self.tx.buf.capacity())
    }

    /// Sent bytes that loss holds back: neither in flight nor acknowledged
    /// in order (SACKed, or waiting to be resent).
    pub(super) fn send_held(&self) -> u64 {
        self.tx.buf.sent_span().saturating_sub(self.pipe.bytes)
    }

    /// Free space at which a writer that came up short is woken: half the
    /// buffer, less what loss holds back. Half of all of it would wait for
    /// the holes to be repaired, and a lossy long path ran out of new data
    /// meanwhile (measured over the emulated 200 ms path at 5% loss: 63
    /// Mbit/s against 82 with a 16 MiB buffer).
    pub(super) fn send_wake_space(&self) -> usize {
        let held = usize::try_from(self.send_held()).unwrap_or(usize::MAX);
        (self.send_capacity().saturating_sub(held) / 2).max(1)
    }

    /// What the buffer must keep ready to send: the in-flight limit, or
    /// what the pacing rate keeps in flight over one smoothed RTT if that is
    /// less (modes without an in-flight cap, and BBR before its first RTT
    /// sample, when it has none).
    pub(super) fn send_flight(&self) -> u64 {
        let round = (self.tx.cc.pacing_rate() as f64 * self.rtt.srtt().as_secs_f64()) as u64;
        self.inflight_limit()
            .min(round.saturating_add(self.report_cadence()))
    }

    /// Whether a writer should try `write` (readiness for `POLLOUT`). Once a
    /// write came up short, not until half the buffer is free again (the
    /// kernel's `sk_stream_wspace` rule), so a bulk writer wakes once per
    /// half buffer rather than once per PACK. The connection decides this
    /// when a PACK frees space, not its user later: the buffer's size moves
    /// with the rate, and a threshold checked again at another moment could
    /// miss the one [`Event::Writable`](super::Event::Writable) and leave a writer asleep for good.
    /// (If the buffer shrank under a writer that had not come up short, a
    /// write may still find no room: it gets [`WriteError::Blocked`] and
    /// then waits for the event.)
    pub fn is_writable(&self) -> bool {
        !self.tx.write_blocked
    }

    /// Whether written data waits to be sent (new, or to be resent) and the
    /// peer's window lets it go.
    pub fn has_unsent(&self) -> bool {
        self.tx.buf.has_pending(self.tx.peer_limit)
    }

    /// Bytes written and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.tx.buf.unacked()
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::wire::Body;
    use super::super::testing::*;
    use super::super::{Config, Event};
    use super::*;

    #[test]
    fn the_send_buffer_is_sized_from_the_path() {
        let clk = Clock::new();
        // 1.25 MB/s x 20 ms = 25 kB a round, plus the report cadence
        // (12.5 kB an interval + two 32-packet quanta), three times over.
        let mut s = server(fixed(1_250_000), clk.t0, 1 << 20);
        let want = 3 * (25_000 + 12_500 + 2 * 32 * 1400);
        assert_eq!(s.send_capacity(), want);
        assert_eq!(s.write(&vec![0; 1 << 20]), Ok(want));
        assert!(!s.is_writable());
        assert_eq!((s.send_space(), s.unacked()), (0, want));
        assert_eq!(s.write(&[0; 10]), Err(WriteError::Blocked));
        // At least 256 KiB, ...
        let small = Config {
            pack_every: 8,
            ..fixed(125_000)
        };
        assert_eq!(
            server(small, clk.t0, 1 << 20).send_capacity(),
            MIN_SEND_BUFFER
        );
        // ... at most the configured buffer.
        let capped = Config {
            send_buffer: 100_000,
            ..fixed(1_250_000)
        };
        assert_eq!(server(capped, clk.t0, 1 << 20).send_capacity(), 100_000);
    }

    #[test]
    fn writes_after_shutdown_or_close_fail() {
        let clk = Clock::new();
        let mut s = server(Config::default(), clk.t0, 1 << 20);
        assert_eq!(s.write(b"ab"), Ok(2));
        s.shutdown_write();
        assert_eq!(s.write(b"c"), Err(WriteError::Finished));
        // The FIN rides on the last data.
        let sent = drain(&mut s, clk.t0);
        assert_eq!(data_of(&sent), [(0, 0, 2)]);
        assert!(matches!(parse(sent.last().unwrap()).body, Body::Data(d) if d.fin));
        s.close();
        assert_eq!(s.write(b"c"), Err(WriteError::Closed));
        assert_eq!(s.read(&mut [0; 4]), Err(ReadError::Closed));
    }

    #[test]
    fn reads_report_why_there_is_nothing() {
        let clk = Clock::new();
        let mut s = server(Config::default(), clk.t0, 1 << 20);
        assert_eq!(s.read(&mut [0; 4]), Err(ReadError::Blocked));
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, b"abcdef", false, 0));
        let mut buf = [0; 4];
        assert_eq!(s.read(&mut buf), Ok(4));
        assert_eq!(&buf, b"abcd");
        let mut pieces = Vec::new();
        assert_eq!(s.read_shared(100, &mut pieces), Ok(2));
        assert_eq!(pieces.concat(), b"ef");
        assert_eq!(s.stats().bytes_read, 6);
        s.handle_datagram(
            clk.at(2),
            &emit(super::super::super::wire::Repr {
                dst_cid: SERVER_CID,
                body: Body::Reset,
            }),
        );
        assert_eq!(s.read(&mut buf), Err(ReadError::Reset));
        assert!(s.peer_reset() && s.is_closed());
    }

    /// A server with an 8 KiB receive window that the client has filled.
    fn full_window(clk: &Clock) -> Connection {
        let cfg = Config {
            recv_window: 8192,
            ..Config::default()
        };
        let mut s = server(cfg, clk.t0, 1 << 20);
        drain(&mut s, clk.t0);
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, &[0; 8192], false, 0));
        s
    }

    #[test]
    fn reading_reopens_a_full_window_with_a_pack_at_once() {
        let clk = Clock::new();
        let mut s = full_window(&clk);
        let last = packs_of(&drain(&mut s, clk.at(1)));
        assert_eq!((last[0].cum_ack, last[0].window), (8192, 0));
        // Nothing more is due for a while ...
        assert!(drain(&mut s, clk.at(12)).is_empty());
        // ... but a read that reopens the window tells the sender at once.
        let mut buf = vec![0; 8192];
        assert_eq!(s.read(&mut buf), Ok(8192));
        let p = packs_of(&drain(&mut s, clk.at(12)));
        assert_eq!((p.len(), p[0].window), (1, 8192));
    }

    #[test]
    fn a_small_read_does_not_reopen_the_window() {
        let clk = Clock::new();
        let mut s = full_window(&clk);
        drain(&mut s, clk.at(1));
        // Less than two datagrams of window: no PACK just for that.
        assert_eq!(s.read(&mut [0; 2000]), Ok(2000));
        assert!(drain(&mut s, clk.at(2)).is_empty());
    }

    /// An established server connection the application has just closed.
    fn closed_server() -> (Clock, Connection) {
        let clk = Clock::new();
        let mut s = server(Config::default(), clk.t0, 1 << 20);
        drain(&mut s, clk.t0);
        events(&mut s);
        s.close();
        (clk, s)
    }

    #[test]
    fn close_finishes_once_both_fins_are_done() {
        let (clk, mut s) = closed_server();
        assert_eq!(data_of(&drain(&mut s, clk.t0)), [(0, 0, 0)]);
        // The peer's bare FIN: nothing to read, nothing lost.
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, b"", true, 0));
        assert_eq!(events(&mut s), [Event::Finished]);
        let fin_ack = Report {
            fin: true,
            ..Report::default()
        };
        s.handle_datagram(clk.at(20), &pack(SERVER_CID, fin_ack));
        assert_eq!(
            events(&mut s),
            [Event::Closed {
                reason: CloseReason::Finished
            }]
        );
    }

    #[test]
    fn data_after_close_resets_as_tcp_does() {
        let (clk, mut s) = closed_server();
        drain(&mut s, clk.t0);
        s.handle_datagram(clk.at(1), &data(SERVER_CID, 0, 0, b"late", false, 0));
        assert_eq!(s.readable_bytes(), 0);
        assert_eq!(s.close_reason(), Some(CloseReason::LocalReset));
        let sent = drain(&mut s, clk.at(1));
        assert!(sent.iter().any(|d| matches!(parse(d).body, Body::Reset)));
    }
}
