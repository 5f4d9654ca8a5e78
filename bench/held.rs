//! Memory per held message (DESIGN.md §7 `spool_after`): what a message held for scanning
//! costs while it waits, as the process's RSS growth ÷ N, for messages of 1 KiB, of exactly
//! `spool_after` bytes (the most one keeps in memory) and of 4 × `spool_after` (spooled to
//! an unlinked file: the page cache holds those bytes, not the process). Then the speed of
//! [`Outgoing::encode`] reading spooled messages back in the relay's steps.
//!
//! Each case runs in a fresh process of its own (this binary re-executed with
//! `TARMAC_BENCH_HELD_CASE`), so memory one case freed is not reused by the next. Messages are
//! filled as a session fills them, with appends of at most 16 KiB, and RSS is VmRSS from
//! `/proc/self/status` before and after. The spool directory is a fresh one under the
//! system's temporary directory, removed afterwards.
//!
//! `cargo bench --bench held` holds 1,000 messages of each in-memory size and 250 spooled
//! ones (a quarter of a GiB of page cache; each also holds a descriptor); without `--bench`
//! (as `cargo test --all-targets` runs it, in a debug build) 20 of each, to check the
//! mechanics.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use tarmac::content::Settings;
use tarmac::content::edit::Outgoing;
use tarmac::content::held::{self, Held};

/// What this bench shares with the others (see `bench/support/README.md`).
mod support {
    pub mod run;
}

use support::run::Run;

/// Set (to a case's name) in a case process's environment.
const CASE_ENV: &str = "TARMAC_BENCH_HELD_CASE";

/// Bytes per append: a worker turn reads at most 16 KiB from a client (STYLE.md §1.2).
const APPEND: usize = 16 * 1024;

/// Content bytes per `encode` call: about what a relay's output buffer takes per turn.
const ENCODE_STEP: usize = 64 * 1024;

/// Descriptors left for everything but the spool files (stdio, the allocator, the test
/// harness).
const FD_RESERVE: usize = 64;

/// The cases, in the order they run.
const CASES: [&str; 3] = ["1KiB", "spool_after", "4x_spool_after"];

fn main() {
    let run = Run::from_args();
    if let Ok(case) = std::env::var(CASE_ENV) {
        held_case(&run, &case);
        return;
    }
    for case in CASES {
        let status = Command::new(std::env::current_exe().expect("this bench's path"))
            .args(std::env::args().skip(1))
            .env(CASE_ENV, case)
            .status()
            .expect("running a case");
        assert!(status.success(), "held/{case} failed: {status}");
    }
}

/// One case in this process: hold N messages, print the RSS growth per message; for the
/// spooled case, the encoding speed too.
fn held_case(run: &Run, case: &str) {
    let spool_after = Settings::default().spool_after;
    let (size, wanted) = match (case, run.full) {
        ("1KiB", full) => (1024, if full { 1000 } else { 20 }),
        ("spool_after", full) => (spool_after, if full { 1000 } else { 20 }),
        ("4x_spool_after", full) => (4 * spool_after, if full { 250 } else { 20 }),
        _ => panic!("unknown case {case}"),
    };
    // Only a spooled message holds a descriptor.
    let n = if size > spool_after {
        fit_fd_limit(case, wanted)
    } else {
        wanted
    };
    let state = std::env::temp_dir().join(format!("tarmac-bench-held-{}", std::process::id()));
    let dir = held::spool_dir(&state).expect("making the spool directory");
    let line = message_line();

    // One message made and dropped first, so first-use costs (the allocator's arenas, the
    // spool directory's first file) are not counted per message.
    drop(fill(&dir, spool_after, size, &line));
    let before = rss_kb();
    let messages: Vec<Held> = (0..n)
        .map(|_| fill(&dir, spool_after, size, &line))
        .collect();
    let after = rss_kb();
    let spooled = messages.iter().filter(|m| m.is_spooled()).count();
    let per_message = (after.saturating_sub(before) * 1024) as f64 / n as f64;
    println!(
        "held/{case}: {n} messages of {size} bytes ({spooled} spooled, spool_after {spool_after}): \
         {per_message:.0} bytes of RSS per message ({:.1} % of its size){}",
        per_message * 100.0 / size as f64,
        run.note
    );

    if spooled > 0 {
        encode_speed(run, case, messages);
    }
    std::fs::remove_dir_all(&state).expect("removing the spool directory");
}

/// Encodes every message back through `Outgoing::unchanged`, in relay-sized steps.
fn encode_speed(run: &Run, case: &str, messages: Vec<Held>) {
    let total: u64 = messages.iter().map(Held::len).sum();
    let mut out = Vec::with_capacity(2 * ENCODE_STEP);
    let mut encoded = 0u64;
    let start = Instant::now();
    for held in messages {
        let mut outgoing = Outgoing::unchanged(held);
        loop {
            let done = outgoing.encode(&mut out, ENCODE_STEP).expect("encoding");
            encoded += out.len() as u64;
            out.clear();
            if done {
                break;
            }
        }
    }
    let elapsed = start.elapsed();
    // Every line of the filler starts with a dot: one stuffing dot per line on the way out.
    assert!(
        encoded > total,
        "{encoded} encoded bytes for {total} content bytes"
    );
    println!(
        "held/{case}/encode: {:.0} MB/s of content read back from spool files and dot-stuffed \
         in {ENCODE_STEP}-byte steps ({total} bytes){}",
        total as f64 / 1e6 / elapsed.as_secs_f64(),
        run.note
    );
}

/// A message of `size` bytes, appended as a session would.
fn fill(dir: &Path, spool_after: u64, size: u64, line: &[u8]) -> Held {
    let mut held = Held::new(spool_after, dir.to_path_buf());
    let mut chunk = Vec::with_capacity(APPEND);
    while chunk.len() + line.len() <= APPEND {
        chunk.extend_from_slice(line);
    }
    let mut left = size;
    while left > 0 {
        let take = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
        held.append(&chunk[..take])
            .expect("appending to a held message");
        left -= take as u64;
    }
    held
}

/// 64 bytes that start with a dot, so the encoder has stuffing to do on every line.
fn message_line() -> Vec<u8> {
    let mut line = b".held message filler, one stuffed dot per line, 64 bytes".to_vec();
    line.resize(62, b'.');
    line.extend_from_slice(b"\r\n");
    line
}

/// `wanted`, or fewer when the open-files soft limit could not hold that many spool files;
/// says so on a `held/<case>/note:` line.
fn fit_fd_limit(case: &str, wanted: usize) -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(usize::MAX); // "unlimited"
    let room = soft.saturating_sub(FD_RESERVE);
    if room < wanted {
        println!(
            "held/{case}/note: open-files soft limit is {soft}: holding {room} messages instead \
             of {wanted} (raise the limit with `ulimit -n`)"
        );
        return room;
    }
    wanted
}

/// VmRSS of this process, in KB.
fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status")
}
