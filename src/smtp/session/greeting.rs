//! The greeting: the client's admission, its checks (lookups, reputation, lists, connect
//! rules), the greet pause and pregreet detection, the verdict and the final greeting line, and
//! the tarpit place a tarpit verdict asks for. The decisions themselves are `policy` calls
//! (`crate::policy::screening`); this is how the session asks for what they need and applies
//! what they say.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Pregreet, RejectMode};
use crate::policy::reputation::{self, Event, History};
use crate::policy::{Facts, ListMatch, RuleAction, Stage, Verdict};
use crate::smtp::log_text::escape;
use crate::smtp::proxy::{ProxyStart, proxy_start};
use crate::smtp::question::{LookupAnswer, Query, Question};
use crate::smtp::reply::{Reply, Status};
use crate::smtp::tarpit::Tarpit;

use super::closing::{CloseReason, too_many_connections};
use super::{Action, Phase, Session};

/// Where the greet pause stands (`[tarpit] greet_pause`, DESIGN.md §1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GreetPause {
    /// No pause: none configured, or a list decided on the client.
    Skipped,
    /// `Question::CheckPass` is out: the pause cannot start before its answer.
    Asking,
    /// A fresh PASS was cached: no pause.
    Cached,
    /// The pause was served (`Timers::greet` runs it): passing it earns a PASS.
    Served,
}

/// The one service answer the session waits for besides the lookups and the PASS cache
/// (which are asked for alongside the reputation, so they keep their own state). The two
/// never overlap: the tarpit place is asked for once the reputation is in (`finish_checks`),
/// or after the greeting (a rule's tarpit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Awaiting {
    /// No such question is out.
    Nothing,
    /// `Question::CheckReputation` is unanswered: the verdict waits.
    Reputation,
    /// `Question::EnterTarpit` is unanswered: the greeting (or a held reply) waits.
    TarpitSlot,
}

/// A verdict of reject (or a deny-list entry, or a pregreet talker), as the dialog applies it.
#[derive(Debug)]
pub(super) enum Blocked {
    /// The greeting (or the HELO reply) was `554`: every command but QUIT gets `503`.
    Immediate,
    /// `pregreet = "reject"`: the client talked before the greeting; every command but QUIT
    /// gets `554 5.5.1`.
    Pregreet,
    /// A rule rejected or deferred the client at connect or HELO: every command but QUIT gets
    /// the rule's reply (DESIGN.md §3.2).
    Rule(Box<Reply>),
    /// `reject_mode = "enforce"`: RCPT gets `550 5.7.1` with this text, DATA `554` and a close.
    Enforce(Box<str>),
}

/// What a rule decided at a stage, owned (the rule set may be replaced by a reload).
pub(super) struct RuleOutcome {
    pub(super) action: RuleAction,
    pub(super) reply: Option<Reply>,
}

/// Bytes of a pregreet talker's first burst kept for its log line (postscreen logs the start
/// of what it sent; the log escapes and truncates it further).
pub(super) const PREGREET_KEEP: usize = 64;

/// Greet pause in stress mode (postscreen's `postscreen_greet_wait` under stress: 2 s).
pub(super) const STRESS_GREET_PAUSE: Duration = Duration::from_secs(2);

impl Session {
    /// The answer to a `Question::Lookup`. Once every answer is in, the verdict is made and the
    /// banner (or the `554`) goes out. Late answers, after `[dns] timeout`, are ignored.
    pub(super) fn on_lookup(&mut self, now: Instant, query: &Query, answer: LookupAnswer) {
        if !matches!(self.phase, Phase::Checking) {
            return;
        }
        if self.checks.answer(query, answer) {
            self.timers.lookup = None;
            self.try_greet(now);
        }
    }

    /// The answer to `Question::CheckPass`: a fresh PASS skips the greet pause; otherwise the
    /// pause starts now, with the `220-` teaser when `banner_continuation` is on.
    pub(super) fn on_pass(&mut self, now: Instant, cached: bool) {
        if self.pause != GreetPause::Asking || !matches!(self.phase, Phase::Checking) {
            return;
        }
        self.pause = GreetPause::Cached;
        if !cached {
            self.pause = GreetPause::Served;
            self.timers.greet = Some(now + self.greet_pause());
            if self.config.tarpit.banner_continuation {
                let teaser = format!("220-{} ESMTP tarmac\r\n", self.config.server.hostname);
                self.to_client.extend_from_slice(teaser.as_bytes());
            }
        }
        self.try_greet(now);
    }

    /// The answer to `Question::CheckReputation`: the client's history (`None`: none kept). A
    /// mostly bad one adds `[reputation] weight` to the score the verdict is made from.
    pub(super) fn on_reputation(&mut self, now: Instant, history: Option<History>) {
        if self.awaiting != Awaiting::Reputation || !matches!(self.phase, Phase::Checking) {
            return;
        }
        self.awaiting = Awaiting::Nothing;
        let config = &self.config.reputation;
        let standing = reputation::standing(history.as_ref(), now, config.half_life);
        let weight = reputation::weight(standing, config);
        self.checks.set_reputation(standing, weight);
        self.try_greet(now);
    }

    /// The answer to `Question::EnterTarpit`: granted, every reply from the greeting on is
    /// delayed (and stuttered); refused (`max_tarpitted` reached), the client is rejected
    /// instead, as DESIGN.md §3 says.
    pub(super) fn on_tarpit_slot(&mut self, now: Instant, granted: bool) {
        if self.awaiting != Awaiting::TarpitSlot {
            return;
        }
        self.awaiting = Awaiting::Nothing;
        if !matches!(self.phase, Phase::Checking) {
            // A rule's tarpit after the greeting, already holding: no place, no tarpit.
            if !granted {
                self.leave_tarpit();
            }
            return;
        }
        if granted {
            let tarpit = &self.config.tarpit;
            self.tarpit = Some(Box::new(Tarpit::new(tarpit.reply_delay, tarpit.stutter)));
        } else {
            log::info!(
                "max_tarpitted reached: rejecting {} instead of tarpitting it",
                self.peer.client.ip().to_canonical()
            );
            self.checks.reject_instead_of_tarpit();
        }
        self.greet_final(now);
    }

    /// The driver's answer to `Question::Admit`: the checks (then the banner), or (over the
    /// per-IP cap) the same `421` a directly connected client gets, and a close.
    pub(super) fn on_admission(&mut self, now: Instant, admitted: bool) {
        if !matches!(self.phase, Phase::Admitting | Phase::Proxy(_)) {
            return;
        }
        if admitted {
            self.start_checks(now);
        } else {
            let reply = too_many_connections(&self.config.server.hostname);
            self.close(CloseReason::Refused, Some(reply));
        }
    }

    pub(super) fn greet(&mut self) {
        let banner = format!("{} ESMTP tarmac", self.config.server.hostname);
        self.say(Reply::without_enhanced(220, banner));
    }

    /// The client's address is known (accept, or the PROXY header): start its lookups, or
    /// decide at once when a list knows the address or there is nothing to look up.
    pub(super) fn start_checks(&mut self, now: Instant) {
        self.take_reload();
        let config = Arc::clone(&self.config);
        let ip = self.peer.client.ip().to_canonical();
        let queries = self.checks.start(&config, ip);
        self.phase = Phase::Checking;
        if !queries.is_empty() {
            self.timers.lookup = Some(now + config.dns.timeout);
            self.actions.extend(
                queries
                    .into_iter()
                    .map(|q| Action::Ask(Question::Lookup(q))),
            );
        }
        // A client a list decided on needs neither its reputation nor a greet pause: allowed,
        // it skips every check; denied, it is refused at once.
        if config.reputation.enabled && self.checks.list_match().is_none() {
            self.awaiting = Awaiting::Reputation;
            self.actions
                .push_back(Action::Ask(Question::CheckReputation(
                    ip,
                    config.reputation.half_life,
                )));
        }
        if !self.greet_pause().is_zero() && self.checks.list_match().is_none() {
            self.pause = GreetPause::Asking;
            self.actions.push_back(Action::Ask(Question::CheckPass(ip)));
        }
        self.try_greet(now);
    }

    /// The greet pause for this client: `[tarpit] greet_pause`, shorter in stress mode.
    pub(super) fn greet_pause(&self) -> Duration {
        let pause = self.config.tarpit.greet_pause;
        if self.peer.stressed {
            pause.min(STRESS_GREET_PAUSE)
        } else {
            pause
        }
    }

    /// Ends the pre-greet stage once nothing is pending: every answer in (or given up on),
    /// the PASS and reputation questions answered, the greet pause over.
    pub(super) fn try_greet(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Checking)
            && self.checks.is_complete()
            && self.pause != GreetPause::Asking
            && self.awaiting == Awaiting::Nothing
            && self.timers.greet.is_none()
        {
            self.finish_checks(now);
        }
    }

    /// Every answer is in and the pause is over: the verdict. A tarpit verdict first asks
    /// for one of the `max_tarpitted` places; the others greet at once.
    pub(super) fn finish_checks(&mut self, now: Instant) {
        let config = Arc::clone(&self.config);
        self.timers.lookup = None;
        self.checks.decide(&config);
        if let Some(RuleOutcome {
            action: RuleAction::Reject | RuleAction::Defer,
            reply: Some(reply),
        }) = self.run_rules(Stage::Connect, None)
        {
            // Greeted as usual; then every command but QUIT gets the rule's reply.
            self.blocked = Some(Blocked::Rule(Box::new(reply)));
        }
        let verdict = self.checks.verdict();
        let tarpit = &config.tarpit;
        if verdict == Verdict::Tarpit
            && (!tarpit.reply_delay.is_zero() || !tarpit.stutter.is_zero())
            && !self.shutting_down
        {
            self.awaiting = Awaiting::TarpitSlot;
            self.actions.push_back(Action::Ask(Question::EnterTarpit));
            return;
        }
        self.greet_final(now);
    }

    /// The final greeting line the verdict calls for, then the command phase.
    pub(super) fn greet_final(&mut self, now: Instant) {
        let config = Arc::clone(&self.config);
        let verdict = self.checks.verdict();
        self.phase = Phase::Command;
        self.timers.idle = Some(now + config.timeouts.idle);
        if self.shutting_down {
            return self.close_for_shutdown();
        }
        let ip = self.peer.client.ip().to_canonical();
        if self.pause == GreetPause::Served && self.pregreet.is_none() && verdict != Verdict::Reject
        {
            self.actions
                .push_back(Action::Ask(Question::RecordPass(ip)));
        }
        // A reject the client earned; not one forced by a full tarpit (`max_tarpitted`).
        if verdict == Verdict::Reject && !self.checks.is_tarpit_refused() {
            self.record_reputation(Event::Rejected);
        }
        if matches!(self.blocked, Some(Blocked::Rule(_))) {
            return self.greet();
        }
        if verdict != Verdict::Reject {
            if self.pregreet.is_some() && config.tarpit.pregreet == Pregreet::Reject {
                self.blocked = Some(Blocked::Pregreet);
                self.last_failure = Some("rejected");
                return self.greet();
            }
            return self.greet_through_milters();
        }
        let text = match (self.checks.list_match(), self.checks.blocking_zone()) {
            (Some(ListMatch::Deny), _) | (_, None) => {
                format!("Service unavailable; client [{ip}] blocked by local policy")
            }
            (_, Some(zone)) => format!("Service unavailable; client [{ip}] blocked using {zone}"),
        };
        self.last_failure = Some("rejected");
        if self.checks.list_match() == Some(ListMatch::Deny)
            || config.scoring.reject_mode == RejectMode::Immediate
        {
            // RFC 5321 §3.1: a 554 greeting; the client should QUIT, other commands get 503.
            // After a `220-` teaser this is the greeting's final line, as postscreen does.
            self.blocked = Some(Blocked::Immediate);
            // The greeting, not an answer to a command: no error counted.
            self.say(Reply::new(554, "5.7.1", text));
        } else {
            self.blocked = Some(Blocked::Enforce(text.into_boxed_str()));
            self.greet();
        }
    }

    /// Runs the operator rules of `stage` (DESIGN.md §3.2) on what the session knows: score
    /// rules add to the score (at connect the verdict follows it), then the first terminal rule
    /// that matches decides; allow, tarpit and reject set the verdict, and its name goes to the
    /// close line. Returns the decision, with the reply a reject or defer gives. An allow-listed
    /// client skips the rules, as every other check.
    pub(super) fn run_rules(
        &mut self,
        stage: Stage,
        recipient: Option<&str>,
    ) -> Option<RuleOutcome> {
        let config = Arc::clone(&self.config);
        if config.rules.set.is_empty() || self.checks.list_match() == Some(ListMatch::Allow) {
            return None;
        }
        let listed = self.checks.listed_zones();
        let helo = self
            .helo
            .as_deref()
            .and_then(|helo| std::str::from_utf8(helo).ok());
        let facts = Facts {
            client: self.peer.client.ip().to_canonical(),
            helo,
            rdns: self.checks.rdns_name(),
            sender: self.tx.as_deref().map(|tx| tx.from.as_str()),
            recipient,
            listed_in: &listed,
            score: self.checks.score(),
        };
        let (added, decision) = config.rules.set.evaluate(stage, &facts);
        let decision = decision.map(|d| (d.rule.to_owned(), d.action, d.reply_at(stage)));
        drop(listed);
        if added != 0 {
            self.checks
                .add_score(&config, added, stage == Stage::Connect);
        }
        let (rule, action, reply) = decision?;
        self.rule = Some(rule.into_boxed_str());
        match action {
            RuleAction::Allow => self.checks.rule_decided(Verdict::Allow),
            RuleAction::Tarpit => {
                self.checks.rule_decided(Verdict::Tarpit);
                // After the greeting the tarpit holds this command's reply already; the place
                // is asked for at once and, if none is free, what is held goes out (at
                // connect, `finish_checks` asks for the place before the greeting).
                let tarpit = &config.tarpit;
                if stage != Stage::Connect
                    && self.tarpit.is_none()
                    && self.awaiting != Awaiting::TarpitSlot
                    && (!tarpit.reply_delay.is_zero() || !tarpit.stutter.is_zero())
                {
                    self.tarpit = Some(Box::new(Tarpit::new(tarpit.reply_delay, tarpit.stutter)));
                    self.awaiting = Awaiting::TarpitSlot;
                    self.actions.push_back(Action::Ask(Question::EnterTarpit));
                }
            }
            RuleAction::Reject => {
                self.checks.rule_decided(Verdict::Reject);
                self.last_failure = Some("rejected");
                self.record_reputation(Event::Rejected);
            }
            RuleAction::Defer => self.last_failure = Some("tempfail"),
            // Greylisted whatever the verdict or `[greylist] enabled` say: the rule is explicit.
            RuleAction::Greylist => self.forced_greylist = true,
            RuleAction::Score(_) => {}
        }
        Some(RuleOutcome { action, reply })
    }

    /// Sends `event` to the client's reputation (`Question::RecordReputation`) when reputation
    /// is on and no allow list exempts the client: each bad event only if none was sent in
    /// this session (one misbehaving session is one mark, however many errors it made), a
    /// greylist pass once per session, every delivery.
    pub(super) fn record_reputation(&mut self, event: Event) {
        if !self.config.reputation.enabled || self.checks.list_match() == Some(ListMatch::Allow) {
            return;
        }
        if !self.marks.admit(event) {
            return;
        }
        let ip = self.peer.client.ip().to_canonical();
        self.actions
            .push_back(Action::Ask(Question::RecordReputation(
                ip,
                event,
                self.config.reputation.half_life,
            )));
    }

    /// Bytes before the final greeting line: the client is a pregreet talker (DESIGN.md §1.2).
    /// The first burst is kept for the log; `drop` ends the session with `521` at once, the
    /// other modes read nothing more until the greeting (the bytes wait in the driver's
    /// buffer and are answered as commands after it). Returns bytes consumed.
    pub(super) fn detect_pregreet(&mut self, now: Instant, bytes: &[u8]) -> usize {
        if self.pregreet.is_some() || bytes.is_empty() {
            return 0;
        }
        match proxy_start(bytes) {
            ProxyStart::Header => return self.stray_proxy_header(bytes.len()),
            // Left with the driver until there are enough to tell.
            ProxyStart::Undecided => return 0,
            ProxyStart::NotProxy => {}
        }
        let kept = bytes.get(..PREGREET_KEEP).unwrap_or(bytes);
        self.pregreet = Some(kept.into());
        log::info!(
            "pregreet: {} bytes after {:.2}s from {}: {}",
            bytes.len(),
            now.saturating_duration_since(self.started).as_secs_f64(),
            self.peer.client,
            escape(kept)
        );
        if self.config.tarpit.pregreet != Pregreet::Ignore {
            self.record_reputation(Event::Pregreet);
        }
        if self.config.tarpit.pregreet == Pregreet::Drop {
            let text = format!(
                "{} Protocol error: talked before the greeting",
                self.config.server.hostname
            );
            self.last_failure = Some("rejected");
            self.close(CloseReason::Blocked, Some(Reply::new(521, "5.5.1", text)));
            return bytes.len();
        }
        0
    }

    /// Collects the PROXY header (DESIGN.md §1.4): once whole, the client is the address in
    /// it and gets the banner; malformed, too long or late, the connection closes without a
    /// banner and nothing is accepted. Returns bytes used (the header's, no more).
    pub(super) fn read_proxy_header(&mut self, now: Instant, input: &[u8]) -> usize {
        let Phase::Proxy(header) = &mut self.phase else {
            return 0;
        };
        match header.receive(input) {
            Ok(Status::Partial) => input.len(),
            Ok(Status::Complete((client, used))) => {
                self.timers.command = None;
                match client {
                    Some(client) => {
                        self.peer.client = client;
                        let allowed = self
                            .config
                            .lists
                            .entries
                            .check_ip(client.ip().to_canonical())
                            == Some(ListMatch::Allow);
                        if allowed {
                            // Allow-listed: no per-IP cap (DESIGN.md §1.1).
                            self.on_admission(now, true);
                        } else {
                            self.phase = Phase::Admitting;
                            self.actions.push_back(Action::Ask(Question::Admit(client)));
                        }
                    }
                    // A health check (UNKNOWN, LOCAL) is the balancer itself.
                    None => self.on_admission(now, true),
                }
                used
            }
            Err(error) => {
                log::info!("bad PROXY header from {}: {error:?}", self.peer.client);
                self.close(CloseReason::BadProxy, None);
                input.len()
            }
        }
    }

    /// A client outside `proxy_protocol_from` sent a PROXY header (DESIGN.md §6.1), before the
    /// greeting or as its first command: it is closed without a banner or a reply
    /// (`result=bad-proxy`), whatever `pregreet` says. Either a balancer missing from the
    /// list, or a client hoping to pass for another address; neither is answered as SMTP.
    /// Returns the bytes taken (`input_len`: everything offered).
    pub(super) fn stray_proxy_header(&mut self, input_len: usize) -> usize {
        log::info!(
            "PROXY header from {}, which is not in proxy_protocol_from: closed without a reply",
            self.peer.client
        );
        self.last_failure = Some("bad-proxy");
        self.close(CloseReason::BadProxy, None);
        input_len
    }
}
