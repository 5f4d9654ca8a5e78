//! Walks a parsed TOML document section by section and fills a [`Config`] that starts from the
//! defaults, recording an error for every bad key instead of stopping at the first.
//!
//! The TOML comes from `toml::de::DeTable`, which keeps the byte span of every key and value;
//! spans become 1-based line numbers here. A key that fails keeps its default and the walk goes
//! on; checks across keys skip the keys that failed. The caller discards the result when any
//! error was recorded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::syntax;
use super::{
    AnnounceClient, BareNewline, Config, ConfigError, Dnsbl, DownstreamMode, DownstreamTls,
    GreylistKey, Pregreet, RejectMode, StateBackend,
};

/// Every section and its keys, in DESIGN.md §3 order; the hints in unknown-key errors list these.
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
];

const SERVER_KEYS: &[&str] = &[
    "listen",
    "hostname",
    "workers",
    "max_connections",
    "max_tarpitted",
    "state_dir",
    "proxy_protocol_from",
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
                format!(
                    "expected a table [{name}], found {}",
                    value.get_ref().type_str()
                ),
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
    /// Byte offset where each line starts; `line_starts[0] == 0`.
    line_starts: Vec<usize>,
    errors: Vec<ConfigError>,
    /// Line of every key given in the file, by dotted path, for checks that span several keys.
    lines: HashMap<String, usize>,
}

/// Parses one TOML value into a field's type, or says why not.
type Parse<T> = fn(&DeValue<'_>) -> Result<T, String>;

impl<'p> Reader<'p> {
    fn new(text: &str, path: &'p Path) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            path,
            line_starts,
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
        self.line_starts.partition_point(|&start| start <= offset)
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
            let found = value.get_ref().type_str();
            self.error(
                value.span(),
                key,
                format!("expected an array, found {found}"),
            );
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

    fn server(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let s = &mut config.server;
        self.fields("server", table, SERVER_KEYS, |r, name, key, v| {
            match name {
                "listen" => r.set_list(
                    &mut s.listen,
                    key,
                    v,
                    socket_addr,
                    Some(r#"give at least one address such as "0.0.0.0:25""#),
                ),
                "hostname" => r.set(&mut s.hostname, key, v, hostname),
                "workers" => r.set(&mut s.workers, key, v, |v| int(v, 0, 1024)),
                "max_connections" => r.set(&mut s.max_connections, key, v, |v| at_least(v, 1)),
                "max_tarpitted" => r.set(&mut s.max_tarpitted, key, v, |v| at_least(v, 0)),
                "state_dir" => r.set(&mut s.state_dir, key, v, path),
                "proxy_protocol_from" => {
                    r.set_list(&mut s.proxy_protocol_from, key, v, cidr, None);
                }
                _ => return false,
            }
            true
        });
    }

    fn limits(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let l = &mut config.limits;
        self.fields("limits", table, LIMITS_KEYS, |r, name, key, v| {
            match name {
                "max_connections_per_ip" => {
                    r.set(&mut l.max_connections_per_ip, key, v, |v| at_least(v, 1));
                }
                "max_connections_per_subnet" => {
                    r.set(&mut l.max_connections_per_subnet, key, v, |v| {
                        at_least(v, 1)
                    });
                }
                "connection_rate_per_ip" => r.set(&mut l.connection_rate_per_ip, key, v, rate),
                "connection_rate_per_subnet" => {
                    r.set(&mut l.connection_rate_per_subnet, key, v, rate);
                }
                "max_message_size" => r.set(&mut l.max_message_size, key, v, message_size),
                "max_recipients" => r.set(&mut l.max_recipients, key, v, |v| int(v, 1, 100_000)),
                "max_unknown_commands" => {
                    r.set(&mut l.max_unknown_commands, key, v, |v| int(v, 0, 1000));
                }
                "max_junk_commands" => {
                    r.set(&mut l.max_junk_commands, key, v, |v| int(v, 0, 100_000));
                }
                // 0 would close on the first error: at least one is always tolerated.
                "max_errors" => r.set(&mut l.max_errors, key, v, |v| int(v, 1, 100_000)),
                // RFC 5321 §4.5.3.1.4: a command line may be 512 octets; we must accept that much.
                "max_line_length" => r.set(&mut l.max_line_length, key, v, |v| int(v, 512, 65_536)),
                "bare_newline" => r.set(&mut l.bare_newline, key, v, |v| {
                    choice(
                        v,
                        &[
                            ("reject", BareNewline::Reject),
                            ("normalize", BareNewline::Normalize),
                        ],
                    )
                }),
                _ => return false,
            }
            true
        });
    }

    fn timeouts(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let t = &mut config.timeouts;
        self.fields("timeouts", table, TIMEOUTS_KEYS, |r, name, key, v| {
            let slot = match name {
                "connect" => &mut t.connect,
                "command" => &mut t.command,
                "data" => &mut t.data,
                "idle" => &mut t.idle,
                // Zero is meaningful here: stop at once on SIGTERM.
                "drain" => {
                    r.set(&mut t.drain, key, v, duration);
                    return true;
                }
                _ => return false,
            };
            r.set(slot, key, v, positive_duration);
            true
        });
    }

    fn downstream(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let d = &mut config.downstream;
        self.fields("downstream", table, DOWNSTREAM_KEYS, |r, name, key, v| {
            match name {
                "servers" => r.set_list(
                    &mut d.servers,
                    key,
                    v,
                    downstream_addr,
                    Some(r#"give the MTA to relay to, such as "127.0.0.1:10025""#),
                ),
                "mode" => r.set(&mut d.mode, key, v, |v| {
                    choice(
                        v,
                        &[
                            ("synchronous", DownstreamMode::Synchronous),
                            ("multiplexing", DownstreamMode::Multiplexing),
                        ],
                    )
                }),
                "pool_size" => r.set(&mut d.pool_size, key, v, |v| at_least(v, 1)),
                "announce_client" => r.set(&mut d.announce_client, key, v, |v| {
                    choice(
                        v,
                        &[
                            ("xclient", AnnounceClient::Xclient),
                            ("proxy-v1", AnnounceClient::ProxyV1),
                            ("proxy-v2", AnnounceClient::ProxyV2),
                            ("none", AnnounceClient::None),
                        ],
                    )
                }),
                "tls" => r.set(&mut d.tls, key, v, |v| {
                    choice(
                        v,
                        &[
                            ("none", DownstreamTls::None),
                            ("opportunistic", DownstreamTls::Opportunistic),
                            ("required", DownstreamTls::Required),
                        ],
                    )
                }),
                "tls_verify" => r.set(&mut d.tls_verify, key, v, boolean),
                "tls_ca" => r.set(&mut d.tls_ca, key, v, optional_path),
                _ => return false,
            }
            true
        });
    }

    fn tls(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let t = &mut config.tls;
        self.fields("tls", table, TLS_KEYS, |r, name, key, v| {
            match name {
                "cert" => r.set(&mut t.cert, key, v, optional_path),
                "key" => r.set(&mut t.key, key, v, optional_path),
                _ => return false,
            }
            true
        });
        // Kept for `Config::load_tls`, which reads the files after this walk is over.
        t.lines = [
            self.lines.get("tls.cert").copied(),
            self.lines.get("tls.key").copied(),
        ];
    }

    fn dns(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let d = &mut config.dns;
        self.fields("dns", table, DNS_KEYS, |r, name, key, v| {
            match name {
                "servers" => r.set_list(&mut d.servers, key, v, dns_server, None),
                "timeout" => r.set(&mut d.timeout, key, v, positive_duration),
                "cache_ttl" => r.set(&mut d.cache_ttl, key, v, positive_duration),
                "rdns" => r.set(&mut d.rdns, key, v, boolean),
                "health_interval" => r.set(&mut d.health_interval, key, v, positive_duration),
                _ => return false,
            }
            true
        });
    }

    /// `[[dnsbl]]`: an array of tables, `zone` and `weight` required in each.
    fn dnsbl(&mut self, value: &Spanned<DeValue<'_>>, out: &mut Vec<Dnsbl>) {
        let items = match value.get_ref() {
            DeValue::Array(items) => items,
            DeValue::Table(_) => {
                return self.error(
                    value.span(),
                    "dnsbl",
                    "expected an array of tables; write [[dnsbl]] with double brackets, one \
                     table per zone"
                        .to_owned(),
                );
            }
            other => {
                let found = other.type_str();
                return self.error(
                    value.span(),
                    "dnsbl",
                    format!("expected an array of tables ([[dnsbl]]), found {found}"),
                );
            }
        };
        // zone (lowercased) -> index of the table that named it first
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let prefix = format!("dnsbl[{i}]");
            let Some(table) = item.get_ref().as_table() else {
                let found = item.get_ref().type_str();
                self.error(
                    item.span(),
                    &prefix,
                    format!("expected a table, found {found}"),
                );
                continue;
            };
            let (mut zone, mut weight) = (None, None);
            let (mut zone_given, mut weight_given) = (false, false);
            let mut dnsbl = Dnsbl {
                zone: Arc::from(""),
                weight: 0,
                codes: Vec::new(),
                reply: None,
            };
            self.fields(&prefix, table, DNSBL_KEYS, |r, name, key, v| {
                match name {
                    "zone" => {
                        zone_given = true;
                        r.set(&mut zone, key, v, |v| zone_name(v).map(Some));
                    }
                    "weight" => {
                        weight_given = true;
                        r.set(&mut weight, key, v, |v| nonzero_weight(v).map(Some));
                    }
                    "codes" => r.set_list(&mut dnsbl.codes, key, v, code_range, None),
                    "reply" => r.set(&mut dnsbl.reply, key, v, reply_text),
                    _ => return false,
                }
                true
            });
            let line = self.line(item.span().start);
            if !zone_given {
                let hint = r#"missing; give the zone to query, such as zone = "zen.spamhaus.org""#;
                self.push(Some(line), &format!("{prefix}.zone"), hint.to_owned());
            }
            if !weight_given {
                let hint = "missing; give the score a listing adds, such as weight = 3 (negative \
                            for an allowlist)";
                self.push(Some(line), &format!("{prefix}.weight"), hint.to_owned());
            }
            let (Some(zone), Some(weight)) = (zone, weight) else {
                continue;
            };
            if let Some(first) = seen.get(&zone.to_ascii_lowercase()) {
                let key = format!("{prefix}.zone");
                let line = self.lines.get(&key).copied();
                self.push(
                    line,
                    &key,
                    format!("zone {zone:?} is already dnsbl[{first}]"),
                );
                continue;
            }
            seen.insert(zone.to_ascii_lowercase(), i);
            dnsbl.zone = Arc::from(zone);
            dnsbl.weight = weight;
            out.push(dnsbl);
        }
    }

    fn scoring(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let s = &mut config.scoring;
        self.fields("scoring", table, SCORING_KEYS, |r, name, key, v| {
            match name {
                "allow_at" => r.set(&mut s.allow_at, key, v, any_int),
                "tarpit_at" => r.set(&mut s.tarpit_at, key, v, any_int),
                "reject_at" => r.set(&mut s.reject_at, key, v, any_int),
                "reject_mode" => r.set(&mut s.reject_mode, key, v, |v| {
                    choice(
                        v,
                        &[
                            ("immediate", RejectMode::Immediate),
                            ("enforce", RejectMode::Enforce),
                        ],
                    )
                }),
                _ => return false,
            }
            true
        });
    }

    fn tarpit(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let t = &mut config.tarpit;
        self.fields("tarpit", table, TARPIT_KEYS, |r, name, key, v| {
            match name {
                "greet_pause" => r.set(&mut t.greet_pause, key, v, duration),
                "banner_continuation" => r.set(&mut t.banner_continuation, key, v, boolean),
                "pregreet" => r.set(&mut t.pregreet, key, v, |v| {
                    choice(
                        v,
                        &[
                            ("ignore", Pregreet::Ignore),
                            ("reject", Pregreet::Reject),
                            ("drop", Pregreet::Drop),
                        ],
                    )
                }),
                "reply_delay" => r.set(&mut t.reply_delay, key, v, duration),
                "stutter" => r.set(&mut t.stutter, key, v, duration),
                "pass_ttl" => r.set(&mut t.pass_ttl, key, v, duration),
                _ => return false,
            }
            true
        });
    }

    fn greylist(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let g = &mut config.greylist;
        self.fields("greylist", table, GREYLIST_KEYS, |r, name, key, v| {
            match name {
                "enabled" => r.set(&mut g.enabled, key, v, boolean),
                "delay" => r.set(&mut g.delay, key, v, duration),
                "retry_window" => r.set(&mut g.retry_window, key, v, positive_duration),
                "pass_ttl" => r.set(&mut g.pass_ttl, key, v, positive_duration),
                // Below 1000 a busy site's pending triplets would be pushed out before they
                // could pass; above a snapshot's limit (`state::snapshot::MAX_ENTRIES`) the
                // table could not be loaded back after a restart.
                "max_entries" => r.set(&mut g.max_entries, key, v, |v| int(v, 1000, 1_000_000)),
                "max_new_per_subnet" => {
                    r.set(&mut g.max_new_per_subnet, key, v, |v| at_least(v, 1));
                }
                "key" => r.greylist_key(&mut g.key, key, v),
                _ => return false,
            }
            true
        });
    }

    fn greylist_key(&mut self, slot: &mut Vec<GreylistKey>, key: &str, v: &Spanned<DeValue<'_>>) {
        let Some(items) = self.list(key, v, |v| {
            choice(
                v,
                &[
                    ("subnet", GreylistKey::Subnet),
                    ("ip", GreylistKey::Ip),
                    ("helo", GreylistKey::Helo),
                    ("sender", GreylistKey::Sender),
                    ("recipient", GreylistKey::Recipient),
                    ("rdns", GreylistKey::Rdns),
                ],
            )
        }) else {
            return;
        };
        if items.is_empty() {
            let hint = r#"must not be empty; for example ["subnet", "sender", "recipient"]"#;
            return self.error(v.span(), key, hint.to_owned());
        }
        let duplicate = items
            .iter()
            .enumerate()
            .find(|(i, k)| items.iter().take(*i).any(|earlier| earlier == *k));
        if let Some((i, _)) = duplicate {
            let span = v
                .get_ref()
                .as_array()
                .and_then(|a| a.get(i))
                .map_or(v.span(), Spanned::span);
            return self.error(span, &format!("{key}[{i}]"), "listed twice".to_owned());
        }
        *slot = items;
    }

    fn reputation(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let p = &mut config.reputation;
        self.fields("reputation", table, REPUTATION_KEYS, |r, name, key, v| {
            match name {
                "enabled" => r.set(&mut p.enabled, key, v, boolean),
                // Decay divides by the half-life.
                "half_life" => r.set(&mut p.half_life, key, v, positive_duration),
                "weight" => r.set(&mut p.weight, key, v, any_int),
                _ => return false,
            }
            true
        });
    }

    fn state(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let s = &mut config.state;
        self.fields("state", table, STATE_KEYS, |r, name, key, v| {
            match name {
                "backend" => r.set(&mut s.backend, key, v, |v| {
                    choice(
                        v,
                        &[
                            ("local", StateBackend::Local),
                            ("redis", StateBackend::Redis),
                        ],
                    )
                }),
                "redis" => r.set(&mut s.redis, key, v, redis_url),
                "prefix" => r.set(&mut s.prefix, key, v, |v| {
                    let s = string(v, "a string")?;
                    if s.is_empty() {
                        return Err(r#"must not be empty; for example "tarmac:""#.to_owned());
                    }
                    Ok(s.to_owned())
                }),
                // A zero timeout would answer every request from the fallback.
                "timeout" => r.set(&mut s.timeout, key, v, positive_duration),
                _ => return false,
            }
            true
        });
    }

    fn metrics(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let m = &mut config.metrics;
        self.fields("metrics", table, METRICS_KEYS, |r, name, key, v| {
            match name {
                "listen" => r.set(&mut m.listen, key, v, |v| {
                    let s = string(v, r#"an address such as "127.0.0.1:9425", or """#)?;
                    if s.is_empty() {
                        return Ok(None);
                    }
                    syntax::parse_socket_addr(s).map(Some)
                }),
                _ => return false,
            }
            true
        });
    }

    fn lists(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let l = &mut config.lists;
        self.fields("lists", table, LISTS_KEYS, |r, name, key, v| {
            match name {
                "allow" => r.set_list(&mut l.allow, key, v, path, None),
                "deny" => r.set_list(&mut l.deny, key, v, path, None),
                _ => return false,
            }
            true
        });
    }

    fn rules(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let rules = &mut config.rules;
        self.fields("rules", table, RULES_KEYS, |r, name, key, v| {
            match name {
                "files" => r.set_list(&mut rules.files, key, v, path, None),
                _ => return false,
            }
            true
        });
    }

    /// Whether one of `keys` already has an error: its value is then the default, not what the
    /// operator wrote, and comparing it with another key would only add a confusing error.
    fn has_error(&self, keys: &[&str]) -> bool {
        self.errors.iter().any(|e| keys.contains(&e.key.as_str()))
    }

    /// Constraints between keys. Each error goes on a key the file sets, the later one of the
    /// pair when both are set, so the line shown is one the operator wrote. Runs after
    /// every section is read, so it sees each key's final value.
    fn check_across_keys(&mut self, config: &Config) {
        let s = &config.scoring;
        if s.allow_at >= s.tarpit_at {
            self.order_error(
                ("scoring.allow_at", s.allow_at),
                ("scoring.tarpit_at", s.tarpit_at),
                "greater than",
            );
        }
        if s.tarpit_at > s.reject_at {
            self.order_error(
                ("scoring.tarpit_at", s.tarpit_at),
                ("scoring.reject_at", s.reject_at),
                "at least",
            );
        }

        let g = &config.greylist;
        if g.delay >= g.retry_window {
            // A retry is accepted only inside (delay, retry_window): otherwise nobody ever passes.
            let earlier = ("greylist.delay", format_duration(g.delay));
            let later = ("greylist.retry_window", format_duration(g.retry_window));
            self.order_error(earlier, later, "longer than");
        }

        let d = &config.downstream;
        let per_connection = matches!(
            d.announce_client,
            AnnounceClient::ProxyV1 | AnnounceClient::ProxyV2
        );
        if d.mode == DownstreamMode::Multiplexing
            && per_connection
            && !self.has_error(&["downstream.mode", "downstream.announce_client"])
        {
            // A PROXY header names one client for the connection's whole life; a pooled
            // connection carries many clients, so only XCLIENT (per transaction) can work.
            let line = self
                .lines
                .get("downstream.announce_client")
                .or(self.lines.get("downstream.mode"))
                .copied();
            self.push(
                line,
                "downstream.announce_client",
                "a PROXY header cannot announce the clients of a pooled connection; \
                 use \"xclient\" or \"none\" with mode = \"multiplexing\""
                    .to_owned(),
            );
        }

        let t = &config.tls;
        let tls_pair = match (&t.cert, &t.key) {
            (Some(_), None) => Some(("tls.key", "tls.cert is set but tls.key is not")),
            (None, Some(_)) => Some(("tls.cert", "tls.key is set but tls.cert is not")),
            _ => None,
        };
        if let Some((missing, what)) = tls_pair {
            if !self.has_error(&["tls.cert", "tls.key"]) {
                // On the empty key's line if the file has it, else on the other one's.
                let line = self
                    .lines
                    .get(missing)
                    .or(self.lines.get("tls.cert"))
                    .or(self.lines.get("tls.key"))
                    .copied();
                let message = format!("{what}; give both (STARTTLS on) or neither (off)");
                self.push(line, missing, message);
            }
        }
    }

    /// Reports that `later` must be `relation` `earlier`, on whichever of the two the file sets.
    fn order_error<T: std::fmt::Display>(
        &mut self,
        earlier: (&str, T),
        later: (&str, T),
        relation: &str,
    ) {
        let (earlier_key, earlier_value) = earlier;
        let (later_key, later_value) = later;
        if self.has_error(&[earlier_key, later_key]) {
            return;
        }
        if let Some(&line) = self.lines.get(later_key) {
            let message =
                format!("must be {relation} {earlier_key} ({earlier_value}), got {later_value}");
            self.push(Some(line), later_key, message);
        } else {
            let line = self.lines.get(earlier_key).copied();
            let inverse = match relation {
                "at least" => "at most",
                "greater than" => "less than",
                _ => "shorter than",
            };
            let message =
                format!("must be {inverse} {later_key} ({later_value}), got {earlier_value}");
            self.push(line, earlier_key, message);
        }
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

/// A duration the way an operator writes it, for messages: the largest unit that divides it.
fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let units: [(u128, &str); 5] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
        (1, "ms"),
    ];
    for (size, unit) in units {
        if ms % size == 0 && ms != 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    "0s".to_owned()
}

fn string<'v>(v: &'v DeValue<'_>, what: &str) -> Result<&'v str, String> {
    v.as_str()
        .ok_or_else(|| format!("expected {what}, found {}", v.type_str()))
}

fn boolean(v: &DeValue<'_>) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("expected true or false, found {}", v.type_str()))
}

/// An integer of the field's type within `min..=max`; out of range is an error, never a
/// truncation.
fn int<T: TryFrom<i128>>(v: &DeValue<'_>, min: i128, max: i128) -> Result<T, String> {
    let n = integer(v)?;
    if n < min || n > max {
        return Err(format!("must be from {min} to {max}, got {n}"));
    }
    T::try_from(n).map_err(|_| format!("must be from {min} to {max}, got {n}"))
}

/// An integer of at least `min`, at most what the field's type holds.
fn at_least<T: TryFrom<i128>>(v: &DeValue<'_>, min: i128) -> Result<T, String> {
    let n = integer(v)?;
    if n < min {
        return Err(format!("must be at least {min}, got {n}"));
    }
    T::try_from(n).map_err(|_| format!("{n} is too large"))
}

/// Any integer the field's type holds.
fn any_int<T: TryFrom<i128>>(v: &DeValue<'_>) -> Result<T, String> {
    let n = integer(v)?;
    T::try_from(n).map_err(|_| format!("{n} is out of range"))
}

fn nonzero_weight(v: &DeValue<'_>) -> Result<i32, String> {
    let weight: i32 = any_int(v)?;
    if weight == 0 {
        return Err("must not be 0; a zone that adds nothing need not be queried".to_owned());
    }
    Ok(weight)
}

fn integer(v: &DeValue<'_>) -> Result<i128, String> {
    let Some(n) = v.as_integer() else {
        return Err(format!("expected an integer, found {}", v.type_str()));
    };
    // TOML integers are 64-bit, so i128 always holds them; the fallback is for form's sake.
    i128::from_str_radix(n.as_str(), n.radix())
        .map_err(|_| format!("integer {} is out of range", n.as_str()))
}

fn choice<T: Copy>(v: &DeValue<'_>, options: &[(&str, T)]) -> Result<T, String> {
    let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
    let s = string(v, &format!("one of: {}", names.join(", ")))?;
    options
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, value)| *value)
        .ok_or_else(|| format!("unknown value {s:?}; expected one of: {}", names.join(", ")))
}

fn duration(v: &DeValue<'_>) -> Result<Duration, String> {
    syntax::parse_duration(string(v, r#"a duration such as "30s""#)?)
}

fn positive_duration(v: &DeValue<'_>) -> Result<Duration, String> {
    let d = duration(v)?;
    if d.is_zero() {
        return Err("must be longer than 0s".to_owned());
    }
    Ok(d)
}

fn rate(v: &DeValue<'_>) -> Result<super::Rate, String> {
    syntax::parse_rate(string(v, r#"a rate such as "30/min""#)?)
}

/// A size string, or a bare integer of bytes; at least 1KB, since a limit below that would refuse
/// the headers of any real message.
fn message_size(v: &DeValue<'_>) -> Result<u64, String> {
    let bytes = match v {
        DeValue::Integer(_) => any_int(v)?,
        _ => syntax::parse_size(string(v, r#"a size such as "25MB""#)?)?,
    };
    if bytes < 1000 {
        return Err(format!("must be at least 1KB, got {bytes} bytes"));
    }
    Ok(bytes)
}

fn socket_addr(v: &DeValue<'_>) -> Result<SocketAddr, String> {
    syntax::parse_socket_addr(string(v, r#"an address such as "0.0.0.0:25""#)?)
}

fn downstream_addr(v: &DeValue<'_>) -> Result<SocketAddr, String> {
    let addr = socket_addr(v)?;
    if addr.port() == 0 {
        return Err(format!("{addr}: port 0 cannot be connected to"));
    }
    Ok(addr)
}

fn dns_server(v: &DeValue<'_>) -> Result<SocketAddr, String> {
    syntax::parse_dns_server(string(v, r#"an address such as "192.0.2.53""#)?)
}

fn cidr(v: &DeValue<'_>) -> Result<super::Cidr, String> {
    string(v, r#"a CIDR block such as "192.0.2.0/24""#)?
        .parse()
        .map_err(|e: super::CidrError| e.to_string())
}

fn hostname(v: &DeValue<'_>) -> Result<String, String> {
    let s = string(v, r#"a host name such as "mx1.example.org""#)?;
    syntax::check_hostname(s)?;
    Ok(s.to_owned())
}

fn zone_name(v: &DeValue<'_>) -> Result<String, String> {
    let s = string(v, r#"a DNS zone such as "zen.spamhaus.org""#)?;
    syntax::check_zone(s)?;
    Ok(s.to_owned())
}

fn code_range(v: &DeValue<'_>) -> Result<(std::net::Ipv4Addr, std::net::Ipv4Addr), String> {
    syntax::parse_code_range(string(v, r#"an answer such as "127.0.0.2""#)?)
}

/// Reply text goes into an SMTP reply line: printable ASCII only (RFC 5321 §4.2 `textstring`),
/// so no CR or LF can end the line early and inject a reply of the operator's own making.
fn reply_text(v: &DeValue<'_>) -> Result<Option<String>, String> {
    let s = string(v, "a string")?;
    if s.is_empty() {
        return Ok(None);
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(format!(
            "{c:?} is not allowed; reply text is one line of printable ASCII"
        ));
    }
    Ok(Some(s.to_owned()))
}

fn path(v: &DeValue<'_>) -> Result<PathBuf, String> {
    let s = string(v, "a file path")?;
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(PathBuf::from(s))
}

/// A path where `""` means "not set".
fn optional_path(v: &DeValue<'_>) -> Result<Option<PathBuf>, String> {
    let s = string(v, r#"a file path, or "" for none"#)?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

/// A Redis URL the client can use: `redis://` or `unix://`, then whatever the `redis` crate's
/// own parser accepts (host, port, database number, credentials), so nothing that passes
/// `tarmac check` fails to parse when the server starts. A URL with credentials is not quoted
/// back, so a password never reaches a terminal or a log.
fn redis_url(v: &DeValue<'_>) -> Result<String, String> {
    let s = string(v, r#"a URL such as "redis://127.0.0.1:6379/0""#)?;
    let shown = if s.contains('@') {
        "(with credentials, not shown)".to_owned()
    } else {
        format!("{s:?}")
    };
    if s.starts_with("rediss://") {
        return Err(format!(
            "invalid Redis URL {shown}: TLS to Redis (rediss://) is not supported; use \
             redis:// on a trusted network, or unix://"
        ));
    }
    if !["redis://", "unix://"]
        .iter()
        .any(|scheme| s.starts_with(scheme))
    {
        return Err(format!(
            "invalid Redis URL {shown}: expected redis:// or unix://, such as \
             \"redis://127.0.0.1:6379/0\""
        ));
    }
    match redis::Client::open(s) {
        Ok(_) => Ok(s.to_owned()),
        Err(e) => Err(format!(
            "invalid Redis URL {shown}: {}",
            redis_error_text(&e)
        )),
    }
}

/// The crate's description of a URL error as a fragment starting lowercase: its `Display` is
/// "Description - KindName[: detail]", and the kind's name means nothing to an operator.
fn redis_error_text(e: &redis::RedisError) -> String {
    let shown = e.to_string();
    let description = shown.split(" - ").next().unwrap_or(&shown);
    let mut chars = description.chars();
    let mut text: String = chars
        .next()
        .map(|c| c.to_ascii_lowercase())
        .into_iter()
        .collect();
    text.push_str(chars.as_str());
    if let Some(detail) = e.detail() {
        text.push_str(": ");
        text.push_str(detail);
    }
    text
}
