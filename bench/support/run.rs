//! Full run or quick mode. `cargo bench` passes `--bench`: the full size, in the optimised bench
//! profile. `cargo test --benches` (and `--all-targets`) does not: a small pass in a debug build
//! that checks the mechanics, so CI keeps every bench from rotting (STYLE.md §6), and every
//! figure line then says it is not a measurement.

/// How this run was started.
pub struct Run {
    /// `--bench` was passed: the full size.
    pub full: bool,
    /// Ends every figure line: empty in a full run, the warning in quick mode.
    pub note: &'static str,
}

impl Run {
    /// This run, from the process's arguments.
    pub fn from_args() -> Run {
        let full = std::env::args().any(|a| a == "--bench");
        let note = if full {
            ""
        } else {
            " (quick mode, debug build: not a measurement)"
        };
        Run { full, note }
    }
}
