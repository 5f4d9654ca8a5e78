//! The session's side of the relay ([`Relay`], `crate::downstream::relay`, drives the
//! downstream connection itself): which client command becomes which relay call, the
//! downstream's events fed to it, and what its replies and failures mean for the client (a
//! failure on the relay path is a `4xx`, so the sender retries).

use std::collections::VecDeque;
use std::time::Instant;

use crate::downstream::dialog::ClientIdentity;
use crate::downstream::relay::{
    Context, Destination, DownstreamEvent, Event, LinkId, LinkIo, Read, Relay,
};
use crate::policy::reputation::Event as ReputationEvent;
use crate::policy::screening::Checks;
use crate::smtp::data::DataDecoder;
use crate::smtp::reply::Reply;

pub(super) use crate::downstream::relay::downstream_lost;

use super::commands::Pending;
use super::{Action, Peer, Phase, Session};

impl From<LinkIo> for Action {
    fn from(io: LinkIo) -> Action {
        match io {
            LinkIo::Connect { link, addr, via } => Action::ConnectDownstream { link, addr, via },
            LinkIo::StartTls(link) => Action::StartTlsDownstream(link),
            LinkIo::Release { link, carried } => Action::ReleaseDownstream { link, carried },
            LinkIo::Close { link, quit } => Action::CloseDownstream { link, quit },
        }
    }
}

/// Who the client is, for XCLIENT and PROXY (a free function so it borrows fields, not `self`).
fn identity<'a>(
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

/// The close line's result for a refused command: `rejected` for a 5xx, else `tempfail`.
pub(super) fn failure(reply: &Reply) -> &'static str {
    if reply.code >= 500 {
        "rejected"
    } else {
        "tempfail"
    }
}

/// A transparent session's original destination (DESIGN.md §9): the address the client
/// connected to, connected to from the client's own address with `spoof_source`.
fn destination(peer: &Peer) -> Option<Destination> {
    peer.transparent.then(|| Destination {
        addr: peer.local,
        from: peer.spoof_source.then_some(peer.client.ip()),
    })
}

impl Session {
    /// Feeds an event of downstream connection `link`; for `Data` returns the bytes consumed,
    /// else 0. Events of a connection the session no longer uses are swallowed.
    pub fn handle_downstream(
        &mut self,
        now: Instant,
        link: LinkId,
        event: DownstreamEvent<'_>,
    ) -> usize {
        if self.is_closed() || !self.relay.is_current(link) {
            return match event {
                DownstreamEvent::Data(bytes) => bytes.len(),
                _ => 0,
            };
        }
        let used = match event {
            DownstreamEvent::Data(bytes) => self.read_downstream(now, bytes),
            event => {
                let (relay, io, ctx) = self.relay_parts(now);
                let event = relay.handle_event(&ctx, event, io);
                self.on_relay(now, event);
                0
            }
        };
        self.check_shutdown(now);
        used
    }

    /// The relay, the action queue and what the relay needs to know, borrowed apart.
    fn relay_parts(&mut self, now: Instant) -> (&mut Relay, &mut VecDeque<Action>, Context<'_>) {
        let ctx = Context {
            now,
            config: &self.config,
            who: identity(&self.peer, self.helo.as_deref(), self.esmtp, &self.checks),
            health: self.health.as_deref(),
            destination: destination(&self.peer),
        };
        (&mut self.relay, &mut self.actions, ctx)
    }

    /// Acts on what a relay call means for the client.
    fn on_relay(&mut self, now: Instant, event: Option<Event>) {
        match event {
            None => {}
            // The handshake is done: MAIL goes out if the client is waiting for it.
            Some(Event::Ready) => {
                if matches!(self.phase, Phase::Waiting(Pending::Mail)) {
                    self.send_mail(now);
                }
            }
            Some(Event::Reply(reply)) => self.on_downstream_reply(now, reply),
            Some(Event::Failed { why, reply }) => self.downstream_failed_with(now, why, reply),
        }
    }

    /// The downstream's deadline, when it has passed.
    pub(super) fn relay_timeout(&mut self, now: Instant) {
        let (relay, io, ctx) = self.relay_parts(now);
        let event = relay.handle_timeout(&ctx, io);
        self.on_relay(now, event);
    }

    /// MAIL for the current transaction (the session is `Waiting(Mail)`): see
    /// [`Relay::start_mail`].
    pub(super) fn start_mail(&mut self, now: Instant) {
        self.phase = Phase::Waiting(Pending::Mail);
        let (relay, io, ctx) = self.relay_parts(now);
        let event = relay.start_mail(&ctx, io);
        self.on_relay(now, event);
    }

    fn read_downstream(&mut self, now: Instant, bytes: &[u8]) -> usize {
        let mut consumed = 0;
        while !self.is_closed() {
            let rest = bytes.get(consumed..).unwrap_or_default();
            let waits = matches!(self.phase, Phase::Waiting(_));
            let (relay, io, ctx) = self.relay_parts(now);
            match relay.read(&ctx, rest, waits, io) {
                Read::Reply(used, event) => {
                    consumed += used;
                    self.on_relay(now, event);
                    self.release_relay_if_clean(false);
                }
                Read::Partial => return consumed,
                Read::Discard(event) => {
                    self.on_relay(now, event);
                    break;
                }
            }
        }
        bytes.len()
    }

    /// The downstream's reply to the relayed command the client waits for.
    fn on_downstream_reply(&mut self, now: Instant, reply: Reply) {
        let Phase::Waiting(pending) = self.phase else {
            // Unsolicited: typically the downstream's own 421 before it hangs up.
            return self.downstream_failed(now, "unexpected reply");
        };
        if !pending.is_downstream() {
            // Nothing was sent downstream for this command.
            return self.downstream_failed(now, "unexpected reply");
        }
        // The relayed command is complete: the client's idle time starts again.
        self.timers.idle = Some(now + self.config.timeouts.idle);
        if reply.code == 421 {
            // The downstream is closing: for our client that is a temporary failure of this
            // command, not of the whole session.
            return self.downstream_failed(now, "downstream sent 421");
        }
        let positive = reply.code / 100 == 2;
        if !positive {
            self.last_failure = Some(failure(&reply));
        }
        self.phase = Phase::Command;
        match pending {
            Pending::Mail => {
                let after_mail = self.tx.as_deref_mut().and_then(|tx| tx.after_mail.take());
                if !positive {
                    self.relay.end_transaction();
                    match self.tx.as_deref_mut() {
                        // The client had its 250 to MAIL locally: the transaction stays, and
                        // the refusal answers the recipient that was waiting for it.
                        Some(tx) if after_mail.is_some() => tx.relayed = false,
                        _ => self.tx = None,
                    }
                } else if let Some(to) = after_mail {
                    if let Some(tx) = self.tx.as_deref_mut() {
                        tx.rcpt_sent = Some(to.clone());
                    }
                    let queued = self.relay.send_rcpt(now, &self.config, &to);
                    return self.await_downstream(now, queued, Pending::Rcpt);
                }
                self.relay_reply(reply);
            }
            Pending::Rcpt => {
                let scans = self.config.content.scans();
                if let Some(tx) = self.tx.as_deref_mut() {
                    let sent = tx.rcpt_sent.take();
                    if positive {
                        tx.accepted += 1;
                        if let Some(to) = sent.filter(|_| scans) {
                            tx.recipients.push(to.into());
                        }
                    }
                }
                self.relay_reply(reply);
            }
            Pending::Data if reply.code == 354 && self.start_forwarding(now) => {}
            Pending::Data if reply.code == 354 => {
                self.reply(Reply::without_enhanced(
                    354,
                    "End data with <CR><LF>.<CR><LF>",
                ));
                self.start_body(now);
            }
            Pending::Data => {
                // A scanned message the downstream will not take: the client had tarmac's 354
                // and sent its body, so this answers its final dot, which ends the client's
                // transaction (RFC 5321 §4.1.1.4). The downstream's is still open (a refused
                // DATA does not end it): RSET keeps it in step, so the next MAIL on this
                // connection is not a nested one. A streamed message's client keeps its
                // transaction, as before.
                if self.forget_outgoing() {
                    self.reset_transaction();
                }
                self.relay_reply(reply);
            }
            Pending::Greylist | Pending::Milter(_) | Pending::Scan => {}
            Pending::EndOfData => {
                if positive {
                    self.record_reputation(ReputationEvent::Delivered);
                    self.msgs += 1;
                    self.rcpts += self.tx.as_deref().map_or(0, |tx| tx.accepted);
                    self.last_failure = None;
                }
                self.tx = None;
                self.relay.end_transaction();
                self.relay_reply(reply);
            }
        }
    }

    fn start_body(&mut self, now: Instant) {
        let decoder = DataDecoder::new(
            self.config.limits.bare_newline,
            self.config.limits.max_message_size,
        );
        self.phase = Phase::Data(Box::new(decoder));
        self.timers.data = Some(now + self.config.timeouts.data);
        self.timers.idle = None;
        let header = self.received(now);
        self.relay.start_body(|out| out.extend_from_slice(&header));
    }

    /// Sends MAIL for the current transaction, with the parameters the downstream offers.
    fn send_mail(&mut self, now: Instant) {
        let Some(tx) = self.tx.as_deref_mut() else {
            return;
        };
        tx.relayed = true;
        let queued = self
            .relay
            .send_mail(now, &self.config, &tx.from, &tx.params);
        self.await_downstream(now, queued, Pending::Mail);
    }

    /// Waits for the downstream's reply to the command the relay just `queued`. Only a ready
    /// connection takes one: without one nothing was written anywhere and the waiting command
    /// gets `451 4.4.2`.
    pub(super) fn await_downstream(&mut self, now: Instant, queued: bool, pending: Pending) {
        self.phase = Phase::Waiting(pending);
        if !queued {
            self.downstream_failed(now, "no ready downstream connection");
        }
    }

    /// The downstream failed (refused, broke, timed out, or said something unexpected): drop
    /// it; the command waiting for it gets `451 4.4.2`, and the transaction is marked broken.
    pub(super) fn downstream_failed(&mut self, now: Instant, why: &str) {
        self.downstream_failed_with(now, why, downstream_lost());
    }

    /// As `downstream_failed`, answering the waiting command with `reply`.
    fn downstream_failed_with(&mut self, now: Instant, why: &str, reply: Reply) {
        log::debug!("downstream failed for {}: {why}", self.peer.client);
        self.drop_relay();
        match self.phase {
            Phase::Waiting(pending) => {
                self.phase = Phase::Command;
                self.timers.idle = Some(now + self.config.timeouts.idle);
                self.last_failure = Some(failure(&reply));
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
            // Mid-way through a scanned message: its final dot is answered now.
            Phase::Forwarding(_) => {
                self.phase = Phase::Command;
                self.timers.data = None;
                self.timers.idle = Some(now + self.config.timeouts.idle);
                self.tx = None;
                self.last_failure = Some("tempfail");
                self.relay_reply(reply);
            }
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

    /// `mode = "multiplexing"`: hands the downstream back to the pool when it is clean (see
    /// [`Relay::release`]) and no reply is awaited. Returns whether it did.
    pub(super) fn release_relay_if_clean(&mut self, abandoned: bool) -> bool {
        let awaiting = matches!(self.phase, Phase::Waiting(p) if p.is_downstream())
            || matches!(self.phase, Phase::Forwarding(_));
        !awaiting
            && self
                .relay
                .release(&self.config, abandoned, &mut self.actions)
    }

    /// Lets go of the downstream connection: back to the pool when clean, else closed.
    pub(super) fn let_go_of_relay(&mut self, abandoned: bool) {
        if !self.release_relay_if_clean(abandoned) {
            self.drop_relay();
        }
    }

    /// Closes the downstream connection in use (see [`Relay::close`]).
    pub(super) fn drop_relay(&mut self) {
        self.relay.close(&mut self.actions);
    }

    pub(super) fn reset_transaction(&mut self) {
        self.tx = None;
        self.abort_milter_transaction();
        self.relay.reset();
    }
}
