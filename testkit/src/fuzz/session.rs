//! The `session` target: one session against the testkit's scripted downstream on invented
//! time, through the same [`Pair`] and [`FakeDownstream`] the session's tests use.
//!
//! [`FakeDownstream`]: crate::session::FakeDownstream

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tarmac::config::{AnnounceClient, BareNewline, Dnsbl, DownstreamMode, DownstreamTls};
use tarmac::content::{Edit, MilterAddr, RspamdUrl, Verdict};
use tarmac::smtp::question::{DnsblAnswer, LookupAnswer, Query, RdnsAnswer};
use tarmac::smtp::reply::{Reply, Status, parse_reply};
use tarmac::smtp::session::{Shutdown, TlsVersion};

use super::{base_config, check_client_lines, escape, find, to_alphabet, vocabulary};
use crate::session::{Pair, Totals, peer};

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
/// With byte 0 bits 4–5 at 2 (no announcement), content inspection is on (rspamd, plus a
/// milter with `k`'s bit 0 that refuses every RCPT with bit 3); `k`'s bits 1–2 pick the
/// scanners' answer: relay with a header added, reject, tempfail, relay with the subject and
/// body replaced.
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

/// The session's pair, set up from the input's first two bytes, and the client's view.
struct Harness {
    pair: Pair,
    /// Entries of the pair's client log already checked.
    seen: usize,
    client_seen: ClientView,
}

impl Harness {
    fn run(scenario: u8, details: u8, script: &[u8]) {
        let mut harness = Harness::new(scenario, details);
        harness.check();
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
        // Announcing nothing (byte 0 bits 4–5 at 2) also turns content inspection on: rspamd,
        // and with `k`'s bit 0 a milter; `k`'s bits 1–2 pick the scanners' answer.
        let scanning = (scenario >> 4) & 3 == 2;
        if scanning {
            config.content.rspamd = Some(RspamdUrl::parse("http://127.0.0.1:11333").unwrap());
            if k & 1 != 0 {
                config.content.milters = vec![MilterAddr::parse("inet:127.0.0.1:8891").unwrap()];
            }
        }
        let first = config.downstream.servers.first().copied();
        let second = SocketAddr::from(([127, 0, 0, 1], 10026));
        let connect_mode = details >> 6;
        if connect_mode != 0 {
            config.downstream.servers.push(second);
        }
        let mut pair = Pair::from_peer(config, dns_answers(), peer(false, true));
        // Connects (byte 1, bits 6–7): 0 ok, 1 the first server refuses, 2 it never
        // completes, 3 every server refuses.
        match connect_mode {
            0 => {}
            1 => pair.refused_servers.extend(first),
            2 => pair.hanging_servers.extend(first),
            _ => pair
                .refused_servers
                .extend(first.into_iter().chain([second])),
        }
        if scanning {
            let edit = |name: &str| Edit::AddHeader {
                name: name.into(),
                value: "fuzz".into(),
            };
            pair.scan_answer = Some(match (k >> 1) & 3 {
                0 => (Verdict::Continue, vec![edit("X-Fuzz")], String::new()),
                1 => (Verdict::Reject(None), Vec::new(), String::new()),
                2 => (Verdict::TempFail(None), Vec::new(), String::new()),
                _ => (
                    Verdict::Continue,
                    vec![
                        Edit::SetSubject("fuzz".into()),
                        Edit::ReplaceBody(b".dot\r\nbody\r\n".to_vec()),
                    ],
                    String::new(),
                ),
            });
            if k & 1 != 0 && k & 8 != 0 {
                pair.milter_script = vec![("rcpt", Verdict::Reject(None))];
            }
        }
        pair.dribble = details & 0x10 != 0;
        pair.lagging = details & 0x20 != 0;
        pair.downstream_tls = Some(k & 4 == 0);
        let downstream = &mut pair.downstream;
        downstream.tagged = true;
        downstream.smtputf8 = true;
        downstream.offer_starttls = downstream_starttls;
        downstream.inject_after_starttls = downstream_starttls;
        match scenario >> 6 {
            0 => {}
            1 => downstream.reject_rcpt = true,
            2 => downstream.close_on_read = Some(k),
            _ => downstream.silent_after = Some(k),
        }
        pair.pump();
        Harness {
            pair,
            seen: 0,
            client_seen: ClientView {
                partial_ok: tarpit,
                scanning,
                ..ClientView::default()
            },
        }
    }

    fn client_send(&mut self, bytes: &[u8]) {
        if self.pair.closed {
            return;
        }
        let mut bytes = bytes;
        if self.pair.handshaking {
            // The chunk's first byte is the handshake's outcome (even: done, with TLS 1.3 or
            // 1.2 by the next bit; odd: failed); the rest was sent over TLS.
            let Some((&outcome, rest)) = bytes.split_first() else {
                return;
            };
            assert!(
                self.pair.client_pending.is_empty(),
                "plain bytes kept for after TLS"
            );
            if outcome & 1 != 0 {
                self.pair.tls_failed();
                self.check();
                assert!(self.pair.closed, "a failed handshake left the session open");
                return;
            }
            let version = if outcome & 2 == 0 {
                TlsVersion::Tls13
            } else {
                TlsVersion::Tls12
            };
            self.pair.tls_established(version);
            assert_eq!(self.pair.session.report().tls, version.as_str());
            bytes = rest;
        }
        self.pair.send(bytes);
        self.check();
    }

    fn tick(&mut self, by: Duration) {
        self.pair.advance(by);
        self.check();
    }

    fn shutdown(&mut self, how: Shutdown) {
        self.pair.shutdown(how);
        self.check();
        if how == Shutdown::Now {
            assert!(self.pair.closed, "Shutdown::Now left the session open");
        }
    }

    /// The client hangs up; the session must close and leave no downstream connection open.
    fn finish(&mut self) {
        self.pair.hang_up();
        self.check();
        let pair = &mut self.pair;
        assert!(pair.closed && pair.session.is_closed(), "EOF did not close");
        assert!(!pair.has_downstream(), "downstream left open after Close");
        assert_eq!(pair.session.poll_timeout(), None, "deadline after close");
        pair.session
            .handle_timeout(pair.now + Duration::from_secs(100_000));
        pair.pump();
    }

    /// Checks what reached the client since the last check.
    fn check(&mut self) {
        let totals = self.pair.downstream.totals;
        for (_, bytes) in self.pair.client_log.get(self.seen..).unwrap_or_default() {
            self.client_seen.receive(bytes, &totals);
        }
        self.seen = self.pair.client_log.len();
    }
}

/// The fuzz driver's DNS: only the tarpit scenario has a zone, and it lists the client; the
/// rDNS lookup finds no name. Both answer at once, as from the cache.
fn dns_answers() -> Vec<(Query, LookupAnswer)> {
    let client = IpAddr::from([192, 0, 2, 7]);
    vec![
        (
            Query::Dnsbl {
                zone: "bl.fuzz".into(),
                ip: client,
            },
            LookupAnswer::Dnsbl(DnsblAnswer::Listed(vec![std::net::Ipv4Addr::new(
                127, 0, 0, 2,
            )])),
        ),
        (Query::Rdns(client), LookupAnswer::Rdns(RdnsAnswer::NoName)),
    ]
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
    /// Content inspection is on: tarmac answers DATA with its own `354` (the downstream's
    /// comes after the scan); the end-of-data `250` must still be the downstream's.
    scanning: bool,
    /// Tarpit scenario: output may stop mid-reply (a `220-` teaser, stuttered bytes); only
    /// whole replies are checked, as they complete.
    partial_ok: bool,
    /// The `220-` greeting teaser was seen; its final line may carry another code (a 554,
    /// 521 or 421 instead of the 220), as DESIGN.md §1.3 and postscreen have it.
    teaser_seen: bool,
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
                    self.scanning || self.got_354 <= totals.data_354,
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
