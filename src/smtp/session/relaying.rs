//! The session's side of the relay: opening, reusing, renewing and releasing the downstream
//! connection ([`Relay`], `crate::downstream::relay`), relaying MAIL, RCPT, DATA and the body,
//! and turning the downstream's replies and failures into replies to the client (a failure on
//! the relay path is a `4xx`, so the sender retries).

use std::net::SocketAddr;
use std::time::Instant;

use crate::config::{DownstreamMode, DownstreamTls};
use crate::downstream::dialog::{ClientIdentity, Handshake, Step, announcement_refused};
use crate::downstream::relay::{Link, LinkId, Relay};
use crate::downstream::warnings;
use crate::policy::reputation::Event;
use crate::policy::screening::Checks;
use crate::smtp::command::Body;
use crate::smtp::data::DataDecoder;
use crate::smtp::received::{Trace, write_received};
use crate::smtp::reply::{Reply, Status, parse_reply};

use super::commands::Pending;
use super::{Action, Peer, Phase, Session, TlsStage};

/// Who the client is, for XCLIENT and PROXY (a free function so it borrows fields, not `self`).
pub(super) fn identity<'a>(
    peer: &Peer,
    helo: Option<&'a [u8]>,
    esmtp: bool,
    checks: &'a Checks,
) -> ClientIdentity<'a> {
    ClientIdentity {
        client: peer.client,
        local: peer.local,
        helo: helo.unwrap_or_default(),
        esmtp,
        name: checks.xclient_name(),
    }
}

pub(super) fn downstream_lost() -> Reply {
    Reply::new(
        451,
        "4.4.2",
        "Error: downstream server unavailable, please try again later",
    )
}

impl Session {
    /// MAIL for the current transaction (the session is `Waiting(Mail)`): on the connection in
    /// use once it speaks for this client (renewed with a fresh XCLIENT when it served
    /// someone else, or retired), on the one still being set up once it is ready, or on a
    /// new one.
    pub(super) fn start_mail(&mut self, now: Instant) {
        self.phase = Phase::Waiting(Pending::Mail);
        let who = identity(&self.peer, self.helo.as_deref(), self.esmtp, &self.checks);
        let step = match self.relay.as_deref_mut() {
            Some(relay) if relay.link == Link::Ready => {
                let step = relay.handshake.renew(&who, &mut relay.outbox);
                if step != Step::Ready {
                    relay.link = Link::Handshaking;
                }
                step
            }
            // Still connecting or handshaking: MAIL goes out when the handshake is done.
            Some(_) => return,
            None => return self.connect(now, 0, false, true),
        };
        self.on_handshake_step(now, step);
    }

    /// Opens a downstream connection to `server` (a pooled one when `pooled` allows);
    /// `plain_retry` turns STARTTLS off for it. Any connection still in use is closed first.
    pub(super) fn connect(&mut self, now: Instant, server: usize, plain_retry: bool, pooled: bool) {
        self.drop_relay();
        let Some(&addr) = self.config.downstream.servers.get(server) else {
            return self.downstream_failed(now, "no server reachable");
        };
        let hostname = &self.config.server.hostname;
        let tls = if plain_retry {
            DownstreamTls::None
        } else {
            self.config.downstream.tls
        };
        let id = LinkId(self.next_link);
        self.next_link = self.next_link.wrapping_add(1);
        self.relay = Some(Box::new(Relay {
            id,
            server,
            link: Link::Connecting,
            handshake: Handshake::new(hostname, self.config.downstream.announce_client)
                .with_tls(tls),
            outbox: Vec::new(),
            swallow: 0,
            in_transaction: false,
            mid_data: false,
            plain_retry,
        }));
        self.actions.push_back(Action::ConnectDownstream {
            link: id,
            addr,
            pooled,
        });
        self.timers.downstream = Some(now + self.config.timeouts.connect);
    }

    /// Connect failure or connect timeout: the next server in order, or give up.
    pub(super) fn try_next_server(&mut self, now: Instant) {
        let next = self.relay.as_ref().map_or(0, |r| r.server + 1);
        self.drop_relay();
        if next < self.config.downstream.servers.len() {
            self.connect(now, next, false, true);
        } else {
            self.downstream_failed(now, "no server reachable");
        }
    }

    /// The server address of the connection in use, for log lines.
    pub(super) fn relay_server(&self) -> Option<SocketAddr> {
        let relay = self.relay.as_deref()?;
        self.config.downstream.servers.get(relay.server).copied()
    }

    pub(super) fn read_downstream(&mut self, now: Instant, bytes: &[u8]) -> usize {
        let mut consumed = 0;
        while !self.is_closed() {
            match self.relay.as_deref() {
                None => break,
                // Whatever followed the 220 to STARTTLS came in plain text: never a reply.
                Some(relay) if relay.link == Link::StartingTls => break,
                Some(_) => {}
            }
            let rest = bytes.get(consumed..).unwrap_or_default();
            match parse_reply(rest) {
                Ok(Status::Complete((reply, used))) => {
                    consumed += used;
                    self.on_downstream_reply(now, reply);
                    self.release_relay_if_clean(false);
                }
                Ok(Status::Partial) => return consumed,
                Err(_) => {
                    self.downstream_failed(now, "malformed reply");
                    return bytes.len();
                }
            }
        }
        bytes.len()
    }

    pub(super) fn on_downstream_reply(&mut self, now: Instant, reply: Reply) {
        let Some(relay) = self.relay.as_deref_mut() else {
            return;
        };
        // Replies come in order: those to commands tarmac sent on its own (RSET) before
        // anything sent after them, a renewed handshake's XCLIENT included.
        if relay.swallow > 0 {
            relay.swallow -= 1;
            if relay.swallow == 0 && !matches!(self.phase, Phase::Waiting(_)) {
                self.timers.downstream = None;
            }
            if reply.code / 100 != 2 {
                self.downstream_failed(now, "reset refused");
            }
            return;
        }
        if relay.link == Link::Handshaking {
            let who = identity(&self.peer, self.helo.as_deref(), self.esmtp, &self.checks);
            let step = relay.handshake.handle_reply(reply, &who, &mut relay.outbox);
            return self.on_handshake_step(now, step);
        }
        let Phase::Waiting(pending) = self.phase else {
            // Unsolicited: typically the downstream's own 421 before it hangs up.
            return self.downstream_failed(now, "unexpected reply");
        };
        if pending == Pending::Greylist {
            // Nothing was sent downstream for this command.
            return self.downstream_failed(now, "unexpected reply");
        }
        self.timers.downstream = None;
        // The relayed command is complete: the client's idle time starts again.
        self.timers.idle = Some(now + self.config.timeouts.idle);
        if reply.code == 421 {
            // The downstream is closing: for our client that is a temporary failure of this
            // command, not of the whole session.
            return self.downstream_failed(now, "downstream sent 421");
        }
        let positive = reply.code / 100 == 2;
        if !positive {
            self.last_failure = Some(if reply.code >= 500 {
                "rejected"
            } else {
                "tempfail"
            });
        }
        self.phase = Phase::Command;
        match pending {
            Pending::Mail => {
                let after_mail = self.tx.as_deref_mut().and_then(|tx| tx.after_mail.take());
                if !positive {
                    if let Some(relay) = self.relay.as_deref_mut() {
                        relay.in_transaction = false;
                    }
                    match self.tx.as_deref_mut() {
                        // The client had its 250 to MAIL locally: the transaction stays, and
                        // the refusal answers the recipient that was waiting for it.
                        Some(tx) if after_mail.is_some() => tx.relayed = false,
                        _ => self.tx = None,
                    }
                } else if let Some(to) = after_mail {
                    let command = format!("RCPT TO:<{to}>\r\n");
                    return self.send_downstream(now, command.as_bytes(), Pending::Rcpt);
                }
                self.relay_reply(reply);
            }
            Pending::Rcpt => {
                if positive && let Some(tx) = self.tx.as_deref_mut() {
                    tx.accepted += 1;
                }
                self.relay_reply(reply);
            }
            Pending::Data if reply.code == 354 => {
                self.reply(Reply::without_enhanced(
                    354,
                    "End data with <CR><LF>.<CR><LF>",
                ));
                self.start_body(now);
            }
            Pending::Data => self.relay_reply(reply),
            Pending::Greylist => {}
            Pending::EndOfData => {
                if positive {
                    self.record_reputation(Event::Delivered);
                    self.msgs += 1;
                    self.rcpts += self.tx.as_deref().map_or(0, |tx| tx.accepted);
                    self.last_failure = None;
                }
                self.tx = None;
                if let Some(relay) = self.relay.as_deref_mut() {
                    relay.in_transaction = false;
                }
                self.relay_reply(reply);
            }
        }
    }

    pub(super) fn start_body(&mut self, now: Instant) {
        let decoder = DataDecoder::new(
            self.config.limits.bare_newline,
            self.config.limits.max_message_size,
        );
        self.phase = Phase::Data(Box::new(decoder));
        self.timers.data = Some(now + self.config.timeouts.data);
        self.timers.idle = None;
        let trace = Trace {
            helo: self.helo.as_deref().unwrap_or_default(),
            client: self.peer.client.ip(),
            by: &self.config.server.hostname,
            // RFC 3848: the `S` says the message came over TLS.
            with: match (self.esmtp, self.tls) {
                (true, TlsStage::Active(_)) => "ESMTPS",
                (false, TlsStage::Active(_)) => "SMTPS",
                (true, _) => "ESMTP",
                (false, _) => "SMTP",
            },
            at: self.peer.accepted_at + now.saturating_duration_since(self.started),
        };
        if let Some(relay) = self.relay.as_deref_mut() {
            relay.mid_data = true;
            write_received(&trace, &mut relay.outbox);
        }
    }

    /// Sends MAIL for the current transaction, with the parameters the downstream offers.
    pub(super) fn send_mail(&mut self, now: Instant) {
        let (Some(tx), Some(relay)) = (self.tx.as_deref_mut(), self.relay.as_deref_mut()) else {
            return;
        };
        let mut command = format!("MAIL FROM:<{}>", tx.from);
        let caps = relay.handshake.capabilities();
        if let Some(size) = tx.params.size
            && caps.size
        {
            command.push_str(&format!(" SIZE={size}"));
        }
        match tx.params.body {
            Some(Body::EightBitMime) if caps.eight_bit_mime => command.push_str(" BODY=8BITMIME"),
            Some(Body::SevenBit) if caps.eight_bit_mime => command.push_str(" BODY=7BIT"),
            _ => {}
        }
        if tx.params.smtputf8 && caps.smtputf8 {
            command.push_str(" SMTPUTF8");
        }
        command.push_str("\r\n");
        tx.relayed = true;
        relay.in_transaction = true;
        self.send_downstream(now, command.as_bytes(), Pending::Mail);
    }

    /// Queues a transaction command for the downstream and waits for its reply. Only a ready
    /// connection takes one: without one nothing is written anywhere and the waiting command
    /// gets `451 4.4.2`.
    pub(super) fn send_downstream(&mut self, now: Instant, command: &[u8], pending: Pending) {
        self.phase = Phase::Waiting(pending);
        let Some(relay) = self.relay.as_deref_mut().filter(|r| r.link == Link::Ready) else {
            return self.downstream_failed(now, "no ready downstream connection");
        };
        relay.outbox.extend_from_slice(command);
        self.timers.downstream = Some(now + self.config.timeouts.command);
    }

    /// The downstream failed (refused, broke, timed out, or said something unexpected): drop
    /// it; the command waiting for it gets `451 4.4.2`, and the transaction is marked broken.
    pub(super) fn downstream_failed(&mut self, now: Instant, why: &str) {
        self.downstream_failed_with(now, why, downstream_lost());
    }

    /// As `downstream_failed`, answering the waiting command with `reply`.
    pub(super) fn downstream_failed_with(&mut self, now: Instant, why: &str, reply: Reply) {
        log::debug!("downstream failed for {}: {why}", self.peer.client);
        self.drop_relay();
        match self.phase {
            Phase::Waiting(pending) => {
                self.phase = Phase::Command;
                self.timers.idle = Some(now + self.config.timeouts.idle);
                self.last_failure = Some(if reply.code >= 500 {
                    "rejected"
                } else {
                    "tempfail"
                });
                let announced = self.tx.as_deref().is_some_and(|tx| tx.after_mail.is_some());
                // The reply to the final dot ends the transaction whatever it says (RFC 5321
                // §4.1.1.4): the client's next MAIL starts a new one.
                if (pending == Pending::Mail && !announced) || pending == Pending::EndOfData {
                    self.tx = None;
                } else if let Some(tx) = self.tx.as_deref_mut() {
                    tx.broken = true;
                    tx.after_mail = None;
                }
                self.relay_reply(reply);
            }
            // Mid-body: keep reading it to its end, then answer 451 (see `end_of_data`).
            Phase::Data(_) => {}
            Phase::Command => {
                if let Some(tx) = self.tx.as_deref_mut()
                    && tx.relayed
                {
                    tx.broken = true;
                }
            }
            Phase::Proxy(_)
            | Phase::Admitting
            | Phase::Checking
            | Phase::StartingTls
            | Phase::Closing(_)
            | Phase::Closed(_) => {}
        }
    }

    /// Acts on what the downstream handshake asks for next.
    pub(super) fn on_handshake_step(&mut self, now: Instant, step: Step) {
        match step {
            Step::Continue => {
                self.timers.downstream = Some(now + self.config.timeouts.command);
            }
            Step::Ready => self.relay_ready(now),
            Step::Failed(reply) => {
                log::warn!(
                    "downstream {} refused the handshake: {} {}",
                    self.relay_server()
                        .map_or_else(String::new, |a| a.to_string()),
                    reply.code,
                    reply.lines.first().map_or("", String::as_str)
                );
                self.downstream_failed(now, "handshake refused");
            }
            Step::AnnouncementRefused(reply) => {
                if let Some(server) = self.relay_server() {
                    warnings::announcement_refused(server, reply.as_ref(), now);
                }
                self.downstream_failed_with(now, "XCLIENT refused", announcement_refused());
            }
            Step::Retire => {
                let server = self.relay.as_ref().map_or(0, |r| r.server);
                if let Some(addr) = self.relay_server() {
                    warnings::connection_retired(addr, self.config.downstream.announce_client, now);
                }
                // A new connection, never a pooled one: that one might be as unfit.
                self.connect(now, server, false, false);
            }
            Step::Refused(reply) => {
                log::info!(
                    "downstream refused the HELO name of {}: {} {}",
                    self.peer.client,
                    reply.code,
                    reply.lines.first().map_or("", String::as_str)
                );
                self.downstream_failed_with(now, "client's HELO refused", reply);
            }
            Step::StartTls => {
                let Some(relay) = self.relay.as_deref_mut() else {
                    return;
                };
                relay.link = Link::StartingTls;
                self.actions.push_back(Action::StartTlsDownstream(relay.id));
                self.timers.downstream = Some(now + self.config.timeouts.command);
            }
            Step::RetryWithoutTls => {
                let Some((server, plain_retry)) =
                    self.relay.as_ref().map(|r| (r.server, r.plain_retry))
                else {
                    return;
                };
                log::info!(
                    "downstream TLS handshake failed for {}; retrying in plain text",
                    self.peer.client
                );
                if plain_retry {
                    self.downstream_failed(now, "TLS retry failed");
                } else {
                    self.connect(now, server, true, false);
                }
            }
            Step::TlsFailed(failure) => {
                log::warn!(
                    "downstream TLS required but failed for {}: {failure}",
                    self.peer.client
                );
                self.downstream_failed_with(now, "TLS required", failure.client_reply());
            }
        }
    }

    /// The TLS handshake towards the downstream failed or stalled.
    pub(super) fn downstream_tls_failed(&mut self, now: Instant) {
        let step = self.relay.as_deref_mut().and_then(|relay| {
            (relay.link == Link::StartingTls).then(|| relay.handshake.handle_tls_failed())
        });
        match step {
            Some(step) => self.on_handshake_step(now, step),
            None => self.downstream_failed(now, "TLS failure without STARTTLS"),
        }
    }

    /// The handshake is done: MAIL goes out if the client is waiting for it.
    pub(super) fn relay_ready(&mut self, now: Instant) {
        if let Some(relay) = self.relay.as_deref_mut() {
            relay.link = Link::Ready;
        }
        self.timers.downstream = None;
        if matches!(self.phase, Phase::Waiting(Pending::Mail)) {
            self.send_mail(now);
        }
    }

    /// `mode = "multiplexing"`: hands the downstream back to the pool once no reply is
    /// outstanding and nothing is left to send, so it serves the next transaction, of this
    /// client or another (announced afresh). `abandoned`: the client is gone, and an open
    /// transaction goes along marked for `RSET`; otherwise only a connection with no
    /// transaction open is released. Returns whether it did.
    pub(super) fn release_relay_if_clean(&mut self, abandoned: bool) -> bool {
        let awaiting = matches!(self.phase, Phase::Waiting(p) if p != Pending::Greylist);
        if self.config.downstream.mode != DownstreamMode::Multiplexing || awaiting {
            return false;
        }
        let Some(relay) = self.relay.as_deref_mut() else {
            return false;
        };
        // RSETs not handed out yet (the client reset, then left): the next user's own RSET
        // does the same, so they need not be sent.
        const RSET: &[u8] = b"RSET\r\n";
        let unsent_resets = abandoned
            && relay.swallow > 0
            && relay.outbox.len() == RSET.len() * relay.swallow as usize
            && relay.outbox.chunks(RSET.len()).all(|chunk| chunk == RSET);
        if unsent_resets {
            relay.outbox.clear();
            relay.swallow = 0;
            relay.in_transaction = true;
        }
        let clean = relay.link == Link::Ready
            && relay.swallow == 0
            && !relay.mid_data
            && relay.outbox.is_empty();
        if !clean || (relay.in_transaction && !abandoned) {
            return false;
        }
        let link = relay.id;
        let carried = relay.handshake.carried(relay.in_transaction);
        self.relay = None;
        self.timers.downstream = None;
        self.actions
            .push_back(Action::ReleaseDownstream { link, carried });
        true
    }

    /// Closes the downstream connection in use: politely (QUIT) once it greeted us, abruptly
    /// (nothing more sent) when a body is half-sent, so the partial message is never
    /// delivered, or when its state is unknown. What was not handed out for it is dropped.
    pub(super) fn drop_relay(&mut self) {
        self.timers.downstream = None;
        let Some(relay) = self.relay.take() else {
            return;
        };
        let quit = !relay.mid_data && relay.link != Link::Connecting && relay.handshake.may_quit();
        self.actions.push_back(Action::CloseDownstream {
            link: relay.id,
            quit,
        });
    }

    pub(super) fn reset_transaction(&mut self) {
        self.tx = None;
        if let Some(relay) = self.relay.as_deref_mut()
            && relay.in_transaction
        {
            // Keep the downstream in step; its 250 is read and dropped.
            relay.in_transaction = false;
            relay.swallow += 1;
            relay.outbox.extend_from_slice(b"RSET\r\n");
        }
    }

    /// Bytes waiting in the downstream connection's outbox.
    pub(super) fn relay_outbox_len(&self) -> usize {
        self.relay.as_deref().map_or(0, |relay| relay.outbox.len())
    }
}
