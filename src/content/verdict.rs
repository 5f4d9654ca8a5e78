//! What every scanner's answer comes down to (DESIGN.md §7): a [`Verdict`], the [`Edit`]s to
//! apply, or a [`Failure`]. A leaf module: the session's questions and answers
//! (`crate::smtp::question`) carry these, so nothing here imports the scanners themselves.

use std::fmt;

use crate::smtp::reply::Reply;

/// What one scanner said about one stage or one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on (milter `continue`, rspamd `no action`, `add header`, `rewrite subject`).
    Continue,
    /// A milter's `accept`: this milter wants nothing more of this message.
    Accept,
    /// Refuse: the scanner's own reply when it gave one, else `550 5.7.1`.
    Reject(Option<Reply>),
    /// Try later: the scanner's own reply when it gave one, else `451 4.7.1`.
    TempFail(Option<Reply>),
    /// Accept and drop: the client gets `250`, nothing is relayed.
    Discard,
}

/// One change a scanner asked for, applied to the held message before it is relayed.
/// Header names compare without regard to case; values are as the scanner sent them (folded
/// lines included, their line breaks as CRLF, without the one space after the colon), and are
/// written after `Name: `.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Append a header after the last one (milter `ADDHEADER`, rspamd add without `order`).
    AddHeader {
        /// Field name.
        name: String,
        /// Field value.
        value: String,
    },
    /// Insert a header so that it becomes the `index`-th (0: the first, above tarmac's
    /// `Received:`) (milter `INSHEADER`, rspamd add with `order`).
    InsertHeader {
        /// Position among all headers, from 0.
        index: u32,
        /// Field name.
        name: String,
        /// Field value.
        value: String,
    },
    /// Replace the `index`-th (from 1) occurrence of `name`; an empty value deletes it; an
    /// occurrence that does not exist is added (milter `CHGHEADER`, as libmilter documents).
    ChangeHeader {
        /// Occurrence of `name`, from 1.
        index: u32,
        /// Field name.
        name: String,
        /// New value; empty: delete.
        value: String,
    },
    /// rspamd's `remove_headers`: 0 removes every occurrence of `name`, `n > 0` the n-th,
    /// `n < 0` the n-th from the end.
    RemoveHeader {
        /// Field name.
        name: String,
        /// Which occurrence.
        which: i32,
    },
    /// Replace the subject (rspamd `rewrite subject`): every `Subject:` is replaced by one
    /// with this value, added when there was none.
    SetSubject(String),
    /// Replace the whole body (milter `REPLBODY`, its chunks joined).
    ReplaceBody(Vec<u8>),
}

/// Why a scanner gave no usable answer: `on_failure` decides what it means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Could not connect (refused, unreachable, no such socket).
    Connect(String),
    /// No answer within `timeout`.
    Timeout,
    /// The connection broke mid-answer.
    Io(String),
    /// An answer that does not parse (a broken frame, malformed JSON, an HTTP error status).
    Garbage(String),
    /// No scan slot within `timeout` (`max_scans`).
    Busy,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(why) => write!(f, "cannot connect: {why}"),
            Failure::Timeout => f.write_str("no answer in time"),
            Failure::Io(why) => write!(f, "connection failed: {why}"),
            Failure::Garbage(why) => write!(f, "unusable answer: {why}"),
            Failure::Busy => f.write_str("no scan slot in time (max_scans)"),
        }
    }
}
