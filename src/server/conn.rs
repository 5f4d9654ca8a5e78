//! One client connection: its two [`Leg`]s (the client's socket and, while relaying, the
//! downstream's), and the drive cycle that moves bytes between them and the sans-IO [`Session`]
//! (STYLE.md §1.2). Socket work (reads, writes, readiness, TLS records) is the legs'
//! (`leg.rs`); this module decides when each happens and what the session is told.
//!
//! Backpressure chain: the session's `wants_read()` gates client reads; unconsumed client bytes
//! wait in the leg's `input`, which stops reads at [`COMMAND_INPUT`] outside a message body and
//! at [`READ_CHUNK`] + `max_line_length` in one; more output is pulled from `poll_transmit`
//! only while the leg's outbox is under [`CLIENT_OUTBOX_HIGH`] (client) or [`OUTBOX_HIGH`]
//! (downstream). A client that does not read its replies therefore stops being read: its
//! replies fill the socket, then this outbox, then the session's (`CLIENT_OUTBOX_CAP`), and
//! the session takes no more commands. Every buffer is bounded (DESIGN.md §6.1 "Memory":
//! 16 KB for a connection that relays nothing, 160 KB for one relaying a body; `bench/memory.rs`
//! measures it), and an empty one gives its memory back when it grew large
//! ([`Leg::shrink_idle`]), so an idle connection costs its struct, its session and its sockets.
//!
//! TLS: on `Action::StartTls` the client leg gets a TLS layer ([`Leg::start_tls`]), with what
//! was already handed out (the `220`) as its plain-text preamble; bytes read before the switch
//! and not yet consumed are dropped (CVE-2011-0411). From then on reads are socket → rustls →
//! decrypted input → session, gated by rustls' `wants_read` (the handshake needs reading
//! whatever the session wants) and, for the decrypted input, by the session's `wants_read` and
//! the `input` bound; writes are outbox → rustls → socket while rustls `wants_write`. rustls'
//! own buffers are bounded (`tls_stream.rs`). The downstream leg switches the same way on
//! `Action::StartTlsDownstream`. A TLS failure closes only this connection; a connection that
//! ends mid-handshake (garbage, an alert, the command timeout, a hang-up) puts its client on
//! the worker's [`TlsFailures`] record, and STARTTLS is not offered to it for an hour.
//!
//! Closing is two steps: [`Conn::drive`] returns [`Next::Close`] once the connection is done
//! (session closed and flushed, the client gone, or the flush deadline passed); the worker then
//! calls [`Conn::close`] after the event batch, which deregisters, shuts down and writes the one
//! close log line.

use std::io;
use std::net::{Shutdown as NetShutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Registry;
use mio::event::Event;
use mio::net::TcpStream;

use super::close_log::{self, ConnId};
pub(crate) use super::leg::READ_CHUNK;
use super::leg::{Eof, Leg};
use super::limits::{LimitGuard, Refusal};
use super::load::TarpitGuard;
use super::shared::Shared;
use super::slab::ConnKey;
use super::tls_failures::{TlsFailures, WITHHOLD_FOR};
use super::tls_stream::TlsFailure;
use super::token;
use crate::config::Config;
use crate::dns::{ResolverHandle, Waiter};
use crate::downstream::connect;
use crate::downstream::dialog::Carried;
use crate::downstream::pool::{Idle, Pool, Pooled, Ticket};
use crate::smtp::question::{LookupAnswer, Query};
use crate::smtp::{
    Action, Answer, DownstreamEvent, LinkId, Question, Session, Shutdown, Side, TlsVersion,
};
use crate::state::{StateAnswer, StateOp, Waiter as StateWaiter};

/// Pending bytes for the downstream before `poll_transmit_downstream` is left alone: a
/// downstream that stops reading mid-body holds at most this (plus one pull) here, and the
/// session keeps at most its own cap and stops reading the client. Two 16 KiB reads' worth
/// keeps a body streaming while the socket drains; 64 KiB (as before) only cost memory.
const OUTBOX_HIGH: usize = 32 * 1024;

/// Pending reply bytes for the client before `poll_transmit(Client)` is left alone: a client
/// that does not read its replies holds at most this (plus one pull) here, the session about as
/// much (`CLIENT_OUTBOX_CAP`), and then it is no longer read. The kernel's socket buffer is the
/// real buffer for replies; 1 KiB is a dozen of them, enough for any legitimate pipelining.
const CLIENT_OUTBOX_HIGH: usize = 1024;

/// Client bytes read and kept at most while the session is not in a message body: pipelined
/// commands are answered one by one and a client that reads no replies must not make us hold
/// its backlog (DESIGN.md §6.1). The session keeps a partial line itself, so this need not hold
/// a whole one; a body is read [`READ_CHUNK`] at a time for throughput.
const COMMAND_INPUT: usize = 1024;

/// Longest a closing connection may take to flush its last bytes to a client that does not
/// read; then it is dropped with them.
pub(crate) const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Most bytes read and discarded from a client at close, so a client that sent a little more
/// than was read gets a FIN after our last reply rather than an RST that may destroy it.
const CLOSE_DRAIN: usize = 64 * 1024;

/// A worker's pool of idle downstream legs, with the sessions waiting in its line.
pub(crate) type DownstreamPool = Pool<Leg, ConnKey>;

/// What the worker does with a connection after driving it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Still open.
    Keep,
    /// Done: close it after this event batch.
    Close,
}

/// Per-turn context the worker lends to its connections, built once per turn.
pub(crate) struct Io<'a> {
    /// For registering a downstream socket and deregistering sockets.
    pub(crate) registry: &'a Registry,
    /// The worker's read buffer, [`READ_CHUNK`] bytes.
    pub(crate) scratch: &'a mut [u8],
    /// Unconsumed input (per socket) at which reading stops: [`READ_CHUNK`] + `max_line_length`,
    /// so the session can always see one whole line after a full read. The client's input
    /// outside a message body stops at [`COMMAND_INPUT`] instead.
    pub(crate) max_input: usize,
    /// The worker's downstream pool (used in `mode = "multiplexing"`).
    pub(crate) pool: &'a mut DownstreamPool,
    /// `[downstream] mode = "multiplexing"`.
    pub(crate) multiplexing: bool,
    /// The resolver, when the config needs lookups.
    pub(crate) resolver: Option<&'a ResolverHandle>,
    /// This worker's index, for the resolver to send answers back.
    pub(crate) worker: usize,
    /// This worker's index for the state thread (`[state] backend = "redis"`).
    pub(crate) state_worker: usize,
    /// Tarpit places, the state front (PASS cache, greylist, reputation, rates) and the
    /// clients whose TLS handshake failed.
    pub(crate) shared: &'a Shared,
    /// The configuration in force: the one every session holds, since a reload hands it to
    /// each before any of them is driven (`Worker::follow_reload`).
    pub(crate) config: &'a Config,
}

/// A client connection and, while relaying, its downstream connection.
#[derive(Debug)]
pub(crate) struct Conn {
    id: ConnId,
    client: Leg,
    /// The client socket failed (reset, write error): nothing more is read or written.
    broken: bool,
    /// Boxed: most connections never get one, so they don't pay for its size.
    downstream: Option<Box<DownstreamConn>>,
    /// Multiplexing: the session waits in the pool's line for a connection to this server,
    /// to become this link.
    awaiting_pool: Option<(SocketAddr, LinkId)>,
    session: Session,
    /// The deadline this connection has in the worker's timer heap (see `timer.rs`).
    pub(crate) armed: Option<Instant>,
    /// On the worker's pending or ready list (keeps each list free of duplicates).
    pub(crate) queued: bool,
    accepted: Instant,
    /// Set when the connection started closing: the flush deadline.
    close_by: Option<Instant>,
    /// Released when the connection is dropped.
    guard: LimitGuard,
    /// A tarpit place (`max_tarpitted`), held while the session is tarpitted.
    tarpit_place: Option<TarpitGuard>,
}

/// The downstream connection: its leg and what the session and the pool know it by.
#[derive(Debug)]
struct DownstreamConn {
    /// The session's name for this connection: only its bytes and events are this one's.
    link: LinkId,
    leg: Leg,
    /// The server it is connected to (the pool's key).
    addr: SocketAddr,
    /// Multiplexing: this connection's place in the pool.
    ticket: Option<Ticket>,
    /// The nonblocking connect has not finished.
    connecting: bool,
}

impl Conn {
    /// A freshly accepted connection (see [`Leg::connected`] for its readiness).
    pub(crate) fn new(
        id: ConnId,
        client: TcpStream,
        session: Session,
        now: Instant,
        guard: LimitGuard,
    ) -> Conn {
        Conn {
            id,
            client: Leg::connected(client, None),
            broken: false,
            downstream: None,
            awaiting_pool: None,
            session,
            armed: None,
            queued: false,
            accepted: now,
            close_by: None,
            guard,
            tarpit_place: None,
        }
    }

    /// Registers the client socket under `key`'s token.
    pub(crate) fn register(&mut self, registry: &Registry, key: ConnKey) -> io::Result<()> {
        self.client
            .register(registry, token::conn(key, Side::Client))
    }

    /// Records the readiness in `event` for the socket on `side`.
    pub(crate) fn on_event(&mut self, side: Side, event: &Event) {
        match side {
            Side::Client => self.client.on_event(event),
            Side::Downstream => {
                if let Some(ds) = self.downstream.as_deref_mut() {
                    ds.leg.on_event(event);
                }
            }
        }
    }

    /// One of the session's timers may have expired (the session ignores an early call), or
    /// the flush deadline passed (the next [`Conn::drive`] closes then).
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
    }

    /// A DNS answer the connection waited for.
    pub(crate) fn handle_lookup(&mut self, now: Instant, query: Query, answer: LookupAnswer) {
        self.session
            .handle_answer(now, Answer::Lookup(query, answer));
    }

    /// A state answer the connection waited for (the Redis backend's, or its fallback's).
    pub(crate) fn handle_state(&mut self, now: Instant, answer: StateAnswer) {
        let answer = match answer {
            StateAnswer::Pass(fresh) => Answer::Pass(fresh),
            StateAnswer::Greylist(outcome) => Answer::Greylist(outcome),
            StateAnswer::Reputation(history) => Answer::Reputation(history),
            StateAnswer::Rate { ip, verdict } => {
                // Rates first, then the per-IP cap, as at accept.
                let admitted = match verdict
                    .map_err(Refusal::Rate)
                    .and_then(|()| self.guard.rekey(ip))
                {
                    Ok(()) => true,
                    Err(refusal) => {
                        log::info!(
                            "refused connection from {}: {refusal}",
                            self.session.report().client
                        );
                        false
                    }
                };
                Answer::Admission(admitted)
            }
        };
        self.session.handle_answer(now, answer);
    }

    /// A reloaded configuration, for the session's next decision.
    pub(crate) fn handle_reload(&mut self, _now: Instant, config: Arc<Config>) {
        self.session.handle_reload(config);
    }

    /// The server entered or left stress mode.
    pub(crate) fn handle_stress(&mut self, now: Instant, stressed: bool) {
        self.session.handle_stress(now, stressed);
    }

    /// Passes SIGTERM/SIGINT on to the session.
    pub(crate) fn handle_shutdown(&mut self, now: Instant, how: Shutdown) {
        self.session.handle_shutdown(now, how);
    }

    /// The drive cycle: read what the socket flags and the backpressure chain allow (one
    /// bounded read per socket), settle a pending downstream connect, then pass bytes, actions
    /// and writes around until nothing moves.
    pub(crate) fn drive(&mut self, key: ConnKey, now: Instant, io: &mut Io<'_>) -> Next {
        self.read_client(now, io);
        self.settle_connect(now);
        self.read_downstream(now, io);
        loop {
            let mut moved = self.offer_client_input(now);
            moved |= self.offer_downstream_input(now);
            moved |= self.transmit(now);
            moved |= self.run_actions(key, now, io);
            moved |= self.write_client(now);
            moved |= self.write_downstream(now);
            if !moved {
                break;
            }
        }
        self.client.shrink_idle();
        if let Some(ds) = self.downstream.as_deref_mut() {
            ds.leg.shrink_idle();
        }
        if self.broken {
            return Next::Close;
        }
        match self.close_by {
            Some(by) if self.client.is_flushed() || now >= by => Next::Close,
            _ => Next::Keep,
        }
    }

    /// When the worker must wake this connection: the session's next deadline or, while
    /// closing, the flush deadline, whichever comes first.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        match (self.session.poll_timeout(), self.close_by) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a socket is still readable and may be read: the connection goes on the ready
    /// list, served first next turn (bounded work per turn).
    pub(crate) fn wants_another_turn(&self, max_input: usize) -> bool {
        self.may_read_client(max_input)
            || self
                .downstream
                .as_deref()
                .is_some_and(|ds| ds.may_read(max_input))
    }

    /// Second step of closing: drop the downstream, stop sending to the client (FIN after
    /// whatever was written), read away a little unread input so the kernel does not answer it
    /// with an RST, and write the close log line. Sockets are not deregistered: closing them
    /// takes them out of the poll set.
    pub(crate) fn close(mut self, now: Instant, io: &mut Io<'_>) {
        if self.client.is_handshaking() {
            // Whatever ended it (garbage, an alert, the timeout, a hang-up), this client cannot
            // do TLS with us now: its next connections are not offered STARTTLS. Recorded
            // before the FIN, so a client that reconnects as soon as it sees it is covered.
            let report = self.session.report();
            remember_failed_handshake(&io.shared.tls_failures, report.client, report.result, now);
        }
        self.downstream = None;
        if !self.broken {
            // Over TLS a clean end, best effort: the client knows no truncation happened. What
            // the flush deadline left in the outbox stays unsent.
            self.client.outbox = Vec::new();
            self.client.write_last();
            // Unread input at close makes the kernel send an RST, which may destroy our last
            // reply before the client reads it. A leg whose last read found it drained (and
            // which no event marked readable since) has none: then the close alone sends the
            // FIN, with no shutdown and no read that would only say `WouldBlock`.
            if self.client.is_readable() {
                // Errors only mean the socket is already gone; the fd is closed on drop.
                let stream = self.client.stream();
                let _ = stream.shutdown(NetShutdown::Write);
                let mut drained = 0;
                while drained < CLOSE_DRAIN {
                    match io::Read::read(&mut &*stream, io.scratch) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => drained += n,
                    }
                }
            }
        }
        close_log::log_close(
            self.id,
            &self.session.report(),
            now.saturating_duration_since(self.accepted),
        );
    }

    /// The connection's id for logs.
    pub(crate) fn id(&self) -> ConnId {
        self.id
    }

    /// How many client bytes `input` may hold: [`COMMAND_INPUT`] outside a body, `max_input` in
    /// one.
    fn client_input_cap(&self, max_input: usize) -> usize {
        if self.session.is_in_body() {
            max_input
        } else {
            COMMAND_INPUT
        }
    }

    /// The part of the scratch buffer the next client read may fill, so `input` stays within
    /// [`Conn::client_input_cap`] whatever the session leaves of it.
    fn client_read_len(&self, max_input: usize, scratch: usize) -> usize {
        let cap = self.client_input_cap(max_input);
        cap.saturating_sub(self.client.input.len()).min(scratch)
    }

    /// Whether the client leg is still read at all: not failed, its end not seen, not closing.
    fn client_open(&self) -> bool {
        !self.broken && self.client.eof() == Eof::Open && self.close_by.is_none()
    }

    /// Whether the client leg should be read now: the socket when rustls wants it (the
    /// handshake reads whatever the session wants); input when the session takes it.
    fn may_read_client(&self, max_input: usize) -> bool {
        let session_reads =
            self.client.input.len() < self.client_input_cap(max_input) && self.session.wants_read();
        self.client_open()
            && (self.client.wants_fill() || (self.client.can_read() && session_reads))
    }

    /// Over TLS first the records rustls wants and the end of the handshake to the session;
    /// then one read of at most [`READ_CHUNK`] bytes of input, fed to the session at once when
    /// nothing older is waiting.
    fn read_client(&mut self, now: Instant, io: &mut Io<'_>) {
        if !self.client_open() {
            return;
        }
        match self.client.fill() {
            Ok(None) => {}
            Ok(Some(version)) => {
                let suite = self.client.cipher_suite();
                let Some(version) = tls_version(version) else {
                    let error = rustls::Error::General(format!("unexpected version {version:?}"));
                    return self.fail_tls(now, &error);
                };
                log::debug!(
                    "conn={} TLS established with {}: {} {suite:?}",
                    self.id,
                    self.session.report().client,
                    version.as_str()
                );
                self.session.handle_tls_established(now, version);
            }
            Err(TlsFailure::Io(e)) => {
                log::debug!("conn={} client read failed: {e}", self.id);
                return self.fail_client(now);
            }
            Err(TlsFailure::Tls(e)) => return self.fail_tls(now, &e),
        }
        let len = self.client_read_len(io.max_input, io.scratch.len());
        if len == 0 || !self.client.can_read() || !self.session.wants_read() {
            return;
        }
        let buf = io.scratch.get_mut(..len).unwrap_or_default();
        match self.client.read(buf) {
            Ok(0) => {}
            Ok(n) => {
                let bytes = buf.get(..n).unwrap_or_default();
                let session = &mut self.session;
                self.client
                    .feed(bytes, |bytes| session.handle_client_data(now, bytes));
            }
            Err(e) => {
                log::debug!("conn={} client read failed: {e}", self.id);
                self.fail_client(now);
            }
        }
    }

    /// The client broke the TLS protocol (or the handshake could not start): logged with its
    /// address and rustls' reason, the alert rustls queued sent once, nothing more read, and
    /// the session closed without a reply.
    fn fail_tls(&mut self, now: Instant, error: &rustls::Error) {
        let client = self.session.report().client;
        if self.client.is_handshaking() {
            log::info!(
                "conn={} TLS handshake with {client} failed: {error}",
                self.id
            );
        } else {
            log::info!("conn={} TLS error from {client}: {error}", self.id);
        }
        self.client.send_alert();
        self.client.set_eof(Eof::Delivered);
        self.session.handle_tls_failed(now);
    }

    /// `Action::StartTls`: the `220` and anything else handed out goes first in plain text,
    /// then the handshake. Bytes read before the switch that the session did not consume were
    /// sent before the handshake: they are dropped, never offered as if sent over TLS.
    fn start_tls(&mut self, now: Instant, io: &Io<'_>) {
        let started = match io.config.tls.loaded.as_ref() {
            Some(server) => server.start(),
            None => Err(rustls::Error::General(
                "no certificate: a reload removed [tls]".to_owned(),
            )),
        };
        let connection = match started {
            Ok(connection) => connection,
            Err(e) => {
                log::warn!("conn={} cannot start TLS: {e}", self.id);
                self.client.set_eof(Eof::Delivered);
                return self.session.handle_tls_failed(now);
            }
        };
        let dropped = self.client.start_tls(connection);
        if dropped > 0 {
            log::info!(
                "conn={} discarded {dropped} bytes read after STARTTLS, before the TLS handshake",
                self.id
            );
        }
    }

    /// Offers buffered client bytes while the session takes them, then the end of the stream
    /// once the session has had everything it will take. Returns whether anything changed.
    fn offer_client_input(&mut self, now: Instant) -> bool {
        let mut moved = false;
        if self.session.wants_read() {
            let session = &mut self.session;
            moved = self
                .client
                .offer(|input| session.handle_client_data(now, input));
        }
        if self.client.eof() == Eof::Seen {
            if self.session.is_closed() {
                // Nobody will read the rest; flush what is due and go.
                self.client.set_eof(Eof::Delivered);
                self.start_closing(now);
                moved = true;
            } else if self.client.input.is_empty() || (self.session.wants_read() && !moved) {
                // Whatever is left is an incomplete line the session cannot use.
                self.client.set_eof(Eof::Delivered);
                self.session.handle_client_eof(now);
                moved = true;
            }
        }
        moved
    }

    /// The client socket failed: tell the session (it closes the downstream without the final
    /// dot) and stop all client I/O.
    fn fail_client(&mut self, now: Instant) {
        self.broken = true;
        self.client.outbox = Vec::new();
        if self.client.eof() != Eof::Delivered && !self.session.is_closed() {
            self.session.handle_client_eof(now);
        }
        self.client.set_eof(Eof::Delivered);
    }

    fn start_closing(&mut self, now: Instant) {
        if self.close_by.is_none() {
            self.close_by = Some(now + CLOSE_FLUSH_LIMIT);
        }
    }

    /// Pulls due output into the outboxes that have room. Returns whether anything came.
    fn transmit(&mut self, now: Instant) -> bool {
        let mut moved = false;
        let outbox = &mut self.client.outbox;
        if !self.broken && outbox.len() < CLIENT_OUTBOX_HIGH {
            let before = outbox.len();
            self.session.poll_transmit(now, outbox);
            moved |= outbox.len() > before;
        }
        if let Some(ds) = self.downstream.as_deref_mut() {
            let outbox = &mut ds.leg.outbox;
            if outbox.len() < OUTBOX_HIGH {
                let before = outbox.len();
                self.session.poll_transmit_downstream(ds.link, outbox);
                moved |= outbox.len() > before;
            }
        }
        moved
    }

    /// Carries out every action the session has queued. Returns whether there was any.
    fn run_actions(&mut self, key: ConnKey, now: Instant, io: &mut Io<'_>) -> bool {
        let mut moved = false;
        while let Some(action) = self.session.poll_action() {
            moved = true;
            match action {
                Action::ConnectDownstream { link, addr, pooled } => {
                    self.connect_downstream(key, link, addr, pooled, now, io);
                }
                Action::ReleaseDownstream { link, carried } => {
                    self.release_downstream(link, carried, now, io);
                }
                Action::CloseDownstream { link, quit } => {
                    if self
                        .awaiting_pool
                        .is_some_and(|(_, waiting)| waiting == link)
                    {
                        self.awaiting_pool = None;
                    }
                    if let Some(ds) = self.downstream.as_deref_mut().filter(|ds| ds.link == link) {
                        // What was handed out for it goes first, then QUIT, in one nonblocking
                        // attempt; the session has nothing more for this connection.
                        if !ds.connecting {
                            if quit {
                                ds.leg.outbox.extend_from_slice(b"QUIT\r\n");
                            }
                            ds.leg.write_last();
                        }
                        self.drop_downstream();
                    }
                }
                Action::StartTlsDownstream(link) => self.start_downstream_tls(link, now, io),
                Action::Close => self.start_closing(now),
                Action::StartTls => self.start_tls(now, io),
                Action::Ask(question) => self.ask(question, key, now, io),
            }
        }
        moved
    }

    /// Puts the session's question to the service that answers it: the resolver, the state
    /// front, the worker's tarpit places or, for admission, the rates then the per-IP cap. An
    /// answer at hand goes to the session at once; a later one comes through the worker's
    /// inboxes. Every question is carried out as asked: nothing here decides.
    fn ask(&mut self, question: Question, key: ConnKey, now: Instant, io: &mut Io<'_>) {
        match question {
            Question::Lookup(query) => {
                let waiter = Waiter {
                    worker: io.worker,
                    key: key.to_u64(),
                };
                // A cache hit answers at once; otherwise the answer comes through the
                // worker's inbox (`Worker::take_dns_answers`).
                let answer = match io.resolver {
                    Some(resolver) => resolver.lookup(&query, waiter),
                    None => Some(LookupAnswer::temp_fail(&query)),
                };
                if let Some(answer) = answer {
                    self.session
                        .handle_answer(now, Answer::Lookup(query, answer));
                }
            }
            Question::CheckPass(ip) => self.ask_state(StateOp::CheckPass(ip), key, now, io),
            Question::RecordPass(ip) => self.ask_state(StateOp::RecordPass(ip), key, now, io),
            Question::CheckReputation(ip, half_life) => {
                self.ask_state(StateOp::CheckReputation { ip, half_life }, key, now, io);
            }
            Question::RecordReputation(ip, event, half_life) => {
                let op = StateOp::RecordReputation {
                    ip,
                    event,
                    half_life,
                };
                self.ask_state(op, key, now, io);
            }
            Question::CheckGreylist {
                key: triplet,
                subnet,
                times,
            } => {
                let op = StateOp::CheckGreylist {
                    key: triplet,
                    subnet,
                    times,
                };
                self.ask_state(op, key, now, io);
            }
            Question::EnterTarpit => {
                self.tarpit_place = io.shared.load.try_tarpit();
                let granted = self.tarpit_place.is_some();
                self.session.handle_answer(now, Answer::TarpitSlot(granted));
            }
            // The rate first (`handle_state`), then the per-IP cap.
            Question::Admit(client) => {
                // The balancer's address was checked at accept; the client's is known now.
                if io.config.tls.loaded.is_some()
                    && io.shared.tls_failures.failed_recently(client.ip(), now)
                {
                    log_withheld(client);
                    self.session.handle_starttls_withheld();
                }
                self.ask_state(StateOp::CheckRate(client.ip()), key, now, io);
            }
        }
    }

    /// Asks the state front; an answer now goes to the session at once, a later one comes
    /// through the worker's inbox (`Worker::take_state_answers`).
    fn ask_state(&mut self, op: StateOp, key: ConnKey, now: Instant, io: &Io<'_>) {
        let waiter = StateWaiter {
            worker: io.state_worker,
            key: key.to_u64(),
        };
        if let Some(answer) = io.shared.store.ask(op, now, waiter) {
            self.handle_state(now, answer);
        }
    }

    /// The session wants downstream connection `link` to `addr`: in multiplexing mode an idle
    /// pooled one (when `pooled` allows), a new one while the worker is under its share of
    /// `pool_size`, or a place in line; else always a new one.
    fn connect_downstream(
        &mut self,
        key: ConnKey,
        link: LinkId,
        addr: SocketAddr,
        pooled: bool,
        now: Instant,
        io: &mut Io<'_>,
    ) {
        if !io.multiplexing {
            return self.open_downstream(key, link, addr, now, io.registry, None);
        }
        if pooled && let Some(idle) = io.pool.checkout(addr, now) {
            return self.attach_pooled(key, link, idle, now, io.registry);
        }
        match io.pool.ticket() {
            Some(ticket) => self.open_downstream(key, link, addr, now, io.registry, Some(ticket)),
            None => {
                log::debug!("conn={} waits for a pooled downstream connection", self.id);
                self.awaiting_pool = Some((addr, link));
                io.pool.wait(key, addr);
            }
        }
    }

    /// Whether the session still waits in the pool's line for a connection to `addr`.
    pub(crate) fn awaits_pool(&self, addr: SocketAddr) -> bool {
        self.awaiting_pool
            .is_some_and(|(waits_for, _)| waits_for == addr)
    }

    /// Its turn in the pool's line came: stop waiting and try again (a pooled connection may
    /// be used: the waiting link never had one).
    pub(crate) fn take_pool_turn(&mut self, key: ConnKey, now: Instant, io: &mut Io<'_>) {
        if let Some((addr, link)) = self.awaiting_pool.take() {
            self.connect_downstream(key, link, addr, true, now, io);
        }
    }

    fn attach_pooled(
        &mut self,
        key: ConnKey,
        link: LinkId,
        idle: Idle<Leg>,
        now: Instant,
        registry: &Registry,
    ) {
        self.drop_downstream();
        let Idle {
            addr,
            conn: mut leg,
            carried,
            ticket,
            ..
        } = idle;
        if let Err(e) = leg.register(registry, token::conn(key, Side::Downstream)) {
            log::debug!("conn={} pooled downstream {addr}: {e}", self.id);
            self.session
                .handle_downstream(now, link, DownstreamEvent::ConnectFailed);
            return;
        }
        log::debug!("conn={} reuses a pooled connection to {addr}", self.id);
        self.downstream = Some(Box::new(DownstreamConn {
            link,
            leg,
            addr,
            ticket: Some(ticket),
            connecting: false,
        }));
        self.session
            .handle_downstream(now, link, DownstreamEvent::Reused(carried));
    }

    /// The session is done with a clean connection: back to the pool, unless something about
    /// it says otherwise (unread bytes, its end seen, not pooled), then it is closed, with
    /// QUIT unless it is broken.
    fn release_downstream(
        &mut self,
        link: LinkId,
        carried: Carried,
        now: Instant,
        io: &mut Io<'_>,
    ) {
        let Some(ds) = self.downstream.take_if(|ds| ds.link == link) else {
            return;
        };
        let DownstreamConn {
            mut leg,
            addr,
            ticket,
            connecting,
            ..
        } = *ds;
        leg.deregister(io.registry);
        let eof = leg.eof() != Eof::Open;
        match ticket {
            Some(ticket)
                if !connecting
                    && !eof
                    && leg.input.is_empty()
                    && leg.outbox.is_empty()
                    && leg.is_tls_clean() =>
            {
                // A parked leg keeps its socket and TLS layer; its buffers (empty) go.
                let (stream, tls) = leg.into_parts();
                let leg = Leg::connected(stream, tls);
                io.pool.park(addr, leg, carried, ticket, now);
            }
            _ => {
                log::debug!("conn={} closes a downstream it could not pool", self.id);
                if !eof && !connecting {
                    // Only QUIT: what the outbox held was meant for a transaction now over.
                    leg.outbox = Vec::new();
                    leg.say_quit();
                }
            }
        }
    }

    fn open_downstream(
        &mut self,
        key: ConnKey,
        link: LinkId,
        addr: SocketAddr,
        now: Instant,
        registry: &Registry,
        ticket: Option<Ticket>,
    ) {
        // The session opens one downstream at a time; a leftover one is replaced, not leaked.
        self.drop_downstream();
        let opened = connect::connect(addr).and_then(|stream| {
            let mut leg = Leg::new(stream);
            leg.register(registry, token::conn(key, Side::Downstream))?;
            Ok(leg)
        });
        match opened {
            Ok(leg) => {
                log::debug!("conn={} connecting to downstream {addr}", self.id);
                self.downstream = Some(Box::new(DownstreamConn {
                    link,
                    leg,
                    addr,
                    ticket,
                    connecting: true,
                }));
            }
            Err(e) => {
                log::debug!("conn={} downstream {addr}: connect failed: {e}", self.id);
                self.session
                    .handle_downstream(now, link, DownstreamEvent::ConnectFailed);
            }
        }
    }

    /// On any event of a connecting downstream socket: finished, failed, or not yet.
    fn settle_connect(&mut self, now: Instant) {
        let Some(ds) = self.downstream.as_deref_mut() else {
            return;
        };
        if !ds.connecting || !(ds.leg.is_readable() || ds.leg.is_writable()) {
            return;
        }
        let link = ds.link;
        match connect::finish_connect(ds.leg.stream()) {
            Ok(true) => {
                ds.connecting = false;
                self.session
                    .handle_downstream(now, link, DownstreamEvent::Connected);
            }
            Ok(false) => {
                // Spurious: the connect's completion will be a new edge.
                ds.leg.clear_readiness();
            }
            Err(e) => {
                log::debug!("conn={} downstream connect failed: {e}", self.id);
                self.drop_downstream();
                self.session
                    .handle_downstream(now, link, DownstreamEvent::ConnectFailed);
            }
        }
    }

    /// Over TLS first the records rustls wants, then one read of at most [`READ_CHUNK`]
    /// downstream bytes, fed to the session. A handshake that fails (an alert, a certificate
    /// `tls_verify` refuses, the connection lost) drops the connection here and tells the
    /// session `TlsFailed`; after the handshake a TLS error is a broken downstream (`Closed`).
    fn read_downstream(&mut self, now: Instant, io: &mut Io<'_>) {
        let Some(ds) = self.downstream.as_deref_mut() else {
            return;
        };
        if ds.connecting || ds.leg.eof() != Eof::Open {
            return;
        }
        let mut failure = None;
        let established = match ds.leg.fill() {
            Ok(established) => established,
            Err(e) => {
                failure = Some(e);
                None
            }
        };
        let handshaking = ds.leg.is_handshaking();
        if failure.is_none() && handshaking && ds.leg.is_tls_finished() {
            failure = Some(TlsFailure::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        if let Some(failure) = failure {
            if let TlsFailure::Tls(_) = failure {
                ds.leg.send_alert();
            }
            let (addr, link) = (ds.addr, ds.link);
            self.drop_downstream();
            if handshaking {
                log::info!(
                    "conn={} TLS handshake with downstream {addr} failed: {failure}",
                    self.id
                );
                self.session
                    .handle_downstream(now, link, DownstreamEvent::TlsFailed);
            } else {
                log::info!(
                    "conn={} TLS error from downstream {addr}: {failure}",
                    self.id
                );
                self.session
                    .handle_downstream(now, link, DownstreamEvent::Closed);
            }
            return;
        }
        if let Some(version) = established {
            log::debug!(
                "conn={} TLS with downstream {}: {version:?} {:?}",
                self.id,
                ds.addr,
                ds.leg.cipher_suite()
            );
            self.session
                .handle_downstream(now, ds.link, DownstreamEvent::TlsEstablished);
        }
        let Some(ds) = self.downstream.as_deref_mut() else {
            return;
        };
        if !ds.leg.can_read() || ds.leg.input.len() >= io.max_input {
            return;
        }
        match ds.leg.read(io.scratch) {
            Ok(0) => {}
            Ok(n) => {
                let bytes = io.scratch.get(..n).unwrap_or_default();
                let (session, link) = (&mut self.session, ds.link);
                ds.leg.feed(bytes, |bytes| {
                    session.handle_downstream(now, link, DownstreamEvent::Data(bytes))
                });
            }
            Err(e) => {
                log::debug!("conn={} downstream read failed: {e}", self.id);
                self.fail_downstream(now);
            }
        }
    }

    /// `Action::StartTlsDownstream`: the downstream said 220 to STARTTLS. Bytes it sent after
    /// the 220 and the session did not take came in plain text: dropped, never parsed as a
    /// reply. The handshake starts with the worker's client configuration; its end comes back
    /// through `read_downstream`.
    fn start_downstream_tls(&mut self, link: LinkId, now: Instant, io: &Io<'_>) {
        let Some(ds) = self.downstream.as_deref_mut().filter(|ds| ds.link == link) else {
            self.session
                .handle_downstream(now, link, DownstreamEvent::TlsFailed);
            return;
        };
        let started = match &io.config.downstream.client_tls {
            Some(client) => client.start(ds.addr),
            None => Err(rustls::Error::General(
                "no client TLS configuration (Config::load_tls_ca)".to_owned(),
            )),
        };
        let connection = match started {
            Ok(connection) => connection,
            Err(e) => {
                log::warn!("conn={} cannot start TLS to {}: {e}", self.id, ds.addr);
                self.drop_downstream();
                self.session
                    .handle_downstream(now, link, DownstreamEvent::TlsFailed);
                return;
            }
        };
        let dropped = ds.leg.start_tls(connection);
        if dropped > 0 {
            log::info!(
                "conn={} discarded {dropped} bytes downstream {} sent after its 220 to STARTTLS",
                self.id,
                ds.addr
            );
        }
        // The ClientHello is waiting: the write pass sends it this turn.
    }

    /// Offers buffered downstream bytes, then `Closed` once the downstream's end was read and
    /// the session has taken what it will. Returns whether anything changed.
    fn offer_downstream_input(&mut self, now: Instant) -> bool {
        let Some(ds) = self.downstream.as_deref_mut() else {
            return false;
        };
        let (session, link) = (&mut self.session, ds.link);
        let moved = ds
            .leg
            .offer(|input| session.handle_downstream(now, link, DownstreamEvent::Data(input)));
        if ds.leg.eof() != Eof::Open && (ds.leg.input.is_empty() || !moved) {
            self.fail_downstream(now);
            return true;
        }
        moved
    }

    /// The downstream closed or failed: drop it and tell the session.
    fn fail_downstream(&mut self, now: Instant) {
        if let Some(link) = self.downstream.as_deref().map(|ds| ds.link) {
            self.drop_downstream();
            self.session
                .handle_downstream(now, link, DownstreamEvent::Closed);
        }
    }

    /// Drops the downstream leg; closing its socket takes it out of the poll set.
    fn drop_downstream(&mut self) {
        self.downstream = None;
    }

    /// Writes the client outbox until it is empty or the socket would block. Returns whether
    /// anything was written (room for more output) or the socket failed.
    fn write_client(&mut self, now: Instant) -> bool {
        if self.broken {
            return false;
        }
        match self.client.write() {
            Ok(moved) => moved,
            Err(e) => {
                log::debug!("conn={} client write failed: {e}", self.id);
                self.fail_client(now);
                true
            }
        }
    }

    /// Like [`Conn::write_client`] for the downstream, once connected.
    fn write_downstream(&mut self, now: Instant) -> bool {
        let Some(ds) = self.downstream.as_deref_mut() else {
            return false;
        };
        if ds.connecting {
            return false;
        }
        match ds.leg.write() {
            Ok(moved) => moved,
            Err(e) => {
                log::debug!("conn={} downstream write failed: {e}", self.id);
                self.fail_downstream(now);
                true
            }
        }
    }
}

impl DownstreamConn {
    /// Whether the downstream leg should be read now (see [`Conn::may_read_client`]).
    fn may_read(&self, max_input: usize) -> bool {
        let open =
            !self.connecting && self.leg.eof() == Eof::Open && self.leg.input.len() < max_input;
        open && (self.leg.wants_fill() || self.leg.can_read())
    }
}

/// The session's name for a version rustls agreed; `None` for one it cannot agree with the
/// provider tarmac configures (TLS 1.2 and 1.3 only).
fn tls_version(version: rustls::ProtocolVersion) -> Option<TlsVersion> {
    match version {
        rustls::ProtocolVersion::TLSv1_3 => Some(TlsVersion::Tls13),
        rustls::ProtocolVersion::TLSv1_2 => Some(TlsVersion::Tls12),
        _ => None,
    }
}

/// Puts `client` on the failed-handshake record and says so (with how the connection ended).
fn remember_failed_handshake(
    failures: &TlsFailures,
    client: SocketAddr,
    result: &str,
    now: Instant,
) {
    failures.record(client.ip(), now);
    log::info!(
        "STARTTLS from {client} did not complete (result={result}); not offering STARTTLS to {} for {} s",
        client.ip().to_canonical(),
        WITHHOLD_FOR.as_secs()
    );
}

/// Says that `client` is not offered STARTTLS because of an earlier failed handshake.
pub(crate) fn log_withheld(client: SocketAddr) {
    log::info!(
        "not offering STARTTLS to {client}: a TLS handshake from {} failed within the last {} s",
        client.ip().to_canonical(),
        WITHHOLD_FOR.as_secs()
    );
}
