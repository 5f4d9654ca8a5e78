//! Pure decisions (DESIGN.md §5): DNSBL scoring, local lists, the verdict. No I/O, no clock:
//! callers pass what they know and get a decision back.
//!
//! - [`dnsbl`]: the name to query for a client in a zone, what a zone's answer is worth
//!   ([`ZoneOutcome`]), the summed score, the zone a reject reply names, the close log's
//!   `dnsbl=` field.
//! - [`lists`]: the operator's allow and deny list files, parsed with `path:line` errors and
//!   matched against addresses and names ([`ListSet`]; allow wins).
//! - [`verdict`]: the score placed against `[scoring]`'s thresholds ([`Verdict`]).
//!
//! The session (`crate::smtp`) calls these as answers arrive; the server never decides.

pub mod dnsbl;
pub mod lists;
pub mod verdict;

pub use dnsbl::ZoneOutcome;
pub use lists::{List, ListMatch, ListSet};
pub use verdict::Verdict;
