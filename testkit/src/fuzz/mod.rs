//! Fuzz target bodies: one `pub fn target(data: &[u8])` per `fuzz/fuzz_targets/*.rs`.
//!
//! Each body runs on the raw bytes and again on the bytes mapped into a vocabulary the target
//! understands (the SMTP alphabet for the parsers, whole commands for `session`, keys and
//! values for `config`), so the fuzzer reaches deep states without a dictionary. Bodies assert
//! properties, not just "no crash": a failed property panics, which is how libFuzzer and the
//! corpus replay test (`tests/corpus.rs`, an ordinary integration test on stable) see a bug.
//! They live in the testkit, not in tarmac, so no product build compiles them; they reach
//! tarmac only through its public API.
//!
//! Targets and their input layout:
//! - `command`: the input, and each of its lines, is one command line for `parse_command`.
//! - `reply`: the input is a downstream reply stream for `parse_reply`; its first bytes also
//!   build a `Reply` that must survive `write_to` and `parse_reply` unchanged.
//! - `data`: byte 0 picks `max_size` (bit 7 clear: 25 MB, set: bits 0–6 bytes), byte 1 seeds
//!   the chunking, the rest is a message body; both `BareNewline` modes are run.
//! - `edit`: a held message and scanners' edits for `Outgoing` (see [`edit`]).
//! - `config`: the input, as UTF-8 (lossy), is a `tarmac.toml`.
//! - `list_file`: the input, as UTF-8 (lossy), is an allow or deny list file; its bytes also
//!   spell out addresses and blocks for a second list (see [`list_file`]).
//! - `rule_file`: the input, as UTF-8 (lossy), is a rule file; its bytes also pick rule-file
//!   tokens for a second one (see [`rule_file`]).
//! - `tls_files`: a certificate chain and key for `[tls]`, see [`tls_files`].
//! - `session`: see [`session`].
//! - `milter`: bytes 0–5 pick the chunking, the first stage and what the milter negotiates;
//!   the rest is a milter's response stream (see [`milter`]).
//! - `snapshot`: byte 0 picks the table and the framing, the rest is a state snapshot file
//!   (see [`snapshot`]).
//! - `rspamd_reply`: the input is an rspamd `/checkv2` answer, raw and spelled out of JSON
//!   tokens (see [`rspamd_reply`]).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use tarmac::config::Config;

mod command;
mod config;
mod data;
mod edit;
mod list_file;
mod milter;
mod proxy;
mod reply;
mod rspamd;
mod rule_file;
mod session;
mod snapshot;
mod tls_files;

pub use command::command;
pub use config::config;
pub use data::data;
pub use edit::edit;
pub use list_file::list_file;
pub use milter::milter;
pub use proxy::proxy;
pub use reply::reply;
pub use rspamd::rspamd_reply;
pub use rule_file::rule_file;
pub use session::session;
pub use snapshot::snapshot;
pub use tls_files::tls_files;

/// Bytes that make up SMTP commands, replies and bodies, including every line-ending byte
/// and a two-byte UTF-8 character; raw input is mapped onto it byte by byte.
const SMTP_ALPHABET: &[u8] = b"\r\n.:<>@ =AEHILMOPQRSTUDF0123456789abcxyz\t\xc3\xa9";

/// Length of the `x` run that a vocabulary byte just past the token list makes: longer than a
/// 512-byte `max_line_length`, and a third of a 2000-byte `max_message_size`.
const LONG_TOKEN: usize = 600;

/// `Config::default()` reads the system hostname; build it once.
fn base_config() -> &'static Config {
    static BASE: OnceLock<Config> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut config = Config::default();
        config.server.hostname = "mx.fuzz".to_owned();
        config.downstream.servers = vec![SocketAddr::from(([127, 0, 0, 1], 10025))];
        // The dialog model here starts at the banner; the pre-greet stage and the tarpit
        // schedule are covered by the session's unit tests on invented time.
        config.tarpit.greet_pause = Duration::ZERO;
        config.greylist.enabled = false;
        config
    })
}

fn to_alphabet(data: &[u8]) -> Vec<u8> {
    data.iter()
        .map(|&b| {
            SMTP_ALPHABET
                .get(usize::from(b) % SMTP_ALPHABET.len())
                .copied()
                .unwrap_or(b' ')
        })
        .collect()
}

/// Each byte picks a token, except that bytes past the list make a long run of `x` (for line
/// and size limits).
fn vocabulary(data: &[u8], tokens: &[&str]) -> String {
    let mut text = String::new();
    for &b in data {
        match tokens.get(usize::from(b)) {
            Some(token) => text.push_str(token),
            None if usize::from(b) == tokens.len() => text.push_str(&"x".repeat(LONG_TOKEN)),
            None => {
                let i = usize::from(b) % tokens.len();
                text.push_str(tokens.get(i).copied().unwrap_or(" "));
            }
        }
    }
    text
}

/// A CR not followed by LF or an LF not preceded by CR. `framed`: a CRLF precedes `s` (a
/// leading LF is bare); otherwise a leading LF counts as the end of a CRLF cut off before.
fn has_bare_newline(s: &[u8], framed: bool) -> bool {
    s.iter().enumerate().any(|(i, &b)| match b {
        b'\r' => s.get(i + 1) != Some(&b'\n'),
        b'\n' => match i.checked_sub(1) {
            Some(p) => s.get(p) != Some(&b'\r'),
            None => framed,
        },
        _ => false,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// Printable form of bytes for assertion messages.
fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// xorshift64: chunk lengths from a seed, no dependency.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Every line to a client: three digits, then a space or dash, no CR or LF inside, CRLF.
fn check_client_lines(wire: &[u8]) {
    for line in wire.split_inclusive(|&b| b == b'\n') {
        let Some(body) = line.strip_suffix(b"\r\n") else {
            panic!("client line without CRLF: {}", escape(line));
        };
        let ok = matches!(body, [a, b, c, b' ' | b'-', ..]
            if a.is_ascii_digit() && b.is_ascii_digit() && c.is_ascii_digit());
        assert!(ok, "malformed client line {}", escape(line));
        assert!(
            !body.contains(&b'\r'),
            "CR inside client line {}",
            escape(line)
        );
    }
}
