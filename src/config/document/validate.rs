//! The checks across keys, run once every section is read: threshold order in `[scoring]`,
//! the greylist's delay and window, PROXY headers with a pooled downstream, the `[tls]` pair,
//! the account to become, transparent listeners apart from the plain ones.

use super::Reader;
use crate::config::syntax::format_duration;
use crate::config::{AnnounceClient, Config, DownstreamMode};

impl Reader<'_> {
    /// Constraints between keys. Each error goes on a key the file sets, the later one of the
    /// pair when both are set, so the line shown is one the operator wrote. Runs after
    /// every section is read, so it sees each key's final value.
    pub(super) fn check_across_keys(&mut self, config: &Config) {
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

        self.check_account(config);
        self.check_transparent(config);

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

impl Reader<'_> {
    /// A `[transparent] listen` address must not also be a plain one: both sockets would share
    /// the port (SO_REUSEPORT) and the kernel would hand each connection to either at random.
    fn check_transparent(&mut self, config: &Config) {
        if self.has_error(&["server.listen", "transparent.listen"]) {
            return;
        }
        let shared: Vec<String> = config
            .transparent
            .listen
            .iter()
            .filter(|addr| addr.port() != 0 && config.server.listen.contains(addr))
            .map(ToString::to_string)
            .collect();
        if !shared.is_empty() {
            let line = self.lines.get("transparent.listen").copied();
            self.push(
                line,
                "transparent.listen",
                format!(
                    "{} is also in [server] listen; a transparent listener needs a port of its own",
                    shared.join(", ")
                ),
            );
        }
    }

    /// `[server] user` and `group` name a local account (looked up in `/etc/passwd` and
    /// `/etc/group` on this machine, as the server will at start); a group needs a user.
    fn check_account(&mut self, config: &Config) {
        let s = &config.server;
        if self.has_error(&["server.user", "server.group"]) {
            return;
        }
        if s.user.is_empty() {
            if !s.group.is_empty() {
                let line = self.lines.get("server.group").copied();
                self.push(
                    line,
                    "server.group",
                    "needs [server] user: tarmac changes groups only when it becomes a user"
                        .to_owned(),
                );
            }
            return;
        }
        if let Err(message) = crate::privileges::Account::lookup(&s.user, &s.group) {
            let key = if message.starts_with("no group") {
                "server.group"
            } else {
                "server.user"
            };
            let line = self.lines.get(key).copied();
            self.push(line, key, message);
        }
    }
}
