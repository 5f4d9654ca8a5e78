//! [`Pair`]: one `Session` driven on invented time against a [`FakeDownstream`], the way the
//! worker drives it, like quinn-proto's test `Pair` (STYLE.md §5).
//!
//! The pair owns the session and plays every [`Action`] and answers every [`Question`]
//! itself, from services scripted in its fields (DNS answers per query, the PASS cache,
//! reputation and greylist tables on the pair's clock, tarpit places, admission). Time moves
//! only when the test says ([`Pair::advance`]). It records each side's output with its time
//! and checks what a driver can see of the session's contract as it goes (a failed check
//! panics): `Close` once and nothing for the client after it; `StartTls` only after its `220`,
//! and nothing for the client until the handshake is over; the reply forged behind a
//! downstream's `220` to STARTTLS never reaches the client; outboxes drained under 1 MiB; bytes
//! only for the downstream connection in use (none for a closed or released one); one
//! downstream connection at a time, only to configured servers; TLS towards the downstream only
//! after its `220`; a connection released to the pool only with nothing in flight, outside a
//! body and marked for RSET exactly when a transaction is open on it; no client bytes taken
//! while the session does not want to read; no deadline left due after `handle_timeout`.
//!
//! [`Pair::for_bench`] makes a pair that only drives, for the session bench: the same actions
//! played, questions answered and downstream replies, but no logs and none of the checks that
//! cost more than a comparison (the forged reply searched for in the client's bytes, bytes
//! asked for closed links, client bytes offered while the session does not want them, the
//! downstream's parsing and trust-boundary checks). The bench asserts each round's outcome
//! against a checking pair's instead, so its timed loop measures the session.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use tarmac::config::{Config, DownstreamMode};
use tarmac::content::{Edit, Verdict};
use tarmac::downstream::dialog::Carried;
use tarmac::policy::reputation::Event as ReputationEvent;
use tarmac::smtp::question::{LookupAnswer, MilterStep, Query, ScanJob, Scanned};
use tarmac::smtp::{
    Action, Answer, DownstreamEvent, LinkId, Peer, Question, Session, Shutdown, TlsVersion, Via,
};
use tarmac::state::{Greylist, ReputationTable};

use super::downstream::{FORGED, FakeDownstream, Reaction, Speaker, escape, find};

/// Most bytes the session may hand out for one side in one round. The session's own cap is
/// 64 KiB plus one reply or one decoded chunk; this is the "never grows without bound" check.
const MAX_OUTBOX_DRAIN: usize = 1 << 20;

/// Rounds of delivery one input may cause; more means the session and the scripted
/// downstream are ping-ponging forever.
const MAX_ROUNDS: usize = 100_000;

/// The config the session tests start from: one downstream, no announcement, and none of
/// the lookups, greet pause, greylisting or reputation (each has its own tests).
pub fn config() -> Config {
    let mut config = Config::default();
    config.server.hostname = "mx.test".to_owned();
    config.downstream.servers = vec![SocketAddr::from(([127, 0, 0, 1], 10025))];
    config.downstream.announce_client = tarmac::config::AnnounceClient::None;
    config.dns.rdns = false;
    config.tarpit.greet_pause = Duration::ZERO;
    config.greylist.enabled = false;
    config.reputation.enabled = false;
    config
}

/// The client every pair's session serves (192.0.2.7, accepted at a fixed wall-clock time so
/// `Received:` lines are stable).
pub fn peer(stressed: bool, starttls: bool) -> Peer {
    Peer {
        conn: 0x7f3a,
        client: SocketAddr::from(([192, 0, 2, 7], 53211)),
        local: SocketAddr::from(([198, 51, 100, 1], 25)),
        accepted_at: UNIX_EPOCH + Duration::from_secs(1_795_438_862),
        stressed,
        starttls,
        transparent: false,
        spoof_source: false,
    }
}

/// What a scanned message's job told the scanners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanFacts {
    /// The sender.
    pub from: String,
    /// The recipients the downstream accepted.
    pub rcpts: Vec<String>,
    /// rspamd's `Queue-Id`.
    pub queue_id: String,
    /// The client's HELO name.
    pub helo: String,
}

/// Something the pair's downstream side has for the session, tagged with the connection it
/// belongs to (events of a connection the session closed are dropped, as a driver drops them).
#[derive(Debug)]
enum Event {
    Connected(LinkId),
    Reused(LinkId, Carried),
    ConnectFailed(LinkId),
    Data(LinkId, Vec<u8>),
    Closed(LinkId),
    TlsEstablished(LinkId),
    TlsFailed(LinkId),
}

/// Drives one session against a [`FakeDownstream`] on invented time. Fields are the script
/// (set them before [`pump`](Pair::pump)ing) and what the pair saw.
pub struct Pair {
    /// The session under test.
    pub session: Session,
    /// The invented present.
    pub now: Instant,
    /// Client bytes not yet taken by [`take_output`](Pair::take_output).
    pub client_out: Vec<u8>,
    /// Every write to the client, with its time (none kept by a [`Pair::for_bench`]).
    pub client_log: Vec<(Instant, Vec<u8>)>,
    /// Every write to the downstream, with its time (none kept by a [`Pair::for_bench`]).
    pub downstream_log: Vec<(Instant, Vec<u8>)>,
    /// Client bytes sent but not yet taken by the session.
    pub client_pending: Vec<u8>,
    /// The downstream of the current (or last) connection.
    pub downstream: FakeDownstream,
    /// A downstream connection is up (connected, not yet closed or released).
    pub ds_open: bool,
    /// The first this many connects fail.
    pub refuse_connects: usize,
    /// Connects to these servers fail.
    pub refused_servers: Vec<SocketAddr>,
    /// Connects to these servers never complete (only the session's timeout ends them).
    pub hanging_servers: Vec<SocketAddr>,
    /// Every server the session connected to, in order (reuses apart).
    pub connects: Vec<SocketAddr>,
    /// How each of `connects` was to be made.
    pub connects_via: Vec<Via>,
    /// Open downstream connections the session closed.
    pub downstream_closes: usize,
    /// `Action::Close` came out.
    pub closed: bool,
    /// Deliver the downstream's banner and replies (otherwise the test delivers them).
    pub auto_downstream: bool,
    /// Downstream replies arrive one byte per event.
    pub dribble: bool,
    /// Downstream replies and closes wait for the next [`advance`](Pair::advance).
    pub lagging: bool,
    /// The answer to `Question::Admit`.
    pub admit: bool,
    /// Multiplexing: the connection the session released, waiting to be reused.
    pub pooled: Option<Carried>,
    /// The downstream connection the session asked for last.
    pub link: LinkId,
    /// Times a pooled connection was handed back to the session.
    pub reuses: usize,
    /// Scripted DNS: lookups with an answer here are answered at once, like a cache hit;
    /// others stay unanswered (the test answers them, or lets `[dns] timeout` pass).
    pub dns: Vec<(Query, LookupAnswer)>,
    /// Every lookup the session asked for, in order.
    pub lookups: Vec<Query>,
    /// The answer to `CheckPass`.
    pub pass_cached: bool,
    /// PASSes the session recorded.
    pub passes: Vec<IpAddr>,
    /// The answer to `EnterTarpit`.
    pub tarpit_free: bool,
    /// A real greylist table answering `CheckGreylist` on the pair's clock.
    pub greylist: Greylist,
    /// The keys asked about, in order.
    pub greylist_keys: Vec<String>,
    /// How the driver's TLS handshake towards the downstream ends: `Some(true)` established,
    /// `Some(false)` failed, `None` never (it stalls).
    pub downstream_tls: Option<bool>,
    /// `Action::StartTlsDownstream`s seen.
    pub downstream_tls_starts: usize,
    /// A real reputation table answering `CheckReputation` and taking `RecordReputation` on
    /// the pair's clock.
    pub reputation: ReputationTable,
    /// The reputation events recorded, in order.
    pub reputation_events: Vec<(IpAddr, ReputationEvent)>,
    /// Times the session asked for a TLS handshake (`Action::StartTls`).
    pub tls_switches: usize,
    /// `Action::StartTls` came out and the handshake is not over.
    pub handshaking: bool,
    /// The milters' answer per stage (`connect`, `helo`, `mail`, `rcpt`); a stage not listed
    /// continues.
    pub milter_script: Vec<(&'static str, Verdict)>,
    /// Every milter step the session asked for: `connect`, `helo:NAME`, `mail:FROM`,
    /// `rcpt:TO`, `abort`, `quit`.
    pub milter_steps: Vec<String>,
    /// The scanners' answer to a held message (verdict, edits, `scan=`); `None`: the scan
    /// stays in [`Pair::pending_scan`] for the test to answer.
    pub scan_answer: Option<(Verdict, Vec<Edit>, String)>,
    /// A scan the test has not answered yet.
    pub pending_scan: Option<Box<ScanJob>>,
    /// Every message handed to the scanners: its bytes as held, with its job's facts.
    pub scanned: Vec<(Vec<u8>, ScanFacts)>,

    /// Log each side's writes and check every write as above (off: [`Pair::for_bench`]).
    checks: bool,
    config: Arc<Config>,
    /// The connection being set up (asked for, not yet connected).
    connecting: Option<LinkId>,
    /// Connections the session closed or released: it must never hand out bytes for them.
    closed_links: Vec<LinkId>,
    /// Events ready for delivery; `held` wait for the next `advance` (`lagging`).
    events: VecDeque<Event>,
    held: Vec<Event>,
    /// Downstream reply bytes the session left unconsumed (a partial reply).
    ds_unread: Vec<u8>,
    /// Everything the client got, for the checks on STARTTLS.
    client_all: Vec<u8>,
    /// Writes to the client so far.
    client_writes: usize,
}

impl Pair {
    /// A pumped pair with no scripted DNS.
    pub fn new(config: Config) -> Pair {
        Pair::with_dns(config, Vec::new())
    }

    /// A pumped pair whose lookups in `dns` are answered at once.
    pub fn with_dns(config: Config, dns: Vec<(Query, LookupAnswer)>) -> Pair {
        Pair::build(config, dns, false)
    }

    /// A pair whose session was accepted in stress mode.
    pub fn stressed(config: Config) -> Pair {
        Pair::build(config, Vec::new(), true)
    }

    /// A pair whose driver has no tarpit place left.
    pub fn build_refusing_tarpit(config: Config, dns: Vec<(Query, LookupAnswer)>) -> Pair {
        let mut pair = Pair::build_quiet(config, dns, false);
        pair.tarpit_free = false;
        pair.pump();
        pair
    }

    /// A pumped pair.
    pub fn build(config: Config, dns: Vec<(Query, LookupAnswer)>, stressed: bool) -> Pair {
        let mut pair = Pair::build_quiet(config, dns, stressed);
        pair.pump();
        pair
    }

    /// A pair whose driver may offer STARTTLS (it has a certificate, and no failed handshake
    /// from this client on record).
    pub fn offering_starttls(config: Config) -> Pair {
        let mut pair = Pair::from_peer(config, Vec::new(), peer(false, true));
        pair.pump();
        pair
    }

    /// A pair not yet pumped: the test can still change how its driver answers.
    pub fn build_quiet(config: Config, dns: Vec<(Query, LookupAnswer)>, stressed: bool) -> Pair {
        Pair::from_peer(config, dns, peer(stressed, false))
    }

    /// A pair not yet pumped, serving `peer`.
    pub fn from_peer(config: Config, dns: Vec<(Query, LookupAnswer)>, peer: Peer) -> Pair {
        Pair::sharing(Arc::new(config), dns, peer)
    }

    /// A pair not yet pumped, serving `peer` with a config other pairs share (a bench makes
    /// many).
    pub fn sharing(config: Arc<Config>, dns: Vec<(Query, LookupAnswer)>, peer: Peer) -> Pair {
        let now = Instant::now();
        Pair {
            session: Session::new(Arc::clone(&config), peer, now),
            now,
            client_out: Vec::new(),
            client_log: Vec::new(),
            downstream_log: Vec::new(),
            client_pending: Vec::new(),
            downstream: FakeDownstream::default(),
            ds_open: false,
            refuse_connects: 0,
            refused_servers: Vec::new(),
            hanging_servers: Vec::new(),
            connects: Vec::new(),
            connects_via: Vec::new(),
            downstream_closes: 0,
            closed: false,
            auto_downstream: true,
            dribble: false,
            lagging: false,
            admit: true,
            pooled: None,
            link: LinkId(u32::MAX),
            reuses: 0,
            dns,
            lookups: Vec::new(),
            pass_cached: false,
            passes: Vec::new(),
            tarpit_free: true,
            greylist: Greylist::new(now),
            greylist_keys: Vec::new(),
            downstream_tls: Some(true),
            downstream_tls_starts: 0,
            reputation: ReputationTable::new(),
            reputation_events: Vec::new(),
            tls_switches: 0,
            handshaking: false,
            milter_script: Vec::new(),
            milter_steps: Vec::new(),
            scan_answer: Some((Verdict::Continue, Vec::new(), "rspamd:no_action:0.0".into())),
            pending_scan: None,
            scanned: Vec::new(),
            checks: true,
            config,
            connecting: None,
            closed_links: Vec::new(),
            events: VecDeque::new(),
            held: Vec::new(),
            ds_unread: Vec::new(),
            client_all: Vec::new(),
            client_writes: 0,
        }
    }

    /// A pumped pair for a bench: it drives the session as any pair does, but neither it nor
    /// its downstream logs what goes by or checks every write (see the module docs); the
    /// downstream keeps no commands or bodies, only its [`Totals`](super::Totals).
    pub fn for_bench(config: Arc<Config>, peer: Peer) -> Pair {
        let mut pair = Pair::sharing(config, Vec::new(), peer);
        pair.checks = false;
        pair.downstream.checks = false;
        pair.pump();
        pair
    }

    /// Client sends bytes (kept and re-offered while the session does not want them).
    pub fn send(&mut self, bytes: &[u8]) {
        self.client_pending.extend_from_slice(bytes);
        self.pump();
    }

    /// Moves bytes between the session, the fake downstream and the client until quiet.
    pub fn pump(&mut self) {
        self.settle();
        for _ in 0..MAX_ROUNDS {
            let mut progress = false;
            // The checking pair offers bytes even while the session does not want them, to
            // see it take none; the bench's only offers them when wanted, as a driver does.
            let offer = self.checks || self.session.wants_read();
            if !self.client_pending.is_empty() && !self.closed && offer {
                let wants = self.session.wants_read();
                let mut pending = std::mem::take(&mut self.client_pending);
                let used = self.session.handle_client_data(self.now, &pending);
                assert!(
                    used <= pending.len(),
                    "consumed {used} of {}",
                    pending.len()
                );
                assert!(
                    wants || used == 0 || self.session.is_closed(),
                    "consumed {used} bytes while not wanting to read"
                );
                pending.drain(..used.min(pending.len()));
                self.client_pending = pending;
                progress |= used > 0;
                // Like the driver: output released (a tarpit's held reply) may let input in.
                progress |= self.settle();
            }
            if let Some(event) = self.events.pop_front() {
                self.deliver(event);
                progress = true;
            }
            if !progress {
                return;
            }
        }
        panic!("session and downstream did not settle");
    }

    /// Time passes: held events come due, the session handles its timers, and no deadline
    /// is left due.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.events.extend(self.held.drain(..));
        self.session.handle_timeout(self.now);
        self.pump();
        if let Some(due) = self.session.poll_timeout() {
            assert!(
                due > self.now,
                "deadline {:?} still due after handle_timeout",
                self.now - due
            );
        }
    }

    /// The client's TLS handshake (after `Action::StartTls`) is done.
    pub fn tls_established(&mut self, version: TlsVersion) {
        self.handshaking = false;
        self.session
            .handle_tls_established(self.now, version, Some("TLS13_AES_128_GCM_SHA256"));
        self.pump();
    }

    /// The client's TLS handshake failed.
    pub fn tls_failed(&mut self) {
        self.handshaking = false;
        self.session.handle_tls_failed(self.now);
        self.pump();
    }

    /// The worker shuts down.
    pub fn shutdown(&mut self, how: Shutdown) {
        self.session.handle_shutdown(self.now, how);
        self.pump();
    }

    /// The client hangs up.
    pub fn hang_up(&mut self) {
        self.session.handle_client_eof(self.now);
        self.pump();
    }

    /// Whether a downstream connection is open or being set up.
    pub fn has_downstream(&self) -> bool {
        self.ds_open || self.connecting.is_some()
    }

    /// Multiplexing: `next`, another session, gets this one's pooled connection (and the fake
    /// downstream behind it), as the worker's pool would hand it over.
    #[track_caller]
    pub fn hand_pool_to(&mut self, mut next: Pair) -> Pair {
        let carried = self.pooled.take().unwrap_or_else(|| {
            panic!(
                "nothing released to the pool: {:?}",
                self.downstream.commands
            )
        });
        next.pooled = Some(carried);
        next.downstream = std::mem::take(&mut self.downstream);
        next.pump();
        next
    }

    /// What the client got since the last call.
    pub fn take_output(&mut self) -> String {
        String::from_utf8(std::mem::take(&mut self.client_out)).unwrap()
    }

    fn deliver(&mut self, event: Event) {
        match event {
            Event::Connected(link) if self.connecting == Some(link) => {
                self.connecting = None;
                self.ds_open = true;
                self.downstream = self.downstream.next_connection();
                let spoofed = matches!(
                    self.connects_via.last(),
                    Some(Via::Transparent { from: Some(_) })
                );
                let banner = self.downstream.connect_as(&self.config, spoofed);
                self.session
                    .handle_downstream(self.now, link, DownstreamEvent::Connected);
                self.settle();
                self.queue_replies(link, banner);
            }
            Event::ConnectFailed(link) if self.connecting == Some(link) => {
                self.connecting = None;
                self.session
                    .handle_downstream(self.now, link, DownstreamEvent::ConnectFailed);
            }
            Event::Reused(link, carried) if self.is_current(link) => {
                self.session
                    .handle_downstream(self.now, link, DownstreamEvent::Reused(carried));
            }
            Event::Closed(link) if self.is_current(link) && self.ds_open => {
                // The socket stays the driver's until the session says CloseDownstream; what
                // it writes meanwhile (a QUIT) goes nowhere.
                self.downstream.gone = true;
                self.session
                    .handle_downstream(self.now, link, DownstreamEvent::Closed);
            }
            Event::Data(link, bytes) if self.is_current(link) && self.ds_open => {
                let mut buf = std::mem::take(&mut self.ds_unread);
                if buf.is_empty() {
                    buf = bytes;
                } else {
                    buf.extend_from_slice(&bytes);
                }
                let used =
                    self.session
                        .handle_downstream(self.now, link, DownstreamEvent::Data(&buf));
                assert!(used <= buf.len(), "consumed {used} of {}", buf.len());
                buf.drain(..used.min(buf.len()));
                self.ds_unread = buf;
            }
            Event::TlsEstablished(link) if self.is_current(link) && self.ds_open => {
                self.session
                    .handle_downstream(self.now, link, DownstreamEvent::TlsEstablished);
            }
            Event::TlsFailed(link) if self.is_current(link) && self.ds_open => {
                self.session
                    .handle_downstream(self.now, link, DownstreamEvent::TlsFailed);
            }
            // An event of a connection the session already closed: the driver dropped it.
            _ => return,
        }
        self.settle();
    }

    /// What a driver does after every `handle_*`: hand out both sides' bytes, then carry out
    /// the actions, and again while that gives the session something to do (an answer).
    /// Downstream replies and connect results become queued events. Whether the client got
    /// bytes.
    fn settle(&mut self) -> bool {
        let mut to_client = false;
        for _ in 0..MAX_ROUNDS {
            let (out, acted) = self.settle_once();
            to_client |= out;
            if !acted {
                return to_client;
            }
        }
        panic!("the session's actions did not settle");
    }

    /// One round of [`settle`](Pair::settle): whether the client got bytes, and whether an
    /// action was carried out.
    fn settle_once(&mut self) -> (bool, bool) {
        let written = self.client_writes;
        // A test may play the client's handshake on the session itself.
        if self.handshaking && (self.session.is_closed() || self.session.report().tls != "no") {
            self.handshaking = false;
        }
        self.transmit_to_client();
        let mut ds = Vec::new();
        if self.checks {
            for &link in &self.closed_links {
                self.session
                    .poll_transmit_downstream(self.now, link, &mut ds);
                assert!(
                    ds.is_empty(),
                    "bytes for a closed downstream: {}",
                    escape(&ds)
                );
            }
        }
        if self.ds_open || self.connecting.is_some() {
            self.session
                .poll_transmit_downstream(self.now, self.link, &mut ds);
        }
        assert!(
            ds.len() < MAX_OUTBOX_DRAIN,
            "downstream outbox {}",
            ds.len()
        );
        if !ds.is_empty() {
            assert!(
                self.ds_open,
                "bytes for an unconnected downstream: {}",
                escape(&ds)
            );
            let speaker = if self.checks {
                self.downstream_log.push((self.now, ds.clone()));
                let report = self.session.report();
                Speaker {
                    addr: Some(report.client),
                    helo: report.helo.map(<[u8]>::to_vec).unwrap_or_default(),
                }
            } else {
                Speaker::default()
            };
            match self.downstream.feed(&ds, &speaker) {
                Reaction::Replies(replies) if self.auto_downstream => {
                    self.queue_replies(self.link, replies);
                }
                Reaction::Replies(_) => {}
                Reaction::Close => self.queue(Event::Closed(self.link)),
            }
        }
        let mut acted = false;
        while let Some(action) = self.session.poll_action() {
            self.act(action);
            acted = true;
        }
        (self.client_writes > written, acted)
    }

    /// Hands the client what the session has for it, straight into `client_out`.
    fn transmit_to_client(&mut self) {
        let start = self.client_out.len();
        self.session.poll_transmit(self.now, &mut self.client_out);
        if self.client_out.len() == start {
            return;
        }
        let out = self.client_out.get(start..).unwrap_or_default();
        assert!(out.len() < MAX_OUTBOX_DRAIN, "client outbox {}", out.len());
        assert!(
            !self.closed,
            "bytes for the client after Close: {}",
            escape(out)
        );
        // Nothing is said between the switch and the end of the handshake, in plain text or
        // otherwise: in particular no answer to bytes pipelined after STARTTLS.
        assert!(
            !self.handshaking,
            "bytes for the client during the TLS handshake: {}",
            escape(out)
        );
        self.client_writes += 1;
        if !self.checks {
            return;
        }
        // Only where the new bytes could complete it.
        let from = self.client_all.len().saturating_sub(FORGED.len());
        self.client_all.extend_from_slice(out);
        assert!(
            find(&self.client_all[from..], FORGED.as_bytes()).is_none(),
            "a reply forged after the downstream's 220 to STARTTLS reached the client"
        );
        self.client_log.push((self.now, out.to_vec()));
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::ConnectDownstream {
                link,
                via: Via::Server { pooled: true },
                ..
            } if self.pooled.is_some() => {
                assert!(
                    !self.has_downstream(),
                    "a second downstream while one is open"
                );
                // Multiplexing: the connection released earlier comes back, as is.
                if let Some(carried) = self.pooled.take() {
                    self.ds_open = true;
                    self.link = link;
                    self.reuses += 1;
                    self.ds_unread.clear();
                    self.events.push_back(Event::Reused(link, carried));
                }
            }
            Action::ConnectDownstream { link, addr, via } => {
                assert!(
                    !self.has_downstream(),
                    "a second downstream while one is open"
                );
                // A transparent session's destination is its own; anything else is a server.
                assert!(
                    matches!(via, Via::Transparent { .. })
                        || self.config.downstream.servers.contains(&addr),
                    "connect to {addr}"
                );
                self.connects.push(addr);
                self.connects_via.push(via);
                self.link = link;
                self.connecting = Some(link);
                self.ds_unread.clear();
                if self.connects.len() <= self.refuse_connects
                    || self.refused_servers.contains(&addr)
                {
                    self.events.push_back(Event::ConnectFailed(link));
                } else if !self.hanging_servers.contains(&addr) {
                    self.events.push_back(Event::Connected(link));
                }
            }
            Action::StartTlsDownstream(link) => {
                assert!(self.ds_open, "TLS on a closed downstream");
                assert_eq!(link, self.link, "TLS on another connection");
                assert!(
                    self.downstream.awaiting_tls,
                    "TLS before the downstream's 220 to STARTTLS"
                );
                self.downstream_tls_starts += 1;
                // The driver drops what came after the 220: plain text anyone could forge.
                self.ds_unread.clear();
                let stale = |event: &Event| matches!(event, Event::Data(e, _) if *e == link);
                self.events.retain(|event| !stale(event));
                self.held.retain(|event| !stale(event));
                match self.downstream_tls {
                    Some(true) => {
                        self.downstream.start_tls();
                        self.queue(Event::TlsEstablished(link));
                    }
                    Some(false) => {
                        self.downstream.gone = true;
                        self.queue(Event::TlsFailed(link));
                    }
                    None => {}
                }
            }
            Action::CloseDownstream { link, quit } => {
                // A connection the driver already dropped (a failed connect) or closed may be
                // closed again: nothing happens.
                if self.link == link && self.has_downstream() {
                    if quit && self.ds_open {
                        assert!(self.downstream.banner_was_sent(), "QUIT before the banner");
                        if self.checks {
                            self.downstream_log.push((self.now, b"QUIT\r\n".to_vec()));
                        }
                        let _ = self.downstream.feed(b"QUIT\r\n", &Speaker::default());
                    }
                    if self.ds_open {
                        self.downstream_closes += 1;
                    }
                    self.ds_open = false;
                    self.connecting = None;
                    self.closed_links.push(link);
                    self.ds_unread.clear();
                }
            }
            Action::ReleaseDownstream { link, carried } => {
                assert_eq!(
                    self.config.downstream.mode,
                    DownstreamMode::Multiplexing,
                    "released without multiplexing"
                );
                assert!(self.ds_open, "released a downstream that is not open");
                assert_eq!(link, self.link, "released another connection");
                assert!(self.ds_unread.is_empty(), "released with replies unread");
                let in_flight = self
                    .events
                    .iter()
                    .chain(&self.held)
                    .any(|event| matches!(event, Event::Data(e, _) if *e == link));
                assert!(!in_flight, "released with replies still on the way");
                assert!(
                    self.downstream.input.is_empty(),
                    "released with bytes unread"
                );
                assert!(!self.downstream.in_data, "released mid-message");
                assert_eq!(
                    self.downstream.in_transaction, carried.dirty,
                    "released with a transaction open but not marked for RSET"
                );
                self.ds_open = false;
                self.closed_links.push(link);
                if !self.downstream.gone && !self.downstream.quit {
                    self.pooled = Some(carried);
                }
            }
            Action::Close => {
                assert!(!self.closed, "Close came out twice");
                self.closed = true;
            }
            // The test plays the handshake (`tls_established`, `tls_failed`, or the session's
            // own `handle_tls_*`).
            Action::StartTls => {
                assert!(!self.handshaking, "StartTls came out twice");
                assert!(
                    !self.checks
                        || self
                            .client_all
                            .ends_with(b"220 2.0.0 Ready to start TLS\r\n"),
                    "StartTls before its 220 was out"
                );
                self.handshaking = true;
                self.tls_switches += 1;
            }
            Action::Ask(question) => {
                if let Some(answer) = self.answer(question) {
                    self.session.handle_answer(self.now, answer);
                    // As after every `handle_*`: the bytes first, then the actions.
                    self.transmit_to_client();
                }
            }
        }
    }

    /// The pair's shared services: each question answered as the test set them up, and
    /// recorded where the test looks at them.
    fn answer(&mut self, question: Question) -> Option<Answer> {
        Some(match question {
            Question::Admit(_) => Answer::Admission(self.admit),
            Question::CheckPass(_) => Answer::Pass(self.pass_cached),
            Question::RecordPass(ip) => {
                self.passes.push(ip);
                return None;
            }
            Question::CheckReputation(ip, _) => Answer::Reputation(self.reputation.history(ip)),
            Question::RecordReputation(ip, event, half_life) => {
                self.reputation.record(ip, event, self.now, half_life);
                self.reputation_events.push((ip, event));
                return None;
            }
            Question::CheckGreylist { key, subnet, times } => {
                let outcome = self.greylist.check(&key, &subnet, self.now, &times);
                self.greylist_keys.push(key);
                Answer::Greylist(outcome)
            }
            Question::EnterTarpit => Answer::TarpitSlot(self.tarpit_free),
            Question::Milter(step) => {
                let (stage, seen) = match &step {
                    MilterStep::Connect { .. } => ("connect", "connect".to_owned()),
                    MilterStep::Helo { name, .. } => ("helo", format!("helo:{name}")),
                    MilterStep::Mail { from, .. } => ("mail", format!("mail:{from}")),
                    MilterStep::Rcpt { to } => ("rcpt", format!("rcpt:{to}")),
                    MilterStep::Abort => ("abort", "abort".to_owned()),
                    MilterStep::Quit => ("quit", "quit".to_owned()),
                };
                self.milter_steps.push(seen);
                if matches!(step, MilterStep::Abort | MilterStep::Quit) {
                    return None;
                }
                let verdict = self
                    .milter_script
                    .iter()
                    .find(|(s, _)| *s == stage)
                    .map_or(Verdict::Continue, |(_, verdict)| verdict.clone());
                Answer::Milter(verdict)
            }
            Question::Scan(job) => {
                let bytes = job
                    .held
                    .read_range(0, job.held.len())
                    .expect("held message");
                self.scanned.push((
                    bytes,
                    ScanFacts {
                        from: job.from.clone(),
                        rcpts: job.rcpts.clone(),
                        queue_id: job.queue_id.clone(),
                        helo: job.helo.clone(),
                    },
                ));
                let Some((verdict, edits, marks)) = self.scan_answer.clone() else {
                    self.pending_scan = Some(job);
                    return None;
                };
                Answer::Scanned(Box::new(Scanned {
                    held: job.held,
                    verdict,
                    edits,
                    marks,
                }))
            }
            Question::Lookup(query) => {
                self.lookups.push(query.clone());
                let (_, answer) = self.dns.iter().find(|(q, _)| *q == query)?;
                let answer = answer.clone();
                Answer::Lookup(query, answer)
            }
        })
    }

    /// The connection the session uses now, not one it closed or released.
    fn is_current(&self, link: LinkId) -> bool {
        self.link == link && !self.closed_links.contains(&link)
    }

    fn queue_replies(&mut self, link: LinkId, replies: Vec<u8>) {
        if replies.is_empty() || !self.auto_downstream {
            return;
        }
        if self.dribble {
            for b in replies {
                self.queue(Event::Data(link, vec![b]));
            }
        } else {
            self.queue(Event::Data(link, replies));
        }
    }

    fn queue(&mut self, event: Event) {
        if self.lagging {
            self.held.push(event);
        } else {
            self.events.push_back(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRANSACTION: &[u8] = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n";

    #[test]
    fn relays_a_transaction_the_same_with_replies_dribbled() {
        let mut whole = Pair::new(config());
        whole.send(TRANSACTION);
        let mut dribbled = Pair::build_quiet(config(), Vec::new(), false);
        dribbled.dribble = true;
        dribbled.pump();
        dribbled.send(TRANSACTION);
        let output = whole.take_output();
        assert!(output.ends_with("250 2.0.0 Ok: queued as 1\r\n221 2.0.0 Bye\r\n"));
        assert_eq!(dribbled.take_output(), output);
        assert!(whole.closed && dribbled.closed);
        assert_eq!(whole.downstream.delivered, dribbled.downstream.delivered);
        assert_eq!(whole.downstream.commands[0], "EHLO mx.test");
        assert_eq!(whole.downstream_closes, 1);
    }

    #[test]
    fn a_bench_pair_drives_like_a_checking_one_and_keeps_nothing() {
        let config = Arc::new(config());
        let mut checked = Pair::sharing(Arc::clone(&config), Vec::new(), peer(false, false));
        checked.pump();
        checked.send(TRANSACTION);
        let mut bench = Pair::for_bench(config, peer(false, false));
        bench.send(TRANSACTION);
        assert_eq!(bench.take_output(), checked.take_output());
        assert!(bench.closed && checked.closed);
        assert_eq!(bench.downstream.totals, checked.downstream.totals);
        assert_eq!(bench.downstream.totals.dots_acked, 1);
        assert_eq!(checked.downstream.delivered.len(), 1);
        assert!(bench.client_log.is_empty() && bench.downstream_log.is_empty());
        assert!(bench.downstream.delivered.is_empty() && bench.downstream.commands.is_empty());
    }

    #[test]
    fn lagging_replies_wait_for_the_clock() {
        let mut pair = Pair::build_quiet(config(), Vec::new(), false);
        pair.lagging = true;
        pair.pump();
        pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
        assert!(pair.take_output().ends_with("250 SMTPUTF8\r\n"));
        assert!(pair.ds_open, "connected at once");
        // The banner, then EHLO's reply, then MAIL's: one tick each.
        for _ in 0..2 {
            pair.advance(Duration::from_secs(1));
            assert_eq!(
                pair.take_output(),
                "",
                "MAIL's reply before the downstream's"
            );
        }
        pair.advance(Duration::from_secs(1));
        assert_eq!(pair.take_output(), "250 2.1.0 Ok\r\n");
        let times: Vec<Instant> = pair.client_log.iter().map(|(at, _)| *at).collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "logged in time order"
        );
    }

    #[test]
    fn a_refused_server_sends_the_session_to_the_next() {
        let mut config = config();
        let second = SocketAddr::from(([127, 0, 0, 1], 10026));
        config.downstream.servers.push(second);
        let first = config.downstream.servers[0];
        let mut pair = Pair::build_quiet(config, Vec::new(), false);
        pair.refused_servers.push(first);
        pair.pump();
        pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
        assert_eq!(pair.connects, [first, second]);
        assert!(pair.take_output().ends_with("250 2.1.0 Ok\r\n"));
    }

    #[test]
    fn answers_scripted_lookups_and_records_the_rest() {
        let mut config = config();
        config.dns.rdns = true;
        let client = IpAddr::from([192, 0, 2, 7]);
        let dns = vec![(
            Query::Rdns(client),
            LookupAnswer::Rdns(tarmac::smtp::question::RdnsAnswer::NoName),
        )];
        let pair = Pair::with_dns(config, dns);
        assert_eq!(pair.lookups, [Query::Rdns(client)]);
        assert!(
            pair.client_log
                .iter()
                .any(|(_, out)| out.starts_with(b"220 "))
        );
    }
}
