//! Scanning throughput (DESIGN.md §7): 4 KB messages from parallel clients through tarmac to the
//! project's sink, (a) without a scanner, (b) with a real rspamd (the testkit's private one, its
//! DNS at a loopback server of the bench's own) and (c) with one milter (the testkit's scripted
//! `TestMilter` answering continue to every stage, so that leg costs little beyond tarmac's own
//! milter work), in one run; messages per second per leg and the ratios b/a and c/a.
//!
//! CPU: tarmac's own per message, per leg: the user and system time of tarmac's threads only,
//! the workers (`tarmac-worker-*`) and the scanner thread (`tarmac-scan`), read from
//! `/proc/self/task/*/stat` by thread name before and after each leg, divided by the messages;
//! the scanning overhead is b − a and c − a. rspamd's CPU (another process: the bench's child
//! and its workers, from their `/proc/PID/stat`) is printed apart, as is the whole bench
//! process's (clients, sink, milter and tarmac together).
//!
//! Fairness: as `relay`, every leg uses the same client code (one blocking std thread per
//! client, one message per SMTP session, each step waiting for its reply) and a fresh [`Sink`]
//! and a fresh tarmac per leg and round (a fresh milter too), so memory stays bounded by one
//! round. Legs are interleaved (a, b, c, a, ...) and the medians reported, so drift in machine
//! load hits every leg. rspamd is started once for the run: its first start on a machine
//! compiles its Hyperscan databases. `on_failure` is left at `tempfail`, so a scanner that did
//! not answer would fail the client's `250` and the bench; every message must reach the sink
//! with the sent content intact after tarmac's `Received:` (rspamd's `no action` adds nothing),
//! and the milter must have seen each end of body.
//!
//! Everything shares one 2-core machine: clients, sink, tarmac, the milter and rspamd compete
//! for the same cores, so the rates say how the legs compare here, not what a dedicated MX host
//! does; the CPU lines say where the time goes.
//!
//! `cargo bench --bench scan` runs the full size; without `--bench` (as `cargo test
//! --all-targets` runs it, in a debug build) one small round checks the mechanics only. Where
//! rspamd is not installed, leg b is skipped with a note (under `CI=true` the launcher fails).

/// What this bench shares with the others: whole files of `bench/support/`, only those whose
/// every item it uses (see `bench/support/README.md`).
mod support {
    pub mod cpu;
    pub mod run;
    pub mod server;
    pub mod sessions;
    pub mod stats;
}

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tarmac::config::{AnnounceClient, Config};
use tarmac::content::RspamdUrl;
use tarmac::content::milter::codec::Command;
use tarmac_testkit::dns_server::{DnsServer, Zone};
use tarmac_testkit::milter::{Script, TestMilter};
use tarmac_testkit::rspamd::Rspamd;
use tarmac_testkit::sink::{Sink, SinkConfig, SinkMessage};

use support::cpu::{self, Cpu};
use support::run::Run;
use support::server;
use support::sessions::{IO_TIMEOUT, run_clients};
use support::stats::{median, per_second};

/// Parallel clients: enough to keep a scanner busy while others wait on theirs, few enough
/// for two cores shared with rspamd (a few ms of CPU per message).
const CLIENTS: usize = 10;

/// Bytes of message content (headers and body) the client sends, before dot-stuffing.
const MESSAGE_SIZE: usize = 4096;

/// tarmac's event loops: one per core.
const WORKERS: usize = 2;

/// The scanner in front of the relay, per leg.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leg {
    /// (a) No scanner: bodies stream to the downstream as before issue 15.
    Plain,
    /// (b) The real rspamd.
    Rspamd,
    /// (c) One milter answering continue.
    Milter,
}

impl Leg {
    fn name(self) -> &'static str {
        match self {
            Leg::Plain => "no-scanner",
            Leg::Rspamd => "rspamd",
            Leg::Milter => "milter",
        }
    }
}

fn main() {
    let Run { full, note } = Run::from_args();
    let (per_client, rounds) = if full { (100, 5) } else { (2, 1) };
    let body = message_body();
    let params = format!(
        "{CLIENTS} clients x {per_client} msgs per round, one message per session, \
         {MESSAGE_SIZE} B messages, workers={WORKERS}, median of {rounds} interleaved rounds"
    );

    // rspamd's DNS goes only to this empty zone's server: every name it might ask about is
    // answered at once (REFUSED or NXDOMAIN), never by the system resolver.
    let dns = DnsServer::start(vec![Zone::new("bench.example")]);
    let rspamd = Rspamd::start(dns.addr());
    if rspamd.is_none() {
        println!("scan/rspamd: skipped, rspamd is not installed{note}");
    }
    let mut legs = vec![Leg::Plain];
    if rspamd.is_some() {
        legs.push(Leg::Rspamd);
    }
    legs.push(Leg::Milter);
    let bench = Bench {
        body,
        rspamd: rspamd.as_ref(),
    };

    // Warm-up: thread stacks, allocator arenas, rspamd's first tasks; not measured.
    for &leg in &legs {
        bench.run(leg, 2);
    }

    let mut results: Vec<Vec<Round>> = legs.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (n, &leg) in legs.iter().enumerate() {
            results[n].push(bench.run(leg, per_client));
        }
    }

    let mut figures = Vec::new();
    for (rounds, &leg) in results.iter().zip(&legs) {
        let figure = Figures::of(rounds);
        let name = leg.name();
        println!("scan/{name}: {:.0} msgs/s ({params}){note}", figure.rate);
        println!(
            "scan/{name}-tarmac-cpu: {:.0} us per msg (tarmac's threads: workers {:.0} us user + \
             {:.0} us system, tarmac-scan {:.0} us){note}",
            figure.tarmac, figure.worker_user, figure.worker_system, figure.scan
        );
        println!(
            "scan/{name}-process-cpu: {:.0} us per msg (the whole bench process: clients, \
             sink, milter, tarmac){note}",
            figure.process
        );
        if leg == Leg::Rspamd {
            println!(
                "scan/rspamd-own-cpu: {:.0} us per msg (the rspamd processes){note}",
                figure.rspamd
            );
        }
        figures.push((leg, figure));
    }
    let plain = figures
        .iter()
        .find(|(leg, _)| *leg == Leg::Plain)
        .map(|(_, f)| f)
        .expect("the no-scanner leg ran");
    for (leg, figure) in &figures {
        if *leg == Leg::Plain {
            continue;
        }
        let name = leg.name();
        println!(
            "scan/ratio-{name}: {:.2} ({name} / no-scanner msgs/s){note}",
            figure.rate / plain.rate
        );
        println!(
            "scan/overhead-{name}: {:+.0} us tarmac CPU per msg ({name} - no-scanner){note}",
            figure.tarmac - plain.tarmac
        );
    }
}

/// What every round needs.
struct Bench<'a> {
    /// The message as the client sends it, final dot included.
    body: Vec<u8>,
    /// The run's rspamd, when installed.
    rspamd: Option<&'a Rspamd>,
}

/// One measured round of one leg.
struct Round {
    messages: usize,
    elapsed: Duration,
    /// Whole-process CPU time (all threads) during the round.
    process: Cpu,
    /// CPU time of the tarmac workers during the round.
    workers: Cpu,
    /// CPU time of the scanner thread during the round.
    scan: Cpu,
    /// CPU time of the rspamd processes during the round (zero in the other legs).
    rspamd: Cpu,
}

/// A leg's medians; CPU in microseconds per message.
struct Figures {
    rate: f64,
    tarmac: f64,
    worker_user: f64,
    worker_system: f64,
    scan: f64,
    process: f64,
    rspamd: f64,
}

impl Figures {
    fn of(rounds: &[Round]) -> Figures {
        let each = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        let per = |r: &Round, d: Duration| d.as_secs_f64() * 1e6 / r.messages as f64;
        Figures {
            rate: each(&|r| per_second(r.messages, r.elapsed)),
            tarmac: each(&|r| per(r, r.workers.total() + r.scan.total())),
            worker_user: each(&|r| per(r, r.workers.user)),
            worker_system: each(&|r| per(r, r.workers.system)),
            scan: each(&|r| per(r, r.scan.total())),
            process: each(&|r| per(r, r.process.total())),
            rspamd: each(&|r| per(r, r.rspamd.total())),
        }
    }
}

impl Bench<'_> {
    /// One round of `leg`: a fresh sink (and milter), a fresh tarmac, the clients; checks that
    /// every message arrived intact.
    fn run(&self, leg: Leg, per_client: usize) -> Round {
        let sink = Sink::start(SinkConfig {
            offer_xclient: true,
            ..SinkConfig::default()
        })
        .expect("sink starts");
        let mut config = config(sink.local_addr());
        let milter = (leg == Leg::Milter).then(|| TestMilter::start(Script::new()));
        match leg {
            Leg::Plain => {}
            Leg::Rspamd => {
                let rspamd = self.rspamd.expect("rspamd runs in its leg");
                config.content.rspamd = Some(RspamdUrl {
                    addr: rspamd.addr(),
                });
            }
            Leg::Milter => {
                let milter = milter.as_ref().expect("the milter leg has one");
                config.content.milters = vec![milter.addr()];
            }
        }
        let (server, addr) = server::start(config);
        let rspamd_before = self.rspamd_cpu(leg);
        let process_before = cpu::process();
        let workers_before = threads_cpu("tarmac-worker");
        let scan_before = threads_cpu("tarmac-scan");
        let (messages, elapsed) = run_clients(addr, CLIENTS, &self.body, per_client);
        let process = cpu::process() - process_before;
        // Read before shutdown: a thread's /proc entry goes when it exits.
        let workers = threads_cpu("tarmac-worker") - workers_before;
        let scan = threads_cpu("tarmac-scan") - scan_before;
        let rspamd = self.rspamd_cpu(leg) - rspamd_before;
        server::stop(server);
        check_delivered(&sink, &self.body, messages);
        if let Some(milter) = milter {
            let ends = milter
                .received()
                .iter()
                .filter(|c| matches!(c, Command::BodyEob))
                .count();
            assert_eq!(ends, messages, "the milter saw every message's end of body");
        }
        assert!(
            leg != Leg::Plain || scan.total().is_zero(),
            "no scanning without a scanner"
        );
        Round {
            messages,
            elapsed,
            process,
            workers,
            scan,
            rspamd,
        }
    }

    /// The rspamd processes' CPU time so far in the rspamd leg; none in the others.
    fn rspamd_cpu(&self, leg: Leg) -> Cpu {
        match leg {
            Leg::Rspamd if self.rspamd.is_some() => descendants_cpu(),
            _ => Cpu::default(),
        }
    }
}

/// A loopback tarmac relaying to `downstream` with XCLIENT, as `relay` does, with the per-IP
/// cap above what the clients do (all come from 127.0.0.1); no scanner yet.
fn config(downstream: SocketAddr) -> Config {
    let mut config = server::config("scan", WORKERS);
    config.limits.max_connections_per_ip = 10 * CLIENTS as u32;
    config.limits.max_connections_per_subnet = config.limits.max_connections_per_ip;
    config.downstream.servers = vec![downstream];
    config.downstream.announce_client = AnnounceClient::Xclient;
    config
}

/// Checks the sink got exactly `count` messages, each the sent content after tarmac's
/// `Received:` header and nothing else.
fn check_delivered(sink: &Sink, body: &[u8], count: usize) {
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
        assert!(got.starts_with(b"Received: from client.bench "));
        let rest = got
            .strip_suffix(content)
            .expect("relayed content intact at the end");
        // What precedes the content is tarmac's one trace header, folded, and nothing else.
        let trace = rest
            .strip_suffix(b"\r\n")
            .expect("the trace header ends in CRLF");
        assert!(
            trace
                .split(|&b| b == b'\n')
                .skip(1)
                .all(|line| line.starts_with(b" ") || line.starts_with(b"\t")),
            "only tarmac's Received: before the content: {}",
            String::from_utf8_lossy(rest)
        );
    }
}

/// [`MESSAGE_SIZE`] bytes of a plain, well-formed text message (the headers rspamd expects of
/// one, so a clean message stays `no action`) and 70-odd-byte lines of words, then the
/// terminating `.CRLF`; no line starts with a dot, so the wire form equals the content.
fn message_body() -> Vec<u8> {
    let mut body = b"From: Sender <sender@bench.example>\r\n\
                     To: Recipient <rcpt@bench.example>\r\n\
                     Subject: scanning bench\r\n\
                     Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n\
                     Message-ID: <scan-bench@bench.example>\r\n\
                     MIME-Version: 1.0\r\n\
                     Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        .to_vec();
    let words = [
        "the", "minutes", "of", "monday's", "meeting", "are", "attached", "below", "and", "we",
        "will", "review", "them", "on", "friday", "morning", "before", "lunch",
    ];
    let mut words = words.iter().cycle();
    while body.len() < MESSAGE_SIZE {
        let mut line = String::new();
        while line.len() < 70 {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(words.next().expect("an endless cycle"));
        }
        line.push_str("\r\n");
        body.extend_from_slice(line.as_bytes());
    }
    // Cut back to exactly the size, ending the last line where the size falls.
    body.truncate(MESSAGE_SIZE - 2);
    if body.ends_with(b"\r") {
        body.pop();
        body.push(b'x');
    }
    body.extend_from_slice(b"\r\n");
    assert_eq!(body.len(), MESSAGE_SIZE);
    body.extend_from_slice(b".\r\n");
    body
}

/// CPU time of this process's live threads whose name starts with `prefix`; a thread that
/// ends meanwhile counts as none.
fn threads_cpu(prefix: &str) -> Cpu {
    let mut total = Cpu::default();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let path = task.expect("task entry").path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            total = total + cpu::read(&path.join("stat")).unwrap_or_default();
        }
    }
    total
}

/// CPU time of this process's live descendants (children and theirs): rspamd's main process
/// and its workers, the only processes the bench starts. Each process's own time, all its
/// threads; one that ends meanwhile counts as none.
fn descendants_cpu() -> Cpu {
    let procs: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            Some((pid, parent(pid)?))
        })
        .collect();
    let mut family = vec![std::process::id()];
    let mut total = Cpu::default();
    let mut grew = true;
    while grew {
        grew = false;
        for &(pid, ppid) in &procs {
            if family.contains(&ppid) && !family.contains(&pid) {
                family.push(pid);
                total = total + cpu::read(&proc_stat(pid)).unwrap_or_default();
                grew = true;
            }
        }
    }
    total
}

/// The parent of process `pid`, from its `stat` (field 4, after the parenthesised name).
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(proc_stat(pid)).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn proc_stat(pid: u32) -> std::path::PathBuf {
    Path::new("/proc").join(pid.to_string()).join("stat")
}
