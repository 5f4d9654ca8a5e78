//! The resolver thread's body: hickory built inside the runtime, the request loop, zone health
//! checks and cache sweeps.
//!
//! The loop takes a lookup slot (semaphore permit, [`MAX_IN_FLIGHT`]) before it takes the next
//! request, so when every slot is busy requests wait in the bounded channel and, once it is
//! full, workers get `TempFail` at once (`ResolverHandle::lookup`). Each request runs as its
//! own task, bounded by `[dns] timeout` from the moment the worker asked; its answer is
//! completed even if the task dies (a drop guard), so no waiter is left behind a dead lookup.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::system_conf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::MissedTickBehavior;

use super::health::{self, LISTED_TEST_POINT, UNLISTED_TEST_POINT, ZoneState};
use super::lookup::{Classified, Lookups};
use super::{DnsblAnswer, LookupAnswer, MAX_IN_FLIGHT, Query, Request, Shared, TEMPFAIL_TTL};
use crate::config;

/// How often expired answers are swept out, so the cache's memory follows the traffic rather
/// than its peak.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The shortest health interval accepted: a zero interval would spin.
const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(10);

/// What the thread needs from `start`.
pub(super) struct Settings {
    pub(super) name_servers: Vec<NameServerConfig>,
    pub(super) timeout: Duration,
    pub(super) cache_ttl: Duration,
    pub(super) health_interval: Duration,
}

/// The servers to ask: `[dns] servers` over UDP, with TCP for truncated answers, on each
/// entry's port; or, if none, resolv.conf's nameservers (read now, so an unreadable file is an
/// error of `start`). resolv.conf's search domains and options are not used: query names are
/// fully qualified, and timeout and attempts are ours.
pub(super) fn name_servers(dns: &config::Dns) -> io::Result<Vec<NameServerConfig>> {
    if dns.servers.is_empty() {
        let (system, _options) = system_conf::read_system_conf()
            .map_err(|err| io::Error::other(format!("dns: reading /etc/resolv.conf: {err}")))?;
        return Ok(system.name_servers().to_vec());
    }
    Ok(dns
        .servers
        .iter()
        .map(|server| {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            NameServerConfig::new(server.ip(), true, vec![udp, tcp])
        })
        .collect())
}

/// hickory's options for our use.
fn options(timeout: Duration) -> ResolverOpts {
    let mut options = ResolverOpts::default();
    // Per attempt; the whole lookup is also bounded by the same timeout (`serve`), so a
    // second attempt only happens when the first failed fast.
    options.timeout = timeout;
    // One retry after a failed attempt (hickory counts retries): a SERVFAIL or REFUSED from one
    // of several servers, or a lost TCP connection, gets a second chance elsewhere within the
    // timeout. UDP loss needs none: hickory retransmits within an attempt.
    options.attempts = 1;
    // No hickory cache (a zero-capacity map is disabled): ours holds classified answers with
    // in-flight merging, and health checks must reach the server every time.
    options.cache_size = 0;
    // DNSBL names must come from the zone, not /etc/hosts; reading it would also block.
    options.use_hosts_file = ResolveHosts::Never;
    // One server at a time (ordered by measured latency), not two in parallel: DNSBL operators
    // count queries, and a parallel second query doubles them for a little latency.
    options.num_concurrent_reqs = 1;
    // Our names end in a dot; nothing should be appended even if one slips through.
    options.ndots = 0;
    options
}

/// Builds hickory inside the runtime, reports readiness on `ready`, then serves requests until
/// `stop` fires (or is dropped) or every sender is gone.
pub(super) async fn run(
    settings: Settings,
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<Request>,
    mut stop: oneshot::Receiver<()>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let config = ResolverConfig::from_name_servers(settings.name_servers);
    let built = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(options(settings.timeout))
        .build();
    let resolver = match built {
        Ok(resolver) => resolver,
        Err(err) => {
            // `start` is waiting for this; if it gave up, nobody listens and that is fine.
            let _ = ready.send(Err(err.to_string()));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let context = Arc::new(Context {
        shared,
        lookups: Lookups::new(resolver, settings.cache_ttl),
        timeout: settings.timeout,
        cache_ttl: settings.cache_ttl,
    });
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // The first tick is immediate: zones are checked at start.
    let mut health = tokio::time::interval(settings.health_interval.max(MIN_HEALTH_INTERVAL));
    health.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sweep =
        tokio::time::interval_at(tokio::time::Instant::now() + SWEEP_INTERVAL, SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = health.tick() => check_zones(&context),
            // A reload replaced the zones: the new ones are checked now, not at the next tick.
            () = context.shared.recheck.notified() => check_zones(&context),
            _ = sweep.tick() => context.shared.cache.sweep(Instant::now()),
            next = next_request(&permits, &mut requests) => {
                let Some((permit, request)) = next else {
                    break;
                };
                tokio::spawn(serve(Arc::clone(&context), request, permit));
            }
        }
    }
}

/// What every task on the thread shares.
struct Context {
    shared: Arc<Shared>,
    lookups: Lookups,
    timeout: Duration,
    cache_ttl: Duration,
}

/// A lookup slot, then the next request; `None` when every sender is gone.
async fn next_request(
    permits: &Arc<Semaphore>,
    requests: &mut mpsc::Receiver<Request>,
) -> Option<(OwnedSemaphorePermit, Request)> {
    // Never closed, so this does not fail; if it did, stopping is the safe reading.
    let permit = Arc::clone(permits).acquire_owned().await.ok()?;
    let request = requests.recv().await?;
    Some((permit, request))
}

/// Answers one request and delivers the answer to its waiters.
async fn serve(context: Arc<Context>, request: Request, _permit: OwnedSemaphorePermit) {
    let mut pending = Pending {
        context: Arc::clone(&context),
        query: Some(request.query),
    };
    let Some(query) = pending.query.as_ref() else {
        return;
    };
    let deadline = request.asked_at + context.timeout;
    let stats = &context.shared.stats;
    let now = Instant::now();
    let Classified {
        answer,
        valid_until,
    } = if now >= deadline {
        // Queued past its timeout: the worker has stopped waiting. Not cached, since it says
        // nothing about the zone.
        context.shared.note_overload(now);
        Classified {
            answer: LookupAnswer::temp_fail(query),
            valid_until: None,
        }
    } else {
        let lookup = context.lookups.answer(query, &stats.queries_sent);
        match tokio::time::timeout_at(deadline.into(), lookup).await {
            Ok(classified) => classified,
            Err(_elapsed) => Classified {
                answer: LookupAnswer::temp_fail(query),
                valid_until: Some(Instant::now() + TEMPFAIL_TTL.min(context.cache_ttl)),
            },
        }
    };
    if let Some(query) = pending.query.take() {
        context.shared.complete(&query, &answer, valid_until);
    }
}

/// A request not yet completed: completes it with `TempFail` if dropped first (a panic in a
/// lookup, or the runtime shutting down), so its waiters are not left behind a dead slot.
struct Pending {
    context: Arc<Context>,
    query: Option<Query>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(query) = self.query.take() {
            self.context
                .shared
                .complete(&query, &LookupAnswer::temp_fail(&query), None);
        }
    }
}

/// Starts a health check of every configured zone (one already running is not doubled).
fn check_zones(context: &Arc<Context>) {
    for state in context.shared.zones.snapshot().iter() {
        tokio::spawn(check_zone(Arc::clone(context), Arc::clone(state)));
    }
}

/// Queries a zone's test points (bypassing the cache) and records the verdict.
async fn check_zone(context: Arc<Context>, state: Arc<ZoneState>) {
    if !state.start_check() {
        return;
    }
    let deadline = tokio::time::Instant::now() + context.timeout;
    let probe = |test_point| {
        let context = &context;
        let zone = &state.zone;
        async move {
            let sent = &context.shared.stats.health_queries;
            let lookup = context.lookups.dnsbl(zone, IpAddr::V4(test_point), sent);
            match tokio::time::timeout_at(deadline, lookup).await {
                Ok(classified) => classified.answer,
                Err(_elapsed) => DnsblAnswer::TempFail,
            }
        }
    };
    let (listed, unlisted) = tokio::join!(probe(LISTED_TEST_POINT), probe(UNLISTED_TEST_POINT));
    let verdict = health::judge(&listed, &unlisted);
    if state.finish_check(&verdict) {
        context.shared.cache.purge_zone(&state.zone);
    }
}

#[cfg(test)]
mod tests {
    use hickory_resolver::config::ProtocolConfig;

    use super::*;

    #[test]
    fn configured_servers_keep_their_ports_over_udp_then_tcp() {
        let dns = config::Dns {
            servers: vec![
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
            ],
            ..config::Dns::default()
        };
        let servers = name_servers(&dns).unwrap();
        let seen: Vec<(String, Vec<(ProtocolConfig, u16)>)> = servers
            .iter()
            .map(|server| {
                let connections = server
                    .connections
                    .iter()
                    .map(|c| (c.protocol.clone(), c.port))
                    .collect();
                (server.ip.to_string(), connections)
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (
                    "127.0.0.1".to_owned(),
                    vec![(ProtocolConfig::Udp, 5353), (ProtocolConfig::Tcp, 5353)]
                ),
                (
                    "::1".to_owned(),
                    vec![(ProtocolConfig::Udp, 53), (ProtocolConfig::Tcp, 53)]
                ),
            ]
        );
    }

    #[test]
    fn hickory_caches_nothing_and_reads_no_hosts_file() {
        let options = options(Duration::from_millis(1500));
        assert_eq!(options.cache_size, 0);
        assert_eq!(options.use_hosts_file, ResolveHosts::Never);
        assert_eq!(options.timeout, Duration::from_millis(1500));
    }
}
