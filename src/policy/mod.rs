//! Pure decisions (DESIGN.md §5): DNSBL scoring, local lists, connection rates, the verdict. No
//! I/O, no clock of their own (the rate buckets read governor's, which tests replace): callers
//! pass what they know and get a decision back.
//!
//! - `admission`: what the worker does with a new connection: how it is counted against
//!   the caps and rates (allow-listed, a proxy sender's, rated now or by the shared store), or
//!   why it is refused ([`Refusal`]), and whether its session offers STARTTLS ([`Admission`]).
//! - [`content`]: what the scanners' verdicts mean for the client: the reply at each milter
//!   stage and at the final dot, and what a failed scanner counts as (DESIGN.md §7).
//! - `cidr`: address blocks as the lists, the rules and `proxy_protocol_from` write them
//!   ([`Cidr`]).
//! - [`dnsbl`]: the name to query for a client in a zone, what a zone's answer is worth
//!   ([`ZoneOutcome`]), the summed score, the zone a reject reply names, the close log's
//!   `dnsbl=` field.
//! - `lists`: the operator's allow and deny list files, parsed with `path:line` errors and
//!   matched against addresses and names ([`ListSet`]; allow wins).
//! - `rules`: the operator's rule files, parsed with `path:line: key: message` errors, and
//!   the matcher run at each [`Stage`] of a connection ([`RuleSet::evaluate`]).
//! - `rates`: the connection-rate token buckets per address and per /24 or /64
//!   ([`ConnectionRates`]), checked at accept; [`RateRefusal`] says which one was empty.
//! - `reading`: the `path:line: key: message` error of a list or rule file
//!   ([`FileError`]), which the config loader reports as its own, and the TOML value readers
//!   the rule files and the config file share.
//! - [`reputation`]: an address's decayed history of bad and good events, and whether it is
//!   mostly bad ([`Standing`]), which adds `[reputation] weight` to its score.
//! - `transparent`: whether a transparent connection's original destination is this host
//!   (`is_this_host`: one of tarmac's listeners, or any local address), which would make a
//!   loop or lend the client the host's identity (DESIGN.md §9).
//! - `verdict`: the score placed against `[scoring]`'s thresholds ([`Verdict`]).
//!
//! The session (`crate::smtp`) calls these as answers arrive; the server never decides, it only
//! applies: at accept it asks `admission::admit`, counts the connection as told (asking
//! [`ConnectionRates`]) and answers a refusal with the `421`.

pub(crate) mod admission;
pub(crate) mod cidr;
pub mod content;
pub mod dnsbl;
pub(crate) mod lists;
pub(crate) mod rates;
pub(crate) mod reading;
pub mod reputation;
pub(crate) mod rules;
pub(crate) mod screening;
pub(crate) mod transparent;
pub(crate) mod verdict;

pub use admission::{Admission, Refusal};
pub use cidr::Cidr;
pub use dnsbl::ZoneOutcome;
pub use lists::{List, ListMatch, ListSet};
pub use rates::{ConnectionRates, RateRefusal};
pub use reading::FileError;
pub use reputation::Standing;
pub use rules::{Decision, Facts, RuleAction, RuleSet, Stage, default_reply};
pub use verdict::Verdict;
