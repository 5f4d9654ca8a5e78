//! Relay throughput over loopback: 4 KB messages from 50 parallel clients to a sink directly, and
//! the same clients through tarmac to the same kind of sink, in one run, with the ratio. Target:
//! through tarmac ≥ 0.8 of direct.
//!
//! Fairness: both legs use the same client code (one blocking std thread per client, one
//! message per SMTP session: connect, banner, EHLO, MAIL, RCPT, DATA, body, `.`, QUIT, each step
//! waiting for its reply, as most MX traffic looks) and a fresh [`Sink`] with the same config per
//! round, so the sink's memory stays bounded by one round's messages. Legs are interleaved
//! (direct, tarmac workers=1, tarmac workers=2, direct, ...) and the medians reported, so drift in
//! machine load hits both sides. Every message must reach the sink, byte-exact.
//!
//! Everything shares one machine: clients, sink and tarmac compete for the same cores. The sink
//! is thread-per-connection (a thread spawned per session) and does the same work in both legs;
//! through tarmac each message also costs a second TCP connection and tarmac's own work. The
//! CPU lines (process CPU time per message, and the tarmac workers' share) show where the time
//! goes when the machine, not latency, is the limit.
//!
//! Metrics (issue 16): two variants run again with `[metrics] listen` on, interleaved with the
//! same variants off in the same rounds, and `relay/metrics` prints the on/off ratio of their
//! medians: the per-worker counters must cost nothing measurable. Each metrics-on round ends
//! with a scrape whose `tarmac_messages_relayed_total` must equal the messages sent.
//!
//! `cargo bench --bench relay` runs the full size; without `--bench` (as `cargo test
//! --all-targets` runs it, in a debug build) one small round checks correctness only.

/// What this bench shares with the others: whole files of `bench/support/`, only those whose
/// every item it uses (see `bench/support/README.md`).
mod support {
    pub mod cpu;
    pub mod message;
    pub mod run;
    pub mod server;
    pub mod sessions;
    pub mod stats;
}

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use tarmac::config::{AnnounceClient, Config, DownstreamMode};
use tarmac_testkit::sink::{Sink, SinkConfig, SinkMessage};

use support::cpu::{self, Cpu};
use support::message::{MESSAGE_SIZE, message_body};
use support::run::Run;
use support::server;
use support::sessions::{IO_TIMEOUT, run_clients};
use support::stats::{median, per_second};

/// Parallel clients, as the issue asks.
const CLIENTS: usize = 50;

fn main() {
    let Run { full, note } = Run::from_args();
    // (workers, downstream mode, downstream takes XCLIENT again on a connection): the default
    // synchronous relay on one and two event loops, and the multiplexing pool (pool_size 50,
    // shared by the workers) in front of a downstream that, as Postfix out of the box, takes
    // one XCLIENT per connection (so each new client needs a new connection) and one that,
    // as Postfix with `smtpd_authorized_xclient_hosts = static:all`, takes one per transaction.
    // The last field: `[metrics] listen` on. The metrics-on variants repeat a metrics-off one
    // in the same rounds, for `relay/metrics`.
    let variants: &[(usize, DownstreamMode, bool, bool)] = if full {
        &[
            (1, DownstreamMode::Synchronous, false, false),
            (2, DownstreamMode::Synchronous, false, false),
            (2, DownstreamMode::Multiplexing, false, false),
            (2, DownstreamMode::Multiplexing, true, false),
            (2, DownstreamMode::Synchronous, false, true),
            (2, DownstreamMode::Multiplexing, true, true),
        ]
    } else {
        &[
            (2, DownstreamMode::Synchronous, false, false),
            (2, DownstreamMode::Multiplexing, false, false),
            (2, DownstreamMode::Multiplexing, true, false),
            (2, DownstreamMode::Multiplexing, true, true),
        ]
    };
    let (per_client, rounds) = if full { (40, 5) } else { (2, 1) };
    let body = message_body();
    let params = format!(
        "{CLIENTS} clients x {per_client} msgs per round, one message per session, \
         {MESSAGE_SIZE} B messages, median of {rounds} interleaved rounds"
    );

    // Warm-up: thread stacks, allocator arenas, the listen path; not measured.
    run_direct(&body, 2);
    for &(workers, mode, again, metrics) in variants {
        run_tarmac(&body, 2, workers, mode, again, metrics);
    }

    let mut direct = Vec::new();
    let mut through: Vec<Vec<Round>> = variants.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        direct.push(run_direct(&body, per_client));
        for (n, &(workers, mode, again, metrics)) in variants.iter().enumerate() {
            through[n].push(run_tarmac(&body, per_client, workers, mode, again, metrics));
        }
    }

    let direct_rate = median(direct.iter().map(|r| r.rate()).collect());
    let direct_cpu = median(direct.iter().map(|r| r.cpu_per_msg()).collect());
    println!("relay/direct: {direct_rate:.0} msgs/s ({params}){note}");
    println!("relay/direct-cpu: {direct_cpu:.0} us CPU per msg (whole process){note}");
    let label = |workers: usize, mode: DownstreamMode, again: bool, metrics: bool| {
        let xclient = if again {
            "per transaction"
        } else {
            "per connection"
        };
        let metrics = if metrics { "on" } else { "off" };
        format!("workers={workers}, mode={mode:?}, downstream XCLIENT {xclient}, metrics {metrics}")
    };
    for (rounds, &(workers, mode, again, metrics)) in through.iter().zip(variants) {
        let workers = label(workers, mode, again, metrics);
        let rate = median(rounds.iter().map(|r| r.rate()).collect());
        let cpu = median(rounds.iter().map(|r| r.cpu_per_msg()).collect());
        let worker_user = median(rounds.iter().map(|r| r.tarmac_cpu_per_msg().0).collect());
        let worker_sys = median(rounds.iter().map(|r| r.tarmac_cpu_per_msg().1).collect());
        println!("relay/through-tarmac: {rate:.0} msgs/s ({workers}, {params}){note}");
        println!(
            "relay/through-tarmac-cpu: {cpu:.0} us CPU per msg (whole process), of which \
             tarmac workers {worker_user:.0} us user + {worker_sys:.0} us system \
             ({workers}){note}"
        );
        println!(
            "relay/ratio: {:.2} (target >= 0.8, {workers}){note}",
            rate / direct_rate
        );
    }
    // Metrics on against the same variant off, from the same rounds.
    for (on, &(workers, mode, again, metrics)) in through.iter().zip(variants) {
        if !metrics {
            continue;
        }
        let off = variants
            .iter()
            .position(|&v| v == (workers, mode, again, false))
            .map(|n| &through[n]);
        let Some(off) = off else { continue };
        let rate = |rounds: &[Round]| median(rounds.iter().map(|r| r.rate()).collect());
        let cpu = |rounds: &[Round]| {
            median(
                rounds
                    .iter()
                    .map(|r| {
                        let (user, system) = r.tarmac_cpu_per_msg();
                        user + system
                    })
                    .collect(),
            )
        };
        println!(
            "relay/metrics: on/off {:.3} msgs/s ({:.0} vs {:.0}), tarmac workers' CPU per msg \
             on/off {:.3} ({:.1} vs {:.1} us) ({}){note}",
            rate(on) / rate(off),
            rate(on),
            rate(off),
            cpu(on) / cpu(off),
            cpu(on),
            cpu(off),
            label(workers, mode, again, true).replace(", metrics on", ""),
        );
    }
}

/// One measured round.
struct Round {
    messages: usize,
    elapsed: Duration,
    /// Whole-process CPU time (all threads) during the round.
    cpu: Duration,
    /// CPU time of the tarmac worker threads during the round (zero for direct).
    tarmac_cpu: Cpu,
}

impl Round {
    fn rate(&self) -> f64 {
        per_second(self.messages, self.elapsed)
    }

    fn cpu_per_msg(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.messages as f64
    }

    /// Tarmac workers' (user, system) CPU microseconds per message.
    fn tarmac_cpu_per_msg(&self) -> (f64, f64) {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / self.messages as f64;
        (per(self.tarmac_cpu.user), per(self.tarmac_cpu.system))
    }
}

/// The sink both legs deliver to; XCLIENT offered in both, so its EHLO reply is the same.
/// The sink, offering XCLIENT; `xclient_again`: also after an XCLIENT on the same connection.
fn start_sink(xclient_again: bool) -> Sink {
    Sink::start(SinkConfig {
        offer_xclient: true,
        xclient_again,
        ..SinkConfig::default()
    })
    .expect("sink starts")
}

fn run_direct(body: &[u8], per_client: usize) -> Round {
    let sink = start_sink(false);
    let cpu_before = cpu::process();
    let (messages, elapsed) = run_clients(sink.local_addr(), CLIENTS, body, per_client);
    let cpu = (cpu::process() - cpu_before).total();
    check_delivered(&sink, body, messages, false);
    Round {
        messages,
        elapsed,
        cpu,
        tarmac_cpu: Cpu::default(),
    }
}

fn run_tarmac(
    body: &[u8],
    per_client: usize,
    workers: usize,
    mode: DownstreamMode,
    xclient_again: bool,
    metrics: bool,
) -> Round {
    let sink = start_sink(xclient_again);
    let mut config = config(sink.local_addr(), workers, mode);
    if metrics {
        config.metrics.listen = Some("127.0.0.1:0".parse().expect("address"));
    }
    let (server, addr) = server::start(config);
    let cpu_before = cpu::process();
    let tarmac_before = tarmac_worker_cpu();
    let (messages, elapsed) = run_clients(addr, CLIENTS, body, per_client);
    let cpu = (cpu::process() - cpu_before).total();
    // Read before shutdown: a worker's /proc entry goes when its thread exits.
    let tarmac_cpu = tarmac_worker_cpu() - tarmac_before;
    if let Some(metrics) = server.metrics_addr() {
        // Outside the timed part; sessions close just after their 221, so wait for the last.
        let deadline = Instant::now() + IO_TIMEOUT;
        while relayed(metrics) != messages {
            assert!(
                Instant::now() < deadline,
                "metrics count every relayed message"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
    server::stop(server);
    check_delivered(&sink, body, messages, true);
    Round {
        messages,
        elapsed,
        cpu,
        tarmac_cpu,
    }
}

/// A loopback tarmac relaying to `downstream`, with the per-IP cap above what the clients do
/// (all come from 127.0.0.1).
fn config(downstream: SocketAddr, workers: usize, mode: DownstreamMode) -> Config {
    let mut config = server::config("relay", workers);
    config.limits.max_connections_per_ip = 10 * CLIENTS as u32;
    config.limits.max_connections_per_subnet = config.limits.max_connections_per_ip;
    config.downstream.servers = vec![downstream];
    config.downstream.mode = mode;
    config.downstream.announce_client = AnnounceClient::Xclient;
    config
}

/// Checks the sink got exactly `count` messages with the sent content (after tarmac's
/// `Received:` header when relayed).
fn check_delivered(sink: &Sink, body: &[u8], count: usize, relayed: bool) {
    let content = body
        .strip_suffix(b".\r\n")
        .expect("body ends with the final dot");
    let messages = sink.wait_for_messages(count, IO_TIMEOUT);
    assert_eq!(messages.len(), count, "every message delivered");
    assert_eq!(sink.messages().len(), count, "no extra messages");
    for SinkMessage {
        content: got,
        bare_newline_seen,
        ..
    } in &messages
    {
        assert!(!bare_newline_seen);
        if relayed {
            assert!(got.starts_with(b"Received: from client.bench "));
            assert!(got.ends_with(content), "relayed content intact");
            assert!(got.len() < content.len() + 200, "one header added");
        } else {
            assert_eq!(got, content, "direct content intact");
        }
    }
}

/// `tarmac_messages_relayed_total` from a scrape of `/metrics` at `addr`.
fn relayed(addr: SocketAddr) -> usize {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to metrics");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
        .lines()
        .find_map(|line| line.strip_prefix("tarmac_messages_relayed_total "))
        .and_then(|n| n.parse().ok())
        .expect("tarmac_messages_relayed_total in the scrape")
}

/// CPU time of the live threads named `tarmac-worker-*`; a thread that ends meanwhile counts
/// as none.
fn tarmac_worker_cpu() -> Cpu {
    let mut total = Cpu::default();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let path = task.expect("task entry").path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.starts_with("tarmac-worker") {
            total = total + cpu::read(&path.join("stat")).unwrap_or_default();
        }
    }
    total
}
