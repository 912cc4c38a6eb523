//! The handshake as the connection sees it. The client sends INIT, takes
//! the COOKIE, echoes it in CONN_REQ (with early data behind it) until a
//! CONN_ACK, DATA or PACK from the server confirms; the server's side is
//! stateless until a valid CONN_REQ (the endpoint checks the cookie), and a
//! server connection only re-answers retransmitted CONN_REQs.
//!
//! A client that holds a [`Resumption`] from an earlier connection to the
//! same server (the ticket of its CONN_ACK and the parameters of its
//! COOKIE) skips the first round trip: it sends CONN_REQ with the ticket
//! at once, to connection ID 0, and learns the server's connection ID from
//! the CONN_ACK. A server that does not take the ticket (expired, a new
//! secret, resumption off, full) answers RST, and the client then starts
//! over with an INIT: a refused resumption costs a round trip, never the
//! connection.

use std::time::{Duration, Instant};

use super::super::cc::{self, CcConfig};
use super::super::wire::{Body, HsParams, Repr, Ticket, MAC_LEN};
use super::{us_since, Connection, Event, Role, State};

/// Where a client's handshake is.
#[derive(Debug, Clone, Copy)]
pub(super) enum HsStep {
    /// Client: sending INIT.
    Init,
    /// Client: echoing the cookie.
    ConnReq {
        params: HsParams,
        cookie_time: u32,
        mac: [u8; MAC_LEN],
    },
    /// Client: sending CONN_REQ with a ticket, no server connection ID yet.
    Resume { params: HsParams, ticket: Ticket },
}

/// What a client keeps from a connection to resume later ones to the same
/// server: the server's parameters (MTU, window and mode, as its COOKIE
/// gave them) and the ticket of its CONN_ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumption {
    /// The agreed MTU and mode, and the server's window.
    pub params: HsParams,
    /// The server's ticket.
    pub ticket: Ticket,
}

/// Handshake state: the client's step and retransmission schedule, the
/// server's pending CONN_ACK.
#[derive(Debug)]
pub(super) struct Handshake {
    pub(super) step: HsStep,
    /// When the next INIT or CONN_REQ is due.
    pub(super) next: Instant,
    /// Packets of the current step sent so far (the backoff exponent).
    pub(super) backoff: u32,
    /// Server: a CONN_ACK is due (first, and for every retransmitted CONN_REQ).
    pub(super) send_conn_ack: bool,
    /// Client resuming: when its only CONN_REQ so far left (for an RTT
    /// sample at the CONN_ACK; none once it has been resent).
    pub(super) resume_sent: Option<Instant>,
    /// Client: the server's parameters, for a later [`Resumption`].
    pub(super) server_params: Option<HsParams>,
    /// Client: the ticket of the server's CONN_ACK; server: the ticket its
    /// CONN_ACK carries.
    pub(super) ticket: Option<Ticket>,
    /// Client: a resumption the server refused (the handshake then starts
    /// over with an INIT).
    pub(super) resume_refused: bool,
}

impl Handshake {
    pub(super) fn new(now: Instant) -> Self {
        Handshake {
            step: HsStep::Init,
            next: now,
            backoff: 0,
            send_conn_ack: false,
            resume_sent: None,
            server_params: None,
            ticket: None,
            resume_refused: false,
        }
    }

    /// The client has the server's cookie and echoes it.
    pub(super) fn has_cookie(&self) -> bool {
        matches!(self.step, HsStep::ConnReq { .. })
    }

    /// Schedules the next packet of this step after one sent at `now`;
    /// returns whether the one sent was a retransmission.
    fn on_sent(&mut self, now: Instant, initial_rtt: Duration) -> bool {
        // Short, capped backoff: a lost INIT should not cost seconds.
        let backoff = (initial_rtt.max(Duration::from_millis(200)) * (1u32 << self.backoff.min(2)))
            .min(Duration::from_secs(1));
        self.next = now + backoff;
        let resend = self.backoff > 0;
        self.backoff += 1;
        resend
    }
}

impl Connection {
    /// A client connection to `remote` that resumes with `r` (see the
    /// module docs): its first packet is CONN_REQ with the ticket.
    pub fn new_resumed(
        config: super::Config,
        now: Instant,
        remote: std::net::SocketAddr,
        local_cid: u32,
        r: &Resumption,
    ) -> Self {
        let mut c = Self::new_client(config, now, remote, local_cid);
        let mtu = r.params.mtu.min(c.config.mtu);
        c.mtu = mtu;
        c.tx.peer_limit = u64::from(r.params.window);
        c.set_mode(r.params.mode);
        c.hs.server_params = Some(r.params);
        c.hs.step = HsStep::Resume {
            params: HsParams {
                mtu,
                window: c.config.recv_window,
                mode: r.params.mode,
            },
            ticket: r.ticket,
        };
        c
    }

    /// What a later connection to this server may resume with: once the
    /// handshake is done, if the server sent a ticket.
    pub fn resumption(&self) -> Option<Resumption> {
        if self.role != Role::Client || self.state == State::Handshake {
            return None;
        }
        Some(Resumption {
            params: self.hs.server_params?,
            ticket: self.hs.ticket?,
        })
    }

    /// Whether the server refused this connection's ticket (it then went on
    /// with a full handshake).
    pub fn resumption_refused(&self) -> bool {
        self.hs.resume_refused
    }

    /// Whether the handshake skipped INIT and COOKIE with a ticket the
    /// server took.
    pub fn resumed(&self) -> bool {
        matches!(self.hs.step, HsStep::Resume { .. }) && self.state != State::Handshake
    }

    /// The server: the ticket its CONN_ACK gives the client.
    pub(crate) fn set_ticket(&mut self, ticket: Option<Ticket>) {
        self.hs.ticket = ticket;
    }

    /// A client's RST in its handshake: a resuming one starts over with an
    /// INIT (the server did not take the ticket); returns whether it did.
    pub(super) fn resume_refused_by_reset(&mut self, now: Instant) -> bool {
        if self.role != Role::Client
            || self.state != State::Handshake
            || !matches!(self.hs.step, HsStep::Resume { .. })
        {
            return false;
        }
        self.hs.step = HsStep::Init;
        self.hs.next = now;
        self.hs.backoff = 0;
        self.hs.resume_sent = None;
        self.hs.resume_refused = true;
        // The INIT proposes this side's own settings again.
        self.mtu = self.config.mtu;
        let mode = self.config.mode;
        self.set_mode(mode);
        true
    }

    /// Switches the rate control to `mode` (a new controller) if it differs.
    fn set_mode(&mut self, mode: super::super::wire::RateMode) {
        if mode != self.mode {
            self.mode = mode;
            self.tx.cc = cc::build(&CcConfig {
                mode,
                initial_rate: self.config.initial_rate,
                max_rate: self.config.max_rate,
                fixed_rate: self.config.fixed_rate,
                mtu: self.mtu,
            });
        }
    }

    /// COOKIE: a client in its first step takes the server's connection ID,
    /// MTU, window and mode and moves on to CONN_REQ.
    pub(super) fn on_cookie(
        &mut self,
        now: Instant,
        server_cid: u32,
        params: HsParams,
        echo: u32,
        cookie_time: u32,
        mac: [u8; MAC_LEN],
    ) -> bool {
        if self.role != Role::Client
            || self.state != State::Handshake
            || !matches!(self.hs.step, HsStep::Init)
        {
            return false;
        }
        if params.mtu > self.config.mtu {
            return false;
        }
        let sample = us_since(self.epoch, now).wrapping_sub(echo);
        if u64::from(sample) < 60_000_000 {
            self.rtt.update(Duration::from_micros(u64::from(sample)));
        }
        self.remote_cid = server_cid;
        self.mtu = params.mtu;
        self.tx.peer_limit = u64::from(params.window);
        self.set_mode(params.mode);
        self.hs.server_params = Some(params);
        self.hs.step = HsStep::ConnReq {
            params: HsParams {
                mtu: params.mtu,
                window: self.config.recv_window,
                mode: params.mode,
            },
            cookie_time,
            mac,
        };
        self.hs.next = now;
        self.hs.backoff = 0;
        // Data written from now on leaves behind the CONN_REQ: a driver
        // can report the connect done, as TCP does at its SYN-ACK.
        self.events.push_back(Event::Writable);
        true
    }

    /// CONN_ACK from the server we have the cookie of, or, resuming, the
    /// one that took our ticket (and names its connection ID here).
    pub(super) fn on_conn_ack(
        &mut self,
        now: Instant,
        server_cid: u32,
        ticket: Option<Ticket>,
    ) -> bool {
        if self.role != Role::Client {
            return false;
        }
        let resuming = self.state == State::Handshake
            && self.remote_cid == 0
            && matches!(self.hs.step, HsStep::Resume { .. });
        if resuming {
            self.remote_cid = server_cid;
            if let Some(sent) = self.hs.resume_sent.take() {
                self.rtt.update(now.saturating_duration_since(sent));
            }
        } else if server_cid != self.remote_cid {
            return false;
        }
        if ticket.is_some() {
            self.hs.ticket = ticket;
        }
        self.on_established(now);
        true
    }

    /// A retransmitted CONN_REQ: our CONN_ACK was lost.
    pub(super) fn on_conn_req(&mut self, client_cid: u32) -> bool {
        if self.role == Role::Server && client_cid == self.remote_cid {
            self.hs.send_conn_ack = true;
            true
        } else {
            false
        }
    }

    /// Whether a DATA or PACK may be taken: established or draining, or a
    /// client holding the cookie, whose handshake such a packet completes
    /// (it proves that our CONN_REQ arrived).
    pub(super) fn accept_stream_packet(&mut self, now: Instant) -> bool {
        if self.role == Role::Client && self.state == State::Handshake {
            if self.remote_cid == 0 || !self.hs.has_cookie() {
                return false;
            }
            self.on_established(now);
        }
        matches!(self.state, State::Established | State::Draining)
    }

    /// The client's handshake is confirmed (CONN_ACK, or DATA/PACK from the
    /// server).
    pub(super) fn on_established(&mut self, now: Instant) {
        if self.state == State::Handshake {
            self.state = State::Established;
            self.events.push_back(Event::Connected);
            self.timers.last_tx = now;
            // Early data's loss timers start now: they do not run during the
            // handshake, where the CONN_REQ's retransmission is the probe.
            if self.timers.loss_base.is_some() {
                self.timers.loss_base = Some(now);
            }
        }
    }

    /// A client that has the server's cookie: it knows the connection ID,
    /// MTU, mode and window, and sends data behind its CONN_REQ.
    pub(super) fn early_data_allowed(&self) -> bool {
        self.role == Role::Client && self.hs.has_cookie()
    }

    /// The client's INIT or CONN_REQ, if one is due.
    pub(super) fn handshake_packet(&mut self, now: Instant) -> Option<Repr<'static>> {
        if now < self.hs.next {
            return None;
        }
        let resend = self.hs.on_sent(now, self.config.initial_rtt);
        if resend && self.early_data_allowed() && self.tx.buf.probe_tail() {
            // The early data went nowhere if the CONN_REQ was lost. A probe
            // right behind the retransmitted CONN_REQ draws a PACK (and the
            // NACKs for the rest) from the new server connection, which
            // completes the handshake even if its CONN_ACK is lost.
            self.stats.tail_probes += 1;
            self.tx.probe_pending = true;
        }
        let repr = match self.hs.step {
            HsStep::Init => Repr {
                dst_cid: 0,
                body: Body::Init {
                    client_cid: self.local_cid,
                    params: HsParams {
                        mtu: self.config.mtu,
                        window: self.config.recv_window,
                        mode: self.config.mode,
                    },
                    timestamp: us_since(self.epoch, now),
                },
            },
            HsStep::ConnReq {
                params,
                cookie_time,
                mac,
            } => Repr {
                dst_cid: self.remote_cid,
                body: Body::ConnReq {
                    client_cid: self.local_cid,
                    params,
                    cookie_time,
                    mac,
                },
            },
            HsStep::Resume { params, ticket } => {
                self.hs.resume_sent = (!resend).then_some(now);
                Repr {
                    dst_cid: 0,
                    body: Body::ConnReq {
                        client_cid: self.local_cid,
                        params,
                        cookie_time: ticket.time,
                        mac: ticket.mac,
                    },
                }
            }
        };
        Some(repr)
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::wire::{Body, HsParams, RateMode, Repr};
    use super::super::testing::*;
    use super::super::{CloseReason, Config, Connection, Event};

    fn kinds(sent: &[Vec<u8>]) -> Vec<&'static str> {
        sent.iter()
            .map(|d| match parse(d).body {
                Body::Init { .. } => "init",
                Body::ConnReq { .. } => "conn_req",
                Body::Data(_) => "data",
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn init_is_resent_with_a_short_capped_backoff() {
        let clk = Clock::new();
        let cfg = Config::default();
        let mut c = Connection::new_client(cfg.clone(), clk.t0, peer(), CLIENT_CID);
        let sent = drain(&mut c, clk.t0);
        let Repr {
            dst_cid,
            body: Body::Init {
                client_cid, params, ..
            },
        } = parse(&sent[0])
        else {
            panic!("not an INIT");
        };
        assert_eq!((sent.len(), dst_cid, client_cid), (1, 0, CLIENT_CID));
        let proposal = HsParams {
            mtu: cfg.mtu,
            window: cfg.recv_window,
            mode: cfg.mode,
        };
        assert_eq!(params, proposal);
        // max(initial RTT 100 ms, 200 ms) doubling twice, then flat: 200,
        // 400, 800, 800 ms apart.
        let mut at = 0;
        for gap in [200, 400, 800, 800] {
            assert_eq!(c.poll_timeout(), Some(clk.at(at + gap)));
            assert!(drain(&mut c, clk.at(at + gap - 1)).is_empty());
            at += gap;
            assert_eq!(kinds(&drain(&mut c, clk.at(at))), ["init"]);
        }
        assert!(!c.can_send());
    }

    #[test]
    fn the_cookie_moves_the_client_to_conn_req() {
        let clk = Clock::new();
        let mut c = Connection::new_client(Config::default(), clk.t0, peer(), CLIENT_CID);
        drain(&mut c, clk.t0);
        // The server agrees on a smaller MTU and forces `fixed`.
        c.handle_datagram(clk.at(30), &cookie(1200, 5000, RateMode::Fixed, 0));
        assert_eq!(events(&mut c), [Event::Writable]);
        assert!(c.can_send() && !c.is_established());
        assert_eq!(
            (c.remote_cid(), c.mtu(), c.mode()),
            (SERVER_CID, 1200, RateMode::Fixed)
        );
        assert!(c.controller_debug().starts_with("Fixed"));
        // The COOKIE's echo of the INIT's timestamp is the first RTT sample.
        assert_eq!(c.stats().rtt, ms(30));
        let sent = drain(&mut c, clk.at(30));
        let Body::ConnReq {
            client_cid,
            params,
            cookie_time,
            mac,
        } = parse(&sent[0]).body
        else {
            panic!("not a CONN_REQ");
        };
        assert_eq!(parse(&sent[0]).dst_cid, SERVER_CID);
        assert_eq!((client_cid, cookie_time, mac), (CLIENT_CID, 77, MAC));
        // Our window, the agreed MTU and mode.
        let agreed = HsParams {
            mtu: 1200,
            window: Config::default().recv_window,
            mode: RateMode::Fixed,
        };
        assert_eq!(params, agreed);
        // The CONN_REQ's schedule starts afresh: 200 ms.
        assert_eq!(c.poll_timeout(), Some(clk.at(230)));
    }

    #[test]
    fn cookies_out_of_place_are_rejected() {
        let clk = Clock::new();
        let cfg = Config::default();
        let good = cookie(cfg.mtu, 5000, cfg.mode, 0);
        // An MTU above what we proposed.
        let mut c = Connection::new_client(cfg.clone(), clk.t0, peer(), CLIENT_CID);
        drain(&mut c, clk.t0);
        c.handle_datagram(clk.at(20), &cookie(cfg.mtu + 1, 5000, cfg.mode, 0));
        assert!(!c.can_send() && events(&mut c).is_empty());
        assert_eq!((c.stats().dropped, c.remote_cid()), (1, 0));
        // Addressed to another connection ID.
        let mut other = good.clone();
        other[4..8].copy_from_slice(&(CLIENT_CID + 1).to_be_bytes());
        c.handle_datagram(clk.at(20), &other);
        assert_eq!((c.stats().dropped, c.can_send()), (2, false));
        // A second COOKIE once we have one changes nothing.
        let mut c = client_with_cookie(cfg.clone(), clk.t0, 5000);
        let changed = cookie(1000, 9, RateMode::Fillp, 0);
        c.handle_datagram(clk.at(25), &changed);
        assert_eq!(
            (c.stats().dropped, c.mtu(), c.mode()),
            (1, cfg.mtu, cfg.mode)
        );
        // A server never takes one.
        let mut s = server(cfg.clone(), clk.t0, 5000);
        let mut to_server = good;
        to_server[4..8].copy_from_slice(&SERVER_CID.to_be_bytes());
        s.handle_datagram(clk.at(1), &to_server);
        assert_eq!(s.stats().dropped, 1);
    }

    #[test]
    fn only_our_servers_conn_ack_completes_the_handshake() {
        let clk = Clock::new();
        let mut c = client_with_cookie(Config::default(), clk.t0, 5000);
        let ack = |server_cid| {
            emit(Repr {
                dst_cid: CLIENT_CID,
                body: Body::ConnAck {
                    server_cid,
                    ticket: None,
                },
            })
        };
        c.handle_datagram(clk.at(40), &ack(SERVER_CID + 1));
        assert!(!c.is_established());
        assert_eq!(c.stats().dropped, 1);
        c.handle_datagram(clk.at(40), &ack(SERVER_CID));
        assert!(c.is_established());
        assert_eq!(events(&mut c), [Event::Connected]);
        // Established: no more CONN_REQs.
        assert!(drain(&mut c, clk.at(1000)).is_empty());
    }

    #[test]
    fn data_from_the_server_completes_the_handshake() {
        let clk = Clock::new();
        let cfg = Config::default();
        let hello = data(CLIENT_CID, 0, 0, b"hello", false, 0);
        // Before the cookie, the server cannot have a connection: dropped.
        let mut c = Connection::new_client(cfg.clone(), clk.t0, peer(), CLIENT_CID);
        drain(&mut c, clk.t0);
        c.handle_datagram(clk.at(10), &hello);
        assert_eq!((c.stats().dropped, c.is_established()), (1, false));
        // With it, DATA proves that our CONN_REQ arrived (its CONN_ACK may
        // be lost).
        let mut c = client_with_cookie(cfg, clk.t0, 5000);
        drain(&mut c, clk.at(20));
        c.handle_datagram(clk.at(40), &hello);
        assert!(c.is_established());
        assert_eq!(events(&mut c), [Event::Connected, Event::Readable]);
    }

    #[test]
    fn a_server_answers_every_conn_req_of_its_client() {
        let clk = Clock::new();
        let mut s = server(Config::default(), clk.t0, 5000);
        assert_eq!(events(&mut s), [Event::Connected]);
        let conn_ack = emit(Repr {
            dst_cid: CLIENT_CID,
            body: Body::ConnAck {
                server_cid: SERVER_CID,
                ticket: None,
            },
        });
        assert_eq!(drain(&mut s, clk.t0), std::slice::from_ref(&conn_ack));
        let conn_req = |client_cid| {
            emit(Repr {
                dst_cid: SERVER_CID,
                body: Body::ConnReq {
                    client_cid,
                    params: HsParams {
                        mtu: 1400,
                        window: 5000,
                        mode: RateMode::Bbr,
                    },
                    cookie_time: 77,
                    mac: MAC,
                },
            })
        };
        s.handle_datagram(clk.at(20), &conn_req(CLIENT_CID));
        assert_eq!(drain(&mut s, clk.at(20)), [conn_ack]);
        s.handle_datagram(clk.at(20), &conn_req(CLIENT_CID + 1));
        assert!(drain(&mut s, clk.at(20)).is_empty());
        assert_eq!(s.stats().dropped, 1);
    }

    #[test]
    fn an_unanswered_handshake_times_out() {
        let clk = Clock::new();
        let cfg = Config::default();
        let limit = cfg.handshake_timeout.as_millis() as u64;
        let mut c = Connection::new_client(cfg, clk.t0, peer(), CLIENT_CID);
        let mut now = clk.t0;
        while let Some(t) = c.poll_timeout().filter(|&t| t < clk.at(limit)) {
            now = t;
            c.handle_timeout(now);
            drain(&mut c, now);
        }
        assert!(!c.is_closed() && now < clk.at(limit));
        assert_eq!(c.poll_timeout(), Some(clk.at(limit)));
        c.handle_timeout(clk.at(limit));
        assert_eq!(c.close_reason(), Some(CloseReason::HandshakeTimeout));
        assert_eq!(
            events(&mut c),
            [Event::Closed {
                reason: CloseReason::HandshakeTimeout
            }]
        );
        assert!(drain(&mut c, clk.at(limit)).is_empty());
    }

    #[test]
    fn early_data_follows_the_conn_req_for_at_most_one_flight() {
        let clk = Clock::new();
        // 1.25 MB/s x 20 ms srtt is 25 kB, less than a first flight of 40
        // packets: the flight is 40 packets, however long we wait.
        let mut c = client_with_cookie(fixed(1_250_000), clk.t0, 1 << 20);
        assert_eq!(c.write(&[7; 200_000]), Ok(200_000));
        let sent = drain(&mut c, clk.at(20));
        assert_eq!(kinds(&sent)[..2], ["conn_req", "data"]);
        let mut n = data_of(&sent).len();
        for t in 21..200 {
            n += data_of(&drain(&mut c, clk.at(t))).len();
        }
        assert_eq!(n, 40);
        // The CONN_REQ's retransmission (200 ms on) brings a probe behind it.
        let sent = drain(&mut c, clk.at(220));
        assert_eq!(kinds(&sent), ["conn_req", "data"]);
        assert_eq!(c.stats().tail_probes, 1);
    }

    #[test]
    fn early_datas_loss_timers_start_at_confirmation() {
        let clk = Clock::new();
        let mut c = client_with_cookie(fixed(125_000_000), clk.t0, 1 << 20);
        c.write(&[1; 100]).unwrap();
        assert_eq!(data_of(&drain(&mut c, clk.at(20))).len(), 1);
        // Handshaking: the CONN_REQ's retransmission is the only timer.
        assert_eq!(c.poll_timeout(), Some(clk.at(220)));
        let ack = emit(Repr {
            dst_cid: CLIENT_CID,
            body: Body::ConnAck {
                server_cid: SERVER_CID,
                ticket: None,
            },
        });
        c.handle_datagram(clk.at(40), &ack);
        // The tail probe, 2 srtt + 10 ms from the confirmation.
        assert_eq!(c.poll_timeout(), Some(clk.at(90)));
    }
}
