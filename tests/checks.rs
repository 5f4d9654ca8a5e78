//! DNS checks and verdicts end to end: the real server, a real DNS server on loopback
//! (`tarmac_testkit::dns_server`) and clients connecting from chosen 127.0.0.0/8 addresses, so a
//! zone can list one client and not another.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use tarmac::config::{Config, Dnsbl, RejectMode};
use tarmac::policy::{List, ListSet};
use tarmac_testkit::sink::Behaviour;

use tarmac_testkit::dns_server::{Behaviour as DnsBehaviour, DnsServer, Zone};
use tarmac_testkit::{Client, Server, sink, test_config, wait_until};

/// A block list as real lists publish one: 127.0.0.2 (the test point) listed, 127.0.0.1 not,
/// and two clients of ours listed: 127.0.0.10 plainly, 127.0.0.11 with another code.
fn block_list() -> Zone {
    Zone::new("bl.test")
        .a("2.0.0.127", "127.0.0.2")
        .a("10.0.0.127", "127.0.0.2")
        .a("11.0.0.127", "127.0.0.4")
        // Odd answers some lists give: not listings.
        .a("20.0.0.127", "10.0.0.1")
        .a("21.0.0.127", "127.255.255.254")
}

/// An allow list (DNSWL) that lists 127.0.0.12.
fn allow_list() -> Zone {
    Zone::new("wl.test")
        .a("2.0.0.127", "127.0.10.0")
        .a("12.0.0.127", "127.0.10.1")
}

fn zone(name: &str, weight: i32) -> Dnsbl {
    Dnsbl {
        zone: name.into(),
        weight,
        codes: Vec::new(),
        reply: None,
    }
}

/// The test config relaying to `sink`, asking `dns` for `zones`, no rDNS.
fn config_with(downstream: std::net::SocketAddr, dns: &DnsServer, zones: Vec<Dnsbl>) -> Config {
    let mut config = test_config(downstream);
    config.dns.servers = vec![dns.addr()];
    config.dns.timeout = Duration::from_secs(2);
    config.dnsbl = zones;
    config
}

fn from(addr: &str) -> IpAddr {
    addr.parse().unwrap()
}

#[test]
fn listed_client_gets_554_others_are_relayed() {
    let dns = DnsServer::start(vec![block_list(), allow_list()]);
    let sink = sink(Behaviour::Normal);
    let server = Server::start(config_with(
        sink.local_addr(),
        &dns,
        vec![zone("bl.test", 3), zone("wl.test", -2)],
    ));

    let mut listed = Client::connect_from(server.addr, from("127.0.0.10"));
    assert_eq!(
        listed.reply(),
        "554 5.7.1 Service unavailable; client [127.0.0.10] blocked using bl.test\r\n"
    );
    assert_eq!(
        listed.command("MAIL FROM:<a@example.org>"),
        "503 5.7.1 Error: service unavailable; only QUIT is accepted\r\n"
    );
    assert_eq!(listed.command("QUIT"), "221 2.0.0 Bye\r\n");

    for clean in ["127.0.0.3", "127.0.0.12", "127.0.0.20", "127.0.0.21"] {
        let mut client = Client::connect_from(server.addr, from(clean));
        let reply = client.send_message();
        assert!(reply.starts_with("250 "), "{clean}: {reply}");
    }
    wait_until("four messages at the sink", || sink.messages().len() == 4);
    assert!(sink.messages().iter().all(|m| !m.content.is_empty()));
}

#[test]
fn codes_filter_decides_which_answers_count() {
    let dns = DnsServer::start(vec![block_list()]);
    let sink = sink(Behaviour::Normal);
    let mut only_2 = zone("bl.test", 3);
    only_2.codes = vec![("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap())];
    only_2.reply = Some("BL, see https://bl.test/lookup".to_owned());
    let server = Server::start(config_with(sink.local_addr(), &dns, vec![only_2]));

    let mut listed = Client::connect_from(server.addr, from("127.0.0.10"));
    assert_eq!(
        listed.reply(),
        "554 5.7.1 Service unavailable; client [127.0.0.10] blocked using BL, see https://bl.test/lookup\r\n"
    );
    // 127.0.0.11 is listed with 127.0.0.4, which the filter ignores.
    let mut other_code = Client::connect_from(server.addr, from("127.0.0.11"));
    assert!(other_code.reply().starts_with("220 "));
}

#[test]
fn enforce_mode_refuses_each_rcpt_and_closes_after_data() {
    let dns = DnsServer::start(vec![block_list()]);
    let sink = sink(Behaviour::Normal);
    let mut config = config_with(sink.local_addr(), &dns, vec![zone("bl.test", 3)]);
    config.scoring.reject_mode = RejectMode::Enforce;
    let server = Server::start(config);

    let mut client = Client::connect_from(server.addr, from("127.0.0.10"));
    assert!(client.reply().starts_with("220 "));
    assert!(client.command("EHLO client.example").starts_with("250-"));
    assert_eq!(
        client.command("MAIL FROM:<a@example.org>"),
        "250 2.1.0 Ok\r\n"
    );
    let refusal = "550 5.7.1 Service unavailable; client [127.0.0.10] blocked using bl.test\r\n";
    assert_eq!(client.command("RCPT TO:<b@example.net>"), refusal);
    assert_eq!(client.command("RCPT TO:<c@example.net>"), refusal);
    assert_eq!(
        client.command("DATA"),
        "554 5.5.1 Error: no valid recipients\r\n"
    );
    client.expect_eof();
    assert_eq!(sink.connections(), 0, "nothing reached the downstream");
}

#[test]
fn dns_trouble_never_rejects_and_never_hangs() {
    let sink = sink(Behaviour::Normal);
    for behaviour in [
        DnsBehaviour::Silent,
        DnsBehaviour::Refused,
        DnsBehaviour::Slow(Duration::from_secs(5)),
    ] {
        let dns = DnsServer::start(vec![block_list()]);
        dns.set_behaviour(behaviour);
        let mut config = config_with(sink.local_addr(), &dns, vec![zone("bl.test", 3)]);
        config.dns.timeout = Duration::from_millis(300);
        let server = Server::start(config);
        // Listed in the zone, but the zone cannot say so in time: not listed.
        let mut client = Client::connect_from(server.addr, from("127.0.0.10"));
        let reply = client.send_message();
        assert!(reply.starts_with("250 "), "{behaviour:?}: {reply}");
    }

    // Nobody listens on the resolver's port at all.
    let unused = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let nowhere = unused.local_addr().unwrap();
    drop(unused);
    let mut config = test_config(sink.local_addr());
    config.dns.servers = vec![nowhere];
    config.dns.timeout = Duration::from_millis(300);
    config.dnsbl = vec![zone("bl.test", 3)];
    let server = Server::start(config);
    let mut client = Client::connect_from(server.addr, from("127.0.0.10"));
    assert!(client.send_message().starts_with("250 "));
}

#[test]
fn zone_that_lists_everyone_is_set_aside() {
    // Listing the test point 127.0.0.1 is what a list does for a resolver it blocks.
    let broken = Zone::new("bl.test")
        .a("1.0.0.127", "127.0.0.2")
        .a("2.0.0.127", "127.0.0.2")
        .a("10.0.0.127", "127.0.0.2");
    let dns = DnsServer::start(vec![broken]);
    let sink = sink(Behaviour::Normal);
    let server = Server::start(config_with(
        sink.local_addr(),
        &dns,
        vec![zone("bl.test", 3)],
    ));
    let resolver = server.handle().resolver().expect("a resolver for the zone");
    wait_until("the zone to be set aside", || {
        resolver.zone_health().iter().any(|z| z.set_aside)
    });
    let mut client = Client::connect_from(server.addr, from("127.0.0.10"));
    assert!(client.send_message().starts_with("250 "), "not rejected");
    assert_eq!(resolver.zone_health()[0].skipped, 1, "its own figure");
}

#[test]
fn rdns_name_goes_to_the_lists_and_to_xclient() {
    // Loopback addresses are `localhost` to the resolver (RFC 6761), so the client comes through
    // a balancer's PROXY header with a documentation address that the test zones describe.
    let reverse = Zone::new("2.0.192.in-addr.arpa")
        .ptr("192.0.2.7", "Mail.Example.ORG")
        .ptr("192.0.2.8", "liar.example.org");
    let forward = Zone::new("example.org")
        .a("mail", "192.0.2.7")
        .a("liar", "198.51.100.1");
    let dns = DnsServer::start(vec![reverse, forward]);
    let sink = sink(Behaviour::Normal);
    let mut config = config_with(sink.local_addr(), &dns, Vec::new());
    config.dns.rdns = true;
    config.server.proxy_protocol_from = vec!["127.0.0.0/8".parse().unwrap()];
    let server = Server::start(config.clone());
    let cases = [
        ("192.0.2.7", "mail.example.org"),
        ("192.0.2.8", "[UNAVAILABLE]"),
    ];
    for (n, (client, name)) in cases.into_iter().enumerate() {
        let mut balancer = Client::connect(server.addr);
        balancer.send(format!("PROXY TCP4 {client} 198.51.100.1 40000 25\r\n"));
        assert!(balancer.send_message().starts_with("250 "));
        let messages = sink.wait_for_messages(n + 1, tarmac_testkit::WAIT);
        let xclient = messages[n].xclient.clone().unwrap_or_default();
        assert!(
            xclient.contains(&format!("ADDR={client} "))
                && xclient.contains(&format!("NAME={name} ")),
            "forward-confirmed names only: {xclient}"
        );
    }
    drop(server);

    config.lists.entries = ListSet {
        allow: List::default(),
        deny: List::parse(&[(PathBuf::from("deny.txt"), "example.org\n".to_owned())]).unwrap(),
    };
    let server = Server::start(config);
    let mut balancer = Client::connect(server.addr);
    balancer.send("PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n");
    assert_eq!(
        balancer.reply(),
        "554 5.7.1 Service unavailable; client [192.0.2.7] blocked by local policy\r\n"
    );
    // The unverified name is not trusted for the lists.
    let mut balancer = Client::connect(server.addr);
    balancer.send("PROXY TCP4 192.0.2.8 198.51.100.1 40000 25\r\n");
    assert!(balancer.reply().starts_with("220 "));
}

#[test]
fn allow_listed_client_skips_dns_and_caps() {
    // The DNS server never answers: an allow-listed client must not wait for it.
    let dns = DnsServer::start(vec![block_list()]);
    dns.set_behaviour(DnsBehaviour::Silent);
    let sink = sink(Behaviour::Normal);
    let mut config = config_with(sink.local_addr(), &dns, vec![zone("bl.test", 3)]);
    config.dns.timeout = Duration::from_secs(30);
    config.limits.max_connections_per_ip = 1;
    config.lists.entries = ListSet {
        allow: List::parse(&[(PathBuf::from("allow.txt"), "127.0.0.10\n".to_owned())]).unwrap(),
        deny: List::default(),
    };
    let server = Server::start(config);
    let mut first = Client::connect_from(server.addr, from("127.0.0.10"));
    assert!(first.reply().starts_with("220 "), "no DNS wait");
    let mut second = Client::connect_from(server.addr, from("127.0.0.10"));
    assert!(second.reply().starts_with("220 "), "no per-IP cap");
    let stats = server.handle().resolver().unwrap().stats();
    assert_eq!(
        stats.queries_sent, 0,
        "no lookup for an allow-listed client"
    );
}

#[test]
fn ipv6_client_is_looked_up_by_nibbles() {
    let loopback6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0));
    if std::net::TcpListener::bind(loopback6).is_err() {
        println!("note: cannot bind [::1]:0 here; skipping the IPv6 DNSBL test");
        return;
    }
    // ::1 reversed by nibbles: 1 then 31 zeros.
    let label = format!("1{}", ".0".repeat(31));
    let dns = DnsServer::start(vec![block_list().a(&label, "127.0.0.2")]);
    let sink = sink(Behaviour::Normal);
    let mut config = config_with(sink.local_addr(), &dns, vec![zone("bl.test", 3)]);
    config.server.listen = vec![loopback6];
    let server = Server::start(config);
    let mut client = Client::connect(server.addr);
    assert_eq!(
        client.reply(),
        "554 5.7.1 Service unavailable; client [::1] blocked using bl.test\r\n"
    );
}

#[test]
fn a_reload_adds_a_zone_and_checks_its_health_at_once() {
    let dns = DnsServer::start(vec![
        block_list(),
        Zone::new("bl2.test")
            .a("2.0.0.127", "127.0.0.2")
            .a("70.0.0.127", "127.0.0.2"),
    ]);
    let sink = sink(Behaviour::Normal);
    let mut config = config_with(sink.local_addr(), &dns, vec![zone("bl.test", 3)]);
    // A health interval no test waits for: only the reload can trigger the new zone's check.
    config.dns.health_interval = Duration::from_secs(3600);
    let server = Server::start(config.clone());
    let mut before = Client::connect_from(server.addr, from("127.0.0.70"));
    assert!(before.reply().starts_with("220 "), "not listed in bl.test");

    config.dnsbl.push(zone("bl2.test", 3));
    let waiting = server.handle().reload(std::sync::Arc::new(config));
    assert!(waiting.is_empty(), "{waiting:?}");
    let resolver = server.handle().resolver().unwrap();
    wait_until("bl2.test's health check", || {
        resolver
            .zone_health()
            .iter()
            .any(|z| &*z.zone == "bl2.test" && z.checks > 0 && !z.set_aside)
    });
    let mut after = Client::connect_from(server.addr, from("127.0.0.70"));
    assert_eq!(
        after.reply(),
        "554 5.7.1 Service unavailable; client [127.0.0.70] blocked using bl2.test\r\n"
    );
}
