//! Live reload (DESIGN.md §2): on SIGHUP the control thread reads the whole configuration again
//! (config file, list files, rule files, the TLS certificate and key) and, only if all of it is
//! valid, publishes it here. Each worker notices the new generation on its next turn (the
//! control thread wakes it), takes the new `Config` for the connections it accepts from then on,
//! and hands it to its live sessions, which apply it at their next decision (the next command,
//! or the end of their PROXY header): no live session is dropped. A reload with any error is
//! refused as a whole and the running configuration stays.
//!
//! What was built from the configuration at start (listeners, workers, connection caps and
//! rates, the resolver, the downstream pool, the PASS cache, the state directory and backend,
//! the transparent listeners and whether they spoof the source)
//! keeps its start values; a reload that changes one of those keys says so in its log line.
//!
//! Every `[content]` key applies live: a session reads the scanners, `timeout`, `on_failure` and
//! `spool_after` from its configuration when a message reaches its end of DATA (so from its next
//! decision after a reload), and the scanner thread takes the settings, `max_scans` included,
//! from each question it is asked; none of them is in [`restart_only_changes`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::config::Config;

/// The configuration in force and how many times it was replaced.
#[derive(Debug)]
pub(crate) struct Reloads {
    current: RwLock<Arc<Config>>,
    generation: AtomicU64,
}

impl Reloads {
    /// Starts at generation 0 with the configuration the server started with.
    pub(crate) fn new(config: Arc<Config>) -> Reloads {
        Reloads {
            current: RwLock::new(config),
            generation: AtomicU64::new(0),
        }
    }

    /// Puts `config` in force; workers pick it up at their next turn.
    pub(crate) fn publish(&self, config: Arc<Config>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// How many times the configuration was replaced.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The configuration in force.
    pub(crate) fn current(&self) -> Arc<Config> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// `(name, differs)` for each configuration key `section` or `section.key`, named as in the
/// file, comparing `old` with `new`.
macro_rules! differences {
    ($old:ident, $new:ident: $($section:ident $(. $key:ident)?),* $(,)?) => {
        [$((
            concat!(stringify!($section) $(, ".", stringify!($key))?),
            $old.$section $(.$key)? != $new.$section $(.$key)?,
        )),*]
    };
}

/// The keys whose new values wait for a restart because something was built from them at
/// start, where `new` differs from `old`. Zones apply live (the resolver checks new ones at
/// once), but only if a resolver runs: one that was not needed at start is not started by a
/// reload. `[content]` is not here: it applies live (see the module's comment).
pub(crate) fn restart_only_changes(
    old: &Config,
    new: &Config,
    resolver_running: bool,
) -> Vec<&'static str> {
    let needs_resolver = new.dns.rdns || !new.dnsbl.is_empty();
    let through_dns = differences!(old, new:
        server.listen,
        server.workers,
        server.max_connections,
        server.max_tarpitted,
        server.state_dir,
        server.user,
        server.group,
        limits.max_connections_per_ip,
        limits.max_connections_per_subnet,
        limits.connection_rate_per_ip,
        limits.connection_rate_per_subnet,
        dns,
    );
    let resolver = (
        "dnsbl and dns.rdns (no resolver was started)",
        needs_resolver && !resolver_running,
    );
    // The backend, its connection and its key names (`state`) are set up once, at start.
    let the_rest = differences!(old, new:
        downstream.pool_size,
        downstream.mode,
        tarpit.pass_ttl,
        state,
        metrics,
        transparent,
    );
    through_dns
        .into_iter()
        .chain([resolver])
        .chain(the_rest)
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_bumps_the_generation() {
        let reloads = Reloads::new(Arc::new(Config::default()));
        assert_eq!(reloads.generation(), 0);
        let mut next = Config::default();
        next.server.hostname = "mx2.test".to_owned();
        reloads.publish(Arc::new(next));
        assert_eq!(reloads.generation(), 1);
        assert_eq!(reloads.current().server.hostname, "mx2.test");
    }

    #[test]
    fn keys_built_at_start_are_named() {
        let old = Config::default();
        let mut new = old.clone();
        assert!(restart_only_changes(&old, &new, true).is_empty());
        new.scoring.reject_at = 9;
        new.timeouts.idle = std::time::Duration::from_secs(1);
        new.dnsbl = vec![crate::config::Dnsbl {
            zone: "bl.test".into(),
            weight: 1,
            codes: Vec::new(),
            reply: None,
        }];
        assert_eq!(
            restart_only_changes(&old, &new, false),
            ["dnsbl and dns.rdns (no resolver was started)"]
        );
        assert!(
            restart_only_changes(&old, &new, true).is_empty(),
            "these apply live"
        );
        new.server.max_connections = 7;
        new.dns.timeout = std::time::Duration::from_secs(9);
        new.state.prefix = "mx2:".to_owned();
        new.transparent.spoof_source = true;
        assert_eq!(
            restart_only_changes(&old, &new, true),
            ["server.max_connections", "dns", "state", "transparent"]
        );
    }

    #[test]
    fn content_applies_live() {
        use crate::content::{MilterAddr, OnFailure, RspamdUrl};
        use std::net::SocketAddr;
        use std::time::Duration;

        let old = Config::default();
        let mut new = old.clone();
        new.content.rspamd = Some(RspamdUrl {
            addr: SocketAddr::from(([127, 0, 0, 1], 11333)),
        });
        new.content.milters = vec![
            MilterAddr::Inet(SocketAddr::from(([127, 0, 0, 1], 8891))),
            MilterAddr::Unix("/run/opendkim/opendkim.sock".into()),
        ];
        new.content.timeout = Duration::from_secs(5);
        new.content.on_failure = OnFailure::Accept;
        new.content.spool_after = 0;
        new.content.max_scans = 1;
        assert_ne!(old.content, new.content);
        assert!(restart_only_changes(&old, &new, true).is_empty());
        // And off again.
        assert!(restart_only_changes(&new, &old, true).is_empty());

        let reloads = Reloads::new(Arc::new(old));
        reloads.publish(Arc::new(new.clone()));
        assert_eq!(reloads.current().content, new.content);
    }
}
