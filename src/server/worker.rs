//! One worker: a mio event loop on its own thread with its own listeners (SO_REUSEPORT: the
//! kernel spreads new connections over the workers), connection slab and timer heap. Workers
//! share the connection limits (rate buckets included), the state front and the stop flag.
//!
//! A turn: poll (zero timeout when work was left over, else until the earliest deadline); note
//! readiness from the events; on the waker, start shutting down if asked and hand out the
//! answers in the DNS and state inboxes; fire expired timers;
//! accept; sweep the rate buckets when due; drive every connection that was ready or touched,
//! the ones left over from the last turn first; close the connections that finished.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Waker};

use super::close_log::ConnId;
use super::conn::{CLOSE_FLUSH_LIMIT, Conn, DownstreamPool, Io, Next, READ_CHUNK};
use super::leg::Leg;
use super::shared::Shared;
use super::slab::{ConnKey, Slab};
use super::timer::TimerHeap;
use super::tls_failures;
use super::token::{self, Source};
use crate::config::{Config, DownstreamMode};
use crate::content::scanner::{ScanAnswer, ScannerHandle};
use crate::dns::{Inbox, ResolverHandle};
use crate::metrics::{Refused, WorkerCounters};
use crate::policy::admission::{self, StartTls};
use crate::policy::transparent::is_this_host;
use crate::side_thread::Inbox as SideInbox;
use crate::smtp::{Peer, Reply, Session, Shutdown, loop_refusal, too_many_connections};
use crate::state::redis::Inbox as StateInbox;

/// Events taken from the kernel per poll; more wait for the next turn.
const EVENTS_PER_TURN: usize = 1024;

/// Connections accepted per listener per turn, so a connection flood cannot starve the
/// connections already open; a listener with more waiting keeps the next poll from blocking.
const ACCEPTS_PER_TURN: usize = 128;

/// How long accepting pauses after an accept error such as EMFILE/ENFILE: retrying at once
/// would spin, since the backlog stays readable until a descriptor frees up.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Timer-heap entries allowed per open connection before the dead ones are pruned.
const TIMER_ENTRIES_PER_CONN: usize = 2;

/// Timer-heap entries always allowed before pruning (pruning a small heap isn't worth it).
const TIMER_ENTRIES_SLACK: usize = 1024;

/// A worker, built on the starting thread (so setup errors reach `ServerHandle::start`) and then
/// moved to its own thread by [`Worker::run`].
pub(crate) struct Worker {
    index: usize,
    workers: usize,
    poll: Poll,
    listeners: Vec<Listener>,
    conns: Slab<Conn>,
    timers: TimerHeap,
    config: Arc<Config>,
    shared: Shared,
    /// Stress mode as this worker last told its sessions.
    stressed: bool,
    /// The reload generation `config` came from.
    config_generation: u64,
    scratch: Vec<u8>,
    /// Connections to drive this turn (each with `queued` set).
    pending: Vec<ConnKey>,
    /// Connections still readable after their bounded read: driven first next turn.
    ready: Vec<ConnKey>,
    /// Connections to close after the event batch.
    closing: Vec<ConnKey>,
    expired: Vec<(Instant, ConnKey)>,
    next_seq: u64,
    accept_paused_until: Option<Instant>,
    /// An accept error was logged since the last successful accept (one warning per burst).
    accept_error_logged: bool,
    phase: Phase,
    /// This worker's share of the downstream pool (`mode = "multiplexing"`).
    pool: DownstreamPool,
    /// The resolver and this worker's inbox for its answers, when the config needs lookups.
    dns: Option<WorkerDns>,
    /// This worker's inbox for the state thread's answers (`[state] backend = "redis"`).
    state: Option<WorkerState>,
    /// The scanner thread and this worker's inbox for its answers.
    scan: Option<WorkerScan>,
    /// This worker's counters, when `[metrics] listen` is set (nothing is counted otherwise).
    metrics: Option<Arc<WorkerCounters>>,
}

/// A worker's end of the scanner thread.
struct WorkerScan {
    scanner: ScannerHandle,
    /// The index the scanner thread knows this worker by.
    id: usize,
    inbox: SideInbox<ScanAnswer>,
}

/// A worker's end of the state thread.
struct WorkerState {
    /// The index the state thread knows this worker by.
    id: usize,
    inbox: StateInbox,
}

/// A worker's end of the resolver thread.
struct WorkerDns {
    resolver: ResolverHandle,
    /// The index the resolver knows this worker by.
    id: usize,
    inbox: Inbox,
}

/// A listener socket as `ServerHandle::start` bound it, for one worker.
pub(crate) struct Bound {
    pub(crate) socket: TcpListener,
    /// A `[transparent] listen` socket (`IP_TRANSPARENT`): its connections relay to their
    /// original destination (DESIGN.md §9).
    pub(crate) transparent: bool,
}

struct Listener {
    socket: TcpListener,
    local: SocketAddr,
    transparent: bool,
    /// Set by events, cleared by `WouldBlock`, like a connection's flags.
    ready: bool,
}

/// Where the worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Accepting and serving.
    Running,
    /// Listeners closed, sessions told `Shutdown::Graceful`; at `until` they get
    /// `Shutdown::Now`.
    Draining { until: Instant },
    /// Sessions told `Shutdown::Now`; at `until` whatever is left is dropped.
    Forcing { until: Instant },
}

impl Worker {
    /// Sets up worker `index` of `workers` with its listeners; returns it and the waker that
    /// asks it to look at the stop flag and its DNS inbox.
    pub(crate) fn new(
        index: usize,
        workers: usize,
        sockets: Vec<Bound>,
        config: Arc<Config>,
        shared: Shared,
    ) -> io::Result<(Worker, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), token::WAKER)?);
        let mut listeners = Vec::with_capacity(sockets.len());
        for (n, bound) in sockets.into_iter().enumerate() {
            let Bound {
                mut socket,
                transparent,
            } = bound;
            poll.registry()
                .register(&mut socket, token::listener(n), Interest::READABLE)?;
            let local = socket.local_addr()?;
            listeners.push(Listener {
                socket,
                local,
                transparent,
                ready: false,
            });
        }
        let worker = Worker {
            index,
            workers,
            poll,
            listeners,
            conns: Slab::new(),
            timers: TimerHeap::new(),
            config: Arc::clone(&config),
            shared,
            stressed: false,
            config_generation: 0,
            scratch: vec![0; READ_CHUNK],
            pending: Vec::new(),
            ready: Vec::new(),
            closing: Vec::new(),
            expired: Vec::new(),
            next_seq: 0,
            accept_paused_until: None,
            accept_error_logged: false,
            phase: Phase::Running,
            pool: DownstreamPool::new(config.downstream.pool_size, workers),
            dns: None,
            state: None,
            scan: None,
            metrics: None,
        };
        Ok((worker, waker))
    }

    /// Connects the worker to the resolver: lookups go to `resolver`, answers come to `inbox`
    /// (followed by a wake), addressed to worker `id`.
    pub(crate) fn attach_resolver(&mut self, resolver: ResolverHandle, id: usize, inbox: Inbox) {
        self.dns = Some(WorkerDns {
            resolver,
            id,
            inbox,
        });
    }

    /// Connects the worker to the state thread: answers come to `inbox` (followed by a wake),
    /// addressed to worker `id`.
    pub(crate) fn attach_state(&mut self, id: usize, inbox: StateInbox) {
        self.state = Some(WorkerState { id, inbox });
    }

    /// Connects the worker to the scanner thread: scans go to `scanner`, answers come to
    /// `inbox` (followed by a wake), addressed to worker `id`.
    pub(crate) fn attach_scanner(
        &mut self,
        scanner: ScannerHandle,
        id: usize,
        inbox: SideInbox<ScanAnswer>,
    ) {
        self.scan = Some(WorkerScan { scanner, id, inbox });
    }

    /// Gives the worker its counters (`[metrics] listen`): only this worker writes them.
    pub(crate) fn attach_metrics(&mut self, counters: Arc<WorkerCounters>) {
        self.metrics = Some(counters);
    }

    /// The event loop; returns once shutdown was asked for and every connection is closed, or
    /// on a poll error (which would otherwise repeat forever).
    pub(crate) fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_PER_TURN);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.turn(Instant::now(), &events);
            if self.phase != Phase::Running && self.conns.is_empty() {
                log::debug!("worker {} done", self.index);
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        let accepting = self.phase == Phase::Running && self.accept_paused_until.is_none();
        if !self.ready.is_empty() || (accepting && self.listeners.iter().any(|l| l.ready)) {
            return Some(Duration::ZERO);
        }
        let phase_deadline = match self.phase {
            Phase::Running => None,
            Phase::Draining { until } | Phase::Forcing { until } => Some(until),
        };
        [
            self.timers.next_deadline(),
            self.accept_paused_until,
            phase_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| at.saturating_duration_since(now))
    }

    fn turn(&mut self, now: Instant, events: &Events) {
        // Left over from the last turn: first in line (their `queued` flag is still set).
        self.pending.append(&mut self.ready);
        let mut woken = false;
        for event in events {
            match token::decode(event.token()) {
                Source::Waker => woken = true,
                Source::Listener(n) => {
                    if let Some(listener) = self.listeners.get_mut(n) {
                        listener.ready = true;
                    }
                }
                Source::Conn(key, side) => {
                    // A stale generation finds nothing: the event was for a closed connection.
                    if let Some(conn) = self.conns.get_mut(key) {
                        conn.on_event(side, event);
                        queue(&mut self.pending, conn, key);
                    }
                }
            }
        }
        if woken && self.phase == Phase::Running && self.shared.stopping.load(Ordering::Acquire) {
            self.begin_shutdown(now);
        }
        if woken {
            self.take_answers(now);
            self.follow_reload(now);
        }
        self.advance_phase(now);
        self.fire_timers(now);
        self.accept(now);
        // Usually one atomic load: at most one worker a second does the sweep.
        self.shared.limits.sweep_rates(now);
        let (mut io, mut table) = self.io();
        table.drive_pending(now, &mut io);
        table.close_finished(now, &mut io);
        table.serve_pool_waiters(now, &mut io);
        self.prune_timers();
        self.follow_stress(now);
        // Only a pool in use has figures: nothing per turn for a relay or a tarpit without one.
        if let Some(metrics) = &self.metrics
            && self.config.downstream.mode == DownstreamMode::Multiplexing
        {
            let (open, idle, waiting) = self.pool.figures();
            metrics.set_pool(open, idle, waiting);
        }
    }

    /// A new configuration was published (SIGHUP): new connections get it, and live sessions
    /// apply it at their next decision.
    fn follow_reload(&mut self, now: Instant) {
        let generation = self.shared.reloads.generation();
        if generation == self.config_generation {
            return;
        }
        self.config_generation = generation;
        self.config = self.shared.reloads.current();
        for (key, conn) in self.conns.iter_mut() {
            conn.handle_reload(now, Arc::clone(&self.config));
            queue(&mut self.ready, conn, key);
        }
    }

    /// Compares stress mode with the open-connection count; on a change, logs it (once for
    /// the server) and tells this worker's sessions, whose stutter stops while it lasts.
    fn follow_stress(&mut self, now: Instant) {
        let open = self.shared.limits.open();
        let stressed = self.shared.load.is_stressed(open);
        if stressed == self.stressed {
            return;
        }
        self.stressed = stressed;
        self.shared.load.note_stress(stressed, open);
        for (key, conn) in self.conns.iter_mut() {
            conn.handle_stress(now, stressed);
            queue(&mut self.ready, conn, key);
        }
    }

    /// Stops accepting (closing the listeners, so new connects are refused) and asks every
    /// session to finish.
    fn begin_shutdown(&mut self, now: Instant) {
        for mut listener in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut listener.socket);
        }
        for (key, conn) in self.conns.iter_mut() {
            conn.handle_shutdown(now, Shutdown::Graceful);
            queue(&mut self.pending, conn, key);
        }
        self.phase = Phase::Draining {
            until: now + self.config.timeouts.drain,
        };
    }

    /// Hands every answer in the DNS, state and scanner inboxes to the connection waiting for
    /// it.
    fn take_answers(&mut self, now: Instant) {
        if let Some(dns) = &self.dns {
            while let Some(answer) = dns.inbox.try_recv() {
                deliver(&mut self.conns, &mut self.pending, answer.key, |conn| {
                    conn.handle_lookup(now, answer.query, answer.answer);
                });
            }
        }
        if let Some(state) = &self.state {
            while let Some(answer) = state.inbox.try_recv() {
                deliver(&mut self.conns, &mut self.pending, answer.key, |conn| {
                    conn.handle_state(now, answer.answer);
                });
            }
        }
        if let Some(scan) = &self.scan {
            while let Some(ScanAnswer { key, answer }) = scan.inbox.try_recv() {
                deliver(&mut self.conns, &mut self.pending, key, |conn| {
                    conn.handle_answer(now, answer);
                });
            }
        }
    }

    fn advance_phase(&mut self, now: Instant) {
        match self.phase {
            Phase::Draining { until } if now >= until => {
                for (key, conn) in self.conns.iter_mut() {
                    conn.handle_shutdown(now, Shutdown::Now);
                    queue(&mut self.pending, conn, key);
                }
                self.phase = Phase::Forcing {
                    until: now + CLOSE_FLUSH_LIMIT,
                };
            }
            Phase::Forcing { until } if now >= until => {
                for (key, conn) in self.conns.iter_mut() {
                    log::warn!(
                        "conn={} still open after the drain time; dropping it",
                        conn.id()
                    );
                    self.closing.push(key);
                }
            }
            _ => {}
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        self.expired.extend(self.timers.pop_expired(now));
        for (at, key) in self.expired.drain(..) {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.armed != Some(at) {
                continue; // cancelled: a newer deadline was armed after this one
            }
            conn.armed = None;
            conn.handle_timeout(now);
            queue(&mut self.pending, conn, key);
        }
    }

    fn accept(&mut self, now: Instant) {
        if self.phase != Phase::Running {
            return;
        }
        if let Some(until) = self.accept_paused_until {
            if now < until {
                return;
            }
            // The backlog may have filled without a new edge: try every listener again.
            self.accept_paused_until = None;
            for listener in &mut self.listeners {
                listener.ready = true;
            }
        }
        for n in 0..self.listeners.len() {
            for _ in 0..ACCEPTS_PER_TURN {
                let Some(listener) = self.listeners.get_mut(n).filter(|l| l.ready) else {
                    break;
                };
                let (local, transparent) = (listener.local, listener.transparent);
                match listener.socket.accept() {
                    Ok((stream, addr)) => {
                        if let Some(metrics) = &self.metrics {
                            metrics.accepted();
                        }
                        self.accept_error_logged = false;
                        self.admit(stream, addr, (local, transparent), now);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => listener.ready = false,
                    // Failures of that one connection (it went away before we got to it).
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted
                                | io::ErrorKind::ConnectionAborted
                                | io::ErrorKind::ConnectionReset
                        ) => {}
                    Err(e) => {
                        // EMFILE/ENFILE (out of descriptors), ENOBUFS, ENOMEM: pause rather
                        // than spin on a backlog that stays readable.
                        if !self.accept_error_logged {
                            log::warn!(
                                "accept on {local} failed: {e}; pausing accepts for {} ms",
                                ACCEPT_PAUSE.as_millis()
                            );
                            self.accept_error_logged = true;
                        }
                        self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                        return;
                    }
                }
            }
        }
    }

    /// Carries out the connection's admission (`policy::admission`): counts it against the
    /// caps (and takes its rate token) as told, then starts its session, or refuses it. A
    /// transparent connection for this host itself is refused first, uncounted.
    fn admit(
        &mut self,
        stream: TcpStream,
        addr: SocketAddr,
        (local, transparent): (SocketAddr, bool),
        now: Instant,
    ) {
        // One configuration for every decision about this connection: the one its session gets.
        let config = Arc::clone(&self.config);
        // TCP_NODELAY is on already: accepted sockets inherit it from the listener (`bind`).
        // A listener bound to one address accepts on that address: asking the socket
        // (getsockname) is only needed behind a wildcard listener, or behind a transparent
        // one, where it is the address the client connected to (DESIGN.md §9).
        let local = if local.ip().is_unspecified() || transparent {
            stream.local_addr().unwrap_or(local)
        } else {
            local
        };
        let listeners = &self.shared.transparent_listeners;
        if transparent && is_this_host(local, listeners, is_host_address) {
            log::info!(
                "refused transparent connection from {addr} to {local}: an address of this \
                 host (loop)"
            );
            let reply = loop_refusal(&config.server.hostname);
            return self.refuse(stream, reply, Refused::TransparentLoop);
        }
        let tls_failures = &self.shared.tls_failures;
        let admission = admission::admit(&config, addr.ip(), self.shared.store.is_shared(), |ip| {
            tls_failures.failed_recently(ip, now)
        });
        let guard = match self.shared.limits.acquire(admission.count) {
            Ok(guard) => guard,
            Err(refusal) => {
                log::info!("refused connection from {addr}: {refusal}");
                let reply = too_many_connections(&config.server.hostname);
                return self.refuse(stream, reply, Refused::from(&refusal));
            }
        };
        let id = ConnId::new(self.index, self.workers, self.next_seq);
        self.next_seq = self.next_seq.wrapping_add(1);
        if admission.starttls == StartTls::Withhold {
            tls_failures::log_withheld(addr);
        }
        let peer = Peer {
            conn: id.0,
            client: addr,
            local,
            accepted_at: SystemTime::now(),
            stressed: self.stressed,
            starttls: admission.starttls == StartTls::Offer,
            transparent,
            spoof_source: transparent && self.shared.spoof_source,
        };
        let mut session = if admission.asks_rate {
            Session::admitting(config, peer, now)
        } else {
            Session::new(config, peer, now)
        };
        session.set_health(Arc::clone(&self.shared.health));
        let conn = Conn::new(id, stream, session, now, guard, self.metrics.clone());
        let Ok(key) = self.conns.insert(conn) else {
            log::warn!("conn={id} refused: connection table full");
            if let Some(metrics) = &self.metrics {
                metrics.refused(Refused::TableFull);
            }
            return;
        };
        let registered = match self.conns.get_mut(key) {
            Some(conn) if token::fits(key) => conn.register(self.poll.registry(), key),
            _ => Err(io::Error::other("connection table full")),
        };
        if let Err(e) = registered {
            log::warn!("conn={id} from {addr} dropped: {e}");
            if let Some(metrics) = &self.metrics {
                metrics.refused(Refused::TableFull);
            }
            self.conns.remove(key);
            return;
        }
        log::debug!("conn={id} accepted from {addr} on {local}");
        if let Some(conn) = self.conns.get_mut(key) {
            queue(&mut self.pending, conn, key);
        }
    }

    /// Answers a connection refused at accept, before any session exists, with `reply` (the
    /// session's wording), and counts it under `reason`. One nonblocking write into an empty
    /// send buffer; best effort.
    fn refuse(&self, stream: TcpStream, reply: Reply, reason: Refused) {
        let mut leg = Leg::connected(stream, None);
        reply.write_to(&mut leg.outbox);
        leg.write_last();
        if let Some(metrics) = &self.metrics {
            metrics.refused(reason);
        }
    }

    /// The context every connection driven this turn borrows, built once per turn from the
    /// configuration in force.
    fn io(&mut self) -> (Io<'_>, Table<'_>) {
        let io = Io {
            registry: self.poll.registry(),
            scratch: &mut self.scratch,
            max_input: READ_CHUNK.saturating_add(self.config.limits.max_line_length),
            pool: &mut self.pool,
            multiplexing: self.config.downstream.mode == DownstreamMode::Multiplexing,
            resolver: self.dns.as_ref().map(|dns| &dns.resolver),
            worker: self.dns.as_ref().map_or(0, |dns| dns.id),
            state_worker: self.state.as_ref().map_or(0, |state| state.id),
            scanner: self.scan.as_ref().map(|scan| &scan.scanner),
            scan_worker: self.scan.as_ref().map_or(0, |scan| scan.id),
            shared: &self.shared,
            config: &self.config,
        };
        let table = Table {
            conns: &mut self.conns,
            timers: &mut self.timers,
            pending: &mut self.pending,
            ready: &mut self.ready,
            closing: &mut self.closing,
        };
        (io, table)
    }

    /// Drops timer entries of closed connections and superseded deadlines once they outnumber
    /// the live ones, so churn cannot grow the heap for a whole idle timeout.
    fn prune_timers(&mut self) {
        let allowed = self
            .conns
            .len()
            .saturating_mul(TIMER_ENTRIES_PER_CONN)
            .saturating_add(TIMER_ENTRIES_SLACK);
        if self.timers.len() <= allowed {
            return;
        }
        let conns = &self.conns;
        self.timers
            .retain(|at, key| conns.get(key).is_some_and(|conn| conn.armed == Some(at)));
    }
}

/// The worker's connections and their lists, borrowed for the part of a turn that drives them
/// (beside the [`Io`] they are lent).
struct Table<'a> {
    conns: &'a mut Slab<Conn>,
    timers: &'a mut TimerHeap,
    pending: &'a mut Vec<ConnKey>,
    ready: &'a mut Vec<ConnKey>,
    closing: &'a mut Vec<ConnKey>,
}

impl Table<'_> {
    fn drive_pending(&mut self, now: Instant, io: &mut Io<'_>) {
        for key in self.pending.drain(..) {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.queued = false;
            if conn.drive(key, now, io) == Next::Close {
                self.closing.push(key);
                continue;
            }
            if let Some(at) = conn.next_deadline() {
                self.timers.arm(key, at, &mut conn.armed);
            }
            if conn.wants_another_turn(io.max_input) {
                queue(self.ready, conn, key);
            }
        }
    }

    fn close_finished(&mut self, now: Instant, io: &mut Io<'_>) {
        for key in self.closing.drain(..) {
            if let Some(conn) = self.conns.remove(key) {
                conn.close(now, io);
            }
        }
    }

    /// Multiplexing: sessions waiting for a downstream connection get one as soon as one was
    /// released or a place freed (this turn's transactions ended, connections closed). They are
    /// driven first next turn.
    fn serve_pool_waiters(&mut self, now: Instant, io: &mut Io<'_>) {
        if !io.pool.has_waiters() {
            return;
        }
        while let Some((key, addr)) = io.pool.next_waiter(now) {
            // A waiter that timed out, moved on to another server or closed is skipped.
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.awaits_pool(addr)) else {
                continue;
            };
            conn.take_pool_turn(key, now, io);
            queue(self.ready, conn, key);
        }
    }
}

/// Whether `ip` is an address of this host, as the loop guard asks for every transparent
/// connection's destination: only a local address can be bound without `IP_TRANSPARENT`
/// (socket, bind and close: three system calls, no packet). With `ip_nonlocal_bind` set every
/// address binds, so every destination is refused: the guard fails closed
/// (docs/transparent.md says to leave that sysctl off).
fn is_host_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Hands an answer to the connection the waiter's `key` names, with `handle`, and queues it
/// to run; an answer for a connection that closed meanwhile finds a stale key and is dropped.
fn deliver(
    conns: &mut Slab<Conn>,
    pending: &mut Vec<ConnKey>,
    key: u64,
    handle: impl FnOnce(&mut Conn),
) {
    let key = ConnKey::from_u64(key);
    if let Some(conn) = conns.get_mut(key) {
        handle(conn);
        queue(pending, conn, key);
    }
}

/// Puts `key` on `list` unless it is on a list already.
fn queue(list: &mut Vec<ConnKey>, conn: &mut Conn, key: ConnKey) {
    if !conn.queued {
        conn.queued = true;
        list.push(key);
    }
}
