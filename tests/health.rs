//! Downstream health and balance (DESIGN.md §8): servers marked down after `down_after`
//! failures are skipped, probed after `retry_after`, and when every server is down MAIL gets
//! `451 4.4.2` at once. First the sessions on invented time (the testkit's `Pair`, sharing
//! one health table as the workers do), then the real server against the sink and ports that
//! refuse, in both relay modes and over downstream TLS.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tarmac::config::{Balance, Config, DownstreamMode, DownstreamTls};
use tarmac::downstream::health::Health;
use tarmac_testkit::certs::TestCerts;
use tarmac_testkit::session::{Pair, config, peer};
use tarmac_testkit::sink::{self, Behaviour, Sink, SinkConfig};
use tarmac_testkit::{Client, Server, WAIT, free_port, temp_dir, test_config, wait_until};

const LOST: &str = "451 4.4.2 Error: downstream server unavailable, please try again later\r\n";

// ---- sessions on invented time ----

/// A pair not yet pumped whose session shares `health`.
fn pair(config: &Arc<Config>, health: &Arc<Health>) -> Pair {
    let mut pair = Pair::sharing(Arc::clone(config), Vec::new(), peer(false, false));
    pair.session.set_health(Arc::clone(health));
    pair
}

/// `servers`, a 60 s connect timeout, down after one failure, probed after ten minutes.
fn hanging_config(servers: &[&str]) -> Arc<Config> {
    let mut config = config();
    config.downstream.servers = servers.iter().map(|s| s.parse().unwrap()).collect();
    config.downstream.down_after = 1;
    config.downstream.retry_after = Duration::from_secs(600);
    config.timeouts.connect = Duration::from_secs(60);
    Arc::new(config)
}

#[test]
fn with_every_server_down_mail_gets_451_without_waiting_for_a_connect() {
    let config = hanging_config(&["127.0.0.1:1", "127.0.0.1:2"]);
    let health = Arc::new(Health::new());
    // The first client waits for both connect timeouts, and marks both servers down.
    let mut first = pair(&config, &health);
    first.hanging_servers = config.downstream.servers.clone();
    first.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    assert!(first.has_downstream(), "waiting for the connect");
    first.advance(config.timeouts.connect);
    first.advance(config.timeouts.connect);
    assert!(first.take_output().ends_with(LOST));
    assert_eq!(first.connects, config.downstream.servers);
    let snapshot = health.snapshot(&config.downstream.servers);
    assert!(
        snapshot
            .iter()
            .all(|&(_, up, failures)| !up && failures == 1)
    );
    // The next client's MAIL gets its 451 on the spot: no connect, no time passing.
    let mut next = pair(&config, &health);
    next.hanging_servers = config.downstream.servers.clone();
    let started = next.now;
    next.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    assert!(next.take_output().ends_with(LOST));
    assert_eq!(next.connects, []);
    assert_eq!(next.now, started, "no timer fired");
    assert!(!next.has_downstream());
}

#[test]
fn a_hanging_server_is_skipped_then_probed_back_on_invented_time() {
    let mut config = config();
    config.downstream.servers = vec![
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    ];
    config.downstream.down_after = 2;
    config.downstream.retry_after = Duration::from_secs(30);
    config.timeouts.connect = Duration::from_secs(60);
    let config = Arc::new(config);
    let [hanging, healthy] = [config.downstream.servers[0], config.downstream.servers[1]];
    let health = Arc::new(Health::new());
    let mut marked_at = None;
    for _ in 0..2 {
        let mut pair = pair(&config, &health);
        pair.hanging_servers = vec![hanging];
        pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
        pair.advance(config.timeouts.connect);
        assert!(pair.take_output().ends_with("250 2.1.0 Ok\r\n"));
        assert_eq!(pair.connects, [hanging, healthy]);
        marked_at = Some(pair.now);
    }
    let marked_at = marked_at.unwrap();
    assert_eq!(
        health.snapshot(&config.downstream.servers),
        [(hanging, false, 2), (healthy, true, 0)]
    );
    // Later clients go straight to the healthy server, until the probe is due.
    let mut pair = pair(&config, &health);
    pair.now = marked_at + config.downstream.retry_after - Duration::from_millis(1);
    pair.hanging_servers = vec![hanging];
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    assert!(pair.take_output().ends_with("250 2.1.0 Ok\r\n"));
    assert_eq!(pair.connects, [healthy]);
    // The probe: it listens again, greets, and is up; the next client uses it first.
    for expected in [[hanging], [hanging]] {
        let mut pair = self::pair(&config, &health);
        pair.now = marked_at + config.downstream.retry_after;
        pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
        assert!(pair.take_output().ends_with("250 2.1.0 Ok\r\n"));
        assert_eq!(pair.connects, expected);
    }
    assert_eq!(
        health.snapshot(&config.downstream.servers),
        [(hanging, true, 0), (healthy, true, 0)]
    );
}

#[test]
fn round_robin_spreads_sessions_over_the_servers_on_invented_time() {
    let mut config = config();
    config.downstream.servers = vec![
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    ];
    config.downstream.balance = Balance::RoundRobin;
    let config = Arc::new(config);
    let health = Arc::new(Health::new());
    let firsts: Vec<SocketAddr> = (0..4)
        .map(|_| {
            let mut pair = pair(&config, &health);
            pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
            assert!(pair.take_output().ends_with("250 2.1.0 Ok\r\n"));
            pair.connects[0]
        })
        .collect();
    let [a, b] = [config.downstream.servers[0], config.downstream.servers[1]];
    assert_eq!(firsts, [a, b, a, b]);
}

// ---- the real server ----

/// A sink offering XCLIENT, and STARTTLS with a fresh certificate when `tls`.
fn sink_at(listen: SocketAddr, tls: Option<&TestCerts>) -> Sink {
    Sink::start(SinkConfig {
        listen,
        offer_xclient: true,
        xclient_again: true,
        tls: tls.map(|certs| sink::tls_server_config(&certs.chain, &certs.key).unwrap()),
        behaviour: Behaviour::Normal,
        ..SinkConfig::default()
    })
    .unwrap()
}

/// A loopback address nothing listens on (yet).
fn closed_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// [`test_config`] towards `servers`, in `mode`, with STARTTLS when `tls`.
fn relay_config(servers: &[SocketAddr], mode: DownstreamMode, tls: bool) -> Config {
    let mut config = test_config(servers[0]);
    config.downstream.servers = servers.to_vec();
    config.downstream.mode = mode;
    if tls {
        config.downstream.tls = DownstreamTls::Required;
        config.load_tls_ca().unwrap();
    }
    config
}

/// One message through `server`; its final reply.
fn deliver(server: &Server) -> String {
    let mut client = Client::connect(server.addr);
    let reply = client.send_message();
    client.command("QUIT");
    reply
}

/// Two downstreams, the first refusing connects: the first clients mark it down on their way
/// to the second, later clients go straight to the second (a sink started on the refusing
/// port meanwhile sees no connection).
fn refusing_server_is_skipped(mode: DownstreamMode, tls: bool, name: &str) {
    let dir = temp_dir(name);
    let certs = tls.then(|| TestCerts::generate(&dir, "sink"));
    let healthy = sink_at("127.0.0.1:0".parse().unwrap(), certs.as_ref());
    let refusing = closed_port();
    let mut config = relay_config(&[refusing, healthy.local_addr()], mode, tls);
    config.downstream.down_after = 2;
    config.downstream.retry_after = Duration::from_secs(600);
    let server = Server::start(config);
    for _ in 0..2 {
        assert!(deliver(&server).starts_with("250 "));
    }
    // It listens now, but it is down and its probe is ten minutes away.
    let revived = sink_at(refusing, certs.as_ref());
    for _ in 0..3 {
        assert!(deliver(&server).starts_with("250 "));
    }
    let messages = healthy.wait_for_messages(5, WAIT);
    assert_eq!(messages.len(), 5);
    if tls {
        assert!(messages.iter().all(|m| m.tls.is_some()), "over TLS");
    }
    assert_eq!(revived.connections(), 0, "no connect to the down server");
}

#[test]
fn a_refusing_server_is_skipped_synchronous() {
    refusing_server_is_skipped(DownstreamMode::Synchronous, false, "health-sync");
}

#[test]
fn a_refusing_server_is_skipped_multiplexing() {
    refusing_server_is_skipped(DownstreamMode::Multiplexing, false, "health-mux");
}

#[test]
fn a_refusing_server_is_skipped_over_downstream_tls() {
    refusing_server_is_skipped(DownstreamMode::Synchronous, true, "health-tls");
    refusing_server_is_skipped(DownstreamMode::Multiplexing, true, "health-mux-tls");
}

#[test]
fn a_down_server_comes_back_after_its_probe() {
    let healthy = sink_at("127.0.0.1:0".parse().unwrap(), None);
    let refusing = closed_port();
    let mut config = relay_config(
        &[refusing, healthy.local_addr()],
        DownstreamMode::Synchronous,
        false,
    );
    config.downstream.down_after = 1;
    let retry_after = Duration::from_millis(300);
    config.downstream.retry_after = retry_after;
    let server = Server::start(config);
    let before_down = Instant::now();
    assert!(deliver(&server).starts_with("250 "));
    let revived = sink_at(refusing, None);
    // Clients keep coming: one of them probes the revived server, which delivers then.
    wait_until("a probe of the revived server", || {
        assert!(deliver(&server).starts_with("250 "));
        revived.connections() > 0
    });
    assert!(
        before_down.elapsed() >= retry_after,
        "probed before retry_after"
    );
    // Up again, and first in order: the next client is its.
    let earlier = revived.messages().len();
    assert!(deliver(&server).starts_with("250 "));
    assert_eq!(
        revived.wait_for_messages(earlier + 1, WAIT).len(),
        earlier + 1
    );
}

#[test]
fn round_robin_spreads_clients_over_both_sinks() {
    let a = sink_at("127.0.0.1:0".parse().unwrap(), None);
    let b = sink_at("127.0.0.1:0".parse().unwrap(), None);
    let mut config = relay_config(
        &[a.local_addr(), b.local_addr()],
        DownstreamMode::Synchronous,
        false,
    );
    config.downstream.balance = Balance::RoundRobin;
    let server = Server::start(config);
    for _ in 0..4 {
        assert!(deliver(&server).starts_with("250 "));
    }
    assert_eq!((a.connections(), b.connections()), (2, 2));
}

#[test]
fn every_server_down_gets_451_at_mail_without_a_connect() {
    let servers = [closed_port(), closed_port()];
    let mut config = relay_config(&servers, DownstreamMode::Synchronous, false);
    config.downstream.down_after = 1;
    config.downstream.retry_after = Duration::from_secs(600);
    // Long: a client that waited for a connect would be noticed.
    config.timeouts.connect = Duration::from_secs(60);
    let server = Server::start(config);
    let mut client = Client::connect(server.addr);
    client.line();
    client.command("EHLO client.example");
    assert_eq!(client.command("MAIL FROM:<a@example.org>"), LOST);
    // Both listen now; the next client's MAIL must not even try them.
    let listeners = servers.map(|addr| {
        let listener = TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        listener
    });
    let mut client = Client::connect(server.addr);
    client.line();
    client.command("EHLO client.example");
    assert_eq!(client.command("MAIL FROM:<a@example.org>"), LOST);
    for listener in &listeners {
        let accepted = listener.accept().map(|_| ()).map_err(|e| e.kind());
        assert_eq!(accepted, Err(ErrorKind::WouldBlock), "a connect was tried");
    }
}
