//! The pre-greet stage and the tarpit end to end over loopback: the teaser and the pause, a
//! pregreet talker next to a polite client, the PASS cache, stutter, and the tarpit cap.
//! Delays are short and configured; tests wait for events and check lower bounds only (a
//! reply may never come early; how late it comes is the machine's business).

use std::io::Read;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tarmac::config::{Config, Dnsbl, Pregreet};
use tarmac_testkit::sink::Behaviour;

use tarmac_testkit::dns_server::{DnsServer, Zone};
use tarmac_testkit::{Client, Server, sink, test_config, wait_until};

const PAUSE: Duration = Duration::from_millis(400);
const TEASER: &str = "220-mx.test ESMTP tarmac\r\n";
const BANNER: &str = "220 mx.test ESMTP tarmac\r\n";

fn paused(downstream: std::net::SocketAddr) -> Config {
    let mut config = test_config(downstream);
    config.tarpit.greet_pause = PAUSE;
    config
}

fn from(addr: &str) -> IpAddr {
    addr.parse().unwrap()
}

/// A zone (weight 2: a tarpit verdict) listing 127.0.0.20 to 127.0.0.23.
fn tarpit_zone() -> (DnsServer, Dnsbl) {
    let mut zone = Zone::new("bl.test").a("2.0.0.127", "127.0.0.2");
    for n in 20..24 {
        zone = zone.a(&format!("{n}.0.0.127"), "127.0.0.2");
    }
    let dnsbl = Dnsbl {
        zone: "bl.test".into(),
        weight: 2,
        codes: Vec::new(),
        reply: None,
    };
    (DnsServer::start(vec![zone]), dnsbl)
}

#[test]
fn teaser_at_once_then_the_banner_after_the_pause() {
    let sink = sink(Behaviour::Normal);
    let server = Server::start(paused(sink.local_addr()));
    let started = Instant::now();
    let mut client = Client::connect_from(server.addr, from("127.0.0.30"));
    assert_eq!(client.line(), TEASER);
    assert_eq!(client.line(), BANNER);
    assert!(
        started.elapsed() >= PAUSE,
        "the final line came before the pause was over"
    );
}

#[test]
fn pregreet_talker_is_refused_while_a_polite_client_is_served() {
    let sink = sink(Behaviour::Normal);
    let server = Server::start(paused(sink.local_addr()));

    let mut talker = Client::connect_from(server.addr, from("127.0.0.31"));
    assert_eq!(talker.line(), TEASER);
    talker.send("EHLO spammer.example\r\nMAIL FROM:<a@example.org>\r\n");
    let mut polite = Client::connect_from(server.addr, from("127.0.0.32"));

    assert_eq!(talker.line(), BANNER);
    let refusal = "554 5.5.1 Error: you talked before the greeting; no mail accepted\r\n";
    assert_eq!(talker.line(), refusal);
    assert_eq!(talker.line(), refusal);
    assert_eq!(talker.command("QUIT"), "221 2.0.0 Bye\r\n");

    assert!(polite.send_message().starts_with("250 "));
    wait_until("the polite client's message", || sink.messages().len() == 1);
    assert_eq!(
        sink.connections(),
        1,
        "the talker never reached the downstream"
    );
}

#[test]
fn pregreet_drop_answers_521_and_hangs_up() {
    let sink = sink(Behaviour::Normal);
    let mut config = paused(sink.local_addr());
    config.tarpit.pregreet = Pregreet::Drop;
    let server = Server::start(config);
    let mut talker = Client::connect_from(server.addr, from("127.0.0.33"));
    assert_eq!(talker.line(), TEASER);
    talker.send("EHLO spammer.example\r\n");
    assert_eq!(
        talker.line(),
        "521 5.5.1 mx.test Protocol error: talked before the greeting\r\n"
    );
    talker.expect_eof();
}

#[test]
fn a_client_that_passed_skips_the_pause_next_time() {
    let sink = sink(Behaviour::Normal);
    let server = Server::start(paused(sink.local_addr()));
    let mut first = Client::connect_from(server.addr, from("127.0.0.34"));
    assert_eq!(first.line(), TEASER);
    assert_eq!(first.line(), BANNER);
    assert_eq!(first.command("QUIT"), "221 2.0.0 Bye\r\n");

    let mut again = Client::connect_from(server.addr, from("127.0.0.34"));
    assert_eq!(again.line(), BANNER, "no teaser: the PASS skips the pause");
    let mut stranger = Client::connect_from(server.addr, from("127.0.0.35"));
    assert_eq!(stranger.line(), TEASER, "another address still waits");
}

#[test]
fn stutter_spreads_the_banner_over_time() {
    let (dns, zone) = tarpit_zone();
    let sink = sink(Behaviour::Normal);
    let mut config = test_config(sink.local_addr());
    config.dns.servers = vec![dns.addr()];
    config.dnsbl = vec![zone];
    let step = Duration::from_millis(50);
    config.tarpit.reply_delay = Duration::ZERO;
    config.tarpit.stutter = step;
    let server = Server::start(config);

    let started = Instant::now();
    let mut client = Client::connect_from(server.addr, from("127.0.0.20"));
    let mut banner = Vec::new();
    let mut byte = [0u8; 64];
    while !banner.ends_with(b"\r\n") {
        let n = client.writer.read(&mut byte).unwrap();
        assert!(n > 0, "closed mid-banner");
        assert_eq!(n, 1, "one byte at a time, got {:?}", &byte[..n]);
        banner.extend_from_slice(&byte[..n]);
    }
    assert_eq!(banner, BANNER.as_bytes());
    let least = step * (BANNER.len() as u32 - 1);
    assert!(
        started.elapsed() >= least,
        "{} bytes in {:?}, less than {least:?}",
        BANNER.len(),
        started.elapsed()
    );
}

#[test]
fn over_max_tarpitted_the_client_is_rejected_instead() {
    let (dns, zone) = tarpit_zone();
    let sink = sink(Behaviour::Normal);
    let mut config = test_config(sink.local_addr());
    config.dns.servers = vec![dns.addr()];
    config.dnsbl = vec![zone];
    config.server.max_tarpitted = 1;
    config.tarpit.reply_delay = Duration::ZERO;
    config.tarpit.stutter = Duration::from_secs(1);
    let server = Server::start(config);

    let mut first = Client::connect_from(server.addr, from("127.0.0.21"));
    let mut byte = [0u8; 1];
    first.writer.read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"2", "tarpitted: its banner starts, one byte");
    let mut second = Client::connect_from(server.addr, from("127.0.0.22"));
    assert_eq!(
        second.line(),
        "554 5.7.1 Service unavailable; client [127.0.0.22] blocked using bl.test\r\n"
    );
}

#[test]
fn stress_mode_shortens_the_greet_pause() {
    let sink = sink(Behaviour::Normal);
    let mut config = paused(sink.local_addr());
    // A pause no test waits for: only stress mode's 2 s lets a banner through in time.
    config.tarpit.greet_pause = Duration::from_secs(60);
    config.server.max_connections = 5;
    config.server.workers = 1;
    let server = Server::start(config);
    // Four of five connections open: 80 %, stress mode.
    let mut held: Vec<Client> = (40..44)
        .map(|n| Client::connect_from(server.addr, from(&format!("127.0.0.{n}"))))
        .collect();
    for client in &mut held {
        assert_eq!(client.line(), TEASER);
    }
    let started = Instant::now();
    let mut late = Client::connect_from(server.addr, from("127.0.0.45"));
    assert_eq!(late.line(), TEASER);
    assert_eq!(late.line(), BANNER, "the pause shrank to 2 s");
    assert!(started.elapsed() >= Duration::from_secs(2));
}
