//! The scripted downstream MTA behind a session on invented time: one sans-IO SMTP server per
//! downstream connection that answers what the session relays the way Postfix's smtpd does
//! where it matters, and asserts the trust boundary (DESIGN.md §6) as it reads.
//!
//! Where it behaves like Postfix: XCLIENT is offered and accepted once per connection (the
//! EHLO after XCLIENT no longer lists it and a second one gets `550 5.7.0`, unless
//! [`xclient_again`](FakeDownstream::xclient_again)); STARTTLS is answered with `220` and
//! nothing may follow in plain text; the end of data gets one final reply.
//!
//! What it checks (a failed check panics): every command is a CRLF line of a verb tarmac sends;
//! nothing comes after QUIT or between the `220` to STARTTLS and the end of the handshake; the
//! greeting comes after the banner; XCLIENT only when configured, after a greeting, outside a
//! transaction; every MAIL after the greeting that follows an XCLIENT naming the session's
//! client and HELO (or behind a PROXY header naming it), never nested, and parsing back as
//! MAIL; RCPTs within `max_recipients`; DATA only after an accepted RCPT; no bare CR or LF in a
//! relayed body. A new connection starts from nothing ([`next_connection`]). With
//! [`checks`](FakeDownstream::checks) off (the session bench) it answers the same but checks
//! only what costs a comparison, and keeps no commands or bodies.
//!
//! [`next_connection`]: FakeDownstream::next_connection

use std::net::SocketAddr;

use tarmac::config::{AnnounceClient, Config};
use tarmac::smtp::command::{Command, parse_command};

/// What a downstream offering STARTTLS sends behind its `220`, in the same write, when
/// [`FakeDownstream::inject_after_starttls`] is set: a reply a man in the middle forged.
pub const FORGED: &str = "250 2.1.0 forged-after-starttls";

/// Whom the session speaks for when its bytes reach the downstream: a MAIL may only reach a
/// connection announced for exactly this client.
#[derive(Clone, Debug, Default)]
pub struct Speaker {
    /// The session's client (`Report::client`); `None`: nobody (a QUIT on closing).
    pub addr: Option<SocketAddr>,
    /// The client's HELO name, as the session has it.
    pub helo: Vec<u8>,
}

/// What the downstream said, over every connection of one session (carried to the next).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// `250`s to a final dot.
    pub dots_acked: u32,
    /// `354`s to DATA.
    pub data_354: u32,
    /// `250`s to MAIL.
    pub mail_250: u32,
    /// `250`s to RCPT.
    pub rcpt_250: u32,
}

/// What the downstream does with bytes it read.
#[derive(Debug, PartialEq, Eq)]
pub enum Reaction {
    /// These replies go back (possibly none).
    Replies(Vec<u8>),
    /// It closes the connection ([`FakeDownstream::close_on_read`]).
    Close,
}

/// One scripted downstream connection. Set the script fields before the session connects;
/// read the recorded ones afterwards.
#[derive(Debug)]
pub struct FakeDownstream {
    // ---- the script ----
    /// Reply to the end of data with this instead of `250` (`None`: `250`).
    pub final_reply: Option<&'static str>,
    /// Never answer the final dot.
    pub stall_after_dot: bool,
    /// List STARTTLS in the EHLO reply (until TLS is on) and answer it with `220`.
    pub offer_starttls: bool,
    /// Send [`FORGED`] in the same write as the `220` to STARTTLS.
    pub inject_after_starttls: bool,
    /// Offer and accept XCLIENT again after an XCLIENT (Postfix with
    /// `smtpd_authorized_xclient_hosts = static:all`); by default, as Postfix out of the box,
    /// the EHLO after XCLIENT no longer lists it and a second one gets `550 5.7.0`.
    pub xclient_again: bool,
    /// Offer no XCLIENT at all (tarmac missing from `smtpd_authorized_xclient_hosts`).
    pub no_xclient: bool,
    /// List SMTPUTF8 in the EHLO reply.
    pub smtputf8: bool,
    /// Refuse every RCPT with `550` (otherwise only those naming `unknown`; a MAIL naming
    /// `tempfail` gets `451`).
    pub reject_rcpt: bool,
    /// Refuse DATA with `554` (as Postfix does when it lost the recipients); the transaction
    /// stays open, as in Postfix, until RSET.
    pub reject_data: bool,
    /// Close the connection on this read (counting from 0) instead of answering it.
    pub close_on_read: Option<u32>,
    /// Answer this many replies per connection (banner included), then nothing.
    pub silent_after: Option<u32>,
    /// Replies say what they answer (`Sender ok`, `Recipient ok`) and final ones are numbered
    /// over the session (`queued as F<n>`), so a checker can tell a relayed reply from one the
    /// session made up; otherwise they read like Postfix's (`Ok`, `queued as 1`).
    pub tagged: bool,
    /// Check what it reads (above) and keep [`commands`](FakeDownstream::commands) and
    /// [`delivered`](FakeDownstream::delivered), the default. Off, for a bench: no body
    /// scanned for bare newlines, no command parsed back or identity checked, nothing kept
    /// but the [`totals`](FakeDownstream::totals).
    pub checks: bool,

    // ---- what it saw ----
    /// Every command line, in order (this connection).
    pub commands: Vec<String>,
    /// The bodies of the messages it accepted, dot-unstuffing aside (every connection).
    pub delivered: Vec<Vec<u8>>,
    /// Counts over every connection.
    pub totals: Totals,
    /// Bytes read but not yet a whole command (or a body waiting for its dot).
    pub input: Vec<u8>,
    /// Inside a message body.
    pub in_data: bool,
    /// A transaction is open (MAIL accepted, no final dot or RSET yet).
    pub in_transaction: bool,
    /// QUIT was read.
    pub quit: bool,
    /// NOOPs read (tarmac's keepalive while it holds a message).
    pub noops: u32,
    /// This side closed the connection (or its TLS handshake failed): it reads nothing more.
    pub gone: bool,
    /// It said `220` to STARTTLS: nothing may come until the driver's handshake is done.
    pub awaiting_tls: bool,
    /// TLS is on.
    pub tls: bool,

    announce: AnnounceClient,
    /// The connection comes from the client's own address (see `connect_as`).
    from_client: bool,
    max_recipients: usize,
    banner_sent: bool,
    /// EHLO or HELO was answered since the banner or the last XCLIENT.
    greeted: bool,
    /// XCLIENT was accepted on this connection.
    xclient_done: bool,
    /// The ADDR of that XCLIENT, or the source of the PROXY header.
    announced_addr: Option<String>,
    /// The argument of the greeting after XCLIENT.
    announced_helo: Option<Vec<u8>>,
    /// The PROXY v1 header is still expected.
    want_proxy: bool,
    /// How much of the body in `input` was checked.
    scanned: usize,
    rcpts: usize,
    rcpts_accepted: usize,
    reads: u32,
    replies: u32,
}

impl Default for FakeDownstream {
    fn default() -> FakeDownstream {
        FakeDownstream {
            final_reply: None,
            stall_after_dot: false,
            offer_starttls: false,
            inject_after_starttls: false,
            xclient_again: false,
            no_xclient: false,
            smtputf8: false,
            reject_rcpt: false,
            reject_data: false,
            close_on_read: None,
            silent_after: None,
            tagged: false,
            checks: true,
            commands: Vec::new(),
            delivered: Vec::new(),
            totals: Totals::default(),
            input: Vec::new(),
            in_data: false,
            in_transaction: false,
            quit: false,
            noops: 0,
            gone: false,
            awaiting_tls: false,
            tls: false,
            announce: AnnounceClient::None,
            from_client: false,
            max_recipients: usize::MAX,
            banner_sent: false,
            greeted: false,
            xclient_done: false,
            announced_addr: None,
            announced_helo: None,
            want_proxy: false,
            scanned: 0,
            rcpts: 0,
            rcpts_accepted: 0,
            reads: 0,
            replies: 0,
        }
    }
}

impl FakeDownstream {
    /// A fresh connection to the same scripted server: the script, the delivered bodies and
    /// the totals carry over, nothing of this connection's state does.
    pub fn next_connection(&mut self) -> FakeDownstream {
        FakeDownstream {
            final_reply: self.final_reply,
            stall_after_dot: self.stall_after_dot,
            offer_starttls: self.offer_starttls,
            inject_after_starttls: self.inject_after_starttls,
            xclient_again: self.xclient_again,
            no_xclient: self.no_xclient,
            smtputf8: self.smtputf8,
            reject_rcpt: self.reject_rcpt,
            reject_data: self.reject_data,
            close_on_read: self.close_on_read,
            silent_after: self.silent_after,
            tagged: self.tagged,
            checks: self.checks,
            delivered: std::mem::take(&mut self.delivered),
            totals: self.totals,
            ..FakeDownstream::default()
        }
    }

    /// The connection is up: takes what it checks from the session's config and returns the
    /// banner.
    pub fn connect(&mut self, config: &Config) -> Vec<u8> {
        self.connect_as(config, false)
    }

    /// [`FakeDownstream::connect`] for a connection whose TCP source is the client's own
    /// address when `from_client` (a transparent session's `spoof_source`): the peer address
    /// says who the client is, so nothing is announced, and an XCLIENT would come from an
    /// address no real downstream authorises.
    pub fn connect_as(&mut self, config: &Config, from_client: bool) -> Vec<u8> {
        self.from_client = from_client;
        self.announce = if from_client {
            AnnounceClient::None
        } else {
            config.downstream.announce_client
        };
        self.max_recipients = config.limits.max_recipients;
        self.want_proxy = self.announce == AnnounceClient::ProxyV1;
        self.banner_sent = true;
        let mut out = Vec::new();
        self.reply(&mut out, "220 ds.test ESMTP");
        out
    }

    /// Whether the banner went out (QUIT is in order from then on).
    pub fn banner_was_sent(&self) -> bool {
        self.banner_sent
    }

    /// The driver's handshake after the `220` to STARTTLS is done: the dialogue starts over
    /// with EHLO, inside TLS.
    pub fn start_tls(&mut self) {
        self.awaiting_tls = false;
        self.tls = true;
        self.greeted = false;
        self.input.clear();
    }

    /// Reads what the session relayed, speaking for `speaker`; returns the replies.
    pub fn feed(&mut self, bytes: &[u8], speaker: &Speaker) -> Reaction {
        if self.gone {
            return Reaction::Replies(Vec::new());
        }
        assert!(!self.quit, "bytes after QUIT: {}", escape(bytes));
        assert!(
            !self.awaiting_tls,
            "plain bytes after the 220 to STARTTLS: {}",
            escape(bytes)
        );
        if self.close_on_read == Some(self.reads) {
            self.gone = true;
            return Reaction::Close;
        }
        self.reads += 1;
        let mut out = Vec::new();
        // Read from `bytes` itself when nothing was left over (no copy of a whole body), and
        // keep what is not yet a whole command or body.
        let mut kept = std::mem::take(&mut self.input);
        if kept.is_empty() {
            let used = self.read(bytes, speaker, &mut out);
            self.input = bytes.get(used..).unwrap_or_default().to_vec();
        } else {
            kept.extend_from_slice(bytes);
            let used = self.read(&kept, speaker, &mut out);
            kept.drain(..used);
            self.input = kept;
        }
        Reaction::Replies(out)
    }

    /// Reads whole commands and bodies from `input`, appending the replies to `out`; returns
    /// the bytes used.
    fn read(&mut self, input: &[u8], speaker: &Speaker, out: &mut Vec<u8>) -> usize {
        let mut at = 0;
        loop {
            let rest = input.get(at..).unwrap_or_default();
            if self.in_data {
                let Some(used) = self.body_end(rest, out) else {
                    return at;
                };
                at += used;
                continue;
            }
            let Some(end) = find_crlf(rest) else {
                assert!(
                    !self.checks || !rest.contains(&b'\n'),
                    "bare LF to the downstream: {}",
                    escape(rest)
                );
                return at;
            };
            self.command(&rest[..end], speaker, out);
            at += end + 2;
        }
    }

    fn command(&mut self, line: &[u8], speaker: &Speaker, out: &mut Vec<u8>) {
        assert!(
            !line.contains(&b'\r') && !line.contains(&b'\n'),
            "line end inside a downstream command: {}",
            escape(line)
        );
        if self.want_proxy {
            self.want_proxy = false;
            assert!(
                line.starts_with(b"PROXY TCP4 ") || line.starts_with(b"PROXY TCP6 "),
                "not a PROXY header: {}",
                escape(line)
            );
            let source = line.split(|&b| b == b' ').nth(2).unwrap_or_default();
            self.announced_addr = Some(String::from_utf8_lossy(source).into_owned());
            return;
        }
        if self.checks {
            self.commands
                .push(String::from_utf8_lossy(line).into_owned());
        }
        let mut words = line.split(|&b| b == b' ');
        let verb = words.next().unwrap_or_default().to_ascii_uppercase();
        if matches!(&verb[..], b"EHLO" | b"HELO") {
            assert!(self.banner_sent, "greeting before the banner");
            self.greeted = true;
            if self.xclient_done {
                self.announced_helo = Some(words.next().unwrap_or_default().to_vec());
            }
        }
        let renounced = (self.xclient_done && !self.xclient_again) || self.no_xclient;
        match &verb[..] {
            b"EHLO" => {
                let reply = self.ehlo_reply(renounced);
                self.reply(out, &reply);
            }
            b"HELO" => {
                self.reply(out, "250 ds.test");
            }
            b"STARTTLS" => {
                assert!(self.offer_starttls && !self.tls, "STARTTLS not offered");
                assert!(!self.in_transaction, "STARTTLS inside a transaction");
                if self.reply(out, "220 2.0.0 Ready to start TLS") {
                    self.awaiting_tls = true;
                    if self.inject_after_starttls {
                        out.extend_from_slice(FORGED.as_bytes());
                        out.extend_from_slice(b"\r\n");
                    }
                }
            }
            b"XCLIENT" => {
                assert!(
                    !self.from_client,
                    "XCLIENT on a connection made from the client's own address"
                );
                assert_eq!(
                    self.announce,
                    AnnounceClient::Xclient,
                    "XCLIENT not configured"
                );
                assert!(!self.in_transaction, "XCLIENT inside a transaction");
                assert!(self.greeted, "XCLIENT before EHLO");
                if renounced {
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
                self.reply(out, "220 ds.test ESMTP");
            }
            b"MAIL" => {
                if self.checks {
                    self.check_identity(line, speaker);
                    assert!(
                        matches!(parse_command(line), Ok(Command::Mail { .. })),
                        "bad MAIL relayed: {}",
                        escape(line)
                    );
                }
                assert!(!self.in_transaction, "nested MAIL relayed");
                self.rcpts = 0;
                self.rcpts_accepted = 0;
                if contains(line, b"tempfail") {
                    self.reply(out, "451 4.3.0 Try later");
                    return;
                }
                self.in_transaction = true;
                let ok = if self.tagged {
                    "250 2.1.0 Sender ok"
                } else {
                    "250 2.1.0 Ok"
                };
                if self.reply(out, ok) {
                    self.totals.mail_250 += 1;
                }
            }
            b"RCPT" => {
                assert!(
                    !self.checks || matches!(parse_command(line), Ok(Command::Rcpt { .. })),
                    "bad RCPT relayed: {}",
                    escape(line)
                );
                assert!(self.in_transaction, "RCPT without MAIL");
                self.rcpts += 1;
                assert!(self.rcpts <= self.max_recipients, "over max_recipients");
                if contains(line, b"unknown") {
                    self.reply(out, "550 5.1.1 <unknown@example.org>: User unknown");
                } else if self.reject_rcpt {
                    self.reply(out, "550 5.1.1 Recipient rejected");
                } else {
                    let ok = if self.tagged {
                        "250 2.1.5 Recipient ok"
                    } else {
                        "250 2.1.5 Ok"
                    };
                    if self.reply(out, ok) {
                        self.rcpts_accepted += 1;
                        self.totals.rcpt_250 += 1;
                    }
                }
            }
            b"DATA" => {
                assert!(
                    self.in_transaction && self.rcpts_accepted > 0,
                    "DATA without recipient"
                );
                if self.reject_data {
                    self.reply(out, "554 5.5.1 Error: no valid recipients");
                    return;
                }
                if self.reply(out, "354 go ahead") {
                    self.in_data = true;
                    self.scanned = 0;
                    self.totals.data_354 += 1;
                }
            }
            b"RSET" => {
                self.in_transaction = false;
                self.reply(out, "250 2.0.0 Ok");
            }
            b"QUIT" => {
                self.quit = true;
                self.reply(out, "221 2.0.0 Bye");
            }
            // What tarmac sends to keep a session alive while it holds a message for its
            // scanners; Postfix answers it in any state.
            b"NOOP" => {
                self.noops += 1;
                self.reply(out, "250 2.0.0 Ok");
            }
            _ => panic!("unexpected downstream command {}", escape(line)),
        }
    }

    /// A MAIL only over a greeted connection announced for exactly this client (DESIGN.md §6).
    fn check_identity(&self, line: &[u8], speaker: &Speaker) {
        assert!(self.greeted, "MAIL before the handshake: {}", escape(line));
        let Some(addr) = speaker.addr else {
            return;
        };
        match self.announce {
            AnnounceClient::Xclient => {
                assert!(self.xclient_done, "MAIL without XCLIENT");
                assert_eq!(
                    self.announced_addr.as_deref(),
                    Some(addr.ip().to_canonical().to_string().as_str()),
                    "MAIL under another client's address"
                );
                let helo = &speaker.helo;
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

    fn ehlo_reply(&self, renounced: bool) -> String {
        let xclient = "XCLIENT ADDR NAME PORT HELO PROTO";
        let mut lines = vec!["ds.test", "8BITMIME"];
        if renounced {
            lines.push("SIZE 100000000");
        } else if self.offer_starttls && !self.tls {
            lines.extend(["STARTTLS", xclient]);
        } else {
            lines.extend(["SIZE 100000000", xclient]);
        }
        if self.smtputf8 {
            lines.insert(lines.len() - 1, "SMTPUTF8");
        }
        let mut reply = String::with_capacity(128);
        for (i, line) in lines.iter().enumerate() {
            if i > 0 {
                reply.push_str("\r\n");
            }
            reply.push_str(if i + 1 == lines.len() { "250 " } else { "250-" });
            reply.push_str(line);
        }
        reply
    }

    /// Reads body bytes from `input`, which starts with the body (or what is left of it to
    /// read); the bytes used when the final dot was read (and answered).
    fn body_end(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        // A message whose body is empty ends with a lone ".\r\n". A marker that ends in
        // `input` starts at most 4 bytes before what an earlier read already searched.
        let from = self.scanned.saturating_sub(4);
        let end = if input.starts_with(b".\r\n") {
            Some((0, 3))
        } else {
            input
                .get(from..)
                .and_then(|tail| find(tail, b"\r\n.\r\n"))
                .map(|at| (from + at + 2, from + at + 5))
        };
        let body_len = end.map_or(input.len(), |(len, _)| len);
        let body = input.get(..body_len).unwrap_or_default();
        // A CR at the end may be the start of a CRLF still in flight.
        let settled = if end.is_none() {
            body.strip_suffix(b"\r").unwrap_or(body)
        } else {
            body
        };
        assert!(
            !self.checks
                || !has_bare_newline(
                    settled
                        .get(self.scanned.saturating_sub(1)..)
                        .unwrap_or_default()
                ),
            "bare CR or LF in a relayed body: {}",
            escape(settled)
        );
        let size_cap = 2 * 25_000_000 + 1024;
        assert!(body.len() <= size_cap, "body of {} bytes", body.len());
        self.scanned = settled.len();
        let (_, used) = end?;
        if self.checks {
            self.delivered.push(body.to_vec());
        }
        self.in_data = false;
        self.in_transaction = false;
        if self.stall_after_dot {
            return Some(used);
        }
        let numbered;
        let reply = match self.final_reply {
            Some(reply) => reply,
            None if self.tagged => {
                numbered = format!("250 2.0.0 Ok: queued as F{}", self.totals.dots_acked + 1);
                &numbered
            }
            None => "250 2.0.0 Ok: queued as 1",
        };
        if self.reply(out, reply) && reply.starts_with("250") {
            self.totals.dots_acked += 1;
        }
        Some(used)
    }

    /// Appends a reply unless the script says to stay silent; whether it was sent.
    fn reply(&mut self, out: &mut Vec<u8>, text: &str) -> bool {
        if self.silent_after.is_some_and(|k| self.replies >= k) {
            return false;
        }
        self.replies += 1;
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
        true
    }
}

/// A CR not followed by LF or an LF not preceded by CR; a leading LF counts as the end of a
/// CRLF cut off before.
fn has_bare_newline(s: &[u8]) -> bool {
    s.iter().enumerate().any(|(i, &b)| match b {
        b'\r' => s.get(i + 1) != Some(&b'\n'),
        b'\n' => i.checked_sub(1).is_some_and(|p| s.get(p) != Some(&b'\r')),
        _ => false,
    })
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// Where the first CRLF starts, as `find(haystack, b"\r\n")`, without building a searcher
/// for each command line.
fn find_crlf(haystack: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', haystack)
        .find(|&lf| lf > 0 && haystack.get(lf - 1) == Some(&b'\r'))
        .map(|lf| lf - 1)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Printable form of bytes for assertion messages.
pub(crate) fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(announce: AnnounceClient) -> Config {
        let mut config = Config::default();
        config.server.hostname = "mx.test".to_owned();
        config.downstream.announce_client = announce;
        config
    }

    fn speaker() -> Speaker {
        Speaker {
            addr: Some("192.0.2.7:53211".parse().unwrap()),
            helo: b"client.example".to_vec(),
        }
    }

    fn replies(fake: &mut FakeDownstream, bytes: &[u8]) -> String {
        match fake.feed(bytes, &speaker()) {
            Reaction::Replies(out) => String::from_utf8(out).unwrap(),
            Reaction::Close => panic!("closed"),
        }
    }

    #[test]
    fn refuses_a_second_xclient_by_default() {
        let mut fake = FakeDownstream::default();
        assert_eq!(
            fake.connect(&config(AnnounceClient::Xclient)),
            b"220 ds.test ESMTP\r\n"
        );
        let first = replies(&mut fake, b"EHLO mx.test\r\n");
        assert!(
            first.ends_with("250 XCLIENT ADDR NAME PORT HELO PROTO\r\n"),
            "{first}"
        );
        let announced = replies(
            &mut fake,
            b"XCLIENT ADDR=192.0.2.7 HELO=client.example\r\nEHLO client.example\r\n",
        );
        assert!(
            announced.starts_with("220 ds.test ESMTP\r\n"),
            "{announced}"
        );
        assert!(!announced.contains("XCLIENT"), "{announced}");
        assert_eq!(
            replies(&mut fake, b"MAIL FROM:<a@example.org>\r\n"),
            "250 2.1.0 Ok\r\n"
        );
        assert_eq!(
            replies(&mut fake, b"RSET\r\nXCLIENT ADDR=192.0.2.8\r\n"),
            "250 2.0.0 Ok\r\n550 5.7.0 Error: insufficient authorization\r\n"
        );
    }

    #[test]
    fn accepts_xclient_again_when_scripted() {
        let mut fake = FakeDownstream {
            xclient_again: true,
            ..FakeDownstream::default()
        };
        fake.connect(&config(AnnounceClient::Xclient));
        let script = b"EHLO mx.test\r\nXCLIENT ADDR=192.0.2.7\r\nEHLO client.example\r\n";
        replies(&mut fake, script);
        let again = replies(&mut fake, b"XCLIENT ADDR=192.0.2.7\r\n");
        assert_eq!(again, "220 ds.test ESMTP\r\n");
    }

    #[test]
    #[should_panic(expected = "MAIL before the handshake")]
    fn flags_a_mail_before_the_greeting_after_xclient() {
        let mut fake = FakeDownstream::default();
        fake.connect(&config(AnnounceClient::Xclient));
        replies(
            &mut fake,
            b"EHLO mx.test\r\nXCLIENT ADDR=192.0.2.7\r\nMAIL FROM:<a@example.org>\r\n",
        );
    }

    #[test]
    #[should_panic(expected = "MAIL under another client's address")]
    fn flags_a_mail_announced_for_another_client() {
        let mut fake = FakeDownstream::default();
        fake.connect(&config(AnnounceClient::Xclient));
        replies(
            &mut fake,
            b"EHLO mx.test\r\nXCLIENT ADDR=192.0.2.99\r\nEHLO client.example\r\nMAIL FROM:<a@example.org>\r\n",
        );
    }

    #[test]
    #[should_panic(expected = "plain bytes after the 220 to STARTTLS")]
    fn flags_plain_bytes_after_its_220_to_starttls() {
        let mut fake = FakeDownstream {
            offer_starttls: true,
            inject_after_starttls: true,
            ..FakeDownstream::default()
        };
        fake.connect(&config(AnnounceClient::None));
        let ready = replies(&mut fake, b"EHLO mx.test\r\nSTARTTLS\r\n");
        assert!(ready.ends_with(&format!("220 2.0.0 Ready to start TLS\r\n{FORGED}\r\n")));
        replies(&mut fake, b"EHLO mx.test\r\n");
    }

    #[test]
    fn records_bodies_and_carries_them_to_the_next_connection() {
        let mut fake = FakeDownstream {
            tagged: true,
            ..FakeDownstream::default()
        };
        fake.connect(&config(AnnounceClient::None));
        let script = b"EHLO mx.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\n";
        assert_eq!(
            replies(&mut fake, script),
            "250-ds.test\r\n250-8BITMIME\r\n250-SIZE 100000000\r\n250 XCLIENT ADDR NAME PORT HELO PROTO\r\n\
             250 2.1.0 Sender ok\r\n250 2.1.5 Recipient ok\r\n354 go ahead\r\n250 2.0.0 Ok: queued as F1\r\n"
        );
        let mut next = fake.next_connection();
        assert_eq!(next.delivered, [b"hi\r\n".to_vec()]);
        assert!(next.commands.is_empty());
        next.connect(&config(AnnounceClient::None));
        replies(&mut next, script);
        assert_eq!(next.totals.dots_acked, 2, "numbered over the session");
    }

    #[test]
    fn finds_the_end_of_data_wherever_the_writes_split_it() {
        let head =
            b"EHLO mx.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n";
        let body = b"line one\r\n..dot\r\n.\r\n";
        let rest = b"QUIT\r\n";
        for at in 0..=body.len() {
            for checks in [true, false] {
                let mut fake = FakeDownstream {
                    checks,
                    ..FakeDownstream::default()
                };
                fake.connect(&config(AnnounceClient::None));
                assert!(replies(&mut fake, head).ends_with("354 go ahead\r\n"));
                let mut out = replies(&mut fake, &body[..at]);
                for byte in body[at..].chunks(1) {
                    out += &replies(&mut fake, byte);
                }
                out += &replies(&mut fake, rest);
                assert_eq!(
                    out, "250 2.0.0 Ok: queued as 1\r\n221 2.0.0 Bye\r\n",
                    "split at {at}"
                );
                assert_eq!(fake.totals.dots_acked, 1);
                if checks {
                    assert_eq!(fake.delivered, [b"line one\r\n..dot\r\n".to_vec()]);
                } else {
                    assert!(fake.delivered.is_empty() && fake.commands.is_empty());
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "bare CR or LF in a relayed body")]
    fn flags_a_bare_line_feed_in_a_body() {
        let mut fake = FakeDownstream::default();
        fake.connect(&config(AnnounceClient::None));
        replies(
            &mut fake,
            b"EHLO mx.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\na\nb\r\n.\r\n",
        );
    }
}
