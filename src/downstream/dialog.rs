//! The downstream handshake as a small sans-IO machine inside the session: PROXY header,
//! banner, EHLO (HELO fallback), STARTTLS, XCLIENT and the EHLO after it. Relayed transaction
//! commands (MAIL, RCPT, DATA, the body) are the session's business; this machine only gets the
//! connection to the point where they can be sent, and remembers what the downstream offered.
//! It never touches the socket: when TLS has to start it says so ([`Step::StartTls`]) and waits
//! for the driver to report the outcome.
//!
//! Lifecycle (each arrow is one downstream reply, or a driver report in `[brackets]`):
//! ```text
//! Banner ─220─▶ Ehlo ─250─▶ (STARTTLS offered and wanted) StartTls ─220─▶ TlsHandshake
//!                  │            [tls established] ─▶ Ehlo (inside TLS, capabilities read anew)
//!                  │            [tls failed] ─▶ RetryWithoutTls (opportunistic) | TlsFailed (required)
//!                  │         StartTls ─4xx/5xx─▶ as if not offered (opportunistic) | TlsFailed (required)
//!                  ├─250─▶ (XCLIENT offered and wanted) Xclient ─220─▶ Ehlo ─250─▶ Ready
//!                  ├─250─▶ Ready
//!                  └─5xx─▶ Helo ─250─▶ Ready        (required: TlsFailed, HELO has no STARTTLS)
//! anything unexpected, and any 421 ─▶ Failed
//! ```
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
    fn any(&self) -> bool {
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

/// Where the handshake stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the 220 greeting.
    Banner,
    /// EHLO sent; `after_xclient` marks the one after XCLIENT.
    Ehlo { after_xclient: bool },
    /// EHLO was refused; HELO sent.
    Helo,
    /// STARTTLS sent, waiting for its 220.
    StartTls,
    /// The downstream said 220 to STARTTLS; the driver is switching the connection to TLS and
    /// no reply may arrive until it reports the outcome.
    TlsHandshake,
    /// XCLIENT sent, waiting for its 220.
    Xclient,
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
        }
    }

    /// The same handshake with STARTTLS per `policy` (`[downstream] tls`; `None` for the plain
    /// retry after [`Step::RetryWithoutTls`]).
    pub fn with_tls(mut self, policy: DownstreamTls) -> Self {
        self.tls = policy;
        self
    }

    /// A pooled connection's handshake for a new transaction (`mode = "multiplexing"`): the
    /// connection is past its banner and EHLO; only the client changes. Returns `Ready` at once
    /// or sends XCLIENT (with the EHLO it requires after it) for this transaction's client.
    pub fn resume(
        hostname: &str,
        announce: AnnounceClient,
        caps: Capabilities,
        who: &ClientIdentity<'_>,
        out: &mut Vec<u8>,
    ) -> (Self, Step) {
        let mut handshake = Handshake {
            phase: Phase::Ready,
            hostname: hostname.to_owned(),
            announce,
            // The pooled connection's TLS state was settled by its first handshake; nothing
            // here sends STARTTLS again.
            tls: DownstreamTls::None,
            encryption: Encryption::Plain,
            caps,
        };
        if announce == AnnounceClient::Xclient && caps.xclient.any() {
            out.extend_from_slice(&xclient_command(caps.xclient, who));
            handshake.phase = Phase::Xclient;
            return (handshake, Step::Continue);
        }
        (handshake, Step::Ready)
    }

    /// The connection is up: with PROXY announcement, the header goes first (before the
    /// banner is even read, as the protocol requires).
    pub fn handle_connected(&mut self, who: &ClientIdentity<'_>, out: &mut Vec<u8>) {
        match self.announce {
            AnnounceClient::ProxyV1 => out.extend_from_slice(proxy_v1(who).as_bytes()),
            AnnounceClient::ProxyV2 => out.extend_from_slice(&proxy_v2(who)),
            AnnounceClient::Xclient | AnnounceClient::None => {}
        }
    }

    /// Feeds one downstream reply; the next command, if any, is appended to `out`.
    pub fn handle_reply(
        &mut self,
        reply: Reply,
        who: &ClientIdentity<'_>,
        out: &mut Vec<u8>,
    ) -> Step {
        let ok = |code: u16| reply.code == code;
        match self.phase {
            // The downstream is closing whatever we asked: no fallback can help.
            _ if ok(421) => self.fail(reply),
            Phase::Banner if ok(220) => {
                self.send_ehlo(false, out);
                Step::Continue
            }
            Phase::Ehlo { after_xclient } if ok(250) => {
                // Replaced, not merged: after STARTTLS only what was said inside TLS counts
                // (RFC 3207 §4.2).
                self.caps = parse_capabilities(&reply);
                if after_xclient {
                    self.phase = Phase::Ready;
                    return Step::Ready;
                }
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
            Phase::Ehlo {
                after_xclient: false,
            } if reply.code >= 500 => {
                if self.tls == DownstreamTls::Required && self.encryption != Encryption::Active {
                    return self.fail_tls(TlsFailure::NotOffered);
                }
                // RFC 5321 §3.2: a server that rejects EHLO may still speak HELO.
                out.extend_from_slice(format!("HELO {}\r\n", self.hostname).as_bytes());
                self.phase = Phase::Helo;
                Step::Continue
            }
            Phase::Helo if ok(250) => {
                self.phase = Phase::Ready;
                Step::Ready
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
            // Postfix's smtpd answers XCLIENT with a new 220 greeting, its smtp-sink with 250;
            // either way the session was reset and wants EHLO again.
            Phase::Xclient if reply.code / 100 == 2 => {
                self.send_ehlo(true, out);
                Step::Continue
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
        self.send_ehlo(false, out);
        Step::Continue
    }

    /// The driver's TLS handshake after [`Step::StartTls`] failed: [`Step::RetryWithoutTls`]
    /// under `opportunistic`, [`Step::TlsFailed`] with [`TlsFailure::Handshake`] under
    /// `required`. Either way this connection is finished.
    pub fn handle_tls_failed(&mut self) -> Step {
        if self.phase != Phase::TlsHandshake {
            return self.fail_internal("TLS failure reported without STARTTLS");
        }
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

    fn send_ehlo(&mut self, after_xclient: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(format!("EHLO {}\r\n", self.hostname).as_bytes());
        self.phase = Phase::Ehlo { after_xclient };
    }

    /// After the (last plain-text or first encrypted) EHLO: XCLIENT when offered and wanted,
    /// else ready.
    fn announce_or_ready(&mut self, who: &ClientIdentity<'_>, out: &mut Vec<u8>) -> Step {
        if self.announce == AnnounceClient::Xclient && self.caps.xclient.any() {
            out.extend_from_slice(&xclient_command(self.caps.xclient, who));
            self.phase = Phase::Xclient;
            return Step::Continue;
        }
        if self.announce == AnnounceClient::Xclient {
            log::debug!("downstream does not offer XCLIENT; client address not announced");
        }
        self.phase = Phase::Ready;
        Step::Ready
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

/// Reads the EHLO keywords (every line after the first).
fn parse_capabilities(reply: &Reply) -> Capabilities {
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

/// One XCLIENT command with every attribute the downstream accepts. HELO goes last and is cut (on an xtext
/// boundary) so the line stays within [`MAX_XCLIENT_LINE`].
fn xclient_command(attrs: XclientAttrs, who: &ClientIdentity<'_>) -> Vec<u8> {
    let mut line = String::from("XCLIENT");
    if attrs.addr {
        let _ = write!(line, " ADDR={}", xclient_addr(who.client.ip()));
    }
    if attrs.port {
        let _ = write!(line, " PORT={}", who.client.port());
    }
    if attrs.name {
        line.push_str(" NAME=");
        xtext(who.name.as_bytes(), &mut line);
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
    if attrs.helo && !who.helo.is_empty() {
        let room = MAX_XCLIENT_LINE.saturating_sub(line.len() + " HELO=".len() + 2);
        let mut helo = String::new();
        for &b in who.helo {
            let before = helo.len();
            xtext(&[b], &mut helo);
            if helo.len() > room {
                helo.truncate(before);
                break;
            }
        }
        if !helo.is_empty() {
            line.push_str(" HELO=");
            line.push_str(&helo);
        }
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
        assert_eq!(out, b"EHLO mx.test\r\n");
        out.clear();
        assert_eq!(hs.handle_reply(ehlo, &who(), &mut out), Step::Ready);
        assert!(out.is_empty());
        assert!(hs.capabilities().xclient.addr);
    }

    #[test]
    fn no_xclient_offered_goes_ready_after_ehlo() {
        let mut hs = Handshake::new("mx.test", AnnounceClient::Xclient);
        let mut out = Vec::new();
        hs.handle_reply(reply(220, &["sink"]), &who(), &mut out);
        out.clear();
        let step = hs.handle_reply(reply(250, &["sink", "8BITMIME"]), &who(), &mut out);
        assert_eq!(step, Step::Ready);
        assert!(hs.capabilities().eight_bit_mime);
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
        // text is forgotten, so no XCLIENT goes out and no second STARTTLS.
        assert_eq!(
            feed(&mut hs, 250, &["sink", "PIPELINING", "8BITMIME"]),
            (Step::Ready, String::new())
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
            (Step::Continue, "EHLO mx.test\r\n".to_owned())
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
            helo: b"a+b=c d",
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
            "XCLIENT ADDR=IPV6:2001:db8::7 PROTO=SMTP HELO=a+2Bb+3Dc+20d\r\n"
        );
    }

    #[test]
    fn xclient_line_is_capped_at_512_bytes() {
        let helo = vec![b'='; 2000];
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
        assert!(line.ends_with(b"+3D\r\n"));
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
