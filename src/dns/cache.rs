//! The answer cache shared by the workers (reading, joining) and the resolver thread
//! (completing), with lookups in flight merged.
//!
//! A slot is `InFlight` from the first miss until the resolver thread completes the query,
//! then `Ready` until its `valid_until` (or removed when the answer is not to be cached). A
//! miss inserts `InFlight` and enqueues the request while holding the slot's shard lock, so no
//! other caller can join a lookup that was never sent, and the thread cannot complete one
//! before its slot exists. The enqueue is a non-blocking channel push; no lock is ever held
//! across I/O or while touching another slot.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::{LookupAnswer, Query, Waiter};

/// Least time between two sweeps forced by a full cache: a sweep walks every slot, and a
/// cache full of fresh answers would otherwise be walked on every completion.
const FULL_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The map and its bound.
pub(super) struct Cache {
    map: DashMap<Query, Slot>,
    max_entries: usize,
    /// When a full cache was last swept.
    last_full_sweep: Mutex<Option<Instant>>,
}

/// What [`Cache::lookup`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Cached {
    /// A fresh answer.
    Hit(LookupAnswer),
    /// The waiter joined a lookup in flight.
    Joined,
    /// A new lookup was enqueued for the waiter.
    Sent,
    /// The lookup could not be enqueued; nothing was stored.
    NotSent,
}

enum Slot {
    Ready {
        answer: LookupAnswer,
        valid_until: Instant,
    },
    InFlight {
        waiters: Vec<Waiter>,
    },
}

impl Cache {
    pub(super) fn new(max_entries: usize) -> Cache {
        Cache {
            map: DashMap::new(),
            max_entries,
            last_full_sweep: Mutex::new(None),
        }
    }

    /// A fresh answer, or `waiter` joins the lookup in flight, or a new lookup is started:
    /// `send` enqueues it and says whether it could.
    pub(super) fn lookup(
        &self,
        query: &Query,
        waiter: Waiter,
        now: Instant,
        send: impl FnOnce() -> bool,
    ) -> Cached {
        // The hit path: a shared lock, no allocation beyond the answer's clone.
        if let Some(slot) = self.map.get(query) {
            if let Slot::Ready {
                answer,
                valid_until,
            } = &*slot
            {
                if *valid_until > now {
                    return Cached::Hit(answer.clone());
                }
            }
        }
        match self.map.entry(query.clone()) {
            Entry::Occupied(mut occupied) => match occupied.get_mut() {
                Slot::InFlight { waiters } => {
                    waiters.push(waiter);
                    Cached::Joined
                }
                // Answered between the two lookups above.
                Slot::Ready {
                    answer,
                    valid_until,
                } if *valid_until > now => Cached::Hit(answer.clone()),
                // Stale: the old answer stays until a new lookup is on its way.
                Slot::Ready { .. } => {
                    if !send() {
                        return Cached::NotSent;
                    }
                    occupied.insert(Slot::InFlight {
                        waiters: vec![waiter],
                    });
                    Cached::Sent
                }
            },
            Entry::Vacant(vacant) => {
                if !send() {
                    return Cached::NotSent;
                }
                vacant.insert(Slot::InFlight {
                    waiters: vec![waiter],
                });
                Cached::Sent
            }
        }
    }

    /// Ends the lookup for `query`: stores `answer` until `valid_until` (`None`: not cached,
    /// nor when the cache is full) and returns the waiters to deliver it to.
    pub(super) fn complete(
        &self,
        query: &Query,
        answer: &LookupAnswer,
        valid_until: Option<Instant>,
        now: Instant,
    ) -> Vec<Waiter> {
        let keep = match valid_until {
            Some(until) if until > now => Some(until),
            _ => None,
        };
        // Decided before taking the slot's lock: counting and sweeping lock every shard.
        let keep = keep.filter(|_| self.has_room(now));
        // One lock for taking the waiters and storing the answer: a worker joining in
        // between would be left waiting for a lookup that is over.
        match self.map.entry(query.clone()) {
            Entry::Occupied(mut occupied) => {
                let waiters = match occupied.get_mut() {
                    Slot::InFlight { waiters } => std::mem::take(waiters),
                    Slot::Ready { .. } => Vec::new(),
                };
                match keep {
                    Some(valid_until) => {
                        occupied.insert(Slot::Ready {
                            answer: answer.clone(),
                            valid_until,
                        });
                    }
                    None => {
                        occupied.remove();
                    }
                }
                waiters
            }
            Entry::Vacant(vacant) => {
                if let Some(valid_until) = keep {
                    vacant.insert(Slot::Ready {
                        answer: answer.clone(),
                        valid_until,
                    });
                }
                Vec::new()
            }
        }
    }

    /// Drops every expired answer.
    pub(super) fn sweep(&self, now: Instant) {
        self.map.retain(|_, slot| match slot {
            Slot::Ready { valid_until, .. } => *valid_until > now,
            Slot::InFlight { .. } => true,
        });
    }

    /// Drops every answer for `zone`: given while the zone answered its test points wrongly,
    /// they cannot be trusted once it is back.
    pub(super) fn purge_zone(&self, zone: &str) {
        self.map.retain(|query, slot| match (query, slot) {
            (Query::Dnsbl { zone: z, .. }, Slot::Ready { .. }) => &**z != zone,
            _ => true,
        });
    }

    /// Slots in use (answers and lookups in flight).
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the answer being completed may replace its in-flight slot: the map is not over
    /// its cap, after sweeping expired answers if it was (at most once per
    /// [`FULL_SWEEP_INTERVAL`]). In-flight slots are bounded apart from the cap, by the request
    /// queue and the lookups in flight.
    fn has_room(&self, now: Instant) -> bool {
        if self.map.len() <= self.max_entries {
            return true;
        }
        {
            let mut last = self
                .last_full_sweep
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| now.saturating_duration_since(at) < FULL_SWEEP_INTERVAL) {
                return false;
            }
            *last = Some(now);
        }
        self.sweep(now);
        self.map.len() <= self.max_entries
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    use super::*;
    use crate::dns::DnsblAnswer;

    fn query(last: u8) -> Query {
        Query::Dnsbl {
            zone: Arc::from("bl.test"),
            ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)),
        }
    }

    fn waiter(key: u64) -> Waiter {
        Waiter { worker: 0, key }
    }

    fn listed() -> LookupAnswer {
        LookupAnswer::Dnsbl(DnsblAnswer::Listed(vec![Ipv4Addr::new(127, 0, 0, 2)]))
    }

    #[test]
    fn miss_then_join_then_hit_until_stale() {
        let cache = Cache::new(10);
        let t0 = Instant::now();
        let q = query(1);
        assert_eq!(cache.lookup(&q, waiter(1), t0, || true), Cached::Sent);
        // A second asker joins; `send` must not be called.
        assert_eq!(
            cache.lookup(&q, waiter(2), t0, || panic!("sent twice")),
            Cached::Joined
        );
        let until = t0 + Duration::from_secs(5);
        let waiters = cache.complete(&q, &listed(), Some(until), t0);
        assert_eq!(waiters, vec![waiter(1), waiter(2)]);
        assert_eq!(
            cache.lookup(&q, waiter(3), t0 + Duration::from_secs(4), || panic!()),
            Cached::Hit(listed())
        );
        // Stale: a new lookup.
        assert_eq!(cache.lookup(&q, waiter(4), until, || true), Cached::Sent);
    }

    #[test]
    fn not_sent_leaves_nothing_behind() {
        let cache = Cache::new(10);
        let t0 = Instant::now();
        let q = query(1);
        assert_eq!(cache.lookup(&q, waiter(1), t0, || false), Cached::NotSent);
        assert_eq!(cache.len(), 0);
        // The next asker starts a lookup rather than joining a phantom one.
        assert_eq!(cache.lookup(&q, waiter(2), t0, || true), Cached::Sent);
    }

    #[test]
    fn uncached_answer_is_delivered_and_removed() {
        let cache = Cache::new(10);
        let t0 = Instant::now();
        let q = query(1);
        cache.lookup(&q, waiter(1), t0, || true);
        assert_eq!(cache.complete(&q, &listed(), None, t0), vec![waiter(1)]);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn full_cache_sweeps_then_stops_caching() {
        let cache = Cache::new(2);
        let t0 = Instant::now();
        let short = t0 + Duration::from_secs(1);
        let long = t0 + Duration::from_secs(100);
        for (last, until) in [(1, short), (2, long)] {
            cache.lookup(&query(last), waiter(1), t0, || true);
            cache.complete(&query(last), &listed(), Some(until), t0);
        }
        assert_eq!(cache.len(), 2);
        // Full, but query(1) has expired: the sweep makes room.
        let t1 = t0 + Duration::from_secs(2);
        cache.lookup(&query(3), waiter(1), t1, || true);
        cache.complete(&query(3), &listed(), Some(long), t1);
        assert_eq!(
            cache.lookup(&query(3), waiter(2), t1, || panic!()),
            Cached::Hit(listed())
        );
        // Full of fresh answers: the next is delivered but not cached.
        cache.lookup(&query(4), waiter(1), t1, || true);
        assert_eq!(cache.len(), 3, "in flight counts");
        assert_eq!(
            cache.complete(&query(4), &listed(), Some(long), t1),
            vec![waiter(1)]
        );
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn purge_zone_drops_only_that_zones_answers() {
        let cache = Cache::new(10);
        let t0 = Instant::now();
        let other = Query::Dnsbl {
            zone: Arc::from("other.test"),
            ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        };
        let until = Some(t0 + Duration::from_secs(60));
        for q in [query(1), other.clone()] {
            cache.lookup(&q, waiter(1), t0, || true);
            cache.complete(&q, &listed(), until, t0);
        }
        cache.lookup(&query(2), waiter(1), t0, || true);
        cache.purge_zone("bl.test");
        assert_eq!(
            cache.lookup(&other, waiter(2), t0, || panic!()),
            Cached::Hit(listed())
        );
        assert_eq!(
            cache.lookup(&query(1), waiter(2), t0, || true),
            Cached::Sent
        );
        // The lookup in flight survived: its waiters still get their answer.
        assert_eq!(
            cache.complete(&query(2), &listed(), until, t0),
            vec![waiter(1)]
        );
    }
}
