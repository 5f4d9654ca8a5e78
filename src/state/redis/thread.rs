//! The state thread's body: the Redis connection's life (connect, lose, reconnect at most once
//! per [`RECONNECT_EVERY`], one warning when it goes, one line when it is back) and the jobs,
//! served in pipelined batches.
//!
//! ```text
//! Up ──a call fails or times out──▶ (one immediate reconnect: a Redis restart breaks the
//!  ▲                                 connection without Redis being down) ──fails──▶ Down
//!  └──────────── reconnect succeeds (info, if a warning was logged) ◀── every second ──┘
//! ```
//!
//! While Down, jobs get the fallback without touching the network. A job is never sent twice:
//! a batch that failed may have been carried out in part, and replaying a greylist attempt
//! would turn its "new" into "early".

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use redis::{Connection, RedisError, Value};

use super::scripts::{self, Scripts, Unusable};
use super::{Job, MAX_BATCH, Message, RECONNECT_EVERY, Settings, Shared};

/// At most one warning per this interval about replies that could not be used (the
/// connection itself was fine): a key of the wrong type would otherwise log once per job.
const REPLY_WARNING_EVERY: Duration = Duration::from_secs(60);

/// The shortest read or write timeout set for a batch: `set_read_timeout` refuses zero.
const MIN_IO_TIMEOUT: Duration = Duration::from_millis(1);

/// Serves `requests` until the stop flag is set or every sender is gone; jobs still queued
/// then get their fallback as the queue is dropped.
pub(super) fn run(
    client: redis::Client,
    settings: Settings,
    shared: Arc<Shared>,
    requests: Receiver<Message>,
) {
    let now = Instant::now();
    let mut link = Link {
        address: client.get_connection_info().addr().to_string(),
        client,
        settings,
        scripts: Scripts::new(),
        shared,
        con: None,
        down_since: now,
        retry_at: now,
        warned: false,
        reply_warned: None,
    };
    link.reconnect(now);
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        if link.shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let first = match link.con {
            Some(_) => requests.recv().map_err(|_| RecvTimeoutError::Disconnected),
            None => {
                let wait = link.retry_at.saturating_duration_since(Instant::now());
                requests.recv_timeout(wait)
            }
        };
        match first {
            Ok(Message::Job(job)) => batch.push(job),
            // The loop's top looks at the flag.
            Ok(Message::Stop) => continue,
            Err(RecvTimeoutError::Timeout) => {
                link.reconnect_if_due(Instant::now());
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(Message::Job(job)) => batch.push(job),
                Ok(Message::Stop) | Err(_) => break,
            }
        }
        link.serve(&mut batch);
    }
}

/// The connection and everything needed to keep it.
struct Link {
    client: redis::Client,
    /// Host and port (or socket path) for logs: never the URL, which may hold a password.
    address: String,
    settings: Settings,
    scripts: Scripts,
    shared: Arc<Shared>,
    con: Option<Connection>,
    /// While down: since when, and when to try again.
    down_since: Instant,
    retry_at: Instant,
    /// A "Redis unavailable" warning was logged and no "back" line since.
    warned: bool,
    /// When the last unusable-reply warning was logged.
    reply_warned: Option<Instant>,
}

impl Link {
    /// Answers every job in `batch` (which is left empty): the late ones and, while Redis is
    /// down, all of them from the fallback; the rest from one pipeline.
    fn serve(&mut self, batch: &mut Vec<Job>) {
        let now = Instant::now();
        // Queued past its deadline: the worker has waited long enough.
        let (late, live): (Vec<Job>, Vec<Job>) =
            batch.drain(..).partition(|job| job.deadline <= now);
        late.into_iter().for_each(Job::fall_back);
        if live.is_empty() {
            return;
        }
        self.reconnect_if_due(now);
        let Some(con) = self.con.as_mut() else {
            live.into_iter().for_each(Job::fall_back);
            return;
        };
        // No read or write may outlast the earliest deadline in the batch.
        let earliest = live.iter().map(|job| job.deadline).min().unwrap_or(now);
        let left = earliest.saturating_duration_since(now).max(MIN_IO_TIMEOUT);
        let mut pipe = redis::pipe();
        // Errors come back per job (a `Value::ServerError`), not as a failed pipeline.
        pipe.ignore_errors();
        let mut ops = Vec::with_capacity(live.len());
        for job in live {
            match &job.op {
                Some(op) => {
                    self.scripts.push(&mut pipe, op, &self.settings);
                    ops.push(job);
                }
                None => job.finish(None),
            }
        }
        let result = con
            .set_read_timeout(Some(left))
            .and_then(|()| con.set_write_timeout(Some(left)))
            .and_then(|()| pipe.query::<Vec<Value>>(con));
        match result {
            Ok(replies) if replies.len() == ops.len() => self.answer(ops, replies),
            Ok(replies) => {
                ops.into_iter().for_each(Job::fall_back);
                let error = RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "a reply count different from the commands sent",
                    format!("{} replies", replies.len()),
                ));
                self.lost(&error, Instant::now());
            }
            Err(error) => {
                ops.into_iter().for_each(Job::fall_back);
                self.lost(&error, Instant::now());
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
            match scripts::read(op, reply) {
                Ok(answer) => job.finish(answer),
                Err(unusable) => {
                    if unusable == Unusable::NoScript {
                        reload = true;
                    }
                    self.warn_reply(&unusable, Instant::now());
                    job.fall_back();
                }
            }
        }
        if !reload {
            return;
        }
        let loaded = match self.con.as_mut() {
            Some(con) => self.scripts.load(con),
            None => return,
        };
        if let Err(error) = loaded {
            self.lost(&error, Instant::now());
        }
    }

    /// Tries to reconnect if Redis is down and the next attempt is due.
    fn reconnect_if_due(&mut self, now: Instant) {
        if self.con.is_none() && now >= self.retry_at {
            self.reconnect(now);
        }
    }

    /// One connection attempt (bounded by `[state] timeout`), with its log line: a warning
    /// the first time Redis is found unavailable, a line when it is back.
    fn reconnect(&mut self, now: Instant) {
        match self.connect() {
            Ok(con) => {
                self.con = Some(con);
                self.shared.up.store(true, Ordering::Relaxed);
                if self.warned {
                    self.warned = false;
                    log::info!(
                        "state: Redis at {} is back after {:.1}s; shared state in use again",
                        self.address,
                        Instant::now()
                            .saturating_duration_since(self.down_since)
                            .as_secs_f64()
                    );
                } else {
                    log::info!(
                        "state: connected to Redis at {} (key prefix {:?})",
                        self.address,
                        self.settings.prefix
                    );
                }
            }
            Err(error) => {
                self.retry_at = Instant::now() + RECONNECT_EVERY;
                if self.warned {
                    log::debug!(
                        "state: Redis at {} still unavailable: {error}",
                        self.address
                    );
                    return;
                }
                self.warned = true;
                self.down_since = now;
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

    /// The connection failed mid-call: drop it (replies may still be on their way), try once
    /// more at once, and if that fails too, Redis is down.
    fn lost(&mut self, error: &RedisError, now: Instant) {
        self.con = None;
        self.shared.up.store(false, Ordering::Relaxed);
        log::debug!("state: Redis call failed: {error}");
        self.reconnect(now);
    }

    fn connect(&self) -> redis::RedisResult<Connection> {
        let timeout = self.settings.timeout;
        let mut con = self.client.get_connection_with_timeout(timeout)?;
        con.set_read_timeout(Some(timeout))?;
        con.set_write_timeout(Some(timeout))?;
        self.scripts.load(&mut con)?;
        Ok(con)
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
