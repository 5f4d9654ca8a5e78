//! The types that cross the session's boundary besides [`Session`](super::Session) itself: who the client is
//! ([`Peer`]), what the driver must do ([`Action`]), how to shut down ([`Shutdown`]) and what
//! the close log line reports ([`Report`]).

use std::net::SocketAddr;
use std::time::SystemTime;

use crate::downstream::dialog::Carried;
use crate::downstream::relay::{LinkId, Via};
use crate::smtp::question::Question;

/// The two ends of a session's byte streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The SMTP client that connected to tarmac.
    Client,
    /// The downstream MTA tarmac relays to.
    Downstream,
}

/// Addresses and arrival time of the client connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The connection's id in the close line (`conn=`, hexadecimal there): names derived
    /// from it, such as a message's `Queue-Id` for rspamd.
    pub conn: u64,
    /// The client's address (after PROXY, the one in the header).
    pub client: SocketAddr,
    /// The local address the client connected to.
    pub local: SocketAddr,
    /// Wall-clock time of the accept, for the `Received:` date (the core reads no clock).
    pub accepted_at: SystemTime,
    /// The server was in stress mode at accept (above 80 % of `max_connections`): a shorter
    /// greet pause and command timeout, and no stutter (postscreen's and spamd's answers to
    /// overload).
    pub stressed: bool,
    /// STARTTLS may be offered: `[tls]` has a certificate and this client's last handshake
    /// did not fail recently (the driver keeps that record, so a sender whose TLS is broken
    /// can still deliver in plain text).
    pub starttls: bool,
    /// Accepted on a `[transparent] listen` socket (DESIGN.md §9): `local` is the address the
    /// client connected to, and the session relays there instead of to `[downstream]
    /// servers`; a PROXY header is never read from it.
    pub transparent: bool,
    /// A transparent session connects downstream from the client's own address
    /// (`[transparent] spoof_source` as the server started with: the capability it needs is
    /// kept, or not, at start).
    pub spoof_source: bool,
}

/// The command a reply answers, for counting refusals by stage (the metrics'
/// `tarmac_refusals_total{stage, class}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommandStage {
    /// HELO or EHLO.
    Helo,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// DATA, and the message's final dot.
    Data,
    /// Anything else (NOOP, RSET, an unknown command, ...).
    #[default]
    Other,
}

impl CommandStage {
    /// Every stage, in the order [`Refusals`] keeps them.
    pub const ALL: [CommandStage; 5] = [
        CommandStage::Helo,
        CommandStage::Mail,
        CommandStage::Rcpt,
        CommandStage::Data,
        CommandStage::Other,
    ];

    /// The metrics' label.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStage::Helo => "helo",
            CommandStage::Mail => "mail",
            CommandStage::Rcpt => "rcpt",
            CommandStage::Data => "data",
            CommandStage::Other => "misc",
        }
    }
}

/// The session's refusals (4xx and 5xx replies to its commands, greylisting's aside) by the
/// stage they answered: `[stage][0]` counts 4xx, `[stage][1]` 5xx, stages as
/// [`CommandStage::ALL`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refusals(pub [[u16; 2]; 5]);

impl Refusals {
    /// Counts a reply with `code` to a command of `stage` (nothing below 400).
    pub(super) fn count(&mut self, stage: CommandStage, code: u16) {
        let class = match code {
            400..=499 => 0,
            500.. => 1,
            _ => return,
        };
        let index = CommandStage::ALL
            .iter()
            .position(|s| *s == stage)
            .unwrap_or(4);
        if let Some(slot) = self.0.get_mut(index).and_then(|row| row.get_mut(class)) {
            *slot = slot.saturating_add(1);
        }
    }
}

/// The TLS version a STARTTLS handshake agreed, for the close line and the `Received:` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

impl TlsVersion {
    /// The name operators know from OpenSSL and Postfix logs: `TLSv1.2`, `TLSv1.3`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "TLSv1.2",
            TlsVersion::Tls13 => "TLSv1.3",
        }
    }
}

/// What the driver must do for the session: ask a shared service, or perform I/O.
#[derive(Debug)]
pub enum Action {
    /// Ask a shared service (resolver, state store, tarpit places, admission) and report the
    /// answer, if the question has one, with [`Session::handle_answer`](super::Session::handle_answer), now or when it
    /// arrives.
    Ask(Question),
    /// Get a connection to downstream server `addr` for `link`, as `via` says: for a server
    /// in `mode = "multiplexing"` an idle pooled one when allowed (report
    /// `DownstreamEvent::Reused` with what it carried), else a new TCP connection (report
    /// `Connected` or `ConnectFailed`; when it must first wait for a place in the pool, report
    /// `PoolWait`, then `PoolTurn` when its connect starts, so a timeout in the line is not
    /// counted against the server); for a transparent session always a new one of its own,
    /// from the address `via` names. Every later event of that connection is reported with
    /// `link`, and only bytes from
    /// [`Session::poll_transmit_downstream`](super::Session::poll_transmit_downstream) for `link` may be written to it.
    ConnectDownstream {
        /// Names this connection in events, bytes and later actions.
        link: LinkId,
        /// The server, or a transparent session's original destination.
        addr: SocketAddr,
        /// Pooled or not; from the host or from the client's address.
        via: Via,
    },
    /// `mode = "multiplexing"`: downstream connection `link` has no reply outstanding and
    /// nothing left to send: put it back in the pool with what it carries into its next
    /// transaction. The session no longer uses it.
    ReleaseDownstream {
        /// The connection.
        link: LinkId,
        /// Its capabilities, whom it speaks for, whether a transaction was left open.
        carried: Carried,
    },
    /// Close downstream connection `link` (ignored when it is gone already): write what
    /// `poll_transmit_downstream` handed out for it, then `QUIT\r\n` when `quit` (the
    /// downstream greeted us and the connection is in a known state), then close. Whatever
    /// the session had not handed out for it is gone with it.
    CloseDownstream {
        /// The connection.
        link: LinkId,
        /// Say QUIT before hanging up (DESIGN.md §6).
        quit: bool,
    },
    /// The client asked for STARTTLS and its `220` was handed out: write what
    /// `poll_transmit(Client)` gave before this in plain text, then run the server side of a
    /// TLS handshake on the client connection. Report `handle_tls_established` when it is done
    /// or `handle_tls_failed` if it fails; client bytes from then on are the decrypted stream.
    /// Bytes read from the socket before the switch must not be offered afterwards.
    StartTls,
    /// The downstream said `220` to STARTTLS: drop every downstream byte not yet handed to
    /// `handle_downstream` (anything after the 220 was sent in plain text and could be injected
    /// by anyone on the path), start a TLS client handshake on the connection, and report
    /// `DownstreamEvent::TlsEstablished` or `TlsFailed`. From then on every downstream byte in
    /// either direction goes through TLS.
    StartTlsDownstream(LinkId),
    /// Flush what `poll_transmit(Client)` handed out, then close the client connection. Comes
    /// out exactly once.
    Close,
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
    /// The client's address: the one in the PROXY header when a balancer sent one.
    pub client: SocketAddr,
    /// `dst=`: a transparent session's original destination (DESIGN.md §9); `None` on a plain
    /// listener, where the field is left out.
    pub dst: Option<SocketAddr>,
    /// The HELO/EHLO argument as sent (raw: the log line escapes and truncates it).
    pub helo: Option<&'a [u8]>,
    /// `rdns=`: the forward-confirmed name, `unverified`, `unknown`, `tempfail` or `-`.
    pub rdns: &'a str,
    /// `allow`, `pass`, `tarpit` or `reject`.
    pub verdict: &'static str,
    /// Sum of the weights of the zones listing the client, the reputation weight and the
    /// score rules' points.
    pub score: i32,
    /// `rep=`: the client's reputation when it was checked (`none`, `neutral`, `good`,
    /// `bad`), or `-` when it was not (reputation off, or a list decided).
    pub reputation: &'static str,
    /// `dnsbl=`: `zone:weight` per listing zone, `zone:tempfail|error|off`, or `-`.
    pub dnsbl: String,
    /// `list=`: `-`, or which list matched what (`deny:helo`).
    pub list: &'static str,
    /// The client talked before the final greeting line.
    pub pregreet: bool,
    /// `rule=`: the operator rule that decided last, or `-`.
    pub rule: &'a str,
    /// `greylist=`: the last recipient's greylisting, `new`, `early`, `pass`, `skip` (not
    /// greylisted: allowed, a negative score, or greylisting off) or `-` (no RCPT).
    pub greylist: &'static str,
    /// Messages the downstream accepted.
    pub msgs: u32,
    /// Recipients the downstream accepted.
    pub rcpts: u32,
    /// The TLS version in use (`TLSv1.3`, `TLSv1.2`), or `no` for a plain session; the close
    /// line prints it as `tls=yes tls_version=TLSv1.3` or `tls=no tls_version=-`.
    pub tls: &'static str,
    /// Refusals by stage and class, for the metrics (not in the close line).
    pub refusals: Refusals,
    /// `scan=`: the scanners' actions on the connection's last scanned message
    /// (`rspamd:reject:15.2,milter1:accept`), or `-` when none ran.
    pub scan: &'a str,
    /// How the session ended: `delivered` (at least one message), `discarded` (a scanner
    /// discarded its messages), `quit`, `disconnect`,
    /// `timeout`, `rejected`, `tempfail`, `too-many-errors`, `shutdown`, `bad-proxy`,
    /// `tls-failed` (a TLS handshake or record failed).
    pub result: &'static str,
}
