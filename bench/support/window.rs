//! Asking many questions of a thread that answers through a worker's inbox, as tarmac's
//! workers ask the DNS resolver (`dns` bench) and the Redis state thread (`greylist` bench):
//! at most a window of them awaiting an answer at once, the worker's `mio::Poll` woken by the
//! answering thread's `Waker`, and every delivery drained after each wakeup.

use std::io;
use std::time::{Duration, Instant};

use mio::{Events, Poll};

/// Asks questions `0..n`, `ask(i)` each, keeping at most `window` awaiting an answer: `ask`
/// returns `Some` for a question answered at once, `None` for one queued, whose answer comes
/// later as a `(i, answer)` from `delivered()` after `poll` wakes. The answers in question
/// order; fails if one is delivered twice or any is missing after `within`.
pub fn ask_all<A>(
    n: usize,
    window: usize,
    within: Duration,
    poll: &mut Poll,
    mut ask: impl FnMut(usize) -> Option<A>,
    mut delivered: impl FnMut() -> Option<(u64, A)>,
) -> Vec<A> {
    let mut answers: Vec<Option<A>> = (0..n).map(|_| None).collect();
    let mut events = Events::with_capacity(64);
    let (mut next, mut done, mut in_flight) = (0, 0, 0);
    let deadline = Instant::now() + within;
    while done < n {
        while in_flight < window && next < n {
            match ask(next) {
                Some(answer) => {
                    *answers.get_mut(next).expect("slot") = Some(answer);
                    done += 1;
                }
                None => in_flight += 1,
            }
            next += 1;
        }
        if in_flight == 0 {
            continue; // all answered at once: nothing to wait for
        }
        let now = Instant::now();
        assert!(now < deadline, "answers still missing after {within:?}");
        match poll.poll(&mut events, Some(deadline - now)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("poll: {e}"),
        }
        while let Some((key, answer)) = delivered() {
            let key = usize::try_from(key).expect("a question index");
            let slot = answers.get_mut(key).expect("slot");
            assert!(slot.is_none(), "answer {key} delivered twice");
            *slot = Some(answer);
            in_flight -= 1;
            done += 1;
        }
    }
    answers
        .into_iter()
        .map(|answer| answer.expect("every question answered"))
        .collect()
}
