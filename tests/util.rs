//! What the integration tests need from this package's own build: the `tarmac` binary's path,
//! which cargo gives to test targets only (`CARGO_BIN_EXE_tarmac`). Everything else the tests
//! share (server, client, peers, fixtures) is in the `tarmac-testkit` crate.

use std::path::Path;
use std::process::{Command, Output};

/// The tarmac binary, ready for arguments (for `tarmac_testkit::Running::start` or `spawn`).
pub fn tarmac() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tarmac"))
}

/// `tarmac check -c path`, run to its end: its exit status, stdout and stderr.
pub fn tarmac_check(path: &Path) -> Output {
    tarmac().args(["check", "-c"]).arg(path).output().unwrap()
}
