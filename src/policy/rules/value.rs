//! The rule files' value readers: one TOML value (a name, an action, a score, address blocks,
//! a pattern, a reply) into its type, or the message saying why not.

use regex::RegexBuilder;
use toml::de::DeValue;

use super::matcher::{Glob, Pattern, SourceRegex};
use super::{
    MAX_NAME, MAX_PATTERN, MAX_REPLY_TEXT, MAX_SCORE, REGEX_DFA_LIMIT, REGEX_SIZE_LIMIT, RuleAction,
};
use crate::policy::cidr::Cidr;
use crate::policy::reading::{choice, integer, string};
use crate::smtp::reply::{EnhancedCode, Reply};

/// The actions, for hints and parsing.
pub(super) const ACTIONS: &[(&str, RuleAction)] = &[
    ("allow", RuleAction::Allow),
    ("reject", RuleAction::Reject),
    ("defer", RuleAction::Defer),
    ("tarpit", RuleAction::Tarpit),
    ("greylist", RuleAction::Greylist),
    ("score", RuleAction::Score(0)),
];

/// A TOML parser message on one line (they can span several).
pub(super) fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub(super) fn rule_name(v: &DeValue<'_>) -> Result<String, String> {
    let s = string(v, "a name such as \"reject-localhost-helo\"")?;
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if let Some(c) = s
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{c:?} is not allowed; a name is letters, digits, '.', '_' and '-' (it goes into \
             log lines)"
        ));
    }
    if s.len() > MAX_NAME {
        return Err(format!("longer than {MAX_NAME} characters"));
    }
    Ok(s.to_owned())
}

pub(super) fn action_word(v: &DeValue<'_>) -> Result<RuleAction, String> {
    choice(v, ACTIONS, "action")
}

pub(super) fn score_points(v: &DeValue<'_>) -> Result<i32, String> {
    let n = integer(v)?;
    if n == 0 {
        return Err("must not be 0; a score rule that adds nothing does nothing".to_owned());
    }
    let max = i128::from(MAX_SCORE);
    if !(-max..=max).contains(&n) {
        return Err(format!("must be from -{max} to {max}, got {n}"));
    }
    i32::try_from(n).map_err(|_| format!("{n} is out of range"))
}

pub(super) fn score_threshold(v: &DeValue<'_>) -> Result<i32, String> {
    let n = integer(v)?;
    i32::try_from(n).map_err(|_| format!("{n} is out of range"))
}

/// `client`: one block or a non-empty array of them.
pub(super) fn client(v: &DeValue<'_>) -> Result<Vec<Cidr>, String> {
    let one = |v: &DeValue<'_>| -> Result<Cidr, String> {
        string(v, "an address or CIDR block such as \"192.0.2.0/24\"")?
            .parse::<Cidr>()
            .map_err(|e| e.to_string())
    };
    match v {
        DeValue::Array(items) => {
            if items.is_empty() {
                return Err("an empty array never matches; give at least one block".to_owned());
            }
            // One message for the first bad element: `client` is short and the fix is clear.
            items
                .iter()
                .enumerate()
                .map(|(i, item)| one(item.get_ref()).map_err(|e| format!("element {i}: {e}")))
                .collect()
        }
        _ => one(v).map(|block| vec![block]),
    }
}

/// One pattern string (see the module doc).
pub(super) fn pattern(
    v: &DeValue<'_>,
    dns_name: bool,
    allow_empty: bool,
) -> Result<Pattern, String> {
    let s = string(v, "a pattern (\"exact\", \"*glob*\" or \"/regex/\")")?;
    if s.chars().count() > MAX_PATTERN {
        return Err(format!("longer than {MAX_PATTERN} characters"));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{c:?} is not allowed; a pattern is one line without control characters"
        ));
    }
    if let Some(body) = s.strip_prefix('/') {
        let Some(source) = body.strip_suffix('/') else {
            return Err(format!(
                "{s:?} starts with '/' but does not end with one; write a regex as \"/…/\""
            ));
        };
        if source.is_empty() {
            return Err("empty regex \"//\"; it would match everything".to_owned());
        }
        return RegexBuilder::new(source)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_DFA_LIMIT)
            .build()
            .map(|re| Pattern::Regex(SourceRegex(re)))
            .map_err(|e| format!("invalid regex {s:?}: {}", regex_error(&e)));
    }
    let plain = if dns_name {
        s.strip_suffix('.').unwrap_or(s)
    } else {
        s
    };
    if plain.is_empty() && !allow_empty {
        return Err("an empty pattern never matches".to_owned());
    }
    let lower = plain.to_ascii_lowercase();
    if !lower.contains('*') {
        return Ok(Pattern::Exact(lower.into_boxed_str()));
    }
    let mut parts: Vec<&str> = lower.split('*').collect();
    // `split` yields at least two parts when there is a '*'.
    let suffix = parts.pop().unwrap_or_default();
    let prefix = if parts.is_empty() {
        ""
    } else {
        parts.remove(0)
    };
    Ok(Pattern::Glob(Glob {
        prefix: prefix.into(),
        pieces: parts
            .into_iter()
            .filter(|piece| !piece.is_empty())
            .map(Into::into)
            .collect(),
        suffix: suffix.into(),
    }))
}

/// The regex crate's message, on one line: a syntax error's own "error: …" line (its other
/// lines draw the pattern and a caret), or the whole message joined.
fn regex_error(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(text) => text
            .lines()
            .find_map(|line| line.strip_prefix("error: "))
            .map_or_else(|| one_line(text), ToOwned::to_owned),
        regex::Error::CompiledTooBig(limit) => format!(
            "compiles to more than {limit} bytes; simplify it (large counted repetitions such \
             as {{1000}} multiply its size)"
        ),
        other => one_line(&other.to_string()),
    }
}

/// `reply` for a rule whose action is `action` (reject or defer; `None` when the action is
/// not known, then either class is accepted).
pub(super) fn rule_reply(v: &DeValue<'_>, action: Option<RuleAction>) -> Result<Reply, String> {
    let s = string(v, "a reply such as \"550 5.7.1 Not accepted here\"")?;
    let (code_text, rest) = s.split_once(' ').unwrap_or((s, ""));
    let code = match code_text.as_bytes() {
        [a, b, c] if [a, b, c].iter().all(|d| d.is_ascii_digit()) => {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => {
            return Err(format!(
                "invalid reply {s:?}: expected a three-digit code, an optional enhanced code \
                 and a text, such as \"550 5.7.1 Not accepted here\""
            ));
        }
    };
    let class = code / 100;
    let wanted = match action {
        Some(RuleAction::Defer) => Some((4, "defer", "reject")),
        Some(_) => Some((5, "reject", "defer")),
        None => None,
    };
    if !matches!(class, 4 | 5) {
        return Err(format!(
            "reply code {code} is neither 4xx (defer) nor 5xx (reject)"
        ));
    }
    if let Some((want, word, other)) = wanted {
        if class != want {
            return Err(format!(
                "a {word} rule needs a {want}xx reply, got {code}; use action = \"{other}\" \
                 for a {class}xx reply"
            ));
        }
    }
    if code == 421 {
        return Err(
            "421 means the server closes the connection, which a rule does not do; use 450 or \
             451"
            .to_owned(),
        );
    }
    let (enhanced, text) = match rest.split_once(' ').unwrap_or((rest, "")) {
        (first, after) if first.starts_with(|c: char| c.is_ascii_digit()) => {
            let Some(enhanced) = EnhancedCode::parse(first) else {
                return Err(format!(
                    "invalid enhanced code {first:?}: expected class.subject.detail such as \
                     {class}.7.1"
                ));
            };
            if u16::from(enhanced.class()) != class {
                return Err(format!(
                    "enhanced code {first} does not match reply code {code}; use {class}.{}.{}",
                    enhanced.1, enhanced.2
                ));
            }
            (enhanced, after)
        }
        _ => (EnhancedCode(u8::try_from(class).unwrap_or(5), 7, 1), rest),
    };
    if text.trim().is_empty() {
        return Err(format!(
            "reply {s:?} has no text; say what the client should do, such as \"{code} {} Not \
             accepted here\"",
            enhanced
        ));
    }
    if let Some(c) = text.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(format!(
            "{c:?} is not allowed; reply text is one line of printable ASCII"
        ));
    }
    if text.len() > MAX_REPLY_TEXT {
        return Err(format!(
            "reply text is longer than {MAX_REPLY_TEXT} characters"
        ));
    }
    Ok(Reply {
        code,
        enhanced: Some(enhanced),
        lines: vec![text.to_owned()],
    })
}
