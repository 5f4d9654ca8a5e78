//! Content inspection, the session's side (DESIGN.md §7): the held body, the scanners' answer,
//! the milters' stages, and the downstream kept in step, on the pair's invented time.

use std::time::Duration;

use tarmac::config::Config;
use tarmac::content::{Edit, MilterAddr, RspamdUrl, Verdict};
use tarmac::smtp::Reply;
use tarmac_testkit::session::{Pair, config};

const MAIL: &[u8] = b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<unknown@example.org>\r\nDATA\r\n";
const BODY: &[u8] = b"Subject: hi\r\n\r\n..leading dot\r\nline\r\n.\r\n";

fn scanning() -> Config {
    let mut config = config();
    config.content.rspamd = Some(RspamdUrl::parse("http://127.0.0.1:11333").unwrap());
    config
}

fn with_milter() -> Config {
    let mut config = config();
    config.content.milters = vec![MilterAddr::parse("inet:127.0.0.1:8891").unwrap()];
    config
}

#[test]
fn the_body_is_held_until_the_scanners_answer_and_the_250_is_the_downstreams() {
    let mut pair = Pair::new(scanning());
    pair.send(MAIL);
    let out = pair.take_output();
    assert!(
        out.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"),
        "{out}"
    );
    // MAIL and RCPT went live; DATA did not.
    assert!(
        pair.downstream
            .commands
            .iter()
            .any(|c| c == "RCPT TO:<b@example.net>")
    );
    assert!(!pair.downstream.commands.iter().any(|c| c == "DATA"));
    pair.scan_answer = None;
    pair.send(BODY);
    assert_eq!(
        pair.take_output(),
        "",
        "no reply before the scanners and the downstream"
    );
    assert!(!pair.downstream.commands.iter().any(|c| c == "DATA"));
    let (held, facts) = pair.scanned[0].clone();
    let held = String::from_utf8(held).unwrap();
    assert!(
        held.starts_with("Received: from client.example ([192.0.2.7])\r\n"),
        "{held}"
    );
    assert!(
        held.ends_with("+0000\r\nSubject: hi\r\n\r\n.leading dot\r\nline\r\n"),
        "the scanners see the content, unstuffed: {held}"
    );
    assert_eq!(facts.rcpts, ["b@example.net"], "only accepted recipients");
    assert_eq!(facts.from, "a@example.org");
    assert_eq!(facts.queue_id, "7f3a.1");
    assert_eq!(facts.helo, "client.example");
    // The scanners let it through with a header added.
    let job = pair.pending_scan.take().unwrap();
    pair.session.handle_answer(
        pair.now,
        tarmac::smtp::Answer::Scanned(Box::new(tarmac::smtp::question::Scanned {
            held: job.held,
            verdict: Verdict::Continue,
            edits: vec![Edit::AddHeader {
                name: "X-Spam".into(),
                value: "No".into(),
            }],
            marks: "rspamd:no_action:1.5".into(),
        })),
    );
    pair.pump();
    assert_eq!(pair.take_output(), "250 2.0.0 Ok: queued as 1\r\n");
    assert_eq!(pair.downstream.delivered.len(), 1);
    let delivered = String::from_utf8(pair.downstream.delivered[0].clone()).unwrap();
    assert!(
        delivered.starts_with("Received: from client.example"),
        "{delivered}"
    );
    // As on the wire (dot-stuffed again), with the scanners' header after the last one.
    assert!(
        delivered.ends_with("+0000\r\nSubject: hi\r\nX-Spam: No\r\n\r\n..leading dot\r\nline\r\n"),
        "{delivered}"
    );
    let report = pair.session.report();
    assert_eq!((report.msgs, report.result), (1, "delivered"));
    assert_eq!(report.scan, "rspamd:no_action:1.5");
}

#[test]
fn a_refusal_reaches_the_client_and_nothing_the_downstream() {
    for (verdict, reply, result) in [
        (
            Verdict::Reject(None),
            "550 5.7.1 Message content rejected\r\n",
            "rejected",
        ),
        (
            Verdict::Reject(Some(Reply::new(554, "5.7.1", "Gtube pattern"))),
            "554 5.7.1 Gtube pattern\r\n",
            "rejected",
        ),
        (
            Verdict::TempFail(None),
            "451 4.7.1 Service unavailable - try again later\r\n",
            "tempfail",
        ),
        (Verdict::Discard, "250 2.0.0 Ok\r\n", "discarded"),
    ] {
        let mut pair = Pair::new(scanning());
        pair.scan_answer = Some((verdict, Vec::new(), "rspamd:reject:15.0".into()));
        pair.send(MAIL);
        pair.take_output();
        pair.send(BODY);
        assert_eq!(pair.take_output(), reply);
        assert!(pair.downstream.delivered.is_empty());
        assert!(!pair.downstream.commands.iter().any(|c| c == "DATA"));
        assert_eq!(
            pair.downstream.commands.last().map(String::as_str),
            Some("RSET")
        );
        assert_eq!(pair.session.report().result, result);
        // The session goes on: the next message is scanned afresh.
        pair.scan_answer = Some((Verdict::Continue, Vec::new(), "rspamd:no_action:0.0".into()));
        pair.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: 2\r\n\r\nx\r\n.\r\n");
        assert!(
            pair.take_output()
                .ends_with("250 2.0.0 Ok: queued as 1\r\n")
        );
        assert_eq!(pair.scanned.last().unwrap().1.queue_id, "7f3a.2");
        assert_eq!(pair.downstream.delivered.len(), 1);
    }
}

#[test]
fn the_held_downstream_session_gets_a_noop_a_minute() {
    let mut pair = Pair::new(scanning());
    pair.scan_answer = None;
    pair.send(MAIL);
    pair.send(b"Subject: slow\r\n");
    pair.advance(Duration::from_secs(59));
    assert_eq!(pair.downstream.noops, 0);
    pair.advance(Duration::from_secs(2));
    assert_eq!(pair.downstream.noops, 1, "while the client sends the body");
    pair.send(b"\r\nbody\r\n.\r\n");
    assert!(pair.pending_scan.is_some());
    pair.advance(Duration::from_secs(61));
    assert_eq!(pair.downstream.noops, 2, "while the scanners think");
    let job = pair.pending_scan.take().unwrap();
    pair.session.handle_answer(
        pair.now,
        tarmac::smtp::Answer::Scanned(Box::new(tarmac::smtp::question::Scanned {
            held: job.held,
            verdict: Verdict::Continue,
            edits: Vec::new(),
            marks: String::new(),
        })),
    );
    pair.pump();
    assert!(
        pair.take_output()
            .ends_with("250 2.0.0 Ok: queued as 1\r\n")
    );
    assert_eq!(pair.downstream.delivered.len(), 1);
}

#[test]
fn a_downstream_lost_while_the_message_is_held_gives_451() {
    let mut pair = Pair::new(scanning());
    pair.send(MAIL);
    pair.take_output();
    pair.session
        .handle_downstream(pair.now, pair.link, tarmac::smtp::DownstreamEvent::Closed);
    pair.pump();
    pair.send(BODY);
    let out = pair.take_output();
    assert!(out.starts_with("451 4.4.2"), "{out}");
    assert!(pair.downstream.delivered.is_empty());
}

#[test]
fn milters_see_each_stage_and_a_refused_recipient_stays_away_from_the_downstream() {
    let mut pair = Pair::new(with_milter());
    pair.milter_script = vec![(
        "rcpt",
        Verdict::Reject(Some(Reply::new(550, "5.1.1", "No such user"))),
    )];
    assert_eq!(pair.milter_steps, ["connect"], "before the banner");
    assert_eq!(pair.take_output(), "220 mx.test ESMTP tarmac\r\n");
    pair.send(b"EHLO client.example\r\nMAIL FROM:<a@example.org> BODY=8BITMIME\r\nRCPT TO:<b@example.net>\r\n");
    let out = pair.take_output();
    assert!(
        out.ends_with("250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n"),
        "{out}"
    );
    assert!(
        !pair
            .downstream
            .commands
            .iter()
            .any(|c| c.starts_with("RCPT"))
    );
    assert_eq!(
        pair.milter_steps,
        [
            "connect",
            "helo:client.example",
            "mail:a@example.org",
            "rcpt:b@example.net"
        ]
    );
    pair.send(b"RSET\r\nQUIT\r\n");
    assert_eq!(
        pair.milter_steps[4..],
        ["abort", "quit"],
        "the transaction's end and the session's"
    );
}

#[test]
fn a_milter_refusal_at_connect_is_the_greeting() {
    let mut pair = Pair::build_quiet(with_milter(), Vec::new(), false);
    pair.milter_script = vec![("connect", Verdict::Reject(None))];
    pair.pump();
    let out = pair.take_output();
    assert!(out.starts_with("554 5.7.1 "), "{out}");
    pair.send(b"EHLO x\r\n");
    assert!(pair.take_output().starts_with("503 5.7.1"));
    assert_eq!(pair.session.report().result, "rejected");

    let mut pair = Pair::build_quiet(with_milter(), Vec::new(), false);
    pair.milter_script = vec![("connect", Verdict::TempFail(None))];
    pair.pump();
    assert_eq!(
        pair.take_output(),
        "421 4.7.1 Service unavailable - try again later\r\n"
    );
    assert!(pair.closed);
    assert_eq!(pair.milter_steps, ["connect", "quit"]);
}

#[test]
fn a_milter_discard_at_rcpt_gives_250_and_relays_nothing() {
    let mut pair = Pair::new(with_milter());
    pair.milter_script = vec![("rcpt", Verdict::Discard)];
    pair.send(MAIL);
    pair.send(BODY);
    let out = pair.take_output();
    assert!(
        out.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok\r\n"),
        "{out}"
    );
    assert!(
        pair.scanned.is_empty(),
        "a discarded message is not scanned"
    );
    assert!(pair.downstream.delivered.is_empty());
    assert_eq!(pair.session.report().result, "discarded");
}

#[test]
fn without_scanners_the_body_streams_as_before() {
    let mut pair = Pair::new(config());
    pair.send(MAIL);
    assert!(pair.downstream.commands.iter().any(|c| c == "DATA"));
    pair.send(BODY);
    assert!(pair.scanned.is_empty());
    assert_eq!(pair.session.report().scan, "-");
}

#[test]
fn a_downstream_refusing_data_after_the_scan_answers_the_dot_and_is_reset() {
    let mut pair = Pair::new(scanning());
    pair.downstream.reject_data = true;
    pair.send(MAIL);
    pair.take_output();
    pair.send(BODY);
    assert_eq!(
        pair.take_output(),
        "554 5.5.1 Error: no valid recipients\r\n",
        "the downstream's refusal answers the client's final dot"
    );
    assert!(pair.downstream.delivered.is_empty());
    assert_eq!(
        pair.downstream.commands.last().map(String::as_str),
        Some("RSET")
    );
    // The next transaction starts clean on the same connection: no nested MAIL.
    pair.downstream.reject_data = false;
    pair.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: 2\r\n\r\nx\r\n.\r\n");
    assert!(
        pair.take_output()
            .ends_with("250 2.0.0 Ok: queued as 1\r\n")
    );
    assert_eq!(pair.downstream.delivered.len(), 1);
}
