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
//!
//! The parts: this module has the configuration and the [`Sink`] handle; `listener` accepts and
//! starts a thread per connection; `session` is the script each connection runs (Postfix's
//! replies, in order); `behaviour` lists the misbehaviours ([`Behaviour`]); `tls` is STARTTLS;
//! `data` reads the message up to the final dot; `record` keeps what the sink saw.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rustls::ServerConfig;

use listener::accept_loop;
use record::{Shared, State};

mod behaviour;
mod data;
mod listener;
mod record;
mod session;
mod tls;

#[cfg(test)]
mod tests;

pub use behaviour::{Behaviour, INJECTED_AFTER_STARTTLS};
pub use record::{SinkMessage, SinkSession};
pub use tls::tls_server_config;

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

/// A running sink. Dropping it (or [`Sink::stop`]) stops accepting new connections.
#[derive(Debug)]
pub struct Sink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    /// The listener again (a duplicate descriptor), to wake the accept thread at stop.
    waker: TcpListener,
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
        let waker = listener.try_clone()?;
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
            waker,
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

    /// Sets the stop flag and unblocks the accept thread by shutting the listening socket
    /// down (Linux then fails the blocked `accept` with `EINVAL`). Nothing is sent: a
    /// connect to wake it would leave from the stopping thread's network namespace, which
    /// for a sink started inside a test's namespace is not the sink's. If the shutdown
    /// fails, the thread is left detached rather than joined: stopping must never hang.
    fn shutdown(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        match socket2::SockRef::from(&self.waker).shutdown(std::net::Shutdown::Read) {
            Ok(()) => {
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

/// Default [`SinkConfig::max_message_size`]: 50 MB, above any usual MTA limit so only tests
/// that lower it see `552`.
const DEFAULT_MAX_MESSAGE_SIZE: u64 = 50_000_000;
