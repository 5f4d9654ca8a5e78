//! The rule-file reader: each `[[rule]]` table checked key by key into a compiled rule, every
//! error collected as `path:line: key: message` in file order.

use std::ops::Range;
use std::path::Path;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::matcher::{Condition, Patterns, Rule};
use super::value::{
    ACTIONS, action_word, client, one_line, pattern, rule_name, rule_reply, score_points,
    score_threshold,
};
use super::{RuleAction, Stage};
use crate::policy::reading::{FileError, Lines, array_of_tables, boolean, expected};

/// The keys of a `[[rule]]` table, for unknown-key hints.
const RULE_KEYS: &[&str] = &["name", "when", "action", "reply", "score"];

/// The conditions of `when`, for unknown-key hints.
const WHEN_KEYS: &[&str] = &[
    "client",
    "helo",
    "rdns",
    "sender",
    "recipient",
    "dnsbl",
    "score_at_least",
    "no_rdns",
];

/// Error collector and walker over one rule file.
pub(super) struct Reader<'p> {
    path: &'p Path,
    /// Where each line starts.
    lines: Lines,
    /// Each error with the byte offset it points at, so errors sort in file order even on one
    /// line (the TOML tables iterate their keys by name, not position).
    errors: Vec<(usize, FileError)>,
}

/// A rule's name and where it is given, with the rule itself when it has no error.
pub(super) struct Named {
    pub(super) name: String,
    /// `rule[i].name`
    pub(super) key: String,
    pub(super) line: usize,
    pub(super) rule: Option<Rule>,
}

/// A key given in a rule, with its value's line, for checks across keys.
type Given<'v, 'i> = Option<(&'v Spanned<DeValue<'i>>, usize)>;

impl<'p> Reader<'p> {
    pub(super) fn new(text: &str, path: &'p Path) -> Self {
        Reader {
            path,
            lines: Lines::new(text),
            errors: Vec::new(),
        }
    }

    /// The errors in file order.
    pub(super) fn finish(mut self) -> Vec<FileError> {
        self.errors.sort_by_key(|(offset, _)| *offset);
        self.errors.into_iter().map(|(_, e)| e).collect()
    }

    /// 1-based line holding byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.lines.line(offset)
    }

    /// An error at line `line` (1-based), sorted at its start.
    pub(super) fn push(&mut self, line: usize, key: &str, message: String) {
        let offset = self.lines.start(line).unwrap_or(usize::MAX);
        self.push_at(offset, line, key, message);
    }

    fn push_at(&mut self, offset: usize, line: usize, key: &str, message: String) {
        let error = FileError {
            path: self.path.to_path_buf(),
            line,
            key: key.to_owned(),
            message,
        };
        self.errors.push((offset, error));
    }

    fn error(&mut self, span: Range<usize>, key: &str, message: String) {
        let line = self.line(span.start);
        self.push_at(span.start, line, key, message);
    }

    /// Every rule of the file that has a valid name, compiled if it has no error; the errors
    /// go into `self`.
    pub(super) fn file(&mut self, text: &str) -> Vec<Named> {
        let (doc, syntax_errors) = DeTable::parse_recoverable(text);
        if !syntax_errors.is_empty() {
            // As in the config reader: a patched-up tree would only add guessed errors, and
            // recovery may report one mistake several times on a line.
            let mut last_line = None;
            for e in syntax_errors {
                // A syntax error without a span is put on the last line.
                let offset = e.span().map_or(text.len(), |span| span.start);
                let line = self.line(offset);
                if last_line == Some(line) {
                    continue;
                }
                last_line = Some(line);
                self.push_at(offset, line, "toml", one_line(e.message()));
            }
            return Vec::new();
        }
        let mut rules = Vec::new();
        for (key, value) in doc.get_ref() {
            let name: &str = key.get_ref();
            if name != "rule" {
                self.error(
                    key.span(),
                    name,
                    "unknown key; a rule file holds only [[rule]] tables".to_owned(),
                );
                continue;
            }
            let items = match array_of_tables(value.get_ref(), "rule", "rule") {
                Ok(items) => items,
                Err(message) => {
                    self.error(value.span(), "rule", message);
                    continue;
                }
            };
            for (i, item) in items.iter().enumerate() {
                rules.extend(self.rule(&format!("rule[{i}]"), item));
            }
        }
        rules
    }

    /// What was `given` for `key`, or `None` after recording it missing at `line` (the rule's),
    /// with what to write instead.
    fn required<'v, 'i>(
        &mut self,
        given: Given<'v, 'i>,
        line: usize,
        key: &str,
        hint: impl FnOnce() -> String,
    ) -> Given<'v, 'i> {
        if given.is_none() {
            self.push(line, key, format!("missing; {}", hint()));
        }
        given
    }

    /// One `[[rule]]` table: `None` without a valid name, else the name and, if it has no
    /// error, the rule. Errors are recorded.
    fn rule(&mut self, prefix: &str, item: &Spanned<DeValue<'_>>) -> Option<Named> {
        let Some(table) = item.get_ref().as_table() else {
            self.error(item.span(), prefix, expected("a table", item.get_ref()));
            return None;
        };
        let start = self.line(item.span().start);
        let before = self.errors.len();
        let (mut name, mut when, mut action, mut reply, mut score): (
            Given<'_, '_>,
            Given<'_, '_>,
            Given<'_, '_>,
            Given<'_, '_>,
            Given<'_, '_>,
        ) = (None, None, None, None, None);
        for (key, value) in table {
            let line = self.line(value.span().start);
            let slot = match &**key.get_ref() {
                "name" => &mut name,
                "when" => &mut when,
                "action" => &mut action,
                "reply" => &mut reply,
                "score" => &mut score,
                other => {
                    self.error(
                        key.span(),
                        &format!("{prefix}.{other}"),
                        format!("unknown key; expected one of: {}", RULE_KEYS.join(", ")),
                    );
                    continue;
                }
            };
            *slot = Some((value, line));
        }

        let name_key = format!("{prefix}.name");
        let name_hint =
            "give the rule a name for the logs, such as name = \"reject-localhost-helo\"";
        let name = self
            .required(name, start, &name_key, || name_hint.to_owned())
            .and_then(|(v, line)| self.checked(&name_key, v, rule_name).map(|n| (n, line)));

        let when_key = format!("{prefix}.when");
        let when_hint = "give the conditions, such as when = { helo = \"localhost\" }, or when = {} \
                         for every client";
        let conditions = self
            .required(when, start, &when_key, || when_hint.to_owned())
            .and_then(|(v, _)| self.when(&when_key, v));

        let action_key = format!("{prefix}.action");
        let actions = || {
            let names: Vec<&str> = ACTIONS.iter().map(|(n, _)| *n).collect();
            format!("give one of: {}", names.join(", "))
        };
        let mut action = self
            .required(action, start, &action_key, actions)
            .and_then(|(v, line)| self.checked(&action_key, v, action_word).map(|a| (a, line)));

        let score_key = format!("{prefix}.score");
        match (&mut action, score) {
            (Some((RuleAction::Score(points), _)), Some((v, _))) => {
                match self.checked(&score_key, v, score_points) {
                    Some(n) => *points = n,
                    None => action = None,
                }
            }
            (Some((RuleAction::Score(_), line)), None) => {
                let line = *line;
                self.push(
                    line,
                    &score_key,
                    "missing; action = \"score\" needs the points to add, such as score = 2"
                        .to_owned(),
                );
                action = None;
            }
            (Some((other, _)), Some((v, _))) => {
                let word = other.as_str();
                self.error(
                    v.span(),
                    &score_key,
                    format!(
                        "only for action = \"score\"; a {word} rule adds nothing to the score \
                         (remove score, or use action = \"score\")"
                    ),
                );
            }
            _ => {}
        }

        let reply_key = format!("{prefix}.reply");
        let reply = match (reply, action) {
            (None, _) => None,
            (Some((v, _)), Some((a @ (RuleAction::Reject | RuleAction::Defer), _))) => {
                self.checked(&reply_key, v, |v| rule_reply(v, Some(a)))
            }
            (Some((v, _)), Some((other, _))) => {
                let word = other.as_str();
                self.error(
                    v.span(),
                    &reply_key,
                    format!(
                        "only reject (5xx) and defer (4xx) rules send a reply; a {word} rule \
                         sends none"
                    ),
                );
                None
            }
            // The action is missing or bad and its error says so; the reply's form is still
            // checked, so fixing the action brings up no new error here.
            (Some((v, _)), None) => {
                self.checked(&reply_key, v, |v| rule_reply(v, None));
                None
            }
        };

        let (name, line) = name?;
        let rule = match (action, conditions) {
            (Some((action, _)), Some(mut conditions)) if self.errors.len() == before => {
                conditions.sort_by_key(Condition::cost);
                let stage = conditions
                    .iter()
                    .map(condition_stage)
                    .max()
                    .unwrap_or(Stage::Connect);
                Some(Rule {
                    name: name.clone().into_boxed_str(),
                    stage,
                    conditions,
                    action,
                    reply,
                })
            }
            _ => None,
        };
        Some(Named {
            name,
            key: name_key,
            line,
            rule,
        })
    }

    /// The `when` table.
    fn when(&mut self, prefix: &str, value: &Spanned<DeValue<'_>>) -> Option<Vec<Condition>> {
        let Some(table) = value.get_ref().as_table() else {
            let found = value.get_ref().type_str();
            self.error(
                value.span(),
                prefix,
                format!(
                    "expected a table of conditions such as {{ helo = \"localhost\" }}, found \
                     {found}"
                ),
            );
            return None;
        };
        let before = self.errors.len();
        let mut conditions = Vec::new();
        for (key, v) in table {
            let name: &str = key.get_ref();
            let path = format!("{prefix}.{name}");
            let condition = match name {
                "client" => self.checked(&path, v, |v| client(v).map(Condition::Client)),
                "helo" => self.patterns(&path, v, true, false).map(Condition::Helo),
                "rdns" => self.patterns(&path, v, true, false).map(Condition::Rdns),
                "dnsbl" => self.patterns(&path, v, true, false).map(Condition::Dnsbl),
                "sender" => self.patterns(&path, v, false, true).map(Condition::Sender),
                "recipient" => self
                    .patterns(&path, v, false, false)
                    .map(Condition::Recipient),
                "score_at_least" => self.checked(&path, v, |v| {
                    score_threshold(v).map(Condition::ScoreAtLeast)
                }),
                "no_rdns" => self.checked(&path, v, |v| boolean(v).map(Condition::NoRdns)),
                _ => {
                    self.error(
                        key.span(),
                        &path,
                        format!(
                            "unknown condition; expected one of: {}",
                            WHEN_KEYS.join(", ")
                        ),
                    );
                    None
                }
            };
            conditions.extend(condition);
        }
        (self.errors.len() == before).then_some(conditions)
    }

    /// A pattern or an array of them; each bad element is reported as `key[i]`.
    fn patterns(
        &mut self,
        key: &str,
        value: &Spanned<DeValue<'_>>,
        dns_name: bool,
        allow_empty: bool,
    ) -> Option<Patterns> {
        let parse = |v: &DeValue<'_>| pattern(v, dns_name, allow_empty);
        let any = match value.get_ref() {
            DeValue::Array(items) => {
                if items.is_empty() {
                    self.error(
                        value.span(),
                        key,
                        "an empty array never matches; give at least one pattern".to_owned(),
                    );
                    return None;
                }
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.extend(self.checked(&format!("{key}[{i}]"), item, parse));
                }
                (out.len() == items.len()).then_some(out)?
            }
            _ => vec![self.checked(key, value, parse)?],
        };
        Some(Patterns { any, dns_name })
    }

    /// `parse(value)`, or the error recorded at the value's line.
    fn checked<T>(
        &mut self,
        key: &str,
        value: &Spanned<DeValue<'_>>,
        parse: impl FnOnce(&DeValue<'_>) -> Result<T, String>,
    ) -> Option<T> {
        match parse(value.get_ref()) {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(value.span(), key, message);
                None
            }
        }
    }
}

/// The stage at which a condition's input is known.
fn condition_stage(condition: &Condition) -> Stage {
    match condition {
        Condition::ScoreAtLeast(_)
        | Condition::NoRdns(_)
        | Condition::Client(_)
        | Condition::Dnsbl(_)
        | Condition::Rdns(_) => Stage::Connect,
        Condition::Helo(_) => Stage::Helo,
        Condition::Sender(_) => Stage::Mail,
        Condition::Recipient(_) => Stage::Rcpt,
    }
}
