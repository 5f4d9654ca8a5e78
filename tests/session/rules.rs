//! Operator rules (DESIGN.md §3.2) applied by the session at connect, HELO, MAIL and RCPT.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::*;
use tarmac::config::{Dnsbl, RejectMode};
use tarmac::policy::RuleSet;
use tarmac::smtp::question::DnsblAnswer;

/// A pair whose client `bl.test` lists with `weight` (3 is a reject), not yet past its banner.
fn listed_with_weight(mut config: Config, weight: i32) -> Pair {
    config.dnsbl = vec![Dnsbl {
        zone: "bl.test".into(),
        weight,
        codes: Vec::new(),
        reply: None,
    }];
    let listed = (
        Query::Dnsbl {
            zone: "bl.test".into(),
            ip: "192.0.2.7".parse().unwrap(),
        },
        LookupAnswer::Dnsbl(DnsblAnswer::Listed(vec![Ipv4Addr::new(127, 0, 0, 2)])),
    );
    Pair::with_dns(config, vec![listed])
}

/// A pair whose client is rejected by a listing with `reject_mode = "enforce"`, greeted, its
/// banner taken.
fn listed_in_enforce_mode(mut config: Config) -> Pair {
    config.scoring.reject_mode = RejectMode::Enforce;
    let mut pair = listed_with_weight(config, 3);
    pair.take_output();
    pair
}

fn with_rules(toml: &str) -> Config {
    let mut config = config();
    config.rules.set = RuleSet::parse(&[(PathBuf::from("rules.toml"), toml.to_owned())]).unwrap();
    config
}

#[test]
fn a_helo_rule_rejects_the_helo_and_everything_after_it() {
    let mut pair = Pair::new(with_rules(
        "[[rule]]\nname = \"no-localhost\"\nwhen = { helo = \"localhost\" }\naction = \"reject\"\n",
    ));
    assert_eq!(pair.take_output(), BANNER);
    pair.send(b"EHLO LocalHost\r\nMAIL FROM:<a@example.org>\r\nQUIT\r\n");
    let refusal = "554 5.7.1 Service unavailable; rejected by local policy\r\n";
    assert_eq!(
        pair.take_output(),
        format!("{refusal}{refusal}221 2.0.0 Bye\r\n")
    );
    let report = pair.session.report();
    assert_eq!((report.rule, report.verdict), ("no-localhost", "reject"));
    assert!(pair.connects.is_empty());
}

#[test]
fn a_sender_glob_rule_refuses_that_mail_with_its_own_text() {
    let mut pair = Pair::new(with_rules(
        "[[rule]]\nname = \"spam-senders\"\nwhen = { sender = \"*@spam.example\" }\n\
         action = \"reject\"\nreply = \"550 5.7.1 Mail from spam.example is not accepted\"\n",
    ));
    pair.take_output();
    pair.send(b"EHLO c\r\nMAIL FROM:<x@SPAM.example>\r\n");
    assert!(
        pair.take_output()
            .ends_with("550 5.7.1 Mail from spam.example is not accepted\r\n")
    );
    pair.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n");
    assert_eq!(
        pair.take_output(),
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        "another sender is relayed"
    );
    assert_eq!(pair.session.report().rule, "spam-senders");
}

#[test]
fn a_recipient_rule_defers_that_recipient_only() {
    let mut pair = Pair::new(with_rules(
        "[[rule]]\nname = \"hold-abuse\"\nwhen = { recipient = \"/^abuse@/\" }\naction = \"defer\"\n",
    ));
    pair.take_output();
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<abuse@example.net>\r\nRCPT TO:<b@example.net>\r\n");
    assert!(pair.take_output().ends_with(
        "450 4.7.1 Recipient deferred by local policy; please try again later\r\n250 2.1.5 Ok\r\n"
    ));
    assert_eq!(
        pair.downstream
            .commands
            .iter()
            .filter(|c| c.starts_with("RCPT"))
            .count(),
        1,
        "the deferred recipient never went downstream"
    );
}

#[test]
fn a_score_rule_pushes_a_listed_client_to_reject() {
    let config = with_rules(
        "[[rule]]\nname = \"listed-without-rdns\"\nwhen = { no_rdns = true, dnsbl = \"bl.test\" }\n\
         action = \"score\"\nscore = 2\n",
    );
    let mut pair = listed_with_weight(config, 1);
    assert_eq!(
        pair.take_output(),
        "554 5.7.1 Service unavailable; client [192.0.2.7] blocked using bl.test\r\n"
    );
    let report = pair.session.report();
    assert_eq!((report.score, report.verdict), (3, "reject"));
}

#[test]
fn a_connect_rule_greets_then_refuses_every_command_but_quit() {
    let mut pair = Pair::new(with_rules(
        "[[rule]]\nname = \"block-net\"\nwhen = { client = \"192.0.2.0/24\" }\naction = \"defer\"\n\
         reply = \"450 4.7.1 Try again later\"\n",
    ));
    assert_eq!(pair.take_output(), BANNER);
    pair.send(b"EHLO c\r\nQUIT\r\n");
    assert_eq!(
        pair.take_output(),
        "450 4.7.1 Try again later\r\n221 2.0.0 Bye\r\n"
    );
    assert_eq!(pair.session.report().result, "tempfail");
}

#[test]
fn an_allow_rule_lifts_enforce() {
    let config = with_rules(
        "[[rule]]\nname = \"partner\"\nwhen = { sender = \"*@partner.example\" }\naction = \"allow\"\n",
    );
    let mut pair = listed_in_enforce_mode(config);
    pair.send(b"EHLO c\r\nMAIL FROM:<a@partner.example>\r\nRCPT TO:<b@example.net>\r\n");
    assert!(pair.take_output().ends_with("250 2.1.5 Ok\r\n"));
    let report = pair.session.report();
    assert_eq!((report.verdict, report.rule), ("allow", "partner"));
}

#[test]
fn a_tarpit_rule_at_helo_delays_the_replies_after_it() {
    let mut config = with_rules(
        "[[rule]]\nname = \"slow-dynamic\"\nwhen = { helo = \"*.dynamic.example\" }\naction = \"tarpit\"\n",
    );
    config.tarpit.reply_delay = Duration::from_secs(10);
    config.tarpit.stutter = Duration::ZERO;
    let mut pair = Pair::new(config);
    pair.take_output();
    pair.send(b"EHLO host.dynamic.example\r\n");
    assert_eq!(pair.take_output(), "", "the HELO reply is the first held");
    pair.advance(Duration::from_secs(10));
    assert!(pair.take_output().starts_with("250-mx.test"));
    assert_eq!(pair.session.report().verdict, "tarpit");
}

#[test]
fn a_greylist_rule_greylists_even_with_greylisting_off() {
    let mut config = with_rules(
        "[[rule]]\nname = \"grey-new-domains\"\nwhen = { sender = \"*@fresh.example\" }\n\
         action = \"greylist\"\n",
    );
    assert!(!config.greylist.enabled);
    config.greylist.delay = Duration::from_secs(60);
    let mut pair = Pair::new(config);
    pair.take_output();
    pair.send(b"EHLO c\r\nMAIL FROM:<a@fresh.example>\r\nRCPT TO:<b@example.net>\r\n");
    assert!(
        pair.take_output()
            .ends_with("451 4.7.1 Greylisted, please try again in 60 seconds\r\n")
    );
    let report = pair.session.report();
    assert_eq!((report.rule, report.greylist), ("grey-new-domains", "new"));
}

/// Issue 13, finding 4b: enforce mode answers MAIL locally; a recipient an allow rule lets
/// through (the shipped partners.toml allow-postmaster) opens the downstream and relays MAIL
/// first, after its handshake, never a bare RCPT onto a connection with no MAIL.
#[test]
fn a_recipient_allowed_in_enforce_mode_gets_mail_relayed_first() {
    let mut config = with_rules(
        "[[rule]]\nname = \"allow-postmaster\"\nwhen = { recipient = \"postmaster@example.org\" }\n\
         action = \"allow\"\n",
    );
    config.downstream.announce_client = AnnounceClient::Xclient;
    let mut pair = listed_in_enforce_mode(config);
    pair.send(b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\n");
    assert!(pair.take_output().ends_with("250 2.1.0 Ok\r\n"));
    assert!(
        pair.connects.is_empty(),
        "nothing relayed for a rejected client"
    );
    pair.send(b"RCPT TO:<postmaster@example.org>\r\nDATA\r\nhi\r\n.\r\n");
    let output = pair.take_output();
    assert!(output.starts_with("250 2.1.5 Ok\r\n354 "), "{output}");
    assert!(
        output.ends_with("250 2.0.0 Ok: queued as 1\r\n"),
        "{output}"
    );
    assert_eq!(
        pair.downstream.commands,
        [
            "EHLO mx.test",
            "XCLIENT ADDR=192.0.2.7 PORT=53211 NAME=[UNAVAILABLE] PROTO=ESMTP HELO=c.example",
            "EHLO c.example",
            "MAIL FROM:<a@example.net>",
            "RCPT TO:<postmaster@example.org>",
            "DATA",
        ]
    );
    assert_eq!(pair.downstream.delivered.len(), 1);
}
