//! DNS checks: lookups per second through the resolver thread, the cost of a cache hit on the
//! connection path, and how many queries many connections from few addresses cause.
//!
//! Everything talks to a real DNS server on loopback (hickory-server,
//! `testkit/src/dns_server.rs`), never to the system resolver:
//!
//! - `dns/lookups`: DNSBL lookups of distinct addresses (no cache hits) through
//!   [`ResolverHandle::lookup`], at most [`WINDOW`] in flight, answers drained from the inbox of
//!   a real `mio::Poll` + `Waker` as a worker drains them; beside it, in the same run, the same
//!   names asked of the same server by a plain blocking UDP client with the same window, and the
//!   ratio. Rounds are interleaved (direct, resolver, direct, ...) and medians reported, so
//!   machine noise hits both sides. Every answer is checked (listed or NXDOMAIN as the zone says).
//! - `dns/cache-hit`: `lookup()` calls answered from the cache, and a whole session greeting
//!   (`Session::new` → its two `Action::Lookup`s answered from the cache → banner) against the
//!   same greeting with no zones configured: what the cache path adds per connection.
//! - `dns/merge`: tarmac itself (`ServerHandle`, two workers, two `[[dnsbl]]` zones, no rDNS)
//!   takes 10,000 connections from 1,000 loopback source addresses, 10 each, from a pool of
//!   client threads; each client reads its greeting (`554` when the address is listed, else
//!   `220`), sends QUIT and waits for the close. The queries the DNS server received, less the
//!   zones' start-up health checks, must be at most one per address and zone.
//!
//! `cargo bench --bench dns` runs the full size; without `--bench` (as `cargo test
//! --all-targets` runs it, in a debug build) a small pass checks correctness only.

/// What this bench shares with the others: whole files of `bench/support/`, only those whose
/// every item it uses (see `bench/support/README.md`).
mod support {
    pub mod cpu;
    pub mod dnsbl;
    pub mod run;
    pub mod server;
    pub mod stats;
    pub mod window;
}

use std::collections::VecDeque;
use std::hint::black_box;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, UNIX_EPOCH};

use mio::{Poll, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};
use tarmac::config::{self, Config};
use tarmac::dns::{Resolver, ResolverHandle, Waiter};
use tarmac::policy::dnsbl::query_name;
use tarmac::smtp::question::{DnsblAnswer, LookupAnswer, Query};
use tarmac::smtp::{Action, Answer, Peer, Question, Session};
use tarmac_testkit::dns_server::{DnsServer, Zone};

use support::cpu;
use support::dnsbl::{self, loopback_dns, source_addr};
use support::run::Run;
use support::server;
use support::stats::{median, per_second};
use support::window;

/// Lookups kept in flight by the lookup bench, in both legs: below the resolver's 512 lookups
/// in flight and 2048 queued requests, so none is answered `TempFail` for overload.
const WINDOW: usize = 256;

/// The zone that rejects: weight 3 reaches the default `reject_at`, so a listed client is
/// greeted `554`.
const REJECT_ZONE: &str = "bl.bench";

/// The second zone: lists only its test point, so every client's answer in it is NXDOMAIN.
const SCORE_ZONE: &str = "score.bench";

/// Every `LISTED_EVERY`th address (index 0, 10, 20, ...) is listed in [`REJECT_ZONE`].
const LISTED_EVERY: usize = 10;

/// How long the direct client waits before sending a query again: loopback UDP can drop when a
/// socket buffer fills, and a lost query must not stall the round.
const RETRANSMIT_AFTER: Duration = Duration::from_millis(50);

/// The direct client's socket receive buffer, bytes.
const DIRECT_RECV_BUFFER: usize = 1 << 20;

/// Longest any connect, read or write of the merge bench's clients may take.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest one round (of lookups, or of connections) may take before the bench fails.
const ROUND_DEADLINE: Duration = Duration::from_secs(60);

/// Client threads of the merge bench: at most this many connections are open at once.
const CLIENT_THREADS: usize = 32;

/// The worker's waker token in the lookup bench.
const WAKER: Token = Token(0);

fn main() {
    let Run { full, note } = Run::from_args();
    lookups(full, note);
    cache_hits(full, note);
    merge(full, note);
}

// ---- dns/lookups ----

/// Lookups per second through the resolver thread against the same server asked directly.
fn lookups(full: bool, note: &str) {
    let (n, rounds) = if full { (50_000, 3) } else { (200, 1) };
    let addrs: Vec<IpAddr> = (0..n).map(lookup_addr).collect();
    let server = DnsServer::start(vec![reject_zone(&addrs), score_zone(&[])]);
    let names: Vec<Vec<u8>> = addrs
        .iter()
        .map(|&ip| wire_name(&query_name(ip, REJECT_ZONE)))
        .collect();

    // Warm-up: sockets, the server's first answers, thread start-up; not measured.
    let warm = n.min(1000);
    direct_round(&server, names.get(..warm).expect("warm-up names"));
    resolver_round(&server, addrs.get(..warm).expect("warm-up addresses"));

    let mut direct = Vec::new();
    let mut through = Vec::new();
    for _ in 0..rounds {
        direct.push(direct_round(&server, &names));
        through.push(resolver_round(&server, &addrs));
    }
    let direct_rate = median(direct.iter().map(|r| per_second(n, r.elapsed)).collect());
    let resolver_rate = median(through.iter().map(|r| per_second(n, r.elapsed)).collect());
    let direct_cpu = median(direct.iter().map(|r| per_op_us(r.cpu, n)).collect());
    let resolver_cpu = median(through.iter().map(|r| per_op_us(r.cpu, n)).collect());
    let retransmits: u64 = direct.iter().map(|r| r.retransmits).sum();
    let server_queries: u64 = through.iter().map(|r| r.server_queries).sum();
    let queries_sent: u64 = through.iter().map(|r| r.queries_sent).sum();
    let lookups = n * rounds;
    let params =
        format!("{n} distinct addresses, window {WINDOW}, median of {rounds} interleaved rounds");
    println!(
        "dns/lookups: {resolver_rate:.0} lookups/s (through the resolver thread to one mio \
         worker, {params}; {queries_sent} queries sent and {server_queries} received by the \
         server for {lookups} lookups){note}"
    );
    println!(
        "dns/direct-udp: {direct_rate:.0} queries/s (the same server asked directly from one \
         blocking UDP socket, same names, {params}; {retransmits} retransmitted){note}"
    );
    println!(
        "dns/lookups-ratio: {:.2} (resolver thread / direct){note}",
        resolver_rate / direct_rate
    );
    println!(
        "dns/lookups-cpu: {resolver_cpu:.1} us CPU per lookup through the resolver thread, \
         {direct_cpu:.1} us per direct query (whole process: the DNS server's thread is in \
         both){note}"
    );
}

/// One measured pass of lookups.
struct LookupRound {
    elapsed: Duration,
    /// Queries the DNS server received during the round (hickory's retransmissions included).
    server_queries: u64,
    /// `DnsStats::queries_sent` at the end (a fresh resolver per round).
    queries_sent: u64,
    /// The direct client's retransmissions.
    retransmits: u64,
    /// Process CPU time during the round (every thread, the DNS server's included).
    cpu: Duration,
}

/// `addrs` looked up in [`REJECT_ZONE`] through a fresh resolver (empty cache); every answer is
/// checked.
fn resolver_round(server: &DnsServer, addrs: &[IpAddr]) -> LookupRound {
    let (resolver, mut worker) = start_resolver(server);
    let handle = resolver.handle();
    let queries: Vec<Query> = addrs
        .iter()
        .map(|&ip| dnsbl_query(REJECT_ZONE, ip))
        .collect();
    let before = server.queries();
    let cpu_before = cpu::process();
    let started = Instant::now();
    let answers = worker.run(&handle, &queries);
    let elapsed = started.elapsed();
    let cpu = (cpu::process() - cpu_before).total();
    let server_queries = server.queries() - before;
    for (index, answer) in answers.iter().enumerate() {
        check_reject_answer(index, answer);
    }
    let stats = handle.stats();
    assert_eq!(stats.cache_hits, 0, "distinct addresses: no cache hits");
    assert_eq!(
        stats.overloaded, 0,
        "the window stays below the resolver's caps"
    );
    resolver.stop();
    LookupRound {
        elapsed,
        server_queries,
        queries_sent: stats.queries_sent,
        retransmits: 0,
        cpu,
    }
}

/// The same names asked directly: one connected UDP socket, [`WINDOW`] queries outstanding,
/// a blocking receive with a short timeout, retransmission after [`RETRANSMIT_AFTER`].
fn direct_round(server: &DnsServer, names: &[Vec<u8>]) -> LookupRound {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("UDP socket");
    // Room for a whole window of answers (the default buffer drops some when the client is
    // descheduled); the kernel caps it at net.core.rmem_max.
    socket
        .set_recv_buffer_size(DIRECT_RECV_BUFFER)
        .expect("receive buffer");
    socket
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .expect("bind UDP");
    let socket = UdpSocket::from(socket);
    socket.connect(server.addr()).expect("connect UDP");
    socket
        .set_read_timeout(Some(RETRANSMIT_AFTER / 4))
        .expect("read timeout");
    socket
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    // Indexed by query ID: (name index, when last sent). IDs are name indexes mod 2^16; with
    // at most WINDOW outstanding they cannot collide.
    let mut outstanding: Vec<Option<(usize, Instant)>> = vec![None; 1 << 16];
    // (sent at, ID) in send order, for retransmission; entries already answered are skipped.
    let mut sent_order: VecDeque<(Instant, u16)> = VecDeque::with_capacity(2 * WINDOW);
    let mut in_flight = 0;
    let mut next = 0;
    let mut done = 0;
    let mut retransmits = 0;
    let mut packet = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    let before = server.queries();
    let cpu_before = cpu::process();
    let started = Instant::now();
    let deadline = started + ROUND_DEADLINE;
    while done < names.len() {
        let now = Instant::now();
        assert!(now < deadline, "direct round over {ROUND_DEADLINE:?}");
        while in_flight < WINDOW && next < names.len() {
            let id = (next % (1 << 16)) as u16;
            query_packet(&mut packet, id, names.get(next).expect("name"));
            socket.send(&packet).expect("send query");
            *outstanding.get_mut(usize::from(id)).expect("slot") = Some((next, now));
            sent_order.push_back((now, id));
            in_flight += 1;
            next += 1;
        }
        while let Some(&(sent, id)) = sent_order.front() {
            if now.duration_since(sent) < RETRANSMIT_AFTER {
                break;
            }
            sent_order.pop_front();
            let slot = outstanding.get_mut(usize::from(id)).expect("slot");
            let Some((index, last_sent)) = slot else {
                continue; // answered
            };
            if *last_sent != sent {
                continue; // a later send of the same query is queued behind
            }
            query_packet(&mut packet, id, names.get(*index).expect("name"));
            socket.send(&packet).expect("resend query");
            *last_sent = now;
            sent_order.push_back((now, id));
            retransmits += 1;
        }
        match socket.recv(&mut buf) {
            Ok(len) => {
                let reply = buf.get(..len).expect("received length");
                let id = u16::from_be_bytes([reply[0], reply[1]]);
                let Some((index, _)) = outstanding.get_mut(usize::from(id)).and_then(Option::take)
                else {
                    continue; // a second answer to a retransmitted query
                };
                check_direct_answer(index, reply);
                in_flight -= 1;
                done += 1;
            }
            // Nothing within the read timeout: go round to retransmit.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("receiving an answer: {e}"),
        }
    }
    LookupRound {
        elapsed: started.elapsed(),
        server_queries: server.queries() - before,
        queries_sent: 0,
        retransmits,
        cpu: (cpu::process() - cpu_before).total(),
    }
}

/// A standard query (RD set) for `name`'s A record, in wire format, with ID `id`.
fn query_packet(packet: &mut Vec<u8>, id: u16, name: &[u8]) {
    packet.clear();
    packet.extend_from_slice(&id.to_be_bytes());
    // Flags: RD, as a stub resolver sends; QDCOUNT 1; no other records.
    packet.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    packet.extend_from_slice(name);
    // QTYPE A, QCLASS IN.
    packet.extend_from_slice(&[0, 1, 0, 1]);
}

/// `name` (dotted, with the root dot) as length-prefixed labels.
fn wire_name(name: &str) -> Vec<u8> {
    let mut wire = Vec::with_capacity(name.len() + 2);
    for label in name.trim_end_matches('.').split('.') {
        wire.push(u8::try_from(label.len()).expect("a short label"));
        wire.extend_from_slice(label.as_bytes());
    }
    wire.push(0);
    wire
}

/// A direct answer: a response with an A record for a listed address, NXDOMAIN otherwise.
fn check_direct_answer(index: usize, reply: &[u8]) {
    assert!(reply.len() >= 12, "answer {index}: short reply");
    let is_response = reply[2] & 0x80 != 0;
    let rcode = reply[3] & 0x0f;
    let answers = u16::from_be_bytes([reply[6], reply[7]]);
    assert!(is_response, "answer {index}: not a response");
    if index % LISTED_EVERY == 0 {
        assert_eq!((rcode, answers), (0, 1), "answer {index}: listed address");
    } else {
        assert_eq!(
            (rcode, answers),
            (3, 0),
            "answer {index}: NXDOMAIN expected"
        );
    }
}

fn check_reject_answer(index: usize, answer: &LookupAnswer) {
    let expected = if index % LISTED_EVERY == 0 {
        DnsblAnswer::Listed(vec![Ipv4Addr::new(127, 0, 0, 2)])
    } else {
        DnsblAnswer::NotListed
    };
    assert_eq!(answer, &LookupAnswer::Dnsbl(expected), "answer {index}");
}

/// The addresses looked up: 10.0.0.0 onwards, each distinct.
fn lookup_addr(index: usize) -> IpAddr {
    let index = u32::try_from(index).expect("index fits");
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + index))
}

// ---- dns/cache-hit ----

/// `lookup()` answered from the cache, alone and inside a whole session greeting.
fn cache_hits(full: bool, note: &str) {
    let (addresses, hits, greetings) = if full {
        (1000, 2_000_000, 200_000)
    } else {
        (20, 10_000, 1_000)
    };
    let addrs: Vec<IpAddr> = (0..addresses).map(lookup_addr).collect();
    let server = DnsServer::start(vec![reject_zone(&addrs), score_zone(&[])]);
    let (resolver, mut worker) = start_resolver(&server);
    let handle = resolver.handle();

    // Prime: every (zone, address) pair the loops below ask for, answered by the server.
    let queries: Vec<Query> = addrs
        .iter()
        .flat_map(|&ip| [dnsbl_query(REJECT_ZONE, ip), dnsbl_query(SCORE_ZONE, ip)])
        .collect();
    let answers = worker.run(&handle, &queries);
    for (index, answer) in answers.iter().step_by(2).enumerate() {
        check_reject_answer(index, answer);
    }
    let before = handle.stats();

    let waiter = Waiter {
        worker: worker.index,
        key: 0,
    };
    let started = Instant::now();
    let mut listed = 0usize;
    for i in 0..hits {
        let query = queries.get(i % queries.len()).expect("query");
        let Some(answer) = handle.lookup(black_box(query), waiter) else {
            panic!("lookup {i} missed the cache");
        };
        listed += usize::from(matches!(
            answer,
            LookupAnswer::Dnsbl(DnsblAnswer::Listed(_))
        ));
    }
    let elapsed = started.elapsed();
    let after = handle.stats();
    assert_eq!(
        after.cache_hits - before.cache_hits,
        hits as u64,
        "every lookup hit"
    );
    assert_eq!(
        after.queries_sent, before.queries_sent,
        "no query sent for a hit"
    );
    let expected_listed = (0..hits)
        .filter(|i| (i % queries.len()) % 2 == 0 && (i % queries.len() / 2) % LISTED_EVERY == 0)
        .count();
    assert_eq!(listed, expected_listed, "listed answers among the hits");
    println!(
        "dns/cache-hit: {:.0} ns per lookup() answered from the cache ({hits} hits over {} \
         (zone, address) pairs, one thread){note}",
        per_op_ns(elapsed, hits),
        queries.len()
    );

    // The connection path: a session's greeting with its lookups answered from the cache,
    // against the same greeting with no zones (no lookups at all).
    let with_zones = session_config(&server, true);
    let without = session_config(&server, false);
    let checked = greetings_ns(&with_zones, &handle, waiter, &addrs, greetings);
    let plain = greetings_ns(&without, &handle, waiter, &addrs, greetings);
    println!(
        "dns/session-checks: {checked:.0} ns per session greeting with 2 zones answered from the \
         cache, {plain:.0} ns with no zones: the checks add {:.0} ns per connection ({greetings} \
         sessions){note}",
        checked - plain
    );
    resolver.stop();
}

/// Nanoseconds per `Session::new` → lookups answered from `handle`'s cache → greeting taken
/// out, for clients cycling over `addrs`; checks each greeting's code.
fn greetings_ns(
    config: &Arc<Config>,
    handle: &ResolverHandle,
    waiter: Waiter,
    addrs: &[IpAddr],
    n: usize,
) -> f64 {
    let now = Instant::now();
    let local: SocketAddr = "127.0.0.1:25".parse().expect("address");
    let mut out = Vec::with_capacity(256);
    let started = Instant::now();
    for i in 0..n {
        let index = i % addrs.len();
        let ip = *addrs.get(index).expect("address");
        let peer = Peer {
            conn: 0,
            client: SocketAddr::new(ip, 40_000),
            local,
            accepted_at: UNIX_EPOCH,
            stressed: false,
            starttls: false,
            transparent: false,
            spoof_source: false,
        };
        let mut session = Session::new(Arc::clone(config), peer, now);
        while let Some(action) = session.poll_action() {
            let Action::Ask(Question::Lookup(query)) = action else {
                panic!("unexpected action before the greeting: {action:?}");
            };
            let Some(answer) = handle.lookup(&query, waiter) else {
                panic!("session {i}: {query:?} missed the cache");
            };
            session.handle_answer(now, Answer::Lookup(query, answer));
        }
        out.clear();
        session.poll_transmit(now, &mut out);
        let rejected = !config.dnsbl.is_empty() && index % LISTED_EVERY == 0;
        let code: &[u8] = if rejected { b"554 " } else { b"220 " };
        assert!(
            out.starts_with(code),
            "session {i}: {:?}",
            out.escape_ascii().to_string()
        );
        black_box(&session);
    }
    per_op_ns(started.elapsed(), n)
}

/// A config for in-memory sessions: the two zones (or none), no rDNS.
fn session_config(server: &DnsServer, zones: bool) -> Arc<Config> {
    let mut config = Config::default();
    config.server.hostname = "mx.bench".to_owned();
    config.downstream.servers = vec!["127.0.0.1:9".parse().expect("address")];
    config.dns = loopback_dns(server);
    config.dnsbl = if zones { zone_configs() } else { Vec::new() };
    // The greet pause is a wait, not work: it would only hide the checks' cost.
    config.tarpit.greet_pause = Duration::ZERO;
    // The DNS checks' cost alone: no reputation question for this loop to answer.
    config.reputation.enabled = false;
    Arc::new(config)
}

// ---- dns/merge ----

/// 10,000 connections from 1,000 addresses against two zones, through the whole server.
fn merge(full: bool, note: &str) {
    let (addresses, per_address) = if full { (1000, 10) } else { (20, 10) };
    let connections = addresses * per_address;
    let sources: Vec<Ipv4Addr> = (0..addresses).map(source_addr).collect();
    let ips: Vec<IpAddr> = sources.iter().map(|&ip| IpAddr::V4(ip)).collect();
    let server = DnsServer::start(vec![reject_zone(&ips), score_zone(&[])]);

    let mut config = server::config("dns", 2);
    // Caps far above the run's: per address, at most `per_address` are open at once.
    config.limits.max_connections_per_ip = 1000;
    config.limits.max_connections_per_subnet = config.limits.max_connections_per_ip;
    config.dns = loopback_dns(&server);
    config.dnsbl = zone_configs();
    let (tarmac, addr) = server::start(config);
    dnsbl::wait_for_health_checks(&server, 2);
    let before = server.queries();

    let next = Arc::new(AtomicUsize::new(0));
    let sources = Arc::new(sources);
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            let next = Arc::clone(&next);
            let sources = Arc::clone(&sources);
            thread::Builder::new()
                .name(format!("client-{t}"))
                .spawn(move || {
                    let mut rejected = 0usize;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= connections {
                            return rejected;
                        }
                        // Address-major: the connections from one address run together, so
                        // they meet the first one's lookups in flight or its cached answers.
                        let index = i / per_address;
                        let listed = index % LISTED_EVERY == 0;
                        greet_and_quit(addr, sources[index], listed, started);
                        rejected += usize::from(listed);
                    }
                })
                .expect("client thread starts")
        })
        .collect();
    let rejected: usize = threads
        .into_iter()
        .map(|t| t.join().expect("client thread succeeded"))
        .sum();
    let elapsed = started.elapsed();
    let queries = server.queries() - before;

    server::stop(tarmac);

    let limit = (addresses * 2) as u64;
    println!(
        "dns/merge: {connections} connections from {addresses} addresses x 2 zones -> {queries} \
         queries (limit {limit}; {before} health-check queries before){note}"
    );
    println!(
        "dns/connections: {:.0} connections/s (greeting and QUIT, {CLIENT_THREADS} client \
         threads, workers=2, {rejected} greeted 554, {} greeted 220){note}",
        per_second(connections, elapsed),
        connections - rejected
    );
    assert!(
        queries <= limit,
        "{queries} queries for {connections} connections"
    );
}

/// One client from `source`: its greeting must be `554 5.7.1` when listed, `220` otherwise;
/// then QUIT, `221`, and the server's close.
fn greet_and_quit(addr: SocketAddr, source: Ipv4Addr, listed: bool, started: Instant) {
    assert!(
        started.elapsed() < ROUND_DEADLINE,
        "connections still running after {ROUND_DEADLINE:?}"
    );
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    socket
        .bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    socket
        .connect_timeout(&addr.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect from {source}: {e}"));
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read the greeting");
    let expected = if listed {
        format!("554 5.7.1 Service unavailable; client [{source}] blocked using {REJECT_ZONE}")
    } else {
        "220 mx.bench ESMTP".to_owned()
    };
    assert!(
        line.starts_with(&expected),
        "client {source}: expected {expected:?}, got {line:?}"
    );
    writer.write_all(b"QUIT\r\n").expect("send QUIT");
    line.clear();
    reader.read_line(&mut line).expect("read the QUIT reply");
    assert!(
        line.starts_with("221 "),
        "client {source}: QUIT got {line:?}"
    );
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).expect("the server closes");
    assert!(
        rest.is_empty(),
        "client {source}: bytes after 221: {rest:?}"
    );
}

// ---- shared ----

/// [`REJECT_ZONE`], listing every [`LISTED_EVERY`]th of `addrs`.
fn reject_zone(addrs: &[IpAddr]) -> Zone {
    let listed = addrs.iter().step_by(LISTED_EVERY).copied();
    dnsbl::zone(REJECT_ZONE, listed)
}

/// [`SCORE_ZONE`], listing `addrs`.
fn score_zone(addrs: &[IpAddr]) -> Zone {
    dnsbl::zone(SCORE_ZONE, addrs.iter().copied())
}

/// The two `[[dnsbl]]` tables: [`REJECT_ZONE`] at weight 3, [`SCORE_ZONE`] at weight 1.
fn zone_configs() -> Vec<config::Dnsbl> {
    vec![dnsbl::dnsbl(REJECT_ZONE, 3), dnsbl::dnsbl(SCORE_ZONE, 1)]
}

fn dnsbl_query(zone: &str, ip: IpAddr) -> Query {
    Query::Dnsbl {
        zone: Arc::from(zone),
        ip,
    }
}

/// A resolver aimed at `server` with one worker registered.
/// No zones are configured: lookups in any zone are still made, and no health check runs
/// inside a measurement.
fn start_resolver(server: &DnsServer) -> (Resolver, Worker) {
    let mut resolver = Resolver::start(&loopback_dns(server), &[]).expect("resolver starts");
    let poll = Poll::new().expect("poll");
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).expect("waker"));
    let (index, inbox) = resolver.add_worker(waker);
    let worker = Worker { poll, inbox, index };
    (resolver, worker)
}

/// A worker's side of the resolver, as `src/server/worker.rs` has it: a poll woken by the
/// resolver thread, and the inbox it drains.
struct Worker {
    poll: Poll,
    inbox: tarmac::dns::Inbox,
    index: usize,
}

impl Worker {
    /// Looks every query up, at most [`WINDOW`] awaiting an answer at once, and returns the
    /// answers in query order. Waiter keys are query indexes.
    fn run(&mut self, handle: &ResolverHandle, queries: &[Query]) -> Vec<LookupAnswer> {
        let (worker, inbox) = (self.index, &self.inbox);
        let ask = |i: usize| {
            let query = queries.get(i).expect("query");
            let key = i as u64;
            handle.lookup(query, Waiter { worker, key })
        };
        let delivered = || {
            let delivery = inbox.try_recv()?;
            let index = usize::try_from(delivery.key).expect("a query index");
            assert_eq!(
                queries.get(index),
                Some(&delivery.query),
                "delivery {index}"
            );
            Some((delivery.key, delivery.answer))
        };
        let n = queries.len();
        window::ask_all(n, WINDOW, ROUND_DEADLINE, &mut self.poll, ask, delivered)
    }
}

fn per_op_ns(elapsed: Duration, n: usize) -> f64 {
    elapsed.as_nanos() as f64 / n as f64
}

fn per_op_us(elapsed: Duration, n: usize) -> f64 {
    elapsed.as_secs_f64() * 1e6 / n as f64
}
