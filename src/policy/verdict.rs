//! The verdict from a score (DESIGN.md §1.3, `[scoring]`).
//!
//! The score is the sum the caller gathered (DNSBL weights, reputation, `score` rules); this
//! module only places it against the three thresholds. Local lists and terminal rules decide
//! before any score is needed and never come through here.

/// What happens to a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Skip further checks (no pause, no tarpit, no greylist, no limits).
    Allow,
    /// Normal treatment.
    Pass,
    /// Delay every reply.
    Tarpit,
    /// Refuse (immediately or enforced, per `reject_mode`).
    Reject,
}

/// The thresholds a score is placed against: `[scoring]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scoring {
    /// Score ≤ this: allow.
    pub allow_at: i32,
    /// Score ≥ this: tarpit.
    pub tarpit_at: i32,
    /// Score ≥ this: reject.
    pub reject_at: i32,
    /// How a reject is delivered.
    pub reject_mode: RejectMode,
}

/// `[scoring] reject_mode`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectMode {
    /// `554` as the final greeting line.
    Immediate,
    /// Normal banner, `550 5.7.1` on every RCPT.
    Enforce,
}

impl Verdict {
    /// `score <= allow_at` → Allow; `>= reject_at` → Reject; `>= tarpit_at` → Tarpit; else Pass.
    ///
    /// The checks run in that order, so thresholds that overlap (config validation requires
    /// `allow_at < tarpit_at <= reject_at`, but a caller may build `Scoring` by hand) resolve
    /// towards the milder outcome for allow and the harsher one between tarpit and reject: an
    /// operator's allow threshold is never overruled by a badly ordered reject threshold.
    pub fn from_score(score: i32, scoring: &Scoring) -> Verdict {
        if score <= scoring.allow_at {
            Verdict::Allow
        } else if score >= scoring.reject_at {
            Verdict::Reject
        } else if score >= scoring.tarpit_at {
            Verdict::Tarpit
        } else {
            Verdict::Pass
        }
    }

    /// The close log's `verdict=` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Pass => "pass",
            Verdict::Tarpit => "tarpit",
            Verdict::Reject => "reject",
        }
    }
}

impl Default for Scoring {
    fn default() -> Self {
        Scoring {
            allow_at: -1,
            tarpit_at: 1,
            reject_at: 3,
            reject_mode: RejectMode::Immediate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RejectMode;
    use super::*;

    fn scoring(allow_at: i32, tarpit_at: i32, reject_at: i32) -> Scoring {
        Scoring {
            allow_at,
            tarpit_at,
            reject_at,
            reject_mode: RejectMode::Immediate,
        }
    }

    #[test]
    fn default_scoring_boundaries() {
        let default = Scoring::default();
        assert_eq!(
            (default.allow_at, default.tarpit_at, default.reject_at),
            (-1, 1, 3),
            "the table below assumes DESIGN.md's defaults"
        );
        let table = [
            (i32::MIN, Verdict::Allow),
            (-5, Verdict::Allow),
            (-2, Verdict::Allow),
            (-1, Verdict::Allow),
            (0, Verdict::Pass),
            (1, Verdict::Tarpit),
            (2, Verdict::Tarpit),
            (3, Verdict::Reject),
            (4, Verdict::Reject),
            (i32::MAX, Verdict::Reject),
        ];
        for (score, expected) in table {
            assert_eq!(Verdict::from_score(score, &default), expected, "{score}");
        }
    }

    #[test]
    fn odd_scorings() {
        let table = [
            // tarpit_at == reject_at: no tarpit band at all.
            ((0, 2, 2), 1, Verdict::Pass),
            ((0, 2, 2), 2, Verdict::Reject),
            ((0, 2, 2), 0, Verdict::Allow),
            // tarpit right after allow: no pass band.
            ((0, 1, 5), 1, Verdict::Tarpit),
            ((0, 1, 5), 0, Verdict::Allow),
            ((0, 1, 5), 4, Verdict::Tarpit),
            ((0, 1, 5), 5, Verdict::Reject),
            // Wide bands with large thresholds.
            ((-100, 50, 1000), -100, Verdict::Allow),
            ((-100, 50, 1000), -99, Verdict::Pass),
            ((-100, 50, 1000), 49, Verdict::Pass),
            ((-100, 50, 1000), 50, Verdict::Tarpit),
            ((-100, 50, 1000), 999, Verdict::Tarpit),
            ((-100, 50, 1000), 1000, Verdict::Reject),
            // Extreme thresholds: nobody is allowed, nobody rejected.
            ((i32::MIN, 1, i32::MAX), i32::MIN, Verdict::Allow),
            ((i32::MIN, 1, i32::MAX), i32::MIN + 1, Verdict::Pass),
            ((i32::MIN, 1, i32::MAX), i32::MAX - 1, Verdict::Tarpit),
            ((i32::MIN, 1, i32::MAX), i32::MAX, Verdict::Reject),
            // Overlapping thresholds (not a valid config): allow is checked first.
            ((5, 1, 3), 4, Verdict::Allow),
            ((5, 1, 3), 6, Verdict::Reject),
            // reject_at below tarpit_at: reject is checked before tarpit.
            ((0, 5, 3), 4, Verdict::Reject),
            ((0, 5, 3), 2, Verdict::Pass),
        ];
        for ((allow_at, tarpit_at, reject_at), score, expected) in table {
            assert_eq!(
                Verdict::from_score(score, &scoring(allow_at, tarpit_at, reject_at)),
                expected,
                "score {score} with allow_at {allow_at}, tarpit_at {tarpit_at}, \
                 reject_at {reject_at}"
            );
        }
    }

    #[test]
    fn log_names() {
        let table = [
            (Verdict::Allow, "allow"),
            (Verdict::Pass, "pass"),
            (Verdict::Tarpit, "tarpit"),
            (Verdict::Reject, "reject"),
        ];
        for (verdict, name) in table {
            assert_eq!(verdict.as_str(), name);
        }
    }
}
