//! Reputation (DESIGN.md §3 `[reputation]`): what an address's own past says about it.
//!
//! Each address keeps three counters: bad events (a pregreet, a reject, protocol abuse), its
//! delivered messages and its greylist passes. Counters decay exponentially: a count is worth
//! `value × 2^(−Δt / half_life)` after `Δt`. They are stored as of their last update and decayed
//! lazily, when an event is added or the history is read, so nothing runs in the background.
//!
//! From the decayed counts (see [`History::standing`]):
//! - a **delivery record** (decayed deliveries ≥ [`DELIVERY_RECORD`], i.e. at least one
//!   delivered message within about the last half-life) makes the address [`Standing::Good`]:
//!   no weight, whatever else it did;
//! - else the history is **mostly bad** ([`Standing::Bad`], `weight` added to the score) when
//!   the bad events reach [`BAD_AT_LEAST`] and are more than twice the good ones (deliveries and
//!   greylist passes), as DESIGN.md §3 says;
//! - else it is [`Standing::Neutral`], or [`Standing::Unknown`] when there is no history left.
//!
//! Pure: every function takes `now`; the table that holds the histories is
//! `crate::state::ReputationTable`, and the session decides with [`weight`].

use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Decayed bad events from which a history can be mostly bad (DESIGN.md §3).
pub const BAD_AT_LEAST: f64 = 3.0;

/// Decayed deliveries that make a delivery record: one message delivered within the last
/// half-life (a lone delivery decays to exactly 0.5 after one half-life). An address that
/// delivers is a mail server with a spam problem at worst; its reputation never tarpits it.
pub const DELIVERY_RECORD: f64 = 0.5;

/// How far below a threshold a decayed count may be and still meet it. Without it three bad
/// events a second apart would decay to 2.99999 and never count as three; 0.05 lets three
/// events spread over about four hours (at the default 7-day half-life) count whole.
const CLOSE_ENOUGH: f64 = 0.05;

/// A history whose decayed counts add up to less than this says nothing any more: the table
/// drops it when it needs room and snapshots leave it out. One event reaches it after about
/// 3.3 half-lives (23 days at the default 7 days).
pub const FORGOTTEN_BELOW: f64 = 0.1;

/// Largest count a history holds (a restored snapshot is clamped to it), so arithmetic on
/// counts stays finite whatever a file says.
pub const MAX_COUNT: f64 = 1e9;

/// What the history is for: `[reputation]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reputation {
    /// Keep per-IP history.
    pub enabled: bool,
    /// Decay of past events.
    pub half_life: Duration,
    /// Added to the score of a mostly bad address.
    pub weight: i32,
}

/// Something an address did that its reputation remembers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Talked before the greeting (bad).
    Pregreet,
    /// Was refused by tarmac: a reject verdict, a deny-list entry, a rule's reject (bad).
    Rejected,
    /// Abused the protocol: too many errors (`421`), bare CR/LF in a body (bad).
    ProtocolAbuse,
    /// Retried a greylisted triplet in time, or used a passed one (good).
    GreylistPass,
    /// Had a message accepted by the downstream (good).
    Delivered,
}

/// What an address's history says, for the verdict and the close line's `rep=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// No history, or all of it decayed away.
    Unknown,
    /// Some history, neither mostly bad nor with a delivery record.
    Neutral,
    /// A delivery record: never weighted.
    Good,
    /// Mostly bad: `weight` joins the score.
    Bad,
}

/// One address's decayed counters, as of `updated`. `f32` keeps an entry small (the table
/// holds up to 200,000); the arithmetic is done in `f64`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct History {
    bad: f32,
    delivered: f32,
    passes: f32,
    updated: Instant,
}

/// A history's counters decayed to some moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Counts {
    /// Pregreets, rejects and protocol abuse.
    pub bad: f64,
    /// Messages the downstream accepted.
    pub delivered: f64,
    /// Greylist passes.
    pub passes: f64,
}

impl Default for Reputation {
    fn default() -> Self {
        Reputation {
            enabled: true,
            half_life: Duration::from_secs(7 * 86_400),
            weight: 2,
        }
    }
}

impl Event {
    /// Whether the event counts against the address.
    pub fn is_bad(self) -> bool {
        matches!(
            self,
            Event::Pregreet | Event::Rejected | Event::ProtocolAbuse
        )
    }
}

impl Standing {
    /// The close line's `rep=` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Unknown => "none",
            Standing::Neutral => "neutral",
            Standing::Good => "good",
            Standing::Bad => "bad",
        }
    }
}

impl Counts {
    /// Good events: deliveries and greylist passes.
    pub fn good(&self) -> f64 {
        self.delivered + self.passes
    }

    /// Every event, good or bad.
    pub fn total(&self) -> f64 {
        self.bad + self.good()
    }
}

impl History {
    /// An empty history at `now`.
    pub fn new(now: Instant) -> History {
        History {
            bad: 0.0,
            delivered: 0.0,
            passes: 0.0,
            updated: now,
        }
    }

    /// A history with these counts as of `updated` (a snapshot being restored); `None` when a
    /// count is negative or not a number. Counts above [`MAX_COUNT`] are clamped to it.
    pub fn from_counts(counts: Counts, updated: Instant) -> Option<History> {
        let valid = |n: f64| n.is_finite() && n >= 0.0;
        if !(valid(counts.bad) && valid(counts.delivered) && valid(counts.passes)) {
            return None;
        }
        let clamp = |n: f64| n.min(MAX_COUNT) as f32;
        Some(History {
            bad: clamp(counts.bad),
            delivered: clamp(counts.delivered),
            passes: clamp(counts.passes),
            updated,
        })
    }

    /// Adds `event` at `now`, decaying the older counts first.
    pub fn record(&mut self, event: Event, now: Instant, half_life: Duration) {
        let mut counts = self.counts(now, half_life);
        let count = match event {
            Event::Pregreet | Event::Rejected | Event::ProtocolAbuse => &mut counts.bad,
            Event::GreylistPass => &mut counts.passes,
            Event::Delivered => &mut counts.delivered,
        };
        *count = (*count + 1.0).min(MAX_COUNT);
        *self = History {
            bad: counts.bad as f32,
            delivered: counts.delivered as f32,
            passes: counts.passes as f32,
            updated: self.updated.max(now),
        };
    }

    /// The counts decayed to `now` (a `now` before the last update counts as no time passed).
    pub fn counts(&self, now: Instant, half_life: Duration) -> Counts {
        let factor = decay(now.saturating_duration_since(self.updated), half_life);
        Counts {
            bad: f64::from(self.bad) * factor,
            delivered: f64::from(self.delivered) * factor,
            passes: f64::from(self.passes) * factor,
        }
    }

    /// When the counts were last brought up to date.
    pub fn updated(&self) -> Instant {
        self.updated
    }

    /// What the history says at `now` (see the module docs).
    pub fn standing(&self, now: Instant, half_life: Duration) -> Standing {
        let counts = self.counts(now, half_life);
        if counts.delivered >= DELIVERY_RECORD {
            Standing::Good
        } else if counts.bad + CLOSE_ENOUGH >= BAD_AT_LEAST && counts.bad > 2.0 * counts.good() {
            Standing::Bad
        } else if counts.total() < FORGOTTEN_BELOW {
            Standing::Unknown
        } else {
            Standing::Neutral
        }
    }

    /// Whether the history decayed to nothing worth keeping at `now`.
    pub fn is_forgotten(&self, now: Instant, half_life: Duration) -> bool {
        self.counts(now, half_life).total() < FORGOTTEN_BELOW
    }
}

/// The standing of an address whose history may be missing.
pub fn standing(history: Option<&History>, now: Instant, half_life: Duration) -> Standing {
    history.map_or(Standing::Unknown, |h| h.standing(now, half_life))
}

/// What a standing adds to the score: `weight` for a mostly bad history when reputation is
/// enabled, else 0.
pub fn weight(standing: Standing, config: &Reputation) -> i32 {
    if config.enabled && standing == Standing::Bad {
        config.weight
    } else {
        0
    }
}

/// The address a history is kept under: an IPv4 address as is (IPv4-mapped IPv6 addresses as
/// IPv4), an IPv6 address by its /64. One IPv6 host usually holds a whole /64 and can rotate
/// through it at will, so per-address histories would neither catch it nor stay bounded;
/// IPv4 addresses are scarce and shared by NAT, so spamd and postscreen key by address.
pub fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !u128::from(u64::MAX);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

/// `2^(−elapsed / half_life)`; a zero half-life forgets everything at once.
fn decay(elapsed: Duration, half_life: Duration) -> f64 {
    if half_life.is_zero() {
        return if elapsed.is_zero() { 1.0 } else { 0.0 };
    }
    0.5f64.powf(elapsed.as_secs_f64() / half_life.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);
    const HALF_LIFE: Duration = Duration::from_secs(7 * 86_400);

    fn with(events: &[(u64, Event)], t0: Instant) -> History {
        let mut history = History::new(t0);
        for &(secs, event) in events {
            history.record(event, t0 + Duration::from_secs(secs), HALF_LIFE);
        }
        history
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-4
    }

    #[test]
    fn counts_halve_after_each_half_life() {
        let t0 = Instant::now();
        let history = with(&[(0, Event::Pregreet)], t0);
        assert!(close(history.counts(t0, HALF_LIFE).bad, 1.0));
        assert!(close(history.counts(t0 + HALF_LIFE, HALF_LIFE).bad, 0.5));
        assert!(close(
            history.counts(t0 + 2 * HALF_LIFE, HALF_LIFE).bad,
            0.25
        ));
        // Updated lazily: a second event a half-life later adds to the decayed first.
        let mut later = history;
        later.record(Event::Delivered, t0 + HALF_LIFE, HALF_LIFE);
        let counts = later.counts(t0 + HALF_LIFE, HALF_LIFE);
        assert!(
            close(counts.bad, 0.5) && close(counts.delivered, 1.0),
            "{counts:?}"
        );
        assert_eq!(later.updated(), t0 + HALF_LIFE);
        // Reading with an older `now` (another worker's clock) never grows a count.
        assert!(close(later.counts(t0, HALF_LIFE).bad, 0.5));
    }

    #[test]
    fn mostly_bad_needs_three_bad_events_and_twice_the_good_ones() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let table = [
            (&[][..], Standing::Unknown),
            (
                &[(0, Event::Pregreet), (1, Event::Rejected)][..],
                Standing::Neutral,
            ),
            (
                &[
                    (0, Event::Pregreet),
                    (1, Event::Rejected),
                    (2, Event::ProtocolAbuse),
                ][..],
                Standing::Bad,
            ),
            (
                &[
                    (0, Event::Pregreet),
                    (1, Event::Pregreet),
                    (2, Event::Pregreet),
                    (3, Event::GreylistPass),
                ][..],
                Standing::Bad,
            ),
            (
                // 3 bad, 2 good: not more than twice.
                &[
                    (0, Event::Pregreet),
                    (1, Event::Pregreet),
                    (2, Event::Pregreet),
                    (3, Event::GreylistPass),
                    (4, Event::GreylistPass),
                ][..],
                Standing::Neutral,
            ),
        ];
        for (events, expected) in table {
            assert_eq!(
                with(events, t0).standing(now, HALF_LIFE),
                expected,
                "{events:?}"
            );
        }
    }

    #[test]
    fn events_hours_apart_count_whole_days_apart_decay() {
        let t0 = Instant::now();
        let hour = 3600;
        let history = with(
            &[
                (0, Event::Pregreet),
                (hour, Event::Pregreet),
                (2 * hour, Event::Pregreet),
            ],
            t0,
        );
        let at = t0 + Duration::from_secs(3 * hour);
        assert!(
            history.counts(at, HALF_LIFE).bad < BAD_AT_LEAST,
            "decayed a little"
        );
        assert_eq!(history.standing(at, HALF_LIFE), Standing::Bad);
        // A day apart: 1 + 2^(-1/7) + 2^(-2/7) ≈ 2.73, not three.
        let spread = with(
            &[
                (0, Event::Pregreet),
                (DAY.as_secs(), Event::Pregreet),
                (2 * DAY.as_secs(), Event::Pregreet),
            ],
            t0,
        );
        assert_eq!(spread.standing(t0 + 2 * DAY, HALF_LIFE), Standing::Neutral);
        // And a bad history fades: after two half-lives three events are worth 0.75.
        assert_eq!(
            history.standing(at + 2 * HALF_LIFE, HALF_LIFE),
            Standing::Neutral
        );
    }

    #[test]
    fn a_delivery_record_cancels_the_weight_for_a_half_life() {
        let t0 = Instant::now();
        let mut events: Vec<(u64, Event)> = (0..10).map(|n| (n, Event::Rejected)).collect();
        events.push((10, Event::Delivered));
        let history = with(&events, t0);
        let config = Reputation::default();
        let at = t0 + Duration::from_secs(10);
        assert_eq!(history.standing(at, HALF_LIFE), Standing::Good);
        assert_eq!(weight(history.standing(at, HALF_LIFE), &config), 0);
        // One delivery decays to 0.5 after one half-life: still a record.
        assert_eq!(history.standing(at + HALF_LIFE, HALF_LIFE), Standing::Good);
        // A day past that the record is gone (0.45), and the ten rejects (4.5 by then) plus a
        // new one are more than twice the good: bad again.
        let mut fresh = history;
        fresh.record(Event::Rejected, at + HALF_LIFE + DAY, HALF_LIFE);
        assert_eq!(
            fresh.standing(at + HALF_LIFE + DAY, HALF_LIFE),
            Standing::Bad,
            "{:?}",
            fresh.counts(at + HALF_LIFE + DAY, HALF_LIFE)
        );
    }

    #[test]
    fn weight_only_for_bad_and_only_when_enabled() {
        let mut config = Reputation::default();
        assert_eq!(config.weight, 2, "DESIGN.md's default");
        assert_eq!(weight(Standing::Bad, &config), 2);
        for standing in [Standing::Unknown, Standing::Neutral, Standing::Good] {
            assert_eq!(weight(standing, &config), 0, "{standing:?}");
        }
        config.weight = 0;
        assert_eq!(weight(Standing::Bad, &config), 0);
        config.weight = 5;
        config.enabled = false;
        assert_eq!(weight(Standing::Bad, &config), 0);
        assert_eq!(standing(None, Instant::now(), HALF_LIFE), Standing::Unknown);
    }

    #[test]
    fn forgotten_after_about_three_half_lives() {
        let t0 = Instant::now();
        let history = with(&[(0, Event::Pregreet)], t0);
        assert!(!history.is_forgotten(t0 + 3 * HALF_LIFE, HALF_LIFE));
        assert!(history.is_forgotten(t0 + 4 * HALF_LIFE, HALF_LIFE));
        assert_eq!(
            history.standing(t0 + 4 * HALF_LIFE, HALF_LIFE),
            Standing::Unknown
        );
        let zero = Duration::ZERO;
        assert!(!history.is_forgotten(t0, zero));
        assert!(history.is_forgotten(t0 + Duration::from_secs(1), zero));
    }

    #[test]
    fn restored_counts_are_checked_and_clamped() {
        let t0 = Instant::now();
        let counts = |bad| Counts {
            bad,
            delivered: 0.0,
            passes: 0.0,
        };
        assert!(History::from_counts(counts(f64::NAN), t0).is_none());
        assert!(History::from_counts(counts(f64::INFINITY), t0).is_none());
        assert!(History::from_counts(counts(-1.0), t0).is_none());
        let big = History::from_counts(counts(1e300), t0).unwrap();
        assert!(close(big.counts(t0, HALF_LIFE).bad / MAX_COUNT, 1.0));
        let ok = History::from_counts(counts(3.0), t0).unwrap();
        assert_eq!(ok.standing(t0, HALF_LIFE), Standing::Bad);
    }

    #[test]
    fn keys_are_addresses_or_ipv6_64s() {
        let table = [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
            ("2001:db8:1:2::", "2001:db8:1:2::"),
        ];
        for (ip, expected) in table {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(key(ip).to_string(), expected);
        }
        assert!(Event::Pregreet.is_bad() && !Event::Delivered.is_bad());
        assert_eq!(Standing::Bad.as_str(), "bad");
    }
}
