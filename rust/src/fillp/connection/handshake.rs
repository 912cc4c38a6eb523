//! The client's side of the handshake (the server's is stateless, in the
//! endpoint): INIT, COOKIE, CONN_REQ, and the early data behind it.

use std::time::{Duration, Instant};

use super::super::cc::{self, CcConfig};
use super::super::wire::{Body, HsParams, Repr, MAC_LEN};
use super::{us_since, Connection, Event, Role, State};

#[derive(Debug, Clone, Copy)]
pub(super) enum Hs {
    /// Client: sending INIT.
    Init,
    /// Client: echoing the cookie.
    ConnReq {
        params: HsParams,
        cookie_time: u32,
        mac: [u8; MAC_LEN],
    },
}

impl Connection {
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
            || !matches!(self.hs, Hs::Init)
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
        self.peer_limit = u64::from(params.window);
        if params.mode != self.mode {
            self.mode = params.mode;
            self.cc = cc::build(&CcConfig {
                mode: params.mode,
                initial_rate: self.config.initial_rate,
                max_rate: self.config.max_rate,
                fixed_rate: self.config.fixed_rate,
                mtu: self.mtu,
            });
        }
        self.hs = Hs::ConnReq {
            params: HsParams {
                mtu: params.mtu,
                window: self.config.recv_window,
                mode: params.mode,
            },
            cookie_time,
            mac,
        };
        self.hs_next = now;
        self.hs_backoff = 0;
        // Data written from now on leaves behind the CONN_REQ: a driver
        // can report the connect done, as TCP does at its SYN-ACK.
        self.events.push_back(Event::Writable);
        true
    }

    pub(super) fn on_established(&mut self, now: Instant) {
        if self.state == State::Handshake {
            self.state = State::Established;
            self.events.push_back(Event::Connected);
            self.last_tx = now;
            // Early data's loss timers start now: they do not run during the
            // handshake, where the CONN_REQ's retransmission is the probe.
            if self.timer_base.is_some() {
                self.timer_base = Some(now);
            }
        }
    }

    /// A client that has the server's cookie: it knows the connection ID,
    /// MTU, mode and window, and sends data behind its CONN_REQ.
    pub(super) fn early_data_allowed(&self) -> bool {
        self.role == Role::Client && matches!(self.hs, Hs::ConnReq { .. })
    }

    pub(super) fn handshake_packet(&mut self, now: Instant) -> Option<Repr<'static>> {
        if now < self.hs_next {
            return None;
        }
        // Short, capped backoff: a lost INIT should not cost seconds.
        let backoff = (self.config.initial_rtt.max(Duration::from_millis(200))
            * (1u32 << self.hs_backoff.min(2)))
        .min(Duration::from_secs(1));
        self.hs_next = now + backoff;
        let resend = self.hs_backoff > 0;
        self.hs_backoff += 1;
        if resend && self.early_data_allowed() && self.send.probe_tail() {
            // The early data went nowhere if the CONN_REQ was lost. A probe
            // right behind the retransmitted CONN_REQ draws a PACK (and the
            // NACKs for the rest) from the new server connection, which
            // completes the handshake even if its CONN_ACK is lost.
            self.stats.tail_probes += 1;
            self.probe_pending = true;
        }
        let repr = match self.hs {
            Hs::Init => Repr {
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
            Hs::ConnReq {
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
