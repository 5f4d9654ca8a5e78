//! rspamd (DESIGN.md §7): the held message is `POST`ed to rspamd's normal worker at
//! `/checkv2` with the envelope and connection in request headers, and the JSON answer becomes a
//! [`Verdict`](crate::content::Verdict) and a list of [`Edit`](crate::content::Edit)s.
//!
//! - `mod.rs`: what rspamd is told ([`Request`]) and the call ([`check`]).
//! - `http.rs`: the HTTP/1.1 exchange (hyper), the body streamed from the held message.
//! - `reply.rs`: the answer ([`parse_reply`], [`Reply::verdict`], [`Reply::edits`]).
//!
//! It runs on the scanner thread's tokio current-thread runtime and never on the event loop.
//! Every way the exchange can go wrong (no connection, no answer within the timeout, a broken
//! connection, an HTTP error status, an answer over [`MAX_REPLY`] bytes or one that does not
//! parse) is a [`Failure`]; nothing on the network can make it panic.

use std::net::IpAddr;
use std::time::Duration;

use crate::content::held::Held;
use crate::content::{Failure, RspamdUrl};

mod http;
mod reply;

pub use reply::{Action, AddHeader, Reply, parse_reply};

/// Largest `/checkv2` answer read, in bytes: a real one is a few KiB (one entry per symbol);
/// more is a broken or hostile peer, and reading on would only cost memory.
pub const MAX_REPLY: usize = 1024 * 1024;

/// What rspamd is told about the message (DESIGN.md §7's request headers).
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The client's address (`IP`).
    pub ip: IpAddr,
    /// The client's HELO/EHLO name (`Helo`).
    pub helo: &'a str,
    /// The client's verified rDNS name (`Hostname`); the header is left out when `None`, so
    /// rspamd does its own lookup rather than trust an unverified name.
    pub hostname: Option<&'a str>,
    /// The envelope sender (`From`), without angle brackets; empty for the null sender.
    pub from: &'a str,
    /// The envelope recipients that were accepted (one `Rcpt` each).
    pub rcpts: &'a [String],
    /// `<conn>.<n>` (`Queue-Id`): the close line's connection id and the message's number, so
    /// rspamd's log and tarmac's meet.
    pub queue_id: &'a str,
    /// The inbound TLS version (such as `TLSv1.3`) and cipher (`TLS-Version`, `TLS-Cipher`);
    /// `None` for a plain-text session.
    pub tls: Option<(&'a str, &'a str)>,
    /// tarmac's host name (`MTA-Name`), which rspamd's rules use to tell its MTAs apart.
    pub mta_name: &'a str,
}

/// POSTs `held` to `url`/checkv2 with the request headers; the whole exchange (connect, send,
/// answer) within `timeout`. One TCP connection per message, closed after the answer: a scan
/// takes far longer than a loopback connect, so keep-alive would save little and would add a
/// pool whose stale connections need handling.
///
/// The body is read from `held` in chunks as the socket takes them, so a spooled message is
/// never copied into memory whole. Errors: [`Failure::Connect`] (refused, unreachable),
/// [`Failure::Timeout`], [`Failure::Io`] (the connection broke, the held message could not be
/// read), [`Failure::Garbage`] (a status other than 200, an answer over [`MAX_REPLY`], one
/// [`parse_reply`] refuses).
pub async fn check(
    url: &RspamdUrl,
    request: &Request<'_>,
    held: &Held,
    timeout: Duration,
) -> Result<Reply, Failure> {
    match tokio::time::timeout(timeout, http::exchange(url, request, held)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(Failure::Timeout),
    }
}
