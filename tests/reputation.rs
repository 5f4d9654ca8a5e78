//! Reputation through the server: an address that talked before the greeting three times is
//! weighted on its next connection, one that also delivered is not, and a tarpitted one waits.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tarmac::config::Config;
use tarmac_testkit::sink::Behaviour;

use tarmac_testkit::{Client, Server, sink, test_config, wait_until};

pub(crate) const PAUSE: Duration = Duration::from_millis(200);
const TEASER: &str = "220-mx.test ESMTP tarmac\r\n";
const BANNER: &str = "220 mx.test ESMTP tarmac\r\n";
const REFUSAL: &str = "554 5.5.1 Error: you talked before the greeting; no mail accepted\r\n";

fn remembering(downstream: std::net::SocketAddr) -> Config {
    let mut config = test_config(downstream);
    config.reputation.enabled = true;
    config.tarpit.greet_pause = PAUSE;
    // No PASS: every connection gets the pause, so every one can talk first.
    config.tarpit.pass_ttl = Duration::ZERO;
    config
}

fn from(addr: &str) -> IpAddr {
    addr.parse().unwrap()
}

/// One connection that talks before the greeting, is refused, and quits (also used by the
/// Redis tests, with a server whose greet pause is [`PAUSE`]).
#[track_caller]
pub(crate) fn pregreet(addr: std::net::SocketAddr, ip: IpAddr) {
    let mut client = Client::connect_from(addr, ip);
    assert_eq!(client.line(), TEASER);
    client.send("EHLO early.example\r\n");
    assert_eq!(client.line(), BANNER);
    assert_eq!(client.line(), REFUSAL);
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    client.expect_eof();
}

#[test]
fn three_pregreets_weigh_on_the_fourth_connection_a_delivery_record_cancels_them() {
    let sink = sink(Behaviour::Normal);
    let mut config = remembering(sink.local_addr());
    // Weight 2 reaches reject_at: a weighted client is refused at the greeting.
    config.scoring.reject_at = 2;
    let server = Server::start(config);

    let good = from("127.0.0.41");
    let mut client = Client::connect_from(server.addr, good);
    assert!(client.send_message().starts_with("250 "));
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    wait_until("the message", || sink.messages().len() == 1);

    let bad = from("127.0.0.40");
    for _ in 0..3 {
        pregreet(server.addr, bad);
        pregreet(server.addr, good);
    }

    let mut weighted = Client::connect_from(server.addr, bad);
    assert_eq!(weighted.line(), TEASER);
    assert_eq!(
        weighted.line(),
        "554 5.7.1 Service unavailable; client [127.0.0.40] blocked by local policy\r\n"
    );
    assert_eq!(weighted.command("QUIT"), "221 2.0.0 Bye\r\n");

    let mut served = Client::connect_from(server.addr, good);
    assert!(
        served.send_message().starts_with("250 "),
        "delivered before"
    );
    wait_until("the second message", || sink.messages().len() == 2);
}

#[test]
fn a_weighted_client_is_tarpitted() {
    let sink = sink(Behaviour::Normal);
    let mut config = remembering(sink.local_addr());
    let delay = Duration::from_millis(500);
    config.tarpit.reply_delay = delay;
    config.tarpit.stutter = Duration::ZERO;
    let server = Server::start(config);
    let bad = from("127.0.0.42");
    for _ in 0..3 {
        pregreet(server.addr, bad);
    }
    let started = Instant::now();
    let mut client = Client::connect_from(server.addr, bad);
    assert_eq!(client.line(), TEASER);
    assert_eq!(client.line(), BANNER);
    assert!(
        started.elapsed() >= PAUSE + delay,
        "the banner came after {:?}, before the pause and the tarpit delay",
        started.elapsed()
    );
    let asked = Instant::now();
    assert!(client.command("EHLO slow.example").starts_with("250-"));
    // A lower bound only: the reply's read is bounded by WAIT already.
    assert!(asked.elapsed() >= delay, "every reply waits");
}
