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
//!
//! Snapshot entries (`reputation.state`, see `snapshot`): `KEY UPDATED_UNIX_MS BAD DELIVERED
//! PASSES`, the counts as of the update time (decimal numbers).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::snapshot::{self, Clocks, Kind, Restored, SnapshotError, Writer};
use crate::policy::reputation::{self, Counts, Event, History};

/// Most addresses remembered at once.
pub(crate) const MAX_ENTRIES: usize = 200_000;

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

    /// The histories not yet decayed to nothing at `clocks.now()` as a snapshot file.
    pub fn snapshot(&self, clocks: &Clocks, half_life: Duration) -> Vec<u8> {
        let now = clocks.now();
        let kept: Vec<(IpAddr, History)> = self
            .entries
            .iter()
            .filter(|entry| !entry.value().is_forgotten(now, half_life))
            .map(|entry| (*entry.key(), *entry.value()))
            .collect();
        let mut writer = Writer::new(Kind::Reputation);
        for (ip, history) in kept {
            // As of the last update: what was stored, so a save and a load change nothing.
            let Counts {
                bad,
                delivered,
                passes,
            } = history.counts(history.updated(), half_life);
            let updated = clocks.to_unix_ms(history.updated());
            writer.entry(format_args!(
                "{ip} {updated} {} {} {}",
                bad as f32, delivered as f32, passes as f32
            ));
        }
        writer.finish()
    }

    /// Loads a snapshot file: all of it or, on any error, nothing. Histories that decayed to
    /// nothing by now are dropped; an update time a clock set back put in the future counts
    /// as now.
    pub fn restore(
        &self,
        bytes: &[u8],
        clocks: &Clocks,
        half_life: Duration,
    ) -> Result<Restored, SnapshotError> {
        let now = clocks.now();
        let mut kept = Vec::new();
        let mut restored = Restored::default();
        for (n, line) in snapshot::entries(Kind::Reputation, bytes)? {
            let bad_line = SnapshotError::Entry(n);
            let [ip, updated, bad, delivered, passes] =
                snapshot::fields(line).ok_or(bad_line.clone())?;
            let ip: IpAddr = ip.parse().map_err(|_| bad_line.clone())?;
            let updated = snapshot::parse_ms(updated).ok_or(bad_line.clone())?;
            let count = |field: &str| field.parse::<f64>().ok();
            let counts = Counts {
                bad: count(bad).ok_or(bad_line.clone())?,
                delivered: count(delivered).ok_or(bad_line.clone())?,
                passes: count(passes).ok_or(bad_line.clone())?,
            };
            // A time the monotonic clock cannot express is long past: decayed away.
            let Some(updated) = clocks.to_instant(updated) else {
                restored.dropped += 1;
                continue;
            };
            let history = History::from_counts(counts, updated.min(now)).ok_or(bad_line)?;
            if history.is_forgotten(now, half_life) {
                restored.dropped += 1;
            } else {
                kept.push((ip, history));
            }
        }
        for (ip, history) in kept {
            if self.entries.len() >= MAX_ENTRIES {
                restored.dropped += 1;
                continue;
            }
            self.entries.insert(reputation::key(ip), history);
            restored.kept += 1;
        }
        Ok(restored)
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
    }

    #[test]
    fn a_snapshot_keeps_histories_across_a_restart() {
        use std::time::UNIX_EPOCH;
        let t0 = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_795_438_862);
        let table = ReputationTable::new();
        let bad: IpAddr = "2001:db8:1:2::9".parse().unwrap();
        for n in 0..3 {
            table.record(bad, Event::Pregreet, t0 + Duration::from_secs(n), HALF_LIFE);
        }
        table.record(ip(7), Event::Delivered, t0, HALF_LIFE);
        table.record(ip(8), Event::Pregreet, t0, HALF_LIFE);
        // Saved long after ip(8)'s one event decayed to nothing: left out.
        let saved = t0 + 4 * HALF_LIFE;
        table.record(bad, Event::Rejected, saved, HALF_LIFE);
        table.record(ip(7), Event::Delivered, saved, HALF_LIFE);
        let bytes = table.snapshot(&Clocks::new(saved, wall), HALF_LIFE);
        assert_eq!(
            String::from_utf8_lossy(&bytes).lines().count(),
            4,
            "header, 2, end"
        );

        let t1 = t0 + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        let loaded = Clocks::new(t1, wall + day);
        let restarted = ReputationTable::new();
        let restored = restarted.restore(&bytes, &loaded, HALF_LIFE).unwrap();
        assert_eq!(
            restored,
            Restored {
                kept: 2,
                dropped: 0
            }
        );
        let before = table.history(bad).unwrap().counts(saved + day, HALF_LIFE);
        let after = restarted.history(bad).unwrap().counts(t1, HALF_LIFE);
        assert!(
            (before.bad - after.bad).abs() < 1e-3,
            "{before:?} {after:?}"
        );
        assert_eq!(
            restarted.history(ip(7)).unwrap().standing(t1, HALF_LIFE),
            crate::policy::Standing::Good
        );
        // Loaded a year later: everything decayed away.
        let year = Clocks::new(t1, wall + 52 * 7 * day);
        let restored = ReputationTable::new().restore(&bytes, &year, HALF_LIFE);
        assert_eq!(
            restored,
            Ok(Restored {
                kept: 0,
                dropped: 2
            })
        );
    }

    #[test]
    fn bad_counts_load_nothing() {
        let clocks = Clocks::new(Instant::now(), std::time::SystemTime::now());
        for line in [
            "192.0.2.7 1 1 1",
            "192.0.2.7 1 NaN 0 0",
            "192.0.2.7 1 inf 0 0",
            "192.0.2.7 1 -1 0 0",
            "192.0.2.7 1 x 0 0",
            "192.0.2.x 1 1 0 0",
        ] {
            let mut writer = Writer::new(Kind::Reputation);
            writer.entry(format_args!("{line}"));
            let table = ReputationTable::new();
            assert_eq!(
                table.restore(&writer.finish(), &clocks, HALF_LIFE),
                Err(SnapshotError::Entry(2)),
                "{line}"
            );
            assert!(table.is_empty());
        }
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
