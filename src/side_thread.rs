//! What the threads beside the workers share (the resolver thread, `dns`, and the Redis state
//! thread, `state::redis`): the path their answers take to a worker's event loop, and a stop
//! that never hangs.
//!
//! **Answers.** Each worker has its own channel and its own `mio::Waker` (mio allows one per
//! `Poll`, `mio:src/waker.rs`). A thread sends answers into an `Outbox` and wakes the worker
//! only when no wake is outstanding; the worker drains its [`Inbox`] after each wake. A burst
//! of answers thus costs one wake, not one per answer:
//!
//! ```text
//! thread: send, send, send ─▶ woken? no ─▶ mark, wake ─▶ worker: try_recv until None
//!                                 yes ─▶ nothing (the worker will find them)
//! ```
//!
//! **Workers.** `Outboxes` holds one `Outbox` per registered worker, found by the index
//! `Outboxes::add` gave it (the `worker` of a waiter).
//!
//! **Overload warnings.** Both threads answer at once when their queue is full and warn about
//! it; [`LogEvery`] lets that warning out at most once per interval, whichever thread hits it.
//!
//! **Stopping.** `spawn` starts the thread and returns its `Running` owner, which holds how
//! the thread is told to stop. `Running::stop` (or dropping it) tells it once, waits a bounded
//! time for the thread to end (it may be inside a call bounded by its own timeout) and leaves
//! it to finish on its own otherwise, so a shutdown cannot hang on a stuck resolver or Redis.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::Waker;

/// A worker's receiving end.
#[derive(Debug)]
pub struct Inbox<T> {
    rx: Receiver<T>,
    /// Set by the sending thread when it wakes the worker, cleared here when the inbox runs
    /// dry: while set, more answers need no wake of their own (see [`Inbox::try_recv`]).
    woken: Arc<AtomicBool>,
}

/// A thread's sending end to one worker.
#[derive(Debug)]
pub(crate) struct Outbox<T> {
    tx: Sender<T>,
    waker: Arc<Waker>,
    /// Shared with the worker's [`Inbox`]: a wake is outstanding.
    woken: Arc<AtomicBool>,
}

/// Every registered worker's [`Outbox`], by index.
#[derive(Debug)]
pub(crate) struct Outboxes<T>(RwLock<Vec<Outbox<T>>>);

/// The owner of a running side thread: stops it when dropped.
pub(crate) struct Running {
    /// The thread, in log lines ("dns: the resolver thread").
    what: &'static str,
    thread: Option<JoinHandle<()>>,
    /// Disconnects when the thread ends, however it ends: a join with a bounded wait.
    done: Receiver<()>,
    /// Tells the thread to stop; taken by the first [`Running::stop`].
    signal: Option<Box<dyn FnOnce() + Send>>,
    /// How long stopping waits for the thread before leaving it.
    stop_wait: Duration,
}

/// A warning logged at most once per `interval`, from any thread.
#[derive(Debug)]
pub(crate) struct LogEvery {
    interval: Duration,
    /// Ms after `epoch` of the last warning, plus one (0 = never).
    last: AtomicU64,
    epoch: Instant,
}

/// Starts `run` on a thread named `name`; `what` names it in log lines, `signal` tells it to
/// stop, and stopping waits at most `stop_wait` for it.
pub(crate) fn spawn(
    name: &str,
    what: &'static str,
    stop_wait: Duration,
    run: impl FnOnce() + Send + 'static,
    signal: impl FnOnce() + Send + 'static,
) -> io::Result<Running> {
    let (done_tx, done) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // Dropped when the thread ends, after whatever `run` owned: what the join waits for.
            let _done = done_tx;
            run();
        })?;
    Ok(Running {
        what,
        thread: Some(thread),
        done,
        signal: Some(Box::new(signal)),
        stop_wait,
    })
}

impl Running {
    /// Tells the thread to stop and waits at most the stop wait for it to end; a thread still
    /// running then is left to end on its own. Only the first call does anything; dropping
    /// does the same.
    pub(crate) fn stop(&mut self) {
        if let Some(signal) = self.signal.take() {
            signal();
        }
        self.join_within(self.stop_wait);
    }

    /// Whether the thread has not been joined (or left) yet.
    pub(crate) fn is_running(&self) -> bool {
        self.thread.is_some()
    }

    /// Waits at most `wait` for the thread to end, then joins it; a thread still running after
    /// `wait` is left to end on its own. Only the first call does anything.
    fn join_within(&mut self, wait: Duration) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let what = self.what;
        match self.done.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {
                log::warn!("{what} did not stop within {wait:?}; leaving it");
            }
            // Disconnected: the thread has ended (nothing is ever sent).
            _ => {
                if thread.join().is_err() {
                    log::error!("{what} panicked");
                }
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("what", &self.what)
            .field("running", &self.is_running())
            .finish()
    }
}

impl LogEvery {
    /// A limit of one warning per `interval`, none logged yet.
    pub(crate) fn new(interval: Duration) -> LogEvery {
        LogEvery {
            interval,
            last: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Whether the warning may be logged at `now`: at most once per interval, and to one
    /// caller only when several threads ask at once.
    pub(crate) fn allows(&self, now: Instant) -> bool {
        let now_ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        let interval = u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now_ms.saturating_sub(last) < interval {
            return false;
        }
        // One thread wins the right to log.
        self.last
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

impl<T> Default for Outboxes<T> {
    fn default() -> Self {
        Outboxes(RwLock::new(Vec::new()))
    }
}

impl<T> Outboxes<T> {
    /// Registers a worker whose `Poll` has `waker`: its index and its receiving end.
    pub(crate) fn add(&self, waker: Arc<Waker>) -> (usize, Inbox<T>) {
        let (outbox, inbox) = channel(waker);
        let mut outboxes = self.0.write().unwrap_or_else(PoisonError::into_inner);
        outboxes.push(outbox);
        (outboxes.len().saturating_sub(1), inbox)
    }

    /// Every worker's outbox, by index, for a round of deliveries.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Vec<Outbox<T>>> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connected pair for a worker whose `Poll` has `waker`.
fn channel<T>(waker: Arc<Waker>) -> (Outbox<T>, Inbox<T>) {
    let (tx, rx) = mpsc::channel();
    let woken = Arc::new(AtomicBool::new(false));
    let outbox = Outbox {
        tx,
        waker,
        woken: Arc::clone(&woken),
    };
    (outbox, Inbox { rx, woken })
}

impl<T> Inbox<T> {
    /// The next answer, without blocking. The worker calls it until `None` after each wake.
    ///
    /// Running dry clears the wake mark and looks once more, so an answer sent while the mark
    /// was still set is taken now rather than left without a wake.
    pub fn try_recv(&self) -> Option<T> {
        if let Ok(item) = self.rx.try_recv() {
            return Some(item);
        }
        self.woken.store(false, Ordering::SeqCst);
        self.rx.try_recv().ok()
    }
}

impl<T> Outbox<T> {
    /// Queues one answer; `false` when the worker has gone (it is shutting down).
    pub(crate) fn send(&self, item: T) -> bool {
        self.tx.send(item).is_ok()
    }

    /// Wakes the worker after answers were sent, unless a wake is still outstanding. Called
    /// after the sends, so a worker that cleared the mark in between finds them.
    pub(crate) fn wake(&self) -> io::Result<()> {
        if self.woken.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.waker.wake()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use mio::{Events, Poll, Token};

    use super::*;

    #[test]
    fn a_burst_costs_one_wake_and_a_drained_inbox_is_woken_again() {
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(7)).unwrap());
        let outboxes = Outboxes::<u32>::default();
        let (index, inbox) = outboxes.add(waker);
        assert_eq!(index, 0);
        let all = outboxes.read();
        let outbox = &all[0];
        let mut events = Events::with_capacity(8);
        let wakes = |poll: &mut Poll, events: &mut Events| {
            poll.poll(events, Some(Duration::from_millis(50))).unwrap();
            events.iter().count()
        };
        for n in 0..3 {
            assert!(outbox.send(n));
            outbox.wake().unwrap();
        }
        assert_eq!(wakes(&mut poll, &mut events), 1);
        assert!(
            inbox.woken.load(Ordering::SeqCst),
            "one wake is outstanding"
        );
        let got: Vec<u32> = std::iter::from_fn(|| inbox.try_recv()).collect();
        assert_eq!(got, [0, 1, 2]);
        assert!(
            !inbox.woken.load(Ordering::SeqCst),
            "drained: the mark is cleared"
        );
        assert!(outbox.send(3));
        outbox.wake().unwrap();
        assert_eq!(
            wakes(&mut poll, &mut events),
            1,
            "the next answer wakes again"
        );
        assert_eq!(inbox.try_recv(), Some(3));
        drop(inbox);
        assert!(!outbox.send(4), "a worker gone is reported");
    }

    #[test]
    fn log_every_lets_one_warning_out_per_interval() {
        let interval = Duration::from_secs(10);
        let limit = LogEvery::new(interval);
        let t0 = limit.epoch;
        assert!(limit.allows(t0));
        assert!(!limit.allows(t0 + Duration::from_secs(1)));
        assert!(!limit.allows(t0 + interval - Duration::from_millis(1)));
        assert!(limit.allows(t0 + interval + Duration::from_millis(1)));
        assert!(!limit.allows(t0 + interval + Duration::from_secs(1)));
    }

    #[test]
    fn join_within_leaves_a_stuck_thread_and_stop_joins_a_signalled_one() {
        /// Longer than any test: the stuck thread ends only when released.
        const LONG: Duration = Duration::from_secs(60);
        let wait = Duration::from_millis(50);
        let (release_tx, release) = mpsc::channel::<()>();
        let (ended_tx, ended) = mpsc::channel::<()>();
        let stuck_thread = move || {
            let _ = release.recv_timeout(LONG);
            let _ = ended_tx.send(());
        };
        let mut stuck = spawn("test-stuck", "test thread", wait, stuck_thread, || {}).unwrap();
        let started = Instant::now();
        stuck.join_within(wait);
        // It waited its time (a lower bound)...
        assert!(started.elapsed() >= wait, "{:?}", started.elapsed());
        // ...and returned with the thread still running: it was left, not joined.
        assert_eq!(ended.try_recv(), Err(mpsc::TryRecvError::Empty));
        assert!(!stuck.is_running(), "given up: a later call does nothing");
        drop(release_tx);
        ended.recv_timeout(LONG).expect("the released thread ends");

        // A thread told to stop by its signal is joined: once stop returns, everything the
        // thread owned has been dropped.
        let owned = Arc::new(());
        let held = Arc::clone(&owned);
        let (signal, stopped) = mpsc::channel::<()>();
        let run = move || {
            let _ = stopped.recv_timeout(LONG);
            drop(held);
        };
        let mut finished =
            spawn("test-done", "test thread", LONG, run, move || drop(signal)).unwrap();
        finished.stop();
        assert!(!finished.is_running());
        assert_eq!(Arc::strong_count(&owned), 1, "the thread had ended");
    }
}
