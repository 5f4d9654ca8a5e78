//! The tarpit outbox: replies to a tarpitted client, held and released on a schedule instead of
//! at once (DESIGN.md §1.3, STYLE.md §1.1 "a tarpit is output with a release time, not a
//! sleep").
//!
//! Each reply waits `reply_delay` from when it was produced; with `stutter` it then goes out one
//! byte per interval. Nothing here sleeps or reads a clock: the session hands produced bytes in
//! with `now` and asks what is due at `now`; [`Tarpit::next_release`] is its timer.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Held replies and when the next byte (or, without stutter, all of them) is due.
#[derive(Debug)]
pub(crate) struct Tarpit {
    delay: Duration,
    stutter: Duration,
    held: VecDeque<u8>,
    release_at: Option<Instant>,
}

impl Tarpit {
    /// A tarpit delaying each reply by `delay` and, with a non-zero `stutter`, releasing it one
    /// byte per `stutter`.
    pub(crate) fn new(delay: Duration, stutter: Duration) -> Tarpit {
        Tarpit {
            delay,
            stutter,
            held: VecDeque::new(),
            release_at: None,
        }
    }

    /// Takes what the session produced at `now`. A reply that finds nothing held waits the
    /// delay from `now`; one that finds bytes held queues behind them (the session reads no new
    /// command while a reply is held, so that only happens to a reply and its own close).
    pub(crate) fn hold(&mut self, now: Instant, produced: &mut Vec<u8>) {
        if produced.is_empty() {
            return;
        }
        if self.held.is_empty() {
            self.release_at = Some(now + self.delay);
        }
        self.held.extend(produced.drain(..));
    }

    /// Appends to `out` what is due at `now`: everything after the delay, or one byte per
    /// stutter interval. `stutter_off` (the server is near `max_connections`) sends the rest of
    /// the reply at once when it is due, so held tarpits cannot starve legitimate clients.
    pub(crate) fn release(&mut self, now: Instant, stutter_off: bool, out: &mut Vec<u8>) {
        while let Some(at) = self.release_at {
            if at > now {
                return;
            }
            if self.stutter.is_zero() || stutter_off {
                out.extend(self.held.drain(..));
            } else if let Some(byte) = self.held.pop_front() {
                out.push(byte);
            }
            if self.held.is_empty() {
                self.release_at = None;
                self.held = VecDeque::new();
                return;
            }
            // From `now`, not from `at`: a late turn sends one byte, not a burst.
            self.release_at = Some(now + self.stutter);
        }
    }

    /// Whether bytes are held (the client is waiting for a reply).
    pub(crate) fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// When the next byte is due, if any is held.
    pub(crate) fn next_release(&self) -> Option<Instant> {
        self.release_at
    }

    /// Hands out everything held at once (shutdown: the rest of a stuttered reply must still
    /// go before the `421`, or the client would read a garbled line).
    pub(crate) fn release_all(&mut self, out: &mut Vec<u8>) {
        out.extend(self.held.drain(..));
        self.release_at = None;
    }

    /// Drops what is held: the client is gone.
    pub(crate) fn discard(&mut self) {
        self.held = VecDeque::new();
        self.release_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(tarpit: &mut Tarpit, at: Instant) -> String {
        let mut out = Vec::new();
        tarpit.release(at, false, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn reply_waits_the_delay_then_goes_whole() {
        let t0 = Instant::now();
        let mut tarpit = Tarpit::new(Duration::from_secs(10), Duration::ZERO);
        tarpit.hold(t0, &mut b"250 ok\r\n".to_vec());
        assert_eq!(tarpit.next_release(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(due(&mut tarpit, t0), "", "nothing at t0");
        assert_eq!(due(&mut tarpit, t0 + Duration::from_millis(9_999)), "");
        assert!(tarpit.is_holding());
        assert_eq!(due(&mut tarpit, t0 + Duration::from_secs(10)), "250 ok\r\n");
        assert!(!tarpit.is_holding());
        assert_eq!(tarpit.next_release(), None);
    }

    #[test]
    fn stutter_releases_one_byte_per_interval_after_the_delay() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut tarpit = Tarpit::new(Duration::from_secs(2), s);
        tarpit.hold(t0, &mut b"220 x\r\n".to_vec());
        assert_eq!(due(&mut tarpit, t0 + Duration::from_secs(1)), "");
        let mut at = t0 + Duration::from_secs(2);
        let mut got = String::new();
        for expected in ["2", "2", "0", " ", "x", "\r", "\n"] {
            assert_eq!(tarpit.next_release(), Some(at));
            assert_eq!(due(&mut tarpit, at - Duration::from_millis(1)), "", "early");
            let byte = due(&mut tarpit, at);
            assert_eq!(byte, expected);
            got.push_str(&byte);
            at += s;
        }
        assert_eq!(got, "220 x\r\n");
        assert_eq!(tarpit.next_release(), None);
    }

    #[test]
    fn a_late_turn_sends_one_byte_not_a_burst() {
        let t0 = Instant::now();
        let mut tarpit = Tarpit::new(Duration::ZERO, Duration::from_secs(1));
        tarpit.hold(t0, &mut b"abc".to_vec());
        assert_eq!(due(&mut tarpit, t0 + Duration::from_secs(30)), "a");
        assert_eq!(
            tarpit.next_release(),
            Some(t0 + Duration::from_secs(31)),
            "the next byte an interval after the late one"
        );
    }

    #[test]
    fn stutter_off_sends_the_rest_at_once() {
        let t0 = Instant::now();
        let mut tarpit = Tarpit::new(Duration::from_secs(1), Duration::from_secs(1));
        tarpit.hold(t0, &mut b"221 bye\r\n".to_vec());
        assert_eq!(due(&mut tarpit, t0 + Duration::from_secs(1)), "2");
        let mut out = Vec::new();
        tarpit.release(t0 + Duration::from_secs(2), true, &mut out);
        assert_eq!(out, b"21 bye\r\n");
        assert!(!tarpit.is_holding());
    }

    #[test]
    fn a_second_reply_queues_behind_the_first() {
        let t0 = Instant::now();
        let mut tarpit = Tarpit::new(Duration::from_secs(5), Duration::ZERO);
        tarpit.hold(t0, &mut b"550 no\r\n".to_vec());
        tarpit.hold(t0 + Duration::from_secs(1), &mut b"221 bye\r\n".to_vec());
        assert_eq!(tarpit.next_release(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(
            due(&mut tarpit, t0 + Duration::from_secs(5)),
            "550 no\r\n221 bye\r\n"
        );
        tarpit.discard();
        tarpit.hold(t0 + Duration::from_secs(6), &mut b"x".to_vec());
        assert_eq!(tarpit.next_release(), Some(t0 + Duration::from_secs(11)));
        tarpit.discard();
        assert!(!tarpit.is_holding());
        assert_eq!(tarpit.next_release(), None);
    }
}
