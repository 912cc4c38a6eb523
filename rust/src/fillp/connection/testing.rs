//! Fixtures for the per-file unit tests: connections at a known point of
//! their life, packets built with the wire module, a virtual clock (an
//! `Instant` and offsets from it; nothing here reads the real time after
//! the start).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::super::wire::{
    Body, DataRepr, HsParams, NackRepr, PackRepr, PnRange, RateMode, Repr, SackRange, MAC_LEN,
    MAX_NACK_RANGES, MAX_SACK_RANGES,
};
use super::{Config, Connection, Event};

/// The client's connection ID in every fixture.
pub(super) const CLIENT_CID: u32 = 0x0c11;
/// The server's connection ID in every fixture.
pub(super) const SERVER_CID: u32 = 0x05e1;
/// The RTT of every fixture handshake, ms: the first RTT sample, so srtt is
/// this, rttvar half of it and the RTO its 200 ms floor.
pub(super) const HS_RTT: u64 = 20;
/// The MAC the fixture server puts in its COOKIE.
pub(super) const MAC: [u8; MAC_LEN] = [0xa5; MAC_LEN];

/// The peer's address (nothing is sent anywhere).
pub(super) fn peer() -> SocketAddr {
    "192.0.2.1:4000".parse().unwrap()
}

/// `n` milliseconds.
pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A virtual clock: `t0` and the time `at(ms)` after it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    pub(super) t0: Instant,
}

impl Clock {
    pub(super) fn new() -> Self {
        Clock { t0: Instant::now() }
    }

    /// `n` ms after the start.
    pub(super) fn at(&self, n: u64) -> Instant {
        self.t0 + ms(n)
    }
}

/// A configuration with the `fixed` controller at `rate` bytes/s, so the
/// pacing rate is known.
pub(super) fn fixed(rate: u64) -> Config {
    Config {
        mode: RateMode::Fixed,
        fixed_rate: rate,
        initial_rate: rate,
        ..Config::default()
    }
}

/// A server connection created at `now` from a valid CONN_REQ (as the
/// endpoint creates it) with a handshake RTT of [`HS_RTT`]. `window` is
/// the client's receive window.
pub(super) fn server(config: Config, now: Instant, window: u32) -> Connection {
    let params = HsParams {
        mtu: config.mtu,
        window,
        mode: config.mode,
    };
    Connection::new_server(
        config,
        now,
        peer(),
        SERVER_CID,
        CLIENT_CID,
        params,
        Some(ms(HS_RTT)),
    )
}

/// A COOKIE from the fixture server, echoing `echo`.
pub(super) fn cookie(mtu: u16, window: u32, mode: RateMode, echo: u32) -> Vec<u8> {
    emit(Repr {
        dst_cid: CLIENT_CID,
        body: Body::Cookie {
            server_cid: SERVER_CID,
            params: HsParams { mtu, window, mode },
            echo,
            cookie_time: 77,
            mac: MAC,
        },
    })
}

/// A client created at `t0` that sent its INIT then and got the COOKIE
/// (`window`: the server's) [`HS_RTT`] later; its events are drained, its
/// CONN_REQ not yet sent.
pub(super) fn client_with_cookie(config: Config, t0: Instant, window: u32) -> Connection {
    let mtu = config.mtu;
    let mode = config.mode;
    let mut c = Connection::new_client(config, t0, peer(), CLIENT_CID);
    let sent = drain(&mut c, t0);
    assert_eq!(sent.len(), 1, "one INIT");
    let Body::Init { timestamp, .. } = parse(&sent[0]).body else {
        panic!("not an INIT: {:?}", parse(&sent[0]));
    };
    c.handle_datagram(t0 + ms(HS_RTT), &cookie(mtu, window, mode, timestamp));
    events(&mut c);
    c
}

/// [`client_with_cookie`] that sent its CONN_REQ at `t0` + [`HS_RTT`] and
/// got the CONN_ACK at `t0` + 2 [`HS_RTT`].
pub(super) fn established_client(config: Config, t0: Instant, window: u32) -> Connection {
    let mut c = client_with_cookie(config, t0, window);
    drain(&mut c, t0 + ms(HS_RTT));
    c.handle_datagram(
        t0 + ms(2 * HS_RTT),
        &emit(Repr {
            dst_cid: CLIENT_CID,
            body: Body::ConnAck {
                server_cid: SERVER_CID,
                ticket: None,
            },
        }),
    );
    assert!(c.is_established());
    events(&mut c);
    c
}

/// The datagram of `r`.
pub(super) fn emit(r: Repr<'_>) -> Vec<u8> {
    let mut b = Vec::new();
    r.emit(&mut b);
    b
}

/// A DATA packet to `dst` with packet number `pn` carrying `payload` at
/// stream `offset`, sent at peer time `ts` µs.
pub(super) fn data(dst: u32, pn: u32, offset: u64, payload: &[u8], fin: bool, ts: u32) -> Vec<u8> {
    emit(Repr {
        dst_cid: dst,
        body: Body::Data(DataRepr {
            pn,
            offset,
            timestamp: ts,
            fin,
            payload,
        }),
    })
}

/// What a fixture PACK reports.
#[derive(Debug, Clone, Copy)]
pub(super) struct Report<'a> {
    pub(super) cum_ack: u64,
    pub(super) highest_pn: u32,
    pub(super) echo_ts: u32,
    pub(super) rx_bytes: u64,
    pub(super) window: u32,
    /// The peer has our FIN and everything before it.
    pub(super) fin: bool,
    /// (start - cum_ack, length) pairs.
    pub(super) sacks: &'a [(u32, u32)],
}

impl Default for Report<'_> {
    fn default() -> Self {
        Report {
            cum_ack: 0,
            highest_pn: 0,
            echo_ts: 0,
            rx_bytes: 0,
            window: 1 << 20,
            fin: false,
            sacks: &[],
        }
    }
}

/// A PACK to `dst`.
pub(super) fn pack(dst: u32, r: Report<'_>) -> Vec<u8> {
    let mut sack = [SackRange::default(); MAX_SACK_RANGES];
    for (i, &(start, len)) in r.sacks.iter().enumerate() {
        sack[i] = SackRange { start, len };
    }
    emit(Repr {
        dst_cid: dst,
        body: Body::Pack(PackRepr {
            cum_ack: r.cum_ack,
            fin_received: r.fin,
            highest_pn: r.highest_pn,
            echo_ts: r.echo_ts,
            ack_delay_us: 0,
            rx_bytes: r.rx_bytes,
            rate: 0,
            loss: 0,
            window: r.window,
            sack_len: r.sacks.len() as u8,
            sack,
        }),
    })
}

/// A NACK to `dst` naming the inclusive packet-number `ranges`.
pub(super) fn nack(dst: u32, ranges: &[(u32, u32)]) -> Vec<u8> {
    let mut r = [PnRange::default(); MAX_NACK_RANGES];
    for (i, &(first, last)) in ranges.iter().enumerate() {
        r[i] = PnRange { first, last };
    }
    emit(Repr {
        dst_cid: dst,
        body: Body::Nack(NackRepr {
            len: ranges.len() as u8,
            ranges: r,
        }),
    })
}

/// A KEEPALIVE to `dst`.
pub(super) fn keepalive(dst: u32) -> Vec<u8> {
    emit(Repr {
        dst_cid: dst,
        body: Body::Keepalive,
    })
}

/// Parses a datagram the connection sent (it must be valid).
pub(super) fn parse(d: &[u8]) -> Repr<'_> {
    Repr::parse_bytes(d).expect("a valid datagram")
}

/// Every datagram `c` sends at `now`.
pub(super) fn drain(c: &mut Connection, now: Instant) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while let Some(t) = c.poll_transmit(now, &mut buf) {
        assert_eq!(t.size, buf.len());
        assert_eq!(t.destination, peer());
        out.push(buf.clone());
        assert!(out.len() < 100_000, "poll_transmit does not stop");
    }
    out
}

/// (packet number, offset, payload length) of the DATA packets among `sent`.
pub(super) fn data_of(sent: &[Vec<u8>]) -> Vec<(u32, u64, usize)> {
    sent.iter()
        .filter_map(|d| match parse(d).body {
            Body::Data(x) => Some((x.pn, x.offset, x.payload.len())),
            _ => None,
        })
        .collect()
}

/// The PACKs among `sent`.
pub(super) fn packs_of(sent: &[Vec<u8>]) -> Vec<PackRepr> {
    sent.iter()
        .filter_map(|d| match parse(d).body {
            Body::Pack(p) => Some(p),
            _ => None,
        })
        .collect()
}

/// The NACK ranges among `sent`, one list per NACK.
pub(super) fn nacks_of(sent: &[Vec<u8>]) -> Vec<Vec<(u32, u32)>> {
    sent.iter()
        .filter_map(|d| match parse(d).body {
            Body::Nack(n) => Some(n.ranges().iter().map(|r| (r.first, r.last)).collect()),
            _ => None,
        })
        .collect()
}

/// The events `c` has queued.
pub(super) fn events(c: &mut Connection) -> Vec<Event> {
    std::iter::from_fn(|| c.poll_event()).collect()
}
