//! What the threads beside the workers share (the resolver thread, `dns`, and the Redis state
//! thread, `state::redis`): the path their answers take to a worker's event loop, and a stop
//! that never hangs.
//!
//! **Answers.** Each worker has its own channel and its own `mio::Waker` (mio allows one per
//! `Poll`, `mio:src/waker.rs`). A thread sends answers into an [`Outbox`] and wakes the worker
//! only when no wake is outstanding; the worker drains its [`Inbox`] after each wake. A burst
//! of answers thus costs one wake, not one per answer:
//!
//! ```text
//! thread: send, send, send ─▶ woken? no ─▶ mark, wake ─▶ worker: try_recv until None
//!                                 yes ─▶ nothing (the worker will find them)
//! ```
//!
//! **Stopping.** [`join_within`] waits a bounded time for the thread to end (it may be inside
//! a call bounded by its own timeout) and leaves it to finish on its own otherwise, so a
//! shutdown cannot hang on a stuck resolver or Redis.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

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

/// A connected pair for a worker whose `Poll` has `waker`.
pub(crate) fn channel<T>(waker: Arc<Waker>) -> (Outbox<T>, Inbox<T>) {
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

/// Waits at most `wait` for the thread whose end disconnects `done` (it holds the sender and
/// drops it however it ends), then joins it; `what` names it in the log lines. A thread still
/// running after `wait` is left to end on its own.
pub(crate) fn join_within(thread: JoinHandle<()>, done: &Receiver<()>, wait: Duration, what: &str) {
    match done.recv_timeout(wait) {
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use mio::{Events, Poll, Token};

    use super::*;

    #[test]
    fn a_burst_costs_one_wake_and_a_drained_inbox_is_woken_again() {
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(7)).unwrap());
        let (outbox, inbox) = channel::<u32>(waker);
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
    fn join_within_leaves_a_stuck_thread_and_joins_a_finished_one() {
        let (done_tx, done) = mpsc::channel::<()>();
        let (release_tx, release) = mpsc::channel::<()>();
        let stuck = std::thread::spawn(move || {
            let _done = done_tx;
            let _ = release.recv_timeout(Duration::from_secs(5));
        });
        let started = Instant::now();
        join_within(stuck, &done, Duration::from_millis(50), "test thread");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "it did not wait for the thread"
        );
        drop(release_tx);

        let (done_tx, done) = mpsc::channel::<()>();
        let finished = std::thread::spawn(move || drop(done_tx));
        join_within(finished, &done, Duration::from_secs(5), "test thread");
    }
}
