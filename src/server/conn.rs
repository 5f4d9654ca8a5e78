//! One client connection: its sockets, buffers and readiness, and the drive cycle that moves bytes
//! between them and the sans-IO [`Session`] (STYLE.md §1.2).
//!
//! Readiness: each socket is registered once for `READABLE | WRITABLE`. An event sets the
//! socket's `readable`/`writable` flag; only `WouldBlock` clears it. So a connection that stops
//! reading (backpressure, a tarpit holding a reply) resumes later from the flag without a lost
//! edge and without a `reregister` per event; spurious events cost one `WouldBlock`.
//!
//! Backpressure chain: the session's `wants_read()` gates client reads; unconsumed client bytes
//! wait in `input`, which stops reads at [`COMMAND_INPUT`] outside a message body and at
//! [`READ_CHUNK`] + `max_line_length` in one; more output is pulled from `poll_transmit` only
//! while the socket's outbox is under [`CLIENT_OUTBOX_HIGH`] (client) or [`OUTBOX_HIGH`]
//! (downstream). A client that does not read its replies therefore stops being read: its
//! replies fill the socket, then this outbox, then the session's (`CLIENT_OUTBOX_CAP`), and
//! the session takes no more commands. Every buffer is bounded (DESIGN.md §6.1 "Memory":
//! 16 KB for a connection that relays nothing, 160 KB for one relaying a body; `bench/memory.rs`
//! measures it), and an empty one gives its memory back when it grew past [`SHRINK_ABOVE`], so
//! an idle connection costs its struct, its session and its sockets.
//!
//! TLS: on `Action::StartTls` the client socket gets a [`TlsStream`] (boxed, so a plain
//! connection pays one pointer), with what was already handed out (the `220`) as its plain-text
//! preamble; bytes read before the switch and not yet consumed are dropped (CVE-2011-0411).
//! From then on reads are socket → rustls → decrypted input → session, gated by rustls'
//! `wants_read` (the handshake needs reading whatever the session wants) and, for the decrypted
//! input, by the session's `wants_read` and the `input` bound; writes are outbox → rustls →
//! socket while rustls `wants_write`. rustls' own buffers are bounded (`tls_stream.rs`). A TLS
//! failure closes only this connection; a connection that ends mid-handshake (garbage, an
//! alert, the command timeout, a hang-up) puts its client on the worker's [`TlsFailures`]
//! record, and STARTTLS is not offered to it for an hour.
//!
//! Closing is two steps: [`Conn::drive`] returns [`Next::Close`] once the connection is done
//! (session closed and flushed, the client gone, or the flush deadline passed); the worker then
//! calls [`Conn::close`] after the event batch, which deregisters, shuts down and writes the one
//! close log line.

use std::io::{self, Read, Write};
use std::net::{Shutdown as NetShutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry};

use super::close_log::{self, ConnId};
use super::limits::{LimitGuard, Refusal};
use super::load::TarpitGuard;
use super::pool::{Idle, Pool, Ticket};
use super::slab::ConnKey;
use super::tls_failures::{TlsFailures, WITHHOLD_FOR};
use super::tls_stream::{TlsFailure, TlsRead, TlsStream};
use super::token;
use super::worker::Shared;
use crate::config::Config;
use crate::dns::{ResolverHandle, Waiter};
use crate::downstream::connect;
use crate::downstream::dialog::Carried;
use crate::smtp::question::{LookupAnswer, Query};
use crate::smtp::{
    Action, Answer, DownstreamEvent, LinkId, Question, Session, Shutdown, Side, TlsVersion,
};
use crate::state::{StateAnswer, StateOp, Waiter as StateWaiter};

/// Bytes read per socket per turn: one read of this size, then the other connections get their
/// turn; more starves neighbours, less costs syscalls. It is also the worker's scratch size.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

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

/// An empty buffer with more capacity than this is freed: an idle connection must stay cheap
/// (the `hold` bench's target is ≤ 8 KB per connection), while small buffers are kept to save
/// reallocating for every command.
const SHRINK_ABOVE: usize = 4 * 1024;

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

/// Per-turn context the worker lends to a connection.
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
    pub(crate) pool: &'a mut Pool,
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
    /// The configuration in force (the greylist's times).
    pub(crate) config: &'a Config,
}

/// A client connection and, while relaying, its downstream connection.
#[derive(Debug)]
pub(crate) struct Conn {
    id: ConnId,
    client: TcpStream,
    readable: bool,
    writable: bool,
    eof: Eof,
    /// The client socket failed (reset, write error): nothing more is read or written.
    broken: bool,
    /// Client bytes the session has not consumed yet.
    input: Vec<u8>,
    /// Bytes from `poll_transmit(Client)` not yet written (or, over TLS, not yet encrypted).
    to_client: Vec<u8>,
    /// The client connection's TLS layer after STARTTLS; boxed, as most connections never
    /// have one.
    tls: Option<Box<TlsStream>>,
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

/// The client's end of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Eof {
    /// Not seen.
    Open,
    /// Read, not yet told to the session: it gets the buffered input first.
    Seen,
    /// Told to the session (or no longer relevant).
    Delivered,
}

#[derive(Debug)]
struct DownstreamConn {
    /// The session's name for this connection: only its bytes and events are this one's.
    link: LinkId,
    stream: TcpStream,
    /// The server it is connected to (the pool's key).
    addr: SocketAddr,
    /// Multiplexing: this connection's place in the pool.
    ticket: Option<Ticket>,
    /// The nonblocking connect has not finished.
    connecting: bool,
    readable: bool,
    writable: bool,
    /// The downstream closed its side; `Closed` goes to the session once `input` is consumed.
    eof: bool,
    input: Vec<u8>,
    to_downstream: Vec<u8>,
    /// The TLS layer after STARTTLS (`Action::StartTlsDownstream`); `input` and
    /// `to_downstream` then hold plaintext.
    tls: Option<Box<TlsStream>>,
}

impl Conn {
    /// A freshly accepted connection. The socket is assumed writable (its send buffer is empty)
    /// so the banner goes out in the accept turn; it is not assumed readable: registering it
    /// reports data that is already there.
    pub(crate) fn new(
        id: ConnId,
        client: TcpStream,
        session: Session,
        now: Instant,
        guard: LimitGuard,
    ) -> Conn {
        Conn {
            id,
            client,
            readable: false,
            writable: true,
            eof: Eof::Open,
            broken: false,
            input: Vec::new(),
            to_client: Vec::new(),
            tls: None,
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
        registry.register(
            &mut self.client,
            token::conn(key, Side::Client),
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    /// Records the readiness in `event` for the socket on `side`. Error and hang-up bits count
    /// as readable and writable, so the next read or write reports what happened.
    pub(crate) fn on_event(&mut self, side: Side, event: &Event) {
        let failed = event.is_error();
        let readable = event.is_readable() || event.is_read_closed() || failed;
        let writable = event.is_writable() || event.is_write_closed() || failed;
        match side {
            Side::Client => {
                self.readable |= readable;
                self.writable |= writable;
            }
            Side::Downstream => {
                if let Some(ds) = self.downstream.as_deref_mut() {
                    ds.readable |= readable;
                    ds.writable |= writable;
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
        self.settle_connect(now, io.registry);
        self.read_downstream(now, io);
        loop {
            let mut moved = self.offer_client_input(now);
            moved |= self.offer_downstream_input(now, io.registry);
            moved |= self.transmit(now);
            moved |= self.run_actions(key, now, io);
            moved |= self.write_client(now);
            moved |= self.write_downstream(now, io.registry);
            if !moved {
                break;
            }
        }
        self.shrink_idle_buffers();
        if self.broken {
            return Next::Close;
        }
        match self.close_by {
            Some(by) if self.client_flushed() || now >= by => Next::Close,
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

    /// Second step of closing: deregister and drop the downstream, stop sending to the client
    /// (FIN after whatever was written), read away a little unread input so the kernel does not
    /// answer it with an RST, and write the close log line.
    pub(crate) fn close(mut self, now: Instant, io: &mut Io<'_>) {
        if self.tls.as_deref().is_some_and(TlsStream::is_handshaking) {
            // Whatever ended it (garbage, an alert, the timeout, a hang-up), this client cannot
            // do TLS with us now: its next connections are not offered STARTTLS. Recorded
            // before the FIN, so a client that reconnects as soon as it sees it is covered.
            let report = self.session.report();
            remember_failed_handshake(&io.shared.tls_failures, report.client, report.result, now);
        }
        self.drop_downstream(io.registry);
        // Errors below only mean the socket is already gone; the fd is closed on drop anyway.
        let _ = io.registry.deregister(&mut self.client);
        if !self.broken {
            // Over TLS a clean end, best effort: the client knows no truncation happened.
            write_last(&self.client, self.tls.as_deref_mut(), &mut Vec::new());
            let _ = self.client.shutdown(NetShutdown::Write);
            let mut drained = 0;
            while drained < CLOSE_DRAIN {
                match (&self.client).read(io.scratch) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
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
        cap.saturating_sub(self.input.len()).min(scratch)
    }

    fn may_read_client(&self, max_input: usize) -> bool {
        let open = !self.broken && self.eof == Eof::Open && self.close_by.is_none();
        let session_reads =
            self.input.len() < self.client_input_cap(max_input) && self.session.wants_read();
        match self.tls.as_deref() {
            None => open && self.readable && session_reads,
            // The socket when rustls wants it (the handshake reads whatever the session
            // wants); decrypted input when the session does.
            Some(tls) => {
                open && ((self.readable && tls.wants_read())
                    || (tls.has_plaintext() && session_reads))
            }
        }
    }

    /// Whether everything for the client was written, TLS records included.
    fn client_flushed(&self) -> bool {
        self.to_client.is_empty() && !self.tls.as_deref().is_some_and(TlsStream::wants_write)
    }

    /// One read of at most [`READ_CHUNK`] bytes, fed to the session at once when nothing older
    /// is waiting (the common case needs no copy into `input`).
    fn read_client(&mut self, now: Instant, io: &mut Io<'_>) {
        if self.tls.is_some() {
            return self.read_client_tls(now, io);
        }
        if !self.may_read_client(io.max_input) {
            return;
        }
        let len = self.client_read_len(io.max_input, io.scratch.len());
        let n = loop {
            match (&self.client).read(io.scratch.get_mut(..len).unwrap_or_default()) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return;
                }
                Err(e) => {
                    log::debug!("conn={} client read failed: {e}", self.id);
                    self.fail_client(now);
                    return;
                }
            }
        };
        if n == 0 {
            self.eof = Eof::Seen;
            return;
        }
        self.feed_client(now, io.scratch, n);
    }

    /// Over TLS: TLS records from the socket into rustls, up to [`READ_CHUNK`] bytes, while it
    /// wants them; the end of the handshake to the session; then one bounded read of decrypted
    /// input, fed like plain input.
    fn read_client_tls(&mut self, now: Instant, io: &mut Io<'_>) {
        if self.broken || self.eof != Eof::Open || self.close_by.is_some() {
            return;
        }
        let Some(tls) = self.tls.as_deref_mut() else {
            return;
        };
        let mut total = 0;
        while self.readable && tls.wants_read() && total < READ_CHUNK {
            match tls.read_tls(&mut &self.client) {
                Ok(TlsRead::Data(n)) => total += n,
                Ok(TlsRead::WouldBlock) => self.readable = false,
                Ok(TlsRead::Closed | TlsRead::Full) => break,
                Err(TlsFailure::Io(e)) => {
                    log::debug!("conn={} client read failed: {e}", self.id);
                    return self.fail_client(now);
                }
                Err(TlsFailure::Tls(e)) => return self.fail_tls(now, &e),
            }
        }
        if let Some(version) = tls.take_established() {
            let suite = tls.cipher_suite();
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
        let len = self.client_read_len(io.max_input, io.scratch.len());
        let Some(tls) = self.tls.as_deref_mut() else {
            return;
        };
        if tls.has_plaintext() && len > 0 && self.session.wants_read() {
            let n = tls.read_plaintext(io.scratch.get_mut(..len).unwrap_or_default());
            self.feed_client(now, io.scratch, n);
        }
        if self.tls.as_deref().is_some_and(TlsStream::is_finished) {
            self.eof = Eof::Seen;
        }
    }

    /// Gives the first `n` bytes of `scratch` (just read) to the session, keeping what it does
    /// not take behind anything older in `input`.
    fn feed_client(&mut self, now: Instant, scratch: &[u8], n: usize) {
        let bytes = scratch.get(..n).unwrap_or_default();
        if self.input.is_empty() {
            let used = self.session.handle_client_data(now, bytes);
            self.input
                .extend_from_slice(bytes.get(used..).unwrap_or_default());
        } else {
            self.input.extend_from_slice(bytes);
        }
    }

    /// The client broke the TLS protocol (or the handshake could not start): logged with its
    /// address and rustls' reason, the alert rustls queued sent once, nothing more read, and
    /// the session closed without a reply.
    fn fail_tls(&mut self, now: Instant, error: &rustls::Error) {
        let client = self.session.report().client;
        match self.tls.as_deref_mut() {
            Some(tls) if tls.is_handshaking() => {
                log::info!(
                    "conn={} TLS handshake with {client} failed: {error}",
                    self.id
                );
            }
            _ => log::info!("conn={} TLS error from {client}: {error}", self.id),
        }
        if let Some(tls) = self.tls.as_deref_mut() {
            let _ = tls.write_tls(&mut &self.client);
        }
        self.eof = Eof::Delivered;
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
                self.eof = Eof::Delivered;
                return self.session.handle_tls_failed(now);
            }
        };
        if !self.input.is_empty() {
            log::info!(
                "conn={} discarded {} bytes read after STARTTLS, before the TLS handshake",
                self.id,
                self.input.len()
            );
            self.input = Vec::new();
        }
        let preamble = std::mem::take(&mut self.to_client);
        self.tls = Some(Box::new(TlsStream::new(connection, preamble)));
    }

    /// Offers buffered client bytes while the session takes them, then the end of the stream
    /// once the session has had everything it will take. Returns whether anything changed.
    fn offer_client_input(&mut self, now: Instant) -> bool {
        let mut moved = false;
        if !self.input.is_empty() && self.session.wants_read() {
            let used = self.session.handle_client_data(now, &self.input);
            if used > 0 {
                self.input.drain(..used.min(self.input.len()));
                moved = true;
            }
        }
        if self.eof == Eof::Seen {
            if self.session.is_closed() {
                // Nobody will read the rest; flush what is due and go.
                self.eof = Eof::Delivered;
                self.start_closing(now);
                moved = true;
            } else if self.input.is_empty() || (self.session.wants_read() && !moved) {
                // Whatever is left is an incomplete line the session cannot use.
                self.eof = Eof::Delivered;
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
        self.to_client = Vec::new();
        if self.eof != Eof::Delivered && !self.session.is_closed() {
            self.session.handle_client_eof(now);
        }
        self.eof = Eof::Delivered;
    }

    fn start_closing(&mut self, now: Instant) {
        if self.close_by.is_none() {
            self.close_by = Some(now + CLOSE_FLUSH_LIMIT);
        }
    }

    /// Pulls due output into the outboxes that have room. Returns whether anything came.
    fn transmit(&mut self, now: Instant) -> bool {
        let mut moved = false;
        if !self.broken && self.to_client.len() < CLIENT_OUTBOX_HIGH {
            let before = self.to_client.len();
            self.session.poll_transmit(now, &mut self.to_client);
            moved |= self.to_client.len() > before;
        }
        if let Some(ds) = self.downstream.as_deref_mut() {
            if ds.to_downstream.len() < OUTBOX_HIGH {
                let before = ds.to_downstream.len();
                self.session
                    .poll_transmit_downstream(ds.link, &mut ds.to_downstream);
                moved |= ds.to_downstream.len() > before;
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
                                ds.to_downstream.extend_from_slice(b"QUIT\r\n");
                            }
                            ds.flush_before_close();
                        }
                        self.drop_downstream(io.registry);
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
        idle: Idle,
        now: Instant,
        registry: &Registry,
    ) {
        self.drop_downstream(registry);
        let Idle {
            addr,
            mut stream,
            carried,
            ticket,
            tls,
            ..
        } = idle;
        let registered = registry.register(
            &mut stream,
            token::conn(key, Side::Downstream),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(e) = registered {
            log::debug!("conn={} pooled downstream {addr}: {e}", self.id);
            self.session
                .handle_downstream(now, link, DownstreamEvent::ConnectFailed);
            return;
        }
        log::debug!("conn={} reuses a pooled connection to {addr}", self.id);
        self.downstream = Some(Box::new(DownstreamConn {
            link,
            stream,
            addr,
            ticket: Some(ticket),
            connecting: false,
            readable: false,
            writable: true,
            eof: false,
            input: Vec::new(),
            to_downstream: Vec::new(),
            tls,
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
            mut stream,
            addr,
            ticket,
            connecting,
            eof,
            input,
            to_downstream,
            mut tls,
            ..
        } = *ds;
        let _ = io.registry.deregister(&mut stream);
        let tls_clean = tls
            .as_deref()
            .is_none_or(|tls| !tls.is_handshaking() && !tls.wants_write() && !tls.has_plaintext());
        match ticket {
            Some(ticket)
                if !connecting
                    && !eof
                    && input.is_empty()
                    && to_downstream.is_empty()
                    && tls_clean =>
            {
                io.pool.park(addr, stream, tls, carried, ticket, now);
            }
            _ => {
                log::debug!("conn={} closes a downstream it could not pool", self.id);
                if !eof && !connecting {
                    super::pool::say_quit(&stream, tls.as_deref_mut());
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
        self.drop_downstream(registry);
        let opened = connect::connect(addr).and_then(|mut stream| {
            registry.register(
                &mut stream,
                token::conn(key, Side::Downstream),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(stream)
        });
        match opened {
            Ok(stream) => {
                log::debug!("conn={} connecting to downstream {addr}", self.id);
                self.downstream = Some(Box::new(DownstreamConn {
                    link,
                    stream,
                    addr,
                    ticket,
                    connecting: true,
                    readable: false,
                    writable: false,
                    eof: false,
                    input: Vec::new(),
                    to_downstream: Vec::new(),
                    tls: None,
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
    fn settle_connect(&mut self, now: Instant, registry: &Registry) {
        let Some(ds) = self.downstream.as_deref_mut() else {
            return;
        };
        if !ds.connecting || !(ds.readable || ds.writable) {
            return;
        }
        let link = ds.link;
        match connect::finish_connect(&ds.stream) {
            Ok(true) => {
                ds.connecting = false;
                self.session
                    .handle_downstream(now, link, DownstreamEvent::Connected);
            }
            Ok(false) => {
                // Spurious: the connect's completion will be a new edge.
                ds.readable = false;
                ds.writable = false;
            }
            Err(e) => {
                log::debug!("conn={} downstream connect failed: {e}", self.id);
                self.drop_downstream(registry);
                self.session
                    .handle_downstream(now, link, DownstreamEvent::ConnectFailed);
            }
        }
    }

    /// One read of at most [`READ_CHUNK`] downstream bytes, fed to the session.
    fn read_downstream(&mut self, now: Instant, io: &mut Io<'_>) {
        let Some(ds) = self.downstream.as_deref_mut() else {
            return;
        };
        if ds.tls.is_some() {
            return self.read_downstream_tls(now, io);
        }
        if !ds.may_read(io.max_input) {
            return;
        }
        let n = loop {
            match (&ds.stream).read(io.scratch) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ds.readable = false;
                    return;
                }
                Err(e) => {
                    log::debug!("conn={} downstream read failed: {e}", self.id);
                    self.fail_downstream(now, io.registry);
                    return;
                }
            }
        };
        if n == 0 {
            ds.eof = true;
            return;
        }
        let bytes = io.scratch.get(..n).unwrap_or_default();
        feed_downstream(&mut self.session, ds, now, bytes);
    }

    /// Over TLS: records into rustls while it wants them (up to [`READ_CHUNK`] bytes), the end of
    /// the handshake to the session, then one bounded read of plaintext, fed like plain input.
    /// A handshake that fails (an alert, a certificate `tls_verify` refuses, the connection
    /// lost) drops the connection here and tells the session `TlsFailed`; after the handshake
    /// a TLS error is a broken downstream (`Closed`).
    fn read_downstream_tls(&mut self, now: Instant, io: &mut Io<'_>) {
        let Some(ds) = self.downstream.as_deref_mut() else {
            return;
        };
        let Some(tls) = ds.tls.as_deref_mut() else {
            return;
        };
        if ds.connecting || ds.eof {
            return;
        }
        let mut total = 0;
        let mut failure = None;
        while ds.readable && tls.wants_read() && total < READ_CHUNK {
            match tls.read_tls(&mut &ds.stream) {
                Ok(TlsRead::Data(n)) => total += n,
                Ok(TlsRead::WouldBlock) => ds.readable = false,
                Ok(TlsRead::Closed | TlsRead::Full) => break,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let handshaking = tls.is_handshaking();
        if failure.is_none() && handshaking && tls.is_finished() {
            failure = Some(TlsFailure::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        if let Some(failure) = failure {
            if let TlsFailure::Tls(_) = failure {
                // The alert rustls queued for the peer, once.
                let _ = tls.write_tls(&mut &ds.stream);
            }
            let (addr, link) = (ds.addr, ds.link);
            self.drop_downstream(io.registry);
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
        if let Some(version) = tls.take_established() {
            log::debug!(
                "conn={} TLS with downstream {}: {version:?} {:?}",
                self.id,
                ds.addr,
                tls.cipher_suite()
            );
            self.session
                .handle_downstream(now, ds.link, DownstreamEvent::TlsEstablished);
        }
        let Some(ds) = self.downstream.as_deref_mut() else {
            return;
        };
        let Some(tls) = ds.tls.as_deref_mut() else {
            return;
        };
        if tls.has_plaintext() && ds.input.len() < io.max_input {
            let n = tls.read_plaintext(io.scratch);
            let bytes = io.scratch.get(..n).unwrap_or_default();
            feed_downstream(&mut self.session, ds, now, bytes);
        }
        if let Some(ds) = self.downstream.as_deref_mut()
            && ds.tls.as_deref().is_some_and(TlsStream::is_finished)
        {
            ds.eof = true;
        }
    }

    /// `Action::StartTlsDownstream`: the downstream said 220 to STARTTLS. Bytes it sent after
    /// the 220 and the session did not take came in plain text: dropped, never parsed as a
    /// reply. The handshake starts with the worker's client configuration; its end comes back
    /// through `read_downstream_tls`.
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
                self.drop_downstream(io.registry);
                self.session
                    .handle_downstream(now, link, DownstreamEvent::TlsFailed);
                return;
            }
        };
        if !ds.input.is_empty() {
            log::info!(
                "conn={} discarded {} bytes downstream {} sent after its 220 to STARTTLS",
                self.id,
                ds.input.len(),
                ds.addr
            );
            ds.input = Vec::new();
        }
        let preamble = std::mem::take(&mut ds.to_downstream);
        ds.tls = Some(Box::new(TlsStream::new(connection, preamble)));
        // The ClientHello is waiting: the write pass sends it this turn.
    }

    /// Offers buffered downstream bytes, then `Closed` once the downstream's end was read and
    /// the session has taken what it will. Returns whether anything changed.
    fn offer_downstream_input(&mut self, now: Instant, registry: &Registry) -> bool {
        let Some(ds) = self.downstream.as_deref_mut() else {
            return false;
        };
        let mut moved = false;
        if !ds.input.is_empty() {
            let used =
                self.session
                    .handle_downstream(now, ds.link, DownstreamEvent::Data(&ds.input));
            if used > 0 {
                ds.input.drain(..used.min(ds.input.len()));
                moved = true;
            }
        }
        if ds.eof && (ds.input.is_empty() || !moved) {
            self.fail_downstream(now, registry);
            moved = true;
        }
        moved
    }

    /// The downstream closed or failed: drop it and tell the session.
    fn fail_downstream(&mut self, now: Instant, registry: &Registry) {
        if let Some(link) = self.downstream.as_deref().map(|ds| ds.link) {
            self.drop_downstream(registry);
            self.session
                .handle_downstream(now, link, DownstreamEvent::Closed);
        }
    }

    fn drop_downstream(&mut self, registry: &Registry) {
        if let Some(mut ds) = self.downstream.take() {
            // Closing the fd removes it from the poll set anyway; deregistering is tidier.
            let _ = registry.deregister(&mut ds.stream);
        }
    }

    /// Writes the client outbox until it is empty or the socket would block. Returns whether
    /// anything was written (room for more output) or the socket failed.
    fn write_client(&mut self, now: Instant) -> bool {
        if self.broken || !self.writable {
            return false;
        }
        if self.tls.is_some() {
            return self.write_client_tls(now);
        }
        if self.to_client.is_empty() {
            return false;
        }
        match write_out(&self.client, &mut self.to_client) {
            Ok(Flushed::All) => true,
            Ok(Flushed::Blocked(written)) => {
                self.writable = false;
                written
            }
            Err(e) => {
                log::debug!("conn={} client write failed: {e}", self.id);
                self.fail_client(now);
                true
            }
        }
    }

    /// Over TLS: the outbox into rustls (as much as its bounded buffer takes), rustls' records
    /// (and first the plain-text preamble) to the socket, until both are empty or the socket
    /// would block.
    fn write_client_tls(&mut self, now: Instant) -> bool {
        let Some(tls) = self.tls.as_deref_mut() else {
            return false;
        };
        match tls.flush(&mut self.to_client, &mut &self.client) {
            Ok(flush) => {
                self.writable &= !flush.blocked;
                flush.moved
            }
            Err(e) => {
                log::debug!("conn={} client write failed: {e}", self.id);
                self.fail_client(now);
                true
            }
        }
    }

    /// Like [`Conn::write_client`] for the downstream, once connected.
    fn write_downstream(&mut self, now: Instant, registry: &Registry) -> bool {
        let Some(ds) = self.downstream.as_deref_mut() else {
            return false;
        };
        if ds.connecting || !ds.writable {
            return false;
        }
        if ds.tls.is_some() {
            return match ds.write_tls() {
                Ok(moved) => moved,
                Err(e) => {
                    log::debug!("conn={} downstream write failed: {e}", self.id);
                    self.fail_downstream(now, registry);
                    true
                }
            };
        }
        if ds.to_downstream.is_empty() {
            return false;
        }
        match write_out(&ds.stream, &mut ds.to_downstream) {
            Ok(Flushed::All) => true,
            Ok(Flushed::Blocked(written)) => {
                ds.writable = false;
                written
            }
            Err(e) => {
                log::debug!("conn={} downstream write failed: {e}", self.id);
                self.fail_downstream(now, registry);
                true
            }
        }
    }

    fn shrink_idle_buffers(&mut self) {
        shrink_if_empty(&mut self.input);
        shrink_if_empty(&mut self.to_client);
        if let Some(ds) = self.downstream.as_deref_mut() {
            shrink_if_empty(&mut ds.input);
            shrink_if_empty(&mut ds.to_downstream);
        }
    }
}

impl DownstreamConn {
    fn may_read(&self, max_input: usize) -> bool {
        let open = !self.connecting && !self.eof && self.input.len() < max_input;
        match self.tls.as_deref() {
            None => open && self.readable,
            Some(tls) => open && ((self.readable && tls.wants_read()) || tls.has_plaintext()),
        }
    }

    /// Over TLS: the outbox into rustls (as much as its bounded buffer takes) and rustls'
    /// records to the socket, until both are empty or the socket would block. Returns whether
    /// anything moved.
    fn write_tls(&mut self) -> io::Result<bool> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return Ok(false);
        };
        let flush = tls.flush(&mut self.to_downstream, &mut &self.stream)?;
        self.writable &= !flush.blocked;
        Ok(flush.moved)
    }

    /// The session closes this connection: what it queued last (a QUIT) goes out
    /// ([`write_last`]).
    fn flush_before_close(&mut self) {
        write_last(
            &self.stream,
            self.tls.as_deref_mut(),
            &mut self.to_downstream,
        );
    }
}

/// The last bytes on a connection about to be dropped (a downstream's QUIT, or what was handed
/// out before it), in one nonblocking attempt, best effort; over TLS followed by `close_notify`
/// once the handshake is done, so the peer sees a clean end. A connection still handshaking
/// gets nothing more: its TLS state is unknown.
pub(crate) fn write_last(stream: &TcpStream, tls: Option<&mut TlsStream>, last: &mut Vec<u8>) {
    match tls {
        None => {
            let _ = write_out(stream, last);
        }
        Some(tls) if tls.is_handshaking() => {}
        Some(tls) => {
            let _ = tls.flush(last, &mut &*stream);
            tls.send_close_notify();
            let _ = tls.flush(&mut Vec::new(), &mut &*stream);
        }
    }
}

/// Gives downstream `bytes` (just read from `ds`) to the session, keeping what it does not
/// take behind anything older in `ds.input` (the common case needs no copy).
fn feed_downstream(session: &mut Session, ds: &mut DownstreamConn, now: Instant, bytes: &[u8]) {
    if ds.input.is_empty() {
        let used = session.handle_downstream(now, ds.link, DownstreamEvent::Data(bytes));
        ds.input
            .extend_from_slice(bytes.get(used..).unwrap_or_default());
    } else {
        ds.input.extend_from_slice(bytes);
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

/// How far [`write_out`] got.
enum Flushed {
    /// The buffer is empty.
    All,
    /// The socket would block; whether anything was written first.
    Blocked(bool),
}

/// Writes `buf` to `stream` until it is empty or the socket would block, and removes what was
/// written from its front.
fn write_out(mut stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<Flushed> {
    let mut written = 0;
    let result = loop {
        let Some(rest) = buf.get(written..).filter(|rest| !rest.is_empty()) else {
            break Ok(Flushed::All);
        };
        match stream.write(rest) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                break Ok(Flushed::Blocked(written > 0));
            }
            Err(e) => break Err(e),
        }
    };
    buf.drain(..written.min(buf.len()));
    result
}

fn shrink_if_empty(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > SHRINK_ABOVE {
        *buf = Vec::new();
    }
}
