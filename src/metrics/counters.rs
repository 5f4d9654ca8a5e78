//! One worker's counters: plain `AtomicU64`s that only the owning worker writes and the metrics
//! thread reads at scrape time, so counting takes no lock and no read-modify-write instruction
//! (a relaxed load and store: with one writer nothing can be lost between them; the reader sees
//! each value whole, a moment late at worst).
//!
//! A labelled counter whose label values are a fixed set of the code's (refusal reasons,
//! greylist outcomes) is an array indexed by an enum. One whose values come from the close
//! report (`&'static str`s of the code) or from the configuration (zones, downstream servers,
//! scanners) uses [`Slots`]: a fixed number of key slots, filled in order the first time a key
//! is seen, the rest counted under `other`. The keys are never client text.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::policy::admission::Refusal;
use crate::policy::rates::RateRefusal;
use crate::smtp::Report;
use crate::smtp::question::{DnsblAnswer, LookupAnswer, Query, RdnsAnswer};
use crate::state::GreylistOutcome;

/// Distinct keys one labelled table keeps (zones, servers, scanner actions, results); more
/// are counted under the label value `other`. Far above any sane configuration, small enough
/// that a scrape walks every slot of every worker in microseconds.
pub(super) const SLOTS: usize = 64;

/// Adds `n` to a counter only the calling worker writes (see the module's comment).
fn add(counter: &AtomicU64, n: u64) {
    let value = counter.load(Ordering::Relaxed).wrapping_add(n);
    counter.store(value, Ordering::Relaxed);
}

/// Reads a counter for a scrape.
pub(super) fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Why a connection was turned away at accept (`tarmac_connections_refused_total{reason}`),
/// named after the configuration key that refused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `[server] max_connections`.
    MaxConnections,
    /// `[limits] max_connections_per_ip`.
    MaxConnectionsPerIp,
    /// `[limits] max_connections_per_subnet`.
    MaxConnectionsPerSubnet,
    /// `[limits] connection_rate_per_ip`.
    ConnectionRatePerIp,
    /// `[limits] connection_rate_per_subnet`.
    ConnectionRatePerSubnet,
    /// The worker's connection table is full (or the socket could not be registered).
    TableFull,
    /// A transparent connection for this host itself (`421 4.3.5`, DESIGN.md §9).
    TransparentLoop,
}

impl Refused {
    /// Every reason, in label order.
    pub(super) const ALL: [Refused; 7] = [
        Refused::MaxConnections,
        Refused::MaxConnectionsPerIp,
        Refused::MaxConnectionsPerSubnet,
        Refused::ConnectionRatePerIp,
        Refused::ConnectionRatePerSubnet,
        Refused::TableFull,
        Refused::TransparentLoop,
    ];

    /// The label value.
    pub(super) fn label(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::MaxConnectionsPerIp => "max_connections_per_ip",
            Refused::MaxConnectionsPerSubnet => "max_connections_per_subnet",
            Refused::ConnectionRatePerIp => "connection_rate_per_ip",
            Refused::ConnectionRatePerSubnet => "connection_rate_per_subnet",
            Refused::TableFull => "table_full",
            Refused::TransparentLoop => "transparent_loop",
        }
    }
}

impl From<&Refusal> for Refused {
    fn from(refusal: &Refusal) -> Refused {
        match refusal {
            Refusal::GlobalCap => Refused::MaxConnections,
            Refusal::PerIpCap => Refused::MaxConnectionsPerIp,
            Refusal::PerSubnetCap => Refused::MaxConnectionsPerSubnet,
            Refusal::Rate(RateRefusal::PerIp) => Refused::ConnectionRatePerIp,
            Refusal::Rate(RateRefusal::PerSubnet) => Refused::ConnectionRatePerSubnet,
        }
    }
}

/// What went wrong with a downstream connection (`tarmac_downstream_errors_total{kind}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DownstreamError {
    /// The connect failed (refused, unreachable, reset).
    Connect,
    /// The STARTTLS handshake failed.
    Tls,
    /// The connection was lost while in use: a read or write error, a TLS error, or the
    /// server closing it on its own (a `421` and a hang-up).
    Lost,
}

impl DownstreamError {
    /// Every kind, in label order.
    pub(super) const ALL: [DownstreamError; 3] = [
        DownstreamError::Connect,
        DownstreamError::Tls,
        DownstreamError::Lost,
    ];

    /// The label value.
    pub(super) fn label(self) -> &'static str {
        match self {
            DownstreamError::Connect => "connect",
            DownstreamError::Tls => "tls",
            DownstreamError::Lost => "lost",
        }
    }
}

/// Greylist outcomes in label order (`tarmac_greylist_checks_total{outcome}`).
pub(super) const GREYLIST: [&str; 3] = ["new", "early", "pass"];

/// DNSBL answers in label order (`tarmac_dns_lookups_total{zone,result}`).
pub(super) const DNSBL: [&str; 5] = ["listed", "not_listed", "error", "tempfail", "set_aside"];

/// rDNS answers in label order (`tarmac_rdns_lookups_total{result}`).
pub(super) const RDNS: [&str; 4] = ["verified", "unverified", "no_name", "tempfail"];

/// Scanner actions a label may name (`tarmac_scans_total{action}`); anything else is `other`.
/// The first five are the milters' and tarmac's words, the rest rspamd's actions.
const SCAN_ACTIONS: [&str; 11] = [
    "accept",
    "continue",
    "reject",
    "tempfail",
    "discard",
    "failed",
    "busy",
    "no_action",
    "greylist",
    "add_header",
    "rewrite_subject",
];

/// A labelled table with [`SLOTS`] key slots and an `other` value. Only the owning worker
/// fills a slot, so the first free one can be taken without a race; the metrics thread reads
/// the filled ones.
#[derive(Debug)]
pub(super) struct Slots<K, V> {
    slots: Box<[(OnceLock<K>, V)]>,
    other: V,
}

impl<K, V: Default> Slots<K, V> {
    fn new() -> Slots<K, V> {
        Slots {
            slots: (0..SLOTS)
                .map(|_| (OnceLock::new(), V::default()))
                .collect(),
            other: V::default(),
        }
    }

    /// The value for the key `matches` recognises, made by `make` in the first free slot
    /// when it is new; `other` when every slot is taken.
    fn find(&self, matches: impl Fn(&K) -> bool, make: impl FnOnce() -> K) -> &V {
        let mut make = Some(make);
        for (key, value) in self.slots.iter() {
            if key.get().is_none()
                && let Some(make) = make.take()
            {
                // Only this worker fills slots: the free one stays free until this `set`.
                let _ = key.set(make());
            }
            if key.get().is_some_and(&matches) {
                return value;
            }
        }
        &self.other
    }

    /// Every filled slot's key and value, then `None` and `other`.
    pub(super) fn each(&self, mut f: impl FnMut(Option<&K>, &V)) {
        for (key, value) in self.slots.iter() {
            if let Some(key) = key.get() {
                f(Some(key), value);
            }
        }
        f(None, &self.other);
    }
}

/// Per-server downstream figures.
#[derive(Debug, Default)]
pub(super) struct ServerCounts {
    /// Connections asked for (new or, in multiplexing mode, from the pool).
    pub(super) connections: AtomicU64,
    /// Errors by [`DownstreamError`].
    pub(super) errors: [AtomicU64; 3],
}

/// One worker's counters (see the module's comment). Created by the server for each worker
/// when `[metrics] listen` is set; read by the metrics thread.
#[derive(Debug)]
pub(crate) struct WorkerCounters {
    pub(super) accepted: AtomicU64,
    pub(super) refused: [AtomicU64; 6],
    pub(super) verdicts: Slots<&'static str, AtomicU64>,
    pub(super) results: Slots<&'static str, AtomicU64>,
    pub(super) lists: Slots<&'static str, AtomicU64>,
    pub(super) pregreets: AtomicU64,
    pub(super) messages: AtomicU64,
    pub(super) recipients: AtomicU64,
    /// Refusals by stage (`CommandStage::ALL`) and class (4xx, 5xx).
    pub(super) refusals: [[AtomicU64; 2]; 5],
    pub(super) greylist: [AtomicU64; 3],
    /// Per zone: answers by [`DNSBL`] result, and (last) how many came at once.
    pub(super) dnsbl: Slots<Arc<str>, [AtomicU64; 6]>,
    /// By [`RDNS`] result, and (last) how many came at once.
    pub(super) rdns: [AtomicU64; 5],
    pub(super) servers: Slots<SocketAddr, ServerCounts>,
    pub(super) bytes_to_downstream: AtomicU64,
    pub(super) scans: Slots<(&'static str, Box<str>), AtomicU64>,
    pub(super) pool_open: AtomicU64,
    pub(super) pool_idle: AtomicU64,
    pub(super) pool_waiting: AtomicU64,
}

impl Default for WorkerCounters {
    fn default() -> Self {
        WorkerCounters::new()
    }
}

impl WorkerCounters {
    /// All zero.
    pub(crate) fn new() -> WorkerCounters {
        WorkerCounters {
            accepted: AtomicU64::new(0),
            refused: Default::default(),
            verdicts: Slots::new(),
            results: Slots::new(),
            lists: Slots::new(),
            pregreets: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            recipients: AtomicU64::new(0),
            refusals: Default::default(),
            greylist: Default::default(),
            dnsbl: Slots::new(),
            rdns: Default::default(),
            servers: Slots::new(),
            bytes_to_downstream: AtomicU64::new(0),
            scans: Slots::new(),
            pool_open: AtomicU64::new(0),
            pool_idle: AtomicU64::new(0),
            pool_waiting: AtomicU64::new(0),
        }
    }

    /// A connection was accepted from a listener (refused ones included).
    pub(crate) fn accepted(&self) {
        add(&self.accepted, 1);
    }

    /// A connection was turned away with `421` at accept (or, with the rates in Redis, when
    /// the store answered).
    pub(crate) fn refused(&self, reason: Refused) {
        let index = Refused::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or_default();
        if let Some(counter) = self.refused.get(index) {
            add(counter, 1);
        }
    }

    /// A recipient's greylist check answered.
    pub(crate) fn greylist(&self, outcome: &GreylistOutcome) {
        let index = match outcome {
            GreylistOutcome::New => 0,
            GreylistOutcome::Early(_) => 1,
            GreylistOutcome::Pass => 2,
        };
        if let Some(counter) = self.greylist.get(index) {
            add(counter, 1);
        }
    }

    /// A DNS answer reached a session; `at_once`: from the cache (or a set-aside zone),
    /// without waiting.
    pub(crate) fn lookup(&self, query: &Query, answer: &LookupAnswer, at_once: bool) {
        match (query, answer) {
            (Query::Dnsbl { zone, .. }, LookupAnswer::Dnsbl(answer)) => {
                let index = match answer {
                    DnsblAnswer::Listed(_) => 0,
                    DnsblAnswer::NotListed => 1,
                    DnsblAnswer::Error(_) => 2,
                    DnsblAnswer::TempFail => 3,
                    DnsblAnswer::SetAside => 4,
                };
                let counts = self
                    .dnsbl
                    .find(|known| **known == **zone, || Arc::clone(zone));
                bump(counts, index, at_once);
            }
            (Query::Rdns(_), LookupAnswer::Rdns(answer)) => {
                let index = match answer {
                    RdnsAnswer::Verified(_) => 0,
                    RdnsAnswer::Unverified => 1,
                    RdnsAnswer::NoName => 2,
                    RdnsAnswer::TempFail => 3,
                };
                bump(&self.rdns, index, at_once);
            }
            // A mismatched pair is not an answer any session asked for.
            _ => {}
        }
    }

    /// The session asked for a downstream connection to `server`.
    pub(crate) fn downstream_connection(&self, server: SocketAddr) {
        add(&self.server(server).connections, 1);
    }

    /// A downstream connection to `server` failed.
    pub(crate) fn downstream_error(&self, server: SocketAddr, kind: DownstreamError) {
        let index = DownstreamError::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_default();
        if let Some(counter) = self.server(server).errors.get(index) {
            add(counter, 1);
        }
    }

    /// Bytes written to a downstream socket (commands and message data; before TLS).
    pub(crate) fn bytes_to_downstream(&self, n: usize) {
        add(
            &self.bytes_to_downstream,
            u64::try_from(n).unwrap_or(u64::MAX),
        );
    }

    /// The worker's share of the downstream pool now: connections open, idle among them,
    /// sessions waiting for one.
    pub(crate) fn set_pool(&self, open: usize, idle: usize, waiting: usize) {
        for (gauge, value) in [
            (&self.pool_open, open),
            (&self.pool_idle, idle),
            (&self.pool_waiting, waiting),
        ] {
            gauge.store(u64::try_from(value).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
    }

    /// A connection closed: its verdict, result, list match, pregreet, relayed messages and
    /// recipients and scanner actions, from the same report as its close line.
    pub(crate) fn closed(&self, report: &Report<'_>) {
        let verdict = report.verdict;
        add(self.verdicts.find(|v| *v == verdict, || verdict), 1);
        let result = report.result;
        add(self.results.find(|r| *r == result, || result), 1);
        let list = report.list;
        if list != "-" {
            add(self.lists.find(|l| *l == list, || list), 1);
        }
        if report.pregreet {
            add(&self.pregreets, 1);
        }
        add(&self.messages, u64::from(report.msgs));
        add(&self.recipients, u64::from(report.rcpts));
        for (row, counts) in self.refusals.iter().zip(report.refusals.0) {
            for (counter, count) in row.iter().zip(counts) {
                add(counter, u64::from(count));
            }
        }
        if report.scan != "-" {
            for mark in report.scan.split(',') {
                let (scanner, action) = scan_labels(mark);
                let counter = self.scans.find(
                    |(s, a)| *s == scanner && **a == *action,
                    || (scanner, action.into()),
                );
                add(counter, 1);
            }
        }
    }

    fn server(&self, server: SocketAddr) -> &ServerCounts {
        self.servers.find(|known| *known == server, || server)
    }
}

/// Adds one at `index` and, when `at_once`, one at the last place.
fn bump<const N: usize>(counts: &[AtomicU64; N], index: usize, at_once: bool) {
    if let Some(counter) = counts.get(index) {
        add(counter, 1);
    }
    if at_once && let Some(counter) = counts.last() {
        add(counter, 1);
    }
}

/// `(scanner, action)` of one close-line scan mark (`rspamd:reject:15.2`, `milter1:accept`, or
/// `failed`/`busy` for the whole scan), each kept to a bounded set: `rspamd`, `milterN`,
/// `all`, else `other`; an action from [`SCAN_ACTIONS`], else `other`.
fn scan_labels(mark: &str) -> (&'static str, &str) {
    let mut parts = mark.split(':');
    let first = parts.next().unwrap_or_default();
    let (scanner, action) = match parts.next() {
        Some(action) => (first, action),
        None => ("all", first),
    };
    let scanner = match scanner {
        "rspamd" => "rspamd",
        "all" => "all",
        other => match other.strip_prefix("milter") {
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => milter_label(n),
            _ => "other",
        },
    };
    let action = SCAN_ACTIONS
        .iter()
        .find(|known| **known == action)
        .copied()
        .unwrap_or("other");
    (scanner, action)
}

/// `milterN` as a static label for N below 100 (the marks number milters from 1).
fn milter_label(n: &str) -> &'static str {
    const NAMES: [&str; 16] = [
        "milter0", "milter1", "milter2", "milter3", "milter4", "milter5", "milter6", "milter7",
        "milter8", "milter9", "milter10", "milter11", "milter12", "milter13", "milter14",
        "milter15",
    ];
    n.parse::<usize>()
        .ok()
        .and_then(|n| NAMES.get(n))
        .copied()
        .unwrap_or("milter16+")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_marks_become_bounded_labels() {
        assert_eq!(scan_labels("rspamd:reject:15.2"), ("rspamd", "reject"));
        assert_eq!(scan_labels("milter1:accept"), ("milter1", "accept"));
        assert_eq!(scan_labels("failed"), ("all", "failed"));
        assert_eq!(scan_labels("milter99:discard"), ("milter16+", "discard"));
        assert_eq!(scan_labels("evil:x"), ("other", "other"));
        assert_eq!(scan_labels("rspamd:soft reject:1"), ("rspamd", "other"));
    }

    #[test]
    fn slots_fill_in_order_then_overflow_into_other() {
        let slots: Slots<usize, AtomicU64> = Slots::new();
        for n in 0..SLOTS + 3 {
            add(slots.find(|k| *k == n, || n), 1);
            add(slots.find(|k| *k == n, || n), 1);
        }
        let mut seen = Vec::new();
        slots.each(|key, value| seen.push((key.copied(), read(value))));
        assert_eq!(seen.len(), SLOTS + 1);
        assert_eq!(seen.first(), Some(&(Some(0), 2)));
        assert_eq!(seen.last(), Some(&(None, 6)), "three keys, twice each");
    }

    #[test]
    fn close_reports_count_once_each() {
        let counters = WorkerCounters::new();
        let report = Report {
            client: "192.0.2.1:25".parse().unwrap(),
            dst: None,
            helo: Some(b"marker.example"),
            rdns: "-",
            verdict: "pass",
            score: 0,
            reputation: "-",
            dnsbl: "-".to_owned(),
            list: "deny:helo",
            pregreet: true,
            rule: "-",
            greylist: "-",
            msgs: 2,
            rcpts: 3,
            tls: "no",
            refusals: crate::smtp::session::Refusals([[0, 0], [0, 0], [1, 2], [0, 0], [0, 0]]),
            scan: "rspamd:no_action:0.0,milter1:accept",
            result: "delivered",
        };
        counters.closed(&report);
        counters.closed(&report);
        assert_eq!(read(&counters.messages), 4);
        let rcpt = &counters.refusals[2];
        assert_eq!((read(&rcpt[0]), read(&rcpt[1])), (2, 4), "rcpt: 4xx, 5xx");
        assert_eq!(read(&counters.refusals[1][1]), 0);
        assert_eq!(read(&counters.recipients), 6);
        assert_eq!(read(&counters.pregreets), 2);
        let mut scans = Vec::new();
        counters
            .scans
            .each(|key, value| scans.push((key.map(|(s, a)| format!("{s}:{a}")), read(value))));
        assert_eq!(
            scans,
            [
                (Some("rspamd:no_action".to_owned()), 2),
                (Some("milter1:accept".to_owned()), 2),
                (None, 0)
            ]
        );
    }
}
