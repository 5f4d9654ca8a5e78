//! The milter client (`tarmac::content::milter::MilterLink`) against the testkit's scripted
//! milter over TCP and a Unix socket — each stage's verdict, the milter's own reply text,
//! modifications as edits, envelope changes refused, NO*/NR_*/SKIP honoured, broken milters
//! as failures, large bodies in chunks — and against a real, private OpenDKIM, whose
//! signature must verify with dkimpy.

use std::time::Duration;

use tarmac::content::held::Held;
use tarmac::content::milter::codec::{Command, Response, protocol};
use tarmac::content::milter::{ConnectInfo, MessageOutcome, MilterLink};
use tarmac::content::{Edit, Failure, MilterAddr, Verdict};
use tarmac::smtp::reply::Reply;
use tarmac_testkit::WAIT;
use tarmac_testkit::milter::{self, Act, Script, TestMilter};
use tarmac_testkit::opendkim::{OpenDkim, dkim_verifies as verifies, dkimpy};

const T: Duration = WAIT;

const MESSAGE: &[u8] = b"Received: from client.test by mx.test\r\n\tfor <b@example.test>\r\n\
From: <a@example.test>\r\nTo: <b@example.test>\r\nSubject: hello\r\n\r\nHello.\r\nBye.\r\n";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn info() -> ConnectInfo<'static> {
    ConnectInfo {
        hostname: "client.test",
        addr: "127.0.0.1:40000".parse().unwrap(),
    }
}

/// Opens a link and runs connect, HELO, MAIL and one RCPT, each answered `Continue`.
async fn envelope(addr: &MilterAddr) -> MilterLink {
    let mut link = MilterLink::open(addr, T).await.unwrap();
    let macros = [("j", "mx.test"), ("{client_addr}", "127.0.0.1")];
    assert_eq!(
        link.connect(&info(), &macros, T).await,
        Ok(Verdict::Continue)
    );
    assert_eq!(
        link.helo("client.test", &[("{client_name}", "client.test")], T)
            .await,
        Ok(Verdict::Continue)
    );
    assert_eq!(
        link.mail(
            "a@example.test",
            &["SIZE=100"],
            &[("{mail_addr}", "a@example.test")],
            T
        )
        .await,
        Ok(Verdict::Continue)
    );
    assert_eq!(
        link.rcpt("b@example.test", &[], &[], T).await,
        Ok(Verdict::Continue)
    );
    link
}

async fn whole(addr: &MilterAddr, message: &[u8]) -> MessageOutcome {
    let mut link = envelope(addr).await;
    let outcome = link
        .message(&Held::from_bytes(message.to_vec()), &[("i", "Q1")], T)
        .await
        .unwrap();
    link.quit().await;
    outcome
}

fn assert_full_conversation(milter: &TestMilter) {
    milter.wait_for("QUIT", |r| r.last() == Some(&Command::Quit));
    let got = milter.received();
    assert_eq!(milter::stages(&got), "OCHMRTLLLLNBEQ");
    assert_eq!(
        got[2],
        Command::Connect {
            hostname: "client.test".into(),
            family: tarmac::content::milter::codec::Family::Inet4,
            port: 40000,
            address: "127.0.0.1".into(),
        }
    );
    assert_eq!(
        milter::macros(&got, b'C'),
        [
            ("j".to_owned(), "mx.test".to_owned()),
            ("{client_addr}".to_owned(), "127.0.0.1".to_owned())
        ]
    );
    assert_eq!(
        milter::macros(&got, b'E'),
        [("i".to_owned(), "Q1".to_owned())]
    );
    assert!(got.contains(&Command::Mail(vec![
        "<a@example.test>".into(),
        "SIZE=100".into()
    ])));
    assert!(got.contains(&Command::Rcpt(vec!["<b@example.test>".into()])));
    let headers = milter::headers(&got);
    // tarmac's Received: first, its folded line joined by LF, the leading space gone.
    assert_eq!(
        headers[0],
        (
            "Received".to_owned(),
            "from client.test by mx.test\n\tfor <b@example.test>".to_owned()
        )
    );
    assert_eq!(headers[3], ("Subject".to_owned(), "hello".to_owned()));
    assert_eq!(milter::body(&got), b"Hello.\r\nBye.\r\n");
}

#[test]
fn every_stage_reaches_the_milter_over_tcp() {
    let milter = TestMilter::start(Script::new());
    let outcome = runtime().block_on(whole(&milter.addr(), MESSAGE));
    assert_eq!(outcome.verdict, Verdict::Continue);
    assert!(outcome.edits.is_empty() && outcome.refused.is_empty());
    assert_full_conversation(&milter);
}

#[test]
fn every_stage_reaches_the_milter_over_a_unix_socket() {
    let milter = TestMilter::start_unix(Script::new());
    assert!(matches!(milter.addr(), MilterAddr::Unix(_)));
    let outcome = runtime().block_on(whole(&milter.addr(), MESSAGE));
    assert_eq!(outcome.verdict, Verdict::Continue);
    assert_full_conversation(&milter);
}

#[test]
fn a_recipient_is_rejected_with_the_milters_own_text() {
    let reply = Reply::new(550, "5.1.1", "No such user here");
    let answer = reply.clone();
    let milter = TestMilter::start(Script::new().answer(move |c| match c {
        Command::Rcpt(args) if args[0] == "<bad@example.test>" => {
            Some(vec![Act::Respond(Response::ReplyCode(answer.clone()))])
        }
        Command::Rcpt(args) if args[0] == "<later@example.test>" => {
            Some(vec![Act::Respond(Response::TempFail)])
        }
        _ => None,
    }));
    runtime().block_on(async {
        let mut link = envelope(&milter.addr()).await;
        assert_eq!(
            link.rcpt("bad@example.test", &[], &[], T).await,
            Ok(Verdict::Reject(Some(reply)))
        );
        assert_eq!(
            link.rcpt("later@example.test", &[], &[], T).await,
            Ok(Verdict::TempFail(None))
        );
        // Only that recipient: the message goes on.
        let outcome = link
            .message(&Held::from_bytes(MESSAGE.to_vec()), &[], T)
            .await
            .unwrap();
        assert_eq!(outcome.verdict, Verdict::Continue);
    });
}

#[test]
fn verdicts_at_each_stage() {
    // Connect: tempfail; then every later stage gets the same answer without being sent.
    let milter = TestMilter::start(Script::new().answer(|c| {
        matches!(c, Command::Connect { .. }).then(|| vec![Act::Respond(Response::TempFail)])
    }));
    runtime().block_on(async {
        let mut link = MilterLink::open(&milter.addr(), T).await.unwrap();
        assert_eq!(
            link.connect(&info(), &[], T).await,
            Ok(Verdict::TempFail(None))
        );
        assert_eq!(link.helo("x", &[], T).await, Ok(Verdict::TempFail(None)));
        link.quit().await;
    });
    milter.wait_for("QUIT", |r| r.last() == Some(&Command::Quit));
    assert_eq!(milter::stages(&milter.received()), "OCQ");

    // HELO: reject.
    let milter =
        TestMilter::start(Script::new().answer(|c| {
            matches!(c, Command::Helo(_)).then(|| vec![Act::Respond(Response::Reject)])
        }));
    runtime().block_on(async {
        let mut link = MilterLink::open(&milter.addr(), T).await.unwrap();
        assert_eq!(link.connect(&info(), &[], T).await, Ok(Verdict::Continue));
        assert_eq!(link.helo("x", &[], T).await, Ok(Verdict::Reject(None)));
    });

    // MAIL: accept — nothing more of this message is sent; the next MAIL aborts it first.
    let milter = TestMilter::start(Script::new().answer(|c| match c {
        Command::Mail(args) if args[0] == "<ok@example.test>" => {
            Some(vec![Act::Respond(Response::Accept)])
        }
        _ => None,
    }));
    runtime().block_on(async {
        let mut link = MilterLink::open(&milter.addr(), T).await.unwrap();
        link.connect(&info(), &[], T).await.unwrap();
        assert_eq!(
            link.mail("ok@example.test", &[], &[], T).await,
            Ok(Verdict::Accept)
        );
        assert_eq!(
            link.rcpt("b@x.test", &[], &[], T).await,
            Ok(Verdict::Continue)
        );
        let outcome = link
            .message(&Held::from_bytes(MESSAGE.to_vec()), &[], T)
            .await
            .unwrap();
        assert_eq!(outcome.verdict, Verdict::Accept);
        // Accepted at MAIL: the message closed the transaction with an abort.
        assert_eq!(link.mail("", &[], &[], T).await, Ok(Verdict::Continue));
        link.quit().await;
    });
    milter.wait_for("QUIT", |r| r.last() == Some(&Command::Quit));
    assert_eq!(milter::stages(&milter.received()), "OCMAMQ");
    assert!(
        milter
            .received()
            .contains(&Command::Mail(vec!["<>".into()]))
    );

    // End of body: discard; in a header: reject with a reply code (the rest not sent).
    let milter = TestMilter::start(Script::new().answer(|c| match c {
        Command::BodyEob => Some(vec![Act::Respond(Response::Discard)]),
        _ => None,
    }));
    let outcome = runtime().block_on(whole(&milter.addr(), MESSAGE));
    assert_eq!(outcome.verdict, Verdict::Discard);

    let reply = Reply::new(554, "5.7.1", "Bad subject");
    let answer = reply.clone();
    let milter = TestMilter::start(Script::new().answer(move |c| match c {
        Command::Header { name, .. } if name == "Subject" => {
            Some(vec![Act::Respond(Response::ReplyCode(answer.clone()))])
        }
        _ => None,
    }));
    let outcome = runtime().block_on(whole(&milter.addr(), MESSAGE));
    assert_eq!(outcome.verdict, Verdict::Reject(Some(reply)));
    milter.wait_for("QUIT", |r| r.last() == Some(&Command::Quit));
    assert_eq!(milter::stages(&milter.received()), "OCHMRTLLLLAQ");
}

#[test]
fn modifications_come_back_as_edits() {
    let milter = TestMilter::start(Script::new().answer(|c| match c {
        Command::BodyEob => Some(vec![
            Act::Respond(Response::Progress),
            Act::Respond(Response::InsHeader {
                index: 0,
                name: "X-First".into(),
                value: "one\n\ttwo".into(),
            }),
            Act::Respond(Response::AddHeader {
                name: "X-Last".into(),
                value: "end".into(),
            }),
            Act::Respond(Response::ChgHeader {
                index: 1,
                name: "Subject".into(),
                value: "changed".into(),
            }),
            Act::Respond(Response::ChgHeader {
                index: 1,
                name: "To".into(),
                value: String::new(),
            }),
            Act::Respond(Response::ReplBody(b"New ".to_vec())),
            Act::Respond(Response::ReplBody(b"body.\r\n".to_vec())),
            Act::Respond(Response::Accept),
        ]),
        _ => None,
    }));
    let outcome = runtime().block_on(whole(&milter.addr(), MESSAGE));
    assert_eq!(outcome.verdict, Verdict::Accept);
    assert_eq!(
        outcome.edits,
        [
            Edit::InsertHeader {
                index: 0,
                name: "X-First".into(),
                value: "one\r\n\ttwo".into()
            },
            Edit::AddHeader {
                name: "X-Last".into(),
                value: "end".into()
            },
            Edit::ChangeHeader {
                index: 1,
                name: "Subject".into(),
                value: "changed".into()
            },
            Edit::ChangeHeader {
                index: 1,
                name: "To".into(),
                value: String::new()
            },
            Edit::ReplaceBody(b"New body.\r\n".to_vec()),
        ]
    );
    assert!(outcome.refused.is_empty());
}

#[test]
fn envelope_changes_are_refused_and_reported() {
    let milter = TestMilter::start(Script::new().answer(|c| match c {
        Command::BodyEob => Some(vec![
            Act::Respond(Response::AddRcpt("<extra@example.test>".into())),
            Act::Respond(Response::AddRcptPar {
                rcpt: "<par@example.test>".into(),
                args: Some("NOTIFY=NEVER".into()),
            }),
            Act::Respond(Response::DelRcpt("<b@example.test>".into())),
            Act::Respond(Response::ChgFrom {
                from: "<other@example.test>".into(),
                args: None,
            }),
            Act::Respond(Response::Quarantine("suspicious".into())),
            Act::Respond(Response::Continue),
        ]),
        _ => None,
    }));
    let outcome = runtime().block_on(whole(&milter.addr(), MESSAGE));
    assert_eq!(outcome.verdict, Verdict::Continue);
    assert!(outcome.edits.is_empty());
    assert_eq!(outcome.refused.len(), 5, "{:?}", outcome.refused);
    for (note, what) in outcome.refused.iter().zip([
        "<extra@example.test>",
        "<par@example.test> NOTIFY=NEVER",
        "<b@example.test>",
        "<other@example.test>",
        "suspicious",
    ]) {
        assert!(note.contains(what), "{note}");
    }
    assert!(outcome.refused[0].contains("refused, envelope changes are not applied"));
}

#[test]
fn stages_left_out_or_unanswered_as_negotiated() {
    let milter = TestMilter::start(Script::new().protocol(
        protocol::NOHELO
            | protocol::NODATA
            | protocol::NR_CONN
            | protocol::NR_HDR
            | protocol::NR_BODY
            | protocol::NOEOH,
    ));
    let outcome = runtime().block_on(whole(&milter.addr(), MESSAGE));
    assert_eq!(outcome.verdict, Verdict::Continue);
    milter.wait_for("QUIT", |r| r.last() == Some(&Command::Quit));
    let got = milter.received();
    assert_eq!(milter::stages(&got), "OCMRLLLLBEQ");
    // The macros of a stage left out still go (as Postfix).
    assert_eq!(
        milter::macros(&got, b'H'),
        [("{client_name}".to_owned(), "client.test".to_owned())]
    );
}

#[test]
fn a_skip_stops_the_body() {
    let milter = TestMilter::start(
        Script::new()
            .protocol(protocol::SKIP)
            .answer(|c| matches!(c, Command::Body(_)).then(|| vec![Act::Respond(Response::Skip)])),
    );
    let body = vec![b'x'; 200_000];
    let mut message = b"Subject: big\r\n\r\n".to_vec();
    message.extend_from_slice(&body);
    let outcome = runtime().block_on(whole(&milter.addr(), &message));
    assert_eq!(outcome.verdict, Verdict::Continue);
    milter.wait_for("QUIT", |r| r.last() == Some(&Command::Quit));
    assert_eq!(milter::stages(&milter.received()), "OCHMRTLNBEQ");
}

#[test]
fn a_large_body_arrives_whole_in_chunks_of_at_most_65535() {
    let milter = TestMilter::start(Script::new());
    let body: Vec<u8> = tarmac_testkit::noise(200_000, 7);
    let mut message = b"Subject: big\r\n\r\n".to_vec();
    message.extend_from_slice(&body);
    let outcome = runtime().block_on(whole(&milter.addr(), &message));
    assert_eq!(outcome.verdict, Verdict::Continue);
    milter.wait_for("QUIT", |r| r.last() == Some(&Command::Quit));
    let got = milter.received();
    let chunks: Vec<usize> = got
        .iter()
        .filter_map(|c| match c {
            Command::Body(b) => Some(b.len()),
            _ => None,
        })
        .collect();
    assert_eq!(chunks, [65_535, 65_535, 65_535, 3_395]);
    assert_eq!(milter::body(&got), body);
}

#[test]
fn the_link_serves_a_second_message_and_aborts_a_reset_one() {
    let milter = TestMilter::start(Script::new());
    runtime().block_on(async {
        let mut link = envelope(&milter.addr()).await;
        let held = Held::from_bytes(MESSAGE.to_vec());
        assert_eq!(
            link.message(&held, &[], T).await.unwrap().verdict,
            Verdict::Continue
        );
        assert_eq!(
            link.mail("a@x.test", &[], &[], T).await,
            Ok(Verdict::Continue)
        );
        assert_eq!(
            link.rcpt("b@x.test", &[], &[], T).await,
            Ok(Verdict::Continue)
        );
        assert_eq!(
            link.message(&held, &[], T).await.unwrap().verdict,
            Verdict::Continue
        );
        assert_eq!(
            link.mail("a@x.test", &[], &[], T).await,
            Ok(Verdict::Continue)
        );
        link.abort(T).await.unwrap();
        // Nothing open: a second abort sends nothing.
        link.abort(T).await.unwrap();
        link.quit().await;
    });
    milter.wait_for("QUIT", |r| r.last() == Some(&Command::Quit));
    assert_eq!(
        milter::stages(&milter.received()),
        "OCHMRTLLLLNBEMRTLLLLNBEMAQ"
    );
}

#[test]
fn broken_milters_are_failures() {
    let rt = runtime();
    // A negotiation asking for more than offered.
    let milter = TestMilter::start(Script::new().actions(0x100));
    let err = rt
        .block_on(MilterLink::open(&milter.addr(), T))
        .unwrap_err();
    assert!(matches!(err, Failure::Garbage(_)), "{err:?}");

    // Garbage at RCPT: a frame of length 0.
    let milter = TestMilter::start(
        Script::new()
            .answer(|c| matches!(c, Command::Rcpt(_)).then(|| vec![Act::Raw(vec![0, 0, 0, 0])])),
    );
    rt.block_on(async {
        let mut link = MilterLink::open(&milter.addr(), T).await.unwrap();
        link.connect(&info(), &[], T).await.unwrap();
        link.mail("a@x.test", &[], &[], T).await.unwrap();
        let err = link.rcpt("b@x.test", &[], &[], T).await.unwrap_err();
        assert!(matches!(err, Failure::Garbage(_)), "{err:?}");
    });

    // A modification before end of body.
    let milter = TestMilter::start(Script::new().answer(|c| {
        matches!(c, Command::Helo(_)).then(|| {
            vec![Act::Respond(Response::AddHeader {
                name: "X".into(),
                value: "y".into(),
            })]
        })
    }));
    rt.block_on(async {
        let mut link = MilterLink::open(&milter.addr(), T).await.unwrap();
        let err = link.helo("x", &[], T).await.unwrap_err();
        assert!(matches!(err, Failure::Garbage(_)), "{err:?}");
    });

    // Closed mid-conversation.
    let milter = TestMilter::start(
        Script::new().answer(|c| matches!(c, Command::Eoh).then(|| vec![Act::Close])),
    );
    rt.block_on(async {
        let mut link = envelope(&milter.addr()).await;
        let err = link
            .message(&Held::from_bytes(MESSAGE.to_vec()), &[], T)
            .await
            .unwrap_err();
        assert!(matches!(err, Failure::Io(_)), "{err:?}");
    });

    // Stalled: a short timeout, and it is a timeout.
    let milter = TestMilter::start(
        Script::new().answer(|c| matches!(c, Command::Mail(_)).then(|| vec![Act::Stall])),
    );
    rt.block_on(async {
        let mut link = MilterLink::open(&milter.addr(), T).await.unwrap();
        let short = Duration::from_millis(100);
        let err = link.mail("a@x.test", &[], &[], short).await.unwrap_err();
        assert_eq!(err, Failure::Timeout);
    });

    // Nobody listening.
    let port = tarmac_testkit::free_port();
    let addr = MilterAddr::Inet(([127, 0, 0, 1], port).into());
    let err = rt.block_on(MilterLink::open(&addr, T)).unwrap_err();
    assert!(matches!(err, Failure::Connect(_)), "{err:?}");
}

#[test]
fn opendkim_signs_through_the_link_and_the_signature_verifies() {
    let Some(python) = dkimpy() else { return };
    let Some(opendkim) = OpenDkim::start("example.test", "sel") else {
        return;
    };
    let addr = MilterAddr::Inet(opendkim.addr());
    let message = b"Received: from client.test ([127.0.0.1]) by mx.test\r\n\
From: <a@example.test>\r\nTo: <b@example.org>\r\nSubject: signed\r\n\
Date: Mon, 07 Dec 2026 12:00:00 +0000\r\nMessage-ID: <m1@example.test>\r\n\r\n\
Signed through tarmac's milter link.\r\nSecond line.\r\n";
    let foreign = b"From: <c@elsewhere.test>\r\nTo: <b@example.org>\r\nSubject: not ours\r\n\
Date: Mon, 07 Dec 2026 12:00:00 +0000\r\n\r\nNot signed.\r\n";
    let (signed, unsigned) = runtime().block_on(async {
        let mut link = MilterLink::open(&addr, T).await.unwrap();
        let info = ConnectInfo {
            hostname: "localhost",
            addr: "127.0.0.1:40001".parse().unwrap(),
        };
        let macros = [("j", "mx.test"), ("{daemon_name}", "tarmac")];
        assert_eq!(link.connect(&info, &macros, T).await, Ok(Verdict::Continue));
        assert_eq!(
            link.helo("client.test", &[], T).await,
            Ok(Verdict::Continue)
        );
        let mut outcomes = Vec::new();
        for (n, (from, msg)) in [
            ("a@example.test", &message[..]),
            ("c@elsewhere.test", &foreign[..]),
        ]
        .into_iter()
        .enumerate()
        {
            let mail = [("{mail_addr}", from)];
            assert_eq!(link.mail(from, &[], &mail, T).await, Ok(Verdict::Continue));
            assert_eq!(
                link.rcpt("b@example.org", &[], &[("{rcpt_addr}", "b@example.org")], T)
                    .await,
                Ok(Verdict::Continue)
            );
            let id = format!("Q{n}");
            let outcome = link
                .message(&Held::from_bytes(msg.to_vec()), &[("i", &id)], T)
                .await
                .unwrap_or_else(|e| panic!("{e}\nOpenDKIM: {}", opendkim.stderr()));
            outcomes.push(outcome);
        }
        link.quit().await;
        let unsigned = outcomes.pop().unwrap();
        (outcomes.pop().unwrap(), unsigned)
    });

    assert!(
        matches!(signed.verdict, Verdict::Continue | Verdict::Accept),
        "{signed:?}"
    );
    let value = signed
        .edits
        .iter()
        .find_map(|e| match e {
            Edit::InsertHeader {
                index: 0,
                name,
                value,
            }
            | Edit::AddHeader { name, value }
                if name == "DKIM-Signature" =>
            {
                Some(value.clone())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no DKIM-Signature edit: {signed:?}"));
    assert!(value.contains("d=example.test;"), "{value}");
    assert!(value.contains("s=sel;"), "{value}");

    let mut with_signature = format!("DKIM-Signature: {value}\r\n").into_bytes();
    with_signature.extend_from_slice(message);
    let name = opendkim.dns_name();
    assert!(
        verifies(python, &with_signature, &name, opendkim.dns_record()),
        "the signature does not verify:\n{}",
        String::from_utf8_lossy(&with_signature)
    );
    let changed = String::from_utf8_lossy(&with_signature).replace("Second line.", "Second line!");
    assert!(
        !verifies(python, changed.as_bytes(), &name, opendkim.dns_record()),
        "a changed body still verifies"
    );

    assert!(
        matches!(unsigned.verdict, Verdict::Continue | Verdict::Accept),
        "{unsigned:?}"
    );
    assert!(
        unsigned.edits.is_empty(),
        "mail from another domain was changed: {:?}",
        unsigned.edits
    );
}
