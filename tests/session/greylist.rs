//! Greylisting at RCPT, on invented time with a real greylist table.

use std::net::Ipv4Addr;

use super::*;
use tarmac::config::Dnsbl;
use tarmac::smtp::question::DnsblAnswer;

fn greylisting() -> Config {
    let mut config = config();
    config.greylist.enabled = true;
    // These tests retry within one session after the greylist delay (a real sender reconnects),
    // so the session must outlive it.
    config.timeouts.command = Duration::from_secs(3600);
    config.timeouts.idle = Duration::from_secs(3600);
    config
}

const DEFERRED: &str = "451 4.7.1 Greylisted, please try again in 300 seconds\r\n";

#[test]
fn new_then_early_then_pass_after_the_delay() {
    let mut pair = Pair::new(greylisting());
    pair.take_output();
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n");
    assert!(pair.take_output().ends_with(DEFERRED));
    assert_eq!(pair.session.report().greylist, "new");
    assert!(
        !pair
            .downstream
            .commands
            .iter()
            .any(|c| c.starts_with("RCPT")),
        "a greylisted recipient is not relayed"
    );
    pair.advance(Duration::from_secs(100));
    pair.send(b"RCPT TO:<b@example.net>\r\n");
    assert_eq!(
        pair.take_output(),
        "451 4.7.1 Greylisted, please try again in 200 seconds\r\n"
    );
    assert_eq!(pair.session.report().greylist, "early");
    pair.advance(Duration::from_secs(200));
    pair.send(b"RCPT TO:<b@example.net>\r\n");
    assert_eq!(pair.take_output(), "250 2.1.5 Ok\r\n");
    assert_eq!(pair.session.report().greylist, "pass");
    assert_eq!(
        pair.greylist_keys[0],
        "192.0.2.0/24\u{1f}a@example.org\u{1f}b@example.net"
    );
}

#[test]
fn each_recipient_is_decided_on_its_own() {
    let mut pair = Pair::new(greylisting());
    pair.take_output();
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n");
    pair.advance(Duration::from_secs(300));
    pair.take_output();
    pair.send(b"RCPT TO:<b@example.net>\r\nRCPT TO:<new@example.net>\r\n");
    assert_eq!(pair.take_output(), format!("250 2.1.5 Ok\r\n{DEFERRED}"));
}

#[test]
fn allowed_and_dnswl_listed_clients_are_never_greylisted() {
    let mut config = greylisting();
    config.dnsbl = vec![Dnsbl {
        zone: "wl.test".into(),
        weight: -1,
        codes: Vec::new(),
        reply: None,
    }];
    // Score -1: allow (allow_at = -1), and below zero.
    let listed = (
        Query::Dnsbl {
            zone: "wl.test".into(),
            ip: "192.0.2.7".parse().unwrap(),
        },
        LookupAnswer::Dnsbl(DnsblAnswer::Listed(vec![Ipv4Addr::new(127, 0, 10, 0)])),
    );
    let mut pair = Pair::with_dns(config, vec![listed]);
    pair.take_output();
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n");
    assert!(pair.take_output().ends_with("250 2.1.5 Ok\r\n"));
    assert!(pair.greylist_keys.is_empty());
    assert_eq!(pair.session.report().greylist, "skip");
}
