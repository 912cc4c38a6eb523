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

    /// A read of up to `max` bytes, taken from the receive buffer by `take`.
    pub(super) fn read_with(
        &mut self,
        max: usize,
        take: impl FnOnce(&mut RecvBuf) -> usize,
    ) -> Result<usize, ReadError> {
        if self.peer_reset {
            return Err(ReadError::Reset);
        }
        if self.local_close || self.state == State::Closed && !self.rx.buf.at_eof() {
            return Err(ReadError::Closed);
        }
        if self.rx.buf.readable() == 0 {
            if self.rx.buf.at_eof() {
                return Ok(0);
            }
            self.rx.readable_signalled = false;
            return Err(ReadError::Blocked);
        }
        if max == 0 {
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
    /// connection reports [`Event::Closed`] once both FINs are acknowledged.
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
    /// 256 KiB, at most [`Config::send_buffer`] (as Linux grows
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
    /// miss the one [`Event::Writable`] and leave a writer asleep for good.
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
