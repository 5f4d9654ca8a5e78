//! The message as it goes to the downstream (DESIGN.md §7): the held message with the
//! scanners' changes ([`Edit`]) applied, and its SMTP DATA encoding, made a piece at a time.
//!
//! Only the header block is rewritten, in memory (it is bounded by
//! [`MAX_HEADER_BLOCK`](super::message::MAX_HEADER_BLOCK) plus what the scanners add). The body
//! is never copied: [`Outgoing::encode`] reads it from the [`Held`] message (memory or spool
//! file) as the relay has room for it, or from a scanner's replacement body.
//!
//! The encoding is tarmac's own, whatever the bytes hold: CRLF line ends (a stray bare CR or LF,
//! which a held message never has but a replacement body may, becomes CRLF), every line that
//! begins with `.` dot-stuffed (RFC 5321 §4.5.2), and a last line without its CRLF gets one, so
//! the caller's `.CRLF` always ends the message there and nowhere else. A scanner's header
//! value cannot start a header or end the block either: each of its lines is a continuation
//! line (see [`Outgoing::edited`]). Nothing here talks to the network or to a scanner.

use std::fmt;
use std::io;

use super::Edit;
use super::held::Held;
use super::message::{self, Field};

/// Content bytes read from the held message per step: one read syscall for a spooled message,
/// small enough for the stack.
const READ_CHUNK: usize = 16 * 1024;

/// Longest header name quoted in a warning; a scanner's name can be long and is not ours.
const LOGGED_NAME: usize = 64;

/// The message as it goes to the downstream: the held message, with the scanners' changes when
/// there are any.
///
/// It is made once the scanners have answered, then [`encode`](Outgoing::encode)d step by step
/// into the relay's output as the downstream takes it; it moves between threads like a
/// [`Held`].
pub struct Outgoing {
    /// The rewritten header block, blank line included; empty when the message is unchanged
    /// (then the body is the whole held message).
    header: Vec<u8>,
    body: Body,
    /// Content bytes read so far: the header first, then the body.
    pos: u64,
    stuffer: Stuffer,
    /// The last bytes (final CRLF included) are out.
    finished: bool,
}

/// Where the body comes from.
enum Body {
    /// The held message from `start` (its `body_offset`, or 0 when unchanged).
    Held { held: Held, start: u64 },
    /// A scanner's replacement.
    Bytes(Vec<u8>),
}

impl Outgoing {
    /// The held message unchanged.
    pub fn unchanged(held: Held) -> Outgoing {
        Outgoing {
            header: Vec::new(),
            body: Body::Held { held, start: 0 },
            pos: 0,
            stuffer: Stuffer::default(),
            finished: false,
        }
    }

    /// `held` with `edits` applied in order (the header block rewritten in memory, the body
    /// read from `held` from its `body_offset`, or a `ReplaceBody`'s bytes). Errors only from
    /// reading `held`.
    ///
    /// Header names compare without regard to case. A value is written after `Name:`, with a
    /// space in front unless it starts with one (libmilter's and rspamd's values come without
    /// it). A value's line breaks (LF, CRLF or CR) become CRLF, and each following line that
    /// does not start with a space or a tab gets a tab, so a value cannot add a field or end
    /// the header block; empty lines in a value are dropped for the same reason. An edit
    /// whose name is not a field name (empty, with a space, colon or control byte) is skipped
    /// with a warning.
    ///
    /// The fields that no edit touches are written back byte for byte. A header block that
    /// ended without a blank line (a line that is no field started the body) gets one when
    /// there is a body, as Postfix's cleanup does, so that an added field cannot swallow it.
    /// No edits: the message is [`unchanged`](Outgoing::unchanged).
    pub fn edited(held: Held, edits: &[Edit]) -> io::Result<Outgoing> {
        if edits.is_empty() {
            return Ok(Outgoing::unchanged(held));
        }
        let block = message::header_block(&held)?;
        let mut fields = block.fields;
        let mut replacement = None;
        for edit in edits {
            apply(&mut fields, &mut replacement, edit);
        }
        let had_blank_line = ends_with_blank_line(&held, block.body_offset)?;
        let body = match replacement {
            Some(bytes) => Body::Bytes(bytes),
            None => Body::Held {
                start: block.body_offset.min(held.len()),
                held,
            },
        };
        let mut header = Vec::new();
        for field in &fields {
            header.extend_from_slice(field.name.as_bytes());
            header.push(b':');
            header.extend_from_slice(&field.value);
            header.extend_from_slice(b"\r\n");
        }
        let mut outgoing = Outgoing {
            header,
            body,
            pos: 0,
            stuffer: Stuffer::default(),
            finished: false,
        };
        if had_blank_line || outgoing.body_len() > 0 {
            outgoing.header.extend_from_slice(b"\r\n");
        }
        Ok(outgoing)
    }

    /// Appends at most about `max` more bytes of the message in SMTP DATA encoding (every line
    /// that begins with `.` dot-stuffed, across calls; CRLF; no final `.CRLF`). Returns whether
    /// the whole message is out.
    ///
    /// `max` counts content bytes taken (at least one per call, so every call makes
    /// progress); the encoding adds a byte per stuffing dot and per repaired line end. A
    /// message that does not end in CRLF gets one, so the caller's `.CRLF` always ends it;
    /// an empty message encodes to nothing. Once it returned `true`, a call appends nothing.
    /// An error (the spool file could not be read, or is shorter than the message) leaves
    /// the message half out: the caller must not send the final `.CRLF`.
    pub fn encode(&mut self, out: &mut Vec<u8>, max: usize) -> io::Result<bool> {
        if self.finished {
            return Ok(true);
        }
        let total = self.len();
        let header_len = self.header.len() as u64;
        let mut budget = max.max(1);
        let mut buf = [0u8; READ_CHUNK];
        while budget > 0 && self.pos < total {
            let want = usize::try_from(total - self.pos)
                .unwrap_or(usize::MAX)
                .min(budget);
            let taken = if self.pos < header_len {
                let start = usize::try_from(self.pos).unwrap_or(usize::MAX);
                let end = start.saturating_add(want).min(self.header.len());
                let part = self.header.get(start..end).unwrap_or_default();
                self.stuffer.feed(part, out);
                part.len()
            } else {
                let at = self.pos - header_len;
                match &self.body {
                    Body::Bytes(bytes) => {
                        let start = usize::try_from(at).unwrap_or(usize::MAX);
                        let end = start.saturating_add(want).min(bytes.len());
                        let part = bytes.get(start..end).unwrap_or_default();
                        self.stuffer.feed(part, out);
                        part.len()
                    }
                    Body::Held { held, start } => {
                        let space = buf.get_mut(..want.min(READ_CHUNK)).unwrap_or_default();
                        let n = held.read_at(start.saturating_add(at), space)?;
                        self.stuffer.feed(space.get(..n).unwrap_or_default(), out);
                        n
                    }
                }
            };
            if taken == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the held message ended before its length",
                ));
            }
            self.pos += taken as u64;
            budget -= taken.min(budget);
        }
        if self.pos < total {
            return Ok(false);
        }
        self.stuffer.finish(out);
        self.finished = true;
        Ok(true)
    }

    /// Content bytes of the whole message (unencoded), for logs: the rewritten header block
    /// and the body. The encoding adds the stuffing dots, and a CRLF for a missing last one or
    /// for a stray bare CR or LF (which a held message never has).
    pub fn len(&self) -> u64 {
        (self.header.len() as u64).saturating_add(self.body_len())
    }

    /// Whether the message has no content at all (it then encodes to nothing).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn body_len(&self) -> u64 {
        match &self.body {
            Body::Held { held, start } => held.len().saturating_sub(*start),
            Body::Bytes(bytes) => bytes.len() as u64,
        }
    }
}

impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = match &self.body {
            Body::Held { held, start } => format!("held {} bytes from {start}", held.len()),
            Body::Bytes(bytes) => format!("replaced, {} bytes", bytes.len()),
        };
        f.debug_struct("Outgoing")
            .field("header", &self.header.len())
            .field("body", &body)
            .field("pos", &self.pos)
            .field("finished", &self.finished)
            .finish()
    }
}

/// The DATA encoder's state between two pieces of content: where the output line stands, and a
/// CR whose meaning (CRLF or bare) waits for the next byte.
#[derive(Clone, Copy, Debug)]
struct Stuffer {
    /// The output is at the start of a line (the DATA command's CRLF precedes the message).
    line_start: bool,
    /// The last content byte was a CR not yet written.
    pending_cr: bool,
}

impl Default for Stuffer {
    fn default() -> Self {
        Stuffer {
            line_start: true,
            pending_cr: false,
        }
    }
}

impl Stuffer {
    /// Encodes `content` onto `out`: runs between line ends are copied whole.
    fn feed(&mut self, content: &[u8], out: &mut Vec<u8>) {
        let mut rest = content;
        while let Some((&first, tail)) = rest.split_first() {
            if self.pending_cr {
                // CRLF, or a bare CR: either way one line end, written as CRLF.
                self.pending_cr = false;
                self.newline(out);
                if first == b'\n' {
                    rest = tail;
                    continue;
                }
            }
            match first {
                b'\r' => {
                    self.pending_cr = true;
                    rest = tail;
                }
                b'\n' => {
                    self.newline(out);
                    rest = tail;
                }
                _ => {
                    let len = rest
                        .iter()
                        .position(|&b| b == b'\r' || b == b'\n')
                        .unwrap_or(rest.len());
                    let (run, after) = rest.split_at(len);
                    if self.line_start && first == b'.' {
                        out.push(b'.');
                    }
                    out.extend_from_slice(run);
                    self.line_start = false;
                    rest = after;
                }
            }
        }
    }

    /// The end of the content: a held CR and an unterminated last line get their CRLF.
    fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending_cr || !self.line_start {
            self.pending_cr = false;
            self.newline(out);
        }
    }

    fn newline(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\r\n");
        self.line_start = true;
    }
}

/// Applies one edit to the fields (or the replacement body).
fn apply(fields: &mut Vec<Field>, replacement: &mut Option<Vec<u8>>, edit: &Edit) {
    match edit {
        Edit::AddHeader { name, value } => {
            if let Some(field) = new_field(name, value) {
                fields.push(field);
            }
        }
        Edit::InsertHeader { index, name, value } => {
            if let Some(field) = new_field(name, value) {
                let at = usize::try_from(*index)
                    .unwrap_or(usize::MAX)
                    .min(fields.len());
                fields.insert(at, field);
            }
        }
        Edit::ChangeHeader { index, name, value } => {
            if !message::is_field_name(name.as_bytes()) {
                warn_name(name);
                return;
            }
            // libmilter documents index 0 as 1 (smfi_chgheader).
            let nth = usize::try_from(*index).unwrap_or(usize::MAX).max(1);
            let found = positions(fields, name).nth(nth - 1);
            match (found, value.is_empty()) {
                (Some(at), true) => {
                    fields.remove(at);
                }
                (Some(at), false) => {
                    if let Some(field) = fields.get_mut(at) {
                        field.value = field_value(value);
                    }
                }
                (None, true) => {}
                (None, false) => fields.push(Field {
                    name: name.clone(),
                    value: field_value(value),
                }),
            }
        }
        Edit::RemoveHeader { name, which } => {
            let found: Vec<usize> = positions(fields, name).collect();
            let at = match *which {
                0 => {
                    fields.retain(|field| !field.name.eq_ignore_ascii_case(name));
                    return;
                }
                n if n > 0 => usize::try_from(n - 1).ok().and_then(|i| found.get(i)),
                n => usize::try_from(n.unsigned_abs())
                    .ok()
                    .and_then(|back| found.len().checked_sub(back))
                    .and_then(|i| found.get(i)),
            };
            if let Some(&at) = at {
                fields.remove(at);
            }
        }
        Edit::SetSubject(value) => {
            let found: Vec<usize> = positions(fields, "Subject").collect();
            let Some((&first, others)) = found.split_first() else {
                fields.push(Field {
                    name: "Subject".to_owned(),
                    value: field_value(value),
                });
                return;
            };
            if let Some(field) = fields.get_mut(first) {
                field.value = field_value(value);
            }
            // From the end, so the positions still to remove stay valid.
            for &at in others.iter().rev() {
                fields.remove(at);
            }
        }
        Edit::ReplaceBody(bytes) => *replacement = Some(bytes.clone()),
    }
}

/// The positions of the fields called `name` (without regard to case), in order.
fn positions<'a>(fields: &'a [Field], name: &'a str) -> impl Iterator<Item = usize> + 'a {
    fields
        .iter()
        .enumerate()
        .filter(move |(_, field)| field.name.eq_ignore_ascii_case(name))
        .map(|(at, _)| at)
}

/// A field a scanner adds, or `None` (logged) when `name` is no field name.
fn new_field(name: &str, value: &str) -> Option<Field> {
    if !message::is_field_name(name.as_bytes()) {
        warn_name(name);
        return None;
    }
    Some(Field {
        name: name.to_owned(),
        value: field_value(value),
    })
}

fn warn_name(name: &str) {
    let shown: String = name.chars().take(LOGGED_NAME).collect();
    log::warn!(
        "content: a scanner's header name {:?} is not a field name; that change is skipped",
        shown
    );
}

/// A scanner's value as the bytes after the colon: a leading space, CRLF line ends, every
/// line after the first a continuation line, no empty line.
fn field_value(value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 2);
    // Any of LF, CR or CRLF is a break; a CRLF leaves an empty piece, dropped below with the
    // value's own empty lines, which would end the header block.
    for (i, line) in value
        .as_bytes()
        .split(|&b| b == b'\n' || b == b'\r')
        .enumerate()
    {
        if i == 0 {
            if line.first() != Some(&b' ') {
                out.push(b' ');
            }
            out.extend_from_slice(line);
            continue;
        }
        if line.is_empty() {
            continue;
        }
        out.extend_from_slice(b"\r\n");
        if !matches!(line.first(), Some(b' ' | b'\t')) {
            out.push(b'\t');
        }
        out.extend_from_slice(line);
    }
    out
}

/// Whether the header block of `held` that ends at `body_offset` ended with a blank line
/// (the message's first line is blank, or the block's last line is).
fn ends_with_blank_line(held: &Held, body_offset: u64) -> io::Result<bool> {
    // A field line is at least `X:` CRLF, so a block of 1 or 3 bytes cannot end blank.
    Ok(match body_offset {
        2 => held.read_range(0, 2)? == b"\r\n",
        0..4 => false,
        _ => held.read_range(body_offset - 4, body_offset)? == b"\r\n\r\n",
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::BareNewline;
    use crate::content::held;
    use crate::smtp::data::DataDecoder;

    const MSG: &[u8] = b"Received: from a\r\n\tby b\r\nSubject: one\r\nX-A: 1\r\nx-a: 2\r\nsubject: two\r\nX-A: 3\r\n\r\nbody\r\n";

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tarmac-edit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn encode_by(outgoing: &mut Outgoing, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut calls = 0;
        while !outgoing.encode(&mut out, max).unwrap() {
            calls += 1;
            assert!(calls < 1_000_000, "encode makes no progress");
        }
        let before = out.len();
        assert!(outgoing.encode(&mut out, max).unwrap(), "stays finished");
        assert_eq!(out.len(), before, "nothing after the end");
        out
    }

    /// The encoding, checked: the same in one call and in steps of 1, 2, 3 and 7 content
    /// bytes, and it decodes back (with the final `.CRLF`) to content of `len()` bytes that
    /// stuffs back to itself, ending exactly at the terminator.
    #[track_caller]
    fn encode(make: impl Fn() -> Outgoing) -> Vec<u8> {
        let whole = encode_by(&mut make(), usize::MAX);
        for max in [1, 2, 3, 7] {
            assert_eq!(
                encode_by(&mut make(), max).escape_ascii().to_string(),
                whole.escape_ascii().to_string(),
                "max {max}"
            );
        }
        let mut wire = whole.clone();
        wire.extend_from_slice(b".\r\n");
        let mut decoder = DataDecoder::unstuffed(BareNewline::Reject, u64::MAX);
        let mut content = Vec::new();
        let step = decoder.decode(&wire, &mut content);
        assert!(step.done && step.consumed == wire.len(), "ends at the dot");
        assert_eq!(decoder.violation(), None);
        let mut encoded_again = Vec::new();
        let mut stuffer = Stuffer::default();
        stuffer.feed(&content, &mut encoded_again);
        assert_eq!(encoded_again, whole);
        whole
    }

    #[track_caller]
    fn edited(message: &[u8], edits: &[Edit]) -> String {
        let out = encode(|| Outgoing::edited(Held::from_bytes(message.to_vec()), edits).unwrap());
        String::from_utf8(out).unwrap()
    }

    /// The header lines of an encoded message (up to the blank line), for short assertions.
    fn header_lines(encoded: &str) -> Vec<&str> {
        encoded
            .split("\r\n")
            .take_while(|line| !line.is_empty())
            .collect()
    }

    fn add(name: &str, value: &str) -> Edit {
        Edit::AddHeader {
            name: name.into(),
            value: value.into(),
        }
    }

    fn insert(index: u32, name: &str, value: &str) -> Edit {
        Edit::InsertHeader {
            index,
            name: name.into(),
            value: value.into(),
        }
    }

    fn change(index: u32, name: &str, value: &str) -> Edit {
        Edit::ChangeHeader {
            index,
            name: name.into(),
            value: value.into(),
        }
    }

    fn remove(name: &str, which: i32) -> Edit {
        Edit::RemoveHeader {
            name: name.into(),
            which,
        }
    }

    #[test]
    fn outgoing_moves_between_threads() {
        let mut outgoing =
            Outgoing::edited(Held::from_bytes(MSG.to_vec()), &[add("X", "y")]).unwrap();
        let out = std::thread::spawn(move || encode_by(&mut outgoing, 5))
            .join()
            .unwrap();
        assert!(out.ends_with(b"X-A: 3\r\nX: y\r\n\r\nbody\r\n"));
    }

    #[test]
    fn an_unchanged_message_is_only_stuffed() {
        let msg = b"Received: x\r\n\r\n.dot\r\n..two\r\nend.\r\n";
        let out = encode(|| Outgoing::unchanged(Held::from_bytes(msg.to_vec())));
        assert_eq!(out, b"Received: x\r\n\r\n..dot\r\n...two\r\nend.\r\n");
        let outgoing = Outgoing::unchanged(Held::from_bytes(msg.to_vec()));
        assert_eq!(outgoing.len(), msg.len() as u64);
        // No edits at all: the same bytes.
        assert_eq!(edited(msg, &[]).as_bytes(), out);
    }

    #[test]
    fn untouched_fields_are_written_back_byte_for_byte() {
        let out = edited(MSG, &[remove("X-Absent", 0)]);
        assert_eq!(out.as_bytes(), MSG);
    }

    #[test]
    fn add_header_appends_after_the_last_field() {
        let out = edited(MSG, &[add("X-Spam", "Yes"), add("X-B", " spaced")]);
        let lines = header_lines(&out);
        assert_eq!(lines[lines.len() - 2..], ["X-Spam: Yes", "X-B: spaced"]);
        assert!(out.ends_with("X-A: 3\r\nX-Spam: Yes\r\nX-B: spaced\r\n\r\nbody\r\n"));
    }

    #[test]
    fn insert_header_counts_every_field_from_zero() {
        let out = edited(MSG, &[insert(0, "DKIM-Signature", "v=1")]);
        assert!(out.starts_with("DKIM-Signature: v=1\r\nReceived: from a\r\n\tby b\r\n"));
        let out = edited(MSG, &[insert(1, "X-I", "1")]);
        assert_eq!(
            header_lines(&out)[..4],
            ["Received: from a", "\tby b", "X-I: 1", "Subject: one"]
        );
        // Past the end (7 fields): appended.
        for index in [7, 8, u32::MAX] {
            let out = edited(MSG, &[insert(index, "X-I", "1")]);
            assert!(out.ends_with("X-A: 3\r\nX-I: 1\r\n\r\nbody\r\n"), "{index}");
        }
    }

    #[test]
    fn change_header_finds_the_nth_occurrence_without_regard_to_case() {
        let out = edited(MSG, &[change(2, "x-A", "second")]);
        assert!(out.contains("X-A: 1\r\nx-a: second\r\nsubject: two\r\nX-A: 3\r\n"));
        // Index 0 means 1, as in libmilter.
        let out = edited(MSG, &[change(0, "X-A", "first")]);
        assert!(out.contains("\r\nX-A: first\r\nx-a: 2\r\n"));
    }

    #[test]
    fn change_header_with_an_empty_value_deletes() {
        let out = edited(MSG, &[change(3, "x-a", "")]);
        assert!(out.ends_with("x-a: 2\r\nsubject: two\r\n\r\nbody\r\n"));
        // Deleting an occurrence that is not there changes nothing.
        assert_eq!(edited(MSG, &[change(4, "X-A", "")]).as_bytes(), MSG);
        assert_eq!(edited(MSG, &[change(1, "X-None", "")]).as_bytes(), MSG);
    }

    #[test]
    fn change_header_adds_a_missing_occurrence() {
        let out = edited(MSG, &[change(9, "X-A", "added"), change(1, "X-New", "n")]);
        assert!(out.ends_with("X-A: 3\r\nX-A: added\r\nX-New: n\r\n\r\nbody\r\n"));
    }

    #[test]
    fn remove_header_counts_like_rspamd() {
        let count = |out: &str| {
            header_lines(out)
                .iter()
                .filter(|l| l.to_ascii_lowercase().starts_with("x-a:"))
                .map(|l| l[4..].to_owned())
                .collect::<Vec<_>>()
        };
        assert!(count(&edited(MSG, &[remove("x-a", 0)])).is_empty());
        assert_eq!(count(&edited(MSG, &[remove("X-A", 1)])), [" 2", " 3"]);
        assert_eq!(count(&edited(MSG, &[remove("X-A", 2)])), [" 1", " 3"]);
        assert_eq!(count(&edited(MSG, &[remove("X-A", -1)])), [" 1", " 2"]);
        assert_eq!(count(&edited(MSG, &[remove("X-A", -3)])), [" 2", " 3"]);
        for which in [4, -4, i32::MAX, i32::MIN] {
            assert_eq!(
                edited(MSG, &[remove("X-A", which)]).as_bytes(),
                MSG,
                "{which}"
            );
        }
    }

    #[test]
    fn set_subject_keeps_one_subject_where_the_first_was() {
        let out = edited(MSG, &[Edit::SetSubject("*** SPAM *** one".into())]);
        let lines = header_lines(&out);
        assert_eq!(lines[2], "Subject: *** SPAM *** one");
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.to_ascii_lowercase().starts_with("subject:"))
                .count(),
            1
        );
        let out = edited(
            b"From: a\r\n\r\nbody\r\n",
            &[Edit::SetSubject("new".into())],
        );
        assert_eq!(out, "From: a\r\nSubject: new\r\n\r\nbody\r\n");
    }

    #[test]
    fn edits_apply_in_order() {
        let out = edited(
            b"A: 1\r\n\r\nb\r\n",
            &[
                add("B", "2"),
                insert(0, "C", "3"),
                change(1, "b", "two"),
                remove("A", 1),
                insert(1, "D", "4"),
            ],
        );
        assert_eq!(out, "C: 3\r\nD: 4\r\nB: two\r\n\r\nb\r\n");
    }

    #[test]
    fn values_get_a_leading_space_and_crlf_continuations() {
        let out = edited(
            b"A: 1\r\n\r\n",
            &[
                add("B", "no space"),
                add("C", " one space"),
                add("D", "folded\n\tline\r\n next"),
                add("E", ""),
            ],
        );
        assert_eq!(
            out,
            "A: 1\r\nB: no space\r\nC: one space\r\nD: folded\r\n\tline\r\n next\r\nE: \r\n\r\n"
        );
    }

    #[test]
    fn a_value_cannot_add_a_field_or_end_the_header_block() {
        let out = edited(
            b"A: 1\r\n\r\nbody\r\n",
            &[add("X", "v\r\nBcc: evil\n\r\n\r\nbody2\rlast\n")],
        );
        assert_eq!(
            out,
            "A: 1\r\nX: v\r\n\tBcc: evil\r\n\tbody2\r\n\tlast\r\n\r\nbody\r\n"
        );
        let block = message::parse(out.as_bytes(), true);
        assert_eq!(block.fields.len(), 2);
        assert_eq!(&out.as_bytes()[block.body_offset as usize..], b"body\r\n");
    }

    #[test]
    fn names_that_are_no_field_names_are_skipped() {
        for name in ["", "X Y", "X:Y", "X\u{1}", "X\r\nY", "é"] {
            let edits = [
                add(name, "v"),
                insert(0, name, "v"),
                change(1, name, "v"),
                remove(name, 0),
            ];
            assert_eq!(edited(MSG, &edits).as_bytes(), MSG, "{name:?}");
        }
    }

    #[test]
    fn a_leading_dot_is_stuffed_in_a_name_a_value_and_the_body() {
        let out = edited(
            b"A: 1\r\n\r\n.body\r\n.\r\n",
            &[insert(0, ".Dot", "v\n.cont"), add("B", ".x")],
        );
        // A continuation line starts with a tab, so its dot needs no stuffing.
        assert_eq!(
            out,
            "..Dot: v\r\n\t.cont\r\nA: 1\r\nB: .x\r\n\r\n..body\r\n..\r\n"
        );
        let out = edited(
            b"A: 1\r\n\r\n",
            &[Edit::ReplaceBody(b".\r\n..\r\n".to_vec())],
        );
        assert_eq!(out, "A: 1\r\n\r\n..\r\n...\r\n");
    }

    #[test]
    fn replace_body_gets_crlf_line_ends() {
        let out = edited(
            MSG,
            &[Edit::ReplaceBody(b"new\nbody\r\nbare\rcr\r\nlast".to_vec())],
        );
        assert!(out.ends_with("X-A: 3\r\n\r\nnew\r\nbody\r\nbare\r\ncr\r\nlast\r\n"));
        // The last replacement wins; an empty one leaves the header block alone.
        let out = edited(
            MSG,
            &[
                Edit::ReplaceBody(b"x".to_vec()),
                Edit::ReplaceBody(Vec::new()),
            ],
        );
        assert!(out.ends_with("X-A: 3\r\n\r\n"));
    }

    #[test]
    fn a_message_without_a_blank_line_gets_one_before_its_body() {
        let msg = b"A: 1\r\nnot a field\r\n";
        assert_eq!(
            edited(msg, &[add("X", "y")]),
            "A: 1\r\nX: y\r\n\r\nnot a field\r\n"
        );
        // A continuation line that starts the body cannot join an added field.
        let msg = b" folded\r\nA: 1\r\n";
        assert_eq!(
            edited(msg, &[add("X", "y")]),
            "X: y\r\n\r\n folded\r\nA: 1\r\n"
        );
        // Headers only: no body, no blank line added; a kept one stays.
        assert_eq!(edited(b"A: 1\r\n", &[add("X", "y")]), "A: 1\r\nX: y\r\n");
        assert_eq!(
            edited(b"A: 1\r\n\r\n", &[add("X", "y")]),
            "A: 1\r\nX: y\r\n\r\n"
        );
        assert_eq!(edited(b"A: 1", &[add("X", "y")]), "A: 1\r\nX: y\r\n");
        // A message that starts with its blank line keeps it.
        assert_eq!(
            edited(b"\r\nbody\r\n", &[add("X", "y")]),
            "X: y\r\n\r\nbody\r\n"
        );
        assert_eq!(edited(b"\r\n", &[add("X", "y")]), "X: y\r\n\r\n");
    }

    #[test]
    fn an_empty_message() {
        let out = encode(|| Outgoing::unchanged(Held::from_bytes(Vec::new())));
        assert!(out.is_empty());
        assert!(Outgoing::unchanged(Held::from_bytes(Vec::new())).is_empty());
        assert_eq!(edited(b"", &[add("X", "y")]), "X: y\r\n");
        assert_eq!(edited(b"", &[remove("X", 0)]), "");
        assert_eq!(
            edited(b"", &[Edit::ReplaceBody(b"b".to_vec())]),
            "\r\nb\r\n"
        );
    }

    #[test]
    fn a_last_line_without_crlf_gets_one() {
        let out = encode(|| Outgoing::unchanged(Held::from_bytes(b"A: 1\r\n\r\nend".to_vec())));
        assert_eq!(out, b"A: 1\r\n\r\nend\r\n");
        let out = encode(|| Outgoing::unchanged(Held::from_bytes(b"a\r".to_vec())));
        assert_eq!(out, b"a\r\n");
    }

    #[test]
    fn len_counts_the_content() {
        let outgoing = Outgoing::edited(Held::from_bytes(MSG.to_vec()), &[add("X", "y")]).unwrap();
        assert_eq!(outgoing.len(), MSG.len() as u64 + 6);
        let outgoing = Outgoing::edited(
            Held::from_bytes(MSG.to_vec()),
            &[Edit::ReplaceBody(b"new\r\n".to_vec())],
        )
        .unwrap();
        assert_eq!(outgoing.len(), MSG.len() as u64 - 6 + 5);
    }

    /// `MSG`'s header block and a long body with dot lines, held in a spool file past 16 bytes.
    fn spooled(dir: &std::path::Path) -> (Held, Vec<u8>) {
        let mut held = Held::new(16, dir.to_path_buf());
        let mut whole = Vec::new();
        let mut push = |bytes: &[u8]| {
            held.append(bytes).unwrap();
            whole.extend_from_slice(bytes);
        };
        push(MSG);
        for i in 0..3000 {
            push(format!(".line {i}\r\nmore text on line {i}.\r\n").as_bytes());
        }
        assert!(held.is_spooled());
        (held, whole)
    }

    #[test]
    fn a_spooled_body_is_streamed_from_its_file() {
        let state = temp_dir("spooled");
        let dir = held::spool_dir(&state).unwrap();
        let edits = [
            insert(0, "X-First", "1"),
            remove("X-A", 0),
            add("X-Last", "2"),
        ];
        let from_file = encode(|| Outgoing::edited(spooled(&dir).0, &edits).unwrap());
        let memory =
            encode(|| Outgoing::edited(Held::from_bytes(spooled(&dir).1), &edits).unwrap());
        assert_eq!(from_file, memory);
        assert!(from_file.starts_with(b"X-First: 1\r\nReceived: from a\r\n"));
        assert!(from_file.ends_with(b"\r\n..line 2999\r\nmore text on line 2999.\r\n"));
        let unchanged = encode(|| Outgoing::unchanged(spooled(&dir).0));
        assert_eq!(unchanged.len(), spooled(&dir).1.len() + 3000);
        std::fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn steps_split_anywhere_give_the_same_encoding() {
        // Every max from 1 to past the message, on a message whose every line starts with a
        // dot, CR and LF falling on each side of every step boundary.
        let msg = b".A: 1\r\n.\r\n..\r\n.x\ry\nz\r\n.";
        let whole = encode_by(
            &mut Outgoing::unchanged(Held::from_bytes(msg.to_vec())),
            usize::MAX,
        );
        assert_eq!(whole, b"..A: 1\r\n..\r\n...\r\n..x\r\ny\r\nz\r\n..\r\n");
        for max in 1..=msg.len() + 1 {
            let mut outgoing = Outgoing::unchanged(Held::from_bytes(msg.to_vec()));
            assert_eq!(encode_by(&mut outgoing, max), whole, "max {max}");
        }
    }
}
