//! The DATA codec: client wire bytes in, downstream wire bytes out.
//!
//! Only `CRLF . CRLF` ends a message (the start of the data counts as a line start). Bare CR or
//! bare LF never reach the downstream: they are a violation (`BareNewline::Reject`) or become
//! CRLF (`BareNewline::Normalize`) without ever counting as a line start for end-of-data
//! detection, so the SMTP smuggling vectors `\n.\r\n`, `\r\n.\n`, `\r.\r\n`, `\n.\n` stay inside
//! the message. The output is re-encoded by our own rules: CRLF line ends, every output line that
//! begins with `.` dot-stuffed, whatever the input did.

use crate::config::BareNewline;

/// Why a message must not be delivered; sticky once set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataViolation {
    /// A bare CR or LF under `BareNewline::Reject`: `550 5.6.0`.
    BareNewline,
    /// More content than `max_size`: `552 5.3.4`.
    TooBig,
}

/// What one `decode` call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Input bytes consumed; less than the input only when `done`.
    pub consumed: usize,
    /// The terminating `CRLF . CRLF` was consumed.
    pub done: bool,
}

/// Incremental decoder for one message body.
///
/// Lifecycle, one byte at a time ([`DataDecoder::decode`]); `In` is where the input stands:
///
/// ```text
/// LineStart --'.'--> Dot --CR--> DotCr --LF--> done (the CRLF.CRLF terminator)
///     |               |            '--else--> dot dropped, CR is bare ----> Mid (byte again)
///     |               '--else--> dot dropped (stuffing, RFC 5321 §4.5.2) -> Mid (byte again)
///     '--else--> Mid (byte again)
/// Mid --CR--> Cr --LF--> LineStart (a real CRLF: the only way back to a line start)
///     |           '--else--> the CR is bare -> Mid (byte again)
///     |--LF--> the LF is bare -> Mid
///     '--other bytes--> copied as one run -> Mid
/// ```
///
/// A bare CR or LF is a violation or is written as CRLF, but the input stays in `Mid`, so a
/// `.` after it is content (and re-stuffed on output). A CR or a dot at the end of a chunk is
/// the only state held between calls. Once `done`, further calls consume nothing.
#[derive(Clone, Debug)]
pub struct DataDecoder {
    bare_newline: BareNewline,
    max_size: u64,
    /// Whether output lines that begin with `.` get a stuffing dot (the downstream encoding)
    /// or not (the content, for scanners).
    stuff: bool,
    input: In,
    /// The output is at the start of a line (a virtual CRLF precedes the body: the caller's
    /// header or the DATA command), so a `.` written here gets stuffed.
    out_line_start: bool,
    size: u64,
    violation: Option<DataViolation>,
    done: bool,
}

impl DataDecoder {
    /// A decoder positioned at the start of a message body (right after the `354`).
    pub fn new(bare_newline: BareNewline, max_size: u64) -> Self {
        DataDecoder {
            bare_newline,
            max_size,
            stuff: true,
            input: In::LineStart,
            out_line_start: true,
            size: 0,
            violation: None,
            done: false,
        }
    }

    /// Like [`DataDecoder::new`], but the output is the message content (what scanners see and
    /// a `Held` message keeps): CRLF line ends, bare CR and LF handled the same way, and no
    /// dot-stuffing. End of data, the size cap and the violations are exactly those of `new`;
    /// only the stuffing dots are left out of the output (`size` never counted them).
    pub fn unstuffed(bare_newline: BareNewline, max_size: u64) -> Self {
        DataDecoder {
            stuff: false,
            ..DataDecoder::new(bare_newline, max_size)
        }
    }

    /// Consumes client bytes and appends the downstream encoding of the content to `out`, or
    /// the content itself for [`DataDecoder::unstuffed`] (without the final `.CRLF`, which the
    /// caller sends once everything is fine). After a violation nothing more is appended, but
    /// input is still consumed up to the end.
    ///
    /// Consumes all of `input` unless the terminator is in it: then `consumed` stops right
    /// after its LF, and what follows (pipelined commands) is the caller's. Output written
    /// before a violation stays in `out` (up to the `max_size`-th content byte, however the
    /// input was cut); the caller must not deliver it.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Decoded {
        if self.done {
            return Decoded {
                consumed: 0,
                done: true,
            };
        }
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            // Arms that end in `Mid` without advancing `i` hand the byte over to `Mid`, which
            // always advances: the loop is linear.
            match (self.input, b) {
                (In::LineStart, b'.') => {
                    self.input = In::Dot;
                    i += 1;
                }
                (In::Dot, b'\r') => {
                    self.input = In::DotCr;
                    i += 1;
                }
                (In::DotCr, b'\n') => {
                    self.done = true;
                    return Decoded {
                        consumed: i + 1,
                        done: true,
                    };
                }
                (In::Cr, b'\n') => {
                    if self.count(2) {
                        out.extend_from_slice(b"\r\n");
                        self.out_line_start = true;
                    }
                    self.input = In::LineStart;
                    i += 1;
                }
                (In::DotCr | In::Cr, _) => {
                    // The held CR is bare (after `.` CR, the dot was a stuffing dot).
                    self.bare_newline(out);
                    self.input = In::Mid;
                }
                (In::LineStart | In::Dot, _) => self.input = In::Mid,
                (In::Mid, b'\r') => {
                    self.input = In::Cr;
                    i += 1;
                }
                (In::Mid, b'\n') => {
                    self.bare_newline(out);
                    i += 1;
                }
                (In::Mid, _) => {
                    let rest = input.get(i..).unwrap_or_default();
                    let len = rest
                        .iter()
                        .position(|&b| b == b'\r' || b == b'\n')
                        .unwrap_or(rest.len());
                    // Write what fits under `max_size`, so the output does not depend on how
                    // the input was cut into chunks, even when it stops.
                    let room = match self.violation {
                        None => self.max_size.saturating_sub(self.size),
                        Some(_) => 0,
                    };
                    let fits = len.min(usize::try_from(room).unwrap_or(usize::MAX));
                    let run = rest.get(..fits).unwrap_or_default();
                    if self.stuff && self.out_line_start && run.first() == Some(&b'.') {
                        out.push(b'.');
                    }
                    if !run.is_empty() {
                        out.extend_from_slice(run);
                        self.out_line_start = false;
                    }
                    self.count(len);
                    i += len;
                }
            }
        }
        Decoded {
            consumed: input.len(),
            done: false,
        }
    }

    /// The violation seen so far, if any. The first one wins: a message with a bare LF that
    /// later grows too big reports `BareNewline`.
    pub fn violation(&self) -> Option<DataViolation> {
        self.violation
    }

    /// Content bytes seen so far (after unstuffing, before normalisation).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A bare CR or LF (one content byte): a violation, or a CRLF in the output.
    fn bare_newline(&mut self, out: &mut Vec<u8>) {
        if !self.count(1) {
            return;
        }
        match self.bare_newline {
            BareNewline::Reject => self.violation = Some(DataViolation::BareNewline),
            BareNewline::Normalize => {
                out.extend_from_slice(b"\r\n");
                self.out_line_start = true;
            }
        }
    }

    /// Adds `n` content bytes to the size; whether output may still be written.
    fn count(&mut self, n: usize) -> bool {
        self.size = self.size.saturating_add(n as u64);
        if self.size > self.max_size && self.violation.is_none() {
            self.violation = Some(DataViolation::TooBig);
        }
        self.violation.is_none()
    }
}

impl DataViolation {
    /// The reply to the final dot of a message with this violation.
    pub fn reply(&self) -> crate::smtp::Reply {
        use crate::smtp::Reply;
        match self {
            DataViolation::BareNewline => Reply::new(
                550,
                "5.6.0",
                "Bare CR or LF in message not accepted, use CRLF line ends",
            ),
            DataViolation::TooBig => Reply::new(552, "5.3.4", "Message too big for this system"),
        }
    }
}

impl std::fmt::Display for DataViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataViolation::BareNewline => "bare CR or LF in message",
            DataViolation::TooBig => "message too big",
        })
    }
}

/// Where the input stands; see the lifecycle on [`DataDecoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum In {
    /// After a CRLF, or at the start of the body.
    LineStart,
    /// A `.` at a line start, not yet known to be the terminator or a stuffing dot.
    Dot,
    /// `.` CR at a line start: an LF ends the message.
    DotCr,
    /// Inside a line (also right after a bare CR or LF).
    Mid,
    /// A CR inside a line: an LF makes a CRLF, anything else makes it bare.
    Cr,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What decoding a whole input produced.
    #[derive(Debug, PartialEq, Eq)]
    struct Run {
        out: Vec<u8>,
        consumed: usize,
        done: bool,
        violation: Option<DataViolation>,
        size: u64,
    }

    /// Feeds `chunks` in order, as a driver would (stopping once done).
    fn run_chunks(mode: BareNewline, max: u64, chunks: &[&[u8]]) -> Run {
        feed(DataDecoder::new(mode, max), chunks)
    }

    /// Feeds `chunks` to `d` in order, as a driver would (stopping once done).
    fn feed(mut d: DataDecoder, chunks: &[&[u8]]) -> Run {
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut done = false;
        for chunk in chunks {
            let r = d.decode(chunk, &mut out);
            assert!(r.consumed <= chunk.len());
            assert!(r.done || r.consumed == chunk.len());
            consumed += r.consumed;
            done = r.done;
            if done {
                break;
            }
        }
        Run {
            out,
            consumed,
            done,
            violation: d.violation(),
            size: d.size(),
        }
    }

    fn run(mode: BareNewline, input: &[u8]) -> Run {
        run_chunks(mode, u64::MAX, &[input])
    }

    #[track_caller]
    fn assert_bytes(actual: &[u8], expected: &[u8]) {
        assert_eq!(
            actual.escape_ascii().to_string(),
            expected.escape_ascii().to_string()
        );
    }

    /// The output never has a bare CR or LF and never `CRLF . CRLF`, counting the CRLF the
    /// caller has written just before it.
    #[track_caller]
    fn assert_safe_output(out: &[u8]) {
        let mut framed = b"\r\n".to_vec();
        framed.extend_from_slice(out);
        for (i, &b) in framed.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(
                    framed.get(i + 1),
                    Some(&b'\n'),
                    "bare CR in {:?}",
                    out.escape_ascii().to_string()
                );
            }
            if b == b'\n' {
                assert_eq!(framed.get(i.wrapping_sub(1)), Some(&b'\r'), "bare LF");
            }
        }
        assert!(
            !framed.windows(5).any(|w| w == b"\r\n.\r\n"),
            "terminator in output {:?}",
            out.escape_ascii().to_string()
        );
    }

    #[test]
    fn plain_message_is_copied() {
        let input = b"Subject: hi\r\n\r\nHello\r\n.\r\n";
        let r = run(BareNewline::Reject, input);
        assert_bytes(&r.out, b"Subject: hi\r\n\r\nHello\r\n");
        assert_eq!((r.consumed, r.done), (input.len(), true));
        assert_eq!((r.violation, r.size), (None, 22));
    }

    #[test]
    fn empty_message_ends_at_once() {
        let r = run(BareNewline::Reject, b".\r\n");
        assert_eq!(r.out, b"");
        assert_eq!(
            (r.consumed, r.done, r.violation, r.size),
            (3, true, None, 0)
        );
    }

    #[test]
    fn dots_are_unstuffed_then_stuffed_again() {
        let input = b"..leading dot\r\n...\r\n..\r\nmid.dot .\r\n.\r\n";
        let r = run(BareNewline::Reject, input);
        // Valid stuffed input comes out as it went in, terminator excluded.
        assert_bytes(&r.out, &input[..input.len() - 3]);
        assert!(r.done);
        // Size counts the content: each leading stuffing dot is gone.
        assert_eq!(r.size, (input.len() - 3 - 3) as u64);
    }

    #[test]
    fn unstuffed_leading_dot_is_dropped() {
        // RFC 5321 §4.5.2: a leading dot not followed by CRLF is removed; our output stuffs
        // only what needs it.
        let r = run(BareNewline::Reject, b".x\r\n.\r\n");
        assert_bytes(&r.out, b"x\r\n");
        assert_eq!(r.size, 3);
    }

    #[test]
    fn pipelined_bytes_after_the_terminator_are_not_consumed() {
        let input = b"body\r\n.\r\nQUIT\r\n";
        let r = run(BareNewline::Reject, input);
        assert_eq!((r.consumed, r.done), (9, true));
        assert_bytes(&r.out, b"body\r\n");
        let r = run(BareNewline::Reject, b".\r\nMAIL FROM:<a@b>\r\n");
        assert_eq!((r.consumed, r.done), (3, true));
    }

    #[test]
    fn decode_after_done_consumes_nothing() {
        let mut d = DataDecoder::new(BareNewline::Reject, u64::MAX);
        let mut out = Vec::new();
        assert_eq!(
            d.decode(b".\r\n", &mut out),
            Decoded {
                consumed: 3,
                done: true
            }
        );
        assert_eq!(
            d.decode(b"more\r\n.\r\n", &mut out),
            Decoded {
                consumed: 0,
                done: true
            }
        );
        assert_eq!(out, b"");
    }

    /// (input, output under Normalize) for the smuggling vectors, each after some content,
    /// followed by a line that must stay content.
    const SMUGGLING: &[(&[u8], &[u8])] = &[
        (b"x\n.\r\nMAIL\r\n", b"x\r\n..\r\nMAIL\r\n"),
        (b"x\r\n.\nMAIL\r\n", b"x\r\n\r\nMAIL\r\n"),
        (b"x\r.\r\nMAIL\r\n", b"x\r\n..\r\nMAIL\r\n"),
        (b"x\n.\nMAIL\r\n", b"x\r\n..\r\nMAIL\r\n"),
        (b"x\r.\rMAIL\r\n", b"x\r\n..\r\nMAIL\r\n"),
        (b"\n.\r\nMAIL\r\n", b"\r\n..\r\nMAIL\r\n"),
        (b".\nMAIL\r\n", b"\r\nMAIL\r\n"),
        (b"\r.\r\nMAIL\r\n", b"\r\n..\r\nMAIL\r\n"),
        (b"x\r\n.\r\rMAIL\r\n", b"x\r\n\r\n\r\nMAIL\r\n"),
        (b"x\r\n.\r.\r\nMAIL\r\n", b"x\r\n\r\n..\r\nMAIL\r\n"),
    ];

    #[test]
    fn smuggling_vectors_stay_in_the_body_when_normalized() {
        for (input, expected) in SMUGGLING {
            let r = run(BareNewline::Normalize, input);
            assert!(!r.done, "{:?}", input.escape_ascii().to_string());
            assert_eq!(r.consumed, input.len());
            assert_eq!(r.violation, None);
            assert_bytes(&r.out, expected);
            assert_safe_output(&r.out);

            // The real terminator still ends it.
            let mut whole = input.to_vec();
            whole.extend_from_slice(b".\r\n");
            let r = run(BareNewline::Normalize, &whole);
            assert_eq!((r.done, r.consumed), (true, whole.len()));
            assert_bytes(&r.out, expected);
        }
    }

    #[test]
    fn smuggling_vectors_are_rejected() {
        for (input, _) in SMUGGLING {
            let r = run(BareNewline::Reject, input);
            assert!(!r.done, "{:?}", input.escape_ascii().to_string());
            assert_eq!(r.consumed, input.len());
            assert_eq!(r.violation, Some(DataViolation::BareNewline));
            assert_safe_output(&r.out);

            let mut whole = input.to_vec();
            whole.extend_from_slice(b".\r\nQUIT\r\n");
            let r = run(BareNewline::Reject, &whole);
            assert_eq!((r.done, r.consumed), (true, whole.len() - 6));
            assert_eq!(r.violation, Some(DataViolation::BareNewline));
        }
    }

    #[test]
    fn rejected_body_stops_output_but_finds_the_end() {
        let input = b"ok\r\nbad\nmore\r\n.\r\n";
        let r = run(BareNewline::Reject, input);
        assert_bytes(&r.out, b"ok\r\nbad");
        assert_eq!((r.done, r.consumed), (true, input.len()));
        assert_eq!(r.violation, Some(DataViolation::BareNewline));
        // Size keeps counting: bare LF is one byte.
        assert_eq!(r.size, 14);
    }

    #[test]
    fn bare_newlines_count_one_byte_each() {
        let r = run(BareNewline::Normalize, b"a\nb\rc\r\n.\r\n");
        assert_bytes(&r.out, b"a\r\nb\r\nc\r\n");
        assert_eq!(r.size, 7);
    }

    #[test]
    fn eight_bit_and_nul_bytes_pass_unchanged() {
        let mut input: Vec<u8> = (0u8..=255).filter(|&b| b != b'\r' && b != b'\n').collect();
        input.extend_from_slice(b"\r\n\xff\x00.\xc3\xa9\r\n.\r\n");
        let r = run(BareNewline::Reject, &input);
        assert_bytes(&r.out, &input[..input.len() - 3]);
        assert_eq!((r.done, r.violation), (true, None));
    }

    #[test]
    fn long_line_passes_unchanged() {
        let mut input = vec![b'a'; 100_000];
        input.extend_from_slice(b"\r\n.\r\n");
        let r = run(BareNewline::Reject, &input);
        assert_eq!(r.out.len(), 100_002);
        assert_bytes(&r.out, &input[..100_002]);
        assert_eq!((r.done, r.size), (true, 100_002));
    }

    #[test]
    fn size_cap_is_inclusive() {
        let input = b"12345678\r\n.\r\n";
        let r = run_chunks(BareNewline::Reject, 10, &[input]);
        assert_eq!((r.violation, r.size, r.done), (None, 10, true));
        assert_bytes(&r.out, b"12345678\r\n");

        let r = run_chunks(BareNewline::Reject, 9, &[input]);
        assert_eq!((r.violation, r.size), (Some(DataViolation::TooBig), 10));
        assert_eq!((r.done, r.consumed), (true, input.len()));
        assert_bytes(&r.out, b"12345678");
    }

    #[test]
    fn too_big_stops_output_and_keeps_counting() {
        let input = b"line one\r\nline two\r\nline three\r\n.\r\n";
        let r = run_chunks(BareNewline::Normalize, 12, &[input]);
        assert_eq!(r.violation, Some(DataViolation::TooBig));
        // Output runs up to the cap (a CRLF is never split), whatever the chunking.
        assert_bytes(&r.out, b"line one\r\nli");
        assert_eq!((r.size, r.done), (32, true));
    }

    #[test]
    fn first_violation_wins() {
        let r = run_chunks(BareNewline::Reject, 5, &[b"a\nbcdefgh\r\n.\r\n"]);
        assert_eq!(r.violation, Some(DataViolation::BareNewline));
        let r = run_chunks(BareNewline::Reject, 5, &[b"abcdefgh\n\r\n.\r\n"]);
        assert_eq!(r.violation, Some(DataViolation::TooBig));
    }

    #[test]
    fn cr_at_chunk_end_is_held() {
        let r = run_chunks(BareNewline::Reject, u64::MAX, &[b"a\r", b"\n.\r", b"\n"]);
        assert_eq!((r.done, r.violation), (true, None));
        assert_bytes(&r.out, b"a\r\n");
        let r = run_chunks(BareNewline::Normalize, u64::MAX, &[b"a\r", b"b\r\n"]);
        assert_bytes(&r.out, b"a\r\nb\r\n");
        let r = run_chunks(BareNewline::Reject, u64::MAX, &[b"a\r", b"b\r\n"]);
        assert_eq!(r.violation, Some(DataViolation::BareNewline));
        // Undecided: not a violation yet, and nothing written for it.
        let r = run_chunks(BareNewline::Reject, u64::MAX, &[b"a\r"]);
        assert_eq!((r.violation, r.size), (None, 1));
        assert_bytes(&r.out, b"a");
    }

    /// Inputs for the split tests: every case above, plus edge sequences.
    fn split_inputs() -> Vec<Vec<u8>> {
        let mut inputs: Vec<Vec<u8>> = vec![
            b"Subject: hi\r\n\r\nHello\r\n.\r\nQUIT\r\n".to_vec(),
            b".\r\n".to_vec(),
            b"..a\r\n...\r\n..\r\n.\r\nNOOP\r\n".to_vec(),
            b"a\r\r\n.\r\r\n.\r\n".to_vec(),
            b"\r\n\r\n.\r\n".to_vec(),
            b"\n\r\r\n\n..\r\n.\r\n".to_vec(),
            b"\xff\x00\x80.\r\n.\r\n".to_vec(),
        ];
        for (input, _) in SMUGGLING {
            let mut v = input.to_vec();
            v.extend_from_slice(b".\r\nRSET\r\n");
            inputs.push(v);
        }
        inputs
    }

    #[test]
    fn split_everywhere_gives_the_same_result() {
        for mode in [BareNewline::Reject, BareNewline::Normalize] {
            for max in [u64::MAX, 7] {
                for input in split_inputs() {
                    let whole = run_chunks(mode, max, &[&input]);
                    assert_safe_output(&whole.out);
                    for cut in 0..=input.len() {
                        let (a, b) = input.split_at(cut);
                        assert_eq!(
                            run_chunks(mode, max, &[a, b]),
                            whole,
                            "{mode:?} max {max} cut {cut} of {:?}",
                            input.escape_ascii().to_string()
                        );
                    }
                    let bytes: Vec<&[u8]> = input.chunks(1).collect();
                    assert_eq!(run_chunks(mode, max, &bytes), whole);
                }
            }
        }
    }

    /// Feeds `chunks` to an [`DataDecoder::unstuffed`] decoder, as `run_chunks` does.
    fn run_unstuffed(mode: BareNewline, max: u64, chunks: &[&[u8]]) -> Run {
        feed(DataDecoder::unstuffed(mode, max), chunks)
    }

    /// Dot-stuffs content the way the downstream encoding does: a `.` at the start of the
    /// content or right after a CRLF gets another.
    fn stuff(content: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(content.len());
        let mut line_start = true;
        for (i, &b) in content.iter().enumerate() {
            if line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            line_start = b == b'\n' && i > 0 && content.get(i - 1) == Some(&b'\r');
        }
        out
    }

    #[test]
    fn unstuffed_output_is_the_content() {
        let input = b"..leading dot\r\n...\r\n..\r\nmid.dot .\r\n.x\r\n.\r\n";
        let r = run_unstuffed(BareNewline::Reject, u64::MAX, &[input]);
        assert_bytes(&r.out, b".leading dot\r\n..\r\n.\r\nmid.dot .\r\nx\r\n");
        assert_eq!((r.done, r.consumed, r.violation), (true, input.len(), None));
        assert_eq!(r.size, r.out.len() as u64);
    }

    #[test]
    fn unstuffed_smuggling_vectors_stay_in_the_body() {
        for (input, expected) in SMUGGLING {
            let r = run_unstuffed(BareNewline::Normalize, u64::MAX, &[input]);
            assert!(!r.done, "{:?}", input.escape_ascii().to_string());
            assert_eq!((r.consumed, r.violation), (input.len(), None));
            assert_bytes(&stuff(&r.out), expected);
            let r = run_unstuffed(BareNewline::Reject, u64::MAX, &[input]);
            assert_eq!(r.violation, Some(DataViolation::BareNewline));
        }
    }

    #[test]
    fn both_modes_differ_only_by_stuffing() {
        for mode in [BareNewline::Reject, BareNewline::Normalize] {
            for max in [u64::MAX, 7, 0] {
                for input in split_inputs() {
                    let stuffed = run_chunks(mode, max, &[&input]);
                    let content = run_unstuffed(mode, max, &[&input]);
                    let name = input.escape_ascii().to_string();
                    assert_bytes(&stuff(&content.out), &stuffed.out);
                    assert_eq!(
                        (
                            content.consumed,
                            content.done,
                            content.violation,
                            content.size
                        ),
                        (
                            stuffed.consumed,
                            stuffed.done,
                            stuffed.violation,
                            stuffed.size
                        ),
                        "{mode:?} max {max} {name}"
                    );
                    for cut in 0..=input.len() {
                        let (a, b) = input.split_at(cut);
                        assert_eq!(
                            run_unstuffed(mode, max, &[a, b]),
                            content,
                            "{mode:?} max {max} cut {cut} of {name}"
                        );
                    }
                    let bytes: Vec<&[u8]> = input.chunks(1).collect();
                    assert_eq!(run_unstuffed(mode, max, &bytes), content);
                }
            }
        }
    }
}
