//! The `session` target: one session against a scripted downstream on invented time.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use tarmac::config::{AnnounceClient, BareNewline, Config, Dnsbl, DownstreamMode, DownstreamTls};
use tarmac::downstream::dialog::Carried;
use tarmac::smtp::command::{Command, parse_command};
use tarmac::smtp::question::{
    Answer as ServiceAnswer, DnsblAnswer, LookupAnswer, Query, Question, RdnsAnswer,
};
use tarmac::smtp::reply::{Reply, Status, parse_reply};
use tarmac::smtp::session::{Action, DownstreamEvent, LinkId, Peer, Session, Shutdown, TlsVersion};
use tarmac::state::GreylistOutcome;

use super::{
    base_config, check_client_lines, escape, find, has_bare_newline, to_alphabet, vocabulary,
};

/// Drives one session against a scripted downstream on invented time.
///
/// Input: byte 0 picks the config and the downstream's behaviour, byte 1 its details:
///
/// | bits | byte 0                                       | byte 1                              |
/// |------|----------------------------------------------|-------------------------------------|
/// | 0    | `bare_newline = "normalize"` (else reject)   | `k` (0..=15), see byte 0 bits 6–7   |
/// | 1    | `max_line_length = 512`                      |                                     |
/// | 2    | `max_message_size = 2000`                    |                                     |
/// | 3    | `max_recipients = 2`                         |                                     |
/// | 4    | `announce_client`: 0 xclient, 1 proxy-v1,    | replies come one byte per event     |
/// | 5    | 2 none, 3 xclient with `mode=multiplexing`   | replies wait for the next clock tick|
/// | 6    | downstream: 0 normal, 1 rejects every RCPT,  | connect: 0 ok, 1 first server       |
/// | 7    | 2 closes on its `k`-th read, 3 silent after  | refuses, 2 first never completes,   |
/// |      | `k` replies                                  | 3 every server refuses              |
///
/// With byte 0 bits 6–7 at 0 or 1 (where `k` is unused), `k`'s bit 3 puts the client in the
/// tarpit instead: a 6 s greet pause with the `220-` teaser, a zone listing the client with
/// weight 2, replies held 10 s and, with `k`'s bit 2, stuttered one byte per second; bytes
/// before the banner then make it a pregreet talker.
///
/// The rest is client bytes, except: `0xF0..=0xFF` advance the clock by `(b & 0x0F) × 37 s`
/// and call `handle_timeout` (so `0xF0` just cuts a chunk), `0xEE` is a graceful shutdown and
/// `0xEF` an immediate one. At the end the client hangs up. The rest is run as is, mapped into
/// the SMTP alphabet, and mapped onto whole commands and body lines.
///
/// STARTTLS is always offered. After `Action::StartTls` the next chunk plays the handshake: its
/// first byte is the outcome (even: done, bit 1 picks TLS 1.2 over 1.3; odd: failed) and the
/// rest is what the client sends over TLS.
///
/// Outside the tarpit, with byte 0 bits 6–7 at 0 or 1, `k`'s bit 0 makes the downstream offer
/// STARTTLS (`[downstream] tls` opportunistic, or required with `k`'s bit 1): it answers 220
/// with a forged reply in the same write, and the driver's handshake fails with `k`'s bit 2.
///
/// Properties: every line to the client is `ddd[ -]text` with CRLF; a `250` to end-of-data is
/// one the downstream gave to a final dot, each used once and in order; a client `354` or a
/// relayed `250` to MAIL or RCPT is never more frequent than the downstream's; `Close` comes
/// out once and nothing follows it; each drained outbox stays under 1 MB;
/// `handle_client_data` consumes at most what it is given and nothing while it does not want
/// to read; after `handle_timeout(now)` no deadline is due at `now`; `StartTls` comes once per
/// `220 Ready to start TLS`, after it, and nothing reaches the client between it and the end
/// of the handshake (no answer to bytes sent before the handshake, CVE-2011-0411); a failed
/// handshake closes the session; the reply forged after the downstream's 220 to STARTTLS never
/// reaches the client. Downstream side: bytes go
/// only to an open connection, commands are CRLF-terminated lines of the verbs tarmac sends,
/// no nested MAIL, RCPTs within `max_recipients`, DATA only after an accepted RCPT, XCLIENT
/// and PROXY only as configured, and no bare CR or LF in a body.
pub fn session(data: &[u8]) {
    let [scenario, details, rest @ ..] = data else {
        return;
    };
    let keep_controls = |mapped: &mut dyn FnMut(u8) -> Vec<u8>| -> Vec<u8> {
        rest.iter()
            .flat_map(|&b| if b >= 0xee { vec![b] } else { mapped(b) })
            .collect()
    };
    let alphabet = keep_controls(&mut |b| to_alphabet(&[b]));
    let words = keep_controls(&mut |b| vocabulary(&[b], SESSION_TOKENS).into_bytes());
    for script in [rest.to_vec(), alphabet, words] {
        Harness::run(*scenario, *details, &script);
    }
}

/// Most bytes the session may hand out for one side in one round. The session's own cap is
/// 64 KiB plus one reply or one decoded chunk; this is the "never grows without bound" check.
const MAX_OUTBOX_DRAIN: usize = 1 << 20;

/// Rounds of event delivery one client chunk may cause; more means the session and the
/// scripted downstream are ping-ponging forever.
const MAX_ROUNDS: usize = 100_000;

/// Whole commands, body lines and smuggling fragments; input bytes pick from it.
const SESSION_TOKENS: &[&str] = &[
    "EHLO client.example\r\n",
    "HELO client.example\r\n",
    "MAIL FROM:<a@example.org>\r\n",
    "MAIL FROM:<> SIZE=100 BODY=8BITMIME SMTPUTF8\r\n",
    "MAIL FROM:<\u{e9}@example.org> SMTPUTF8\r\n",
    "MAIL FROM:<a@example.org> SIZE=99999999999\r\n",
    "RCPT TO:<b@example.net>\r\n",
    "RCPT TO:<c@example.net>\r\n",
    "RCPT TO:<postmaster>\r\n",
    "RCPT TO:<\u{e9}@example.net>\r\n",
    "DATA\r\n",
    "RSET\r\n",
    "NOOP\r\n",
    "QUIT\r\n",
    "VRFY a\r\n",
    "HELP\r\n",
    "STARTTLS\r\n",
    "XCLIENT ADDR=192.0.2.1\r\n",
    "BDAT 10 LAST\r\n",
    "FOO\r\n",
    "MAIL FROM:a@b\r\n",
    "Subject: hi\r\n",
    "\r\n",
    ".\r\n",
    "..leading dot\r\n",
    "body line\r\n",
    "\n.\r\n",
    "\r\n.\n",
    "\r.\r\n",
    "\n.\n",
    "\r",
    "\n",
    ".",
    "x",
    "\u{e9}",
    "\r\n.\r\nRSET\r\n",
];

/// How the scripted downstream behaves (byte 0, bits 6–7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Normal,
    RejectRcpt,
    /// Closes the connection on its `k`-th read (counting from 0).
    CloseOnRead(u32),
    /// Answers `k` replies per connection (banner included), then nothing.
    SilentAfter(u32),
}

/// How connects go (byte 1, bits 6–7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnectMode {
    Ok,
    FirstRefused,
    FirstHangs,
    AllRefused,
}

/// An event waiting to be delivered to the session, tagged with the downstream connection it
/// belongs to (events of a connection the session closed are never delivered).
#[derive(Debug)]
enum Event {
    Connected(u32),
    /// Multiplexing: the pooled connection `g` comes back for a new transaction.
    Reused(u32, Carried),
    ConnectFailed(u32),
    Data(u32, Vec<u8>),
    Closed(u32),
    /// The driver's TLS handshake on connection `g` completed, or failed.
    TlsEstablished(u32),
    TlsFailed(u32),
}

/// The session, a scripted downstream and the client's view, on invented time.
struct Harness {
    session: Session,
    now: Instant,
    config: Arc<Config>,
    behaviour: Behaviour,
    connect_mode: ConnectMode,
    dribble: bool,
    /// Downstream replies are held until the next clock tick.
    lagging: bool,
    /// Events ready for delivery; `held` are those waiting for the next tick.
    events: VecDeque<Event>,
    held: Vec<Event>,
    /// The downstream connection the session asked for: its generation and, once connected,
    /// the scripted server on it.
    conn: Option<(u32, Option<FakeDownstream>)>,
    /// Multiplexing: the connection the session released, with what its EHLO offered.
    pooled: Option<(FakeDownstream, Carried)>,
    /// Connections the session closed or released: it must never hand out bytes for them.
    closed_links: Vec<u32>,
    /// Downstream reply bytes the session left unconsumed (a partial reply).
    ds_unread: Vec<u8>,
    client_pending: Vec<u8>,
    client_seen: ClientView,
    closed: bool,
    /// `Action::StartTls` came out: the next client chunk plays the handshake.
    handshaking: bool,
    /// The downstream offers STARTTLS (`k`'s bit 0).
    downstream_starttls: bool,
    /// The driver's handshakes with the downstream fail (`k`'s bit 2).
    downstream_tls_fails: bool,
    /// Counts across all downstream connections.
    totals: Totals,
}

/// Things the downstream said, over the whole session.
#[derive(Debug, Default)]
struct Totals {
    /// 250s to a final dot; the n-th carries the text `queued as F<n>`.
    dots_acked: u32,
    data_354: u32,
    mail_250: u32,
    rcpt_250: u32,
}

/// The client's side: every reply it got, checked as it arrives.
#[derive(Debug, Default)]
struct ClientView {
    bytes: Vec<u8>,
    /// Start of the first reply not yet checked.
    checked: usize,
    /// The last reply was a 354: the next one answers the end of data.
    after_354: bool,
    last_ack: u32,
    got_354: u32,
    got_mail_250: u32,
    got_rcpt_250: u32,
    /// Tarpit scenario: output may stop mid-reply (a `220-` teaser, stuttered bytes); only
    /// whole replies are checked, as they complete.
    partial_ok: bool,
    /// The `220-` greeting teaser was seen; its final line may carry another code (a 554,
    /// 521 or 421 instead of the 220), as DESIGN.md §1.3 and postscreen have it.
    teaser_seen: bool,
}

impl Harness {
    fn run(scenario: u8, details: u8, script: &[u8]) {
        let mut harness = Harness::new(scenario, details);
        harness.settle();
        let mut chunk_start = 0;
        for (i, &b) in script.iter().enumerate() {
            if b < 0xee {
                continue;
            }
            harness.client_send(script.get(chunk_start..i).unwrap_or_default());
            chunk_start = i + 1;
            match b {
                0xee => harness.shutdown(Shutdown::Graceful),
                0xef => harness.shutdown(Shutdown::Now),
                _ => harness.tick(Duration::from_secs(u64::from(b & 0x0f) * 37)),
            }
        }
        harness.client_send(script.get(chunk_start..).unwrap_or_default());
        harness.finish();
    }

    fn new(scenario: u8, details: u8) -> Harness {
        let mut config = base_config().clone();
        let limits = &mut config.limits;
        if scenario & 1 != 0 {
            limits.bare_newline = BareNewline::Normalize;
        }
        if scenario & 2 != 0 {
            limits.max_line_length = 512;
        }
        if scenario & 4 != 0 {
            limits.max_message_size = 2000;
        }
        if scenario & 8 != 0 {
            limits.max_recipients = 2;
        }
        config.downstream.announce_client = match (scenario >> 4) & 3 {
            0 | 3 => AnnounceClient::Xclient,
            1 => AnnounceClient::ProxyV1,
            _ => AnnounceClient::None,
        };
        if (scenario >> 4) & 3 == 3 {
            config.downstream.mode = DownstreamMode::Multiplexing;
        }
        let k = u32::from(details & 0x0f);
        let tarpit = scenario >> 6 <= 1 && k & 8 != 0;
        if tarpit {
            config.tarpit.greet_pause = Duration::from_secs(6);
            config.tarpit.reply_delay = Duration::from_secs(10);
            config.tarpit.stutter = Duration::from_secs(u64::from(k >> 2 & 1));
            config.dnsbl = vec![Dnsbl {
                zone: "bl.fuzz".into(),
                weight: 2,
                codes: Vec::new(),
                reply: None,
            }];
        }
        let downstream_starttls = !tarpit && scenario >> 6 <= 1 && k & 1 != 0;
        if downstream_starttls {
            config.downstream.tls = if k & 2 != 0 {
                DownstreamTls::Required
            } else {
                DownstreamTls::Opportunistic
            };
        }
        let behaviour = match scenario >> 6 {
            0 => Behaviour::Normal,
            1 => Behaviour::RejectRcpt,
            2 => Behaviour::CloseOnRead(k),
            _ => Behaviour::SilentAfter(k),
        };
        let connect_mode = match details >> 6 {
            0 => ConnectMode::Ok,
            1 => ConnectMode::FirstRefused,
            2 => ConnectMode::FirstHangs,
            _ => ConnectMode::AllRefused,
        };
        if connect_mode != ConnectMode::Ok {
            config
                .downstream
                .servers
                .push(SocketAddr::from(([127, 0, 0, 1], 10026)));
        }
        let config = Arc::new(config);
        let now = Instant::now();
        let peer = Peer {
            client: SocketAddr::from(([192, 0, 2, 7], 53211)),
            local: SocketAddr::from(([198, 51, 100, 1], 25)),
            accepted_at: UNIX_EPOCH + Duration::from_secs(1_795_438_862),
            stressed: false,
            starttls: true,
        };
        Harness {
            session: Session::new(Arc::clone(&config), peer, now),
            now,
            config,
            behaviour,
            connect_mode,
            dribble: details & 0x10 != 0,
            lagging: details & 0x20 != 0,
            events: VecDeque::new(),
            held: Vec::new(),
            conn: None,
            pooled: None,
            closed_links: Vec::new(),
            ds_unread: Vec::new(),
            client_pending: Vec::new(),
            client_seen: ClientView {
                partial_ok: tarpit,
                ..ClientView::default()
            },
            closed: false,
            handshaking: false,
            downstream_starttls,
            downstream_tls_fails: k & 4 != 0,
            totals: Totals::default(),
        }
    }

    fn client_send(&mut self, bytes: &[u8]) {
        if self.closed {
            return;
        }
        let mut bytes = bytes;
        if self.handshaking {
            // The chunk's first byte is the handshake's outcome (even: done, with TLS 1.3 or
            // 1.2 by the next bit; odd: failed); the rest was sent over TLS.
            let Some((&outcome, rest)) = bytes.split_first() else {
                return;
            };
            assert!(
                self.client_pending.is_empty(),
                "plain bytes kept for after TLS"
            );
            self.handshaking = false;
            if outcome & 1 == 0 {
                let version = if outcome & 2 == 0 {
                    TlsVersion::Tls13
                } else {
                    TlsVersion::Tls12
                };
                self.session.handle_tls_established(self.now, version);
                assert_eq!(self.session.report().tls, version.as_str());
            } else {
                self.session.handle_tls_failed(self.now);
                self.settle();
                assert!(self.closed, "a failed handshake left the session open");
                return;
            }
            self.settle();
            bytes = rest;
        }
        self.client_pending.extend_from_slice(bytes);
        self.pump();
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
        self.events.extend(self.held.drain(..));
        self.session.handle_timeout(self.now);
        self.settle();
        self.pump();
        if let Some(due) = self.session.poll_timeout() {
            assert!(
                due > self.now,
                "deadline {:?} still due after handle_timeout",
                self.now - due
            );
        }
    }

    fn shutdown(&mut self, how: Shutdown) {
        self.session.handle_shutdown(self.now, how);
        self.settle();
        self.pump();
        if how == Shutdown::Now {
            assert!(self.closed, "Shutdown::Now left the session open");
        }
    }

    /// The client hangs up; the session must close and leave no downstream connection open.
    fn finish(&mut self) {
        self.session.handle_client_eof(self.now);
        self.settle();
        self.pump();
        assert!(self.closed && self.session.is_closed(), "EOF did not close");
        assert!(self.conn.is_none(), "downstream left open after Close");
        assert_eq!(self.session.poll_timeout(), None, "deadline after close");
        self.session
            .handle_timeout(self.now + Duration::from_secs(100_000));
        self.settle();
    }

    /// Offers client bytes and delivers downstream events until neither makes progress.
    fn pump(&mut self) {
        for _ in 0..MAX_ROUNDS {
            let mut progress = false;
            if !self.client_pending.is_empty() && !self.closed {
                let wants = self.session.wants_read();
                let pending = std::mem::take(&mut self.client_pending);
                let used = self.session.handle_client_data(self.now, &pending);
                assert!(
                    used <= pending.len(),
                    "consumed {used} of {}",
                    pending.len()
                );
                if !wants {
                    assert!(
                        used == 0 || self.session.is_closed(),
                        "consumed {used} bytes while not wanting to read"
                    );
                }
                self.client_pending = pending.get(used..).unwrap_or_default().to_vec();
                progress |= used > 0;
                self.settle();
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

    fn deliver(&mut self, event: Event) {
        let current = self.conn.as_ref().map(|(g, _)| *g);
        match event {
            Event::Connected(g) if current == Some(g) => {
                let mut fake = FakeDownstream::new(&self.config, self.behaviour);
                fake.offer_starttls = self.downstream_starttls;
                let banner = fake.connect();
                self.conn = Some((g, Some(fake)));
                self.session
                    .handle_downstream(self.now, LinkId(g), DownstreamEvent::Connected);
                self.settle();
                self.queue_replies(g, banner);
            }
            Event::Reused(g, carried) if current == Some(g) => {
                self.session.handle_downstream(
                    self.now,
                    LinkId(g),
                    DownstreamEvent::Reused(carried),
                );
            }
            Event::ConnectFailed(g) if current == Some(g) => {
                self.conn = None;
                self.session
                    .handle_downstream(self.now, LinkId(g), DownstreamEvent::ConnectFailed);
            }
            Event::Closed(g) if current == Some(g) => {
                // The socket stays the driver's until the session says CloseDownstream; what
                // it writes meanwhile (a QUIT) goes nowhere.
                if let Some((_, Some(fake))) = self.conn.as_mut() {
                    fake.gone = true;
                }
                self.session
                    .handle_downstream(self.now, LinkId(g), DownstreamEvent::Closed);
            }
            Event::Data(g, bytes) if current == Some(g) => {
                let mut buf = std::mem::take(&mut self.ds_unread);
                buf.extend_from_slice(&bytes);
                let used = self.session.handle_downstream(
                    self.now,
                    LinkId(g),
                    DownstreamEvent::Data(&buf),
                );
                assert!(used <= buf.len(), "consumed {used} of {}", buf.len());
                self.ds_unread = buf.get(used..).unwrap_or_default().to_vec();
            }
            Event::TlsEstablished(g) if current == Some(g) => {
                self.session.handle_downstream(
                    self.now,
                    LinkId(g),
                    DownstreamEvent::TlsEstablished,
                );
            }
            Event::TlsFailed(g) if current == Some(g) => {
                self.session
                    .handle_downstream(self.now, LinkId(g), DownstreamEvent::TlsFailed);
            }
            // An event of a connection the session already closed: the driver dropped it.
            _ => return,
        }
        self.settle();
    }

    /// What a driver does after every `handle_*`: hand out both sides' bytes, then run the
    /// actions. Downstream replies and connect results become queued events.
    fn settle(&mut self) {
        let mut out = Vec::new();
        self.session.poll_transmit(self.now, &mut out);
        assert!(out.len() < MAX_OUTBOX_DRAIN, "client outbox {}", out.len());
        if !out.is_empty() {
            assert!(
                !self.closed,
                "bytes for the client after Close: {}",
                escape(&out)
            );
            // Nothing is said between the switch and the end of the handshake, in plain text
            // or otherwise: in particular no answer to bytes pipelined after STARTTLS.
            assert!(
                !self.handshaking,
                "bytes for the client during the TLS handshake: {}",
                escape(&out)
            );
            assert!(
                find(&out, FORGED.as_bytes()).is_none(),
                "a reply forged after the downstream's 220 to STARTTLS reached the client"
            );
            self.client_seen.receive(&out, &self.totals);
        }
        let mut ds = Vec::new();
        for g in self.closed_links.clone() {
            self.session.poll_transmit_downstream(LinkId(g), &mut ds);
            assert!(
                ds.is_empty(),
                "bytes for a closed downstream: {}",
                escape(&ds)
            );
        }
        if let Some((g, _)) = self.conn {
            self.session.poll_transmit_downstream(LinkId(g), &mut ds);
        }
        assert!(
            ds.len() < MAX_OUTBOX_DRAIN,
            "downstream outbox {}",
            ds.len()
        );
        if !ds.is_empty() {
            let Some((g, Some(fake))) = self.conn.as_mut() else {
                panic!("bytes for an unconnected downstream: {}", escape(&ds));
            };
            let g = *g;
            // Whom the session speaks for now: a MAIL may only reach a connection announced
            // for exactly this client (DESIGN.md §6).
            let report = self.session.report();
            let client = Expected {
                addr: Some(report.client),
                helo: report.helo.map(<[u8]>::to_vec).unwrap_or_default(),
            };
            let answer = fake.feed(&ds, &client, &mut self.totals);
            match answer {
                Answer::Replies(replies) => self.queue_replies(g, replies),
                Answer::Close => self.queue(Event::Closed(g)),
            }
        }
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::ConnectDownstream {
                    link,
                    addr,
                    pooled: true,
                } if self.pooled.is_some() && addr == self.config.downstream.servers[0] => {
                    assert!(self.conn.is_none(), "second downstream while one is open");
                    let g = link.0;
                    if let Some((fake, carried)) = self.pooled.take() {
                        self.conn = Some((g, Some(fake)));
                        self.ds_unread.clear();
                        self.events.push_back(Event::Reused(g, carried));
                    }
                }
                Action::ConnectDownstream { link, addr, .. } => {
                    assert!(self.conn.is_none(), "second downstream while one is open");
                    assert!(
                        self.config.downstream.servers.contains(&addr),
                        "connect to {addr}"
                    );
                    let g = link.0;
                    self.conn = Some((g, None));
                    self.ds_unread.clear();
                    let first = addr
                        == self
                            .config
                            .downstream
                            .servers
                            .first()
                            .copied()
                            .unwrap_or(addr);
                    match self.connect_mode {
                        ConnectMode::AllRefused => self.events.push_back(Event::ConnectFailed(g)),
                        ConnectMode::FirstRefused if first => {
                            self.events.push_back(Event::ConnectFailed(g))
                        }
                        // Never completes: only the session's connect timeout ends it.
                        ConnectMode::FirstHangs if first => {}
                        _ => self.events.push_back(Event::Connected(g)),
                    }
                }
                Action::StartTlsDownstream(link) => {
                    let Some((g, Some(fake))) = self.conn.as_mut() else {
                        panic!("TLS for an unconnected downstream");
                    };
                    assert_eq!(*g, link.0, "TLS for another connection");
                    assert!(
                        fake.awaiting_tls,
                        "TLS before the downstream's 220 to STARTTLS"
                    );
                    let g = *g;
                    let fails = self.downstream_tls_fails;
                    if fails {
                        fake.gone = true;
                    } else {
                        fake.start_tls();
                    }
                    // The driver drops what came after the 220: plain text anyone could forge.
                    self.ds_unread.clear();
                    let stale = |event: &Event| matches!(event, Event::Data(e, _) if *e == g);
                    self.events.retain(|event| !stale(event));
                    self.held.retain(|event| !stale(event));
                    self.queue(if fails {
                        Event::TlsFailed(g)
                    } else {
                        Event::TlsEstablished(g)
                    });
                }
                Action::CloseDownstream { link, quit } => {
                    // A connection the driver already dropped (it reported `Closed` or a
                    // failed connect) may be closed again: nothing happens.
                    if let Some((g, fake)) = self.conn.take_if(|(g, _)| *g == link.0) {
                        if quit && let Some(mut fake) = fake {
                            assert!(fake.banner_was_sent(), "QUIT before the banner");
                            let client = Expected::default();
                            let _ = fake.feed(b"QUIT\r\n", &client, &mut self.totals);
                        }
                        self.closed_links.push(g);
                        self.ds_unread.clear();
                    }
                }
                Action::Close => {
                    assert!(!self.closed, "Close came out twice");
                    self.closed = true;
                }
                Action::StartTls => {
                    assert!(!self.handshaking, "StartTls came out twice");
                    assert!(
                        self.client_seen
                            .bytes
                            .ends_with(b"220 2.0.0 Ready to start TLS\r\n"),
                        "StartTls before its 220 was out"
                    );
                    self.handshaking = true;
                }
                Action::Ask(question) => {
                    if let Some(answer) = answer_question(question) {
                        self.session.handle_answer(self.now, answer);
                    }
                }
                Action::ReleaseDownstream { link, carried } => {
                    assert_eq!(
                        self.config.downstream.mode,
                        DownstreamMode::Multiplexing,
                        "released without multiplexing"
                    );
                    let Some((g, Some(fake))) = self.conn.take() else {
                        panic!("released a downstream that is not connected");
                    };
                    assert_eq!(g, link.0, "released another connection");
                    self.closed_links.push(g);
                    assert!(self.ds_unread.is_empty(), "released with replies unread");
                    let in_flight = self
                        .events
                        .iter()
                        .chain(&self.held)
                        .any(|event| matches!(event, Event::Data(e, _) if *e == g));
                    assert!(!in_flight, "released with replies still on the way");
                    assert!(!fake.in_data, "released mid-body");
                    assert_eq!(
                        fake.in_transaction, carried.dirty,
                        "released with a transaction open but not marked for RSET"
                    );
                    if !fake.gone && !fake.quit {
                        self.pooled = Some((fake, carried));
                    }
                }
            }
        }
    }

    fn queue_replies(&mut self, g: u32, replies: Vec<u8>) {
        if replies.is_empty() {
            return;
        }
        if self.dribble {
            for b in replies {
                self.queue(Event::Data(g, vec![b]));
            }
        } else {
            self.queue(Event::Data(g, replies));
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

impl ClientView {
    /// Checks the replies in newly received bytes: whole replies only, each line well-formed,
    /// and the end-of-data and relayed 2xx replies backed by the downstream's.
    fn receive(&mut self, bytes: &[u8], totals: &Totals) {
        self.bytes.extend_from_slice(bytes);
        assert!(
            self.partial_ok || self.bytes.ends_with(b"\r\n"),
            "client output not ending in CRLF: {}",
            escape(&self.bytes)
        );
        while let Some(rest) = self.bytes.get(self.checked..).filter(|r| !r.is_empty()) {
            if self.partial_ok && !self.teaser_seen && rest.starts_with(b"220-") {
                let Some(end) = find(rest, b"\r\n") else {
                    return;
                };
                check_client_lines(rest.get(..end + 2).unwrap_or_default());
                self.teaser_seen = true;
                self.checked += end + 2;
                continue;
            }
            let (reply, used) = match parse_reply(rest) {
                Ok(Status::Complete(done)) => done,
                Ok(Status::Partial) if self.partial_ok => return,
                _ => panic!("client got a malformed reply: {}", escape(rest)),
            };
            let wire = rest.get(..used).unwrap_or_default().to_vec();
            check_client_lines(&wire);
            self.checked += used;
            self.check_reply(&reply, totals);
        }
    }

    fn check_reply(&mut self, reply: &Reply, totals: &Totals) {
        let text = reply.lines.join("\n");
        let acked = text
            .strip_prefix("Ok: queued as F")
            .and_then(|n| n.parse::<u32>().ok());
        if self.after_354 {
            self.after_354 = false;
            if reply.code / 100 == 2 {
                let Some(n) = acked else {
                    panic!(
                        "end-of-data {} not from the downstream: {text:?}",
                        reply.code
                    );
                };
                assert!(
                    n > self.last_ack && n <= totals.dots_acked,
                    "end-of-data 250 for message {n} (last relayed {}, downstream acked {})",
                    self.last_ack,
                    totals.dots_acked
                );
                self.last_ack = n;
            }
            return;
        }
        assert!(
            acked.is_none(),
            "a final-dot 250 answered another command: {text:?}"
        );
        match reply.code {
            354 => {
                self.after_354 = true;
                self.got_354 += 1;
                assert!(
                    self.got_354 <= totals.data_354,
                    "354 without the downstream's"
                );
            }
            250 if text == "Sender ok" => {
                self.got_mail_250 += 1;
                assert!(
                    self.got_mail_250 <= totals.mail_250,
                    "MAIL 250 without the downstream's"
                );
            }
            250 if text == "Recipient ok" => {
                self.got_rcpt_250 += 1;
                assert!(
                    self.got_rcpt_250 <= totals.rcpt_250,
                    "RCPT 250 without the downstream's"
                );
            }
            _ => {}
        }
    }
}

/// The scripted downstream's EHLO reply: everything tarmac can use, XCLIENT included.
const EHLO_REPLY: &str = "250-ds.fuzz\r\n250-8BITMIME\r\n250-SIZE 100000000\r\n250-SMTPUTF8\r\n250 XCLIENT ADDR NAME PORT HELO PROTO";

/// The EHLO reply of a downstream offering STARTTLS (before TLS).
/// Postfix's EHLO reply after XCLIENT: the new client address is not an xclient host.
const EHLO_AFTER_XCLIENT_REPLY: &str =
    "250-ds.fuzz\r\n250-8BITMIME\r\n250-SIZE 100000000\r\n250 SMTPUTF8";

const EHLO_STARTTLS_REPLY: &str = "250-ds.fuzz\r\n250-8BITMIME\r\n250-STARTTLS\r\n250-SIZE 100000000\r\n250-SMTPUTF8\r\n250 XCLIENT ADDR NAME PORT HELO PROTO";

/// What the downstream's 220 to STARTTLS carries behind it, as if injected on the path.
const FORGED: &str = "250 forged-after-starttls";

/// What the scripted downstream does with bytes it read.
enum Answer {
    Replies(Vec<u8>),
    Close,
}

/// A tiny SMTP server on one downstream connection: answers what tarmac sends, and asserts
/// that it is well-formed and in order.
/// Who the session speaks for when its bytes reach the fake downstream.
#[derive(Default)]
struct Expected {
    addr: Option<SocketAddr>,
    helo: Vec<u8>,
}

/// A downstream that answers like Postfix's smtpd where it matters for the trust boundary:
/// XCLIENT is offered and accepted once per connection (its EHLO after XCLIENT no longer lists
/// it, and a second one gets `550 5.7.0`), and MAIL must come after the greeting that follows
/// the last XCLIENT.
struct FakeDownstream {
    behaviour: Behaviour,
    /// The banner went out.
    banner_sent: bool,
    /// EHLO or HELO was answered since the banner or the last XCLIENT.
    greeted: bool,
    /// XCLIENT was accepted on this connection.
    xclient_done: bool,
    /// The ADDR of that XCLIENT, or the source of the PROXY header.
    announced_addr: Option<String>,
    /// The argument of the greeting after XCLIENT.
    announced_helo: Option<Vec<u8>>,
    announce: AnnounceClient,
    max_recipients: usize,
    input: Vec<u8>,
    /// The PROXY v1 header is still expected.
    want_proxy: bool,
    /// Inside a body; `scanned` is how far it has been checked.
    in_data: bool,
    scanned: usize,
    in_transaction: bool,
    rcpts: usize,
    rcpts_accepted: usize,
    quit: bool,
    /// This side closed the connection: it reads nothing more.
    gone: bool,
    reads: u32,
    replies: u32,
    /// Lists STARTTLS in its EHLO reply until TLS is on.
    offer_starttls: bool,
    /// It said 220 to STARTTLS: nothing may come until the driver's handshake is done.
    awaiting_tls: bool,
    tls: bool,
}

impl FakeDownstream {
    fn new(config: &Config, behaviour: Behaviour) -> FakeDownstream {
        let announce = config.downstream.announce_client;
        FakeDownstream {
            behaviour,
            banner_sent: false,
            greeted: false,
            xclient_done: false,
            announced_addr: None,
            announced_helo: None,
            announce,
            max_recipients: config.limits.max_recipients,
            input: Vec::new(),
            want_proxy: announce == AnnounceClient::ProxyV1,
            in_data: false,
            scanned: 0,
            in_transaction: false,
            rcpts: 0,
            rcpts_accepted: 0,
            quit: false,
            gone: false,
            reads: 0,
            replies: 0,
            offer_starttls: false,
            awaiting_tls: false,
            tls: false,
        }
    }

    /// The handshake is done: the session starts over with EHLO, inside TLS.
    fn start_tls(&mut self) {
        self.awaiting_tls = false;
        self.tls = true;
        self.input.clear();
    }

    /// Whether the downstream sent its banner (QUIT is in order from then on).
    fn banner_was_sent(&self) -> bool {
        self.banner_sent
    }

    fn connect(&mut self) -> Vec<u8> {
        self.banner_sent = true;
        let mut out = Vec::new();
        self.reply(&mut out, "220 ds.fuzz ESMTP");
        out
    }

    fn feed(&mut self, bytes: &[u8], client: &Expected, totals: &mut Totals) -> Answer {
        if self.gone {
            return Answer::Replies(Vec::new());
        }
        assert!(!self.quit, "bytes after QUIT: {}", escape(bytes));
        assert!(
            !self.awaiting_tls,
            "plain bytes after the 220 to STARTTLS: {}",
            escape(bytes)
        );
        if let Behaviour::CloseOnRead(k) = self.behaviour {
            if self.reads == k {
                self.gone = true;
                return Answer::Close;
            }
        }
        self.reads += 1;
        self.input.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            if self.in_data {
                if !self.body_end(&mut out, totals) {
                    break;
                }
                continue;
            }
            let Some(end) = find(&self.input, b"\r\n") else {
                assert!(
                    !self.input.contains(&b'\n'),
                    "bare LF to the downstream: {}",
                    escape(&self.input)
                );
                break;
            };
            let line: Vec<u8> = self.input.drain(..end + 2).take(end).collect();
            self.command(&line, client, &mut out, totals);
        }
        Answer::Replies(out)
    }

    fn command(&mut self, line: &[u8], client: &Expected, out: &mut Vec<u8>, totals: &mut Totals) {
        assert!(
            !line.contains(&b'\r') && !line.contains(&b'\n'),
            "line end inside a downstream command: {}",
            escape(line)
        );
        if self.want_proxy {
            self.want_proxy = false;
            assert!(
                line.starts_with(b"PROXY TCP4 "),
                "not a PROXY header: {}",
                escape(line)
            );
            let source = line.split(|&b| b == b' ').nth(2).unwrap_or_default();
            self.announced_addr = Some(String::from_utf8_lossy(source).into_owned());
            return;
        }
        let mut words = line.split(|&b| b == b' ');
        let verb = words.next().unwrap_or_default();
        if matches!(verb, b"EHLO" | b"HELO") {
            assert!(self.banner_sent, "greeting before the banner");
            self.greeted = true;
            if self.xclient_done {
                self.announced_helo = Some(words.next().unwrap_or_default().to_vec());
            }
        }
        match verb {
            // Postfix re-checks its xclient hosts against the address XCLIENT gave it.
            b"EHLO" if self.xclient_done => {
                self.reply(out, EHLO_AFTER_XCLIENT_REPLY);
            }
            b"EHLO" if self.offer_starttls && !self.tls => {
                self.reply(out, EHLO_STARTTLS_REPLY);
            }
            b"EHLO" => {
                self.reply(out, EHLO_REPLY);
            }
            b"STARTTLS" => {
                assert!(self.offer_starttls && !self.tls, "STARTTLS not offered");
                assert!(!self.in_transaction, "STARTTLS inside a transaction");
                if self.reply(out, "220 2.0.0 Ready to start TLS") {
                    self.awaiting_tls = true;
                    // A man in the middle's reply, in the same write.
                    out.extend_from_slice(FORGED.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
            }
            b"HELO" => {
                self.reply(out, "250 ds.fuzz");
            }
            b"XCLIENT" => {
                assert_eq!(
                    self.announce,
                    AnnounceClient::Xclient,
                    "XCLIENT not configured"
                );
                assert!(!self.in_transaction, "XCLIENT inside a transaction");
                assert!(self.greeted, "XCLIENT before EHLO");
                if self.xclient_done {
                    self.reply(out, "550 5.7.0 Error: insufficient authorization");
                    return;
                }
                self.xclient_done = true;
                self.greeted = false;
                self.announced_helo = None;
                let addr = line
                    .split(|&b| b == b' ')
                    .find_map(|word| word.strip_prefix(b"ADDR="));
                self.announced_addr = addr.map(|a| String::from_utf8_lossy(a).into_owned());
                self.reply(out, "220 ds.fuzz ESMTP");
            }
            b"MAIL" => {
                // Only over a ready connection, announced for exactly this client.
                assert!(self.greeted, "MAIL before the handshake: {}", escape(line));
                if let Some(addr) = client.addr {
                    match self.announce {
                        AnnounceClient::Xclient => {
                            assert!(self.xclient_done, "MAIL without XCLIENT");
                            assert_eq!(
                                self.announced_addr.as_deref(),
                                Some(addr.ip().to_canonical().to_string().as_str()),
                                "MAIL under another client's address"
                            );
                            let helo = &client.helo;
                            let expected: &[u8] = if !helo.is_empty()
                                && helo.len() <= 255
                                && helo.iter().all(u8::is_ascii_graphic)
                            {
                                helo
                            } else {
                                b"[UNAVAILABLE]"
                            };
                            assert_eq!(
                                self.announced_helo.as_deref(),
                                Some(expected),
                                "MAIL under another HELO"
                            );
                        }
                        AnnounceClient::ProxyV1 => assert_eq!(
                            self.announced_addr.as_deref(),
                            Some(addr.ip().to_string().as_str()),
                            "MAIL under another client's PROXY header"
                        ),
                        _ => {}
                    }
                }
                assert!(
                    matches!(parse_command(line), Ok(Command::Mail { .. })),
                    "bad MAIL relayed: {}",
                    escape(line)
                );
                assert!(!self.in_transaction, "nested MAIL relayed");
                self.in_transaction = true;
                self.rcpts = 0;
                self.rcpts_accepted = 0;
                if self.reply(out, "250 2.1.0 Sender ok") {
                    totals.mail_250 += 1;
                }
            }
            b"RCPT" => {
                assert!(
                    matches!(parse_command(line), Ok(Command::Rcpt { .. })),
                    "bad RCPT relayed: {}",
                    escape(line)
                );
                assert!(self.in_transaction, "RCPT without MAIL");
                self.rcpts += 1;
                assert!(self.rcpts <= self.max_recipients, "over max_recipients");
                if self.behaviour == Behaviour::RejectRcpt {
                    self.reply(out, "550 5.1.1 Recipient rejected");
                } else if self.reply(out, "250 2.1.5 Recipient ok") {
                    self.rcpts_accepted += 1;
                    totals.rcpt_250 += 1;
                }
            }
            b"DATA" => {
                assert!(
                    self.in_transaction && self.rcpts_accepted > 0,
                    "DATA without recipient"
                );
                if self.reply(out, "354 go ahead") {
                    self.in_data = true;
                    self.scanned = 0;
                    totals.data_354 += 1;
                }
            }
            b"RSET" => {
                self.in_transaction = false;
                self.reply(out, "250 2.0.0 Reset ok");
            }
            b"QUIT" => {
                self.quit = true;
                self.reply(out, "221 2.0.0 Bye");
            }
            _ => panic!("unexpected downstream command {}", escape(line)),
        }
    }

    /// Reads body bytes; true when the final dot was read (and answered).
    fn body_end(&mut self, out: &mut Vec<u8>, totals: &mut Totals) -> bool {
        let end = find(&self.input, b"\r\n.\r\n");
        let body_len = end.map_or(self.input.len(), |at| at + 2);
        let body = self.input.get(..body_len).unwrap_or_default();
        // A CR at the end may be the start of a CRLF still in flight.
        let settled = if end.is_none() {
            body.strip_suffix(b"\r").unwrap_or(body)
        } else {
            body
        };
        assert!(
            !has_bare_newline(
                settled
                    .get(self.scanned.saturating_sub(1)..)
                    .unwrap_or_default(),
                false
            ),
            "bare CR or LF in a relayed body: {}",
            escape(settled)
        );
        let size_cap = 2 * 25_000_000 + 1024;
        assert!(body.len() <= size_cap, "body of {} bytes", body.len());
        self.scanned = settled.len();
        let Some(at) = end else {
            return false;
        };
        self.input.drain(..at + 5);
        self.in_data = false;
        self.in_transaction = false;
        let text = format!("250 2.0.0 Ok: queued as F{}", totals.dots_acked + 1);
        if self.reply(out, &text) {
            totals.dots_acked += 1;
        }
        true
    }

    /// Appends a reply unless the script says to stay silent; whether it was sent.
    fn reply(&mut self, out: &mut Vec<u8>, text: &str) -> bool {
        if let Behaviour::SilentAfter(k) = self.behaviour {
            if self.replies >= k {
                return false;
            }
        }
        self.replies += 1;
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
        true
    }
}

/// The fuzz driver's shared services: every question answered at once, as from a cache or a
/// local table, and the same way every time so a corpus file replays exactly.
fn answer_question(question: Question) -> Option<ServiceAnswer> {
    Some(match question {
        // No scenario configures `proxy_protocol_from`; admit like an uncapped driver.
        Question::Admit(_) => ServiceAnswer::Admission(true),
        // No PASS is cached; a tarpit place is always free.
        Question::CheckPass(_) => ServiceAnswer::Pass(false),
        Question::EnterTarpit => ServiceAnswer::TarpitSlot(true),
        // No history is kept: every client is new to its reputation.
        Question::CheckReputation(..) => ServiceAnswer::Reputation(None),
        Question::RecordPass(_) | Question::RecordReputation(..) => return None,
        // Greylisting is off in every scenario (its model is the unit tests').
        Question::CheckGreylist { .. } => ServiceAnswer::Greylist(GreylistOutcome::Pass),
        // Only the tarpit scenario has a zone, and it lists the client; the rDNS lookup finds
        // no name. Both answer at once, as from the cache.
        Question::Lookup(query) => {
            let answer = match query {
                Query::Rdns(_) => LookupAnswer::Rdns(RdnsAnswer::NoName),
                Query::Dnsbl { .. } => {
                    LookupAnswer::Dnsbl(DnsblAnswer::Listed(vec![std::net::Ipv4Addr::new(
                        127, 0, 0, 2,
                    )]))
                }
            };
            ServiceAnswer::Lookup(query, answer)
        }
    })
}
