//! Content inspection, the session's side (DESIGN.md §7): the milters' stages asked before
//! the banner, HELO, MAIL and RCPT go on; the body held (memory, then an unnamed spool file)
//! with tarmac answering `354` itself; the held message handed to the scanners at the final
//! dot; then, if they let it through, DATA to the downstream and the message, with their
//! changes, fed to it as the connection drains. The client's `250` still comes only after
//! the downstream's. While the body is held the downstream session gets a NOOP at most once
//! a minute, so it does not time out.
//!
//! ```text
//! greeting ──Milter(Connect)──▶ Waiting(Milter) ──answer──▶ banner | 554 | 421+close
//! EHLO/MAIL/RCPT ──Milter(step)──▶ Waiting(Milter) ──answer──▶ as without milters | refusal
//! DATA ──(354 from tarmac)──▶ Data(holding) ──CRLF.CRLF──▶ Waiting(Scan) ──Scanned──▶
//!     relay: DATA ─354─▶ Forwarding ──all out──▶ Waiting(EndOfData) ──reply──▶ client
//!     refuse / tempfail / discard: the reply (250 for a discard), RSET downstream
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::content::edit::Outgoing;
use crate::content::held::Held;
use crate::content::{Edit, Verdict};
use crate::policy::content::{self, MilterStage, StageDecision};
use crate::smtp::data::{DataDecoder, DataViolation};
use crate::smtp::question::{MilterStep, Question, ScanJob, Scanned, Tls};
use crate::smtp::received::{Trace, write_received};
use crate::smtp::reply::Reply;

use super::closing::CloseReason;
use super::commands::Pending;
use super::relaying::{downstream_lost, failure};
use super::{Action, DOWNSTREAM_OUTBOX_CAP, Phase, Session, TlsStage};

/// How often a held downstream session gets a NOOP (DESIGN.md §7: at most one a minute; far
/// below Postfix's 300 s `smtpd_timeout`).
const KEEPALIVE_EVERY: Duration = Duration::from_secs(60);

/// The session's content-inspection state; all empty without scanners.
#[derive(Debug, Default)]
pub(super) struct Scanning {
    /// `Question::Milter(Connect)` went out: the conversation is open until `Quit`.
    milters_open: bool,
    /// MAIL went to the milters and no message or abort ended that transaction.
    milter_tx: bool,
    /// The EHLO/HELO reply, waiting for the milters' HELO answer.
    helo_reply: Option<Reply>,
    /// The recipient waiting for the milters' RCPT answer.
    rcpt: Option<Box<str>>,
    /// The milters discarded the transaction's message (at MAIL or RCPT).
    discard: bool,
    /// The message being held (while `Phase::Data` holds, and during the scan it is the
    /// scanners').
    held: Option<Held>,
    /// Decoded body bytes on their way into `held`.
    decoded: Vec<u8>,
    /// Appending to the held message failed (the disk): the final dot gets `451`.
    hold_failed: bool,
    /// The scanned message on its way to the downstream.
    outgoing: Option<Box<Outgoing>>,
    /// When the held downstream session gets its next NOOP.
    pub(super) keepalive: Option<Instant>,
    /// The cipher suite of the client's TLS, when known (rspamd's `TLS-Cipher`, `{cipher}`).
    pub(super) tls_cipher: Option<&'static str>,
    /// Messages scanned on this connection (the `n` of `Queue-Id`).
    scanned: u32,
    /// Messages the scanners discarded (the client had its `250`).
    pub(super) discarded: u32,
    /// `scan=` of the last scanned message; empty: none.
    pub(super) marks: String,
}

impl Session {
    /// The scanning state, made on first use.
    pub(super) fn scan_mut(&mut self) -> &mut Scanning {
        self.scan.get_or_insert_with(Box::default)
    }

    /// Whether a message is being held (`Phase::Data` then feeds it, not the relay).
    pub(super) fn is_holding_message(&self) -> bool {
        self.scan.as_deref().is_some_and(|scan| scan.held.is_some())
    }

    /// When the held downstream session gets its next NOOP, if one is due at all.
    pub(super) fn keepalive(&self) -> Option<Instant> {
        self.scan.as_deref().and_then(|scan| scan.keepalive)
    }

    /// Whether the milters see this session's stages.
    fn milters_on(&self) -> bool {
        self.scan.as_deref().is_some_and(|scan| scan.milters_open)
    }

    /// The greeting, once the verdict lets the client talk: through the milters' connect
    /// stage when there are milters, else at once.
    pub(super) fn greet_through_milters(&mut self) {
        if self.config.content.milters.is_empty() {
            return self.greet();
        }
        self.scan_mut().milters_open = true;
        self.phase = Phase::Waiting(Pending::Milter(MilterStage::Connect));
        self.actions
            .push_back(Action::Ask(Question::Milter(MilterStep::Connect {
                content: Box::new(self.config.content.clone()),
                hostname: self.config.server.hostname.clone(),
                linger: self.milter_linger(),
                client: self.peer.client,
                name: self.checks.rdns_name().map(Arc::from),
            })));
    }

    /// The EHLO/HELO `reply`, after the milters' HELO stage when there are milters.
    pub(super) fn helo_through_milters(&mut self, name: &str, reply: Reply) {
        if !self.milters_on() {
            return self.reply(reply);
        }
        self.scan_mut().helo_reply = Some(reply);
        self.phase = Phase::Waiting(Pending::Milter(MilterStage::Helo));
        let tls = self.scan_tls();
        self.actions
            .push_back(Action::Ask(Question::Milter(MilterStep::Helo {
                name: name.to_owned(),
                tls,
            })));
    }

    /// MAIL, after the milters' MAIL stage when there are milters.
    pub(super) fn mail_through_milters(&mut self, now: Instant) {
        if !self.milters_on() {
            self.phase = Phase::Waiting(Pending::Mail);
            return self.start_mail(now);
        }
        let Some(tx) = self.tx.as_deref() else {
            return;
        };
        let step = MilterStep::Mail {
            from: tx.from.clone(),
            args: tx.params.to_args(),
        };
        self.abort_milter_transaction();
        self.scan_mut().milter_tx = true;
        self.scan_mut().discard = false;
        self.phase = Phase::Waiting(Pending::Milter(MilterStage::Mail));
        self.actions.push_back(Action::Ask(Question::Milter(step)));
    }

    /// A recipient the local checks let through: after the milters' RCPT stage when there
    /// are milters, then to the downstream.
    pub(super) fn rcpt_through_milters(&mut self, now: Instant, to: &str) {
        if !self.milters_on() {
            return self.relay_rcpt(now, to);
        }
        self.scan_mut().rcpt = Some(to.into());
        self.phase = Phase::Waiting(Pending::Milter(MilterStage::Rcpt));
        self.actions
            .push_back(Action::Ask(Question::Milter(MilterStep::Rcpt {
                to: to.to_owned(),
            })));
    }

    /// The milters' answer to the stage the session waits on.
    pub(super) fn on_milter(&mut self, now: Instant, verdict: Verdict) {
        let Phase::Waiting(Pending::Milter(stage)) = self.phase else {
            return;
        };
        self.phase = Phase::Command;
        let decision = content::at_stage(stage, &verdict);
        if decision != StageDecision::Proceed {
            log::info!(
                "milter: {stage:?} of {} answered {verdict:?}",
                self.peer.client
            );
        }
        match (stage, decision) {
            (_, StageDecision::Close(reply)) => self.close(CloseReason::Refused, Some(reply)),
            (MilterStage::Connect, StageDecision::Refuse(reply)) => {
                self.blocked = Some(super::greeting::Blocked::Immediate);
                self.last_failure = Some("rejected");
                self.say(reply);
            }
            (MilterStage::Connect, _) => self.greet(),
            (MilterStage::Helo, StageDecision::Refuse(reply)) => {
                self.scan_mut().helo_reply = None;
                self.helo = None;
                self.reply(reply);
            }
            (MilterStage::Helo, _) => {
                if let Some(reply) = self.scan_mut().helo_reply.take() {
                    self.reply(reply);
                }
            }
            (MilterStage::Mail, StageDecision::Refuse(reply)) => {
                self.scan_mut().milter_tx = false;
                self.tx = None;
                self.reply(reply);
            }
            (MilterStage::Mail, decision) => {
                self.scan_mut().discard = decision == StageDecision::Discard;
                self.phase = Phase::Waiting(Pending::Mail);
                self.start_mail(now);
            }
            (MilterStage::Rcpt, decision) => {
                let Some(to) = self.scan_mut().rcpt.take() else {
                    return;
                };
                match decision {
                    StageDecision::Refuse(reply) => self.reply(reply),
                    decision => {
                        self.scan_mut().discard |= decision == StageDecision::Discard;
                        self.relay_rcpt(now, &to);
                    }
                }
            }
        }
    }

    /// The client's transaction ended before its message reached the milters: they are told.
    pub(super) fn abort_milter_transaction(&mut self) {
        let Some(scan) = self.scan.as_deref_mut() else {
            return;
        };
        scan.discard = false;
        if std::mem::take(&mut scan.milter_tx) {
            self.actions
                .push_back(Action::Ask(Question::Milter(MilterStep::Abort)));
        }
    }

    /// How long a milter conversation may go without a step: longer than this session can
    /// wait for anything (its idle and data timeouts, and a few scanner timeouts).
    fn milter_linger(&self) -> Duration {
        let timeouts = &self.config.timeouts;
        timeouts.idle + timeouts.data + self.config.content.timeout.saturating_mul(4)
    }

    /// The client's TLS as the scanners are told it.
    fn scan_tls(&self) -> Option<Tls> {
        match self.tls {
            TlsStage::Active(version) => Some(Tls {
                version: version.as_str(),
                cipher: self
                    .scan
                    .as_deref()
                    .and_then(|scan| scan.tls_cipher)
                    .unwrap_or_default(),
            }),
            _ => None,
        }
    }

    /// The session is over: the milters' conversation ends.
    pub(super) fn quit_milters(&mut self) {
        let Some(scan) = self.scan.as_deref_mut() else {
            return;
        };
        if std::mem::take(&mut scan.milters_open) {
            scan.milter_tx = false;
            self.actions
                .push_back(Action::Ask(Question::Milter(MilterStep::Quit)));
        }
    }

    /// DATA with scanners: tarmac answers `354` and holds the body, tarmac's `Received:`
    /// first; nothing goes to the downstream until the scanners have answered.
    pub(super) fn start_holding(&mut self, now: Instant) {
        self.reply(Reply::without_enhanced(
            354,
            "End data with <CR><LF>.<CR><LF>",
        ));
        let limits = &self.config.limits;
        let decoder = DataDecoder::unstuffed(limits.bare_newline, limits.max_message_size);
        self.phase = Phase::Data(Box::new(decoder));
        self.timers.data = Some(now + self.config.timeouts.data);
        self.timers.idle = None;
        self.scan_mut().keepalive = Some(now + KEEPALIVE_EVERY);
        let content = &self.config.content;
        let mut held = Held::new(
            content.spool_after,
            self.config
                .server
                .state_dir
                .join(crate::content::held::SPOOL),
        );
        let header = self.received(now);
        self.scan_mut().hold_failed = held.append(&header).is_err();
        self.scan_mut().held = Some(held);
    }

    /// Decodes client body bytes into the held message; returns what `decode` did.
    pub(super) fn hold_body(&mut self, bytes: &[u8]) -> Option<crate::smtp::data::Decoded> {
        let Phase::Data(decoder) = &mut self.phase else {
            return None;
        };
        let scan = self.scan.get_or_insert_with(Box::default);
        scan.decoded.clear();
        let decoded = decoder.decode(bytes, &mut scan.decoded);
        if let Some(held) = scan.held.as_mut()
            && !scan.hold_failed
            && held.append(&scan.decoded).is_err()
        {
            log::warn!("content: cannot hold a message in the spool; it gets 451");
            scan.hold_failed = true;
        }
        if scan.decoded.capacity() > 64 * 1024 {
            scan.decoded = Vec::new();
        }
        Some(decoded)
    }

    /// The final dot of a held message: refused as a streamed one would be, discarded, or
    /// handed to the scanners.
    pub(super) fn end_of_held(&mut self, now: Instant, violation: Option<DataViolation>) {
        let Some(held) = self.scan_mut().held.take() else {
            return;
        };
        self.scan_mut().keepalive = None;
        let refusal = if let Some(violation) = violation {
            Some(violation.reply())
        } else if self.scan_mut().hold_failed {
            Some(Reply::new(
                451,
                "4.3.0",
                "Error: cannot hold the message, please try again later",
            ))
        } else {
            None
        };
        if let Some(reply) = refusal {
            self.end_scanned_transaction(failure(&reply));
            return self.reply(reply);
        }
        if self.scan_mut().discard {
            self.scan_mut().discarded += 1;
            self.end_scanned_transaction("discarded");
            return self.reply(Reply::new(250, "2.0.0", "Ok"));
        }
        let number = {
            let scan = self.scan_mut();
            scan.scanned += 1;
            scan.scanned
        };
        let tls = self.scan_tls();
        let Some(tx) = self.tx.as_deref() else {
            return;
        };
        let job = ScanJob {
            content: self.config.content.clone(),
            hostname: self.config.server.hostname.clone(),
            held,
            client: self.peer.client.ip().to_canonical(),
            helo: String::from_utf8_lossy(self.helo.as_deref().unwrap_or_default()).into_owned(),
            name: self.checks.rdns_name().map(Arc::from),
            from: tx.from.clone(),
            rcpts: tx.recipients.clone(),
            queue_id: format!("{:x}.{}", self.peer.conn, number),
            tls,
        };
        // The milters saw this message through to its end: their transaction is over.
        self.scan_mut().milter_tx = false;
        self.phase = Phase::Waiting(Pending::Scan);
        self.scan_mut().keepalive = Some(now + KEEPALIVE_EVERY);
        self.actions
            .push_back(Action::Ask(Question::Scan(Box::new(job))));
    }

    /// The scanners' answer: relay the message with their changes, or answer for them.
    pub(super) fn on_scanned(&mut self, now: Instant, scanned: Scanned) {
        if !matches!(self.phase, Phase::Waiting(Pending::Scan)) {
            return;
        }
        self.phase = Phase::Command;
        self.scan_mut().keepalive = None;
        self.timers.idle = Some(now + self.config.timeouts.idle);
        let Scanned {
            held,
            verdict,
            edits,
            marks,
        } = scanned;
        log::info!(
            "scan: conn={:x} client={} from=<{}> scan={marks} verdict={}",
            self.peer.conn,
            self.peer.client,
            self.tx.as_deref().map_or("", |tx| tx.from.as_str()),
            verdict_name(&verdict),
        );
        self.scan_mut().marks = marks;
        if verdict == Verdict::Discard {
            self.scan_mut().discarded += 1;
            self.end_scanned_transaction("discarded");
            return self.reply(Reply::new(250, "2.0.0", "Ok"));
        }
        if let Some(reply) = content::message_refusal(&verdict) {
            self.end_scanned_transaction(failure(&reply));
            return self.reply(reply);
        }
        self.relay_scanned(now, held, &edits);
    }

    /// Sends DATA for a message the scanners let through; the message follows the `354`.
    fn relay_scanned(&mut self, now: Instant, held: Held, edits: &[Edit]) {
        let outgoing = match Outgoing::edited(held, edits) {
            Ok(outgoing) => outgoing,
            Err(e) => {
                log::warn!("content: cannot read a held message back: {e}");
                self.end_scanned_transaction("tempfail");
                return self.reply(Reply::new(
                    451,
                    "4.3.0",
                    "Error: cannot relay the message, please try again later",
                ));
            }
        };
        if !self.relay.is_in_transaction() {
            // The downstream went away while the message was held.
            self.tx = None;
            self.last_failure = Some("tempfail");
            return self.reply(downstream_lost());
        }
        self.scan_mut().outgoing = Some(Box::new(outgoing));
        let queued = self.relay.send_data(now, &self.config);
        self.await_downstream(now, queued, Pending::Data);
    }

    /// Whether the `354` the downstream just sent is for a scanned message (the client had
    /// tarmac's own): then the message goes out now.
    pub(super) fn start_forwarding(&mut self, now: Instant) -> bool {
        let Some(outgoing) = self
            .scan
            .as_deref_mut()
            .and_then(|scan| scan.outgoing.take())
        else {
            return false;
        };
        self.relay.start_body(|_| {});
        self.phase = Phase::Forwarding(outgoing);
        self.forward(now);
        true
    }

    /// The downstream answered DATA with something other than 354: a scanned message waiting
    /// for it is dropped. Returns whether there was one.
    pub(super) fn forget_outgoing(&mut self) -> bool {
        self.scan
            .as_deref_mut()
            .is_some_and(|scan| scan.outgoing.take().is_some())
    }

    /// Feeds the scanned message to the downstream connection's outbox up to its cap; the
    /// final dot once it is all out.
    pub(super) fn forward(&mut self, now: Instant) {
        let Phase::Forwarding(outgoing) = &mut self.phase else {
            return;
        };
        let room = DOWNSTREAM_OUTBOX_CAP.saturating_sub(self.relay.outbox_len());
        if room == 0 {
            return;
        }
        let Some(outbox) = self.relay.body() else {
            return;
        };
        let before = outbox.len();
        let encoded = outgoing.encode(outbox, room);
        let progressed = outbox.len() > before;
        match encoded {
            Ok(false) => {
                if progressed {
                    self.timers.data = Some(now + self.config.timeouts.data);
                }
            }
            Ok(true) => {
                self.timers.data = None;
                self.phase = Phase::Command;
                if self.relay.send_dot(now, &self.config) {
                    self.phase = Phase::Waiting(Pending::EndOfData);
                } else {
                    self.tx = None;
                    self.last_failure = Some("tempfail");
                    self.reply(downstream_lost());
                }
            }
            Err(e) => {
                log::warn!("content: cannot read a held message back: {e}");
                // Part of it went out: only dropping the connection keeps it undelivered.
                self.drop_relay();
                self.phase = Phase::Command;
                self.timers.data = None;
                self.tx = None;
                self.last_failure = Some("tempfail");
                self.reply(Reply::new(
                    451,
                    "4.3.0",
                    "Error: cannot relay the message, please try again later",
                ));
            }
        }
    }

    /// While a message is held or scanned: a NOOP keeps the downstream session alive.
    pub(super) fn keep_downstream_alive(&mut self, now: Instant) {
        if let Some(scan) = self.scan.as_deref_mut()
            && super::expired(scan.keepalive, now)
        {
            self.relay.send_noop();
            scan.keepalive = Some(now + KEEPALIVE_EVERY);
        }
    }

    /// A held or scanned message's transaction ended without relaying it (`why` is the close
    /// line's result unless a message was delivered): the downstream is reset, the milters are
    /// told when they did not see its end.
    fn end_scanned_transaction(&mut self, why: &'static str) {
        self.scan_mut().held = None;
        self.scan_mut().outgoing = None;
        // A discarded message counts as taken, as a delivered one does: earlier refusals are
        // forgiven.
        self.last_failure = (why != "discarded").then_some(why);
        self.abort_milter_transaction();
        self.tx = None;
        self.relay.reset();
    }

    /// tarmac's `Received:` header for the message starting at `now`, from the session's
    /// fields.
    pub(super) fn received(&self, now: Instant) -> Vec<u8> {
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
        let mut header = Vec::new();
        write_received(&trace, &mut header);
        header
    }
}

/// The verdict in the scan log line.
fn verdict_name(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Continue | Verdict::Accept => "relay",
        Verdict::Reject(_) => "reject",
        Verdict::TempFail(_) => "tempfail",
        Verdict::Discard => "discard",
    }
}
