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
//! An `Action::Ask` that expects an answer is answered through `handle_answer`, at once (in
//! the same drain of `poll_action`) or later; either way the driver drains again afterwards.
//!
//! # Layout
//! - `mod.rs`: the [`Session`] type, its public API, its phases and timers.
//! - `interface.rs`: [`Peer`], [`Action`], [`Shutdown`], [`Report`].
//! - `framing.rs`: the line and PROXY-header readers the phase picks.
//! - `greeting.rs`: admission, checks, greet pause, pregreet, verdict, tarpit entry, rules.
//! - `commands.rs`: client commands up to the downstream; greylisting a recipient.
//! - `relaying.rs`: the session's side of the downstream (`crate::downstream::relay`).
//! - `closing.rs`: replies, the error and junk-command counts, the sticky close.
//!
//! Screening decisions are `crate::policy::screening` calls; questions and answers are
//! `crate::smtp::question`'s.
//!
//! # Lifecycle
//! ```text
//! [[Proxy ──header──▶] Admitting ──▶] Checking ──answers or dns.timeout──▶ verdict ──▶ Command
//! Command ──MAIL/RCPT/DATA──▶ Waiting(pending) ──downstream reply──▶ Command
//!                              Waiting(Data) ──354──▶ Data ──CRLF.CRLF──▶ Waiting(EndOfData)
//! Command ──STARTTLS──▶ StartingTls ──handle_tls_established──▶ Command (before EHLO again)
//! any ──QUIT / EOF / timeout / too many errors / shutdown / TLS failure──▶ Closed (sticky)
//!                                      (Closing first while the tarpit holds the last reply)
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
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::content::edit::Outgoing;
use crate::downstream::health::Health;
use crate::downstream::relay::Relay;
use crate::policy::screening::{Checks, ReputationMarks};
use crate::smtp::data::DataDecoder;
use crate::smtp::question::{Answer, Question};
use crate::smtp::reply::Reply;
use crate::smtp::tarpit::Tarpit;

mod closing;
mod commands;
mod framing;
mod greeting;
mod interface;
mod relaying;
mod scanning;

pub use crate::downstream::relay::{DownstreamEvent, LinkId, Via};
use closing::{CloseReason, Strikes};
pub use closing::{loop_refusal, too_many_connections};
use commands::{Pending, Transaction};
use framing::{LineReceiver, ProxyReceiver};
use greeting::{Awaiting, Blocked, GreetPause};
pub use interface::{Action, CommandStage, Peer, Refusals, Report, Shutdown, Side, TlsVersion};

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

/// Command timeout in stress mode (postscreen's `smtpd_timeout` under stress: 10 s).
const STRESS_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the dialog with the client stands.
#[derive(Debug)]
enum Phase {
    /// A client from `proxy_protocol_from`: its PROXY header comes before the banner.
    Proxy(ProxyReceiver),
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
    /// Reading a message body: streaming it to the downstream, or holding it for the
    /// scanners (`Scanning::is_holding`).
    Data(Box<DataDecoder>),
    /// Feeding a scanned message to the downstream (after its `354`); the client waits for
    /// its final reply.
    Forwarding(Box<Outgoing>),
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

/// One timer per kind; `poll_timeout` is the earliest of these, the relay's deadline (the
/// downstream connect or reply, kept with the connection: `Relay::poll_timeout`) and the
/// tarpit's next release.
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
    /// Fires when the DNS answers are not all in within `[dns] timeout`.
    lookup: Option<Instant>,
    /// Fires when the greet pause is over.
    greet: Option<Instant>,
}

impl Timers {
    /// The earliest deadline that can fire in `phase`: exactly the timers `handle_timeout`
    /// acts on there, so a deadline that is due is never reported without being handled (the
    /// driver would wake at once, again and again).
    /// While a tarpitted reply is `holding`, the client owes us nothing: its timers wait. The
    /// relay's deadline (`downstream`) runs in every phase; the held downstream session's
    /// NOOP (`keepalive`) while a message is held or scanned.
    fn earliest(
        &self,
        phase: &Phase,
        holding: bool,
        downstream: Option<Instant>,
        keepalive: Option<Instant>,
    ) -> Option<Instant> {
        let client = match phase {
            Phase::Command if holding => [None, None],
            Phase::Command => [self.command, self.idle],
            Phase::Proxy(_) | Phase::StartingTls => [self.command, None],
            Phase::Checking => [self.lookup, self.greet],
            Phase::Admitting => [None, None],
            Phase::Data(_) => [self.data, keepalive],
            Phase::Forwarding(_) => [self.data, None],
            Phase::Waiting(Pending::Scan) => [keepalive, None],
            Phase::Waiting(_) | Phase::Closing(_) | Phase::Closed(_) => [None, None],
        };
        client.into_iter().chain([downstream]).flatten().min()
    }
}

/// Whether the session must read a PROXY header first: the peer is a listed balancer, on a
/// plain listener. A transparent session's client is the packet's source, so a header from it
/// is a stray one (it would otherwise name the address `spoof_source` connects from).
fn expects_proxy_header(config: &Config, peer: &Peer) -> bool {
    !peer.transparent && config.server.expects_proxy_header(peer.client.ip())
}

fn expired(timer: Option<Instant>, now: Instant) -> bool {
    timer.is_some_and(|at| at <= now)
}

/// One client connection's SMTP state.
#[derive(Debug)]
pub struct Session {
    config: Arc<Config>,
    peer: Peer,
    started: Instant,
    phase: Phase,
    /// Command lines being assembled (bounded by `max_line_length`).
    lines: LineReceiver,
    to_client: Vec<u8>,
    actions: VecDeque<Action>,
    timers: Timers,
    helo: Option<Box<[u8]>>,
    esmtp: bool,
    tx: Option<Box<Transaction>>,
    /// The downstream connection, if any, and the id of the next one.
    relay: Relay,
    /// The downstream servers' health, shared with every other session (DESIGN.md §8);
    /// `None` until the driver gives it ([`Session::set_health`]).
    health: Option<Arc<Health>>,
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
    /// The reputation or the tarpit place the session waits for, if any.
    awaiting: Awaiting,
    /// Which events went to the client's reputation (one bad mark, one greylist pass).
    marks: ReputationMarks,
    /// What a pregreet talker sent first (at most [`PREGREET_KEEP`] bytes).
    pregreet: Option<Box<[u8]>>,
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
    /// The command the next reply answers, and the refusals so far by stage (metrics).
    answering: CommandStage,
    refusals: Refusals,
    /// Content inspection: the milters' conversation, the held message (DESIGN.md §7). Boxed
    /// and made on first use: a session without scanners pays one pointer.
    scan: Option<Box<scanning::Scanning>>,
}

impl Session {
    /// A new session for an accepted connection; queues the banner, or waits for the PROXY
    /// header first when the peer is a listed load balancer.
    pub fn new(config: Arc<Config>, peer: Peer, now: Instant) -> Session {
        if expects_proxy_header(&config, &peer) {
            let mut session =
                Session::unstarted(config, peer, now, Phase::Proxy(ProxyReceiver::default()));
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
        if expects_proxy_header(&config, &peer) {
            return Session::new(config, peer, now);
        }
        let mut session = Session::unstarted(config, peer, now, Phase::Admitting);
        session
            .actions
            .push_back(Action::Ask(Question::Admit(peer.client)));
        session
    }

    /// Shares the downstream servers' health table (DESIGN.md §8) with this session: its
    /// connections skip servers found down and report what they find. Without one, the
    /// servers are tried in order at every MAIL and nothing is remembered.
    pub fn set_health(&mut self, health: Arc<Health>) {
        self.health = Some(health);
    }

    /// Whether the connection came through a transparent listener (DESIGN.md §9): its
    /// downstream is the client's original destination, not one of `[downstream] servers`.
    pub fn is_transparent(&self) -> bool {
        self.peer.transparent
    }

    /// A session in `phase` with nothing started.
    fn unstarted(config: Arc<Config>, peer: Peer, now: Instant, phase: Phase) -> Session {
        Session {
            peer,
            started: now,
            phase,
            lines: LineReceiver::default(),
            to_client: Vec::new(),
            actions: VecDeque::new(),
            timers: Timers {
                idle: Some(now + config.timeouts.idle),
                ..Timers::default()
            },
            helo: None,
            esmtp: false,
            tx: None,
            relay: Relay::default(),
            health: None,
            protocol_errors: 0,
            strikes: Strikes::default(),
            msgs: 0,
            rcpts: 0,
            last_failure: None,
            shutting_down: false,
            checks: Checks::new(),
            blocked: None,
            pause: GreetPause::Skipped,
            awaiting: Awaiting::Nothing,
            marks: ReputationMarks::default(),
            pregreet: None,
            tarpit: None,
            pending_config: None,
            rule: None,
            greylisted: "-",
            forced_greylist: false,
            scan: None,
            answering: CommandStage::Other,
            refusals: Refusals::default(),
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
            let holding_message = self.is_holding_message();
            let relay_outbox = self.relay.outbox_len();
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
                    0 if !self.lines.is_discarding() => break,
                    used => used,
                },
                Phase::Proxy(_) => self.read_proxy_header(now, rest),
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
                Phase::Data(_) if holding_message => {
                    let Some(decoded) = self.hold_body(rest) else {
                        break;
                    };
                    self.timers.data = Some(now + self.config.timeouts.data);
                    if decoded.done {
                        self.end_of_data(now);
                    }
                    decoded.consumed
                }
                Phase::Forwarding(_) => break,
                Phase::Data(_) if relay_full => break,
                Phase::Data(decoder) => {
                    // `bare_newline = "normalize"` at most doubles what it decodes (a bare LF
                    // becomes CRLF): take only what fits under the cap even then.
                    let room = DOWNSTREAM_OUTBOX_CAP
                        .saturating_sub(relay_outbox)
                        .div_ceil(2);
                    let rest = rest.get(..room).unwrap_or(rest);
                    let decoded = match self.relay.body() {
                        Some(outbox) => decoder.decode(rest, outbox),
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

    /// Handles every timer that has expired at `now`; a no-op when called early.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        self.relay_timeout(now);
        if matches!(self.phase, Phase::Data(_) | Phase::Waiting(Pending::Scan)) {
            self.keep_downstream_alive(now);
        }
        let client_late = match self.phase {
            Phase::Data(_) => expired(self.timers.data, now),
            Phase::Forwarding(_) => {
                if expired(self.timers.data, now) {
                    // The downstream stopped taking the message.
                    self.downstream_failed(now, "timeout");
                }
                false
            }
            Phase::Command if self.is_holding() => false,
            Phase::Command => expired(self.timers.command, now) || expired(self.timers.idle, now),
            Phase::Proxy(_) if expired(self.timers.command, now) => {
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
            Phase::Proxy(_)
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
            Answer::Milter(verdict) => self.on_milter(now, verdict),
            Answer::Scanned(scanned) => self.on_scanned(now, *scanned),
        }
    }

    /// SIGHUP put a new configuration in force. The session takes it at its next decision
    /// (the next command, or the start of its checks after a PROXY header), not mid-command,
    /// so a reply or a check in progress finishes under the rules it started with.
    pub fn handle_reload(&mut self, config: Arc<Config>) {
        self.pending_config = Some(config);
    }

    /// The TLS handshake `Action::StartTls` started is done (RFC 3207 §4.2): the session starts
    /// over before EHLO, forgetting the HELO name and anything else the client said in plain
    /// text, and no longer offers STARTTLS. Ignored unless a handshake was asked for.
    /// `cipher` is the suite's IANA name, when the driver knows it (for the scanners).
    pub fn handle_tls_established(
        &mut self,
        now: Instant,
        version: TlsVersion,
        cipher: Option<&'static str>,
    ) {
        if self.tls != TlsStage::Handshaking || !matches!(self.phase, Phase::StartingTls) {
            return;
        }
        self.tls = TlsStage::Active(version);
        if self.config.content.scans() {
            self.scan_mut().tls_cipher = cipher;
        }
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
    /// A scanned message is fed to the connection here, as it drains.
    pub fn poll_transmit_downstream(&mut self, now: Instant, link: LinkId, out: &mut Vec<u8>) {
        if matches!(self.phase, Phase::Forwarding(_)) && self.relay.is_current(link) {
            self.forward(now);
        }
        self.relay.poll_transmit(link, out);
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
        let downstream = self.relay.poll_timeout();
        [
            self.timers
                .earliest(&self.phase, holding, downstream, self.keepalive()),
            release,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether the session takes client bytes now (false while a reply is pending from the
    /// downstream, while its outboxes are full, or once closed).
    pub fn wants_read(&self) -> bool {
        match self.phase {
            Phase::Command => self.to_client.len() < CLIENT_OUTBOX_CAP && !self.is_holding(),
            Phase::Proxy(_) => self.to_client.len() < CLIENT_OUTBOX_CAP,
            // Read until the first pregreet byte: talking first is what is watched for here.
            Phase::Checking => self.pregreet.is_none(),
            Phase::Data(_) => {
                self.is_holding_message() || self.relay.outbox_len() < DOWNSTREAM_OUTBOX_CAP
            }
            // Until the switch, bytes are taken only to be discarded; during the handshake the
            // driver has no plaintext to offer.
            Phase::StartingTls => self.tls == TlsStage::Requested,
            Phase::Waiting(_)
            | Phase::Forwarding(_)
            | Phase::Admitting
            | Phase::Closing(_)
            | Phase::Closed(_) => false,
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
        } else if self.scan.as_deref().is_some_and(|scan| scan.discarded > 0)
            && self.last_failure.is_none()
        {
            "discarded"
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
            dst: self.peer.transparent.then_some(self.peer.local),
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
            refusals: self.refusals,
            scan: self
                .scan
                .as_deref()
                .map(|scan| scan.marks.as_str())
                .filter(|marks| !marks.is_empty())
                .unwrap_or("-"),
            result,
        }
    }

    /// Whether the session is closed (its final bytes may still be in the outbox).
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closing(_) | Phase::Closed(_))
    }

    // ---- client side ----

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

    // ---- output and closing ----

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
}

/// Moves `buf` into `out`, freeing a large buffer so an idle session stays small.
fn hand_out(buf: &mut Vec<u8>, out: &mut Vec<u8>) {
    out.extend_from_slice(buf);
    buf.clear();
    if buf.capacity() > KEEP_CAPACITY {
        *buf = Vec::new();
    }
}

#[cfg(test)]
mod buffer_tests;
