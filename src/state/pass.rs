//! The PASS cache (DESIGN.md §1.2, postscreen's "PASS OLD"): clients that waited out the greet
//! pause without talking first skip it for `[tarpit] pass_ttl`.
//!
//! Keyed by address, shared by every worker (a dashmap: no lock across I/O, short shard locks).
//! Memory is bounded: expired entries are swept as the map grows, and past
//! [`MAX_ENTRIES`] new passes are not recorded (those clients just wait the pause again).
//!
//! Snapshot entries (`pass.state`, see `snapshot`): `ADDRESS UNTIL_UNIX_MS`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::snapshot::{self, Clocks, Kind, Restored, SnapshotError, Writer};

/// Most addresses remembered at once: about 5 MB of map. A flood of distinct passing
/// addresses beyond it costs them the greet pause, never memory.
pub(crate) const MAX_ENTRIES: usize = 100_000;

/// Addresses that passed, and until when their PASS holds.
#[derive(Debug)]
pub struct PassCache {
    ttl: Duration,
    passed: DashMap<IpAddr, Instant>,
}

impl PassCache {
    /// An empty cache whose entries hold for `ttl` (`[tarpit] pass_ttl`).
    pub fn new(ttl: Duration) -> PassCache {
        PassCache {
            ttl,
            passed: DashMap::new(),
        }
    }

    /// Whether `ip` has a PASS that is still fresh at `now`. Addresses are kept canonical:
    /// `::ffff:a.b.c.d` is `a.b.c.d`.
    pub fn is_fresh(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = ip.to_canonical();
        self.passed.get(&ip).is_some_and(|until| *until > now)
    }

    /// Records a PASS for `ip` from `now`. When the map is full, the expired entries are swept
    /// first; if it is still full the PASS is not recorded.
    pub fn record(&self, ip: IpAddr, now: Instant) {
        let ip = ip.to_canonical();
        if self.passed.len() >= MAX_ENTRIES && !self.passed.contains_key(&ip) {
            self.passed.retain(|_, until| *until > now);
            if self.passed.len() >= MAX_ENTRIES {
                return;
            }
        }
        self.passed.insert(ip, now + self.ttl);
    }

    /// The fresh passes at `clocks.now()` as a snapshot file.
    pub fn snapshot(&self, clocks: &Clocks) -> Vec<u8> {
        let now = clocks.now();
        let fresh: Vec<(IpAddr, Instant)> = self
            .passed
            .iter()
            .filter(|entry| *entry.value() > now)
            .map(|entry| (*entry.key(), *entry.value()))
            .collect();
        let mut writer = Writer::new(Kind::Pass);
        for (ip, until) in fresh {
            writer.entry(format_args!("{ip} {}", clocks.to_unix_ms(until)));
        }
        writer.finish()
    }

    /// Loads a snapshot file: all of it or, on any error, nothing. Expired passes are
    /// dropped; one lasting longer than `pass_ttl` from now (a clock set back, a shorter TTL
    /// since) is cut to it.
    pub fn restore(&self, bytes: &[u8], clocks: &Clocks) -> Result<Restored, SnapshotError> {
        let now = clocks.now();
        let latest = now.checked_add(self.ttl).unwrap_or(now);
        let mut fresh = Vec::new();
        let mut restored = Restored::default();
        for (n, line) in snapshot::entries(Kind::Pass, bytes)? {
            let bad = SnapshotError::Entry(n);
            let [ip, until] = snapshot::fields(line).ok_or(bad.clone())?;
            let ip: IpAddr = ip.parse().map_err(|_| bad.clone())?;
            let until = snapshot::parse_ms(until).ok_or(bad)?;
            match clocks.to_instant(until) {
                Some(until) if until > now => fresh.push((ip, until.min(latest))),
                _ => restored.dropped += 1,
            }
        }
        for (ip, until) in fresh {
            if self.passed.len() >= MAX_ENTRIES {
                restored.dropped += 1;
                continue;
            }
            // A snapshot from before addresses were kept canonical may hold the mapped form.
            self.passed.insert(ip.to_canonical(), until);
            restored.kept += 1;
        }
        Ok(restored)
    }

    /// Entries held (fresh or not yet swept).
    pub fn len(&self) -> usize {
        self.passed.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.passed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_holds_for_its_ttl() {
        let t0 = Instant::now();
        let cache = PassCache::new(Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(!cache.is_fresh(ip, t0));
        cache.record(ip, t0);
        assert!(cache.is_fresh(ip, t0 + Duration::from_secs(59)));
        assert!(!cache.is_fresh(ip, t0 + Duration::from_secs(60)));
        assert!(!cache.is_fresh("192.0.2.8".parse().unwrap(), t0));
    }

    #[test]
    fn a_mapped_address_is_its_ipv4_address() {
        let t0 = Instant::now();
        let cache = PassCache::new(Duration::from_secs(60));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        cache.record(mapped, t0);
        assert!(cache.is_fresh("192.0.2.7".parse().unwrap(), t0));
        assert!(cache.is_fresh(mapped, t0));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_snapshot_keeps_fresh_passes_across_a_restart() {
        use std::time::UNIX_EPOCH;
        let t0 = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_795_438_862);
        let cache = PassCache::new(Duration::from_secs(60));
        let (fresh, stale): (IpAddr, IpAddr) =
            ("192.0.2.7".parse().unwrap(), "2001:db8::7".parse().unwrap());
        cache.record(stale, t0);
        cache.record(fresh, t0 + Duration::from_secs(30));
        let saved_at = Clocks::new(t0 + Duration::from_secs(61), wall);
        let bytes = cache.snapshot(&saved_at);
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap().lines().nth(1),
            Some("192.0.2.7 1795438891000"),
            "the stale one left out; until = saved + 29 s"
        );
        // Restarted 20 s later: a new monotonic clock, the same wall clock.
        let t1 = t0 + Duration::from_secs(1000);
        let loaded_at = Clocks::new(t1, wall + Duration::from_secs(20));
        let restarted = PassCache::new(Duration::from_secs(60));
        let restored = restarted.restore(&bytes, &loaded_at).unwrap();
        assert_eq!(
            restored,
            Restored {
                kept: 1,
                dropped: 0
            }
        );
        assert!(restarted.is_fresh(fresh, t1 + Duration::from_secs(8)));
        assert!(!restarted.is_fresh(fresh, t1 + Duration::from_secs(9)));
        // Loaded too late, it has expired and is dropped.
        let late = Clocks::new(t1, wall + Duration::from_secs(30));
        let restored = PassCache::new(Duration::from_secs(60)).restore(&bytes, &late);
        assert_eq!(
            restored,
            Ok(Restored {
                kept: 0,
                dropped: 1
            })
        );
        // A shorter TTL since the save cuts what was saved.
        let short = PassCache::new(Duration::from_secs(5));
        short.restore(&bytes, &loaded_at).unwrap();
        assert!(short.is_fresh(fresh, t1 + Duration::from_secs(4)));
        assert!(!short.is_fresh(fresh, t1 + Duration::from_secs(5)));
    }

    #[test]
    fn a_bad_entry_loads_nothing() {
        let clocks = Clocks::new(Instant::now(), std::time::SystemTime::now());
        for line in [
            "192.0.2.7",
            "192.0.2.7 x",
            "300.0.0.1 1",
            "192.0.2.7 1 2",
            "",
        ] {
            let mut writer = Writer::new(Kind::Pass);
            writer.entry(format_args!("192.0.2.8 {}", u64::MAX));
            writer.entry(format_args!("{line}"));
            let cache = PassCache::new(Duration::from_secs(60));
            assert_eq!(
                cache.restore(&writer.finish(), &clocks),
                Err(SnapshotError::Entry(3)),
                "{line:?}"
            );
            assert!(cache.is_empty(), "all or nothing");
        }
    }

    #[test]
    fn a_full_cache_sweeps_then_refuses() {
        let t0 = Instant::now();
        let cache = PassCache::new(Duration::from_secs(10));
        for n in 0..MAX_ENTRIES as u32 {
            cache.record(IpAddr::from(n.to_be_bytes()), t0);
        }
        let late: IpAddr = "2001:db8::1".parse().unwrap();
        cache.record(late, t0 + Duration::from_secs(1));
        assert!(!cache.is_fresh(late, t0 + Duration::from_secs(1)), "full");
        assert_eq!(cache.len(), MAX_ENTRIES);
        // Once the old entries expired, a new PASS sweeps them away and fits.
        cache.record(late, t0 + Duration::from_secs(11));
        assert_eq!(cache.len(), 1);
        assert!(cache.is_fresh(late, t0 + Duration::from_secs(11)));
    }
}
