//! One downstream connection as the session sees it, sans-IO: its name ([`LinkId`]), the
//! events the driver reports for it ([`DownstreamEvent`]), and its state (`Relay`): where it
//! stands (`Link`), its handshake, and the bytes queued for it, which die with it (DESIGN.md
//! §6: bytes belong to one connection). The session (`crate::smtp::session`) drives it; the
//! server (`crate::server`) owns the socket.

use crate::downstream::dialog::{Carried, Handshake};

/// Names one downstream connection of a session: each `Action::ConnectDownstream` gets a new
/// one, so an event, a byte or an action meant for a connection the session has given up can
/// never reach its successor (DESIGN.md §6: bytes belong to one connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinkId(pub u32);

/// What happened on the downstream connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownstreamEvent<'a> {
    /// The connect finished.
    Connected,
    /// `mode = "multiplexing"`: instead of connecting, the driver attached an idle pooled
    /// connection (past its banner and EHLO) with what it carried from its last transaction.
    Reused(Carried),
    /// The connect failed (refused, unreachable, reset).
    ConnectFailed,
    /// Bytes arrived.
    Data(&'a [u8]),
    /// The downstream closed or the connection broke.
    Closed,
    /// The TLS handshake asked for by `Action::StartTlsDownstream` completed.
    TlsEstablished,
    /// That TLS handshake failed (alert, bad certificate with `tls_verify`, connection lost).
    TlsFailed,
}

/// Where the downstream connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Link {
    Connecting,
    Handshaking,
    /// `Action::StartTlsDownstream` is out: no reply is read until the driver reports.
    StartingTls,
    Ready,
}

/// The downstream connection, boxed: most sessions (and every tarpitted one) never open it.
#[derive(Debug)]
pub(crate) struct Relay {
    /// Which connection this is; events and bytes for any other are not this relay's.
    pub(crate) id: LinkId,
    /// Index into `config.downstream.servers` of the server in use.
    pub(crate) server: usize,
    pub(crate) link: Link,
    pub(crate) handshake: Handshake,
    /// Bytes for this connection not yet handed out; they die with it.
    pub(crate) outbox: Vec<u8>,
    /// Replies to commands tarmac sent on its own (RSET), to be read and dropped.
    pub(crate) swallow: u32,
    /// A MAIL was sent on this connection since the last reset.
    pub(crate) in_transaction: bool,
    /// Part of a body was sent: closing now must not send anything (no dot, no QUIT).
    pub(crate) mid_data: bool,
    /// A second connection after a failed TLS handshake under `opportunistic`: plain text, as
    /// Postfix retries (`Step::RetryWithoutTls`).
    pub(crate) plain_retry: bool,
}
