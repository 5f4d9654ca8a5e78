//! The downstream half of a [`Conn`]: its connection to the downstream MTA while relaying, a
//! [`Leg`] like the client's, and how it comes and goes. A new one is connected
//! (`downstream::connect`) or, in `mode = "multiplexing"`, taken from the worker's
//! [`DownstreamPool`] (or the session waits in the pool's line); released, it goes back to the
//! pool when it is known clean, else it is closed with QUIT. Reads, the STARTTLS switch and
//! writes are the leg's; what happens is told to the session as a [`DownstreamEvent`] under the
//! connection's [`LinkId`], so a late event of a connection the session gave up names no other.
//! Nothing here decides what is relayed: the session does (`downstream::dialog`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use mio::Registry;
use mio::event::Event;

use super::{Conn, Io};
use crate::downstream::connect;
use crate::downstream::dialog::Carried;
use crate::downstream::pool::{Idle, Pool, Pooled, Take, Ticket};
use crate::metrics::{DownstreamError, WorkerCounters};
use crate::server::leg::{Eof, Leg};
use crate::server::slab::ConnKey;
use crate::server::tls_stream::TlsFailure;
use crate::server::token;
use crate::smtp::{DownstreamEvent, LinkId, Side, Via};

/// Pending bytes for the downstream before `poll_transmit_downstream` is left alone: a
/// downstream that stops reading mid-body holds at most this (plus one pull) here, and the
/// session keeps at most its own cap and stops reading the client. Two 16 KiB reads' worth
/// keeps a body streaming while the socket drains; 64 KiB (as before) only cost memory.
const OUTBOX_HIGH: usize = 32 * 1024;

/// A worker's pool of idle downstream legs, with the sessions waiting in its line.
pub(crate) type DownstreamPool = Pool<Leg, ConnKey>;

/// The downstream connection: its leg and what the session and the pool know it by.
#[derive(Debug)]
pub(super) struct DownstreamConn {
    /// The session's name for this connection: only its bytes and events are this one's.
    link: LinkId,
    pub(super) leg: Leg,
    /// The server it is connected to (the pool's key).
    addr: SocketAddr,
    /// Multiplexing: this connection's place in the pool.
    ticket: Option<Ticket>,
    /// The nonblocking connect has not finished.
    connecting: bool,
    /// An event since the connect started was not a clean writable edge
    /// ([`connect::is_clean_writable`]): the connect's end is asked of the socket.
    unclean_edge: bool,
}

impl Conn {
    /// The session wants downstream connection `link` to `addr`: for a server in multiplexing
    /// mode what the pool gives ([`Pool::take`]: an idle one when `pooled` allows, a new one
    /// while the worker is under its share of `pool_size`, or a place in line); else always a
    /// new one, a transparent session's from the address `via` names.
    pub(super) fn connect_downstream(
        &mut self,
        key: ConnKey,
        link: LinkId,
        addr: SocketAddr,
        via: Via,
        now: Instant,
        io: &mut Io<'_>,
    ) {
        let pooled = match via {
            Via::Transparent { from } => {
                return self.open_downstream(key, link, (addr, from), now, io.registry, None);
            }
            Via::Server { .. } if !io.multiplexing => {
                return self.open_downstream(key, link, (addr, None), now, io.registry, None);
            }
            Via::Server { pooled } => pooled,
        };
        match io.pool.take(key, addr, pooled, now) {
            Take::Reuse(idle) => self.attach_pooled(key, link, idle, now, io.registry),
            Take::Open(ticket) => {
                let to = (addr, None);
                self.open_downstream(key, link, to, now, io.registry, Some(ticket));
            }
            Take::Wait => {
                log::debug!("conn={} waits for a pooled downstream connection", self.id);
                self.awaiting_pool = Some((addr, link));
                // Its connect timeout runs on, but is no failure of the server.
                self.session
                    .handle_downstream(now, link, DownstreamEvent::PoolWait);
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
            self.session
                .handle_downstream(now, link, DownstreamEvent::PoolTurn);
            let via = Via::Server { pooled: true };
            self.connect_downstream(key, link, addr, via, now, io);
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
            self.count_error(addr, DownstreamError::Connect);
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
            unclean_edge: false,
        }));
        self.session
            .handle_downstream(now, link, DownstreamEvent::Reused(carried));
    }

    /// The session is done with a clean connection: back to the pool, unless something about
    /// it says otherwise (unread bytes, its end seen, not pooled), then it is closed, with
    /// QUIT unless it is broken.
    pub(super) fn release_downstream(
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

    /// A new connection to `addr`, from `from` when given (`spoof_source`).
    fn open_downstream(
        &mut self,
        key: ConnKey,
        link: LinkId,
        (addr, from): (SocketAddr, Option<IpAddr>),
        now: Instant,
        registry: &Registry,
        ticket: Option<Ticket>,
    ) {
        // The session opens one downstream at a time; a leftover one is replaced, not leaked.
        self.drop_downstream();
        let opened = connect::connect(addr, from).and_then(|stream| {
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
                    unclean_edge: false,
                }));
            }
            Err(e) => {
                log::debug!("conn={} downstream {addr}: connect failed: {e}", self.id);
                self.count_error(addr, DownstreamError::Connect);
                self.session
                    .handle_downstream(now, link, DownstreamEvent::ConnectFailed);
            }
        }
    }

    /// On any event of a connecting downstream socket: finished, failed, or not yet. Clean
    /// writable edges alone say finished without asking the socket (`downstream::connect`).
    pub(super) fn settle_connect(&mut self, now: Instant) {
        let Some(ds) = self.downstream.as_deref_mut() else {
            return;
        };
        if !ds.connecting || !(ds.leg.is_readable() || ds.leg.is_writable()) {
            return;
        }
        let link = ds.link;
        let clean_writable = ds.leg.is_writable() && !ds.unclean_edge;
        match connect::finish_connect(ds.leg.stream(), clean_writable) {
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
                let addr = ds.addr;
                self.drop_downstream();
                self.count_error(addr, DownstreamError::Connect);
                self.session
                    .handle_downstream(now, link, DownstreamEvent::ConnectFailed);
            }
        }
    }

    /// Over TLS first the records rustls wants, then one read of at most [`READ_CHUNK`]
    /// downstream bytes, fed to the session. A handshake that fails (an alert, a certificate
    /// `tls_verify` refuses, the connection lost) drops the connection here and tells the
    /// session `TlsFailed`; after the handshake a TLS error is a broken downstream (`Closed`).
    pub(super) fn read_downstream(&mut self, now: Instant, io: &mut Io<'_>) {
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
            let kind = if handshaking {
                DownstreamError::Tls
            } else {
                DownstreamError::Lost
            };
            self.count_error(addr, kind);
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
    pub(super) fn start_downstream_tls(&mut self, link: LinkId, now: Instant, io: &Io<'_>) {
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
    pub(super) fn offer_downstream_input(&mut self, now: Instant) -> bool {
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
    pub(super) fn fail_downstream(&mut self, now: Instant) {
        if let Some((link, addr)) = self.downstream.as_deref().map(|ds| (ds.link, ds.addr)) {
            self.drop_downstream();
            self.count_error(addr, DownstreamError::Lost);
            self.session
                .handle_downstream(now, link, DownstreamEvent::Closed);
        }
    }

    /// The worker's counters for the per-server downstream figures (`[metrics] listen`):
    /// none for a transparent session, whose destination is any host a client chose, never a
    /// label (see `metrics`).
    pub(super) fn server_metrics(&self) -> Option<&WorkerCounters> {
        self.metrics
            .as_deref()
            .filter(|_| !self.session.is_transparent())
    }

    /// Counts a failed downstream connection.
    fn count_error(&self, addr: SocketAddr, kind: DownstreamError) {
        if let Some(metrics) = self.server_metrics() {
            metrics.downstream_error(addr, kind);
        }
    }

    /// Drops the downstream leg; closing its socket takes it out of the poll set.
    fn drop_downstream(&mut self) {
        self.downstream = None;
    }

    /// Pulls due downstream bytes into the leg's outbox while it has room. Returns whether
    /// anything came.
    pub(super) fn transmit_downstream(&mut self, now: Instant) -> bool {
        let Some(ds) = self.downstream.as_deref_mut() else {
            return false;
        };
        let outbox = &mut ds.leg.outbox;
        if outbox.len() >= OUTBOX_HIGH {
            return false;
        }
        let before = outbox.len();
        self.session.poll_transmit_downstream(now, ds.link, outbox);
        outbox.len() > before
    }

    /// `Action::CloseDownstream`: the session has nothing more for connection `link`. What
    /// was handed out for it goes first, then QUIT when `quit`, in one nonblocking attempt;
    /// a session still in the pool's line for it leaves the line.
    pub(super) fn close_downstream(&mut self, link: LinkId, quit: bool) {
        if self
            .awaiting_pool
            .is_some_and(|(_, waiting)| waiting == link)
        {
            self.awaiting_pool = None;
        }
        let Some(ds) = self.downstream.as_deref_mut().filter(|ds| ds.link == link) else {
            return;
        };
        if !ds.connecting {
            if quit {
                ds.leg.outbox.extend_from_slice(b"QUIT\r\n");
            }
            ds.leg.write_last();
        }
        self.drop_downstream();
    }
}

impl DownstreamConn {
    /// Records the readiness in `event` and, while connecting, whether it was a clean
    /// writable edge.
    pub(super) fn on_event(&mut self, event: &Event) {
        self.leg.on_event(event);
        if self.connecting {
            self.unclean_edge |= !connect::is_clean_writable(event);
        }
    }

    /// The leg, once connected: before, nothing may be written to it.
    pub(super) fn connected_leg(&mut self) -> Option<&mut Leg> {
        (!self.connecting).then_some(&mut self.leg)
    }

    /// Whether the downstream leg should be read now (see [`Conn::may_read_client`]).
    pub(super) fn may_read(&self, max_input: usize) -> bool {
        let open =
            !self.connecting && self.leg.eof() == Eof::Open && self.leg.input.len() < max_input;
        open && (self.leg.wants_fill() || self.leg.can_read())
    }
}
