//! The reputation table (DESIGN.md §3 `[reputation]`): one decayed history per address
//! (`policy::reputation` decides what a history means), shared by every worker.
//!
//! Keyed by [`reputation::key`]: an IPv4 address, or an IPv6 /64. A dashmap: short shard
//! locks, none held across I/O.
//!
//! Memory is bounded at [`MAX_ENTRIES`] addresses (about 13 MB). A new address that finds the
//! table full first sweeps the histories that decayed to nothing; if that frees too little, the
//! half of the table with the least decayed history (the smallest sum of counts) is forgotten at
//! once, so a flood of one-off addresses costs one sort per 100,000 of them and cannot push out
//! the addresses with a real record, good or bad. An address that arrives while another thread
//! is making room is not recorded.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::policy::reputation::{self, Event, History};

/// Most addresses remembered at once.
pub const MAX_ENTRIES: usize = 200_000;

/// Addresses kept when a full table forgets the ones with the least history.
const KEEP_WHEN_FULL: usize = MAX_ENTRIES / 2;

/// Every address's history.
#[derive(Debug, Default)]
pub struct ReputationTable {
    entries: DashMap<IpAddr, History>,
    /// One thread at a time makes room; the others skip their new address meanwhile.
    evicting: AtomicBool,
}

impl ReputationTable {
    /// An empty table.
    pub fn new() -> ReputationTable {
        ReputationTable::default()
    }

    /// The history kept for `ip` (by its key), if any.
    pub fn history(&self, ip: IpAddr) -> Option<History> {
        self.entries.get(&reputation::key(ip)).map(|entry| *entry)
    }

    /// Adds `event` to `ip`'s history at `now`, making room first when the table is full (see
    /// the module docs).
    pub fn record(&self, ip: IpAddr, event: Event, now: Instant, half_life: Duration) {
        let key = reputation::key(ip);
        if let Some(mut history) = self.entries.get_mut(&key) {
            history.record(event, now, half_life);
            return;
        }
        if self.entries.len() >= MAX_ENTRIES && !self.make_room(now, half_life) {
            return;
        }
        self.entries
            .entry(key)
            .or_insert_with(|| History::new(now))
            .record(event, now, half_life);
    }

    /// Puts a restored history in (a snapshot being loaded); ignored when the table is full.
    pub fn restore(&self, ip: IpAddr, history: History) {
        if self.entries.len() < MAX_ENTRIES {
            self.entries.insert(reputation::key(ip), history);
        }
    }

    /// Every address and its history, copied out (no guard outlives the call), for snapshots.
    pub fn entries(&self) -> Vec<(IpAddr, History)> {
        self.entries
            .iter()
            .map(|entry| (*entry.key(), *entry.value()))
            .collect()
    }

    /// Addresses held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no address is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops decayed histories, then if still full the half with the least history. Returns
    /// whether there is room now (false also when another thread is at it).
    fn make_room(&self, now: Instant, half_life: Duration) -> bool {
        if self.evicting.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.entries
            .retain(|_, history| !history.is_forgotten(now, half_life));
        if self.entries.len() >= MAX_ENTRIES {
            let mut totals: Vec<(f64, IpAddr)> = self
                .entries
                .iter()
                .map(|entry| (entry.value().counts(now, half_life).total(), *entry.key()))
                .collect();
            let drop = totals.len().saturating_sub(KEEP_WHEN_FULL);
            if let Some(last) = drop.checked_sub(1) {
                totals.select_nth_unstable_by(last, |a, b| a.0.total_cmp(&b.0));
                for (_, ip) in totals.iter().take(drop) {
                    self.entries.remove(ip);
                }
            }
            log::warn!(
                "reputation: {MAX_ENTRIES} addresses held; forgot the {drop} with the least \
                 history to make room"
            );
        }
        self.evicting.store(false, Ordering::Release);
        self.entries.len() < MAX_ENTRIES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Standing;

    const HALF_LIFE: Duration = Duration::from_secs(7 * 86_400);

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn events_add_up_per_key() {
        let t0 = Instant::now();
        let table = ReputationTable::new();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        assert!(table.history(a).is_none());
        for n in 0..3 {
            let who = if n % 2 == 0 { a } else { b };
            table.record(who, Event::Pregreet, t0 + Duration::from_secs(n), HALF_LIFE);
        }
        assert_eq!(table.len(), 1, "one /64");
        let history = table.history(b).unwrap();
        assert_eq!(
            history.standing(t0 + Duration::from_secs(3), HALF_LIFE),
            Standing::Bad
        );
        table.record(ip(7), Event::Delivered, t0, HALF_LIFE);
        assert_eq!(table.len(), 2);
        assert_eq!(table.entries().len(), 2);
    }

    #[test]
    fn a_full_table_forgets_the_least_history_first() {
        let t0 = Instant::now();
        let table = ReputationTable::new();
        // A few addresses with a real record, then a flood of one-off events.
        for n in 0..10 {
            for _ in 0..3 {
                table.record(ip(n), Event::Rejected, t0, HALF_LIFE);
            }
        }
        for n in 10..MAX_ENTRIES as u32 {
            table.record(ip(n), Event::Pregreet, t0, HALF_LIFE);
        }
        assert_eq!(table.len(), MAX_ENTRIES);
        let late = ip(u32::MAX);
        table.record(late, Event::Pregreet, t0, HALF_LIFE);
        assert!(table.history(late).is_some(), "room was made");
        assert!(table.len() <= KEEP_WHEN_FULL + 1, "{}", table.len());
        for n in 0..10 {
            assert!(table.history(ip(n)).is_some(), "{n}: a record is kept");
        }
    }

    #[test]
    fn a_full_table_sweeps_what_decayed_away() {
        let t0 = Instant::now();
        let table = ReputationTable::new();
        for n in 0..MAX_ENTRIES as u32 {
            table.record(ip(n), Event::Pregreet, t0, HALF_LIFE);
        }
        let later = t0 + 4 * HALF_LIFE;
        table.record(ip(u32::MAX), Event::Pregreet, later, HALF_LIFE);
        assert_eq!(table.len(), 1, "everything else decayed to nothing");
    }
}
