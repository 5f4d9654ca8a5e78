//! The SMTP session state machine (skeleton: API contract, being implemented).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;

/// The two ends of a session's byte streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The SMTP client that connected to tarmac.
    Client,
    /// The downstream MTA tarmac relays to.
    Downstream,
}

/// Addresses of the client connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The client's address (after PROXY, the one in the header).
    pub client: SocketAddr,
    /// The local address the client connected to.
    pub local: SocketAddr,
}

/// I/O the driver must perform for the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to this downstream server, then report
    /// `DownstreamEvent::Connected` or `ConnectFailed`.
    ConnectDownstream(SocketAddr),
    /// Close the downstream connection without sending anything more (whatever
    /// `poll_transmit(Downstream)` handed out before this is still to be written first).
    CloseDownstream,
    /// Flush what `poll_transmit(Client)` handed out, then close the client connection. Comes
    /// out exactly once.
    Close,
}

/// What happened on the downstream connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownstreamEvent<'a> {
    /// The connect finished.
    Connected,
    /// The connect failed (refused, unreachable, reset).
    ConnectFailed,
    /// Bytes arrived.
    Data(&'a [u8]),
    /// The downstream closed or the connection broke.
    Closed,
}

/// How the driver asks a session to end on SIGTERM/SIGINT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Close at once if idle between transactions, else after the current transaction.
    Graceful,
    /// The drain time is over: `421 4.3.2` and close now.
    Now,
}

/// What the close log line reports about a session (DESIGN.md §4); the driver adds the
/// connection id, client address and duration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report<'a> {
    /// The HELO/EHLO argument as sent (raw: the log line escapes and truncates it).
    pub helo: Option<&'a [u8]>,
    /// `pass` until the DNS issue adds verdicts.
    pub verdict: &'static str,
    /// Messages the downstream accepted.
    pub msgs: u32,
    /// Recipients the downstream accepted.
    pub rcpts: u32,
    /// How the session ended: `delivered` (at least one message), `quit`, `disconnect`,
    /// `timeout`, `rejected`, `tempfail`, `too-many-errors`, `shutdown`.
    pub result: &'static str,
}

/// One client connection's SMTP state.
#[derive(Debug)]
pub struct Session {
    _todo: (),
}

impl Session {
    /// A new session for an accepted connection; queues the banner.
    pub fn new(config: Arc<Config>, peer: Peer, now: Instant) -> Session {
        let _ = (config, peer, now);
        todo!()
    }

    /// Feeds client bytes; returns how many were consumed. The driver keeps the rest and offers
    /// them again once `wants_read()` is true.
    pub fn handle_client_data(&mut self, now: Instant, bytes: &[u8]) -> usize {
        let _ = (now, bytes);
        todo!()
    }

    /// The client closed its sending side (or the connection broke).
    pub fn handle_client_eof(&mut self, now: Instant) {
        let _ = now;
        todo!()
    }

    /// Feeds a downstream event; for `Data` returns the bytes consumed, else 0.
    pub fn handle_downstream(&mut self, now: Instant, event: DownstreamEvent<'_>) -> usize {
        let _ = (now, event);
        todo!()
    }

    /// Handles every timer that has expired at `now`; a no-op when called early.
    pub fn handle_timeout(&mut self, now: Instant) {
        let _ = now;
        todo!()
    }

    /// SIGTERM/SIGINT.
    pub fn handle_shutdown(&mut self, now: Instant, how: Shutdown) {
        let _ = (now, how);
        todo!()
    }

    /// Appends the bytes due for `side` at `now` to `out`.
    pub fn poll_transmit(&mut self, now: Instant, side: Side, out: &mut Vec<u8>) {
        let _ = (now, side, out);
        todo!()
    }

    /// The next I/O step for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        todo!()
    }

    /// The earliest deadline, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        todo!()
    }

    /// Whether the session takes client bytes now (false while a reply is pending from the
    /// downstream, while its outboxes are full, or once closed).
    pub fn wants_read(&self) -> bool {
        todo!()
    }

    /// Figures for the close log line.
    pub fn report(&self) -> Report<'_> {
        todo!()
    }

    /// Whether the session is closed (its final bytes may still be in the outbox).
    pub fn is_closed(&self) -> bool {
        todo!()
    }
}
