//! STARTTLS on invented time (RFC 3207): who is offered it, the `220` and the switch, bytes
//! pipelined after it (CVE-2011-0411), the fresh start after the handshake, and the ways a
//! handshake ends badly.

use std::net::Ipv4Addr;

use super::*;
use tarmac::config::Dnsbl;
use tarmac::smtp::question::DnsblAnswer;

const EHLO_WITH_STARTTLS: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 25000000\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n";
const READY: &str = "220 2.0.0 Ready to start TLS\r\n";

/// A session offering STARTTLS, greeted, that said EHLO and STARTTLS and was told to go ahead.
fn switching() -> Pair {
    let mut pair = Pair::offering_starttls(config());
    pair.send(b"EHLO client.example\r\nSTARTTLS\r\n");
    assert_eq!(
        pair.take_output(),
        format!("{BANNER}{EHLO_WITH_STARTTLS}{READY}")
    );
    assert_eq!(pair.tls_switches, 1, "the switch comes with the 220");
    pair
}

/// [`switching`], then the handshake done with TLS 1.3.
fn over_tls() -> Pair {
    let mut pair = switching();
    pair.session
        .handle_tls_established(pair.now, TlsVersion::Tls13, None);
    pair.pump();
    pair
}

#[test]
fn ehlo_offers_starttls_only_when_the_driver_may() {
    let mut plain = Pair::new(config());
    plain.send(b"EHLO client.example\r\nSTARTTLS\r\n");
    assert_eq!(
        plain.take_output(),
        format!("{BANNER}{EHLO_REPLY}502 5.5.1 Error: STARTTLS not available\r\n")
    );
    assert_eq!(plain.tls_switches, 0);

    let mut offering = Pair::offering_starttls(config());
    offering.send(b"EHLO client.example\r\nHELO client.example\r\n");
    assert_eq!(
        offering.take_output(),
        format!("{BANNER}{EHLO_WITH_STARTTLS}250 mx.test\r\n")
    );
}

#[test]
fn a_withheld_client_is_not_offered_starttls() {
    let mut pair = Pair::offering_starttls(config());
    pair.session.handle_starttls_withheld();
    pair.send(b"EHLO client.example\r\nSTARTTLS\r\n");
    assert_eq!(
        pair.take_output(),
        format!("{BANNER}{EHLO_REPLY}502 5.5.1 Error: STARTTLS not available\r\n")
    );
    assert_eq!(pair.tls_switches, 0);
}

#[test]
fn after_the_handshake_the_session_starts_over_before_ehlo() {
    let mut pair = switching();
    assert_eq!(pair.session.report().tls, "no", "not before the handshake");
    assert!(!pair.session.wants_read(), "nothing to read mid-handshake");
    pair.session
        .handle_tls_established(pair.now, TlsVersion::Tls13, None);
    pair.pump();
    assert_eq!(pair.take_output(), "", "nothing is said unasked");
    assert_eq!(pair.session.report().tls, "TLSv1.3");
    assert_eq!(
        pair.session.report().helo,
        None,
        "the plain-text EHLO is forgotten"
    );
    // RFC 3207 §4.2: EHLO again before mail; STARTTLS is neither offered nor accepted.
    pair.send(b"MAIL FROM:<a@example.org>\r\nSTARTTLS\r\nEHLO client.example\r\nSTARTTLS\r\n");
    assert_eq!(
        pair.take_output(),
        format!(
            "503 5.5.1 Error: send HELO/EHLO first\r\n\
             503 5.5.1 Error: TLS already active\r\n\
             {EHLO_REPLY}\
             503 5.5.1 Error: TLS already active\r\n"
        )
    );
    assert_eq!(pair.tls_switches, 1);
}

#[test]
fn commands_pipelined_after_starttls_are_never_answered() {
    // CVE-2011-0411: the NOOP and MAIL arrive in the same buffer as the STARTTLS, before any
    // handshake, so an attacker on the path could have put them there.
    let mut pair = Pair::offering_starttls(config());
    pair.send(b"EHLO client.example\r\nSTARTTLS\r\nNOOP\r\nMAIL FROM:<evil@example.org>\r\n");
    assert_eq!(
        pair.take_output(),
        format!("{BANNER}{EHLO_WITH_STARTTLS}{READY}")
    );
    assert!(pair.client_pending.is_empty(), "consumed, to be dropped");
    pair.session
        .handle_tls_established(pair.now, TlsVersion::Tls12, None);
    pair.pump();
    pair.send(b"EHLO client.example\r\n");
    assert_eq!(
        pair.take_output(),
        EHLO_REPLY,
        "the first reply over TLS answers the first command sent over TLS"
    );
    assert!(pair.connects.is_empty(), "the injected MAIL went nowhere");
    assert_eq!(pair.session.report().tls, "TLSv1.2");
}

#[test]
fn starttls_with_arguments_or_mid_transaction_is_refused() {
    let mut pair = Pair::offering_starttls(config());
    pair.send(
        b"EHLO client.example\r\nSTARTTLS now\r\nMAIL FROM:<a@example.org>\r\nSTARTTLS\r\nRSET\r\n",
    );
    assert_eq!(
        pair.take_output(),
        format!(
            "{BANNER}{EHLO_WITH_STARTTLS}\
             501 5.5.2 Syntax error, expected: STARTTLS\r\n\
             250 2.1.0 Ok\r\n\
             503 5.5.1 Error: MAIL transaction in progress\r\n\
             250 2.0.0 Ok\r\n"
        )
    );
    assert_eq!(pair.tls_switches, 0);
}

#[test]
fn an_idle_downstream_is_let_go_before_the_switch() {
    let mut pair = Pair::offering_starttls(config());
    pair.send(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRSET\r\n");
    assert_eq!(pair.connects.len(), 1);
    pair.send(b"STARTTLS\r\n");
    assert!(pair.take_output().ends_with(READY));
    assert_eq!(pair.downstream_closes, 1, "it knew the plain-text HELO");
    assert_eq!(
        pair.downstream.commands.last().map(String::as_str),
        Some("QUIT")
    );
}

#[test]
fn a_late_handshake_times_out_without_a_reply() {
    let mut pair = switching();
    let t0 = pair.now;
    assert_eq!(
        pair.session.poll_timeout(),
        Some(t0 + Duration::from_secs(300))
    );
    pair.advance(Duration::from_secs(299));
    assert!(!pair.closed);
    pair.advance(Duration::from_secs(1));
    assert!(pair.closed);
    assert_eq!(pair.take_output(), "", "no plain text mid-handshake");
    assert_eq!(pair.session.report().result, "timeout");
}

#[test]
fn a_failed_handshake_closes_without_a_reply() {
    let mut pair = switching();
    pair.session.handle_tls_failed(pair.now);
    pair.pump();
    assert!(pair.closed);
    assert_eq!(pair.take_output(), "");
    let report = pair.session.report();
    assert_eq!((report.result, report.tls), ("tls-failed", "no"));
}

#[test]
fn shutdown_mid_handshake_closes_quietly_and_waits_for_it_otherwise() {
    let mut now = switching();
    now.session.handle_shutdown(now.now, Shutdown::Now);
    now.pump();
    assert!(now.closed);
    assert_eq!(now.take_output(), "");

    let mut graceful = switching();
    graceful
        .session
        .handle_shutdown(graceful.now, Shutdown::Graceful);
    graceful.pump();
    assert!(!graceful.closed, "the handshake may finish");
    graceful
        .session
        .handle_tls_established(graceful.now, TlsVersion::Tls13, None);
    graceful.pump();
    assert!(graceful.closed);
    assert_eq!(
        graceful.take_output(),
        "421 4.3.2 mx.test Service shutting down, please try again later\r\n",
        "said over TLS"
    );
}

#[test]
fn mail_over_tls_is_received_with_esmtps() {
    let mut pair = over_tls();
    pair.send(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n");
    assert!(
        pair.take_output()
            .ends_with("250 2.0.0 Ok: queued as 1\r\n221 2.0.0 Bye\r\n")
    );
    let body = String::from_utf8(pair.downstream.delivered[0].clone()).unwrap();
    assert!(
        body.starts_with(
            "Received: from client.example ([192.0.2.7])\r\n\tby mx.test (tarmac) with ESMTPS;"
        ),
        "{body}"
    );
    let report = pair.session.report();
    assert_eq!((report.result, report.tls), ("delivered", "TLSv1.3"));
}

#[test]
fn a_tarpitted_220_is_all_out_before_the_switch() {
    let mut config = config();
    config.dnsbl = vec![Dnsbl {
        zone: "bl.test".into(),
        weight: 2,
        codes: Vec::new(),
        reply: None,
    }];
    config.tarpit.reply_delay = Duration::from_secs(10);
    config.tarpit.stutter = Duration::ZERO;
    let query = Query::Dnsbl {
        zone: "bl.test".into(),
        ip: "192.0.2.7".parse().unwrap(),
    };
    let listed = LookupAnswer::Dnsbl(DnsblAnswer::Listed(vec![Ipv4Addr::new(127, 0, 0, 2)]));
    let mut pair = Pair::from_peer(config, vec![(query, listed)], peer(false, true));
    pair.pump();
    pair.advance(Duration::from_secs(10));
    assert_eq!(pair.take_output(), BANNER);
    pair.send(b"STARTTLS\r\nNOOP\r\n");
    assert_eq!(pair.take_output(), "", "held");
    assert_eq!(pair.tls_switches, 0, "not before the 220 is out");
    pair.send(b"QUIT\r\n");
    pair.advance(Duration::from_secs(10));
    assert_eq!(pair.take_output(), READY);
    assert_eq!(pair.tls_switches, 1);
    assert!(
        !pair.closed,
        "the QUIT sent before the handshake was discarded too"
    );
}
