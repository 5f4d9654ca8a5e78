//! Content inspection at end of data (DESIGN.md §7): rspamd over HTTP and milters, called on a
//! side thread with the message held until the client's final dot.
//!
//! # Layout
//! - `mod.rs`: the `[content]` settings and what every scanner's answer comes down to
//!   ([`Verdict`], [`Edit`], [`Failure`]).
//! - `held.rs`: the held message: memory up to `spool_after`, then an unlinked spool file.
//! - `message.rs`: its header block, as scanners see it and edits change it.
//! - `edit.rs`: the scanners' changes applied to a held message, and the SMTP encoding of the
//!   result for the downstream.
//! - `milter/`: the milter protocol (version 6): the codec, one milter's conversation, its
//!   connection.
//! - `rspamd/`: the `/checkv2` request over HTTP, the reply parser and the reply's changes.
//! - `scanner/`: the scanner thread: milter conversations, scans, `max_scans`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub mod edit;
pub mod held;
pub mod message;
pub mod milter;
pub mod rspamd;
pub mod scanner;

use crate::smtp::reply::Reply;

/// `[content]`: which scanners see each message, and what happens when one fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// rspamd's normal worker (`POST /checkv2`); `None`: off.
    pub rspamd: Option<RspamdUrl>,
    /// Milters, called in this order.
    pub milters: Vec<MilterAddr>,
    /// One scanner's answer for one message (milters: for each stage).
    pub timeout: Duration,
    /// What a scanner that is down, slow or broken means for the message.
    pub on_failure: OnFailure,
    /// Body bytes held in memory per message; beyond, an unlinked file in `state_dir/spool`.
    pub spool_after: u64,
    /// Messages being scanned at once, across workers.
    pub max_scans: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            rspamd: None,
            milters: Vec::new(),
            timeout: Duration::from_secs(30),
            on_failure: OnFailure::TempFail,
            spool_after: 256 * 1024,
            max_scans: 256,
        }
    }
}

impl Settings {
    /// Whether any scanner is configured: then bodies are held, else they stream as before.
    pub fn scans(&self) -> bool {
        self.rspamd.is_some() || !self.milters.is_empty()
    }
}

/// `on_failure`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnFailure {
    /// `451 4.7.1`: the sender retries later.
    #[default]
    TempFail,
    /// Relay the message unscanned (logged).
    Accept,
}

/// Where rspamd's normal worker listens: `http://IP:PORT` (a loopback or private address; no
/// name, so no resolver is asked on the scanning path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RspamdUrl {
    /// The worker's address.
    pub addr: SocketAddr,
}

/// A milter's socket, as Postfix writes it: `inet:IP:PORT` or `unix:/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MilterAddr {
    /// `inet:127.0.0.1:8891` (`inet:[::1]:8891` for IPv6).
    Inet(SocketAddr),
    /// `unix:/run/opendkim/opendkim.sock`.
    Unix(PathBuf),
}

impl fmt::Display for MilterAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MilterAddr::Inet(addr) => write!(f, "inet:{addr}"),
            MilterAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl MilterAddr {
    /// Reads `inet:IP:PORT` (IPv6 in brackets) or `unix:/absolute/path`; the error says what
    /// was expected.
    pub fn parse(text: &str) -> Result<MilterAddr, String> {
        if let Some(addr) = text.strip_prefix("inet:") {
            return addr.parse().map(MilterAddr::Inet).map_err(|_| {
                format!("{text:?} is not inet:IP:PORT (such as inet:127.0.0.1:8891)")
            });
        }
        if let Some(path) = text.strip_prefix("unix:") {
            if path.starts_with('/') {
                return Ok(MilterAddr::Unix(PathBuf::from(path)));
            }
            return Err(format!("{text:?}: the socket path must be absolute"));
        }
        Err(format!(
            "{text:?} is neither inet:IP:PORT nor unix:/path (as Postfix's smtpd_milters)"
        ))
    }
}

impl RspamdUrl {
    /// Reads `http://IP:PORT` (IPv6 in brackets), with or without a trailing `/`.
    pub fn parse(text: &str) -> Result<RspamdUrl, String> {
        let rest = text.strip_prefix("http://").ok_or_else(|| {
            format!("{text:?} is not http://IP:PORT (such as http://127.0.0.1:11333)")
        })?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        rest.parse()
            .map(|addr| RspamdUrl { addr })
            .map_err(|_| format!("{text:?} is not http://IP:PORT (such as http://127.0.0.1:11333)"))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milter_addresses_read_as_postfix_writes_them() {
        assert_eq!(
            MilterAddr::parse("inet:127.0.0.1:8891"),
            Ok(MilterAddr::Inet("127.0.0.1:8891".parse().unwrap()))
        );
        assert_eq!(
            MilterAddr::parse("inet:[::1]:8891"),
            Ok(MilterAddr::Inet("[::1]:8891".parse().unwrap()))
        );
        assert_eq!(
            MilterAddr::parse("unix:/run/opendkim/opendkim.sock"),
            Ok(MilterAddr::Unix("/run/opendkim/opendkim.sock".into()))
        );
        assert!(MilterAddr::parse("unix:opendkim.sock").is_err());
        assert!(MilterAddr::parse("inet:localhost:8891").is_err());
        assert!(MilterAddr::parse("127.0.0.1:8891").is_err());
        assert_eq!(
            MilterAddr::parse("inet:127.0.0.1:8891")
                .unwrap()
                .to_string(),
            "inet:127.0.0.1:8891"
        );
    }

    #[test]
    fn rspamd_urls_are_http_ip_port() {
        let url = RspamdUrl::parse("http://127.0.0.1:11333/").unwrap();
        assert_eq!(url.addr, "127.0.0.1:11333".parse().unwrap());
        assert!(RspamdUrl::parse("http://[::1]:11333").is_ok());
        assert!(RspamdUrl::parse("https://127.0.0.1:11333").is_err());
        assert!(RspamdUrl::parse("http://localhost:11333").is_err());
        assert!(RspamdUrl::parse("http://127.0.0.1").is_err());
    }

    #[test]
    fn scanning_is_on_with_any_scanner() {
        let mut settings = Settings::default();
        assert!(!settings.scans());
        settings.milters.push(MilterAddr::Unix("/x".into()));
        assert!(settings.scans());
        settings.milters.clear();
        settings.rspamd = Some(RspamdUrl::parse("http://127.0.0.1:1").unwrap());
        assert!(settings.scans());
    }
}
