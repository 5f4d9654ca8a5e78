//! The sink against a plain blocking client on loopback: the script, its strictness, recording,
//! the maildir and stopping. The misbehaviours are in `misbehaviour`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::session::PROXY_V2_SIGNATURE;
use super::*;

mod misbehaviour;

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
    drop(sink);
    // The accept thread was woken and joined, so the listener it owned is closed. Had the
    // wake failed, the thread would have been left in accept() with the port still open.
    assert!(TcpStream::connect_timeout(&loopback, TIMEOUT).is_err());
}
