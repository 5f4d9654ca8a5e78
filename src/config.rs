//! Configuration: the TOML schema of DESIGN.md §3, parsed and validated with `path:line: key:
//! message` errors, every one collected before failing.
//!
//! [`Config::load`] reads a file, [`Config::from_toml`] parses text (no I/O, so tests need no
//! files); both start from [`Config::default`] and overwrite what the file sets, so an empty file
//! is a valid config. [`Config::from_toml`] never opens the files a config names;
//! [`Config::load`] then reads the list files (`[lists]`), rule files (`[rules]`), the TLS
//! certificate and key (`[tls]`) and the downstream CA file (`[downstream] tls_ca`) into the
//! config, so a running server and `tarmac check` see the same entries, rules, certificates and
//! errors.
//!
//! The files: `schema` holds the section types and their defaults, `document` the walk over the
//! TOML tree (each section's keys in `sections`, the value readers in `value`, the checks across
//! keys in `validate`), `syntax` the value syntaxes (durations, sizes, rates, addresses), `load`
//! the reading of the files a config names, `error` the [`ConfigError`]s. The types policy decides
//! with ([`Cidr`], [`Dnsbl`], [`Rate`], [`Reputation`], [`Scoring`]) are `crate::policy`'s,
//! re-exported here because the sections hold them; policy never reads this module.

mod document;
mod error;
mod load;
mod schema;
mod syntax;

use std::path::{Path, PathBuf};

pub use self::error::{ConfigError, ConfigErrors};
pub use self::schema::{
    AnnounceClient, BareNewline, Dns, Downstream, DownstreamMode, DownstreamTls, Greylist,
    GreylistKey, Limits, Lists, Metrics, Pregreet, Rules, Server, State, StateBackend, Tarpit,
    Timeouts, Tls, Transparent,
};
pub use self::schema::{Balance, MAX_RETRY_AFTER};
pub use crate::policy::cidr::{Cidr, CidrError};
pub use crate::policy::dnsbl::Dnsbl;
pub use crate::policy::rates::Rate;
pub use crate::policy::reputation::Reputation;
pub use crate::policy::verdict::{RejectMode, Scoring};

/// The whole validated configuration. Cheap to share behind an `Arc`; a reload builds a new one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file this was loaded from (`None` for built-in defaults); relative paths are resolved
    /// against its directory at load time, so every path below is already usable as is.
    pub path: Option<PathBuf>,
    /// `[server]`
    pub server: Server,
    /// `[limits]`
    pub limits: Limits,
    /// `[timeouts]`
    pub timeouts: Timeouts,
    /// `[downstream]`
    pub downstream: Downstream,
    /// `[tls]`
    pub tls: Tls,
    /// `[dns]`
    pub dns: Dns,
    /// `[[dnsbl]]`, in file order.
    pub dnsbl: Vec<Dnsbl>,
    /// `[scoring]`
    pub scoring: Scoring,
    /// `[tarpit]`
    pub tarpit: Tarpit,
    /// `[greylist]`
    pub greylist: Greylist,
    /// `[reputation]`
    pub reputation: Reputation,
    /// `[state]`
    pub state: State,
    /// `[metrics]`
    pub metrics: Metrics,
    /// `[lists]`
    pub lists: Lists,
    /// `[rules]`
    pub rules: Rules,
    /// `[content]`
    pub content: crate::content::Settings,
    /// `[transparent]`
    pub transparent: Transparent,
}

impl Config {
    /// Parses and validates `text`, the contents of the file at `path`. `path` appears in errors
    /// and its directory anchors relative paths; nothing is read from disk. Keys the text does
    /// not set keep their defaults.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        let mut config = Config::default();
        let errors = document::read(text, path, &mut config);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        if config.server.workers == 0 {
            config.server.workers = schema::default_workers();
        }
        if let Some(dir) = path.parent() {
            document::resolve_paths(&mut config, dir);
        }
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Settings this version accepts (the schema is complete) but does not act on yet, as
    /// `key: what happens instead` notes, so neither `check` nor `run` lets an operator believe
    /// a feature is on. Defaults are not listed; only what the file asks for.
    /// Empty in this version: every key acts (`metrics.listen`, the last one, serves metrics
    /// now); the call stays in `check` and `run` for the next key that comes before its feature.
    pub fn not_yet_effective(&self) -> Vec<String> {
        Vec::new()
    }

    /// One line on content inspection for `tarmac check`, so an operator sees which scanners
    /// each message will go through, in order, and what a failing one means:
    /// `content: rspamd http://127.0.0.1:11333, milters inet:127.0.0.1:8891; timeout 30s,
    /// on_failure tempfail, spool_after 256KiB, max_scans 256`, or `content: no scanner (bodies
    /// stream)`. Values are written as the file would write them.
    pub fn content_summary(&self) -> String {
        let c = &self.content;
        if !c.scans() {
            return "content: no scanner (bodies stream)".to_owned();
        }
        let mut scanners = Vec::new();
        if let Some(rspamd) = &c.rspamd {
            scanners.push(format!("rspamd http://{}", rspamd.addr));
        }
        if !c.milters.is_empty() {
            let milters: Vec<String> = c.milters.iter().map(ToString::to_string).collect();
            scanners.push(format!("milters {}", milters.join(", ")));
        }
        let on_failure = match c.on_failure {
            crate::content::OnFailure::TempFail => "tempfail",
            crate::content::OnFailure::Accept => "accept",
        };
        format!(
            "content: {}; timeout {}, on_failure {on_failure}, spool_after {}, max_scans {}",
            scanners.join(", "),
            syntax::format_duration(c.timeout),
            syntax::format_size(c.spool_after),
            c.max_scans,
        )
    }

    /// Lines on transparent mode for `tarmac check` (DESIGN.md §9), none without
    /// `[transparent] listen`: the listeners and where their sessions' connections come from,
    /// and a note when `[downstream] mode = "multiplexing"` is also set, since it does not
    /// apply to them.
    pub fn transparent_summary(&self) -> Vec<String> {
        let t = &self.transparent;
        if t.listen.is_empty() {
            return Vec::new();
        }
        let listen: Vec<String> = t.listen.iter().map(ToString::to_string).collect();
        let from = if t.spoof_source {
            "from the client's own address (spoof_source; CAP_NET_ADMIN kept), no announcement"
                .to_owned()
        } else {
            format!(
                "from this host, announced with {}",
                match self.downstream.announce_client {
                    AnnounceClient::Xclient => "XCLIENT",
                    AnnounceClient::ProxyV1 => "a PROXY v1 header",
                    AnnounceClient::ProxyV2 => "a PROXY v2 header",
                    AnnounceClient::None => "nothing (announce_client = \"none\")",
                }
            )
        };
        let mut lines = vec![format!(
            "transparent: {} relay to each connection's original destination, {from}",
            listen.join(", ")
        )];
        if self.downstream.mode == DownstreamMode::Multiplexing {
            lines.push(
                "note: transparent sessions relay synchronously, one connection each to its own \
                 destination; downstream.mode = \"multiplexing\" applies to [server] listen only"
                    .to_owned(),
            );
        }
        lines
    }
}

impl Default for Config {
    /// DESIGN.md §3's values, except that no DNSBL zone is queried until the operator names one
    /// (as with postscreen): a default list would send every client address to a third party.
    /// Paths stay relative here; [`Config::from_toml`] anchors them at the file's directory.
    fn default() -> Self {
        Config {
            path: None,
            server: Server::default(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            downstream: Downstream::default(),
            tls: Tls::default(),
            dns: Dns::default(),
            dnsbl: Vec::new(),
            scoring: Scoring::default(),
            tarpit: Tarpit::default(),
            greylist: Greylist::default(),
            reputation: Reputation::default(),
            state: State::default(),
            metrics: Metrics::default(),
            lists: Lists::default(),
            rules: Rules::default(),
            content: crate::content::Settings::default(),
            transparent: Transparent::default(),
        }
    }
}

#[cfg(test)]
mod tests;
