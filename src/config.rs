//! Configuration: the TOML schema of DESIGN.md §3, parsed and validated with `path:line: key:
//! message` errors, every one collected before failing.
//!
//! [`Config::load`] reads a file, [`Config::from_toml`] parses text (no I/O, so tests need no
//! files); both start from [`Config::default`] and overwrite what the file sets, so an empty file
//! is a valid config. The value syntaxes (durations, sizes, rates, addresses, CIDRs) live in
//! `syntax`, the walk over the TOML tree in `document`. [`Config::from_toml`] never opens the
//! files a config names; [`Config::load`] then reads the list files (`[lists]`), rule files
//! (`[rules]`), the TLS certificate and key (`[tls]`) and the downstream CA file
//! (`[downstream] tls_ca`) into the config, so a running server and `tarmac check` see the same
//! entries, rules, certificates and errors.

mod document;
mod error;
mod syntax;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

pub use self::error::{ConfigError, ConfigErrors};
use crate::downstream::tls::ClientTls;
pub use crate::policy::cidr::{Cidr, CidrError};
pub use crate::policy::dnsbl::Dnsbl;
pub use crate::policy::rates::Rate;
pub use crate::policy::reputation::Reputation;
pub use crate::policy::verdict::{RejectMode, Scoring};
use crate::policy::{FileError, List, ListSet, RuleSet};
use crate::tls::{ServerTls, TlsFile};

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
}

/// `[server]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    /// Plain SMTP listeners.
    pub listen: Vec<SocketAddr>,
    /// Banner, EHLO towards the downstream, `Received:`; default: the system hostname.
    pub hostname: String,
    /// Event loops; 0 in the file means one per core, resolved here to the core count (≥ 1).
    pub workers: usize,
    /// Global cap on client connections, across workers.
    pub max_connections: usize,
    /// Cap on tarpitted sessions.
    pub max_tarpitted: usize,
    /// Directory for state snapshots (`backend = "local"`), created (mode 0700) if missing.
    pub state_dir: PathBuf,
    /// Peers that must send a PROXY header first.
    pub proxy_protocol_from: Vec<Cidr>,
}

/// `[limits]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent connections from one address.
    pub max_connections_per_ip: u32,
    /// Concurrent connections from one IPv4 /24 or IPv6 /64, all its addresses together.
    pub max_connections_per_subnet: u32,
    /// Token bucket per client address.
    pub connection_rate_per_ip: Rate,
    /// Token bucket per IPv4 /24 or IPv6 /64.
    pub connection_rate_per_subnet: Rate,
    /// Bytes; `SIZE=` above it and bodies above it get `552 5.3.4`.
    pub max_message_size: u64,
    /// Recipients per transaction; the next gets `452 4.5.3`.
    pub max_recipients: usize,
    /// Unknown or malformed commands tolerated; the next gets `421` and a close.
    pub max_unknown_commands: u32,
    /// NOOP, RSET, VRFY, HELP and repeated HELO/EHLO tolerated per session (Postfix's
    /// `smtpd_junk_command_limit`); each one past it counts toward `max_errors`.
    pub max_junk_commands: u32,
    /// 4xx/5xx replies to a client's commands (greylisting's aside) after which it gets
    /// `421 4.7.0` and is closed (Postfix's `smtpd_hard_error_limit`).
    pub max_errors: u32,
    /// Longest command line in bytes, CRLF included.
    pub max_line_length: usize,
    /// What to do with a bare CR or LF in a message body.
    pub bare_newline: BareNewline,
}

/// `[limits] bare_newline`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BareNewline {
    /// Reply `550 5.6.0` at end of data; nothing is delivered.
    Reject,
    /// Turn each bare CR or LF into CRLF before relaying.
    Normalize,
}

/// `[timeouts]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Downstream connect.
    pub connect: Duration,
    /// A whole command line from a client; also each downstream reply.
    pub command: Duration,
    /// Between two data blocks.
    pub data: Duration,
    /// Whole session without a completed command.
    pub idle: Duration,
    /// Live sessions' grace period on SIGTERM.
    pub drain: Duration,
}

/// `[downstream]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downstream {
    /// Tried in order; the next one on connect failure.
    pub servers: Vec<SocketAddr>,
    /// Session per client transaction, or a shared pool.
    pub mode: DownstreamMode,
    /// Multiplexing: most downstream connections open at once.
    pub pool_size: usize,
    /// How the downstream learns the real client.
    pub announce_client: AnnounceClient,
    /// STARTTLS towards the downstream.
    pub tls: DownstreamTls,
    /// Verify the downstream's certificate.
    pub tls_verify: bool,
    /// A PEM file of CA certificates trusted, besides the built-in web roots, when
    /// `tls_verify` is on (an addition to DESIGN.md §3: a downstream inside the operator's
    /// network usually has a certificate from a private CA); `None` = built-in roots only.
    pub tls_ca: Option<PathBuf>,
    /// The certificates of `tls_ca`, read and checked by [`Config::load_tls_ca`]; empty
    /// before that and when `tls_ca` is not set.
    pub tls_ca_certs: Vec<CertificateDer<'static>>,
    /// The rustls client configuration for STARTTLS towards the downstream, built once by
    /// [`Config::load_tls_ca`] from `tls_verify` and `tls_ca_certs` and shared by every
    /// downstream connection of every worker; `None` before that and with `tls = "none"`.
    /// A configuration built by hand calls `load_tls_ca` for downstream TLS (until then a
    /// downstream handshake fails, and `opportunistic` goes on in plain text).
    pub client_tls: Option<ClientTls>,
}

/// `[downstream] mode`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownstreamMode {
    /// One downstream session per client session, opened at the first MAIL.
    Synchronous,
    /// Pooled downstream sessions reused with RSET.
    Multiplexing,
}

/// `[downstream] announce_client`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnnounceClient {
    /// Postfix XCLIENT, when the downstream offers it.
    Xclient,
    /// A PROXY protocol v1 text header before the banner.
    ProxyV1,
    /// A PROXY protocol v2 binary header before the banner.
    ProxyV2,
    /// Nothing: the downstream sees tarmac's address.
    None,
}

/// `[downstream] tls`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownstreamTls {
    /// Plain.
    None,
    /// STARTTLS when offered.
    Opportunistic,
    /// STARTTLS or no delivery.
    Required,
}

/// `[tls]`
#[derive(Clone, Debug, Default, Eq)]
pub struct Tls {
    /// PEM certificate chain; `None` (empty in the file) = STARTTLS not offered.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// The pair read from `cert` and `key` by [`Config::load_tls`] (which [`Config::load`]
    /// calls): STARTTLS is offered only when this is set, and every handshake uses it.
    /// [`Config::from_toml`] reads no files, so it leaves this `None`.
    pub loaded: Option<ServerTls>,
    /// Lines of `cert` and `key` in the config file, so that an error found when reading the
    /// files names the line like any other config error.
    pub(crate) lines: [Option<usize>; 2],
}

impl PartialEq for Tls {
    /// What the section says and what was loaded; where the keys were written is not part of it.
    fn eq(&self, other: &Tls) -> bool {
        (&self.cert, &self.key, &self.loaded) == (&other.cert, &other.key, &other.loaded)
    }
}

/// `[dns]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dns {
    /// Resolvers; empty = the system's resolv.conf.
    pub servers: Vec<SocketAddr>,
    /// Per lookup.
    pub timeout: Duration,
    /// Cap on the TTL-driven cache.
    pub cache_ttl: Duration,
    /// PTR plus forward confirmation for every client.
    pub rdns: bool,
    /// How often each zone's test points are queried (an addition to DESIGN.md §3): a zone that
    /// answers them wrongly is set aside until it answers right again.
    pub health_interval: Duration,
}

/// `[tarpit]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tarpit {
    /// Wait before the final banner line.
    pub greet_pause: Duration,
    /// Send `220-` at once, the final line after the pause.
    pub banner_continuation: bool,
    /// What to do with a client that talks first.
    pub pregreet: Pregreet,
    /// Delay before each reply to a tarpitted client.
    pub reply_delay: Duration,
    /// Zero = off; else one byte per interval.
    pub stutter: Duration,
    /// A cached PASS skips the greet pause for this long.
    pub pass_ttl: Duration,
}

/// `[tarpit] pregreet`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pregreet {
    /// Log only.
    Ignore,
    /// `554 5.5.1`-class on every command.
    Reject,
    /// `521` and close.
    Drop,
}

/// `[greylist]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greylist {
    /// Applies to verdicts pass and tarpit.
    pub enabled: bool,
    /// First retry accepted after this.
    pub delay: Duration,
    /// ... and before this (counted from the first attempt).
    pub retry_window: Duration,
    /// A passed triplet lives this long, refreshed by each delivery.
    pub pass_ttl: Duration,
    /// Most triplets held (local table); when full, the oldest unconfirmed go first.
    pub max_entries: usize,
    /// Most new triplets one client subnet may create per `retry_window`; beyond, its new
    /// triplets are deferred without being recorded.
    pub max_new_per_subnet: u32,
    /// What makes up a triplet.
    pub key: Vec<GreylistKey>,
}

/// One element of `[greylist] key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GreylistKey {
    /// IPv4 /24 or IPv6 /64.
    Subnet,
    /// The client address.
    Ip,
    /// The HELO name.
    Helo,
    /// The envelope sender.
    Sender,
    /// The envelope recipient.
    Recipient,
    /// The forward-confirmed rDNS name minus its first label, else the subnet.
    Rdns,
}

/// `[state]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    /// Where shared state lives.
    pub backend: StateBackend,
    /// Redis URL, used with `backend = "redis"`; checked by the Redis client's own parser
    /// when the file is read, so `tarmac check` refuses what the server could not connect to.
    pub redis: String,
    /// Key prefix in Redis.
    pub prefix: String,
    /// Longest a Redis call may take, counted from when a worker asked; past it the answer
    /// is the local fallback (DESIGN.md §5: Redis slow is Redis down).
    pub timeout: Duration,
}

/// `[state] backend`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateBackend {
    /// In process, snapshotted to `state_dir`.
    Local,
    /// Shared through Redis.
    Redis,
}

/// `[metrics]`
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Where `/metrics` is served; `None` = off.
    pub listen: Option<SocketAddr>,
}

/// `[lists]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lists {
    /// Allow-list files.
    pub allow: Vec<PathBuf>,
    /// Deny-list files.
    pub deny: Vec<PathBuf>,
    /// Their entries, read by [`Config::load`] (or [`Config::load_lists`]); empty after
    /// [`Config::from_toml`], which reads no file.
    pub entries: ListSet,
}

/// `[rules]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Rule files, evaluated in this order.
    pub files: Vec<PathBuf>,
    /// Their rules, read by [`Config::load`] (or [`Config::load_rules`]); empty after
    /// [`Config::from_toml`], which reads no file.
    pub set: RuleSet,
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
            config.server.workers = default_workers();
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
    pub fn not_yet_effective(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let mut note = |key: &str, what: &str| notes.push(format!("{key}: {what}"));
        if self.metrics.listen.is_some() {
            note(
                "metrics.listen",
                "metrics are not in this version yet; nothing listens",
            );
        }
        notes
    }

    /// Reads the file at `path`, parses it with [`Config::from_toml`] and reads the list, rule
    /// and certificate files it names ([`Config::load_lists`], [`Config::load_rules`],
    /// [`Config::load_tls`]), reporting the errors of all of them together. An unreadable config file is a single error, `path:
    /// cannot read: <reason>`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: path.to_path_buf(),
                line: None,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let mut config = Config::from_toml(&text, path)?;
        // Both kinds of file are read before failing, so one `tarmac check` shows every error.
        let mut errors = Vec::new();
        if let Err(ConfigErrors(mut bad)) = config.load_lists() {
            errors.append(&mut bad);
        }
        if let Err(ConfigErrors(mut bad)) = config.load_rules() {
            errors.append(&mut bad);
        }
        if let Err(ConfigErrors(mut bad)) = config.load_tls_ca() {
            errors.append(&mut bad);
        }
        if let Err(ConfigErrors(mut bad)) = config.load_tls() {
            errors.append(&mut bad);
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(config)
    }

    /// Reads `[tls] cert` and `key` into `tls.loaded`, or clears it when no pair is set. An
    /// unreadable file, a file without its PEM item, broken PEM, a certificate that does not
    /// parse or a key that is not the certificate's is one error, `config:line: tls.cert: file:
    /// message` (or `tls.key`), on the line of the key naming the file at fault.
    pub fn load_tls(&mut self) -> Result<(), ConfigErrors> {
        let (Some(cert), Some(key)) = (&self.tls.cert, &self.tls.key) else {
            self.tls.loaded = None;
            return Ok(());
        };
        match ServerTls::load(cert, key) {
            Ok(loaded) => {
                self.tls.loaded = Some(loaded);
                Ok(())
            }
            Err(error) => {
                let [cert_line, key_line] = self.tls.lines;
                let line = match error.file() {
                    TlsFile::Cert => cert_line,
                    TlsFile::Key => key_line,
                };
                Err(ConfigErrors(vec![ConfigError {
                    // A config built in code has no file; the key still says what is wrong.
                    path: self.path.clone().unwrap_or_else(|| PathBuf::from("[tls]")),
                    line,
                    key: error.file().key().to_owned(),
                    message: error.to_string(),
                }]))
            }
        }
    }

    /// Reads the `[lists]` files into `lists.entries`, collecting every bad line as
    /// `file:line: message`. A missing file is an error, except the default
    /// `blocklists/allow.txt` and `blocklists/deny.txt` beside the config: an empty config stays
    /// valid where nobody created them.
    pub fn load_lists(&mut self) -> Result<(), ConfigErrors> {
        let defaults = Lists::default();
        let base = self.path.as_deref().and_then(Path::parent);
        let is_default = |file: &Path, defaults: &[PathBuf]| {
            defaults
                .iter()
                .any(|d| base.map_or(d.clone(), |b| b.join(d)) == file)
        };
        let mut errors = Vec::new();
        let mut read = |files: &[PathBuf], defaults: &[PathBuf]| {
            let mut texts = Vec::with_capacity(files.len());
            for file in files {
                match std::fs::read_to_string(file) {
                    Ok(text) => texts.push((file.clone(), text)),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound
                            && is_default(file, defaults) => {}
                    Err(e) => errors.push(ConfigError {
                        path: file.clone(),
                        line: None,
                        key: String::new(),
                        message: format!("cannot read list file: {e}"),
                    }),
                }
            }
            texts
        };
        let allow = read(&self.lists.allow, &defaults.allow);
        let deny = read(&self.lists.deny, &defaults.deny);
        let mut parse = |texts: &[(PathBuf, String)]| {
            List::parse(texts).unwrap_or_else(|bad| {
                errors.extend(bad.into_iter().map(ConfigError::from));
                List::default()
            })
        };
        let entries = ListSet {
            allow: parse(&allow),
            deny: parse(&deny),
        };
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        self.lists.entries = entries;
        Ok(())
    }

    /// Reads `[downstream] tls_ca` into `downstream.tls_ca_certs`: every `CERTIFICATE` block
    /// of the PEM file, each checked to be usable as a trust anchor, so a garbled file fails
    /// `tarmac check` (and a reload) rather than every downstream handshake. Errors read
    /// `file: downstream.tls_ca: message`. Read even while `tls_verify` is off, so turning it
    /// on later meets no surprise. Then builds `downstream.client_tls` from them, once for the
    /// whole server: at start, by `tarmac check` and on each reload.
    pub fn load_tls_ca(&mut self) -> Result<(), ConfigErrors> {
        self.read_tls_ca()?;
        self.downstream.client_tls = match self.downstream.tls {
            DownstreamTls::None => None,
            _ => {
                let built = crate::downstream::tls::client_config(
                    self.downstream.tls_verify,
                    &self.downstream.tls_ca_certs,
                );
                // The certificates were checked as trust anchors just now, so this fails only
                // if rustls refuses its own defaults; name the key all the same.
                let config = built.map_err(|e| {
                    ConfigErrors(vec![ConfigError {
                        path: self.path.clone().unwrap_or_default(),
                        line: None,
                        key: "downstream.tls".to_owned(),
                        message: format!("cannot set up TLS towards the downstream: {e}"),
                    }])
                })?;
                Some(ClientTls::new(config))
            }
        };
        Ok(())
    }

    /// The `tls_ca` half of [`Config::load_tls_ca`]: the file's certificates, checked.
    fn read_tls_ca(&mut self) -> Result<(), ConfigErrors> {
        let Some(file) = &self.downstream.tls_ca else {
            self.downstream.tls_ca_certs = Vec::new();
            return Ok(());
        };
        let error = |message: String| {
            ConfigErrors(vec![ConfigError {
                path: file.clone(),
                line: None,
                key: "downstream.tls_ca".to_owned(),
                message,
            }])
        };
        let pem = std::fs::read(file).map_err(|e| error(format!("cannot read CA file: {e}")))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| error(format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(error(
                "no certificate in it; expected PEM \"-----BEGIN CERTIFICATE-----\" blocks"
                    .to_owned(),
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            if let Err(e) = roots.add(cert.clone()) {
                return Err(error(format!(
                    "certificate {} of {} is not usable as a CA: {e}",
                    i + 1,
                    certs.len()
                )));
            }
        }
        self.downstream.tls_ca_certs = certs;
        Ok(())
    }

    /// Reads the `[rules]` files into `rules.set`, collecting every error of every file as
    /// `file:line: key: message`. A missing file is an error, except the default
    /// `rules/default.toml` beside the config: an empty config stays valid where nobody
    /// installed the shipped rules.
    pub fn load_rules(&mut self) -> Result<(), ConfigErrors> {
        let base = self.path.as_deref().and_then(Path::parent);
        let is_default = |file: &Path| {
            Rules::default()
                .files
                .iter()
                .any(|d| base.map_or(d.clone(), |b| b.join(d)) == file)
        };
        let mut errors = Vec::new();
        let mut texts = Vec::with_capacity(self.rules.files.len());
        for file in &self.rules.files {
            match std::fs::read_to_string(file) {
                Ok(text) => texts.push((file.clone(), text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && is_default(file) => {}
                Err(e) => errors.push(ConfigError {
                    path: file.clone(),
                    line: None,
                    key: String::new(),
                    message: format!("cannot read rule file: {e}"),
                }),
            }
        }
        match RuleSet::parse(&texts) {
            Ok(set) if errors.is_empty() => {
                self.rules.set = set;
                Ok(())
            }
            Ok(_) => Err(ConfigErrors(errors)),
            Err(bad) => {
                errors.extend(bad.into_iter().map(ConfigError::from));
                Err(ConfigErrors(errors))
            }
        }
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
        }
    }
}

impl Server {
    /// Whether a connection from `ip` must start with a PROXY header (`proxy_protocol_from`).
    pub fn expects_proxy_header(&self, ip: IpAddr) -> bool {
        self.proxy_protocol_from
            .iter()
            .any(|cidr| cidr.contains(ip))
    }
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 25))],
            hostname: system_hostname(),
            workers: default_workers(),
            max_connections: 50_000,
            max_tarpitted: 40_000,
            state_dir: PathBuf::from("/var/lib/tarmac"),
            proxy_protocol_from: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections_per_ip: 20,
            max_connections_per_subnet: 100,
            connection_rate_per_ip: Rate {
                count: 30,
                per: Duration::from_secs(60),
            },
            connection_rate_per_subnet: Rate {
                count: 120,
                per: Duration::from_secs(60),
            },
            max_message_size: 25_000_000,
            max_recipients: 100,
            max_unknown_commands: 3,
            max_junk_commands: 100,
            max_errors: 20,
            max_line_length: 4096,
            bare_newline: BareNewline::Reject,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            command: Duration::from_secs(300),
            data: Duration::from_secs(180),
            idle: Duration::from_secs(600),
            drain: Duration::from_secs(30),
        }
    }
}

impl Default for Downstream {
    fn default() -> Self {
        Downstream {
            servers: vec![SocketAddr::from(([127, 0, 0, 1], 10025))],
            mode: DownstreamMode::Synchronous,
            pool_size: 50,
            announce_client: AnnounceClient::Xclient,
            tls: DownstreamTls::Opportunistic,
            tls_verify: false,
            tls_ca: None,
            tls_ca_certs: Vec::new(),
            client_tls: None,
        }
    }
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            servers: Vec::new(),
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(3600),
            rdns: true,
            health_interval: Duration::from_secs(300),
        }
    }
}

impl Default for Tarpit {
    fn default() -> Self {
        Tarpit {
            greet_pause: Duration::from_secs(6),
            banner_continuation: true,
            pregreet: Pregreet::Reject,
            reply_delay: Duration::from_secs(10),
            stutter: Duration::from_secs(1),
            pass_ttl: Duration::from_secs(86_400),
        }
    }
}

impl Default for Greylist {
    fn default() -> Self {
        Greylist {
            enabled: true,
            delay: Duration::from_secs(300),
            retry_window: Duration::from_secs(4 * 3600),
            pass_ttl: Duration::from_secs(36 * 86_400),
            max_entries: 500_000,
            max_new_per_subnet: 1000,
            key: vec![
                GreylistKey::Subnet,
                GreylistKey::Sender,
                GreylistKey::Recipient,
            ],
        }
    }
}

impl Default for State {
    fn default() -> Self {
        State {
            backend: StateBackend::Local,
            redis: "redis://127.0.0.1:6379/0".to_owned(),
            prefix: "tarmac:".to_owned(),
            timeout: Duration::from_millis(250),
        }
    }
}

impl Default for Lists {
    fn default() -> Self {
        Lists {
            allow: vec![PathBuf::from("blocklists/allow.txt")],
            deny: vec![PathBuf::from("blocklists/deny.txt")],
            entries: ListSet::default(),
        }
    }
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            files: vec![PathBuf::from("rules/default.toml")],
            set: RuleSet::default(),
        }
    }
}

impl From<FileError> for ConfigError {
    /// A list or rule file's error, as one of the config's.
    fn from(e: FileError) -> ConfigError {
        ConfigError {
            path: e.path,
            line: Some(e.line),
            key: e.key,
            message: e.message,
        }
    }
}

/// The kernel's host name if it is a usable DNS name, else `localhost`. Read from procfs rather
/// than gethostname(2), which would need `unsafe` or another dependency.
fn system_hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .map(|text| text.trim().to_owned())
        .find(|name| syntax::check_hostname(name).is_ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// One event loop per core; `workers = 0` in the file means this.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const EXAMPLE: &str = include_str!("../examples/tarmac.toml");
    const DOCS: &str = include_str!("../docs/configuration.md");
    const PATH: &str = "/etc/tarmac/tarmac.toml";

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml(text, Path::new(PATH))
    }

    /// The errors of `text`, one `path:line: key: message` per line.
    #[track_caller]
    fn errors(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("expected errors, the config was accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    /// What an empty file at [`PATH`] must give: the defaults, paths anchored in /etc/tarmac.
    fn defaults_at_path() -> Config {
        let mut config = Config::default();
        document::resolve_paths(&mut config, Path::new("/etc/tarmac"));
        config.path = Some(PathBuf::from(PATH));
        config
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, defaults_at_path());
        assert_eq!(config.server.listen, [SocketAddr::from(([0, 0, 0, 0], 25))]);
        assert!(config.server.workers >= 1);
        assert!(config.dnsbl.is_empty());
        assert_eq!(
            config.lists.allow,
            [PathBuf::from("/etc/tarmac/blocklists/allow.txt")]
        );
        assert_eq!(
            config.rules.files,
            [PathBuf::from("/etc/tarmac/rules/default.toml")]
        );
        assert_eq!(config.server.state_dir, PathBuf::from("/var/lib/tarmac"));
        assert_eq!(config.tls.cert, None);
        assert_eq!(config.metrics.listen, None);
        assert!(config.dns.servers.is_empty());
    }

    #[test]
    fn default_hostname_is_a_dns_name() {
        let config = Config::default();
        assert_eq!(syntax::check_hostname(&config.server.hostname), Ok(()));
    }

    #[test]
    fn example_file_equals_defaults() {
        let config = match parse(EXAMPLE) {
            Ok(config) => config,
            Err(e) => panic!("examples/tarmac.toml does not parse:\n{e}"),
        };
        assert_eq!(config, defaults_at_path());
        // Spelled out, so a wrong default cannot hide behind an equally wrong example.
        assert_eq!(config.limits.max_message_size, 25_000_000);
        assert_eq!(
            config.limits.connection_rate_per_ip,
            Rate {
                count: 30,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(
            config.limits.connection_rate_per_subnet,
            Rate {
                count: 120,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(config.timeouts.command, Duration::from_secs(300));
        assert_eq!(config.dns.cache_ttl, Duration::from_secs(3600));
        assert_eq!(config.tarpit.pass_ttl, Duration::from_secs(86_400));
        assert_eq!(config.greylist.pass_ttl, Duration::from_secs(36 * 86_400));
        assert_eq!(config.reputation.half_life, Duration::from_secs(7 * 86_400));
        assert_eq!(config.limits.max_connections_per_subnet, 100);
        assert_eq!(config.limits.max_junk_commands, 100);
        assert_eq!(config.limits.max_errors, 20);
        assert_eq!(config.greylist.max_entries, 500_000);
        assert_eq!(config.greylist.max_new_per_subnet, 1000);
        assert_eq!(
            config.downstream.servers,
            [SocketAddr::from(([127, 0, 0, 1], 10025))]
        );
    }

    #[test]
    fn example_commented_dnsbl_tables_parse() {
        let uncommented: String = EXAMPLE
            .lines()
            .skip_while(|line| !line.starts_with("# [[dnsbl]]"))
            .take_while(|line| line.starts_with('#'))
            .map(|line| line.trim_start_matches('#').trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let config = parse(&uncommented).unwrap();
        assert_eq!(
            config.dnsbl,
            [
                Dnsbl {
                    zone: "zen.spamhaus.org".into(),
                    weight: 3,
                    codes: vec![(Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 11))],
                    reply: Some("client listed, see https://example.org/lookup".to_owned()),
                },
                Dnsbl {
                    zone: "list.dnswl.org".into(),
                    weight: -2,
                    codes: Vec::new(),
                    reply: None,
                },
            ]
        );
    }

    /// The example sets every key but `hostname` (whose default depends on the machine) and the
    /// commented-out `[[dnsbl]]` tables; the docs have a table row for every key.
    #[test]
    fn example_and_docs_cover_every_key() {
        let doc = toml::de::DeTable::parse(EXAMPLE).unwrap();
        let mut in_example = BTreeSet::new();
        for (section, value) in doc.get_ref() {
            for (key, _) in value.get_ref().as_table().unwrap() {
                in_example.insert(format!("{}.{}", section.get_ref(), key.get_ref()));
            }
        }
        let mut in_schema = BTreeSet::new();
        for (section, keys) in document::SCHEMA {
            for key in *keys {
                assert!(
                    DOCS.contains(&format!("| `{key}` |")),
                    "docs/configuration.md has no row for {section}.{key}"
                );
                if *section != "dnsbl" && (*section, *key) != ("server", "hostname") {
                    in_schema.insert(format!("{section}.{key}"));
                }
            }
        }
        assert_eq!(in_example, in_schema);
    }

    #[test]
    fn all_errors_are_reported_with_lines() {
        let text = r#"
[server]
workers = 5000
listen = []

[limits]
max_message_size = "25XB"
bare_newline = "strip"

[timeouts]
connect = "0s"
idle = 600
"#;
        assert_eq!(
            errors(text),
            r#"/etc/tarmac/tarmac.toml:3: server.workers: must be from 0 to 1024, got 5000
/etc/tarmac/tarmac.toml:4: server.listen: must not be empty; give at least one address such as "0.0.0.0:25"
/etc/tarmac/tarmac.toml:7: limits.max_message_size: invalid size "25XB": expected a number with a unit such as "64KB", "25MB", "10MiB"
/etc/tarmac/tarmac.toml:8: limits.bare_newline: unknown value "strip"; expected one of: reject, normalize
/etc/tarmac/tarmac.toml:11: timeouts.connect: must be longer than 0s
/etc/tarmac/tarmac.toml:12: timeouts.idle: expected a duration such as "30s", found integer"#
        );
    }

    #[test]
    fn unknown_key() {
        assert_eq!(
            errors("[timeouts]\nconect = \"30s\"\n"),
            "/etc/tarmac/tarmac.toml:2: timeouts.conect: unknown key; expected one of: connect, \
             command, data, idle, drain"
        );
    }

    #[test]
    fn unknown_section() {
        assert_eq!(
            errors("[limit]\nmax_recipients = 5\n"),
            "/etc/tarmac/tarmac.toml:1: limit: unknown section; expected one of: server, limits, \
             timeouts, downstream, tls, dns, dnsbl, scoring, tarpit, greylist, reputation, \
             state, metrics, lists, rules"
        );
        assert_eq!(
            errors("max_recipients = 5\n"),
            "/etc/tarmac/tarmac.toml:1: max_recipients: unknown section; expected one of: \
             server, limits, timeouts, downstream, tls, dns, dnsbl, scoring, tarpit, greylist, \
             reputation, state, metrics, lists, rules"
        );
    }

    #[test]
    fn wrong_types() {
        let text = r#"[server]
listen = "0.0.0.0:25"
max_connections = "many"
[dns]
rdns = "yes"
servers = [53]
[limits]
max_recipients = 1.5
[tarpit]
pregreet = false
[metrics]
listen = 9425
[state]
prefix = ""
[scoring]
reject_mode = ["enforce"]
tarpit_at = 2
reject_at = 5
allow_at = 0
[rules]
files = "rules.toml"
[lists]
"#;
        assert_eq!(
            errors(text),
            r#"/etc/tarmac/tarmac.toml:2: server.listen: expected an array, found string
/etc/tarmac/tarmac.toml:3: server.max_connections: expected an integer, found string
/etc/tarmac/tarmac.toml:5: dns.rdns: expected true or false, found string
/etc/tarmac/tarmac.toml:6: dns.servers[0]: expected an address such as "192.0.2.53", found integer
/etc/tarmac/tarmac.toml:8: limits.max_recipients: expected an integer, found float
/etc/tarmac/tarmac.toml:10: tarpit.pregreet: expected one of: ignore, reject, drop, found boolean
/etc/tarmac/tarmac.toml:12: metrics.listen: expected an address such as "127.0.0.1:9425", or "", found integer
/etc/tarmac/tarmac.toml:14: state.prefix: must not be empty; for example "tarmac:"
/etc/tarmac/tarmac.toml:16: scoring.reject_mode: expected one of: immediate, enforce, found array
/etc/tarmac/tarmac.toml:21: rules.files: expected an array, found string"#
        );
        assert_eq!(
            errors("server = 1\n"),
            "/etc/tarmac/tarmac.toml:1: server: expected a table [server], found integer"
        );
    }

    #[test]
    fn integers_that_do_not_fit_are_errors() {
        let text = "[limits]
max_connections_per_ip = 4294967296
max_unknown_commands = -1
max_line_length = 511
[reputation]
weight = 2147483648
[scoring]
reject_at = -9223372036854775808
[server]
max_tarpitted = -1
max_connections = 0
";
        assert_eq!(
            errors(text),
            "/etc/tarmac/tarmac.toml:2: limits.max_connections_per_ip: 4294967296 is too large
/etc/tarmac/tarmac.toml:3: limits.max_unknown_commands: must be from 0 to 1000, got -1
/etc/tarmac/tarmac.toml:4: limits.max_line_length: must be from 512 to 65536, got 511
/etc/tarmac/tarmac.toml:6: reputation.weight: 2147483648 is out of range
/etc/tarmac/tarmac.toml:8: scoring.reject_at: -9223372036854775808 is out of range
/etc/tarmac/tarmac.toml:10: server.max_tarpitted: must be at least 0, got -1
/etc/tarmac/tarmac.toml:11: server.max_connections: must be at least 1, got 0"
        );
    }

    #[test]
    fn abuse_bounds_are_read_and_checked() {
        let config = parse(
            "[limits]
max_connections_per_subnet = 7
max_junk_commands = 5
max_errors = 3
[greylist]
max_entries = 2000
max_new_per_subnet = 9
",
        )
        .unwrap();
        assert_eq!(config.limits.max_connections_per_subnet, 7);
        assert_eq!(config.limits.max_junk_commands, 5);
        assert_eq!(config.limits.max_errors, 3);
        assert_eq!(config.greylist.max_entries, 2000);
        assert_eq!(config.greylist.max_new_per_subnet, 9);

        let text = "[limits]
max_connections_per_subnet = 0
max_junk_commands = 200000
max_errors = \"20\"
[greylist]
max_entries = 999
max_new_per_subnet = 0
";
        assert_eq!(
            errors(text),
            "/etc/tarmac/tarmac.toml:2: limits.max_connections_per_subnet: must be at least 1, got 0
/etc/tarmac/tarmac.toml:3: limits.max_junk_commands: must be from 0 to 100000, got 200000
/etc/tarmac/tarmac.toml:4: limits.max_errors: expected an integer, found string
/etc/tarmac/tarmac.toml:6: greylist.max_entries: must be from 1000 to 1000000, got 999
/etc/tarmac/tarmac.toml:7: greylist.max_new_per_subnet: must be at least 1, got 0"
        );
    }

    #[test]
    fn integers_in_other_radixes() {
        let config = parse("[server]\nworkers = 0x10\nmax_connections = 1_000\n").unwrap();
        assert_eq!(config.server.workers, 16);
        assert_eq!(config.server.max_connections, 1000);
    }

    #[test]
    fn message_size_forms() {
        let size = |text: &str| parse(text).map(|c| c.limits.max_message_size);
        assert_eq!(size("limits.max_message_size = \"10MiB\""), Ok(10_485_760));
        assert_eq!(size("limits.max_message_size = 1048576"), Ok(1_048_576));
        assert_eq!(
            errors("limits.max_message_size = \"999B\""),
            "/etc/tarmac/tarmac.toml:1: limits.max_message_size: must be at least 1KB, got 999 \
             bytes"
        );
        assert_eq!(
            errors("limits.max_message_size = -5"),
            "/etc/tarmac/tarmac.toml:1: limits.max_message_size: -5 is out of range"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let text = "[server]\nworkers = = 4\n\n[limits]\nbare_newline = \"reject\n";
        assert_eq!(
            errors(text),
            "/etc/tarmac/tarmac.toml:2: toml: extra `=`, expected nothing\n\
             /etc/tarmac/tarmac.toml:5: toml: invalid basic string, expected `\"`"
        );
        // An unclosed array runs on to the next line that cannot continue it.
        let text = "[server]\nlisten = [\"0.0.0.0:25\"\n\n[limits]\n";
        assert_eq!(
            errors(text),
            "/etc/tarmac/tarmac.toml:4: toml: missing comma between array elements, expected `,`"
        );

        let e = parse("[server]\nworkers = 4\nworkers = 5\n").unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(
            e.to_string(),
            "/etc/tarmac/tarmac.toml:3: toml: duplicate key"
        );
    }

    #[test]
    fn dnsbl_tables() {
        let text = r#"
[[dnsbl]]
zone = "zen.spamhaus.org"
weight = 3
codes = ["127.0.0.2", "127.0.0.10-127.0.0.11"]
reply = "listed"

[[dnsbl]]
zone = "list.dnswl.org"
weight = -2
"#;
        let config = parse(text).unwrap();
        let ip = |d| Ipv4Addr::new(127, 0, 0, d);
        assert_eq!(config.dnsbl.len(), 2);
        assert_eq!(&*config.dnsbl[0].zone, "zen.spamhaus.org");
        assert_eq!(config.dnsbl[0].codes, [(ip(2), ip(2)), (ip(10), ip(11))]);
        assert_eq!(config.dnsbl[0].reply.as_deref(), Some("listed"));
        assert_eq!(config.dnsbl[1].weight, -2);
        assert_eq!(config.dnsbl[1].reply, None);
    }

    #[test]
    fn dnsbl_errors_name_the_table() {
        let text = r#"[[dnsbl]]
zone = "zen.spamhaus.org"
weight = 0
codes = ["127.0.0.2", "10.0.0.1"]

[[dnsbl]]
weight = 2
reply = "bad\r\nreply"
colour = "red"

[[dnsbl]]
zone = "ZEN.spamhaus.org"
weight = 1

[[dnsbl]]
zone = "zen.spamhaus.org"
weight = 1
"#;
        assert_eq!(
            errors(text),
            r#"/etc/tarmac/tarmac.toml:3: dnsbl[0].weight: must not be 0; a zone that adds nothing need not be queried
/etc/tarmac/tarmac.toml:4: dnsbl[0].codes[1]: invalid answer code "10.0.0.1": 10.0.0.1 is not in 127.0.0.0/8, where DNSBL answers live
/etc/tarmac/tarmac.toml:6: dnsbl[1].zone: missing; give the zone to query, such as zone = "zen.spamhaus.org"
/etc/tarmac/tarmac.toml:8: dnsbl[1].reply: '\r' is not allowed; reply text is one line of printable ASCII
/etc/tarmac/tarmac.toml:9: dnsbl[1].colour: unknown key; expected one of: zone, weight, codes, reply
/etc/tarmac/tarmac.toml:16: dnsbl[3].zone: zone "zen.spamhaus.org" is already dnsbl[2]"#
        );
        assert_eq!(
            errors("[dnsbl]\nzone = \"zen.spamhaus.org\"\nweight = 3\n"),
            "/etc/tarmac/tarmac.toml:1: dnsbl: expected an array of tables; write [[dnsbl]] with \
             double brackets, one table per zone"
        );
        assert_eq!(
            errors("[[dnsbl]]\nzone = \"zen.spamhaus.org\"\n"),
            "/etc/tarmac/tarmac.toml:1: dnsbl[0].weight: missing; give the score a listing \
             adds, such as weight = 3 (negative for an allowlist)"
        );
        assert_eq!(
            errors("[[dnsbl]]\nzone = \"zen spamhaus\"\nweight = 1\n"),
            "/etc/tarmac/tarmac.toml:2: dnsbl[0].zone: invalid DNS name \"zen spamhaus\": ' ' \
             is not allowed; use letters, digits, hyphens and dots"
        );
    }

    #[test]
    fn relative_paths_are_anchored_at_the_config_directory() {
        let text = r#"
[server]
state_dir = "state"
[tls]
cert = "tls/cert.pem"
key = "/etc/ssl/private/key.pem"
[lists]
allow = ["allow.txt", "/srv/lists/allow.txt"]
deny = []
[rules]
files = ["rules/a.toml", "../shared/b.toml"]
"#;
        let config = Config::from_toml(text, Path::new("/srv/tarmac/tarmac.toml")).unwrap();
        assert_eq!(config.path, Some(PathBuf::from("/srv/tarmac/tarmac.toml")));
        assert_eq!(config.server.state_dir, PathBuf::from("/srv/tarmac/state"));
        assert_eq!(
            config.tls.cert,
            Some(PathBuf::from("/srv/tarmac/tls/cert.pem"))
        );
        assert_eq!(
            config.tls.key,
            Some(PathBuf::from("/etc/ssl/private/key.pem"))
        );
        assert_eq!(
            config.lists.allow,
            [
                PathBuf::from("/srv/tarmac/allow.txt"),
                PathBuf::from("/srv/lists/allow.txt")
            ]
        );
        assert!(config.lists.deny.is_empty());
        assert_eq!(
            config.rules.files,
            [
                PathBuf::from("/srv/tarmac/rules/a.toml"),
                PathBuf::from("/srv/tarmac/../shared/b.toml")
            ]
        );

        // A bare file name: relative to the working directory, where the file is.
        let config = Config::from_toml("", Path::new("tarmac.toml")).unwrap();
        assert_eq!(config.lists.deny, [PathBuf::from("blocklists/deny.txt")]);
    }

    #[test]
    fn downstream_tls_ca_is_a_path_anchored_at_the_config_directory() {
        let config = parse("[downstream]\ntls_verify = true\ntls_ca = \"ca/down.pem\"\n").unwrap();
        assert_eq!(
            config.downstream.tls_ca,
            Some(PathBuf::from("/etc/tarmac/ca/down.pem"))
        );
        // Read only by `load`: `from_toml` does no I/O.
        assert!(config.downstream.tls_ca_certs.is_empty());
        assert_eq!(
            parse("downstream.tls_ca = \"\"").unwrap().downstream.tls_ca,
            None
        );
        assert_eq!(Config::default().downstream.tls_ca, None);
        assert_eq!(
            errors("[downstream]\ntls_ca = false\n"),
            "/etc/tarmac/tarmac.toml:2: downstream.tls_ca: expected a file path, or \"\" for \
             none, found boolean"
        );
    }

    #[test]
    fn unreadable_or_garbled_tls_ca_names_the_file() {
        let dir = std::env::temp_dir().join(format!("tarmac-config-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let load = |ca: &str, contents: Option<&str>| {
            let file = dir.join(ca);
            if let Some(contents) = contents {
                std::fs::write(&file, contents).unwrap();
            }
            let mut config = parse(&format!(
                "downstream.tls_ca = {:?}",
                file.display().to_string()
            ))
            .unwrap();
            config.load_tls_ca().unwrap_err().to_string()
        };
        let path = |ca: &str| dir.join(ca).display().to_string();
        assert_eq!(
            load("missing.pem", None),
            format!(
                "{}: downstream.tls_ca: cannot read CA file: No such file or directory (os error 2)",
                path("missing.pem")
            )
        );
        assert_eq!(
            load("empty.pem", Some("no PEM here\n")),
            format!(
                "{}: downstream.tls_ca: no certificate in it; expected PEM \
                 \"-----BEGIN CERTIFICATE-----\" blocks",
                path("empty.pem")
            )
        );
        let broken = load(
            "broken.pem",
            Some("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
        );
        assert!(
            broken.starts_with(&format!(
                "{}: downstream.tls_ca: not a PEM certificate file: ",
                path("broken.pem")
            )),
            "{broken}"
        );
        let not_der = load(
            "junk.pem",
            Some("-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n"),
        );
        assert!(
            not_der.starts_with(&format!(
                "{}: downstream.tls_ca: certificate 1 of 1 is not usable as a CA: ",
                path("junk.pem")
            )),
            "{not_der}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ipv6_addresses() {
        let text = r#"
[server]
listen = ["[::]:25", "0.0.0.0:25", "[2001:db8::25]:2525"]
proxy_protocol_from = ["2001:db8:1::/48", "10.0.0.0/8"]
[downstream]
servers = ["[::1]:10025"]
[dns]
servers = ["::1", "[2001:db8::53]", "[2001:db8::53]:5353", "192.0.2.53"]
[metrics]
listen = "[::1]:9425"
"#;
        let config = parse(text).unwrap();
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(
            config.server.listen,
            [
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, 25)),
                SocketAddr::from(([0, 0, 0, 0], 25)),
                SocketAddr::from((v6("2001:db8::25"), 2525)),
            ]
        );
        assert_eq!(
            config.server.proxy_protocol_from,
            [
                Cidr {
                    addr: IpAddr::V6(v6("2001:db8:1::")),
                    prefix: 48
                },
                Cidr {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)),
                    prefix: 8
                },
            ]
        );
        assert_eq!(
            config.downstream.servers,
            [SocketAddr::from((Ipv6Addr::LOCALHOST, 10025))]
        );
        assert_eq!(
            config.dns.servers,
            [
                SocketAddr::from((Ipv6Addr::LOCALHOST, 53)),
                SocketAddr::from((v6("2001:db8::53"), 53)),
                SocketAddr::from((v6("2001:db8::53"), 5353)),
                SocketAddr::from(([192, 0, 2, 53], 53)),
            ]
        );
        assert_eq!(
            config.metrics.listen,
            Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 9425)))
        );
    }

    #[test]
    fn address_errors() {
        let text = r#"
[server]
listen = ["::1:25", "localhost:25"]
proxy_protocol_from = ["192.0.2.1/24"]
[downstream]
servers = ["127.0.0.1:0"]
"#;
        assert_eq!(
            errors(text),
            r#"/etc/tarmac/tarmac.toml:3: server.listen[0]: invalid address "::1:25": expected ip:port such as "0.0.0.0:25" or "[::1]:25"
/etc/tarmac/tarmac.toml:3: server.listen[1]: invalid address "localhost:25": expected ip:port such as "0.0.0.0:25" or "[::1]:25"
/etc/tarmac/tarmac.toml:4: server.proxy_protocol_from[0]: invalid CIDR "192.0.2.1/24": host bits are set; did you mean 192.0.2.0/24?
/etc/tarmac/tarmac.toml:6: downstream.servers[0]: 127.0.0.1:0: port 0 cannot be connected to"#
        );
    }

    #[test]
    fn checks_across_keys() {
        assert_eq!(
            errors("[scoring]\nallow_at = 1\ntarpit_at = 1\n"),
            "/etc/tarmac/tarmac.toml:3: scoring.tarpit_at: must be greater than scoring.allow_at \
             (1), got 1"
        );
        // Only the earlier key is in the file: the error goes there.
        assert_eq!(
            errors("[scoring]\nallow_at = 2\n"),
            "/etc/tarmac/tarmac.toml:2: scoring.allow_at: must be less than scoring.tarpit_at \
             (1), got 2"
        );
        assert_eq!(
            errors("[scoring]\nreject_at = 0\n"),
            "/etc/tarmac/tarmac.toml:2: scoring.reject_at: must be at least scoring.tarpit_at \
             (1), got 0"
        );
        assert!(parse("[scoring]\ntarpit_at = 3\nreject_at = 3\n").is_ok());
        // A key that failed to parse is not compared with its neighbours.
        assert_eq!(
            errors("[scoring]\nallow_at = 2\ntarpit_at = \"2\"\n"),
            "/etc/tarmac/tarmac.toml:3: scoring.tarpit_at: expected an integer, found string"
        );
        assert_eq!(
            errors("[tls]\ncert = 5\nkey = \"k.pem\"\n"),
            "/etc/tarmac/tarmac.toml:2: tls.cert: expected a file path, or \"\" for none, found \
             integer"
        );
        assert_eq!(
            errors("[greylist]\ndelay = \"5h\"\n"),
            "/etc/tarmac/tarmac.toml:2: greylist.delay: must be shorter than \
             greylist.retry_window (4h), got 5h"
        );
        assert_eq!(
            errors("[tls]\ncert = \"cert.pem\"\n"),
            "/etc/tarmac/tarmac.toml:2: tls.key: tls.cert is set but tls.key is not; give both \
             (STARTTLS on) or neither (off)"
        );
        assert_eq!(
            errors("[tls]\ncert = \"\"\nkey = \"key.pem\"\n"),
            "/etc/tarmac/tarmac.toml:2: tls.cert: tls.key is set but tls.cert is not; give both \
             (STARTTLS on) or neither (off)"
        );
        let config = parse("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n").unwrap();
        assert_eq!(config.tls.cert, Some(PathBuf::from("/etc/tarmac/c.pem")));
        assert_eq!(
            errors("[downstream]\nmode = \"multiplexing\"\nannounce_client = \"proxy-v2\"\n"),
            "/etc/tarmac/tarmac.toml:3: downstream.announce_client: a PROXY header cannot \
             announce the clients of a pooled connection; use \"xclient\" or \"none\" with \
             mode = \"multiplexing\""
        );
        assert!(parse("[downstream]\nmode = \"multiplexing\"\n").is_ok());
    }

    #[test]
    fn other_value_checks() {
        let text = r#"[greylist]
key = ["subnet", "sender", "subnet"]
[state]
redis = "127.0.0.1:6379"
[server]
hostname = "mx1 example"
[downstream]
servers = []
mode = "pooled"
"#;
        assert_eq!(
            errors(text),
            r#"/etc/tarmac/tarmac.toml:2: greylist.key[2]: listed twice
/etc/tarmac/tarmac.toml:4: state.redis: invalid Redis URL "127.0.0.1:6379": expected redis:// or unix://, such as "redis://127.0.0.1:6379/0"
/etc/tarmac/tarmac.toml:6: server.hostname: invalid DNS name "mx1 example": ' ' is not allowed; use letters, digits, hyphens and dots
/etc/tarmac/tarmac.toml:8: downstream.servers: must not be empty; give the MTA to relay to, such as "127.0.0.1:10025"
/etc/tarmac/tarmac.toml:9: downstream.mode: unknown value "pooled"; expected one of: synchronous, multiplexing"#
        );
        assert_eq!(
            errors("greylist.key = []"),
            "/etc/tarmac/tarmac.toml:1: greylist.key: must not be empty; for example [\"subnet\", \
             \"sender\", \"recipient\"]"
        );
        let config = parse(
            r#"
[greylist]
key = ["ip", "helo", "rdns"]
[state]
backend = "redis"
redis = "unix:///run/redis.sock"
[downstream]
mode = "multiplexing"
announce_client = "none"
tls = "required"
tls_verify = true
[tarpit]
stutter = "0s"
greet_pause = "250ms"
pregreet = "drop"
"#,
        )
        .unwrap();
        assert_eq!(
            config.greylist.key,
            [GreylistKey::Ip, GreylistKey::Helo, GreylistKey::Rdns]
        );
        assert_eq!(config.state.backend, StateBackend::Redis);
        assert_eq!(config.downstream.mode, DownstreamMode::Multiplexing);
        assert_eq!(config.downstream.announce_client, AnnounceClient::None);
        assert_eq!(config.downstream.tls, DownstreamTls::Required);
        assert!(config.downstream.tls_verify);
        assert_eq!(config.tarpit.stutter, Duration::ZERO);
        assert_eq!(config.tarpit.greet_pause, Duration::from_millis(250));
        assert_eq!(config.tarpit.pregreet, Pregreet::Drop);
    }

    #[test]
    fn redis_urls_are_checked_by_the_redis_client() {
        let bad = [
            (
                "redis://",
                r#"invalid Redis URL "redis://": missing hostname"#,
            ),
            (
                "redis://127.0.0.1:6379/x",
                r#"invalid Redis URL "redis://127.0.0.1:6379/x": invalid database number"#,
            ),
            (
                "redis://127.0.0.1:99999/0",
                r#"invalid Redis URL "redis://127.0.0.1:99999/0": redis URL did not parse"#,
            ),
            ("unix://", r#"invalid Redis URL "unix://": missing path"#),
            (
                "http://127.0.0.1:6379",
                r#"invalid Redis URL "http://127.0.0.1:6379": expected redis:// or unix://, such as "redis://127.0.0.1:6379/0""#,
            ),
            (
                "rediss://127.0.0.1:6379",
                r#"invalid Redis URL "rediss://127.0.0.1:6379": TLS to Redis (rediss://) is not supported; use redis:// on a trusted network, or unix://"#,
            ),
            (
                "redis://:secret@/0",
                "invalid Redis URL (with credentials, not shown): redis URL did not parse",
            ),
        ];
        for (url, message) in bad {
            assert_eq!(
                errors(&format!("[state]\nredis = \"{url}\"\n")),
                format!("/etc/tarmac/tarmac.toml:2: state.redis: {message}"),
                "{url}"
            );
        }
        // Checked whatever the backend: a bad URL is found before someone switches to it.
        assert!(
            errors("[state]\nbackend = \"local\"\nredis = \"redis://\"\n")
                .contains("state.redis: invalid Redis URL")
        );
        for good in [
            "redis://127.0.0.1:6379/0",
            "redis://[::1]:6380/3",
            "redis://tarmac:secret@10.0.0.5/1",
            "unix:///run/redis/redis.sock",
        ] {
            let config = parse(&format!(
                "[state]\nbackend = \"redis\"\nredis = \"{good}\"\n"
            ))
            .unwrap();
            assert_eq!(config.state.redis, good);
        }
        assert_eq!(
            errors("[state]\ntimeout = \"0s\""),
            "/etc/tarmac/tarmac.toml:2: state.timeout: must be longer than 0s"
        );
        let config = parse("[state]\ntimeout = \"100ms\"").unwrap();
        assert_eq!(config.state.timeout, Duration::from_millis(100));
        assert_eq!(Config::default().state.timeout, Duration::from_millis(250));
    }

    #[test]
    fn workers_zero_means_one_per_core() {
        let config = parse("server.workers = 0").unwrap();
        assert_eq!(config.server.workers, default_workers());
        let config = parse("server.workers = 3").unwrap();
        assert_eq!(config.server.workers, 3);
    }

    #[test]
    fn unreadable_file_is_one_error() {
        let path = Path::new("/nonexistent/tarmac/tarmac.toml");
        let e = Config::load(path).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/nonexistent/tarmac/tarmac.toml: cannot read: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn error_display_without_key_or_line() {
        let e = ConfigError {
            path: PathBuf::from("/etc/tarmac/tarmac.toml"),
            line: Some(12),
            key: "limits.max_message_size".to_owned(),
            message: "too big".to_owned(),
        };
        assert_eq!(
            e.to_string(),
            "/etc/tarmac/tarmac.toml:12: limits.max_message_size: too big"
        );
    }

    #[test]
    fn cidr_contains() {
        let net: Cidr = "192.0.2.0/24".parse().unwrap();
        assert!(net.contains("192.0.2.0".parse().unwrap()));
        assert!(net.contains("192.0.2.255".parse().unwrap()));
        assert!(!net.contains("192.0.3.0".parse().unwrap()));
        assert!(net.contains("::ffff:192.0.2.7".parse().unwrap()));
        assert!(!net.contains("2001:db8::1".parse().unwrap()));

        let net: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(net.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!net.contains("2001:db9::1".parse().unwrap()));
        assert!(!net.contains("192.0.2.7".parse().unwrap()));

        let all4: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all4.contains("255.255.255.255".parse().unwrap()));
        assert!(!all4.contains("::1".parse().unwrap()));
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains("::1".parse().unwrap()));

        let host: Cidr = "2001:db8::7".parse().unwrap();
        assert_eq!(host.prefix, 128);
        assert!(host.contains("2001:db8::7".parse().unwrap()));
        assert!(!host.contains("2001:db8::8".parse().unwrap()));
        assert_eq!(host.to_string(), "2001:db8::7/128");

        let e = "192.0.2.1/24".parse::<Cidr>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid CIDR \"192.0.2.1/24\": host bits are set; did you mean 192.0.2.0/24?"
        );
    }
}
