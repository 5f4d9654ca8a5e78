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
#[derive(Clone, Debug)]
pub struct DataDecoder {
    _todo: (),
}

impl DataDecoder {
    /// A decoder positioned at the start of a message body (right after the `354`).
    pub fn new(bare_newline: BareNewline, max_size: u64) -> Self {
        let _ = (bare_newline, max_size);
        todo!()
    }

    /// Consumes client bytes and appends the downstream encoding of the content to `out`
    /// (without the final `.CRLF`, which the caller sends once everything is fine). After a
    /// violation nothing more is appended, but input is still consumed up to the end.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Decoded {
        let _ = (input, out);
        todo!()
    }

    /// The violation seen so far, if any.
    pub fn violation(&self) -> Option<DataViolation> {
        todo!()
    }

    /// Content bytes seen so far (after unstuffing, before normalisation).
    pub fn size(&self) -> u64 {
        todo!()
    }
}
