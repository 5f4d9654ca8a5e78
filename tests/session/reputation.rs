//! Reputation on invented time with a real table: the history is asked before the verdict,
//! a mostly bad one's weight joins the score, and what a session records.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use super::*;
use tarmac::config::{Dnsbl, Pregreet};
use tarmac::policy::reputation::Event;
use tarmac::policy::reputation::History;
use tarmac::policy::{List, ListSet};
use tarmac::smtp::question::DnsblAnswer;
use tarmac::state::ReputationTable;

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
const SECOND: Duration = Duration::from_secs(1);

fn remembering() -> Config {
    let mut config = config();
    config.reputation.enabled = true;
    config
}

/// A table where the client has `n` bad events, a second apart, ending at `now`.
fn bad_history(n: u32, now: Instant) -> ReputationTable {
    let table = ReputationTable::new();
    let half_life = Config::default().reputation.half_life;
    for k in 0..n {
        let at = now - SECOND * (n - k);
        table.record(CLIENT, Event::Pregreet, at, half_life);
    }
    table
}

/// A pair whose driver answers from `table`.
fn pair_with(config: Config, table: ReputationTable) -> Pair {
    let mut pair = Pair::build_quiet(config, Vec::new(), false);
    pair.reputation = table;
    pair.pump();
    pair
}

#[test]
fn the_verdict_waits_for_the_answer() {
    let now = Instant::now();
    let peer = peer(false, false);
    let config = remembering();
    let half_life = config.reputation.half_life;
    let mut session = Session::new(Arc::new(config), peer, now);
    assert!(matches!(
        session.poll_action(),
        Some(Action::Ask(Question::CheckReputation(CLIENT, asked))) if asked == half_life
    ));
    let mut out = Vec::new();
    session.poll_transmit(now, &mut out);
    assert!(out.is_empty(), "no banner before the answer");
    session.handle_answer(now, Answer::Reputation(None));
    session.poll_transmit(now, &mut out);
    assert_eq!(out, BANNER.as_bytes());
    let report = session.report();
    assert_eq!((report.reputation, report.score), ("none", 0));
    // A late or repeated answer changes nothing.
    session.handle_answer(now, Answer::Reputation(Some(History::new(now))));
    assert_eq!(session.report().reputation, "none");
}

#[test]
fn a_mostly_bad_history_adds_its_weight_before_the_verdict() {
    let now = Instant::now();
    let mut pair = pair_with(remembering(), bad_history(3, now));
    // Score 2 (the default weight) is a tarpit verdict: the banner is held.
    assert_eq!(pair.take_output(), "");
    let report = pair.session.report();
    assert_eq!(
        (report.verdict, report.score, report.reputation),
        ("tarpit", 2, "bad")
    );
    pair.advance(Duration::from_secs(10));
    assert_eq!(
        pair.take_output(),
        "2",
        "the banner's first byte, after the delay"
    );

    // Two bad events are not enough.
    let mut pair = pair_with(remembering(), bad_history(2, now));
    assert_eq!(pair.take_output(), BANNER);
    let report = pair.session.report();
    assert_eq!(
        (report.verdict, report.score, report.reputation),
        ("pass", 0, "neutral")
    );
}

#[test]
fn the_weight_and_a_zone_add_up_to_a_reject() {
    let mut config = remembering();
    config.dnsbl = vec![Dnsbl {
        zone: "bl.test".into(),
        weight: 1,
        codes: Vec::new(),
        reply: None,
    }];
    let listed = (
        Query::Dnsbl {
            zone: "bl.test".into(),
            ip: CLIENT,
        },
        LookupAnswer::Dnsbl(DnsblAnswer::Listed(vec![Ipv4Addr::new(127, 0, 0, 2)])),
    );
    let mut pair = Pair::build_quiet(config, vec![listed], false);
    pair.reputation = bad_history(3, pair.now);
    pair.pump();
    assert_eq!(
        pair.take_output(),
        "554 5.7.1 Service unavailable; client [192.0.2.7] blocked using bl.test\r\n"
    );
    let report = pair.session.report();
    assert_eq!((report.verdict, report.score), ("reject", 3));
    assert_eq!(pair.reputation_events, [(CLIENT, Event::Rejected)]);
}

#[test]
fn a_delivery_record_weight_zero_or_off_add_nothing() {
    let now = Instant::now();
    let table = bad_history(5, now);
    let half_life = Config::default().reputation.half_life;
    table.record(CLIENT, Event::Delivered, now, half_life);
    let mut pair = pair_with(remembering(), table);
    assert_eq!(pair.take_output(), BANNER);
    let report = pair.session.report();
    assert_eq!((report.score, report.reputation), (0, "good"));

    let mut config = remembering();
    config.reputation.weight = 0;
    let mut pair = pair_with(config, bad_history(3, now));
    assert_eq!(pair.take_output(), BANNER);
    let report = pair.session.report();
    assert_eq!((report.score, report.reputation), (0, "bad"));

    let mut pair = pair_with(config_off(), bad_history(3, now));
    assert_eq!(pair.take_output(), BANNER);
    assert_eq!(pair.session.report().reputation, "-", "not asked");
    pair.send(TRANSACTION);
    assert!(pair.reputation_events.is_empty(), "nothing recorded");
}

fn config_off() -> Config {
    let mut config = remembering();
    config.reputation.enabled = false;
    config
}

#[test]
fn three_pregreet_sessions_make_the_fourth_a_tarpit() {
    let mut config = remembering();
    config.tarpit.greet_pause = Duration::from_secs(6);
    let mut table = ReputationTable::new();
    for n in 0..3 {
        let mut pair = pair_with(config.clone(), table);
        pair.take_output();
        pair.send(b"EHLO early\r\n");
        pair.advance(6 * SECOND);
        // Refused, and talking on until the error limit closes it: still one event.
        pair.send(b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n");
        assert!(pair.closed, "session {n}");
        assert_eq!(pair.reputation_events, [(CLIENT, Event::Pregreet)], "{n}");
        assert_eq!(pair.session.report().verdict, "pass", "session {n}");
        table = std::mem::take(&mut pair.reputation);
    }
    let mut pair = pair_with(config, table);
    assert_eq!(pair.session.report().reputation, "bad");
    pair.advance(6 * SECOND);
    assert_eq!(pair.session.report().verdict, "tarpit");
}

#[test]
fn an_ignored_pregreet_is_not_held_against_the_client() {
    let mut config = remembering();
    config.tarpit.greet_pause = Duration::from_secs(6);
    config.tarpit.pregreet = Pregreet::Ignore;
    let mut pair = Pair::new(config);
    pair.send(b"EHLO early\r\n");
    pair.advance(6 * SECOND);
    assert!(pair.session.report().pregreet);
    assert!(pair.reputation_events.is_empty());
}

#[test]
fn deliveries_count_each_and_abuse_once() {
    let mut pair = Pair::new(remembering());
    pair.send(b"EHLO c\r\n");
    for _ in 0..2 {
        pair.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\n");
    }
    assert_eq!(
        pair.reputation_events,
        [(CLIENT, Event::Delivered), (CLIENT, Event::Delivered)]
    );
    // A bare LF in a body: refused, and protocol abuse.
    pair.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nbad\nline\r\n.\r\n",
    );
    assert!(
        pair.take_output().ends_with(
            "550 5.6.0 Error: bare <CR> or <LF> in message body; message not accepted\r\n"
        )
    );
    assert_eq!(
        pair.reputation_events.last(),
        Some(&(CLIENT, Event::ProtocolAbuse))
    );
    // More abuse in the same session adds nothing: one mark per session.
    pair.send(b"FOO\r\nFOO\r\nFOO\r\nFOO\r\n");
    assert!(pair.closed);
    assert_eq!(pair.reputation_events.len(), 3);
}

#[test]
fn too_many_errors_is_protocol_abuse() {
    let mut pair = Pair::new(remembering());
    pair.send(b"FOO\r\nFOO\r\nFOO\r\n");
    assert!(pair.reputation_events.is_empty(), "under the limit");
    pair.send(b"FOO\r\n");
    assert!(
        pair.take_output()
            .ends_with("421 4.7.0 mx.test Error: too many errors\r\n")
    );
    assert_eq!(pair.reputation_events, [(CLIENT, Event::ProtocolAbuse)]);
}

#[test]
fn max_errors_is_protocol_abuse_too() {
    let mut config = remembering();
    config.limits.max_errors = 3;
    let mut pair = Pair::new(config);
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    pair.send(b"RCPT TO:<unknown@example.org>\r\nRCPT TO:<unknown@example.org>\r\n");
    assert!(pair.reputation_events.is_empty(), "under the limit");
    pair.send(b"RCPT TO:<unknown@example.org>\r\n");
    assert!(
        pair.take_output()
            .ends_with("421 4.7.0 mx.test Error: too many errors\r\n")
    );
    assert_eq!(pair.reputation_events, [(CLIENT, Event::ProtocolAbuse)]);
}

#[test]
fn a_greylist_pass_counts_once_per_session() {
    let mut config = remembering();
    config.greylist.enabled = true;
    // The retry comes within the session, after the greylist delay: it must outlive it.
    config.timeouts.command = Duration::from_secs(3600);
    let mut pair = Pair::new(config);
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\n");
    assert!(pair.reputation_events.is_empty(), "deferred is not a pass");
    pair.advance(Duration::from_secs(300));
    pair.send(b"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\n");
    assert_eq!(pair.reputation_events, [(CLIENT, Event::GreylistPass)]);
}

#[test]
fn a_deny_listed_helo_is_a_reject_an_allow_listed_client_is_not_asked() {
    let list = |text: &str| List::parse(&[(PathBuf::from("l.txt"), text.to_owned())]).unwrap();
    let mut config = remembering();
    config.lists.entries = ListSet {
        allow: list(""),
        deny: list("spam.example\n"),
    };
    let mut pair = Pair::new(config.clone());
    pair.send(b"EHLO spam.example\r\n");
    assert_eq!(pair.reputation_events, [(CLIENT, Event::Rejected)]);

    config.lists.entries.allow = list("192.0.2.0/24\n");
    let mut pair = pair_with(config, bad_history(5, Instant::now()));
    assert_eq!(pair.take_output(), BANNER);
    assert_eq!(pair.session.report().reputation, "-");
    pair.send(b"EHLO spam.example\r\nFOO\r\nFOO\r\nFOO\r\nFOO\r\n");
    assert!(pair.reputation_events.is_empty(), "allow-listed: exempt");
}

#[test]
fn a_reject_forced_by_a_full_tarpit_is_not_recorded() {
    let mut pair = Pair::build_quiet(remembering(), Vec::new(), false);
    pair.tarpit_free = false;
    pair.reputation = bad_history(3, pair.now);
    pair.pump();
    assert_eq!(pair.session.report().verdict, "reject");
    assert!(
        pair.reputation_events.is_empty(),
        "{:?}",
        pair.reputation_events
    );
}
