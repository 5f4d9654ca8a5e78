//! The resolver thread: DNSBL/DNSWL and rDNS lookups off the event loop (DESIGN.md §5,
//! STYLE.md §1.3).
//!
//! hickory-resolver 0.26 is async-only, so one thread (`tarmac-dns`) runs a tokio
//! current-thread runtime with the hickory resolver built inside its `block_on`: lookups and
//! hickory's background tasks share that one executor (two executors on one thread deadlock).
//! Nothing async leaves this module; workers talk to it through plain calls and channels:
//!
//! ```text
//! worker: ResolverHandle::lookup ──cache hit──▶ Some(answer), at once
//!            │ miss: InFlight slot + tokio mpsc try_send (full: Some(TempFail))
//!            ▼
//! resolver thread: semaphore permit → hickory lookup(s) bounded by [dns] timeout → classify
//!            │ Ready slot (TTL-capped) + one Delivery per waiter
//!            ▼
//! worker ◀── std mpsc Inbox + Arc<mio::Waker>::wake(), only when the worker drained the last one
//! ```
//!
//! **Cache and merging** (`cache`): the key is the [`Query`]. A slot is `InFlight` (the waiters
//! of the one lookup being made) or `Ready` (an answer and when it goes stale); a thousand
//! sessions asking for one address cost one DNS query. Positive answers live for the record
//! TTL, negative ones for the zone's SOA negative TTL, both capped at `[dns] cache_ttl`; error
//! codes and temporary failures for `TEMPFAIL_TTL` (30 s) at most.
//!
//! **Zone health** (`health`): at start and every health interval each configured zone's test
//! points are queried (127.0.0.2 must be listed, 127.0.0.1 must not). A zone answering them
//! wrongly (typically a public resolver blocked by the list) is set aside, logged once, and
//! answered [`DnsblAnswer::SetAside`] without a query until it answers right again.
//!
//! **Lifecycle**: [`Resolver::start`] reads resolv.conf (when `[dns] servers` is empty), spawns
//! the thread and waits until hickory is built. Dropping the [`Resolver`] (or
//! [`Resolver::stop`]) ends the thread, waiting at most [`STOP_WAIT`]; handles still alive then
//! answer `TempFail` at once. Lookups in flight at that moment are dropped and their waiters
//! get `TempFail`.
//!
//! What it never does: block a worker (every worker-side call is a map access and a
//! non-blocking channel push), or let a hickory type out of this module.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mio::Waker;
use tokio::sync::{mpsc, oneshot};

use crate::config;
use crate::side_thread::{self, LogEvery, Outboxes, Running};
use crate::smtp::question::{DnsblAnswer, LookupAnswer, Query, RdnsAnswer};

mod cache;
mod health;
mod lookup;
mod thread;

use cache::{Cache, Cached};
use health::Zones;

/// Most lookups (one DNSBL query, or one PTR plus its forward confirmations) running at once on
/// the resolver thread. Each holds a UDP socket (hickory binds one per query for source-port
/// randomisation) and a little memory; 512 keeps descriptors modest while a 2 s timeout still
/// allows over 250 lookups per second with every server silent, far more when they answer.
const MAX_IN_FLIGHT: usize = 512;

/// Requests that may wait for a lookup slot. Past this the resolver is behind by more than
/// about a timeout's worth of lookups, and a new request is answered `TempFail` at once rather
/// than queued for an answer that would come too late to matter.
const REQUEST_QUEUE: usize = 2048;

/// Most cache slots kept when an answer is stored. An entry is ~150 bytes with the map's
/// overhead, so the cap bounds the cache near 30 MB; when over it, expired answers are swept
/// and, if still over, new answers are delivered but not cached. (Lookups in flight are bounded
/// apart: by [`MAX_IN_FLIGHT`] plus [`REQUEST_QUEUE`].)
const MAX_ENTRIES: usize = 200_000;

/// Most PTR names forward-confirmed per address: real hosts have one or two; a PTR set of
/// hundreds (seen in the wild) must not turn one client into hundreds of queries.
const MAX_PTR_NAMES: usize = 4;

/// Longest a `TempFail` or an error-code answer is cached. Short, since both describe the
/// path to the zone rather than the client, yet long enough that a reconnecting spambot does
/// not hammer a failing resolver with the same query.
const TEMPFAIL_TTL: Duration = Duration::from_secs(30);

/// How long [`Resolver::start`] waits for the thread to build its runtime and resolver.
const START_WAIT: Duration = Duration::from_secs(10);

/// How long stopping waits for the thread before detaching it, so a wedged resolver never
/// holds up the process's exit.
pub const STOP_WAIT: Duration = Duration::from_secs(2);

/// At most one "resolver overloaded" warning per this interval: under overload it would
/// otherwise be logged once per connection.
const OVERLOAD_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Who waits for an answer: a worker (the index [`Resolver::add_worker`] gave it) and an
/// opaque key the worker uses to find the connection (a generation-tagged slab key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter {
    /// The worker's index.
    pub worker: usize,
    /// The connection's key in that worker.
    pub key: u64,
}

/// An answer for a waiter, read by its worker from its [`Inbox`] after a wake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The waiter's key.
    pub key: u64,
    /// The query answered.
    pub query: Query,
    /// The answer.
    pub answer: LookupAnswer,
}

/// A worker's receiving end: one wake per burst of answers (see `side_thread`).
pub type Inbox = side_thread::Inbox<Delivery>;

/// One configured zone's health, for logs, metrics and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneHealth {
    /// The zone, as configured.
    pub zone: Arc<str>,
    /// The zone answered its test points wrongly at the last conclusive check: lookups in it
    /// answer [`DnsblAnswer::SetAside`] without a query.
    pub set_aside: bool,
    /// Lookups answered `SetAside` since start (the clients not checked against this zone).
    pub skipped: u64,
    /// Health checks finished since start, conclusive or not: a test can wait for the first.
    pub checks: u64,
}

/// Counters since start, for the bench and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// DNS lookups made for [`ResolverHandle::lookup`] requests: one per name and type
    /// (an rDNS request is a PTR plus its forward lookups); hickory's UDP retransmissions of
    /// one lookup are not counted.
    pub queries_sent: u64,
    /// Lookups answered from the cache.
    pub cache_hits: u64,
    /// Lookups that joined one already in flight for the same query.
    pub merged: u64,
    /// Lookups answered `TempFail` because the resolver was behind (queue full, or the
    /// request waited longer than the timeout for a slot).
    pub overloaded: u64,
    /// DNS lookups made by zone health checks.
    pub health_queries: u64,
    /// Cache slots now in use (answers, fresh or not yet swept, and lookups in flight): the
    /// cache's memory, bounded by an internal cap of 200 000.
    pub cache_entries: u64,
}

/// The resolver thread's owner: stops it when dropped.
#[derive(Debug)]
pub struct Resolver {
    handle: ResolverHandle,
    thread: Running,
}

/// A cheap, cloneable handle for lookups.
#[derive(Clone)]
pub struct ResolverHandle {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
}

impl Resolver {
    /// Starts the resolver thread for `dns`; `zones` get their test points checked at once and
    /// then every `dns.health_interval`.
    ///
    /// Errors: resolv.conf unreadable or without nameservers (when `dns.servers` is empty), or
    /// the thread, its runtime or the resolver could not be set up.
    pub fn start(dns: &config::Dns, zones: &[config::Dnsbl]) -> io::Result<Resolver> {
        let name_servers = thread::name_servers(dns)?;
        // Built here so a failure is an error of `start`; it only runs on the thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let shared = Arc::new(Shared::new(zones));
        let (requests, request_rx) = mpsc::channel(REQUEST_QUEUE);
        let (stop, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let settings = thread::Settings {
            name_servers,
            timeout: dns.timeout,
            cache_ttl: dns.cache_ttl,
            health_interval: dns.health_interval,
        };
        let thread_shared = Arc::clone(&shared);
        let run = move || {
            // The runtime (its tasks with it) is dropped before the thread reports its end.
            runtime.block_on(thread::run(
                settings,
                thread_shared,
                request_rx,
                stop_rx,
                ready_tx,
            ));
        };
        // Dropping the sender is the signal; the thread also ends if it is already gone.
        let signal = move || drop(stop);
        let what = "dns: the resolver thread";
        let thread = side_thread::spawn("tarmac-dns", what, STOP_WAIT, run, signal)?;
        let resolver = Resolver {
            handle: ResolverHandle { shared, requests },
            thread,
        };
        match ready_rx.recv_timeout(START_WAIT) {
            Ok(Ok(())) => Ok(resolver),
            Ok(Err(message)) => {
                resolver.stop();
                Err(io::Error::other(format!("dns: resolver: {message}")))
            }
            Err(_) => {
                resolver.stop();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "dns: the resolver thread did not start",
                ))
            }
        }
    }

    /// Registers a worker: answers for it go to the returned inbox, followed by a wake.
    pub fn add_worker(&mut self, waker: Arc<Waker>) -> (usize, Inbox) {
        self.handle.shared.workers.add(waker)
    }

    /// Stops the thread, waiting at most [`STOP_WAIT`] (then it is left to end on its own).
    /// The same happens on drop; this names the moment.
    pub fn stop(mut self) {
        self.thread.stop();
    }

    /// A handle for lookups.
    pub fn handle(&self) -> ResolverHandle {
        self.handle.clone()
    }
}

impl ResolverHandle {
    /// Answers at once from the cache (or `SetAside`, or `TempFail` when overloaded), else
    /// queues the lookup (merged with one in flight) and returns `None`: the answer comes to
    /// the waiter's inbox.
    pub fn lookup(&self, query: &Query, waiter: Waiter) -> Option<LookupAnswer> {
        let shared = &*self.shared;
        if let Query::Dnsbl { zone, .. } = query {
            if shared.zones.skip_if_set_aside(zone) {
                return Some(LookupAnswer::Dnsbl(DnsblAnswer::SetAside));
            }
        }
        let now = Instant::now();
        let mut full = false;
        let cached = shared.cache.lookup(query, waiter, now, || {
            let request = Request {
                query: query.clone(),
                asked_at: now,
            };
            match self.requests.try_send(request) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    full = true;
                    false
                }
                // The thread has stopped: the process is shutting down.
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        match cached {
            Cached::Hit(answer) => {
                shared.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                Some(answer)
            }
            Cached::Joined => {
                shared.stats.merged.fetch_add(1, Ordering::Relaxed);
                None
            }
            Cached::Sent => None,
            Cached::NotSent => {
                if full {
                    shared.note_overload(now);
                }
                Some(LookupAnswer::temp_fail(query))
            }
        }
    }

    /// A reload's zones: those already known keep their health and figures, and every zone's
    /// test points are queried at once (DESIGN.md: "at start and reload").
    pub fn set_zones(&self, zones: &[config::Dnsbl]) {
        self.shared.zones.replace(zones);
        self.shared.recheck.notify_one();
    }

    /// Each configured zone's health, in configuration order.
    pub fn zone_health(&self) -> Vec<ZoneHealth> {
        self.shared.zones.report()
    }

    /// The counters since start.
    pub fn stats(&self) -> DnsStats {
        let stats = &self.shared.stats;
        DnsStats {
            queries_sent: stats.queries_sent.load(Ordering::Relaxed),
            cache_hits: stats.cache_hits.load(Ordering::Relaxed),
            merged: stats.merged.load(Ordering::Relaxed),
            overloaded: stats.overloaded.load(Ordering::Relaxed),
            health_queries: stats.health_queries.load(Ordering::Relaxed),
            cache_entries: u64::try_from(self.shared.cache.len()).unwrap_or(u64::MAX),
        }
    }
}

impl fmt::Debug for ResolverHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolverHandle")
            .field("zones", &self.shared.zones.report())
            .field("stats", &self.stats())
            .finish()
    }
}

/// A lookup for the resolver thread.
#[derive(Debug)]
struct Request {
    query: Query,
    /// When the worker asked: the lookup must be answered within `[dns] timeout` of this,
    /// time spent queued included.
    asked_at: Instant,
}

/// What the workers and the resolver thread share.
struct Shared {
    cache: Cache,
    zones: Zones,
    /// Signalled by [`ResolverHandle::set_zones`]: check the zones now.
    recheck: tokio::sync::Notify,
    stats: Stats,
    /// Registered by [`Resolver::add_worker`], indexed by [`Waiter::worker`].
    workers: Outboxes<Delivery>,
    /// Rate limit of the overload warning.
    overload_warning: LogEvery,
}

/// The counters behind [`DnsStats`].
#[derive(Default)]
struct Stats {
    queries_sent: AtomicU64,
    cache_hits: AtomicU64,
    merged: AtomicU64,
    overloaded: AtomicU64,
    health_queries: AtomicU64,
}

impl Shared {
    fn new(zones: &[config::Dnsbl]) -> Shared {
        Shared {
            cache: Cache::new(MAX_ENTRIES),
            zones: Zones::new(zones),
            recheck: tokio::sync::Notify::new(),
            stats: Stats::default(),
            workers: Outboxes::default(),
            overload_warning: LogEvery::new(OVERLOAD_LOG_INTERVAL),
        }
    }

    /// Counts an overloaded request and warns, at most once per [`OVERLOAD_LOG_INTERVAL`].
    fn note_overload(&self, now: Instant) {
        self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
        if self.overload_warning.allows(now) {
            log::warn!(
                "dns: resolver overloaded ({MAX_IN_FLIGHT} lookups in flight, {REQUEST_QUEUE} \
                 queued): answering TempFail at once ({} so far); the DNS servers are slow or \
                 the connection rate is beyond this resolver",
                self.stats.overloaded.load(Ordering::Relaxed)
            );
        }
    }

    /// Stores the answer for `query` (until `valid_until`, if any) and hands it to every waiter.
    fn complete(&self, query: &Query, answer: &LookupAnswer, valid_until: Option<Instant>) {
        let waiters = self
            .cache
            .complete(query, answer, valid_until, Instant::now());
        self.deliver(query, answer, waiters);
    }

    /// Sends one [`Delivery`] per waiter and wakes each worker once.
    fn deliver(&self, query: &Query, answer: &LookupAnswer, mut waiters: Vec<Waiter>) {
        if waiters.is_empty() {
            return;
        }
        waiters.sort_unstable_by_key(|waiter| waiter.worker);
        let workers = self.workers.read();
        for group in waiters.chunk_by(|a, b| a.worker == b.worker) {
            let Some(worker) = group.first().map(|waiter| waiter.worker) else {
                continue;
            };
            let Some(out) = workers.get(worker) else {
                log::debug!("dns: answer for unknown worker {worker} dropped");
                continue;
            };
            let mut sent = false;
            for waiter in group {
                let delivery = Delivery {
                    key: waiter.key,
                    query: query.clone(),
                    answer: answer.clone(),
                };
                // Not sent: the worker has gone (shutting down), nothing to do.
                sent |= out.send(delivery);
            }
            if !sent {
                continue;
            }
            if let Err(err) = out.wake() {
                log::warn!("dns: waking worker {worker}: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_warning_is_rate_limited_but_counted() {
        let shared = Shared::new(&[]);
        let t0 = Instant::now();
        shared.note_overload(t0);
        // The first warning went out: another within the interval may not.
        assert!(!shared.overload_warning.allows(t0 + Duration::from_secs(1)));
        shared.note_overload(t0 + Duration::from_secs(1));
        assert_eq!(shared.stats.overloaded.load(Ordering::Relaxed), 2);
    }
}
