//! One set of session test doubles for the session's tests, the `session` fuzz target and the
//! `session` bench (the unit tests in `src/smtp/session/tests*` still carry their own copy of
//! `Pair` until they move to `tests/`, where they use these with the same method and field
//! names): [`Pair`], a driver on invented time that owns a `Session`, plays its
//! actions and answers its questions from scripted services, and [`FakeDownstream`], the
//! scripted downstream MTA that behaves like Postfix where it matters and checks the trust
//! boundary as it reads (STYLE.md §5, quinn-proto's `Pair`).

mod downstream;
mod driver;

pub use downstream::{FORGED, FakeDownstream, Reaction, Speaker, Totals};
pub use driver::{Pair, config, peer};
