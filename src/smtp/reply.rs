//! SMTP replies: the type, the writer, and the bounded parser for downstream replies.
//!
//! The writer is the only way tarmac puts a reply on the wire, so it is where CR/LF injection is
//! stopped: a CR or LF in a text line becomes a space. The parser reads replies from the
//! downstream MTA (RFC 5321 §4.2): it never allocates until a whole reply is in the buffer, never
//! looks at more than [`MAX_REPLY_LINE`] × [`MAX_REPLY_LINES`] bytes, and reports a reply that is
//! not complete yet as [`Status::Partial`], not as an error.
//!
//! Round trip: `parse_reply` of what `write_to` wrote gives back an equal `Reply` whenever the
//! reply keeps the type's invariants (code 200..=599, an enhanced code of the code's class, at
//! least one line, no CR/LF in text, and — the one ambiguity of the wire form — no text of an
//! `enhanced: None` reply that itself starts with a valid enhanced code of that class).

use std::fmt;
use std::str::FromStr;

/// An RFC 3463 enhanced status code, e.g. `5.5.1`: class, subject, detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnhancedCode(pub u8, pub u16, pub u16);

/// One reply, possibly multi-line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit code, 200..=599.
    pub code: u16,
    /// Enhanced code, written on every line; `None` only for the banner and EHLO/HELO replies.
    pub enhanced: Option<EnhancedCode>,
    /// Text lines (at least one), without CR or LF.
    pub lines: Vec<String>,
}

/// Incomplete input is not an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status<T> {
    /// A whole item was parsed.
    Complete(T),
    /// More bytes are needed.
    Partial,
}

/// Why a downstream reply could not be parsed; the session treats it as a broken downstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyError {
    /// Not `ddd` followed by space, dash or end of line, or codes differing between lines.
    Malformed,
    /// A line longer than [`MAX_REPLY_LINE`] or more than [`MAX_REPLY_LINES`] lines.
    TooLong,
}

/// A string that is not an RFC 3463 enhanced status code of class 2, 4 or 5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidEnhancedCode;

/// Longest downstream reply line accepted, CRLF included. RFC 5321 §4.5.3.1.5 says 512; real
/// servers exceed it a little, and the cap only bounds memory.
pub const MAX_REPLY_LINE: usize = 2048;

/// Most lines in one downstream reply (EHLO replies run to about 20).
pub const MAX_REPLY_LINES: usize = 100;

/// Parses one (possibly multi-line) reply from the start of `buf`; returns it with the bytes
/// it used. A line may end in CRLF or a bare LF (downstream MTAs are trusted peers). An
/// enhanced code at the start of the text (`2.1.0 Ok`) is split off into `enhanced`.
///
/// The enhanced code is taken from the first line, only if it is valid and of the reply code's
/// class (`250 5.5` or `250 4.0.0 x` keep it as text); later lines lose a leading copy of the
/// same code. A CR inside a line becomes a space, text that is not UTF-8 is converted lossily.
/// Bytes after the reply's last line are left alone (the caller's next reply). Each call scans
/// from the start of `buf`, which the two caps keep bounded.
pub fn parse_reply(buf: &[u8]) -> Result<Status<(Reply, usize)>, ReplyError> {
    // First pass: validate and find the end without allocating, so a downstream that dribbles a
    // reply byte by byte costs rescans of a bounded prefix, never memory.
    let mut start = 0;
    let mut count = 0;
    let mut first_code = None;
    let end = loop {
        let rest = buf.get(start..).unwrap_or_default();
        let window = rest.get(..MAX_REPLY_LINE).unwrap_or(rest);
        let Some(lf) = window.iter().position(|&b| b == b'\n') else {
            check_head(rest, first_code)?;
            return if rest.len() >= MAX_REPLY_LINE {
                Err(ReplyError::TooLong)
            } else {
                Ok(Status::Partial)
            };
        };
        let line = split_line(window.get(..lf).unwrap_or_default())?;
        if *first_code.get_or_insert(line.code) != line.code {
            return Err(ReplyError::Malformed);
        }
        count += 1;
        start += lf + 1;
        if line.is_last {
            break start;
        }
        if count >= MAX_REPLY_LINES {
            return Err(ReplyError::TooLong);
        }
    };

    // Second pass over the now known-good lines: build the reply.
    let mut code = 0;
    let mut enhanced = None;
    let mut lines = Vec::with_capacity(count);
    let body = buf.get(..end).unwrap_or_default();
    for raw in body.split_inclusive(|&b| b == b'\n') {
        let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        let Ok(line) = split_line(raw) else {
            return Err(ReplyError::Malformed);
        };
        code = line.code;
        let mut text = line.text;
        if lines.is_empty() {
            if let Some((enh, after)) = split_enhanced(text, code) {
                enhanced = Some(enh);
                text = after;
            }
        } else if let Some(enh) = enhanced {
            if let Some((same, after)) = split_enhanced(text, code) {
                if same == enh {
                    text = after;
                }
            }
        }
        lines.push(text_to_string(text));
    }
    Ok(Status::Complete((
        Reply {
            code,
            enhanced,
            lines,
        },
        end,
    )))
}

impl EnhancedCode {
    /// Parses `class.subject.detail` as RFC 3463 writes it: class 2, 4 or 5, subject and detail
    /// of one to three digits without leading zeros (so parsing and [`fmt::Display`] agree byte
    /// for byte). Returns `None` for anything else.
    pub fn parse(s: &str) -> Option<EnhancedCode> {
        parse_enhanced(s.as_bytes())
    }

    /// The class as a digit: 2 (success), 4 (transient) or 5 (permanent).
    pub fn class(&self) -> u8 {
        self.0
    }
}

impl FromStr for EnhancedCode {
    type Err = InvalidEnhancedCode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EnhancedCode::parse(s).ok_or(InvalidEnhancedCode)
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl fmt::Display for InvalidEnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not an enhanced status code (class 2, 4 or 5, e.g. 5.5.1)")
    }
}

impl std::error::Error for InvalidEnhancedCode {}

impl Reply {
    /// A one-line reply: `Reply::new(250, "2.0.0", "Ok")`. Panics in debug builds only if
    /// `enhanced` is not a valid code (it is always a literal).
    ///
    /// A code of another class than `code` is as wrong as a malformed one (the reply would not
    /// parse back to itself). In release builds either falls back to `class.0.0`, or to no
    /// enhanced code for a 3xx reply, which has no enhanced class.
    pub fn new(code: u16, enhanced: &str, text: impl Into<String>) -> Self {
        let class = code_class(code);
        let parsed = EnhancedCode::parse(enhanced).filter(|e| e.0 == class);
        debug_assert!(
            parsed.is_some(),
            "bad enhanced code {enhanced:?} for reply {code}"
        );
        let enhanced = parsed.or_else(|| valid_class(class).then_some(EnhancedCode(class, 0, 0)));
        Reply {
            code,
            enhanced,
            lines: vec![text.into()],
        }
    }

    /// A one-line reply without an enhanced code: the banner, EHLO/HELO and `354` replies
    /// (RFC 2034 §3 exempts the first two; 3xx has no enhanced class).
    pub fn without_enhanced(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: None,
            lines: vec![text.into()],
        }
    }

    /// A reply with several lines, e.g. the EHLO capabilities. `enhanced` must be of the
    /// code's class. No lines at all gives one empty line, as the type needs at least one.
    pub fn multiline(code: u16, enhanced: Option<EnhancedCode>, mut lines: Vec<String>) -> Self {
        if lines.is_empty() {
            lines.push(String::new());
        }
        Reply {
            code,
            enhanced,
            lines,
        }
    }

    /// Appends the wire form to `out`: `code-enh text\r\n` per line, `code enh text\r\n` last.
    /// CR or LF in a text line is written as a space, so a reply can never inject another.
    ///
    /// An empty text writes no trailing space: `250 2.0.0\r\n`, or `250\r\n` / `250-\r\n`
    /// without an enhanced code (both allowed by RFC 5321 §4.2's `Reply-line`). An empty `lines`
    /// is written as one empty line.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        debug_assert!((200..=599).contains(&self.code), "reply code {}", self.code);
        let last = self.lines.len().saturating_sub(1);
        let empty = [String::new()];
        let lines = if self.lines.is_empty() {
            &empty[..]
        } else {
            &self.lines[..]
        };
        for (i, text) in lines.iter().enumerate() {
            // Digit by digit: a code out of range (a bug) still writes three digits.
            out.extend_from_slice(&[
                b'0' + (self.code / 100 % 10) as u8,
                b'0' + (self.code / 10 % 10) as u8,
                b'0' + (self.code % 10) as u8,
                if i < last { b'-' } else { b' ' },
            ]);
            let mut sep = false;
            if let Some(enh) = self.enhanced {
                push_decimal(out, u16::from(enh.0));
                out.push(b'.');
                push_decimal(out, enh.1);
                out.push(b'.');
                push_decimal(out, enh.2);
                sep = true;
            }
            if !text.is_empty() {
                if sep {
                    out.push(b' ');
                }
                out.extend(
                    text.bytes()
                        .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
                );
            } else if !sep && i == last {
                // `250 ` would be a space before CRLF; RFC 5321 allows the bare code.
                out.pop();
            }
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The class digit of the code: 2, 3, 4 or 5.
    pub fn class(&self) -> u8 {
        code_class(self.code)
    }
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplyError::Malformed => "malformed reply from downstream",
            ReplyError::TooLong => "over-long reply from downstream",
        })
    }
}

impl std::error::Error for ReplyError {}

/// One reply line split into its parts; `text` has no line end.
struct Line<'a> {
    code: u16,
    is_last: bool,
    text: &'a [u8],
}

/// Splits `ddd[ -]text` (a line without LF; a CR before the LF is dropped here).
fn split_line(raw: &[u8]) -> Result<Line<'_>, ReplyError> {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let [a, b, c, rest @ ..] = raw else {
        return Err(ReplyError::Malformed);
    };
    let code = code_of(*a, *b, *c).ok_or(ReplyError::Malformed)?;
    let (is_last, text) = match rest {
        [] => (true, rest),
        [b' ', text @ ..] => (true, text),
        [b'-', text @ ..] => (false, text),
        _ => return Err(ReplyError::Malformed),
    };
    Ok(Line {
        code,
        is_last,
        text,
    })
}

/// Rejects an incomplete line early when what is there already cannot start a reply line, so a
/// downstream speaking another protocol is noticed without waiting for a full line.
fn check_head(head: &[u8], first_code: Option<u16>) -> Result<(), ReplyError> {
    let digit = |i: usize, lo: u8| head.get(i).is_none_or(|&d| (lo..=b'9').contains(&d));
    let ok = match head.first() {
        None => true,
        Some(&a) => (b'2'..=b'5').contains(&a) && digit(1, b'0') && digit(2, b'0'),
    };
    if !ok {
        return Err(ReplyError::Malformed);
    }
    if let ([a, b, c, ..], Some(first)) = (head, first_code) {
        if code_of(*a, *b, *c) != Some(first) {
            return Err(ReplyError::Malformed);
        }
    }
    match head {
        [_, _, _, b' ' | b'-', ..] | [_, _, _, b'\r'] | [_, _, _] | [_, _] | [_] | [] => Ok(()),
        _ => Err(ReplyError::Malformed),
    }
}

/// `ddd` as a code in 200..=599.
fn code_of(a: u8, b: u8, c: u8) -> Option<u16> {
    if !(b'2'..=b'5').contains(&a) || !b.is_ascii_digit() || !c.is_ascii_digit() {
        return None;
    }
    Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
}

/// An enhanced code of `code`'s class at the start of `text`, followed by a space (dropped) or
/// the end of the text. A stray CR counts as the space it will become, or the reply would not
/// parse back to itself once written.
fn split_enhanced(text: &[u8], code: u16) -> Option<(EnhancedCode, &[u8])> {
    let end = text
        .iter()
        .position(|&b| b == b' ' || b == b'\r')
        .unwrap_or(text.len());
    let (word, after) = text.split_at_checked(end)?;
    let enh = parse_enhanced(word).filter(|e| e.0 == code_class(code))?;
    Some((enh, after.get(1..).unwrap_or_default()))
}

fn parse_enhanced(s: &[u8]) -> Option<EnhancedCode> {
    let mut parts = s.split(|&b| b == b'.');
    let class = match parts.next()? {
        [c @ (b'2' | b'4' | b'5')] => c - b'0',
        _ => return None,
    };
    let subject = parse_part(parts.next()?)?;
    let detail = parse_part(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    Some(EnhancedCode(class, subject, detail))
}

/// One to three digits, no leading zero unless the part is `0` (RFC 3463 §2).
fn parse_part(p: &[u8]) -> Option<u16> {
    if p.is_empty() || p.len() > 3 || (p.len() > 1 && p.first() == Some(&b'0')) {
        return None;
    }
    p.iter().try_fold(0u16, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u16::from(d - b'0'))
    })
}

fn code_class(code: u16) -> u8 {
    u8::try_from(code / 100).unwrap_or(u8::MAX)
}

fn valid_class(class: u8) -> bool {
    matches!(class, 2 | 4 | 5)
}

fn text_to_string(text: &[u8]) -> String {
    let s = String::from_utf8_lossy(text);
    if s.contains('\r') {
        s.replace('\r', " ")
    } else {
        s.into_owned()
    }
}

fn push_decimal(out: &mut Vec<u8>, n: u16) {
    let mut digits = [0u8; 5];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        if let Some(d) = digits.get_mut(i) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(i..).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: &Reply) -> String {
        let mut out = Vec::new();
        r.write_to(&mut out);
        String::from_utf8(out).unwrap()
    }

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn complete(buf: &[u8]) -> (Reply, usize) {
        match parse_reply(buf) {
            Ok(Status::Complete(r)) => r,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn enhanced_code_parses_and_displays() {
        assert_eq!("5.5.1".parse(), Ok(EnhancedCode(5, 5, 1)));
        assert_eq!(EnhancedCode::parse("2.0.0"), Some(EnhancedCode(2, 0, 0)));
        assert_eq!(
            EnhancedCode::parse("4.999.999"),
            Some(EnhancedCode(4, 999, 999))
        );
        assert_eq!(EnhancedCode(5, 7, 1).to_string(), "5.7.1");
        assert_eq!(EnhancedCode(2, 1, 0).class(), 2);
        for bad in [
            "", "5", "5.5", "5.5.", ".5.5", "3.0.0", "1.0.0", "6.0.0", "5.1000.0", "5.0.1000",
            "5.01.0", "5.0.00", "55.0.0", "5.5.1.1", "5.a.1", "5.5.1 ", " 5.5.1", "+5.5.1",
            "5.-1.0",
        ] {
            assert_eq!(EnhancedCode::parse(bad), None, "{bad:?}");
            assert_eq!(
                bad.parse::<EnhancedCode>(),
                Err(InvalidEnhancedCode),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn writes_one_line_replies() {
        assert_eq!(wire(&Reply::new(250, "2.0.0", "Ok")), "250 2.0.0 Ok\r\n");
        assert_eq!(
            wire(&Reply::new(451, "4.4.2", "Try again")),
            "451 4.4.2 Try again\r\n"
        );
        assert_eq!(
            wire(&Reply::without_enhanced(220, "mx.example.org ESMTP")),
            "220 mx.example.org ESMTP\r\n"
        );
        assert_eq!(wire(&Reply::new(250, "2.0.0", "")), "250 2.0.0\r\n");
        assert_eq!(wire(&Reply::without_enhanced(250, "")), "250\r\n");
        assert_eq!(wire(&Reply::without_enhanced(354, "Go")), "354 Go\r\n");
    }

    #[test]
    fn writes_enhanced_code_on_every_line() {
        let r = Reply::multiline(
            550,
            Some(EnhancedCode(5, 7, 1)),
            lines(&["Blocked", "", "see https://example.org"]),
        );
        assert_eq!(
            wire(&r),
            "550-5.7.1 Blocked\r\n550-5.7.1\r\n550 5.7.1 see https://example.org\r\n"
        );
        let ehlo = Reply::multiline(250, None, lines(&["mx.example.org", "", "PIPELINING"]));
        assert_eq!(
            wire(&ehlo),
            "250-mx.example.org\r\n250-\r\n250 PIPELINING\r\n"
        );
    }

    #[test]
    fn multiline_without_lines_writes_one_empty_line() {
        let r = Reply::multiline(250, Some(EnhancedCode(2, 0, 0)), Vec::new());
        assert_eq!(r.lines, lines(&[""]));
        assert_eq!(wire(&r), "250 2.0.0\r\n");
        let bare = Reply {
            code: 250,
            enhanced: None,
            lines: Vec::new(),
        };
        assert_eq!(wire(&bare), "250\r\n");
    }

    #[test]
    fn cr_and_lf_in_text_cannot_inject_a_line() {
        let r = Reply::new(250, "2.0.0", "a\r\n250 2.0.0 b\rc\nd");
        assert_eq!(wire(&r), "250 2.0.0 a  250 2.0.0 b c d\r\n");
        let r = Reply::multiline(250, None, lines(&["x\r\n", "\n"]));
        assert_eq!(wire(&r), "250-x  \r\n250  \r\n");
    }

    #[test]
    fn class_is_the_first_digit() {
        assert_eq!(Reply::new(250, "2.0.0", "").class(), 2);
        assert_eq!(Reply::without_enhanced(354, "").class(), 3);
        assert_eq!(Reply::new(421, "4.3.2", "").class(), 4);
        assert_eq!(Reply::new(554, "5.7.1", "").class(), 5);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "bad enhanced code")]
    fn new_with_malformed_code_panics_in_debug() {
        let _ = Reply::new(250, "2.0", "Ok");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "bad enhanced code")]
    fn new_with_code_of_other_class_panics_in_debug() {
        let _ = Reply::new(250, "5.0.0", "Ok");
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn new_with_bad_code_falls_back_to_class_in_release() {
        assert_eq!(
            Reply::new(250, "2.0", "Ok").enhanced,
            Some(EnhancedCode(2, 0, 0))
        );
        assert_eq!(
            Reply::new(550, "2.0.0", "No").enhanced,
            Some(EnhancedCode(5, 0, 0))
        );
        assert_eq!(Reply::new(354, "3.0.0", "Go").enhanced, None);
    }

    #[test]
    fn parses_replies() {
        let cases: &[(&[u8], Reply, usize)] = &[
            (b"250 2.1.0 Ok\r\n", Reply::new(250, "2.1.0", "Ok"), 14),
            (b"250 Ok\r\n", Reply::without_enhanced(250, "Ok"), 8),
            (b"250 2.1.0 Ok\n", Reply::new(250, "2.1.0", "Ok"), 13),
            (b"250\r\n", Reply::without_enhanced(250, ""), 5),
            (b"250\n", Reply::without_enhanced(250, ""), 4),
            (b"250 \r\n", Reply::without_enhanced(250, ""), 6),
            (b"250 2.0.0\r\n", Reply::new(250, "2.0.0", ""), 11),
            (b"250 2.0.0 \r\n", Reply::new(250, "2.0.0", ""), 12),
            (b"250 2.0.0  two\r\n", Reply::new(250, "2.0.0", " two"), 16),
            (
                b"354 End data with <CR><LF>.<CR><LF>\r\n",
                Reply::without_enhanced(354, "End data with <CR><LF>.<CR><LF>"),
                37,
            ),
            // Malformed or mismatched enhanced codes stay in the text.
            (
                b"550 5.5 nope\r\n",
                Reply::without_enhanced(550, "5.5 nope"),
                14,
            ),
            (
                b"250 5.0.0 odd\r\n",
                Reply::without_enhanced(250, "5.0.0 odd"),
                15,
            ),
            (
                b"250 2.0.0x\r\n",
                Reply::without_enhanced(250, "2.0.0x"),
                12,
            ),
            (
                b"250 2.01.0 Ok\r\n",
                Reply::without_enhanced(250, "2.01.0 Ok"),
                15,
            ),
            (
                b"354 3.0.0 Go\r\n",
                Reply::without_enhanced(354, "3.0.0 Go"),
                14,
            ),
            (
                b"250 2.0.0\tOk\r\n",
                Reply::without_enhanced(250, "2.0.0\tOk"),
                14,
            ),
            // A CR inside a line is not a line end.
            (b"250 a\rb\r\n", Reply::without_enhanced(250, "a b"), 9),
            (b"250 a\r\r\n", Reply::without_enhanced(250, "a "), 8),
            (b"250 2.0.0\rOk\r\n", Reply::new(250, "2.0.0", "Ok"), 14),
            // Not UTF-8: converted lossily.
            (
                b"250 caf\xe9\r\n",
                Reply::without_enhanced(250, "caf\u{fffd}"),
                10,
            ),
            (
                b"250 caf\xc3\xa9\r\n",
                Reply::without_enhanced(250, "caf\u{e9}"),
                11,
            ),
        ];
        for (input, reply, used) in cases {
            assert_eq!(
                complete(input),
                (reply.clone(), *used),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn parses_multiline_replies() {
        let input =
            b"250-mx.example.org Hello\r\n250-PIPELINING\n250-SIZE 1000\r\n250 8BITMIME\r\n";
        let (r, used) = complete(input);
        assert_eq!(used, input.len());
        assert_eq!(
            r,
            Reply::multiline(
                250,
                None,
                lines(&[
                    "mx.example.org Hello",
                    "PIPELINING",
                    "SIZE 1000",
                    "8BITMIME"
                ])
            )
        );

        let input = b"550-5.7.1 one\r\n550-5.7.1\r\n550-two\r\n550 5.7.1 5.7.1 three\r\n";
        let (r, used) = complete(input);
        assert_eq!(used, input.len());
        assert_eq!(
            r,
            Reply::multiline(
                550,
                Some(EnhancedCode(5, 7, 1)),
                lines(&["one", "", "two", "5.7.1 three"])
            )
        );

        // Only the first line's code counts; a different code on a later line is text.
        let (r, _) = complete(b"550-5.7.1 one\r\n550 5.1.1 two\r\n");
        assert_eq!(r.lines, lines(&["one", "5.1.1 two"]));
        // No code on the first line: later codes are text.
        let (r, _) = complete(b"550-one\r\n550 5.1.1 two\r\n");
        assert_eq!(r.enhanced, None);
        assert_eq!(r.lines, lines(&["one", "5.1.1 two"]));
        // Continuation lines without text.
        let (r, _) = complete(b"250-\r\n250-\r\n250 \r\n");
        assert_eq!(r.lines, lines(&["", "", ""]));
    }

    #[test]
    fn leaves_the_next_reply_alone() {
        let input = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 Go";
        let (r, used) = complete(input);
        assert_eq!((r.lines[0].as_str(), used), ("Ok", 14));
        let (r, used) = complete(&input[14..]);
        assert_eq!((r.enhanced, used), (Some(EnhancedCode(2, 1, 5)), 14));
        assert_eq!(parse_reply(&input[28..]), Ok(Status::Partial));
    }

    #[test]
    fn incomplete_replies_are_partial() {
        let full = b"250-a\r\n250-b\r\n250 c\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse_reply(&full[..cut]), Ok(Status::Partial), "cut {cut}");
        }
        assert_eq!(complete(full).1, full.len());
        for partial in [&b"2"[..], b"25", b"250", b"250\r", b"250-", b"250 x"] {
            assert_eq!(parse_reply(partial), Ok(Status::Partial), "{partial:?}");
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        for bad in [
            &b"\r\n"[..],
            b"\n",
            b"25\r\n",
            b"25x\r\n",
            b"2500 Ok\r\n",
            b"250x\r\n",
            b"250\tOk\r\n",
            b"199 Ok\r\n",
            b"600 Ok\r\n",
            b"099 Ok\r\n",
            b"abc\r\n",
            b" 250 Ok\r\n",
            b"250-a\r\n251 b\r\n",
            b"250-a\r\n550-b\r\n250 c\r\n",
            b"250-a\r\nxyz\r\n",
            b"250-a\r\n\r\n",
            // Rejected before the line is complete.
            b"H",
            b"HTTP/1.1 400",
            b"6",
            b"2x",
            b"250x",
            b"250\rx",
            b"250-a\r\n251",
            b"250-a\r\n550 b",
        ] {
            assert_eq!(
                parse_reply(bad),
                Err(ReplyError::Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn line_cap_includes_the_line_end() {
        let mut line = b"250 ".to_vec();
        line.resize(MAX_REPLY_LINE - 2, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(line.len(), MAX_REPLY_LINE);
        let (r, used) = complete(&line);
        assert_eq!(
            (r.lines[0].len(), used),
            (MAX_REPLY_LINE - 6, MAX_REPLY_LINE)
        );

        let mut long = b"250 ".to_vec();
        long.resize(MAX_REPLY_LINE - 1, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse_reply(&long), Err(ReplyError::TooLong));
        // Without any line end: partial until the cap, then too long.
        assert_eq!(
            parse_reply(&long[..MAX_REPLY_LINE - 1]),
            Ok(Status::Partial)
        );
        assert_eq!(
            parse_reply(&long[..MAX_REPLY_LINE]),
            Err(ReplyError::TooLong)
        );
        // Also on a later line.
        let mut later = b"250-a\r\n".to_vec();
        later.extend_from_slice(&long[..MAX_REPLY_LINE]);
        assert_eq!(parse_reply(&later), Err(ReplyError::TooLong));
    }

    #[test]
    fn line_count_is_capped() {
        let mut ok = b"250-x\r\n".repeat(MAX_REPLY_LINES - 1);
        ok.extend_from_slice(b"250 x\r\n");
        let (r, used) = complete(&ok);
        assert_eq!((r.lines.len(), used), (MAX_REPLY_LINES, ok.len()));

        // The 100th line is a continuation: too long before the 101st arrives.
        let over = b"250-x\r\n".repeat(MAX_REPLY_LINES);
        assert_eq!(parse_reply(&over), Err(ReplyError::TooLong));
        assert_eq!(parse_reply(&over[..over.len() - 1]), Ok(Status::Partial));
    }

    #[test]
    fn written_replies_parse_back_to_themselves() {
        let e = |s: &str| Some(s.parse::<EnhancedCode>().unwrap());
        let cases = [
            Reply::new(250, "2.0.0", "Ok"),
            Reply::new(250, "2.0.0", ""),
            Reply::new(250, "2.0.0", " leading space"),
            Reply::new(250, "2.0.0", "trailing space "),
            Reply::new(250, "2.0.0", "2.0.0 text that looks like a code"),
            Reply::new(
                421,
                "4.7.0",
                "mx.example.org Too many connections, try again later",
            ),
            Reply::new(451, "4.7.1", "Greylisted, please try again in 300 seconds"),
            Reply::new(
                554,
                "5.7.1",
                "Service unavailable; client [192.0.2.7] blocked using zen.spamhaus.org",
            ),
            Reply::new(599, "5.999.999", "max"),
            Reply::new(550, "5.1.1", "caf\u{e9} \u{2603} <user@example.org>"),
            Reply::without_enhanced(220, "mx.example.org ESMTP"),
            Reply::without_enhanced(220, ""),
            Reply::without_enhanced(354, "End data with <CR><LF>.<CR><LF>"),
            Reply::without_enhanced(250, " x"),
            Reply::without_enhanced(250, "5.5 not a code"),
            Reply::without_enhanced(250, "4.0.0 other class"),
            Reply::multiline(
                250,
                None,
                lines(&[
                    "mx.example.org",
                    "PIPELINING",
                    "SIZE 25000000",
                    "8BITMIME",
                    "ENHANCEDSTATUSCODES",
                    "SMTPUTF8",
                ]),
            ),
            Reply::multiline(250, None, lines(&["", "", ""])),
            Reply::multiline(250, None, lines(&["", "2.0.0 a"])),
            Reply::multiline(550, e("5.7.1"), lines(&["a", "", "5.7.1 b", " c"])),
            Reply::multiline(550, e("5.7.1"), lines(&["", ""])),
            Reply::multiline(250, e("2.0.0"), lines(&["x"; MAX_REPLY_LINES])),
            Reply::new(250, "2.0.0", "y".repeat(MAX_REPLY_LINE - 12)),
        ];
        for reply in cases {
            let mut out = Vec::new();
            reply.write_to(&mut out);
            out.extend_from_slice(b"250 next\r\n");
            let (back, used) = complete(&out);
            assert_eq!(back, reply, "{:?}", String::from_utf8_lossy(&out));
            assert_eq!(used, out.len() - 10);
        }
    }

    #[test]
    fn parse_then_write_then_parse_is_stable() {
        let inputs: &[&[u8]] = &[
            b"250-5.0.0 x\n250 2.0.0 y\r\n",
            b"250-2.0.0\n250 \r\n",
            b"250 a\rb\r\n",
            b"250 \xff\xfe\r\n",
            b"550-5.7.1 a\r\n550-b\r\n550 5.7.1 5.7.1\r\n",
        ];
        for input in inputs {
            let (first, _) = complete(input);
            let mut out = Vec::new();
            first.write_to(&mut out);
            assert_eq!(complete(&out), (first, out.len()));
        }
    }
}
