//! rspamd as a content scanner (DESIGN.md §7), against the real thing: the private rspamd of
//! `tarmac_testkit::rspamd` (started by the test on a free loopback port, its DNS on the test's
//! own loopback server) answers the testkit's raw `/checkv2` and tarmac's own client
//! (`tarmac::content::rspamd::check`): GTUBE is a reject with rspamd's text, a clean message
//! relays, the testkit's markers give `greylist`, `add header` and `rewrite subject` with their
//! changes, the request headers reach rspamd (it echoes them back), and a spooled message
//! scans the same as one in memory.
//!
//! A fake rspamd (a std listener in the test) checks the request on the wire and answers
//! garbage, error statuses, oversized, cut-short and slow answers: each is a `Failure`, never a
//! panic; nobody listening is `Failure::Connect`.
//!
//! The real-rspamd tests skip with a note where rspamd is not installed, except under `CI=true`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::time::Duration;

use tarmac::content::held::{Held, spool_dir};
use tarmac::content::rspamd::{Action, Reply, Request, check};
use tarmac::content::{Edit, Failure, RspamdUrl, Verdict};
use tarmac::smtp::reply::Reply as SmtpReply;
use tarmac_testkit::WAIT;
use tarmac_testkit::dns_server::{DnsServer, Zone};
use tarmac_testkit::rspamd::{
    ECHO_HEADER, MARK_ADD_HEADER, MARK_ECHO, MARK_GREYLIST, MARK_REWRITE_SUBJECT, Rspamd,
};

/// The GTUBE pattern: any message whose body carries it gets `reject`.
const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// A message from `sender.test` to `example.test` with `body`, CRLF lines.
fn message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Alice <alice@sender.test>\r\n\
         To: Bob <bob@example.test>\r\n\
         Subject: {subject}\r\n\
         Date: Mon, 07 Dec 2026 12:00:00 +0000\r\n\
         Message-ID: <{subject}@sender.test>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         {body}\r\n"
    )
    .into_bytes()
}

/// The envelope and connection, as tarmac would pass them.
const ENVELOPE: &[(&str, &str)] = &[
    ("IP", "192.0.2.10"),
    ("Helo", "mail.sender.test"),
    ("From", "alice@sender.test"),
    ("Rcpt", "bob@example.test"),
];

#[test]
fn gtube_is_rejected_and_a_clean_message_has_no_action() {
    // An empty zone: every name rspamd might look up is REFUSED or NXDOMAIN, answered at once.
    let dns = DnsServer::start(vec![Zone::new("sender.test")]);
    let Some(rspamd) = Rspamd::start(dns.addr()) else {
        return;
    };
    assert!(rspamd.addr().ip().is_loopback());

    let reply = rspamd.check(
        ENVELOPE,
        &message("gtube", &format!("Test message.\r\n{GTUBE}")),
    );
    assert_eq!(reply["action"], "reject", "GTUBE: {reply}");
    assert_eq!(
        reply["messages"]["smtp_message"], "Gtube pattern",
        "GTUBE: {reply}"
    );
    assert!(
        reply["score"].as_f64().is_some_and(|s| s >= 15.0),
        "GTUBE score: {reply}"
    );

    let reply = rspamd.check(
        ENVELOPE,
        &message("clean", "Hello Bob,\r\n\r\nlunch at noon?\r\n\r\nAlice"),
    );
    assert_eq!(
        reply["action"],
        "no action",
        "clean message: {reply}\n{}",
        rspamd.log_tail()
    );
    assert!(
        reply["messages"]["smtp_message"].is_null(),
        "clean message: {reply}"
    );

    // Its lookups (the client's PTR, for the clean message) went to the test's DNS server.
    assert!(
        dns.queries() >= 1,
        "rspamd never asked the test's DNS server"
    );
    // Everything it wrote stayed in its temp dir: its log is there.
    assert!(rspamd.dir().join("log").join("rspamd.log").is_file());
}

// --- tarmac's rspamd client (`tarmac::content::rspamd`) against the real rspamd -------------

/// Recipients of [`request`].
fn rcpts() -> Vec<String> {
    vec![
        "bob@example.test".to_owned(),
        "carol@example.test".to_owned(),
    ]
}

/// What tarmac tells rspamd about a TLS session from 192.0.2.10.
fn request(rcpts: &[String]) -> Request<'_> {
    Request {
        ip: "192.0.2.10".parse().unwrap(),
        helo: "mail.sender.test",
        hostname: Some("mail.sender.test"),
        from: "alice@sender.test",
        rcpts,
        queue_id: "17.2",
        tls: Some(("TLSv1.3", "TLS13_AES_256_GCM_SHA384")),
        mta_name: "mx.tarmac.test",
    }
}

/// Runs one `check` on a current-thread runtime, as the scanner thread does.
fn scan(
    addr: SocketAddr,
    request: &Request<'_>,
    held: &Held,
    timeout: Duration,
) -> Result<Reply, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(check(&RspamdUrl { addr }, request, held, timeout))
}

/// `scan` of `bytes` held in memory, with [`WAIT`] as the timeout; the reply or the failure.
#[track_caller]
fn scan_bytes(addr: SocketAddr, bytes: Vec<u8>) -> Reply {
    let rcpts = rcpts();
    scan(addr, &request(&rcpts), &Held::from_bytes(bytes), WAIT)
        .unwrap_or_else(|e| panic!("scan failed: {e}"))
}

#[test]
fn rspamd_verdicts_and_edits_for_each_action() {
    let dns = DnsServer::start(vec![Zone::new("sender.test")]);
    let Some(rspamd) = Rspamd::start(dns.addr()) else {
        return;
    };
    let addr = rspamd.addr();

    let gtube = scan_bytes(addr, message("gtube", &format!("Test message.\r\n{GTUBE}")));
    assert_eq!(gtube.action, Action::Reject, "{gtube:?}");
    assert!(gtube.score >= 15.0, "{gtube:?}");
    assert_eq!(
        gtube.verdict(),
        Verdict::Reject(Some(SmtpReply::new(550, "5.7.1", "Gtube pattern")))
    );
    assert_eq!(gtube.edits(), vec![]);

    // A clean message relays; rspamd's only change is to strip an upstream X-Spam.
    let clean = scan_bytes(addr, message("clean", "Hello Bob,\r\n\r\nlunch at noon?"));
    assert_eq!(
        clean.action,
        Action::NoAction,
        "{clean:?}\n{}",
        rspamd.log_tail()
    );
    assert_eq!(clean.verdict(), Verdict::Continue);
    assert_eq!(clean.smtp_message, None);
    assert_eq!(
        clean.edits(),
        vec![Edit::RemoveHeader {
            name: "X-Spam".into(),
            which: 0
        }]
    );

    let greylist = scan_bytes(addr, message("grey", &format!("Hi.\r\n{MARK_GREYLIST}")));
    assert_eq!(greylist.action, Action::Greylist, "{greylist:?}");
    assert!(
        matches!(greylist.verdict(), Verdict::TempFail(_)),
        "{greylist:?}"
    );
    assert_eq!(greylist.edits(), vec![]);

    let add = scan_bytes(addr, message("add", &format!("Hi.\r\n{MARK_ADD_HEADER}")));
    assert_eq!(add.action, Action::AddHeader, "{add:?}");
    assert_eq!(add.verdict(), Verdict::Continue);
    assert_eq!(
        add.edits(),
        vec![
            Edit::RemoveHeader {
                name: "X-Spam".into(),
                which: 0
            },
            Edit::RemoveHeader {
                name: "X-Spam".into(),
                which: 0
            },
            Edit::AddHeader {
                name: "X-Spam".into(),
                value: "Yes".into()
            },
        ],
        "{add:?}"
    );

    let rewrite = scan_bytes(
        addr,
        message("rewrite", &format!("Hi.\r\n{MARK_REWRITE_SUBJECT}")),
    );
    assert_eq!(rewrite.action, Action::RewriteSubject, "{rewrite:?}");
    assert_eq!(rewrite.verdict(), Verdict::Continue);
    assert_eq!(rewrite.subject.as_deref(), Some("*** SPAM *** rewrite"));
    assert_eq!(
        rewrite.edits().last(),
        Some(&Edit::SetSubject("*** SPAM *** rewrite".into())),
        "{rewrite:?}"
    );
}

/// The value of rspamd's [`ECHO_HEADER`] for `request` and `held` (a message with
/// [`MARK_ECHO`]), through tarmac's client: what rspamd understood of the request headers.
#[track_caller]
fn echo(addr: SocketAddr, request: &Request<'_>, held: &Held) -> String {
    let reply = scan(addr, request, held, WAIT).unwrap_or_else(|e| panic!("scan failed: {e}"));
    assert_eq!(reply.action, Action::NoAction, "{reply:?}");
    let echoed: Vec<&str> = reply
        .add_headers
        .iter()
        .filter(|h| h.name == ECHO_HEADER)
        .map(|h| h.value.as_str())
        .collect();
    assert_eq!(echoed.len(), 1, "{reply:?}");
    assert!(
        reply.edits().contains(&Edit::AddHeader {
            name: ECHO_HEADER.into(),
            value: echoed[0].into()
        }),
        "{reply:?}"
    );
    echoed[0].to_owned()
}

#[test]
fn rspamd_reads_the_request_headers_and_a_spooled_message() {
    let dns = DnsServer::start(vec![Zone::new("sender.test")]);
    let Some(rspamd) = Rspamd::start(dns.addr()) else {
        return;
    };
    let rcpts = rcpts();
    let text = message("echo", &format!("Hi.\r\n{MARK_ECHO}"));
    assert_eq!(
        echo(
            rspamd.addr(),
            &request(&rcpts),
            &Held::from_bytes(text.clone())
        ),
        "ip=192.0.2.10; helo=mail.sender.test; hostname=mail.sender.test; \
         from=alice@sender.test; rcpt=bob@example.test; rcpt=carol@example.test; \
         queue_id=17.2; mta_name=mx.tarmac.test; tls_version=TLSv1.3; \
         tls_cipher=TLS13_AES_256_GCM_SHA384"
    );

    // Without TLS and without a verified name, those headers are left out.
    let plain = Request {
        hostname: None,
        tls: None,
        from: "",
        queue_id: "18.1",
        ..request(&rcpts[..1])
    };
    let echoed = echo(rspamd.addr(), &plain, &Held::from_bytes(text.clone()));
    assert!(!echoed.contains("tls_"), "{echoed}");
    assert!(echoed.contains("queue_id=18.1"), "{echoed}");
    assert!(!echoed.contains("carol"), "{echoed}");
    assert!(
        !echoed.contains("hostname=mail.sender.test"),
        "a name rspamd was not given: {echoed}"
    );

    // The same message, with a long body, held in a spool file: scanned the same.
    let dir = tarmac_testkit::temp_dir("rspamd-spool");
    let mut long = text.clone();
    let filler = "lunch at noon, or later if the meeting runs over\r\n".repeat(4000);
    long.extend_from_slice(filler.as_bytes());
    let mut held = Held::new(1024, spool_dir(&dir).unwrap());
    for chunk in long.chunks(700) {
        held.append(chunk).unwrap();
    }
    assert!(held.is_spooled());
    let spooled = echo(rspamd.addr(), &request(&rcpts), &held);
    let in_memory = echo(rspamd.addr(), &request(&rcpts), &Held::from_bytes(long));
    assert_eq!(spooled, in_memory);
    // A spooled GTUBE message is rejected. (rspamd looks for GTUBE only in short text parts,
    // so this one is short, spooled past 64 bytes.)
    let mut held = Held::new(64, spool_dir(&dir).unwrap());
    held.append(&message("gtube", &format!("Test message.\r\n{GTUBE}")))
        .unwrap();
    assert!(held.is_spooled());
    let reply = scan(rspamd.addr(), &request(&rcpts), &held, WAIT).unwrap();
    assert_eq!(reply.action, Action::Reject, "{reply:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

// --- Failures: nobody listening, and a fake rspamd that misbehaves ---------------------------

/// A request as a fake server read it.
struct Received {
    head: String,
    body: Vec<u8>,
}

impl Received {
    /// The values of header `name`, in order.
    fn headers(&self, name: &str) -> Vec<&str> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect()
    }
}

/// A one-connection HTTP server on loopback: reads one whole request (head and
/// `Content-Length` body), sends it to the test, then writes `answer` and, unless `hold` is
/// set, closes. With `hold` it keeps the connection open until the test has its result.
struct FakeRspamd {
    addr: SocketAddr,
    requests: mpsc::Receiver<Received>,
    release: mpsc::Sender<()>,
}

impl FakeRspamd {
    fn start(answer: Vec<u8>, hold: bool) -> FakeRspamd {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, requests) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let mut reader = BufReader::new(stream);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let received = Received {
                head,
                body: Vec::new(),
            };
            let len: usize = received
                .headers("content-length")
                .first()
                .map_or(0, |v| v.parse().unwrap());
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let _ = tx.send(Received { body, ..received });
            let mut stream = reader.into_inner();
            // The client may give up mid-answer (over the size cap): not this side's failure.
            let _ = stream.write_all(&answer);
            if hold {
                let _ = released.recv_timeout(WAIT);
            }
        });
        FakeRspamd {
            addr,
            requests,
            release,
        }
    }

    #[track_caller]
    fn request(&self) -> Received {
        self.requests
            .recv_timeout(WAIT)
            .expect("the fake rspamd got no request")
    }
}

impl Drop for FakeRspamd {
    fn drop(&mut self) {
        let _ = self.release.send(());
    }
}

/// An HTTP/1.1 answer with `status` and `body`.
fn answer(status: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// `scan` of a small message against `fake`, with [`WAIT`] as the timeout.
fn scan_fake(fake: &FakeRspamd) -> Result<Reply, Failure> {
    let rcpts = rcpts();
    let held = Held::from_bytes(message("fake", "Hello."));
    scan(fake.addr, &request(&rcpts), &held, WAIT)
}

#[test]
fn the_request_carries_design_headers_and_the_whole_spooled_body() {
    let fake = FakeRspamd::start(
        answer(
            "200 OK",
            br#"{"action":"no action","score":0.5,"required_score":15}"#,
        ),
        false,
    );
    let dir = tarmac_testkit::temp_dir("rspamd-fake-spool");
    let bytes = tarmac_testkit::noise(300_000, 7);
    let mut held = Held::new(4096, spool_dir(&dir).unwrap());
    held.append(&bytes).unwrap();
    assert!(held.is_spooled());
    let rcpts = rcpts();
    let mut req = request(&rcpts);
    req.helo = "evil\r\nX-Injected: yes";
    let reply = scan(fake.addr, &req, &held, WAIT).unwrap();
    assert_eq!(reply.action, Action::NoAction);
    assert_eq!(reply.required_score, Some(15.0));

    let got = fake.request();
    assert!(
        got.head.starts_with("POST /checkv2 HTTP/1.1\r\n"),
        "{}",
        got.head
    );
    assert_eq!(
        got.body, bytes,
        "the body is the held message, byte for byte"
    );
    assert_eq!(got.headers("content-length"), ["300000"]);
    assert_eq!(got.headers("ip"), ["192.0.2.10"]);
    assert_eq!(got.headers("helo"), ["evil??X-Injected: yes"]);
    assert_eq!(got.headers("x-injected"), Vec::<&str>::new());
    assert_eq!(got.headers("hostname"), ["mail.sender.test"]);
    assert_eq!(got.headers("from"), ["alice@sender.test"]);
    assert_eq!(
        got.headers("rcpt"),
        ["bob@example.test", "carol@example.test"]
    );
    assert_eq!(got.headers("queue-id"), ["17.2"]);
    assert_eq!(got.headers("tls-version"), ["TLSv1.3"]);
    assert_eq!(got.headers("tls-cipher"), ["TLS13_AES_256_GCM_SHA384"]);
    assert_eq!(got.headers("mta-name"), ["mx.tarmac.test"]);
    assert!(got.headers("transfer-encoding").is_empty(), "{}", got.head);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_chunked_answer_is_read() {
    let body = br#"{"action":"reject","score":20,"messages":{"smtp_message":"No thanks"}}"#;
    let mut wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for part in body.chunks(10) {
        wire.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        wire.extend_from_slice(part);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let fake = FakeRspamd::start(wire, false);
    let reply = scan_fake(&fake).unwrap();
    assert_eq!(
        reply.verdict(),
        Verdict::Reject(Some(SmtpReply::new(550, "5.7.1", "No thanks")))
    );
}

#[test]
fn nobody_listening_is_a_connect_failure() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let rcpts = rcpts();
    let held = Held::from_bytes(message("nobody", "Hello."));
    let result = scan(addr, &request(&rcpts), &held, WAIT);
    assert!(matches!(result, Err(Failure::Connect(_))), "{result:?}");
}

#[test]
fn bad_answers_are_failures() {
    let over = vec![b' '; 2 * 1024 * 1024];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not HTTP", b"SPAMD/1.5 0 EX_OK\r\n\r\n".to_vec(), "garbage"),
        (
            "500",
            answer("500 Internal Server Error", b"{\"error\":\"oops\"}"),
            "500",
        ),
        ("not JSON", answer("200 OK", b"<html>"), "not JSON"),
        (
            "no action",
            answer("200 OK", br#"{"score":1}"#),
            "no \"action\"",
        ),
        (
            "string score",
            answer("200 OK", br#"{"action":"reject","score":"9"}"#),
            "score",
        ),
        ("over the cap", answer("200 OK", &over), "over"),
        (
            "cut short",
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"action\"".to_vec(),
            "io",
        ),
    ];
    for (name, wire, why) in cases {
        let fake = FakeRspamd::start(wire, false);
        let result = scan_fake(&fake);
        let text = match &result {
            Err(Failure::Garbage(text)) => format!("garbage {text}"),
            Err(Failure::Io(text)) => format!("io {text}"),
            other => panic!("{name}: {other:?}"),
        };
        assert!(text.contains(why), "{name}: {text}");
        fake.request();
    }
}

#[test]
fn a_slow_answer_is_a_timeout() {
    let fake = FakeRspamd::start(Vec::new(), true);
    let rcpts = rcpts();
    let held = Held::from_bytes(message("slow", "Hello."));
    let result = scan(
        fake.addr,
        &request(&rcpts),
        &held,
        Duration::from_millis(300),
    );
    assert_eq!(result, Err(Failure::Timeout));
    fake.request();
}
