//! The scanner thread (DESIGN.md §7): the sessions' milter stages and held messages are
//! carried out here, off the event loops, on a tokio current-thread runtime like the
//! resolver's (`crate::dns`).
//!
//! Each session with milters has one *conversation* here, a task that owns its connections
//! to the milters (one per milter, as Postfix's smtpd has) from the connect stage to `Quit`;
//! its stages arrive in order through the conversation's own channel. A held message of a
//! session without milters is scanned by a task of its own. Answers go back to the worker
//! that asked, through its inbox (`crate::side_thread`), one wake per burst.
//!
//! ```text
//! worker ── Milter(Connect) ──▶ thread ── spawn ──▶ conversation(milters…) ──▶ answers
//!        ── Milter(step) / Scan ──▶ thread ── by key ──▶ the same conversation
//!        ── Scan (no milters) ──▶ thread ── spawn ──▶ scan task (rspamd) ──▶ answer
//! ```
//!
//! A slow scanner delays only the messages it scans: every call is bounded by `[content]
//! timeout`, and the tasks run side by side. At most `max_scans` messages are scanned at once
//! across workers; one over it waits for a slot within `timeout`, then `on_failure` applies.
//! A failure (down, slow, garbage) logs one warning per scanner per minute.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mio::Waker;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::content::{Failure, Verdict};
use crate::policy::content as policy;
use crate::side_thread::{self, Inbox, Outboxes, Running};
use crate::smtp::question::{Answer, MilterStep, Question, ScanJob, Scanned};

mod conversation;
mod message;

/// How long stopping waits for the thread before leaving it (a call in flight is bounded by
/// its own timeout anyway).
const STOP_WAIT: Duration = Duration::from_secs(2);

/// At most one warning per scanner per this interval (DESIGN.md §7).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Who waits for an answer: a worker (the index [`Scanner::add_worker`] gave it) and the
/// connection's key in that worker. It also names the connection's milter conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Waiter {
    /// The worker's index.
    pub worker: usize,
    /// The connection's key in that worker.
    pub key: u64,
}

/// An answer for a connection, read by its worker from its inbox.
#[derive(Debug)]
pub struct ScanAnswer {
    /// The connection's key.
    pub key: u64,
    /// The answer for its session.
    pub answer: Answer,
}

/// A question on its way to the thread.
struct Request {
    waiter: Waiter,
    question: Question,
}

/// What the thread and the workers share.
#[derive(Default)]
struct Shared {
    workers: Outboxes<ScanAnswer>,
    /// Messages being scanned now, across workers (`max_scans`).
    scanning: AtomicU32,
    /// Rung when a scan slot frees.
    slot_freed: Notify,
    /// When each scanner (by its address) last had a failure logged.
    warned: Mutex<HashMap<String, Instant>>,
}

/// The running scanner thread; stopped when dropped.
#[derive(Debug)]
pub struct Scanner {
    handle: ScannerHandle,
    _thread: Running,
}

/// A worker's way to the scanner thread.
#[derive(Clone)]
pub struct ScannerHandle {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<Request>,
}

impl std::fmt::Debug for ScannerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScannerHandle")
    }
}

impl Scanner {
    /// Starts the thread. It costs an idle thread until a scanner is configured (which a
    /// reload may do at any time).
    pub fn start() -> io::Result<Scanner> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let shared = Arc::new(Shared::default());
        let (requests, request_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let thread_shared = Arc::clone(&shared);
        let run = move || runtime.block_on(serve(thread_shared, request_rx, stop_rx));
        let signal = move || drop(stop);
        let thread = side_thread::spawn(
            "tarmac-scan",
            "content: the scanner thread",
            STOP_WAIT,
            run,
            signal,
        )?;
        Ok(Scanner {
            handle: ScannerHandle { shared, requests },
            _thread: thread,
        })
    }

    /// Registers a worker: answers for it go to the returned inbox, followed by a wake.
    pub fn add_worker(&mut self, waker: Arc<Waker>) -> (usize, Inbox<ScanAnswer>) {
        self.handle.shared.workers.add(waker)
    }

    /// A handle for the workers.
    pub fn handle(&self) -> ScannerHandle {
        self.handle.clone()
    }
}

impl ScannerHandle {
    /// Passes `question` (a `Milter` step or a `Scan`) to the thread; its answer comes
    /// through the worker's inbox. When the thread is gone (the process is stopping), the
    /// answer is given at once: what a failed scanner means under the session's
    /// `on_failure`.
    pub fn ask(&self, waiter: Waiter, question: Question) -> Option<Answer> {
        match self.requests.send(Request { waiter, question }) {
            Ok(()) => None,
            Err(mpsc::error::SendError(request)) => unavailable(request.question),
        }
    }
}

/// The answer to `question` when the scanner thread cannot take it: what a failed scanner
/// means under the session's `on_failure`.
pub fn unavailable(question: Question) -> Option<Answer> {
    match question {
        Question::Milter(MilterStep::Connect { content, .. }) => Some(Answer::Milter(
            policy::failed(content.on_failure).unwrap_or(Verdict::Continue),
        )),
        Question::Milter(MilterStep::Abort | MilterStep::Quit) => None,
        Question::Milter(_) => Some(Answer::Milter(Verdict::TempFail(None))),
        Question::Scan(job) => Some(Answer::Scanned(Box::new(unscanned(*job, "failed")))),
        _ => None,
    }
}

/// `job`'s message left unscanned (`marks` says why): what a failed scanner means under its
/// `on_failure`.
fn unscanned(job: ScanJob, marks: &str) -> Scanned {
    Scanned {
        held: job.held,
        verdict: policy::failed(job.content.on_failure).unwrap_or(Verdict::Continue),
        edits: Vec::new(),
        marks: marks.to_owned(),
    }
}

/// The thread's loop: each request goes to its conversation, a new one, or a scan task.
async fn serve(
    shared: Arc<Shared>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut conversations: HashMap<Waiter, mpsc::UnboundedSender<Step>> = HashMap::new();
    loop {
        let request = tokio::select! {
            biased;
            _ = &mut stop => break,
            request = requests.recv() => match request {
                Some(request) => request,
                None => break,
            },
        };
        let waiter = request.waiter;
        // Conversations that ended on their own (idle past their limit) are forgotten.
        conversations.retain(|_, steps| !steps.is_closed());
        match request.question {
            Question::Milter(MilterStep::Connect {
                content,
                hostname,
                linger,
                client,
                name,
            }) => {
                let (steps, steps_rx) = mpsc::unbounded_channel();
                let context = conversation::Context {
                    shared: Arc::clone(&shared),
                    waiter,
                    content: *content,
                    hostname,
                    linger,
                    client,
                    name,
                };
                tokio::spawn(conversation::run(context, steps_rx));
                conversations.insert(waiter, steps);
            }
            Question::Milter(MilterStep::Quit) => {
                if let Some(steps) = conversations.remove(&waiter) {
                    let _ = steps.send(Step::Quit);
                }
            }
            Question::Milter(step) => {
                let gone = conversations
                    .get(&waiter)
                    .is_none_or(|steps| steps.send(Step::Stage(step)).is_err());
                if gone {
                    // The conversation ended (its milters all failed, or it idled out).
                    answer(&shared, waiter, Answer::Milter(Verdict::TempFail(None)));
                }
            }
            Question::Scan(job) => {
                let job = match conversations.get(&waiter) {
                    Some(steps) => match steps.send(Step::Scan(job)) {
                        Ok(()) => continue,
                        Err(mpsc::error::SendError(Step::Scan(job))) => job,
                        Err(_) => continue,
                    },
                    None => job,
                };
                tokio::spawn(scan_alone(Arc::clone(&shared), waiter, job));
            }
            other => {
                log::debug!("content: the scanner thread was asked {other:?}");
            }
        }
    }
}

/// A step of a conversation.
enum Step {
    Stage(MilterStep),
    Scan(Box<ScanJob>),
    Quit,
}

/// A held message of a session without milters: rspamd only.
async fn scan_alone(shared: Arc<Shared>, waiter: Waiter, job: Box<ScanJob>) {
    let tls = job.tls;
    let scanned = message::scan(&shared, *job, &mut [], tls).await;
    answer(&shared, waiter, Answer::Scanned(Box::new(scanned)));
}

/// Sends `answer` to the worker of `waiter` and wakes it.
fn answer(shared: &Shared, waiter: Waiter, answer: Answer) {
    let workers = shared.workers.read();
    if let Some(outbox) = workers.get(waiter.worker)
        && outbox.send(ScanAnswer {
            key: waiter.key,
            answer,
        })
    {
        // A failed wake means the worker is gone: nobody waits.
        let _ = outbox.wake();
    }
}

impl Shared {
    /// Takes one of `max` scan slots, waiting at most until `deadline`; `false` when none
    /// came free in time.
    async fn take_slot(&self, max: u32, deadline: tokio::time::Instant) -> bool {
        loop {
            let freed = self.slot_freed.notified();
            let taken = self
                .scanning
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok();
            if taken {
                return true;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return false;
            }
        }
    }

    /// Gives a scan slot back.
    fn free_slot(&self) {
        self.scanning.fetch_sub(1, Ordering::SeqCst);
        self.slot_freed.notify_one();
    }

    /// Logs `failure` of the scanner at `what` (`rspamd http://…`, `milter inet:…`), at most
    /// once a minute per scanner.
    fn warn(&self, what: &str, failure: &Failure) {
        if self.warning_due(what, Instant::now()) {
            log::warn!("content: {what}: {failure}");
        }
    }

    /// Whether a warning about `what` may be logged at `now` (none in the last minute); if
    /// so, `now` is when it was.
    fn warning_due(&self, what: &str, now: Instant) -> bool {
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        let due = warned
            .get(what)
            .is_none_or(|last| now.saturating_duration_since(*last) >= WARN_EVERY);
        if due {
            warned.insert(what.to_owned(), now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn max_scans_is_shared_and_a_scan_over_it_waits_for_a_slot() {
        runtime().block_on(async {
            let shared = Arc::new(Shared::default());
            let soon = || tokio::time::Instant::now() + Duration::from_millis(20);
            assert!(shared.take_slot(2, soon()).await);
            assert!(shared.take_slot(2, soon()).await);
            // Both slots are taken: the third gives up at its deadline.
            assert!(!shared.take_slot(2, soon()).await);
            // One waiting while a slot frees gets it.
            let waiter = {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                    shared.take_slot(2, deadline).await
                })
            };
            tokio::task::yield_now().await;
            shared.free_slot();
            assert!(waiter.await.unwrap());
            assert_eq!(shared.scanning.load(Ordering::SeqCst), 2);
            // A reload that lowers max_scans lets no new scan in until enough have ended.
            assert!(!shared.take_slot(1, soon()).await);
        });
    }

    #[test]
    fn one_warning_per_scanner_per_minute() {
        let shared = Shared::default();
        let now = Instant::now();
        assert!(shared.warning_due("milter inet:127.0.0.1:1", now));
        assert!(!shared.warning_due("milter inet:127.0.0.1:1", now + Duration::from_secs(59)));
        assert!(
            shared.warning_due("rspamd http://127.0.0.1:2", now),
            "per scanner"
        );
        assert!(shared.warning_due("milter inet:127.0.0.1:1", now + WARN_EVERY));
    }

    #[test]
    fn a_stopped_thread_answers_as_a_failed_scanner() {
        let content = crate::content::Settings {
            on_failure: crate::content::OnFailure::Accept,
            ..crate::content::Settings::default()
        };
        let job = ScanJob {
            content,
            hostname: "mx.test".into(),
            held: crate::content::held::Held::from_bytes(b"Subject: x\r\n\r\nhi\r\n".to_vec()),
            client: "192.0.2.1".parse().unwrap(),
            helo: "c".into(),
            name: None,
            from: "a@b".into(),
            rcpts: vec!["c@d".into()],
            queue_id: "1.1".into(),
            tls: None,
        };
        let Some(Answer::Scanned(scanned)) = unavailable(Question::Scan(Box::new(job))) else {
            panic!("a scan gets an answer");
        };
        assert_eq!(
            scanned.verdict,
            Verdict::Continue,
            "accept: relayed unscanned"
        );
        assert_eq!(scanned.held.len(), 18, "the message comes back");
        assert!(unavailable(Question::Milter(MilterStep::Quit)).is_none());
        assert!(matches!(
            unavailable(Question::Milter(MilterStep::Rcpt { to: "x".into() })),
            Some(Answer::Milter(Verdict::TempFail(None)))
        ));
    }
}
