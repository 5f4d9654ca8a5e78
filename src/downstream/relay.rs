//! The relay: one session's downstream connection as a small sans-IO machine. It opens the
//! connection (a pooled one when allowed), drives its handshake ([`Handshake`]), queues the
//! transaction commands and the body the session hands it, reads the downstream's replies,
//! keeps its own deadline, and releases the connection to the pool or closes it. It never
//! touches a socket or a clock: the session (`crate::smtp::session`) feeds it the driver's
//! events with the time and gets back what concerns the client (`Event`), and what the
//! driver must do with a connection goes out as `LinkIo`, in order with the session's own
//! actions.
//!
//! # Lifecycle of a connection
//! ```text
//! start_mail ──(none)──▶ Connecting ──Connected──▶ Handshaking ──Step::Ready──▶ Ready
//!           ──(every server down)──▶ Failed at once, nothing connected
//!                        Connecting ──ConnectFailed / timeout──▶ next server, or Failed
//!                        Handshaking ──421 banner / no banner / closed before it──▶ next server, or Failed
//!           ──(pooled)─▶ Connecting ──Reused──▶ Handshaking (renewed for this client)
//! Handshaking ──Step::StartTls──▶ StartingTls ──TlsEstablished──▶ Handshaking
//! Ready ──start_mail──▶ Ready, or Handshaking (a fresh XCLIENT), or retired for a new one
//! Ready ──send_*──▶ Ready (a command in flight: its reply comes back as Event::Reply)
//! Ready ──reset──▶ Ready (RSET queued, its reply read and dropped)
//! any ──Closed / malformed reply / timeout / refusal──▶ gone (Event::Failed)
//! Ready, nothing in flight or queued ──release──▶ back to the pool
//! any ──close (the session gives up on it: a client refusal, an unexpected reply)──▶ gone
//! ```
//!
//! # Which server (DESIGN.md §8)
//! The shared [`Health`] table chooses: the first server of the session's order
//! (`balance`), the next one not down after a failure, a down server's probe when it is due.
//! The relay tells it each failure before or at a banner (a failed or late connect, a `421`
//! banner, no banner in time, a close before it) and each banner that is not `421`. A
//! connect that timed out while waiting for a place in the multiplexing pool
//! ([`DownstreamEvent::PoolWait`]) is no failure of the server. Without a table (a session
//! nobody gave one) the servers are tried in order and nothing is remembered.
//!
//! # Transparent sessions (DESIGN.md §9)
//! A session accepted on a `[transparent] listen` socket has a [`Destination`]: the address
//! its client connected to. Its connections go there and nowhere else: never to
//! `[downstream] servers`, never through the pool or the health table, never on to another
//! server after a failure (the client meant that host). With `spoof_source` they are made
//! from the client's own address ([`Via::Transparent`]) and announce nothing: the TCP
//! connection already says who the client is.
//!
//! # Bytes belong to one connection (DESIGN.md §6)
//! Each connection gets a new [`LinkId`]. The bytes queued for it live in its own outbox and
//! die with it: `Relay::poll_transmit` hands them out only for that id, so nothing queued
//! for one connection can reach another. Until the connection is ready only its handshake
//! writes to the outbox; transaction commands are queued only on a ready connection.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use crate::config::{AnnounceClient, Config, DownstreamMode, DownstreamTls};
use crate::downstream::dialog::{Carried, ClientIdentity, Handshake, Step, announcement_refused};
use crate::downstream::health::{Health, Pick, Route};
use crate::downstream::warnings;
use crate::smtp::command::{Body, MailParams};
use crate::smtp::reply::{Reply, Status, parse_reply};

/// Outbox capacity kept after its bytes were handed out; a larger buffer (a body's) is
/// freed, so a connection between transactions stays small.
const KEEP_CAPACITY: usize = 4 * 1024;

/// What tarmac sends on its own to keep a connection in step with the client's `RSET`.
const RSET: &[u8] = b"RSET\r\n";

/// What tarmac sends on its own to keep a connection alive while a message is held.
const NOOP: &[u8] = b"NOOP\r\n";

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
    /// `mode = "multiplexing"`: no place in the pool yet, so the connect waits in the pool's
    /// line (its connect timeout runs on); a timeout while waiting is no failure of the server.
    PoolWait,
    /// After [`DownstreamEvent::PoolWait`]: its turn came and the connect has started.
    PoolTurn,
}

/// How the driver gets a downstream connection (`Action::ConnectDownstream`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// One of `[downstream] servers`: in `mode = "multiplexing"` through the worker's pool (an
    /// idle pooled connection when `pooled`), else a new connection from the host.
    Server {
        /// An idle pooled connection may be used (`false`: a pooled one could not speak for
        /// this client, so it must be a new one).
        pooled: bool,
    },
    /// A transparent session's original destination (DESIGN.md §9): always a new connection
    /// of its own, never pooled; made from `from` (the client's address, `spoof_source`) with
    /// `IP_TRANSPARENT`, or from the host when `None`.
    Transparent {
        /// The source address to bind before connecting; the port is the kernel's choice.
        from: Option<IpAddr>,
    },
}

/// Where a transparent session relays (DESIGN.md §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Destination {
    /// The address and port the client connected to.
    pub(crate) addr: SocketAddr,
    /// `spoof_source`: the client's address, to connect from.
    pub(crate) from: Option<IpAddr>,
}

/// What the driver must do with a downstream connection; the session passes each on as the
/// `Action` of the same name, in order with its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LinkIo {
    /// `Action::ConnectDownstream`.
    Connect {
        link: LinkId,
        addr: SocketAddr,
        via: Via,
    },
    /// `Action::StartTlsDownstream`.
    StartTls(LinkId),
    /// `Action::ReleaseDownstream`.
    Release { link: LinkId, carried: Carried },
    /// `Action::CloseDownstream`.
    Close { link: LinkId, quit: bool },
}

/// What a relay call means for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The connection is ready to carry this client's transaction: MAIL may go.
    Ready,
    /// The downstream's reply to the transaction command in flight (or an unsolicited one).
    Reply(Reply),
    /// The connection is gone (`why`, for the log): the client's waiting command gets
    /// `reply`, a `4xx` unless the downstream's own verdict on the client is passed back.
    Failed { why: &'static str, reply: Reply },
}

/// What [`Relay::read`] made of the downstream's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Read {
    /// One reply, `used` bytes long, and what it means for the client.
    Reply(usize, Option<Event>),
    /// No whole reply yet: offer the bytes again with more.
    Partial,
    /// None of the bytes may be read as replies (no connection; plain text after the `220`
    /// to STARTTLS; a malformed reply, which failed the connection): drop them all.
    Discard(Option<Event>),
}

/// What the relay needs from the session on each call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Context<'a> {
    pub(crate) now: Instant,
    /// The configuration the session decides with.
    pub(crate) config: &'a Config,
    /// The client the connection is to speak for.
    pub(crate) who: ClientIdentity<'a>,
    /// The downstream servers' health, shared by the workers; `None`: servers tried in
    /// order, nothing remembered.
    pub(crate) health: Option<&'a Health>,
    /// A transparent session's original destination: its only downstream.
    pub(crate) destination: Option<Destination>,
}

/// The relay: at most one downstream connection at a time, and the id the next one gets.
/// The connection is boxed: most sessions (and every tarpitted one) never open one.
#[derive(Debug, Default)]
pub(crate) struct Relay {
    conn: Option<Box<Conn>>,
    /// The id the next connection gets.
    next_link: u32,
}

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Connecting,
    Handshaking,
    /// `LinkIo::StartTls` is out: no reply is read until the driver reports.
    StartingTls,
    Ready,
}

/// One downstream connection.
#[derive(Debug)]
struct Conn {
    /// Which connection this is; events and bytes for any other are not this one's.
    id: LinkId,
    /// Where it goes.
    target: Target,
    /// The server's address, for the health table and log lines.
    addr: SocketAddr,
    /// Multiplexing: waiting for a place in the pool ([`DownstreamEvent::PoolWait`]).
    pool_wait: bool,
    link: Link,
    handshake: Handshake,
    /// Bytes for this connection not yet handed out; they die with it.
    outbox: Vec<u8>,
    /// When the connect (`timeouts.connect`) or the awaited reply (`timeouts.command`) is late.
    deadline: Option<Instant>,
    /// Replies to commands tarmac sent on its own (RSET), to be read and dropped.
    swallow: u32,
    /// A MAIL was sent on this connection since the last reset.
    in_transaction: bool,
    /// Part of a body was sent: closing now must not send anything (no dot, no QUIT).
    mid_data: bool,
    /// Bytes at the head of the outbox (the trace header) handed out only together with what
    /// follows them (the body's first bytes, or the final dot), so both leave in one write.
    held: usize,
    /// A second connection after a failed TLS handshake under `opportunistic`: plain text, as
    /// Postfix retries (`Step::RetryWithoutTls`).
    plain_retry: bool,
}

/// Where a connection goes.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// `config.downstream.servers[index]`, the session's order over the servers standing at
    /// `route`: the next server on failure.
    Server { index: usize, route: Route },
    /// A transparent session's original destination: no other on failure.
    Destination(Destination),
}

/// How a connection to `target` announces the client: as `announce_client` says, except that
/// a connection made from the client's own address (`spoof_source`) needs no announcement.
fn announcement(config: &Config, target: Target) -> AnnounceClient {
    match target {
        Target::Destination(Destination { from: Some(_), .. }) => AnnounceClient::None,
        _ => config.downstream.announce_client,
    }
}

/// The reply to a client command whose downstream failed: a `4xx`, so the sender retries.
pub(crate) fn downstream_lost() -> Reply {
    Reply::new(
        451,
        "4.4.2",
        "Error: downstream server unavailable, please try again later",
    )
}

impl Relay {
    // ---- opening and feeding ----

    /// MAIL is wanted for `ctx.who`: on the connection in use once it speaks for this client
    /// (renewed with a fresh XCLIENT when it served someone else, or retired), on the one
    /// still being set up once it is ready ([`Event::Ready`] then), or on a new one.
    pub(crate) fn start_mail<A: From<LinkIo>>(
        &mut self,
        ctx: &Context<'_>,
        io: &mut VecDeque<A>,
    ) -> Option<Event> {
        let step = match self.conn.as_deref_mut() {
            Some(conn) if conn.link == Link::Ready => {
                let step = conn.handshake.renew(&ctx.who, &mut conn.outbox);
                if step != Step::Ready {
                    conn.link = Link::Handshaking;
                }
                step
            }
            // Still connecting or handshaking: MAIL goes out when the handshake is done.
            Some(_) => return None,
            None => {
                if let Some(destination) = ctx.destination {
                    let target = Target::Destination(destination);
                    return self.connect(ctx, target, false, false, io);
                }
                let route = match ctx.health {
                    Some(health) => health.route(&ctx.config.downstream),
                    None => Route::in_order(),
                };
                return self.connect_next(ctx, route, "all servers down", io);
            }
        };
        self.on_step(ctx, step, io)
    }

    /// An event of connection `link`, which must be the one in use ([`Relay::is_current`]).
    /// `Data` goes to [`Relay::read`] instead and is ignored here.
    pub(crate) fn handle_event<A: From<LinkIo>>(
        &mut self,
        ctx: &Context<'_>,
        event: DownstreamEvent<'_>,
        io: &mut VecDeque<A>,
    ) -> Option<Event> {
        let conn = self.conn.as_deref_mut()?;
        match event {
            DownstreamEvent::Connected => {
                conn.link = Link::Handshaking;
                conn.handshake.handle_connected(&ctx.who, &mut conn.outbox);
                conn.deadline = Some(ctx.now + ctx.config.timeouts.command);
                None
            }
            DownstreamEvent::Reused(carried) => {
                let (handshake, step) = Handshake::resume(
                    &ctx.config.server.hostname,
                    announcement(ctx.config, conn.target),
                    carried,
                    &ctx.who,
                    &mut conn.outbox,
                );
                conn.handshake = handshake;
                conn.link = Link::Handshaking;
                self.on_step(ctx, step, io)
            }
            DownstreamEvent::ConnectFailed => self.try_next_server(ctx, "connect failed", io),
            DownstreamEvent::Closed
                if conn.link == Link::Handshaking && !conn.handshake.is_greeted() =>
            {
                self.try_next_server(ctx, "closed before the banner", io)
            }
            DownstreamEvent::PoolWait => {
                conn.pool_wait = conn.link == Link::Connecting;
                None
            }
            DownstreamEvent::PoolTurn => {
                conn.pool_wait = false;
                None
            }
            DownstreamEvent::Closed => {
                // Nothing more can be written to it, QUIT included: closed without one.
                io.push_back(
                    LinkIo::Close {
                        link: conn.id,
                        quit: false,
                    }
                    .into(),
                );
                self.conn = None;
                self.fail("connection closed", downstream_lost(), io)
            }
            DownstreamEvent::TlsEstablished if conn.link == Link::StartingTls => {
                conn.link = Link::Handshaking;
                let step = conn.handshake.handle_tls_established(&mut conn.outbox);
                self.on_step(ctx, step, io)
            }
            DownstreamEvent::TlsEstablished => {
                self.fail("TLS reported without STARTTLS", downstream_lost(), io)
            }
            DownstreamEvent::TlsFailed => self.tls_failed(ctx, io),
            DownstreamEvent::Data(_) => None,
        }
    }

    /// Reads one reply from `bytes`, the downstream's input the driver holds. `client_waits`:
    /// the session waits for a reply (or an answer) before it reads the client on, so a
    /// swallowed `RSET` reply leaves the reply timer running for it.
    pub(crate) fn read<A: From<LinkIo>>(
        &mut self,
        ctx: &Context<'_>,
        bytes: &[u8],
        client_waits: bool,
        io: &mut VecDeque<A>,
    ) -> Read {
        let Some(conn) = self.conn.as_deref_mut() else {
            return Read::Discard(None);
        };
        if conn.link == Link::StartingTls {
            // Whatever followed the 220 to STARTTLS came in plain text: never a reply.
            return Read::Discard(None);
        }
        let (reply, used) = match parse_reply(bytes) {
            Ok(Status::Complete(complete)) => complete,
            Ok(Status::Partial) => return Read::Partial,
            Err(_) => return Read::Discard(self.fail("malformed reply", downstream_lost(), io)),
        };
        // Replies come in order: those to commands tarmac sent on its own (RSET) before
        // anything sent after them, a renewed handshake's XCLIENT included.
        if conn.swallow > 0 {
            conn.swallow -= 1;
            if conn.swallow == 0 && !client_waits {
                conn.deadline = None;
            }
            let event = if reply.code / 100 == 2 {
                None
            } else {
                self.fail("reset refused", downstream_lost(), io)
            };
            return Read::Reply(used, event);
        }
        if conn.link == Link::Handshaking {
            if !conn.handshake.is_greeted() {
                // The banner: whether the server is up.
                if reply.code == 421 {
                    return Read::Reply(used, self.try_next_server(ctx, "421 banner", io));
                }
                if let (Some(health), Target::Server { .. }) = (ctx.health, conn.target) {
                    health.succeeded(conn.addr);
                }
            }
            let step = conn
                .handshake
                .handle_reply(reply, &ctx.who, &mut conn.outbox);
            return Read::Reply(used, self.on_step(ctx, step, io));
        }
        conn.deadline = None;
        Read::Reply(used, Some(Event::Reply(reply)))
    }

    /// Handles the deadline when it has passed at `ctx.now`; a no-op when called early.
    pub(crate) fn handle_timeout<A: From<LinkIo>>(
        &mut self,
        ctx: &Context<'_>,
        io: &mut VecDeque<A>,
    ) -> Option<Event> {
        let conn = self.conn.as_deref_mut()?;
        if conn.deadline.is_none_or(|at| at > ctx.now) {
            return None;
        }
        conn.deadline = None;
        match conn.link {
            Link::Connecting => self.try_next_server(ctx, "connect timeout", io),
            Link::Handshaking if !conn.handshake.is_greeted() => {
                self.try_next_server(ctx, "no banner", io)
            }
            // Postfix counts a stalled handshake as a failed one.
            Link::StartingTls => self.tls_failed(ctx, io),
            Link::Handshaking | Link::Ready => self.fail("timeout", downstream_lost(), io),
        }
    }

    // ---- the transaction ----

    /// Queues MAIL from `from` with the parameters the downstream offers, and waits for its
    /// reply. Returns false, queuing nothing, without a ready connection.
    pub(crate) fn send_mail(
        &mut self,
        now: Instant,
        config: &Config,
        from: &str,
        params: &MailParams,
    ) -> bool {
        let Some(conn) = self.ready() else {
            return false;
        };
        let caps = conn.handshake.capabilities();
        let mut command = format!("MAIL FROM:<{from}>");
        if let Some(size) = params.size
            && caps.size
        {
            command.push_str(&format!(" SIZE={size}"));
        }
        match params.body {
            Some(Body::EightBitMime) if caps.eight_bit_mime => command.push_str(" BODY=8BITMIME"),
            Some(Body::SevenBit) if caps.eight_bit_mime => command.push_str(" BODY=7BIT"),
            _ => {}
        }
        if params.smtputf8 && caps.smtputf8 {
            command.push_str(" SMTPUTF8");
        }
        command.push_str("\r\n");
        conn.in_transaction = true;
        self.queue(now, config, command.as_bytes())
    }

    /// Queues RCPT to `to` (see [`Relay::send_mail`]).
    pub(crate) fn send_rcpt(&mut self, now: Instant, config: &Config, to: &str) -> bool {
        self.queue(now, config, format!("RCPT TO:<{to}>\r\n").as_bytes())
    }

    /// Queues DATA (see [`Relay::send_mail`]).
    pub(crate) fn send_data(&mut self, now: Instant, config: &Config) -> bool {
        self.queue(now, config, b"DATA\r\n")
    }

    /// The downstream said `354`: a body starts with what `header` writes (tarmac's
    /// `Received:` header). Those bytes wait in the outbox for the body's first bytes (or the
    /// final dot), so the downstream gets them in the same write; nothing when the connection
    /// is gone.
    pub(crate) fn start_body(&mut self, header: impl FnOnce(&mut Vec<u8>)) {
        let Some(conn) = self.conn.as_deref_mut() else {
            return;
        };
        conn.mid_data = true;
        header(&mut conn.outbox);
        conn.held = conn.outbox.len();
    }

    /// The outbox to encode the next body bytes to, while a body is being relayed; `None`
    /// once the connection is gone (the body is then read to its end and dropped).
    pub(crate) fn body(&mut self) -> Option<&mut Vec<u8>> {
        self.conn
            .as_deref_mut()
            .filter(|conn| conn.mid_data)
            .map(|conn| &mut conn.outbox)
    }

    /// Queues the body's final dot (see [`Relay::send_mail`]).
    pub(crate) fn send_dot(&mut self, now: Instant, config: &Config) -> bool {
        if let Some(conn) = self.ready() {
            conn.mid_data = false;
        }
        self.queue(now, config, b".\r\n")
    }

    /// The downstream ended the transaction (refused MAIL, or answered the final dot).
    pub(crate) fn end_transaction(&mut self) {
        if let Some(conn) = self.conn.as_deref_mut() {
            conn.in_transaction = false;
        }
    }

    /// The client reset its transaction: keep the downstream in step with `RSET`, whose reply
    /// is read and dropped.
    pub(crate) fn reset(&mut self) {
        if let Some(conn) = self.conn.as_deref_mut()
            && conn.in_transaction
        {
            conn.in_transaction = false;
            conn.swallow += 1;
            conn.outbox.extend_from_slice(RSET);
        }
    }

    /// Keeps a connection that waits for a held message alive (DESIGN.md §7): NOOP, whose
    /// reply is read and dropped. Only on a ready connection with nothing queued.
    pub(crate) fn send_noop(&mut self) {
        if let Some(conn) = self.conn.as_deref_mut()
            && conn.link == Link::Ready
            && conn.outbox.is_empty()
            && !conn.mid_data
        {
            conn.swallow += 1;
            conn.outbox.extend_from_slice(NOOP);
        }
    }

    // ---- letting go ----

    /// `mode = "multiplexing"`: hands the connection back to the pool once no reply is
    /// outstanding and nothing is left to send, so it serves the next transaction, of this
    /// client or another (announced afresh). `abandoned`: the client is gone, and an open
    /// transaction goes along marked for `RSET`; otherwise only a connection with no
    /// transaction open is released. Returns whether it did.
    pub(crate) fn release<A: From<LinkIo>>(
        &mut self,
        config: &Config,
        abandoned: bool,
        io: &mut VecDeque<A>,
    ) -> bool {
        if config.downstream.mode != DownstreamMode::Multiplexing {
            return false;
        }
        let Some(conn) = self
            .conn
            .as_deref_mut()
            .filter(|conn| matches!(conn.target, Target::Server { .. }))
        else {
            return false;
        };
        // RSETs not handed out yet (the client reset, then left): the next user's own RSET
        // does the same, so they need not be sent.
        let unsent_resets = abandoned
            && conn.swallow > 0
            && conn.outbox.len() == RSET.len() * conn.swallow as usize
            && conn.outbox.chunks(RSET.len()).all(|chunk| chunk == RSET);
        if unsent_resets {
            conn.outbox.clear();
            conn.swallow = 0;
            conn.in_transaction = true;
        }
        let clean = conn.link == Link::Ready
            && conn.swallow == 0
            && !conn.mid_data
            && conn.outbox.is_empty();
        if !clean || (conn.in_transaction && !abandoned) {
            return false;
        }
        let link = conn.id;
        let carried = conn.handshake.carried(conn.in_transaction);
        self.conn = None;
        io.push_back(LinkIo::Release { link, carried }.into());
        true
    }

    /// Closes the connection in use: politely (QUIT) once it greeted us, abruptly (nothing
    /// more sent) when a body is half-sent, so the partial message is never delivered, or when
    /// its state is unknown. What was not handed out for it is dropped.
    pub(crate) fn close<A: From<LinkIo>>(&mut self, io: &mut VecDeque<A>) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let quit = !conn.mid_data && conn.link != Link::Connecting && conn.handshake.may_quit();
        io.push_back(
            LinkIo::Close {
                link: conn.id,
                quit,
            }
            .into(),
        );
    }

    // ---- output and queries ----

    /// Appends the bytes for connection `link` to `out`; nothing when `link` is not the
    /// connection in use (its bytes died with it), nor while only the held trace header is
    /// queued (see [`Relay::start_body`]).
    pub(crate) fn poll_transmit(&mut self, link: LinkId, out: &mut Vec<u8>) {
        let Some(conn) = self.conn.as_deref_mut().filter(|conn| conn.id == link) else {
            return;
        };
        if conn.held > 0 && conn.outbox.len() <= conn.held {
            // Only the held header so far: it goes with what follows it.
            return;
        }
        conn.held = 0;
        out.append(&mut conn.outbox);
        if conn.outbox.capacity() > KEEP_CAPACITY {
            conn.outbox = Vec::new();
        }
    }

    /// When the connect or the awaited reply is late, if anything is awaited.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.conn.as_deref().and_then(|conn| conn.deadline)
    }

    /// Whether `link` is the connection in use.
    pub(crate) fn is_current(&self, link: LinkId) -> bool {
        self.conn.as_deref().is_some_and(|conn| conn.id == link)
    }

    /// Whether a ready connection carries the client's open transaction (MAIL was relayed).
    pub(crate) fn is_in_transaction(&self) -> bool {
        self.conn
            .as_deref()
            .is_some_and(|conn| conn.link == Link::Ready && conn.in_transaction)
    }

    /// Bytes queued for the connection in use, not handed out yet.
    pub(crate) fn outbox_len(&self) -> usize {
        self.conn.as_deref().map_or(0, |conn| conn.outbox.len())
    }

    /// The address of the server in use, for log lines.
    pub(crate) fn server_addr(&self) -> Option<SocketAddr> {
        self.conn.as_deref().map(|conn| conn.addr)
    }

    // ---- private ----

    /// Opens a connection to `target` (a pooled one when `pooled` allows and the target is
    /// a server); `plain_retry` turns STARTTLS off for it. Any connection still in use is
    /// closed first.
    fn connect<A: From<LinkIo>>(
        &mut self,
        ctx: &Context<'_>,
        target: Target,
        plain_retry: bool,
        pooled: bool,
        io: &mut VecDeque<A>,
    ) -> Option<Event> {
        self.close(io);
        let config = &ctx.config.downstream;
        let (addr, via) = match target {
            Target::Server { index, .. } => match config.servers.get(index) {
                Some(&addr) => (addr, Via::Server { pooled }),
                None => return self.fail("no server reachable", downstream_lost(), io),
            },
            Target::Destination(destination) => (
                destination.addr,
                Via::Transparent {
                    from: destination.from,
                },
            ),
        };
        let tls = if plain_retry {
            DownstreamTls::None
        } else {
            config.tls
        };
        let link = LinkId(self.next_link);
        self.next_link = self.next_link.wrapping_add(1);
        self.conn = Some(Box::new(Conn {
            id: link,
            target,
            addr,
            pool_wait: false,
            link: Link::Connecting,
            handshake: Handshake::new(
                &ctx.config.server.hostname,
                announcement(ctx.config, target),
            )
            .with_tls(tls),
            outbox: Vec::new(),
            deadline: Some(ctx.now + ctx.config.timeouts.connect),
            swallow: 0,
            in_transaction: false,
            mid_data: false,
            held: 0,
            plain_retry,
        }));
        io.push_back(LinkIo::Connect { link, addr, via }.into());
        None
    }

    /// The connection failed before or at its banner (`why`): the server's failure is
    /// recorded (unless the connect only waited for a place in the pool), then the next
    /// server along the session's order, or give up.
    fn try_next_server<A: From<LinkIo>>(
        &mut self,
        ctx: &Context<'_>,
        why: &str,
        io: &mut VecDeque<A>,
    ) -> Option<Event> {
        let conn = self.conn.as_deref()?;
        let (target, addr) = (conn.target, conn.addr);
        log::debug!("downstream {addr}: {why}");
        let Target::Server { route, .. } = target else {
            // The client's own destination: there is no other to try.
            return self.fail("destination unreachable", downstream_lost(), io);
        };
        if let (Some(health), false) = (ctx.health, conn.pool_wait) {
            health.failed(&ctx.config.downstream, addr, why, ctx.now);
        }
        self.close(io);
        self.connect_next(ctx, route, "no server reachable", io)
    }

    /// A connection to the next server along `route` that is not down (or whose probe is
    /// due); none left: the client's waiting command gets `451 4.4.2` at once (`why`).
    fn connect_next<A: From<LinkIo>>(
        &mut self,
        ctx: &Context<'_>,
        mut route: Route,
        why: &'static str,
        io: &mut VecDeque<A>,
    ) -> Option<Event> {
        let config = &ctx.config.downstream;
        let pick = match ctx.health {
            Some(health) => health.pick(config, &mut route, ctx.now),
            None => route.advance(config.servers.len()).map(|server| Pick {
                server,
                probe: false,
            }),
        };
        match pick {
            // A probe tests the server: a new connection, never an idle pooled one.
            Some(pick) => {
                let target = Target::Server {
                    index: pick.server,
                    route,
                };
                self.connect(ctx, target, false, !pick.probe, io)
            }
            None => {
                self.close(io);
                self.fail(why, downstream_lost(), io)
            }
        }
    }

    /// The TLS handshake towards the downstream failed or stalled.
    fn tls_failed<A: From<LinkIo>>(
        &mut self,
        ctx: &Context<'_>,
        io: &mut VecDeque<A>,
    ) -> Option<Event> {
        let step = self.conn.as_deref_mut().and_then(|conn| {
            (conn.link == Link::StartingTls).then(|| conn.handshake.handle_tls_failed())
        });
        match step {
            Some(step) => self.on_step(ctx, step, io),
            None => self.fail("TLS failure without STARTTLS", downstream_lost(), io),
        }
    }

    /// Acts on what the handshake asks for next.
    fn on_step<A: From<LinkIo>>(
        &mut self,
        ctx: &Context<'_>,
        step: Step,
        io: &mut VecDeque<A>,
    ) -> Option<Event> {
        let server = self.server_addr();
        let conn = self.conn.as_deref_mut()?;
        match step {
            Step::Continue => {
                conn.deadline = Some(ctx.now + ctx.config.timeouts.command);
                None
            }
            Step::Ready => {
                conn.link = Link::Ready;
                conn.deadline = None;
                Some(Event::Ready)
            }
            Step::Failed(reply) => {
                log::warn!(
                    "downstream {} refused the handshake: {} {}",
                    server.map_or_else(String::new, |a| a.to_string()),
                    reply.code,
                    reply.lines.first().map_or("", String::as_str)
                );
                self.fail("handshake refused", downstream_lost(), io)
            }
            Step::AnnouncementRefused(reply) => {
                if let Some(server) = server {
                    warnings::announcement_refused(server, reply.as_ref(), ctx.now);
                }
                self.fail("XCLIENT refused", announcement_refused(), io)
            }
            Step::Retire => {
                if let Some(addr) = server {
                    let announce = ctx.config.downstream.announce_client;
                    warnings::connection_retired(addr, announce, ctx.now);
                }
                // A new connection, never a pooled one: that one might be as unfit.
                let target = conn.target;
                self.connect(ctx, target, false, false, io)
            }
            Step::Refused(reply) => {
                log::info!(
                    "downstream refused the HELO name of {}: {} {}",
                    ctx.who.client,
                    reply.code,
                    reply.lines.first().map_or("", String::as_str)
                );
                self.fail("client's HELO refused", reply, io)
            }
            Step::StartTls => {
                conn.link = Link::StartingTls;
                conn.deadline = Some(ctx.now + ctx.config.timeouts.command);
                io.push_back(LinkIo::StartTls(conn.id).into());
                None
            }
            Step::RetryWithoutTls => {
                log::info!(
                    "downstream TLS handshake failed for {}; retrying in plain text",
                    ctx.who.client
                );
                if conn.plain_retry {
                    self.fail("TLS retry failed", downstream_lost(), io)
                } else {
                    let target = conn.target;
                    self.connect(ctx, target, true, false, io)
                }
            }
            Step::TlsFailed(failure) => {
                log::warn!(
                    "downstream TLS required but failed for {}: {failure}",
                    ctx.who.client
                );
                self.fail("TLS required", failure.client_reply(), io)
            }
        }
    }

    /// Gives up the connection: the client's waiting command gets `reply`.
    fn fail<A: From<LinkIo>>(
        &mut self,
        why: &'static str,
        reply: Reply,
        io: &mut VecDeque<A>,
    ) -> Option<Event> {
        self.close(io);
        Some(Event::Failed { why, reply })
    }

    /// Queues a transaction command on the ready connection and waits for its reply; false
    /// when there is none, and nothing is queued anywhere.
    fn queue(&mut self, now: Instant, config: &Config, command: &[u8]) -> bool {
        let Some(conn) = self.ready() else {
            return false;
        };
        conn.outbox.extend_from_slice(command);
        conn.deadline = Some(now + config.timeouts.command);
        true
    }

    /// The connection in use, when it is ready for transaction commands.
    fn ready(&mut self) -> Option<&mut Conn> {
        self.conn
            .as_deref_mut()
            .filter(|conn| conn.link == Link::Ready)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::AnnounceClient;

    /// A relay, its configuration, the time and the I/O it asked for.
    struct Fixture {
        config: Config,
        now: Instant,
        relay: Relay,
        io: VecDeque<LinkIo>,
        /// The servers' health, when the test gives one.
        health: Option<Health>,
        /// A transparent session's destination, when the test gives one.
        destination: Option<Destination>,
    }

    impl Fixture {
        fn new(servers: u16, mode: DownstreamMode) -> Fixture {
            let mut config = Config::default();
            config.server.hostname = "mx.test".to_owned();
            config.downstream.servers = (0..servers)
                .map(|i| SocketAddr::from(([127, 0, 0, 1], 10025 + i)))
                .collect();
            config.downstream.mode = mode;
            config.downstream.announce_client = AnnounceClient::None;
            config.downstream.tls = DownstreamTls::None;
            Fixture {
                config,
                now: Instant::now(),
                relay: Relay::default(),
                io: VecDeque::new(),
                health: None,
                destination: None,
            }
        }

        /// The same with connection `LinkId(0)` ready, its handshake handed out.
        fn ready(servers: u16, mode: DownstreamMode) -> Fixture {
            let mut f = Fixture::new(servers, mode);
            assert_eq!(f.start_mail(), None);
            assert_eq!(f.event(DownstreamEvent::Connected), None);
            assert_eq!(f.reply(b"220 ds.test ESMTP\r\n"), None);
            assert_eq!(f.take(LinkId(0)), b"EHLO mx.test\r\n");
            let ehlo = b"250-ds.test\r\n250 8BITMIME\r\n";
            assert_eq!(f.reply(ehlo), Some(Event::Ready));
            f.io.clear();
            f
        }

        fn start_mail(&mut self) -> Option<Event> {
            let ctx = context(
                &self.config,
                self.now,
                self.health.as_ref(),
                self.destination,
            );
            self.relay.start_mail(&ctx, &mut self.io)
        }

        fn event(&mut self, event: DownstreamEvent<'_>) -> Option<Event> {
            let ctx = context(
                &self.config,
                self.now,
                self.health.as_ref(),
                self.destination,
            );
            self.relay.handle_event(&ctx, event, &mut self.io)
        }

        fn read(&mut self, bytes: &[u8]) -> Read {
            let ctx = context(
                &self.config,
                self.now,
                self.health.as_ref(),
                self.destination,
            );
            self.relay.read(&ctx, bytes, true, &mut self.io)
        }

        /// Feeds a whole reply; returns what it meant for the client.
        fn reply(&mut self, text: &[u8]) -> Option<Event> {
            match self.read(text) {
                Read::Reply(used, event) if used == text.len() => event,
                other => panic!("{other:?} for {:?}", String::from_utf8_lossy(text)),
            }
        }

        fn timeout(&mut self, at: Instant) -> Option<Event> {
            let ctx = context(&self.config, at, self.health.as_ref(), self.destination);
            self.relay.handle_timeout(&ctx, &mut self.io)
        }

        fn send_mail(&mut self) -> bool {
            let params = MailParams::default();
            self.relay
                .send_mail(self.now, &self.config, "a@b.test", &params)
        }

        fn release(&mut self, abandoned: bool) -> bool {
            self.relay.release(&self.config, abandoned, &mut self.io)
        }

        /// Everything the relay has for `link` now.
        fn take(&mut self, link: LinkId) -> Vec<u8> {
            let mut out = Vec::new();
            self.relay.poll_transmit(link, &mut out);
            out
        }

        fn io(&mut self) -> Vec<LinkIo> {
            self.io.drain(..).collect()
        }
    }

    fn context<'a>(
        config: &'a Config,
        now: Instant,
        health: Option<&'a Health>,
        destination: Option<Destination>,
    ) -> Context<'a> {
        Context {
            now,
            config,
            who: ClientIdentity {
                client: "192.0.2.7:53211".parse().unwrap(),
                local: "198.51.100.1:25".parse().unwrap(),
                helo: b"client.test",
                esmtp: true,
                name: "[UNAVAILABLE]",
            },
            health,
            destination,
        }
    }

    fn failed(why: &'static str) -> Option<Event> {
        Some(Event::Failed {
            why,
            reply: downstream_lost(),
        })
    }

    #[test]
    fn a_new_link_gets_only_its_handshake_until_ready() {
        let mut f = Fixture::new(1, DownstreamMode::Synchronous);
        assert_eq!(f.start_mail(), None);
        let addr = f.config.downstream.servers[0];
        let connect = LinkIo::Connect {
            link: LinkId(0),
            addr,
            via: Via::Server { pooled: true },
        };
        assert_eq!(f.io(), [connect]);
        // Connecting, then handshaking: no transaction command is taken, none is queued.
        assert!(!f.send_mail());
        assert!(!f.relay.send_rcpt(f.now, &f.config, "c@d.test"));
        assert_eq!(f.relay.outbox_len(), 0);
        assert_eq!(f.event(DownstreamEvent::Connected), None);
        assert!(!f.relay.send_data(f.now, &f.config));
        assert!(!f.relay.send_dot(f.now, &f.config));
        assert_eq!(f.reply(b"220 ds.test ESMTP\r\n"), None);
        assert!(!f.relay.send_rcpt(f.now, &f.config, "c@d.test"));
        assert_eq!(f.take(LinkId(0)), b"EHLO mx.test\r\n");
        assert_eq!(f.reply(b"250 ds.test\r\n"), Some(Event::Ready));
        assert!(f.send_mail());
        assert_eq!(f.take(LinkId(0)), b"MAIL FROM:<a@b.test>\r\n");
        assert_eq!(f.io(), []);
    }

    /// 198.51.100.25:25, where a transparent session's client connected.
    fn destination(from: Option<IpAddr>) -> Destination {
        Destination {
            addr: "198.51.100.25:25".parse().unwrap(),
            from,
        }
    }

    /// The client of `context`, as `spoof_source` connects from it.
    fn client_ip() -> IpAddr {
        "192.0.2.7".parse().unwrap()
    }

    #[test]
    fn a_transparent_session_connects_to_its_destination_and_nowhere_else() {
        // Multiplexing, health and two servers configured: none of it applies.
        let mut f = Fixture::new(2, DownstreamMode::Multiplexing);
        f.health = Some(Health::new());
        f.destination = Some(destination(Some(client_ip())));
        assert_eq!(f.start_mail(), None);
        let connect = LinkIo::Connect {
            link: LinkId(0),
            addr: "198.51.100.25:25".parse().unwrap(),
            via: Via::Transparent {
                from: Some(client_ip()),
            },
        };
        assert_eq!(f.io(), [connect]);
        // A failure is the client's answer: no other server is tried for it.
        assert_eq!(
            f.event(DownstreamEvent::ConnectFailed),
            failed("destination unreachable")
        );
        assert!(
            f.io()
                .iter()
                .all(|io| !matches!(io, LinkIo::Connect { .. })),
            "connected on to another host"
        );
        // Nor is it a server's failure: the table is for `[downstream] servers`.
        let health = f.health.as_ref().unwrap();
        let dest = destination(None).addr;
        assert_eq!(health.snapshot(&[dest]), [(dest, true, 0)]);
    }

    #[test]
    fn a_transparent_connection_is_never_pooled() {
        let mut f = Fixture::new(1, DownstreamMode::Multiplexing);
        f.destination = Some(destination(None));
        assert_eq!(f.start_mail(), None);
        assert!(matches!(
            f.io().as_slice(),
            [LinkIo::Connect {
                via: Via::Transparent { from: None },
                ..
            }]
        ));
        assert_eq!(f.event(DownstreamEvent::Connected), None);
        assert_eq!(f.reply(b"220 ds.test ESMTP\r\n"), None);
        assert_eq!(f.take(LinkId(0)), b"EHLO mx.test\r\n");
        assert_eq!(f.reply(b"250 ds.test\r\n"), Some(Event::Ready));
        // Clean, no transaction, even abandoned: it stays the session's, and closes with it.
        assert!(!f.release(false));
        assert!(!f.release(true));
        assert!(f.relay.is_current(LinkId(0)));
    }

    #[test]
    fn spoofing_the_source_announces_nothing_and_the_host_announces_the_client() {
        for (from, announced) in [(Some(client_ip()), false), (None, true)] {
            let mut f = Fixture::new(1, DownstreamMode::Synchronous);
            f.config.downstream.announce_client = AnnounceClient::Xclient;
            f.destination = Some(destination(from));
            assert_eq!(f.start_mail(), None);
            assert_eq!(f.event(DownstreamEvent::Connected), None);
            assert_eq!(f.reply(b"220 ds.test ESMTP\r\n"), None);
            assert_eq!(f.take(LinkId(0)), b"EHLO mx.test\r\n");
            let event = f.reply(b"250-ds.test\r\n250 XCLIENT ADDR NAME HELO PROTO PORT\r\n");
            let sent = String::from_utf8(f.take(LinkId(0))).unwrap();
            if announced {
                assert_eq!(event, None);
                assert!(
                    sent.starts_with("XCLIENT ") && sent.contains("ADDR=192.0.2.7"),
                    "{sent:?}"
                );
            } else {
                assert_eq!(event, Some(Event::Ready), "from {from:?}");
                assert_eq!(sent, "", "sent from the client's own address");
            }
        }
    }

    #[test]
    fn bytes_for_a_dropped_link_are_gone() {
        let mut f = Fixture::ready(1, DownstreamMode::Synchronous);
        assert!(f.send_mail());
        assert!(f.relay.outbox_len() > 0);
        assert_eq!(
            f.event(DownstreamEvent::Closed),
            failed("connection closed")
        );
        let close = LinkIo::Close {
            link: LinkId(0),
            quit: false,
        };
        assert_eq!(f.io(), [close]);
        assert_eq!(f.take(LinkId(0)), b"");
        // The next connection starts empty, and the old id gets nothing from it.
        assert_eq!(f.start_mail(), None);
        assert!(matches!(
            f.io().as_slice(),
            [LinkIo::Connect {
                link: LinkId(1),
                ..
            }]
        ));
        assert_eq!(f.relay.outbox_len(), 0);
        assert_eq!(f.event(DownstreamEvent::Connected), None);
        assert_eq!(f.reply(b"220 ds.test ESMTP\r\n"), None);
        assert_eq!(f.take(LinkId(0)), b"");
        assert_eq!(f.take(LinkId(1)), b"EHLO mx.test\r\n");
    }

    #[test]
    fn a_closed_link_takes_its_unsent_commands_along() {
        let mut f = Fixture::ready(1, DownstreamMode::Synchronous);
        assert!(f.send_mail());
        f.relay.close(&mut f.io);
        let close = LinkIo::Close {
            link: LinkId(0),
            quit: true,
        };
        assert_eq!(f.io(), [close]);
        assert_eq!(f.take(LinkId(0)), b"");
        assert!(!f.relay.is_current(LinkId(0)));
        assert_eq!(f.relay.poll_timeout(), None);
    }

    #[test]
    fn a_late_connect_goes_to_the_next_server_then_gives_up() {
        let mut f = Fixture::new(2, DownstreamMode::Synchronous);
        assert_eq!(f.start_mail(), None);
        f.io.clear();
        let deadline = f.relay.poll_timeout();
        assert_eq!(deadline, Some(f.now + f.config.timeouts.connect));
        let deadline = deadline.unwrap_or(f.now);
        // Early: nothing happens.
        assert_eq!(f.timeout(deadline - Duration::from_millis(1)), None);
        assert_eq!(f.io(), []);
        assert_eq!(f.timeout(deadline), None);
        let close = LinkIo::Close {
            link: LinkId(0),
            quit: false,
        };
        let connect = LinkIo::Connect {
            link: LinkId(1),
            addr: f.config.downstream.servers[1],
            via: Via::Server { pooled: true },
        };
        assert_eq!(f.io(), [close, connect]);
        let gave_up = f.event(DownstreamEvent::ConnectFailed);
        assert_eq!(gave_up, failed("no server reachable"));
        assert!(!f.relay.is_current(LinkId(1)));
    }

    #[test]
    fn reset_replies_are_swallowed_and_a_refused_one_fails_the_link() {
        let mut f = Fixture::ready(1, DownstreamMode::Synchronous);
        assert!(f.send_mail());
        f.take(LinkId(0));
        let ok = Reply::new(250, "2.1.0", "Ok");
        assert_eq!(f.reply(b"250 2.1.0 Ok\r\n"), Some(Event::Reply(ok.clone())));
        f.relay.reset();
        assert_eq!(f.take(LinkId(0)), b"RSET\r\n");
        assert_eq!(f.reply(b"250 2.0.0 Ok\r\n"), None);
        // Not in a transaction any more: a second reset sends nothing.
        f.relay.reset();
        assert_eq!(f.relay.outbox_len(), 0);
        assert!(f.send_mail());
        assert_eq!(f.reply(b"250 2.1.0 Ok\r\n"), Some(Event::Reply(ok)));
        f.relay.reset();
        assert_eq!(f.reply(b"554 5.5.1 No\r\n"), failed("reset refused"));
    }

    #[test]
    fn release_waits_for_a_clean_link_and_drops_unsent_resets() {
        let mut f = Fixture::ready(1, DownstreamMode::Multiplexing);
        assert!(f.send_mail());
        // A command not handed out yet: not clean.
        assert!(!f.release(false));
        f.take(LinkId(0));
        // An open transaction stays with its client unless the client is gone.
        assert!(!f.release(false));
        f.relay.reset();
        assert!(f.release(true));
        let io = f.io();
        let [LinkIo::Release { link, carried }] = io.as_slice() else {
            panic!("no release: {io:?}");
        };
        assert_eq!(*link, LinkId(0));
        // The RSET never went out: the next user sends its own.
        assert!(carried.dirty);
        assert!(!f.relay.is_current(LinkId(0)));
        assert_eq!(f.take(LinkId(0)), b"");
    }

    #[test]
    fn the_trace_header_waits_for_what_follows_it() {
        let mut f = Fixture::ready(1, DownstreamMode::Synchronous);
        f.relay
            .start_body(|out| out.extend_from_slice(b"Received: x\r\n"));
        assert_eq!(f.take(LinkId(0)), b"");
        if let Some(out) = f.relay.body() {
            out.extend_from_slice(b"Subject: hi\r\n");
        }
        assert_eq!(f.take(LinkId(0)), b"Received: x\r\nSubject: hi\r\n");
        // Held no more: the next bytes go out on their own.
        assert!(f.relay.send_dot(f.now, &f.config));
        assert_eq!(f.take(LinkId(0)), b".\r\n");
    }

    #[test]
    fn synchronous_mode_never_releases() {
        let mut f = Fixture::ready(1, DownstreamMode::Synchronous);
        assert!(!f.release(true));
        assert!(f.relay.is_current(LinkId(0)));
        assert_eq!(f.io(), []);
    }

    #[test]
    fn plain_text_after_the_starttls_220_is_never_read() {
        let mut f = Fixture::new(1, DownstreamMode::Synchronous);
        f.config.downstream.tls = DownstreamTls::Opportunistic;
        f.start_mail();
        f.event(DownstreamEvent::Connected);
        f.reply(b"220 ds.test ESMTP\r\n");
        f.reply(b"250-ds.test\r\n250 STARTTLS\r\n");
        assert_eq!(f.take(LinkId(0)), b"EHLO mx.test\r\nSTARTTLS\r\n");
        f.io.clear();
        assert_eq!(f.reply(b"220 2.0.0 Ready\r\n"), None);
        assert_eq!(f.io(), [LinkIo::StartTls(LinkId(0))]);
        assert_eq!(f.read(b"250 2.1.0 forged\r\n"), Read::Discard(None));
        assert!(f.relay.is_current(LinkId(0)));
    }

    #[test]
    fn a_malformed_reply_fails_the_link_and_the_rest_is_dropped() {
        let mut f = Fixture::ready(1, DownstreamMode::Synchronous);
        assert_eq!(f.read(b"25"), Read::Partial);
        let read = f.read(b"hello\r\n");
        assert_eq!(read, Read::Discard(failed("malformed reply")));
        assert!(!f.relay.is_current(LinkId(0)));
    }

    /// A fixture whose relay shares a health table marking servers down after two failures.
    fn with_health(servers: u16, mode: DownstreamMode) -> Fixture {
        let mut f = Fixture::new(servers, mode);
        f.config.downstream.down_after = 2;
        f.health = Some(Health::new());
        f
    }

    impl Fixture {
        /// A new session's relay (the same configuration, health and time).
        fn next_session(&mut self) {
            self.relay.close(&mut self.io);
            self.relay = Relay::default();
            self.io.clear();
        }

        fn snapshot(&self) -> Vec<(SocketAddr, bool, u32)> {
            let health = self.health.as_ref().expect("a health table");
            health.snapshot(&self.config.downstream.servers)
        }

        /// The servers the relay asked to connect to, with whether a pooled one would do.
        fn connects(&mut self) -> Vec<(SocketAddr, bool)> {
            self.io()
                .into_iter()
                .filter_map(|io| match io {
                    LinkIo::Connect { addr, via, .. } => {
                        Some((addr, via == Via::Server { pooled: true }))
                    }
                    _ => None,
                })
                .collect()
        }
    }

    #[test]
    fn a_server_that_fails_twice_is_skipped_and_all_down_fails_at_once() {
        let mut f = with_health(2, DownstreamMode::Synchronous);
        let [a, b] = [
            f.config.downstream.servers[0],
            f.config.downstream.servers[1],
        ];
        for _ in 0..2 {
            f.next_session();
            assert_eq!(f.start_mail(), None);
            assert_eq!(f.event(DownstreamEvent::ConnectFailed), None);
            assert_eq!(f.connects(), [(a, true), (b, true)]);
            assert_eq!(f.event(DownstreamEvent::Connected), None);
            assert_eq!(f.reply(b"220 ds.test ESMTP\r\n"), None);
        }
        assert_eq!(f.snapshot(), [(a, false, 2), (b, true, 0)]);
        // Straight to the healthy one.
        f.next_session();
        assert_eq!(f.start_mail(), None);
        assert_eq!(f.connects(), [(b, true)]);
        // It fails twice too: every server down, and the next MAIL fails without a connect.
        f.event(DownstreamEvent::ConnectFailed);
        f.next_session();
        f.start_mail();
        assert_eq!(f.connects(), [(b, true)]);
        assert_eq!(
            f.event(DownstreamEvent::ConnectFailed),
            failed("no server reachable")
        );
        assert_eq!(f.snapshot(), [(a, false, 2), (b, false, 2)]);
        f.next_session();
        assert_eq!(f.start_mail(), failed("all servers down"));
        assert_eq!(f.connects(), []);
        assert_eq!(f.relay.poll_timeout(), None, "nothing to wait for");
        // The first probe is due after retry_after: a new connection, not a pooled one.
        f.now += f.config.downstream.retry_after;
        f.next_session();
        assert_eq!(f.start_mail(), None);
        assert_eq!(f.connects(), [(a, false)]);
        assert_eq!(f.event(DownstreamEvent::Connected), None);
        assert_eq!(f.reply(b"220 ds.test ESMTP\r\n"), None);
        assert_eq!(f.snapshot(), [(a, true, 0), (b, false, 2)]);
    }

    #[test]
    fn a_421_banner_or_no_banner_moves_on_and_counts() {
        let mut f = with_health(2, DownstreamMode::Synchronous);
        let [a, b] = [
            f.config.downstream.servers[0],
            f.config.downstream.servers[1],
        ];
        f.start_mail();
        f.event(DownstreamEvent::Connected);
        f.io.clear();
        assert_eq!(f.reply(b"421 4.3.2 busy\r\n"), None);
        let close = LinkIo::Close {
            link: LinkId(0),
            quit: false,
        };
        let connect = LinkIo::Connect {
            link: LinkId(1),
            addr: b,
            via: Via::Server { pooled: true },
        };
        assert_eq!(f.io(), [close, connect]);
        assert_eq!(f.snapshot(), [(a, true, 1), (b, true, 0)]);
        // No banner within timeouts.command: the same.
        f.event(DownstreamEvent::Connected);
        let late = f.now + f.config.timeouts.command;
        assert_eq!(f.timeout(late), failed("no server reachable"));
        assert_eq!(f.snapshot(), [(a, true, 1), (b, true, 1)]);
    }

    #[test]
    fn waiting_for_a_place_in_the_pool_is_no_failure_of_the_server() {
        let mut f = with_health(1, DownstreamMode::Multiplexing);
        let a = f.config.downstream.servers[0];
        for _ in 0..3 {
            f.next_session();
            f.start_mail();
            f.event(DownstreamEvent::PoolWait);
            let late = f.now + f.config.timeouts.connect;
            assert_eq!(f.timeout(late), failed("no server reachable"));
        }
        assert_eq!(f.snapshot(), [(a, true, 0)]);
        // Its turn came and the connect itself timed out: that counts.
        f.next_session();
        f.start_mail();
        f.event(DownstreamEvent::PoolWait);
        f.event(DownstreamEvent::PoolTurn);
        let late = f.now + f.config.timeouts.connect;
        assert_eq!(f.timeout(late), failed("no server reachable"));
        assert_eq!(f.snapshot(), [(a, true, 1)]);
    }

    #[test]
    fn round_robin_spreads_sessions() {
        let mut f = with_health(2, DownstreamMode::Synchronous);
        f.config.downstream.balance = crate::config::Balance::RoundRobin;
        let [a, b] = [
            f.config.downstream.servers[0],
            f.config.downstream.servers[1],
        ];
        let mut firsts = Vec::new();
        for _ in 0..4 {
            f.next_session();
            f.start_mail();
            firsts.extend(f.connects().into_iter().map(|(addr, _)| addr));
        }
        assert_eq!(firsts, [a, b, a, b]);
    }
}
