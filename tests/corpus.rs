//! The fuzz targets on stable: every file in `fuzz/corpus/<target>/` (seeds and past crashers)
//! replayed through the same `tarmac_testkit::fuzz` bodies libFuzzer runs, then a few thousand
//! deterministic pseudo-random inputs per target, each a seed with a few mutations or plain
//! random bytes. A failure names the file or the input that broke a property.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};

use tarmac_testkit::fuzz;

/// Pseudo-random inputs per target; keeps the whole file under a few seconds in debug builds.
const RANDOM_INPUTS: usize = 2000;

/// Longest pseudo-random input, in bytes.
const RANDOM_LEN: usize = 400;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 13] = [
    ("command", fuzz::command),
    ("reply", fuzz::reply),
    ("data", fuzz::data),
    ("config", fuzz::config),
    ("session", fuzz::session),
    ("proxy", fuzz::proxy),
    ("list_file", fuzz::list_file),
    ("rule_file", fuzz::rule_file),
    ("snapshot", fuzz::snapshot),
    ("tls_files", fuzz::tls_files),
    ("rspamd_reply", fuzz::rspamd_reply),
    ("edit", fuzz::edit),
    ("milter", fuzz::milter),
];

#[test]
fn corpus_command() {
    replay("command", fuzz::command);
}

#[test]
fn corpus_reply() {
    replay("reply", fuzz::reply);
}

#[test]
fn corpus_proxy() {
    replay("proxy", fuzz::proxy);
}

#[test]
fn corpus_data() {
    replay("data", fuzz::data);
}

#[test]
fn corpus_config() {
    replay("config", fuzz::config);
}

#[test]
fn corpus_list_file() {
    replay("list_file", fuzz::list_file);
}

#[test]
fn corpus_rule_file() {
    replay("rule_file", fuzz::rule_file);
}

#[test]
fn corpus_snapshot() {
    replay("snapshot", fuzz::snapshot);
}

#[test]
fn corpus_tls_files() {
    replay("tls_files", fuzz::tls_files);
}

#[test]
fn corpus_rspamd_reply() {
    replay("rspamd_reply", fuzz::rspamd_reply);
}

#[test]
fn corpus_edit() {
    replay("edit", fuzz::edit);
}

#[test]
fn corpus_milter() {
    replay("milter", fuzz::milter);
}

#[test]
fn corpus_session() {
    replay("session", fuzz::session);
}

#[test]
fn random_inputs_keep_every_property() {
    for (i, (target, body)) in TARGETS.into_iter().enumerate() {
        // Named seeds only, so the inputs do not depend on what a local fuzzer run added.
        let seeds: Vec<Vec<u8>> = corpus_files(target)
            .iter()
            .filter(|f| !is_fuzzer_output(f))
            .map(|f| std::fs::read(f).unwrap())
            .collect();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ i as u64);
        for n in 0..RANDOM_INPUTS {
            let input = if n % 4 == 0 {
                let len = rng.below(RANDOM_LEN + 1);
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                mutate(&seeds[rng.below(seeds.len())], &mut rng)
            };
            run_named(body, &input, || {
                format!("{target} random input #{n}: \"{}\"", input.escape_ascii())
            });
        }
    }
}

/// Replays every file of one target's corpus, which must not be empty.
fn replay(target: &str, body: Target) {
    let files = corpus_files(target);
    assert!(!files.is_empty(), "fuzz/corpus/{target}/ has no files");
    for file in files {
        let data = std::fs::read(&file).unwrap();
        run_named(body, &data, || file.display().to_string());
    }
}

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// libFuzzer names the inputs it adds to a corpus by their SHA-1 (git ignores them).
fn is_fuzzer_output(file: &Path) -> bool {
    file.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Runs a body; on a failed property, says which input it was before passing the panic on.
fn run_named(body: Target, data: &[u8], name: impl Fn() -> String) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| body(data))) {
        eprintln!("fuzz property failed on {}", name());
        resume_unwind(panic);
    }
}

/// One to four byte-level edits of a seed: replace, insert, delete, duplicate a range.
fn mutate(seed: &[u8], rng: &mut XorShift) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(4) {
            0 if at < data.len() => data[at] = rng.next() as u8,
            1 => data.insert(at, rng.next() as u8),
            2 if at < data.len() => {
                data.remove(at);
            }
            _ => {
                let end = (at + rng.below(16)).min(data.len());
                let copy = data[at..end].to_vec();
                let to = rng.below(data.len() + 1);
                data.splice(to..to, copy);
            }
        }
    }
    data
}

/// xorshift64: reproducible inputs without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Found by the session target: the idle deadline passed while the session waited for a slow
/// downstream and was reported by `poll_timeout` without being handled, so the driver spun.
#[test]
fn regression_idle_deadline_while_waiting() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/session/regression_idle_deadline_while_waiting");
    fuzz::session(&std::fs::read(file).unwrap());
}

/// Found by the milter target: a REPLYCODE `550-%1 …` passed Postfix's check and became
/// `550-1 …` once sendmail's `%` doubling was undone, a reply that breaks the same rules and
/// so did not survive its own encoding.
#[test]
fn regression_percent_digit_reply_code() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/milter/regression_percent_digit_reply_code");
    fuzz::milter(&std::fs::read(file).unwrap());
}

/// Found by the milter target: a REPLYCODE whose last line is the bare code and a space
/// (`550 `, empty text) was encoded back without the space, which the decoder refuses.
#[test]
fn regression_empty_last_reply_line() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/milter/regression_empty_last_reply_line");
    fuzz::milter(&std::fs::read(file).unwrap());
}
