//! The pre-greet stage and the tarpit, on invented time: what is sent when, to the byte.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use tarmac::config::{Dnsbl, Pregreet};
use tarmac::smtp::question::DnsblAnswer;

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
const TEASER: &str = "220-mx.test ESMTP tarmac\r\n";
const SECOND: Duration = Duration::from_secs(1);

fn paused(pause: u64) -> Config {
    let mut config = config();
    config.tarpit.greet_pause = Duration::from_secs(pause);
    config
}

/// A config whose one zone (weight 2) makes the client a tarpit verdict.
fn tarpitted(delay: u64, stutter: u64) -> (Config, Vec<(Query, LookupAnswer)>) {
    let mut config = config();
    config.dnsbl = vec![Dnsbl {
        zone: "bl.test".into(),
        weight: 2,
        codes: Vec::new(),
        reply: None,
    }];
    config.tarpit.reply_delay = Duration::from_secs(delay);
    config.tarpit.stutter = Duration::from_secs(stutter);
    let query = Query::Dnsbl {
        zone: "bl.test".into(),
        ip: CLIENT,
    };
    let answer = LookupAnswer::Dnsbl(DnsblAnswer::Listed(vec![Ipv4Addr::new(127, 0, 0, 2)]));
    (config, vec![(query, answer)])
}

#[test]
fn teaser_at_once_then_the_banner_after_the_pause() {
    let mut pair = Pair::new(paused(6));
    let t0 = pair.now;
    assert_eq!(pair.take_output(), TEASER);
    assert_eq!(
        pair.session.poll_timeout(),
        Some(t0 + Duration::from_secs(6))
    );
    pair.advance(Duration::from_millis(5_999));
    assert_eq!(pair.take_output(), "", "not before the pause is over");
    pair.advance(Duration::from_millis(1));
    assert_eq!(pair.take_output(), BANNER);
    assert_eq!(pair.passes, [CLIENT], "waiting it out earns a PASS");
    assert!(!pair.session.report().pregreet);
}

#[test]
fn no_teaser_without_banner_continuation() {
    let mut config = paused(2);
    config.tarpit.banner_continuation = false;
    let mut pair = Pair::new(config);
    assert_eq!(pair.take_output(), "");
    pair.advance(2 * SECOND);
    assert_eq!(pair.take_output(), BANNER);
}

#[test]
fn the_banner_waits_for_the_later_of_pause_and_lookups() {
    let (mut config, _) = tarpitted(0, 0);
    config.tarpit.greet_pause = SECOND;
    config.dns.timeout = 5 * SECOND;
    let query = Query::Dnsbl {
        zone: "bl.test".into(),
        ip: CLIENT,
    };
    // The pause ends first: the banner waits for the answer.
    let mut pair = Pair::new(config.clone());
    pair.take_output();
    pair.advance(SECOND);
    assert_eq!(pair.take_output(), "", "the answer is still out");
    let not_listed = LookupAnswer::Dnsbl(DnsblAnswer::NotListed);
    pair.session
        .handle_answer(pair.now, Answer::Lookup(query.clone(), not_listed.clone()));
    pair.pump();
    assert_eq!(pair.take_output(), BANNER);

    // The answer comes first: the banner waits for the pause.
    let mut pair = Pair::new(config);
    pair.take_output();
    pair.session
        .handle_answer(pair.now, Answer::Lookup(query, not_listed));
    pair.pump();
    assert_eq!(pair.take_output(), "");
    pair.advance(SECOND);
    assert_eq!(pair.take_output(), BANNER);
}

#[test]
fn a_cached_pass_skips_the_pause() {
    let now = Instant::now();
    let peer = peer(false, false);
    let mut session = Session::new(Arc::new(paused(6)), peer, now);
    assert!(matches!(
        session.poll_action(),
        Some(Action::Ask(Question::CheckPass(CLIENT)))
    ));
    session.handle_answer(now, Answer::Pass(true));
    let mut out = Vec::new();
    session.poll_transmit(now, &mut out);
    assert_eq!(out, BANNER.as_bytes(), "no teaser, no pause");
    assert!(
        session.poll_action().is_none(),
        "no new PASS for an old one"
    );
}

#[test]
fn a_pregreet_talker_is_caught_at_its_first_byte() {
    let mut pair = Pair::new(paused(6));
    pair.take_output();
    pair.advance(SECOND);
    pair.send(b"E");
    assert!(pair.session.report().pregreet, "one byte before the banner");
    assert!(
        !pair.session.wants_read(),
        "nothing more is read before the banner"
    );
    pair.send(b"HLO spam\r\nMAIL FROM:<a@example.org>\r\n");
    pair.advance(5 * SECOND);
    // `pregreet = "reject"` (the default): a normal banner, then every command refused.
    let refusal = "554 5.5.1 Error: you talked before the greeting; no mail accepted\r\n";
    assert_eq!(pair.take_output(), format!("{BANNER}{refusal}{refusal}"));
    pair.send(b"QUIT\r\n");
    assert_eq!(pair.take_output(), "221 2.0.0 Bye\r\n");
    assert!(pair.passes.is_empty(), "no PASS for a pregreet talker");
    assert!(pair.connects.is_empty());
    assert_eq!(pair.session.report().result, "rejected");
}

#[test]
fn the_first_byte_after_the_banner_is_not_pregreet() {
    let mut pair = Pair::new(paused(6));
    pair.advance(6 * SECOND);
    assert_eq!(pair.take_output(), format!("{TEASER}{BANNER}"));
    pair.send(b"EHLO c\r\n");
    assert!(!pair.session.report().pregreet);
    assert!(pair.take_output().starts_with("250-mx.test"));
}

#[test]
fn pregreet_drop_answers_521_at_once_and_closes() {
    let mut config = paused(6);
    config.tarpit.pregreet = Pregreet::Drop;
    let mut pair = Pair::new(config);
    pair.send(b"EHLO spam\r\n");
    assert_eq!(
        pair.take_output(),
        format!("{TEASER}521 5.5.1 mx.test Protocol error: talked before the greeting\r\n")
    );
    assert!(pair.closed);
    assert!(pair.session.report().pregreet);
}

#[test]
fn pregreet_ignore_only_logs_and_answers_after_the_banner() {
    let mut config = paused(6);
    config.tarpit.pregreet = Pregreet::Ignore;
    let mut pair = Pair::new(config);
    pair.send(b"EHLO c\r\nQUIT\r\n");
    pair.advance(6 * SECOND);
    assert_eq!(
        pair.take_output(),
        format!("{TEASER}{BANNER}{EHLO_REPLY}221 2.0.0 Bye\r\n")
    );
    assert!(pair.session.report().pregreet);
    assert!(pair.passes.is_empty());
}

#[test]
fn pregreet_after_a_proxy_header_in_the_same_read() {
    let mut config = paused(6);
    config.server.proxy_protocol_from = vec!["192.0.2.0/24".parse().unwrap()];
    let mut pair = Pair::new(config);
    pair.send(b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 25\r\nEHLO x\r\n");
    assert!(pair.session.report().pregreet);
}

#[test]
fn every_tarpitted_reply_waits_the_delay() {
    let (config, dns) = tarpitted(10, 0);
    let mut pair = Pair::with_dns(config, dns);
    let t0 = pair.now;
    assert_eq!(pair.take_output(), "", "the banner is held too");
    assert_eq!(pair.session.poll_timeout(), Some(t0 + 10 * SECOND));
    pair.advance(10 * SECOND);
    assert_eq!(pair.take_output(), BANNER);
    pair.send(b"EHLO c\r\nNOOP\r\n");
    assert_eq!(pair.take_output(), "");
    assert!(
        !pair.session.wants_read(),
        "no command is read while a reply is held"
    );
    pair.advance(10 * SECOND);
    assert_eq!(pair.take_output(), EHLO_REPLY, "one reply per delay");
    pair.advance(10 * SECOND);
    assert_eq!(pair.take_output(), "250 2.0.0 Ok\r\n");
    assert_eq!(pair.session.report().verdict, "tarpit");
}

#[test]
fn stutter_sends_the_banner_one_byte_per_interval() {
    let (config, dns) = tarpitted(0, 1);
    let mut pair = Pair::with_dns(config, dns);
    let t0 = pair.now;
    let mut seen = pair.take_output();
    assert_eq!(seen, "2", "the first byte at once (no delay)");
    for n in 1..BANNER.len() {
        assert_eq!(pair.session.poll_timeout(), Some(t0 + SECOND * n as u32));
        pair.advance(SECOND);
        let byte = pair.take_output();
        assert_eq!(byte.len(), 1, "one byte at {n} s");
        seen.push_str(&byte);
    }
    assert_eq!(seen, BANNER);
}

#[test]
fn quit_in_the_tarpit_closes_once_the_goodbye_is_out() {
    let (config, dns) = tarpitted(5, 0);
    let mut pair = Pair::with_dns(config, dns);
    pair.advance(5 * SECOND);
    pair.take_output();
    pair.send(b"QUIT\r\n");
    assert!(!pair.closed, "the 221 is still held");
    assert!(pair.session.is_closed());
    assert_eq!(pair.session.poll_timeout(), Some(pair.now + 5 * SECOND));
    pair.advance(5 * SECOND);
    assert_eq!(pair.take_output(), "221 2.0.0 Bye\r\n");
    assert!(pair.closed, "Close after the last byte");
    assert_eq!(pair.session.poll_timeout(), None);
}

#[test]
fn a_tarpitted_client_that_leaves_is_closed_at_once() {
    let (config, dns) = tarpitted(60, 1);
    let mut pair = Pair::with_dns(config, dns);
    pair.session.handle_client_eof(pair.now);
    pair.pump();
    assert!(pair.closed);
    assert_eq!(pair.session.poll_timeout(), None);
}

#[test]
fn no_tarpit_place_left_rejects_instead() {
    let (config, dns) = tarpitted(10, 1);
    let mut pair = Pair::build_refusing_tarpit(config, dns);
    assert_eq!(
        pair.take_output(),
        "554 5.7.1 Service unavailable; client [192.0.2.7] blocked using bl.test\r\n"
    );
    assert_eq!(pair.session.report().verdict, "reject");
}

#[test]
fn shutdown_skips_the_tarpit() {
    let (config, dns) = tarpitted(60, 1);
    let mut pair = Pair::with_dns(config, dns);
    pair.session.handle_shutdown(pair.now, Shutdown::Now);
    pair.pump();
    assert_eq!(
        pair.take_output(),
        format!("{BANNER}421 4.3.2 mx.test Service shutting down, please try again later\r\n"),
        "the held banner goes out whole, then the 421"
    );
    assert!(pair.closed);
}

#[test]
fn shutdown_mid_stutter_finishes_the_line_before_the_421() {
    // Found by the session fuzz target: the client had read "22" of the banner, then "421".
    let (config, dns) = tarpitted(0, 1);
    let mut pair = Pair::with_dns(config, dns);
    pair.advance(SECOND);
    assert_eq!(pair.take_output(), "22");
    pair.session.handle_shutdown(pair.now, Shutdown::Graceful);
    pair.pump();
    assert_eq!(
        pair.take_output(),
        format!(
            "{}421 4.3.2 mx.test Service shutting down, please try again later\r\n",
            &BANNER[2..]
        )
    );
    assert!(pair.closed);
}

#[test]
fn a_held_goodbye_ends_at_once_on_eof_or_forced_shutdown() {
    // Found by the session fuzz target: EOF after QUIT left `Close` waiting for the 221.
    let (config, dns) = tarpitted(5, 1);
    let mut pair = Pair::with_dns(config, dns);
    pair.advance(5 * SECOND);
    for _ in 1..BANNER.len() {
        pair.advance(SECOND);
    }
    assert_eq!(pair.take_output(), BANNER);
    pair.send(b"QUIT\r\n");
    assert!(pair.session.is_closed() && !pair.closed);
    pair.session.handle_client_eof(pair.now);
    pair.pump();
    assert!(pair.closed, "the client left: nothing to wait for");
    assert_eq!(pair.take_output(), "");

    let (config, dns) = tarpitted(5, 1);
    let mut pair = Pair::with_dns(config, dns);
    pair.advance(5 * SECOND);
    for _ in 1..BANNER.len() {
        pair.advance(SECOND);
    }
    pair.take_output();
    pair.send(b"QUIT\r\n");
    pair.session.handle_shutdown(pair.now, Shutdown::Now);
    pair.pump();
    assert_eq!(
        pair.take_output(),
        "221 2.0.0 Bye\r\n",
        "the goodbye, whole and at once"
    );
    assert!(pair.closed);
}

#[test]
fn stress_shortens_the_pause_and_the_command_timeout_and_stops_stutter() {
    let mut config = paused(6);
    config.timeouts.command = Duration::from_secs(300);
    let mut pair = Pair::stressed(config);
    let t0 = pair.now;
    assert_eq!(pair.session.poll_timeout(), Some(t0 + 2 * SECOND));
    pair.advance(2 * SECOND);
    assert_eq!(pair.take_output(), format!("{TEASER}{BANNER}"));
    pair.send(b"EHL");
    assert_eq!(pair.session.poll_timeout(), Some(pair.now + 10 * SECOND));

    let (config, dns) = tarpitted(0, 1);
    let mut pair = Pair::with_dns(config, dns);
    assert_eq!(pair.take_output(), "2");
    pair.session.handle_stress(pair.now, true);
    pair.advance(SECOND);
    assert_eq!(pair.take_output(), &BANNER[1..], "the rest at once");
}

#[test]
fn a_held_reply_does_not_run_the_command_timeout() {
    let (mut config, dns) = tarpitted(200, 0);
    config.timeouts.command = Duration::from_secs(300);
    let mut pair = Pair::with_dns(config, dns);
    pair.advance(200 * SECOND);
    assert_eq!(pair.take_output(), BANNER);
    let released = pair.now;
    pair.send(b"EHLO c\r\n");
    // Held 200 s: the client owes nothing until it has the reply; then 300 s from there.
    pair.advance(200 * SECOND);
    assert_eq!(pair.take_output(), EHLO_REPLY);
    assert_eq!(
        pair.session.poll_timeout(),
        Some(released + 500 * SECOND),
        "timeouts.command from the release of the reply"
    );
    pair.advance(299 * SECOND);
    assert!(!pair.session.is_closed());
    pair.advance(SECOND);
    // Closed; its 421 goes out on the tarpit's schedule.
    assert!(pair.session.is_closed());
    assert_eq!(pair.session.report().result, "timeout");
}
