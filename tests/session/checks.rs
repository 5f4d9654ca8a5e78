//! DNS checks, lists and verdicts, on invented time: lookups are answered from a script (like
//! cache hits) or left to time out.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use super::*;
use tarmac::config::{Dnsbl, RejectMode};
use tarmac::policy::{List, ListSet};
use tarmac::smtp::question::{DnsblAnswer, RdnsAnswer};

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

fn zone(name: &str, weight: i32) -> Dnsbl {
    Dnsbl {
        zone: name.into(),
        weight,
        codes: Vec::new(),
        reply: None,
    }
}

fn with_zones(zones: Vec<Dnsbl>) -> Config {
    let mut config = config();
    config.dnsbl = zones;
    config
}

fn q(zone: &str) -> Query {
    Query::Dnsbl {
        zone: zone.into(),
        ip: CLIENT,
    }
}

fn listed(zone: &str, code: [u8; 4]) -> (Query, LookupAnswer) {
    (
        q(zone),
        LookupAnswer::Dnsbl(DnsblAnswer::Listed(vec![Ipv4Addr::from(code)])),
    )
}

fn answer(zone: &str, answer: DnsblAnswer) -> (Query, LookupAnswer) {
    (q(zone), LookupAnswer::Dnsbl(answer))
}

fn rdns(answer: RdnsAnswer) -> (Query, LookupAnswer) {
    (Query::Rdns(CLIENT), LookupAnswer::Rdns(answer))
}

fn list(text: &str) -> List {
    List::parse(&[(PathBuf::from("list.txt"), text.to_owned())]).unwrap()
}

fn with_lists(allow: &str, deny: &str) -> Config {
    let mut config = config();
    config.lists.entries = ListSet {
        allow: list(allow),
        deny: list(deny),
    };
    config
}

#[test]
fn banner_waits_for_every_lookup() {
    let mut config = with_zones(vec![zone("bl.test", 3), zone("wl.test", -2)]);
    config.dns.rdns = true;
    let mut pair = Pair::new(config);
    assert_eq!(pair.take_output(), "", "no banner before the answers");
    assert_eq!(
        pair.lookups,
        [q("bl.test"), q("wl.test"), Query::Rdns(CLIENT)]
    );
    // Bytes now would be a pregreet talker's: watched for, not consumed.
    assert!(pair.session.wants_read());
    assert_eq!(pair.session.handle_client_data(pair.now, b"EHLO x\r\n"), 0);
    assert!(!pair.session.wants_read(), "one burst is enough to know");

    let (query, ans) = answer("bl.test", DnsblAnswer::NotListed);
    pair.session
        .handle_answer(pair.now, Answer::Lookup(query, ans));
    let (query, ans) = answer("wl.test", DnsblAnswer::NotListed);
    pair.session
        .handle_answer(pair.now, Answer::Lookup(query, ans));
    pair.pump();
    assert_eq!(pair.take_output(), "", "the rDNS answer is still out");
    let (query, ans) = rdns(RdnsAnswer::Verified("mail.example.org".into()));
    pair.session
        .handle_answer(pair.now, Answer::Lookup(query, ans));
    pair.pump();
    assert_eq!(pair.take_output(), BANNER);
    let report = pair.session.report();
    assert_eq!(
        (
            report.verdict,
            report.score,
            report.rdns,
            report.dnsbl.as_str()
        ),
        ("pass", 0, "mail.example.org", "-")
    );
}

#[test]
fn dns_timeout_counts_as_not_listed_and_greets() {
    let mut config = with_zones(vec![zone("bl.test", 5)]);
    config.dns.rdns = true;
    let timeout = config.dns.timeout;
    let mut pair = Pair::new(config);
    assert_eq!(pair.session.poll_timeout(), Some(pair.now + timeout));
    pair.advance(timeout - Duration::from_millis(1));
    assert_eq!(pair.take_output(), "", "not before the timeout");
    pair.advance(Duration::from_millis(1));
    assert_eq!(pair.take_output(), BANNER, "DNS trouble never rejects");
    let report = pair.session.report();
    assert_eq!(
        (report.verdict, report.dnsbl.as_str(), report.rdns),
        ("pass", "bl.test:tempfail", "tempfail")
    );
    // A late answer changes nothing.
    let (query, ans) = listed("bl.test", [127, 0, 0, 2]);
    pair.session
        .handle_answer(pair.now, Answer::Lookup(query, ans));
    pair.pump();
    assert_eq!(pair.take_output(), "");
    assert_eq!(pair.session.report().verdict, "pass");
    pair.send(b"EHLO c\r\nQUIT\r\n");
    assert!(pair.take_output().ends_with("221 2.0.0 Bye\r\n"));
}

#[test]
fn listed_client_gets_a_554_greeting_and_only_quit_is_answered() {
    let config = with_zones(vec![zone("bl.test", 3)]);
    let mut pair = Pair::with_dns(config, vec![listed("bl.test", [127, 0, 0, 2])]);
    assert_eq!(
        pair.take_output(),
        "554 5.7.1 Service unavailable; client [192.0.2.7] blocked using bl.test\r\n"
    );
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    assert_eq!(
        pair.take_output(),
        "503 5.7.1 Error: service unavailable; only QUIT is accepted\r\n".repeat(2)
    );
    pair.send(b"QUIT\r\n");
    assert_eq!(pair.take_output(), "221 2.0.0 Bye\r\n");
    assert!(pair.connects.is_empty(), "nothing goes downstream");
    let report = pair.session.report();
    assert_eq!(
        (report.verdict, report.score, report.dnsbl.as_str()),
        ("reject", 3, "bl.test:3")
    );
    assert_eq!(report.result, "rejected");
}

#[test]
fn a_rejected_client_that_keeps_talking_is_closed_at_the_error_limit() {
    let config = with_zones(vec![zone("bl.test", 3)]);
    let limit = config.limits.max_unknown_commands as usize;
    let mut pair = Pair::with_dns(config, vec![listed("bl.test", [127, 0, 0, 2])]);
    pair.take_output();
    pair.send(&b"NOOP\r\n".repeat(limit + 1));
    let out = pair.take_output();
    assert!(
        out.ends_with("421 4.7.0 mx.test Error: too many errors\r\n"),
        "{out}"
    );
    assert!(pair.closed);
}

#[test]
fn reply_text_replaces_the_zone_name() {
    let mut secret = zone("k3y5ecret.zen.dq.example", 4);
    secret.reply = Some("zen, see https://example.org/lookup".to_owned());
    let config = with_zones(vec![zone("bl.test", 3), secret]);
    let dns = vec![
        listed("bl.test", [127, 0, 0, 2]),
        listed("k3y5ecret.zen.dq.example", [127, 0, 0, 4]),
    ];
    let mut pair = Pair::with_dns(config, dns);
    let out = pair.take_output();
    assert_eq!(
        out,
        "554 5.7.1 Service unavailable; client [192.0.2.7] blocked using zen, see https://example.org/lookup\r\n",
        "the highest weight names the reject"
    );
    assert!(!out.contains("k3y5ecret"));
    assert_eq!(pair.session.report().score, 7, "each zone counts once");
}

#[test]
fn enforce_mode_refuses_every_rcpt_logs_them_and_closes_after_data() {
    let mut config = with_zones(vec![zone("bl.test", 3)]);
    config.scoring.reject_mode = RejectMode::Enforce;
    let mut pair = Pair::with_dns(config, vec![listed("bl.test", [127, 0, 0, 2])]);
    assert_eq!(pair.take_output(), BANNER, "a normal greeting");
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n");
    let refusal = "550 5.7.1 Service unavailable; client [192.0.2.7] blocked using bl.test\r\n";
    assert_eq!(
        pair.take_output(),
        format!(
            "{EHLO_REPLY}250 2.1.0 Ok\r\n{refusal}{refusal}554 5.5.1 Error: no valid recipients\r\n"
        )
    );
    assert!(pair.closed, "closed after DATA");
    assert!(pair.connects.is_empty(), "nothing goes downstream");
    let report = pair.session.report();
    assert_eq!((report.verdict, report.result), ("reject", "rejected"));
}

#[test]
fn allowlist_zone_gives_allow_and_tarpit_score_is_relayed() {
    let config = with_zones(vec![zone("wl.test", -2)]);
    let pair = Pair::with_dns(config, vec![listed("wl.test", [127, 0, 10, 0])]);
    let report = pair.session.report();
    assert_eq!((report.verdict, report.score), ("allow", -2));
    assert_eq!(report.dnsbl, "wl.test:-2");

    // A tarpit whose delays are off relays as usual (the tarpit tests cover the delays).
    let mut config = with_zones(vec![zone("bl.test", 2)]);
    config.tarpit.reply_delay = Duration::ZERO;
    config.tarpit.stutter = Duration::ZERO;
    let mut pair = Pair::with_dns(config, vec![listed("bl.test", [127, 0, 0, 2])]);
    assert_eq!(pair.take_output(), BANNER);
    assert_eq!(pair.session.report().verdict, "tarpit");
    pair.send(TRANSACTION);
    assert_eq!(pair.take_output(), &TRANSACTION_REPLIES[BANNER.len()..]);
    assert_eq!(pair.downstream.delivered.len(), 1, "tarpit still delivers");
}

#[test]
fn codes_filter_and_error_answers_do_not_list() {
    let mut filtered = zone("bl.test", 3);
    filtered.codes = vec![(Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3))];
    let config = with_zones(vec![filtered, zone("odd.test", 3)]);
    let dns = vec![
        listed("bl.test", [127, 0, 0, 10]),
        answer(
            "odd.test",
            DnsblAnswer::Error(Ipv4Addr::new(127, 255, 255, 254)),
        ),
    ];
    let mut pair = Pair::with_dns(config, dns);
    assert_eq!(pair.take_output(), BANNER);
    let report = pair.session.report();
    assert_eq!((report.verdict, report.score), ("pass", 0));
    assert_eq!(report.dnsbl, "odd.test:error");
}

#[test]
fn set_aside_zone_is_reported_off() {
    let config = with_zones(vec![zone("bl.test", 3)]);
    let mut pair = Pair::with_dns(config, vec![answer("bl.test", DnsblAnswer::SetAside)]);
    assert_eq!(pair.take_output(), BANNER);
    assert_eq!(pair.session.report().dnsbl, "bl.test:off");
}

#[test]
fn allow_listed_address_asks_nothing_and_deny_listed_gets_554() {
    let mut config = with_lists("192.0.2.0/24\n", "");
    config.dnsbl = vec![zone("bl.test", 3)];
    config.dns.rdns = true;
    let mut pair = Pair::new(config);
    assert!(pair.lookups.is_empty(), "no DNS wait for an allowed client");
    assert_eq!(pair.take_output(), BANNER);
    let report = pair.session.report();
    assert_eq!((report.verdict, report.list), ("allow", "allow:address"));

    let mut config = with_lists("", "192.0.2.7\n");
    config.scoring.reject_mode = RejectMode::Enforce;
    let mut pair = Pair::new(config);
    assert_eq!(
        pair.take_output(),
        "554 5.7.1 Service unavailable; client [192.0.2.7] blocked by local policy\r\n",
        "a deny entry is an immediate reject whatever reject_mode says"
    );
    assert_eq!(pair.session.report().list, "deny:address");
}

#[test]
fn lists_match_the_verified_rdns_name() {
    let mut config = with_lists("", "dynamic.example.net\n");
    config.dns.rdns = true;
    let dns = vec![rdns(RdnsAnswer::Verified(
        "host-7.dynamic.example.net".into(),
    ))];
    let mut pair = Pair::with_dns(config, dns);
    assert!(pair.take_output().starts_with("554 5.7.1 "));
    assert_eq!(pair.session.report().list, "deny:rdns");

    let mut config = with_lists("example.org\n", "");
    config.dnsbl = vec![zone("bl.test", 5)];
    config.dns.rdns = true;
    let dns = vec![
        listed("bl.test", [127, 0, 0, 2]),
        rdns(RdnsAnswer::Verified("mx.example.org".into())),
    ];
    let mut pair = Pair::with_dns(config, dns);
    assert_eq!(pair.take_output(), BANNER, "allow wins over a listing");
    assert_eq!(pair.session.report().verdict, "allow");
}

#[test]
fn deny_listed_helo_and_sender_are_refused() {
    let mut pair = Pair::new(with_lists("", "spam.example\n"));
    pair.take_output();
    pair.send(b"EHLO mail.spam.example\r\nMAIL FROM:<a@example.org>\r\nQUIT\r\n");
    assert_eq!(
        pair.take_output(),
        "554 5.7.1 <mail.spam.example>: Helo command rejected: Access denied\r\n\
         503 5.7.1 Error: service unavailable; only QUIT is accepted\r\n221 2.0.0 Bye\r\n"
    );
    assert_eq!(pair.session.report().list, "deny:helo");

    let mut pair = Pair::new(with_lists("", "spam.example\n"));
    pair.take_output();
    pair.send(b"EHLO c\r\nMAIL FROM:<x@Spam.Example>\r\n");
    assert_eq!(
        pair.take_output(),
        format!(
            "{EHLO_REPLY}554 5.7.1 <x@Spam.Example>: Sender address rejected: Access denied\r\n"
        )
    );
    assert!(pair.connects.is_empty());
    pair.send(b"MAIL FROM:<ok@example.org>\r\n");
    assert_eq!(
        pair.take_output(),
        "503 5.7.1 Error: service unavailable; only QUIT is accepted\r\n",
        "the list decided the session"
    );
}

#[test]
fn allow_listed_sender_lifts_enforce() {
    let mut config = with_lists("partner.example\n", "");
    config.dnsbl = vec![zone("bl.test", 3)];
    config.scoring.reject_mode = RejectMode::Enforce;
    let mut pair = Pair::with_dns(config, vec![listed("bl.test", [127, 0, 0, 2])]);
    assert_eq!(pair.take_output(), BANNER);
    pair.send(b"EHLO c\r\nMAIL FROM:<a@partner.example>\r\nRCPT TO:<b@example.net>\r\n");
    assert!(pair.take_output().ends_with("250 2.1.5 Ok\r\n"), "relayed");
    assert_eq!(pair.session.report().verdict, "allow");
}

#[test]
fn client_leaving_or_shutdown_while_checking() {
    let config = with_zones(vec![zone("bl.test", 3)]);
    let mut pair = Pair::new(config.clone());
    pair.session.handle_client_eof(pair.now);
    pair.pump();
    assert!(pair.closed);
    assert_eq!(pair.take_output(), "");

    let mut pair = Pair::new(config);
    pair.session.handle_shutdown(pair.now, Shutdown::Graceful);
    pair.pump();
    assert!(!pair.closed, "the checks finish first");
    let (query, ans) = answer("bl.test", DnsblAnswer::NotListed);
    pair.session
        .handle_answer(pair.now, Answer::Lookup(query, ans));
    pair.pump();
    assert_eq!(
        pair.take_output(),
        "421 4.3.2 mx.test Service shutting down, please try again later\r\n"
    );
    assert!(pair.closed);
}

#[test]
fn proxied_client_is_checked_under_its_real_address() {
    let mut config = with_zones(vec![zone("bl.test", 3)]);
    config.server.proxy_protocol_from = vec!["192.0.2.0/24".parse().unwrap()];
    let real = Query::Dnsbl {
        zone: "bl.test".into(),
        ip: "203.0.113.9".parse().unwrap(),
    };
    let ans = LookupAnswer::Dnsbl(DnsblAnswer::Listed(vec![Ipv4Addr::new(127, 0, 0, 2)]));
    let mut pair = Pair::with_dns(config, vec![(real.clone(), ans)]);
    assert!(pair.lookups.is_empty(), "no lookup for the balancer");
    pair.send(b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 25\r\n");
    assert_eq!(pair.lookups, [real]);
    assert!(
        pair.take_output()
            .starts_with("554 5.7.1 Service unavailable; client [203.0.113.9]")
    );

    // An allow-listed client behind the balancer skips the per-IP cap.
    let mut config = with_lists("203.0.113.0/24\n", "");
    config.server.proxy_protocol_from = vec!["192.0.2.0/24".parse().unwrap()];
    let mut pair = Pair::new(config);
    pair.admit = false;
    pair.send(b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 25\r\n");
    assert_eq!(pair.take_output(), BANNER);
}

#[test]
fn a_reload_applies_at_the_next_command_not_mid_checks() {
    let mut config = with_zones(vec![zone("bl.test", 3)]);
    config.dns.timeout = Duration::from_secs(2);
    let mut pair = Pair::new(config);
    // A reload while the checks run: they finish under the rules they started with.
    let mut reloaded = with_lists("", "spam.example\n");
    reloaded.dnsbl = vec![zone("other.test", 9)];
    pair.session.handle_reload(Arc::new(reloaded));
    let (query, ans) = answer("bl.test", DnsblAnswer::NotListed);
    pair.session
        .handle_answer(pair.now, Answer::Lookup(query, ans));
    pair.pump();
    assert_eq!(pair.take_output(), BANNER);
    assert_eq!(
        pair.session.report().dnsbl,
        "-",
        "the answer counted for its own zone"
    );
    // The next command meets the new lists.
    pair.send(b"EHLO mx.spam.example\r\n");
    assert_eq!(
        pair.take_output(),
        "554 5.7.1 <mx.spam.example>: Helo command rejected: Access denied\r\n"
    );
}
