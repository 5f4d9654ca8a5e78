//! tarmac's test kit: the peers and fixtures its integration tests and benches run against,
//! kept out of the product crate (STYLE.md §1.4). Nothing here is part of tarmac's API.
//!
//! - tarmac itself on loopback ([`Server`], [`config`]) and an SMTP [`Client`] whose every read
//!   and write is bounded;
//! - downstream peers: the project's [`sink`](mod@sink) (a scripted SMTP server that behaves like
//!   Postfix, can misbehave and records what it saw), a Postfix-like downstream with random
//!   faults ([`faulty`]), and a private, real Postfix ([`postfix`]);
//! - content-inspection peers: a private, real OpenDKIM milter ([`opendkim`]) and a scripted
//!   test milter ([`milter`]) that records what it received;
//! - service peers: a real DNS server ([`dns_server`], hickory-server) and a real
//!   `redis-server` ([`redis_server`]), both on loopback; a private, real rspamd ([`rspamd`])
//!   with a `/checkv2` client;
//! - fixtures: certificates made by the test ([`certs`]), child processes with bounded waits
//!   ([`process`]), temporary directories and free ports;
//! - network namespaces of the test's own ([`netns`]): a client, a TPROXY gateway and a server
//!   network joined by veth pairs, for transparent mode;
//! - session doubles ([`session`]): a driver on invented time ([`session::Pair`]) and a
//!   scripted downstream that behaves like Postfix and checks the trust boundary
//!   ([`session::FakeDownstream`]), for the `session` fuzz target, the `session` bench and
//!   the session's tests;
//! - the fuzz target bodies ([`fuzz`]), one `pub fn target(data: &[u8])` per
//!   `fuzz/fuzz_targets/*.rs`, also replayed on stable by `tests/corpus.rs`.
//!
//! Test code: it panics (`unwrap`, `expect`, `assert!`) where a test should fail, and every wait
//! is bounded by [`WAIT`]. What needs the tarmac binary's path (`CARGO_BIN_EXE_tarmac`, known
//! only to the tarmac package's own test targets) stays in `tests/util.rs`, which hands the
//! command to [`Running::start`].

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

pub mod certs;
pub mod client;
pub mod dns_server;
pub mod faulty;
pub mod fuzz;
pub mod milter;
pub mod netns;
pub mod opendkim;
pub mod postfix;
pub mod process;
pub mod redis_server;
pub mod rspamd;
pub mod server;
pub mod session;
pub mod sink;

pub use client::Client;
pub use process::{Running, alive, find_program, require_program, run_bounded, wait_for_log};
pub use server::{
    DRAIN, Server, UNLIMITED_RATE, auto_state_dir, config, join_within, sink, test_config,
};

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `cond` until it holds or [`WAIT`] passes.
#[track_caller]
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Bytes that look like noise: xorshift64, deterministic per seed.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// A loopback port that was free a moment ago, for a `tarmac run` child's config file.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An empty directory for one test's files (the name tells the tests apart, the pid the runs).
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tarmac-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
