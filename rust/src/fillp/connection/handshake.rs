//! The handshake as the connection sees it. The client sends INIT, takes
//! the COOKIE, echoes it in CONN_REQ (with early data behind it) until a
//! CONN_ACK, DATA or PACK from the server confirms; the server's side is
//! stateless until a valid CONN_REQ (the endpoint checks the cookie), and a
//! server connection only re-answers retransmitted CONN_REQs.

use std::time::{Duration, Instant};

use super::super::cc::{self, CcConfig};
use super::super::wire::{Body, HsParams, Repr, MAC_LEN};
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
}

impl Handshake {
    pub(super) fn new(now: Instant) -> Self {
        Handshake {
            step: HsStep::Init,
            next: now,
            backoff: 0,
            send_conn_ack: false,
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
        if self.role != Role::Client || self.state != State::Handshake || self.hs.has_cookie() {
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
        if params.mode != self.mode {
            self.mode = params.mode;
            self.tx.cc = cc::build(&CcConfig {
                mode: params.mode,
                initial_rate: self.config.initial_rate,
                max_rate: self.config.max_rate,
                fixed_rate: self.config.fixed_rate,
                mtu: self.mtu,
            });
        }
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

    /// CONN_ACK from the server we have the cookie of.
    pub(super) fn on_conn_ack(&mut self, now: Instant, server_cid: u32) -> bool {
        if self.role == Role::Client && server_cid == self.remote_cid {
            self.on_established(now);
            true
        } else {
            false
        }
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
        };
        Some(repr)
    }
}
