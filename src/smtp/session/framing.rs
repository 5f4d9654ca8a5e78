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
