//! The runtime: the only module that does I/O on client sockets (DESIGN.md §5).
//!
//! Threads: `[server] workers` event loops (`worker.rs`), each with its own listener socket per
//! listen address (SO_REUSEPORT, so the kernel spreads connections over them), its own
//! connection slab and timer heap; plus, under [`run`], one thread waiting for signals, and the
//! resolver and state (Redis) threads when the config needs them. Workers share the connection
//! limits and rate buckets (`limits.rs`), the state front (`state::Store`) and a stop flag; each
//! has a `mio::Waker` so another thread can make it look at the flag or its inboxes.
//!
//! Life of a connection:
//! 1. **Accept** (`Worker::accept`): until `WouldBlock`, a bounded number per turn.
//!    `policy::admission` decides how the connection is counted
//!    (allow-listed, a balancer's, rated now or by the shared store) and whether its session
//!    offers STARTTLS; the worker carries it out. Over its
//!    connection rates (per address, per /24 or /64; [`ConnectionRates`] decides),
//!    `max_connections` or `max_connections_per_ip` the client gets `421 4.7.0 <hostname> Too
//!    many connections, try again later` and is closed without a session. Otherwise a
//!    [`Session`](crate::smtp::Session) is created and the socket registered once for
//!    `READABLE | WRITABLE`. With the rates in Redis the session is created at once and asks
//!    (`Action::Admit`); the answer starts its checks or refuses it with the same `421`.
//! 2. **Drive** (`Conn::drive`): after every event or timer, one bounded read per socket feeds
//!    the session, then output, actions (downstream connect and close, the switch to TLS after
//!    STARTTLS, close) and writes go round until nothing moves, and the connection's deadline is
//!    re-armed.
//! 3. **Close**, in two steps: the connection is marked closing (the session's `Action::Close`,
//!    the client gone after the session ended, a socket error) and flushes what was handed out,
//!    for at most 5 s (`conn.rs`); after the event batch it is deregistered, shut
//!    down and freed, its limit slot released and its one log line written (`close_log.rs`).
//!
//! Shutdown ([`ServerHandle::shutdown`]): every worker closes its listeners at once (new
//! connects are refused), tells each session `Shutdown::Graceful`, after `[timeouts] drain`
//! `Shutdown::Now`, and exits when its last connection is gone; then [`ServerHandle::join`]
//! saves the state (`state::snapshots`), which was loaded before the first accept and is saved
//! every minute meanwhile.
//!
//! Metrics (`[metrics] listen`, `crate::metrics`): each worker gets counters only it writes;
//! the metrics thread, started before the workers and stopped after them, sums them at each
//! scrape and reads the gauges (open connections, tarpit places, stress, the resolver's
//! figures) from what the workers share.
//!
//! Nothing here decides policy: every protocol decision is the session's.

mod close_log;
mod conn;
mod fds;
mod leg;
mod limits;
mod load;
mod notify;
mod reload;
mod shared;
mod slab;
mod timer;
mod tls_failures;
mod tls_stream;
mod token;
mod worker;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use mio::Waker;
use rustix::thread::CapabilitySet;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use socket2::{Domain, Protocol, Socket, Type};

use self::limits::Limits;
use self::load::Load;
use self::reload::Reloads;
use self::shared::Shared;
use self::tls_failures::TlsFailures;
use self::worker::{Bound, Worker};
use crate::config::{Config, StateBackend};
use crate::content::scanner::Scanner;
use crate::dns::{Resolver, ResolverHandle};
use crate::downstream::connect::transparent_socket;
use crate::downstream::health::Health;
use crate::metrics::{Gauges, Metrics, MetricsServer, WorkerCounters};
use crate::policy::ConnectionRates;
use crate::privileges::{self, Account};
use crate::state::redis::RedisState;
use crate::state::snapshots::{self, Saver, Snapshots, Tables};
use crate::state::{Greylist, Local, PassCache, ReputationTable, Store, StoreStats};

/// Pending connections the kernel queues per listener socket before refusing more.
const LISTEN_BACKLOG: i32 = 1024;

/// A running server: its worker threads and the means to stop them.
#[derive(Debug)]
pub struct ServerHandle {
    control: Arc<Control>,
    local_addrs: Vec<SocketAddr>,
    /// The `[transparent] listen` addresses, with real ports.
    transparent_addrs: Vec<SocketAddr>,
    workers: Vec<JoinHandle<io::Result<()>>>,
    /// The resolver thread, when the config needs lookups; stopped after the workers.
    resolver: Option<Resolver>,
    /// Where the state is saved, unless `state_dir` is unusable or the backend is not local.
    snapshots: Option<Arc<Snapshots>>,
    /// The thread saving the state every minute; stopped after the workers, before the
    /// final save.
    saver: Option<Saver>,
    /// The state thread, with `[state] backend = "redis"`; stopped after the workers.
    redis: Option<RedisState>,
    /// The workers' state front, for its figures.
    store: Arc<Store>,
    /// The scanner thread (`[content]`); stopped after the workers.
    scanner: Option<Scanner>,
    /// The metrics endpoint (`[metrics] listen`); stopped after the workers.
    metrics: Option<MetricsServer>,
}

/// What another thread needs to stop the workers.
#[derive(Debug)]
struct Control {
    stopping: Arc<AtomicBool>,
    wakers: Vec<Arc<Waker>>,
    limits: Arc<Limits>,
    drain: Duration,
    reloads: Arc<Reloads>,
    /// The resolver, for a reload's zones.
    resolver: Option<ResolverHandle>,
}

impl ServerHandle {
    /// Binds every `[server] listen` address once per worker, loads the saved state from
    /// `[server] state_dir` (an unusable directory or a damaged file is a warning, never an
    /// error) and starts the workers. A port 0 is bound by the first worker and the others
    /// join the port the kernel chose. Errors (an address in use, no permission) name the
    /// address and leave nothing running.
    pub fn start(config: Arc<Config>) -> io::Result<ServerHandle> {
        // Before any socket: the cap below is about the limit the whole run has.
        let nofile = fds::raise_nofile();
        let (max_connections, warning) = fds::cap_connections(&config, nofile.now);
        if let Some(warning) = warning {
            log::warn!("{warning}");
        }
        let workers = config.server.workers.max(1);
        let mut sockets: Vec<Vec<Bound>> = (0..workers).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::with_capacity(config.server.listen.len());
        let mut transparent_addrs = Vec::with_capacity(config.transparent.listen.len());
        let plain = config.server.listen.iter().map(|&addr| (addr, false));
        let transparent = config.transparent.listen.iter().map(|&addr| (addr, true));
        for (addr, transparent) in plain.chain(transparent) {
            let mut real = addr;
            for (n, worker_sockets) in sockets.iter_mut().enumerate() {
                let socket = bind(real, transparent).map_err(|e| {
                    let which = if transparent { "[transparent] " } else { "" };
                    io::Error::new(e.kind(), format!("listen on {which}{addr}: {e}"))
                })?;
                if n == 0 {
                    real = socket.local_addr()?;
                    if transparent {
                        transparent_addrs.push(real);
                    } else {
                        local_addrs.push(real);
                    }
                }
                worker_sockets.push(Bound {
                    socket,
                    transparent,
                });
            }
        }
        // Every thread below (state, resolver, scanner, saver, workers) starts as the user.
        drop_privileges(&config)?;
        check_spoofing(&config)?;

        let stopping = Arc::new(AtomicBool::new(false));
        let rates = Arc::new(ConnectionRates::new(
            config.limits.connection_rate_per_ip,
            config.limits.connection_rate_per_subnet,
        ));
        let limits = Arc::new(Limits::new(
            max_connections,
            config.limits.max_connections_per_ip,
            config.limits.max_connections_per_subnet,
            Arc::clone(&rates),
        ));
        let tables = Tables {
            passes: Arc::new(PassCache::new(config.tarpit.pass_ttl)),
            greylist: Arc::new(Greylist::new(std::time::Instant::now())),
            reputation: Arc::new(ReputationTable::new()),
        };
        let local = Arc::new(Local::new(
            Arc::clone(&tables.passes),
            Arc::clone(&tables.greylist),
            Arc::clone(&tables.reputation),
            rates,
        ));
        let mut redis = match config.state.backend {
            StateBackend::Redis => Some(RedisState::start(&config, Arc::clone(&local))?),
            StateBackend::Local => None,
        };
        let store = Arc::new(Store::new(local, redis.as_ref().map(RedisState::handle)));
        let mut resolver = if config.dns.rdns || !config.dnsbl.is_empty() {
            Some(Resolver::start(&config.dns, &config.dnsbl)?)
        } else {
            None
        };
        let shared = Shared {
            limits: Arc::clone(&limits),
            load: Arc::new(Load::new(max_connections, config.server.max_tarpitted)),
            store: Arc::clone(&store),
            tls_failures: Arc::new(TlsFailures::default()),
            health: Arc::new(Health::new()),
            stopping: Arc::clone(&stopping),
            reloads: Arc::new(Reloads::new(Arc::clone(&config))),
            transparent_listeners: transparent_addrs.iter().copied().collect(),
            spoof_source: spoofs_source(&config),
        };
        let reloads = Arc::clone(&shared.reloads);
        let current = Box::new(move || reloads.current());
        let snapshots = Snapshots::open(&config, tables, current).map(Arc::new);
        if let Some(snapshots) = &snapshots {
            snapshots.load(&snapshots::clocks_now());
        }
        prepare_spool(&config);
        // Started whatever the configuration says: a reload may turn scanning on. Without it
        // (no thread could be made) every scan counts as a failed scanner.
        let mut scanner = Scanner::start()
            .inspect_err(|e| log::warn!("content: no scanner thread ({e}); scans will fail"))
            .ok();
        // Only with `[metrics] listen`: without it nothing is counted at all.
        let counters: Vec<Arc<WorkerCounters>> = match config.metrics.listen {
            Some(_) => (0..workers)
                .map(|_| Arc::new(WorkerCounters::new()))
                .collect(),
            None => Vec::new(),
        };
        let mut built = Vec::with_capacity(workers);
        let mut wakers = Vec::with_capacity(workers);
        for (index, worker_sockets) in sockets.into_iter().enumerate() {
            let (mut worker, waker) = Worker::new(
                index,
                workers,
                worker_sockets,
                Arc::clone(&config),
                shared.clone(),
            )?;
            if let Some(resolver) = resolver.as_mut() {
                let (id, inbox) = resolver.add_worker(Arc::clone(&waker));
                worker.attach_resolver(resolver.handle(), id, inbox);
            }
            if let Some(redis) = redis.as_mut() {
                let (id, inbox) = redis.add_worker(Arc::clone(&waker));
                worker.attach_state(id, inbox);
            }
            if let Some(scanner) = scanner.as_mut() {
                let (id, inbox) = scanner.add_worker(Arc::clone(&waker));
                worker.attach_scanner(scanner.handle(), id, inbox);
            }
            if let Some(counters) = counters.get(index) {
                worker.attach_metrics(Arc::clone(counters));
            }
            built.push(worker);
            wakers.push(waker);
        }
        let control = Arc::new(Control {
            stopping,
            wakers,
            limits,
            drain: config.timeouts.drain,
            reloads: Arc::clone(&shared.reloads),
            resolver: resolver.as_ref().map(Resolver::handle),
        });

        let metrics = match config.metrics.listen {
            Some(addr) => {
                let gauges = gauges(&shared, resolver.as_ref().map(Resolver::handle));
                Some(MetricsServer::start(addr, Metrics::new(counters, gauges))?)
            }
            None => None,
        };
        let saver = snapshots.as_ref().and_then(|snapshots| {
            Saver::start(Arc::clone(snapshots), snapshots::SAVE_EVERY)
                .inspect_err(|e| {
                    log::warn!("state: no periodic snapshots ({e}); saved at shutdown only");
                })
                .ok()
        });
        let mut handle = ServerHandle {
            control,
            local_addrs,
            transparent_addrs,
            workers: Vec::with_capacity(workers),
            resolver,
            snapshots,
            saver,
            redis,
            store,
            scanner,
            metrics,
        };
        for (index, worker) in built.into_iter().enumerate() {
            let spawned = thread::Builder::new()
                .name(format!("tarmac-worker-{index}"))
                .spawn(move || worker.run());
            match spawned {
                Ok(thread) => handle.workers.push(thread),
                Err(e) => {
                    // The workers already running hold no connections yet: stop them.
                    handle.shutdown();
                    let _ = handle.join();
                    return Err(e);
                }
            }
        }
        Ok(handle)
    }

    /// The resolver the workers use, when the config needs lookups: its zone health and
    /// figures, for operators (logs, later metrics) and tests.
    pub fn resolver(&self) -> Option<ResolverHandle> {
        self.resolver.as_ref().map(Resolver::handle)
    }

    /// The state backend's figures: whether Redis is connected, answers from it and from the
    /// local fallback (all zero with `backend = "local"`).
    pub fn store_stats(&self) -> StoreStats {
        self.store.stats()
    }

    /// Puts `config` in force (see `reload.rs`): new connections use it at once, live sessions
    /// from their next decision. Returns the changed keys that wait for a restart.
    pub fn reload(&self, config: Arc<Config>) -> Vec<&'static str> {
        self.control.reload(config)
    }

    /// Where `/metrics` is served (`[metrics] listen`, with the real port where it said 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// The addresses listened on, with the real port where the config said 0.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.local_addrs.clone()
    }

    /// The transparent listeners' addresses (`[transparent] listen`), with real ports.
    pub fn transparent_addrs(&self) -> Vec<SocketAddr> {
        self.transparent_addrs.clone()
    }

    /// Graceful stop, callable from any thread and more than once: the workers close their
    /// listeners at once, let sessions finish for up to `[timeouts] drain`, then end them with
    /// `421 4.3.2`; [`ServerHandle::join`] returns when the last connection is gone.
    pub fn shutdown(&self) {
        self.control.shutdown();
    }

    /// Waits for every worker to exit, then saves the state (see `state::snapshots`); the first
    /// worker error (a failing poll) is returned.
    pub fn join(mut self) -> io::Result<()> {
        let resolver = self.resolver.take();
        let saver = self.saver.take();
        let snapshots = self.snapshots.take();
        let redis = self.redis.take();
        let scanner = self.scanner.take();
        let metrics = self.metrics.take();
        let mut result = Ok(());
        for thread in self.workers {
            let outcome = thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a worker thread panicked")));
            if let Err(e) = outcome {
                log::error!("worker failed: {e}");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        // No worker is left to ask them anything, or to count.
        if let Some(metrics) = metrics {
            metrics.stop();
        }
        drop(resolver);
        drop(scanner);
        // No session is left to change the state: the last save has everything.
        if let Some(saver) = saver {
            saver.stop();
        }
        if let Some(snapshots) = snapshots
            && snapshots.save(&snapshots::clocks_now())
        {
            log::info!("state: saved to {}", snapshots.dir().display());
        }
        drop(redis);
        result
    }
}

impl Control {
    fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        self.wake_workers();
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn reload(&self, config: Arc<Config>) -> Vec<&'static str> {
        let waiting =
            reload::restart_only_changes(&self.reloads.current(), &config, self.resolver.is_some());
        if let Some(resolver) = &self.resolver {
            resolver.set_zones(&config.dnsbl);
        }
        prepare_spool(&config);
        self.reloads.publish(config);
        self.wake_workers();
        waiting
    }

    /// SIGHUP: reads the configuration file the server runs from (and every file it names)
    /// again; all valid, it is put in force; any error, the whole reload is refused with one
    /// log line and the running configuration stays.
    fn reload_from_disk(&self) {
        let current = self.reloads.current();
        let Some(path) = current.path.clone() else {
            log::warn!("SIGHUP: the built-in configuration has no file to reload from");
            return;
        };
        match Config::load(&path) {
            Err(errors) => {
                let all: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
                log::error!(
                    "reload refused ({} error{}), the running configuration stays: {}",
                    all.len(),
                    if all.len() == 1 { "" } else { "s" },
                    all.join("; ")
                );
            }
            Ok(config) => {
                let summary = format!(
                    "reloaded {}: {} DNS zone(s), {} allow and {} deny list entries, STARTTLS {}",
                    path.display(),
                    config.dnsbl.len(),
                    config.lists.entries.allow.len(),
                    config.lists.entries.deny.len(),
                    if config.tls.loaded.is_some() {
                        "offered with the certificate just read"
                    } else {
                        "off"
                    }
                );
                let waiting = self.reload(Arc::new(config));
                if waiting.is_empty() {
                    log::info!("{summary}");
                } else {
                    log::warn!(
                        "{summary}; changes to {} take effect at the next restart",
                        waiting.join(", ")
                    );
                }
            }
        }
    }

    fn wake_workers(&self) {
        for waker in &self.wakers {
            if let Err(e) = waker.wake() {
                log::error!("cannot wake a worker: {e}");
            }
        }
    }
}

/// Serves until SIGTERM or SIGINT, then drains and returns `Ok` once every connection is closed.
/// SIGHUP reloads the configuration from its file (see `reload.rs`). Under systemd
/// (`NOTIFY_SOCKET`), readiness, reloads and the drain are announced (see `notify.rs`).
pub fn run(config: Arc<Config>) -> io::Result<()> {
    // Registered before the workers start, so an early SIGTERM is a clean stop, not a kill.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let signals_handle = signals.handle();
    let notifier = notify::Notifier::from_env();
    let handle = ServerHandle::start(config)?;
    let addrs: Vec<String> = handle
        .local_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    for addr in &addrs {
        log::info!("listening on {addr}");
    }
    for addr in handle.transparent_addrs() {
        log::info!("listening on {addr} (transparent)");
    }
    if let Some(addr) = handle.metrics_addr() {
        log::info!("metrics at http://{addr}/metrics");
    }
    let status = format!("listening on {}", addrs.join(", "));
    notifier.ready(&status);
    let control = Arc::clone(&handle.control);
    let signal_thread = thread::Builder::new()
        .name("tarmac-signals".to_owned())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    notifier.reloading();
                    control.reload_from_disk();
                    notifier.reloaded(&status);
                } else if control.is_stopping() {
                    log::info!("already shutting down");
                } else {
                    log::info!(
                        "shutting down: draining {} connections for up to {}s",
                        control.limits.open(),
                        control.drain.as_secs_f64()
                    );
                    notifier.stopping();
                    control.shutdown();
                }
            }
        });
    let signal_thread = match signal_thread {
        Ok(thread) => thread,
        Err(e) => {
            handle.shutdown();
            let _ = handle.join();
            return Err(e);
        }
    };
    let result = handle.join();
    signals_handle.close();
    let _ = signal_thread.join();
    result
}

/// What a scrape reads besides the workers' counters: open connections, tarpit places,
/// stress mode and the downstream servers' health from what the workers share, and the
/// resolver's figures when one runs.
fn gauges(
    shared: &Shared,
    resolver: Option<ResolverHandle>,
) -> Box<dyn Fn() -> Gauges + Send + Sync> {
    let limits = Arc::clone(&shared.limits);
    let load = Arc::clone(&shared.load);
    let health = Arc::clone(&shared.health);
    let reloads = Arc::clone(&shared.reloads);
    Box::new(move || {
        let open = limits.open();
        Gauges {
            open,
            tarpitted: load.tarpitted(),
            stressed: load.is_stressed(open),
            dns: resolver
                .as_ref()
                .map(|resolver| (resolver.stats(), resolver.zone_health())),
            downstream: health.snapshot(&reloads.current().downstream.servers),
        }
    })
}

/// One nonblocking listener socket for `addr`, sharable with the other workers' sockets for the
/// same address. IPv6 sockets are IPv6-only, so `[::]:25` and `0.0.0.0:25` can both be listed.
/// A `transparent` one has `IP_TRANSPARENT`, so a TPROXY rule can hand it connections for
/// any address (DESIGN.md §9); without `CAP_NET_ADMIN` that is an error naming it, never a
/// plain listener instead.
fn bind(addr: SocketAddr, transparent: bool) -> io::Result<mio::net::TcpListener> {
    let socket = if transparent {
        transparent_socket(addr)?
    } else {
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?
    };
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux and the BSDs copy it into
    // the new socket), which saves a setsockopt per connection. Replies are small and a
    // stuttering tarpit sends single bytes: Nagle would only delay or merge them.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

/// `[transparent] spoof_source`: every downstream connection needs `IP_TRANSPARENT`, so the
/// capability is checked once at start, after the drop, rather than failing each client's MAIL.
fn check_spoofing(config: &Config) -> io::Result<()> {
    if !spoofs_source(config) {
        return Ok(());
    }
    for &addr in &config.transparent.listen {
        transparent_socket(addr).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("[transparent] spoof_source = true, but a downstream connection: {e}"),
            )
        })?;
    }
    Ok(())
}

/// Whether downstream connections are made from the clients' addresses.
fn spoofs_source(config: &Config) -> bool {
    config.transparent.spoof_source && !config.transparent.listen.is_empty()
}

/// `[server] user` (DESIGN.md §8): with the listeners bound, gives `state_dir` to the user and
/// becomes it, before any thread starts (see `privileges`). With `spoof_source`, the user keeps
/// `CAP_NET_ADMIN` and nothing else (DESIGN.md §9). Without a user, running as root is a
/// warning; started as the user already (unprivileged with `CAP_NET_BIND_SERVICE`, plus
/// `CAP_NET_ADMIN` for transparent mode), there is nothing to do.
fn drop_privileges(config: &Config) -> io::Result<()> {
    let server = &config.server;
    if server.user.is_empty() {
        if privileges::running_as_root() {
            log::warn!(
                "running as root without [server] user: the threads serving clients keep \
                 root's rights; set user (e.g. \"tarmac\") or start unprivileged with \
                 CAP_NET_BIND_SERVICE"
            );
        }
        return Ok(());
    }
    let account = Account::lookup(&server.user, &server.group)
        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, format!("[server] user: {e}")))?;
    if account.is_current() {
        log::info!("running as user {} already", account.user);
        return Ok(());
    }
    if !privileges::running_as_root() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "[server] user = {:?}: only root can become another user; start tarmac as \
                 root, or as that user with CAP_NET_BIND_SERVICE",
                account.user
            ),
        ));
    }
    if let Err(e) = account.own_state_dir(&server.state_dir) {
        log::warn!(
            "state: cannot give state_dir {} to user {}: {e}",
            server.state_dir.display(),
            account.user
        );
    }
    let keep = if spoofs_source(config) {
        CapabilitySet::NET_ADMIN
    } else {
        CapabilitySet::empty()
    };
    account.become_it(keep)?;
    log::info!(
        "privileges dropped: running as user {} (uid {}, gid {}, groups {:?}){}",
        account.user,
        account.uid,
        account.gid,
        account.groups,
        if keep.is_empty() {
            ""
        } else {
            ", keeping CAP_NET_ADMIN for [transparent] spoof_source"
        }
    );
    Ok(())
}

/// Makes `state_dir/spool` (0700) when scanners are configured, so the first message over
/// `spool_after` finds it; a failure is logged, and such messages get `451` until it is fixed.
fn prepare_spool(config: &Config) {
    if config.content.scans()
        && let Err(e) = crate::content::held::spool_dir(&config.server.state_dir)
    {
        log::warn!(
            "content: cannot make {}/spool ({e}); messages over spool_after get 451",
            config.server.state_dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpStream};
    use std::time::Duration;

    use mio::{Events, Interest, Poll, Token};

    use super::*;

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let mut listener = bind((Ipv4Addr::LOCALHOST, 0).into(), false).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut poll = Poll::new().unwrap();
        poll.registry()
            .register(&mut listener, Token(0), Interest::READABLE)
            .unwrap();
        let _client = TcpStream::connect(addr).unwrap();
        let mut events = Events::with_capacity(1);
        let accepted = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll.poll(&mut events, Some(Duration::from_secs(5)))
                        .unwrap();
                    assert!(!events.is_empty(), "no connection within 5 s");
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert!(accepted.nodelay().unwrap());
    }
}
