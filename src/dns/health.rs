//! Zone health: whether each configured zone answers its test points as lists publish them
//! (RFC 5782 §5: 127.0.0.2 listed, 127.0.0.1 not).
//!
//! A zone starts in use (checks must not delay the first clients). A check that finds it
//! answering wrongly sets it aside: lookups in it answer `SetAside` without a query, and
//! each is counted. A check that finds it right again puts it back. A check that could not
//! conclude (a test point timed out or failed) changes nothing. Each transition is logged
//! once; the check itself runs on the resolver thread (`thread::check_zone`).
//!
//! A reload replaces the zone list ([`Zones::replace`]): zones that stay keep their state and
//! figures, new ones start in use and are checked at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use super::{DnsblAnswer, ZoneHealth};
use crate::config;

/// The configured zones' states, in configuration order. Read by the workers (a short read
/// lock per lookup), replaced by a reload.
pub(super) struct Zones {
    zones: RwLock<Arc<[Arc<ZoneState>]>>,
}

/// One zone's state, shared by the workers (reading) and the resolver thread (checking).
pub(super) struct ZoneState {
    pub(super) zone: Arc<str>,
    set_aside: AtomicBool,
    skipped: AtomicU64,
    checks: AtomicU64,
    /// A check is running: a slow one is not doubled by the next interval's.
    checking: AtomicBool,
}

/// What a check concluded.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Both test points answered as published.
    Healthy,
    /// A test point answered wrongly; says what it answered.
    Wrong(String),
    /// A test point timed out or failed, and the other did not answer wrongly.
    Inconclusive,
}

/// The test point that must be listed.
pub(super) const LISTED_TEST_POINT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);

/// The test point that must not be listed.
pub(super) const UNLISTED_TEST_POINT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 1);

/// Judges a zone from its answers for [`LISTED_TEST_POINT`] and [`UNLISTED_TEST_POINT`].
pub(super) fn judge(listed: &DnsblAnswer, unlisted: &DnsblAnswer) -> Verdict {
    let mut wrong = Vec::new();
    match listed {
        DnsblAnswer::Listed(_) => {}
        DnsblAnswer::NotListed => wrong.push(format!("{LISTED_TEST_POINT} not listed")),
        DnsblAnswer::Error(code) => {
            wrong.push(format!("{LISTED_TEST_POINT} answered error code {code}"));
        }
        DnsblAnswer::TempFail | DnsblAnswer::SetAside => {}
    }
    match unlisted {
        DnsblAnswer::NotListed => {}
        DnsblAnswer::Listed(codes) => {
            let codes: Vec<String> = codes.iter().map(ToString::to_string).collect();
            wrong.push(format!(
                "{UNLISTED_TEST_POINT} listed ({})",
                codes.join(", ")
            ));
        }
        DnsblAnswer::Error(code) => {
            wrong.push(format!("{UNLISTED_TEST_POINT} answered error code {code}"));
        }
        DnsblAnswer::TempFail | DnsblAnswer::SetAside => {}
    }
    if !wrong.is_empty() {
        return Verdict::Wrong(wrong.join("; "));
    }
    let failed =
        |answer: &DnsblAnswer| matches!(answer, DnsblAnswer::TempFail | DnsblAnswer::SetAside);
    if failed(listed) || failed(unlisted) {
        return Verdict::Inconclusive;
    }
    Verdict::Healthy
}

impl Zones {
    pub(super) fn new(zones: &[config::Dnsbl]) -> Zones {
        Zones {
            zones: RwLock::new(
                zones
                    .iter()
                    .map(|dnsbl| ZoneState::new(&dnsbl.zone))
                    .collect(),
            ),
        }
    }

    /// The zones of a reloaded configuration: those already known keep their state and
    /// figures, new ones start in use.
    pub(super) fn replace(&self, zones: &[config::Dnsbl]) {
        let old = self.snapshot();
        let new: Arc<[Arc<ZoneState>]> = zones
            .iter()
            .map(|dnsbl| {
                old.iter()
                    .find(|state| state.zone == dnsbl.zone)
                    .map_or_else(|| ZoneState::new(&dnsbl.zone), Arc::clone)
            })
            .collect();
        *self.zones.write().unwrap_or_else(PoisonError::into_inner) = new;
    }

    /// The zones now, for the checker to walk without holding the lock.
    pub(super) fn snapshot(&self) -> Arc<[Arc<ZoneState>]> {
        Arc::clone(&self.zones.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether `zone` is set aside; if so, counts the lookup skipped. A zone not configured
    /// (no health state) is never set aside.
    pub(super) fn skip_if_set_aside(&self, zone: &str) -> bool {
        let zones = self.snapshot();
        let Some(state) = zones.iter().find(|state| &*state.zone == zone) else {
            return false;
        };
        if !state.set_aside.load(Ordering::Relaxed) {
            return false;
        }
        state.skipped.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub(super) fn report(&self) -> Vec<ZoneHealth> {
        self.snapshot()
            .iter()
            .map(|state| ZoneHealth {
                zone: Arc::clone(&state.zone),
                set_aside: state.set_aside.load(Ordering::Relaxed),
                skipped: state.skipped.load(Ordering::Relaxed),
                checks: state.checks.load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl ZoneState {
    fn new(zone: &Arc<str>) -> Arc<ZoneState> {
        Arc::new(ZoneState {
            zone: Arc::clone(zone),
            set_aside: AtomicBool::new(false),
            skipped: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            checking: AtomicBool::new(false),
        })
    }

    /// Marks a check as started; false if one is already running.
    pub(super) fn start_check(&self) -> bool {
        !self.checking.swap(true, Ordering::AcqRel)
    }

    /// Records a finished check and logs a transition. Returns true when the zone has just
    /// been set aside (its cached answers are then suspect).
    pub(super) fn finish_check(&self, verdict: &Verdict) -> bool {
        self.checks.fetch_add(1, Ordering::Relaxed);
        self.checking.store(false, Ordering::Release);
        let zone = &self.zone;
        match verdict {
            Verdict::Healthy => {
                if self.set_aside.swap(false, Ordering::Relaxed) {
                    log::info!(
                        "dns: zone {zone} answers its test points correctly again; clients are \
                         checked against it again (it was set aside for {} lookups)",
                        self.skipped.load(Ordering::Relaxed)
                    );
                }
                false
            }
            Verdict::Wrong(what) => {
                let newly = !self.set_aside.swap(true, Ordering::Relaxed);
                if newly {
                    log::warn!(
                        "dns: zone {zone} answered its test points wrongly ({what}): set aside; \
                         clients are not checked against it until it answers its test points \
                         correctly (a public or open resolver blocked by the list is a usual \
                         cause: use a local recursive resolver)"
                    );
                }
                newly
            }
            Verdict::Inconclusive => {
                log::debug!("dns: zone {zone}: health check inconclusive (timeout or failure)");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn listed(last: u8) -> DnsblAnswer {
        DnsblAnswer::Listed(vec![Ipv4Addr::new(127, 0, 0, last)])
    }

    #[test]
    fn verdicts() {
        use DnsblAnswer::{Error, NotListed, TempFail};
        let blocked = Error(Ipv4Addr::new(127, 255, 255, 254));
        let healthy = [(listed(2), NotListed)];
        let wrong = [
            (NotListed, NotListed),
            (listed(2), listed(2)),
            (blocked.clone(), blocked.clone()),
            (listed(2), blocked.clone()),
            // A wrong answer is conclusive even when the other test point failed.
            (TempFail, listed(2)),
            (NotListed, TempFail),
        ];
        let inconclusive = [
            (TempFail, NotListed),
            (listed(2), TempFail),
            (TempFail, TempFail),
        ];
        for (l, u) in &healthy {
            assert_eq!(judge(l, u), Verdict::Healthy, "{l:?} {u:?}");
        }
        for (l, u) in &wrong {
            assert!(matches!(judge(l, u), Verdict::Wrong(_)), "{l:?} {u:?}");
        }
        for (l, u) in &inconclusive {
            assert_eq!(judge(l, u), Verdict::Inconclusive, "{l:?} {u:?}");
        }
        assert_eq!(
            judge(&listed(2), &listed(2)),
            Verdict::Wrong("127.0.0.1 listed (127.0.0.2)".to_owned())
        );
    }

    #[test]
    fn transitions_and_skips() {
        let zones = Zones::new(&[config::Dnsbl {
            zone: Arc::from("bl.test"),
            weight: 1,
            codes: Vec::new(),
            reply: None,
        }]);
        let state = Arc::clone(&zones.snapshot()[0]);
        assert!(!zones.skip_if_set_aside("bl.test"));
        assert!(state.start_check());
        assert!(!state.start_check(), "one check at a time");
        assert!(state.finish_check(&Verdict::Wrong("x".to_owned())));
        assert!(zones.skip_if_set_aside("bl.test"));
        assert!(!zones.skip_if_set_aside("other.test"));
        // Still wrong: not a new transition; inconclusive: unchanged.
        assert!(!state.finish_check(&Verdict::Wrong("x".to_owned())));
        assert!(!state.finish_check(&Verdict::Inconclusive));
        assert!(zones.skip_if_set_aside("bl.test"));
        assert!(!state.finish_check(&Verdict::Healthy));
        assert!(!zones.skip_if_set_aside("bl.test"));
        let report = zones.report();
        assert_eq!(
            report,
            vec![ZoneHealth {
                zone: Arc::from("bl.test"),
                set_aside: false,
                skipped: 2,
                checks: 4,
            }]
        );
    }

    #[test]
    fn a_reload_keeps_known_zones_and_adds_new_ones_in_use() {
        let dnsbl = |zone: &str| config::Dnsbl {
            zone: Arc::from(zone),
            weight: 1,
            codes: Vec::new(),
            reply: None,
        };
        let zones = Zones::new(&[dnsbl("bl.test"), dnsbl("gone.test")]);
        let state = Arc::clone(&zones.snapshot()[0]);
        assert!(state.start_check());
        state.finish_check(&Verdict::Wrong("x".to_owned()));
        zones.replace(&[dnsbl("new.test"), dnsbl("bl.test")]);
        let report = zones.report();
        let names: Vec<&str> = report.iter().map(|z| &*z.zone).collect();
        assert_eq!(names, ["new.test", "bl.test"]);
        assert!(!report[0].set_aside, "a new zone starts in use");
        assert!(report[1].set_aside, "a known zone keeps its state");
        assert!(
            !zones.skip_if_set_aside("gone.test"),
            "a dropped zone is not consulted"
        );
    }
}
