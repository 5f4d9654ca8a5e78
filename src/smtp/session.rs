//! The SMTP session state machine: one client connection, from banner to close, and the
//! downstream relay it drives.
//!
//! # Roles
//! - Inputs (`handle_*`): client bytes, client EOF, downstream events, timer expiry, shutdown,
//!   the end of a STARTTLS handshake.
//! - Inputs (`handle_answer`): the shared services' answers to the session's questions
//!   ([`Question`] out, [`Answer`] in).
//! - Outputs (`poll_*`): bytes for the client (`poll_transmit`) and for one downstream
//!   connection (`poll_transmit_downstream`, by its [`LinkId`]), the next step (`poll_action`:
//!   ask a service, connect/close/release downstream, switch to TLS, close), the next deadline
//!   (`poll_timeout`).
//! - Queries (`wants_read`, `is_closed`, `report`).
//!
//! After every `handle_*` the driver calls `poll_transmit` and `poll_transmit_downstream` for
//! the downstream connection it has, then `poll_action` until `None`, then re-arms its timer
//! from `poll_timeout`. Each downstream connection is named by the `LinkId` of the
//! `Action::ConnectDownstream` that asked for it: its events carry that id, and only its own
//! bytes are handed out for it (DESIGN.md §6: bytes belong to one connection).
//!
//! # Lifecycle
//! ```text
//! [[Proxy ──header──▶] Admitting ──▶] Checking ──answers or dns.timeout──▶ verdict ──▶ Command
//! Command ──MAIL/RCPT/DATA──▶ Waiting(pending) ──downstream reply──▶ Command
//!                              Waiting(Data) ──354──▶ Data ──CRLF.CRLF──▶ Waiting(EndOfData)
//! Command ──STARTTLS──▶ StartingTls ──handle_tls_established──▶ Command (before EHLO again)
//! any ──QUIT / EOF / timeout / too many errors / shutdown / TLS failure──▶ Closed (sticky)
//! ```
//! While `Waiting`, client bytes are not consumed (`wants_read()` is false): pipelined commands
//! wait in the driver's bounded buffer and are answered in order. The downstream is opened at the
//! first MAIL, never for local commands, and tarmac answers 250 to end-of-data only after the
//! downstream's 250. Any failure on the relay path is a 4xx so the sender retries.
//!
//! # Checks and verdict
//! Before the banner the session asks for its DNS lookups (`Question::Lookup`) and the
//! client's reputation (`Question::CheckReputation`), both answered through `handle_answer`,
//! and waits for them, the lookups at most `[dns] timeout`; the local lists
//! can decide sooner (`checks.rs`). A mostly bad history adds `[reputation] weight` to the score
//! before the verdict. What the client does that its reputation remembers goes out as
//! `Question::RecordReputation`, at most one bad event per session (the first: a pregreet, a
//! reject, protocol abuse), one greylist pass per session, and every delivered message.
//!
//! The verdict then shapes the dialog: `reject` with `reject_mode =
//! "immediate"` (or a deny-list entry) makes the greeting `554 5.7.1` and only QUIT is answered;
//! `"enforce"` greets normally, answers `550 5.7.1` to every RCPT and logs who was sending to
//! whom, and closes after DATA. `tarpit` holds every reply for `reply_delay` and stutters it
//! out (`smtp::tarpit`), once the driver granted one of the `max_tarpitted` places.
//!
//! # STARTTLS (RFC 3207)
//! EHLO offers STARTTLS when the driver said it may ([`Peer::starttls`]) and TLS is not on
//! yet. `STARTTLS` is answered `220 2.0.0 Ready to start TLS`, and whatever the client sent
//! after it in the same stream is discarded, never answered (CVE-2011-0411: bytes injected
//! before the handshake must not be taken as commands sent over TLS). Once the `220` has been
//! handed out by `poll_transmit` (a tarpit may hold it a while), `Action::StartTls` tells the
//! driver to start the handshake; `handle_tls_established` then puts the session back before
//! EHLO (what the client said in plain text is forgotten; MAIL before a new EHLO gets `503`).
//! The handshake must finish within `timeouts.command`; a failed or late one closes the
//! session without a reply (nothing can be said in plain text mid-handshake).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{Config, DownstreamMode, DownstreamTls, Pregreet, RejectMode};
use crate::downstream::dialog::{Carried, ClientIdentity, Handshake, Step, announcement_refused};
use crate::downstream::warnings;
use crate::policy::rates::network_name;
use crate::policy::reputation::{self, Event, History};
use crate::policy::{Facts, ListMatch, RuleAction, Stage, Verdict};
use crate::smtp::checks::{Checks, ListedBy};
use crate::smtp::command::{Body, Command, CommandError, MailParams, parse_command};
use crate::smtp::data::{DataDecoder, DataViolation};
use crate::smtp::log_text::escape;
use crate::smtp::proxy::{ProxyStart, parse_proxy_header, proxy_start};
use crate::smtp::question::{Answer, LookupAnswer, Query, Question};
use crate::smtp::received::{Trace, write_received};
use crate::smtp::reply::{EnhancedCode, Reply, Status, parse_reply};
use crate::smtp::tarpit::Tarpit;
use crate::state::greylist::{self, GreylistOutcome, GreylistTimes, KeyFacts};

/// Replies queued for the client before the session stops taking its commands (DESIGN.md §6.1
/// "Memory"): a client that pipelines without reading its replies makes the session hold at most
/// this plus one reply, and then stops being read. A dozen replies' worth: a legitimate pipelining
/// client waits for the downstream at each MAIL and RCPT anyway, so more would buy it nothing,
/// while 64 KiB here (as before) was most of a 230 KB worst case per connection.
const CLIENT_OUTBOX_CAP: usize = 1024;

/// Body bytes, encoded for the downstream, queued before the session stops taking the body:
/// a downstream that does not read makes the session hold at most this (see `Phase::Data` in
/// `handle_client_data`, which decodes only what fits). Two 16 KiB reads' worth keeps the body
/// streaming at full speed while the driver writes the previous one; more only costs memory
/// (DESIGN.md §6.1: 160 KB for a connection relaying a body, every buffer counted).
const DOWNSTREAM_OUTBOX_CAP: usize = 32 * 1024;

/// How long a client from `proxy_protocol_from` has to send its PROXY header: postscreen's
/// `postscreen_upstream_proxy_timeout` default.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Outbox capacity kept after a flush; larger buffers are freed so idle sessions stay small.
const KEEP_CAPACITY: usize = 4 * 1024;

/// Greet pause in stress mode (postscreen's `postscreen_greet_wait` under stress: 2 s).
const STRESS_GREET_PAUSE: Duration = Duration::from_secs(2);

/// Command timeout in stress mode (postscreen's `smtpd_timeout` under stress: 10 s).
const STRESS_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of a pregreet talker's first burst kept for its log line (postscreen logs the start
/// of what it sent; the log escapes and truncates it further).
const PREGREET_KEEP: usize = 64;

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
}

/// The TLS version a STARTTLS handshake agreed, for the close line and the `Received:` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

/// What the driver must do for the session: ask a shared service, or perform I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask a shared service (resolver, state store, tarpit places, admission) and report the
    /// answer, if the question has one, with [`Session::handle_answer`], now or when it
    /// arrives.
    Ask(Question),
    /// Get a connection to downstream server `addr` for `link`: in `mode = "multiplexing"`
    /// an idle pooled one when `pooled` allows (report `DownstreamEvent::Reused` with what it
    /// carried), else a new TCP connection (report `Connected` or `ConnectFailed`). Every
    /// later event of that connection is reported with `link`, and only bytes from
    /// [`Session::poll_transmit_downstream`] for `link` may be written to it.
    ConnectDownstream {
        /// Names this connection in events, bytes and later actions.
        link: LinkId,
        /// The server.
        addr: SocketAddr,
        /// An idle pooled connection may be used (`false`: a pooled one could not speak for
        /// this client, so it must be a new one).
        pooled: bool,
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
    /// How the session ended: `delivered` (at least one message), `quit`, `disconnect`,
    /// `timeout`, `rejected`, `tempfail`, `too-many-errors`, `shutdown`, `bad-proxy`,
    /// `tls-failed` (a TLS handshake or record failed).
    pub result: &'static str,
}

/// Where the dialog with the client stands.
#[derive(Debug)]
enum Phase {
    /// A client from `proxy_protocol_from`: its PROXY header comes before the banner.
    Proxy,
    /// The header named the client (or, with `Session::admitting`, the client connected): the
    /// driver is checking its connection rates and per-IP cap.
    Admitting,
    /// Before the final greeting line: DNS lookups are out, the greet pause runs, a client
    /// that talks now is a pregreet talker. Ends when the answers are in (or `[dns] timeout`),
    /// the pause is over and, for a tarpit verdict, a tarpit place was granted or refused.
    Checking,
    /// Reading commands.
    Command,
    /// A relayed command waits for the downstream's reply; client input waits too.
    Waiting(Pending),
    /// Streaming a message body to the downstream.
    Data(Box<DataDecoder>),
    /// After `220 Ready to start TLS`: waiting for the handshake. Client bytes offered now are
    /// discarded (they were sent before the handshake, whatever they claim to be).
    StartingTls,
    /// Terminal, with its last reply held by the tarpit: `poll_transmit` still releases it on
    /// its schedule, and `Action::Close` comes once it is all out (or at once when the client
    /// goes or the drain time ends). Becomes `Closed`, never anything else.
    Closing(CloseReason),
    /// Terminal and sticky: `Action::Close` is out; the outbox may still hold the last reply.
    Closed(CloseReason),
}

/// The client command a downstream reply is awaited for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Mail,
    Rcpt,
    Data,
    EndOfData,
    /// Not the downstream: the greylist's answer for a RCPT (`Question::CheckGreylist`).
    Greylist,
}

/// Why the session closed; becomes `result=` unless a message was delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CloseReason {
    Quit,
    Disconnect,
    Timeout,
    TooManyErrors,
    Shutdown,
    BadProxy,
    Refused,
    /// A rejected client's session ended by tarmac (enforce mode after DATA).
    Blocked,
    /// The TLS handshake failed, or a TLS record after it.
    TlsFailed,
}

impl CloseReason {
    /// `result=` in the close line when nothing more telling happened.
    fn as_str(self) -> &'static str {
        match self {
            CloseReason::Quit => "quit",
            CloseReason::Disconnect => "disconnect",
            CloseReason::Timeout => "timeout",
            CloseReason::TooManyErrors => "too-many-errors",
            CloseReason::Shutdown => "shutdown",
            CloseReason::BadProxy => "bad-proxy",
            CloseReason::Refused => "refused",
            CloseReason::Blocked => "rejected",
            CloseReason::TlsFailed => "tls-failed",
        }
    }
}

/// Where the greet pause stands (`[tarpit] greet_pause`, DESIGN.md §1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GreetPause {
    /// No pause: none configured, or a list decided on the client.
    Skipped,
    /// `Question::CheckPass` is out: the pause cannot start before its answer.
    Asking,
    /// A fresh PASS was cached: no pause.
    Cached,
    /// The pause was served (`Timers::greet` runs it): passing it earns a PASS.
    Served,
}

/// Where the session stands with STARTTLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TlsStage {
    /// Not offered: no certificate, or the client's last handshake failed recently.
    Unavailable,
    /// Offered in EHLO, not asked for yet.
    Offered,
    /// `220 Ready to start TLS` is queued (or held by the tarpit); `Action::StartTls` comes
    /// once it is all handed out.
    Requested,
    /// `Action::StartTls` came out; the handshake runs.
    Handshaking,
    /// The handshake is done; everything from here on is encrypted.
    Active(TlsVersion),
}

/// One timer per kind; `poll_timeout` is the earliest.
#[derive(Clone, Copy, Debug, Default)]
struct Timers {
    /// Fires when no command line is complete within `timeouts.command` of tarmac's last reply
    /// being handed out (the banner included; RFC 5321 §4.5.3.2.7, Postfix's `smtpd_timeout`;
    /// bytes that do not complete a line do not move it), when a PROXY header is not complete
    /// within [`PROXY_HEADER_TIMEOUT`], or when a STARTTLS handshake is not done within
    /// `timeouts.command`.
    command: Option<Instant>,
    /// Fires when no command completed within `timeouts.idle` (not while in DATA or waiting).
    idle: Option<Instant>,
    /// Fires when no body bytes arrived within `timeouts.data`.
    data: Option<Instant>,
    /// Fires when the downstream connect (`timeouts.connect`) or reply (`timeouts.command`) is late.
    downstream: Option<Instant>,
    /// Fires when the DNS answers are not all in within `[dns] timeout`.
    lookup: Option<Instant>,
    /// Fires when the greet pause is over.
    greet: Option<Instant>,
}

impl Timers {
    /// The earliest deadline that can fire in `phase`: exactly the timers `handle_timeout`
    /// acts on there, so a deadline that is due is never reported without being handled (the
    /// driver would wake at once, again and again).
    /// While a tarpitted reply is `holding`, the client owes us nothing: its timers wait.
    fn earliest(&self, phase: &Phase, holding: bool) -> Option<Instant> {
        let client = match phase {
            Phase::Command if holding => [None, None],
            Phase::Command => [self.command, self.idle],
            Phase::Proxy | Phase::StartingTls => [self.command, None],
            Phase::Checking => [self.lookup, self.greet],
            Phase::Admitting => [None, None],
            Phase::Data(_) => [self.data, None],
            Phase::Waiting(_) | Phase::Closing(_) | Phase::Closed(_) => [None, None],
        };
        client.into_iter().chain([self.downstream]).flatten().min()
    }
}

fn expired(timer: Option<Instant>, now: Instant) -> bool {
    timer.is_some_and(|at| at <= now)
}

/// The client's current mail transaction.
#[derive(Debug)]
struct Transaction {
    from: String,
    params: MailParams,
    /// RCPTs relayed (accepted or not); capped by `max_recipients`.
    attempted: usize,
    /// RCPTs the downstream accepted.
    accepted: u32,
    /// The downstream went away mid-transaction: RCPT/DATA get 451 until RSET or a new MAIL.
    broken: bool,
    /// The recipient waiting for the greylist's answer.
    greylisting: Option<Box<str>>,
    /// MAIL was relayed to the downstream for this transaction. Not so after an enforce-mode
    /// reject answered MAIL locally: a recipient an `allow` rule lets through then opens the
    /// downstream and relays MAIL first (DESIGN.md §6).
    relayed: bool,
    /// The recipient waiting for that late MAIL's reply.
    after_mail: Option<Box<str>>,
}

/// What the client did wrong since its last delivered message, as Postfix's smtpd counts it
/// (`error_count`, `junk_cmds`): a message accepted for delivery forgives both (`smtpd.c`,
/// `data_cmd` on `CLEANUP_STAT_OK`), so a sender that delivers many messages over one session
/// is not closed for an RSET per message or a bad recipient now and then, while one that
/// delivers nothing runs into the limits.
#[derive(Clone, Copy, Debug, Default)]
struct Strikes {
    /// `Session::msgs` when these counts started: a delivery since then starts them over.
    /// Kept as a count rather than reset where the downstream's 250 is handled, so the
    /// relay path needs no hook.
    since_msgs: u32,
    /// 4xx/5xx replies to the client's commands, greylisting's aside (`max_errors`).
    errors: u32,
    /// NOOP, RSET, VRFY, HELP and repeated HELO/EHLO (`max_junk_commands`).
    junk: u32,
}

impl Strikes {
    /// The counts for the period since the last delivery, `msgs` being the messages
    /// delivered so far.
    fn current(&mut self, msgs: u32) -> &mut Strikes {
        if self.since_msgs != msgs {
            *self = Strikes {
                since_msgs: msgs,
                ..Strikes::default()
            };
        }
        self
    }
}

/// Where the downstream connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Connecting,
    Handshaking,
    /// `Action::StartTlsDownstream` is out: no reply is read until the driver reports.
    StartingTls,
    Ready,
}

/// The downstream connection, boxed: most sessions (and every tarpitted one) never open it.
#[derive(Debug)]
struct Relay {
    /// Which connection this is; events and bytes for any other are not this relay's.
    id: LinkId,
    /// Index into `config.downstream.servers` of the server in use.
    server: usize,
    link: Link,
    handshake: Handshake,
    /// Bytes for this connection not yet handed out; they die with it.
    outbox: Vec<u8>,
    /// Replies to commands tarmac sent on its own (RSET), to be read and dropped.
    swallow: u32,
    /// A MAIL was sent on this connection since the last reset.
    in_transaction: bool,
    /// Part of a body was sent: closing now must not send anything (no dot, no QUIT).
    mid_data: bool,
    /// A second connection after a failed TLS handshake under `opportunistic`: plain text, as
    /// Postfix retries (`Step::RetryWithoutTls`).
    plain_retry: bool,
}

/// A verdict of reject (or a deny-list entry, or a pregreet talker), as the dialog applies it.
#[derive(Debug)]
enum Blocked {
    /// The greeting (or the HELO reply) was `554`: every command but QUIT gets `503`.
    Immediate,
    /// `pregreet = "reject"`: the client talked before the greeting; every command but QUIT
    /// gets `554 5.5.1`.
    Pregreet,
    /// A rule rejected or deferred the client at connect or HELO: every command but QUIT gets
    /// the rule's reply (DESIGN.md §3.2).
    Rule(Box<Reply>),
    /// `reject_mode = "enforce"`: RCPT gets `550 5.7.1` with this text, DATA `554` and a close.
    Enforce(Box<str>),
}

/// One client connection's SMTP state.
#[derive(Debug)]
pub struct Session {
    config: Arc<Config>,
    peer: Peer,
    started: Instant,
    phase: Phase,
    /// The command line being assembled (bounded by `max_line_length`).
    line: Vec<u8>,
    /// An over-long line is being skipped up to its LF.
    discarding: bool,
    to_client: Vec<u8>,
    actions: VecDeque<Action>,
    timers: Timers,
    helo: Option<Box<[u8]>>,
    esmtp: bool,
    tx: Option<Box<Transaction>>,
    relay: Option<Box<Relay>>,
    /// The id the next downstream connection gets.
    next_link: u32,
    /// Unknown or malformed commands (and other protocol errors), against
    /// `max_unknown_commands`; never forgiven.
    protocol_errors: u32,
    /// Errors and junk commands since the last delivered message.
    strikes: Strikes,
    msgs: u32,
    rcpts: u32,
    last_failure: Option<&'static str>,
    shutting_down: bool,
    checks: Checks,
    blocked: Option<Blocked>,
    /// Where the greet pause stands.
    pause: GreetPause,
    /// A `CheckReputation` is unanswered: the verdict waits.
    awaiting_reputation: bool,
    /// A bad event went to the client's reputation: one per session is enough.
    bad_recorded: bool,
    /// A greylist pass went to the client's reputation (once per session).
    pass_recorded: bool,
    /// What a pregreet talker sent first (at most [`PREGREET_KEEP`] bytes).
    pregreet: Option<Box<[u8]>>,
    /// A command line (or an over-long one) was completed: a PROXY header can no longer be
    /// what the client is sending.
    spoke: bool,
    /// An `EnterTarpit` is unanswered: the greeting waits.
    awaiting_slot: bool,
    /// Tarpit verdict with its place granted: replies are held and released on a schedule.
    tarpit: Option<Box<Tarpit>>,
    /// A reloaded configuration, put in force at the next decision (see `handle_reload`).
    pending_config: Option<Arc<Config>>,
    /// The rule that decided last (`rule=` in the close line).
    rule: Option<Box<str>>,
    /// The last recipient's greylisting, for `greylist=` in the close line.
    greylisted: &'static str,
    /// A `greylist` rule matched: every recipient is greylisted.
    forced_greylist: bool,
    tls: TlsStage,
}

/// What a rule decided at a stage, owned (the rule set may be replaced by a reload).
struct RuleOutcome {
    action: RuleAction,
    reply: Option<Reply>,
}

impl Session {
    /// A new session for an accepted connection; queues the banner, or waits for the PROXY
    /// header first when the peer is a listed load balancer.
    pub fn new(config: Arc<Config>, peer: Peer, now: Instant) -> Session {
        if config.server.expects_proxy_header(peer.client.ip()) {
            let mut session = Session::unstarted(config, peer, now, Phase::Proxy);
            session.timers.idle = None;
            session.timers.command = Some(now + PROXY_HEADER_TIMEOUT);
            return session;
        }
        let mut session = Session::unstarted(config, peer, now, Phase::Command);
        session.start_checks(now);
        session
    }

    /// A new session whose client the driver could not admit on the spot (its connection
    /// rates are shared through Redis, so the answer comes later): it asks first
    /// (`Question::Admit` with the peer's address) and reads nothing until
    /// [`Answer::Admission`] starts the checks or refuses with DESIGN.md §1.1's `421`.
    /// A listed load balancer's connection waits for its PROXY header as with
    /// [`Session::new`], and asks for the client the header names.
    pub fn admitting(config: Arc<Config>, peer: Peer, now: Instant) -> Session {
        if config.server.expects_proxy_header(peer.client.ip()) {
            return Session::new(config, peer, now);
        }
        let mut session = Session::unstarted(config, peer, now, Phase::Admitting);
        session
            .actions
            .push_back(Action::Ask(Question::Admit(peer.client)));
        session
    }

    /// A session in `phase` with nothing started.
    fn unstarted(config: Arc<Config>, peer: Peer, now: Instant, phase: Phase) -> Session {
        Session {
            peer,
            started: now,
            phase,
            line: Vec::new(),
            discarding: false,
            to_client: Vec::new(),
            actions: VecDeque::new(),
            timers: Timers {
                idle: Some(now + config.timeouts.idle),
                ..Timers::default()
            },
            helo: None,
            esmtp: false,
            tx: None,
            relay: None,
            next_link: 0,
            protocol_errors: 0,
            strikes: Strikes::default(),
            msgs: 0,
            rcpts: 0,
            last_failure: None,
            shutting_down: false,
            checks: Checks::new(),
            blocked: None,
            pause: GreetPause::Skipped,
            awaiting_reputation: false,
            bad_recorded: false,
            pass_recorded: false,
            pregreet: None,
            spoke: false,
            awaiting_slot: false,
            tarpit: None,
            pending_config: None,
            rule: None,
            greylisted: "-",
            forced_greylist: false,
            tls: if peer.starttls {
                TlsStage::Offered
            } else {
                TlsStage::Unavailable
            },
            config,
        }
    }

    /// Feeds client bytes; returns how many were consumed. The driver keeps the rest and offers
    /// them again once `wants_read()` is true.
    pub fn handle_client_data(&mut self, now: Instant, bytes: &[u8]) -> usize {
        let mut consumed = 0;
        while consumed < bytes.len() {
            let rest = bytes.get(consumed..).unwrap_or_default();
            let holding = self.is_holding();
            let relay_outbox = self.relay_outbox_len();
            let relay_full = relay_outbox >= DOWNSTREAM_OUTBOX_CAP;
            let used = match &mut self.phase {
                Phase::Closing(_) | Phase::Closed(_) => return bytes.len(),
                Phase::Waiting(_) | Phase::Admitting => break,
                Phase::Checking => {
                    // Bytes after a PROXY header in the same read talk before the greeting too.
                    let used = self.detect_pregreet(now, rest);
                    consumed += used;
                    break;
                }
                Phase::Command if self.to_client.len() >= CLIENT_OUTBOX_CAP || holding => break,
                Phase::Command => match self.read_command(now, rest) {
                    // Waiting for more of what may be a PROXY header (`check_first_command`);
                    // a line that just went over the limit takes its LF on the next turn.
                    0 if !self.discarding => break,
                    used => used,
                },
                Phase::Proxy => self.read_proxy_header(now, rest),
                Phase::StartingTls => {
                    // CVE-2011-0411: sent after STARTTLS in plain text; answered after the
                    // handshake it would pass for a command sent over TLS. Pipelined with the
                    // STARTTLS itself (this call consumed it) is the injection the CVE is about.
                    if consumed > 0 {
                        log::info!(
                            "discarded {} bytes pipelined after STARTTLS by {}",
                            rest.len(),
                            self.peer.client
                        );
                    } else {
                        log::debug!(
                            "discarded {} bytes from {} before its TLS handshake",
                            rest.len(),
                            self.peer.client
                        );
                    }
                    rest.len()
                }
                Phase::Data(_) if relay_full => break,
                Phase::Data(decoder) => {
                    // `bare_newline = "normalize"` at most doubles what it decodes (a bare LF
                    // becomes CRLF): take only what fits under the cap even then.
                    let room = DOWNSTREAM_OUTBOX_CAP
                        .saturating_sub(relay_outbox)
                        .div_ceil(2);
                    let rest = rest.get(..room).unwrap_or(rest);
                    let decoded = match self.relay.as_deref_mut() {
                        Some(relay) => decoder.decode(rest, &mut relay.outbox),
                        None => {
                            // The downstream is gone: read the body to its end, relay nothing.
                            let mut nowhere = Vec::new();
                            decoder.decode(rest, &mut nowhere)
                        }
                    };
                    self.timers.data = Some(now + self.config.timeouts.data);
                    if decoded.done {
                        self.end_of_data(now);
                    }
                    decoded.consumed
                }
            };
            consumed += used;
        }
        self.check_shutdown(now);
        consumed
    }

    /// The client closed its sending side (or the connection broke).
    pub fn handle_client_eof(&mut self, _now: Instant) {
        if let Phase::Closing(reason) = self.phase {
            // Closed with its last reply held in the tarpit: nobody is left to read it.
            self.phase = Phase::Closed(reason);
            if let Some(tarpit) = self.tarpit.as_deref_mut() {
                tarpit.discard();
            }
            self.to_client.clear();
            self.actions.push_back(Action::Close);
        } else if !self.is_closed() {
            self.close(CloseReason::Disconnect, None);
        }
    }

    /// Feeds an event of downstream connection `link`; for `Data` returns the bytes consumed,
    /// else 0. Events of a connection the session no longer uses are swallowed.
    pub fn handle_downstream(
        &mut self,
        now: Instant,
        link: LinkId,
        event: DownstreamEvent<'_>,
    ) -> usize {
        let current = self.relay.as_deref().is_some_and(|relay| relay.id == link);
        if self.is_closed() || !current {
            return match event {
                DownstreamEvent::Data(bytes) => bytes.len(),
                _ => 0,
            };
        }
        let used = match event {
            DownstreamEvent::Connected => {
                let who = identity(&self.peer, self.helo.as_deref(), self.esmtp, &self.checks);
                if let Some(relay) = self.relay.as_deref_mut() {
                    relay.link = Link::Handshaking;
                    relay.handshake.handle_connected(&who, &mut relay.outbox);
                }
                self.timers.downstream = Some(now + self.config.timeouts.command);
                0
            }
            DownstreamEvent::Reused(carried) => {
                let config = Arc::clone(&self.config);
                let who = identity(&self.peer, self.helo.as_deref(), self.esmtp, &self.checks);
                let step = self.relay.as_deref_mut().map(|relay| {
                    let (handshake, step) = Handshake::resume(
                        &config.server.hostname,
                        config.downstream.announce_client,
                        carried,
                        &who,
                        &mut relay.outbox,
                    );
                    relay.handshake = handshake;
                    relay.link = Link::Handshaking;
                    step
                });
                if let Some(step) = step {
                    self.on_handshake_step(now, step);
                }
                0
            }
            DownstreamEvent::ConnectFailed => {
                self.try_next_server(now);
                0
            }
            DownstreamEvent::Closed => {
                // Nothing more can be written to it, QUIT included: closed without one.
                if let Some(relay) = self.relay.take() {
                    self.actions.push_back(Action::CloseDownstream {
                        link: relay.id,
                        quit: false,
                    });
                }
                self.downstream_failed(now, "connection closed");
                0
            }
            DownstreamEvent::Data(bytes) => self.read_downstream(now, bytes),
            DownstreamEvent::TlsEstablished => {
                let step = self.relay.as_deref_mut().and_then(|relay| {
                    (relay.link == Link::StartingTls).then(|| {
                        relay.link = Link::Handshaking;
                        relay.handshake.handle_tls_established(&mut relay.outbox)
                    })
                });
                match step {
                    Some(step) => self.on_handshake_step(now, step),
                    None => self.downstream_failed(now, "TLS reported without STARTTLS"),
                }
                0
            }
            DownstreamEvent::TlsFailed => {
                self.downstream_tls_failed(now);
                0
            }
        };
        self.check_shutdown(now);
        used
    }

    /// Handles every timer that has expired at `now`; a no-op when called early.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        if expired(self.timers.downstream, now) {
            self.timers.downstream = None;
            let link = self.relay.as_ref().map(|r| r.link);
            if link == Some(Link::Connecting) {
                self.try_next_server(now);
            } else if link == Some(Link::StartingTls) {
                // Postfix counts a stalled handshake as a failed one.
                self.downstream_tls_failed(now);
            } else {
                self.downstream_failed(now, "timeout");
            }
        }
        let client_late = match self.phase {
            Phase::Data(_) => expired(self.timers.data, now),
            Phase::Command if self.is_holding() => false,
            Phase::Command => expired(self.timers.command, now) || expired(self.timers.idle, now),
            Phase::Proxy if expired(self.timers.command, now) => {
                // No banner was sent: nothing to say, as postscreen.
                return self.close(CloseReason::Timeout, None);
            }
            Phase::StartingTls if expired(self.timers.command, now) => {
                // Mid-handshake: nothing can be said in plain text any more.
                return self.close(CloseReason::Timeout, None);
            }
            Phase::Checking => {
                if expired(self.timers.lookup, now) {
                    self.timers.lookup = None;
                    self.checks.give_up();
                }
                if expired(self.timers.greet, now) {
                    self.timers.greet = None;
                }
                self.try_greet(now);
                false
            }
            Phase::Proxy
            | Phase::Admitting
            | Phase::StartingTls
            | Phase::Waiting(_)
            | Phase::Closing(_)
            | Phase::Closed(_) => false,
        };
        if client_late {
            let text = format!("{} Error: timeout exceeded", self.config.server.hostname);
            self.close(CloseReason::Timeout, Some(Reply::new(421, "4.4.2", text)));
        }
    }

    /// A service's answer to an `Action::Ask` (see [`Answer`] for what each one does). An
    /// answer nobody waits for any more (late, after a close, or after a reload changed what
    /// was asked) is ignored.
    pub fn handle_answer(&mut self, now: Instant, answer: Answer) {
        match answer {
            Answer::Lookup(query, answer) => self.on_lookup(now, &query, answer),
            Answer::Pass(cached) => self.on_pass(now, cached),
            Answer::Reputation(history) => self.on_reputation(now, history),
            Answer::Greylist(outcome) => self.on_greylist(now, outcome),
            Answer::TarpitSlot(granted) => self.on_tarpit_slot(now, granted),
            Answer::Admission(admitted) => self.on_admission(now, admitted),
        }
    }

    /// The answer to a `Question::Lookup`. Once every answer is in, the verdict is made and the
    /// banner (or the `554`) goes out. Late answers, after `[dns] timeout`, are ignored.
    fn on_lookup(&mut self, now: Instant, query: &Query, answer: LookupAnswer) {
        if !matches!(self.phase, Phase::Checking) {
            return;
        }
        if self.checks.answer(query, answer) {
            self.timers.lookup = None;
            self.try_greet(now);
        }
    }

    /// The answer to `Question::CheckPass`: a fresh PASS skips the greet pause; otherwise the
    /// pause starts now, with the `220-` teaser when `banner_continuation` is on.
    fn on_pass(&mut self, now: Instant, cached: bool) {
        if self.pause != GreetPause::Asking || !matches!(self.phase, Phase::Checking) {
            return;
        }
        self.pause = GreetPause::Cached;
        if !cached {
            self.pause = GreetPause::Served;
            self.timers.greet = Some(now + self.greet_pause());
            if self.config.tarpit.banner_continuation {
                let teaser = format!("220-{} ESMTP tarmac\r\n", self.config.server.hostname);
                self.to_client.extend_from_slice(teaser.as_bytes());
            }
        }
        self.try_greet(now);
    }

    /// The answer to `Question::CheckReputation`: the client's history (`None`: none kept). A
    /// mostly bad one adds `[reputation] weight` to the score the verdict is made from.
    fn on_reputation(&mut self, now: Instant, history: Option<History>) {
        if !self.awaiting_reputation || !matches!(self.phase, Phase::Checking) {
            return;
        }
        self.awaiting_reputation = false;
        let config = &self.config.reputation;
        let standing = reputation::standing(history.as_ref(), now, config.half_life);
        let weight = reputation::weight(standing, config);
        self.checks.set_reputation(standing, weight);
        self.try_greet(now);
    }

    /// The answer to `Question::EnterTarpit`: granted, every reply from the greeting on is
    /// delayed (and stuttered); refused (`max_tarpitted` reached), the client is rejected
    /// instead, as DESIGN.md §3 says.
    fn on_tarpit_slot(&mut self, now: Instant, granted: bool) {
        if !self.awaiting_slot {
            return;
        }
        self.awaiting_slot = false;
        if !matches!(self.phase, Phase::Checking) {
            // A rule's tarpit after the greeting, already holding: no place, no tarpit.
            if !granted {
                self.leave_tarpit();
            }
            return;
        }
        if granted {
            let tarpit = &self.config.tarpit;
            self.tarpit = Some(Box::new(Tarpit::new(tarpit.reply_delay, tarpit.stutter)));
        } else {
            log::info!(
                "max_tarpitted reached: rejecting {} instead of tarpitting it",
                self.peer.client.ip().to_canonical()
            );
            self.checks.reject_instead_of_tarpit();
        }
        self.greet_final(now);
    }

    /// SIGHUP put a new configuration in force. The session takes it at its next decision
    /// (the next command, or the start of its checks after a PROXY header), not mid-command,
    /// so a reply or a check in progress finishes under the rules it started with.
    pub fn handle_reload(&mut self, config: Arc<Config>) {
        self.pending_config = Some(config);
    }

    /// The answer to `Question::CheckGreylist`: a new or early triplet gets `451 4.7.1
    /// Greylisted, please try again in N seconds` and is not relayed; a passing one is.
    fn on_greylist(&mut self, now: Instant, outcome: GreylistOutcome) {
        if !matches!(self.phase, Phase::Waiting(Pending::Greylist)) {
            return;
        }
        self.phase = Phase::Command;
        let Some(to) = self.tx.as_deref_mut().and_then(|tx| tx.greylisting.take()) else {
            return;
        };
        let wait = match outcome {
            GreylistOutcome::Pass => {
                self.greylisted = "pass";
                self.record_reputation(Event::GreylistPass);
                return self.relay_rcpt(now, &to);
            }
            GreylistOutcome::New => {
                self.greylisted = "new";
                self.config.greylist.delay
            }
            GreylistOutcome::Early(left) => {
                self.greylisted = "early";
                left
            }
        };
        self.last_failure = Some("tempfail");
        // Whole seconds, rounded up: "try again in 0 seconds" would be a lie.
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let text = format!("Greylisted, please try again in {seconds} seconds");
        // Not an error of the client's (DESIGN.md §6.1): every first delivery attempt gets it,
        // and a message to many new recipients must not run into `max_errors`.
        self.say(Reply::new(451, "4.7.1", text));
    }

    /// The TLS handshake `Action::StartTls` started is done (RFC 3207 §4.2): the session starts
    /// over before EHLO, forgetting the HELO name and anything else the client said in plain
    /// text, and no longer offers STARTTLS. Ignored unless a handshake was asked for.
    pub fn handle_tls_established(&mut self, now: Instant, version: TlsVersion) {
        if self.tls != TlsStage::Handshaking || !matches!(self.phase, Phase::StartingTls) {
            return;
        }
        self.tls = TlsStage::Active(version);
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.phase = Phase::Command;
        // The client speaks first after the handshake (its new EHLO): its command time starts.
        self.timers.command = Some(now + self.command_timeout());
        self.timers.idle = Some(now + self.config.timeouts.idle);
        self.check_shutdown(now);
    }

    /// The TLS layer failed: the handshake (a bad or hostile client, no common version or
    /// cipher) or a record after it. Nothing more can be said to the client, so the session
    /// closes without a reply; a half-sent body is not delivered.
    pub fn handle_tls_failed(&mut self, _now: Instant) {
        if self.is_closed() || !matches!(self.tls, TlsStage::Handshaking | TlsStage::Active(_)) {
            return;
        }
        self.close(CloseReason::TlsFailed, None);
    }

    /// The driver learned the client's address from its PROXY header, and that client's last
    /// STARTTLS handshake failed recently: EHLO no longer offers STARTTLS (see
    /// [`Peer::starttls`]).
    pub fn handle_starttls_withheld(&mut self) {
        if self.tls == TlsStage::Offered {
            self.tls = TlsStage::Unavailable;
        }
    }

    /// The server entered or left stress mode: stuttering stops while it lasts.
    pub fn handle_stress(&mut self, _now: Instant, stressed: bool) {
        self.peer.stressed = stressed;
    }

    /// The driver's answer to `Question::Admit`: the checks (then the banner), or (over the
    /// per-IP cap) the same `421` a directly connected client gets, and a close.
    fn on_admission(&mut self, now: Instant, admitted: bool) {
        if !matches!(self.phase, Phase::Admitting | Phase::Proxy) {
            return;
        }
        if admitted {
            self.start_checks(now);
        } else {
            let reply = too_many_connections(&self.config.server.hostname);
            self.close(CloseReason::Refused, Some(reply));
        }
    }

    /// SIGTERM/SIGINT.
    pub fn handle_shutdown(&mut self, now: Instant, how: Shutdown) {
        if self.is_closed() {
            if let (Shutdown::Now, &Phase::Closing(reason)) = (how, &self.phase) {
                // Its last reply is still trickling out: out with it now, then close.
                self.phase = Phase::Closed(reason);
                self.leave_tarpit();
                self.actions.push_back(Action::Close);
            }
            return;
        }
        self.shutting_down = true;
        match how {
            Shutdown::Graceful => self.check_shutdown(now),
            Shutdown::Now => self.close_for_shutdown(),
        }
    }

    /// Appends the bytes for the client due at `now` to `out`: for a tarpitted client only
    /// what its schedule releases by `now`.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) {
        if let Some(tarpit) = self.tarpit.as_deref_mut() {
            let was_holding = tarpit.is_holding();
            tarpit.hold(now, &mut self.to_client);
            tarpit.release(now, self.peer.stressed, out);
            if was_holding && !tarpit.is_holding() {
                if let Phase::Closing(reason) = self.phase {
                    self.phase = Phase::Closed(reason);
                    self.actions.push_back(Action::Close);
                } else if !self.is_closed() && self.tls != TlsStage::Requested {
                    // The client's idle time starts when it has our reply.
                    self.timers.idle = Some(now + self.config.timeouts.idle);
                    self.reply_handed_out(now);
                }
            }
            self.start_tls_when_announced(now);
            return;
        }
        let handed_out = !self.to_client.is_empty();
        hand_out(&mut self.to_client, out);
        if handed_out {
            self.reply_handed_out(now);
        }
        self.start_tls_when_announced(now);
    }

    /// Appends the bytes for downstream connection `link` to `out`; nothing when `link` is not
    /// the connection in use (its bytes died with it). Only a connection's own handshake
    /// commands go out before it is ready, and transaction commands only after.
    pub fn poll_transmit_downstream(&mut self, link: LinkId, out: &mut Vec<u8>) {
        if let Some(relay) = self.relay.as_deref_mut().filter(|relay| relay.id == link) {
            hand_out(&mut relay.outbox, out);
        }
    }

    /// The next I/O step for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The earliest deadline, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let release = self.tarpit.as_deref().and_then(Tarpit::next_release);
        if self.is_closed() {
            // Only a held last reply is still to go out.
            return release.filter(|_| matches!(self.phase, Phase::Closing(_)));
        }
        let holding = self.is_holding();
        [self.timers.earliest(&self.phase, holding), release]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether the session takes client bytes now (false while a reply is pending from the
    /// downstream, while its outboxes are full, or once closed).
    pub fn wants_read(&self) -> bool {
        match self.phase {
            Phase::Command => self.to_client.len() < CLIENT_OUTBOX_CAP && !self.is_holding(),
            Phase::Proxy => self.to_client.len() < CLIENT_OUTBOX_CAP,
            // Read until the first pregreet byte: talking first is what is watched for here.
            Phase::Checking => self.pregreet.is_none(),
            Phase::Data(_) => self.relay_outbox_len() < DOWNSTREAM_OUTBOX_CAP,
            // Until the switch, bytes are taken only to be discarded; during the handshake the
            // driver has no plaintext to offer.
            Phase::StartingTls => self.tls == TlsStage::Requested,
            Phase::Waiting(_) | Phase::Admitting | Phase::Closing(_) | Phase::Closed(_) => false,
        }
    }

    /// Whether the client is sending a message body: the driver reads it in large chunks
    /// then, and commands in small ones (their replies are what a non-reading client backs
    /// up, so there is nothing to gain from reading far ahead of them).
    pub fn is_in_body(&self) -> bool {
        matches!(self.phase, Phase::Data(_))
    }

    /// Figures for the close log line.
    pub fn report(&self) -> Report<'_> {
        let result = if self.msgs > 0 {
            "delivered"
        } else if let Some(failure) = self.last_failure {
            failure
        } else {
            match self.phase {
                Phase::Closing(reason) | Phase::Closed(reason) => reason.as_str(),
                _ => "disconnect",
            }
        };
        Report {
            client: self.peer.client,
            helo: self.helo.as_deref(),
            rdns: self.checks.rdns_field(),
            verdict: self.checks.verdict().as_str(),
            score: self.checks.score(),
            reputation: self.checks.reputation_field(),
            dnsbl: self.checks.dnsbl_field(),
            list: self.checks.list_field(),
            pregreet: self.pregreet.is_some(),
            rule: self.rule.as_deref().unwrap_or("-"),
            greylist: self.greylisted,
            msgs: self.msgs,
            rcpts: self.rcpts,
            tls: match self.tls {
                TlsStage::Active(version) => version.as_str(),
                _ => "no",
            },
            result,
        }
    }

    /// Whether the session is closed (its final bytes may still be in the outbox).
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closing(_) | Phase::Closed(_))
    }

    // ---- client side ----

    fn greet(&mut self) {
        let banner = format!("{} ESMTP tarmac", self.config.server.hostname);
        self.say(Reply::without_enhanced(220, banner));
    }

    /// The client's address is known (accept, or the PROXY header): start its lookups, or
    /// decide at once when a list knows the address or there is nothing to look up.
    fn start_checks(&mut self, now: Instant) {
        self.take_reload();
        let config = Arc::clone(&self.config);
        let ip = self.peer.client.ip().to_canonical();
        let queries = self.checks.start(&config, ip);
        self.phase = Phase::Checking;
        if !queries.is_empty() {
            self.timers.lookup = Some(now + config.dns.timeout);
            self.actions.extend(
                queries
                    .into_iter()
                    .map(|q| Action::Ask(Question::Lookup(q))),
            );
        }
        // A client a list decided on needs neither its reputation nor a greet pause: allowed,
        // it skips every check; denied, it is refused at once.
        if config.reputation.enabled && self.checks.list_match().is_none() {
            self.awaiting_reputation = true;
            self.actions
                .push_back(Action::Ask(Question::CheckReputation {
                    ip,
                    half_life: config.reputation.half_life,
                }));
        }
        if !self.greet_pause().is_zero() && self.checks.list_match().is_none() {
            self.pause = GreetPause::Asking;
            self.actions.push_back(Action::Ask(Question::CheckPass(ip)));
        }
        self.try_greet(now);
    }

    /// The greet pause for this client: `[tarpit] greet_pause`, shorter in stress mode.
    fn greet_pause(&self) -> Duration {
        let pause = self.config.tarpit.greet_pause;
        if self.peer.stressed {
            pause.min(STRESS_GREET_PAUSE)
        } else {
            pause
        }
    }

    /// `[timeouts] command`, shorter in stress mode.
    fn command_timeout(&self) -> Duration {
        let timeout = self.config.timeouts.command;
        if self.peer.stressed {
            timeout.min(STRESS_COMMAND_TIMEOUT)
        } else {
            timeout
        }
    }

    /// A reply (or the banner) went to the driver whole: from now on the client owes us its
    /// next command, within `timeouts.command` (DESIGN.md §6.1). Only in the command phase:
    /// a `354` starts the data timer instead, a STARTTLS `220` the handshake's. A tarpit hands
    /// a reply out only once all of it is released, so a held reply does not run the timer.
    fn reply_handed_out(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Command) && !self.is_closed() {
            self.timers.command = Some(now + self.command_timeout());
        }
    }

    /// Whether a tarpitted reply is held (produced, not yet all sent): the client reads, we
    /// wait, and nothing else is read from it.
    fn is_holding(&self) -> bool {
        self.tarpit
            .as_deref()
            .is_some_and(|tarpit| tarpit.is_holding() || !self.to_client.is_empty())
    }

    /// Ends the pre-greet stage once nothing is pending: every answer in (or given up on),
    /// the PASS and reputation questions answered, the greet pause over.
    fn try_greet(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Checking)
            && self.checks.is_complete()
            && self.pause != GreetPause::Asking
            && !self.awaiting_reputation
            && !self.awaiting_slot
            && self.timers.greet.is_none()
        {
            self.finish_checks(now);
        }
    }

    /// Every answer is in and the pause is over: the verdict. A tarpit verdict first asks
    /// for one of the `max_tarpitted` places; the others greet at once.
    fn finish_checks(&mut self, now: Instant) {
        let config = Arc::clone(&self.config);
        self.timers.lookup = None;
        self.checks.decide(&config);
        if let Some(RuleOutcome {
            action: RuleAction::Reject | RuleAction::Defer,
            reply: Some(reply),
        }) = self.run_rules(Stage::Connect, None)
        {
            // Greeted as usual; then every command but QUIT gets the rule's reply.
            self.blocked = Some(Blocked::Rule(Box::new(reply)));
        }
        let verdict = self.checks.verdict();
        let tarpit = &config.tarpit;
        if verdict == Verdict::Tarpit
            && (!tarpit.reply_delay.is_zero() || !tarpit.stutter.is_zero())
            && !self.shutting_down
        {
            self.awaiting_slot = true;
            self.actions.push_back(Action::Ask(Question::EnterTarpit));
            return;
        }
        self.greet_final(now);
    }

    /// The final greeting line the verdict calls for, then the command phase.
    fn greet_final(&mut self, now: Instant) {
        let config = Arc::clone(&self.config);
        let verdict = self.checks.verdict();
        self.phase = Phase::Command;
        self.timers.idle = Some(now + config.timeouts.idle);
        if self.shutting_down {
            return self.close_for_shutdown();
        }
        let ip = self.peer.client.ip().to_canonical();
        if self.pause == GreetPause::Served && self.pregreet.is_none() && verdict != Verdict::Reject
        {
            self.actions
                .push_back(Action::Ask(Question::RecordPass(ip)));
        }
        // A reject the client earned; not one forced by a full tarpit (`max_tarpitted`).
        if verdict == Verdict::Reject && !self.checks.is_tarpit_refused() {
            self.record_reputation(Event::Rejected);
        }
        if matches!(self.blocked, Some(Blocked::Rule(_))) {
            return self.greet();
        }
        if verdict != Verdict::Reject {
            if self.pregreet.is_some() && config.tarpit.pregreet == Pregreet::Reject {
                self.blocked = Some(Blocked::Pregreet);
                self.last_failure = Some("rejected");
            }
            return self.greet();
        }
        let text = match (self.checks.list_match(), self.checks.blocking_zone()) {
            (Some(ListMatch::Deny), _) | (_, None) => {
                format!("Service unavailable; client [{ip}] blocked by local policy")
            }
            (_, Some(zone)) => format!("Service unavailable; client [{ip}] blocked using {zone}"),
        };
        self.last_failure = Some("rejected");
        if self.checks.list_match() == Some(ListMatch::Deny)
            || config.scoring.reject_mode == RejectMode::Immediate
        {
            // RFC 5321 §3.1: a 554 greeting; the client should QUIT, other commands get 503.
            // After a `220-` teaser this is the greeting's final line, as postscreen does.
            self.blocked = Some(Blocked::Immediate);
            // The greeting, not an answer to a command: no error counted.
            self.say(Reply::new(554, "5.7.1", text));
        } else {
            self.blocked = Some(Blocked::Enforce(text.into_boxed_str()));
            self.greet();
        }
    }

    /// Runs the operator rules of `stage` (DESIGN.md §3.2) on what the session knows: score
    /// rules add to the score (at connect the verdict follows it), then the first terminal rule
    /// that matches decides; allow, tarpit and reject set the verdict, and its name goes to the
    /// close line. Returns the decision, with the reply a reject or defer gives. An allow-listed
    /// client skips the rules, as every other check.
    fn run_rules(&mut self, stage: Stage, recipient: Option<&str>) -> Option<RuleOutcome> {
        let config = Arc::clone(&self.config);
        if config.rules.set.is_empty() || self.checks.list_match() == Some(ListMatch::Allow) {
            return None;
        }
        let listed = self.checks.listed_zones();
        let helo = self
            .helo
            .as_deref()
            .and_then(|helo| std::str::from_utf8(helo).ok());
        let facts = Facts {
            client: self.peer.client.ip().to_canonical(),
            helo,
            rdns: self.checks.rdns_name(),
            sender: self.tx.as_deref().map(|tx| tx.from.as_str()),
            recipient,
            listed_in: &listed,
            score: self.checks.score(),
        };
        let (added, decision) = config.rules.set.evaluate(stage, &facts);
        let decision = decision.map(|d| (d.rule.to_owned(), d.action, d.reply_at(stage)));
        drop(listed);
        if added != 0 {
            self.checks
                .add_score(&config, added, stage == Stage::Connect);
        }
        let (rule, action, reply) = decision?;
        self.rule = Some(rule.into_boxed_str());
        match action {
            RuleAction::Allow => self.checks.rule_decided(Verdict::Allow),
            RuleAction::Tarpit => {
                self.checks.rule_decided(Verdict::Tarpit);
                // After the greeting the tarpit holds this command's reply already; the place
                // is asked for at once and, if none is free, what is held goes out (at
                // connect, `finish_checks` asks for the place before the greeting).
                let tarpit = &config.tarpit;
                if stage != Stage::Connect
                    && self.tarpit.is_none()
                    && !self.awaiting_slot
                    && (!tarpit.reply_delay.is_zero() || !tarpit.stutter.is_zero())
                {
                    self.tarpit = Some(Box::new(Tarpit::new(tarpit.reply_delay, tarpit.stutter)));
                    self.awaiting_slot = true;
                    self.actions.push_back(Action::Ask(Question::EnterTarpit));
                }
            }
            RuleAction::Reject => {
                self.checks.rule_decided(Verdict::Reject);
                self.last_failure = Some("rejected");
                self.record_reputation(Event::Rejected);
            }
            RuleAction::Defer => self.last_failure = Some("tempfail"),
            // Greylisted whatever the verdict or `[greylist] enabled` say: the rule is explicit.
            RuleAction::Greylist => self.forced_greylist = true,
            RuleAction::Score(_) => {}
        }
        Some(RuleOutcome { action, reply })
    }

    /// Sends `event` to the client's reputation (`Question::RecordReputation`) when reputation
    /// is on and no allow list exempts the client: each bad event only if none was sent in
    /// this session (one misbehaving session is one mark, however many errors it made), a
    /// greylist pass once per session, every delivery.
    fn record_reputation(&mut self, event: Event) {
        if !self.config.reputation.enabled || self.checks.list_match() == Some(ListMatch::Allow) {
            return;
        }
        let mut every_time = false;
        let seen = match event {
            Event::Pregreet | Event::Rejected | Event::ProtocolAbuse => &mut self.bad_recorded,
            Event::GreylistPass => &mut self.pass_recorded,
            Event::Delivered => &mut every_time,
        };
        if std::mem::replace(seen, true) {
            return;
        }
        let ip = self.peer.client.ip().to_canonical();
        self.actions
            .push_back(Action::Ask(Question::RecordReputation {
                ip,
                event,
                half_life: self.config.reputation.half_life,
            }));
    }

    /// Bytes before the final greeting line: the client is a pregreet talker (DESIGN.md §1.2).
    /// The first burst is kept for the log; `drop` ends the session with `521` at once, the
    /// other modes read nothing more until the greeting (the bytes wait in the driver's
    /// buffer and are answered as commands after it). Returns bytes consumed.
    fn detect_pregreet(&mut self, now: Instant, bytes: &[u8]) -> usize {
        if self.pregreet.is_some() || bytes.is_empty() {
            return 0;
        }
        match proxy_start(bytes) {
            ProxyStart::Header => return self.stray_proxy_header(bytes.len()),
            // Left with the driver until there are enough to tell.
            ProxyStart::Undecided => return 0,
            ProxyStart::NotProxy => {}
        }
        let kept = bytes.get(..PREGREET_KEEP).unwrap_or(bytes);
        self.pregreet = Some(kept.into());
        log::info!(
            "pregreet: {} bytes after {:.2}s from {}: {}",
            bytes.len(),
            now.saturating_duration_since(self.started).as_secs_f64(),
            self.peer.client,
            escape(kept)
        );
        if self.config.tarpit.pregreet != Pregreet::Ignore {
            self.record_reputation(Event::Pregreet);
        }
        if self.config.tarpit.pregreet == Pregreet::Drop {
            let text = format!(
                "{} Protocol error: talked before the greeting",
                self.config.server.hostname
            );
            self.last_failure = Some("rejected");
            self.close(CloseReason::Blocked, Some(Reply::new(521, "5.5.1", text)));
            return bytes.len();
        }
        0
    }

    /// Collects the PROXY header (DESIGN.md §1.4): once whole, the client is the address in
    /// it and gets the banner; malformed, too long or late, the connection closes without a
    /// banner and nothing is accepted. Returns bytes used (the header's, no more).
    fn read_proxy_header(&mut self, now: Instant, input: &[u8]) -> usize {
        let seen = self.line.len();
        self.line.extend_from_slice(input);
        match parse_proxy_header(&self.line) {
            Ok(Status::Partial) => input.len(),
            Ok(Status::Complete((client, length))) => {
                self.line = Vec::new();
                self.timers.command = None;
                match client {
                    Some(client) => {
                        self.peer.client = client;
                        let allowed = self
                            .config
                            .lists
                            .entries
                            .check_ip(client.ip().to_canonical())
                            == Some(ListMatch::Allow);
                        if allowed {
                            // Allow-listed: no per-IP cap (DESIGN.md §1.1).
                            self.on_admission(now, true);
                        } else {
                            self.phase = Phase::Admitting;
                            self.actions.push_back(Action::Ask(Question::Admit(client)));
                        }
                    }
                    // A health check (UNKNOWN, LOCAL) is the balancer itself.
                    None => self.on_admission(now, true),
                }
                length.saturating_sub(seen)
            }
            Err(error) => {
                log::info!("bad PROXY header from {}: {error:?}", self.peer.client);
                self.close(CloseReason::BadProxy, None);
                input.len()
            }
        }
    }

    /// A client outside `proxy_protocol_from` sent a PROXY header (DESIGN.md §6.1), before the
    /// greeting or as its first command: it is closed without a banner or a reply
    /// (`result=bad-proxy`), whatever `pregreet` says. Either a balancer missing from the
    /// list, or a client hoping to pass for another address; neither is answered as SMTP.
    /// Returns the bytes taken (`input_len`: everything offered).
    fn stray_proxy_header(&mut self, input_len: usize) -> usize {
        log::info!(
            "PROXY header from {}, which is not in proxy_protocol_from: closed without a reply",
            self.peer.client
        );
        self.last_failure = Some("bad-proxy");
        self.close(CloseReason::BadProxy, None);
        input_len
    }

    /// Whether the client's first command is a PROXY header: looks at the start of the
    /// stream (the partial line kept plus `input`). Returns the bytes to take now: all of
    /// them once closed, none while a v2 signature's start holds a line end (taking it
    /// would answer the empty line), or `None` to read on as a command.
    fn check_first_command(&mut self, input: &[u8]) -> Option<usize> {
        let mut head = [0u8; 12];
        let mut len = 0;
        for (slot, &byte) in head.iter_mut().zip(self.line.iter().chain(input)) {
            *slot = byte;
            len += 1;
        }
        match proxy_start(head.get(..len).unwrap_or_default()) {
            ProxyStart::Header => Some(self.stray_proxy_header(input.len())),
            ProxyStart::Undecided if input.contains(&b'\n') => Some(0),
            ProxyStart::Undecided | ProxyStart::NotProxy => None,
        }
    }

    /// Takes bytes of a command line; dispatches it once its LF arrives. Returns bytes used.
    fn read_command(&mut self, now: Instant, input: &[u8]) -> usize {
        if !self.spoke
            && !self.discarding
            && let Some(used) = self.check_first_command(input)
        {
            return used;
        }
        let max = self.config.limits.max_line_length;
        let newline = input.iter().position(|&b| b == b'\n');
        if self.discarding {
            // RFC 5321 §4.5.3.1.4: a line over the limit is an error; resync at its LF.
            let Some(at) = newline else {
                return input.len();
            };
            self.discarding = false;
            self.spoke = true;
            self.timers.command = None;
            self.line_error(Reply::new(500, "5.5.2", "Error: line too long"));
            return at + 1;
        }
        if self.timers.command.is_none() {
            // Normally armed when the last reply was handed out; a partial line never moves
            // it (a client trickling bytes without ever finishing a command is still timed out).
            self.timers.command = Some(now + self.command_timeout());
        }
        let take = newline.map_or(input.len(), |at| at + 1);
        if self.line.len() + take > max {
            self.line = Vec::new();
            self.discarding = true;
            // Skip up to (not past) the LF: the next call sees it and answers.
            return newline.unwrap_or(input.len());
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
        if newline.is_some() {
            let line = std::mem::take(&mut self.line);
            self.spoke = true;
            self.timers.command = None;
            self.timers.idle = Some(now + self.config.timeouts.idle);
            self.dispatch_line(now, &line);
            if line.capacity() <= KEEP_CAPACITY {
                self.line = line;
                self.line.clear();
            }
        }
        take
    }

    /// Puts a reloaded configuration in force (a decision point: see `handle_reload`).
    fn take_reload(&mut self) {
        if let Some(config) = self.pending_config.take() {
            self.config = config;
        }
    }

    fn dispatch_line(&mut self, now: Instant, line: &[u8]) {
        self.take_reload();
        let Some(text) = line.strip_suffix(b"\r\n") else {
            // Only CRLF ends a command line; a bare LF is refused, not guessed at.
            self.line_error(Reply::new(500, "5.5.2", "Error: bare <LF> received"));
            return;
        };
        match parse_command(text) {
            Ok(command) => self.handle_command(now, command),
            Err(CommandError::Unknown) => self.line_error(CommandError::Unknown.reply()),
            Err(error) => self.reply(error.reply()),
        }
    }

    /// Counts a protocol error (unknown command, over-long line, bare LF, client XCLIENT);
    /// past `max_unknown_commands` the reply is `421` and the session closes.
    fn line_error(&mut self, reply: Reply) {
        self.protocol_errors += 1;
        if self.protocol_errors > self.config.limits.max_unknown_commands {
            self.record_reputation(Event::ProtocolAbuse);
            let reply = too_many_errors(&self.config.server.hostname);
            self.close(CloseReason::TooManyErrors, Some(reply));
        } else {
            self.reply(reply);
        }
    }

    fn handle_command(&mut self, now: Instant, command: Command<'_>) {
        match &self.blocked {
            _ if matches!(command, Command::Quit) => {}
            Some(Blocked::Immediate) => {
                return self.line_error(Reply::new(
                    503,
                    "5.7.1",
                    "Error: service unavailable; only QUIT is accepted",
                ));
            }
            Some(Blocked::Pregreet) => {
                return self.line_error(Reply::new(
                    554,
                    "5.5.1",
                    "Error: you talked before the greeting; no mail accepted",
                ));
            }
            Some(Blocked::Rule(reply)) => {
                let reply = Reply::clone(reply);
                return self.line_error(reply);
            }
            Some(Blocked::Enforce(_)) | None => {}
        }
        let junk = match command {
            Command::Noop | Command::Rset | Command::Vrfy | Command::Help => true,
            // The first greeting (and the one RFC 3207 requires after STARTTLS, which forgets
            // the first) is the protocol; another one is not needed for anything.
            Command::Ehlo(_) | Command::Helo(_) => self.helo.is_some(),
            _ => false,
        };
        self.run_command(now, command);
        if junk {
            self.count_junk();
        }
    }

    /// Answers (or relays) one command the session's state lets through.
    fn run_command(&mut self, now: Instant, command: Command<'_>) {
        match command {
            Command::Ehlo(name) | Command::Helo(name) => {
                let esmtp = matches!(command, Command::Ehlo(_));
                self.reset_transaction();
                self.helo = Some(name.as_bytes().into());
                self.esmtp = esmtp;
                let config = Arc::clone(&self.config);
                match self.checks.check_name(&config, name, ListedBy::Helo) {
                    Some(ListMatch::Deny) => {
                        self.blocked = Some(Blocked::Immediate);
                        self.record_reputation(Event::Rejected);
                        let text = format!("<{name}>: Helo command rejected: Access denied");
                        return self.reply(Reply::new(554, "5.7.1", text));
                    }
                    Some(ListMatch::Allow) => self.blocked = None,
                    None => {}
                }
                match self.run_rules(Stage::Helo, None) {
                    Some(RuleOutcome {
                        action: RuleAction::Reject | RuleAction::Defer,
                        reply: Some(reply),
                    }) => {
                        // The HELO gets the reply, and so does every command after it.
                        self.blocked = Some(Blocked::Rule(Box::new(reply.clone())));
                        return self.reply(reply);
                    }
                    Some(RuleOutcome {
                        action: RuleAction::Allow,
                        ..
                    }) => self.blocked = None,
                    _ => {}
                }
                let hostname = &self.config.server.hostname;
                let reply = if esmtp {
                    let mut lines = vec![
                        hostname.clone(),
                        "PIPELINING".to_owned(),
                        format!("SIZE {}", self.config.limits.max_message_size),
                    ];
                    if self.tls == TlsStage::Offered {
                        lines.push("STARTTLS".to_owned());
                    }
                    lines.extend(["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"].map(String::from));
                    Reply::multiline(250, None, lines)
                } else {
                    Reply::without_enhanced(250, hostname.clone())
                };
                self.reply(reply);
            }
            Command::Mail { from, params } => self.handle_mail(now, from, params),
            Command::Rcpt { to } => self.handle_rcpt(now, to),
            Command::Data => self.handle_data(now),
            Command::Rset => {
                self.reset_transaction();
                self.reply(Reply::new(250, "2.0.0", "Ok"));
            }
            Command::Noop => self.reply(Reply::new(250, "2.0.0", "Ok")),
            Command::Quit => {
                self.close(CloseReason::Quit, Some(Reply::new(221, "2.0.0", "Bye")));
            }
            Command::Help => self.reply(Reply::new(
                214,
                "2.0.0",
                "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT",
            )),
            // RFC 5321 §3.5.3: 252 neither confirms nor denies, and tells address harvesters
            // nothing.
            Command::Vrfy => self.reply(Reply::new(
                252,
                "2.0.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => self.reply(Reply::new(502, "5.5.1", "Error: EXPN not available")),
            Command::StartTls => self.handle_starttls(),
            // Client-sent identity is never trusted or passed on (DESIGN.md §1.4).
            Command::Xclient | Command::Xforward => self.line_error(Reply::new(
                550,
                "5.7.0",
                "Error: insufficient authorization",
            )),
            Command::Auth => self.reply(Reply::new(
                503,
                "5.5.1",
                "Error: authentication not enabled",
            )),
            Command::Bdat => self.reply(Reply::new(
                502,
                "5.5.1",
                "Error: CHUNKING not available, use DATA",
            )),
        }
    }

    /// `STARTTLS` (RFC 3207 §4): `220`, then the switch once the reply is out.
    fn handle_starttls(&mut self) {
        match self.tls {
            TlsStage::Offered => {}
            TlsStage::Unavailable => {
                return self.reply(Reply::new(502, "5.5.1", "Error: STARTTLS not available"));
            }
            TlsStage::Requested | TlsStage::Handshaking | TlsStage::Active(_) => {
                return self.reply(Reply::new(503, "5.5.1", "Error: TLS already active"));
            }
        }
        if self.tx.is_some() {
            // As Postfix: the transaction would straddle the switch; RSET first.
            return self.reply(Reply::new(
                503,
                "5.5.1",
                "Error: MAIL transaction in progress",
            ));
        }
        // The downstream session announced the client's plain-text HELO; the next transaction
        // gets a fresh one after the new EHLO.
        if !self.release_relay_if_clean(false) {
            self.drop_relay();
        }
        self.reply(Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.tls = TlsStage::Requested;
        self.phase = Phase::StartingTls;
        self.timers.idle = None;
    }

    fn handle_mail(&mut self, now: Instant, from: &str, params: MailParams) {
        if self.helo.is_none() {
            return self.reply(Reply::new(503, "5.5.1", "Error: send HELO/EHLO first"));
        }
        if self.tx.is_some() {
            return self.reply(Reply::new(503, "5.5.1", "Error: nested MAIL command"));
        }
        if self.shutting_down {
            return self.close_for_shutdown();
        }
        let limit = self.config.limits.max_message_size;
        if params.size.is_some_and(|size| size > limit) {
            return self.reply(Reply::new(
                552,
                "5.3.4",
                "Error: message size exceeds fixed limit",
            ));
        }
        if !from.is_ascii() && !params.smtputf8 {
            return self.reply(Reply::new(
                553,
                "5.6.7",
                "Error: non-ASCII sender address needs SMTPUTF8",
            ));
        }
        let config = Arc::clone(&self.config);
        let domain = from.rsplit_once('@').map_or("", |(_, domain)| domain);
        match self.checks.check_name(&config, domain, ListedBy::Sender) {
            Some(ListMatch::Deny) => {
                // Like a deny-listed HELO: the session is refused, not just this sender, so a
                // second MAIL with another sender gets no further.
                self.blocked = Some(Blocked::Immediate);
                self.last_failure = Some("rejected");
                self.record_reputation(Event::Rejected);
                let text = format!("<{from}>: Sender address rejected: Access denied");
                return self.reply(Reply::new(554, "5.7.1", text));
            }
            Some(ListMatch::Allow) => self.blocked = None,
            None => {}
        }
        self.tx = Some(Box::new(Transaction {
            from: from.to_owned(),
            params,
            attempted: 0,
            accepted: 0,
            broken: false,
            greylisting: None,
            relayed: false,
            after_mail: None,
        }));
        match self.run_rules(Stage::Mail, None) {
            Some(RuleOutcome {
                action: RuleAction::Reject | RuleAction::Defer,
                reply: Some(reply),
            }) => {
                // This MAIL only: another sender may still be fine.
                self.tx = None;
                return self.reply(reply);
            }
            Some(RuleOutcome {
                action: RuleAction::Allow,
                ..
            }) => self.blocked = None,
            _ => {}
        }
        if matches!(self.blocked, Some(Blocked::Enforce(_))) {
            // Enforce mode: the sender is taken so the recipients show in the log; nothing goes
            // downstream.
            return self.reply(Reply::new(250, "2.1.0", "Ok"));
        }
        self.phase = Phase::Waiting(Pending::Mail);
        self.start_mail(now);
    }

    fn handle_rcpt(&mut self, now: Instant, to: &str) {
        let Some(tx) = self.tx.as_deref_mut() else {
            return self.reply(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        if tx.broken {
            return self.reply(downstream_lost());
        }
        if tx.attempted >= self.config.limits.max_recipients {
            return self.reply(Reply::new(452, "4.5.3", "Error: too many recipients"));
        }
        if !to.is_ascii() && !tx.params.smtputf8 {
            return self.reply(Reply::new(
                553,
                "5.6.7",
                "Error: non-ASCII recipient address needs SMTPUTF8",
            ));
        }
        tx.attempted += 1;
        match self.run_rules(Stage::Rcpt, Some(to)) {
            Some(RuleOutcome {
                action: RuleAction::Reject | RuleAction::Defer,
                reply: Some(reply),
            }) => return self.reply(reply),
            Some(RuleOutcome {
                action: RuleAction::Allow,
                ..
            }) => self.blocked = None,
            _ => {}
        }
        let Some(tx) = self.tx.as_deref() else {
            return;
        };
        if let Some(Blocked::Enforce(text)) = &self.blocked {
            // postscreen's enforce log line: who was sending to whom, refused.
            log::info!(
                "reject: RCPT from [{}]: 550 5.7.1 {text}; from=<{}> to=<{}> helo=<{}>",
                self.peer.client.ip().to_canonical(),
                escape(tx.from.as_bytes()),
                escape(to.as_bytes()),
                escape(self.helo.as_deref().unwrap_or_default()),
            );
            self.last_failure = Some("rejected");
            let reply = Reply::new(550, "5.7.1", text.to_string());
            return self.reply(reply);
        }
        if let Some(key) = self.greylist_key(to) {
            if let Some(tx) = self.tx.as_deref_mut() {
                tx.greylisting = Some(to.into());
            }
            self.phase = Phase::Waiting(Pending::Greylist);
            self.actions.push_back(Action::Ask(Question::CheckGreylist {
                key,
                subnet: network_name(self.peer.client.ip()),
                times: GreylistTimes::of(&self.config.greylist),
            }));
            return;
        }
        self.greylisted = "skip";
        self.relay_rcpt(now, to);
    }

    /// Relays RCPT for `to`: at once on the transaction's ready downstream, or, when MAIL was
    /// answered locally (enforce mode) and a rule has since allowed this recipient, after
    /// opening the downstream and relaying MAIL first. Never onto a connection that is not
    /// ready for this transaction.
    fn relay_rcpt(&mut self, now: Instant, to: &str) {
        let relayed = self.tx.as_deref().is_some_and(|tx| tx.relayed);
        let ready = self
            .relay
            .as_deref()
            .is_some_and(|relay| relay.link == Link::Ready && relay.in_transaction);
        if relayed && ready {
            let command = format!("RCPT TO:<{to}>\r\n");
            return self.send_downstream(now, command.as_bytes(), Pending::Rcpt);
        }
        if relayed {
            // The transaction's downstream is gone.
            return self.reply(downstream_lost());
        }
        if let Some(tx) = self.tx.as_deref_mut() {
            tx.after_mail = Some(to.into());
        }
        self.phase = Phase::Waiting(Pending::Mail);
        self.start_mail(now);
    }

    /// The greylist key for recipient `to`, when greylisting applies: a `greylist` rule
    /// matched, or greylisting is on and the verdict is pass or tarpit with a score not below
    /// zero (DNSWL-listed and allowed clients are never greylisted).
    fn greylist_key(&self, to: &str) -> Option<String> {
        let config = &self.config.greylist;
        let verdict = self.checks.verdict();
        let applies = config.enabled
            && matches!(verdict, Verdict::Pass | Verdict::Tarpit)
            && self.checks.score() >= 0;
        if !applies && !self.forced_greylist {
            return None;
        }
        let facts = KeyFacts {
            client: self.peer.client.ip(),
            helo: self
                .helo
                .as_deref()
                .and_then(|helo| std::str::from_utf8(helo).ok())
                .unwrap_or_default(),
            rdns: self.checks.rdns_name(),
            sender: self.tx.as_deref().map_or("", |tx| tx.from.as_str()),
            recipient: to,
        };
        Some(greylist::key(&config.key, &facts))
    }

    fn handle_data(&mut self, now: Instant) {
        let Some(tx) = self.tx.as_deref() else {
            return self.reply(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        if matches!(self.blocked, Some(Blocked::Enforce(_))) {
            // Every recipient was refused and logged; nothing more can come of this session.
            let reply = Reply::new(554, "5.5.1", "Error: no valid recipients");
            return self.close(CloseReason::Blocked, Some(reply));
        }
        if tx.broken {
            return self.reply(downstream_lost());
        }
        if tx.attempted == 0 {
            return self.reply(Reply::new(503, "5.5.1", "Error: need RCPT command"));
        }
        if tx.accepted == 0 {
            return self.reply(Reply::new(554, "5.5.1", "Error: no valid recipients"));
        }
        self.send_downstream(now, b"DATA\r\n", Pending::Data);
    }

    /// The client's `CRLF.CRLF` arrived.
    fn end_of_data(&mut self, now: Instant) {
        self.timers.data = None;
        self.timers.idle = Some(now + self.config.timeouts.idle);
        let violation = match std::mem::replace(&mut self.phase, Phase::Command) {
            Phase::Data(decoder) => decoder.violation(),
            other => {
                self.phase = other;
                return;
            }
        };
        let refusal = match violation {
            Some(DataViolation::BareNewline) => Some(Reply::new(
                550,
                "5.6.0",
                "Error: bare <CR> or <LF> in message body; message not accepted",
            )),
            Some(DataViolation::TooBig) => Some(Reply::new(
                552,
                "5.3.4",
                "Error: message size exceeds fixed limit",
            )),
            None => None,
        };
        if violation == Some(DataViolation::BareNewline) {
            // A bare CR or LF in a body is how SMTP smuggling starts; no MTA sends it by accident
            // often enough to matter.
            self.record_reputation(Event::ProtocolAbuse);
        }
        if let Some(reply) = refusal {
            // Part of the body already went downstream: only dropping the connection without
            // the final dot guarantees nothing is delivered.
            self.drop_relay();
            self.tx = None;
            self.last_failure = Some("rejected");
            return self.reply(reply);
        }
        let Some(relay) = self.relay.as_deref_mut().filter(|r| r.link == Link::Ready) else {
            self.tx = None;
            self.last_failure = Some("tempfail");
            return self.reply(downstream_lost());
        };
        relay.mid_data = false;
        self.send_downstream(now, b".\r\n", Pending::EndOfData);
    }

    // ---- downstream side ----

    /// MAIL for the current transaction (the session is `Waiting(Mail)`): on the connection in
    /// use once it speaks for this client (renewed with a fresh XCLIENT when it served
    /// someone else, or retired), on the one still being set up once it is ready, or on a
    /// new one.
    fn start_mail(&mut self, now: Instant) {
        self.phase = Phase::Waiting(Pending::Mail);
        let who = identity(&self.peer, self.helo.as_deref(), self.esmtp, &self.checks);
        let step = match self.relay.as_deref_mut() {
            Some(relay) if relay.link == Link::Ready => {
                let step = relay.handshake.renew(&who, &mut relay.outbox);
                if step != Step::Ready {
                    relay.link = Link::Handshaking;
                }
                step
            }
            // Still connecting or handshaking: MAIL goes out when the handshake is done.
            Some(_) => return,
            None => return self.connect(now, 0, false, true),
        };
        self.on_handshake_step(now, step);
    }

    /// Opens a downstream connection to `server` (a pooled one when `pooled` allows);
    /// `plain_retry` turns STARTTLS off for it. Any connection still in use is closed first.
    fn connect(&mut self, now: Instant, server: usize, plain_retry: bool, pooled: bool) {
        self.drop_relay();
        let Some(&addr) = self.config.downstream.servers.get(server) else {
            return self.downstream_failed(now, "no server reachable");
        };
        let hostname = &self.config.server.hostname;
        let tls = if plain_retry {
            DownstreamTls::None
        } else {
            self.config.downstream.tls
        };
        let id = LinkId(self.next_link);
        self.next_link = self.next_link.wrapping_add(1);
        self.relay = Some(Box::new(Relay {
            id,
            server,
            link: Link::Connecting,
            handshake: Handshake::new(hostname, self.config.downstream.announce_client)
                .with_tls(tls),
            outbox: Vec::new(),
            swallow: 0,
            in_transaction: false,
            mid_data: false,
            plain_retry,
        }));
        self.actions.push_back(Action::ConnectDownstream {
            link: id,
            addr,
            pooled,
        });
        self.timers.downstream = Some(now + self.config.timeouts.connect);
    }

    /// Connect failure or connect timeout: the next server in order, or give up.
    fn try_next_server(&mut self, now: Instant) {
        let next = self.relay.as_ref().map_or(0, |r| r.server + 1);
        self.drop_relay();
        if next < self.config.downstream.servers.len() {
            self.connect(now, next, false, true);
        } else {
            self.downstream_failed(now, "no server reachable");
        }
    }

    /// The server address of the connection in use, for log lines.
    fn relay_server(&self) -> Option<SocketAddr> {
        let relay = self.relay.as_deref()?;
        self.config.downstream.servers.get(relay.server).copied()
    }

    fn read_downstream(&mut self, now: Instant, bytes: &[u8]) -> usize {
        let mut consumed = 0;
        while !self.is_closed() {
            match self.relay.as_deref() {
                None => break,
                // Whatever followed the 220 to STARTTLS came in plain text: never a reply.
                Some(relay) if relay.link == Link::StartingTls => break,
                Some(_) => {}
            }
            let rest = bytes.get(consumed..).unwrap_or_default();
            match parse_reply(rest) {
                Ok(Status::Complete((reply, used))) => {
                    consumed += used;
                    self.on_downstream_reply(now, reply);
                    self.release_relay_if_clean(false);
                }
                Ok(Status::Partial) => return consumed,
                Err(_) => {
                    self.downstream_failed(now, "malformed reply");
                    return bytes.len();
                }
            }
        }
        bytes.len()
    }

    fn on_downstream_reply(&mut self, now: Instant, reply: Reply) {
        let Some(relay) = self.relay.as_deref_mut() else {
            return;
        };
        // Replies come in order: those to commands tarmac sent on its own (RSET) before
        // anything sent after them, a renewed handshake's XCLIENT included.
        if relay.swallow > 0 {
            relay.swallow -= 1;
            if relay.swallow == 0 && !matches!(self.phase, Phase::Waiting(_)) {
                self.timers.downstream = None;
            }
            if reply.code / 100 != 2 {
                self.downstream_failed(now, "reset refused");
            }
            return;
        }
        if relay.link == Link::Handshaking {
            let who = identity(&self.peer, self.helo.as_deref(), self.esmtp, &self.checks);
            let step = relay.handshake.handle_reply(reply, &who, &mut relay.outbox);
            return self.on_handshake_step(now, step);
        }
        let Phase::Waiting(pending) = self.phase else {
            // Unsolicited: typically the downstream's own 421 before it hangs up.
            return self.downstream_failed(now, "unexpected reply");
        };
        if pending == Pending::Greylist {
            // Nothing was sent downstream for this command.
            return self.downstream_failed(now, "unexpected reply");
        }
        self.timers.downstream = None;
        // The relayed command is complete: the client's idle time starts again.
        self.timers.idle = Some(now + self.config.timeouts.idle);
        if reply.code == 421 {
            // The downstream is closing: for our client that is a temporary failure of this
            // command, not of the whole session.
            return self.downstream_failed(now, "downstream sent 421");
        }
        let positive = reply.code / 100 == 2;
        if !positive {
            self.last_failure = Some(if reply.code >= 500 {
                "rejected"
            } else {
                "tempfail"
            });
        }
        self.phase = Phase::Command;
        match pending {
            Pending::Mail => {
                let after_mail = self.tx.as_deref_mut().and_then(|tx| tx.after_mail.take());
                if !positive {
                    if let Some(relay) = self.relay.as_deref_mut() {
                        relay.in_transaction = false;
                    }
                    match self.tx.as_deref_mut() {
                        // The client had its 250 to MAIL locally: the transaction stays, and
                        // the refusal answers the recipient that was waiting for it.
                        Some(tx) if after_mail.is_some() => tx.relayed = false,
                        _ => self.tx = None,
                    }
                } else if let Some(to) = after_mail {
                    let command = format!("RCPT TO:<{to}>\r\n");
                    return self.send_downstream(now, command.as_bytes(), Pending::Rcpt);
                }
                self.relay_reply(reply);
            }
            Pending::Rcpt => {
                if positive && let Some(tx) = self.tx.as_deref_mut() {
                    tx.accepted += 1;
                }
                self.relay_reply(reply);
            }
            Pending::Data if reply.code == 354 => {
                self.reply(Reply::without_enhanced(
                    354,
                    "End data with <CR><LF>.<CR><LF>",
                ));
                self.start_body(now);
            }
            Pending::Data => self.relay_reply(reply),
            Pending::Greylist => {}
            Pending::EndOfData => {
                if positive {
                    self.record_reputation(Event::Delivered);
                    self.msgs += 1;
                    self.rcpts += self.tx.as_deref().map_or(0, |tx| tx.accepted);
                    self.last_failure = None;
                }
                self.tx = None;
                if let Some(relay) = self.relay.as_deref_mut() {
                    relay.in_transaction = false;
                }
                self.relay_reply(reply);
            }
        }
    }

    fn start_body(&mut self, now: Instant) {
        let decoder = DataDecoder::new(
            self.config.limits.bare_newline,
            self.config.limits.max_message_size,
        );
        self.phase = Phase::Data(Box::new(decoder));
        self.timers.data = Some(now + self.config.timeouts.data);
        self.timers.idle = None;
        let trace = Trace {
            helo: self.helo.as_deref().unwrap_or_default(),
            client: self.peer.client.ip(),
            by: &self.config.server.hostname,
            // RFC 3848: the `S` says the message came over TLS.
            with: match (self.esmtp, self.tls) {
                (true, TlsStage::Active(_)) => "ESMTPS",
                (false, TlsStage::Active(_)) => "SMTPS",
                (true, _) => "ESMTP",
                (false, _) => "SMTP",
            },
            at: self.peer.accepted_at + now.saturating_duration_since(self.started),
        };
        if let Some(relay) = self.relay.as_deref_mut() {
            relay.mid_data = true;
            write_received(&trace, &mut relay.outbox);
        }
    }

    /// Sends MAIL for the current transaction, with the parameters the downstream offers.
    fn send_mail(&mut self, now: Instant) {
        let (Some(tx), Some(relay)) = (self.tx.as_deref_mut(), self.relay.as_deref_mut()) else {
            return;
        };
        let mut command = format!("MAIL FROM:<{}>", tx.from);
        let caps = relay.handshake.capabilities();
        if let Some(size) = tx.params.size
            && caps.size
        {
            command.push_str(&format!(" SIZE={size}"));
        }
        match tx.params.body {
            Some(Body::EightBitMime) if caps.eight_bit_mime => command.push_str(" BODY=8BITMIME"),
            Some(Body::SevenBit) if caps.eight_bit_mime => command.push_str(" BODY=7BIT"),
            _ => {}
        }
        if tx.params.smtputf8 && caps.smtputf8 {
            command.push_str(" SMTPUTF8");
        }
        command.push_str("\r\n");
        tx.relayed = true;
        relay.in_transaction = true;
        self.send_downstream(now, command.as_bytes(), Pending::Mail);
    }

    /// Queues a transaction command for the downstream and waits for its reply. Only a ready
    /// connection takes one: without one nothing is written anywhere and the waiting command
    /// gets `451 4.4.2`.
    fn send_downstream(&mut self, now: Instant, command: &[u8], pending: Pending) {
        self.phase = Phase::Waiting(pending);
        let Some(relay) = self.relay.as_deref_mut().filter(|r| r.link == Link::Ready) else {
            return self.downstream_failed(now, "no ready downstream connection");
        };
        relay.outbox.extend_from_slice(command);
        self.timers.downstream = Some(now + self.config.timeouts.command);
    }

    /// The downstream failed (refused, broke, timed out, or said something unexpected): drop
    /// it; the command waiting for it gets `451 4.4.2`, and the transaction is marked broken.
    fn downstream_failed(&mut self, now: Instant, why: &str) {
        self.downstream_failed_with(now, why, downstream_lost());
    }

    /// As `downstream_failed`, answering the waiting command with `reply`.
    fn downstream_failed_with(&mut self, now: Instant, why: &str, reply: Reply) {
        log::debug!("downstream failed for {}: {why}", self.peer.client);
        self.drop_relay();
        match self.phase {
            Phase::Waiting(pending) => {
                self.phase = Phase::Command;
                self.timers.idle = Some(now + self.config.timeouts.idle);
                self.last_failure = Some(if reply.code >= 500 {
                    "rejected"
                } else {
                    "tempfail"
                });
                let announced = self.tx.as_deref().is_some_and(|tx| tx.after_mail.is_some());
                // The reply to the final dot ends the transaction whatever it says (RFC 5321
                // §4.1.1.4): the client's next MAIL starts a new one.
                if (pending == Pending::Mail && !announced) || pending == Pending::EndOfData {
                    self.tx = None;
                } else if let Some(tx) = self.tx.as_deref_mut() {
                    tx.broken = true;
                    tx.after_mail = None;
                }
                self.relay_reply(reply);
            }
            // Mid-body: keep reading it to its end, then answer 451 (see `end_of_data`).
            Phase::Data(_) => {}
            Phase::Command => {
                if let Some(tx) = self.tx.as_deref_mut()
                    && tx.relayed
                {
                    tx.broken = true;
                }
            }
            Phase::Proxy
            | Phase::Admitting
            | Phase::Checking
            | Phase::StartingTls
            | Phase::Closing(_)
            | Phase::Closed(_) => {}
        }
    }

    /// Acts on what the downstream handshake asks for next.
    fn on_handshake_step(&mut self, now: Instant, step: Step) {
        match step {
            Step::Continue => {
                self.timers.downstream = Some(now + self.config.timeouts.command);
            }
            Step::Ready => self.relay_ready(now),
            Step::Failed(reply) => {
                log::warn!(
                    "downstream {} refused the handshake: {} {}",
                    self.relay_server()
                        .map_or_else(String::new, |a| a.to_string()),
                    reply.code,
                    reply.lines.first().map_or("", String::as_str)
                );
                self.downstream_failed(now, "handshake refused");
            }
            Step::AnnouncementRefused(reply) => {
                if let Some(server) = self.relay_server() {
                    warnings::announcement_refused(server, reply.as_ref(), now);
                }
                self.downstream_failed_with(now, "XCLIENT refused", announcement_refused());
            }
            Step::Retire => {
                let server = self.relay.as_ref().map_or(0, |r| r.server);
                if let Some(addr) = self.relay_server() {
                    warnings::connection_retired(addr, self.config.downstream.announce_client, now);
                }
                // A new connection, never a pooled one: that one might be as unfit.
                self.connect(now, server, false, false);
            }
            Step::Refused(reply) => {
                log::info!(
                    "downstream refused the HELO name of {}: {} {}",
                    self.peer.client,
                    reply.code,
                    reply.lines.first().map_or("", String::as_str)
                );
                self.downstream_failed_with(now, "client's HELO refused", reply);
            }
            Step::StartTls => {
                let Some(relay) = self.relay.as_deref_mut() else {
                    return;
                };
                relay.link = Link::StartingTls;
                self.actions.push_back(Action::StartTlsDownstream(relay.id));
                self.timers.downstream = Some(now + self.config.timeouts.command);
            }
            Step::RetryWithoutTls => {
                let Some((server, plain_retry)) =
                    self.relay.as_ref().map(|r| (r.server, r.plain_retry))
                else {
                    return;
                };
                log::info!(
                    "downstream TLS handshake failed for {}; retrying in plain text",
                    self.peer.client
                );
                if plain_retry {
                    self.downstream_failed(now, "TLS retry failed");
                } else {
                    self.connect(now, server, true, false);
                }
            }
            Step::TlsFailed(failure) => {
                log::warn!(
                    "downstream TLS required but failed for {}: {failure}",
                    self.peer.client
                );
                self.downstream_failed_with(now, "TLS required", failure.client_reply());
            }
        }
    }

    /// The TLS handshake towards the downstream failed or stalled.
    fn downstream_tls_failed(&mut self, now: Instant) {
        let step = self.relay.as_deref_mut().and_then(|relay| {
            (relay.link == Link::StartingTls).then(|| relay.handshake.handle_tls_failed())
        });
        match step {
            Some(step) => self.on_handshake_step(now, step),
            None => self.downstream_failed(now, "TLS failure without STARTTLS"),
        }
    }

    /// The handshake is done: MAIL goes out if the client is waiting for it.
    fn relay_ready(&mut self, now: Instant) {
        if let Some(relay) = self.relay.as_deref_mut() {
            relay.link = Link::Ready;
        }
        self.timers.downstream = None;
        if matches!(self.phase, Phase::Waiting(Pending::Mail)) {
            self.send_mail(now);
        }
    }

    /// `mode = "multiplexing"`: hands the downstream back to the pool once no reply is
    /// outstanding and nothing is left to send, so it serves the next transaction, of this
    /// client or another (announced afresh). `abandoned`: the client is gone, and an open
    /// transaction goes along marked for `RSET`; otherwise only a connection with no
    /// transaction open is released. Returns whether it did.
    fn release_relay_if_clean(&mut self, abandoned: bool) -> bool {
        let awaiting = matches!(self.phase, Phase::Waiting(p) if p != Pending::Greylist);
        if self.config.downstream.mode != DownstreamMode::Multiplexing || awaiting {
            return false;
        }
        let Some(relay) = self.relay.as_deref_mut() else {
            return false;
        };
        // RSETs not handed out yet (the client reset, then left): the next user's own RSET
        // does the same, so they need not be sent.
        const RSET: &[u8] = b"RSET\r\n";
        let unsent_resets = abandoned
            && relay.swallow > 0
            && relay.outbox.len() == RSET.len() * relay.swallow as usize
            && relay.outbox.chunks(RSET.len()).all(|chunk| chunk == RSET);
        if unsent_resets {
            relay.outbox.clear();
            relay.swallow = 0;
            relay.in_transaction = true;
        }
        let clean = relay.link == Link::Ready
            && relay.swallow == 0
            && !relay.mid_data
            && relay.outbox.is_empty();
        if !clean || (relay.in_transaction && !abandoned) {
            return false;
        }
        let link = relay.id;
        let carried = relay.handshake.carried(relay.in_transaction);
        self.relay = None;
        self.timers.downstream = None;
        self.actions
            .push_back(Action::ReleaseDownstream { link, carried });
        true
    }

    /// Closes the downstream connection in use: politely (QUIT) once it greeted us, abruptly
    /// (nothing more sent) when a body is half-sent, so the partial message is never
    /// delivered, or when its state is unknown. What was not handed out for it is dropped.
    fn drop_relay(&mut self) {
        self.timers.downstream = None;
        let Some(relay) = self.relay.take() else {
            return;
        };
        let quit = !relay.mid_data && relay.link != Link::Connecting && relay.handshake.may_quit();
        self.actions.push_back(Action::CloseDownstream {
            link: relay.id,
            quit,
        });
    }

    fn reset_transaction(&mut self) {
        self.tx = None;
        if let Some(relay) = self.relay.as_deref_mut()
            && relay.in_transaction
        {
            // Keep the downstream in step; its 250 is read and dropped.
            relay.in_transaction = false;
            relay.swallow += 1;
            relay.outbox.extend_from_slice(b"RSET\r\n");
        }
    }

    /// Bytes waiting in the downstream connection's outbox.
    fn relay_outbox_len(&self) -> usize {
        self.relay.as_deref().map_or(0, |relay| relay.outbox.len())
    }

    // ---- output and closing ----

    /// Answers a client command. A 4xx or 5xx (tarmac's own or the downstream's, relayed)
    /// counts toward `max_errors`; the one that reaches it is followed at once by `421 4.7.0
    /// <hostname> Error: too many errors` and the close. Postfix checks `error_count >=
    /// smtpd_hard_error_limit` before reading the next command, so it says the same after the
    /// same reply; closing here rather than at the next read also closes a client that sends
    /// nothing more, without waiting for its timeout.
    fn reply(&mut self, reply: Reply) {
        let failed = reply.code >= 400;
        self.say(reply);
        if failed {
            self.count_error();
        }
    }

    /// Writes a reply for the client that is no answer to a command (greeting, the close's
    /// `421`), or whose failure is not the client's doing (greylisting): nothing is counted.
    fn say(&mut self, reply: Reply) {
        reply.write_to(&mut self.to_client);
    }

    /// One more junk command (NOOP, RSET, VRFY, HELP, a repeated HELO/EHLO), counted after its
    /// reply as Postfix's smtpd does with `smtpd_junk_command_limit`: past `max_junk_commands`
    /// each one counts as an error toward `max_errors` (Postfix: `if (junk_cmds++ >
    /// limit) error_count++`, per session, forgiven by a delivered message), so the client gets
    /// Postfix's `421 4.7.0 <hostname> Error: too many errors` once errors reach that limit,
    /// not a reply of its own. Without this a client could hold its session, and the downstream
    /// connection it opened, for ever with a NOOP every few minutes. One difference: Postfix's
    /// post-increment lets one more junk command through than its limit says; here the first
    /// one past `max_junk_commands` counts.
    fn count_junk(&mut self) {
        if self.is_closed() {
            return;
        }
        let strikes = self.strikes.current(self.msgs);
        strikes.junk += 1;
        if strikes.junk > self.config.limits.max_junk_commands {
            self.count_error();
        }
    }

    /// One more error against `max_errors` (see [`Session::reply`]).
    fn count_error(&mut self) {
        if self.is_closed() {
            return;
        }
        let strikes = self.strikes.current(self.msgs);
        strikes.errors += 1;
        if strikes.errors >= self.config.limits.max_errors {
            log::info!(
                "too many errors from {}: {} since its last delivered message",
                self.peer.client,
                strikes.errors
            );
            self.last_failure = Some("too-many-errors");
            // As over `max_unknown_commands`: a client that piles up errors (a dictionary
            // attack on recipients, a NOOP flood) is abusing the protocol.
            self.record_reputation(Event::ProtocolAbuse);
            let reply = too_many_errors(&self.config.server.hostname);
            self.close(CloseReason::TooManyErrors, Some(reply));
        }
    }

    /// A downstream reply goes back to the client as it came, with an enhanced code added
    /// when the downstream gave none (every tarmac reply carries one, RFC 3463).
    fn relay_reply(&mut self, mut reply: Reply) {
        if reply.enhanced.is_none() && reply.code != 354 {
            let class = u8::try_from(reply.code / 100).unwrap_or(4);
            reply.enhanced = Some(EnhancedCode(class, 0, 0));
        }
        self.reply(reply);
    }

    fn check_shutdown(&mut self, _now: Instant) {
        if self.shutting_down
            && !self.is_closed()
            && matches!(self.phase, Phase::Command)
            && self.tx.is_none()
            && self.line.is_empty()
        {
            self.close_for_shutdown();
        }
    }

    fn close_for_shutdown(&mut self) {
        // No tarpit for the goodbye: shutting down is bounded by the drain time.
        self.leave_tarpit();
        let text = format!(
            "{} Service shutting down, please try again later",
            self.config.server.hostname
        );
        self.close(CloseReason::Shutdown, Some(Reply::new(421, "4.3.2", text)));
    }

    /// Ends tarpitting: what is held goes out at once, whole, ahead of anything newer, so the
    /// client reads complete lines.
    fn leave_tarpit(&mut self) {
        if let Some(mut tarpit) = self.tarpit.take() {
            let mut held = Vec::new();
            tarpit.release_all(&mut held);
            held.append(&mut self.to_client);
            self.to_client = held;
        }
    }

    /// Once the `220 Ready to start TLS` is all handed out (a tarpit may have held it), asks
    /// the driver for the handshake, which must be done within `timeouts.command`.
    fn start_tls_when_announced(&mut self, now: Instant) {
        let held = self.tarpit.as_deref().is_some_and(Tarpit::is_holding);
        if self.tls == TlsStage::Requested
            && !self.is_closed()
            && self.to_client.is_empty()
            && !held
        {
            self.tls = TlsStage::Handshaking;
            self.timers.command = Some(now + self.command_timeout());
            self.actions.push_back(Action::StartTls);
        }
    }

    /// Enters the sticky closed state: final reply queued, downstream dropped, `Close` once.
    /// While a handshake is due or running, no reply: the client expects TLS records.
    fn close(&mut self, reason: CloseReason, reply: Option<Reply>) {
        if self.is_closed() {
            return;
        }
        if let Some(reply) = reply.filter(|_| !matches!(self.phase, Phase::StartingTls)) {
            self.say(reply);
        }
        if !self.release_relay_if_clean(true) {
            self.drop_relay();
        }
        self.phase = Phase::Closed(reason);
        self.timers = Timers::default();
        self.line = Vec::new();
        if reason == CloseReason::Disconnect {
            // Nobody is left to read what the tarpit holds.
            if let Some(tarpit) = self.tarpit.as_deref_mut() {
                tarpit.discard();
            }
            self.to_client.clear();
        } else if self.is_holding() {
            // The last reply goes out on its schedule; `poll_transmit` sends `Close` after it.
            self.phase = Phase::Closing(reason);
            return;
        }
        self.actions.push_back(Action::Close);
    }
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

/// Who the client is, for XCLIENT and PROXY (a free function so it borrows fields, not `self`).
fn identity<'a>(
    peer: &Peer,
    helo: Option<&'a [u8]>,
    esmtp: bool,
    checks: &'a Checks,
) -> ClientIdentity<'a> {
    ClientIdentity {
        client: peer.client,
        local: peer.local,
        helo: helo.unwrap_or_default(),
        esmtp,
        name: checks.xclient_name(),
    }
}

/// The refusal for a client over a connection cap (DESIGN.md §1.1), whether the driver gives
/// it at accept, before any session exists, or the session after a PROXY header.
pub fn too_many_connections(hostname: &str) -> Reply {
    let text = format!("{hostname} Too many connections, try again later");
    Reply::new(421, "4.7.0", text)
}

/// Moves `buf` into `out`, freeing a large buffer so an idle session stays small.
fn hand_out(buf: &mut Vec<u8>, out: &mut Vec<u8>) {
    out.extend_from_slice(buf);
    buf.clear();
    if buf.capacity() > KEEP_CAPACITY {
        *buf = Vec::new();
    }
}

/// The reply that closes a session over `max_unknown_commands` or `max_errors` (Postfix's
/// wording for its hard error limit).
fn too_many_errors(hostname: &str) -> Reply {
    let text = format!("{hostname} Error: too many errors");
    Reply::new(421, "4.7.0", text)
}

fn downstream_lost() -> Reply {
    Reply::new(
        451,
        "4.4.2",
        "Error: downstream server unavailable, please try again later",
    )
}

#[cfg(test)]
mod tests;
