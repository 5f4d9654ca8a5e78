//! The walk over each section of the document: every key of `[server]` … `[rules]`, of
//! `[content]` and of each `[[dnsbl]]` table read into its field of [`Config`], with the value readers of `value`.

use std::collections::HashMap;
use std::sync::Arc;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::value::{
    ANNOUNCE_CLIENTS, BALANCES, BARE_NEWLINES, DOWNSTREAM_MODES, DOWNSTREAM_TLS,
    GREYLIST_KEY_PARTS, ON_FAILURES, PREGREETS, REJECT_MODES, STATE_BACKENDS, account_name,
    any_int, at_least, boolean, choice, cidr, code_range, dns_server, downstream_addr, duration,
    hostname, int, message_size, milter_addr, nonzero_weight, optional_path, path,
    positive_duration, rate, redis_url, reply_text, retry_after, rspamd_url, scan_timeout,
    socket_addr, spool_size, string, zone_name,
};
use super::{
    CONTENT_KEYS, DNS_KEYS, DNSBL_KEYS, DOWNSTREAM_KEYS, GREYLIST_KEYS, LIMITS_KEYS, LISTS_KEYS,
    METRICS_KEYS, REPUTATION_KEYS, RULES_KEYS, Reader, SCORING_KEYS, SERVER_KEYS, STATE_KEYS,
    TARPIT_KEYS, TIMEOUTS_KEYS, TLS_KEYS, TRANSPARENT_KEYS,
};
use crate::config::syntax;
use crate::config::{Config, Dnsbl, GreylistKey};
use crate::content::MilterAddr;
use crate::policy::reading::{array_of_tables, expected};

impl Reader<'_> {
    pub(super) fn server(&mut self, table: &DeTable<'_>, config: &mut Config) {
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
                "user" | "group" => {
                    let slot = if name == "user" {
                        &mut s.user
                    } else {
                        &mut s.group
                    };
                    r.set(slot, key, v, account_name);
                }
                _ => return false,
            }
            true
        });
    }

    pub(super) fn limits(&mut self, table: &DeTable<'_>, config: &mut Config) {
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
                "bare_newline" => r.set(&mut l.bare_newline, key, v, |v| choice(v, BARE_NEWLINES)),
                _ => return false,
            }
            true
        });
    }

    pub(super) fn timeouts(&mut self, table: &DeTable<'_>, config: &mut Config) {
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

    pub(super) fn downstream(&mut self, table: &DeTable<'_>, config: &mut Config) {
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
                "balance" => r.set(&mut d.balance, key, v, |v| choice(v, BALANCES)),
                "down_after" => r.set(&mut d.down_after, key, v, |v| int(v, 1, 1000)),
                "retry_after" => r.set(&mut d.retry_after, key, v, retry_after),
                "mode" => r.set(&mut d.mode, key, v, |v| choice(v, DOWNSTREAM_MODES)),
                "pool_size" => r.set(&mut d.pool_size, key, v, |v| at_least(v, 1)),
                "announce_client" => r.set(&mut d.announce_client, key, v, |v| {
                    choice(v, ANNOUNCE_CLIENTS)
                }),
                "tls" => r.set(&mut d.tls, key, v, |v| choice(v, DOWNSTREAM_TLS)),
                "tls_verify" => r.set(&mut d.tls_verify, key, v, boolean),
                "tls_ca" => r.set(&mut d.tls_ca, key, v, optional_path),
                _ => return false,
            }
            true
        });
    }

    pub(super) fn tls(&mut self, table: &DeTable<'_>, config: &mut Config) {
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

    pub(super) fn dns(&mut self, table: &DeTable<'_>, config: &mut Config) {
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
    pub(super) fn dnsbl(&mut self, value: &Spanned<DeValue<'_>>, out: &mut Vec<Dnsbl>) {
        let items = match array_of_tables(value.get_ref(), "dnsbl", "zone") {
            Ok(items) => items,
            Err(message) => return self.error(value.span(), "dnsbl", message),
        };
        // zone (lowercased) -> index of the table that named it first
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let prefix = format!("dnsbl[{i}]");
            let Some(table) = item.get_ref().as_table() else {
                self.error(item.span(), &prefix, expected("a table", item.get_ref()));
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

    pub(super) fn scoring(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let s = &mut config.scoring;
        self.fields("scoring", table, SCORING_KEYS, |r, name, key, v| {
            match name {
                "allow_at" => r.set(&mut s.allow_at, key, v, any_int),
                "tarpit_at" => r.set(&mut s.tarpit_at, key, v, any_int),
                "reject_at" => r.set(&mut s.reject_at, key, v, any_int),
                "reject_mode" => r.set(&mut s.reject_mode, key, v, |v| choice(v, REJECT_MODES)),
                _ => return false,
            }
            true
        });
    }

    pub(super) fn tarpit(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let t = &mut config.tarpit;
        self.fields("tarpit", table, TARPIT_KEYS, |r, name, key, v| {
            match name {
                "greet_pause" => r.set(&mut t.greet_pause, key, v, duration),
                "banner_continuation" => r.set(&mut t.banner_continuation, key, v, boolean),
                "pregreet" => r.set(&mut t.pregreet, key, v, |v| choice(v, PREGREETS)),
                "reply_delay" => r.set(&mut t.reply_delay, key, v, duration),
                "stutter" => r.set(&mut t.stutter, key, v, duration),
                "pass_ttl" => r.set(&mut t.pass_ttl, key, v, duration),
                _ => return false,
            }
            true
        });
    }

    pub(super) fn greylist(&mut self, table: &DeTable<'_>, config: &mut Config) {
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

    pub(super) fn greylist_key(
        &mut self,
        slot: &mut Vec<GreylistKey>,
        key: &str,
        v: &Spanned<DeValue<'_>>,
    ) {
        let Some(items) = self.list(key, v, |v| choice(v, GREYLIST_KEY_PARTS)) else {
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

    pub(super) fn reputation(&mut self, table: &DeTable<'_>, config: &mut Config) {
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

    pub(super) fn state(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let s = &mut config.state;
        self.fields("state", table, STATE_KEYS, |r, name, key, v| {
            match name {
                "backend" => r.set(&mut s.backend, key, v, |v| choice(v, STATE_BACKENDS)),
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

    pub(super) fn metrics(&mut self, table: &DeTable<'_>, config: &mut Config) {
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

    pub(super) fn transparent(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let t = &mut config.transparent;
        self.fields("transparent", table, TRANSPARENT_KEYS, |r, name, key, v| {
            match name {
                // Empty is allowed: no transparent listener, as by default.
                "listen" => r.set_list(&mut t.listen, key, v, socket_addr, None),
                "spoof_source" => r.set(&mut t.spoof_source, key, v, boolean),
                _ => return false,
            }
            true
        });
    }

    pub(super) fn lists(&mut self, table: &DeTable<'_>, config: &mut Config) {
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

    pub(super) fn rules(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let rules = &mut config.rules;
        self.fields("rules", table, RULES_KEYS, |r, name, key, v| {
            match name {
                "files" => r.set_list(&mut rules.files, key, v, path, None),
                _ => return false,
            }
            true
        });
    }

    /// `[content]` (DESIGN.md §7): the scanners and how they are called.
    pub(super) fn content(&mut self, table: &DeTable<'_>, config: &mut Config) {
        let c = &mut config.content;
        self.fields("content", table, CONTENT_KEYS, |r, name, key, v| {
            match name {
                "rspamd" => r.set(&mut c.rspamd, key, v, rspamd_url),
                "milters" => r.milters(&mut c.milters, key, v),
                "timeout" => r.set(&mut c.timeout, key, v, scan_timeout),
                "on_failure" => r.set(&mut c.on_failure, key, v, |v| choice(v, ON_FAILURES)),
                "spool_after" => r.set(&mut c.spool_after, key, v, spool_size),
                // At least one, or no message could ever be scanned; the cap keeps a typo from
                // letting every session hold a scanner connection at once.
                "max_scans" => r.set(&mut c.max_scans, key, v, |v| int(v, 1, 65_536)),
                _ => return false,
            }
            true
        });
    }

    /// `[content] milters`: each socket once, since a milter called twice on one message would
    /// apply its changes twice.
    fn milters(&mut self, slot: &mut Vec<MilterAddr>, key: &str, v: &Spanned<DeValue<'_>>) {
        let Some(items) = self.list(key, v, milter_addr) else {
            return;
        };
        let mut ok = true;
        for (i, addr) in items.iter().enumerate() {
            if let Some(first) = items.iter().take(i).position(|earlier| earlier == addr) {
                let span = v
                    .get_ref()
                    .as_array()
                    .and_then(|a| a.get(i))
                    .map_or(v.span(), Spanned::span);
                let message = format!("{addr} is already {key}[{first}]");
                self.error(span, &format!("{key}[{i}]"), message);
                ok = false;
            }
        }
        if ok {
            *slot = items;
        }
    }
}
