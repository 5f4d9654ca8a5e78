//! Operator rule files (DESIGN.md §3.2): the parser, with `path:line: key: message` errors,
//! and the matcher the session asks at each stage of a connection.
//!
//! # Syntax
//!
//! A rule file is TOML holding only an array of `[[rule]]` tables, evaluated in file order
//! (files in the order `[rules] files` lists them):
//!
//! ```toml
//! [[rule]]
//! name = "reject-localhost-helo"         # required, unique across all files
//! when = { helo = "localhost" }          # required; every condition given must match
//! action = "reject"                      # allow | reject | defer | tarpit | greylist | score
//! reply = "550 5.7.1 HELO localhost not accepted here"   # optional, reject and defer only
//! # score = 2                            # required with action = "score", refused otherwise
//! ```
//!
//! - `name`: letters, digits, `.`, `_`, `-`, at most 64 characters, unique across every file
//!   (compared case-insensitively): it is what the close log line shows as `rule=NAME`, so it
//!   must be safe to log unescaped and must say which rule decided.
//! - `when`: a table of conditions, all of which must match. It is required so that a rule
//!   that forgot it cannot silently apply to every client; `when = {}` says "every client" on
//!   purpose and runs at connect.
//! - `action`: what a matching rule decides. `score` is not terminal: it adds `score` (a
//!   non-zero integer from −1000 to 1000) to the client's score and evaluation goes on. The
//!   others are terminal. `greylist` asks for greylisting of this client; until greylisting
//!   exists it lets the client pass like `allow` without the skipped checks (the session
//!   decides that, not this module).
//! - `reply`: `"CODE [ENHANCED] TEXT"`, e.g. `"550 5.7.1 Go away"`. Only `reject` (a 5xx
//!   code) and `defer` (a 4xx code) send a reply; a reply with any other action is an error,
//!   as is `421` (it means "closing the connection", which a rule does not do). The enhanced
//!   code (RFC 3463) must be of the code's class; when it is left out, `5.7.1` or `4.7.1`
//!   (RFC 3463 "delivery not authorized") is used, so every reply carries one (DESIGN.md §4).
//!   The text is printable ASCII, one line, at most [`MAX_REPLY_TEXT`] characters, so a rule
//!   can never inject a second reply. Without `reply`, [`default_reply`] applies.
//!
//! # Conditions
//!
//! | condition        | value                              | known at | matches when                                          |
//! |------------------|------------------------------------|----------|-------------------------------------------------------|
//! | `client`         | IP or CIDR, or an array of them    | connect  | the client's address is in one of the blocks          |
//! | `rdns`           | pattern(s)                         | connect  | the client has a verified rDNS name and it matches    |
//! | `no_rdns`        | `true` / `false`                   | connect  | the client has no verified rDNS name / has one        |
//! | `dnsbl`          | pattern(s) of zone names           | connect  | a zone listing the client matches                     |
//! | `score_at_least` | integer                            | connect  | the client's score is at least this                   |
//! | `helo`           | pattern(s)                         | helo     | the HELO/EHLO name matches                            |
//! | `sender`         | pattern(s)                         | mail     | the MAIL FROM address matches                         |
//! | `recipient`      | pattern(s)                         | rcpt     | the RCPT TO address being decided matches             |
//!
//! A pattern is a string, or an array of strings of which any may match:
//! - `"mail.example.com"`: exact, case-insensitive for ASCII letters (the letters of DNS names
//!   and of nearly every address; a non-ASCII letter must match as written);
//! - with a `*`, a glob: `*` stands for any run of characters, dots and `@` included, also
//!   none (`"*.dynamic.example.net"`, `"*@example.com"`); other characters match as in the
//!   exact form. A glob is compiled once into prefix, pieces and suffix and matched without
//!   backtracking;
//! - `"/…/"`: a regular expression (the `regex` crate's syntax, linear-time matching). It is
//!   **case-sensitive** unless it starts with `(?i)`, and it matches anywhere in the value
//!   unless anchored with `^…$`. The compiled program is capped (see [`REGEX_SIZE_LIMIT`]) so
//!   a huge pattern is an error at `tarmac check`, not a memory hog at run time.
//!
//! For `helo`, `rdns` and `dnsbl` (DNS names), one trailing dot is ignored on both sides for
//! exact patterns and globs (`localhost.` is `localhost`); a regex sees the value as sent.
//! `sender` and `recipient` see the bare address without angle brackets; the null sender
//! `<>` is the empty string, so `sender = ""` matches only the null sender and `sender = "*"`
//! matches every sender, null included (`"*@*"` every non-null one). An empty pattern is an
//! error for the other conditions, where it could never match.
//!
//! A condition on a fact the client does not have does not match: `rdns` for a client without
//! a verified name, `helo` before HELO. The one exception is `no_rdns = true`, which is about
//! that absence. With `[dns] rdns = false` no client has a verified name.
//!
//! # Stages and precedence
//!
//! A rule runs at one stage, the latest at which one of its conditions becomes known (the
//! table above): `{ client, helo }` runs at helo, `{ rdns, recipient }` at rcpt. Stages are
//! connect (the verdict, once the DNS checks are answered), helo, mail and rcpt (once per
//! recipient). At each stage ([`RuleSet::evaluate`]):
//! 1. every `score` rule of the stage that matches adds its score, in file order; each one
//!    sees the score the ones before it added (so `score_at_least` can build on them);
//! 2. then the first terminal rule of the stage that matches, in file order, decides, seeing
//!    the score with those additions.
//!
//! What a decision does is the session's to apply (DESIGN.md §3.2): `reject` at connect or
//! helo answers every command but QUIT, at mail or rcpt that command; `defer` likewise with a
//! 4xx reply; `allow`, `tarpit` and `greylist` set the client's treatment.
//!
//! # Errors
//!
//! [`RuleSet::parse`] reads every file to the end and returns every error of every file, each
//! as `path:line: rule[i].key: message` (`i` counts from 0 in each file): TOML syntax, unknown
//! keys (naming the valid ones), a bad CIDR, glob or regex, an unknown action, a reply of the
//! wrong class, a missing or duplicate name. A set with any error is refused as a whole.
//!
//! # Files
//!
//! Here the public types, [`RuleSet::parse`] across files and [`RuleSet::evaluate`]; the
//! reader of one file is `parse`, the readers of single values `value`, the compiled rules and
//! their matching `matcher`.

mod matcher;
mod parse;
mod value;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use self::matcher::Rule;
use self::parse::Reader;
use super::reading::FileError;
use crate::smtp::reply::Reply;

/// Longest reply text a rule may give, in characters: with the code and enhanced code it keeps
/// the line well under RFC 5321 §4.5.3.1.5's 512 octets.
pub(crate) const MAX_REPLY_TEXT: usize = 400;

/// Longest rule name, in characters: it goes into every close log line of the rule's clients.
pub(crate) const MAX_NAME: usize = 64;

/// Longest pattern source, in characters; a longer one is an operator's mistake (a pasted
/// list?) and would only slow every match.
pub(crate) const MAX_PATTERN: usize = 1024;

/// Cap on a compiled regex, in bytes (`RegexBuilder::size_limit`): a hostile or accidental
/// pattern such as `\w{1000}{1000}` fails to compile instead of taking memory.
pub(crate) const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Cap on a regex's lazy DFA cache, in bytes (`RegexBuilder::dfa_size_limit`): it is kept per
/// thread that matches, so it multiplies by the workers.
pub(crate) const REGEX_DFA_LIMIT: usize = 1 << 20;

/// Largest `score` magnitude; DNSBL weights are single digits, so anything bigger is a typo.
pub(crate) const MAX_SCORE: i32 = 1000;

/// When a rule runs: the stage of the SMTP dialogue at which all its inputs are known.
/// Ordered as a connection goes through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// The verdict: client address, rDNS and DNSBL answers, score.
    Connect,
    /// HELO or EHLO received.
    Helo,
    /// MAIL FROM received.
    Mail,
    /// One RCPT TO received.
    Rcpt,
}

/// What a matching rule decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleAction {
    /// Skip the remaining checks for this client.
    Allow,
    /// Refuse with a 5xx reply.
    Reject,
    /// Refuse for now with a 4xx reply.
    Defer,
    /// Delay every reply.
    Tarpit,
    /// Greylist this client's transactions.
    Greylist,
    /// Add to the score and go on; not terminal.
    Score(i32),
}

/// What the session knows about a connection at a stage; the facts of later stages are
/// `None` before them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts<'a> {
    /// The client's address (from PROXY when the peer is a trusted proxy).
    pub client: IpAddr,
    /// The HELO/EHLO name as sent (trimmed), once given.
    pub helo: Option<&'a str>,
    /// The forward-confirmed rDNS name, lowercase without trailing dot; `None` when there is
    /// none (or rDNS checks are off).
    pub rdns: Option<&'a str>,
    /// The MAIL FROM address without angle brackets, `""` for the null sender `<>`.
    pub sender: Option<&'a str>,
    /// The RCPT TO address being decided, without angle brackets.
    pub recipient: Option<&'a str>,
    /// The zones that list the client.
    pub listed_in: &'a [&'a str],
    /// The client's score so far (DNS weights, reputation, earlier stages' score rules).
    pub score: i32,
}

/// The terminal rule that decided, borrowed from the [`RuleSet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<'r> {
    /// The rule's name, for the close log's `rule=NAME`.
    pub rule: &'r str,
    /// Never [`RuleAction::Score`].
    pub action: RuleAction,
    /// The rule's own reply; `None` means [`default_reply`].
    pub reply: Option<&'r Reply>,
}

/// Every rule of every rule file, compiled, in evaluation order.
///
/// Two sets are equal when they hold the same rules in the same order; regexes compare by
/// their source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    /// Parses rule files (path, contents), in order. Every error of every file is returned,
    /// each naming `path:line` and the key (`rule[2].when.helo`); a set with any error is
    /// refused as a whole, so a reload never runs with half the rules. A UTF-8 byte order mark
    /// at the start of a file is skipped; a file without rules is valid.
    pub fn parse(files: &[(PathBuf, String)]) -> Result<RuleSet, Vec<FileError>> {
        let mut set = RuleSet::default();
        let mut errors = Vec::new();
        // Lowercased name -> where it was first defined, for duplicates across files.
        let mut names: HashMap<String, String> = HashMap::new();
        for (path, text) in files {
            let text = text.strip_prefix('\u{feff}').unwrap_or(text);
            let mut reader = Reader::new(text, path);
            for named in reader.file(text) {
                // A rule with errors still claims its name, so a duplicate shows up in the
                // same run, not after the first error is fixed.
                let lower = named.name.to_ascii_lowercase();
                if let Some(first) = names.get(&lower) {
                    let message = format!("rule {:?} is already defined at {first}", named.name);
                    reader.push(named.line, &named.key, message);
                    continue;
                }
                names.insert(lower, format!("{}:{}", path.display(), named.line));
                set.rules.extend(named.rule);
            }
            errors.append(&mut reader.finish());
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors)
        }
    }

    /// Number of rules: the figure `tarmac check` reports.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (then every stage decides nothing).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Runs the rules whose stage is `stage` against `facts`: the `score` rules that match add
    /// to the score first, in file order, each seeing the additions before it; then the first
    /// terminal rule that matches decides, seeing the score with every addition. Returns the
    /// score added (saturating) and the decision, if any.
    ///
    /// Rules of other stages are not looked at, so a caller runs each stage once (rcpt once per
    /// recipient) and adds the returned score to what later stages see. Costs one pass over the
    /// rules with no allocation, except a lowercase copy of a value that has uppercase letters
    /// and meets an exact pattern or glob.
    pub fn evaluate<'r>(&'r self, stage: Stage, facts: &Facts<'_>) -> (i32, Option<Decision<'r>>) {
        let mut added: i32 = 0;
        let mut now = *facts;
        for rule in self.rules.iter().filter(|r| r.stage == stage) {
            if let RuleAction::Score(points) = rule.action {
                if rule.matches(&now) {
                    added = added.saturating_add(points);
                    now.score = facts.score.saturating_add(added);
                }
            }
        }
        let decision = self
            .rules
            .iter()
            .filter(|r| r.stage == stage && r.action.is_terminal())
            .find(|r| r.matches(&now))
            .map(|r| Decision {
                rule: &r.name,
                action: r.action,
                reply: r.reply.as_ref(),
            });
        (added, decision)
    }
}

impl RuleAction {
    /// Whether the action ends evaluation at its stage (everything but `score`).
    pub fn is_terminal(self) -> bool {
        !matches!(self, RuleAction::Score(_))
    }

    /// The word used in rule files and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleAction::Allow => "allow",
            RuleAction::Reject => "reject",
            RuleAction::Defer => "defer",
            RuleAction::Tarpit => "tarpit",
            RuleAction::Greylist => "greylist",
            RuleAction::Score(_) => "score",
        }
    }
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 4] = [Stage::Connect, Stage::Helo, Stage::Mail, Stage::Rcpt];

    /// The stage's name in docs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Helo => "helo",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Decision<'_> {
    /// The reply to send: the rule's own, else [`default_reply`]; `None` for actions that
    /// send none.
    pub fn reply_at(&self, stage: Stage) -> Option<Reply> {
        match self.reply {
            Some(reply) => Some(reply.clone()),
            None => default_reply(self.action, stage),
        }
    }
}

/// The reply for a `reject` or `defer` rule that gives none; `None` for the actions that send
/// no reply of their own (allow, tarpit, greylist, score).
///
/// | action | connect, helo                                                      | mail                                                              | rcpt                                                                 |
/// |--------|--------------------------------------------------------------------|-------------------------------------------------------------------|----------------------------------------------------------------------|
/// | reject | `554 5.7.1 Service unavailable; rejected by local policy`          | `550 5.7.1 Sender rejected by local policy`                       | `550 5.7.1 Recipient rejected by local policy`                       |
/// | defer  | `450 4.7.1 Service temporarily unavailable; please try again later` | `450 4.7.1 Sender deferred by local policy; please try again later` | `450 4.7.1 Recipient deferred by local policy; please try again later` |
///
/// `554` at connect and helo is the "no SMTP service here" of RFC 5321 §3.1, answered to
/// every command but QUIT; `550` refuses the one command.
pub fn default_reply(action: RuleAction, stage: Stage) -> Option<Reply> {
    Some(match (action, stage) {
        (RuleAction::Reject, Stage::Connect | Stage::Helo) => Reply::new(
            554,
            "5.7.1",
            "Service unavailable; rejected by local policy",
        ),
        (RuleAction::Reject, Stage::Mail) => {
            Reply::new(550, "5.7.1", "Sender rejected by local policy")
        }
        (RuleAction::Reject, Stage::Rcpt) => {
            Reply::new(550, "5.7.1", "Recipient rejected by local policy")
        }
        (RuleAction::Defer, Stage::Connect | Stage::Helo) => Reply::new(
            450,
            "4.7.1",
            "Service temporarily unavailable; please try again later",
        ),
        (RuleAction::Defer, Stage::Mail) => Reply::new(
            450,
            "4.7.1",
            "Sender deferred by local policy; please try again later",
        ),
        (RuleAction::Defer, Stage::Rcpt) => Reply::new(
            450,
            "4.7.1",
            "Recipient deferred by local policy; please try again later",
        ),
        (
            RuleAction::Allow | RuleAction::Tarpit | RuleAction::Greylist | RuleAction::Score(_),
            _,
        ) => return None,
    })
}

#[cfg(test)]
mod tests;
