//! A scrape: every worker's counters summed, the server's gauges asked for, and all of it
//! encoded by `prometheus-client` as OpenMetrics text. A fresh registry per scrape keeps the
//! crate's own locks (its `Family` map) off the workers' path entirely: the workers only ever
//! touch their plain atomics.

use std::fmt;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::counters::{self, DownstreamError, Refused, WorkerCounters, read};
use crate::dns::{DnsStats, ZoneHealth};
use crate::smtp::session::CommandStage;

/// Figures kept elsewhere in the server, read at each scrape.
#[derive(Clone, Debug, Default)]
pub(crate) struct Gauges {
    /// Client connections open now.
    pub(crate) open: usize,
    /// Sessions holding a tarpit place now.
    pub(crate) tarpitted: usize,
    /// Stress mode is on.
    pub(crate) stressed: bool,
    /// The resolver's counters and each zone's health, when a resolver runs.
    pub(crate) dns: Option<(DnsStats, Vec<ZoneHealth>)>,
    /// Each configured downstream server's health: up, consecutive failures.
    pub(crate) downstream: Vec<(std::net::SocketAddr, bool, u32)>,
}

/// What a scrape reads: the workers' counters and where the gauges come from.
pub(crate) struct Metrics {
    workers: Vec<Arc<WorkerCounters>>,
    gauges: Box<dyn Fn() -> Gauges + Send + Sync>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// A label set as the crate encodes it.
type Labels = Vec<(String, String)>;

/// Builds one scrape's registry. Help texts are written as sentences; the crate adds the
/// final full stop itself, so theirs is dropped.
struct Scrape {
    registry: Registry,
}

impl Scrape {
    fn counter(&mut self, name: &str, help: &str, value: u64) {
        let counter: Counter = Counter::default();
        counter.inc_by(value);
        self.registry
            .register(name, help.trim_end_matches('.'), counter);
    }

    /// A labelled counter; rows with the same labels add up (one per worker).
    fn counters(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
        let family: Family<Labels, Counter> = Family::default();
        for (labels, value) in rows {
            family.get_or_create(&labels).inc_by(value);
        }
        self.registry
            .register(name, help.trim_end_matches('.'), family);
    }

    fn gauge(&mut self, name: &str, help: &str, value: u64) {
        let gauge: Gauge = Gauge::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        self.registry
            .register(name, help.trim_end_matches('.'), gauge);
    }

    /// A labelled gauge; rows with the same labels add up (one per worker).
    fn gauges(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
        let family: Family<Labels, Gauge> = Family::default();
        for (labels, value) in rows {
            family
                .get_or_create(&labels)
                .inc_by(i64::try_from(value).unwrap_or(i64::MAX));
        }
        self.registry
            .register(name, help.trim_end_matches('.'), family);
    }
}

/// One label.
fn label(name: &str, value: impl Into<String>) -> Labels {
    vec![(name.to_owned(), value.into())]
}

fn usize_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Metrics {
    /// Scrapes read `workers` (one per worker, in any order) and call `gauges` once each.
    pub(crate) fn new(
        workers: Vec<Arc<WorkerCounters>>,
        gauges: Box<dyn Fn() -> Gauges + Send + Sync>,
    ) -> Metrics {
        Metrics { workers, gauges }
    }

    /// The exposition: OpenMetrics text, every metric with `# HELP` and `# TYPE`, ending in
    /// `# EOF`. See `docs/metrics.md`.
    pub(crate) fn render(&self) -> String {
        let mut s = Scrape {
            registry: Registry::with_prefix("tarmac"),
        };
        let w = &self.workers;
        let gauges = (self.gauges)();
        let sum = |f: fn(&WorkerCounters) -> u64| w.iter().map(|c| f(c)).sum::<u64>();

        s.gauges(
            "build_info",
            "The running version (always 1).",
            [(label("version", env!("CARGO_PKG_VERSION")), 1)],
        );
        // Connections.
        s.counter(
            "connections_accepted",
            "TCP connections accepted from the listeners, refused ones included.",
            sum(|c| read(&c.accepted)),
        );
        s.counters(
            "connections_refused",
            "Connections turned away with 421 at accept, by the limit that refused them.",
            Refused::ALL.iter().enumerate().flat_map(|(n, reason)| {
                w.iter().map(move |c| {
                    let value = c.refused.get(n).map_or(0, read);
                    (label("reason", reason.label()), value)
                })
            }),
        );
        s.gauge(
            "connections_open",
            "Client connections open now.",
            usize_u64(gauges.open),
        );
        s.gauge(
            "connections_tarpitted",
            "Sessions holding a tarpit place (max_tarpitted) now.",
            usize_u64(gauges.tarpitted),
        );
        s.gauge(
            "stress",
            "1 while stress mode is on (open connections over 80% of max_connections).",
            u64::from(gauges.stressed),
        );
        // Sessions, from the close report.
        s.counters(
            "sessions",
            "Closed sessions by verdict (allow, pass, tarpit, reject).",
            ["allow", "pass", "tarpit", "reject"]
                .into_iter()
                .map(|v| (label("verdict", v), 0))
                .chain(slot_rows(w, |c| &c.verdicts, "verdict")),
        );
        s.counters(
            "session_results",
            "Closed sessions by how they ended (the close line's result).",
            slot_rows(w, |c| &c.results, "result"),
        );
        s.counters(
            "list_matches",
            "Closed sessions a local list decided, by list and what matched (deny:ip, allow:helo).",
            slot_rows(w, |c| &c.lists, "list"),
        );
        s.counter(
            "pregreets",
            "Clients that talked before the final greeting line.",
            sum(|c| read(&c.pregreets)),
        );
        s.counter(
            "messages_relayed",
            "Messages the downstream accepted.",
            sum(|c| read(&c.messages)),
        );
        s.counters(
            "refusals",
            "Replies of 4xx or 5xx to clients' commands (greylisting's aside), by the stage they answered (helo, mail, rcpt, data: DATA or the final dot, misc: any command besides these) and class.",
            w.iter().flat_map(|c| {
                CommandStage::ALL
                    .iter()
                    .zip(&c.refusals)
                    .flat_map(|(stage, row)| {
                        ["4xx", "5xx"].iter().zip(row).map(|(class, counter)| {
                            let mut labels = label("stage", stage.as_str());
                            labels.push(("class".to_owned(), (*class).to_owned()));
                            (labels, read(counter))
                        })
                    })
                    .collect::<Vec<_>>()
            }),
        );
        s.counter(
            "recipients_relayed",
            "Recipients the downstream accepted.",
            sum(|c| read(&c.recipients)),
        );
        s.counters(
            "greylist_checks",
            "Recipients checked against the greylist, by outcome (new, early, pass).",
            counters::GREYLIST
                .iter()
                .enumerate()
                .flat_map(|(n, outcome)| {
                    w.iter().map(move |c| {
                        let value = c.greylist.get(n).map_or(0, read);
                        (label("outcome", *outcome), value)
                    })
                }),
        );
        // DNS.
        let mut lookups = Vec::new();
        let mut at_once = Vec::new();
        for c in w {
            c.dnsbl.each(|zone, counts| {
                let zone = zone.map_or_else(|| "other".to_owned(), |z| z.to_string());
                for (n, result) in counters::DNSBL.iter().enumerate() {
                    let mut labels = label("zone", zone.clone());
                    labels.push(("result".to_owned(), (*result).to_owned()));
                    lookups.push((labels, counts.get(n).map_or(0, read)));
                }
                let cached = counts.last().map_or(0, read);
                at_once.push((label("zone", zone), cached));
            });
        }
        lookups.retain(|(labels, value)| *value > 0 || !is_other(labels));
        at_once.retain(|(labels, value)| *value > 0 || !is_other(labels));
        s.counters(
            "dns_lookups",
            "DNSBL/DNSWL answers sessions got, by zone and result.",
            lookups,
        );
        s.counters(
            "dns_cache_answers",
            "DNSBL/DNSWL answers given at once, without a query (cached, or the zone set aside).",
            at_once,
        );
        s.counters(
            "rdns_lookups",
            "Forward-confirmed reverse DNS answers sessions got, by result.",
            counters::RDNS.iter().enumerate().flat_map(|(n, result)| {
                w.iter().map(move |c| {
                    let value = c.rdns.get(n).map_or(0, read);
                    (label("result", *result), value)
                })
            }),
        );
        if let Some((stats, zones)) = gauges.dns {
            s.counter(
                "dns_queries",
                "DNS queries the resolver sent for sessions (a cache hit sends none).",
                stats.queries_sent,
            );
            s.counter(
                "dns_cache_hits",
                "Resolver lookups answered from its cache.",
                stats.cache_hits,
            );
            s.counter(
                "dns_merged",
                "Resolver lookups that joined the same one already in flight.",
                stats.merged,
            );
            s.counter(
                "dns_overloaded",
                "Resolver lookups answered tempfail because it was behind.",
                stats.overloaded,
            );
            s.counter(
                "dns_health_queries",
                "DNS queries sent by the zones' health checks.",
                stats.health_queries,
            );
            s.gauge(
                "dns_cache_entries",
                "Resolver cache slots in use.",
                stats.cache_entries,
            );
            s.gauges(
                "dns_zone_up",
                "1 while a zone answers its test points correctly, 0 while it is set aside.",
                zones
                    .iter()
                    .map(|z| (label("zone", z.zone.to_string()), u64::from(!z.set_aside))),
            );
            s.counters(
                "dns_zone_skipped",
                "Lookups not made because their zone was set aside.",
                zones
                    .iter()
                    .map(|z| (label("zone", z.zone.to_string()), z.skipped)),
            );
        }
        // Downstream.
        let mut connections = Vec::new();
        let mut errors = Vec::new();
        for c in w {
            c.servers.each(|server, counts| {
                let server = server.map_or_else(|| "other".to_owned(), ToString::to_string);
                if server == "other" && read(&counts.connections) == 0 {
                    return;
                }
                connections.push((label("server", server.clone()), read(&counts.connections)));
                for (n, kind) in DownstreamError::ALL.iter().enumerate() {
                    let mut labels = label("server", server.clone());
                    labels.push(("kind".to_owned(), kind.label().to_owned()));
                    errors.push((labels, counts.errors.get(n).map_or(0, read)));
                }
            });
        }
        s.counters(
            "downstream_connections",
            "Downstream connections sessions asked for, by server (new or from the pool).",
            connections,
        );
        s.counters(
            "downstream_errors",
            "Downstream connections that failed, by server and kind (connect, tls, lost).",
            errors,
        );
        s.counter(
            "downstream_bytes_sent",
            "Bytes written to downstream connections (commands and message data, before TLS).",
            sum(|c| read(&c.bytes_to_downstream)),
        );
        s.gauges(
            "pool_connections",
            "Multiplexing: downstream connections the pool holds, by state (in_use, idle).",
            w.iter().flat_map(|c| {
                let (open, idle) = (read(&c.pool_open), read(&c.pool_idle));
                [
                    (label("state", "in_use"), open.saturating_sub(idle)),
                    (label("state", "idle"), idle),
                ]
            }),
        );
        s.gauges(
            "downstream_up",
            "Whether each downstream server is taken (1) or marked down and skipped (0).",
            gauges
                .downstream
                .iter()
                .map(|(server, up, _)| (label("server", server.to_string()), u64::from(*up))),
        );
        s.gauges(
            "downstream_consecutive_failures",
            "Connect failures, timeouts and 421 banners in a row, by downstream server.",
            gauges.downstream.iter().map(|(server, _, failures)| {
                (label("server", server.to_string()), u64::from(*failures))
            }),
        );
        s.gauge(
            "pool_waiting",
            "Multiplexing: sessions waiting for a pooled downstream connection.",
            sum(|c| read(&c.pool_waiting)),
        );
        // Content.
        let mut scans = Vec::new();
        for c in w {
            c.scans.each(|key, value| {
                let (scanner, action) = key.map_or(("other", "other"), |(s, a)| (*s, &**a));
                let mut labels = label("scanner", scanner);
                labels.push(("action".to_owned(), action.to_owned()));
                scans.push((labels, read(value)));
            });
        }
        scans.retain(|(labels, value)| *value > 0 || !is_other(labels));
        s.counters(
            "scans",
            "Scanner actions on scanned messages (a connection's last one), by scanner and action.",
            scans,
        );

        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &s.registry);
        text
    }
}

/// The `(label, value)` rows of every worker's `table`, under the label `name`; the `other`
/// row only when something was counted there.
fn slot_rows<'a>(
    workers: &'a [Arc<WorkerCounters>],
    table: fn(&WorkerCounters) -> &counters::Slots<&'static str, std::sync::atomic::AtomicU64>,
    name: &'a str,
) -> Vec<(Labels, u64)> {
    let mut rows = Vec::new();
    for c in workers {
        table(c).each(|key, value| {
            let value = read(value);
            match key {
                Some(key) => rows.push((label(name, *key), value)),
                None if value > 0 => rows.push((label(name, "other"), value)),
                None => {}
            }
        });
    }
    rows
}

/// Whether a row is the `other` overflow of a slot table.
fn is_other(labels: &Labels) -> bool {
    labels.first().is_some_and(|(_, value)| value == "other")
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::metrics::DownstreamError;
    use crate::smtp::question::{DnsblAnswer, LookupAnswer, Query};

    #[test]
    fn workers_are_summed_and_every_metric_has_help_and_type() {
        let workers: Vec<_> = (0..2).map(|_| Arc::new(WorkerCounters::new())).collect();
        let server: SocketAddr = "192.0.2.25:25".parse().unwrap();
        for c in &workers {
            c.accepted();
            c.refused(Refused::MaxConnectionsPerIp);
            c.downstream_connection(server);
            c.downstream_error(server, DownstreamError::Connect);
            let query = Query::Dnsbl {
                zone: "bl.test".into(),
                ip: "127.0.0.2".parse().unwrap(),
            };
            c.lookup(
                &query,
                &LookupAnswer::Dnsbl(DnsblAnswer::Listed(vec![])),
                true,
            );
        }
        let metrics = Metrics::new(
            workers,
            Box::new(|| Gauges {
                open: 3,
                downstream: vec![("192.0.2.25:25".parse().unwrap(), false, 3)],
                ..Gauges::default()
            }),
        );
        let text = metrics.render();
        for line in [
            "tarmac_connections_accepted_total 2",
            "tarmac_downstream_up{server=\"192.0.2.25:25\"} 0",
            "tarmac_downstream_consecutive_failures{server=\"192.0.2.25:25\"} 3",
            "tarmac_connections_refused_total{reason=\"max_connections_per_ip\"} 2",
            "tarmac_connections_refused_total{reason=\"table_full\"} 0",
            "tarmac_connections_open 3",
            "tarmac_downstream_connections_total{server=\"192.0.2.25:25\"} 2",
            "tarmac_downstream_errors_total{server=\"192.0.2.25:25\",kind=\"connect\"} 2",
            "tarmac_dns_lookups_total{zone=\"bl.test\",result=\"listed\"} 2",
            "tarmac_dns_cache_answers_total{zone=\"bl.test\"} 2",
            "tarmac_sessions_total{verdict=\"reject\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(families.len(), helps);
        assert!(
            families.iter().all(|f| f.starts_with("tarmac_")),
            "{families:?}"
        );
        assert!(
            !text.contains("other"),
            "no overflow rows when nothing overflowed:\n{text}"
        );
    }
}
