//! The downstream handshake as a small sans-IO machine inside the relay
//! (`crate::downstream::relay::Relay`): PROXY header, banner, EHLO (HELO fallback),
//! STARTTLS, XCLIENT and the client's own EHLO after it. Relayed transaction commands (MAIL,
//! RCPT, DATA, the body) are the relay's business; this machine only gets the connection to
//! the point where they can be sent *for one client*, and remembers
//! what the downstream offered and whom the connection speaks for. It never touches the
//! socket: when TLS has to start it says so ([`Step::StartTls`]) and waits for the driver to
//! report the outcome.
//!
//! Lifecycle of a new connection (each arrow is one downstream reply, or a driver report in
//! `[brackets]`):
//! ```text
//! Banner ─220─▶ Ehlo ─250─▶ (STARTTLS offered and wanted) StartTls ─220─▶ TlsHandshake
//!                  │            [tls established] ─▶ Ehlo (inside TLS, capabilities read anew)
//!                  │            [tls failed] ─▶ RetryWithoutTls (opportunistic) | TlsFailed (required)
//!                  │         StartTls ─4xx/5xx─▶ as if not offered (opportunistic) | TlsFailed (required)
//!                  ├─250─▶ (xclient) Xclient ─220─▶ Greeting (EHLO/HELO <client's name>) ─250─▶ Ready
//!                  │       (xclient, not offered or refused) ─▶ AnnouncementRefused
//!                  ├─250─▶ Ready                  (announce none, or PROXY sent at connect)
//!                  └─5xx─▶ Helo ─250─▶ as after Ehlo (required: TlsFailed, HELO has no STARTTLS)
//! anything unexpected, and any 421 ─▶ Failed
//! ```
//! A connection that already served a transaction (the same session's next one, or a pooled
//! connection in `mode = "multiplexing"`) is [`Handshake::renew`]ed for the next client:
//! `RSET` first when a transaction was left open, then nothing when it already speaks for this
//! very client, else a fresh XCLIENT. Postfix refuses a second XCLIENT on one connection unless
//! `smtpd_authorized_xclient_hosts` also matches the address it was just given (its EHLO after
//! XCLIENT no longer lists XCLIENT): such a connection is [`Step::Retire`]d, never used for
//! another client (DESIGN.md §6).
//!
//! STARTTLS policy (`[downstream] tls`): `none` never sends it; `opportunistic` sends it when
//! the EHLO reply lists it and otherwise goes on in plain text; `required` fails the handshake
//! with [`TlsFailure`] when it cannot be met. What `opportunistic` does when TLS fails follows
//! Postfix's `smtp_tls_security_level = may`: a STARTTLS answered with 4xx/5xx leaves the
//! connection in plain text, in the state it had after EHLO, so the dialogue goes on there; a
//! failed TLS handshake leaves it in an unknown state, so the connection is given up and the
//! same server is dialled again without STARTTLS ([`Step::RetryWithoutTls`]), once.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::config::{AnnounceClient, DownstreamTls};
use crate::smtp::Reply;

/// Longest XCLIENT command we send, CRLF included: Postfix's smtpd limits a command line, and
/// XCLIENT_README says clients should keep each command within 512 bytes.
const MAX_XCLIENT_LINE: usize = 512;

/// Longest HELO or NAME value Postfix takes in XCLIENT (its `VALID_HOSTNAME_LEN`); a longer
/// one is refused with `501`, so tarmac sends `[UNAVAILABLE]` instead.
const MAX_NAME: usize = 255;

/// Postfix's value for an attribute tarmac does not know or may not pass on.
const UNAVAILABLE: &str = "[UNAVAILABLE]";

/// What the downstream advertised in its EHLO reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `8BITMIME`
    pub eight_bit_mime: bool,
    /// `SMTPUTF8`
    pub smtputf8: bool,
    /// `SIZE`
    pub size: bool,
    /// `STARTTLS` (RFC 3207). Inside TLS a server no longer lists it, so after STARTTLS this
    /// is false.
    pub starttls: bool,
    /// `XCLIENT` with the attributes it accepts.
    pub xclient: XclientAttrs,
}

/// XCLIENT attributes a downstream accepts (Postfix XCLIENT_README).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XclientAttrs {
    /// `ADDR`
    pub addr: bool,
    /// `NAME`
    pub name: bool,
    /// `PORT`
    pub port: bool,
    /// `HELO`
    pub helo: bool,
    /// `PROTO`
    pub proto: bool,
    /// `DESTADDR`
    pub destaddr: bool,
    /// `DESTPORT`
    pub destport: bool,
}

impl XclientAttrs {
    /// Whether XCLIENT is offered with an attribute tarmac can announce.
    pub(crate) fn any(&self) -> bool {
        self.addr || self.name || self.port || self.helo || self.proto
    }
}

/// Who the client is, as told to the downstream.
#[derive(Clone, Copy, Debug)]
pub struct ClientIdentity<'a> {
    /// The client's address.
    pub client: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// The client's HELO/EHLO argument.
    pub helo: &'a [u8],
    /// Whether it said EHLO.
    pub esmtp: bool,
    /// XCLIENT's NAME: the forward-confirmed rDNS name, or Postfix's `[UNAVAILABLE]` (none)
    /// or `[TEMPUNAVAIL]` (the lookup failed).
    pub name: &'a str,
}

/// The identity a connection was announced with (XCLIENT accepted, or the PROXY header sent):
/// the downstream applies this client's rights to everything on the connection until the next
/// announcement, so a transaction of anyone else must not go there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announced {
    client: SocketAddr,
    local: SocketAddr,
    helo: Box<[u8]>,
    esmtp: bool,
    name: Box<str>,
}

impl ClientIdentity<'_> {
    /// The owned record of this identity.
    pub fn announced(&self) -> Announced {
        Announced {
            client: self.client,
            local: self.local,
            helo: self.helo.into(),
            esmtp: self.esmtp,
            name: self.name.into(),
        }
    }

    /// Whether a connection announced as `announced` speaks for exactly this client.
    pub fn is(&self, announced: &Announced) -> bool {
        self.client == announced.client
            && self.local == announced.local
            && *self.helo == *announced.helo
            && self.esmtp == announced.esmtp
            && self.name == &*announced.name
    }
}

/// What a connection carries from one transaction to the next (the session's next one, or,
/// through the pool, another session's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    /// What its last EHLO offered.
    pub caps: Capabilities,
    /// Whom the downstream believes it is talking to (`None`: nobody announced).
    pub announced: Option<Announced>,
    /// A transaction was left open (its client went away between commands): the next user
    /// sends `RSET` first. No reply is outstanding on such a connection.
    pub dirty: bool,
}

/// Where the handshake stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the 220 greeting.
    Banner,
    /// EHLO with tarmac's hostname sent.
    Ehlo,
    /// EHLO was refused; HELO sent.
    Helo,
    /// STARTTLS sent, waiting for its 220.
    StartTls,
    /// The downstream said 220 to STARTTLS; the driver is switching the connection to TLS and
    /// no reply may arrive until it reports the outcome.
    TlsHandshake,
    /// A renewed connection had a transaction left open: RSET sent.
    Reset,
    /// XCLIENT sent, waiting for its 220.
    Xclient,
    /// After XCLIENT: EHLO (or HELO) with the client's own name sent.
    Greeting,
    /// Handshake done: transaction commands may be sent.
    Ready,
    /// The downstream refused or broke the handshake.
    Failed,
}

/// Where TLS stands on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encryption {
    /// Plain text, STARTTLS not (yet) tried.
    Plain,
    /// The downstream answered STARTTLS with 4xx/5xx; plain text for good (opportunistic).
    Declined,
    /// The TLS handshake completed; everything from the second EHLO on is encrypted.
    Active,
    /// The TLS handshake failed or was cut short: nothing more may be written.
    Broken,
}
/// Result of feeding one downstream reply (or a driver report) to the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// More replies are needed; the next command (if any) is already in `out`.
    Continue,
    /// The downstream is ready for MAIL.
    Ready,
    /// The downstream answered STARTTLS with 220: the driver must switch this connection to
    /// TLS now (rustls client over the same socket) and then call
    /// [`Handshake::handle_tls_established`] or [`Handshake::handle_tls_failed`].
    ///
    /// Everything the downstream sent after that 220 in plain text (the rest of the same read,
    /// and anything left in the driver's read buffer) must be thrown away unread, never parsed
    /// as a reply: a man in the middle can append a forged reply there (CVE-2011-0411, seen
    /// from the client side), and only bytes from inside TLS may count. Bytes still in the
    /// kernel then reach rustls, which refuses them as a broken handshake. Nothing is queued
    /// for the downstream at this point: the handshake never pipelines after STARTTLS.
    StartTls,
    /// `tls = "opportunistic"` and the TLS handshake failed: the connection's state is
    /// unknown, so the driver closes it and connects to the same server again with a
    /// handshake built with [`DownstreamTls::None`] (Postfix's `may` does the same).
    RetryWithoutTls,
    /// `tls = "required"` cannot be met on this connection: close it; the client's command
    /// waiting for the downstream gets [`TlsFailure::client_reply`].
    TlsFailed(TlsFailure),
    /// The handshake failed with this downstream reply.
    Failed(Reply),
    /// `announce_client = "xclient"` on a new connection, and the downstream does not offer
    /// XCLIENT (`None`) or refused it (its reply): tarmac is not in its
    /// `smtpd_authorized_xclient_hosts`. The client's MAIL gets [`announcement_refused`];
    /// relaying under tarmac's own address instead would hand the client tarmac's rights.
    AnnouncementRefused(Option<Reply>),
    /// A connection that served another transaction cannot speak for this client (no fresh
    /// XCLIENT offered or accepted, a PROXY header naming someone else, a refused RSET): close
    /// it (with QUIT) and open a new one for this client.
    Retire,
    /// After XCLIENT the downstream refused the client's own EHLO/HELO name with this reply:
    /// its verdict on the client, passed back to the client's waiting command.
    Refused(Reply),
}

/// The client's reply when the downstream will not take the client announcement (DESIGN.md
/// §6): a 4xx, so the sender retries once the operator fixed the downstream's configuration.
pub fn announcement_refused() -> Reply {
    Reply::new(
        451,
        "4.3.5",
        "Error: downstream server refuses the client announcement, please try again later",
    )
}

/// Why `[downstream] tls = "required"` could not be met.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The EHLO reply did not list STARTTLS, or EHLO was refused (a HELO-only server has no
    /// STARTTLS).
    NotOffered,
    /// STARTTLS was answered with this reply instead of 220.
    Refused(Reply),
    /// The TLS handshake failed (certificate not trusted with `tls_verify`, no common version
    /// or cipher, connection lost), as reported by the driver.
    Handshake,
}

impl TlsFailure {
    /// The reply for the client's command that waits for the downstream (its MAIL): a 4xx, so
    /// the sender retries, since the failure is between tarmac and its downstream, not about the
    /// message. The enhanced codes are Postfix's for the same failures (RFC 3463): `4.7.4`
    /// "security features not supported" when TLS is not offered or refused, `4.7.5`
    /// "cryptographic failure" when the handshake fails.
    pub fn client_reply(&self) -> Reply {
        match self {
            TlsFailure::NotOffered => Reply::new(
                451,
                "4.7.4",
                "Error: downstream server does not offer TLS, please try again later",
            ),
            TlsFailure::Refused(_) => Reply::new(
                451,
                "4.7.4",
                "Error: downstream server refused TLS, please try again later",
            ),
            TlsFailure::Handshake => Reply::new(
                451,
                "4.7.5",
                "Error: TLS handshake with downstream server failed, please try again later",
            ),
        }
    }
}

impl std::fmt::Display for TlsFailure {
    /// For the log line: what went wrong, with the downstream's first reply line if it gave one.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsFailure::NotOffered => f.write_str("TLS required but STARTTLS not offered"),
            TlsFailure::Refused(reply) => write!(
                f,
                "TLS required but STARTTLS refused: {} {}",
                reply.code,
                reply.lines.first().map_or("", String::as_str)
            ),
            TlsFailure::Handshake => f.write_str("TLS required but the TLS handshake failed"),
        }
    }
}

/// The handshake state of one downstream connection.
#[derive(Clone, Debug)]
pub struct Handshake {
    phase: Phase,
    hostname: String,
    announce: AnnounceClient,
    tls: DownstreamTls,
    encryption: Encryption,
    caps: Capabilities,
    /// The connection served a transaction before this handshake: a refusal retires it
    /// rather than failing the client.
    renewed: bool,
    /// Whom the downstream takes this connection to speak for.
    announced: Option<Announced>,
    /// The downstream's banner was read: it expects a QUIT before we hang up.
    greeted: bool,
}

impl Handshake {
    /// A handshake about to start on a fresh connection, in plain text throughout (STARTTLS is
    /// never sent); [`Handshake::with_tls`] sets a STARTTLS policy.
    pub fn new(hostname: &str, announce: AnnounceClient) -> Self {
        Handshake {
            phase: Phase::Banner,
            hostname: hostname.to_owned(),
            announce,
            tls: DownstreamTls::None,
            encryption: Encryption::Plain,
            caps: Capabilities::default(),
            renewed: false,
            announced: None,
            greeted: false,
        }
    }

    /// The same handshake with STARTTLS per `policy` (`[downstream] tls`; `None` for the plain
    /// retry after [`Step::RetryWithoutTls`]).
    pub fn with_tls(mut self, policy: DownstreamTls) -> Self {
        self.tls = policy;
        self
    }

    /// A pooled connection's handshake for a new transaction (`mode = "multiplexing"`): the
    /// connection is past its banner and EHLO, with what it `carried` from its last
    /// transaction. See [`Handshake::renew`] for what is sent.
    pub fn resume(
        hostname: &str,
        announce: AnnounceClient,
        carried: Carried,
        who: &ClientIdentity<'_>,
        out: &mut Vec<u8>,
    ) -> (Self, Step) {
        // The pooled connection's TLS state was settled by its first handshake: `new` sends
        // no STARTTLS.
        let mut handshake = Handshake {
            phase: Phase::Ready,
            caps: carried.caps,
            renewed: true,
            announced: carried.announced,
            greeted: true,
            ..Handshake::new(hostname, announce)
        };
        let step = if carried.dirty {
            out.extend_from_slice(b"RSET\r\n");
            handshake.phase = Phase::Reset;
            Step::Continue
        } else {
            handshake.announce_or_ready(who, out)
        };
        (handshake, step)
    }

    /// A ready connection is about to carry a new transaction for `who`: `Ready` at once when
    /// it already speaks for exactly this client (or nobody is announced, `announce_client =
    /// "none"`), else a fresh XCLIENT (and the client's EHLO after it) when the downstream
    /// offers one, else [`Step::Retire`].
    pub fn renew(&mut self, who: &ClientIdentity<'_>, out: &mut Vec<u8>) -> Step {
        if self.phase != Phase::Ready {
            return self.fail_internal("renewed before ready");
        }
        self.renewed = true;
        self.announce_or_ready(who, out)
    }

    /// The connection is up: with PROXY announcement, the header goes first (before the
    /// banner is even read, as the protocol requires).
    pub fn handle_connected(&mut self, who: &ClientIdentity<'_>, out: &mut Vec<u8>) {
        match self.announce {
            AnnounceClient::ProxyV1 => out.extend_from_slice(proxy_v1(who).as_bytes()),
            AnnounceClient::ProxyV2 => out.extend_from_slice(&proxy_v2(who)),
            AnnounceClient::Xclient | AnnounceClient::None => return,
        }
        self.announced = Some(who.announced());
    }

    /// Feeds one downstream reply; the next command, if any, is appended to `out`.
    pub fn handle_reply(
        &mut self,
        reply: Reply,
        who: &ClientIdentity<'_>,
        out: &mut Vec<u8>,
    ) -> Step {
        let ok = |code: u16| reply.code == code;
        if self.phase == Phase::Banner && reply.code / 100 == 2 {
            self.greeted = true;
        }
        match self.phase {
            // The downstream is closing whatever we asked: no fallback can help.
            _ if ok(421) => self.fail(reply),
            Phase::Banner if ok(220) => {
                self.send_ehlo(out);
                Step::Continue
            }
            Phase::Ehlo if ok(250) => {
                // Replaced, not merged: after STARTTLS only what was said inside TLS counts
                // (RFC 3207 §4.2).
                self.caps = parse_capabilities(&reply);
                if self.encryption == Encryption::Plain && self.tls != DownstreamTls::None {
                    if self.caps.starttls {
                        out.extend_from_slice(b"STARTTLS\r\n");
                        self.phase = Phase::StartTls;
                        return Step::Continue;
                    }
                    if self.tls == DownstreamTls::Required {
                        return self.fail_tls(TlsFailure::NotOffered);
                    }
                    log::debug!("downstream does not offer STARTTLS; relaying in plain text");
                }
                self.announce_or_ready(who, out)
            }
            Phase::Ehlo if reply.code >= 500 => {
                if self.tls == DownstreamTls::Required && self.encryption != Encryption::Active {
                    return self.fail_tls(TlsFailure::NotOffered);
                }
                // RFC 5321 §3.2: a server that rejects EHLO may still speak HELO.
                out.extend_from_slice(format!("HELO {}\r\n", self.hostname).as_bytes());
                self.phase = Phase::Helo;
                Step::Continue
            }
            Phase::Helo if ok(250) => {
                // HELO offers no extensions, XCLIENT among them.
                self.caps = Capabilities::default();
                self.announce_or_ready(who, out)
            }
            Phase::StartTls if ok(220) => {
                self.phase = Phase::TlsHandshake;
                Step::StartTls
            }
            Phase::StartTls if reply.code >= 400 => {
                if self.tls == DownstreamTls::Required {
                    return self.fail_tls(TlsFailure::Refused(reply));
                }
                // Postfix's `may`: the refused command changed nothing; go on in plain text
                // with what the EHLO reply offered.
                log::debug!(
                    "downstream refused STARTTLS ({} {}); relaying in plain text",
                    reply.code,
                    reply.lines.first().map_or("", String::as_str)
                );
                self.encryption = Encryption::Declined;
                self.announce_or_ready(who, out)
            }
            Phase::Reset if ok(250) => self.announce_or_ready(who, out),
            // The connection's state is not known clean: not for this client.
            Phase::Reset => self.retire(),
            // Postfix's smtpd answers XCLIENT with a new 220 greeting, its smtp-sink with 250;
            // either way the session was reset and wants EHLO again, now with the client's
            // own name, so its HELO checks, SPF-HELO and `Received:` see the client's.
            Phase::Xclient if reply.code / 100 == 2 => {
                self.announced = Some(who.announced());
                self.send_greeting(who, out);
                Step::Continue
            }
            Phase::Xclient if self.renewed => self.retire(),
            Phase::Xclient => {
                self.phase = Phase::Failed;
                Step::AnnouncementRefused(Some(reply))
            }
            Phase::Greeting if ok(250) => {
                self.caps = if who.esmtp {
                    parse_capabilities(&reply)
                } else {
                    // A HELO reply lists nothing, so whether the downstream would take
                    // another XCLIENT is unknown: keep what the EHLO before said, and a
                    // renewal that is refused retires the connection.
                    Capabilities {
                        xclient: self.caps.xclient,
                        ..Capabilities::default()
                    }
                };
                self.phase = Phase::Ready;
                Step::Ready
            }
            Phase::Greeting if reply.code >= 400 => {
                self.phase = Phase::Failed;
                Step::Refused(reply)
            }
            // Includes any reply during `TlsHandshake`: plain text after the 220 must never be
            // taken as a reply (see `Step::StartTls`).
            _ => self.fail(reply),
        }
    }

    /// The driver finished the TLS handshake after [`Step::StartTls`]: EHLO goes out again
    /// (RFC 3207 §4.2: the client must discard what it knew and ask anew), appended to `out`
    /// for the driver to send inside TLS. Returns `Continue`, or `Failed` when called at any
    /// other time.
    pub fn handle_tls_established(&mut self, out: &mut Vec<u8>) -> Step {
        if self.phase != Phase::TlsHandshake {
            return self.fail_internal("TLS established without STARTTLS");
        }
        self.encryption = Encryption::Active;
        self.caps = Capabilities::default();
        self.send_ehlo(out);
        Step::Continue
    }

    /// The driver's TLS handshake after [`Step::StartTls`] failed: [`Step::RetryWithoutTls`]
    /// under `opportunistic`, [`Step::TlsFailed`] with [`TlsFailure::Handshake`] under
    /// `required`. Either way this connection is finished.
    pub fn handle_tls_failed(&mut self) -> Step {
        if self.phase != Phase::TlsHandshake {
            return self.fail_internal("TLS failure reported without STARTTLS");
        }
        self.encryption = Encryption::Broken;
        if self.tls == DownstreamTls::Required {
            return self.fail_tls(TlsFailure::Handshake);
        }
        self.phase = Phase::Failed;
        Step::RetryWithoutTls
    }

    /// What the downstream offered (valid once `Ready`).
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// What the connection carries into its next transaction; `dirty` when one was left open.
    pub fn carried(&self, dirty: bool) -> Carried {
        Carried {
            caps: self.caps,
            announced: self.announced.clone(),
            dirty,
        }
    }

    /// Whether the downstream's banner was read: the next reply on a connection not greeted
    /// yet is its banner, which tells whether the server is up (`downstream::health`).
    pub fn is_greeted(&self) -> bool {
        self.greeted
    }

    /// Whether closing the connection should say QUIT first: the downstream greeted us, and
    /// the connection is not between STARTTLS and a finished TLS handshake (the downstream
    /// may be waiting for a ClientHello then, and after a failed handshake its state is
    /// unknown: nothing more may be written).
    pub fn may_quit(&self) -> bool {
        self.greeted
            && !matches!(self.phase, Phase::StartTls | Phase::TlsHandshake)
            && self.encryption != Encryption::Broken
    }

    /// EHLO with tarmac's own name: the first greeting of a connection.
    fn send_ehlo(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(format!("EHLO {}\r\n", self.hostname).as_bytes());
        self.phase = Phase::Ehlo;
    }

    /// After XCLIENT: the client's own verb and name (Postfix takes this greeting's argument
    /// as the client's HELO name and its verb as the protocol).
    fn send_greeting(&mut self, who: &ClientIdentity<'_>, out: &mut Vec<u8>) {
        let verb = if who.esmtp { "EHLO" } else { "HELO" };
        let name = helo_name(who.helo).unwrap_or(UNAVAILABLE);
        out.extend_from_slice(format!("{verb} {name}\r\n").as_bytes());
        self.phase = Phase::Greeting;
    }

    /// After the greeting (and STARTTLS): announce `who` as `announce_client` says, unless
    /// the connection already speaks for exactly this client, then ready. Never ready for a
    /// client the connection cannot be announced for.
    fn announce_or_ready(&mut self, who: &ClientIdentity<'_>, out: &mut Vec<u8>) -> Step {
        let speaks_for_who = self.announced.as_ref().is_some_and(|a| who.is(a));
        match self.announce {
            AnnounceClient::None => {}
            _ if speaks_for_who => {}
            AnnounceClient::Xclient if self.caps.xclient.any() => {
                out.extend_from_slice(&xclient_command(self.caps.xclient, who));
                self.phase = Phase::Xclient;
                return Step::Continue;
            }
            AnnounceClient::Xclient if !self.renewed => {
                self.phase = Phase::Failed;
                return Step::AnnouncementRefused(None);
            }
            // No fresh XCLIENT offered, or a PROXY header that named someone else.
            AnnounceClient::Xclient | AnnounceClient::ProxyV1 | AnnounceClient::ProxyV2 => {
                return self.retire();
            }
        }
        self.phase = Phase::Ready;
        Step::Ready
    }

    fn retire(&mut self) -> Step {
        self.phase = Phase::Failed;
        Step::Retire
    }

    fn fail(&mut self, reply: Reply) -> Step {
        self.phase = Phase::Failed;
        Step::Failed(reply)
    }

    fn fail_tls(&mut self, failure: TlsFailure) -> Step {
        self.phase = Phase::Failed;
        Step::TlsFailed(failure)
    }

    /// A driver report out of order: a bug in the caller, answered as a failed handshake (the
    /// client gets a 4xx) rather than a panic.
    fn fail_internal(&mut self, what: &str) -> Step {
        log::warn!("downstream handshake: {what}");
        self.fail(Reply::new(451, "4.3.0", what))
    }
}

/// The client's HELO name as the downstream will take it in XCLIENT `HELO=` and in the EHLO
/// after it: one word of printable ASCII, at most [`MAX_NAME`] bytes (Postfix refuses longer
/// ones, and EHLO takes exactly one argument). `None`: send `[UNAVAILABLE]`, so such a client
/// can still deliver.
fn helo_name(helo: &[u8]) -> Option<&str> {
    let printable = helo.iter().all(|b| b.is_ascii_graphic());
    if helo.is_empty() || helo.len() > MAX_NAME || !printable {
        return None;
    }
    std::str::from_utf8(helo).ok()
}

/// Whether `name` passes Postfix's `valid_hostname`: dot-separated labels of letters, digits,
/// `-` and `_`, none empty, none over 63 bytes, no label starting or ending with `-`, at most
/// [`MAX_NAME`] bytes, and not all digits and dots (that would be an address). XCLIENT `NAME=`
/// with anything else gets `501 Bad NAME syntax`.
fn valid_hostname(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_NAME {
        return false;
    }
    let labels_ok = name.trim_end_matches('.').split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    labels_ok && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// Reads the EHLO keywords (every line after the first); `check --live` reads them the same
/// way, so its findings are what a relayed session would find.
pub(crate) fn parse_capabilities(reply: &Reply) -> Capabilities {
    let mut caps = Capabilities::default();
    for line in reply.lines.iter().skip(1) {
        let mut words = line.split_ascii_whitespace();
        let Some(keyword) = words.next() else {
            continue;
        };
        match keyword.to_ascii_uppercase().as_str() {
            "8BITMIME" => caps.eight_bit_mime = true,
            "SMTPUTF8" => caps.smtputf8 = true,
            "SIZE" => caps.size = true,
            "STARTTLS" => caps.starttls = true,
            "XCLIENT" => {
                for attr in words {
                    match attr.to_ascii_uppercase().as_str() {
                        "ADDR" => caps.xclient.addr = true,
                        "NAME" => caps.xclient.name = true,
                        "PORT" => caps.xclient.port = true,
                        "HELO" => caps.xclient.helo = true,
                        "PROTO" => caps.xclient.proto = true,
                        "DESTADDR" => caps.xclient.destaddr = true,
                        "DESTPORT" => caps.xclient.destport = true,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    caps
}

/// Postfix's address form: IPv6 addresses carry an `IPV6:` prefix.
fn xclient_addr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("IPV6:{v6}"),
        },
    }
}

/// xtext (RFC 3461 §4): `+`, `=` and bytes outside `!`..=`~` as `+HH`.
fn xtext(value: &[u8], out: &mut String) {
    for &b in value {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
}

/// One XCLIENT command with every attribute the downstream accepts. Values Postfix would
/// refuse (a NAME that is no hostname, a HELO over 255 bytes or not one printable word) go as
/// `[UNAVAILABLE]`, and so does a HELO that would take the line past [`MAX_XCLIENT_LINE`]: a
/// refused XCLIENT would cost the client its delivery, a cut HELO would be a false one.
fn xclient_command(attrs: XclientAttrs, who: &ClientIdentity<'_>) -> Vec<u8> {
    let mut line = String::from("XCLIENT");
    if attrs.addr {
        let _ = write!(line, " ADDR={}", xclient_addr(who.client.ip()));
    }
    if attrs.port {
        let _ = write!(line, " PORT={}", who.client.port());
    }
    if attrs.name {
        let name = match who.name {
            "[UNAVAILABLE]" | "[TEMPUNAVAIL]" => who.name,
            name if valid_hostname(name) => name,
            _ => UNAVAILABLE,
        };
        line.push_str(" NAME=");
        xtext(name.as_bytes(), &mut line);
    }
    if attrs.proto {
        line.push_str(if who.esmtp {
            " PROTO=ESMTP"
        } else {
            " PROTO=SMTP"
        });
    }
    if attrs.destaddr {
        let _ = write!(line, " DESTADDR={}", xclient_addr(who.local.ip()));
    }
    if attrs.destport {
        let _ = write!(line, " DESTPORT={}", who.local.port());
    }
    if attrs.helo {
        let mut helo = String::new();
        xtext(
            helo_name(who.helo).unwrap_or(UNAVAILABLE).as_bytes(),
            &mut helo,
        );
        if line.len() + " HELO=".len() + helo.len() + 2 > MAX_XCLIENT_LINE {
            helo = UNAVAILABLE.to_owned();
        }
        line.push_str(" HELO=");
        line.push_str(&helo);
    }
    line.push_str("\r\n");
    line.into_bytes()
}

/// Both ends in one family, as the PROXY protocol requires: a mixed pair (an IPv4 client on a
/// dual-stack listener) is sent as IPv6 with v4-mapped addresses.
fn proxy_pair(who: &ClientIdentity<'_>) -> (SocketAddr, SocketAddr) {
    match (who.client, who.local) {
        (src @ SocketAddr::V4(_), dst @ SocketAddr::V4(_)) => (src, dst),
        (src, dst) => {
            let six = |a: SocketAddr| match a {
                SocketAddr::V4(v4) => {
                    SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
                }
                v6 @ SocketAddr::V6(_) => v6,
            };
            (six(src), six(dst))
        }
    }
}

/// PROXY protocol v1: `PROXY TCP4 src dst sport dport\r\n`.
fn proxy_v1(who: &ClientIdentity<'_>) -> String {
    let (src, dst) = proxy_pair(who);
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
}

/// PROXY protocol v2 binary header, command PROXY over TCP.
fn proxy_v2(who: &ClientIdentity<'_>) -> Vec<u8> {
    let addresses = ppp::v2::Addresses::from(proxy_pair(who));
    let version_command = ppp::v2::Version::Two as u8 | ppp::v2::Command::Proxy as u8;
    // Building into a Vec does no I/O and the payload is a fixed-size address block, so it
    // cannot fail; were it to, an empty header makes the downstream drop us, which the
    // session turns into a 451 for the client.
    ppp::v2::Builder::with_addresses(version_command, ppp::v2::Protocol::Stream, addresses)
        .build()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> ClientIdentity<'static> {
        ClientIdentity {
            client: "192.0.2.7:53211".parse().unwrap(),
            local: "198.51.100.1:25".parse().unwrap(),
            helo: b"mail.example.com",
            esmtp: true,
            name: "[UNAVAILABLE]",
        }
    }

    fn reply(code: u16, lines: &[&str]) -> Reply {
        Reply::multiline(code, None, lines.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn xclient_flow_sends_xclient_then_ehlo_again() {
        let mut hs = Handshake::new("mx.test", AnnounceClient::Xclient);
        let mut out = Vec::new();
        hs.handle_connected(&who(), &mut out);
        assert!(out.is_empty());
        assert_eq!(
            hs.handle_reply(reply(220, &["sink"]), &who(), &mut out),
            Step::Continue
        );
        assert_eq!(out, b"EHLO mx.test\r\n");
        out.clear();
        let ehlo = reply(
            250,
            &["sink", "PIPELINING", "XCLIENT ADDR NAME PORT HELO PROTO"],
        );
        assert_eq!(
            hs.handle_reply(ehlo.clone(), &who(), &mut out),
            Step::Continue
        );
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "XCLIENT ADDR=192.0.2.7 PORT=53211 NAME=[UNAVAILABLE] PROTO=ESMTP HELO=mail.example.com\r\n"
        );
        out.clear();
        assert_eq!(
            hs.handle_reply(reply(220, &["sink"]), &who(), &mut out),
            Step::Continue
        );
        // The client's own name, so the downstream's HELO checks and Received: see it.
        assert_eq!(out, b"EHLO mail.example.com\r\n");
        out.clear();
        // Postfix no longer offers XCLIENT after one.
        let after = reply(250, &["sink", "PIPELINING", "8BITMIME"]);
        assert_eq!(hs.handle_reply(after, &who(), &mut out), Step::Ready);
        assert!(out.is_empty());
        assert!(hs.capabilities().eight_bit_mime);
        assert!(!hs.capabilities().xclient.any());
        assert!(hs.may_quit());
    }

    #[test]
    fn a_client_that_said_helo_is_greeted_with_helo_after_xclient() {
        let helo_client = ClientIdentity {
            esmtp: false,
            ..who()
        };
        let mut hs = after_banner(DownstreamTls::None, AnnounceClient::Xclient);
        let mut out = Vec::new();
        hs.handle_reply(reply(250, XCLIENT_ALL), &helo_client, &mut out);
        assert!(String::from_utf8_lossy(&out).contains(" PROTO=SMTP"));
        out.clear();
        hs.handle_reply(reply(220, &["sink"]), &helo_client, &mut out);
        assert_eq!(out, b"HELO mail.example.com\r\n");
        out.clear();
        let step = hs.handle_reply(reply(250, &["sink"]), &helo_client, &mut out);
        assert_eq!(step, Step::Ready);
        let caps = hs.capabilities();
        assert!(
            !caps.eight_bit_mime && !caps.size,
            "HELO offers no extensions"
        );
        assert!(
            caps.xclient.addr,
            "XCLIENT as the EHLO before offered it, to be tried"
        );
    }

    #[test]
    fn a_helo_name_the_downstream_would_refuse_goes_as_unavailable() {
        for helo in [&b"two words"[..], &[b'a'; 256], b"caf\xc3\xa9"] {
            let odd = ClientIdentity { helo, ..who() };
            let mut hs = after_banner(DownstreamTls::None, AnnounceClient::Xclient);
            let mut out = Vec::new();
            hs.handle_reply(reply(250, XCLIENT_ALL), &odd, &mut out);
            assert!(
                String::from_utf8_lossy(&out).ends_with(" HELO=[UNAVAILABLE]\r\n"),
                "{}",
                String::from_utf8_lossy(&out)
            );
            out.clear();
            hs.handle_reply(reply(220, &["sink"]), &odd, &mut out);
            assert_eq!(out, b"EHLO [UNAVAILABLE]\r\n");
        }
    }

    #[test]
    fn a_name_that_is_no_hostname_goes_as_unavailable() {
        let attrs = XclientAttrs {
            name: true,
            ..XclientAttrs::default()
        };
        for (name, sent) in [
            ("mail.example.com", "mail.example.com"),
            ("[TEMPUNAVAIL]", "[TEMPUNAVAIL]"),
            ("bad name", "[UNAVAILABLE]"),
            ("-lead.example", "[UNAVAILABLE]"),
            ("192.0.2.7", "[UNAVAILABLE]"),
        ] {
            let who = ClientIdentity { name, ..who() };
            let line = String::from_utf8(xclient_command(attrs, &who)).unwrap();
            assert_eq!(line, format!("XCLIENT NAME={sent}\r\n"), "{name}");
        }
    }

    #[test]
    fn xclient_not_offered_refuses_instead_of_relaying_anonymously() {
        let mut hs = Handshake::new("mx.test", AnnounceClient::Xclient);
        let mut out = Vec::new();
        hs.handle_reply(reply(220, &["sink"]), &who(), &mut out);
        out.clear();
        let step = hs.handle_reply(reply(250, &["sink", "8BITMIME"]), &who(), &mut out);
        assert_eq!(step, Step::AnnouncementRefused(None));
        assert!(out.is_empty(), "nothing sent under tarmac's own address");
        assert!(hs.may_quit(), "it greeted us: QUIT before hanging up");
    }

    #[test]
    fn xclient_refused_on_a_new_connection_is_an_announcement_refusal() {
        let mut hs = after_banner(DownstreamTls::None, AnnounceClient::Xclient);
        feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
        let refusal = reply(550, &["5.7.0 Error: insufficient authorization"]);
        let step = hs.handle_reply(refusal.clone(), &who(), &mut Vec::new());
        assert_eq!(step, Step::AnnouncementRefused(Some(refusal)));
    }

    #[test]
    fn the_downstream_refusing_the_clients_helo_is_the_clients_answer() {
        let mut hs = after_banner(DownstreamTls::None, AnnounceClient::Xclient);
        feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
        feed(&mut hs, 220, &["sink"]);
        let refusal = reply(550, &["5.7.1 <bad>: Helo command rejected"]);
        let step = hs.handle_reply(refusal.clone(), &who(), &mut Vec::new());
        assert_eq!(step, Step::Refused(refusal));
    }

    /// A handshake through XCLIENT for `who()`, as Postfix answers it (no XCLIENT after).
    fn ready_for_who(renewable: bool) -> Handshake {
        let mut hs = after_banner(DownstreamTls::None, AnnounceClient::Xclient);
        feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
        feed(&mut hs, 220, &["sink"]);
        let after: &[&str] = if renewable {
            &["sink", "XCLIENT ADDR NAME PORT HELO PROTO"]
        } else {
            &["sink", "8BITMIME"]
        };
        assert_eq!(feed(&mut hs, 250, after).0, Step::Ready);
        hs
    }

    #[test]
    fn renewing_for_the_same_client_sends_nothing() {
        let mut hs = ready_for_who(false);
        let mut out = Vec::new();
        assert_eq!(hs.renew(&who(), &mut out), Step::Ready);
        assert!(out.is_empty());
    }

    #[test]
    fn renewing_for_another_client_announces_it_or_retires_the_connection() {
        let stranger = ClientIdentity {
            client: "198.51.100.9:4000".parse().unwrap(),
            helo: b"stranger.example",
            ..who()
        };
        // Postfix out of the box: no XCLIENT after XCLIENT, so the connection cannot serve
        // the stranger; nothing is sent on it for the stranger.
        let mut hs = ready_for_who(false);
        let mut out = Vec::new();
        assert_eq!(hs.renew(&stranger, &mut out), Step::Retire);
        assert!(out.is_empty());
        assert!(hs.may_quit());
        // A downstream that offers XCLIENT again gets a fresh one, and the stranger's EHLO.
        let mut hs = ready_for_who(true);
        assert_eq!(hs.renew(&stranger, &mut out), Step::Continue);
        assert!(
            String::from_utf8_lossy(&out).starts_with("XCLIENT ADDR=198.51.100.9 PORT=4000 "),
            "{}",
            String::from_utf8_lossy(&out)
        );
        out.clear();
        let step = hs.handle_reply(reply(220, &["sink"]), &stranger, &mut out);
        assert_eq!(
            (step, out.as_slice()),
            (Step::Continue, &b"EHLO stranger.example\r\n"[..])
        );
        let step = hs.handle_reply(reply(250, &["sink"]), &stranger, &mut Vec::new());
        assert_eq!(step, Step::Ready);
        // One that offers it but refuses it (a 550) is retired too, not failed.
        let mut hs = ready_for_who(true);
        hs.renew(&stranger, &mut out);
        let step = hs.handle_reply(reply(550, &["5.7.0 no"]), &stranger, &mut Vec::new());
        assert_eq!(step, Step::Retire);
    }

    #[test]
    fn a_pooled_connection_left_mid_transaction_is_reset_first() {
        let hs = ready_for_who(true);
        let carried = hs.carried(true);
        assert!(carried.dirty);
        let mut out = Vec::new();
        let (mut hs, step) = Handshake::resume(
            "mx.test",
            AnnounceClient::Xclient,
            carried,
            &who(),
            &mut out,
        );
        assert_eq!((step, out.as_slice()), (Step::Continue, &b"RSET\r\n"[..]));
        out.clear();
        // Same client: after the reset, nothing more.
        assert_eq!(
            hs.handle_reply(reply(250, &["2.0.0 Ok"]), &who(), &mut out),
            Step::Ready
        );
        // A refused RSET leaves the state unknown: retired.
        let carried = ready_for_who(true).carried(true);
        let (mut hs, _) = Handshake::resume(
            "mx.test",
            AnnounceClient::Xclient,
            carried,
            &who(),
            &mut out,
        );
        let step = hs.handle_reply(reply(503, &["5.5.1 no"]), &who(), &mut out);
        assert_eq!(step, Step::Retire);
    }

    #[test]
    fn a_proxy_header_names_one_client_per_connection() {
        let mut hs = Handshake::new("mx.test", AnnounceClient::ProxyV1);
        let mut out = Vec::new();
        hs.handle_connected(&who(), &mut out);
        hs.handle_reply(reply(220, &["sink"]), &who(), &mut out);
        assert_eq!(feed(&mut hs, 250, &["sink"]).0, Step::Ready);
        out.clear();
        assert_eq!(hs.renew(&who(), &mut out), Step::Ready);
        let stranger = ClientIdentity {
            client: "198.51.100.9:4000".parse().unwrap(),
            ..who()
        };
        assert_eq!(hs.renew(&stranger, &mut out), Step::Retire);
        assert!(out.is_empty());
    }

    #[test]
    fn ehlo_refused_falls_back_to_helo() {
        let mut hs = Handshake::new("mx.test", AnnounceClient::None);
        let mut out = Vec::new();
        hs.handle_reply(reply(220, &["old"]), &who(), &mut out);
        out.clear();
        assert_eq!(
            hs.handle_reply(reply(502, &["no"]), &who(), &mut out),
            Step::Continue
        );
        assert_eq!(out, b"HELO mx.test\r\n");
        assert_eq!(
            hs.handle_reply(reply(250, &["old"]), &who(), &mut out),
            Step::Ready
        );
    }

    #[test]
    fn banner_rejection_fails() {
        let mut hs = Handshake::new("mx.test", AnnounceClient::None);
        let mut out = Vec::new();
        let r = reply(554, &["go away"]);
        assert_eq!(
            hs.handle_reply(r.clone(), &who(), &mut out),
            Step::Failed(r)
        );
    }

    /// A handshake with STARTTLS `policy`, past the banner, its first EHLO sent.
    fn after_banner(policy: DownstreamTls, announce: AnnounceClient) -> Handshake {
        let mut hs = Handshake::new("mx.test", announce).with_tls(policy);
        let mut out = Vec::new();
        assert_eq!(
            hs.handle_reply(reply(220, &["sink"]), &who(), &mut out),
            Step::Continue
        );
        assert_eq!(out, b"EHLO mx.test\r\n");
        hs
    }

    /// Feeds one reply and returns the step and what the handshake sent in answer.
    fn feed(hs: &mut Handshake, code: u16, lines: &[&str]) -> (Step, String) {
        let mut out = Vec::new();
        let step = hs.handle_reply(reply(code, lines), &who(), &mut out);
        (step, String::from_utf8(out).unwrap())
    }

    const EHLO_STARTTLS_XCLIENT: &[&str] = &["sink", "PIPELINING", "STARTTLS", "XCLIENT ADDR"];
    const XCLIENT_ALL: &[&str] = &["sink", "XCLIENT ADDR NAME PORT HELO PROTO"];

    #[test]
    fn capabilities_list_starttls() {
        let caps = parse_capabilities(&reply(250, &["sink", "starttls", "SIZE 10"]));
        assert!(caps.starttls && caps.size);
        assert!(!parse_capabilities(&reply(250, &["sink STARTTLS"])).starttls);
    }

    #[test]
    fn tls_none_never_sends_starttls() {
        let mut hs = after_banner(DownstreamTls::None, AnnounceClient::Xclient);
        let (step, out) = feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
        assert_eq!(step, Step::Continue);
        assert!(out.starts_with("XCLIENT ADDR=192.0.2.7"), "{out}");
        // `new` alone is plain text too: the session relies on it until the driver is wired.
        let mut plain = Handshake::new("mx.test", AnnounceClient::None);
        plain.handle_reply(reply(220, &["sink"]), &who(), &mut Vec::new());
        assert_eq!(feed(&mut plain, 250, EHLO_STARTTLS_XCLIENT).0, Step::Ready);
    }

    #[test]
    fn opportunistic_starttls_then_ehlo_again_and_only_tls_capabilities_count() {
        let mut hs = after_banner(DownstreamTls::Opportunistic, AnnounceClient::Xclient);
        assert_eq!(
            feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT),
            (Step::Continue, "STARTTLS\r\n".to_owned())
        );
        assert_eq!(
            feed(&mut hs, 220, &["2.0.0 Ready to start TLS"]),
            (Step::StartTls, String::new())
        );
        let mut out = Vec::new();
        assert_eq!(hs.handle_tls_established(&mut out), Step::Continue);
        assert_eq!(out, b"EHLO mx.test\r\n");
        // Inside TLS the server offers neither XCLIENT nor STARTTLS: what it said in plain
        // text is forgotten, so no XCLIENT goes out (the client's MAIL is refused rather than
        // relayed anonymously) and no second STARTTLS.
        assert_eq!(
            feed(&mut hs, 250, &["sink", "PIPELINING", "8BITMIME"]),
            (Step::AnnouncementRefused(None), String::new())
        );
        let caps = hs.capabilities();
        assert!(caps.eight_bit_mime);
        assert!(!caps.xclient.any() && !caps.starttls);
    }

    #[test]
    fn starttls_comes_before_xclient_and_xclient_goes_inside_tls() {
        let mut hs = after_banner(DownstreamTls::Opportunistic, AnnounceClient::Xclient);
        assert_eq!(feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT).1, "STARTTLS\r\n");
        assert_eq!(feed(&mut hs, 220, &["go ahead"]).0, Step::StartTls);
        hs.handle_tls_established(&mut Vec::new());
        // A server that (wrongly) lists STARTTLS again inside TLS is not asked twice.
        let (step, out) = feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
        assert_eq!(step, Step::Continue);
        assert_eq!(out, "XCLIENT ADDR=192.0.2.7\r\n");
        assert_eq!(
            feed(&mut hs, 220, &["sink"]),
            (Step::Continue, "EHLO mail.example.com\r\n".to_owned())
        );
        assert_eq!(feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT).0, Step::Ready);
    }

    #[test]
    fn opportunistic_without_starttls_offered_goes_on_in_plain_text() {
        let mut hs = after_banner(DownstreamTls::Opportunistic, AnnounceClient::Xclient);
        let (step, out) = feed(&mut hs, 250, &["sink", "XCLIENT ADDR"]);
        assert_eq!(step, Step::Continue);
        assert_eq!(out, "XCLIENT ADDR=192.0.2.7\r\n");
    }

    #[test]
    fn opportunistic_refused_starttls_goes_on_in_plain_text_with_the_ehlo_it_had() {
        for code in [454, 502, 554] {
            let mut hs = after_banner(DownstreamTls::Opportunistic, AnnounceClient::Xclient);
            feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
            let (step, out) = feed(&mut hs, code, &["4.7.0 TLS not available"]);
            assert_eq!(step, Step::Continue, "{code}");
            assert_eq!(out, "XCLIENT ADDR=192.0.2.7\r\n", "{code}");
            assert!(hs.capabilities().starttls);
            // Not asked again after XCLIENT's EHLO.
            feed(&mut hs, 220, &["sink"]);
            assert_eq!(feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT).0, Step::Ready);
        }
        let mut hs = after_banner(DownstreamTls::Opportunistic, AnnounceClient::None);
        feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
        assert_eq!(
            feed(&mut hs, 454, &["4.7.0 no"]),
            (Step::Ready, String::new())
        );
    }

    #[test]
    fn opportunistic_handshake_failure_retries_without_tls() {
        let mut hs = after_banner(DownstreamTls::Opportunistic, AnnounceClient::None);
        feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
        assert_eq!(feed(&mut hs, 220, &["go ahead"]).0, Step::StartTls);
        assert_eq!(hs.handle_tls_failed(), Step::RetryWithoutTls);
        // The retry's handshake is plain text even though STARTTLS is offered.
        let mut retry =
            Handshake::new("mx.test", AnnounceClient::None).with_tls(DownstreamTls::None);
        retry.handle_reply(reply(220, &["sink"]), &who(), &mut Vec::new());
        assert_eq!(feed(&mut retry, 250, EHLO_STARTTLS_XCLIENT).0, Step::Ready);
    }

    #[test]
    fn required_fails_when_starttls_is_not_offered() {
        let mut hs = after_banner(DownstreamTls::Required, AnnounceClient::Xclient);
        let (step, out) = feed(&mut hs, 250, &["sink", "XCLIENT ADDR"]);
        assert_eq!(step, Step::TlsFailed(TlsFailure::NotOffered));
        assert!(out.is_empty(), "nothing more is sent in plain text: {out}");
        let client = TlsFailure::NotOffered.client_reply();
        assert_eq!(
            (client.code, client.enhanced.map(|e| e.to_string())),
            (451, Some("4.7.4".to_owned()))
        );
    }

    #[test]
    fn required_fails_when_ehlo_is_refused_instead_of_trying_helo() {
        let mut hs = after_banner(DownstreamTls::Required, AnnounceClient::None);
        let (step, out) = feed(&mut hs, 502, &["5.5.2 no EHLO"]);
        assert_eq!(step, Step::TlsFailed(TlsFailure::NotOffered));
        assert!(out.is_empty(), "{out}");
    }

    #[test]
    fn required_fails_when_starttls_is_refused() {
        let mut hs = after_banner(DownstreamTls::Required, AnnounceClient::Xclient);
        feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
        let refusal = reply(454, &["4.7.0 TLS not available due to local problem"]);
        let mut out = Vec::new();
        assert_eq!(
            hs.handle_reply(refusal.clone(), &who(), &mut out),
            Step::TlsFailed(TlsFailure::Refused(refusal.clone()))
        );
        assert!(out.is_empty());
        assert_eq!(
            TlsFailure::Refused(refusal).to_string(),
            "TLS required but STARTTLS refused: 454 4.7.0 TLS not available due to local problem"
        );
    }

    #[test]
    fn required_fails_when_the_tls_handshake_fails() {
        let mut hs = after_banner(DownstreamTls::Required, AnnounceClient::None);
        feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
        assert_eq!(feed(&mut hs, 220, &["go ahead"]).0, Step::StartTls);
        assert_eq!(
            hs.handle_tls_failed(),
            Step::TlsFailed(TlsFailure::Handshake)
        );
        let client = TlsFailure::Handshake.client_reply();
        assert_eq!(client.code, 451);
        assert_eq!(
            client.enhanced.map(|e| e.to_string()),
            Some("4.7.5".to_owned())
        );
    }

    #[test]
    fn required_succeeds_inside_tls_even_with_helo_fallback() {
        let mut hs = after_banner(DownstreamTls::Required, AnnounceClient::None);
        feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
        feed(&mut hs, 220, &["go ahead"]);
        hs.handle_tls_established(&mut Vec::new());
        assert_eq!(
            feed(&mut hs, 500, &["5.5.1 what?"]),
            (Step::Continue, "HELO mx.test\r\n".to_owned())
        );
        assert_eq!(feed(&mut hs, 250, &["sink"]).0, Step::Ready);
    }

    #[test]
    fn a_reply_before_the_tls_handshake_is_never_accepted() {
        // The injected plain-text reply a man in the middle appends after the 220: were the
        // driver to pass it on, the handshake fails instead of taking it as EHLO's reply.
        let mut hs = after_banner(DownstreamTls::Opportunistic, AnnounceClient::None);
        feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
        assert_eq!(feed(&mut hs, 220, &["go ahead"]).0, Step::StartTls);
        let (step, out) = feed(&mut hs, 250, &["sink", "XCLIENT ADDR"]);
        assert!(
            matches!(step, Step::Failed(ref r) if r.code == 250),
            "{step:?}"
        );
        assert!(out.is_empty());
        assert!(matches!(
            hs.handle_tls_established(&mut Vec::new()),
            Step::Failed(_)
        ));
    }

    #[test]
    fn a_421_to_starttls_fails_even_when_opportunistic() {
        let mut hs = after_banner(DownstreamTls::Opportunistic, AnnounceClient::Xclient);
        feed(&mut hs, 250, EHLO_STARTTLS_XCLIENT);
        let (step, out) = feed(&mut hs, 421, &["4.3.2 shutting down"]);
        assert!(
            matches!(step, Step::Failed(ref r) if r.code == 421),
            "{step:?}"
        );
        assert!(out.is_empty());
    }

    #[test]
    fn tls_reports_out_of_order_fail_the_handshake() {
        let mut hs = after_banner(DownstreamTls::Opportunistic, AnnounceClient::None);
        let mut out = Vec::new();
        assert!(
            matches!(hs.handle_tls_established(&mut out), Step::Failed(ref r) if r.code == 451)
        );
        assert!(out.is_empty());
        let mut hs = after_banner(DownstreamTls::Required, AnnounceClient::None);
        assert!(matches!(hs.handle_tls_failed(), Step::Failed(_)));
    }

    #[test]
    fn xclient_ipv6_and_xtext() {
        let who = ClientIdentity {
            client: "[2001:db8::7]:4000".parse().unwrap(),
            local: "[2001:db8::1]:25".parse().unwrap(),
            helo: b"a+b=c",
            esmtp: false,
            name: "host-7.example.net",
        };
        let attrs = XclientAttrs {
            addr: true,
            helo: true,
            proto: true,
            ..XclientAttrs::default()
        };
        assert_eq!(
            String::from_utf8(xclient_command(attrs, &who)).unwrap(),
            "XCLIENT ADDR=IPV6:2001:db8::7 PROTO=SMTP HELO=a+2Bb+3Dc\r\n"
        );
    }

    #[test]
    fn xclient_line_is_capped_at_512_bytes() {
        // Within Postfix's 255 bytes, but three times that as xtext.
        let helo = vec![b'='; 255];
        let who = ClientIdentity {
            helo: &helo,
            ..who()
        };
        let attrs = XclientAttrs {
            addr: true,
            helo: true,
            ..XclientAttrs::default()
        };
        let line = xclient_command(attrs, &who);
        assert!(line.len() <= MAX_XCLIENT_LINE, "{}", line.len());
        assert!(
            line.ends_with(b" HELO=[UNAVAILABLE]\r\n"),
            "never a cut name"
        );
    }

    #[test]
    fn proxy_headers() {
        assert_eq!(
            proxy_v1(&who()),
            "PROXY TCP4 192.0.2.7 198.51.100.1 53211 25\r\n"
        );
        let v2 = proxy_v2(&who());
        assert_eq!(&v2[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(v2[12], 0x21);
        assert_eq!(v2[13], 0x11);
        assert_eq!(u16::from_be_bytes([v2[14], v2[15]]), 12);
        assert_eq!(&v2[16..20], &[192, 0, 2, 7]);
        assert_eq!(&v2[24..26], &53211u16.to_be_bytes());
        let six = ClientIdentity {
            client: "[2001:db8::7]:4000".parse().unwrap(),
            local: "[2001:db8::1]:25".parse().unwrap(),
            ..who()
        };
        assert_eq!(
            proxy_v1(&six),
            "PROXY TCP6 2001:db8::7 2001:db8::1 4000 25\r\n"
        );
        assert_eq!(proxy_v2(&six)[13], 0x21);
    }
}
