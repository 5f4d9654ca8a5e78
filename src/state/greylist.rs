//! Greylisting (DESIGN.md §3 `[greylist]`): the first attempt of a new triplet is deferred,
//! a retry after `delay` and within `retry_window` passes, and a passed triplet keeps passing
//! for `pass_ttl`, renewed each time it is used. In process for now; shared state comes with
//! the state issue's Redis backend, reached the same way (an action answered by the driver).
//!
//! Memory is bounded: past [`MAX_ENTRIES`] expired entries are swept; if the table is still
//! full, new triplets are not recorded and pass (greylisting fails open, as it does when its
//! store is unreachable), with a warning at most once a minute.
//!
//! Snapshot entries (`greylist.state`, see `snapshot`): `KEY FIRST_SEEN_UNIX_MS
//! PASSED_UNTIL_UNIX_MS` with the key [`snapshot::escape`]d and `-` for a triplet not passed
//! yet.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;

use super::snapshot::{self, Clocks, Kind, Restored, SnapshotError, Writer};
use crate::config::{Greylist as GreylistConfig, GreylistKey};

/// Most triplets remembered at once (about 100 MB at worst with long addresses).
pub const MAX_ENTRIES: usize = 500_000;

/// How often a full table may warn.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// `[greylist]`'s times, all the table needs of the configuration; carried by each check so a
/// reload changes them at once, on either backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GreylistTimes {
    /// A retry passes this long after the first attempt...
    pub delay: Duration,
    /// ...and until this long after it.
    pub retry_window: Duration,
    /// A passed triplet keeps passing this long after its last use.
    pub pass_ttl: Duration,
}

impl GreylistTimes {
    /// The times in `config`.
    pub fn of(config: &GreylistConfig) -> GreylistTimes {
        GreylistTimes {
            delay: config.delay,
            retry_window: config.retry_window,
            pass_ttl: config.pass_ttl,
        }
    }
}

/// What greylisting says about one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GreylistOutcome {
    /// First attempt: deferred; retry after the delay.
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
    entries: DashMap<Box<str>, Triplet>,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last "table full" warning, plus one (0 = never).
    full_warned: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
struct Triplet {
    first_seen: Instant,
    /// Set once a retry passed: passes until then.
    passed_until: Option<Instant>,
}

/// What the session knows that a key may be made of.
#[derive(Clone, Copy, Debug)]
pub struct KeyFacts<'a> {
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
    /// An empty table.
    pub fn new(now: Instant) -> Greylist {
        Greylist {
            entries: DashMap::new(),
            epoch: now,
            full_warned: AtomicU64::new(0),
        }
    }

    /// Decides one recipient's triplet at `now` under `times`, and records the attempt.
    pub fn check(&self, key: &str, now: Instant, times: &GreylistTimes) -> GreylistOutcome {
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(key) {
            self.sweep(now, times.retry_window);
            if self.entries.len() >= MAX_ENTRIES {
                self.warn_full(now);
                return GreylistOutcome::Pass;
            }
        }
        match self.entries.entry(key.into()) {
            MapEntry::Vacant(slot) => {
                slot.insert(Triplet {
                    first_seen: now,
                    passed_until: None,
                });
                GreylistOutcome::New
            }
            MapEntry::Occupied(mut slot) => {
                let triplet = slot.get_mut();
                let outcome = judge(triplet, now, times);
                match outcome {
                    GreylistOutcome::Pass => triplet.passed_until = Some(now + times.pass_ttl),
                    GreylistOutcome::New => {
                        *triplet = Triplet {
                            first_seen: now,
                            passed_until: None,
                        };
                    }
                    GreylistOutcome::Early(_) => {}
                }
                outcome
            }
        }
    }

    /// The triplets that still decide something at `clocks.now()` as a snapshot file.
    pub fn snapshot(&self, clocks: &Clocks, times: &GreylistTimes) -> Vec<u8> {
        let now = clocks.now();
        let live: Vec<(Box<str>, Triplet)> = self
            .entries
            .iter()
            .filter(|entry| is_live(entry.value(), now, times.retry_window))
            .map(|entry| (entry.key().clone(), *entry.value()))
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
    /// are cut to now (first attempt) and `pass_ttl` from now (pass).
    pub fn restore(
        &self,
        bytes: &[u8],
        clocks: &Clocks,
        times: &GreylistTimes,
    ) -> Result<Restored, SnapshotError> {
        let now = clocks.now();
        let latest_pass = now.checked_add(times.pass_ttl).unwrap_or(now);
        let mut live = Vec::new();
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
            };
            if is_live(&triplet, now, times.retry_window) {
                live.push((key, triplet));
            } else {
                restored.dropped += 1;
            }
        }
        for (key, triplet) in live {
            if self.entries.len() >= MAX_ENTRIES {
                restored.dropped += 1;
                continue;
            }
            self.entries.insert(key.into_boxed_str(), triplet);
            restored.kept += 1;
        }
        Ok(restored)
    }

    /// Triplets held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no triplet is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops what no longer decides anything: passes past their time, attempts past the
    /// retry window.
    fn sweep(&self, now: Instant, retry_window: Duration) {
        self.entries
            .retain(|_, triplet| is_live(triplet, now, retry_window));
    }

    fn warn_full(&self, now: Instant) {
        let at = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.full_warned.load(Ordering::Relaxed);
        let every = u64::try_from(FULL_WARNING_EVERY.as_millis()).unwrap_or(u64::MAX);
        if (last == 0 || at.saturating_sub(last) >= every)
            && self
                .full_warned
                .compare_exchange(last, at, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!(
                "greylist: {MAX_ENTRIES} triplets held and none expired; new triplets pass \
                 unrecorded until some expire"
            );
        }
    }
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
pub fn key(elements: &[GreylistKey], facts: &KeyFacts<'_>) -> String {
    let mut key = String::new();
    for element in elements {
        if !key.is_empty() {
            key.push('\u{1f}');
        }
        match element {
            GreylistKey::Subnet => key.push_str(&subnet(facts.client)),
            GreylistKey::Ip => key.push_str(&facts.client.to_canonical().to_string()),
            GreylistKey::Helo => key.push_str(&facts.helo.to_ascii_lowercase()),
            GreylistKey::Sender => key.push_str(&facts.sender.to_ascii_lowercase()),
            GreylistKey::Recipient => key.push_str(&facts.recipient.to_ascii_lowercase()),
            GreylistKey::Rdns => match facts.rdns.and_then(|name| name.split_once('.')) {
                Some((_, domain)) if domain.contains('.') => key.push_str(domain),
                _ => key.push_str(&subnet(facts.client)),
            },
        }
    }
    key
}

/// The client's /24 (IPv4) or /64 (IPv6) network, as text.
fn subnet(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("{net}/64")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DESIGN.md's defaults, checked through `g`.
    struct Table(Greylist, GreylistTimes);

    impl Table {
        fn check(&self, key: &str, now: Instant) -> GreylistOutcome {
            self.0.check(key, now, &self.1)
        }

        fn len(&self) -> usize {
            self.0.len()
        }
    }

    fn greylist(now: Instant) -> Table {
        // DESIGN.md's defaults.
        let times = GreylistTimes::of(&GreylistConfig::default());
        Table(Greylist::new(now), times)
    }

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
    fn a_full_table_sweeps_then_fails_open() {
        let t0 = Instant::now();
        let g = greylist(t0);
        for n in 0..MAX_ENTRIES {
            g.check(&n.to_string(), t0);
        }
        assert_eq!(
            g.check("late", t0),
            GreylistOutcome::Pass,
            "full: fail open"
        );
        assert_eq!(g.len(), MAX_ENTRIES);
        // Past the retry window the old attempts are swept and new triplets recorded again.
        let later = t0 + Duration::from_secs(4 * 3600 + 1);
        assert_eq!(g.check("late", later), GreylistOutcome::New);
        assert_eq!(g.len(), 1);
    }
}
