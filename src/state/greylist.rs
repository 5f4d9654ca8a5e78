//! Greylisting (DESIGN.md §3 `[greylist]`, §6.1): the first attempt of a new triplet is
//! deferred, a retry after `delay` and within `retry_window` passes, and a passed triplet keeps
//! passing for `pass_ttl`, renewed each time it is used. This is the local backend's table (and
//! the Redis backend's in-process fallback store); `redis/scripts.rs` decides the same on Redis.
//!
//! **Bounds.** The table holds at most `[greylist] max_entries` triplets. Room for a new one is
//! made by dropping, in this order: a pass whose time is over, the oldest triplet not yet
//! confirmed by a retry (expired or not), and only when there is none, the oldest pass (by
//! its last use). A new triplet is therefore always recorded and deferred: a full table never
//! lets mail through ungreylisted. A client subnet (IPv4 /24, IPv6 /64) may create at most
//! `[greylist] max_new_per_subnet` triplets per `retry_window`, counted from its first in the
//! window; beyond, its new triplets get the greylist deferral ([`GreylistOutcome::New`])
//! without being recorded, so one network cannot push other senders' pending triplets out.
//! Retries of triplets it already has are decided as usual.
//!
//! **Cost.** One mutex over a hash map and three queues in age order: the unconfirmed
//! triplets by first attempt, the passes by when they passed, the subnets' windows by start.
//! A queue item whose triplet has since changed (passed, started over, gone) is stale: it is
//! recognised by a generation number and skipped when it reaches the front. Making room pops
//! from a front; each check also drops expired items at the fronts; a queue with more stale
//! items than live ones is compacted in one pass. Every item is pushed once and popped or
//! compacted away once, so a check costs amortised O(1) — never a scan of the table. A
//! renewed pass reaching the front is moved to the back once per renewal (second chance), so
//! the pass dropped is the least recently used one in amortised O(1) too.
//!
//! Snapshot entries (`greylist.state`, see `snapshot`): `KEY FIRST_SEEN_UNIX_MS
//! PASSED_UNTIL_UNIX_MS` with the key [`snapshot::escape`]d and `-` for a triplet not passed
//! yet. The per-subnet counts are not saved: a restart gives every subnet a fresh window.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::snapshot::{self, Clocks, Kind, Restored, SnapshotError, Writer};
use crate::config::{Greylist as GreylistConfig, GreylistKey};
use crate::policy::rates::network_name;

/// How often the table may warn that it dropped a pending triplet, or that a subnet reached
/// its quota.
const WARNING_EVERY: Duration = Duration::from_secs(60);

/// Queues shorter than this are never compacted: the pass is not worth it.
const COMPACT_FLOOR: usize = 1024;

/// `[greylist]`'s times and bounds, all the table needs of the configuration; carried by each
/// check so a reload changes them at once, on either backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GreylistTimes {
    /// A retry passes this long after the first attempt...
    pub delay: Duration,
    /// ...and until this long after it; also the window of `max_new_per_subnet`.
    pub retry_window: Duration,
    /// A passed triplet keeps passing this long after its last use.
    pub pass_ttl: Duration,
    /// Most triplets held (local table only; Redis keys expire by TTL).
    pub max_entries: usize,
    /// Most new triplets one client subnet may create per `retry_window`.
    pub max_new_per_subnet: u32,
}

impl GreylistTimes {
    /// The times and bounds in `config`.
    pub fn of(config: &GreylistConfig) -> GreylistTimes {
        GreylistTimes {
            delay: config.delay,
            retry_window: config.retry_window,
            pass_ttl: config.pass_ttl,
            max_entries: config.max_entries,
            max_new_per_subnet: config.max_new_per_subnet,
        }
    }
}

/// What greylisting says about one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GreylistOutcome {
    /// First attempt: deferred; retry after the delay. Also a new triplet of a subnet over
    /// `max_new_per_subnet`, deferred without being recorded.
    New,
    /// A retry before the delay is over: deferred; this much is left.
    Early(Duration),
    /// Retried in time, or already passed: relayed.
    Pass,
}

/// The triplets seen, shared by every worker. The times come with each check, from the
/// configuration in force, so a reload changes them at once.
#[derive(Debug)]
pub struct Greylist {
    table: Mutex<Table>,
}

/// Everything behind the lock (see the module docs).
#[derive(Debug)]
struct Table {
    entries: HashMap<Arc<str>, Triplet>,
    /// Unconfirmed triplets, oldest first attempt first.
    pending: VecDeque<Item>,
    /// Passed triplets, in the order they passed (or were last moved back, when renewed).
    passed: VecDeque<Item>,
    /// New triplets per client subnet in its current window.
    subnets: HashMap<Box<str>, Window>,
    /// The windows, oldest start first; stale when the subnet's window started again.
    windows: VecDeque<(Box<str>, Instant)>,
    /// Stamps every (re)creation and every pass, so queue items know whether they are current.
    next_generation: u64,
    /// When the table last warned about dropping a pending triplet, and about a subnet's quota.
    dropped_warned: Option<Instant>,
    quota_warned: Option<Instant>,
}

#[derive(Clone, Copy, Debug)]
struct Triplet {
    first_seen: Instant,
    /// Set once a retry passed: passes until then.
    passed_until: Option<Instant>,
    /// Which queue item stands for this triplet now.
    generation: u64,
}

/// A queue's reference to a triplet: current while the triplet's generation is still this one.
#[derive(Debug)]
struct Item {
    key: Arc<str>,
    generation: u64,
    /// In `passed`: `passed_until` when queued, to see a renewal since.
    until: Option<Instant>,
}

/// One subnet's count of new triplets since `start`.
#[derive(Clone, Copy, Debug)]
struct Window {
    start: Instant,
    created: u32,
}

/// What the session knows that a key may be made of.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyFacts<'a> {
    /// The client's address.
    pub client: IpAddr,
    /// The HELO/EHLO name.
    pub helo: &'a str,
    /// The forward-confirmed rDNS name, if any.
    pub rdns: Option<&'a str>,
    /// The envelope sender (`""` for `<>`).
    pub sender: &'a str,
    /// The recipient being decided.
    pub recipient: &'a str,
}

impl Greylist {
    /// An empty table. (`_now` is kept for the callers; the table needs no epoch.)
    pub fn new(_now: Instant) -> Greylist {
        Greylist {
            table: Mutex::new(Table {
                entries: HashMap::new(),
                pending: VecDeque::new(),
                passed: VecDeque::new(),
                subnets: HashMap::new(),
                windows: VecDeque::new(),
                next_generation: 0,
                dropped_warned: None,
                quota_warned: None,
            }),
        }
    }

    /// Decides one recipient's triplet `key` from a client in `subnet` (its /24 or /64 as
    /// text, `policy::rates::network_name`) at `now` under `times`, and records the attempt
    /// unless the subnet is over its quota of new triplets.
    pub fn check(
        &self,
        key: &str,
        subnet: &str,
        now: Instant,
        times: &GreylistTimes,
    ) -> GreylistOutcome {
        let mut table = self.lock();
        table.trim(now, times.retry_window);
        let known = table.entries.get_mut(key).map(|triplet| {
            let outcome = judge(triplet, now, times);
            (outcome, triplet)
        });
        match known {
            Some((GreylistOutcome::Early(left), _)) => return GreylistOutcome::Early(left),
            Some((GreylistOutcome::Pass, triplet)) => {
                let until = now + times.pass_ttl;
                let newly = triplet.passed_until.is_none();
                triplet.passed_until = Some(until);
                if newly {
                    // Confirmed: from the pending queue to the passed one.
                    let key: Arc<str> = table
                        .entries
                        .get_key_value(key)
                        .map(|(key, _)| Arc::clone(key))
                        .unwrap_or_else(|| key.into());
                    let generation = table.stamp();
                    if let Some(triplet) = table.entries.get_mut(&key) {
                        triplet.generation = generation;
                    }
                    table.passed.push_back(Item {
                        key,
                        generation,
                        until: Some(until),
                    });
                    table.compact_passed();
                }
                return GreylistOutcome::Pass;
            }
            Some((GreylistOutcome::New, _)) | None => {}
        }
        // A new triplet, or one that expired and starts over.
        if !table.may_create(subnet, now, times) {
            return GreylistOutcome::New;
        }
        let present = table.entries.contains_key(key);
        while !present && table.entries.len() >= times.max_entries.max(1) {
            if !table.make_room(now, times.retry_window) {
                break;
            }
        }
        let key: Arc<str> = match table.entries.get_key_value(key) {
            Some((key, _)) => Arc::clone(key),
            None => key.into(),
        };
        let generation = table.stamp();
        table.entries.insert(
            Arc::clone(&key),
            Triplet {
                first_seen: now,
                passed_until: None,
                generation,
            },
        );
        table.pending.push_back(Item {
            key,
            generation,
            until: None,
        });
        table.compact_pending();
        GreylistOutcome::New
    }

    /// The triplets that still decide something at `clocks.now()` as a snapshot file.
    pub fn snapshot(&self, clocks: &Clocks, times: &GreylistTimes) -> Vec<u8> {
        let now = clocks.now();
        // Copied out under the lock (reference counts, no key copies), written after it.
        let live: Vec<(Arc<str>, Triplet)> = self
            .lock()
            .entries
            .iter()
            .filter(|(_, triplet)| is_live(triplet, now, times.retry_window))
            .map(|(key, triplet)| (Arc::clone(key), *triplet))
            .collect();
        let mut writer = Writer::new(Kind::Greylist);
        for (key, triplet) in live {
            let first_seen = clocks.to_unix_ms(triplet.first_seen);
            let key = snapshot::escape(&key);
            match triplet.passed_until {
                Some(until) => {
                    let until = clocks.to_unix_ms(until);
                    writer.entry(format_args!("{key} {first_seen} {until}"));
                }
                None => writer.entry(format_args!("{key} {first_seen} -")),
            }
        }
        writer.finish()
    }

    /// Loads a snapshot file: all of it or, on any error, nothing. Triplets that no longer
    /// decide anything under `times` are dropped; times a clock set back put in the future
    /// are cut to now (first attempt) and `pass_ttl` from now (pass). Beyond `max_entries`
    /// (counting what the table holds already), the oldest unconfirmed triplets are dropped
    /// first, then the oldest passes.
    pub fn restore(
        &self,
        bytes: &[u8],
        clocks: &Clocks,
        times: &GreylistTimes,
    ) -> Result<Restored, SnapshotError> {
        let now = clocks.now();
        let latest_pass = now.checked_add(times.pass_ttl).unwrap_or(now);
        let mut pending = Vec::new();
        let mut passed = Vec::new();
        let mut restored = Restored::default();
        for (n, line) in snapshot::entries(Kind::Greylist, bytes)? {
            let bad = SnapshotError::Entry(n);
            let [key, first_seen, passed_until] = snapshot::fields(line).ok_or(bad.clone())?;
            let key = snapshot::unescape(key).ok_or(bad.clone())?;
            let first_seen = snapshot::parse_ms(first_seen).ok_or(bad.clone())?;
            let passed_until = match passed_until {
                "-" => None,
                ms => Some(snapshot::parse_ms(ms).ok_or(bad)?),
            };
            // A time the monotonic clock cannot express is long past.
            let Some(first_seen) = clocks.to_instant(first_seen) else {
                restored.dropped += 1;
                continue;
            };
            let passed_until = match passed_until.map(|ms| clocks.to_instant(ms)) {
                Some(None) => {
                    restored.dropped += 1;
                    continue;
                }
                Some(Some(until)) => Some(until.min(latest_pass)),
                None => None,
            };
            let triplet = Triplet {
                first_seen: first_seen.min(now),
                passed_until,
                generation: 0,
            };
            if !is_live(&triplet, now, times.retry_window) {
                restored.dropped += 1;
            } else if passed_until.is_some() {
                passed.push((key, triplet));
            } else {
                pending.push((key, triplet));
            }
        }
        // Queued in age order; what does not fit goes, unconfirmed first, oldest first.
        pending.sort_by_key(|(_, triplet)| triplet.first_seen);
        passed.sort_by_key(|(_, triplet)| triplet.passed_until);
        let mut table = self.lock();
        let room = times.max_entries.saturating_sub(table.entries.len());
        let keep_passed = passed.len().min(room);
        let keep_pending = pending.len().min(room - keep_passed);
        let skip_passed = passed.len() - keep_passed;
        let skip_pending = pending.len() - keep_pending;
        restored.dropped += skip_passed + skip_pending;
        let kept = pending
            .into_iter()
            .skip(skip_pending)
            .chain(passed.into_iter().skip(skip_passed));
        for (key, mut triplet) in kept {
            let key: Arc<str> = key.into();
            if table.entries.contains_key(&key) {
                // Already decided since start: what the running table knows wins.
                restored.dropped += 1;
                continue;
            }
            triplet.generation = table.stamp();
            let item = Item {
                key: Arc::clone(&key),
                generation: triplet.generation,
                until: triplet.passed_until,
            };
            if triplet.passed_until.is_some() {
                table.passed.push_back(item);
            } else {
                table.pending.push_back(item);
            }
            table.entries.insert(key, triplet);
            restored.kept += 1;
        }
        Ok(restored)
    }

    /// Triplets held.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no triplet is held.
    pub fn is_empty(&self) -> bool {
        self.lock().entries.is_empty()
    }

    /// The table; a worker that panicked while holding it left it consistent (every change
    /// under the lock is a few map and queue operations that cannot fail halfway in a way
    /// that breaks the invariants: a stale item is always allowed), so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Table {
    fn stamp(&mut self) -> u64 {
        self.next_generation = self.next_generation.wrapping_add(1);
        self.next_generation
    }

    /// Whether `item` still stands for its triplet.
    fn is_current(&self, item: &Item) -> bool {
        self.entries
            .get(&item.key)
            .is_some_and(|triplet| triplet.generation == item.generation)
    }

    /// Drops what is stale or expired at the fronts of the queues: unconfirmed triplets past
    /// the retry window, passes past their time, windows over. Stops at the first item that
    /// still counts, so it costs what it removes (amortised O(1) per check).
    fn trim(&mut self, now: Instant, retry_window: Duration) {
        while let Some(item) = self.pending.front() {
            if self.is_current(item) {
                let expired = self.entries.get(&item.key).is_some_and(|triplet| {
                    now.saturating_duration_since(triplet.first_seen) > retry_window
                });
                if !expired {
                    break;
                }
                self.entries.remove(&item.key);
            }
            self.pending.pop_front();
        }
        while let Some(item) = self.passed.front() {
            if self.is_current(item) {
                let expired = self
                    .entries
                    .get(&item.key)
                    .and_then(|triplet| triplet.passed_until)
                    .is_some_and(|until| until < now);
                if !expired {
                    break;
                }
                self.entries.remove(&item.key);
            }
            self.passed.pop_front();
        }
        while let Some((subnet, start)) = self.windows.front() {
            let current = self
                .subnets
                .get(subnet)
                .is_some_and(|window| window.start == *start);
            if current && now.saturating_duration_since(*start) < retry_window {
                break;
            }
            if current {
                self.subnets.remove(subnet);
            }
            self.windows.pop_front();
        }
    }

    /// Whether `subnet` may create one more triplet now, counting it if so. The windows are
    /// bounded like the table: at `max_entries` windows the oldest one is forgotten.
    fn may_create(&mut self, subnet: &str, now: Instant, times: &GreylistTimes) -> bool {
        if let Some(window) = self.subnets.get_mut(subnet)
            && now.saturating_duration_since(window.start) < times.retry_window
        {
            if window.created >= times.max_new_per_subnet {
                self.warn_quota(subnet, now, times);
                return false;
            }
            window.created += 1;
            return true;
        }
        while !self.subnets.contains_key(subnet) && self.subnets.len() >= times.max_entries.max(1) {
            let Some((oldest, start)) = self.windows.pop_front() else {
                break;
            };
            if self.subnets.get(&oldest).is_some_and(|w| w.start == start) {
                self.subnets.remove(&oldest);
            }
        }
        let window = Window {
            start: now,
            created: 1,
        };
        self.subnets.insert(subnet.into(), window);
        self.windows.push_back((subnet.into(), now));
        if self.windows.len() > 2 * self.subnets.len() + COMPACT_FLOOR {
            let subnets = &self.subnets;
            self.windows
                .retain(|(subnet, start)| subnets.get(subnet).is_some_and(|w| w.start == *start));
        }
        true
    }

    /// Drops one triplet to make room (see the module docs for the order); false if the table
    /// is empty.
    fn make_room(&mut self, now: Instant, retry_window: Duration) -> bool {
        // A pass whose time is over, at the front of its queue.
        if let Some(item) = self.passed.front()
            && self.is_current(item)
            && self
                .entries
                .get(&item.key)
                .and_then(|triplet| triplet.passed_until)
                .is_some_and(|until| until < now)
            && let Some(item) = self.passed.pop_front()
        {
            self.entries.remove(&item.key);
            return true;
        }
        // The oldest unconfirmed triplet.
        while let Some(item) = self.pending.pop_front() {
            if !self.is_current(&item) {
                continue;
            }
            let live = self.entries.remove(&item.key).is_some_and(|triplet| {
                now.saturating_duration_since(triplet.first_seen) <= retry_window
            });
            if live {
                self.warn_dropped(now, "the oldest pending triplet");
            }
            return true;
        }
        // The least recently used pass: one renewed since it was queued goes to the back once.
        while let Some(mut item) = self.passed.pop_front() {
            let Some(triplet) = self.entries.get(&item.key) else {
                continue;
            };
            if triplet.generation != item.generation {
                continue;
            }
            if triplet.passed_until > item.until {
                item.until = triplet.passed_until;
                self.passed.push_back(item);
                continue;
            }
            self.entries.remove(&item.key);
            self.warn_dropped(now, "the least recently used pass");
            return true;
        }
        false
    }

    /// Compacts `pending` when stale items outnumber the triplets (see the module docs).
    fn compact_pending(&mut self) {
        if self.pending.len() > 2 * self.entries.len() + COMPACT_FLOOR {
            let entries = &self.entries;
            self.pending.retain(|item| current_in(entries, item));
        }
    }

    /// The same for `passed`.
    fn compact_passed(&mut self) {
        if self.passed.len() > 2 * self.entries.len() + COMPACT_FLOOR {
            let entries = &self.entries;
            self.passed.retain(|item| current_in(entries, item));
        }
    }

    fn warn_dropped(&mut self, now: Instant, what: &str) {
        if due(&mut self.dropped_warned, now) {
            log::warn!(
                "greylist: table full ({} triplets, max_entries); dropped {what} to record a new \
                 one (warned at most once a minute)",
                self.entries.len() + 1
            );
        }
    }

    fn warn_quota(&mut self, subnet: &str, now: Instant, times: &GreylistTimes) {
        if due(&mut self.quota_warned, now) {
            log::warn!(
                "greylist: {subnet} created {} new triplets within retry_window \
                 (max_new_per_subnet); its new triplets are deferred without being recorded \
                 (warned at most once a minute)",
                times.max_new_per_subnet
            );
        }
    }
}

/// Whether `item` still stands for its triplet in `entries`.
fn current_in(entries: &HashMap<Arc<str>, Triplet>, item: &Item) -> bool {
    entries
        .get(&item.key)
        .is_some_and(|triplet| triplet.generation == item.generation)
}

/// Whether a warning last given at `last` may be given again at `now`; records it if so.
fn due(last: &mut Option<Instant>, now: Instant) -> bool {
    if last.is_some_and(|at| now.saturating_duration_since(at) < WARNING_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}

/// Whether a triplet still decides anything at `now`: a pass not past its time, or an
/// attempt still within the retry window.
fn is_live(triplet: &Triplet, now: Instant, retry_window: Duration) -> bool {
    match triplet.passed_until {
        Some(until) => until >= now,
        None => now.saturating_duration_since(triplet.first_seen) <= retry_window,
    }
}

/// A known triplet's fate at `now`; an expired one counts as new.
fn judge(triplet: &Triplet, now: Instant, times: &GreylistTimes) -> GreylistOutcome {
    if let Some(until) = triplet.passed_until {
        return if now <= until {
            GreylistOutcome::Pass
        } else {
            GreylistOutcome::New
        };
    }
    let waited = now.saturating_duration_since(triplet.first_seen);
    if waited < times.delay {
        GreylistOutcome::Early(times.delay - waited)
    } else if waited <= times.retry_window {
        GreylistOutcome::Pass
    } else {
        GreylistOutcome::New
    }
}

/// The triplet key for `facts` from `[greylist] key`'s elements, in their order. Addresses
/// are compared case-insensitively (lowercased); `rdns` is the provider's domain (the
/// verified name minus its first label), or the subnet when there is none, so a sender
/// retrying from another host of the same pool keeps its triplet.
pub(crate) fn key(elements: &[GreylistKey], facts: &KeyFacts<'_>) -> String {
    let mut key = String::new();
    for element in elements {
        if !key.is_empty() {
            key.push('\u{1f}');
        }
        match element {
            GreylistKey::Subnet => key.push_str(&network_name(facts.client)),
            GreylistKey::Ip => key.push_str(&facts.client.to_canonical().to_string()),
            GreylistKey::Helo => key.push_str(&facts.helo.to_ascii_lowercase()),
            GreylistKey::Sender => key.push_str(&facts.sender.to_ascii_lowercase()),
            GreylistKey::Recipient => key.push_str(&facts.recipient.to_ascii_lowercase()),
            GreylistKey::Rdns => match facts.rdns.and_then(|name| name.split_once('.')) {
                Some((_, domain)) if domain.contains('.') => key.push_str(domain),
                _ => key.push_str(&network_name(facts.client)),
            },
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table and the times it is checked under.
    struct Fixture(Greylist, GreylistTimes);

    /// The subnet of the clients that do not say theirs.
    const NET: &str = "192.0.2.0/24";

    impl Fixture {
        fn check(&self, key: &str, now: Instant) -> GreylistOutcome {
            self.0.check(key, NET, now, &self.1)
        }

        fn check_from(&self, subnet: &str, key: &str, now: Instant) -> GreylistOutcome {
            self.0.check(key, subnet, now, &self.1)
        }

        fn len(&self) -> usize {
            self.0.len()
        }

        /// Queue items held, stale ones included: what the amortised bounds are about.
        fn queued(&self) -> (usize, usize, usize) {
            let table = self.0.lock();
            (table.pending.len(), table.passed.len(), table.windows.len())
        }
    }

    fn greylist(now: Instant) -> Fixture {
        // DESIGN.md's defaults.
        let times = GreylistTimes::of(&GreylistConfig::default());
        Fixture(Greylist::new(now), times)
    }

    /// The defaults with these bounds.
    fn bounded(now: Instant, max_entries: usize, max_new_per_subnet: u32) -> Fixture {
        let times = GreylistTimes {
            max_entries,
            max_new_per_subnet,
            ..GreylistTimes::of(&GreylistConfig::default())
        };
        Fixture(Greylist::new(now), times)
    }

    const DELAY: Duration = Duration::from_secs(300);

    #[test]
    fn new_early_pass_and_renewal() {
        let t0 = Instant::now();
        let g = greylist(t0);
        assert_eq!(g.check("k", t0), GreylistOutcome::New);
        assert_eq!(
            g.check("k", t0 + Duration::from_secs(100)),
            GreylistOutcome::Early(Duration::from_secs(200))
        );
        assert_eq!(
            g.check("k", t0 + Duration::from_secs(300)),
            GreylistOutcome::Pass
        );
        // Passed: passes for pass_ttl, renewed by each use.
        let later = t0 + Duration::from_secs(30 * 86_400);
        assert_eq!(g.check("k", later), GreylistOutcome::Pass);
        assert_eq!(
            g.check("k", later + Duration::from_secs(35 * 86_400)),
            GreylistOutcome::Pass,
            "renewed at the last use"
        );
        assert_eq!(
            g.check("other", t0),
            GreylistOutcome::New,
            "each triplet on its own"
        );
    }

    #[test]
    fn a_retry_after_the_window_starts_over() {
        let t0 = Instant::now();
        let g = greylist(t0);
        assert_eq!(g.check("k", t0), GreylistOutcome::New);
        let late = t0 + Duration::from_secs(4 * 3600 + 1);
        assert_eq!(g.check("k", late), GreylistOutcome::New);
        assert_eq!(
            g.check("k", late + Duration::from_secs(300)),
            GreylistOutcome::Pass
        );
    }

    #[test]
    fn an_expired_pass_is_new_again() {
        let t0 = Instant::now();
        let g = greylist(t0);
        g.check("k", t0);
        g.check("k", t0 + Duration::from_secs(300));
        let gone = t0 + Duration::from_secs(300 + 36 * 86_400 + 1);
        assert_eq!(g.check("k", gone), GreylistOutcome::New);
    }

    #[test]
    fn keys_follow_the_configured_elements() {
        let facts = KeyFacts {
            client: "192.0.2.7".parse().unwrap(),
            helo: "Mail.Example.ORG",
            rdns: Some("out-17.mta.bigmail.example"),
            sender: "A@Example.org",
            recipient: "b@example.net",
        };
        use GreylistKey::*;
        assert_eq!(
            key(&[Subnet, Sender, Recipient], &facts),
            "192.0.2.0/24\u{1f}a@example.org\u{1f}b@example.net"
        );
        assert_eq!(key(&[Ip, Helo], &facts), "192.0.2.7\u{1f}mail.example.org");
        assert_eq!(
            key(&[Rdns], &facts),
            "mta.bigmail.example",
            "the provider's domain"
        );
        let bare = KeyFacts {
            rdns: None,
            client: "2001:db8:1:2:3::9".parse().unwrap(),
            ..facts
        };
        assert_eq!(
            key(&[Rdns], &bare),
            "2001:db8:1:2::/64",
            "no name: the subnet"
        );
        let mapped = KeyFacts {
            client: "::ffff:192.0.2.7".parse().unwrap(),
            ..facts
        };
        assert_eq!(key(&[Subnet], &mapped), "192.0.2.0/24");
    }

    #[test]
    fn a_snapshot_keeps_triplets_across_a_restart_and_drops_expired_ones() {
        use std::time::UNIX_EPOCH;
        let t0 = Instant::now();
        let g = greylist(t0);
        let odd_key = "192.0.2.0/24\u{1f}\"a b\"@example.org\u{1f}δ@example.net";
        assert_eq!(g.check(odd_key, t0), GreylistOutcome::New);
        assert_eq!(g.check("passed", t0), GreylistOutcome::New);
        assert_eq!(
            g.check("passed", t0 + Duration::from_secs(300)),
            GreylistOutcome::Pass
        );
        assert_eq!(g.check("stale", t0), GreylistOutcome::New);
        let wall = UNIX_EPOCH + Duration::from_secs(1_795_438_862);
        let saved_at = Clocks::new(t0 + Duration::from_secs(301), wall);
        let bytes = g.0.snapshot(&saved_at, &g.1);
        assert!(!bytes.contains(&b'\x1f'), "keys are escaped");

        // Restarted a minute later: the new triplet passes once its delay is over, as if
        // tarmac had never stopped, and the passed one still passes.
        let t1 = t0 + Duration::from_secs(10_000);
        let loaded_at = Clocks::new(t1, wall + Duration::from_secs(60));
        let restarted = greylist(t1);
        let restored = restarted.0.restore(&bytes, &loaded_at, &restarted.1);
        assert_eq!(
            restored,
            Ok(Restored {
                kept: 3,
                dropped: 0
            })
        );
        // first_seen was 361 s before t1: the 300 s delay is over.
        assert_eq!(restarted.check(odd_key, t1), GreylistOutcome::Pass);
        assert_eq!(restarted.check("passed", t1), GreylistOutcome::Pass);

        // Loaded past the retry window: the unpassed attempts are gone, the pass stays.
        let late = Clocks::new(t1, wall + Duration::from_secs(5 * 3600));
        let later = greylist(t1);
        assert_eq!(
            later.0.restore(&bytes, &late, &later.1),
            Ok(Restored {
                kept: 1,
                dropped: 2
            })
        );
        assert_eq!(later.check("stale", t1), GreylistOutcome::New);
        assert_eq!(later.check("passed", t1), GreylistOutcome::Pass);
    }

    #[test]
    fn times_in_the_future_are_cut_to_now() {
        let t0 = Instant::now();
        let clocks = Clocks::new(t0, std::time::SystemTime::now());
        let mut writer = Writer::new(Kind::Greylist);
        let future = clocks.to_unix_ms(t0 + Duration::from_secs(86_400));
        writer.entry(format_args!("early {future} -"));
        writer.entry(format_args!("passed 0 {}", u64::MAX / 2));
        let g = greylist(t0);
        g.0.restore(&writer.finish(), &clocks, &g.1).unwrap();
        // The attempt counts from now, not from tomorrow.
        assert_eq!(
            g.check("early", t0 + Duration::from_secs(300)),
            GreylistOutcome::Pass
        );
        // A pass for centuries is a pass for pass_ttl.
        let after_ttl = t0 + Duration::from_secs(36 * 86_400 + 1);
        assert_eq!(g.check("passed", after_ttl), GreylistOutcome::New);
    }

    #[test]
    fn a_bad_entry_loads_nothing() {
        let t0 = Instant::now();
        let clocks = Clocks::new(t0, std::time::SystemTime::now());
        let now = clocks.to_unix_ms(t0);
        for line in [
            format!("k {now}"),
            format!("k {now} x"),
            format!("k%zz {now} -"),
            format!("k {now} - extra"),
            "k -1 -".to_owned(),
        ] {
            let mut writer = Writer::new(Kind::Greylist);
            writer.entry(format_args!("good {now} -"));
            writer.entry(format_args!("{line}"));
            let g = greylist(t0);
            assert_eq!(
                g.0.restore(&writer.finish(), &clocks, &g.1),
                Err(SnapshotError::Entry(3)),
                "{line}"
            );
            assert!(g.0.is_empty(), "all or nothing");
        }
    }

    #[test]
    fn a_full_table_still_greylists_a_new_triplet() {
        let t0 = Instant::now();
        let g = bounded(t0, 3, 1000);
        for key in ["a", "b", "c"] {
            assert_eq!(g.check(key, t0), GreylistOutcome::New);
        }
        // Full, nothing expired: the newcomer is deferred and recorded, never let through.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(g.check("late", t1), GreylistOutcome::New);
        assert_eq!(g.len(), 3);
        assert_eq!(g.check("late", t1 + DELAY), GreylistOutcome::Pass);
        // The oldest pending triplet made the room: "a" starts over.
        assert_eq!(g.check("a", t1 + DELAY), GreylistOutcome::New);
    }

    #[test]
    fn a_subnet_flood_neither_evicts_nor_unlocks_anyone_else() {
        let t0 = Instant::now();
        let g = bounded(t0, 1000, 100);
        // Another client's pending triplet, the oldest in the table.
        assert_eq!(
            g.check_from("198.51.100.0/24", "victim", t0),
            GreylistOutcome::New
        );
        // One subnet tries 50 times its quota of new triplets: all deferred, only the quota
        // recorded.
        let flood = "2001:db8:bad::/64";
        for n in 0..5000 {
            let at = t0 + Duration::from_millis(n);
            let key = format!("flood-{n}");
            assert_eq!(g.check_from(flood, &key, at), GreylistOutcome::New);
        }
        assert_eq!(g.len(), 101);
        // An unrecorded one stays new on retry; a recorded one is decided as usual.
        let later = t0 + 2 * DELAY;
        assert_eq!(
            g.check_from(flood, "flood-4999", later),
            GreylistOutcome::New
        );
        assert_eq!(g.check_from(flood, "flood-0", later), GreylistOutcome::Pass);
        // The victim passes after its delay.
        assert_eq!(
            g.check_from("198.51.100.0/24", "victim", t0 + DELAY),
            GreylistOutcome::Pass
        );
        // Other subnets still create triplets and are still greylisted.
        assert_eq!(
            g.check_from("203.0.113.0/24", "newcomer", later),
            GreylistOutcome::New
        );
    }

    #[test]
    fn a_flood_of_subnets_drops_the_oldest_unconfirmed_and_keeps_passes() {
        let t0 = Instant::now();
        let g = bounded(t0, 10, 1);
        assert_eq!(g.check_from("net-p", "passed", t0), GreylistOutcome::New);
        assert_eq!(
            g.check_from("net-p", "passed", t0 + DELAY),
            GreylistOutcome::Pass
        );
        // Many subnets, one triplet each (within their quota): the table stays at 10.
        for n in 0..100u64 {
            let at = t0 + DELAY + Duration::from_millis(n);
            g.check_from(&format!("net-{n}"), &format!("k-{n}"), at);
        }
        assert_eq!(g.len(), 10);
        let after = t0 + 3 * DELAY;
        // The pass survived; the last nine are still pending and pass; the first went.
        assert_eq!(
            g.check_from("net-p", "passed", after),
            GreylistOutcome::Pass
        );
        assert_eq!(g.check_from("net-99", "k-99", after), GreylistOutcome::Pass);
        assert_eq!(g.check_from("net-91", "k-91", after), GreylistOutcome::Pass);
        assert_eq!(g.len(), 10);
        assert_eq!(g.check_from("net-0", "k-0", after), GreylistOutcome::New);
    }

    #[test]
    fn a_table_of_passes_drops_the_least_recently_used_one() {
        let t0 = Instant::now();
        let g = bounded(t0, 3, 1000);
        for key in ["a", "b", "c"] {
            g.check(key, t0);
        }
        for key in ["a", "b", "c"] {
            assert_eq!(g.check(key, t0 + DELAY), GreylistOutcome::Pass);
        }
        // "a" is used again: "b" is now the least recently used pass.
        let t1 = t0 + 2 * DELAY;
        assert_eq!(g.check("a", t1), GreylistOutcome::Pass);
        assert_eq!(g.check("new", t1), GreylistOutcome::New);
        assert_eq!(g.len(), 3);
        assert_eq!(g.check("a", t1), GreylistOutcome::Pass);
        assert_eq!(g.check("c", t1), GreylistOutcome::Pass);
        // "b" went (it starts over, pushing out the pending "new", the oldest unconfirmed).
        assert_eq!(g.check("b", t1), GreylistOutcome::New);
        assert_eq!(g.check("new", t1 + DELAY), GreylistOutcome::New);
    }

    #[test]
    fn expired_passes_go_before_pending_triplets() {
        let t0 = Instant::now();
        let times = GreylistTimes {
            pass_ttl: Duration::from_secs(3600),
            max_entries: 2,
            ..GreylistTimes::of(&GreylistConfig::default())
        };
        let g = Fixture(Greylist::new(t0), times);
        g.check("old-pass", t0);
        assert_eq!(g.check("old-pass", t0 + DELAY), GreylistOutcome::Pass);
        let t1 = t0 + DELAY + Duration::from_secs(3599);
        assert_eq!(g.check("pending", t1), GreylistOutcome::New);
        // The pass is over at t2; a newcomer takes its place, not the pending triplet's.
        let t2 = t0 + DELAY + Duration::from_secs(3601);
        assert_eq!(g.check("newcomer", t2), GreylistOutcome::New);
        assert_eq!(g.check("pending", t1 + DELAY), GreylistOutcome::Pass);
    }

    #[test]
    fn a_subnet_gets_a_new_quota_after_the_retry_window() {
        let t0 = Instant::now();
        let g = bounded(t0, 1000, 2);
        assert_eq!(g.check("a", t0), GreylistOutcome::New);
        assert_eq!(g.check("b", t0), GreylistOutcome::New);
        assert_eq!(g.check("c", t0), GreylistOutcome::New);
        assert_eq!(
            g.check("c", t0 + DELAY),
            GreylistOutcome::New,
            "not recorded"
        );
        let next = t0 + g.1.retry_window;
        assert_eq!(g.check("c", next), GreylistOutcome::New);
        assert_eq!(
            g.check("c", next + DELAY),
            GreylistOutcome::Pass,
            "recorded"
        );
    }

    #[test]
    fn queues_stay_proportional_to_the_table() {
        let t0 = Instant::now();
        let g = bounded(t0, 100_000, u32::MAX);
        // Every triplet passes: each leaves a stale pending item, which compaction (not a
        // scan per check) must clear.
        for n in 0..20_000u64 {
            let at = t0 + Duration::from_millis(n);
            let key = n.to_string();
            g.check(&key, at);
            g.check(&key, at + DELAY);
        }
        let (pending, passed, windows) = g.queued();
        assert_eq!(g.len(), 20_000);
        assert!(pending <= 2 * g.len() + COMPACT_FLOOR, "{pending}");
        assert!(passed <= 2 * g.len() + COMPACT_FLOOR, "{passed}");
        assert!(windows <= 1, "{windows}");
        // Expired attempts and passes are dropped from the fronts as time goes on.
        let gone = t0 + Duration::from_secs(37 * 86_400);
        g.check("fresh", gone);
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn a_restore_over_max_entries_keeps_passes_and_the_newest_attempts() {
        use std::time::UNIX_EPOCH;
        let t0 = Instant::now();
        let g = greylist(t0);
        g.check("p", t0);
        g.check("p", t0 + DELAY);
        for (n, key) in ["x", "y", "z"].into_iter().enumerate() {
            g.check(key, t0 + DELAY + Duration::from_secs(n as u64));
        }
        let clocks = Clocks::new(
            t0 + DELAY + Duration::from_secs(10),
            UNIX_EPOCH + Duration::from_secs(1_795_438_862),
        );
        let bytes = g.0.snapshot(&clocks, &g.1);
        let small = bounded(clocks.now(), 3, 1000);
        assert_eq!(
            small.0.restore(&bytes, &clocks, &small.1),
            Ok(Restored {
                kept: 3,
                dropped: 1
            })
        );
        let later = clocks.now() + DELAY;
        assert_eq!(small.check("p", later), GreylistOutcome::Pass);
        assert_eq!(small.check("z", later), GreylistOutcome::Pass);
        assert_eq!(small.check("y", later), GreylistOutcome::Pass);
        assert_eq!(
            small.check("x", later),
            GreylistOutcome::New,
            "the oldest attempt went"
        );
    }
}
