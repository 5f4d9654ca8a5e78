//! One client connection: its two [`Leg`]s (the client's socket and, while relaying, the
//! downstream's), and the drive cycle that moves bytes between them and the sans-IO [`Session`]
//! (STYLE.md §1.2). Socket work (reads, writes, readiness, TLS records) is the legs'
//! (`leg.rs`); this module decides when each happens and what the session is told.
//!
//! Backpressure chain: the session's `wants_read()` gates client reads; unconsumed client bytes
//! wait in the leg's `input`, which stops reads at [`COMMAND_INPUT`] outside a message body and
//! at [`READ_CHUNK`] + `max_line_length` in one; more output is pulled from `poll_transmit`
//! only while the leg's outbox is under [`CLIENT_OUTBOX_HIGH`] (client) or `OUTBOX_HIGH`
//! (downstream, `conn/downstream.rs`). A client that does not read its replies therefore stops being read: its
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
//! the worker's [`TlsFailures`](super::tls_failures::TlsFailures) record, and STARTTLS is not offered to it for an hour.
//!
//! Closing is two steps: [`Conn::drive`] returns [`Next::Close`] once the connection is done
//! (session closed and flushed, the client gone, or the flush deadline passed); the worker then
//! calls [`Conn::close`] after the event batch, which deregisters, shuts down and writes the one
//! close log line.
//!
//! The downstream half (connect, the pool, the downstream leg's reads, TLS and writes) is in
//! `conn/downstream.rs`; the service questions and their answers in `conn/ask.rs`.

mod ask;
mod downstream;

use std::io;
use std::net::{Shutdown as NetShutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Registry;
use mio::event::Event;
use mio::net::TcpStream;

use self::downstream::DownstreamConn;
pub(crate) use self::downstream::DownstreamPool;
use super::close_log::{self, ConnId};
pub(crate) use super::leg::READ_CHUNK;
use super::leg::{Eof, Leg};
use super::limits::LimitGuard;
use super::load::TarpitGuard;
use super::shared::Shared;
use super::slab::ConnKey;
use super::tls_failures::remember_failed_handshake;
use super::tls_stream::TlsFailure;
use super::token;
use crate::config::Config;
use crate::content::scanner::ScannerHandle;
use crate::dns::ResolverHandle;
use crate::metrics::WorkerCounters;
use crate::smtp::{Action, LinkId, Session, Shutdown, Side, TlsVersion};

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
    /// The scanner thread (`[content]`).
    pub(crate) scanner: Option<&'a ScannerHandle>,
    /// This worker's index for the scanner thread.
    pub(crate) scan_worker: usize,
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
    /// The worker's counters (`[metrics] listen`), shared by its connections.
    metrics: Option<Arc<WorkerCounters>>,
}

impl Conn {
    /// A freshly accepted connection (see [`Leg::connected`] for its readiness).
    pub(crate) fn new(
        id: ConnId,
        client: TcpStream,
        session: Session,
        now: Instant,
        guard: LimitGuard,
        metrics: Option<Arc<WorkerCounters>>,
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
            metrics,
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
                    ds.on_event(event);
                }
            }
        }
    }

    /// One of the session's timers may have expired (the session ignores an early call), or
    /// the flush deadline passed (the next [`Conn::drive`] closes then).
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
    }

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
            moved |= self.write(Side::Client, now);
            moved |= self.write(Side::Downstream, now);
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
        let report = self.session.report();
        if let Some(metrics) = &self.metrics {
            metrics.closed(&report);
        }
        close_log::log_close(
            self.id,
            &report,
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
                let cipher = suite.and_then(|suite| suite.as_str());
                self.session.handle_tls_established(now, version, cipher);
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
        moved | self.transmit_downstream(now)
    }

    /// Carries out every action the session has queued. Returns whether there was any.
    fn run_actions(&mut self, key: ConnKey, now: Instant, io: &mut Io<'_>) -> bool {
        let mut moved = false;
        while let Some(action) = self.session.poll_action() {
            moved = true;
            match action {
                Action::ConnectDownstream { link, addr, via } => {
                    if let Some(metrics) = self.server_metrics() {
                        metrics.downstream_connection(addr);
                    }
                    self.connect_downstream(key, link, addr, via, now, io);
                }
                Action::ReleaseDownstream { link, carried } => {
                    self.release_downstream(link, carried, now, io);
                }
                Action::CloseDownstream { link, quit } => self.close_downstream(link, quit),
                Action::StartTlsDownstream(link) => self.start_downstream_tls(link, now, io),
                Action::Close => self.start_closing(now),
                Action::StartTls => self.start_tls(now, io),
                Action::Ask(question) => self.ask(question, key, now, io),
            }
        }
        moved
    }

    /// Writes the outbox of the leg on `side` (the client's unless it broke, the downstream's
    /// once connected) until it is empty or the socket would block. Returns whether anything
    /// was written (room for more output) or the socket failed, which fails that side.
    fn write(&mut self, side: Side, now: Instant) -> bool {
        let leg = match side {
            Side::Client => Some(&mut self.client).filter(|_| !self.broken),
            Side::Downstream => self
                .downstream
                .as_deref_mut()
                .and_then(DownstreamConn::connected_leg),
        };
        let Some(leg) = leg else {
            return false;
        };
        let before = leg.outbox.len();
        let written = leg.write();
        if side == Side::Downstream
            && let Some(metrics) = &self.metrics
        {
            metrics.bytes_to_downstream(before.saturating_sub(leg.outbox.len()));
        }
        match written {
            Ok(moved) => moved,
            Err(e) => {
                let (name, fail): (_, fn(&mut Conn, Instant)) = match side {
                    Side::Client => ("client", Conn::fail_client),
                    Side::Downstream => ("downstream", Conn::fail_downstream),
                };
                log::debug!("conn={} {name} write failed: {e}", self.id);
                fail(self, now);
                true
            }
        }
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
