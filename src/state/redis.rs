//! The Redis backend (`[state] backend = "redis"`, DESIGN.md §5): one thread (`tarmac-state`)
//! owns the Redis connection; workers reach it the way they reach the resolver (STYLE.md
//! §1.3), never blocking and never holding a lock across a Redis call:
//!
//! ```text
//! worker: Store::ask ──▶ RedisHandle::ask ──try_send──▶ bounded queue (full: local fallback)
//!                                                          │
//! state thread: takes up to MAX_BATCH jobs, sends them as one pipeline (EVALSHA / EXISTS /
//!               SET), each reply parsed into a StateAnswer; a job past its deadline, or any
//!               failure, gets the local fallback instead
//!                                                          │
//! worker ◀── std mpsc Inbox + Arc<mio::Waker>::wake(), only when the worker drained the last one
//! ```
//!
//! **Every job is answered exactly once**, within `[state] timeout` of when the worker asked:
//! by Redis, or by the fallback (`Local::fallback`) when its time is up, when Redis is down, or
//! when its reply is unusable. A job dropped unanswered (the thread stopping, or a panic)
//! answers with the fallback from its `Drop`. Sessions wait for these answers without a timer
//! of their own, so this guarantee is what bounds their wait.
//!
//! **Redis down** (connect refused, a timeout, a broken connection: slow counts as down): one
//! warning, then every job gets the fallback at once while the thread tries to reconnect at most
//! once per `RECONNECT_EVERY`, each attempt on a short-lived connector thread so the state
//! thread never blocks on a connect; one info line when it is back. Nothing is replayed: jobs
//! answered by the fallback stay answered.
//!
//! **Time** is Redis's own (`TIME` inside the scripts, `scripts.rs`), one clock for every host.
//! **Keys** all carry `[state] prefix` and a TTL, so nothing is ever swept.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use mio::Waker;

use super::local::Local;
use super::op::{StateAnswer, StateOp, StoreStats, Waiter};
use crate::config::{Config, Rate};
use crate::side_thread::{self, LogEvery, Outboxes, Running};

mod scripts;
mod thread;

/// Jobs that may wait for the state thread: about 40 ms of Redis's work at the 100,000
/// decisions a second `bench/greylist.rs` measures. A full queue means Redis is slower than
/// the connections arriving; a new job then gets the fallback at once rather than waiting
/// behind the others for an answer that would come too late.
const REQUEST_QUEUE: usize = 4096;

/// Most jobs sent to Redis as one pipeline: one write and one read for all of them, where
/// one round trip each would cap the thread at a few tens of thousands a second.
const MAX_BATCH: usize = 512;

/// How often the thread tries to reconnect while Redis is down: soon enough that shared state
/// returns within a second, rare enough that a dead host costs one connect a second.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// How long stopping waits for the thread (it may be inside a Redis call bounded by the
/// timeout) before leaving it to end on its own.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// At most one "state thread behind" warning per this interval.
const OVERLOAD_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The state thread's owner: stops it when dropped.
#[derive(Debug)]
pub struct RedisState {
    handle: RedisHandle,
    thread: Running,
}

/// A cheap, cloneable handle for asking.
#[derive(Clone)]
pub struct RedisHandle {
    shared: Arc<Shared>,
    requests: SyncSender<Message>,
}

/// A worker's receiving end: one wake per burst of answers (see `side_thread`).
pub type Inbox = side_thread::Inbox<Delivery>;

/// An answer for a waiter, read by its worker from its [`Inbox`] after a wake.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The waiter's key.
    pub key: u64,
    /// The answer.
    pub answer: StateAnswer,
}

/// What the thread needs from the configuration, read once at start.
#[derive(Clone, Debug)]
struct Settings {
    prefix: String,
    /// `[state] timeout`: connecting, and each read and write.
    timeout: Duration,
    /// `[tarpit] pass_ttl`: a PASS key's TTL.
    pass_ttl: Duration,
    per_ip: Gcra,
    per_subnet: Gcra,
}

/// One rate as the GCRA script takes it, in microseconds (Redis's `TIME` resolution).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Gcra {
    /// One token comes back every `interval`: the rate's `per / count`, at least 1 µs.
    interval_us: u64,
    /// How far ahead of now the bucket's theoretical arrival time may run: `interval ×
    /// (count - 1)`, so `count` connections pass at once (governor's burst).
    tolerance_us: u64,
}

/// What goes through the queue.
enum Message {
    Job(Job),
    /// A connector thread's attempt (see `thread.rs`).
    Connected(redis::RedisResult<redis::Connection>),
    /// Look at the stop flag now.
    Stop,
}

/// One question on its way, answered exactly once (see the module doc).
struct Job {
    /// `None` once answered.
    op: Option<StateOp>,
    waiter: Waiter,
    /// When the worker stops caring: asked + `[state] timeout`.
    deadline: Instant,
    shared: Arc<Shared>,
}

/// What the workers and the state thread share.
struct Shared {
    local: Arc<Local>,
    /// `[state] timeout`: a job's deadline is this long after it was asked.
    timeout: Duration,
    /// Registered by [`RedisState::add_worker`], indexed by [`Waiter::worker`].
    workers: Outboxes<Delivery>,
    /// The thread holds a working connection.
    up: AtomicBool,
    stop: AtomicBool,
    redis_answers: AtomicU64,
    fallbacks: AtomicU64,
    /// Rate limit of the overload warning.
    overload_warning: LogEvery,
}

impl RedisState {
    /// Starts the state thread for `config`'s `[state]`, with `local` as the fallback. Redis
    /// need not be up: the thread connects at once and keeps trying (Redis down is a warning,
    /// not an error). Errors: the URL does not parse (`tarmac check` refuses it first) or the
    /// thread cannot be spawned.
    pub fn start(config: &Config, local: Arc<Local>) -> io::Result<RedisState> {
        let client = redis::Client::open(config.state.redis.as_str())
            .map_err(|e| io::Error::other(format!("state: redis URL: {e}")))?;
        let settings = Settings {
            prefix: config.state.prefix.clone(),
            timeout: config.state.timeout,
            pass_ttl: config.tarpit.pass_ttl,
            per_ip: Gcra::of(config.limits.connection_rate_per_ip),
            per_subnet: Gcra::of(config.limits.connection_rate_per_subnet),
        };
        let shared = Arc::new(Shared {
            local,
            timeout: config.state.timeout,
            workers: Outboxes::default(),
            up: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            redis_answers: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            overload_warning: LogEvery::new(OVERLOAD_LOG_INTERVAL),
        });
        let (requests, request_rx) = mpsc::sync_channel(REQUEST_QUEUE);
        let thread_shared = Arc::clone(&shared);
        let connectors = requests.clone();
        let run = move || thread::run(client, settings, thread_shared, request_rx, connectors);
        let (stop, stopper) = (Arc::clone(&shared), requests.clone());
        let signal = move || {
            stop.stop.store(true, Ordering::SeqCst);
            // Full: the thread is busy and looks at the flag after its batch.
            let _ = stopper.try_send(Message::Stop);
        };
        let what = "state: the Redis thread";
        let thread = side_thread::spawn("tarmac-state", what, STOP_WAIT, run, signal)?;
        Ok(RedisState {
            handle: RedisHandle { shared, requests },
            thread,
        })
    }

    /// Registers a worker: answers for it go to the returned inbox, followed by a wake of
    /// `waker`. The index is what the worker puts in its [`Waiter`]s.
    pub fn add_worker(&mut self, waker: Arc<Waker>) -> (usize, Inbox) {
        self.handle.shared.workers.add(waker)
    }

    /// A handle for asking.
    pub fn handle(&self) -> RedisHandle {
        self.handle.clone()
    }

    /// Stops the thread, waiting at most `STOP_WAIT`; jobs still queued get the fallback.
    /// The same happens on drop; this names the moment.
    pub fn stop(mut self) {
        self.thread.stop();
    }
}

impl RedisHandle {
    /// Queues `op` for the state thread (`None`: the answer comes to `waiter`'s inbox), or,
    /// when the queue is full or the thread gone, answers with the local fallback at once.
    pub fn ask(&self, op: StateOp, now: Instant, waiter: Waiter) -> Option<StateAnswer> {
        let job = Job {
            op: Some(op),
            waiter,
            deadline: now + self.shared.timeout,
            shared: Arc::clone(&self.shared),
        };
        let mut job = match self.requests.try_send(Message::Job(job)) {
            Ok(()) => return None,
            Err(TrySendError::Full(Message::Job(job))) => {
                self.shared.note_overload(now);
                job
            }
            // The thread has stopped: the process is shutting down.
            Err(TrySendError::Disconnected(Message::Job(job))) => job,
            // Only jobs are sent here.
            Err(_) => return None,
        };
        // Answered here, so its `Drop` delivers nothing.
        let op = job.op.take()?;
        let answer = self.shared.local.fallback(&op, now);
        if answer.is_some() {
            self.shared.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        answer
    }

    /// The counters since start.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            redis_up: self.shared.up.load(Ordering::Relaxed),
            redis_answers: self.shared.redis_answers.load(Ordering::Relaxed),
            fallbacks: self.shared.fallbacks.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Gcra {
    /// `rate` in the script's units. A count of 0 (constructible, not parsable) acts as 1, as
    /// in `policy::rates`; rates above 10⁶ a second round to 1 µs between tokens (the local
    /// buckets go to 1 ns), in effect no limit either way.
    fn of(rate: Rate) -> Gcra {
        let count = u64::from(rate.count.max(1));
        let per_us = u64::try_from(rate.per.as_micros()).unwrap_or(u64::MAX);
        let interval_us = (per_us / count).max(1);
        Gcra {
            interval_us,
            tolerance_us: interval_us.saturating_mul(count - 1),
        }
    }
}

impl Job {
    /// Delivers `answer` (from Redis), or nothing for an op that has none.
    fn finish(mut self, answer: Option<StateAnswer>) {
        if self.op.take().is_none() {
            return;
        }
        if let Some(answer) = answer {
            self.shared.redis_answers.fetch_add(1, Ordering::Relaxed);
            self.shared.deliver(self.waiter, answer);
        }
    }

    /// Delivers the local fallback's answer.
    fn fall_back(mut self) {
        self.answer_with_fallback();
    }

    fn answer_with_fallback(&mut self) {
        let Some(op) = self.op.take() else {
            return;
        };
        if let Some(answer) = self.shared.local.fallback(&op, Instant::now()) {
            self.shared.fallbacks.fetch_add(1, Ordering::Relaxed);
            self.shared.deliver(self.waiter, answer);
        }
    }
}

/// A job nobody answered (the thread stopped or died with it) still gets its answer.
impl Drop for Job {
    fn drop(&mut self) {
        self.answer_with_fallback();
    }
}

impl Shared {
    /// Sends one answer and wakes its worker, unless a wake is already outstanding.
    fn deliver(&self, waiter: Waiter, answer: StateAnswer) {
        let workers = self.workers.read();
        let Some(out) = workers.get(waiter.worker) else {
            log::debug!("state: answer for unknown worker {} dropped", waiter.worker);
            return;
        };
        let delivery = Delivery {
            key: waiter.key,
            answer,
        };
        // Not sent: the worker has gone (shutting down), nothing to do.
        if !out.send(delivery) {
            return;
        }
        if let Err(e) = out.wake() {
            log::warn!("state: waking worker {}: {e}", waiter.worker);
        }
    }

    /// A job found the queue full: warns, at most once per [`OVERLOAD_LOG_INTERVAL`].
    fn note_overload(&self, now: Instant) {
        if self.overload_warning.allows(now) {
            log::warn!(
                "state: {REQUEST_QUEUE} Redis requests queued; answering from local state at \
                 once ({} fallbacks so far); Redis or the link to it is slower than the \
                 connection rate",
                self.fallbacks.load(Ordering::Relaxed)
            );
        }
    }
}
