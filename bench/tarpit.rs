//! Holding tarpitted connections: tarmac keeps N clients stuttering at one byte a second, and
//! the figures are the server process's RSS growth ÷ N and its CPU time ÷ wall time (share of
//! one core) while it does. Target: ≤ 4 KB per tarpitted connection and under 25 % of one core
//! at about 19,000 connections, so one host with raised limits holds a million.
//!
//! The server runs in this process with two workers, one `[[dnsbl]]` zone (weight 2: score 2
//! lies between `tarpit_at` 1 and `reject_at` 3, so a listed client gets the tarpit verdict)
//! and a real DNS server on loopback (`testkit/src/dns_server.rs`) that lists every client source
//! address. No greet pause (a wait before the verdict, not the tarpit), `reply_delay` 0 and
//! `stutter` 1 s: the banner's first byte goes out at once, the rest one per second. Caps are far
//! above N, so stress mode (which stops the stutter) is never entered.
//!
//! The clients run in a child process (this binary, re-executed with
//! `TARMAC_BENCH_TARPIT_CLIENTS=addr,N,W`), so their sockets do not count against tarmac and each
//! process stays under the open-files limit. The child first opens W warm-up connections from
//! 127.0.0.1, which is not listed: they get the whole `220` at once and stay open as part of the
//! baseline (first-use costs: allocator arenas, slab and timer-heap growth up to there). Then
//! it opens N connections from 1,000 addresses 127.1.0.1–127.1.3.250, and on each reads what
//! has arrived: a part of the banner, not all of it, which proves the session exists and is
//! tarpitted (an untarpitted banner arrives whole, in one write); the bench counts the
//! connections whose part was exactly the first byte, `2`, as `reply_delay` 0 has it. Asked to `drain`, the child
//! reads every byte that has arrived on every connection, checks it continues the banner, and
//! reports how many arrived since the last drain and how many banners are complete.
//!
//! The window: the parent notes CPU times and the time, has the child drain, waits the window,
//! notes them again and has the child drain again; the bytes of the second drain are what the
//! stutter sent in the window, against N × window seconds expected. The banner is long enough
//! (59 stuttered bytes, about a minute) that every connection is still mid-banner at the end of
//! the window, which the child checks: a complete banner would mean the stutter stopped.
//!
//! Metrics (issue 16): the whole measurement runs four times in one process, with `[metrics]
//! listen` off, on, on, off (a new server, DNS server and client process each time: the
//! order cancels a drift over the runs), and `tarpit/metrics` prints the on/off ratios of the
//! CPU figures' means. Holding a tarpitted connection touches no counter (they move at accept,
//! at answers and at close), so the ratio shows the noise between runs. Later runs' RSS
//! figures are taken from their own baselines, in a process whose allocator already grew:
//! compare the first run's with older figures. In quick mode the runs are two, off then on.
//!
//! `cargo bench --bench tarpit` holds 19,000 connections (fewer if the open-files soft limit is
//! lower) over a 20 s window, about 40 s in all; without `--bench` (as `cargo test
//! --all-targets` runs it, in a debug build) 200 over 2 s, to check the mechanics, not to
//! measure.

/// What this bench shares with the others: whole files of `bench/support/`, only those whose
/// every item it uses (see `bench/support/README.md`).
mod support {
    pub mod cpu;
    pub mod dnsbl;
    pub mod hold;
    pub mod run;
    pub mod server;
}

use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use tarmac::config::Config;
use tarmac_testkit::dns_server::DnsServer;

use support::cpu::{self, Cpu};
use support::dnsbl::{self, source_addr};
use support::hold::{self, ClientProcess, IO_TIMEOUT, OPEN_DEADLINE};
use support::run::Run;
use support::server;

/// Set in the child's environment to `addr,N,W`: W warm-up and N tarpitted connections to addr.
const CHILD_ENV: &str = "TARMAC_BENCH_TARPIT_CLIENTS";

/// Worker threads, as the issue asks.
const WORKERS: usize = 2;

/// The one DNSBL zone; it lists every tarpitted client's address.
const ZONE: &str = "bl.bench";

/// The zone's weight: reaches the default `tarpit_at` (1), stays below `reject_at` (3).
const WEIGHT: i32 = 2;

/// The server's name, long so the stuttered banner outlasts opening and the window (see the
/// module doc): `220 ` + 41 + ` ESMTP tarmac\r\n` = 60 bytes.
const HOSTNAME: &str = "mx.tarpit-bench.holding-many-clients.test";

/// The tarpit's interval between bytes.
const STUTTER: Duration = Duration::from_secs(1);

/// Source addresses the tarpitted connections are spread over (127.1.0.1 onwards, 250 per
/// /24), so the per-IP cap and ephemeral ports are no issue and the DNS cache holds 1,000
/// answers, as a real tarpit's would hold many.
const SOURCES: usize = 1000;

/// Unlisted connections opened first and held as part of the baseline.
const WARM_UP: usize = 100;

/// Longest a drain (one pass over every connection) may take.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// The targets from the issue.
const TARGET_BYTES: f64 = 4096.0;
const TARGET_CPU_PERCENT: f64 = 25.0;

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        run_clients(&spec);
        return;
    }
    let Run { full, note } = Run::from_args();
    let (wanted, window) = if full {
        (19_000, Duration::from_secs(20))
    } else {
        (200, Duration::from_secs(2))
    };
    let n = hold::fit_fd_limit("tarpit", wanted, WARM_UP);
    let order: &[bool] = if full {
        &[false, true, true, false]
    } else {
        &[false, true]
    };
    let runs: Vec<(bool, Held)> = order
        .iter()
        .map(|&metrics| (metrics, hold(n, window, note, metrics)))
        .collect();
    let mean = |metrics: bool| {
        let chosen: Vec<&Held> = runs
            .iter()
            .filter(|(m, _)| *m == metrics)
            .map(|(_, held)| held)
            .collect();
        let count = chosen.len().max(1) as f64;
        Held {
            cpu_percent: chosen.iter().map(|h| h.cpu_percent).sum::<f64>() / count,
            worker_percent: chosen.iter().map(|h| h.worker_percent).sum::<f64>() / count,
            wakeups_per_second: chosen.iter().map(|h| h.wakeups_per_second).sum::<f64>() / count,
        }
    };
    let (off, on) = (mean(false), mean(true));
    println!(
        "tarpit/metrics: on/off whole-process CPU {:.2} ({:.1} vs {:.1} % of one core), workers' \
         CPU {:.2} ({:.1} vs {:.1} %), wakeups/s {:.2} ({:.0} vs {:.0}) ({n} connections, means of \
         {} runs each){note}",
        on.cpu_percent / off.cpu_percent,
        on.cpu_percent,
        off.cpu_percent,
        on.worker_percent / off.worker_percent,
        on.worker_percent,
        off.worker_percent,
        on.wakeups_per_second / off.wakeups_per_second,
        on.wakeups_per_second,
        off.wakeups_per_second,
        order.len() / 2,
    );
}

/// One holding run's CPU figures, for the metrics comparison.
struct Held {
    /// Whole process, % of one core.
    cpu_percent: f64,
    /// The worker threads, user + system, % of one core.
    worker_percent: f64,
    wakeups_per_second: f64,
}

/// The measurement: holds `n` tarpitted connections over `window`, prints the figures with
/// `[metrics] listen` on or off as `metrics` says, and checks the stutter never stopped.
fn hold(n: usize, window: Duration, note: &str, metrics: bool) -> Held {
    let note = format!(
        "{}{note}",
        if metrics {
            " (metrics on)"
        } else {
            " (metrics off)"
        }
    );
    let listed = (0..SOURCES).map(|i| IpAddr::V4(source_addr(i)));
    let dns = DnsServer::start(vec![dnsbl::zone(ZONE, listed)]);
    let mut config = config(&dns, n);
    if metrics {
        config.metrics.listen = Some("127.0.0.1:0".parse().expect("address"));
    }
    let (server, addr) = server::start(config);
    // No health check may be counted in the window.
    dnsbl::wait_for_health_checks(&dns, 1);

    let spec = format!("{addr},{n},{WARM_UP}");
    let mut clients = ClientProcess::start(CHILD_ENV, spec);
    clients.expect("warm", OPEN_DEADLINE + IO_TIMEOUT);
    let before = hold::rss_kb();

    send(&mut clients, "open");
    let opened = clients.expect("open", OPEN_DEADLINE + IO_TIMEOUT);
    let open_secs = field(&opened, 1);
    let one_byte = field(&opened, 2);
    let open_rss = hold::rss_kb();

    let cpu_start = Sample::now();
    let start = Instant::now();
    drained(&mut clients);
    thread::sleep(window);
    let cpu_end = Sample::now();
    let elapsed = start.elapsed();
    let drained = drained(&mut clients);
    let end_rss = hold::rss_kb();
    let queries = dns.queries();

    let secs = elapsed.as_secs_f64();
    let expected = n as f64 * secs;
    let per_conn = hold::bytes_per_connection(before, end_rss, n);
    let process_cpu = (cpu_end.process - cpu_start.process).total().as_secs_f64();
    let cpu_percent = 100.0 * process_cpu / secs;
    let workers = cpu_end.workers - cpu_start.workers;
    let wakeups = cpu_end.wakeups.saturating_sub(cpu_start.wakeups) as f64;
    println!(
        "tarpit/rss-per-connection: {per_conn:.0} bytes ({n} tarpitted connections stuttering \
         at 1 byte/s from {} addresses, workers={WORKERS}, RSS {before} KB with {WARM_UP} idle \
         warm-up connections, {open_rss} KB once all were open ({open_secs} s), {end_rss} KB \
         after the window){note}",
        n.min(SOURCES)
    );
    println!(
        "tarpit/verdict: {n} of {n} connections tarpitted ({one_byte} got exactly the first \
         banner byte at once, none the whole banner; {} banners complete after the window){note}",
        drained.complete
    );
    println!(
        "tarpit/cpu: {cpu_percent:.1} % of one core while holding (whole process, window \
         {secs:.1} s, bytes sent {} of expected {expected:.0}, min {} max {} per connection){note}",
        drained.bytes, drained.min, drained.max
    );
    println!(
        "tarpit/workers: {:.1} % user + {:.1} % system of one core, {:.0} wakeups/s, {:.2} \
         wakeups per byte sent ({} DNS queries in all: {} addresses, the warm-up's 127.0.0.1 \
         and the zone's 2 test points){note}",
        100.0 * workers.user.as_secs_f64() / secs,
        100.0 * workers.system.as_secs_f64() / secs,
        wakeups / secs,
        wakeups / drained.bytes.max(1) as f64,
        queries,
        n.min(SOURCES)
    );
    let pass = per_conn <= TARGET_BYTES && cpu_percent < TARGET_CPU_PERCENT;
    println!(
        "tarpit/target: <= {TARGET_BYTES:.0} bytes and < {TARGET_CPU_PERCENT:.0} %: {}{note}",
        if pass { "PASS" } else { "MISS" }
    );

    // Correctness, not performance: every connection stuttered through the whole window.
    assert_eq!(
        drained.complete, 0,
        "banners arrived whole during the window: the stutter stopped (stress mode?)"
    );
    assert!(
        drained.min >= 1,
        "a connection got no byte in a {secs:.1} s window"
    );

    clients.close();
    server::stop(server);
    Held {
        cpu_percent,
        worker_percent: 100.0 * (workers.user + workers.system).as_secs_f64() / secs,
        wakeups_per_second: wakeups / secs,
    }
}

/// A loopback server that tarpits every listed client: caps and rates far above `n`, so the
/// connections are held (not refused) and stress mode stays off.
fn config(dns: &DnsServer, n: usize) -> Config {
    let mut config = server::config("tarpit", WORKERS);
    config.server.hostname = HOSTNAME.to_owned();
    // Stress mode starts at 80 % of this: out of reach at four times what is opened.
    config.server.max_connections = 4 * (n + WARM_UP);
    config.server.max_tarpitted = 2 * n;
    config.limits.max_connections_per_ip = u32::try_from(n + WARM_UP).expect("n fits u32");
    config.limits.max_connections_per_subnet = config.limits.max_connections_per_ip;
    config.dns = dnsbl::loopback_dns(dns);
    config.dnsbl = vec![dnsbl::dnsbl(ZONE, WEIGHT)];
    // The tarpit is the subject: the first byte at once, then one a second (and, from the base
    // config, no greet pause before the verdict).
    config.tarpit.reply_delay = Duration::ZERO;
    config.tarpit.stutter = STUTTER;
    config
}

/// The whole banner a tarpitted client receives, one byte per [`STUTTER`].
fn banner() -> Vec<u8> {
    format!("220 {HOSTNAME} ESMTP tarmac\r\n").into_bytes()
}

/// CPU times of this process and of tarmac's worker threads, and how often the workers went to
/// sleep (voluntary context switches: one per `epoll_wait` that blocked, so each is a wakeup).
struct Sample {
    process: Cpu,
    workers: Cpu,
    wakeups: u64,
}

impl Sample {
    fn now() -> Sample {
        let mut sample = Sample {
            process: cpu::process(),
            workers: Cpu::default(),
            wakeups: 0,
        };
        for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
            let dir = task.expect("a task entry").path();
            let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
                continue; // the thread ended meanwhile
            };
            if !comm.starts_with("tarmac-worker") {
                continue;
            }
            let stat = cpu::read(&dir.join("stat")).expect("a worker's stat");
            sample.workers = sample.workers + stat;
            let status = std::fs::read_to_string(dir.join("status")).expect("a task status");
            sample.wakeups += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .expect("voluntary_ctxt_switches in a task status");
        }
        sample
    }
}

/// The `index`th space-separated word of a line from the child.
fn field(line: &str, index: usize) -> &str {
    line.split(' ')
        .nth(index)
        .expect("a field in the child's line")
}

/// What one drain found.
struct Drained {
    /// Bytes received on all connections since the last drain.
    bytes: u64,
    /// Fewest and most bytes received by one connection since the last drain.
    min: u64,
    max: u64,
    /// Connections whose whole banner has arrived.
    complete: usize,
}

/// Tells the child `command` (`open`, `drain`) on its stdin.
fn send(clients: &mut ClientProcess, command: &str) {
    let stdin = clients.stdin.as_mut().expect("the child's stdin is open");
    if let Err(e) = writeln!(stdin, "{command}").and_then(|()| stdin.flush()) {
        clients.fail(&format!("cannot tell the client process {command:?}: {e}"));
    }
}

/// Has the child read what arrived on every connection; what it found.
fn drained(clients: &mut ClientProcess) -> Drained {
    send(clients, "drain");
    let line = clients.expect("drained", DRAIN_DEADLINE);
    let number = |i: usize| field(&line, i).parse::<u64>().expect("a number");
    Drained {
        bytes: number(1),
        min: number(2),
        max: number(3),
        complete: usize::try_from(number(4)).expect("a count"),
    }
}

// ---- the child ----

/// One tarpitted connection and how much of the banner it has received.
struct Tarpitted {
    stream: TcpStream,
    received: usize,
}

/// The child: opens the warm-up connections and says `warm W`; on `open`, opens the tarpitted
/// ones and says `open SECONDS ONE_BYTE` (how many got exactly the first byte at once); on each `drain`, reads what arrived and says `drained BYTES MIN
/// MAX COMPLETE`; exits when stdin closes. Errors go to stderr with a failing exit status.
fn run_clients(spec: &str) {
    let parsed = (|| {
        let mut parts = spec.split(',');
        let addr = parts.next()?.parse::<SocketAddr>().ok()?;
        let n = parts.next()?.parse::<usize>().ok()?;
        let warm = parts.next()?.parse::<usize>().ok()?;
        Some((addr, n, warm))
    })();
    let Some((addr, n, warm)) = parsed else {
        child_fail(&format!("bad {CHILD_ENV}={spec:?}"))
    };
    let banner = banner();
    let idle = hold::open_all("tarpit", warm, |i| {
        hold::connect_from(Ipv4Addr::LOCALHOST, addr)
            .and_then(|mut stream| hold::read_banner(&mut stream).map(|()| stream))
            .map_err(|e| format!("warm-up connection {i}: {e}"))
    });
    hold::say(&format!("warm {}", idle.len()));

    let mut commands = io::stdin().lock().lines();
    if !matches!(commands.next(), Some(Ok(line)) if line == "open") {
        return; // the parent gave up
    }
    let started = Instant::now();
    let mut conns = hold::open_all("tarpit", n, |i| {
        let source = source_addr(i % SOURCES);
        connect_tarpitted(source, addr, &banner)
            .map(|(stream, received)| Tarpitted { stream, received })
            .map_err(|e| format!("connection {i} from {source}: {e}"))
    });
    let one_byte = conns.iter().filter(|c| c.received == 1).count();
    hold::say(&format!(
        "open {:.1} {one_byte}",
        started.elapsed().as_secs_f64()
    ));

    for line in commands {
        match line.as_deref() {
            Ok("drain") => hold::say(&drain(&mut conns, &banner)),
            Ok(other) => child_fail(&format!("unknown command {other:?}")),
            Err(_) => break,
        }
    }
    drop(conns);
    drop(idle);
}

/// A listed connection, returned (nonblocking) with the length of its first read: a part of
/// the banner, not all of it. That is the tarpit's doing, since an untarpitted banner is
/// written, and so read, whole; with no reply delay the part is the first byte alone, unless
/// this process was held up for a stutter interval between connect and read.
fn connect_tarpitted(
    source: Ipv4Addr,
    addr: SocketAddr,
    banner: &[u8],
) -> io::Result<(TcpStream, usize)> {
    let mut stream = hold::connect_from(source, addr)?;
    let mut chunk = [0u8; 256];
    let got = stream.read(&mut chunk)?;
    let first = &chunk[..got];
    if got == 0 || got >= banner.len() || !banner.starts_with(first) {
        return Err(io::Error::other(format!(
            "not tarpitted: the first read gave {:?}, not a part of the banner",
            String::from_utf8_lossy(first)
        )));
    }
    stream.set_nonblocking(true)?;
    Ok((stream, got))
}

/// Reads what arrived on every connection, checking it continues the banner; the report line.
fn drain(conns: &mut [Tarpitted], banner: &[u8]) -> String {
    let mut chunk = [0u8; 256];
    let (mut bytes, mut min, mut max, mut complete) = (0u64, u64::MAX, 0u64, 0usize);
    for (i, conn) in conns.iter_mut().enumerate() {
        let mut got = 0;
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => child_fail(&format!("connection {i} closed by the server")),
                Ok(n) => {
                    let arrived = &chunk[..n];
                    let end = conn.received + n;
                    if banner.get(conn.received..end) != Some(arrived) {
                        child_fail(&format!(
                            "connection {i}: {:?} does not continue the banner after {} bytes",
                            String::from_utf8_lossy(arrived),
                            conn.received
                        ));
                    }
                    conn.received = end;
                    got += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => child_fail(&format!("connection {i}: {e}")),
            }
        }
        bytes += got;
        min = min.min(got);
        max = max.max(got);
        complete += usize::from(conn.received == banner.len());
    }
    format!("drained {bytes} {} {max} {complete}", min.min(max))
}

fn child_fail(why: &str) -> ! {
    hold::child_fail("tarpit", why)
}
