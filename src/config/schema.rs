//! The schema of DESIGN.md §3: one type per section and per choice, with DESIGN.md's defaults.
//! The types policy decides with (`Cidr`, `Dnsbl`, `Rate`, `Reputation`, `Scoring`) are
//! policy's; the sections hold them.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use super::syntax;
use crate::downstream::tls::ClientTls;
use crate::policy::rates::Rate;
use crate::policy::{Cidr, ListSet, RuleSet};
use crate::tls::ServerTls;

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
    /// The user to become after binding the listeners as root (DESIGN.md §8); "" = stay.
    pub user: String,
    /// Its group; "" = the user's primary group.
    pub group: String,
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
    /// Tried in the order `balance` sets, the next one not down after a failure.
    pub servers: Vec<SocketAddr>,
    /// Which healthy server a new connection goes to (DESIGN.md §8).
    pub balance: Balance,
    /// Consecutive connect failures, connect or banner timeouts and `421` banners that mark a
    /// server down, so later clients skip it instead of waiting for it.
    pub down_after: u32,
    /// When a down server gets its first probe connection; later probes back off, doubling up
    /// to [`MAX_RETRY_AFTER`].
    pub retry_after: Duration,
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
    /// The certificates of `tls_ca`, read and checked by
    /// [`Config::load_tls_ca`](super::Config::load_tls_ca); empty before that and when `tls_ca` is
    /// not set.
    pub tls_ca_certs: Vec<CertificateDer<'static>>,
    /// The rustls client configuration for STARTTLS towards the downstream, built once by
    /// [`Config::load_tls_ca`](super::Config::load_tls_ca) from `tls_verify` and `tls_ca_certs` and
    /// shared by every downstream connection of every worker; `None` before that and with
    /// `tls = "none"`. A configuration built by hand calls `load_tls_ca` for downstream TLS (until
    /// then a downstream handshake fails, and `opportunistic` goes on in plain text).
    pub client_tls: Option<ClientTls>,
}

/// The longest back-off between two probes of a down downstream server (DESIGN.md §8: the
/// doubling of `retry_after` stops here, so a server that comes back is used again within ten
/// minutes).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// `[downstream] balance`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    /// The first healthy server in the order of `servers`; the others take over only when it
    /// is down or fails.
    Failover,
    /// New connections spread in turn over the healthy servers.
    RoundRobin,
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
    /// The pair read from `cert` and `key` by [`Config::load_tls`](super::Config::load_tls) (which
    /// [`Config::load`](super::Config::load) calls): STARTTLS is offered only when this is set, and
    /// every handshake uses it. [`Config::from_toml`](super::Config::from_toml) reads no files, so
    /// it leaves this `None`.
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

/// `[transparent]` (DESIGN.md §9): listeners in the network path, fed by a firewall's TPROXY
/// rule, whose sessions relay to the address the client connected to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transparent {
    /// `IP_TRANSPARENT` listeners; empty = no transparent mode.
    pub listen: Vec<SocketAddr>,
    /// Connect downstream from the client's own address (then no announcement is sent);
    /// otherwise from the host's, with `announce_client`.
    pub spoof_source: bool,
}

/// `[lists]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lists {
    /// Allow-list files.
    pub allow: Vec<PathBuf>,
    /// Deny-list files.
    pub deny: Vec<PathBuf>,
    /// Their entries, read by [`Config::load`](super::Config::load) (or
    /// [`Config::load_lists`](super::Config::load_lists)); empty after
    /// [`Config::from_toml`](super::Config::from_toml), which reads no file.
    pub entries: ListSet,
}

/// `[rules]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Rule files, evaluated in this order.
    pub files: Vec<PathBuf>,
    /// Their rules, read by [`Config::load`](super::Config::load) (or
    /// [`Config::load_rules`](super::Config::load_rules)); empty after
    /// [`Config::from_toml`](super::Config::from_toml), which reads no file.
    pub set: RuleSet,
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
            user: String::new(),
            group: String::new(),
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
            balance: Balance::Failover,
            down_after: 3,
            retry_after: Duration::from_secs(30),
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

/// The kernel's host name if it is a usable DNS name, else `localhost`. Read from procfs rather
/// than gethostname(2), which would need `unsafe` or another dependency.
pub(super) fn system_hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .map(|text| text.trim().to_owned())
        .find(|name| syntax::check_hostname(name).is_ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// One event loop per core; `workers = 0` in the file means this.
pub(super) fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}
