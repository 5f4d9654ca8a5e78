//! tarmac: a tarpitting anti-spam SMTP edge gateway.
//!
//! The crate is a library with a thin binary (`src/main.rs`). `smtp` is the sans-IO protocol
//! core; `server` is the only module that does I/O on client sockets; `downstream` speaks to the
//! real MTA; `tls` loads the certificates for inbound STARTTLS; `config` is the operator contract
//! of DESIGN.md §3.

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, clippy::manual_let_else)]
// Network and operator input must never panic the process (STYLE.md §3): no unwrap, expect,
// panic or unchecked indexing outside tests, in every module. Where a module needs one, it
// says why next to a local `allow`.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod config;
pub mod content;
pub mod demo;
pub mod dns;
pub mod downstream;
pub(crate) mod metrics;
pub mod policy;
pub mod privileges;
pub mod probe;
pub mod server;
pub(crate) mod side_thread;
pub mod smtp;
pub mod state;
// Public for the `tls_files` fuzz target in the testkit, which loads certificates as `[tls]` does.
pub mod tls;
