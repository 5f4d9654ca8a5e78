//! Walks a parsed TOML document section by section and fills a [`Config`] that starts from the
//! defaults, recording an error for every bad key instead of stopping at the first.
//!
//! The TOML comes from `toml::de::DeTable`, which keeps the byte span of every key and value;
//! spans become 1-based line numbers here. A key that fails keeps its default and the walk goes
//! on; checks across keys skip the keys that failed. The caller discards the result when any
//! error was recorded.
//!
//! Here: the section list, the error collector and its typed accessors; the sections' walkers
//! are in `sections`, the value readers in `value`, the checks across keys in `validate`.

mod sections;
mod validate;
mod value;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{Config, ConfigError};
use crate::policy::reading::{Lines, expected};

/// Every section and its keys, in DESIGN.md §3 order (then §7's `[content]` and §9's
/// `[transparent]`); the hints in unknown-key errors list these.
pub(super) const SCHEMA: &[(&str, &[&str])] = &[
    ("server", SERVER_KEYS),
    ("limits", LIMITS_KEYS),
    ("timeouts", TIMEOUTS_KEYS),
    ("downstream", DOWNSTREAM_KEYS),
    ("tls", TLS_KEYS),
    ("dns", DNS_KEYS),
    ("dnsbl", DNSBL_KEYS),
    ("scoring", SCORING_KEYS),
    ("tarpit", TARPIT_KEYS),
    ("greylist", GREYLIST_KEYS),
    ("reputation", REPUTATION_KEYS),
    ("state", STATE_KEYS),
    ("metrics", METRICS_KEYS),
    ("lists", LISTS_KEYS),
    ("rules", RULES_KEYS),
    ("content", CONTENT_KEYS),
    ("transparent", TRANSPARENT_KEYS),
];

const SERVER_KEYS: &[&str] = &[
    "listen",
    "hostname",
    "workers",
    "max_connections",
    "max_tarpitted",
    "state_dir",
    "proxy_protocol_from",
    "user",
    "group",
];
const LIMITS_KEYS: &[&str] = &[
    "max_connections_per_ip",
    "max_connections_per_subnet",
    "connection_rate_per_ip",
    "connection_rate_per_subnet",
    "max_message_size",
    "max_recipients",
    "max_unknown_commands",
    "max_junk_commands",
    "max_errors",
    "max_line_length",
    "bare_newline",
];
const TIMEOUTS_KEYS: &[&str] = &["connect", "command", "data", "idle", "drain"];
const DOWNSTREAM_KEYS: &[&str] = &[
    "servers",
    "balance",
    "down_after",
    "retry_after",
    "mode",
    "pool_size",
    "announce_client",
    "tls",
    "tls_verify",
    "tls_ca",
];
const TLS_KEYS: &[&str] = &["cert", "key"];
const DNS_KEYS: &[&str] = &["servers", "timeout", "cache_ttl", "rdns", "health_interval"];
const DNSBL_KEYS: &[&str] = &["zone", "weight", "codes", "reply"];
const SCORING_KEYS: &[&str] = &["allow_at", "tarpit_at", "reject_at", "reject_mode"];
const TARPIT_KEYS: &[&str] = &[
    "greet_pause",
    "banner_continuation",
    "pregreet",
    "reply_delay",
    "stutter",
    "pass_ttl",
];
const GREYLIST_KEYS: &[&str] = &[
    "enabled",
    "delay",
    "retry_window",
    "pass_ttl",
    "max_entries",
    "max_new_per_subnet",
    "key",
];
const REPUTATION_KEYS: &[&str] = &["enabled", "half_life", "weight"];
const STATE_KEYS: &[&str] = &["backend", "redis", "prefix", "timeout"];
const METRICS_KEYS: &[&str] = &["listen"];
const LISTS_KEYS: &[&str] = &["allow", "deny"];
const RULES_KEYS: &[&str] = &["files"];
/// DESIGN.md §7.
const CONTENT_KEYS: &[&str] = &[
    "rspamd",
    "milters",
    "timeout",
    "on_failure",
    "spool_after",
    "max_scans",
];

/// DESIGN.md §9.
const TRANSPARENT_KEYS: &[&str] = &["listen", "spoof_source"];

/// Parses `text` (the contents of `path`) onto `config`, which holds the defaults. Returns every
/// error found, syntax errors alone if the TOML does not parse.
pub(super) fn read(text: &str, path: &Path, config: &mut Config) -> Vec<ConfigError> {
    let mut reader = Reader::new(text, path);
    let (doc, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        // Walking a tree the parser had to patch up would report its guesses as more errors.
        // Its recovery can also report one mistake several times on a line: keep the first.
        let mut last_line = None;
        for e in syntax_errors {
            let line = e.span().map(|span| reader.line(span.start));
            if line.is_some() && line == last_line {
                continue;
            }
            last_line = line;
            reader.push(line, "toml", e.message().trim_end().to_owned());
        }
        return reader.finish();
    }
    let sections: Vec<&str> = SCHEMA.iter().map(|(section, _)| *section).collect();
    for (key, value) in doc.get_ref() {
        let name: &str = key.get_ref();
        let table = value.get_ref().as_table();
        match (name, table) {
            ("dnsbl", _) => reader.dnsbl(value, &mut config.dnsbl),
            (_, None) if sections.contains(&name) => reader.error(
                value.span(),
                name,
                expected(&format!("a table [{name}]"), value.get_ref()),
            ),
            ("server", Some(t)) => reader.server(t, config),
            ("limits", Some(t)) => reader.limits(t, config),
            ("timeouts", Some(t)) => reader.timeouts(t, config),
            ("downstream", Some(t)) => reader.downstream(t, config),
            ("tls", Some(t)) => reader.tls(t, config),
            ("dns", Some(t)) => reader.dns(t, config),
            ("scoring", Some(t)) => reader.scoring(t, config),
            ("tarpit", Some(t)) => reader.tarpit(t, config),
            ("greylist", Some(t)) => reader.greylist(t, config),
            ("reputation", Some(t)) => reader.reputation(t, config),
            ("state", Some(t)) => reader.state(t, config),
            ("metrics", Some(t)) => reader.metrics(t, config),
            ("lists", Some(t)) => reader.lists(t, config),
            ("rules", Some(t)) => reader.rules(t, config),
            ("content", Some(t)) => reader.content(t, config),
            ("transparent", Some(t)) => reader.transparent(t, config),
            _ => reader.error(
                key.span(),
                name,
                format!("unknown section; expected one of: {}", sections.join(", ")),
            ),
        }
    }
    reader.check_across_keys(config);
    reader.finish()
}

/// The error collector and typed accessors over one document.
struct Reader<'p> {
    path: &'p Path,
    /// Where each line starts.
    text_lines: Lines,
    errors: Vec<ConfigError>,
    /// Line of every key given in the file, by dotted path, for checks that span several keys.
    lines: HashMap<String, usize>,
}

/// Parses one TOML value into a field's type, or says why not.
type Parse<T> = fn(&DeValue<'_>) -> Result<T, String>;

impl<'p> Reader<'p> {
    fn new(text: &str, path: &'p Path) -> Self {
        Self {
            path,
            text_lines: Lines::new(text),
            errors: Vec::new(),
            lines: HashMap::new(),
        }
    }

    /// The errors, ordered by line (the map keeps keys sorted by name, not by position).
    fn finish(mut self) -> Vec<ConfigError> {
        self.errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        self.errors
    }

    /// 1-based line holding byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.text_lines.line(offset)
    }

    fn push(&mut self, line: Option<usize>, key: &str, message: String) {
        self.errors.push(ConfigError {
            path: self.path.to_path_buf(),
            line,
            key: key.to_owned(),
            message,
        });
    }

    fn error(&mut self, span: Range<usize>, key: &str, message: String) {
        let line = self.line(span.start);
        self.push(Some(line), key, message);
    }

    /// Calls `field` for each key of `table`, recording the key's line; `field` returns false for
    /// a key it does not know, which becomes an error listing `known`.
    fn fields(
        &mut self,
        prefix: &str,
        table: &DeTable<'_>,
        known: &[&str],
        mut field: impl FnMut(&mut Self, &str, &str, &Spanned<DeValue<'_>>) -> bool,
    ) {
        for (key, value) in table {
            let name: &str = key.get_ref();
            let path = format!("{prefix}.{name}");
            let line = self.line(value.span().start);
            self.lines.insert(path.clone(), line);
            if !field(self, name, &path, value) {
                self.error(
                    key.span(),
                    &path,
                    format!("unknown key; expected one of: {}", known.join(", ")),
                );
            }
        }
    }

    /// Stores the parsed value in `slot`, or records the error and leaves the default.
    fn set<T>(&mut self, slot: &mut T, key: &str, value: &Spanned<DeValue<'_>>, parse: Parse<T>) {
        match parse(value.get_ref()) {
            Ok(v) => *slot = v,
            Err(message) => self.error(value.span(), key, message),
        }
    }

    /// An array whose elements all parse, each failure reported as `key[i]`.
    fn list<T>(
        &mut self,
        key: &str,
        value: &Spanned<DeValue<'_>>,
        parse: Parse<T>,
    ) -> Option<Vec<T>> {
        let Some(items) = value.get_ref().as_array() else {
            self.error(value.span(), key, expected("an array", value.get_ref()));
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match parse(item.get_ref()) {
                Ok(v) => out.push(v),
                Err(message) => {
                    self.error(item.span(), &format!("{key}[{i}]"), message);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// [`Self::list`] into `slot`; `required` is the hint when the array must not be empty.
    fn set_list<T>(
        &mut self,
        slot: &mut Vec<T>,
        key: &str,
        value: &Spanned<DeValue<'_>>,
        parse: Parse<T>,
        required: Option<&str>,
    ) {
        let Some(items) = self.list(key, value, parse) else {
            return;
        };
        match required {
            Some(hint) if items.is_empty() => {
                self.error(value.span(), key, format!("must not be empty; {hint}"));
            }
            _ => *slot = items,
        }
    }

    /// Whether one of `keys` already has an error: its value is then the default, not what the
    /// operator wrote, and comparing it with another key would only add a confusing error.
    fn has_error(&self, keys: &[&str]) -> bool {
        self.errors.iter().any(|e| keys.contains(&e.key.as_str()))
    }
}

/// Replaces every relative path in `config` by one under `base` (the config file's directory).
pub(super) fn resolve_paths(config: &mut Config, base: &Path) {
    let resolve = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    resolve(&mut config.server.state_dir);
    config.tls.cert.iter_mut().for_each(resolve);
    config.tls.key.iter_mut().for_each(resolve);
    config.downstream.tls_ca.iter_mut().for_each(resolve);
    config.lists.allow.iter_mut().for_each(resolve);
    config.lists.deny.iter_mut().for_each(resolve);
    config.rules.files.iter_mut().for_each(resolve);
}
