//! Line framing for the session's reading modes (STYLE.md §1.1: each mode is a small reader
//! type picked by one state enum), as smtp-proto's receiver: each reader owns its partial input
//! and takes bytes from a buffer the driver keeps, returning how many it used, so pipelined
//! commands, the PROXY header and what follows it share one buffer.
//!
//! - [`LineReceiver`]: command lines, each up to its LF, capped at `max_line_length`; past the
//!   cap it skips to the LF and reports [`Received::TooLong`] once (RFC 5321 §4.5.3.1.4), so the
//!   connection stays usable.
//! - [`ProxyReceiver`]: a PROXY v1/v2 header from a listed balancer, collected until whole.
//!
//! The body has its own reader, [`DataDecoder`](crate::smtp::data::DataDecoder).

use std::net::SocketAddr;

use crate::smtp::proxy::{ProxyError, parse_proxy_header};
use crate::smtp::reply::Status;

use super::KEEP_CAPACITY;

/// What [`LineReceiver::receive`] completed with the bytes it used.
#[derive(Debug)]
pub(super) enum Received {
    /// Nothing yet: the bytes were kept as part of a line (or skipped, past the cap).
    Partial,
    /// A whole line, its LF included; hand it back with [`LineReceiver::recycle`].
    Line(Vec<u8>),
    /// A line over the cap ended (its LF was taken): answer it once.
    TooLong,
}

/// Assembles command lines, bounded by `max_line_length`.
#[derive(Debug, Default)]
pub(super) struct LineReceiver {
    /// The line being assembled.
    line: Vec<u8>,
    /// An over-long line is being skipped up to its LF.
    discarding: bool,
    /// A line (or an over-long one) was completed: the stream's start is behind us.
    completed: bool,
}

impl LineReceiver {
    /// Takes bytes of one line from `input`: up to and including its LF, or all of `input`
    /// when it holds none. Returns the bytes used and what they completed. A line that would
    /// pass `max` is dropped and skipped up to (not past) its LF, which the next call takes and
    /// reports as [`Received::TooLong`]; that call may use no bytes while discarding (the LF
    /// starts the input), so the caller goes on while [`LineReceiver::is_discarding`].
    pub(super) fn receive(&mut self, input: &[u8], max: usize) -> (usize, Received) {
        let newline = input.iter().position(|&b| b == b'\n');
        if self.discarding {
            let Some(at) = newline else {
                return (input.len(), Received::Partial);
            };
            self.discarding = false;
            self.completed = true;
            return (at + 1, Received::TooLong);
        }
        let take = newline.map_or(input.len(), |at| at + 1);
        if self.line.len() + take > max {
            self.line = Vec::new();
            self.discarding = true;
            // Skip up to (not past) the LF: the next call sees it and reports.
            return (newline.unwrap_or(input.len()), Received::Partial);
        }
        let needed = self.line.len() + take;
        if needed > self.line.capacity() {
            // Doubling, but never past the line limit: the buffer is part of the per-connection
            // bound (DESIGN.md §6.1), and plain doubling could reach twice `max_line_length`.
            let target = (self.line.capacity() * 2).clamp(needed, max);
            self.line.reserve_exact(target - self.line.len());
        }
        self.line
            .extend_from_slice(input.get(..take).unwrap_or_default());
        if newline.is_none() {
            return (take, Received::Partial);
        }
        self.completed = true;
        (take, Received::Line(std::mem::take(&mut self.line)))
    }

    /// Takes back a line [`Received::Line`] handed out, keeping its buffer for the next one
    /// unless it grew large.
    pub(super) fn recycle(&mut self, mut line: Vec<u8>) {
        if line.capacity() <= KEEP_CAPACITY && self.line.is_empty() {
            line.clear();
            self.line = line;
        }
    }

    /// Frees the buffer (the session closed).
    pub(super) fn free(&mut self) {
        self.line = Vec::new();
    }

    /// The partial line kept so far.
    pub(super) fn partial(&self) -> &[u8] {
        &self.line
    }

    /// Bytes the line buffer holds allocated (tests check the per-connection bound).
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.line.capacity()
    }

    /// Whether an over-long line is being skipped.
    pub(super) fn is_discarding(&self) -> bool {
        self.discarding
    }

    /// Whether a line (or an over-long one) was completed: a PROXY header can no longer be
    /// what the client is sending.
    pub(super) fn has_completed(&self) -> bool {
        self.completed
    }
}

/// Collects a PROXY header (`Phase::Proxy`).
#[derive(Debug, Default)]
pub(super) struct ProxyReceiver {
    header: Vec<u8>,
}

impl ProxyReceiver {
    /// Takes bytes of the header: `Partial` (all of `input` kept), `Complete` with the client
    /// it names (`None`: the balancer itself, a health check) and the bytes of `input` it used,
    /// or the header's error.
    pub(super) fn receive(
        &mut self,
        input: &[u8],
    ) -> Result<Status<(Option<SocketAddr>, usize)>, ProxyError> {
        let seen = self.header.len();
        self.header.extend_from_slice(input);
        Ok(match parse_proxy_header(&self.header)? {
            Status::Partial => Status::Partial,
            Status::Complete((client, length)) => {
                self.header = Vec::new();
                Status::Complete((client, length.saturating_sub(seen)))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a run of [`LineReceiver::receive`] produced, in order.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Got {
        Line(Vec<u8>),
        TooLong,
    }

    /// Feeds `chunks` as the session does, each call on what the last one left, and returns
    /// what came out plus the partial line kept at the end.
    fn run(chunks: &[&[u8]], max: usize) -> (Vec<Got>, Vec<u8>) {
        let mut lines = LineReceiver::default();
        let mut got = Vec::new();
        for chunk in chunks {
            let mut rest: &[u8] = chunk;
            // Each call takes at least one byte, bar one: the call that meets the LF ending
            // an over-long line takes nothing and leaves it to the next.
            let mut calls = 0;
            while !rest.is_empty() {
                calls += 1;
                assert!(calls <= 2 * chunk.len() + 1, "no progress on {chunk:?}");
                let (used, received) = lines.receive(rest, max);
                match received {
                    Received::Partial => {}
                    Received::Line(line) => {
                        got.push(Got::Line(line.clone()));
                        lines.recycle(line);
                    }
                    Received::TooLong => got.push(Got::TooLong),
                }
                rest = &rest[used..];
            }
        }
        (got, lines.partial().to_vec())
    }

    /// `(input, max_line_length, what comes out, partial line left)`; `!` is `TooLong`.
    const TABLE: &[(&[u8], usize, &[&str], &str)] = &[
        (b"", 16, &[], ""),
        (b"NOOP\r\n", 16, &["NOOP\r\n"], ""),
        (
            b"EHLO a\r\nMAIL FROM:<>\r\nQU",
            16,
            &["EHLO a\r\n", "MAIL FROM:<>\r\n"],
            "QU",
        ),
        // Exactly the limit, CRLF included, is a line; one byte more is not.
        (b"12345678\r\n", 10, &["12345678\r\n"], ""),
        (b"123456789\r\nNOOP\r\n", 10, &["!", "NOOP\r\n"], ""),
        // An over-long line, then a good one: answered once, then back in step.
        (
            b"XXXXXXXXXXXXXXXXXXXXXXXXXXXXXX\r\nRSET\r\n",
            16,
            &["!", "RSET\r\n"],
            "",
        ),
        // Two over-long lines in a row are two errors, not one.
        (
            b"XXXXXXXXXXXXXXXXXXXX\nYYYYYYYYYYYYYYYYYYYY\nQUIT\r\n",
            16,
            &["!", "!", "QUIT\r\n"],
            "",
        ),
        // Over the limit and not ended yet: nothing kept, nothing reported.
        (b"XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", 16, &[], ""),
        // A CR without LF stays inside its line: only LF ends one.
        (b"NO\rOP\r\nQUIT\r\n", 16, &["NO\rOP\r\n", "QUIT\r\n"], ""),
        (b"NOOP\r\r\n", 16, &["NOOP\r\r\n"], ""),
        // A bare LF ends a line here; the session refuses it (`dispatch_line`).
        (b"NOOP\nQUIT\r\n", 16, &["NOOP\n", "QUIT\r\n"], ""),
        (b"\n\r\n", 16, &["\n", "\r\n"], ""),
    ];

    #[test]
    fn lines_come_out_as_the_table_says() {
        for &(input, max, lines, partial) in TABLE {
            let lines = lines.iter().map(|&line| match line {
                "!" => Got::TooLong,
                line => Got::Line(line.as_bytes().to_vec()),
            });
            let expected = (lines.collect(), partial.as_bytes().to_vec());
            assert_eq!(run(&[input], max), expected, "{input:?}");
        }
    }

    #[test]
    fn lines_split_everywhere_give_the_same_result() {
        for &(input, max, _, _) in TABLE {
            let whole = run(&[input], max);
            for cut in 0..=input.len() {
                let (head, tail) = input.split_at(cut);
                assert_eq!(run(&[head, tail], max), whole, "{input:?} cut at {cut}");
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(run(&bytes, max), whole, "{input:?} a byte at a time");
        }
    }

    #[test]
    fn the_line_buffer_never_grows_past_the_limit() {
        let mut lines = LineReceiver::default();
        for byte in b"X".repeat(10_000) {
            lines.receive(&[byte], 512);
            assert!(lines.capacity() <= 512, "{}", lines.capacity());
        }
        assert!(lines.is_discarding());
        assert!(!lines.has_completed());
        assert!(matches!(lines.receive(b"\n", 512), (1, Received::TooLong)));
        assert!(lines.has_completed());
    }

    #[test]
    fn proxy_header_split_everywhere_gives_the_same_client_and_length() {
        let header = b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 25\r\n";
        let input = [&header[..], b"EHLO a\r\n"].concat();
        let client: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        for cut in 0..=input.len() {
            let mut proxy = ProxyReceiver::default();
            let mut taken = 0;
            let mut named = None;
            for chunk in [&input[..cut], &input[cut..]] {
                if named.is_some() {
                    break;
                }
                match proxy.receive(chunk) {
                    Ok(Status::Partial) => taken += chunk.len(),
                    Ok(Status::Complete((who, used))) => {
                        taken += used;
                        named = Some(who);
                    }
                    Err(error) => panic!("cut at {cut}: {error:?}"),
                }
            }
            assert_eq!(named, Some(Some(client)), "cut at {cut}");
            assert_eq!(taken, header.len(), "cut at {cut}");
        }
    }

    #[test]
    fn a_bad_proxy_header_is_an_error() {
        let mut proxy = ProxyReceiver::default();
        assert!(
            proxy
                .receive(b"PROXY TCP4 300.0.0.1 1.2.3.4 1 2\r\n")
                .is_err()
        );
    }
}
