//! The data phase: the message read up to `CRLF . CRLF` (only CRLF starts a line, so the SMTP
//! smuggling endings stay inside the message and are flagged), bounded by the size limit, and
//! dot-unstuffed.

use std::io::{self, BufRead};

/// How the data phase ended.
pub(super) enum DataEnd {
    /// `CRLF . CRLF` seen; `raw` holds everything before the final `.CRLF`.
    Complete { raw: Vec<u8>, bare_newline: bool },
    /// `CRLF . CRLF` seen, but the message was bigger than `max_message_size`.
    TooBig,
    /// The client closed mid-data, or sent more than twice `max_message_size`.
    Abandoned,
}

/// Where the scan for the end of data stands. Only CRLF makes a line start, so a bare LF or CR
/// before a dot never ends the message (the SMTP smuggling vectors stay inside it).
#[derive(Clone, Copy, PartialEq, Eq)]
enum DataState {
    /// Right after CRLF, or at the very start (the DATA command's CRLF came just before).
    LineStart,
    /// CRLF then `.`.
    Dot,
    /// CRLF `.` CR.
    DotCr,
    /// A CR anywhere else.
    Cr,
    /// Any other byte.
    Other,
}

/// Reads the data up to and including `CRLF . CRLF`. Bytes are kept only while the message is
/// within `max_size`; past twice that the client is abandoned.
pub(super) fn read_data(reader: &mut impl BufRead, max_size: u64) -> io::Result<DataEnd> {
    // The terminator's `.CRLF` is counted in `total` but is not part of the message.
    let keep_limit = max_size.saturating_add(3);
    let abandon_limit = max_size.saturating_mul(2).saturating_add(3);
    let mut raw = Vec::new();
    let mut total: u64 = 0;
    let mut state = DataState::LineStart;
    let mut bare_newline = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(DataEnd::Abandoned);
        }
        let mut done = false;
        let mut used = 0;
        for &byte in buf {
            used += 1;
            if matches!(state, DataState::Cr | DataState::DotCr) && byte != b'\n' {
                bare_newline = true;
            }
            state = match (state, byte) {
                (DataState::DotCr, b'\n') => {
                    done = true;
                    break;
                }
                (DataState::Cr, b'\n') => DataState::LineStart,
                (_, b'\n') => {
                    bare_newline = true;
                    DataState::Other
                }
                (DataState::Dot, b'\r') => DataState::DotCr,
                (_, b'\r') => DataState::Cr,
                (DataState::LineStart, b'.') => DataState::Dot,
                _ => DataState::Other,
            };
        }
        total = total.saturating_add(used as u64);
        if total <= keep_limit {
            raw.extend_from_slice(buf.get(..used).unwrap_or(buf));
        } else if !raw.is_empty() {
            raw = Vec::new();
        }
        reader.consume(used);
        if done {
            if total > keep_limit {
                return Ok(DataEnd::TooBig);
            }
            raw.truncate(raw.len().saturating_sub(3));
            return Ok(DataEnd::Complete { raw, bare_newline });
        }
        if total > abandon_limit {
            return Ok(DataEnd::Abandoned);
        }
    }
}

/// Removes the leading dot of every line that starts with one (RFC 5321 §4.5.2), where, as for
/// the end of data, only CRLF starts a line.
pub(super) fn unstuff(raw: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(raw.len());
    let mut line_start = true;
    let mut previous_cr = false;
    for &byte in raw {
        if line_start && byte == b'.' {
            line_start = false;
            previous_cr = false;
            continue;
        }
        content.push(byte);
        line_start = previous_cr && byte == b'\n';
        previous_cr = byte == b'\r';
    }
    content
}

#[cfg(test)]
mod tests {
    use super::unstuff;

    #[test]
    fn unstuff_removes_one_dot_only_after_crlf() {
        for (raw, content) in [
            (&b""[..], &b""[..]),
            (b".a", b"a"),
            (b"..", b"."),
            (b"a\r\n..b\r\n", b"a\r\n.b\r\n"),
            (b"a\n.b", b"a\n.b"),
            (b"a\r.b", b"a\r.b"),
            (b"a.b\r\n.", b"a.b\r\n"),
        ] {
            assert_eq!(unstuff(raw), content, "{:?}", String::from_utf8_lossy(raw));
        }
    }
}
