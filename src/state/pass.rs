//! The PASS cache (DESIGN.md §1.2, postscreen's "PASS OLD"): clients that waited out the greet
//! pause without talking first skip it for `[tarpit] pass_ttl`.
//!
//! Keyed by address, shared by every worker (a dashmap: no lock across I/O, short shard locks).
//! Memory is bounded: expired entries are swept as the map grows, and past
//! [`MAX_ENTRIES`] new passes are not recorded (those clients just wait the pause again).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Most addresses remembered at once: about 5 MB of map. A flood of distinct passing
/// addresses beyond it costs them the greet pause, never memory.
pub const MAX_ENTRIES: usize = 100_000;

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

    /// Whether `ip` has a PASS that is still fresh at `now`.
    pub fn is_fresh(&self, ip: IpAddr, now: Instant) -> bool {
        self.passed.get(&ip).is_some_and(|until| *until > now)
    }

    /// Records a PASS for `ip` from `now`. When the map is full, the expired entries are swept
    /// first; if it is still full the PASS is not recorded.
    pub fn record(&self, ip: IpAddr, now: Instant) {
        if self.passed.len() >= MAX_ENTRIES && !self.passed.contains_key(&ip) {
            self.passed.retain(|_, until| *until > now);
            if self.passed.len() >= MAX_ENTRIES {
                return;
            }
        }
        self.passed.insert(ip, now + self.ttl);
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
