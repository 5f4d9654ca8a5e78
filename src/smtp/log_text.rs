//! Client-supplied text made safe for a log line (DESIGN.md §4): a HELO argument or an address
//! can hold spaces, `=`, quotes or control bytes that would forge key=value fields or whole lines
//! if logged raw. Used by the close line and by the session's own log lines.

use std::fmt::Write as _;

/// Longest escaped client text in a log line, in output characters, `...` included: long enough
/// for any real host name's first 60 characters, short enough that a hostile HELO cannot bloat
/// the log.
const ESCAPED_MAX: usize = 64;

/// Marks text cut at [`ESCAPED_MAX`].
const TRUNCATED: &str = "...";

/// Client text made safe for a key=value log line: printable ASCII except space, `\`, `"` and
/// `=` is kept; every other byte becomes `\xHH` (lowercase hex). Output longer than
/// `ESCAPED_MAX` characters is cut after a whole byte's escape and ends in `...`, the whole
/// staying within `ESCAPED_MAX`.
pub(crate) fn escape(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len().min(ESCAPED_MAX));
    let mut fits = 0;
    for &byte in raw {
        if is_plain(byte) {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\x{byte:02x}");
        }
        if out.len() <= ESCAPED_MAX - TRUNCATED.len() {
            fits = out.len();
        }
        if out.len() > ESCAPED_MAX {
            // `fits` ends on a byte's boundary, so no escape is split.
            out.truncate(fits);
            out.push_str(TRUNCATED);
            return out;
        }
    }
    out
}

/// Bytes logged as themselves.
fn is_plain(byte: u8) -> bool {
    byte.is_ascii_graphic() && !matches!(byte, b'\\' | b'"' | b'=')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_printable_ascii_and_hex_escapes_the_rest() {
        assert_eq!(escape(b"mx.example.org"), "mx.example.org");
        assert_eq!(escape(b"[192.0.2.1]"), "[192.0.2.1]");
        assert_eq!(escape(b"a b"), "a\\x20b");
        assert_eq!(escape(b"a\\b"), "a\\x5cb");
        assert_eq!(escape(b"\"q\""), "\\x22q\\x22");
        assert_eq!(escape(b"k=v"), "k\\x3dv");
        assert_eq!(escape(b"\x00\x7f\xff\t"), "\\x00\\x7f\\xff\\x09");
        assert_eq!(escape("é".as_bytes()), "\\xc3\\xa9");
    }

    #[test]
    fn escape_of_exactly_64_chars_is_not_truncated() {
        let raw = [b'a'; 64];
        assert_eq!(escape(&raw), "a".repeat(64));
    }

    #[test]
    fn escape_truncates_to_64_chars_with_dots() {
        let raw = [b'a'; 65];
        assert_eq!(escape(&raw), format!("{}...", "a".repeat(61)));
        assert_eq!(escape(&[b'b'; 10_000]).len(), 64);
    }

    #[test]
    fn truncation_never_splits_an_escape() {
        // 15 escapes = 60 chars, the 16th would end at 64 but more follows: cut before it.
        let raw = [b' '; 20];
        assert_eq!(escape(&raw), format!("{}...", "\\x20".repeat(15)));
        // 'a' + 15 escapes = 61 chars, then '...'.
        let mut raw = vec![b'a'];
        raw.extend([0u8; 20]);
        assert_eq!(escape(&raw), format!("a{}...", "\\x00".repeat(15)));
        // Exactly 16 escapes fit in 64 chars.
        assert_eq!(escape(&[b' '; 16]), "\\x20".repeat(16));
    }
}
