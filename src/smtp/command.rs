//! SMTP command parser (RFC 5321 §4.1, ESMTP parameters of RFC 1870, 6152, 6531).
//!
//! Input is one command line *without* its CRLF; framing (CRLF, line length, discard to LF)
//! belongs to the session. Output borrows from the line.

/// Parameters of MAIL FROM that tarmac understands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=n` (RFC 1870), the client's estimate in bytes.
    pub size: Option<u64>,
    /// `BODY=7BIT|8BITMIME` (RFC 6152).
    pub body: Option<Body>,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
}

/// `BODY=` values accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// `BODY=7BIT`
    SevenBit,
    /// `BODY=8BITMIME`
    EightBitMime,
}

/// One parsed command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `EHLO domain` (the argument as sent, trimmed).
    Ehlo(&'a str),
    /// `HELO domain`
    Helo(&'a str),
    /// `MAIL FROM:<path> [params]`; `from` is the address inside the brackets, `""` for `<>`.
    Mail {
        /// Reverse-path without brackets.
        from: &'a str,
        /// Parsed parameters.
        params: MailParams,
    },
    /// `RCPT TO:<path>`; `to` is the address inside the brackets.
    Rcpt {
        /// Forward-path without brackets.
        to: &'a str,
    },
    /// `DATA`
    Data,
    /// `RSET`
    Rset,
    /// `NOOP [string]`
    Noop,
    /// `QUIT`
    Quit,
    /// `HELP [string]`
    Help,
    /// `VRFY string`
    Vrfy,
    /// `EXPN string`
    Expn,
    /// `STARTTLS`
    StartTls,
    /// `XCLIENT …` (refused: client-sent identity is never trusted).
    Xclient,
    /// `XFORWARD …` (refused, as XCLIENT).
    Xforward,
    /// `AUTH …` (not offered on an MX gateway).
    Auth,
    /// `BDAT …` (CHUNKING not offered).
    Bdat,
}

/// Why a line is not a usable command; each variant maps to exactly one reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandError {
    /// Not a command we know: `500 5.5.1`.
    Unknown,
    /// Known verb, bad syntax: `501 5.5.2 Syntax error, expected: <expected>`.
    Syntax {
        /// The expected form, e.g. `MAIL FROM:<address>`.
        expected: &'static str,
    },
    /// Malformed reverse-path: `501 5.1.7`.
    BadSender,
    /// Malformed forward-path: `501 5.1.3`.
    BadRecipient,
    /// Unknown or malformed ESMTP parameter: `555 5.5.4` (RFC 5321 §4.1.1.11).
    BadParameter {
        /// The parameter's keyword as sent (truncated), for the reply text.
        name: String,
    },
}

/// Parses one command line (without CRLF).
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, CommandError> {
    let _ = line;
    todo!()
}

impl CommandError {
    /// The reply this error gets.
    pub fn reply(&self) -> crate::smtp::Reply {
        todo!()
    }
}
