//! Transparent mode's cost (DESIGN.md §9): 4 KB messages from 50 parallel clients through a
//! plain listener and through a transparent one, with and without `spoof_source`, in one run,
//! with the ratios. `spoof_source` saves the XCLIENT exchange (XCLIENT and the EHLO after it:
//! two round trips per session), so it is also compared with a transparent listener that
//! announces nothing (`announce_client = "none"`): the same dialogue, and only the spoofed
//! socket's `IP_TRANSPARENT` and bind and the policy-routed replies as the difference.
//!
//! The path is the same for all three: the testkit's three network namespaces (client,
//! gateway, server, joined by veth pairs; `tarmac_testkit::netns::Topology`), tarmac in the
//! gateway, the sink on 198.51.100.25:25 in the server namespace. Plain: the clients connect to
//! the gateway's own listener (192.0.2.1:2525), which relays to `[downstream] servers =
//! ["198.51.100.25:25"]`. Transparent: the clients connect to 198.51.100.25:25 itself and the
//! gateway's nft `tproxy` rule hands the connection to tarmac's transparent listener, which
//! relays to that original destination, from the gateway's address (XCLIENT naming the
//! client, as the plain listener does) or from the client's own (`spoof_source`, no
//! announcement). So the figures compare what transparent mode adds (the TPROXY lookup,
//! `getsockname` and the loop check at accept, the policy-routed replies, the spoofed socket's
//! `IP_TRANSPARENT` and bind) against the same relay over the same links.
//!
//! Fairness as in the relay bench: the same blocking clients (one message per session), a
//! fresh sink and a fresh tarmac per round, variants interleaved round by round and medians
//! reported. Every message must reach the sink, with XCLIENT exactly where the variant
//! announces. Needs root (namespaces, `IP_TRANSPARENT`); elsewhere it says why and stops,
//! except under `CI=true`, where that is a failure.
//!
//! `cargo bench --bench transparent` runs the full size; without `--bench` (as `cargo test
//! --all-targets` runs it, in a debug build) one small round checks correctness only.

/// What this bench shares with the others (see `bench/support/README.md`).
mod support {
    pub mod cpu;
    pub mod message;
    pub mod run;
    pub mod server;
    pub mod sessions;
    pub mod stats;
}

use std::net::SocketAddr;
use std::time::Duration;

use tarmac::config::AnnounceClient;
use tarmac::server::ServerHandle;
use tarmac_testkit::netns::{CLIENT, GATEWAY_CLIENT_SIDE, SERVER, Topology, at};
use tarmac_testkit::sink::{Sink, SinkConfig};

use support::cpu;
use support::message::{MESSAGE_SIZE, message_body};
use support::run::Run;
use support::server;
use support::sessions::{IO_TIMEOUT, run_clients};
use support::stats::{median, per_second};

/// Parallel clients, as in the relay bench.
const CLIENTS: usize = 50;

/// The gateway's transparent listener, where the nft rule hands port-25 connections.
const TPROXY_PORT: u16 = 10025;

/// The gateway's plain listener.
const PLAIN_PORT: u16 = 2525;

/// How the clients reach the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// Through the gateway's own listener, relayed to `[downstream] servers`.
    Plain,
    /// Through the transparent listener, connecting from the gateway.
    Transparent,
    /// Through the transparent listener, connecting from the gateway, announcing nothing.
    Unannounced,
    /// Through the transparent listener, connecting from the client's address.
    Spoofed,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::Plain,
        Variant::Transparent,
        Variant::Unannounced,
        Variant::Spoofed,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::Plain => "plain listener",
            Variant::Transparent => "transparent listener",
            Variant::Unannounced => "transparent listener, announce_client none",
            Variant::Spoofed => "transparent listener, spoof_source",
        }
    }
}

/// One measured round.
struct Round {
    messages: usize,
    elapsed: Duration,
    /// Whole-process CPU time (clients, sink and tarmac) during the round.
    cpu: Duration,
}

impl Round {
    fn rate(&self) -> f64 {
        per_second(self.messages, self.elapsed)
    }

    fn cpu_per_msg(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.messages as f64
    }
}

fn main() {
    let Run { full, note } = Run::from_args();
    if !tarmac::privileges::running_as_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the transparent bench needs root, and CI runs as root"
        );
        println!("transparent/skipped: needs root (network namespaces, IP_TRANSPARENT){note}");
        return;
    }
    let Some(topology) = Topology::new(TPROXY_PORT) else {
        println!("transparent/skipped: network namespaces unavailable{note}");
        return;
    };
    // Every round opens thousands of connections between the same two addresses: the whole
    // port range, in these namespaces only.
    for namespace in [&topology.client, &topology.gateway] {
        namespace.run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"]);
    }
    let (per_client, rounds) = if full { (40, 5) } else { (2, 1) };
    let body = message_body();
    let params = format!(
        "{CLIENTS} clients x {per_client} msgs per round, one message per session, \
         {MESSAGE_SIZE} B messages, through a veth gateway, median of {rounds} interleaved rounds"
    );

    // Warm-up: thread stacks, allocator arenas, neighbour tables; not measured.
    for variant in Variant::ALL {
        run(&topology, variant, &body, 2);
    }
    let mut results: Vec<Vec<Round>> = Variant::ALL.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (variant, rounds) in Variant::ALL.into_iter().zip(&mut results) {
            rounds.push(run(&topology, variant, &body, per_client));
        }
    }
    let rate = |n: usize| median(results[n].iter().map(Round::rate).collect());
    let cpu = |n: usize| median(results[n].iter().map(Round::cpu_per_msg).collect());
    for (n, variant) in Variant::ALL.into_iter().enumerate() {
        println!(
            "transparent/{}: {:.0} msgs/s, {:.0} us CPU per msg (whole process) ({params}){note}",
            variant.label(),
            rate(n),
            cpu(n)
        );
    }
    println!(
        "transparent/ratio: transparent/plain {:.2} msgs/s, CPU per msg {:.2}{note}",
        rate(1) / rate(0),
        cpu(1) / cpu(0)
    );
    println!(
        "transparent/spoof_source: spoofed/transparent {:.2} msgs/s, CPU per msg {:.2}; \
         spoofed/unannounced (the same dialogue) {:.2} msgs/s, CPU per msg {:.2}{note}",
        rate(3) / rate(1),
        cpu(3) / cpu(1),
        rate(3) / rate(2),
        cpu(3) / cpu(2)
    );
}

/// One round of `variant`: a fresh sink in the server namespace and a fresh tarmac in the
/// gateway, `CLIENTS` clients in the client namespace sending `per_client` messages each.
fn run(topology: &Topology, variant: Variant, body: &[u8], per_client: usize) -> Round {
    let destination = at(SERVER, 25);
    let sink = topology.server.enter(|| {
        Sink::start(SinkConfig {
            listen: destination,
            offer_xclient: true,
            ..SinkConfig::default()
        })
        .expect("sink starts on 198.51.100.25:25")
    });
    let config = config(variant, destination);
    let server: ServerHandle = topology.gateway.enter(|| server::start(config).0);
    let target: SocketAddr = match variant {
        Variant::Plain => at(GATEWAY_CLIENT_SIDE, PLAIN_PORT),
        Variant::Transparent | Variant::Unannounced | Variant::Spoofed => destination,
    };
    let cpu_before = cpu::process();
    // The client threads are started from a thread in the client namespace, so their
    // sockets are made there.
    let (messages, elapsed) = topology
        .client
        .enter(|| run_clients(target, CLIENTS, body, per_client));
    let cpu = (cpu::process() - cpu_before).total();
    server::stop(server);
    check_delivered(&sink, body, messages, variant);
    Round {
        messages,
        elapsed,
        cpu,
    }
}

/// tarmac in the gateway: the plain listener relays to `destination` with XCLIENT; the
/// transparent variants add the transparent listener (and `spoof_source`). One worker, so
/// the variants compare one event loop's work.
fn config(variant: Variant, destination: SocketAddr) -> tarmac::config::Config {
    let mut config = server::config("transparent", 1);
    config.server.listen = vec![at(GATEWAY_CLIENT_SIDE, PLAIN_PORT)];
    // Every client comes from one address.
    config.limits.max_connections_per_ip = 10 * CLIENTS as u32;
    config.limits.max_connections_per_subnet = config.limits.max_connections_per_ip;
    config.downstream.servers = vec![destination];
    config.downstream.announce_client = match variant {
        Variant::Unannounced => AnnounceClient::None,
        _ => AnnounceClient::Xclient,
    };
    if variant != Variant::Plain {
        config.transparent.listen = vec![SocketAddr::from(([0, 0, 0, 0], TPROXY_PORT))];
        config.transparent.spoof_source = variant == Variant::Spoofed;
    }
    config
}

/// The sink got exactly `count` messages with the sent content, announced by XCLIENT naming
/// the client unless the connection came from the client's own address.
fn check_delivered(sink: &Sink, body: &[u8], count: usize, variant: Variant) {
    let content = body
        .strip_suffix(b".\r\n")
        .expect("body ends with the final dot");
    let messages = sink.wait_for_messages(count, IO_TIMEOUT);
    assert_eq!(
        messages.len(),
        count,
        "every message delivered ({variant:?})"
    );
    assert_eq!(sink.messages().len(), count, "no extra messages");
    for message in &messages {
        assert!(message.content.ends_with(content), "relayed content intact");
        let announced = message.xclient.as_deref();
        match variant {
            Variant::Spoofed | Variant::Unannounced => {
                assert_eq!(announced, None, "no XCLIENT ({variant:?})");
            }
            Variant::Plain | Variant::Transparent => assert!(
                announced.is_some_and(|x| x.contains(&format!("ADDR={CLIENT}"))),
                "XCLIENT names the client: {announced:?}"
            ),
        }
    }
}
