//! Pure decisions (DESIGN.md §5): DNSBL scoring, local lists, the verdict. No I/O, no clock:
//! callers pass what they know and get a decision back.
//!
//! SKELETON: the signatures are the agreed interface; the bodies are being written.

pub mod dnsbl;
pub mod lists;
pub mod verdict;

pub use dnsbl::ZoneOutcome;
pub use lists::{List, ListMatch, ListSet};
pub use verdict::Verdict;
