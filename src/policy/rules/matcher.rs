//! The compiled rules and their matching: a rule's conditions against the [`Facts`] of a
//! stage, exact names, `*` globs and regexes (see the parent module's doc for their syntax).

use std::borrow::Cow;

use regex::Regex;

use super::{Facts, RuleAction, Stage};
use crate::policy::cidr::Cidr;
use crate::smtp::reply::Reply;

/// One compiled rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Rule {
    pub(super) name: Box<str>,
    pub(super) stage: Stage,
    /// Cheapest first, so a failing cheap test skips the pattern matches.
    pub(super) conditions: Vec<Condition>,
    pub(super) action: RuleAction,
    pub(super) reply: Option<Reply>,
}

impl Rule {
    pub(super) fn matches(&self, facts: &Facts<'_>) -> bool {
        self.conditions.iter().all(|c| c.matches(facts))
    }
}

/// One `when` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Condition {
    ScoreAtLeast(i32),
    NoRdns(bool),
    Client(Vec<Cidr>),
    Dnsbl(Patterns),
    Rdns(Patterns),
    Helo(Patterns),
    Sender(Patterns),
    Recipient(Patterns),
}

impl Condition {
    pub(super) fn matches(&self, facts: &Facts<'_>) -> bool {
        match self {
            Condition::ScoreAtLeast(min) => facts.score >= *min,
            Condition::NoRdns(absent) => facts.rdns.is_none() == *absent,
            Condition::Client(blocks) => blocks.iter().any(|b| b.contains(facts.client)),
            Condition::Dnsbl(p) => facts.listed_in.iter().any(|zone| p.matches(zone)),
            Condition::Rdns(p) => facts.rdns.is_some_and(|name| p.matches(name)),
            Condition::Helo(p) => facts.helo.is_some_and(|name| p.matches(name)),
            Condition::Sender(p) => facts.sender.is_some_and(|addr| p.matches(addr)),
            Condition::Recipient(p) => facts.recipient.is_some_and(|addr| p.matches(addr)),
        }
    }

    /// Order of evaluation inside a rule: integer and flag tests, then address blocks, then
    /// string patterns.
    pub(super) fn cost(&self) -> u8 {
        match self {
            Condition::ScoreAtLeast(_) | Condition::NoRdns(_) => 0,
            Condition::Client(_) => 1,
            _ => 2,
        }
    }
}

/// Patterns of which any may match; `dns_name` values lose one trailing dot before an exact
/// or glob match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Patterns {
    pub(super) any: Vec<Pattern>,
    pub(super) dns_name: bool,
}

impl Patterns {
    pub(super) fn matches(&self, value: &str) -> bool {
        let plain = if self.dns_name {
            value.strip_suffix('.').unwrap_or(value)
        } else {
            value
        };
        // Lowercased at most once, and only when an exact pattern or glob needs it.
        let mut lower: Option<Cow<'_, str>> = None;
        self.any.iter().any(|pattern| match pattern {
            Pattern::Regex(re) => re.0.is_match(value),
            Pattern::Exact(_) | Pattern::Glob(_) => {
                let folded = lower.get_or_insert_with(|| ascii_lowercase(plain));
                pattern.matches_folded(folded)
            }
        })
    }
}

/// One pattern: exact, glob or regex (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Pattern {
    /// ASCII-lowercased.
    Exact(Box<str>),
    Glob(Glob),
    Regex(SourceRegex),
}

impl Pattern {
    /// Exact and glob patterns against an ASCII-lowercased value.
    pub(super) fn matches_folded(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(exact) => **exact == *value,
            Pattern::Glob(glob) => glob.matches(value),
            Pattern::Regex(re) => re.0.is_match(value),
        }
    }
}

/// A `*` glob split at its stars: `a*b*c` is prefix `a`, pieces `[b]`, suffix `c`; all
/// ASCII-lowercased, empty pieces (from `**`) dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Glob {
    pub(super) prefix: Box<str>,
    pub(super) pieces: Vec<Box<str>>,
    pub(super) suffix: Box<str>,
}

impl Glob {
    /// With the ends anchored, taking each middle piece at its leftmost place is optimal: any
    /// match could be shifted to it, leaving more room for the next ones. Linear in the value
    /// times the pieces, never exponential.
    pub(super) fn matches(&self, value: &str) -> bool {
        if value.len() < self.prefix.len().saturating_add(self.suffix.len()) {
            return false;
        }
        let Some(rest) = value.strip_prefix(&*self.prefix) else {
            return false;
        };
        let Some(mut rest) = rest.strip_suffix(&*self.suffix) else {
            return false;
        };
        for piece in &self.pieces {
            let Some(at) = rest.find(&**piece) else {
                return false;
            };
            let Some(after) = rest.get(at.saturating_add(piece.len())..) else {
                return false;
            };
            rest = after;
        }
        true
    }
}

/// A compiled regex that compares by its source, so rule sets can be compared (reload,
/// tests).
#[derive(Clone, Debug)]
pub(super) struct SourceRegex(pub(super) Regex);

impl PartialEq for SourceRegex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for SourceRegex {}

fn ascii_lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}
