//! The downstream handshake as a small sans-IO machine inside the session: PROXY header,
//! banner, EHLO (HELO fallback), XCLIENT and the EHLO after it. Relayed transaction commands
//! (MAIL, RCPT, DATA, the body) are the session's business; this machine only gets the
//! connection to the point where they can be sent, and remembers what the downstream offered.
//!
//! Lifecycle (each arrow is one downstream reply):
//! ```text
//! Banner ─220─▶ Ehlo ─250─▶ (XCLIENT offered and wanted) Xclient ─220─▶ Ehlo ─250─▶ Ready
//!                  └─5xx─▶ Helo ─250─▶ Ready
//! anything unexpected ─▶ Failed
//! ```

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::config::AnnounceClient;
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
    /// EHLO sent; `after_xclient` marks the second one.
    Ehlo { after_xclient: bool },
    /// EHLO was refused; HELO sent.
    Helo,
    /// XCLIENT sent, waiting for its 220.
    Xclient,
    /// Handshake done: transaction commands may be sent.
    Ready,
    /// The downstream refused or broke the handshake.
    Failed,
}

/// Result of feeding one downstream reply to the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// More replies are needed; the next command (if any) is already in `out`.
    Continue,
    /// The downstream is ready for MAIL.
    Ready,
    /// The handshake failed with this downstream reply.
    Failed(Reply),
}

/// The handshake state of one downstream connection.
#[derive(Clone, Debug)]
pub struct Handshake {
    phase: Phase,
    hostname: String,
    announce: AnnounceClient,
    caps: Capabilities,
}

impl Handshake {
    /// A handshake about to start on a fresh connection.
    pub fn new(hostname: &str, announce: AnnounceClient) -> Self {
        Handshake {
            phase: Phase::Banner,
            hostname: hostname.to_owned(),
            announce,
            caps: Capabilities::default(),
        }
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
            Phase::Banner if ok(220) => {
                self.send_ehlo(false, out);
                Step::Continue
            }
            Phase::Ehlo { after_xclient } if ok(250) => {
                self.caps = parse_capabilities(&reply);
                if !after_xclient
                    && self.announce == AnnounceClient::Xclient
                    && self.caps.xclient.any()
                {
                    out.extend_from_slice(&xclient_command(self.caps.xclient, who));
                    self.phase = Phase::Xclient;
                    return Step::Continue;
                }
                if !after_xclient && self.announce == AnnounceClient::Xclient {
                    log::debug!("downstream does not offer XCLIENT; client address not announced");
                }
                self.phase = Phase::Ready;
                Step::Ready
            }
            Phase::Ehlo {
                after_xclient: false,
            } if reply.code >= 500 => {
                // RFC 5321 §3.2: a server that rejects EHLO may still speak HELO.
                out.extend_from_slice(format!("HELO {}\r\n", self.hostname).as_bytes());
                self.phase = Phase::Helo;
                Step::Continue
            }
            Phase::Helo if ok(250) => {
                self.phase = Phase::Ready;
                Step::Ready
            }
            // Postfix's smtpd answers XCLIENT with a new 220 greeting, its smtp-sink with 250;
            // either way the session was reset and wants EHLO again.
            Phase::Xclient if reply.code / 100 == 2 => {
                self.send_ehlo(true, out);
                Step::Continue
            }
            _ => {
                self.phase = Phase::Failed;
                Step::Failed(reply)
            }
        }
    }

    /// What the downstream offered (valid once `Ready`).
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn send_ehlo(&mut self, after_xclient: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(format!("EHLO {}\r\n", self.hostname).as_bytes());
        self.phase = Phase::Ehlo { after_xclient };
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
