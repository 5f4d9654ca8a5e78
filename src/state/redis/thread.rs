//! The state thread's body: the Redis connection's life and the jobs, served in pipelined
//! batches.
//!
//! ```text
//!            ┌────────── connected (info line if a warning was logged) ◀──────────┐
//!            ▼                                                                     │
//! start ─▶ Connecting{patient} ─failed (one warning)─▶ Down ─every second─▶ Connecting
//!            ▲
//! Up ──a call fails or times out──┘ (patient: a Redis restart breaks the connection without
//!                                    Redis being down)
//! ```
//!
//! Connecting happens on a short-lived connector thread (`tarmac-state-connect`), so the
//! state thread never blocks on it: a connect to a host that does not answer, or a host name
//! the system resolver is slow to resolve, costs jobs nothing beyond their deadline. While
//! Up, jobs go to Redis; while a *patient* attempt runs (the first one, and the one right
//! after a lost connection), jobs wait for it until their deadline; while Down, or during
//! the once-a-second retries, they get the fallback at once.
//!
//! A job is never sent twice: a batch that failed may have been carried out in part, and
//! replaying a greylist attempt would turn its "new" into "early".

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use redis::{Connection, RedisError, RedisResult, Value};

use super::scripts::{self, Scripts, Unusable};
use super::{Job, MAX_BATCH, Message, RECONNECT_EVERY, Settings, Shared};

/// At most one warning per this interval about replies that could not be used (the
/// connection itself was fine): a key of the wrong type would otherwise log once per job.
const REPLY_WARNING_EVERY: Duration = Duration::from_secs(60);

/// The shortest read or write timeout set for a batch: `set_read_timeout` refuses zero.
const MIN_IO_TIMEOUT: Duration = Duration::from_millis(1);

/// Serves `requests` until the stop flag is set; jobs still queued then get their fallback
/// as the queue is dropped. `connectors` is a sender into the same queue, for the connector
/// threads' results.
pub(super) fn run(
    client: redis::Client,
    settings: Settings,
    shared: Arc<Shared>,
    requests: Receiver<Message>,
    connectors: SyncSender<Message>,
) {
    let now = Instant::now();
    let mut link = Link {
        address: client.get_connection_info().addr().to_string(),
        client,
        settings,
        scripts: Arc::new(Scripts::new()),
        shared,
        connectors,
        state: State::Down { retry_at: now },
        ever_up: false,
        warned: false,
        down_since: now,
        waiting: Vec::new(),
        reply_warned: None,
    };
    link.start_connecting(true);
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        if link.shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let next = match link.wake_at() {
            None => requests.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => requests.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match next {
            Ok(Message::Job(job)) => batch.push(job),
            Ok(Message::Connected(result)) => link.handle_connected(result),
            // The loop's top looks at the flag.
            Ok(Message::Stop) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(Message::Job(job)) => batch.push(job),
                Ok(Message::Connected(result)) => link.handle_connected(result),
                Ok(Message::Stop) | Err(_) => break,
            }
        }
        link.tick(Instant::now());
        if !batch.is_empty() {
            link.serve(&mut batch);
        }
    }
}

/// Where the connection stands.
enum State {
    Up(Connection),
    /// A connector thread is trying; `patient`: jobs wait for its result (until their
    /// deadline) rather than falling back at once.
    Connecting {
        patient: bool,
    },
    /// No connection; the next attempt is due at `retry_at`.
    Down {
        retry_at: Instant,
    },
}

/// The connection and everything needed to keep it.
struct Link {
    client: redis::Client,
    /// Host and port (or socket path) for logs: never the URL, which may hold a password.
    address: String,
    settings: Settings,
    scripts: Arc<Scripts>,
    shared: Arc<Shared>,
    connectors: SyncSender<Message>,
    state: State,
    /// A connection was made at least once (the first is logged as such).
    ever_up: bool,
    /// A "Redis unavailable" warning was logged and no "back" line since.
    warned: bool,
    /// When the connection was last lost (or the first attempt began).
    down_since: Instant,
    /// Jobs waiting for a patient connection attempt.
    waiting: Vec<Job>,
    /// When the last unusable-reply warning was logged.
    reply_warned: Option<Instant>,
}

impl Link {
    /// When the thread must look again without a message: the earliest deadline of a waiting
    /// job, or the next connection attempt; `None`: only a message can change anything.
    fn wake_at(&self) -> Option<Instant> {
        let waiting = self.waiting.iter().map(|job| job.deadline).min();
        let retry = match self.state {
            State::Down { retry_at } => Some(retry_at),
            State::Up(_) | State::Connecting { .. } => None,
        };
        waiting.into_iter().chain(retry).min()
    }

    /// Falls back for waiting jobs past their deadline; starts a due connection attempt.
    fn tick(&mut self, now: Instant) {
        if self.waiting.iter().any(|job| job.deadline <= now) {
            let (late, waiting): (Vec<Job>, Vec<Job>) = std::mem::take(&mut self.waiting)
                .into_iter()
                .partition(|job| job.deadline <= now);
            self.waiting = waiting;
            late.into_iter().for_each(Job::fall_back);
        }
        if let State::Down { retry_at } = self.state
            && now >= retry_at
        {
            self.start_connecting(false);
        }
    }

    /// Answers every job in `batch` (which is left empty): the late ones from the fallback,
    /// the rest from Redis, or after a patient attempt, or from the fallback while Redis is
    /// down.
    fn serve(&mut self, batch: &mut Vec<Job>) {
        let now = Instant::now();
        // Queued past its deadline: the worker has waited long enough.
        let (late, live): (Vec<Job>, Vec<Job>) =
            batch.drain(..).partition(|job| job.deadline <= now);
        late.into_iter().for_each(Job::fall_back);
        if live.is_empty() {
            return;
        }
        match self.state {
            State::Up(_) => self.send(live),
            State::Connecting { patient: true } => self.waiting.extend(live),
            State::Connecting { patient: false } | State::Down { .. } => {
                live.into_iter().for_each(Job::fall_back);
            }
        }
    }

    /// Sends `jobs` as one pipeline and hands each its reply; on failure all fall back and
    /// the connection is dropped (replies may still be on their way).
    fn send(&mut self, jobs: Vec<Job>) {
        let now = Instant::now();
        // Past its deadline (it may have waited for a connection): the worker has waited
        // long enough, and a 0 ms read timeout cannot be set.
        let (late, jobs): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|job| job.deadline <= now);
        late.into_iter().for_each(Job::fall_back);
        let State::Up(con) = &mut self.state else {
            jobs.into_iter().for_each(Job::fall_back);
            return;
        };
        if jobs.is_empty() {
            return;
        }
        // No read or write may outlast the earliest deadline in the batch.
        let earliest = jobs.iter().map(|job| job.deadline).min().unwrap_or(now);
        let left = earliest.saturating_duration_since(now).max(MIN_IO_TIMEOUT);
        let mut pipe = redis::pipe();
        // Errors come back per job (a `Value::ServerError`), not as a failed pipeline.
        pipe.ignore_errors();
        let mut sent = Vec::with_capacity(jobs.len());
        for job in jobs {
            match &job.op {
                Some(op) => {
                    self.scripts.push(&mut pipe, op, &self.settings);
                    sent.push(job);
                }
                None => job.finish(None),
            }
        }
        let result = con
            .set_read_timeout(Some(left))
            .and_then(|()| con.set_write_timeout(Some(left)))
            .and_then(|()| pipe.query::<Vec<Value>>(con));
        match result {
            Ok(replies) if replies.len() == sent.len() => self.answer(sent, replies),
            Ok(replies) => {
                sent.into_iter().for_each(Job::fall_back);
                let error = RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "a reply count different from the commands sent",
                    format!("{} replies", replies.len()),
                ));
                self.lost(&error);
            }
            Err(error) => {
                sent.into_iter().for_each(Job::fall_back);
                self.lost(&error);
            }
        }
    }

    /// Hands each reply to its job, falling back for those that cannot be used.
    fn answer(&mut self, jobs: Vec<Job>, replies: Vec<Value>) {
        let mut reload = false;
        for (job, reply) in jobs.into_iter().zip(replies) {
            let Some(op) = job.op.as_ref() else {
                job.finish(None);
                continue;
            };
            match scripts::read(op, reply, Instant::now()) {
                Ok(answer) => job.finish(answer),
                Err(unusable) => {
                    reload |= unusable == Unusable::NoScript;
                    self.warn_reply(&unusable, Instant::now());
                    job.fall_back();
                }
            }
        }
        if !reload {
            return;
        }
        let State::Up(con) = &mut self.state else {
            return;
        };
        if let Err(error) = self.scripts.load(con) {
            self.lost(&error);
        }
    }

    /// The connection failed mid-call: drop it and try again at once, patiently.
    fn lost(&mut self, error: &RedisError) {
        log::debug!("state: Redis call failed: {error}");
        self.shared.up.store(false, Ordering::Relaxed);
        if !self.warned {
            self.down_since = Instant::now();
        }
        self.start_connecting(true);
    }

    /// Hands a connection attempt to a connector thread; its result comes back as
    /// `Message::Connected`.
    fn start_connecting(&mut self, patient: bool) {
        self.state = State::Connecting { patient };
        let client = self.client.clone();
        let scripts = Arc::clone(&self.scripts);
        let timeout = self.settings.timeout;
        let results = self.connectors.clone();
        let spawned = std::thread::Builder::new()
            .name("tarmac-state-connect".to_owned())
            .spawn(move || {
                let result = connect(&client, &scripts, timeout);
                // The state thread has stopped: nobody wants the connection.
                let _ = results.send(Message::Connected(result));
            });
        if let Err(e) = spawned {
            self.handle_connected(Err(RedisError::from(e)));
        }
    }

    /// A connector's result, with its log line: the first warning when Redis is found
    /// unavailable, a line when it is back.
    fn handle_connected(&mut self, result: RedisResult<Connection>) {
        let waiting = std::mem::take(&mut self.waiting);
        match result {
            Ok(con) => {
                self.state = State::Up(con);
                self.shared.up.store(true, Ordering::Relaxed);
                if self.warned {
                    self.warned = false;
                    log::info!(
                        "state: Redis at {} is back after {:.1}s; shared state in use again",
                        self.address,
                        self.down_since.elapsed().as_secs_f64()
                    );
                } else if self.ever_up {
                    log::debug!("state: reconnected to Redis at {}", self.address);
                } else {
                    log::info!(
                        "state: connected to Redis at {} (key prefix {:?})",
                        self.address,
                        self.settings.prefix
                    );
                }
                self.ever_up = true;
                self.send(waiting);
            }
            Err(error) => {
                self.state = State::Down {
                    retry_at: Instant::now() + RECONNECT_EVERY,
                };
                self.shared.up.store(false, Ordering::Relaxed);
                waiting.into_iter().for_each(Job::fall_back);
                if self.warned {
                    log::debug!(
                        "state: Redis at {} still unavailable: {error}",
                        self.address
                    );
                    return;
                }
                self.warned = true;
                log::warn!(
                    "state: Redis at {} unavailable ({error}); serving from local state \
                     (greylisting passes, PASS cache and connection rates are this host's own) \
                     and trying again every {}s",
                    self.address,
                    RECONNECT_EVERY.as_secs()
                );
            }
        }
    }

    fn warn_reply(&mut self, unusable: &Unusable, now: Instant) {
        if self
            .reply_warned
            .is_some_and(|at| now.saturating_duration_since(at) < REPLY_WARNING_EVERY)
        {
            return;
        }
        self.reply_warned = Some(now);
        let why = match unusable {
            Unusable::NoScript => "a script was missing from its cache (loading them again)",
            Unusable::Other(why) => why,
        };
        log::warn!(
            "state: Redis at {} gave a reply that cannot be used: {why}; that request was \
             answered from local state (warned at most once a minute)",
            self.address
        );
    }
}

/// One connection attempt, on the connector thread: connect (the handshake included) within
/// `timeout`, set every later read and write to `timeout`, and load the scripts.
fn connect(
    client: &redis::Client,
    scripts: &Scripts,
    timeout: Duration,
) -> RedisResult<Connection> {
    let mut con = client.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    scripts.load(&mut con)?;
    Ok(con)
}
