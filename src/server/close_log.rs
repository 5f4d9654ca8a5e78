//! The one place that builds the per-connection close line (DESIGN.md §4):
//!
//! ```text
//! conn=7f3a client=192.0.2.7:53211 helo=mail.example.com verdict=pass score=0 dnsbl= pregreet=no tls=no msgs=1 rcpts=2 result=delivered dur=14.2s
//! ```
//!
//! It is logged at info level with target `tarmac::conn`, so operators can route or filter it
//! (`RUST_LOG=tarmac::conn=info`). Client-supplied text goes through [`escape`]: a HELO argument
//! can hold spaces, `=`, quotes or control bytes that would forge fields or lines if logged raw.
//! `score`, `dnsbl`, `pregreet` and `tls` are fixed until the DNS, tarpit and TLS work fills them.

use std::fmt::{self, Write as _};
use std::time::Duration;

use crate::smtp::Report;

/// Longest escaped client text in a log line, in output characters, `...` included: long enough
/// for any real host name's first 60 characters, short enough that a hostile HELO cannot bloat
/// the log.
const ESCAPED_MAX: usize = 64;

/// Marks text cut at [`ESCAPED_MAX`].
const TRUNCATED: &str = "...";

/// A connection's id in logs: unique per process, printed as hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConnId(pub(crate) u64);

impl ConnId {
    /// The `seq`-th connection of worker `worker` out of `workers`. Interleaving the workers
    /// (`seq * workers + worker`) keeps ids unique without a shared counter and as short as the
    /// total number of connections allows.
    pub(crate) fn new(worker: usize, workers: usize, seq: u64) -> ConnId {
        let workers = workers.max(1) as u64;
        ConnId(seq.wrapping_mul(workers).wrapping_add(worker as u64))
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// Logs the close line for a connection.
pub(crate) fn log_close(conn: ConnId, report: &Report<'_>, dur: Duration) {
    log::info!(target: "tarmac::conn", "{}", close_line(conn, report, dur));
}

/// The close line's text. IPv6 clients print as `[v6]:port`; an absent HELO as `-`.
pub(crate) fn close_line(conn: ConnId, report: &Report<'_>, dur: Duration) -> String {
    let helo = match report.helo {
        Some(helo) if !helo.is_empty() => escape(helo),
        _ => "-".to_owned(),
    };
    format!(
        "conn={conn} client={client} helo={helo} verdict={verdict} score=0 dnsbl= pregreet=no \
         tls=no msgs={msgs} rcpts={rcpts} result={result} dur={dur:.1}s",
        client = report.client,
        verdict = report.verdict,
        msgs = report.msgs,
        rcpts = report.rcpts,
        result = report.result,
        dur = dur.as_secs_f64(),
    )
}

/// Client text made safe for a key=value log line: printable ASCII except space, `\`, `"` and
/// `=` is kept; every other byte becomes `\xHH` (lowercase hex). Output longer than
/// [`ESCAPED_MAX`] characters is cut after a whole byte's escape and ends in `...`, the whole
/// staying within [`ESCAPED_MAX`].
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
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use super::*;

    fn report(client: SocketAddr, helo: Option<&[u8]>) -> Report<'_> {
        Report {
            client,
            helo,
            verdict: "pass",
            msgs: 1,
            rcpts: 2,
            result: "delivered",
        }
    }

    #[test]
    fn line_has_every_field_in_order() {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 53211);
        let line = close_line(
            ConnId(0x7f3a),
            &report(client, Some(b"mail.example.com")),
            Duration::from_millis(14_240),
        );
        assert_eq!(
            line,
            "conn=7f3a client=192.0.2.7:53211 helo=mail.example.com verdict=pass score=0 \
             dnsbl= pregreet=no tls=no msgs=1 rcpts=2 result=delivered dur=14.2s"
        );
    }

    #[test]
    fn ipv6_client_is_bracketed_and_absent_helo_is_a_dash() {
        let client = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 25);
        let line = close_line(ConnId(1), &report(client, None), Duration::ZERO);
        assert_eq!(
            line,
            "conn=1 client=[::1]:25 helo=- verdict=pass score=0 dnsbl= pregreet=no tls=no \
             msgs=1 rcpts=2 result=delivered dur=0.0s"
        );
        let empty = close_line(ConnId(1), &report(client, Some(b"")), Duration::ZERO);
        assert!(empty.contains(" helo=- "), "{empty}");
    }

    #[test]
    fn hostile_helo_cannot_forge_fields_or_lines() {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1);
        let line = close_line(
            ConnId(2),
            &report(client, Some(b"x result=ok\r\nconn=1")),
            Duration::from_secs(3),
        );
        assert!(
            line.starts_with("conn=2 client=127.0.0.1:1 helo=x\\x20result\\x3dok\\x0d\\x0aconn\\x3d1 verdict=pass"),
            "{line}"
        );
    }

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

    #[test]
    fn conn_ids_interleave_workers() {
        assert_eq!(ConnId::new(0, 2, 0), ConnId(0));
        assert_eq!(ConnId::new(1, 2, 0), ConnId(1));
        assert_eq!(ConnId::new(0, 2, 1), ConnId(2));
        assert_eq!(ConnId::new(1, 2, 0x3f9d).to_string(), "7f3b");
    }
}
