//! The milter client (DESIGN.md §7): sendmail's milter protocol, version 6, as Postfix speaks
//! it to the same milters (OpenDKIM, rspamd's proxy, ClamAV's milter...).
//!
//! - [`codec`]: frames, commands and responses, sans-IO, for both directions.
//! - [`conversation`]: one milter's side of one SMTP session, sans-IO: negotiation, which
//!   stages are sent and answered, which answers are legal where, and their meaning as
//!   [`Verdict`](crate::content::Verdict)s and [`Edit`](crate::content::Edit)s.
//! - [`link`]: the connection itself over tokio, driving the conversation; the scanner
//!   thread calls [`MilterLink`].
//!
//! No crate was used: the client side of the protocol is small, and the one crate for it
//! (`miltr-client`) calls itself a barebone client for experiments. The codec is fuzzed
//! (`fuzz/fuzz_targets/milter.rs`) and tested against a real OpenDKIM (`tests/milter.rs`).

pub mod codec;
pub mod conversation;
pub mod link;

pub use link::{ConnectInfo, Macros, MessageOutcome, MilterLink};
