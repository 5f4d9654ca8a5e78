//! Fuzz target bodies: one `pub fn target(data: &[u8])` per `fuzz/fuzz_targets/*.rs`.
//!
//! Each body runs on the raw bytes and again on the bytes mapped into a vocabulary the target
//! understands (the SMTP alphabet for the parsers, whole commands for `session`, keys and
//! values for `config`), so the fuzzer reaches deep states without a dictionary. Bodies assert
//! properties, not just "no crash": a failed property panics, which is how libFuzzer and the
//! corpus replay test (`tests/corpus.rs`) see a bug. The module is compiled in every build
//! because that replay test is an ordinary integration test; it is never called by tarmac.
//!
//! Targets and their input layout:
//! - `command`: the input, and each of its lines, is one command line for `parse_command`.
//! - `reply`: the input is a downstream reply stream for `parse_reply`; its first bytes also
//!   build a `Reply` that must survive `write_to` and `parse_reply` unchanged.
//! - `data`: byte 0 picks `max_size` (bit 7 clear: 25 MB, set: bits 0–6 bytes), byte 1 seeds
//!   the chunking, the rest is a message body; both `BareNewline` modes are run.
//! - `config`: the input, as UTF-8 (lossy), is a `tarmac.toml`.
//! - `list_file`: the input, as UTF-8 (lossy), is an allow or deny list file; its bytes also
//!   spell out addresses and blocks for a second list (see [`list_file`]).
//! - `rule_file`: the input, as UTF-8 (lossy), is a rule file; its bytes also pick rule-file
//!   tokens for a second one (see [`rule_file`]).
//! - `tls_files`: a certificate chain and key for `[tls]`, see [`tls_files`].
//! - `session`: see [`session`].
//! - `snapshot`: byte 0 picks the table and the framing, the rest is a state snapshot file
//!   (see [`snapshot`]).

// Fuzz bodies fail by panicking: a broken property must stop libFuzzer and the replay test.
#![allow(clippy::panic, clippy::indexing_slicing)]

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::config::{
    AnnounceClient, BareNewline, Cidr, Config, Dnsbl, DownstreamMode, DownstreamTls,
};
use crate::downstream::dialog::Carried;
use crate::policy::{Facts, List, RuleAction, RuleSet, Stage};
use crate::smtp::command::{Body, Command, MailParams, parse_command};
use crate::smtp::data::{DataDecoder, DataViolation};
use crate::smtp::question::{
    Answer as ServiceAnswer, DnsblAnswer, LookupAnswer, Query, Question, RdnsAnswer,
};
use crate::smtp::reply::{
    EnhancedCode, MAX_REPLY_LINE, MAX_REPLY_LINES, Reply, Status, parse_reply,
};
use crate::smtp::session::{Action, DownstreamEvent, LinkId, Peer, Session, Shutdown, TlsVersion};
use crate::state::snapshot::{self as state_snapshot, Clocks, Kind, Writer};
use crate::state::{Greylist, GreylistOutcome, GreylistTimes, PassCache, ReputationTable};

/// Bytes that make up SMTP commands, replies and bodies, including every line-ending byte
/// and a two-byte UTF-8 character; raw input is mapped onto it byte by byte.
const SMTP_ALPHABET: &[u8] = b"\r\n.:<>@ =AEHILMOPQRSTUDF0123456789abcxyz\t\xc3\xa9";

/// Most bytes the session may hand out for one side in one round. The session's own cap is
/// 64 KiB plus one reply or one decoded chunk; this is the "never grows without bound" check.
const MAX_OUTBOX_DRAIN: usize = 1 << 20;

/// Rounds of event delivery one client chunk may cause; more means the session and the
/// scripted downstream are ping-ponging forever.
const MAX_ROUNDS: usize = 100_000;

/// Parses command lines: the whole input, and each of its lines without the line end.
///
/// Properties: MAIL/RCPT addresses hold no control byte (so no CR/LF) and no `<`/`>` outside a
/// quoted local part, and the command tarmac relays for them parses back to the same command;
/// EHLO/HELO names are trimmed and clean; every error's reply is one well-formed reply line.
pub fn command(data: &[u8]) {
    command_lines(data);
    command_lines(&to_alphabet(data));
}

/// Parses a downstream reply stream and builds replies from the input.
///
/// Properties: a complete reply used at most the input, ends on an LF, has a code in
/// 200..=599, text without CR/LF and an enhanced code of the code's class; it parses the same
/// without the bytes after it; every shorter prefix is `Partial`, never an error; and what
/// `write_to` makes of it (and of replies built from the input) parses back to an equal reply.
pub fn reply(data: &[u8]) {
    reply_stream(data);
    reply_stream(&to_alphabet(data));
    reply_built(data);
}

/// Decodes a message body (layout in the module doc) in both `BareNewline` modes, whole and in
/// chunks cut by the input.
///
/// Properties: the output never holds a bare CR or LF nor `CRLF.CRLF` (counting the CRLF
/// before the body), each call consumes at most its input, chunking changes nothing, and
/// output, size, consumed count, end and violation match a line-by-line reference model.
pub fn data(data: &[u8]) {
    let [size_sel, seed, body @ ..] = data else {
        return;
    };
    let max_size = if size_sel & 0x80 == 0 {
        25_000_000
    } else {
        u64::from(size_sel & 0x7f)
    };
    for body in [body.to_vec(), to_alphabet(body)] {
        for mode in [BareNewline::Reject, BareNewline::Normalize] {
            decode_checked(mode, max_size, *seed, &body);
        }
    }
}

/// Parses an inbound PROXY header (v1 or v2), raw and with a valid v2 signature or v1 prefix
/// put in front so the parser gets past its first check.
///
/// Properties: a complete header used at most the input (and at most
/// `MAX_PROXY_HEADER` bytes); it parses the same without the bytes after it; every shorter
/// prefix of it is `Partial`; `Partial` only while the input is shorter than the cap.
pub fn proxy(data: &[u8]) {
    for prefix in [&b""[..], b"PROXY ", b"\r\n\r\n\0\r\nQUIT\n"] {
        let mut input = prefix.to_vec();
        input.extend_from_slice(data);
        proxy_header(&input);
    }
}

fn proxy_header(input: &[u8]) {
    use crate::smtp::proxy::{MAX_PROXY_HEADER, parse_proxy_header};
    use crate::smtp::reply::Status;
    match parse_proxy_header(input) {
        Ok(Status::Complete((client, length))) => {
            assert!(
                length <= input.len() && length <= MAX_PROXY_HEADER,
                "{length}"
            );
            let header = &input[..length];
            assert_eq!(
                parse_proxy_header(header),
                Ok(Status::Complete((client, length))),
                "the bytes after the header changed it"
            );
            for cut in 0..length {
                assert_eq!(
                    parse_proxy_header(&header[..cut]),
                    Ok(Status::Partial),
                    "prefix of {cut} bytes of a complete header"
                );
            }
        }
        Ok(Status::Partial) => assert!(input.len() < MAX_PROXY_HEADER),
        Err(_) => {}
    }
}

/// Loads a certificate chain and key the way `[tls]` does, with the input split at its first
/// NUL byte into the two files' contents (all of it as both when there is none), and again
/// with the halves joined to the PEM headers, so the parser gets past `BEGIN` lines.
///
/// Properties: no panic; an error names one of the two files, with its path first, on one
/// line; a success only with a `CERTIFICATE` section in the chain and a key in the key file.
pub fn tls_files(data: &[u8]) {
    let (cert, key) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, data),
    };
    tls_pair(cert, key);
    let mut cert_pem = b"-----BEGIN CERTIFICATE-----\n".to_vec();
    cert_pem.extend_from_slice(cert);
    cert_pem.extend_from_slice(b"\n-----END CERTIFICATE-----\n");
    let mut key_pem = b"-----BEGIN PRIVATE KEY-----\n".to_vec();
    key_pem.extend_from_slice(key);
    key_pem.extend_from_slice(b"\n-----END PRIVATE KEY-----\n");
    tls_pair(&cert_pem, &key_pem);
}

fn tls_pair(cert: &[u8], key: &[u8]) {
    let (cert_path, key_path) = (Path::new("/tls/chain.pem"), Path::new("/tls/key.pem"));
    match crate::tls::ServerTls::from_pem(cert, cert_path, key, key_path) {
        Ok(_) => {
            assert!(
                find(cert, b"CERTIFICATE").is_some(),
                "a chain without a certificate"
            );
            assert!(
                find(key, b"PRIVATE KEY").is_some(),
                "a key file without a key"
            );
        }
        Err(error) => {
            let text = error.to_string();
            let path = match error.file() {
                crate::tls::TlsFile::Cert => cert_path,
                crate::tls::TlsFile::Key => key_path,
            };
            assert!(
                text.starts_with(&format!("{}: ", path.display())),
                "error does not start with its file: {text:?}"
            );
            assert!(!text.contains('\n'), "error on two lines: {text:?}");
        }
    }
}

/// Loads the input as a config file, and again built from config keys and values.
///
/// Properties: no panic; an error list is non-empty, each error has a non-empty message, the
/// given path and a line inside the text, and the list displays as one line per error.
pub fn config(data: &[u8]) {
    config_text(&String::from_utf8_lossy(data));
    config_text(&vocabulary(data, CONFIG_TOKENS));
}

/// Parses the input as a list file (`[lists]`), and again built from list entries and their
/// pieces.
///
/// Properties: each line is judged alone: a line's error is the same inside the file as on its
/// own, and a file whose lines all parse alone parses; errors name the path, a line inside the
/// text and no key, and display as one line; `len` counts the lines with an entry; reversing
/// the lines or splitting the file in two gives an equal list; lookups agree with a linear
/// model built from each line with `config::Cidr` (addresses around each block's ends and from
/// the input) and with plain suffix comparison (each domain, names under it, in upper case,
/// with a trailing dot, and near misses). A second list, of blocks whose addresses and prefix
/// lengths come from the first half of the input's bytes, is checked against that model too,
/// with addresses from the whole input: text rarely spells out wide or overlapping blocks.
pub fn list_file(data: &[u8]) {
    list_text(&String::from_utf8_lossy(data));
    list_text(&vocabulary(data, LIST_TOKENS));
    list_probes(data);
}

/// Parses the input as a rule file (`[rules] files`), and again built from rule-file keys,
/// values and syntax.
///
/// Properties: no panic; an error list is non-empty and each error names the path, a line
/// inside the text and a key, with a message, on one line; a set parses the same twice, holds
/// one rule per `[[rule]]` table of the TOML, and the same file given twice makes exactly one
/// duplicate-name error per rule, at the second file; `evaluate` at every stage on fixed facts
/// (and on facts taken from the input) never panics, decides only with a terminal action and
/// a rule of the set, and a reply a decision carries or defaults to is of the action's class
/// (5xx reject, 4xx defer), with an enhanced code of that class, and parses back to itself.
pub fn rule_file(data: &[u8]) {
    rule_text(&String::from_utf8_lossy(data));
    rule_text(&vocabulary(data, RULE_TOKENS));
}

/// Drives one session against a scripted downstream on invented time.
///
/// Input: byte 0 picks the config and the downstream's behaviour, byte 1 its details:
///
/// | bits | byte 0                                       | byte 1                              |
/// |------|----------------------------------------------|-------------------------------------|
/// | 0    | `bare_newline = "normalize"` (else reject)   | `k` (0..=15), see byte 0 bits 6–7   |
/// | 1    | `max_line_length = 512`                      |                                     |
/// | 2    | `max_message_size = 2000`                    |                                     |
/// | 3    | `max_recipients = 2`                         |                                     |
/// | 4    | `announce_client`: 0 xclient, 1 proxy-v1,    | replies come one byte per event     |
/// | 5    | 2 none, 3 xclient with `mode=multiplexing`   | replies wait for the next clock tick|
/// | 6    | downstream: 0 normal, 1 rejects every RCPT,  | connect: 0 ok, 1 first server       |
/// | 7    | 2 closes on its `k`-th read, 3 silent after  | refuses, 2 first never completes,   |
/// |      | `k` replies                                  | 3 every server refuses              |
///
/// With byte 0 bits 6–7 at 0 or 1 (where `k` is unused), `k`'s bit 3 puts the client in the
/// tarpit instead: a 6 s greet pause with the `220-` teaser, a zone listing the client with
/// weight 2, replies held 10 s and, with `k`'s bit 2, stuttered one byte per second; bytes
/// before the banner then make it a pregreet talker.
///
/// The rest is client bytes, except: `0xF0..=0xFF` advance the clock by `(b & 0x0F) × 37 s`
/// and call `handle_timeout` (so `0xF0` just cuts a chunk), `0xEE` is a graceful shutdown and
/// `0xEF` an immediate one. At the end the client hangs up. The rest is run as is, mapped into
/// the SMTP alphabet, and mapped onto whole commands and body lines.
///
/// STARTTLS is always offered. After `Action::StartTls` the next chunk plays the handshake: its
/// first byte is the outcome (even: done, bit 1 picks TLS 1.2 over 1.3; odd: failed) and the
/// rest is what the client sends over TLS.
///
/// Outside the tarpit, with byte 0 bits 6–7 at 0 or 1, `k`'s bit 0 makes the downstream offer
/// STARTTLS (`[downstream] tls` opportunistic, or required with `k`'s bit 1): it answers 220
/// with a forged reply in the same write, and the driver's handshake fails with `k`'s bit 2.
///
/// Properties: every line to the client is `ddd[ -]text` with CRLF; a `250` to end-of-data is
/// one the downstream gave to a final dot, each used once and in order; a client `354` or a
/// relayed `250` to MAIL or RCPT is never more frequent than the downstream's; `Close` comes
/// out once and nothing follows it; each drained outbox stays under 1 MB;
/// `handle_client_data` consumes at most what it is given and nothing while it does not want
/// to read; after `handle_timeout(now)` no deadline is due at `now`; `StartTls` comes once per
/// `220 Ready to start TLS`, after it, and nothing reaches the client between it and the end
/// of the handshake (no answer to bytes sent before the handshake, CVE-2011-0411); a failed
/// handshake closes the session; the reply forged after the downstream's 220 to STARTTLS never
/// reaches the client. Downstream side: bytes go
/// only to an open connection, commands are CRLF-terminated lines of the verbs tarmac sends,
/// no nested MAIL, RCPTs within `max_recipients`, DATA only after an accepted RCPT, XCLIENT
/// and PROXY only as configured, and no bare CR or LF in a body.
pub fn session(data: &[u8]) {
    let [scenario, details, rest @ ..] = data else {
        return;
    };
    let keep_controls = |mapped: &mut dyn FnMut(u8) -> Vec<u8>| -> Vec<u8> {
        rest.iter()
            .flat_map(|&b| if b >= 0xee { vec![b] } else { mapped(b) })
            .collect()
    };
    let alphabet = keep_controls(&mut |b| to_alphabet(&[b]));
    let words = keep_controls(&mut |b| vocabulary(&[b], SESSION_TOKENS).into_bytes());
    for script in [rest.to_vec(), alphabet, words] {
        Harness::run(*scenario, *details, &script);
    }
}

/// Loads a state snapshot file into a fresh table.
///
/// Input: byte 0 bits 0–1 pick the table (0 PASS cache, 1 greylist, 2 and 3 reputation); with
/// bit 7 clear the rest is the whole file, so the framing checks (header, end line, count,
/// hash) are what is exercised; with it set, each line of the rest becomes an entry of a file
/// framed correctly, so the entry parsers are reached.
///
/// Properties: no panic; a refused file leaves the table empty (all or nothing); a loaded one
/// holds at most the entries it reported kept; saving what loaded and loading that again
/// gives a table of the same size.
pub fn snapshot(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let kind = match selector & 0x03 {
        0 => Kind::Pass,
        1 => Kind::Greylist,
        _ => Kind::Reputation,
    };
    let bytes = if selector & 0x80 == 0 {
        rest.to_vec()
    } else {
        let mut writer = Writer::new(kind);
        for line in rest.split(|&b| b == b'\n') {
            writer.entry(format_args!("{}", String::from_utf8_lossy(line)));
        }
        writer.finish()
    };
    let _ = state_snapshot::entries(kind, &bytes);
    let clocks = Clocks::new(
        Instant::now(),
        UNIX_EPOCH + Duration::from_millis(1_795_438_862_000),
    );
    let config = base_config();
    let sizes = |first: usize, kept: Option<usize>, second: Option<usize>| match kept {
        None => assert_eq!(first, 0, "a refused {kind:?} snapshot loaded entries"),
        Some(kept) => {
            assert!(first <= kept, "{first} entries held, {kept} reported kept");
            assert_eq!(
                second,
                Some(first),
                "{kind:?}: save and load changed the table"
            );
        }
    };
    match kind {
        Kind::Pass => {
            let fresh = || PassCache::new(config.tarpit.pass_ttl);
            let table = fresh();
            let kept = table.restore(&bytes, &clocks).ok().map(|r| r.kept);
            let again = fresh();
            let second = again
                .restore(&table.snapshot(&clocks), &clocks)
                .ok()
                .map(|_| again.len());
            sizes(table.len(), kept, second);
        }
        Kind::Greylist => {
            let greylist = &GreylistTimes::of(&config.greylist);
            let table = Greylist::new(clocks.now());
            let kept = table
                .restore(&bytes, &clocks, greylist)
                .ok()
                .map(|r| r.kept);
            let again = Greylist::new(clocks.now());
            let saved = table.snapshot(&clocks, greylist);
            let second = again
                .restore(&saved, &clocks, greylist)
                .ok()
                .map(|_| again.len());
            sizes(table.len(), kept, second);
        }
        Kind::Reputation => {
            let half_life = config.reputation.half_life;
            let table = ReputationTable::new();
            let kept = table
                .restore(&bytes, &clocks, half_life)
                .ok()
                .map(|r| r.kept);
            let again = ReputationTable::new();
            let saved = table.snapshot(&clocks, half_life);
            let second = again
                .restore(&saved, &clocks, half_life)
                .ok()
                .map(|_| again.len());
            sizes(table.len(), kept, second);
        }
    }
}

// ---- command ----

fn command_lines(data: &[u8]) {
    check_command(data);
    for line in data.split(|&b| b == b'\n') {
        check_command(line.strip_suffix(b"\r").unwrap_or(line));
    }
}

fn check_command(line: &[u8]) {
    match parse_command(line) {
        Ok(Command::Mail { from, params }) => {
            check_address(from, line);
            // What the session sends downstream (`send_mail`, all parameters offered).
            let relayed = mail_line(from, params);
            assert_eq!(
                parse_command(relayed.as_bytes()),
                Ok(Command::Mail { from, params }),
                "relayed {relayed:?} for {}",
                escape(line)
            );
        }
        Ok(Command::Rcpt { to }) => {
            assert!(!to.is_empty(), "empty recipient from {}", escape(line));
            check_address(to, line);
            let relayed = format!("RCPT TO:<{to}>");
            assert_eq!(
                parse_command(relayed.as_bytes()),
                Ok(Command::Rcpt { to }),
                "relayed {relayed:?} for {}",
                escape(line)
            );
        }
        Ok(Command::Ehlo(name) | Command::Helo(name)) => {
            assert!(!name.is_empty(), "empty HELO from {}", escape(line));
            assert_eq!(name, name.trim_matches(' '), "untrimmed {}", escape(line));
            assert!(
                !name.bytes().any(is_control),
                "control byte in HELO from {}",
                escape(line)
            );
        }
        Ok(_) => {}
        Err(error) => {
            let reply = error.reply();
            assert!(
                matches!(reply.code, 500 | 501 | 555),
                "{error:?} answers {}",
                reply.code
            );
            let mut wire = Vec::new();
            reply.write_to(&mut wire);
            check_client_lines(&wire);
            assert_eq!(
                wire.iter().filter(|&&b| b == b'\n').count(),
                1,
                "{error:?} writes {}",
                escape(&wire)
            );
            assert_eq!(
                parse_reply(&wire),
                Ok(Status::Complete((reply, wire.len()))),
                "{error:?} does not parse back"
            );
        }
    }
}

/// No control byte anywhere, at most 254 bytes, and `<`, `>` or a space only inside a quoted
/// local part: nothing in an address can end the path or the line it is relayed in.
fn check_address(address: &str, line: &[u8]) {
    assert!(
        !address.bytes().any(is_control),
        "control byte in {address:?} from {}",
        escape(line)
    );
    assert!(address.len() <= 254, "{address:?} is too long");
    let unquoted = after_quoted(address.as_bytes());
    assert!(
        !unquoted.iter().any(|b| b"<> ".contains(b)),
        "bracket or space outside quotes in {address:?} from {}",
        escape(line)
    );
}

/// What follows a leading quoted string (with backslash escapes), or all of `s`.
fn after_quoted(s: &[u8]) -> &[u8] {
    let Some(rest) = s.strip_prefix(b"\"") else {
        return s;
    };
    let mut i = 0;
    while let Some(&b) = rest.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return rest.get(i + 1..).unwrap_or_default(),
            _ => i += 1,
        }
    }
    b""
}

fn mail_line(from: &str, params: MailParams) -> String {
    let mut line = format!("MAIL FROM:<{from}>");
    if let Some(size) = params.size {
        line.push_str(&format!(" SIZE={size}"));
    }
    match params.body {
        Some(Body::SevenBit) => line.push_str(" BODY=7BIT"),
        Some(Body::EightBitMime) => line.push_str(" BODY=8BITMIME"),
        None => {}
    }
    if params.smtputf8 {
        line.push_str(" SMTPUTF8");
    }
    line
}

// ---- reply ----

fn reply_stream(data: &[u8]) {
    let result = parse_reply(data);
    match &result {
        Ok(Status::Complete((reply, used))) => {
            let used = *used;
            assert!(
                used > 0 && used <= data.len(),
                "used {used} of {}",
                data.len()
            );
            assert_eq!(data.get(used - 1), Some(&b'\n'), "reply not ended by LF");
            check_reply_invariants(reply);
            let head = data.get(..used).unwrap_or_default();
            assert_eq!(
                parse_reply(head),
                Ok(Status::Complete((reply.clone(), used))),
                "bytes after the reply changed it"
            );
            check_prefixes_partial(head);
            round_trip(reply);
        }
        Ok(Status::Partial) => {
            assert!(
                data.len() < MAX_REPLY_LINE * MAX_REPLY_LINES,
                "partial after {} bytes",
                data.len()
            );
            check_prefixes_partial(data);
        }
        Err(_) => {}
    }
}

fn check_reply_invariants(reply: &Reply) {
    assert!((200..=599).contains(&reply.code), "code {}", reply.code);
    assert!(!reply.lines.is_empty() && reply.lines.len() <= MAX_REPLY_LINES);
    for line in &reply.lines {
        assert!(!line.contains(['\r', '\n']), "line end in text {line:?}");
    }
    if let Some(enhanced) = reply.enhanced {
        assert_eq!(u16::from(enhanced.class()), reply.code / 100, "{reply:?}");
    }
}

/// Incomplete input is not an error: every strict prefix of `whole` (a complete reply, or
/// input that is itself partial) must be `Partial`. Checked on short inputs only, as each
/// prefix is a full rescan.
fn check_prefixes_partial(whole: &[u8]) {
    if whole.len() > 300 {
        return;
    }
    for end in 0..whole.len() {
        let prefix = whole.get(..end).unwrap_or_default();
        assert_eq!(
            parse_reply(prefix),
            Ok(Status::Partial),
            "prefix {} of {}",
            escape(prefix),
            escape(whole)
        );
    }
}

/// `write_to` then `parse_reply` gives back `reply` (when the written lines fit the parser's
/// caps: a relayed line grows by the enhanced code, and lossy text by U+FFFD).
fn round_trip(reply: &Reply) {
    let mut wire = Vec::new();
    reply.write_to(&mut wire);
    if wire
        .split_inclusive(|&b| b == b'\n')
        .any(|line| line.len() > MAX_REPLY_LINE)
    {
        return;
    }
    check_written_lines(&wire, reply.code);
    assert_eq!(
        parse_reply(&wire),
        Ok(Status::Complete((reply.clone(), wire.len()))),
        "{reply:?} written as {}",
        escape(&wire)
    );
}

/// Builds a reply from the input: bytes 0–1 the code, byte 2 the enhanced code, the rest
/// lines split at 0xFF (CR/LF turned into spaces, as `write_to` would).
fn reply_built(data: &[u8]) {
    let [a, b, c, d, rest @ ..] = data else {
        return;
    };
    let code = 200 + u16::from_le_bytes([*a, *b]) % 400;
    let class = u8::try_from(code / 100).unwrap_or(0);
    let enhanced = (c & 1 == 1 && class != 3)
        .then(|| EnhancedCode(class, u16::from(c >> 1) * 7, u16::from(*d) * 3 % 1000));
    let lines: Vec<String> = rest
        .split(|&b| b == 0xff)
        .take(MAX_REPLY_LINES)
        .map(|l| String::from_utf8_lossy(l).replace(['\r', '\n'], " "))
        .collect();
    // The one ambiguity of the wire form (see `reply`'s module doc): without an enhanced
    // code, text that starts with one would be read as one.
    if enhanced.is_none() {
        let first = lines.first().map_or("", String::as_str);
        let word = first.split(' ').next().unwrap_or("");
        if EnhancedCode::parse(word).is_some_and(|e| e.class() == class) {
            return;
        }
    }
    round_trip(&Reply::multiline(code, enhanced, lines));
}

/// Each line of a written reply: the code, `-` on all but the last line and a space (or
/// nothing, for an empty last line) on the last, no CR or LF inside, CRLF at the end.
fn check_written_lines(wire: &[u8], code: u16) {
    let digits = code.to_string();
    let lines: Vec<&[u8]> = wire.split_inclusive(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(body) = line.strip_suffix(b"\r\n") else {
            panic!("line without CRLF: {}", escape(line));
        };
        assert!(!body.contains(&b'\r'), "CR inside {}", escape(line));
        assert!(
            body.starts_with(digits.as_bytes()),
            "code of {}",
            escape(line)
        );
        let sep = body.get(3).copied();
        if i + 1 < lines.len() {
            assert_eq!(sep, Some(b'-'), "continuation {}", escape(line));
        } else {
            assert!(
                matches!(sep, None | Some(b' ')),
                "last line {}",
                escape(line)
            );
        }
    }
}

// ---- data ----

/// What decoding an input produced, whole or in chunks.
#[derive(Debug, PartialEq, Eq)]
struct Decoding {
    out: Vec<u8>,
    consumed: usize,
    done: bool,
    violation: Option<DataViolation>,
    size: u64,
}

fn decode_checked(mode: BareNewline, max_size: u64, seed: u8, body: &[u8]) {
    let whole = decode(mode, max_size, &[body]);
    let chunks = cut(body, seed);
    let pieces = decode(mode, max_size, &chunks);
    assert_eq!(
        whole,
        pieces,
        "chunking changed the result ({mode:?}, max {max_size}) for {}",
        escape(body)
    );
    check_data_output(&whole.out, body);

    let model = model_decode(body);
    assert_eq!(
        (whole.consumed, whole.done, whole.size),
        (model.consumed, model.done, model.size),
        "consumed/done/size for {}",
        escape(body)
    );
    let too_big = model.size > max_size;
    match mode {
        BareNewline::Normalize => assert_eq!(
            whole.violation,
            too_big.then_some(DataViolation::TooBig),
            "violation for {}",
            escape(body)
        ),
        BareNewline::Reject if model.bare => assert!(
            whole.violation.is_some()
                && (too_big || whole.violation == Some(DataViolation::BareNewline)),
            "bare newline not refused in {}",
            escape(body)
        ),
        BareNewline::Reject => assert_eq!(
            whole.violation,
            too_big.then_some(DataViolation::TooBig),
            "violation for {}",
            escape(body)
        ),
    }
    if whole.violation.is_none() {
        assert_eq!(
            escape(&whole.out),
            escape(&model.out),
            "output for {}",
            escape(body)
        );
    } else {
        assert!(
            model.out.starts_with(&whole.out),
            "output {} is not a prefix of {} for {}",
            escape(&whole.out),
            escape(&model.out),
            escape(body)
        );
    }
}

fn decode(mode: BareNewline, max_size: u64, chunks: &[&[u8]]) -> Decoding {
    let mut decoder = DataDecoder::new(mode, max_size);
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut done = false;
    for chunk in chunks {
        let before = out.len();
        let step = decoder.decode(chunk, &mut out);
        assert!(step.consumed <= chunk.len(), "consumed more than given");
        if done {
            assert!(step.done && step.consumed == 0 && out.len() == before);
            continue;
        }
        if !step.done {
            assert_eq!(step.consumed, chunk.len(), "stopped before the end");
        }
        consumed += step.consumed;
        done = step.done;
    }
    Decoding {
        out,
        consumed,
        done,
        violation: decoder.violation(),
        size: decoder.size(),
    }
}

/// Cuts `body` into chunks of pseudo-random lengths (empty ones included) seeded by `seed`.
fn cut(body: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut rng = XorShift::new((u64::from(seed) << 32) | body.len() as u64);
    let longest = 2 + usize::from(seed >> 4) * 4;
    let mut chunks = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let len = (rng.next() as usize % longest).min(rest.len());
        let (chunk, tail) = rest.split_at(len);
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

/// The output can never end a message early or carry a bare line end downstream.
fn check_data_output(out: &[u8], body: &[u8]) {
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(out);
    assert!(
        find(&framed, b"\r\n.\r\n").is_none(),
        "CRLF.CRLF in output {} for {}",
        escape(out),
        escape(body)
    );
    assert!(
        !has_bare_newline(out, true),
        "bare CR or LF in output {} for {}",
        escape(out),
        escape(body)
    );
}

/// The reference decoding, written differently from `DataDecoder`: find the end marker on the
/// whole input first, then cut the content at every CRLF, bare CR and bare LF.
struct Model {
    out: Vec<u8>,
    consumed: usize,
    done: bool,
    size: u64,
    /// A bare CR or LF in the content.
    bare: bool,
}

fn model_decode(body: &[u8]) -> Model {
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(body);
    let (content, consumed, done) = match find(&framed, b"\r\n.\r\n") {
        // The CRLF before the dot belongs to the content; `consumed` ends after the final LF.
        Some(at) => (body.get(..at).unwrap_or_default(), at + 3, true),
        // A trailing CR is undecided (CRLF or bare) until the next byte: nothing for it yet.
        None => (body.strip_suffix(b"\r").unwrap_or(body), body.len(), false),
    };
    let mut model = Model {
        out: Vec::new(),
        consumed,
        done,
        size: 0,
        bare: false,
    };
    let mut after_crlf = true;
    let mut rest = content;
    loop {
        let end = rest
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .unwrap_or(rest.len());
        let (mut text, tail) = rest.split_at(end);
        // Only a line start after a real CRLF has a stuffing dot to drop.
        if after_crlf && text.first() == Some(&b'.') {
            text = text.get(1..).unwrap_or_default();
        }
        if text.first() == Some(&b'.') {
            model.out.push(b'.');
        }
        model.out.extend_from_slice(text);
        model.size += text.len() as u64;
        let (newline, next) = match tail {
            [] => break,
            [b'\r', b'\n', next @ ..] => (2, next),
            [_, next @ ..] => (1, next),
        };
        model.size += newline;
        model.bare |= newline == 1;
        after_crlf = newline == 2;
        model.out.extend_from_slice(b"\r\n");
        rest = next;
    }
    model
}

// ---- config ----

const CONFIG_PATH: &str = "/fuzz/tarmac.toml";

fn config_text(text: &str) {
    let path = Path::new(CONFIG_PATH);
    match Config::from_toml(text, path) {
        Ok(config) => {
            assert_eq!(config.path.as_deref(), Some(path));
            assert!(config.server.workers > 0, "workers = 0 left unresolved");
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "error without errors for {text:?}");
            let lines = text.split('\n').count();
            for error in &errors.0 {
                assert!(!error.message.trim().is_empty(), "{error:?} for {text:?}");
                assert_eq!(error.path, path);
                if let Some(line) = error.line {
                    assert!((1..=lines).contains(&line), "{error:?} for {text:?}");
                }
            }
            let shown = errors.to_string();
            assert_eq!(
                shown.lines().count(),
                errors.0.len(),
                "not one line per error: {shown:?} for {text:?}"
            );
        }
    }
}

/// Keys, values and syntax of `tarmac.toml`; input bytes pick from it.
const CONFIG_TOKENS: &[&str] = &[
    "\n",
    " ",
    "=",
    "\"",
    ",",
    "[",
    "]",
    "#",
    "\n[server]\n",
    "\n[limits]\n",
    "\n[timeouts]\n",
    "\n[downstream]\n",
    "\n[tls]\n",
    "\n[dns]\n",
    "\n[[dnsbl]]\n",
    "\n[scoring]\n",
    "\n[tarpit]\n",
    "\n[greylist]\n",
    "\n[reputation]\n",
    "\n[state]\n",
    "\n[metrics]\n",
    "\n[lists]\n",
    "\n[rules]\n",
    "listen = ",
    "hostname = ",
    "workers = ",
    "max_connections = ",
    "max_tarpitted = ",
    "state_dir = ",
    "proxy_protocol_from = ",
    "max_connections_per_ip = ",
    "connection_rate_per_ip = ",
    "connection_rate_per_subnet = ",
    "max_message_size = ",
    "max_recipients = ",
    "max_unknown_commands = ",
    "max_junk_commands = ",
    "max_errors = ",
    "max_line_length = ",
    "bare_newline = ",
    "connect = ",
    "command = ",
    "data = ",
    "idle = ",
    "drain = ",
    "servers = ",
    "mode = ",
    "pool_size = ",
    "announce_client = ",
    "tls = ",
    "tls_verify = ",
    "cert = ",
    "key = ",
    "timeout = ",
    "cache_ttl = ",
    "rdns = ",
    "zone = ",
    "weight = ",
    "codes = ",
    "reply = ",
    "allow_at = ",
    "tarpit_at = ",
    "reject_at = ",
    "reject_mode = ",
    "greet_pause = ",
    "banner_continuation = ",
    "pregreet = ",
    "reply_delay = ",
    "stutter = ",
    "pass_ttl = ",
    "enabled = ",
    "delay = ",
    "retry_window = ",
    "half_life = ",
    "backend = ",
    "redis = ",
    "prefix = ",
    "allow = ",
    "deny = ",
    "files = ",
    "\"0.0.0.0:25\"",
    "[\"127.0.0.1:10025\"]",
    "\"[::1]:25\"",
    "\"192.0.2.1\"",
    "\"mx.example.org\"",
    "\"-bad-\"",
    "0",
    "1",
    "-1",
    "4096",
    "99999999999999999999",
    "1.5",
    "\"25MB\"",
    "\"64KiB\"",
    "\"0B\"",
    "\"30/min\"",
    "\"5/s\"",
    "\"0/h\"",
    "\"250ms\"",
    "\"0s\"",
    "\"36d\"",
    "\"9999999999999d\"",
    "\"reject\"",
    "\"normalize\"",
    "\"xclient\"",
    "\"proxy-v1\"",
    "\"proxy-v2\"",
    "\"none\"",
    "\"required\"",
    "\"multiplexing\"",
    "\"enforce\"",
    "\"drop\"",
    "\"redis\"",
    "true",
    "false",
    "[\"subnet\", \"sender\", \"recipient\"]",
    "\"127.0.0.2-127.0.0.11\"",
    "\"192.0.2.0/24\"",
    "\"2001:db8::/129\"",
    "\"zen.spamhaus.org\"",
    "\"cert.pem\"",
    "\"\"",
    "[]",
    "{}",
    "\"\u{e9}\"",
    "\"\\u0000\"",
    "'''x\n'''",
    "\r\n",
];

// ---- list_file ----

const LIST_PATH: &str = "/fuzz/allow.txt";

/// Entries of each kind checked against the model per input; each costs a scan of all entries.
const LIST_MODEL_ENTRIES: usize = 32;

/// One line's entry, as the model reads it.
enum ModelEntry {
    Net(Cidr),
    Domain(String),
}

fn list_text(text: &str) {
    let path = PathBuf::from(LIST_PATH);
    let parse = |files: &[&str]| {
        let files: Vec<(PathBuf, String)> = files
            .iter()
            .map(|text| (path.clone(), (*text).to_owned()))
            .collect();
        List::parse(&files)
    };
    let whole = parse(&[text]);
    // A byte order mark is skipped only at the start of a file, so it stays with line 1.
    let body = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = body.lines().collect();
    let mut expected_errors = Vec::new();
    let mut entries = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        // Alone, but on line 2, so a byte order mark inside the file stays an error here too.
        match parse(&[&format!("\n{line}")]) {
            Ok(alone) => match alone.len() {
                0 => {}
                1 => entries.push(model_entry(line)),
                n => panic!("{n} entries from one line {line:?}"),
            },
            Err(mut errors) => {
                assert_eq!(errors.len(), 1, "{errors:?} from one line {line:?}");
                let mut error = errors.remove(0);
                assert_eq!(error.line, 2, "{error:?}");
                error.line = i + 1;
                expected_errors.push(error);
            }
        }
    }
    let list = match whole {
        Err(errors) => {
            assert!(!errors.is_empty(), "error without errors for {text:?}");
            for error in &errors {
                let shown = error.to_string();
                assert!(
                    !shown.contains(['\n', '\r']) && !error.message.trim().is_empty(),
                    "{shown:?} for {text:?}"
                );
                assert!(error.key.is_empty(), "{error:?}");
                let line = error.line;
                assert!(
                    shown.starts_with(&format!("{LIST_PATH}:{line}: ")),
                    "{shown:?}"
                );
            }
            assert_eq!(
                errors, expected_errors,
                "errors in the file and line by line"
            );
            return;
        }
        Ok(list) => list,
    };
    assert_eq!(
        expected_errors,
        [],
        "lines that fail alone pass in {text:?}"
    );
    assert_eq!(list.len(), entries.len(), "entries in {text:?}");
    assert_eq!(list.is_empty(), entries.is_empty());

    let reversed: Vec<&str> = lines.iter().rev().copied().collect();
    assert_eq!(
        parse(&[&reversed.join("\n")]).as_ref(),
        Ok(&list),
        "reversed lines of {text:?}"
    );
    let (head, tail) = lines.split_at(lines.len() / 2);
    assert_eq!(
        parse(&[&head.join("\n"), &tail.join("\n")]).as_ref(),
        Ok(&list),
        "{text:?} split in two files"
    );

    let nets: Vec<Cidr> = entries
        .iter()
        .filter_map(|entry| match entry {
            ModelEntry::Net(cidr) => Some(*cidr),
            ModelEntry::Domain(_) => None,
        })
        .collect();
    let domains: Vec<&str> = entries
        .iter()
        .filter_map(|entry| match entry {
            ModelEntry::Domain(name) => Some(name.as_str()),
            ModelEntry::Net(_) => None,
        })
        .collect();
    for cidr in nets.iter().take(LIST_MODEL_ENTRIES) {
        let (first, last) = cidr_ends(cidr);
        assert!(list.contains_ip(first), "{cidr} lacks {first}");
        assert!(list.contains_ip(last), "{cidr} lacks {last}");
        for probe in [Some(first), Some(last), step(first, -1), step(last, 1)]
            .into_iter()
            .flatten()
        {
            check_ip_probe(&list, &nets, probe);
        }
    }
    for domain in domains.iter().take(LIST_MODEL_ENTRIES) {
        let upper = domain.to_ascii_uppercase();
        for name in [
            domain.to_string(),
            format!("{domain}."),
            format!("x.{domain}"),
            format!("X.{upper}."),
            upper,
        ] {
            assert!(list.contains_domain(&name), "{domain} lacks {name:?}");
        }
        let parent = domain.split_once('.').map_or("", |(_, parent)| parent);
        for name in [
            format!("x{domain}"),
            format!("{domain}.x"),
            format!("{domain}.."),
            parent.to_owned(),
        ] {
            let expected = model_contains_domain(&domains, &name);
            assert_eq!(
                list.contains_domain(&name),
                expected,
                "{name:?} in {text:?}"
            );
        }
    }
    for probe in input_probes(body.as_bytes()) {
        check_ip_probe(&list, &nets, probe);
    }
}

/// A list of blocks read from the first half of the input in binary, checked at addresses
/// from the whole input.
fn list_probes(data: &[u8]) {
    let (entries, probes) = data.split_at(data.len() / 2);
    let mut text = String::new();
    let mut nets = Vec::new();
    for (i, probe) in input_probes(entries).into_iter().enumerate() {
        let max = if probe.is_ipv4() { 32 } else { 128 };
        let prefix = entries.get(i).map_or(max, |b| b % (max + 1));
        let Ok(cidr) = format!("{}/{prefix}", mask(probe, prefix)).parse::<Cidr>() else {
            panic!("{probe} masked to /{prefix} is not a block");
        };
        text.push_str(&format!("{cidr}\n"));
        nets.push(cidr);
    }
    let path = PathBuf::from(LIST_PATH);
    let list = List::parse(&[(path, text.clone())])
        .unwrap_or_else(|errors| panic!("{errors:?} from {text:?}"));
    for probe in input_probes(probes)
        .into_iter()
        .chain(input_probes(entries))
    {
        check_ip_probe(&list, &nets, probe);
    }
}

/// The entry on a line that parses alone to one entry: a `Cidr` if it reads as one, else a
/// domain, lowercase without its trailing dot.
fn model_entry(line: &str) -> ModelEntry {
    let word = line.split('#').next().unwrap_or_default().trim();
    match word.parse::<Cidr>() {
        Ok(cidr) => ModelEntry::Net(cidr),
        Err(_) => {
            assert!(
                !word.contains([':', '/']),
                "{word:?} accepted, but not as an address or block"
            );
            let name = word.strip_suffix('.').unwrap_or(word);
            ModelEntry::Domain(name.to_ascii_lowercase())
        }
    }
}

fn check_ip_probe(list: &List, nets: &[Cidr], probe: IpAddr) {
    let mut forms = vec![probe];
    if let IpAddr::V4(v4) = probe {
        forms.push(IpAddr::V6(v4.to_ipv6_mapped()));
    }
    for form in forms {
        let expected = nets.iter().any(|cidr| model_contains_ip(cidr, form));
        assert_eq!(list.contains_ip(form), expected, "{form} in {nets:?}");
    }
}

/// `Cidr::contains`, with a block written in IPv4-mapped form (`::ffff:192.0.2.0/120`) read as
/// the IPv4 block it means, as lists store it.
fn model_contains_ip(cidr: &Cidr, ip: IpAddr) -> bool {
    let cidr = match cidr.addr {
        IpAddr::V6(v6) if cidr.prefix >= 96 => match v6.to_ipv4_mapped() {
            Some(v4) => Cidr {
                addr: IpAddr::V4(v4),
                prefix: cidr.prefix - 96,
            },
            None => *cidr,
        },
        _ => *cidr,
    };
    cidr.contains(ip)
}

fn model_contains_domain(domains: &[&str], name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    domains
        .iter()
        .any(|domain| name == *domain || name.ends_with(&format!(".{domain}")))
}

/// A block's first and last address, computed in `u128` so no shift overflows.
fn cidr_ends(cidr: &Cidr) -> (IpAddr, IpAddr) {
    let (start, bits) = match cidr.addr {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    };
    let hosts = u32::from(bits - cidr.prefix);
    let span = if hosts == 128 {
        u128::MAX
    } else {
        (1u128 << hosts) - 1
    };
    (cidr.addr, from_bits(cidr.addr.is_ipv4(), start | span))
}

/// The address `delta` (±1) away, if it stays in the family's range.
fn step(ip: IpAddr, delta: i8) -> Option<IpAddr> {
    Some(match ip {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(
            u32::from(v4).checked_add_signed(i32::from(delta))?,
        )),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(
            u128::from(v6).checked_add_signed(i128::from(delta))?,
        )),
    })
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    let (bits, width) = match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    };
    let hosts = width - u32::from(prefix);
    let kept = if hosts == 128 {
        0
    } else {
        bits >> hosts << hosts
    };
    from_bits(ip.is_ipv4(), kept)
}

fn from_bits(v4: bool, bits: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

/// Addresses read from the input: alternately 4 bytes as IPv4 and 16 as IPv6, at most 16.
fn input_probes(data: &[u8]) -> Vec<IpAddr> {
    let mut probes = Vec::new();
    let mut rest = data;
    while probes.len() < 16 {
        if probes.len() % 2 == 0 {
            let Some((head, tail)) = rest.split_first_chunk::<4>() else {
                break;
            };
            probes.push(IpAddr::V4(Ipv4Addr::from(*head)));
            rest = tail;
        } else {
            let Some((head, tail)) = rest.split_first_chunk::<16>() else {
                break;
            };
            probes.push(IpAddr::V6(Ipv6Addr::from(*head)));
            rest = tail;
        }
    }
    probes
}

/// Entries, pieces of entries and syntax of list files; input bytes pick from it.
const LIST_TOKENS: &[&str] = &[
    "\n",
    "\n",
    "\r\n",
    " ",
    "\t",
    "#",
    " # comment\n",
    ".",
    ":",
    "::",
    "/",
    "0",
    "1",
    "2",
    "7",
    "9",
    "25",
    "255",
    "256",
    "00",
    "ff",
    "ffff",
    "192.0.2.",
    "192.0.2.7",
    "198.51.100.0/24",
    "203.0.113.128/25",
    "192.0.2.1/24",
    "0.0.0.0/0",
    "::/0",
    "2001:db8::",
    "2001:db8::/32",
    "::ffff:",
    "::ffff:192.0.2.0/120",
    "/8",
    "/16",
    "/24",
    "/25",
    "/31",
    "/32",
    "/33",
    "/48",
    "/64",
    "/96",
    "/120",
    "/127",
    "/128",
    "example.com",
    "EXAMPLE.net",
    "mail.",
    "x.",
    "-",
    "_",
    "*.",
    "*",
    ",",
    "xn--",
    "\u{e9}",
    ".invalid",
    "localhost",
    "a",
    "\u{feff}",
    "\0",
];

// ---- session ----

/// Whole commands, body lines and smuggling fragments; input bytes pick from it.
const SESSION_TOKENS: &[&str] = &[
    "EHLO client.example\r\n",
    "HELO client.example\r\n",
    "MAIL FROM:<a@example.org>\r\n",
    "MAIL FROM:<> SIZE=100 BODY=8BITMIME SMTPUTF8\r\n",
    "MAIL FROM:<\u{e9}@example.org> SMTPUTF8\r\n",
    "MAIL FROM:<a@example.org> SIZE=99999999999\r\n",
    "RCPT TO:<b@example.net>\r\n",
    "RCPT TO:<c@example.net>\r\n",
    "RCPT TO:<postmaster>\r\n",
    "RCPT TO:<\u{e9}@example.net>\r\n",
    "DATA\r\n",
    "RSET\r\n",
    "NOOP\r\n",
    "QUIT\r\n",
    "VRFY a\r\n",
    "HELP\r\n",
    "STARTTLS\r\n",
    "XCLIENT ADDR=192.0.2.1\r\n",
    "BDAT 10 LAST\r\n",
    "FOO\r\n",
    "MAIL FROM:a@b\r\n",
    "Subject: hi\r\n",
    "\r\n",
    ".\r\n",
    "..leading dot\r\n",
    "body line\r\n",
    "\n.\r\n",
    "\r\n.\n",
    "\r.\r\n",
    "\n.\n",
    "\r",
    "\n",
    ".",
    "x",
    "\u{e9}",
    "\r\n.\r\nRSET\r\n",
];

/// Length of the `x` run that a vocabulary byte just past the token list makes: longer than a
/// 512-byte `max_line_length`, and a third of a 2000-byte `max_message_size`.
const LONG_TOKEN: usize = 600;

/// How the scripted downstream behaves (byte 0, bits 6–7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Normal,
    RejectRcpt,
    /// Closes the connection on its `k`-th read (counting from 0).
    CloseOnRead(u32),
    /// Answers `k` replies per connection (banner included), then nothing.
    SilentAfter(u32),
}

/// How connects go (byte 1, bits 6–7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnectMode {
    Ok,
    FirstRefused,
    FirstHangs,
    AllRefused,
}

/// An event waiting to be delivered to the session, tagged with the downstream connection it
/// belongs to (events of a connection the session closed are never delivered).
#[derive(Debug)]
enum Event {
    Connected(u32),
    /// Multiplexing: the pooled connection `g` comes back for a new transaction.
    Reused(u32, Carried),
    ConnectFailed(u32),
    Data(u32, Vec<u8>),
    Closed(u32),
    /// The driver's TLS handshake on connection `g` completed, or failed.
    TlsEstablished(u32),
    TlsFailed(u32),
}

/// The session, a scripted downstream and the client's view, on invented time.
struct Harness {
    session: Session,
    now: Instant,
    config: Arc<Config>,
    behaviour: Behaviour,
    connect_mode: ConnectMode,
    dribble: bool,
    /// Downstream replies are held until the next clock tick.
    lagging: bool,
    /// Events ready for delivery; `held` are those waiting for the next tick.
    events: VecDeque<Event>,
    held: Vec<Event>,
    /// The downstream connection the session asked for: its generation and, once connected,
    /// the scripted server on it.
    conn: Option<(u32, Option<FakeDownstream>)>,
    /// Multiplexing: the connection the session released, with what its EHLO offered.
    pooled: Option<(FakeDownstream, Carried)>,
    /// Connections the session closed or released: it must never hand out bytes for them.
    closed_links: Vec<u32>,
    /// Downstream reply bytes the session left unconsumed (a partial reply).
    ds_unread: Vec<u8>,
    client_pending: Vec<u8>,
    client_seen: ClientView,
    closed: bool,
    /// `Action::StartTls` came out: the next client chunk plays the handshake.
    handshaking: bool,
    /// The downstream offers STARTTLS (`k`'s bit 0).
    downstream_starttls: bool,
    /// The driver's handshakes with the downstream fail (`k`'s bit 2).
    downstream_tls_fails: bool,
    /// Counts across all downstream connections.
    totals: Totals,
}

/// Things the downstream said, over the whole session.
#[derive(Debug, Default)]
struct Totals {
    /// 250s to a final dot; the n-th carries the text `queued as F<n>`.
    dots_acked: u32,
    data_354: u32,
    mail_250: u32,
    rcpt_250: u32,
}

/// The client's side: every reply it got, checked as it arrives.
#[derive(Debug, Default)]
struct ClientView {
    bytes: Vec<u8>,
    /// Start of the first reply not yet checked.
    checked: usize,
    /// The last reply was a 354: the next one answers the end of data.
    after_354: bool,
    last_ack: u32,
    got_354: u32,
    got_mail_250: u32,
    got_rcpt_250: u32,
    /// Tarpit scenario: output may stop mid-reply (a `220-` teaser, stuttered bytes); only
    /// whole replies are checked, as they complete.
    partial_ok: bool,
    /// The `220-` greeting teaser was seen; its final line may carry another code (a 554,
    /// 521 or 421 instead of the 220), as DESIGN.md §1.3 and postscreen have it.
    teaser_seen: bool,
}

impl Harness {
    fn run(scenario: u8, details: u8, script: &[u8]) {
        let mut harness = Harness::new(scenario, details);
        harness.settle();
        let mut chunk_start = 0;
        for (i, &b) in script.iter().enumerate() {
            if b < 0xee {
                continue;
            }
            harness.client_send(script.get(chunk_start..i).unwrap_or_default());
            chunk_start = i + 1;
            match b {
                0xee => harness.shutdown(Shutdown::Graceful),
                0xef => harness.shutdown(Shutdown::Now),
                _ => harness.tick(Duration::from_secs(u64::from(b & 0x0f) * 37)),
            }
        }
        harness.client_send(script.get(chunk_start..).unwrap_or_default());
        harness.finish();
    }

    fn new(scenario: u8, details: u8) -> Harness {
        let mut config = base_config().clone();
        let limits = &mut config.limits;
        if scenario & 1 != 0 {
            limits.bare_newline = BareNewline::Normalize;
        }
        if scenario & 2 != 0 {
            limits.max_line_length = 512;
        }
        if scenario & 4 != 0 {
            limits.max_message_size = 2000;
        }
        if scenario & 8 != 0 {
            limits.max_recipients = 2;
        }
        config.downstream.announce_client = match (scenario >> 4) & 3 {
            0 | 3 => AnnounceClient::Xclient,
            1 => AnnounceClient::ProxyV1,
            _ => AnnounceClient::None,
        };
        if (scenario >> 4) & 3 == 3 {
            config.downstream.mode = DownstreamMode::Multiplexing;
        }
        let k = u32::from(details & 0x0f);
        let tarpit = scenario >> 6 <= 1 && k & 8 != 0;
        if tarpit {
            config.tarpit.greet_pause = Duration::from_secs(6);
            config.tarpit.reply_delay = Duration::from_secs(10);
            config.tarpit.stutter = Duration::from_secs(u64::from(k >> 2 & 1));
            config.dnsbl = vec![Dnsbl {
                zone: "bl.fuzz".into(),
                weight: 2,
                codes: Vec::new(),
                reply: None,
            }];
        }
        let downstream_starttls = !tarpit && scenario >> 6 <= 1 && k & 1 != 0;
        if downstream_starttls {
            config.downstream.tls = if k & 2 != 0 {
                DownstreamTls::Required
            } else {
                DownstreamTls::Opportunistic
            };
        }
        let behaviour = match scenario >> 6 {
            0 => Behaviour::Normal,
            1 => Behaviour::RejectRcpt,
            2 => Behaviour::CloseOnRead(k),
            _ => Behaviour::SilentAfter(k),
        };
        let connect_mode = match details >> 6 {
            0 => ConnectMode::Ok,
            1 => ConnectMode::FirstRefused,
            2 => ConnectMode::FirstHangs,
            _ => ConnectMode::AllRefused,
        };
        if connect_mode != ConnectMode::Ok {
            config
                .downstream
                .servers
                .push(SocketAddr::from(([127, 0, 0, 1], 10026)));
        }
        let config = Arc::new(config);
        let now = Instant::now();
        let peer = Peer {
            client: SocketAddr::from(([192, 0, 2, 7], 53211)),
            local: SocketAddr::from(([198, 51, 100, 1], 25)),
            accepted_at: UNIX_EPOCH + Duration::from_secs(1_795_438_862),
            stressed: false,
            starttls: true,
        };
        Harness {
            session: Session::new(Arc::clone(&config), peer, now),
            now,
            config,
            behaviour,
            connect_mode,
            dribble: details & 0x10 != 0,
            lagging: details & 0x20 != 0,
            events: VecDeque::new(),
            held: Vec::new(),
            conn: None,
            pooled: None,
            closed_links: Vec::new(),
            ds_unread: Vec::new(),
            client_pending: Vec::new(),
            client_seen: ClientView {
                partial_ok: tarpit,
                ..ClientView::default()
            },
            closed: false,
            handshaking: false,
            downstream_starttls,
            downstream_tls_fails: k & 4 != 0,
            totals: Totals::default(),
        }
    }

    fn client_send(&mut self, bytes: &[u8]) {
        if self.closed {
            return;
        }
        let mut bytes = bytes;
        if self.handshaking {
            // The chunk's first byte is the handshake's outcome (even: done, with TLS 1.3 or
            // 1.2 by the next bit; odd: failed); the rest was sent over TLS.
            let Some((&outcome, rest)) = bytes.split_first() else {
                return;
            };
            assert!(
                self.client_pending.is_empty(),
                "plain bytes kept for after TLS"
            );
            self.handshaking = false;
            if outcome & 1 == 0 {
                let version = if outcome & 2 == 0 {
                    TlsVersion::Tls13
                } else {
                    TlsVersion::Tls12
                };
                self.session.handle_tls_established(self.now, version);
                assert_eq!(self.session.report().tls, version.as_str());
            } else {
                self.session.handle_tls_failed(self.now);
                self.settle();
                assert!(self.closed, "a failed handshake left the session open");
                return;
            }
            self.settle();
            bytes = rest;
        }
        self.client_pending.extend_from_slice(bytes);
        self.pump();
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
        self.events.extend(self.held.drain(..));
        self.session.handle_timeout(self.now);
        self.settle();
        self.pump();
        if let Some(due) = self.session.poll_timeout() {
            assert!(
                due > self.now,
                "deadline {:?} still due after handle_timeout",
                self.now - due
            );
        }
    }

    fn shutdown(&mut self, how: Shutdown) {
        self.session.handle_shutdown(self.now, how);
        self.settle();
        self.pump();
        if how == Shutdown::Now {
            assert!(self.closed, "Shutdown::Now left the session open");
        }
    }

    /// The client hangs up; the session must close and leave no downstream connection open.
    fn finish(&mut self) {
        self.session.handle_client_eof(self.now);
        self.settle();
        self.pump();
        assert!(self.closed && self.session.is_closed(), "EOF did not close");
        assert!(self.conn.is_none(), "downstream left open after Close");
        assert_eq!(self.session.poll_timeout(), None, "deadline after close");
        self.session
            .handle_timeout(self.now + Duration::from_secs(100_000));
        self.settle();
    }

    /// Offers client bytes and delivers downstream events until neither makes progress.
    fn pump(&mut self) {
        for _ in 0..MAX_ROUNDS {
            let mut progress = false;
            if !self.client_pending.is_empty() && !self.closed {
                let wants = self.session.wants_read();
                let pending = std::mem::take(&mut self.client_pending);
                let used = self.session.handle_client_data(self.now, &pending);
                assert!(
                    used <= pending.len(),
                    "consumed {used} of {}",
                    pending.len()
                );
                if !wants {
                    assert!(
                        used == 0 || self.session.is_closed(),
                        "consumed {used} bytes while not wanting to read"
                    );
                }
                self.client_pending = pending.get(used..).unwrap_or_default().to_vec();
                progress |= used > 0;
                self.settle();
            }
            if let Some(event) = self.events.pop_front() {
                self.deliver(event);
                progress = true;
            }
            if !progress {
                return;
            }
        }
        panic!("session and downstream did not settle");
    }

    fn deliver(&mut self, event: Event) {
        let current = self.conn.as_ref().map(|(g, _)| *g);
        match event {
            Event::Connected(g) if current == Some(g) => {
                let mut fake = FakeDownstream::new(&self.config, self.behaviour);
                fake.offer_starttls = self.downstream_starttls;
                let banner = fake.connect();
                self.conn = Some((g, Some(fake)));
                self.session
                    .handle_downstream(self.now, LinkId(g), DownstreamEvent::Connected);
                self.settle();
                self.queue_replies(g, banner);
            }
            Event::Reused(g, carried) if current == Some(g) => {
                self.session.handle_downstream(
                    self.now,
                    LinkId(g),
                    DownstreamEvent::Reused(carried),
                );
            }
            Event::ConnectFailed(g) if current == Some(g) => {
                self.conn = None;
                self.session
                    .handle_downstream(self.now, LinkId(g), DownstreamEvent::ConnectFailed);
            }
            Event::Closed(g) if current == Some(g) => {
                // The socket stays the driver's until the session says CloseDownstream; what
                // it writes meanwhile (a QUIT) goes nowhere.
                if let Some((_, Some(fake))) = self.conn.as_mut() {
                    fake.gone = true;
                }
                self.session
                    .handle_downstream(self.now, LinkId(g), DownstreamEvent::Closed);
            }
            Event::Data(g, bytes) if current == Some(g) => {
                let mut buf = std::mem::take(&mut self.ds_unread);
                buf.extend_from_slice(&bytes);
                let used = self.session.handle_downstream(
                    self.now,
                    LinkId(g),
                    DownstreamEvent::Data(&buf),
                );
                assert!(used <= buf.len(), "consumed {used} of {}", buf.len());
                self.ds_unread = buf.get(used..).unwrap_or_default().to_vec();
            }
            Event::TlsEstablished(g) if current == Some(g) => {
                self.session.handle_downstream(
                    self.now,
                    LinkId(g),
                    DownstreamEvent::TlsEstablished,
                );
            }
            Event::TlsFailed(g) if current == Some(g) => {
                self.session
                    .handle_downstream(self.now, LinkId(g), DownstreamEvent::TlsFailed);
            }
            // An event of a connection the session already closed: the driver dropped it.
            _ => return,
        }
        self.settle();
    }

    /// What a driver does after every `handle_*`: hand out both sides' bytes, then run the
    /// actions. Downstream replies and connect results become queued events.
    fn settle(&mut self) {
        let mut out = Vec::new();
        self.session.poll_transmit(self.now, &mut out);
        assert!(out.len() < MAX_OUTBOX_DRAIN, "client outbox {}", out.len());
        if !out.is_empty() {
            assert!(
                !self.closed,
                "bytes for the client after Close: {}",
                escape(&out)
            );
            // Nothing is said between the switch and the end of the handshake, in plain text
            // or otherwise: in particular no answer to bytes pipelined after STARTTLS.
            assert!(
                !self.handshaking,
                "bytes for the client during the TLS handshake: {}",
                escape(&out)
            );
            assert!(
                find(&out, FORGED.as_bytes()).is_none(),
                "a reply forged after the downstream's 220 to STARTTLS reached the client"
            );
            self.client_seen.receive(&out, &self.totals);
        }
        let mut ds = Vec::new();
        for g in self.closed_links.clone() {
            self.session.poll_transmit_downstream(LinkId(g), &mut ds);
            assert!(
                ds.is_empty(),
                "bytes for a closed downstream: {}",
                escape(&ds)
            );
        }
        if let Some((g, _)) = self.conn {
            self.session.poll_transmit_downstream(LinkId(g), &mut ds);
        }
        assert!(
            ds.len() < MAX_OUTBOX_DRAIN,
            "downstream outbox {}",
            ds.len()
        );
        if !ds.is_empty() {
            let Some((g, Some(fake))) = self.conn.as_mut() else {
                panic!("bytes for an unconnected downstream: {}", escape(&ds));
            };
            let g = *g;
            // Whom the session speaks for now: a MAIL may only reach a connection announced
            // for exactly this client (DESIGN.md §6).
            let report = self.session.report();
            let client = Expected {
                addr: Some(report.client),
                helo: report.helo.map(<[u8]>::to_vec).unwrap_or_default(),
            };
            let answer = fake.feed(&ds, &client, &mut self.totals);
            match answer {
                Answer::Replies(replies) => self.queue_replies(g, replies),
                Answer::Close => self.queue(Event::Closed(g)),
            }
        }
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::ConnectDownstream {
                    link,
                    addr,
                    pooled: true,
                } if self.pooled.is_some() && addr == self.config.downstream.servers[0] => {
                    assert!(self.conn.is_none(), "second downstream while one is open");
                    let g = link.0;
                    if let Some((fake, carried)) = self.pooled.take() {
                        self.conn = Some((g, Some(fake)));
                        self.ds_unread.clear();
                        self.events.push_back(Event::Reused(g, carried));
                    }
                }
                Action::ConnectDownstream { link, addr, .. } => {
                    assert!(self.conn.is_none(), "second downstream while one is open");
                    assert!(
                        self.config.downstream.servers.contains(&addr),
                        "connect to {addr}"
                    );
                    let g = link.0;
                    self.conn = Some((g, None));
                    self.ds_unread.clear();
                    let first = addr
                        == self
                            .config
                            .downstream
                            .servers
                            .first()
                            .copied()
                            .unwrap_or(addr);
                    match self.connect_mode {
                        ConnectMode::AllRefused => self.events.push_back(Event::ConnectFailed(g)),
                        ConnectMode::FirstRefused if first => {
                            self.events.push_back(Event::ConnectFailed(g))
                        }
                        // Never completes: only the session's connect timeout ends it.
                        ConnectMode::FirstHangs if first => {}
                        _ => self.events.push_back(Event::Connected(g)),
                    }
                }
                Action::StartTlsDownstream(link) => {
                    let Some((g, Some(fake))) = self.conn.as_mut() else {
                        panic!("TLS for an unconnected downstream");
                    };
                    assert_eq!(*g, link.0, "TLS for another connection");
                    assert!(
                        fake.awaiting_tls,
                        "TLS before the downstream's 220 to STARTTLS"
                    );
                    let g = *g;
                    let fails = self.downstream_tls_fails;
                    if fails {
                        fake.gone = true;
                    } else {
                        fake.start_tls();
                    }
                    // The driver drops what came after the 220: plain text anyone could forge.
                    self.ds_unread.clear();
                    let stale = |event: &Event| matches!(event, Event::Data(e, _) if *e == g);
                    self.events.retain(|event| !stale(event));
                    self.held.retain(|event| !stale(event));
                    self.queue(if fails {
                        Event::TlsFailed(g)
                    } else {
                        Event::TlsEstablished(g)
                    });
                }
                Action::CloseDownstream { link, quit } => {
                    // A connection the driver already dropped (it reported `Closed` or a
                    // failed connect) may be closed again: nothing happens.
                    if let Some((g, fake)) = self.conn.take_if(|(g, _)| *g == link.0) {
                        if quit && let Some(mut fake) = fake {
                            assert!(fake.banner_was_sent(), "QUIT before the banner");
                            let client = Expected::default();
                            let _ = fake.feed(b"QUIT\r\n", &client, &mut self.totals);
                        }
                        self.closed_links.push(g);
                        self.ds_unread.clear();
                    }
                }
                Action::Close => {
                    assert!(!self.closed, "Close came out twice");
                    self.closed = true;
                }
                Action::StartTls => {
                    assert!(!self.handshaking, "StartTls came out twice");
                    assert!(
                        self.client_seen
                            .bytes
                            .ends_with(b"220 2.0.0 Ready to start TLS\r\n"),
                        "StartTls before its 220 was out"
                    );
                    self.handshaking = true;
                }
                Action::Ask(question) => {
                    if let Some(answer) = answer_question(question) {
                        self.session.handle_answer(self.now, answer);
                    }
                }
                Action::ReleaseDownstream { link, carried } => {
                    assert_eq!(
                        self.config.downstream.mode,
                        DownstreamMode::Multiplexing,
                        "released without multiplexing"
                    );
                    let Some((g, Some(fake))) = self.conn.take() else {
                        panic!("released a downstream that is not connected");
                    };
                    assert_eq!(g, link.0, "released another connection");
                    self.closed_links.push(g);
                    assert!(self.ds_unread.is_empty(), "released with replies unread");
                    let in_flight = self
                        .events
                        .iter()
                        .chain(&self.held)
                        .any(|event| matches!(event, Event::Data(e, _) if *e == g));
                    assert!(!in_flight, "released with replies still on the way");
                    assert!(!fake.in_data, "released mid-body");
                    assert_eq!(
                        fake.in_transaction, carried.dirty,
                        "released with a transaction open but not marked for RSET"
                    );
                    if !fake.gone && !fake.quit {
                        self.pooled = Some((fake, carried));
                    }
                }
            }
        }
    }

    fn queue_replies(&mut self, g: u32, replies: Vec<u8>) {
        if replies.is_empty() {
            return;
        }
        if self.dribble {
            for b in replies {
                self.queue(Event::Data(g, vec![b]));
            }
        } else {
            self.queue(Event::Data(g, replies));
        }
    }

    fn queue(&mut self, event: Event) {
        if self.lagging {
            self.held.push(event);
        } else {
            self.events.push_back(event);
        }
    }
}

impl ClientView {
    /// Checks the replies in newly received bytes: whole replies only, each line well-formed,
    /// and the end-of-data and relayed 2xx replies backed by the downstream's.
    fn receive(&mut self, bytes: &[u8], totals: &Totals) {
        self.bytes.extend_from_slice(bytes);
        assert!(
            self.partial_ok || self.bytes.ends_with(b"\r\n"),
            "client output not ending in CRLF: {}",
            escape(&self.bytes)
        );
        while let Some(rest) = self.bytes.get(self.checked..).filter(|r| !r.is_empty()) {
            if self.partial_ok && !self.teaser_seen && rest.starts_with(b"220-") {
                let Some(end) = find(rest, b"\r\n") else {
                    return;
                };
                check_client_lines(rest.get(..end + 2).unwrap_or_default());
                self.teaser_seen = true;
                self.checked += end + 2;
                continue;
            }
            let (reply, used) = match parse_reply(rest) {
                Ok(Status::Complete(done)) => done,
                Ok(Status::Partial) if self.partial_ok => return,
                _ => panic!("client got a malformed reply: {}", escape(rest)),
            };
            let wire = rest.get(..used).unwrap_or_default().to_vec();
            check_client_lines(&wire);
            self.checked += used;
            self.check_reply(&reply, totals);
        }
    }

    fn check_reply(&mut self, reply: &Reply, totals: &Totals) {
        let text = reply.lines.join("\n");
        let acked = text
            .strip_prefix("Ok: queued as F")
            .and_then(|n| n.parse::<u32>().ok());
        if self.after_354 {
            self.after_354 = false;
            if reply.code / 100 == 2 {
                let Some(n) = acked else {
                    panic!(
                        "end-of-data {} not from the downstream: {text:?}",
                        reply.code
                    );
                };
                assert!(
                    n > self.last_ack && n <= totals.dots_acked,
                    "end-of-data 250 for message {n} (last relayed {}, downstream acked {})",
                    self.last_ack,
                    totals.dots_acked
                );
                self.last_ack = n;
            }
            return;
        }
        assert!(
            acked.is_none(),
            "a final-dot 250 answered another command: {text:?}"
        );
        match reply.code {
            354 => {
                self.after_354 = true;
                self.got_354 += 1;
                assert!(
                    self.got_354 <= totals.data_354,
                    "354 without the downstream's"
                );
            }
            250 if text == "Sender ok" => {
                self.got_mail_250 += 1;
                assert!(
                    self.got_mail_250 <= totals.mail_250,
                    "MAIL 250 without the downstream's"
                );
            }
            250 if text == "Recipient ok" => {
                self.got_rcpt_250 += 1;
                assert!(
                    self.got_rcpt_250 <= totals.rcpt_250,
                    "RCPT 250 without the downstream's"
                );
            }
            _ => {}
        }
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

/// The scripted downstream's EHLO reply: everything tarmac can use, XCLIENT included.
const EHLO_REPLY: &str = "250-ds.fuzz\r\n250-8BITMIME\r\n250-SIZE 100000000\r\n250-SMTPUTF8\r\n250 XCLIENT ADDR NAME PORT HELO PROTO";

/// The EHLO reply of a downstream offering STARTTLS (before TLS).
/// Postfix's EHLO reply after XCLIENT: the new client address is not an xclient host.
const EHLO_AFTER_XCLIENT_REPLY: &str =
    "250-ds.fuzz\r\n250-8BITMIME\r\n250-SIZE 100000000\r\n250 SMTPUTF8";

const EHLO_STARTTLS_REPLY: &str = "250-ds.fuzz\r\n250-8BITMIME\r\n250-STARTTLS\r\n250-SIZE 100000000\r\n250-SMTPUTF8\r\n250 XCLIENT ADDR NAME PORT HELO PROTO";

/// What the downstream's 220 to STARTTLS carries behind it, as if injected on the path.
const FORGED: &str = "250 forged-after-starttls";

/// What the scripted downstream does with bytes it read.
enum Answer {
    Replies(Vec<u8>),
    Close,
}

/// A tiny SMTP server on one downstream connection: answers what tarmac sends, and asserts
/// that it is well-formed and in order.
/// Who the session speaks for when its bytes reach the fake downstream.
#[derive(Default)]
struct Expected {
    addr: Option<SocketAddr>,
    helo: Vec<u8>,
}

/// A downstream that answers like Postfix's smtpd where it matters for the trust boundary:
/// XCLIENT is offered and accepted once per connection (its EHLO after XCLIENT no longer lists
/// it, and a second one gets `550 5.7.0`), and MAIL must come after the greeting that follows
/// the last XCLIENT.
struct FakeDownstream {
    behaviour: Behaviour,
    /// The banner went out.
    banner_sent: bool,
    /// EHLO or HELO was answered since the banner or the last XCLIENT.
    greeted: bool,
    /// XCLIENT was accepted on this connection.
    xclient_done: bool,
    /// The ADDR of that XCLIENT, or the source of the PROXY header.
    announced_addr: Option<String>,
    /// The argument of the greeting after XCLIENT.
    announced_helo: Option<Vec<u8>>,
    announce: AnnounceClient,
    max_recipients: usize,
    input: Vec<u8>,
    /// The PROXY v1 header is still expected.
    want_proxy: bool,
    /// Inside a body; `scanned` is how far it has been checked.
    in_data: bool,
    scanned: usize,
    in_transaction: bool,
    rcpts: usize,
    rcpts_accepted: usize,
    quit: bool,
    /// This side closed the connection: it reads nothing more.
    gone: bool,
    reads: u32,
    replies: u32,
    /// Lists STARTTLS in its EHLO reply until TLS is on.
    offer_starttls: bool,
    /// It said 220 to STARTTLS: nothing may come until the driver's handshake is done.
    awaiting_tls: bool,
    tls: bool,
}

impl FakeDownstream {
    fn new(config: &Config, behaviour: Behaviour) -> FakeDownstream {
        let announce = config.downstream.announce_client;
        FakeDownstream {
            behaviour,
            banner_sent: false,
            greeted: false,
            xclient_done: false,
            announced_addr: None,
            announced_helo: None,
            announce,
            max_recipients: config.limits.max_recipients,
            input: Vec::new(),
            want_proxy: announce == AnnounceClient::ProxyV1,
            in_data: false,
            scanned: 0,
            in_transaction: false,
            rcpts: 0,
            rcpts_accepted: 0,
            quit: false,
            gone: false,
            reads: 0,
            replies: 0,
            offer_starttls: false,
            awaiting_tls: false,
            tls: false,
        }
    }

    /// The handshake is done: the session starts over with EHLO, inside TLS.
    fn start_tls(&mut self) {
        self.awaiting_tls = false;
        self.tls = true;
        self.input.clear();
    }

    /// Whether the downstream sent its banner (QUIT is in order from then on).
    fn banner_was_sent(&self) -> bool {
        self.banner_sent
    }

    fn connect(&mut self) -> Vec<u8> {
        self.banner_sent = true;
        let mut out = Vec::new();
        self.reply(&mut out, "220 ds.fuzz ESMTP");
        out
    }

    fn feed(&mut self, bytes: &[u8], client: &Expected, totals: &mut Totals) -> Answer {
        if self.gone {
            return Answer::Replies(Vec::new());
        }
        assert!(!self.quit, "bytes after QUIT: {}", escape(bytes));
        assert!(
            !self.awaiting_tls,
            "plain bytes after the 220 to STARTTLS: {}",
            escape(bytes)
        );
        if let Behaviour::CloseOnRead(k) = self.behaviour {
            if self.reads == k {
                self.gone = true;
                return Answer::Close;
            }
        }
        self.reads += 1;
        self.input.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            if self.in_data {
                if !self.body_end(&mut out, totals) {
                    break;
                }
                continue;
            }
            let Some(end) = find(&self.input, b"\r\n") else {
                assert!(
                    !self.input.contains(&b'\n'),
                    "bare LF to the downstream: {}",
                    escape(&self.input)
                );
                break;
            };
            let line: Vec<u8> = self.input.drain(..end + 2).take(end).collect();
            self.command(&line, client, &mut out, totals);
        }
        Answer::Replies(out)
    }

    fn command(&mut self, line: &[u8], client: &Expected, out: &mut Vec<u8>, totals: &mut Totals) {
        assert!(
            !line.contains(&b'\r') && !line.contains(&b'\n'),
            "line end inside a downstream command: {}",
            escape(line)
        );
        if self.want_proxy {
            self.want_proxy = false;
            assert!(
                line.starts_with(b"PROXY TCP4 "),
                "not a PROXY header: {}",
                escape(line)
            );
            let source = line.split(|&b| b == b' ').nth(2).unwrap_or_default();
            self.announced_addr = Some(String::from_utf8_lossy(source).into_owned());
            return;
        }
        let mut words = line.split(|&b| b == b' ');
        let verb = words.next().unwrap_or_default();
        if matches!(verb, b"EHLO" | b"HELO") {
            assert!(self.banner_sent, "greeting before the banner");
            self.greeted = true;
            if self.xclient_done {
                self.announced_helo = Some(words.next().unwrap_or_default().to_vec());
            }
        }
        match verb {
            // Postfix re-checks its xclient hosts against the address XCLIENT gave it.
            b"EHLO" if self.xclient_done => {
                self.reply(out, EHLO_AFTER_XCLIENT_REPLY);
            }
            b"EHLO" if self.offer_starttls && !self.tls => {
                self.reply(out, EHLO_STARTTLS_REPLY);
            }
            b"EHLO" => {
                self.reply(out, EHLO_REPLY);
            }
            b"STARTTLS" => {
                assert!(self.offer_starttls && !self.tls, "STARTTLS not offered");
                assert!(!self.in_transaction, "STARTTLS inside a transaction");
                if self.reply(out, "220 2.0.0 Ready to start TLS") {
                    self.awaiting_tls = true;
                    // A man in the middle's reply, in the same write.
                    out.extend_from_slice(FORGED.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
            }
            b"HELO" => {
                self.reply(out, "250 ds.fuzz");
            }
            b"XCLIENT" => {
                assert_eq!(
                    self.announce,
                    AnnounceClient::Xclient,
                    "XCLIENT not configured"
                );
                assert!(!self.in_transaction, "XCLIENT inside a transaction");
                assert!(self.greeted, "XCLIENT before EHLO");
                if self.xclient_done {
                    self.reply(out, "550 5.7.0 Error: insufficient authorization");
                    return;
                }
                self.xclient_done = true;
                self.greeted = false;
                self.announced_helo = None;
                let addr = line
                    .split(|&b| b == b' ')
                    .find_map(|word| word.strip_prefix(b"ADDR="));
                self.announced_addr = addr.map(|a| String::from_utf8_lossy(a).into_owned());
                self.reply(out, "220 ds.fuzz ESMTP");
            }
            b"MAIL" => {
                // Only over a ready connection, announced for exactly this client.
                assert!(self.greeted, "MAIL before the handshake: {}", escape(line));
                if let Some(addr) = client.addr {
                    match self.announce {
                        AnnounceClient::Xclient => {
                            assert!(self.xclient_done, "MAIL without XCLIENT");
                            assert_eq!(
                                self.announced_addr.as_deref(),
                                Some(addr.ip().to_canonical().to_string().as_str()),
                                "MAIL under another client's address"
                            );
                            let helo = &client.helo;
                            let expected: &[u8] = if !helo.is_empty()
                                && helo.len() <= 255
                                && helo.iter().all(u8::is_ascii_graphic)
                            {
                                helo
                            } else {
                                b"[UNAVAILABLE]"
                            };
                            assert_eq!(
                                self.announced_helo.as_deref(),
                                Some(expected),
                                "MAIL under another HELO"
                            );
                        }
                        AnnounceClient::ProxyV1 => assert_eq!(
                            self.announced_addr.as_deref(),
                            Some(addr.ip().to_string().as_str()),
                            "MAIL under another client's PROXY header"
                        ),
                        _ => {}
                    }
                }
                assert!(
                    matches!(parse_command(line), Ok(Command::Mail { .. })),
                    "bad MAIL relayed: {}",
                    escape(line)
                );
                assert!(!self.in_transaction, "nested MAIL relayed");
                self.in_transaction = true;
                self.rcpts = 0;
                self.rcpts_accepted = 0;
                if self.reply(out, "250 2.1.0 Sender ok") {
                    totals.mail_250 += 1;
                }
            }
            b"RCPT" => {
                assert!(
                    matches!(parse_command(line), Ok(Command::Rcpt { .. })),
                    "bad RCPT relayed: {}",
                    escape(line)
                );
                assert!(self.in_transaction, "RCPT without MAIL");
                self.rcpts += 1;
                assert!(self.rcpts <= self.max_recipients, "over max_recipients");
                if self.behaviour == Behaviour::RejectRcpt {
                    self.reply(out, "550 5.1.1 Recipient rejected");
                } else if self.reply(out, "250 2.1.5 Recipient ok") {
                    self.rcpts_accepted += 1;
                    totals.rcpt_250 += 1;
                }
            }
            b"DATA" => {
                assert!(
                    self.in_transaction && self.rcpts_accepted > 0,
                    "DATA without recipient"
                );
                if self.reply(out, "354 go ahead") {
                    self.in_data = true;
                    self.scanned = 0;
                    totals.data_354 += 1;
                }
            }
            b"RSET" => {
                self.in_transaction = false;
                self.reply(out, "250 2.0.0 Reset ok");
            }
            b"QUIT" => {
                self.quit = true;
                self.reply(out, "221 2.0.0 Bye");
            }
            _ => panic!("unexpected downstream command {}", escape(line)),
        }
    }

    /// Reads body bytes; true when the final dot was read (and answered).
    fn body_end(&mut self, out: &mut Vec<u8>, totals: &mut Totals) -> bool {
        let end = find(&self.input, b"\r\n.\r\n");
        let body_len = end.map_or(self.input.len(), |at| at + 2);
        let body = self.input.get(..body_len).unwrap_or_default();
        // A CR at the end may be the start of a CRLF still in flight.
        let settled = if end.is_none() {
            body.strip_suffix(b"\r").unwrap_or(body)
        } else {
            body
        };
        assert!(
            !has_bare_newline(
                settled
                    .get(self.scanned.saturating_sub(1)..)
                    .unwrap_or_default(),
                false
            ),
            "bare CR or LF in a relayed body: {}",
            escape(settled)
        );
        let size_cap = 2 * 25_000_000 + 1024;
        assert!(body.len() <= size_cap, "body of {} bytes", body.len());
        self.scanned = settled.len();
        let Some(at) = end else {
            return false;
        };
        self.input.drain(..at + 5);
        self.in_data = false;
        self.in_transaction = false;
        let text = format!("250 2.0.0 Ok: queued as F{}", totals.dots_acked + 1);
        if self.reply(out, &text) {
            totals.dots_acked += 1;
        }
        true
    }

    /// Appends a reply unless the script says to stay silent; whether it was sent.
    fn reply(&mut self, out: &mut Vec<u8>, text: &str) -> bool {
        if let Behaviour::SilentAfter(k) = self.behaviour {
            if self.replies >= k {
                return false;
            }
        }
        self.replies += 1;
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
        true
    }
}

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

// ---- shared ----

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

/// The path rule-file errors must name.
const RULE_PATH: &str = "/fuzz/rules.toml";

fn rule_text(text: &str) {
    let files = [(PathBuf::from(RULE_PATH), text.to_owned())];
    let set = match RuleSet::parse(&files) {
        Ok(set) => set,
        Err(errors) => {
            assert!(!errors.is_empty(), "error without errors for {text:?}");
            // Lines are counted after the byte order mark, which shares line 1; an error at
            // the very end is on the line after the last LF.
            let last_line = text.matches('\n').count() + 1;
            for error in &errors {
                let shown = error.to_string();
                assert_eq!(error.path, Path::new(RULE_PATH), "{shown}");
                let line = error.line;
                assert!((1..=last_line).contains(&line), "{shown} for {text:?}");
                assert!(!error.key.is_empty(), "{shown}");
                assert!(!error.message.trim().is_empty(), "{shown}");
                assert!(!shown.contains(['\n', '\r']), "{shown:?}");
            }
            return;
        }
    };
    assert_eq!(RuleSet::parse(&files).as_ref(), Ok(&set));

    let body = text.strip_prefix('\u{feff}').unwrap_or(text);
    let tables = body
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("rules parsed from a file toml refuses: {e}"))
        .get("rule")
        .and_then(toml::Value::as_array)
        .map_or(0, Vec::len);
    assert_eq!(set.len(), tables, "{text:?}");
    assert_eq!(set.is_empty(), tables == 0);

    let second = PathBuf::from("/fuzz/again.toml");
    let twice = [files[0].clone(), (second.clone(), text.to_owned())];
    match RuleSet::parse(&twice) {
        Ok(both) => assert!(set.is_empty() && both.is_empty(), "{text:?}"),
        Err(errors) => {
            assert_eq!(errors.len(), set.len(), "{errors:?}");
            for error in &errors {
                assert_eq!(error.path, second);
                assert!(error.key.ends_with(".name"), "{error}");
                assert!(error.message.contains("is already defined at"), "{error}");
            }
        }
    }

    let zones = ["zen.spamhaus.org", "BL.example.net."];
    let long = "a.".repeat(2048);
    let from_input: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
    let facts = [
        Facts {
            client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            helo: None,
            rdns: None,
            sender: None,
            recipient: None,
            listed_in: &[],
            score: 0,
        },
        Facts {
            client: IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped()),
            helo: Some("LOCALHOST."),
            rdns: Some("mx.example.com"),
            sender: Some(""),
            recipient: Some("Postmaster@example.org"),
            listed_in: &zones,
            score: 3,
        },
        Facts {
            client: IpAddr::V6(Ipv6Addr::LOCALHOST),
            helo: Some(&long),
            rdns: Some(&long),
            sender: Some(&long),
            recipient: Some("@"),
            listed_in: &zones[..1],
            score: i32::MIN,
        },
        Facts {
            client: IpAddr::V4(Ipv4Addr::BROADCAST),
            helo: Some(&from_input),
            rdns: Some(&from_input),
            sender: Some(&from_input),
            recipient: Some(&from_input),
            listed_in: &[],
            score: i32::MAX,
        },
    ];
    for facts in &facts {
        for stage in Stage::ALL {
            let (_, decision) = set.evaluate(stage, facts);
            let Some(decision) = decision else {
                continue;
            };
            assert!(decision.action.is_terminal(), "{decision:?}");
            assert!(!decision.rule.is_empty());
            assert!(
                decision
                    .rule
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b)),
                "{decision:?}"
            );
            let class = match decision.action {
                RuleAction::Reject => 5,
                RuleAction::Defer => 4,
                _ => {
                    assert_eq!(decision.reply, None, "{decision:?}");
                    assert_eq!(decision.reply_at(stage), None);
                    continue;
                }
            };
            let Some(reply) = decision.reply_at(stage) else {
                panic!("no reply for {decision:?}");
            };
            assert_eq!(reply.class(), class, "{reply:?}");
            assert_eq!(reply.enhanced.map(|e| e.class()), Some(class), "{reply:?}");
            assert_eq!(reply.lines.len(), 1, "{reply:?}");
            let mut wire = Vec::new();
            reply.write_to(&mut wire);
            assert_eq!(
                parse_reply(&wire),
                Ok(Status::Complete((reply.clone(), wire.len()))),
                "{reply:?}"
            );
        }
    }
}

/// Rule-file keys, values and syntax; input bytes pick from it.
const RULE_TOKENS: &[&str] = &[
    "\n",
    "\n",
    "\r\n",
    " ",
    "[[rule]]\n",
    "[rule]\n",
    "name = ",
    "when = ",
    "action = ",
    "reply = ",
    "score = ",
    "{ ",
    " }",
    ", ",
    "[",
    "]",
    "\"",
    "'",
    " = ",
    "helo",
    "rdns",
    "client",
    "sender",
    "recipient",
    "dnsbl",
    "score_at_least",
    "no_rdns",
    "colour",
    "\"allow\"",
    "\"reject\"",
    "\"defer\"",
    "\"tarpit\"",
    "\"greylist\"",
    "\"score\"",
    "\"r1\"",
    "\"r2\"",
    "\"R1\"",
    "\"bad name\"",
    "\"localhost\"",
    "\"*.example.com\"",
    "\"*\"",
    "\"**\"",
    "\"\"",
    "\"/^[0-9.]+$/\"",
    "'/\\d+/'",
    "\"/(/\"",
    "\"/(?i)x/\"",
    "\"/a{1000}{1000}/\"",
    "\"192.0.2.0/24\"",
    "\"192.0.2.1/24\"",
    "\"2001:db8::/32\"",
    "\"::ffff:192.0.2.0/120\"",
    "true",
    "false",
    "1",
    "-1",
    "0",
    "2",
    "1001",
    "9999999999",
    "\"550 5.7.1 No\"",
    "\"450 4.7.1 Later\"",
    "\"451 Later\"",
    "\"550 4.7.1 x\"",
    "\"421 4.7.0 x\"",
    "\"550\"",
    "\"250 ok\"",
    "#",
    "\t",
    "\\",
    "a",
    "*",
    "/",
    ".",
    "@",
    "\u{feff}",
];

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

/// The fuzz driver's shared services: every question answered at once, as from a cache or a
/// local table, and the same way every time so a corpus file replays exactly.
fn answer_question(question: Question) -> Option<ServiceAnswer> {
    Some(match question {
        // No scenario configures `proxy_protocol_from`; admit like an uncapped driver.
        Question::Admit(_) => ServiceAnswer::Admission(true),
        // No PASS is cached; a tarpit place is always free.
        Question::CheckPass(_) => ServiceAnswer::Pass(false),
        Question::EnterTarpit => ServiceAnswer::TarpitSlot(true),
        // No history is kept: every client is new to its reputation.
        Question::CheckReputation(..) => ServiceAnswer::Reputation(None),
        Question::RecordPass(_) | Question::RecordReputation(..) => return None,
        // Greylisting is off in every scenario (its model is the unit tests').
        Question::CheckGreylist { .. } => ServiceAnswer::Greylist(GreylistOutcome::Pass),
        // Only the tarpit scenario has a zone, and it lists the client; the rDNS lookup finds
        // no name. Both answer at once, as from the cache.
        Question::Lookup(query) => {
            let answer = match query {
                Query::Rdns(_) => LookupAnswer::Rdns(RdnsAnswer::NoName),
                Query::Dnsbl { .. } => {
                    LookupAnswer::Dnsbl(DnsblAnswer::Listed(vec![std::net::Ipv4Addr::new(
                        127, 0, 0, 2,
                    )]))
                }
            };
            ServiceAnswer::Lookup(query, answer)
        }
    })
}
