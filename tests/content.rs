//! Content inspection end to end (DESIGN.md §7): the real server, the project's sink as the
//! downstream, and milters (the testkit's scripted one) as `[content] milters`: each stage's
//! answer reaches the client, a refused recipient never reaches the downstream, header and
//! body changes arrive, a scanner that is down or slow does what `on_failure` says, and a
//! message over `spool_after` goes through a file that has no name and arrives byte-exact.
//! rspamd and OpenDKIM, the real peers, are in `tests/rspamd.rs` and `tests/opendkim.rs`.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tarmac::config::Config;
use tarmac::content::OnFailure;
use tarmac::content::milter::codec::{Command, Response};
use tarmac::smtp::Reply;
use tarmac_testkit::milter::{Act, Script, TestMilter};
use tarmac_testkit::sink::Behaviour;
use tarmac_testkit::{Client, Server, WAIT, sink, test_config, wait_until};

/// A config relaying to `downstream` through `milters`.
fn with_milters(downstream: std::net::SocketAddr, milters: &[&TestMilter]) -> Config {
    let mut config = test_config(downstream);
    config.content.milters = milters.iter().map(|m| m.addr()).collect();
    config.content.timeout = Duration::from_secs(5);
    config
}

/// The content after tarmac's `Received:` (its three lines end with the date's `+0000`).
fn after_trace(content: &[u8]) -> &[u8] {
    let text = content;
    let at = text
        .windows(7)
        .position(|w| w == b"+0000\r\n")
        .expect("tarmac's Received: header");
    &text[at + 7..]
}

#[test]
fn a_milter_refuses_one_recipient_and_changes_the_message() {
    let sink = sink(Behaviour::Normal);
    let milter = TestMilter::start(Script::new().answer(|command| match command {
        Command::Rcpt(args) if args[0] == "<nobody@example.net>" => Some(vec![Act::Respond(
            Response::ReplyCode(Reply::new(550, "5.1.1", "No such user here")),
        )]),
        Command::BodyEob => Some(vec![
            Act::Respond(Response::AddHeader {
                name: "X-Scanned".into(),
                value: "by the test milter".into(),
            }),
            Act::Respond(Response::Continue),
        ]),
        _ => None,
    }));
    let server = Server::start(with_milters(sink.local_addr(), &[&milter]));
    let mut client = Client::connect(server.addr);
    assert!(client.reply().starts_with("220 "));
    assert!(client.command("EHLO client.example").starts_with("250-"));
    assert_eq!(
        client.command("MAIL FROM:<a@example.org>"),
        "250 2.1.0 Ok\r\n"
    );
    assert_eq!(
        client.command("RCPT TO:<nobody@example.net>"),
        "550 5.1.1 No such user here\r\n"
    );
    assert!(
        client
            .command("RCPT TO:<b@example.net>")
            .starts_with("250 ")
    );
    assert!(client.command("DATA").starts_with("354 "));
    client.send(b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n");
    let reply = client.reply();
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    assert!(client.command("QUIT").starts_with("221"));

    let message = sink.wait_for_messages(1, WAIT).remove(0);
    assert_eq!(
        message.rcpt_to,
        ["b@example.net"],
        "the refused one never went down"
    );
    assert_eq!(
        after_trace(&message.content),
        b"Subject: hi\r\nX-Scanned: by the test milter\r\n\r\n.dot\r\nbody\r\n"
    );
    // The milter saw the stages in order, and the message as the downstream got it before
    // its change.
    let stages = tarmac_testkit::milter::stages(&milter.received());
    assert!(stages.starts_with("OCHMRRTLL"), "{stages}");
    let body = tarmac_testkit::milter::body(&milter.received());
    assert_eq!(body, b".dot\r\nbody\r\n");
}

#[test]
fn a_milter_that_is_down_tempfails_or_is_skipped_as_on_failure_says() {
    let sink = sink(Behaviour::Normal);
    // A port nobody listens on: a milter that is down.
    let gone = TestMilter::start(Script::new());
    let mut config = with_milters(sink.local_addr(), &[&gone]);
    drop(gone);
    let server = Server::start(config.clone());
    let mut client = Client::connect(server.addr);
    assert_eq!(
        client.reply(),
        "421 4.7.1 Service unavailable - try again later\r\n"
    );
    client.expect_eof();
    drop(server);

    config.content.on_failure = OnFailure::Accept;
    let server = Server::start(config);
    let mut client = Client::connect(server.addr);
    assert!(client.send_message().starts_with("250 "));
    assert_eq!(
        sink.wait_for_messages(1, WAIT).len(),
        1,
        "relayed unscanned"
    );
}

#[test]
fn a_milter_that_stalls_at_end_of_data_is_a_failure_and_nothing_is_relayed() {
    let sink = sink(Behaviour::Normal);
    let milter = TestMilter::start(
        Script::new()
            .answer(|command| matches!(command, Command::BodyEob).then(|| vec![Act::Stall])),
    );
    let mut config = with_milters(sink.local_addr(), &[&milter]);
    config.content.timeout = Duration::from_millis(300);
    let server = Server::start(config);
    let mut client = Client::connect(server.addr);
    let reply = client.send_message();
    assert_eq!(reply, "451 4.7.1 Service unavailable - try again later\r\n");
    assert!(client.command("QUIT").starts_with("221"));
    assert!(sink.messages().is_empty());
}

/// A gate the test milter waits at (at end of body) until the test opens it.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn wait(&self) {
        let open = self.open.lock().unwrap();
        let (_open, timeout) = self
            .opened
            .wait_timeout_while(open, WAIT, |open| !*open)
            .unwrap();
        assert!(!timeout.timed_out(), "the test never opened the gate");
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// The spool file descriptors this process holds under `dir`: an unnamed file shows in
/// `/proc/self/fd` as `dir/#inode (deleted)` (O_TMPFILE), or as its unlinked name.
fn unnamed_files_in(dir: &std::path::Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|target| target.starts_with(&prefix))
        .collect()
}

#[test]
fn a_message_over_spool_after_goes_through_a_file_without_a_name_and_arrives_byte_exact() {
    let sink = sink(Behaviour::Normal);
    let gate = Arc::new(Gate::default());
    let at_gate = Arc::clone(&gate);
    let milter = TestMilter::start(Script::new().answer(move |command| {
        if matches!(command, Command::BodyEob) {
            at_gate.wait();
        }
        None
    }));
    let mut config = with_milters(sink.local_addr(), &[&milter]);
    config.content.spool_after = 4 * 1024;
    let spool = config.server.state_dir.join("spool");
    let server = Server::start(config);
    // 300 KB of lines, some with leading dots, sent dot-stuffed.
    let lines: Vec<String> = (0..6_000)
        .map(|n| {
            if n % 7 == 0 {
                format!(".line {n} {}", "x".repeat(40))
            } else {
                format!("line {n} {}", "y".repeat(40))
            }
        })
        .collect();
    let content: String = "Subject: big\r\n\r\n".to_owned()
        + &lines.iter().map(|l| format!("{l}\r\n")).collect::<String>();
    let stuffed: String = "Subject: big\r\n\r\n".to_owned()
        + &lines
            .iter()
            .map(|l| {
                if l.starts_with('.') {
                    format!(".{l}\r\n")
                } else {
                    format!("{l}\r\n")
                }
            })
            .collect::<String>();
    let mut client = Client::connect(server.addr);
    client.start_message("a@example.org", &["b@example.net"]);
    client.send(stuffed.as_bytes());
    client.send(b".\r\n");
    // Held at the milter's end of body: the message is in a spool file with no name.
    milter.wait_for("end of body", |received| {
        received.iter().any(|c| matches!(c, Command::BodyEob))
    });
    let held = unnamed_files_in(&spool);
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].ends_with("(deleted)"), "{held:?}");
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "the spool directory shows nothing"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&spool).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
    gate.open();
    let reply = client.reply();
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let message = sink.wait_for_messages(1, WAIT).remove(0);
    assert_eq!(after_trace(&message.content), content.as_bytes());
    wait_until("the spool file is closed", || {
        unnamed_files_in(&spool).is_empty()
    });
}

/// A message from `alice@sender.test` with `subject` and `body`, CRLF lines, not stuffed
/// (no line starts with a dot).
fn rspamd_message(subject: &str, extra_header: &str, body: &str) -> String {
    format!(
        "From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\nSubject: {subject}\r\n\
         Date: Mon, 07 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{subject}@sender.test>\r\n\
         {extra_header}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n"
    )
}

/// Sends `message` through tarmac at `addr`; the reply to its final dot.
fn send_through(addr: std::net::SocketAddr, message: &str) -> String {
    let mut client = Client::connect(addr);
    client.start_message("alice@sender.test", &["bob@example.test"]);
    client.send(message.as_bytes());
    client.send(b".\r\n");
    let reply = client.reply();
    assert!(client.command("QUIT").starts_with("221"));
    reply
}

/// tarmac with a real rspamd (DESIGN.md §7): GTUBE is refused with rspamd's own text and
/// nothing reaches the downstream; a clean message is relayed with the headers rspamd adds,
/// and without the `X-Spam` a client forged (rspamd asks for its removal); `add header` and
/// `rewrite subject` show in the delivered message; `greylist` is a 451. With rspamd stopped,
/// `on_failure = "tempfail"` gives `451 4.7.1` and `"accept"` relays the message unscanned.
#[test]
fn a_real_rspamd_decides_and_changes_what_is_relayed() {
    use tarmac::content::RspamdUrl;
    use tarmac_testkit::dns_server::{DnsServer, Zone};
    use tarmac_testkit::rspamd::{
        ECHO_HEADER, MARK_ADD_HEADER, MARK_ECHO, MARK_GREYLIST, MARK_REWRITE_SUBJECT, Rspamd,
    };
    const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

    let dns = DnsServer::start(vec![Zone::new("sender.test")]);
    let Some(rspamd) = Rspamd::start(dns.addr()) else {
        return;
    };
    let sink = sink(Behaviour::Normal);
    let mut config = test_config(sink.local_addr());
    config.content.rspamd = Some(RspamdUrl::parse(&format!("http://{}", rspamd.addr())).unwrap());
    config.content.timeout = Duration::from_secs(20);
    let server = Server::start(config.clone());

    let reply = send_through(
        server.addr,
        &rspamd_message("gtube", "", &format!("Hi.\r\n{GTUBE}")),
    );
    assert_eq!(
        reply,
        "550 5.7.1 Gtube pattern\r\n",
        "rspamd: {}",
        rspamd.log_tail()
    );
    let reply = send_through(
        server.addr,
        &rspamd_message("grey", "", &format!("Hi.\r\n{MARK_GREYLIST}")),
    );
    assert!(reply.starts_with("451 4.7.1 "), "{reply}");
    assert!(
        sink.messages().is_empty(),
        "nothing refused reached the downstream"
    );

    let clean = rspamd_message("clean", "X-Spam: No\r\n", &format!("Hi.\r\n{MARK_ECHO}"));
    assert!(send_through(server.addr, &clean).starts_with("250 "));
    let add = rspamd_message("add", "", &format!("Hi.\r\n{MARK_ADD_HEADER}"));
    assert!(send_through(server.addr, &add).starts_with("250 "));
    let rewrite = rspamd_message("rewrite", "", &format!("Hi.\r\n{MARK_REWRITE_SUBJECT}"));
    assert!(send_through(server.addr, &rewrite).starts_with("250 "));
    let delivered: Vec<String> = sink
        .wait_for_messages(3, WAIT)
        .iter()
        .map(|m| String::from_utf8(m.content.clone()).unwrap())
        .collect();
    assert!(
        delivered[0].contains(&format!("\r\n{ECHO_HEADER}: ")),
        "{}",
        delivered[0]
    );
    assert!(
        !delivered[0].contains("X-Spam:"),
        "the forged X-Spam is gone: {}",
        delivered[0]
    );
    assert!(delivered[0].ends_with(&format!("\r\n\r\nHi.\r\n{MARK_ECHO}\r\n")));
    assert!(
        delivered[1].contains("\r\nX-Spam: Yes\r\n"),
        "{}",
        delivered[1]
    );
    assert!(
        delivered[2].contains("\r\nSubject: *** SPAM *** rewrite\r\n"),
        "{}",
        delivered[2]
    );
    assert_eq!(delivered[2].matches("Subject:").count(), 1);

    // rspamd gone: the sender is told to retry, or (accept) the message goes unscanned.
    drop(rspamd);
    let reply = send_through(server.addr, &rspamd_message("down", "", "Hi."));
    assert_eq!(reply, "451 4.7.1 Service unavailable - try again later\r\n");
    drop(server);
    config.content.on_failure = OnFailure::Accept;
    let server = Server::start(config);
    assert!(send_through(server.addr, &rspamd_message("unscanned", "", "Hi.")).starts_with("250 "));
    let delivered = sink.wait_for_messages(4, WAIT);
    assert!(String::from_utf8_lossy(&delivered[3].content).contains("Subject: unscanned\r\n"));
}

/// Several milters, as Postfix chains `smtpd_milters` (DESIGN.md §7): each stage goes to them
/// in order and the first refusal decides (the later milters never see that recipient);
/// every milter's changes are applied, in order. The second milter listens on a Unix socket.
#[test]
fn milters_are_asked_in_order_and_the_first_refusal_decides() {
    let sink = sink(Behaviour::Normal);
    let refuse = |who: &'static str| {
        move |command: &Command| match command {
            Command::Rcpt(args) if args[0] == format!("<{who}@example.net>") => {
                Some(vec![Act::Respond(Response::ReplyCode(Reply::new(
                    550,
                    "5.7.1",
                    format!("{who} refused"),
                )))])
            }
            Command::BodyEob => Some(vec![
                Act::Respond(Response::AddHeader {
                    name: format!("X-{who}"),
                    value: "seen".into(),
                }),
                Act::Respond(Response::Continue),
            ]),
            _ => None,
        }
    };
    let first = TestMilter::start(Script::new().answer(refuse("first")));
    let second = TestMilter::start_unix(Script::new().answer(refuse("second")));
    let server = Server::start(with_milters(sink.local_addr(), &[&first, &second]));
    let mut client = Client::connect(server.addr);
    assert!(client.reply().starts_with("220 "));
    assert!(client.command("EHLO client.example").starts_with("250-"));
    assert!(
        client
            .command("MAIL FROM:<a@example.org>")
            .starts_with("250 ")
    );
    assert_eq!(
        client.command("RCPT TO:<first@example.net>"),
        "550 5.7.1 first refused\r\n"
    );
    assert_eq!(
        client.command("RCPT TO:<second@example.net>"),
        "550 5.7.1 second refused\r\n"
    );
    assert!(
        client
            .command("RCPT TO:<b@example.net>")
            .starts_with("250 ")
    );
    assert!(client.command("DATA").starts_with("354 "));
    client.send(b"Subject: chained\r\n\r\nbody\r\n.\r\n");
    assert!(client.reply().starts_with("250 "));
    let message = sink.wait_for_messages(1, WAIT).remove(0);
    assert_eq!(message.rcpt_to, ["b@example.net"]);
    assert_eq!(
        after_trace(&message.content),
        b"Subject: chained\r\nX-first: seen\r\nX-second: seen\r\n\r\nbody\r\n"
    );
    let rcpts = |milter: &TestMilter| -> Vec<String> {
        milter
            .received()
            .iter()
            .filter_map(|c| match c {
                Command::Rcpt(args) => Some(args[0].clone()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        rcpts(&first),
        [
            "<first@example.net>",
            "<second@example.net>",
            "<b@example.net>"
        ]
    );
    assert_eq!(
        rcpts(&second),
        ["<second@example.net>", "<b@example.net>"],
        "the second never saw what the first refused"
    );
}
