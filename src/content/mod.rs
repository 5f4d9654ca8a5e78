//! Content inspection at end of data (DESIGN.md §7): rspamd over HTTP and milters, called on a
//! side thread with the message held until the client's final dot.
//!
//! # Layout
//! - `verdict.rs`: what every scanner's answer comes down to ([`Verdict`], [`Edit`],
//!   [`Failure`]); a leaf, which the session's questions carry.
//! - `settings.rs`: the `[content]` settings, and the scanners' addresses as operators write
//!   them (a leaf: `config` reads into it).
//! - `held.rs`: the held message: memory up to `spool_after`, then an unlinked spool file.
//! - `message.rs`: its header block, as scanners see it and edits change it.
//! - `edit.rs`: the scanners' changes applied to a held message, and the SMTP encoding of the
//!   result for the downstream.
//! - `milter/`: the milter protocol (version 6): the codec, one milter's conversation, its
//!   connection.
//! - `rspamd/`: the `/checkv2` request over HTTP, the reply parser and the reply's changes.
//! - `scanner/`: the scanner thread: milter conversations, scans, `max_scans`.

pub mod edit;
pub mod held;
pub mod message;
pub mod milter;
pub mod rspamd;
pub mod scanner;
pub mod settings;

pub mod verdict;

pub use settings::{MilterAddr, OnFailure, RspamdUrl, Settings};
pub use verdict::{Edit, Failure, Verdict};
