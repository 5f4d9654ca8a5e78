//! The session on invented time (STYLE.md §5), driven by the testkit's one set of session
//! doubles: [`Pair`] jumps between inputs, records each side's output and plays a scripted,
//! Postfix-like downstream that checks the trust boundary as it reads, like quinn's `Pair`.
//! The fuzz target and the session bench use the same doubles. Bounds that only the session's
//! private state shows (its line buffer's capacity) are unit tests in
//! `src/smtp/session/buffer_tests.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tarmac::config::{AnnounceClient, BareNewline, Config};
use tarmac::smtp::question::{LookupAnswer, Query};
use tarmac::smtp::*;
use tarmac_testkit::session::{Pair, config, peer};

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

const BANNER: &str = "220 mx.test ESMTP tarmac\r\n";
const EHLO_REPLY: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 25000000\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n";

/// A whole transaction, as a client would pipeline it.
const TRANSACTION: &[u8] = b"EHLO client.example\r\nMAIL FROM:<a@example.org> BODY=8BITMIME\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<unknown@example.org>\r\nDATA\r\nSubject: hi\r\n\r\n..leading dot\r\nbody \xc3\xa9\r\n.\r\nQUIT\r\n";

const TRANSACTION_REPLIES: &str = concat!(
    "220 mx.test ESMTP tarmac\r\n",
    "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 25000000\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
    "250 2.1.0 Ok\r\n",
    "250 2.1.5 Ok\r\n",
    "550 5.1.1 <unknown@example.org>: User unknown\r\n",
    "354 End data with <CR><LF>.<CR><LF>\r\n",
    "250 2.0.0 Ok: queued as 1\r\n",
    "221 2.0.0 Bye\r\n",
);

/// The trace header waits at the `354` for what follows it: `body` (the client's first bytes
/// after the `354`, relayed as they are) leaves in the same `poll_transmit_downstream` as the
/// header, byte for byte what the downstream would have got in two writes.
#[track_caller]
fn assert_header_leaves_with(body: &[u8]) {
    let mut pair = Pair::new(config());
    pair.send(
        b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n",
    );
    assert!(
        pair.take_output()
            .ends_with("354 End data with <CR><LF>.<CR><LF>\r\n")
    );
    // Nothing went out at the 354: the last write is still DATA.
    assert_eq!(
        pair.downstream_log
            .last()
            .map(|(_, write)| write.as_slice()),
        Some(&b"DATA\r\n"[..])
    );
    let writes = pair.downstream_log.len();
    pair.send(body);
    let write = String::from_utf8_lossy(&pair.downstream_log[writes].1).into_owned();
    assert!(
        write.starts_with("Received: from client.example ([192.0.2.7])\r\n"),
        "{write}"
    );
    let header_end = write.find("+0000\r\n").map(|at| at + 7);
    assert_eq!(
        header_end.map(|at| &write.as_bytes()[at..]),
        Some(body),
        "{write}"
    );
}

#[test]
fn trace_header_leaves_with_the_first_body_bytes() {
    assert_header_leaves_with(b"Subject: hi\r\n");
}

#[test]
fn trace_header_of_an_empty_body_leaves_with_the_dot() {
    assert_header_leaves_with(b".\r\n");
}

#[test]
fn banner_ehlo_quit() {
    let mut pair = Pair::new(config());
    assert_eq!(pair.take_output(), BANNER);
    pair.send(b"EHLO client.example\r\nQUIT\r\n");
    assert_eq!(pair.take_output(), format!("{EHLO_REPLY}221 2.0.0 Bye\r\n"));
    assert!(pair.closed);
    assert!(
        pair.connects.is_empty(),
        "local commands never open a downstream"
    );
    assert_eq!(pair.session.report().result, "quit");
}

#[test]
fn full_transaction_is_relayed() {
    let mut pair = Pair::new(config());
    pair.send(TRANSACTION);
    assert_eq!(pair.take_output(), TRANSACTION_REPLIES);
    assert_eq!(pair.downstream.delivered.len(), 1);
    let body = String::from_utf8(pair.downstream.delivered[0].clone()).unwrap();
    assert!(body.starts_with("Received: from client.example ([192.0.2.7])\r\n\tby mx.test (tarmac) with ESMTP;\r\n\tMon, 23 Nov 2026 13:01:02 +0000\r\n"), "{body}");
    assert!(
        body.ends_with("Subject: hi\r\n\r\n..leading dot\r\nbody é\r\n"),
        "{body}"
    );
    assert_eq!(
        pair.downstream.commands[..4],
        [
            "EHLO mx.test",
            "MAIL FROM:<a@example.org> BODY=8BITMIME",
            "RCPT TO:<b@example.net>",
            "RCPT TO:<unknown@example.org>"
        ]
    );
    let report = pair.session.report();
    assert_eq!(
        (report.msgs, report.rcpts, report.result),
        (1, 1, "delivered")
    );
    // The downstream's 550 to the unknown recipient, counted at its stage for the metrics.
    assert_eq!(report.refusals.0, [[0, 0], [0, 0], [0, 1], [0, 0], [0, 0]]);
    assert_eq!(report.helo, Some(&b"client.example"[..]));
    assert_eq!(pair.downstream_closes, 1, "QUIT closes the downstream");
}

#[test]
fn every_split_gives_the_same_replies() {
    for at in 0..=TRANSACTION.len() {
        let mut pair = Pair::new(config());
        pair.send(&TRANSACTION[..at]);
        pair.send(&TRANSACTION[at..]);
        assert_eq!(pair.take_output(), TRANSACTION_REPLIES, "split at {at}");
        assert_eq!(pair.downstream.delivered.len(), 1, "split at {at}");
    }
    let mut pair = Pair::new(config());
    for byte in TRANSACTION {
        pair.send(std::slice::from_ref(byte));
    }
    assert_eq!(
        pair.take_output(),
        TRANSACTION_REPLIES,
        "one byte at a time"
    );
}

#[test]
fn xclient_announces_the_client() {
    let mut config = config();
    config.downstream.announce_client = AnnounceClient::Xclient;
    let mut pair = Pair::new(config);
    pair.send(TRANSACTION);
    assert_eq!(pair.take_output(), TRANSACTION_REPLIES);
    assert_eq!(
        pair.downstream.commands[..3],
        [
            "EHLO mx.test",
            "XCLIENT ADDR=192.0.2.7 PORT=53211 NAME=[UNAVAILABLE] PROTO=ESMTP HELO=client.example",
            // The client's own name after XCLIENT (finding 3 of issue 13: not tarmac's).
            "EHLO client.example"
        ]
    );
}

fn smuggle(mode: BareNewline, body: &[u8]) -> Pair {
    let mut config = config();
    config.limits.bare_newline = mode;
    let mut pair = Pair::new(config);
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
    pair.take_output();
    pair.send(body);
    pair
}

const SMUGGLING_VECTORS: [&[u8]; 5] = [b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\n", b"\r.\r"];

#[test]
fn smuggling_vectors_are_rejected_and_nothing_is_delivered() {
    for vector in SMUGGLING_VECTORS {
        let mut body = b"Subject: x\r\n\r\ntext".to_vec();
        body.extend_from_slice(vector);
        body.extend_from_slice(b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled\r\n.\r\n");
        let mut pair = smuggle(BareNewline::Reject, &body);
        assert_eq!(
            pair.take_output(),
            "550 5.6.0 Error: bare <CR> or <LF> in message body; message not accepted\r\n",
            "vector {vector:?}"
        );
        assert!(pair.downstream.delivered.is_empty(), "vector {vector:?}");
        assert!(
            !pair.ds_open,
            "downstream dropped without the dot, vector {vector:?}"
        );
        assert!(
            !pair.downstream.commands.iter().any(|c| c.contains("evil")),
            "vector {vector:?}"
        );
    }
}

#[test]
fn smuggling_vectors_are_normalised_into_one_message() {
    for vector in SMUGGLING_VECTORS {
        let mut body = b"Subject: x\r\n\r\ntext".to_vec();
        body.extend_from_slice(vector);
        body.extend_from_slice(b"MAIL FROM:<evil@example.org>\r\nDATA\r\nsmuggled\r\n.\r\n");
        let mut pair = smuggle(BareNewline::Normalize, &body);
        assert_eq!(
            pair.take_output(),
            "250 2.0.0 Ok: queued as 1\r\n",
            "vector {vector:?}"
        );
        assert_eq!(pair.downstream.delivered.len(), 1, "vector {vector:?}");
        let delivered = &pair.downstream.delivered[0];
        assert!(
            find(delivered, b"MAIL FROM:<evil@example.org>").is_some(),
            "smuggled text stays in the body"
        );
        assert!(
            !pair.downstream.commands.iter().any(|c| c.contains("evil")),
            "vector {vector:?}"
        );
        for (i, &b) in delivered.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(
                    delivered[i - 1],
                    b'\r',
                    "bare LF relayed, vector {vector:?}"
                );
            }
        }
    }
}

#[test]
fn end_of_data_250_waits_for_the_downstream() {
    let mut pair = Pair::new(config());
    pair.downstream.stall_after_dot = true;
    pair.send(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\n",
    );
    let out = pair.take_output();
    assert!(
        out.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"),
        "{out}"
    );
    assert_eq!(pair.downstream.delivered.len(), 1);
    // The downstream never answers: after the reply timeout the client gets a 4xx, never 250.
    pair.advance(Duration::from_secs(299));
    assert_eq!(pair.take_output(), "");
    pair.advance(Duration::from_secs(1));
    assert_eq!(
        pair.take_output(),
        "451 4.4.2 Error: downstream server unavailable, please try again later\r\n"
    );
    assert_eq!(pair.session.report().msgs, 0);
}

#[test]
fn downstream_rejection_of_the_message_is_passed_back() {
    let mut pair = Pair::new(config());
    pair.downstream.final_reply = Some("554 5.7.1 Message rejected");
    pair.send(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\n",
    );
    assert!(
        pair.take_output()
            .ends_with("354 End data with <CR><LF>.<CR><LF>\r\n554 5.7.1 Message rejected\r\n")
    );
    assert_eq!(pair.session.report().result, "rejected");
}

#[test]
fn pipelined_batch_is_answered_in_order() {
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.send(b"EHLO c\r\nNOOP\r\nMAIL FROM:<tempfail@example.org>\r\nNOOP\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRSET\r\nVRFY x\r\nEXPN x\r\nHELP\r\n");
    assert_eq!(
        pair.take_output(),
        format!(
            "{EHLO_REPLY}250 2.0.0 Ok\r\n451 4.3.0 Try later\r\n250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n\
             252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n502 5.5.1 Error: EXPN not available\r\n\
             214 2.0.0 See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT\r\n"
        )
    );
    assert_eq!(
        pair.downstream.commands.last().unwrap(),
        "RSET",
        "RSET keeps the downstream in step"
    );
}

#[test]
fn over_long_line_then_a_good_command() {
    let mut pair = Pair::new(config());
    pair.take_output();
    let mut line = vec![b'A'; 10_000];
    line.extend_from_slice(b"\r\nNOOP\r\n");
    pair.send(&line);
    assert_eq!(
        pair.take_output(),
        "500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
    );
    // Exactly at the limit (4096 with CRLF) is fine.
    let mut line = b"NOOP ".to_vec();
    line.resize(4094, b'x');
    line.extend_from_slice(b"\r\n");
    pair.send(&line);
    assert_eq!(pair.take_output(), "250 2.0.0 Ok\r\n");
    line.insert(5, b'x');
    pair.send(&line);
    assert_eq!(pair.take_output(), "500 5.5.2 Error: line too long\r\n");
}

#[test]
fn bare_lf_command_is_refused() {
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.send(b"NOOP\nNOOP\r\n");
    assert_eq!(
        pair.take_output(),
        "500 5.5.2 Error: bare <LF> received\r\n250 2.0.0 Ok\r\n"
    );
}

#[test]
fn unknown_command_limit_closes_with_421() {
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.send(b"FOO\r\nBAR\r\nBAZ\r\nQUUX\r\nNOOP\r\n");
    assert_eq!(
        pair.take_output(),
        "500 5.5.1 Command unrecognized\r\n".repeat(3)
            + "421 4.7.0 mx.test Error: too many errors\r\n"
    );
    assert!(pair.closed);
    assert_eq!(pair.session.report().result, "too-many-errors");
}

#[test]
fn client_xclient_and_xforward_are_refused() {
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.send(b"EHLO c\r\nXCLIENT ADDR=10.0.0.1\r\nXFORWARD ADDR=10.0.0.1\r\n");
    let out = pair.take_output();
    assert!(out.ends_with("550 5.7.0 Error: insufficient authorization\r\n550 5.7.0 Error: insufficient authorization\r\n"), "{out}");
    assert!(pair.connects.is_empty());
}

#[test]
fn max_recipients_gets_452() {
    let mut config = config();
    config.limits.max_recipients = 2;
    let mut pair = Pair::new(config);
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b1@example.net>\r\nRCPT TO:<b2@example.net>\r\nRCPT TO:<b3@example.net>\r\n");
    assert!(
        pair.take_output()
            .ends_with("250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n452 4.5.3 Error: too many recipients\r\n")
    );
    assert_eq!(
        pair.downstream
            .commands
            .iter()
            .filter(|c| c.starts_with("RCPT"))
            .count(),
        2
    );
}

#[test]
fn declared_size_over_limit_gets_552_without_downstream() {
    let mut pair = Pair::new(config());
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org> SIZE=30000000\r\n");
    assert!(
        pair.take_output()
            .ends_with("552 5.3.4 Error: message size exceeds fixed limit\r\n")
    );
    assert!(pair.connects.is_empty());
}

#[test]
fn body_over_limit_gets_552_and_nothing_delivered() {
    let mut config = config();
    config.limits.max_message_size = 2000;
    let mut pair = Pair::new(config);
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
    pair.take_output();
    let mut body = b"x".repeat(3000);
    body.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
    pair.send(&body);
    assert_eq!(
        pair.take_output(),
        "552 5.3.4 Error: message size exceeds fixed limit\r\n250 2.0.0 Ok\r\n"
    );
    assert!(pair.downstream.delivered.is_empty());
    assert!(!pair.ds_open);
}

#[test]
fn command_and_idle_timeouts() {
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.send(b"NOO");
    pair.advance(Duration::from_secs(299));
    assert_eq!(pair.take_output(), "");
    pair.advance(Duration::from_secs(1));
    assert_eq!(
        pair.take_output(),
        "421 4.4.2 mx.test Error: timeout exceeded\r\n"
    );
    assert!(pair.closed);
    assert_eq!(pair.session.report().result, "timeout");

    // `idle` bounds the whole session without a completed command; with a command timeout
    // longer than it, it is the one that fires.
    let mut config = config();
    config.timeouts.command = Duration::from_secs(900);
    let mut pair = Pair::new(config);
    pair.take_output();
    assert_eq!(
        pair.session.poll_timeout(),
        Some(pair.now + Duration::from_secs(600))
    );
    pair.advance(Duration::from_secs(599));
    pair.session.handle_timeout(pair.now); // early: a no-op
    assert_eq!(pair.take_output(), "");
    pair.advance(Duration::from_secs(1));
    assert_eq!(
        pair.take_output(),
        "421 4.4.2 mx.test Error: timeout exceeded\r\n"
    );
}

#[test]
fn data_timeout_closes_downstream_without_dot() {
    let mut pair = Pair::new(config());
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\npartial body\r\n");
    pair.take_output();
    pair.advance(Duration::from_secs(180));
    assert_eq!(
        pair.take_output(),
        "421 4.4.2 mx.test Error: timeout exceeded\r\n"
    );
    assert!(!pair.ds_open);
    assert!(pair.downstream.delivered.is_empty());
}

#[test]
fn client_gone_mid_data_closes_downstream_without_dot() {
    let mut pair = Pair::new(config());
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\npartial body\r\n");
    pair.session.handle_client_eof(pair.now);
    pair.pump();
    assert!(pair.closed && !pair.ds_open);
    assert!(pair.downstream.delivered.is_empty());
    assert!(!pair.downstream.input.ends_with(b"QUIT\r\n"));
}

#[test]
fn connect_failure_tries_the_next_server_then_451() {
    let mut config = config();
    config.downstream.servers = vec![
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    ];
    let mut pair = Pair::new(config.clone());
    pair.refuse_connects = 1;
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    assert!(pair.take_output().ends_with("250 2.1.0 Ok\r\n"));
    assert_eq!(pair.connects, config.downstream.servers);

    let mut pair = Pair::new(config.clone());
    pair.refuse_connects = 2;
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n");
    assert!(pair.take_output().ends_with(
        "451 4.4.2 Error: downstream server unavailable, please try again later\r\n503 5.5.1 Error: need MAIL command\r\n"
    ));
}

#[test]
fn connect_timeout_tries_the_next_server() {
    let mut config = config();
    config.downstream.servers = vec!["127.0.0.1:1".parse().unwrap()];
    let mut pair = Pair::new(config);
    pair.auto_downstream = false;
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    pair.take_output();
    // Connected, but the banner never comes: the reply timeout applies.
    pair.advance(Duration::from_secs(300));
    assert_eq!(
        pair.take_output(),
        "451 4.4.2 Error: downstream server unavailable, please try again later\r\n"
    );
    assert!(!pair.ds_open);
}

#[test]
fn downstream_closing_mid_transaction_gives_451() {
    let mut pair = Pair::new(config());
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    pair.take_output();
    pair.session
        .handle_downstream(pair.now, pair.link, DownstreamEvent::Closed);
    pair.pump();
    pair.send(b"RCPT TO:<b@example.net>\r\nRSET\r\nMAIL FROM:<a@example.org>\r\n");
    assert_eq!(
        pair.take_output(),
        "451 4.4.2 Error: downstream server unavailable, please try again later\r\n250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n"
    );
    assert_eq!(pair.connects.len(), 2, "a new MAIL opens a new downstream");
}

#[test]
fn mail_requires_helo_and_rcpt_requires_mail() {
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nHELO c\r\nMAIL FROM:<a@example.org>\r\nMAIL FROM:<a@example.org>\r\nDATA\r\n");
    assert_eq!(
        pair.take_output(),
        "503 5.5.1 Error: send HELO/EHLO first\r\n503 5.5.1 Error: need MAIL command\r\n503 5.5.1 Error: need MAIL command\r\n\
         250 mx.test\r\n250 2.1.0 Ok\r\n503 5.5.1 Error: nested MAIL command\r\n503 5.5.1 Error: need RCPT command\r\n"
    );
}

#[test]
fn graceful_shutdown_closes_idle_sessions_and_lets_transactions_finish() {
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.session.handle_shutdown(pair.now, Shutdown::Graceful);
    pair.pump();
    assert_eq!(
        pair.take_output(),
        "421 4.3.2 mx.test Service shutting down, please try again later\r\n"
    );
    assert!(pair.closed);

    let mut pair = Pair::new(config());
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
    pair.take_output();
    pair.session.handle_shutdown(pair.now, Shutdown::Graceful);
    pair.pump();
    assert!(!pair.closed);
    pair.send(b"hi\r\n.\r\n");
    assert_eq!(
        pair.take_output(),
        "250 2.0.0 Ok: queued as 1\r\n421 4.3.2 mx.test Service shutting down, please try again later\r\n"
    );
    assert_eq!(pair.downstream.delivered.len(), 1);
}

#[test]
fn closed_is_sticky() {
    let mut pair = Pair::new(config());
    pair.send(b"QUIT\r\n");
    pair.take_output();
    pair.send(b"NOOP\r\n");
    pair.session
        .handle_timeout(pair.now + Duration::from_secs(10_000));
    pair.session.handle_client_eof(pair.now);
    pair.pump();
    assert_eq!(pair.take_output(), "");
    assert!(pair.session.poll_action().is_none());
    assert!(!pair.session.wants_read());
}

#[test]
fn non_ascii_sender_needs_smtputf8() {
    let mut pair = Pair::new(config());
    pair.send(
        "EHLO c\r\nMAIL FROM:<jösé@example.org>\r\nMAIL FROM:<jösé@example.org> SMTPUTF8\r\n"
            .as_bytes(),
    );
    assert!(
        pair.take_output().ends_with(
            "553 5.6.7 Error: non-ASCII sender address needs SMTPUTF8\r\n250 2.1.0 Ok\r\n"
        )
    );
}

#[test]
fn waiting_for_a_slow_downstream_reports_no_stale_deadline() {
    // Found by the session fuzz target: the idle deadline passed while the session waited for
    // the downstream; it was not handled there but still reported, so the driver spun.
    let mut pair = Pair::new(config());
    // The session started at the pair's first instant (the pair moves time only in `advance`).
    let started = pair.now;
    pair.auto_downstream = false;
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    let replies: [&[u8]; 3] = [
        b"220 ds.test ESMTP\r\n",
        b"250 ds.test\r\n",
        b"250 2.1.0 Ok\r\n",
    ];
    for reply in replies {
        // Each downstream reply arrives just before the reply timeout, so the wait goes on.
        pair.advance(Duration::from_secs(299));
        let at = pair
            .session
            .poll_timeout()
            .expect("the downstream timer runs");
        assert!(
            at > pair.now,
            "a deadline at or before now would spin the driver"
        );
        pair.session
            .handle_downstream(pair.now, pair.link, DownstreamEvent::Data(reply));
        pair.pump();
    }
    assert!(pair.now > started + Duration::from_secs(600));
    assert!(pair.take_output().ends_with("250 2.1.0 Ok\r\n"));
    assert!(
        !pair.closed,
        "the idle time restarts when the relayed command completes"
    );
    assert_eq!(
        pair.session.poll_timeout(),
        Some(pair.now + Duration::from_secs(300)),
        "the command timeout runs from the relayed reply"
    );
}

fn behind_balancer() -> Config {
    let mut config = config();
    config.server.proxy_protocol_from = vec!["192.0.2.0/24".parse().unwrap()];
    config
}

#[test]
fn proxy_header_comes_before_the_banner_and_names_the_client() {
    let header = b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 25\r\n";
    let mut script = header.to_vec();
    script.extend_from_slice(TRANSACTION);
    for at in 0..=script.len() {
        let mut pair = Pair::new(behind_balancer());
        assert_eq!(pair.take_output(), "", "no banner before the header");
        pair.send(&script[..at]);
        pair.send(&script[at..]);
        assert_eq!(pair.take_output(), TRANSACTION_REPLIES, "split at {at}");
        assert_eq!(
            pair.session.report().client,
            "203.0.113.9:40000".parse().unwrap()
        );
        let body = String::from_utf8(pair.downstream.delivered[0].clone()).unwrap();
        assert!(
            body.starts_with("Received: from client.example ([203.0.113.9])"),
            "{body}"
        );
    }
}

#[test]
fn proxy_v2_header_and_health_checks() {
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x0c".to_vec();
    v2.extend_from_slice(&[203, 0, 113, 9, 198, 51, 100, 1]);
    v2.extend_from_slice(&40000u16.to_be_bytes());
    v2.extend_from_slice(&25u16.to_be_bytes());
    v2.extend_from_slice(b"QUIT\r\n");
    let mut pair = Pair::new(behind_balancer());
    pair.send(&v2);
    assert_eq!(pair.take_output(), format!("{BANNER}221 2.0.0 Bye\r\n"));
    assert_eq!(
        pair.session.report().client,
        "203.0.113.9:40000".parse().unwrap()
    );

    // PROXY UNKNOWN (a health check) keeps the balancer's own address.
    let mut pair = Pair::new(behind_balancer());
    pair.send(b"PROXY UNKNOWN\r\nQUIT\r\n");
    assert_eq!(pair.take_output(), format!("{BANNER}221 2.0.0 Bye\r\n"));
    assert_eq!(
        pair.session.report().client,
        "192.0.2.7:53211".parse().unwrap()
    );
}

#[test]
fn missing_or_bad_proxy_header_closes_without_a_banner() {
    for bad in [
        &b"EHLO client.example\r\n"[..],
        b"PROXY TCP4 300.0.0.1 1.2.3.4 1 2\r\n",
    ] {
        let mut pair = Pair::new(behind_balancer());
        pair.send(bad);
        assert_eq!(pair.take_output(), "", "{bad:?}");
        assert!(pair.closed);
        assert_eq!(pair.session.report().result, "bad-proxy");
    }
    let mut pair = Pair::new(behind_balancer());
    pair.send(b"PROXY TCP4 203.0.113.9");
    assert_eq!(
        pair.session.poll_timeout(),
        Some(pair.now + Duration::from_secs(5))
    );
    pair.advance(Duration::from_secs(5));
    assert_eq!(pair.take_output(), "");
    assert!(pair.closed);
    assert_eq!(pair.session.report().result, "timeout");
}

#[test]
fn clients_not_behind_a_balancer_get_the_banner_at_once() {
    let mut config = behind_balancer();
    config.server.proxy_protocol_from = vec!["203.0.113.0/24".parse().unwrap()];
    let mut pair = Pair::new(config);
    assert_eq!(pair.take_output(), BANNER);
}

#[test]
fn proxied_client_over_its_per_ip_cap_gets_421_instead_of_the_banner() {
    let mut pair = Pair::new(behind_balancer());
    pair.admit = false;
    pair.send(b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 25\r\nEHLO x\r\n");
    assert_eq!(
        pair.take_output(),
        "421 4.7.0 mx.test Too many connections, try again later\r\n"
    );
    assert!(pair.closed);
    assert_eq!(pair.session.report().result, "refused");
}

/// A session built with `Session::admitting` (rates answered later): it asks about the
/// client it was accepted from, reads nothing and greets only once admitted.
#[test]
fn an_admitting_session_asks_first_and_greets_once_admitted() {
    let now = Instant::now();
    let peer = peer(false, false);
    let client = peer.client;
    for admitted in [true, false] {
        let mut session = Session::admitting(Arc::new(config()), peer, now);
        assert!(matches!(
            session.poll_action(),
            Some(Action::Ask(Question::Admit(asked))) if asked == client
        ));
        assert!(session.poll_action().is_none());
        assert!(!session.wants_read(), "a talker waits unread");
        assert_eq!(
            session.poll_timeout(),
            None,
            "the driver's answer is bounded"
        );
        let mut out = Vec::new();
        session.poll_transmit(now, &mut out);
        assert!(out.is_empty(), "no banner before the answer");
        session.handle_answer(now, Answer::Admission(admitted));
        session.poll_transmit(now, &mut out);
        if admitted {
            assert_eq!(String::from_utf8_lossy(&out), BANNER);
            assert!(session.wants_read());
        } else {
            assert_eq!(
                String::from_utf8_lossy(&out),
                "421 4.7.0 mx.test Too many connections, try again later\r\n"
            );
            assert!(matches!(session.poll_action(), Some(Action::Close)));
            assert_eq!(session.report().result, "refused");
        }
    }
    // A balancer's connection still waits for its header, then asks for the client in it.
    let mut session = Session::admitting(Arc::new(behind_balancer()), peer, now);
    assert!(session.poll_action().is_none());
    session.handle_client_data(now, b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 25\r\n");
    let named: std::net::SocketAddr = "203.0.113.9:40000".parse().unwrap();
    assert!(matches!(
        session.poll_action(),
        Some(Action::Ask(Question::Admit(asked))) if asked == named
    ));
}

fn multiplexing() -> Config {
    let mut config = config();
    config.downstream.mode = tarmac::config::DownstreamMode::Multiplexing;
    config.downstream.announce_client = AnnounceClient::Xclient;
    config
}

#[test]
fn multiplexing_releases_after_each_transaction_and_reuses_it_for_the_same_client() {
    let mut pair = Pair::new(multiplexing());
    let message = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\n";
    pair.send(b"EHLO client.example\r\n");
    pair.send(message);
    assert!(
        pair.pooled.is_some(),
        "released once the message was accepted"
    );
    assert!(!pair.ds_open);
    pair.send(message);
    assert_eq!(pair.reuses, 1);
    assert_eq!(
        pair.connects.len(),
        1,
        "one connection for both transactions"
    );
    assert_eq!(pair.downstream.delivered.len(), 2);
    let xclient =
        "XCLIENT ADDR=192.0.2.7 PORT=53211 NAME=[UNAVAILABLE] PROTO=ESMTP HELO=client.example";
    assert_eq!(
        pair.downstream.commands,
        [
            "EHLO mx.test",
            xclient,
            "EHLO client.example",
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<b@example.net>",
            "DATA",
            // Announced for exactly this client already: nothing to renew.
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<b@example.net>",
            "DATA",
        ]
    );
    pair.send(b"QUIT\r\n");
    assert!(
        pair.take_output()
            .ends_with("250 2.0.0 Ok: queued as 1\r\n221 2.0.0 Bye\r\n")
    );
    assert_eq!(
        pair.downstream_closes, 0,
        "the pooled connection outlives the client"
    );
}

#[test]
fn multiplexing_resets_an_abandoned_transaction_before_releasing() {
    let mut pair = Pair::new(multiplexing());
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n");
    assert!(
        pair.ds_open && pair.pooled.is_none(),
        "held during the transaction"
    );
    pair.send(b"RSET\r\n");
    assert_eq!(pair.downstream.commands.last().unwrap(), "RSET");
    assert!(pair.pooled.is_some(), "released once the RSET was answered");
    // A rejected MAIL leaves nothing open either.
    pair.send(b"MAIL FROM:<tempfail@example.org>\r\n");
    assert!(pair.take_output().ends_with("451 4.3.0 Try later\r\n"));
    assert!(pair.pooled.is_some());
    assert_eq!(pair.reuses, 1);
}

#[test]
fn multiplexing_pools_an_abandoned_transaction_for_a_reset_but_never_a_half_sent_body() {
    let mut pair = Pair::new(multiplexing());
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nQUIT\r\n");
    assert!(
        pair.pooled.as_ref().expect("pooled, not closed").dirty,
        "marked for RSET by its next user"
    );
    assert_eq!(pair.downstream_closes, 0);
    // Its next user resets it before anything else.
    let mut next = pair.hand_pool_to(Pair::build_quiet(multiplexing(), Vec::new(), false));
    next.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    assert_eq!(next.reuses, 1);
    let commands = &next.downstream.commands;
    let rset = commands.iter().rposition(|c| c == "RSET").expect("RSET");
    assert_eq!(commands[rset + 1..], ["MAIL FROM:<a@example.org>"]);
    assert!(next.take_output().ends_with("250 2.1.0 Ok\r\n"));

    let mut pair = Pair::new(multiplexing());
    pair.send(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\npartial\r\n",
    );
    pair.session.handle_client_eof(pair.now);
    pair.pump();
    assert!(pair.pooled.is_none(), "a half-sent body is never reused");
    assert_eq!(pair.downstream_closes, 1);
    assert!(pair.downstream.delivered.is_empty());
}

fn xclient() -> Config {
    let mut config = config();
    config.downstream.announce_client = AnnounceClient::Xclient;
    config
}

/// Issue 13, finding 1: a connection announced for one client never carries another's
/// transaction. Postfix out of the box will not take a second XCLIENT: the pooled connection
/// is closed with QUIT and the stranger's MAIL goes out on a new one, after its own XCLIENT.
#[test]
fn a_pooled_connection_is_never_used_under_the_previous_clients_identity() {
    let mut first = Pair::new(multiplexing());
    first.send(b"EHLO trusted.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n");
    let mut stranger = first.hand_pool_to(Pair::build_quiet(multiplexing(), Vec::new(), false));
    stranger.send(b"EHLO stranger.example\r\nMAIL FROM:<x@example.com>\r\n");
    assert!(stranger.take_output().ends_with("250 2.1.0 Ok\r\n"));
    assert_eq!(stranger.reuses, 1, "the pooled connection was offered");
    assert_eq!(stranger.downstream_closes, 1, "and retired");
    assert_eq!(stranger.connects.len(), 1, "a new one for the stranger");
    assert_eq!(
        stranger.downstream.commands,
        [
            "EHLO mx.test",
            "XCLIENT ADDR=192.0.2.7 PORT=53211 NAME=[UNAVAILABLE] PROTO=ESMTP HELO=stranger.example",
            "EHLO stranger.example",
            "MAIL FROM:<x@example.com>",
        ]
    );
}

/// With a downstream that takes XCLIENT again (Postfix's `static:all`), the pooled connection
/// is reused, announced afresh for the next client.
#[test]
fn a_pooled_connection_is_announced_afresh_when_the_downstream_allows() {
    let mut first = Pair::build_quiet(multiplexing(), Vec::new(), false);
    first.downstream.xclient_again = true;
    first.pump();
    first.send(b"EHLO trusted.example\r\nMAIL FROM:<a@example.org>\r\nRSET\r\nQUIT\r\n");
    let mut next = first.hand_pool_to(Pair::build_quiet(multiplexing(), Vec::new(), false));
    next.send(b"EHLO other.example\r\nMAIL FROM:<x@example.com>\r\n");
    assert!(next.take_output().ends_with("250 2.1.0 Ok\r\n"));
    assert_eq!((next.reuses, next.connects.len()), (1, 0));
    let commands = &next.downstream.commands;
    assert_eq!(
        commands[commands.len() - 3..],
        [
            "XCLIENT ADDR=192.0.2.7 PORT=53211 NAME=[UNAVAILABLE] PROTO=ESMTP HELO=other.example",
            "EHLO other.example",
            "MAIL FROM:<x@example.com>",
        ]
    );
}

/// Issue 13, finding 2: without XCLIENT offered the client's MAIL is deferred with 451 4.3.5,
/// never relayed under tarmac's own address; the connection gets QUIT.
#[test]
fn a_downstream_without_xclient_defers_mail_instead_of_relaying_anonymously() {
    let mut pair = Pair::build_quiet(xclient(), Vec::new(), false);
    pair.downstream.xclient_again = false;
    pair.downstream.no_xclient = true;
    pair.pump();
    pair.take_output();
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    assert_eq!(
        pair.take_output(),
        format!(
            "{EHLO_REPLY}451 4.3.5 Error: downstream server refuses the client announcement, please try again later\r\n"
        )
    );
    assert_eq!(pair.downstream.commands, ["EHLO mx.test", "QUIT"]);
    assert_eq!(pair.downstream_closes, 1);
}

/// Issue 13, finding 4a: the downstream closes at end of data without a reply. The client
/// gets 451, and its next transaction's connection starts with the banner and EHLO, not with
/// a QUIT left over from the dead one.
#[test]
fn nothing_queued_for_a_dead_downstream_reaches_the_next_connection() {
    let mut pair = Pair::build_quiet(config(), Vec::new(), false);
    pair.downstream.stall_after_dot = true;
    pair.pump();
    pair.take_output();
    pair.send(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\n",
    );
    let old = pair.link;
    pair.session
        .handle_downstream(pair.now, old, DownstreamEvent::Closed);
    pair.pump();
    assert!(
        pair.take_output().ends_with(
            "451 4.4.2 Error: downstream server unavailable, please try again later\r\n"
        )
    );
    let mut stale = Vec::new();
    pair.session
        .poll_transmit_downstream(pair.now, old, &mut stale);
    assert!(stale.is_empty(), "bytes for the dead connection: {stale:?}");
    pair.downstream.stall_after_dot = false;
    pair.send(b"MAIL FROM:<a@example.org>\r\n");
    let output = pair.take_output();
    assert!(
        output.ends_with("250 2.1.0 Ok\r\n"),
        "{output} {:?}",
        pair.downstream.commands
    );
    assert_eq!(pair.connects.len(), 2);
    assert_eq!(
        pair.downstream.commands,
        ["EHLO mx.test", "MAIL FROM:<a@example.org>"]
    );
}

/// Issue 13, finding 4c: the unsent tail of a body for a downstream that went away mid-data
/// dies with that connection; the next one never sees it.
#[test]
fn a_body_tail_for_a_dead_downstream_is_never_written_to_the_next_one() {
    let mut pair = Pair::new(config());
    pair.take_output();
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
    assert!(
        pair.take_output()
            .ends_with("354 End data with <CR><LF>.<CR><LF>\r\n")
    );
    let old = pair.link;
    // Body bytes the driver has not taken yet (the downstream stopped reading)...
    let used = pair
        .session
        .handle_client_data(pair.now, b"Subject: tail\r\n\r\nattacker line\r\n");
    assert!(used > 0);
    // ...then the downstream breaks.
    pair.session
        .handle_downstream(pair.now, old, DownstreamEvent::Closed);
    pair.pump();
    pair.send(b".\r\nMAIL FROM:<a@example.org>\r\n");
    assert!(pair.take_output().contains("451 4.4.2 "));
    assert_eq!(pair.connects.len(), 2);
    assert!(
        !pair
            .downstream
            .commands
            .iter()
            .any(|c| c.contains("attacker")),
        "{:?}",
        pair.downstream.commands
    );
    assert_eq!(pair.downstream.commands[0], "EHLO mx.test");
}

/// Issue 13, finding 6: a downstream that greeted us gets QUIT before tarmac hangs up, also
/// when its handshake failed.
#[test]
fn a_greeted_downstream_gets_quit_when_its_handshake_fails() {
    let mut pair = Pair::build_quiet(xclient(), Vec::new(), false);
    pair.downstream.no_xclient = true;
    pair.pump();
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    assert_eq!(
        pair.downstream.commands.last().map(String::as_str),
        Some("QUIT")
    );
}

// The pre-greet checks and the verdict's effect on the dialog.
mod checks;
// Greet pause, pregreet talkers, the PASS cache, tarpit delays and stutter, stress mode.
mod tarpit;
// Operator rules at each stage.
mod rules;
// Greylisting at RCPT.
mod greylist;
// STARTTLS towards the downstream: opportunistic, required, none.
mod downstream_tls;
// Reputation: the weight before the verdict, the events a session records.
mod reputation;
// STARTTLS: the offer, the switch, discarded pipelining, the reset after the handshake.
mod starttls;
// Abuse bounds: error and junk limits, timeouts, stray PROXY headers, outbox caps.
mod bounds;
mod scanning;
// Transparent sessions: the original destination, spoof_source, no pool, no PROXY header.
mod transparent;
