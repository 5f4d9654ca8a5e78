//! The resolver thread through its public API, against a real DNS server on loopback
//! (hickory-server, `tarmac_testkit::dns_server`), with answers delivered through a real
//! `mio::Poll` waker as a worker would receive them.

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};
use tarmac::config;
use tarmac::dns::{Delivery, Inbox, Resolver, ResolverHandle, Waiter};
use tarmac::policy::dnsbl::query_name;
use tarmac::smtp::question::{DnsblAnswer, LookupAnswer, Query, RdnsAnswer};

use tarmac_testkit::WAIT;
use tarmac_testkit::dns_server::{Behaviour, DnsServer, Zone};

/// The `[dns] timeout` of tests that expect answers: generous, so a loaded machine does not
/// turn an answer into a timeout.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// The `[dns] timeout` of tests that expect a timeout.
const SHORT_TIMEOUT: Duration = Duration::from_millis(300);

/// A `[dns] timeout` longer than any test waits: a lookup in flight ends only when the
/// resolver stops (or the server answers).
const LONG_TIMEOUT: Duration = Duration::from_secs(60);

/// The worker's waker token.
const WAKER: Token = Token(0);

/// One worker's view: a poll with a registered waker and the inbox it wakes for.
struct Worker {
    poll: Poll,
    events: Events,
    inbox: Inbox,
    index: usize,
}

/// A resolver aimed at `server` and the workers it answers.
struct Fixture {
    resolver: Resolver,
    handle: ResolverHandle,
    workers: Vec<Worker>,
}

fn dns(server: SocketAddr, timeout: Duration) -> config::Dns {
    config::Dns {
        servers: vec![server],
        timeout,
        cache_ttl: Duration::from_secs(3600),
        rdns: true,
        health_interval: Duration::from_secs(300),
    }
}

fn zone_config(zone: &str) -> config::Dnsbl {
    config::Dnsbl {
        zone: Arc::from(zone),
        weight: 1,
        codes: Vec::new(),
        reply: None,
    }
}

fn dnsbl(zone: &str, ip: &str) -> Query {
    Query::Dnsbl {
        zone: Arc::from(zone),
        ip: ip.parse().unwrap(),
    }
}

fn rdns(ip: &str) -> Query {
    Query::Rdns(ip.parse().unwrap())
}

fn v4s(addrs: &[&str]) -> Vec<std::net::Ipv4Addr> {
    addrs.iter().map(|a| a.parse().unwrap()).collect()
}

/// The label under `zone` that a DNSBL lookup of `ip` asks for.
fn dnsbl_label(ip: &str, zone: &str) -> String {
    let name = query_name(ip.parse().unwrap(), zone);
    name.strip_suffix(&format!(".{zone}.")).unwrap().to_owned()
}

impl Fixture {
    /// A resolver with `workers` workers, `zones` health-checked every `health_interval`.
    #[track_caller]
    fn start(dns: config::Dns, zones: &[&str], health_interval: Duration, workers: usize) -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let zones: Vec<config::Dnsbl> = zones.iter().map(|z| zone_config(z)).collect();
        let dns = config::Dns {
            health_interval,
            ..dns
        };
        let mut resolver = Resolver::start(&dns, &zones).unwrap();
        let workers = (0..workers)
            .map(|_| {
                let poll = Poll::new().unwrap();
                let waker = Arc::new(Waker::new(poll.registry(), WAKER).unwrap());
                let (index, inbox) = resolver.add_worker(waker);
                Worker {
                    poll,
                    events: Events::with_capacity(16),
                    inbox,
                    index,
                }
            })
            .collect();
        let handle = resolver.handle();
        Fixture {
            resolver,
            handle,
            workers,
        }
    }

    /// One worker, no zones.
    #[track_caller]
    fn simple(server: &DnsServer, timeout: Duration) -> Self {
        Fixture::start(
            dns(server.addr(), timeout),
            &[],
            Duration::from_secs(300),
            1,
        )
    }

    /// `query`'s answer for worker 0: from the cache at once, or delivered through the waker.
    #[track_caller]
    fn ask(&mut self, query: &Query) -> LookupAnswer {
        let waiter = Waiter {
            worker: self.workers[0].index,
            key: 7,
        };
        if let Some(answer) = self.handle.lookup(query, waiter) {
            return answer;
        }
        let delivery = self.workers[0].wait(1, WAIT).pop().unwrap();
        assert_eq!(delivery.key, 7);
        assert_eq!(&delivery.query, query);
        delivery.answer
    }

    /// Asks until the answer comes from DNS rather than the cache (the cached one went
    /// stale), polling every 50 ms for at most [`WAIT`].
    #[track_caller]
    fn ask_until_not_cached(&mut self, query: &Query) -> LookupAnswer {
        let waiter = Waiter {
            worker: self.workers[0].index,
            key: 8,
        };
        let start = Instant::now();
        while self.handle.lookup(query, waiter).is_some() {
            assert!(start.elapsed() < WAIT, "still cached after {WAIT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.workers[0].wait(1, WAIT).pop().unwrap().answer
    }

    /// Waits (bounded) until `check` holds for the zone health report.
    #[track_caller]
    fn wait_for_health(&self, what: &str, check: impl Fn(&[tarmac::dns::ZoneHealth]) -> bool) {
        let start = Instant::now();
        loop {
            let report = self.handle.zone_health();
            if check(&report) {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "{what}: not within {WAIT:?}: {report:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Worker {
    /// Waits for `count` deliveries, as a worker would: poll until the waker fires, then drain
    /// the inbox. Fails the test after `limit`.
    #[track_caller]
    fn wait(&mut self, count: usize, limit: Duration) -> Vec<Delivery> {
        let start = Instant::now();
        let mut deliveries = Vec::new();
        loop {
            while let Some(delivery) = self.inbox.try_recv() {
                deliveries.push(delivery);
            }
            if deliveries.len() >= count {
                assert_eq!(deliveries.len(), count, "more deliveries than waiters");
                return deliveries;
            }
            let left = limit.checked_sub(start.elapsed()).unwrap_or_else(|| {
                panic!(
                    "{} of {count} deliveries within {limit:?}",
                    deliveries.len()
                )
            });
            self.poll.poll(&mut self.events, Some(left)).unwrap();
            for event in &self.events {
                assert_eq!(event.token(), WAKER);
            }
        }
    }
}

/// The blocklist most tests query.
fn blocklist() -> Zone {
    Zone::new("bl.test")
        .a("2.0.0.127", "127.0.0.2")
        .a("7.2.0.192", "127.0.0.2")
        .a("7.2.0.192", "127.0.0.4")
        .a("9.2.0.192", "127.255.255.254")
        .a("10.2.0.192", "192.0.2.1")
        .a(&dnsbl_label("2001:db8::7", "bl.test"), "127.0.0.3")
}

#[test]
fn listed_address_returns_its_codes() {
    let server = DnsServer::start(vec![blocklist()]);
    let mut fixture = Fixture::simple(&server, ANSWER_TIMEOUT);
    assert_eq!(
        fixture.ask(&dnsbl("bl.test", "192.0.2.7")),
        LookupAnswer::Dnsbl(DnsblAnswer::Listed(v4s(&["127.0.0.2", "127.0.0.4"])))
    );
}

#[test]
fn unlisted_address_is_not_listed() {
    let server = DnsServer::start(vec![blocklist()]);
    let mut fixture = Fixture::simple(&server, ANSWER_TIMEOUT);
    assert_eq!(
        fixture.ask(&dnsbl("bl.test", "192.0.2.8")),
        LookupAnswer::Dnsbl(DnsblAnswer::NotListed)
    );
}

#[test]
fn error_codes_and_non_loopback_answers_are_errors() {
    let server = DnsServer::start(vec![blocklist()]);
    let mut fixture = Fixture::simple(&server, ANSWER_TIMEOUT);
    assert_eq!(
        fixture.ask(&dnsbl("bl.test", "192.0.2.9")),
        LookupAnswer::Dnsbl(DnsblAnswer::Error("127.255.255.254".parse().unwrap()))
    );
    assert_eq!(
        fixture.ask(&dnsbl("bl.test", "192.0.2.10")),
        LookupAnswer::Dnsbl(DnsblAnswer::Error("192.0.2.1".parse().unwrap()))
    );
}

#[test]
fn ipv6_address_is_looked_up_by_nibbles() {
    let server = DnsServer::start(vec![blocklist()]);
    let mut fixture = Fixture::simple(&server, ANSWER_TIMEOUT);
    assert_eq!(
        fixture.ask(&dnsbl("bl.test", "2001:db8::7")),
        LookupAnswer::Dnsbl(DnsblAnswer::Listed(v4s(&["127.0.0.3"])))
    );
    assert_eq!(
        fixture.ask(&dnsbl("bl.test", "2001:db8::8")),
        LookupAnswer::Dnsbl(DnsblAnswer::NotListed)
    );
    // An IPv4-mapped client is its IPv4 address.
    assert_eq!(
        fixture.ask(&dnsbl("bl.test", "::ffff:192.0.2.7")),
        LookupAnswer::Dnsbl(DnsblAnswer::Listed(v4s(&["127.0.0.2", "127.0.0.4"])))
    );
}

/// Asks once on a server that will not answer in time; returns the answer and how long it
/// took.
#[track_caller]
fn ask_timed(server: &DnsServer, query: &Query) -> (LookupAnswer, Duration) {
    let mut fixture = Fixture::simple(server, SHORT_TIMEOUT);
    let start = Instant::now();
    let answer = fixture.ask(query);
    (answer, start.elapsed())
}

// Upper bounds on how long these take are left out: `ask` fails the test if the answer is
// not delivered within WAIT, and a timeout not honoured shows in the answer itself (the slow
// server's answer arrives, see below) rather than in a wall-clock bound that flakes.
#[test]
fn silent_server_is_tempfail_after_the_timeout() {
    let server = DnsServer::start(vec![blocklist()]);
    server.set_behaviour(Behaviour::Silent);
    let (answer, took) = ask_timed(&server, &dnsbl("bl.test", "192.0.2.7"));
    assert_eq!(answer, LookupAnswer::Dnsbl(DnsblAnswer::TempFail));
    assert!(took >= SHORT_TIMEOUT, "waited out the timeout: {took:?}");
    assert!(server.queries() >= 1, "the query reached the server");
    let (answer, took) = ask_timed(&server, &rdns("192.0.2.7"));
    assert_eq!(answer, LookupAnswer::Rdns(RdnsAnswer::TempFail));
    assert!(took >= SHORT_TIMEOUT, "waited out the timeout: {took:?}");
}

#[test]
fn server_slower_than_the_timeout_is_tempfail() {
    let server = DnsServer::start(vec![blocklist()]);
    server.set_behaviour(Behaviour::Slow(SHORT_TIMEOUT * 4));
    let (answer, took) = ask_timed(&server, &dnsbl("bl.test", "192.0.2.7"));
    assert_eq!(answer, LookupAnswer::Dnsbl(DnsblAnswer::TempFail));
    assert!(took >= SHORT_TIMEOUT, "waited out the timeout: {took:?}");
    // The same slow server within a longer timeout answers: the TempFail above is the
    // timeout's doing.
    let mut patient = Fixture::simple(&server, LONG_TIMEOUT);
    assert_eq!(
        patient.ask(&dnsbl("bl.test", "192.0.2.7")),
        LookupAnswer::Dnsbl(DnsblAnswer::Listed(v4s(&["127.0.0.2", "127.0.0.4"])))
    );
}

#[test]
fn refused_is_tempfail() {
    let server = DnsServer::start(vec![blocklist()]);
    server.set_behaviour(Behaviour::Refused);
    let mut fixture = Fixture::simple(&server, ANSWER_TIMEOUT);
    assert_eq!(
        fixture.ask(&dnsbl("bl.test", "192.0.2.7")),
        LookupAnswer::Dnsbl(DnsblAnswer::TempFail)
    );
    assert_eq!(
        fixture.ask(&rdns("192.0.2.7")),
        LookupAnswer::Rdns(RdnsAnswer::TempFail)
    );
}

#[test]
fn unreachable_server_is_tempfail() {
    // A loopback port nobody listens on, UDP or TCP: bound, noted, released.
    let addr = {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        drop(TcpListener::bind(addr));
        addr
    };
    let mut fixture = Fixture::start(dns(addr, SHORT_TIMEOUT), &[], Duration::from_secs(300), 1);
    // Delivered (`ask` gives up after WAIT), and as a temporary failure.
    assert_eq!(
        fixture.ask(&dnsbl("bl.test", "192.0.2.7")),
        LookupAnswer::Dnsbl(DnsblAnswer::TempFail)
    );
}

#[test]
fn second_lookup_is_answered_from_the_cache() {
    let server = DnsServer::start(vec![blocklist()]);
    let mut fixture = Fixture::simple(&server, ANSWER_TIMEOUT);
    let query = dnsbl("bl.test", "192.0.2.7");
    let first = fixture.ask(&query);
    assert_eq!(server.queries(), 1);
    let waiter = Waiter { worker: 0, key: 1 };
    // A hit comes back from `lookup` itself, without a delivery.
    assert_eq!(fixture.handle.lookup(&query, waiter), Some(first));
    assert_eq!(server.queries(), 1, "no new query at the server");
    // Negative answers are cached too.
    let unlisted = dnsbl("bl.test", "192.0.2.8");
    fixture.ask(&unlisted);
    assert_eq!(
        fixture.handle.lookup(&unlisted, waiter),
        Some(LookupAnswer::Dnsbl(DnsblAnswer::NotListed))
    );
    assert_eq!(server.queries(), 2);
    let stats = fixture.handle.stats();
    assert_eq!((stats.queries_sent, stats.cache_hits), (2, 2), "{stats:?}");
}

#[test]
fn a_thousand_waiters_on_one_address_cost_one_query() {
    let server = DnsServer::start(vec![blocklist()]);
    // Slow enough that every lookup below joins the one in flight; well under hickory's
    // 333 ms UDP retransmission floor, so the server sees one packet.
    server.set_behaviour(Behaviour::Slow(Duration::from_millis(100)));
    let mut fixture = Fixture::start(
        dns(server.addr(), ANSWER_TIMEOUT),
        &[],
        Duration::from_secs(300),
        2,
    );
    let query = dnsbl("bl.test", "192.0.2.7");
    for key in 0..1000u64 {
        let worker = fixture.workers[usize::from(key % 2 == 1)].index;
        let immediate = fixture.handle.lookup(&query, Waiter { worker, key });
        assert_eq!(immediate, None, "lookup {key} was answered at once");
    }
    let mut keys: Vec<u64> = Vec::new();
    for worker in &mut fixture.workers {
        for delivery in worker.wait(500, WAIT) {
            assert_eq!(delivery.query, query);
            assert_eq!(
                delivery.answer,
                LookupAnswer::Dnsbl(DnsblAnswer::Listed(v4s(&["127.0.0.2", "127.0.0.4"])))
            );
            keys.push(delivery.key);
        }
    }
    keys.sort_unstable();
    assert_eq!(keys, (0..1000).collect::<Vec<u64>>(), "every waiter, once");
    assert_eq!(server.queries(), 1);
    let stats = fixture.handle.stats();
    assert_eq!((stats.queries_sent, stats.merged), (1, 999), "{stats:?}");
}

#[test]
fn answer_is_asked_again_after_its_ttl() {
    let server = DnsServer::start(vec![
        Zone::new("bl.test")
            .a_ttl("7.2.0.192", "127.0.0.2", 1)
            .negative_ttl(1),
    ]);
    let mut fixture = Fixture::simple(&server, ANSWER_TIMEOUT);
    for (query, answer) in [
        (
            dnsbl("bl.test", "192.0.2.7"),
            DnsblAnswer::Listed(v4s(&["127.0.0.2"])),
        ),
        // Negative answers live for the SOA's negative TTL.
        (dnsbl("bl.test", "192.0.2.8"), DnsblAnswer::NotListed),
    ] {
        let before = server.queries();
        let asked = Instant::now();
        assert_eq!(fixture.ask(&query), LookupAnswer::Dnsbl(answer.clone()));
        assert_eq!(
            fixture.handle.lookup(&query, Waiter { worker: 0, key: 1 }),
            Some(LookupAnswer::Dnsbl(answer.clone())),
            "cached within the TTL"
        );
        assert_eq!(
            fixture.ask_until_not_cached(&query),
            LookupAnswer::Dnsbl(answer)
        );
        assert!(
            asked.elapsed() >= Duration::from_millis(900),
            "kept for the TTL"
        );
        assert_eq!(server.queries(), before + 2);
    }
}

/// Forward and reverse zones for the rDNS tests.
fn rdns_zones() -> Vec<Zone> {
    vec![
        Zone::new("example.test")
            .a("mail", "192.0.2.7")
            .a("other", "192.0.2.99")
            .a("mail9", "192.0.2.9")
            .aaaa("mail6", "2001:db8::7"),
        Zone::new("in-addr.arpa")
            .ptr("192.0.2.7", "Mail.Example.Test")
            .ptr("192.0.2.8", "other.example.test")
            // The first name has no address at all; the second confirms.
            .ptr("192.0.2.9", "gone.example.test")
            .ptr("192.0.2.9", "mail9.example.test"),
        Zone::new("ip6.arpa").ptr("2001:db8::7", "mail6.example.test"),
    ]
}

#[test]
fn rdns_verified_when_the_name_resolves_back() {
    let server = DnsServer::start(rdns_zones());
    let mut fixture = Fixture::simple(&server, ANSWER_TIMEOUT);
    for (ip, name) in [
        ("192.0.2.7", "mail.example.test"),
        ("192.0.2.9", "mail9.example.test"),
        ("2001:db8::7", "mail6.example.test"),
        ("::ffff:192.0.2.7", "mail.example.test"),
    ] {
        assert_eq!(
            fixture.ask(&rdns(ip)),
            LookupAnswer::Rdns(RdnsAnswer::Verified(Arc::from(name))),
            "{ip}"
        );
    }
}

#[test]
fn rdns_unverified_when_the_name_resolves_elsewhere() {
    let server = DnsServer::start(rdns_zones());
    let mut fixture = Fixture::simple(&server, ANSWER_TIMEOUT);
    assert_eq!(
        fixture.ask(&rdns("192.0.2.8")),
        LookupAnswer::Rdns(RdnsAnswer::Unverified)
    );
}

#[test]
fn rdns_without_ptr_has_no_name() {
    let server = DnsServer::start(rdns_zones());
    let mut fixture = Fixture::simple(&server, ANSWER_TIMEOUT);
    assert_eq!(
        fixture.ask(&rdns("192.0.2.50")),
        LookupAnswer::Rdns(RdnsAnswer::NoName)
    );
    assert_eq!(
        fixture.ask(&rdns("2001:db8::50")),
        LookupAnswer::Rdns(RdnsAnswer::NoName)
    );
}

/// A zone answering its test points as lists publish them, plus one listed client.
fn healthy_zone(origin: &str) -> Zone {
    Zone::new(origin)
        .a("2.0.0.127", "127.0.0.2")
        .a("7.2.0.192", "127.0.0.2")
}

#[test]
fn zone_listing_everyone_is_set_aside_and_healthy_zone_stays() {
    let server = DnsServer::start(vec![
        healthy_zone("good.test"),
        healthy_zone("bad.test").a("1.0.0.127", "127.0.0.2"),
    ]);
    let mut fixture = Fixture::start(
        dns(server.addr(), ANSWER_TIMEOUT),
        &["good.test", "bad.test"],
        Duration::from_secs(300),
        1,
    );
    // The check at start decides both.
    fixture.wait_for_health("first checks", |report| {
        report.iter().all(|z| z.checks >= 1)
    });
    let report = fixture.handle.zone_health();
    assert_eq!(
        report
            .iter()
            .map(|z| (&*z.zone, z.set_aside))
            .collect::<Vec<_>>(),
        vec![("good.test", false), ("bad.test", true)]
    );
    let before = server.queries();
    let waiter = Waiter { worker: 0, key: 1 };
    for _ in 0..3 {
        assert_eq!(
            fixture
                .handle
                .lookup(&dnsbl("bad.test", "192.0.2.7"), waiter),
            Some(LookupAnswer::Dnsbl(DnsblAnswer::SetAside))
        );
    }
    assert_eq!(server.queries(), before, "a set-aside zone is not queried");
    assert_eq!(fixture.handle.zone_health()[1].skipped, 3);
    assert_eq!(
        fixture.ask(&dnsbl("good.test", "192.0.2.7")),
        LookupAnswer::Dnsbl(DnsblAnswer::Listed(v4s(&["127.0.0.2"])))
    );
    assert_eq!(fixture.handle.zone_health()[0].skipped, 0);
}

#[test]
fn blocked_zone_is_set_aside_until_it_answers_right_again() {
    // Every name answers Spamhaus's "public resolver blocked" code.
    let blocked = Zone::new("bl.test")
        .a("2.0.0.127", "127.255.255.254")
        .a("1.0.0.127", "127.255.255.254")
        .a("7.2.0.192", "127.255.255.254");
    let server = DnsServer::start(vec![blocked]);
    let mut fixture = Fixture::start(
        dns(server.addr(), ANSWER_TIMEOUT),
        &["bl.test"],
        Duration::from_millis(100),
        1,
    );
    fixture.wait_for_health("set aside", |report| report[0].set_aside);
    let waiter = Waiter { worker: 0, key: 1 };
    assert_eq!(
        fixture
            .handle
            .lookup(&dnsbl("bl.test", "192.0.2.7"), waiter),
        Some(LookupAnswer::Dnsbl(DnsblAnswer::SetAside))
    );
    server.set_zones(vec![healthy_zone("bl.test")]);
    fixture.wait_for_health("back in use", |report| !report[0].set_aside);
    assert_eq!(
        fixture.ask(&dnsbl("bl.test", "192.0.2.7")),
        LookupAnswer::Dnsbl(DnsblAnswer::Listed(v4s(&["127.0.0.2"])))
    );
    assert_eq!(fixture.handle.zone_health()[0].skipped, 1);
}

#[test]
fn zone_health_is_unchanged_when_its_checks_time_out() {
    let server = DnsServer::start(vec![healthy_zone("bl.test")]);
    server.set_behaviour(Behaviour::Silent);
    let fixture = Fixture::start(
        dns(server.addr(), Duration::from_millis(100)),
        &["bl.test"],
        Duration::from_millis(50),
        1,
    );
    fixture.wait_for_health("two checks", |report| report[0].checks >= 2);
    assert!(!fixture.handle.zone_health()[0].set_aside);
    assert!(fixture.handle.stats().health_queries >= 4);
}

#[test]
fn overload_answers_tempfail_at_once() {
    let server = DnsServer::start(vec![blocklist()]);
    server.set_behaviour(Behaviour::Silent);
    let fixture = Fixture::start(
        dns(server.addr(), LONG_TIMEOUT),
        &[],
        Duration::from_secs(300),
        1,
    );
    // More distinct lookups than can be in flight plus queued: the rest fail at once.
    let mut refused = 0;
    for n in 0..4000u32 {
        let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 | n));
        let query = Query::Dnsbl {
            zone: Arc::from("bl.test"),
            ip,
        };
        let waiter = Waiter {
            worker: 0,
            key: u64::from(n),
        };
        match fixture.handle.lookup(&query, waiter) {
            None => {}
            Some(answer) => {
                assert_eq!(answer, LookupAnswer::Dnsbl(DnsblAnswer::TempFail));
                refused += 1;
            }
        }
    }
    // At most 512 in flight, 2048 queued and one in the resolver's hands get through.
    assert!(refused >= 4000 - 512 - 2048 - 1, "{refused} refused");
    assert_eq!(fixture.handle.stats().overloaded, refused);
    // Stopping with hundreds of lookups in flight ends the thread rather than leaving it (see
    // `stopped_with_lookups_in_flight`).
    let handle = fixture.handle.clone();
    let delivered = stopped_with_lookups_in_flight(fixture, &server);
    assert!(
        delivered
            .iter()
            .all(|d| d.answer == LookupAnswer::Dnsbl(DnsblAnswer::TempFail)),
        "{delivered:?}"
    );
    assert_eq!(
        handle.lookup(&dnsbl("bl.test", "192.0.2.7"), Waiter { worker: 0, key: 1 }),
        Some(LookupAnswer::Dnsbl(DnsblAnswer::TempFail)),
        "a handle outliving the resolver fails at once"
    );
}

/// Waits (bounded) until a lookup is in flight (the silent `server` got a query), stops the
/// resolver and returns what its worker had been delivered by the moment `stop` returned.
///
/// The server never answers and the timeout is [`LONG_TIMEOUT`], so a lookup in flight ends
/// only when the resolver thread ends and drops it, delivering `TempFail`. At least one
/// delivery therefore shows the thread ended before `stop` returned (it was joined); a thread
/// left running past [`tarmac::dns::STOP_WAIT`] would have delivered nothing yet.
#[track_caller]
fn stopped_with_lookups_in_flight(fixture: Fixture, server: &DnsServer) -> Vec<Delivery> {
    tarmac_testkit::wait_until("a lookup in flight", || server.queries() >= 1);
    let Fixture {
        resolver, workers, ..
    } = fixture;
    resolver.stop();
    let delivered: Vec<Delivery> = std::iter::from_fn(|| workers[0].inbox.try_recv()).collect();
    assert!(
        !delivered.is_empty(),
        "nothing delivered when stop returned: the thread was left, not joined"
    );
    delivered
}

#[test]
fn stop_ends_the_thread_and_handles_then_fail_fast() {
    let server = DnsServer::start(vec![blocklist()]);
    let mut fixture = Fixture::simple(&server, LONG_TIMEOUT);
    fixture.ask(&dnsbl("bl.test", "192.0.2.7"));
    let handle = fixture.handle.clone();
    // One lookup in flight on a server gone silent.
    server.set_behaviour(Behaviour::Silent);
    let before = server.queries();
    let in_flight = dnsbl("bl.test", "192.0.2.9");
    assert_eq!(
        fixture
            .handle
            .lookup(&in_flight, Waiter { worker: 0, key: 9 }),
        None
    );
    tarmac_testkit::wait_until("the lookup in flight", || server.queries() > before);
    let delivered = stopped_with_lookups_in_flight(fixture, &server);
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0].query, in_flight);
    assert_eq!(
        delivered[0].answer,
        LookupAnswer::Dnsbl(DnsblAnswer::TempFail)
    );
    assert_eq!(
        handle.lookup(&dnsbl("bl.test", "192.0.2.8"), Waiter { worker: 0, key: 1 }),
        Some(LookupAnswer::Dnsbl(DnsblAnswer::TempFail))
    );
}
