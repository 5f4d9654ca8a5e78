//! `tarmac check --live` (issue 16 item 8): before going live, ask each downstream server
//! what an operator must know and DESIGN.md §6 depends on, and say it plainly:
//!
//! - its banner, and whether it answers at all;
//! - its STARTTLS offer, and how the handshake goes with `[downstream]`'s TLS settings (the
//!   certificate checked when `tls_verify` is on);
//! - whether it accepts XCLIENT from this host (without it, `announce_client = "xclient"` means
//!   every client's MAIL gets `451 4.3.5`);
//! - whether it accepts a *second* XCLIENT on one connection (without it, `mode =
//!   "multiplexing"` cannot reuse connections);
//! - whether it would take `RCPT TO:<probe@relay-test.invalid>` from this host without an
//!   announcement: if so, it trusts tarmac's address to relay, and a client that reached it
//!   directly, or through `announce_client = "none"`, could use it as an open relay.
//!
//! Each probe ends with RSET and QUIT; nothing is ever sent as mail (no DATA). The probes are
//! blocking, one server at a time, on the CLI's own thread, each read and write bounded by
//! `[timeouts] command` and each connect by `[timeouts] connect`: this is a command an operator
//! runs, not part of the server (which alone owns the event loop's sockets).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::config::{AnnounceClient, Config, DownstreamMode, DownstreamTls};
use crate::downstream::dialog::{Capabilities, parse_capabilities};
use crate::smtp::reply::{Reply, Status, parse_reply};

/// The address the probes announce with XCLIENT: a documentation address (RFC 5737), which no
/// real client has, so the downstream's logs show the probe for what it is.
const PROBE_CLIENT: &str = "192.0.2.1";
/// The second announcement's address.
const PROBE_CLIENT_2: &str = "192.0.2.2";
/// The recipient of the relay probe: a reserved domain (RFC 2606) that can never be local.
const PROBE_RECIPIENT: &str = "probe@relay-test.invalid";
/// The most bytes read for one reply.
const MAX_REPLY: usize = 64 * 1024;

/// What the probes of one server found.
#[derive(Debug, Default)]
pub struct Findings {
    /// Lines for the operator, in order.
    pub lines: Vec<String>,
    /// Problems that would make tarmac refuse (or fail) clients at run time.
    pub failures: Vec<String>,
    /// Risks the operator should fix, which tarmac does not refuse.
    pub warnings: Vec<String>,
}

/// Probes every `[downstream] servers` entry; one [`Findings`] per server, in order.
pub fn probe_all(config: &Config) -> Vec<(SocketAddr, Findings)> {
    config
        .downstream
        .servers
        .iter()
        .map(|&server| (server, probe(config, server)))
        .collect()
}

/// Probes one server (see the module documentation).
pub fn probe(config: &Config, server: SocketAddr) -> Findings {
    let mut findings = Findings::default();
    if let Err(e) = announced(config, server, &mut findings) {
        findings.failures.push(format!(
            "cannot probe it: {e}; clients' MAIL would get 451 4.4.2"
        ));
        return findings;
    }
    if let Err(e) = unannounced(config, server, &mut findings) {
        findings
            .warnings
            .push(format!("the relay probe did not complete: {e}"));
    }
    findings
}

/// The first connection: banner, EHLO, STARTTLS, XCLIENT twice.
fn announced(config: &Config, server: SocketAddr, findings: &mut Findings) -> io::Result<()> {
    let mut link = Link::connect(config, server)?;
    let banner = link.reply()?;
    findings.lines.push(format!("banner: {}", show(&banner)));
    if banner.code != 220 {
        findings
            .failures
            .push(format!("it does not greet with 220: {}", show(&banner)));
        return link.quit();
    }
    let hostname = &config.server.hostname;
    let mut caps = link.ehlo(hostname)?;
    let tls = config.downstream.tls;
    let offers_tls = caps.starttls;
    match (offers_tls, tls) {
        (_, DownstreamTls::None) => findings.lines.push(format!(
            "STARTTLS: {}; not used ([downstream] tls = \"none\")",
            if offers_tls { "offered" } else { "not offered" }
        )),
        (false, DownstreamTls::Required) => findings.failures.push(
            "STARTTLS is not offered, and [downstream] tls = \"required\": clients' MAIL would get 451 4.7.4"
                .to_owned(),
        ),
        (false, DownstreamTls::Opportunistic) => findings
            .lines
            .push("STARTTLS: not offered; mail goes in plain text".to_owned()),
        (true, _) => match link.start_tls(config, server)? {
            Ok(summary) => {
                findings.lines.push(format!("STARTTLS: {summary}"));
                caps = link.ehlo(hostname)?;
            }
            Err(why) if tls == DownstreamTls::Required => {
                findings.failures.push(format!(
                    "STARTTLS failed ({why}), and [downstream] tls = \"required\": clients' MAIL would get 451 4.7.5"
                ));
                return Ok(());
            }
            Err(why) => {
                findings.lines.push(format!(
                    "STARTTLS: failed ({why}); tarmac would retry in plain text"
                ));
                return Ok(());
            }
        },
    }
    let xclient = config.downstream.announce_client == AnnounceClient::Xclient;
    if !caps.xclient.any() {
        findings.lines.push("XCLIENT: not offered".to_owned());
        if xclient {
            findings.failures.push(
                "XCLIENT is not offered to this host, and announce_client = \"xclient\": clients' MAIL would get 451 4.3.5 (Postfix: smtpd_authorized_xclient_hosts)"
                    .to_owned(),
            );
        }
        return link.quit();
    }
    let first = link.command(&format!(
        "XCLIENT ADDR={PROBE_CLIENT} NAME=[UNAVAILABLE] PROTO=ESMTP HELO=probe.invalid"
    ))?;
    if first.code != 220 {
        findings
            .lines
            .push(format!("XCLIENT: refused: {}", show(&first)));
        if xclient {
            findings.failures.push(format!(
                "XCLIENT from this host is refused ({}), and announce_client = \"xclient\": clients' MAIL would get 451 4.3.5 (Postfix: add this host to smtpd_authorized_xclient_hosts)",
                show(&first)
            ));
        }
        return link.quit();
    }
    findings
        .lines
        .push("XCLIENT: accepted from this host".to_owned());
    link.ehlo("probe.invalid")?;
    let second = link.command(&format!(
        "XCLIENT ADDR={PROBE_CLIENT_2} NAME=[UNAVAILABLE] PROTO=ESMTP HELO=probe.invalid"
    ))?;
    if second.code == 220 {
        findings.lines.push(
            "second XCLIENT on one connection: accepted (mode = \"multiplexing\" can reuse connections)"
                .to_owned(),
        );
    } else {
        findings.lines.push(format!(
            "second XCLIENT on one connection: refused ({})",
            show(&second)
        ));
        if config.downstream.mode == DownstreamMode::Multiplexing {
            findings.warnings.push(
                "mode = \"multiplexing\" will open a new connection for every transaction: set smtpd_authorized_xclient_hosts = static:all on a port only tarmac can reach to let it reuse them"
                    .to_owned(),
            );
        }
    }
    link.command("RSET")?;
    link.quit()
}

/// The second connection: would the server relay for this host without an announcement?
fn unannounced(config: &Config, server: SocketAddr, findings: &mut Findings) -> io::Result<()> {
    let mut link = Link::connect(config, server)?;
    link.reply()?;
    let caps = link.ehlo(&config.server.hostname)?;
    if config.downstream.tls == DownstreamTls::Required && caps.starttls {
        if link.start_tls(config, server)?.is_err() {
            return link.quit();
        }
        link.ehlo(&config.server.hostname)?;
    }
    let mail = link.command("MAIL FROM:<>")?;
    if mail.code / 100 != 2 {
        findings.lines.push(format!(
            "relay without an announcement: MAIL refused ({})",
            show(&mail)
        ));
        return link.quit();
    }
    let rcpt = link.command(&format!("RCPT TO:<{PROBE_RECIPIENT}>"))?;
    if rcpt.code / 100 == 2 {
        findings.lines.push(format!(
            "relay without an announcement: ACCEPTED ({})",
            show(&rcpt)
        ));
        findings.warnings.push(format!(
            "it relays for this host without an announcement (RCPT TO:<{PROBE_RECIPIENT}>: {}): it trusts tarmac's address (mynetworks?); never let clients reach it directly, and never use announce_client = \"none\" with it",
            show(&rcpt)
        ));
    } else {
        findings.lines.push(format!(
            "relay without an announcement: refused ({})",
            show(&rcpt)
        ));
    }
    link.command("RSET")?;
    link.quit()
}

/// A reply on one line for the operator.
fn show(reply: &Reply) -> String {
    let enhanced = reply
        .enhanced
        .map(|code| format!(" {}.{}.{}", code.0, code.1, code.2))
        .unwrap_or_default();
    format!("{}{enhanced} {}", reply.code, reply.lines.join(" / "))
}

/// One blocking probe connection, plain or over TLS.
struct Link {
    stream: Box<dyn Stream>,
    /// Bytes read and not yet parsed.
    input: Vec<u8>,
}

/// What a probe connection reads and writes through.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

impl Link {
    fn connect(config: &Config, server: SocketAddr) -> io::Result<Link> {
        let stream = TcpStream::connect_timeout(&server, config.timeouts.connect)?;
        let timeout = Some(config.timeouts.command.max(Duration::from_millis(1)));
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        Ok(Link {
            stream: Box::new(stream),
            input: Vec::new(),
        })
    }

    /// The next whole reply.
    fn reply(&mut self) -> io::Result<Reply> {
        loop {
            match parse_reply(&self.input) {
                Ok(Status::Complete((reply, used))) => {
                    self.input.drain(..used);
                    return Ok(reply);
                }
                Ok(Status::Partial) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a malformed reply: {e:?}"),
                    ));
                }
            }
            if self.input.len() > MAX_REPLY {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a reply too long",
                ));
            }
            let mut buf = [0; 4096];
            let n = self.stream.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            self.input
                .extend_from_slice(buf.get(..n).unwrap_or_default());
        }
    }

    fn command(&mut self, line: &str) -> io::Result<Reply> {
        self.stream.write_all(format!("{line}\r\n").as_bytes())?;
        self.stream.flush()?;
        self.reply()
    }

    fn ehlo(&mut self, name: &str) -> io::Result<Capabilities> {
        let reply = self.command(&format!("EHLO {name}"))?;
        if reply.code != 250 {
            return Err(io::Error::other(format!("EHLO refused: {}", show(&reply))));
        }
        Ok(parse_capabilities(&reply))
    }

    /// STARTTLS and the handshake with `[downstream]`'s client configuration: `Ok(Ok(summary))`
    /// when TLS is up, `Ok(Err(why))` when the server refused or the handshake failed.
    fn start_tls(
        &mut self,
        config: &Config,
        server: SocketAddr,
    ) -> io::Result<Result<String, String>> {
        let reply = self.command("STARTTLS")?;
        if reply.code != 220 {
            return Ok(Err(format!("STARTTLS refused: {}", show(&reply))));
        }
        let verify = config.downstream.tls_verify;
        let client = match &config.downstream.client_tls {
            Some(client) => client.clone(),
            None => match crate::downstream::tls::client_config(verify, &[]) {
                Ok(built) => crate::downstream::tls::ClientTls::new(built),
                Err(e) => return Ok(Err(e.to_string())),
            },
        };
        let connection = match client.start(server) {
            Ok(connection) => connection,
            Err(e) => return Ok(Err(e.to_string())),
        };
        // The plain stream moves under TLS; an empty cursor holds its place meanwhile.
        let plain = std::mem::replace(&mut self.stream, Box::new(io::Cursor::new(Vec::new())));
        let mut tls = rustls::StreamOwned::new(connection, plain);
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                return Ok(Err(e.to_string()));
            }
        }
        let version = tls
            .conn
            .protocol_version()
            .map_or_else(|| "?".to_owned(), |v| format!("{v:?}"));
        let suite = tls
            .conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("?");
        self.stream = Box::new(tls);
        let checked = if verify {
            "certificate verified"
        } else {
            "certificate not verified (tls_verify = false)"
        };
        Ok(Ok(format!("offered; {version} {suite}; {checked}")))
    }

    fn quit(&mut self) -> io::Result<()> {
        // Best effort: the probe is over whatever the server answers.
        let _ = self.command("QUIT");
        Ok(())
    }
}
