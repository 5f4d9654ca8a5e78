//! The client's commands: line reading (through [`LineReceiver`](super::framing::LineReceiver)),
//! dispatch, the local replies, and MAIL, RCPT and DATA up to the point where they go to the
//! downstream (`relaying.rs`); greylisting a recipient; the end of a body.

use std::sync::Arc;
use std::time::Instant;

use crate::policy::rates::network_name;
use crate::policy::reputation::Event;
use crate::policy::screening::ListedBy;
use crate::policy::{ListMatch, RuleAction, Stage};
use crate::smtp::command::{Command, CommandError, MailParams, parse_command};
use crate::smtp::data::DataViolation;
use crate::smtp::log_text::escape;
use crate::smtp::proxy::{ProxyStart, proxy_start};
use crate::smtp::question::Question;
use crate::smtp::reply::Reply;
use crate::state::greylist::{self, GreylistOutcome, GreylistTimes, KeyFacts};

use crate::policy::screening::greylist_applies;

use super::closing::{CloseReason, too_many_errors};
use super::framing::Received;
use super::greeting::{Blocked, RuleOutcome};
use super::relaying::downstream_lost;
use super::{Action, CommandStage, Phase, Session, TlsStage};

/// The client's current mail transaction.
#[derive(Debug)]
pub(super) struct Transaction {
    pub(super) from: String,
    pub(super) params: MailParams,
    /// RCPTs relayed (accepted or not); capped by `max_recipients`.
    pub(super) attempted: usize,
    /// RCPTs the downstream accepted.
    pub(super) accepted: u32,
    /// The downstream went away mid-transaction: RCPT/DATA get 451 until RSET or a new MAIL.
    pub(super) broken: bool,
    /// The recipient waiting for the greylist's answer.
    pub(super) greylisting: Option<Box<str>>,
    /// MAIL was relayed to the downstream for this transaction. Not so after an enforce-mode
    /// reject answered MAIL locally: a recipient an `allow` rule lets through then opens the
    /// downstream and relays MAIL first (DESIGN.md §6).
    pub(super) relayed: bool,
    /// The recipient waiting for that late MAIL's reply.
    pub(super) after_mail: Option<Box<str>>,
    /// The recipient whose RCPT is on its way to the downstream.
    pub(super) rcpt_sent: Option<Box<str>>,
    /// The recipients the downstream accepted, kept only when scanners are configured (they
    /// are told: rspamd's `Rcpt`).
    pub(super) recipients: Vec<String>,
}

/// The client command a downstream reply is awaited for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pending {
    Mail,
    Rcpt,
    Data,
    EndOfData,
    /// Not the downstream: the greylist's answer for a RCPT (`Question::CheckGreylist`).
    Greylist,
    /// Not the downstream: the milters' answer for a stage (`Question::Milter`).
    Milter(crate::policy::content::MilterStage),
    /// Not the downstream: the scanners' answer for a held message (`Question::Scan`).
    Scan,
}

impl Pending {
    /// Whether the answer comes from the downstream (else from a local service).
    pub(super) fn is_downstream(self) -> bool {
        !matches!(self, Pending::Greylist | Pending::Milter(_) | Pending::Scan)
    }
}

/// The reply to a command whose answer never depends on the session's state.
fn fixed_reply(command: &Command<'_>) -> Option<Reply> {
    let (code, enhanced, text) = match command {
        Command::Noop => (250, "2.0.0", "Ok"),
        Command::Help => (
            214,
            "2.0.0",
            "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT",
        ),
        // RFC 5321 §3.5.3: 252 neither confirms nor denies, and tells address harvesters
        // nothing.
        Command::Vrfy => (
            252,
            "2.0.0",
            "Cannot VRFY user, but will accept message and attempt delivery",
        ),
        Command::Expn => (502, "5.5.1", "Error: EXPN not available"),
        Command::Auth => (503, "5.5.1", "Error: authentication not enabled"),
        Command::Bdat => (502, "5.5.1", "Error: CHUNKING not available, use DATA"),
        _ => return None,
    };
    Some(Reply::new(code, enhanced, text))
}

impl Session {
    /// Whether the client's first command is a PROXY header: looks at the start of the
    /// stream (the partial line kept plus `input`). Returns the bytes to take now: all of
    /// them once closed, none while a v2 signature's start holds a line end (taking it
    /// would answer the empty line), or `None` to read on as a command.
    pub(super) fn check_first_command(&mut self, input: &[u8]) -> Option<usize> {
        let mut head = [0u8; 12];
        let mut len = 0;
        for (slot, &byte) in head
            .iter_mut()
            .zip(self.lines.partial().iter().chain(input))
        {
            *slot = byte;
            len += 1;
        }
        match proxy_start(head.get(..len).unwrap_or_default()) {
            ProxyStart::Header => Some(self.stray_proxy_header(input.len())),
            ProxyStart::Undecided if input.contains(&b'\n') => Some(0),
            ProxyStart::Undecided | ProxyStart::NotProxy => None,
        }
    }

    /// Takes bytes of a command line; dispatches it once its LF arrives. Returns bytes used.
    pub(super) fn read_command(&mut self, now: Instant, input: &[u8]) -> usize {
        let discarding = self.lines.is_discarding();
        if !self.lines.has_completed()
            && !discarding
            && let Some(used) = self.check_first_command(input)
        {
            return used;
        }
        if !discarding && self.timers.command.is_none() {
            // Normally armed when the last reply was handed out; a partial line never moves
            // it (a client trickling bytes without ever finishing a command is still timed out).
            self.timers.command = Some(now + self.command_timeout());
        }
        let (used, received) = self
            .lines
            .receive(input, self.config.limits.max_line_length);
        match received {
            Received::Partial => {}
            Received::TooLong => {
                // RFC 5321 §4.5.3.1.4: a line over the limit is an error; resync at its LF.
                self.timers.command = None;
                self.line_error(Reply::new(500, "5.5.2", "Error: line too long"));
            }
            Received::Line(line) => {
                self.timers.command = None;
                self.timers.idle = Some(now + self.config.timeouts.idle);
                self.dispatch_line(now, &line);
                self.lines.recycle(line);
            }
        }
        used
    }

    /// Puts a reloaded configuration in force (a decision point: see `handle_reload`).
    pub(super) fn take_reload(&mut self) {
        if let Some(config) = self.pending_config.take() {
            self.config = config;
        }
    }

    pub(super) fn dispatch_line(&mut self, now: Instant, line: &[u8]) {
        self.take_reload();
        self.answering = CommandStage::Other;
        let Some(text) = line.strip_suffix(b"\r\n") else {
            // Only CRLF ends a command line; a bare LF is refused, not guessed at.
            self.line_error(Reply::new(500, "5.5.2", "Error: bare <LF> received"));
            return;
        };
        match parse_command(text) {
            Ok(command) => self.handle_command(now, command),
            Err(CommandError::Unknown) => self.line_error(CommandError::Unknown.reply()),
            Err(error) => self.reply(error.reply()),
        }
    }

    /// Counts a protocol error (unknown command, over-long line, bare LF, client XCLIENT);
    /// past `max_unknown_commands` the reply is `421` and the session closes.
    pub(super) fn line_error(&mut self, reply: Reply) {
        self.protocol_errors += 1;
        if self.protocol_errors > self.config.limits.max_unknown_commands {
            self.record_reputation(Event::ProtocolAbuse);
            let reply = too_many_errors(&self.config.server.hostname);
            self.close(CloseReason::TooManyErrors, Some(reply));
        } else {
            self.reply(reply);
        }
    }

    pub(super) fn handle_command(&mut self, now: Instant, command: Command<'_>) {
        // What the reply answers, for the refusals by stage (the final dot's reply answers
        // DATA's stage too: the session is in the body until then).
        self.answering = match command {
            Command::Ehlo(_) | Command::Helo(_) => CommandStage::Helo,
            Command::Mail { .. } => CommandStage::Mail,
            Command::Rcpt { .. } => CommandStage::Rcpt,
            Command::Data => CommandStage::Data,
            _ => CommandStage::Other,
        };
        match &self.blocked {
            _ if matches!(command, Command::Quit) => {}
            Some(Blocked::Immediate) => {
                return self.line_error(Reply::new(
                    503,
                    "5.7.1",
                    "Error: service unavailable; only QUIT is accepted",
                ));
            }
            Some(Blocked::Pregreet) => {
                return self.line_error(Reply::new(
                    554,
                    "5.5.1",
                    "Error: you talked before the greeting; no mail accepted",
                ));
            }
            Some(Blocked::Rule(reply)) => {
                let reply = Reply::clone(reply);
                return self.line_error(reply);
            }
            Some(Blocked::Enforce(_)) | None => {}
        }
        let junk = match command {
            Command::Noop | Command::Rset | Command::Vrfy | Command::Help => true,
            // The first greeting (and the one RFC 3207 requires after STARTTLS, which forgets
            // the first) is the protocol; another one is not needed for anything.
            Command::Ehlo(_) | Command::Helo(_) => self.helo.is_some(),
            _ => false,
        };
        self.run_command(now, command);
        if junk {
            self.count_junk();
        }
    }

    /// Answers (or relays) one command the session's state lets through.
    pub(super) fn run_command(&mut self, now: Instant, command: Command<'_>) {
        match command {
            Command::Ehlo(name) | Command::Helo(name) => {
                let esmtp = matches!(command, Command::Ehlo(_));
                self.reset_transaction();
                self.helo = Some(name.as_bytes().into());
                self.esmtp = esmtp;
                let config = Arc::clone(&self.config);
                match self.checks.check_name(&config, name, ListedBy::Helo) {
                    Some(ListMatch::Deny) => {
                        self.blocked = Some(Blocked::Immediate);
                        self.record_reputation(Event::Rejected);
                        let text = format!("<{name}>: Helo command rejected: Access denied");
                        return self.reply(Reply::new(554, "5.7.1", text));
                    }
                    Some(ListMatch::Allow) => self.blocked = None,
                    None => {}
                }
                match self.run_rules(Stage::Helo, None) {
                    Some(RuleOutcome {
                        action: RuleAction::Reject | RuleAction::Defer,
                        reply: Some(reply),
                    }) => {
                        // The HELO gets the reply, and so does every command after it.
                        self.blocked = Some(Blocked::Rule(Box::new(reply.clone())));
                        return self.reply(reply);
                    }
                    Some(RuleOutcome {
                        action: RuleAction::Allow,
                        ..
                    }) => self.blocked = None,
                    _ => {}
                }
                let hostname = &self.config.server.hostname;
                let reply = if esmtp {
                    let mut lines = vec![
                        hostname.clone(),
                        "PIPELINING".to_owned(),
                        format!("SIZE {}", self.config.limits.max_message_size),
                    ];
                    if self.tls == TlsStage::Offered {
                        lines.push("STARTTLS".to_owned());
                    }
                    lines.extend(["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"].map(String::from));
                    Reply::multiline(250, None, lines)
                } else {
                    Reply::without_enhanced(250, hostname.clone())
                };
                self.helo_through_milters(name, reply);
            }
            Command::Mail { from, params } => self.handle_mail(now, from, params),
            Command::Rcpt { to } => self.handle_rcpt(now, to),
            Command::Data => self.handle_data(now),
            Command::Rset => {
                self.reset_transaction();
                self.reply(Reply::new(250, "2.0.0", "Ok"));
            }
            Command::Quit => {
                self.close(CloseReason::Quit, Some(Reply::new(221, "2.0.0", "Bye")));
            }
            Command::StartTls => self.handle_starttls(),
            // Client-sent identity is never trusted or passed on (DESIGN.md §1.4).
            Command::Xclient | Command::Xforward => self.line_error(Reply::new(
                550,
                "5.7.0",
                "Error: insufficient authorization",
            )),
            Command::Noop
            | Command::Help
            | Command::Vrfy
            | Command::Expn
            | Command::Auth
            | Command::Bdat => {
                if let Some(reply) = fixed_reply(&command) {
                    self.reply(reply);
                }
            }
        }
    }

    /// `STARTTLS` (RFC 3207 §4): `220`, then the switch once the reply is out.
    pub(super) fn handle_starttls(&mut self) {
        match self.tls {
            TlsStage::Offered => {}
            TlsStage::Unavailable => {
                return self.reply(Reply::new(502, "5.5.1", "Error: STARTTLS not available"));
            }
            TlsStage::Requested | TlsStage::Handshaking | TlsStage::Active(_) => {
                return self.reply(Reply::new(503, "5.5.1", "Error: TLS already active"));
            }
        }
        if self.tx.is_some() {
            // As Postfix: the transaction would straddle the switch; RSET first.
            return self.reply(Reply::new(
                503,
                "5.5.1",
                "Error: MAIL transaction in progress",
            ));
        }
        // The downstream session announced the client's plain-text HELO; the next transaction
        // gets a fresh one after the new EHLO.
        self.let_go_of_relay(false);
        self.reply(Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.tls = TlsStage::Requested;
        self.phase = Phase::StartingTls;
        self.timers.idle = None;
    }

    pub(super) fn handle_mail(&mut self, now: Instant, from: &str, params: MailParams) {
        if self.helo.is_none() {
            return self.reply(Reply::new(503, "5.5.1", "Error: send HELO/EHLO first"));
        }
        if self.tx.is_some() {
            return self.reply(Reply::new(503, "5.5.1", "Error: nested MAIL command"));
        }
        if self.shutting_down {
            return self.close_for_shutdown();
        }
        let limit = self.config.limits.max_message_size;
        if params.size.is_some_and(|size| size > limit) {
            return self.reply(Reply::new(
                552,
                "5.3.4",
                "Error: message size exceeds fixed limit",
            ));
        }
        if !from.is_ascii() && !params.smtputf8 {
            return self.reply(Reply::new(
                553,
                "5.6.7",
                "Error: non-ASCII sender address needs SMTPUTF8",
            ));
        }
        let config = Arc::clone(&self.config);
        let domain = from.rsplit_once('@').map_or("", |(_, domain)| domain);
        match self.checks.check_name(&config, domain, ListedBy::Sender) {
            Some(ListMatch::Deny) => {
                // Like a deny-listed HELO: the session is refused, not just this sender, so a
                // second MAIL with another sender gets no further.
                self.blocked = Some(Blocked::Immediate);
                self.last_failure = Some("rejected");
                self.record_reputation(Event::Rejected);
                let text = format!("<{from}>: Sender address rejected: Access denied");
                return self.reply(Reply::new(554, "5.7.1", text));
            }
            Some(ListMatch::Allow) => self.blocked = None,
            None => {}
        }
        self.tx = Some(Box::new(Transaction {
            from: from.to_owned(),
            params,
            attempted: 0,
            accepted: 0,
            broken: false,
            greylisting: None,
            relayed: false,
            after_mail: None,
            rcpt_sent: None,
            recipients: Vec::new(),
        }));
        match self.run_rules(Stage::Mail, None) {
            Some(RuleOutcome {
                action: RuleAction::Reject | RuleAction::Defer,
                reply: Some(reply),
            }) => {
                // This MAIL only: another sender may still be fine.
                self.tx = None;
                return self.reply(reply);
            }
            Some(RuleOutcome {
                action: RuleAction::Allow,
                ..
            }) => self.blocked = None,
            _ => {}
        }
        if matches!(self.blocked, Some(Blocked::Enforce(_))) {
            // Enforce mode: the sender is taken so the recipients show in the log; nothing goes
            // downstream.
            return self.reply(Reply::new(250, "2.1.0", "Ok"));
        }
        self.mail_through_milters(now);
    }

    pub(super) fn handle_rcpt(&mut self, now: Instant, to: &str) {
        let Some(tx) = self.tx.as_deref_mut() else {
            return self.reply(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        if tx.broken {
            return self.reply(downstream_lost());
        }
        if tx.attempted >= self.config.limits.max_recipients {
            return self.reply(Reply::new(452, "4.5.3", "Error: too many recipients"));
        }
        if !to.is_ascii() && !tx.params.smtputf8 {
            return self.reply(Reply::new(
                553,
                "5.6.7",
                "Error: non-ASCII recipient address needs SMTPUTF8",
            ));
        }
        tx.attempted += 1;
        match self.run_rules(Stage::Rcpt, Some(to)) {
            Some(RuleOutcome {
                action: RuleAction::Reject | RuleAction::Defer,
                reply: Some(reply),
            }) => return self.reply(reply),
            Some(RuleOutcome {
                action: RuleAction::Allow,
                ..
            }) => self.blocked = None,
            _ => {}
        }
        let Some(tx) = self.tx.as_deref() else {
            return;
        };
        if let Some(Blocked::Enforce(text)) = &self.blocked {
            // postscreen's enforce log line: who was sending to whom, refused.
            log::info!(
                "reject: RCPT from [{}]: 550 5.7.1 {text}; from=<{}> to=<{}> helo=<{}>",
                self.peer.client.ip().to_canonical(),
                escape(tx.from.as_bytes()),
                escape(to.as_bytes()),
                escape(self.helo.as_deref().unwrap_or_default()),
            );
            self.last_failure = Some("rejected");
            let reply = Reply::new(550, "5.7.1", text.to_string());
            return self.reply(reply);
        }
        if let Some(key) = self.greylist_key(to) {
            if let Some(tx) = self.tx.as_deref_mut() {
                tx.greylisting = Some(to.into());
            }
            self.phase = Phase::Waiting(Pending::Greylist);
            self.actions.push_back(Action::Ask(Question::CheckGreylist {
                key,
                subnet: network_name(self.peer.client.ip()),
                times: GreylistTimes::of(&self.config.greylist),
            }));
            return;
        }
        self.greylisted = "skip";
        self.rcpt_through_milters(now, to);
    }

    /// Relays RCPT for `to`: at once on the transaction's ready downstream, or, when MAIL was
    /// answered locally (enforce mode) and a rule has since allowed this recipient, after
    /// opening the downstream and relaying MAIL first. Never onto a connection that is not
    /// ready for this transaction.
    pub(super) fn relay_rcpt(&mut self, now: Instant, to: &str) {
        let relayed = self.tx.as_deref().is_some_and(|tx| tx.relayed);
        if relayed && self.relay.is_in_transaction() {
            if let Some(tx) = self.tx.as_deref_mut() {
                tx.rcpt_sent = Some(to.into());
            }
            let queued = self.relay.send_rcpt(now, &self.config, to);
            return self.await_downstream(now, queued, Pending::Rcpt);
        }
        if relayed {
            // The transaction's downstream is gone.
            return self.reply(downstream_lost());
        }
        if let Some(tx) = self.tx.as_deref_mut() {
            tx.after_mail = Some(to.into());
        }
        self.phase = Phase::Waiting(Pending::Mail);
        self.start_mail(now);
    }

    /// The greylist key for recipient `to`, when greylisting applies: a `greylist` rule
    /// matched, or greylisting is on and the verdict is pass or tarpit with a score not below
    /// zero (DNSWL-listed and allowed clients are never greylisted).
    pub(super) fn greylist_key(&self, to: &str) -> Option<String> {
        let config = &self.config.greylist;
        let (verdict, score) = (self.checks.verdict(), self.checks.score());
        if !greylist_applies(config.enabled, verdict, score, self.forced_greylist) {
            return None;
        }
        let facts = KeyFacts {
            client: self.peer.client.ip(),
            helo: self
                .helo
                .as_deref()
                .and_then(|helo| std::str::from_utf8(helo).ok())
                .unwrap_or_default(),
            rdns: self.checks.rdns_name(),
            sender: self.tx.as_deref().map_or("", |tx| tx.from.as_str()),
            recipient: to,
        };
        Some(greylist::key(&config.key, &facts))
    }

    pub(super) fn handle_data(&mut self, now: Instant) {
        let Some(tx) = self.tx.as_deref() else {
            return self.reply(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        if matches!(self.blocked, Some(Blocked::Enforce(_))) {
            // Every recipient was refused and logged; nothing more can come of this session.
            let reply = Reply::new(554, "5.5.1", "Error: no valid recipients");
            return self.close(CloseReason::Blocked, Some(reply));
        }
        if tx.broken {
            return self.reply(downstream_lost());
        }
        if tx.attempted == 0 {
            return self.reply(Reply::new(503, "5.5.1", "Error: need RCPT command"));
        }
        if tx.accepted == 0 {
            return self.reply(Reply::new(554, "5.5.1", "Error: no valid recipients"));
        }
        if self.config.content.scans() {
            return self.start_holding(now);
        }
        let queued = self.relay.send_data(now, &self.config);
        self.await_downstream(now, queued, Pending::Data);
    }

    /// The client's `CRLF.CRLF` arrived.
    pub(super) fn end_of_data(&mut self, now: Instant) {
        self.timers.data = None;
        self.timers.idle = Some(now + self.config.timeouts.idle);
        let violation = match std::mem::replace(&mut self.phase, Phase::Command) {
            Phase::Data(decoder) => decoder.violation(),
            other => {
                self.phase = other;
                return;
            }
        };
        if self.is_holding_message() {
            if violation == Some(DataViolation::BareNewline) {
                self.record_reputation(Event::ProtocolAbuse);
            }
            return self.end_of_held(now, violation);
        }
        let refusal = match violation {
            Some(DataViolation::BareNewline) => Some(Reply::new(
                550,
                "5.6.0",
                "Error: bare <CR> or <LF> in message body; message not accepted",
            )),
            Some(DataViolation::TooBig) => Some(Reply::new(
                552,
                "5.3.4",
                "Error: message size exceeds fixed limit",
            )),
            None => None,
        };
        if violation == Some(DataViolation::BareNewline) {
            // A bare CR or LF in a body is how SMTP smuggling starts; no MTA sends it by accident
            // often enough to matter.
            self.record_reputation(Event::ProtocolAbuse);
        }
        if let Some(reply) = refusal {
            // Part of the body already went downstream: only dropping the connection without
            // the final dot guarantees nothing is delivered.
            self.drop_relay();
            self.tx = None;
            self.last_failure = Some("rejected");
            return self.reply(reply);
        }
        if !self.relay.send_dot(now, &self.config) {
            self.tx = None;
            self.last_failure = Some("tempfail");
            return self.reply(downstream_lost());
        }
        self.phase = Phase::Waiting(Pending::EndOfData);
    }

    /// The answer to `Question::CheckGreylist`: a new or early triplet gets `451 4.7.1
    /// Greylisted, please try again in N seconds` and is not relayed; a passing one is.
    pub(super) fn on_greylist(&mut self, now: Instant, outcome: GreylistOutcome) {
        if !matches!(self.phase, Phase::Waiting(Pending::Greylist)) {
            return;
        }
        self.phase = Phase::Command;
        let Some(to) = self.tx.as_deref_mut().and_then(|tx| tx.greylisting.take()) else {
            return;
        };
        let wait = match outcome {
            GreylistOutcome::Pass => {
                self.greylisted = "pass";
                self.record_reputation(Event::GreylistPass);
                return self.rcpt_through_milters(now, &to);
            }
            GreylistOutcome::New => {
                self.greylisted = "new";
                self.config.greylist.delay
            }
            GreylistOutcome::Early(left) => {
                self.greylisted = "early";
                left
            }
        };
        self.last_failure = Some("tempfail");
        // Whole seconds, rounded up: "try again in 0 seconds" would be a lie.
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let text = format!("Greylisted, please try again in {seconds} seconds");
        // Not an error of the client's (DESIGN.md §6.1): every first delivery attempt gets it,
        // and a message to many new recipients must not run into `max_errors`.
        self.say(Reply::new(451, "4.7.1", text));
    }
}
