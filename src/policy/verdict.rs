//! The verdict from a score (DESIGN.md §1.3, `[scoring]`).

use crate::config::Scoring;

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

impl Verdict {
    /// `score <= allow_at` → Allow; `>= reject_at` → Reject; `>= tarpit_at` → Tarpit; else Pass.
    pub fn from_score(score: i32, scoring: &Scoring) -> Verdict {
        let _ = (score, scoring);
        Verdict::Pass
    }

    /// The close log's `verdict=` value.
    pub fn as_str(self) -> &'static str {
        "pass"
    }
}
