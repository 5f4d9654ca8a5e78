//! Connection rates (`[limits] connection_rate_per_ip`, `connection_rate_per_subnet`) through
//! the real server on loopback: clients pick their source address in 127.0.0.0/8, so each test
//! has addresses and /24 networks of its own. The rates are per minute and the tests take
//! seconds, so no token comes back while they run.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use tarmac::config::{Config, Rate};
use tarmac::policy::{List, ListSet};

use tarmac_testkit::{Client, DRAIN, Server, config};

const BANNER: &str = "220 mx.test ESMTP tarmac\r\n";

const TOO_MANY: &str = "421 4.7.0 mx.test Too many connections, try again later\r\n";

fn per_minute(count: u32) -> Rate {
    Rate {
        count,
        per: Duration::from_secs(60),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `tarmac_testkit::config` with the given rates (it raises both out of reach for the other tests).
fn config_with(per_ip: Rate, per_subnet: Rate) -> Config {
    let mut config = config();
    config.limits.connection_rate_per_ip = per_ip;
    config.limits.connection_rate_per_subnet = per_subnet;
    config
}

/// A connection from `source` gets the banner.
#[track_caller]
fn assert_greeted(server: &Server, source: &str) {
    let mut client = Client::connect_from(server.addr, ip(source));
    assert_eq!(client.reply(), BANNER, "from {source}");
}

/// A connection from `source` gets exactly the `421` and then EOF.
#[track_caller]
fn assert_refused(server: &Server, source: &str) {
    let mut client = Client::connect_from(server.addr, ip(source));
    assert_eq!(client.line(), TOO_MANY, "from {source}");
    client.expect_eof();
}

#[test]
fn over_the_per_ip_rate_gets_421_while_another_address_is_served() {
    let server = Server::start(config_with(per_minute(3), per_minute(1000)));
    for _ in 0..3 {
        assert_greeted(&server, "127.0.0.5");
    }
    assert_refused(&server, "127.0.0.5");
    // Refusals take no token and do not reset anything: still refused.
    assert_refused(&server, "127.0.0.5");
    // Its neighbour in the same /24 has a bucket of its own.
    for _ in 0..3 {
        assert_greeted(&server, "127.0.0.6");
    }
    assert_refused(&server, "127.0.0.6");
    server.stop_within(DRAIN);
}

#[test]
fn over_the_per_subnet_rate_gets_421_while_another_network_is_served() {
    let server = Server::start(config_with(per_minute(1000), per_minute(3)));
    assert_greeted(&server, "127.0.9.1");
    assert_greeted(&server, "127.0.9.2");
    assert_greeted(&server, "127.0.9.3");
    // A fresh address, but its /24 has used up its three.
    assert_refused(&server, "127.0.9.4");
    assert_greeted(&server, "127.0.10.1");
    server.stop_within(DRAIN);
}

#[test]
fn allow_listed_clients_are_never_rate_limited() {
    let mut config = config_with(per_minute(1), per_minute(2));
    config.lists.entries = ListSet {
        allow: List::parse(&[(PathBuf::from("allow.txt"), "127.0.0.7\n".to_owned())]).unwrap(),
        deny: List::default(),
    };
    let server = Server::start(config);
    for _ in 0..10 {
        assert_greeted(&server, "127.0.0.7");
    }
    // The allow-listed connections took no token from their /24 either: it still has both.
    assert_greeted(&server, "127.0.0.8");
    assert_refused(&server, "127.0.0.8");
    assert_greeted(&server, "127.0.0.9");
    assert_refused(&server, "127.0.0.10");
    server.stop_within(DRAIN);
}

#[test]
fn clients_behind_a_balancer_are_limited_by_their_proxy_header() {
    let mut config = config_with(per_minute(2), per_minute(1000));
    config.server.proxy_protocol_from = vec!["127.0.0.0/8".parse().unwrap()];
    config.lists.entries = ListSet {
        allow: List::parse(&[(PathBuf::from("allow.txt"), "203.0.113.7\n".to_owned())]).unwrap(),
        deny: List::default(),
    };
    let server = Server::start(config);
    // Every connection comes from the balancer, 127.0.0.1: far more than 2 a minute.
    let from_balancer = |client: &str| {
        let mut balancer = Client::connect(server.addr);
        balancer.send(format!("PROXY TCP4 {client} 127.0.0.1 40000 25\r\n"));
        balancer
    };
    for _ in 0..2 {
        assert_eq!(from_balancer("203.0.113.8").reply(), BANNER);
    }
    let mut third = from_balancer("203.0.113.8");
    assert_eq!(third.reply(), TOO_MANY);
    third.expect_eof();
    // Another client behind the same balancer has its own bucket.
    for _ in 0..2 {
        assert_eq!(from_balancer("203.0.113.9").reply(), BANNER);
    }
    // An allow-listed client named by the header is exempt, as a direct one is.
    for _ in 0..4 {
        assert_eq!(from_balancer("203.0.113.7").reply(), BANNER);
    }
    server.stop_within(DRAIN);
}

#[test]
fn a_network_cannot_hold_more_than_max_connections_per_subnet() {
    let mut config = config();
    config.limits.max_connections_per_subnet = 2;
    let server = Server::start(config);
    // Held open: each from another address of 127.0.11.0/24, each under its per-IP cap.
    let mut first = Client::connect_from(server.addr, ip("127.0.11.1"));
    assert_eq!(first.reply(), BANNER);
    let mut second = Client::connect_from(server.addr, ip("127.0.11.2"));
    assert_eq!(second.reply(), BANNER);
    assert_refused(&server, "127.0.11.3");
    // Another network is served meanwhile, and the two held are still served.
    assert_greeted(&server, "127.0.12.1");
    assert_eq!(first.command("NOOP"), "250 2.0.0 Ok\r\n");
    assert_eq!(second.command("NOOP"), "250 2.0.0 Ok\r\n");
    // (Giving the place back when one closes: `server::limits`' unit tests.)
    server.stop_within(DRAIN);
}

#[test]
fn proxied_ipv6_and_mapped_clients_are_capped_by_network_and_address() {
    let mut config = config();
    config.limits.max_connections_per_ip = 1;
    config.limits.max_connections_per_subnet = 2;
    config.server.proxy_protocol_from = vec!["127.0.0.0/8".parse().unwrap()];
    let server = Server::start(config);
    let from_balancer = |header: &str| {
        let mut balancer = Client::connect(server.addr);
        balancer.send(format!("{header}\r\n"));
        balancer
    };
    // One /64, one address at a time: the third address is over the network's cap.
    let mut held = Vec::new();
    for n in 1..=2 {
        let mut client = from_balancer(&format!("PROXY TCP6 2001:db8:1:2::{n} ::1 40000 25"));
        assert_eq!(client.reply(), BANNER);
        held.push(client);
    }
    let mut third = from_balancer("PROXY TCP6 2001:db8:1:2:ffff::3 ::1 40000 25");
    assert_eq!(third.reply(), TOO_MANY);
    third.expect_eof();
    // An IPv4 client and the same client as ::ffff:a.b.c.d share one per-IP count.
    let mut plain = from_balancer("PROXY TCP4 203.0.113.8 127.0.0.1 40000 25");
    assert_eq!(plain.reply(), BANNER);
    let mut mapped = from_balancer("PROXY TCP6 ::ffff:203.0.113.8 ::1 40000 25");
    assert_eq!(mapped.reply(), TOO_MANY);
    mapped.expect_eof();
    drop(held);
    drop(plain);
    server.stop_within(DRAIN);
}
