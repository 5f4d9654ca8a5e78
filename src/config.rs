//! Configuration: the TOML schema of DESIGN.md §3, parsed and validated with `file:line: key:
//! message` errors, every one collected before failing.
//!
//! (Skeleton: the types below are the contract the rest of the crate codes against; parsing and
//! validation are being written.)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The whole validated configuration. Cheap to share behind an `Arc`; a reload builds a new one.
#[derive(Clone, Debug)]
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
#[derive(Clone, Debug)]
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
    /// Directory for state snapshots.
    pub state_dir: PathBuf,
    /// Peers that must send a PROXY header first.
    pub proxy_protocol_from: Vec<Cidr>,
}

/// An address block such as `192.0.2.0/24` or `2001:db8::/32`; a bare address is a /32 or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address (host bits zero).
    pub addr: IpAddr,
    /// Prefix length, ≤ 32 for IPv4 and ≤ 128 for IPv6.
    pub prefix: u8,
}

/// `[limits]`
#[derive(Clone, Debug)]
pub struct Limits {
    /// Concurrent connections from one address.
    pub max_connections_per_ip: u32,
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
    /// Longest command line in bytes, CRLF included.
    pub max_line_length: usize,
    /// What to do with a bare CR or LF in a message body.
    pub bare_newline: BareNewline,
}

/// A rate such as `30/min`: `count` events per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed per period; also the bucket's burst.
    pub count: u32,
    /// The period.
    pub per: Duration,
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
#[derive(Clone, Debug)]
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
#[derive(Clone, Debug)]
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
#[derive(Clone, Debug, Default)]
pub struct Tls {
    /// PEM certificate chain; `None` (empty in the file) = STARTTLS not offered.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
}

/// `[dns]`
#[derive(Clone, Debug)]
pub struct Dns {
    /// Resolvers; empty = the system's resolv.conf.
    pub servers: Vec<SocketAddr>,
    /// Per lookup.
    pub timeout: Duration,
    /// Cap on the TTL-driven cache.
    pub cache_ttl: Duration,
    /// PTR plus forward confirmation for every client.
    pub rdns: bool,
}

/// One `[[dnsbl]]` table.
#[derive(Clone, Debug)]
pub struct Dnsbl {
    /// The zone queried, e.g. `zen.spamhaus.org`.
    pub zone: String,
    /// Added to the score when listed; negative = allowlist.
    pub weight: i32,
    /// Which answers count, as inclusive ranges; empty = any 127.0.0.0/8 answer.
    pub codes: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Text used instead of the zone name in reject replies.
    pub reply: Option<String>,
}

/// `[scoring]`
#[derive(Clone, Debug)]
pub struct Scoring {
    /// Score ≤ this: allow.
    pub allow_at: i32,
    /// Score ≥ this: tarpit.
    pub tarpit_at: i32,
    /// Score ≥ this: reject.
    pub reject_at: i32,
    /// How a reject is delivered.
    pub reject_mode: RejectMode,
}

/// `[scoring] reject_mode`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectMode {
    /// `554` as the final greeting line.
    Immediate,
    /// Normal banner, `550 5.7.1` on every RCPT.
    Enforce,
}

/// `[tarpit]`
#[derive(Clone, Debug)]
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
#[derive(Clone, Debug)]
pub struct Greylist {
    /// Applies to verdicts pass and tarpit.
    pub enabled: bool,
    /// First retry accepted after this.
    pub delay: Duration,
    /// ... and before this (counted from the first attempt).
    pub retry_window: Duration,
    /// A passed triplet lives this long, refreshed by each delivery.
    pub pass_ttl: Duration,
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

/// `[reputation]`
#[derive(Clone, Debug)]
pub struct Reputation {
    /// Keep per-IP history.
    pub enabled: bool,
    /// Decay of past events.
    pub half_life: Duration,
    /// Added to the score of a mostly bad address.
    pub weight: i32,
}

/// `[state]`
#[derive(Clone, Debug)]
pub struct State {
    /// Where shared state lives.
    pub backend: StateBackend,
    /// Redis URL, used with `backend = "redis"`.
    pub redis: String,
    /// Key prefix in Redis.
    pub prefix: String,
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
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Where `/metrics` is served; `None` = off.
    pub listen: Option<SocketAddr>,
}

/// `[lists]`
#[derive(Clone, Debug)]
pub struct Lists {
    /// Allow-list files.
    pub allow: Vec<PathBuf>,
    /// Deny-list files.
    pub deny: Vec<PathBuf>,
}

/// `[rules]`
#[derive(Clone, Debug)]
pub struct Rules {
    /// Rule files, evaluated in this order.
    pub files: Vec<PathBuf>,
}
