//! The worker's timers: a min-heap of `(deadline, connection)` with lazy cancellation.
//!
//! Each connection tracks the one deadline it has armed (`armed: Option<Instant>`). A new
//! deadline is pushed only when it is earlier than the armed one; a later one waits until the
//! armed entry fires, which then is a cheap spurious wake-up (the session's `handle_timeout` is a
//! no-op when early) followed by arming the real deadline. Nothing is ever removed from the
//! middle of the heap: an entry whose connection is gone, or whose time is no longer the one
//! the connection has armed, is dropped by the caller when it pops. [`TimerHeap::retain`] prunes
//! such dead entries when they pile up (connections that close long before their idle timeout).
//!
//! A hashed timer wheel (sozu) would make arming O(1); the heap is the simple first version
//! STYLE.md §1.2 recommends until `bench/` shows it costing time.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::slab::ConnKey;

/// Deadlines of connections, earliest first.
#[derive(Debug, Default)]
pub(crate) struct TimerHeap {
    heap: BinaryHeap<Reverse<(Instant, ConnKey)>>,
}

impl TimerHeap {
    /// An empty heap.
    pub(crate) fn new() -> TimerHeap {
        TimerHeap::default()
    }

    /// Makes sure the connection `key` wakes up no later than `at`. `armed` is the connection's
    /// own record of the deadline it has in the heap; it is updated when `at` is pushed. Returns
    /// whether `at` was pushed (false: the armed deadline is already at or before `at`).
    pub(crate) fn arm(&mut self, key: ConnKey, at: Instant, armed: &mut Option<Instant>) -> bool {
        if armed.is_some_and(|armed| armed <= at) {
            return false;
        }
        self.heap.push(Reverse((at, key)));
        *armed = Some(at);
        true
    }

    /// Removes and yields every entry due at `now`, earliest first, as `(deadline, key)`. The
    /// caller acts on an entry only if the slot still holds that generation and its armed
    /// deadline equals the entry's (then it clears `armed`); anything else is a cancelled timer.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> impl Iterator<Item = (Instant, ConnKey)> {
        std::iter::from_fn(move || {
            let Reverse((at, _)) = self.heap.peek()?;
            if *at > now {
                return None;
            }
            let Reverse(entry) = self.heap.pop()?;
            Some(entry)
        })
    }

    /// Keeps only the entries for which `live(deadline, key)` is true.
    pub(crate) fn retain(&mut self, mut live: impl FnMut(Instant, ConnKey) -> bool) {
        self.heap.retain(|Reverse((at, key))| live(*at, *key));
    }

    /// The earliest entry's deadline (possibly a cancelled one: waking for it is harmless).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Entries in the heap, live or cancelled.
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(slot: u32) -> ConnKey {
        ConnKey {
            slot,
            generation: 1,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn pops_due_entries_in_order_and_leaves_the_rest() {
        let t0 = Instant::now();
        let mut timers = TimerHeap::new();
        let (mut a, mut b, mut c) = (None, None, None);
        assert!(timers.arm(key(1), t0 + ms(30), &mut a));
        assert!(timers.arm(key(2), t0 + ms(10), &mut b));
        assert!(timers.arm(key(3), t0 + ms(20), &mut c));
        assert_eq!(timers.next_deadline(), Some(t0 + ms(10)));

        assert_eq!(timers.pop_expired(t0 + ms(5)).count(), 0);
        let due: Vec<_> = timers.pop_expired(t0 + ms(20)).collect();
        assert_eq!(due, vec![(t0 + ms(10), key(2)), (t0 + ms(20), key(3))]);
        assert_eq!(timers.next_deadline(), Some(t0 + ms(30)));
        assert_eq!(timers.len(), 1);
    }

    #[test]
    fn later_deadline_is_not_pushed_while_an_earlier_one_is_armed() {
        let t0 = Instant::now();
        let mut timers = TimerHeap::new();
        let mut armed = None;
        assert!(timers.arm(key(1), t0 + ms(10), &mut armed));
        assert!(!timers.arm(key(1), t0 + ms(50), &mut armed));
        assert!(!timers.arm(key(1), t0 + ms(10), &mut armed));
        assert_eq!(armed, Some(t0 + ms(10)));
        assert_eq!(timers.len(), 1);
    }

    #[test]
    fn earlier_deadline_is_pushed_and_the_old_entry_becomes_stale() {
        let t0 = Instant::now();
        let mut timers = TimerHeap::new();
        let mut armed = None;
        timers.arm(key(1), t0 + ms(50), &mut armed);
        assert!(timers.arm(key(1), t0 + ms(10), &mut armed));
        assert_eq!(armed, Some(t0 + ms(10)));

        // The caller's check: only the entry matching `armed` is live.
        let due: Vec<_> = timers.pop_expired(t0 + ms(60)).collect();
        let live: Vec<_> = due.iter().filter(|(at, _)| Some(*at) == armed).collect();
        assert_eq!(due.len(), 2);
        assert_eq!(live, vec![&(t0 + ms(10), key(1))]);
    }

    #[test]
    fn retain_drops_cancelled_entries() {
        let t0 = Instant::now();
        let mut timers = TimerHeap::new();
        let mut armed = [None, None, None];
        for (slot, armed) in armed.iter_mut().enumerate() {
            timers.arm(key(slot as u32), t0 + ms(slot as u64), armed);
        }
        timers.retain(|_, k| k.slot != 1);
        let left: Vec<_> = timers
            .pop_expired(t0 + ms(100))
            .map(|(_, k)| k.slot)
            .collect();
        assert_eq!(left, vec![0, 2]);
        assert_eq!(timers.next_deadline(), None);
    }

    #[test]
    fn equal_deadlines_all_fire() {
        let t0 = Instant::now();
        let mut timers = TimerHeap::new();
        let (mut a, mut b) = (None, None);
        timers.arm(key(1), t0, &mut a);
        timers.arm(key(2), t0, &mut b);
        assert_eq!(timers.pop_expired(t0).count(), 2);
    }
}
