//! tarmac's own downstream MTA: a small, real SMTP server over TCP.
//!
//! Integration tests and benchmarks need something on the other side of the relay that speaks
//! SMTP the way Postfix does (DESIGN.md §1.5, §1.6): a banner, EHLO, optionally an
//! XCLIENT command or a PROXY v1/v2 header announcing the real client, then MAIL, RCPT, DATA and
//! QUIT or RSET, and STARTTLS when given a certificate ([`SinkConfig::tls`]). The sink records
//! what every client did ([`SinkSession`]) and every message it accepted ([`SinkMessage`],
//! optionally also written to a directory as `.eml` files), and can be told to misbehave
//! ([`Behaviour`]) so tests can check how tarmac handles a failing downstream.
//!
//! It is deliberately plain: std sockets, one accept thread and one thread per connection, every
//! read and write bounded by a 30 s timeout so connection threads end on their own. It is strict
//! where tarmac could get things wrong: commands and data must use CRLF (a bare LF in a command
//! line gets `521` and a close, like Postfix with `smtpd_forbid_bare_newline = yes`; a bare CR or
//! LF in the data is recorded in [`SinkMessage::bare_newline_seen`]), only `CRLF . CRLF` ends the
//! data, XCLIENT values must be valid xtext, and MAIL needs a HELO/EHLO first, also after XCLIENT
//! and after STARTTLS. Like a correct server (RFC 3207 §4.2, CVE-2011-0411), it throws away
//! whatever the client pipelined after STARTTLS and forgets the EHLO it had, so a client that
//! does not start over after the TLS handshake is caught; how many bytes it threw away is in
//! [`SinkSession::starttls_discarded`].
//! Everything it accepted is kept in memory for the life of the [`Sink`]: it is a peer for tests
//! and bounded benchmark runs, not a mail store.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ProtocolVersion, ServerConfig, ServerConnection, StreamOwned};

/// Where and how the sink listens, and how it behaves.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Address to bind; `127.0.0.1:0` in tests picks a free port (see [`Sink::local_addr`]).
    pub listen: SocketAddr,
    /// Name in the banner (`220 <hostname> ESMTP tarmac-sink`) and the first EHLO line.
    pub hostname: String,
    /// When set, every accepted message is also written as `<dir>/<unix-nanos>-<n>.eml`
    /// containing exactly [`SinkMessage::content`]; the directory is created by [`Sink::start`].
    pub maildir: Option<PathBuf>,
    /// Advertise `XCLIENT ADDR NAME PORT HELO PROTO` in the EHLO reply and accept the command;
    /// without it XCLIENT is an unknown command (`502`). As Postfix out of the box, once
    /// per connection: the EHLO after an XCLIENT no longer lists it and a second XCLIENT gets
    /// `550 5.7.0 Error: insufficient authorization` (Postfix re-checks
    /// `smtpd_authorized_xclient_hosts` against the address it was just given), unless
    /// [`SinkConfig::xclient_again`].
    pub offer_xclient: bool,
    /// Offer and accept XCLIENT again after an XCLIENT, as Postfix does with
    /// `smtpd_authorized_xclient_hosts = static:all`.
    pub xclient_again: bool,
    /// Read a PROXY header of this version before sending the banner; a missing or malformed
    /// header closes the connection without a banner, as Postfix's postscreen does.
    pub expect_proxy: Option<ProxyVersion>,
    /// Offer STARTTLS in the EHLO reply and answer it with a TLS handshake using this
    /// configuration (see [`tls_server_config`]); `None` (the default): STARTTLS is an unknown
    /// command (`502`), unless a STARTTLS [`Behaviour`] makes the sink offer it anyway.
    pub tls: Option<Arc<ServerConfig>>,
    /// How the sink misbehaves; [`Behaviour::Normal`] by default.
    pub behaviour: Behaviour,
    /// Advertised as `SIZE` and enforced: a bigger `SIZE=` on MAIL or a bigger message gets
    /// `552 5.3.4`; a message over twice this size drops the connection. Default 50 MB.
    pub max_message_size: u64,
}

impl Default for SinkConfig {
    /// Loopback on a free port, no maildir, no XCLIENT, no PROXY header, normal behaviour.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            hostname: "tarmac-sink.localhost".to_owned(),
            maildir: None,
            offer_xclient: false,
            xclient_again: false,
            expect_proxy: None,
            tls: None,
            behaviour: Behaviour::Normal,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

/// Which PROXY protocol header the sink expects before its banner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyVersion {
    /// The text form: one line `PROXY ...\r\n` of at most 107 bytes.
    V1,
    /// The binary form: 12-byte signature, version/command, family, 2-byte length, payload.
    V2,
}

/// Ways the sink misbehaves, so tests can check tarmac's handling of a failing downstream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Behaviour {
    /// A well-behaved MTA.
    #[default]
    Normal,
    /// Accept the connection and never send anything (a downstream that stalls at connect).
    NoBanner,
    /// Send the banner, then close on the first command without answering it.
    CloseAfterBanner,
    /// A RCPT whose address contains this substring gets
    /// `550 5.1.1 <addr>: Recipient address rejected: User unknown`.
    RejectRcpt(String),
    /// Every valid MAIL gets `451 4.3.0 Try again later`.
    TempFailMail,
    /// After the final dot: `554 5.7.1 Message rejected` (the message is not kept).
    RejectData,
    /// Read the whole message including the final dot, then never answer anything again.
    StallAfterData,
    /// Read the whole message including the final dot, then close without a reply.
    CloseAfterDataDot,
    /// Answer an accepted RCPT with three lines:
    /// `250-2.1.5 first`, `250-2.1.5 second`, `250 2.1.5 Ok`.
    MultilineRcpt,
    /// Offer STARTTLS (even without [`SinkConfig::tls`]) and answer it with
    /// `454 4.7.0 TLS not available due to local problem` (Postfix's text when its certificate
    /// cannot be loaded); the session goes on in plain text.
    RefuseStartTls,
    /// Offer STARTTLS (even without [`SinkConfig::tls`]), answer it `220`, then close instead of
    /// handshaking: the client's TLS handshake fails.
    CloseAfterStartTls,
    /// Answer STARTTLS with `220` followed, in the same write and before the handshake, by
    /// [`INJECTED_AFTER_STARTTLS`], as a man in the middle would (CVE-2011-0411's mirror image):
    /// a client that reads that line as the reply to its next command trusted plain text after
    /// STARTTLS. Then the handshake goes on as usual; needs [`SinkConfig::tls`].
    InjectAfterStartTls,
}

/// The plain-text reply [`Behaviour::InjectAfterStartTls`] sends right after its `220`: a
/// rejection, so a client fooled into taking it as the reply to its EHLO inside TLS fails
/// visibly instead of going on by luck.
pub const INJECTED_AFTER_STARTTLS: &str = "554 5.7.0 injected before the TLS handshake\r\n";

/// Builds a TLS server configuration for [`SinkConfig::tls`] from PEM files: `chain` holds the
/// leaf certificate first, then any intermediates; `key` its private key. Any TLS version rustls
/// supports by default (1.2 and 1.3), no client certificates. Errors name the file.
pub fn tls_server_config(chain: &Path, key: &Path) -> io::Result<Arc<ServerConfig>> {
    let named = |path: &Path, e: rustls::pki_types::pem::Error| {
        io::Error::other(format!("{}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(chain)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| named(chain, e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| named(key, e))?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(certs, key))
            .map_err(io::Error::other)?;
    Ok(Arc::new(config))
}

/// A running sink. Dropping it (or [`Sink::stop`]) stops accepting new connections.
#[derive(Debug)]
pub struct Sink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Sink {
    /// Binds `config.listen`, creates the maildir if one is configured, spawns the accept thread
    /// and returns at once. Fails if the address cannot be bound or the directory created.
    pub fn start(config: SinkConfig) -> io::Result<Sink> {
        if let Some(dir) = &config.maildir {
            fs::create_dir_all(dir)?;
        }
        let listener = TcpListener::bind(config.listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("sink-accept".to_owned())
            .spawn(move || accept_loop(&listener, &accept_shared))?;
        Ok(Sink {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The address actually bound (the port is real even when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The messages accepted so far (answered `250` after the final dot), in order.
    pub fn messages(&self) -> Vec<SinkMessage> {
        self.shared.lock().messages.clone()
    }

    /// Waits until at least `n` messages were accepted or `timeout` passed, whichever comes
    /// first, and returns all messages accepted by then (possibly fewer than `n`).
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<SinkMessage> {
        self.shared
            .wait_until(timeout, |state| state.messages.len() >= n)
            .messages
            .clone()
    }

    /// The number of connections accepted so far, including closed ones.
    pub fn connections(&self) -> usize {
        self.shared.lock().sessions.len()
    }

    /// One record per accepted connection, in accept order, including those still open.
    pub fn sessions(&self) -> Vec<SinkSession> {
        self.shared.lock().sessions.clone()
    }

    /// Stops accepting and joins the accept thread (the same as dropping the sink). Connections
    /// already open are left to finish on their own: their threads end when the client closes
    /// or after 30 s without input.
    pub fn stop(self) {
        drop(self);
    }

    /// Sets the stop flag and unblocks the accept thread by connecting to it. If that connect
    /// fails, the thread is left detached rather than joined: stopping must never hang.
    fn shutdown(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        match TcpStream::connect_timeout(&wake_addr(self.addr), WAKE_TIMEOUT) {
            Ok(_wake) => {
                if accept.join().is_err() {
                    log::warn!("sink: accept thread panicked");
                }
            }
            Err(err) => log::warn!("sink: cannot wake the accept thread, leaving it: {err}"),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One message the sink accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkMessage {
    /// Queue id given in `250 2.0.0 Ok: queued as <id>` (an uppercase hex counter from 1).
    pub queue_id: String,
    /// The argument of the last EHLO or HELO before this message.
    pub helo: String,
    /// The raw arguments of the last XCLIENT command of the session (after `XCLIENT `), if any.
    pub xclient: Option<String>,
    /// The raw PROXY header bytes read before the banner, if one was expected.
    pub proxy_header: Option<Vec<u8>>,
    /// The MAIL argument as sent after `FROM:`, e.g. `<a@example.com> SIZE=123`.
    pub mail_from: String,
    /// The addresses inside `<>` of the accepted RCPT commands, in order.
    pub rcpt_to: Vec<String>,
    /// The data bytes between the `354` and the terminating `.CRLF`, as on the wire: still
    /// dot-stuffed, and including the CRLF before the final dot.
    pub raw: Vec<u8>,
    /// `raw` with dot-unstuffing applied: the message as delivered.
    pub content: Vec<u8>,
    /// The data contained a bare LF (not after CR) or a bare CR (not before LF). tarmac must
    /// never pass one on (SMTP smuggling), so tests assert this is false.
    pub bare_newline_seen: bool,
    /// The TLS version the message came over, `None` for plain text: tests of downstream
    /// STARTTLS assert that the message itself, not only the session, was encrypted.
    pub tls: Option<ProtocolVersion>,
}

/// What one client connection did, recorded as it happens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkSession {
    /// The raw PROXY header bytes, once a valid one was read.
    pub proxy_header: Option<Vec<u8>>,
    /// The raw arguments of the last accepted XCLIENT command.
    pub xclient: Option<String>,
    /// Every command line received, without its line end, in order (data lines excluded),
    /// before and after STARTTLS alike.
    pub commands: Vec<String>,
    /// The TLS version negotiated after STARTTLS, once the handshake completed; `None` while
    /// the session is plain text.
    pub tls: Option<ProtocolVersion>,
    /// Bytes that had arrived after the client's STARTTLS line by the time the sink answered
    /// it, thrown away unread (RFC 3207 §4.2); a correct client sends nothing before the `220`,
    /// so tests expect 0.
    pub starttls_discarded: usize,
    /// The connection has ended and its thread is done.
    pub closed: bool,
}

/// Default [`SinkConfig::max_message_size`]: 50 MB, above any usual MTA limit so only tests
/// that lower it see `552`.
const DEFAULT_MAX_MESSAGE_SIZE: u64 = 50_000_000;

/// Per-read and per-write timeout on a connection, so a silent peer cannot keep a thread forever.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest command line accepted, CRLF included; tarmac's own `max_line_length` default. Longer
/// gets `500` and a close.
const MAX_COMMAND_LINE: u64 = 4096;

/// Longest PROXY v1 header, CRLF included (the limit in the PROXY protocol specification).
const MAX_PROXY_V1: u64 = 107;

/// Recipients per transaction, Postfix's `smtpd_recipient_limit` default; bounds memory.
const MAX_RECIPIENTS: usize = 1000;

/// How long `stop` tries to connect to its own listener to wake the accept thread.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause after a failed accept (e.g. out of file descriptors) so the thread does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(20);

/// The first 12 bytes of every PROXY v2 header.
const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The XCLIENT attributes the sink advertises and accepts.
const XCLIENT_ATTRIBUTES: [&str; 5] = ["ADDR", "NAME", "PORT", "HELO", "PROTO"];

/// State shared by the accept thread, the connection threads and the [`Sink`] handle.
#[derive(Debug)]
struct Shared {
    config: SinkConfig,
    stopping: AtomicBool,
    /// Next queue id, also the `<n>` in maildir file names.
    next_id: AtomicU64,
    state: Mutex<State>,
    /// Notified on every change to `state`.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    messages: Vec<SinkMessage>,
    sessions: Vec<SinkSession>,
}

impl Shared {
    /// A poisoned lock only means a connection thread panicked mid-update; the records are
    /// still worth reading, so the poison is ignored.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }

    fn update_session(&self, index: usize, change: impl FnOnce(&mut SinkSession)) {
        self.update(|state| {
            if let Some(session) = state.sessions.get_mut(index) {
                change(session);
            }
        });
    }

    /// Waits until `done` holds or `timeout` passed and returns the lock either way.
    fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&State) -> bool,
    ) -> MutexGuard<'_, State> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.lock();
        while !done(&state) {
            state = match deadline {
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    self.changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        state
    }
}

/// The address `stop` connects to: the bound one, or loopback when bound to a wildcard.
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                log::warn!("sink: accept failed: {err}");
                thread::sleep(ACCEPT_ERROR_PAUSE);
                continue;
            }
        };
        let mut index = 0;
        shared.update(|state| {
            index = state.sessions.len();
            state.sessions.push(SinkSession::default());
        });
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("sink-conn-{index}"))
            .spawn(move || serve(stream, &conn_shared, index));
        if let Err(err) = spawned {
            log::warn!("sink: cannot spawn a connection thread: {err}");
            shared.update_session(index, |session| session.closed = true);
        }
    }
}

/// Runs one connection to its end and marks its session closed, whatever happened.
fn serve(stream: TcpStream, shared: &Shared, index: usize) {
    let result = Connection::new(stream, shared, index).and_then(|mut conn| conn.run());
    if let Err(err) = result {
        log::debug!("sink: connection {index}: {err}");
    }
    shared.update_session(index, |session| session.closed = true);
}

/// A connection's byte stream: plain TCP until STARTTLS, then TLS over the same socket.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Stream {
    fn tls_version(&self) -> Option<ProtocolVersion> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(tls) => tls.conn.protocol_version(),
        }
    }

    /// Ends TLS politely (close_notify) before the socket closes; nothing to do in plain text.
    fn finish(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(tls) => {
                tls.conn.send_close_notify();
                tls.flush()
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

/// One client connection, driven by its own thread.
struct Connection<'a> {
    shared: &'a Shared,
    index: usize,
    /// Commands are read through this buffer, so pipelined commands are answered in order;
    /// replies are written to the stream inside it.
    reader: BufReader<Stream>,
    helo: Option<String>,
    xclient: Option<String>,
    proxy_header: Option<Vec<u8>>,
    transaction: Option<Transaction>,
}

/// An open mail transaction: between an accepted MAIL and the end of DATA or RSET.
struct Transaction {
    mail_from: String,
    rcpt_to: Vec<String>,
}

/// One command line read from the client.
enum Input {
    /// A line ended by CRLF, without it.
    Line(String),
    /// A line ended by a bare LF, without it.
    BareLf(String),
    /// No line end within [`MAX_COMMAND_LINE`] bytes.
    TooLong,
    /// The client closed (a partial last line is dropped).
    Eof,
}

/// How the data phase ended.
enum DataEnd {
    /// `CRLF . CRLF` seen; `raw` holds everything before the final `.CRLF`.
    Complete { raw: Vec<u8>, bare_newline: bool },
    /// `CRLF . CRLF` seen, but the message was bigger than `max_message_size`.
    TooBig,
    /// The client closed mid-data, or sent more than twice `max_message_size`.
    Abandoned,
}

/// Whether the connection goes on after a command.
enum Next {
    Continue,
    Close,
}

impl<'a> Connection<'a> {
    fn new(stream: TcpStream, shared: &'a Shared, index: usize) -> io::Result<Self> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        // Replies are small writes answered by the next command; Nagle would add a delayed-ACK
        // round trip to each of them.
        stream.set_nodelay(true)?;
        Ok(Self {
            shared,
            index,
            reader: BufReader::new(Stream::Plain(stream)),
            helo: None,
            xclient: None,
            proxy_header: None,
            transaction: None,
        })
    }

    fn run(&mut self) -> io::Result<()> {
        if let Some(version) = self.shared.config.expect_proxy {
            let Some(header) = self.read_proxy_header(version)? else {
                return Ok(());
            };
            self.proxy_header = Some(header.clone());
            self.shared
                .update_session(self.index, |session| session.proxy_header = Some(header));
        }
        if self.shared.config.behaviour == Behaviour::NoBanner {
            return self.drain_silently();
        }
        self.send(&self.banner())?;
        loop {
            let line = match self.read_command()? {
                Input::Line(line) => line,
                Input::BareLf(line) => {
                    self.record(&line);
                    return self.send("521 5.5.2 Error: bare <LF> received\r\n");
                }
                Input::TooLong => return self.send("500 5.5.2 Error: line too long\r\n"),
                Input::Eof => return Ok(()),
            };
            self.record(&line);
            if self.shared.config.behaviour == Behaviour::CloseAfterBanner {
                return Ok(());
            }
            let (verb, arg) = line.split_once(' ').unwrap_or((&line, ""));
            let reply = match verb.to_ascii_uppercase().as_str() {
                "EHLO" => self.handle_helo(arg, true),
                "HELO" => self.handle_helo(arg, false),
                "XCLIENT" if self.shared.config.offer_xclient => self.handle_xclient(arg),
                "STARTTLS" if self.offers_starttls() || self.is_tls() => {
                    match self.handle_starttls(arg)? {
                        Next::Continue => continue,
                        Next::Close => return Ok(()),
                    }
                }
                "MAIL" => self.handle_mail(arg),
                "RCPT" => self.handle_rcpt(arg),
                "DATA" => match self.handle_data(arg)? {
                    Next::Continue => continue,
                    Next::Close => return Ok(()),
                },
                "RSET" => {
                    self.transaction = None;
                    "250 2.0.0 Ok\r\n".to_owned()
                }
                "NOOP" => "250 2.0.0 Ok\r\n".to_owned(),
                "QUIT" => {
                    self.send("221 2.0.0 Bye\r\n")?;
                    return self.reader.get_mut().finish();
                }
                _ => "502 5.5.2 Error: command not recognized\r\n".to_owned(),
            };
            self.send(&reply)?;
        }
    }

    fn handle_helo(&mut self, arg: &str, extended: bool) -> String {
        if arg.is_empty() {
            let verb = if extended { "EHLO" } else { "HELO" };
            return format!("501 5.5.4 Syntax: {verb} hostname\r\n");
        }
        // RFC 5321 §4.1.4: EHLO/HELO also resets any transaction in progress.
        self.helo = Some(arg.to_owned());
        self.transaction = None;
        let config = &self.shared.config;
        if !extended {
            return format!("250 {}\r\n", config.hostname);
        }
        let mut reply = format!(
            "250-{}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n",
            config.hostname, config.max_message_size
        );
        if self.may_xclient() {
            reply.push_str("250-XCLIENT ADDR NAME PORT HELO PROTO\r\n");
        }
        if self.offers_starttls() {
            reply.push_str("250-STARTTLS\r\n");
        }
        reply.push_str("250 SMTPUTF8\r\n");
        reply
    }

    /// STARTTLS is offered in plain text when a certificate is configured, or when a behaviour
    /// fails it on purpose; never again inside TLS (RFC 3207 §4.2).
    fn offers_starttls(&self) -> bool {
        let config = &self.shared.config;
        !self.is_tls()
            && (config.tls.is_some()
                || matches!(
                    config.behaviour,
                    Behaviour::RefuseStartTls | Behaviour::CloseAfterStartTls
                ))
    }

    fn is_tls(&self) -> bool {
        matches!(self.reader.get_ref(), Stream::Tls(_))
    }

    /// STARTTLS (RFC 3207): `220`, then whatever the client pipelined after the command is
    /// thrown away unread (a client must wait for the `220`, and bytes sent in plain text must
    /// never count as sent inside TLS, CVE-2011-0411), the handshake runs within the socket's
    /// 30 s timeouts, and the session starts over without HELO/EHLO or transaction. A failed
    /// handshake ends the connection (an error for the thread's debug log).
    fn handle_starttls(&mut self, arg: &str) -> io::Result<Next> {
        if self.is_tls() {
            // Postfix's reply to a second STARTTLS.
            self.send("554 5.5.1 Error: TLS already active\r\n")?;
            return Ok(Next::Continue);
        }
        if !arg.is_empty() {
            self.send("501 5.5.4 Syntax: STARTTLS\r\n")?;
            return Ok(Next::Continue);
        }
        let tls = match (&self.shared.config.behaviour, &self.shared.config.tls) {
            (Behaviour::CloseAfterStartTls, _) => {
                self.send("220 2.0.0 Ready to start TLS\r\n")?;
                return Ok(Next::Close);
            }
            (Behaviour::RefuseStartTls, _) | (_, None) => {
                self.send("454 4.7.0 TLS not available due to local problem\r\n")?;
                return Ok(Next::Continue);
            }
            (Behaviour::InjectAfterStartTls, Some(tls)) => {
                let tls = Arc::clone(tls);
                self.send(&format!(
                    "220 2.0.0 Ready to start TLS\r\n{INJECTED_AFTER_STARTTLS}"
                ))?;
                tls
            }
            (_, Some(tls)) => {
                let tls = Arc::clone(tls);
                self.send("220 2.0.0 Ready to start TLS\r\n")?;
                tls
            }
        };
        let discarded = self.reader.buffer().len();
        let Stream::Plain(tcp) = self.reader.get_ref() else {
            return Ok(Next::Close);
        };
        // A second handle on the same socket (same timeouts); replacing the reader below drops
        // the buffered bytes and the first handle, not the socket.
        let mut stream = StreamOwned::new(
            ServerConnection::new(tls).map_err(io::Error::other)?,
            tcp.try_clone()?,
        );
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        let version = stream.conn.protocol_version();
        self.reader = BufReader::new(Stream::Tls(Box::new(stream)));
        self.helo = None;
        self.transaction = None;
        self.shared.update_session(self.index, |session| {
            session.tls = version;
            session.starttls_discarded = discarded;
        });
        Ok(Next::Continue)
    }

    /// Whether XCLIENT is offered and accepted now: configured, and not used yet on this
    /// connection (or [`SinkConfig::xclient_again`]).
    fn may_xclient(&self) -> bool {
        let config = &self.shared.config;
        config.offer_xclient && (self.xclient.is_none() || config.xclient_again)
    }

    /// Postfix's XCLIENT: attributes replace what the server knows about the client and the
    /// session starts over with a fresh banner, so the client has to send EHLO again.
    fn handle_xclient(&mut self, arg: &str) -> String {
        if self.transaction.is_some() {
            return "503 5.5.1 Error: MAIL transaction in progress\r\n".to_owned();
        }
        if !self.may_xclient() {
            return "550 5.7.0 Error: insufficient authorization\r\n".to_owned();
        }
        if arg.is_empty() {
            return "501 5.5.4 Syntax: XCLIENT attribute=value...\r\n".to_owned();
        }
        for attribute in arg.split(' ') {
            let Some((name, value)) = attribute.split_once('=') else {
                return "501 5.5.4 Error: bad XCLIENT attribute syntax\r\n".to_owned();
            };
            if !XCLIENT_ATTRIBUTES
                .iter()
                .any(|known| known.eq_ignore_ascii_case(name))
            {
                return "501 5.5.4 Error: bad XCLIENT attribute name\r\n".to_owned();
            }
            if !is_xtext(value.as_bytes()) {
                return "501 5.5.4 Error: bad XCLIENT attribute value\r\n".to_owned();
            }
        }
        let xclient = arg.to_owned();
        self.xclient = Some(xclient.clone());
        self.helo = None;
        self.shared
            .update_session(self.index, |session| session.xclient = Some(xclient));
        self.banner()
    }

    fn handle_mail(&mut self, arg: &str) -> String {
        if self.helo.is_none() {
            return "503 5.5.1 Error: send HELO/EHLO first\r\n".to_owned();
        }
        if self.transaction.is_some() {
            return "503 5.5.1 Error: nested MAIL command\r\n".to_owned();
        }
        let Some(from) = strip_prefix_ignore_case(arg, "FROM:") else {
            return "501 5.5.4 Syntax: MAIL FROM:<address>\r\n".to_owned();
        };
        let Some((_address, params)) = from.strip_prefix('<').and_then(|r| r.split_once('>'))
        else {
            return "501 5.1.7 Bad sender address syntax\r\n".to_owned();
        };
        for param in params.split_whitespace() {
            let Some(size) = strip_prefix_ignore_case(param, "SIZE=") else {
                continue;
            };
            match size.parse::<u64>() {
                Ok(size) if size > self.shared.config.max_message_size => {
                    return "552 5.3.4 Message size exceeds fixed limit\r\n".to_owned();
                }
                Ok(_) => {}
                Err(_) => return "501 5.5.4 Bad message size syntax\r\n".to_owned(),
            }
        }
        if self.shared.config.behaviour == Behaviour::TempFailMail {
            return "451 4.3.0 Try again later\r\n".to_owned();
        }
        self.transaction = Some(Transaction {
            mail_from: from.to_owned(),
            rcpt_to: Vec::new(),
        });
        "250 2.1.0 Ok\r\n".to_owned()
    }

    fn handle_rcpt(&mut self, arg: &str) -> String {
        let Some(transaction) = self.transaction.as_mut() else {
            return "503 5.5.1 Error: need MAIL command\r\n".to_owned();
        };
        let Some(to) = strip_prefix_ignore_case(arg, "TO:") else {
            return "501 5.5.4 Syntax: RCPT TO:<address>\r\n".to_owned();
        };
        let Some((address, _params)) = to.strip_prefix('<').and_then(|r| r.split_once('>')) else {
            return "501 5.1.3 Bad recipient address syntax\r\n".to_owned();
        };
        if address.is_empty() {
            return "501 5.1.3 Bad recipient address syntax\r\n".to_owned();
        }
        if transaction.rcpt_to.len() >= MAX_RECIPIENTS {
            return "452 4.5.3 Error: too many recipients\r\n".to_owned();
        }
        match &self.shared.config.behaviour {
            Behaviour::RejectRcpt(needle) if address.contains(needle.as_str()) => {
                format!("550 5.1.1 <{address}>: Recipient address rejected: User unknown\r\n")
            }
            Behaviour::MultilineRcpt => {
                transaction.rcpt_to.push(address.to_owned());
                "250-2.1.5 first\r\n250-2.1.5 second\r\n250 2.1.5 Ok\r\n".to_owned()
            }
            _ => {
                transaction.rcpt_to.push(address.to_owned());
                "250 2.1.5 Ok\r\n".to_owned()
            }
        }
    }

    /// DATA, the message, and the reply to the final dot. The transaction ends here whatever
    /// the outcome.
    fn handle_data(&mut self, arg: &str) -> io::Result<Next> {
        if !arg.is_empty() {
            self.send("501 5.5.4 Syntax: DATA\r\n")?;
            return Ok(Next::Continue);
        }
        let has_recipients = match &self.transaction {
            None => {
                self.send("503 5.5.1 Error: need RCPT command\r\n")?;
                return Ok(Next::Continue);
            }
            Some(transaction) => !transaction.rcpt_to.is_empty(),
        };
        if !has_recipients {
            self.send("554 5.5.1 Error: no valid recipients\r\n")?;
            return Ok(Next::Continue);
        }
        self.send("354 End data with <CR><LF>.<CR><LF>\r\n")?;
        let end = read_data(&mut self.reader, self.shared.config.max_message_size)?;
        let Some(transaction) = self.transaction.take() else {
            // Checked above; nothing between there and here clears it.
            return Ok(Next::Close);
        };
        let (raw, bare_newline) = match end {
            DataEnd::Abandoned => return Ok(Next::Close),
            _ if self.shared.config.behaviour == Behaviour::CloseAfterDataDot => {
                return Ok(Next::Close);
            }
            _ if self.shared.config.behaviour == Behaviour::StallAfterData => {
                self.drain_silently()?;
                return Ok(Next::Close);
            }
            DataEnd::TooBig => {
                self.send("552 5.3.4 Message size exceeds fixed limit\r\n")?;
                return Ok(Next::Continue);
            }
            DataEnd::Complete { .. } if self.shared.config.behaviour == Behaviour::RejectData => {
                self.send("554 5.7.1 Message rejected\r\n")?;
                return Ok(Next::Continue);
            }
            DataEnd::Complete { raw, bare_newline } => (raw, bare_newline),
        };
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let content = unstuff(&raw);
        if let Some(dir) = &self.shared.config.maildir {
            if let Err(err) = write_eml(dir, id, &content) {
                log::warn!("sink: cannot write to {}: {err}", dir.display());
                self.send("451 4.3.0 Error: queue file write error\r\n")?;
                return Ok(Next::Continue);
            }
        }
        let queue_id = format!("{id:X}");
        let message = SinkMessage {
            queue_id: queue_id.clone(),
            helo: self.helo.clone().unwrap_or_default(),
            xclient: self.xclient.clone(),
            proxy_header: self.proxy_header.clone(),
            mail_from: transaction.mail_from,
            rcpt_to: transaction.rcpt_to,
            raw,
            content,
            bare_newline_seen: bare_newline,
            tls: self.reader.get_ref().tls_version(),
        };
        self.shared.update(|state| state.messages.push(message));
        self.send(&format!("250 2.0.0 Ok: queued as {queue_id}\r\n"))?;
        Ok(Next::Continue)
    }

    /// Reads and records whatever the client sends, answering nothing, until it closes or the
    /// read times out.
    fn drain_silently(&mut self) -> io::Result<()> {
        loop {
            match self.read_command()? {
                Input::Line(line) | Input::BareLf(line) => self.record(&line),
                Input::TooLong => {}
                Input::Eof => return Ok(()),
            }
        }
    }

    /// Reads a PROXY header; `None` when it is malformed or the client closed first.
    fn read_proxy_header(&mut self, version: ProxyVersion) -> io::Result<Option<Vec<u8>>> {
        match version {
            ProxyVersion::V1 => {
                let mut line = Vec::new();
                (&mut self.reader)
                    .take(MAX_PROXY_V1)
                    .read_until(b'\n', &mut line)?;
                let valid = line.starts_with(b"PROXY ") && line.ends_with(b"\r\n");
                Ok(valid.then_some(line))
            }
            ProxyVersion::V2 => {
                let mut head = [0; 16];
                self.reader.read_exact(&mut head)?;
                let [signature @ .., version_command, _family, len_high, len_low] = head;
                if signature != PROXY_V2_SIGNATURE || version_command >> 4 != 2 {
                    return Ok(None);
                }
                let mut payload = vec![0; usize::from(u16::from_be_bytes([len_high, len_low]))];
                self.reader.read_exact(&mut payload)?;
                let mut header = head.to_vec();
                header.extend_from_slice(&payload);
                Ok(Some(header))
            }
        }
    }

    fn read_command(&mut self) -> io::Result<Input> {
        let mut line = Vec::new();
        (&mut self.reader)
            .take(MAX_COMMAND_LINE)
            .read_until(b'\n', &mut line)?;
        if let Some(text) = line.strip_suffix(b"\r\n") {
            return Ok(Input::Line(String::from_utf8_lossy(text).into_owned()));
        }
        if let Some(text) = line.strip_suffix(b"\n") {
            return Ok(Input::BareLf(String::from_utf8_lossy(text).into_owned()));
        }
        Ok(if line.len() as u64 >= MAX_COMMAND_LINE {
            Input::TooLong
        } else {
            Input::Eof
        })
    }

    fn record(&self, line: &str) {
        self.shared
            .update_session(self.index, |session| session.commands.push(line.to_owned()));
    }

    fn banner(&self) -> String {
        format!("220 {} ESMTP tarmac-sink\r\n", self.shared.config.hostname)
    }

    fn send(&mut self, reply: &str) -> io::Result<()> {
        let stream = self.reader.get_mut();
        stream.write_all(reply.as_bytes())?;
        stream.flush()
    }
}

/// Where the scan for the end of data stands. Only CRLF makes a line start, so a bare LF or CR
/// before a dot never ends the message (the SMTP smuggling vectors stay inside it).
#[derive(Clone, Copy, PartialEq, Eq)]
enum DataState {
    /// Right after CRLF, or at the very start (the DATA command's CRLF came just before).
    LineStart,
    /// CRLF then `.`.
    Dot,
    /// CRLF `.` CR.
    DotCr,
    /// A CR anywhere else.
    Cr,
    /// Any other byte.
    Other,
}

/// Reads the data up to and including `CRLF . CRLF`. Bytes are kept only while the message is
/// within `max_size`; past twice that the client is abandoned.
fn read_data(reader: &mut impl BufRead, max_size: u64) -> io::Result<DataEnd> {
    // The terminator's `.CRLF` is counted in `total` but is not part of the message.
    let keep_limit = max_size.saturating_add(3);
    let abandon_limit = max_size.saturating_mul(2).saturating_add(3);
    let mut raw = Vec::new();
    let mut total: u64 = 0;
    let mut state = DataState::LineStart;
    let mut bare_newline = false;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(DataEnd::Abandoned);
        }
        let mut done = false;
        let mut used = 0;
        for &byte in buf {
            used += 1;
            if matches!(state, DataState::Cr | DataState::DotCr) && byte != b'\n' {
                bare_newline = true;
            }
            state = match (state, byte) {
                (DataState::DotCr, b'\n') => {
                    done = true;
                    break;
                }
                (DataState::Cr, b'\n') => DataState::LineStart,
                (_, b'\n') => {
                    bare_newline = true;
                    DataState::Other
                }
                (DataState::Dot, b'\r') => DataState::DotCr,
                (_, b'\r') => DataState::Cr,
                (DataState::LineStart, b'.') => DataState::Dot,
                _ => DataState::Other,
            };
        }
        total = total.saturating_add(used as u64);
        if total <= keep_limit {
            raw.extend_from_slice(buf.get(..used).unwrap_or(buf));
        } else if !raw.is_empty() {
            raw = Vec::new();
        }
        reader.consume(used);
        if done {
            if total > keep_limit {
                return Ok(DataEnd::TooBig);
            }
            raw.truncate(raw.len().saturating_sub(3));
            return Ok(DataEnd::Complete { raw, bare_newline });
        }
        if total > abandon_limit {
            return Ok(DataEnd::Abandoned);
        }
    }
}

/// Removes the leading dot of every line that starts with one (RFC 5321 §4.5.2), where, as for
/// the end of data, only CRLF starts a line.
fn unstuff(raw: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(raw.len());
    let mut line_start = true;
    let mut previous_cr = false;
    for &byte in raw {
        if line_start && byte == b'.' {
            line_start = false;
            previous_cr = false;
            continue;
        }
        content.push(byte);
        line_start = previous_cr && byte == b'\n';
        previous_cr = byte == b'\r';
    }
    content
}

/// xtext (RFC 3461 §4): printable ASCII except `+` and `=`, which appear as `+XX` (uppercase
/// hex), like every other byte outside that range.
fn is_xtext(value: &[u8]) -> bool {
    let mut bytes = value.iter();
    while let Some(&byte) = bytes.next() {
        let valid = match byte {
            b'+' => {
                let is_hex =
                    |b: Option<&u8>| b.is_some_and(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F'));
                is_hex(bytes.next()) && is_hex(bytes.next())
            }
            b'=' => false,
            33..=126 => true,
            _ => false,
        };
        if !valid {
            return false;
        }
    }
    true
}

fn strip_prefix_ignore_case<'s>(text: &'s str, prefix: &str) -> Option<&'s str> {
    let head = text.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        text.get(prefix.len()..)
    } else {
        None
    }
}

/// Writes under a hidden temporary name first, so a reader of `*.eml` never sees half a file.
fn write_eml(dir: &Path, id: u64, content: &[u8]) -> io::Result<()> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let name = format!("{nanos}-{id}.eml");
    let temporary = dir.join(format!(".{name}.tmp"));
    fs::write(&temporary, content)?;
    fs::rename(&temporary, dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bound on every read, connect and wait in these tests.
    const TIMEOUT: Duration = Duration::from_secs(5);

    /// How long "nothing arrives" is watched for in the silence tests.
    const SILENCE: Duration = Duration::from_millis(300);

    const BANNER: &str = "220 sink.test ESMTP tarmac-sink\r\n";

    const EHLO_REPLY: &str = "250-sink.test\r\n250-PIPELINING\r\n250-SIZE 50000000\r\n\
        250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n";

    fn start(change: impl FnOnce(&mut SinkConfig)) -> Sink {
        let mut config = SinkConfig {
            hostname: "sink.test".to_owned(),
            ..SinkConfig::default()
        };
        change(&mut config);
        Sink::start(config).unwrap()
    }

    /// A plain blocking SMTP client with bounded reads.
    struct Client {
        reader: BufReader<TcpStream>,
    }

    impl Client {
        #[track_caller]
        fn connect(addr: SocketAddr) -> Client {
            let stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            stream.set_write_timeout(Some(TIMEOUT)).unwrap();
            Client {
                reader: BufReader::new(stream),
            }
        }

        /// Connects, checks the banner and says EHLO.
        #[track_caller]
        fn greeted(addr: SocketAddr) -> Client {
            let mut client = Client::connect(addr);
            assert_eq!(client.reply(), BANNER);
            assert_eq!(client.command("EHLO client.test"), EHLO_REPLY);
            client
        }

        /// Connects, checks the banner and says EHLO to a sink that offers XCLIENT.
        #[track_caller]
        fn greeted_xclient(addr: SocketAddr) -> Client {
            let mut client = Client::connect(addr);
            assert_eq!(client.reply(), BANNER);
            assert!(
                client
                    .command("EHLO c")
                    .contains("250-XCLIENT ADDR NAME PORT HELO PROTO\r\n")
            );
            client
        }

        #[track_caller]
        fn send(&mut self, bytes: &[u8]) {
            self.reader.get_mut().write_all(bytes).unwrap();
        }

        /// Reads one whole (possibly multi-line) reply.
        #[track_caller]
        fn reply(&mut self) -> String {
            let mut reply = String::new();
            loop {
                let mut line = String::new();
                let n = self.reader.read_line(&mut line).unwrap();
                assert!(n > 0, "connection closed; reply so far: {reply:?}");
                assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
                reply.push_str(&line);
                if line.as_bytes().get(3) == Some(&b' ') {
                    return reply;
                }
            }
        }

        #[track_caller]
        fn command(&mut self, command: &str) -> String {
            self.send(format!("{command}\r\n").as_bytes());
            self.reply()
        }

        /// Sends a transaction to one recipient and returns the reply to the final dot.
        #[track_caller]
        fn transaction(&mut self, from: &str, to: &str, data: &[u8]) -> String {
            assert_eq!(
                self.command(&format!("MAIL FROM:<{from}>")),
                "250 2.1.0 Ok\r\n"
            );
            assert_eq!(self.command(&format!("RCPT TO:<{to}>")), "250 2.1.5 Ok\r\n");
            assert_eq!(
                self.command("DATA"),
                "354 End data with <CR><LF>.<CR><LF>\r\n"
            );
            self.send(data);
            self.reply()
        }

        /// The server closed the connection: EOF or a reset, without any further bytes.
        #[track_caller]
        fn assert_closed(&mut self) {
            let mut buf = [0; 64];
            match self.reader.read(&mut buf) {
                Ok(0) => {}
                Ok(n) => panic!(
                    "expected a close, got {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ),
                Err(err) if err.kind() == io::ErrorKind::ConnectionReset => {}
                Err(err) => panic!("expected a close, got {err}"),
            }
        }

        /// Nothing arrives for [`SILENCE`] and the connection stays open.
        #[track_caller]
        fn assert_silent(&mut self) {
            self.reader
                .get_ref()
                .set_read_timeout(Some(SILENCE))
                .unwrap();
            let mut buf = [0; 64];
            match self.reader.read(&mut buf) {
                Ok(0) => panic!("expected silence, got a close"),
                Ok(n) => panic!(
                    "expected silence, got {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ),
                Err(err) => assert!(
                    matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ),
                    "expected silence, got {err}"
                ),
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(TIMEOUT))
                .unwrap();
        }
    }

    /// Waits (bounded) until every session the sink has seen is closed, then returns them.
    #[track_caller]
    fn closed_sessions(sink: &Sink, count: usize) -> Vec<SinkSession> {
        let state = sink.shared.wait_until(TIMEOUT, |state| {
            state.sessions.len() >= count && state.sessions.iter().all(|s| s.closed)
        });
        assert!(
            state.sessions.len() == count && state.sessions.iter().all(|s| s.closed),
            "sessions not closed in time: {:?}",
            state.sessions
        );
        state.sessions.clone()
    }

    fn commands(list: &[&str]) -> Vec<String> {
        list.iter().map(|c| (*c).to_owned()).collect()
    }

    #[test]
    fn full_transaction_keeps_raw_and_unstuffed_content() {
        let sink = start(|_| {});
        let mut client = Client::greeted(sink.local_addr());
        let data = b"Subject: dots\r\n\r\n..leading dot\r\n..\r\n...\r\nend.\r\n.\r\n";
        assert_eq!(
            client.command("MAIL FROM:<a@example.com> SIZE=123 BODY=8BITMIME"),
            "250 2.1.0 Ok\r\n"
        );
        assert_eq!(
            client.command("RCPT TO:<b@example.org>"),
            "250 2.1.5 Ok\r\n"
        );
        assert_eq!(
            client.command("RCPT TO:<c@example.org> NOTIFY=NEVER"),
            "250 2.1.5 Ok\r\n"
        );
        assert_eq!(
            client.command("DATA"),
            "354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        client.send(data);
        assert_eq!(client.reply(), "250 2.0.0 Ok: queued as 1\r\n");
        assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
        client.assert_closed();

        let messages = sink.wait_for_messages(1, TIMEOUT);
        assert_eq!(
            messages,
            vec![SinkMessage {
                queue_id: "1".to_owned(),
                helo: "client.test".to_owned(),
                xclient: None,
                proxy_header: None,
                mail_from: "<a@example.com> SIZE=123 BODY=8BITMIME".to_owned(),
                rcpt_to: vec!["b@example.org".to_owned(), "c@example.org".to_owned()],
                raw: b"Subject: dots\r\n\r\n..leading dot\r\n..\r\n...\r\nend.\r\n".to_vec(),
                content: b"Subject: dots\r\n\r\n.leading dot\r\n.\r\n..\r\nend.\r\n".to_vec(),
                bare_newline_seen: false,
                tls: None,
            }]
        );
        assert_eq!(sink.connections(), 1);
        assert_eq!(
            closed_sessions(&sink, 1),
            vec![SinkSession {
                proxy_header: None,
                xclient: None,
                commands: commands(&[
                    "EHLO client.test",
                    "MAIL FROM:<a@example.com> SIZE=123 BODY=8BITMIME",
                    "RCPT TO:<b@example.org>",
                    "RCPT TO:<c@example.org> NOTIFY=NEVER",
                    "DATA",
                    "QUIT",
                ]),
                tls: None,
                starttls_discarded: 0,
                closed: true,
            }]
        );
    }

    #[test]
    fn empty_message_and_second_transaction_get_new_queue_ids() {
        let sink = start(|_| {});
        let mut client = Client::greeted(sink.local_addr());
        assert_eq!(
            client.transaction("a@x", "b@y", b".\r\n"),
            "250 2.0.0 Ok: queued as 1\r\n"
        );
        assert_eq!(
            client.transaction("c@x", "d@y", b"hi\r\n.\r\n"),
            "250 2.0.0 Ok: queued as 2\r\n"
        );
        let messages = sink.wait_for_messages(2, TIMEOUT);
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].raw, b"");
        assert_eq!(messages[0].content, b"");
        assert_eq!(messages[1].queue_id, "2");
        assert_eq!(messages[1].mail_from, "<c@x>");
        assert_eq!(messages[1].content, b"hi\r\n");
    }

    #[test]
    fn pipelined_commands_are_answered_in_order() {
        let sink = start(|config| config.behaviour = Behaviour::RejectRcpt("nobody".to_owned()));
        let mut client = Client::connect(sink.local_addr());
        assert_eq!(client.reply(), BANNER);
        client.send(
            b"EHLO client.test\r\nMAIL FROM:<a@x>\r\nRCPT TO:<nobody@y>\r\nRCPT TO:<b@y>\r\n\
              DATA\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nBOGUS\r\nQUIT\r\n",
        );
        let mut replies = String::new();
        for _ in 0..10 {
            replies.push_str(&client.reply());
        }
        assert_eq!(
            replies,
            format!(
                "{EHLO_REPLY}250 2.1.0 Ok\r\n\
                 550 5.1.1 <nobody@y>: Recipient address rejected: User unknown\r\n\
                 250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n\
                 250 2.0.0 Ok: queued as 1\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n\
                 502 5.5.2 Error: command not recognized\r\n221 2.0.0 Bye\r\n"
            )
        );
        client.assert_closed();
        let messages = sink.messages();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].rcpt_to, vec!["b@y".to_owned()]);
        assert_eq!(messages[0].content, b"body\r\n");
    }

    #[test]
    fn commands_out_of_sequence_get_503() {
        let sink = start(|_| {});
        let mut client = Client::connect(sink.local_addr());
        assert_eq!(client.reply(), BANNER);
        assert_eq!(
            client.command("MAIL FROM:<a@x>"),
            "503 5.5.1 Error: send HELO/EHLO first\r\n"
        );
        assert_eq!(client.command("HELO client.test"), "250 sink.test\r\n");
        assert_eq!(
            client.command("RCPT TO:<b@y>"),
            "503 5.5.1 Error: need MAIL command\r\n"
        );
        assert_eq!(
            client.command("DATA"),
            "503 5.5.1 Error: need RCPT command\r\n"
        );
        assert_eq!(client.command("MAIL FROM:<a@x>"), "250 2.1.0 Ok\r\n");
        assert_eq!(
            client.command("MAIL FROM:<a@x>"),
            "503 5.5.1 Error: nested MAIL command\r\n"
        );
        assert_eq!(
            client.command("DATA"),
            "554 5.5.1 Error: no valid recipients\r\n"
        );
        assert_eq!(client.command("RSET"), "250 2.0.0 Ok\r\n");
        assert_eq!(
            client.command("RCPT TO:<b@y>"),
            "503 5.5.1 Error: need MAIL command\r\n"
        );
        assert_eq!(
            client.command("MAIL FROM:a@x"),
            "501 5.1.7 Bad sender address syntax\r\n"
        );
        assert_eq!(
            client.command("MAIL TO:<a@x>"),
            "501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
        );
        assert_eq!(
            client.command("EHLO"),
            "501 5.5.4 Syntax: EHLO hostname\r\n"
        );
    }

    #[test]
    fn bare_lf_in_a_command_gets_521_and_a_close() {
        let sink = start(|_| {});
        let mut client = Client::connect(sink.local_addr());
        assert_eq!(client.reply(), BANNER);
        client.send(b"EHLO client.test\n");
        assert_eq!(client.reply(), "521 5.5.2 Error: bare <LF> received\r\n");
        client.assert_closed();
    }

    #[test]
    fn over_long_command_line_gets_500_and_a_close() {
        let sink = start(|_| {});
        let mut client = Client::connect(sink.local_addr());
        assert_eq!(client.reply(), BANNER);
        // Exactly the limit without a line end, so no unread bytes turn the close into a reset.
        client.send(&vec![b'A'; 4096]);
        assert_eq!(client.reply(), "500 5.5.2 Error: line too long\r\n");
        client.assert_closed();
    }

    #[test]
    fn bare_newlines_in_data_are_recorded_and_do_not_end_it() {
        let sink = start(|_| {});
        let mut client = Client::greeted(sink.local_addr());
        // The smuggling vectors: none of these dots ends the data.
        let data = b"a\n.\r\nb\r\n.\nc\r.\r\nd\n.\n\r\n.\r\n";
        assert_eq!(
            client.transaction("a@x", "b@y", data),
            "250 2.0.0 Ok: queued as 1\r\n"
        );
        assert_eq!(
            client.transaction("a@x", "b@y", b"clean\r\n.\r\n"),
            "250 2.0.0 Ok: queued as 2\r\n"
        );
        let messages = sink.wait_for_messages(2, TIMEOUT);
        assert_eq!(messages[0].raw, b"a\n.\r\nb\r\n.\nc\r.\r\nd\n.\n\r\n");
        // Only a dot after CRLF is stuffing, so only the one after "b\r\n" goes.
        assert_eq!(messages[0].content, b"a\n.\r\nb\r\n\nc\r.\r\nd\n.\n\r\n");
        assert!(messages[0].bare_newline_seen);
        assert!(!messages[1].bare_newline_seen);
    }

    #[test]
    fn bare_cr_in_data_is_recorded() {
        let sink = start(|_| {});
        let mut client = Client::greeted(sink.local_addr());
        assert_eq!(
            client.transaction("a@x", "b@y", b"a\rb\r\n.\r\n"),
            "250 2.0.0 Ok: queued as 1\r\n"
        );
        assert!(sink.wait_for_messages(1, TIMEOUT)[0].bare_newline_seen);
    }

    #[test]
    fn size_limit_is_advertised_and_enforced() {
        let sink = start(|config| config.max_message_size = 10);
        let mut client = Client::connect(sink.local_addr());
        assert_eq!(client.reply(), BANNER);
        assert!(client.command("EHLO c").contains("250-SIZE 10\r\n"));
        assert_eq!(
            client.command("MAIL FROM:<a@x> SIZE=11"),
            "552 5.3.4 Message size exceeds fixed limit\r\n"
        );
        assert_eq!(
            client.command("MAIL FROM:<a@x> SIZE=ten"),
            "501 5.5.4 Bad message size syntax\r\n"
        );
        // Exactly 10 bytes is fine, 11 is not.
        assert_eq!(
            client.transaction("a@x", "b@y", b"12345678\r\n.\r\n"),
            "250 2.0.0 Ok: queued as 1\r\n"
        );
        assert_eq!(
            client.transaction("a@x", "b@y", b"123456789\r\n.\r\n"),
            "552 5.3.4 Message size exceeds fixed limit\r\n"
        );
        assert_eq!(client.command("NOOP"), "250 2.0.0 Ok\r\n");
        // Past twice the limit the sink hangs up without waiting for the dot.
        assert_eq!(client.command("MAIL FROM:<a@x>"), "250 2.1.0 Ok\r\n");
        assert_eq!(client.command("RCPT TO:<b@y>"), "250 2.1.5 Ok\r\n");
        assert_eq!(
            client.command("DATA"),
            "354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        client.send(&[b'x'; 40]);
        client.assert_closed();
        assert_eq!(sink.messages().len(), 1);
    }

    #[test]
    fn xclient_is_advertised_accepted_and_requires_a_new_ehlo() {
        let sink = start(|config| config.offer_xclient = true);
        let mut client = Client::connect(sink.local_addr());
        assert_eq!(client.reply(), BANNER);
        assert_eq!(
            client.command("EHLO tarmac.test"),
            "250-sink.test\r\n250-PIPELINING\r\n250-SIZE 50000000\r\n250-8BITMIME\r\n\
             250-ENHANCEDSTATUSCODES\r\n250-XCLIENT ADDR NAME PORT HELO PROTO\r\n250 SMTPUTF8\r\n"
        );
        let xclient = "ADDR=192.0.2.7 NAME=mail.example.com PORT=53211 HELO=x+2By PROTO=ESMTP";
        assert_eq!(client.command(&format!("XCLIENT {xclient}")), BANNER);
        assert_eq!(
            client.command("MAIL FROM:<a@x>"),
            "503 5.5.1 Error: send HELO/EHLO first\r\n"
        );
        assert!(
            client
                .command("EHLO tarmac.test")
                .starts_with("250-sink.test\r\n")
        );
        assert_eq!(
            client.transaction("a@x", "b@y", b"hi\r\n.\r\n"),
            "250 2.0.0 Ok: queued as 1\r\n"
        );
        assert_eq!(client.command("MAIL FROM:<a@x>"), "250 2.1.0 Ok\r\n");
        assert_eq!(
            client.command("XCLIENT ADDR=192.0.2.8"),
            "503 5.5.1 Error: MAIL transaction in progress\r\n"
        );
        let messages = sink.wait_for_messages(1, TIMEOUT);
        assert_eq!(messages[0].xclient.as_deref(), Some(xclient));
        assert_eq!(messages[0].helo, "tarmac.test");
        assert_eq!(sink.sessions()[0].xclient.as_deref(), Some(xclient));
    }

    #[test]
    fn xclient_with_bad_attributes_is_refused() {
        let sink = start(|config| config.offer_xclient = true);
        let mut client = Client::greeted_xclient(sink.local_addr());
        for (command, reply) in [
            (
                "XCLIENT",
                "501 5.5.4 Syntax: XCLIENT attribute=value...\r\n",
            ),
            (
                "XCLIENT ADDR",
                "501 5.5.4 Error: bad XCLIENT attribute syntax\r\n",
            ),
            (
                "XCLIENT LOGIN=joe",
                "501 5.5.4 Error: bad XCLIENT attribute name\r\n",
            ),
            (
                "XCLIENT HELO=a=b",
                "501 5.5.4 Error: bad XCLIENT attribute value\r\n",
            ),
            (
                "XCLIENT HELO=a+2b",
                "501 5.5.4 Error: bad XCLIENT attribute value\r\n",
            ),
            (
                "XCLIENT HELO=a+2",
                "501 5.5.4 Error: bad XCLIENT attribute value\r\n",
            ),
            (
                "XCLIENT ADDR=1.2.3.4  PORT=1",
                "501 5.5.4 Error: bad XCLIENT attribute syntax\r\n",
            ),
        ] {
            assert_eq!(client.command(command), reply, "{command}");
        }
        assert_eq!(sink.sessions()[0].xclient, None);
    }

    #[test]
    fn xclient_not_offered_is_an_unknown_command() {
        let sink = start(|_| {});
        let mut client = Client::greeted(sink.local_addr());
        assert_eq!(
            client.command("XCLIENT ADDR=192.0.2.7"),
            "502 5.5.2 Error: command not recognized\r\n"
        );
    }

    #[test]
    fn proxy_v1_header_is_captured_before_the_banner() {
        let sink = start(|config| config.expect_proxy = Some(ProxyVersion::V1));
        let header = b"PROXY TCP4 192.0.2.7 127.0.0.1 53211 25\r\n";
        let mut client = Client::connect(sink.local_addr());
        client.assert_silent();
        client.send(header);
        assert_eq!(client.reply(), BANNER);
        assert_eq!(client.command("EHLO c"), EHLO_REPLY);
        assert_eq!(
            client.transaction("a@x", "b@y", b"hi\r\n.\r\n"),
            "250 2.0.0 Ok: queued as 1\r\n"
        );
        let messages = sink.wait_for_messages(1, TIMEOUT);
        assert_eq!(messages[0].proxy_header.as_deref(), Some(&header[..]));
        assert_eq!(
            sink.sessions()[0].proxy_header.as_deref(),
            Some(&header[..])
        );
    }

    #[test]
    fn proxy_v2_header_is_captured_before_the_banner() {
        let sink = start(|config| config.expect_proxy = Some(ProxyVersion::V2));
        let mut header = PROXY_V2_SIGNATURE.to_vec();
        // Version 2, PROXY; TCP over IPv4; 12 address bytes.
        header.extend_from_slice(&[0x21, 0x11, 0, 12]);
        header.extend_from_slice(&[192, 0, 2, 7, 127, 0, 0, 1]);
        header.extend_from_slice(&53211_u16.to_be_bytes());
        header.extend_from_slice(&25_u16.to_be_bytes());
        let mut client = Client::connect(sink.local_addr());
        // The header and a pipelined EHLO in one write: the EHLO must not be lost.
        let mut first = header.clone();
        first.extend_from_slice(b"EHLO c\r\n");
        client.send(&first);
        assert_eq!(client.reply(), BANNER);
        assert_eq!(client.reply(), EHLO_REPLY);
        assert_eq!(
            client.transaction("a@x", "b@y", b"hi\r\n.\r\n"),
            "250 2.0.0 Ok: queued as 1\r\n"
        );
        let messages = sink.wait_for_messages(1, TIMEOUT);
        assert_eq!(messages[0].proxy_header.as_deref(), Some(&header[..]));
    }

    #[test]
    fn malformed_proxy_headers_close_without_a_banner() {
        let v1 = start(|config| config.expect_proxy = Some(ProxyVersion::V1));
        let mut client = Client::connect(v1.local_addr());
        client.send(b"EHLO c\r\n");
        client.assert_closed();
        let mut client = Client::connect(v1.local_addr());
        client.send(&[b'P'; 200]);
        client.assert_closed();
        assert_eq!(closed_sessions(&v1, 2)[0].proxy_header, None);

        let v2 = start(|config| config.expect_proxy = Some(ProxyVersion::V2));
        let mut client = Client::connect(v2.local_addr());
        client.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 53211 25\r\n");
        client.assert_closed();
        assert_eq!(closed_sessions(&v2, 1)[0].proxy_header, None);
    }

    #[test]
    fn no_banner_stays_silent_and_records_input() {
        let sink = start(|config| config.behaviour = Behaviour::NoBanner);
        let mut client = Client::connect(sink.local_addr());
        client.assert_silent();
        client.send(b"EHLO c\r\n");
        client.assert_silent();
        drop(client);
        assert_eq!(closed_sessions(&sink, 1)[0].commands, commands(&["EHLO c"]));
    }

    #[test]
    fn close_after_banner_closes_on_the_first_command() {
        let sink = start(|config| config.behaviour = Behaviour::CloseAfterBanner);
        let mut client = Client::connect(sink.local_addr());
        assert_eq!(client.reply(), BANNER);
        client.send(b"EHLO c\r\n");
        client.assert_closed();
        assert_eq!(closed_sessions(&sink, 1)[0].commands, commands(&["EHLO c"]));
    }

    #[test]
    fn reject_rcpt_rejects_only_matching_recipients() {
        let sink = start(|config| config.behaviour = Behaviour::RejectRcpt("bad".to_owned()));
        let mut client = Client::greeted(sink.local_addr());
        assert_eq!(client.command("MAIL FROM:<a@x>"), "250 2.1.0 Ok\r\n");
        assert_eq!(
            client.command("RCPT TO:<bad@y>"),
            "550 5.1.1 <bad@y>: Recipient address rejected: User unknown\r\n"
        );
        assert_eq!(
            client.command("DATA"),
            "554 5.5.1 Error: no valid recipients\r\n"
        );
        assert_eq!(client.command("RCPT TO:<good@y>"), "250 2.1.5 Ok\r\n");
        assert_eq!(
            client.command("DATA"),
            "354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        client.send(b"hi\r\n.\r\n");
        assert_eq!(client.reply(), "250 2.0.0 Ok: queued as 1\r\n");
        assert_eq!(sink.messages()[0].rcpt_to, vec!["good@y".to_owned()]);
    }

    #[test]
    fn temp_fail_mail_gets_451() {
        let sink = start(|config| config.behaviour = Behaviour::TempFailMail);
        let mut client = Client::greeted(sink.local_addr());
        assert_eq!(
            client.command("MAIL FROM:<a@x>"),
            "451 4.3.0 Try again later\r\n"
        );
        assert_eq!(
            client.command("RCPT TO:<b@y>"),
            "503 5.5.1 Error: need MAIL command\r\n"
        );
    }

    #[test]
    fn reject_data_gets_554_after_the_dot_and_keeps_nothing() {
        let sink = start(|config| config.behaviour = Behaviour::RejectData);
        let mut client = Client::greeted(sink.local_addr());
        assert_eq!(
            client.transaction("a@x", "b@y", b"hi\r\n.\r\n"),
            "554 5.7.1 Message rejected\r\n"
        );
        assert_eq!(
            client.command("RCPT TO:<b@y>"),
            "503 5.5.1 Error: need MAIL command\r\n"
        );
        assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
        assert_eq!(sink.messages(), vec![]);
    }

    #[test]
    fn stall_after_data_never_replies_again() {
        let sink = start(|config| config.behaviour = Behaviour::StallAfterData);
        let mut client = Client::greeted(sink.local_addr());
        assert_eq!(client.command("MAIL FROM:<a@x>"), "250 2.1.0 Ok\r\n");
        assert_eq!(client.command("RCPT TO:<b@y>"), "250 2.1.5 Ok\r\n");
        assert_eq!(
            client.command("DATA"),
            "354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        client.send(b"hi\r\n.\r\n");
        client.assert_silent();
        client.send(b"QUIT\r\n");
        client.assert_silent();
        drop(client);
        let sessions = closed_sessions(&sink, 1);
        assert_eq!(
            sessions[0].commands,
            commands(&[
                "EHLO client.test",
                "MAIL FROM:<a@x>",
                "RCPT TO:<b@y>",
                "DATA",
                "QUIT"
            ])
        );
        assert_eq!(sink.messages(), vec![]);
    }

    #[test]
    fn close_after_data_dot_closes_without_a_reply() {
        let sink = start(|config| config.behaviour = Behaviour::CloseAfterDataDot);
        let mut client = Client::greeted(sink.local_addr());
        assert_eq!(client.command("MAIL FROM:<a@x>"), "250 2.1.0 Ok\r\n");
        assert_eq!(client.command("RCPT TO:<b@y>"), "250 2.1.5 Ok\r\n");
        assert_eq!(
            client.command("DATA"),
            "354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        // Up to the CRLF before the dot the sink keeps reading.
        client.send(b"hi\r\n");
        client.assert_silent();
        client.send(b".\r\n");
        client.assert_closed();
        assert_eq!(sink.messages(), vec![]);
    }

    #[test]
    fn multiline_rcpt_reply_has_three_lines() {
        let sink = start(|config| config.behaviour = Behaviour::MultilineRcpt);
        let mut client = Client::greeted(sink.local_addr());
        assert_eq!(client.command("MAIL FROM:<a@x>"), "250 2.1.0 Ok\r\n");
        assert_eq!(
            client.command("RCPT TO:<b@y>"),
            "250-2.1.5 first\r\n250-2.1.5 second\r\n250 2.1.5 Ok\r\n"
        );
        assert_eq!(
            client.command("DATA"),
            "354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        client.send(b"hi\r\n.\r\n");
        assert_eq!(client.reply(), "250 2.0.0 Ok: queued as 1\r\n");
        assert_eq!(sink.messages()[0].rcpt_to, vec!["b@y".to_owned()]);
    }

    #[test]
    fn starttls_is_an_unknown_command_without_a_certificate() {
        let sink = start(|_| {});
        // EHLO_REPLY (checked by `greeted`) lists no STARTTLS.
        let mut client = Client::greeted(sink.local_addr());
        assert_eq!(
            client.command("STARTTLS"),
            "502 5.5.2 Error: command not recognized\r\n"
        );
    }

    #[test]
    fn refuse_starttls_offers_it_answers_454_and_stays_in_plain_text() {
        let sink = start(|config| config.behaviour = Behaviour::RefuseStartTls);
        let mut client = Client::connect(sink.local_addr());
        assert_eq!(client.reply(), BANNER);
        let ehlo = client.command("EHLO client.test");
        assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");
        assert_eq!(
            client.command("STARTTLS now"),
            "501 5.5.4 Syntax: STARTTLS\r\n"
        );
        assert_eq!(
            client.command("STARTTLS"),
            "454 4.7.0 TLS not available due to local problem\r\n"
        );
        // The EHLO still counts: nothing was reset.
        assert_eq!(
            client.transaction("a@x", "b@y", b"hi\r\n.\r\n"),
            "250 2.0.0 Ok: queued as 1\r\n"
        );
        assert_eq!(sink.messages()[0].tls, None);
        client.command("QUIT");
        let session = &closed_sessions(&sink, 1)[0];
        assert_eq!(session.tls, None);
        assert_eq!(session.starttls_discarded, 0);
    }

    #[test]
    fn close_after_starttls_answers_220_then_closes() {
        let sink = start(|config| config.behaviour = Behaviour::CloseAfterStartTls);
        let mut client = Client::connect(sink.local_addr());
        assert_eq!(client.reply(), BANNER);
        assert!(client.command("EHLO c").contains("250-STARTTLS\r\n"));
        assert_eq!(
            client.command("STARTTLS"),
            "220 2.0.0 Ready to start TLS\r\n"
        );
        client.assert_closed();
    }

    #[test]
    fn maildir_gets_one_eml_per_message_with_the_content() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir()
            .join(format!("tarmac-sink-test-{}-{nanos}", std::process::id()))
            .join("mail");
        let sink = start(|config| config.maildir = Some(dir.clone()));
        assert!(dir.is_dir());
        let mut client = Client::greeted(sink.local_addr());
        assert_eq!(
            client.transaction("a@x", "b@y", b"one\r\n..two\r\n.\r\n"),
            "250 2.0.0 Ok: queued as 1\r\n"
        );
        assert_eq!(
            client.transaction("a@x", "b@y", b"three\r\n.\r\n"),
            "250 2.0.0 Ok: queued as 2\r\n"
        );
        let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(&dir)
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, fs::read(&path).unwrap())
            })
            .collect();
        files.sort_by(|a, b| a.0.rsplit('-').next().cmp(&b.0.rsplit('-').next()));
        fs::remove_dir_all(dir.parent().unwrap()).unwrap();

        assert_eq!(files.len(), 2, "{files:?}");
        assert!(files[0].0.ends_with("-1.eml"), "{}", files[0].0);
        assert!(files[1].0.ends_with("-2.eml"), "{}", files[1].0);
        let stamp = files[0].0.trim_end_matches("-1.eml");
        assert!(stamp.parse::<u128>().is_ok(), "{}", files[0].0);
        assert_eq!(files[0].1, b"one\r\n.two\r\n");
        assert_eq!(files[1].1, b"three\r\n");
    }

    #[test]
    fn wait_for_messages_returns_what_it_has_at_the_timeout() {
        let sink = start(|_| {});
        let started = Instant::now();
        assert_eq!(
            sink.wait_for_messages(1, Duration::from_millis(200)),
            vec![]
        );
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");

        // Woken by the message: with no timeout at all (`Duration::MAX` has no deadline) the
        // wait can only end that way. It runs on a thread of its own, so a wait that is never
        // woken fails the test after TIMEOUT rather than hanging it.
        let sink = Arc::new(sink);
        let waiting = Arc::clone(&sink);
        let (woken_tx, woken) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let _ = woken_tx.send(waiting.wait_for_messages(1, Duration::MAX));
        });
        let mut client = Client::greeted(sink.local_addr());
        assert_eq!(
            client.transaction("a@x", "b@y", b"hi\r\n.\r\n"),
            "250 2.0.0 Ok: queued as 1\r\n"
        );
        let messages = woken
            .recv_timeout(TIMEOUT)
            .expect("the waiter is woken by the message");
        assert_eq!(messages.len(), 1);

        let messages = sink.wait_for_messages(2, Duration::from_millis(100));
        assert_eq!(messages.len(), 1);
    }

    #[test]
    fn stop_returns_promptly_with_a_connection_open() {
        let sink = start(|_| {});
        let addr = sink.local_addr();
        let mut client = Client::connect(addr);
        assert_eq!(client.reply(), BANNER);
        assert_eq!(sink.connections(), 1);
        sink.stop();
        // Stopped: the listener is closed (the accept thread was woken and joined).
        assert!(TcpStream::connect_timeout(&addr, TIMEOUT).is_err());
        // Yet the open session was not waited for (stop would then have returned only once
        // it ended, at the client's close or its idle timeout): it is still served.
        assert_eq!(client.command("NOOP"), "250 2.0.0 Ok\r\n");
        assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    }

    #[test]
    fn wildcard_listener_stops_too() {
        let sink = start(|config| config.listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, sink.local_addr().port()));
        assert_eq!(wake_addr(sink.local_addr()), loopback);
        assert_eq!(
            wake_addr(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 25))),
            SocketAddr::from((Ipv6Addr::LOCALHOST, 25))
        );
        drop(sink);
        // The accept thread was woken and joined, so the listener it owned is closed. Had the
        // wake failed, the thread would have been left in accept() with the port still open.
        assert!(TcpStream::connect_timeout(&loopback, TIMEOUT).is_err());
    }

    #[test]
    fn unstuff_removes_one_dot_only_after_crlf() {
        for (raw, content) in [
            (&b""[..], &b""[..]),
            (b".a", b"a"),
            (b"..", b"."),
            (b"a\r\n..b\r\n", b"a\r\n.b\r\n"),
            (b"a\n.b", b"a\n.b"),
            (b"a\r.b", b"a\r.b"),
            (b"a.b\r\n.", b"a.b\r\n"),
        ] {
            assert_eq!(unstuff(raw), content, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn xtext_accepts_printable_and_uppercase_hex_escapes() {
        assert!(is_xtext(b""));
        assert!(is_xtext(b"[UNAVAILABLE]"));
        assert!(is_xtext(b"IPV6:2001:db8::1"));
        assert!(is_xtext(b"a+2Bb+3D"));
        assert!(!is_xtext(b"a b"));
        assert!(!is_xtext(b"a=b"));
        assert!(!is_xtext(b"a+2b"));
        assert!(!is_xtext(b"a+"));
        assert!(!is_xtext("é".as_bytes()));
    }
}
