//! SMTP replies: the type, the writer, and the bounded parser for downstream replies.

/// An RFC 3463 enhanced status code, e.g. `5.5.1`.
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

impl Reply {
    /// A one-line reply: `Reply::new(250, "2.0.0", "Ok")`. Panics in debug builds only if
    /// `enhanced` is not a valid code (it is always a literal).
    pub fn new(code: u16, enhanced: &str, text: impl Into<String>) -> Self {
        let _ = (code, enhanced, text);
        todo!()
    }

    /// Appends the wire form to `out`: `code-enh text\r\n` per line, `code enh text\r\n` last.
    /// CR or LF in a text line is written as a space, so a reply can never inject another.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let _ = out;
        todo!()
    }
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

/// Longest downstream reply line accepted, CRLF included. RFC 5321 §4.5.3.1.5 says 512; real
/// servers exceed it a little, and the cap only bounds memory.
pub const MAX_REPLY_LINE: usize = 2048;

/// Most lines in one downstream reply (EHLO replies run to about 20).
pub const MAX_REPLY_LINES: usize = 100;

/// Parses one (possibly multi-line) reply from the start of `buf`; returns it with the bytes
/// it used. A line may end in CRLF or a bare LF (downstream MTAs are trusted peers). An
/// enhanced code at the start of the text (`2.1.0 Ok`) is split off into `enhanced`.
pub fn parse_reply(buf: &[u8]) -> Result<Status<(Reply, usize)>, ReplyError> {
    let _ = buf;
    todo!()
}
