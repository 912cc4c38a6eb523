//! A FillP-style reliable byte stream over UDP: the sans-IO protocol core.
//!
//! FillP (as open-sourced in OpenHarmony's dsoftbus) fills long, lossy paths
//! where TCP collapses: the receiver reports what it got and at what rate,
//! the sender paces at what the path delivers and repairs losses from
//! negative acknowledgements instead of shrinking its window. This module is
//! that protocol with five changes: several SACK ranges per report, a
//! BBR-like default rate control that backs off only on heavy loss or
//! growing delay, a tail-loss probe, connection IDs and a versioned header.
//!
//! # Layout
//!
//! | file | job |
//! |---|---|
//! | [`wire`] | packet views ([`wire::Packet`]) and validated [`wire::Repr`]s |
//! | [`cookie`] | SHA-256 / HMAC and the stateless handshake cookie |
//! | [`cc`] | the [`cc::RateController`] trait, factory, `bbr`, `fillp`, `fixed` |
//! | [`pacer`] | token-bucket pacing |
//! | [`rtt`] | RTT estimation and the RTO |
//! | [`byte_queue`] | stream bytes as shared pieces, sliced into datagrams without a copy |
//! | [`send_buf`] | unacknowledged data, segments, retransmission queue |
//! | [`recv_buf`] | reassembly and the receive window |
//! | [`connection`] | the per-connection state machine, one file per job (handshake, receive, recovery, timers, transmit, ...) |
//! | `train` | the first flight's packet train and its dispersion estimate (private) |
//! | [`endpoint`] | demultiplexing by connection ID, the server handshake |
//! | [`discovery`] | DISCOVER / OFFER: what a listener accepts on, without amplification |
//! | `sim` | deterministic simulated links and a client/server `Pair` (hidden; tests and the `sim` feature only) |
//!
//! Nothing here opens a socket, reads a clock, spawns a thread or uses
//! `unsafe`; time is always an [`std::time::Instant`] passed in. The UDP
//! driver is a separate layer.
//!
//! # Protocol
//!
//! * **Handshake** (4 packets). The client sends INIT (padded to 64 bytes)
//!   with its connection ID and proposed MTU, window and rate mode. The server
//!   answers COOKIE: a server connection ID, the agreed MTU (the smaller) and
//!   mode (the client's, unless the server forces one) and a MAC over client
//!   address, both connection IDs, parameters and the time; it keeps **no
//!   state**. The client echoes it in CONN_REQ; only a valid, fresh (< 10 s)
//!   cookie from the same address creates a server connection, which answers
//!   CONN_ACK (again for every retransmitted CONN_REQ) and may send data at
//!   once. Any DATA or PACK from the server also completes the client's
//!   handshake.
//! * **Early data** (third flight). With the COOKIE the client knows the
//!   server's connection ID, MTU, mode and window, so it sends DATA right
//!   behind its CONN_REQ instead of waiting a round for CONN_ACK: at most one
//!   round at its pacing rate (the srtt is the COOKIE exchange's), at least
//!   40 packets. The server drops DATA for a connection ID it does not have
//!   (counted, never answered), so DATA that overtakes its CONN_REQ, or
//!   follows a lost one, is lost like any packet: the server's first PACK
//!   and NACK name the gap, or, if nothing got through, the client's
//!   retransmission timers (which run from the end of the handshake, not
//!   during it: the CONN_REQ retransmission is the probe then) resend it. A
//!   server that refuses a bad or stale cookie keeps no state and sends
//!   nothing; the client stops after its first round and closes with
//!   `HandshakeTimeout`. One at its connection limit answers a valid
//!   CONN_REQ with RST (the cookie proved the address), so the client's
//!   connect fails with `PeerReset` at once. The MAC secret
//!   rotates every 60 s of the endpoint's clock; a cookie is checked with
//!   the secret of the period it was minted in, so it stays good across one
//!   rotation and never across two ([`cookie`] has the scheme, the driver
//!   feeds it OS randomness through
//!   [`endpoint::Endpoint::supply_cookie_secret`]).
//! * **Resumption** (2 packets). Each CONN_ACK carries a ticket: a MAC over
//!   the client's IP address (no port, no connection IDs) and the time,
//!   with the cookie secret under another label. A client that connects to
//!   the same server again within 30 s sends CONN_REQ with the ticket at
//!   once, to connection ID 0, proposing the MTU, window and mode it agreed
//!   last time; a valid ticket under 60 s old proves the address as a cookie
//!   does, so the server still keeps no state before it. The server's
//!   connection ID is derived from the request (keyed hash of address,
//!   client ID and ticket time), so a retransmitted CONN_REQ finds the
//!   connection it made; the CONN_ACK tells the client the ID. A ticket the
//!   server will not take (bad MAC, expired, resumption off, parameters it
//!   would not agree to now, a full table) is answered with RST, smaller than
//!   the CONN_REQ, and the client starts over with an INIT: a round trip
//!   lost, never the connection. Like a TCP Fast Open cookie, a ticket is
//!   replayable from the client's address for its lifetime: a replayed one
//!   makes a connection that carries none of the client's data and ends at
//!   the idle timeout.
//! * **DATA** carries a per-transmission packet number, the byte offset and a
//!   timestamp. A retransmission resends the same segment under a new packet
//!   number, so a packet number always names one transmission.
//! * **PACK** is sent every `pack_interval` (10 ms) or `pack_every` (32)
//!   packets while data arrives, and at once on FIN, duplicates, keepalives
//!   and window reopening: cumulative ack, up to 16 SACK ranges, highest
//!   packet number with its echoed timestamp and the ack delay, total bytes
//!   received, receive rate, interval loss and the receive window.
//! * **NACK** lists missing packet-number ranges once a gap is older than the
//!   reordering delay (srtt/8 within 2..50 ms), repeated at most three times.
//! * **Retransmission**, always ahead of new data, is triggered by a NACK (for
//!   the named transmission only), by an un-SACKed hole below SACKed data
//!   older than 1.25 srtt + pack interval, by a tail-loss probe (the last
//!   segment, 2 srtt + pack interval after the last progress) and, last, by
//!   the RTO (srtt + 4 rttvar within 200 ms..2 s, doubling, capped at 2 s).
//!   A segment lost again after a retransmission is sent twice: at 20% loss
//!   the tail of repeated losses otherwise holds the cumulative ack (and the
//!   window) back by several RTTs.
//! * **First-flight train**: a controller may ask for its first packets to
//!   leave back to back (`bbr`: 33); the spacing at which the peer's PACKs
//!   report them measures the bottleneck one RTT after the first data
//!   (`train` module). The first 64 DATA packets a receiver gets are
//!   acknowledged every 8 instead of every `pack_every` (as TCP's quick-ack)
//!   so one lost PACK does not void that measurement.
//! * **Rate control**: see [`cc`]; sending is paced and, for `bbr`, capped in
//!   flight; flow control follows the receiver's window (a KEEPALIVE every
//!   RTO probes a zero window and is answered by a PACK).
//! * **Closing**: `shutdown_write` sends FIN after the data (half-close; the
//!   peer reads EOF). When our FIN is acknowledged and we have read the
//!   peer's FIN, the connection reports `Closed { Finished }` and lingers
//!   silently for the idle timeout (restarted by every peer datagram) to
//!   re-acknowledge a retransmitted FIN. RST closes at once. Both sides send
//!   KEEPALIVE after `keepalive` (5 s) of silence and close after
//!   `idle_timeout` (30 s) without hearing anything.
//!
//! # Wire format
//!
//! Big-endian. Every packet starts with the 8-byte common header:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | version (1) |
//! | 1 | 1 | type: 1 INIT, 2 COOKIE, 3 CONN_REQ, 4 CONN_ACK, 5 DATA, 6 PACK, 7 NACK, 8 KEEPALIVE, 9 RST; 10 DISCOVER and 11 OFFER are in [`discovery`] |
//! | 2 | 2 | flags: DATA bit 0 = FIN; PACK bit 0 = FIN received; others 0 |
//! | 4 | 4 | destination connection ID (0 only on INIT and on a CONN_REQ with a ticket) |
//!
//! | type | offset: size field ... | length |
//! |---|---|---|
//! | DATA | 8:4 packet number, 12:8 byte offset, 20:4 timestamp µs, 24:2 payload length, 26: payload | 26 + len |
//! | PACK | 8:8 cumulative ack, 16:4 highest pn, 20:4 echoed timestamp, 24:4 ack delay µs, 28:8 bytes received, 36:4 rate B/s, 40:2 loss /65536, 42:4 window, 46:1 n, 47: n x (4 start - cum ack, 4 length) | 47 + 8n, n <= 16 |
//! | NACK | 8:1 n, 9: n x (4 first pn, 4 last pn) | 9 + 8n, 1 <= n <= 32 |
//! | INIT | 8:4 client CID, 12:2 MTU, 14:4 window, 18:1 mode, 19:4 timestamp, zero padding | >= 64 |
//! | COOKIE | 8:4 server CID, 12:2 MTU, 14:4 server window, 18:1 mode, 19:4 echoed timestamp, 23:4 cookie time ms, 27:16 MAC | 43 |
//! | CONN_REQ | 8:4 client CID, 12:2 MTU, 14:4 client window, 18:1 mode, 19:4 cookie (or ticket) time, 23:16 MAC | 39 |
//! | CONN_ACK | 8:4 server CID, then optionally 12:4 ticket time ms, 16:16 ticket MAC | 12 or 32 |
//! | KEEPALIVE, RST | header only | 8 |
//!
//! Mode: 0 bbr, 1 fillp, 2 fixed. The DATA header is 26 bytes, FillP's is 12;
//! the extra 14 are the version/type/CID header, a 64-bit byte offset (no
//! wrap handling needed) and the timestamp that makes RTT samples
//! retransmission-proof. Lengths must match exactly; anything else is
//! refused by [`wire::Packet::new_checked`] before any field is read.
//!
//! # Polling order (for a driver)
//!
//! 1. Feed every received datagram to [`endpoint::Endpoint::handle_datagram`].
//! 2. Call [`endpoint::Endpoint::handle_timeout`] if
//!    [`endpoint::Endpoint::poll_timeout`] has passed.
//! 3. Drain [`endpoint::Endpoint::poll_transmit`] until `None`, sending each
//!    datagram; also after every application `write`, `read` or `close`.
//! 4. Drain [`endpoint::Endpoint::poll_event`] and
//!    [`endpoint::Endpoint::accept`].
//! 5. Sleep until the socket is readable or `poll_timeout` (which includes the
//!    pacer's next send time).
//!
//! # Goals
//!
//! Deterministic and fully testable (the same seed gives the same run);
//! bounded time and memory on any input (malformed datagrams are counted and
//! dropped, never panicked on, and never touch other connections); no
//! per-peer state before a valid cookie; small idle connections (under
//! 2 KB in the core: `size_of::<Connection>()` 1424 bytes plus ~0.5-0.6 KB
//! heap, asserted by the `idle_connection_memory` test; buffers grow with
//! use and both sides give them back once the flow pauses; ~6.5-7 KiB per
//! end through the stack, kernel memory included,
//! `benches/results/fillp_idle.md`); goodput near `link x (1 - loss)` on lossy, long paths
//! (`benches/fillp_sim.rs`).
//!
//! # Not supported
//!
//! * Encryption or authentication of data, PACK, NACK, KEEPALIVE or RST: an
//!   on-path attacker who sees the 32-bit connection ID can inject them (as
//!   with TCP). Only the handshake is protected (against spoofed sources).
//! * Path MTU discovery (the MTU is configured and negotiated down), address
//!   migration (datagrams from another address are dropped), multiple
//!   streams, unreliable datagrams, ECN, 0-RTT (data goes with the third
//!   flight at the earliest: the server keeps no state before the cookie).
//! * More than 2^32 packets per connection (packet numbers do not wrap; at
//!   100 Mbit/s that is about five days).
//! * BBR's ProbeRTT phase and app-limited accounting beyond flagging samples.
//! * `Endpoint::poll_timeout` and `poll_event` scan all connections (O(n)).
#![warn(missing_docs)]

pub mod byte_queue;
pub mod cc;
pub mod connection;
pub mod cookie;
pub mod discovery;
pub mod endpoint;
pub mod pacer;
pub mod recv_buf;
pub mod rtt;
pub mod send_buf;
// Test and bench support only: compiled for the crate's own tests and with
// the `sim` feature (on by default for cargo, off in the wheel).
#[cfg(any(test, feature = "sim"))]
#[doc(hidden)]
pub mod sim;
mod train;
pub mod wire;

pub use connection::{
    CloseReason, Config, Connection, ConnectionStats, Event, ReadError, Resumption, Transmit,
    WriteError,
};
pub use endpoint::{ConnectError, ConnectionHandle, Endpoint, EndpointConfig, EndpointStats};
pub use wire::RateMode;
