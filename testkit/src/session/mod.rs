//! One set of session test doubles for the session's tests (`tests/session.rs` and
//! `tests/session/`), the `session` fuzz target and the `session` bench: [`Pair`], a driver on
//! invented time that owns a `Session`, plays its actions and answers its questions from
//! scripted services, and [`FakeDownstream`], the
//! scripted downstream MTA that behaves like Postfix where it matters and checks the trust
//! boundary as it reads (STYLE.md §5, quinn-proto's `Pair`).

mod downstream;
mod driver;

pub use downstream::{FORGED, FakeDownstream, Reaction, Speaker, Totals};
pub use driver::{Pair, ScanFacts, config, peer};
