//! Holding tarpitted connections: tarmac keeps N clients stuttering at one byte a second, and
//! the figures are the server process's RSS growth ÷ N and its CPU time ÷ wall time (share of
//! one core) while it does. Target: ≤ 4 KB per tarpitted connection and under 25 % of one core
//! at about 19,000 connections, so one host with raised limits holds a million.
//!
//! The server runs in this process with two workers, one `[[dnsbl]]` zone (weight 2: score 2
//! lies between `tarpit_at` 1 and `reject_at` 3, so a listed client gets the tarpit verdict)
//! and a real DNS server on loopback (`tests/util/dns_server.rs`) that lists every client source
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
//! `cargo bench --bench tarpit` holds 19,000 connections (fewer if the open-files soft limit is
//! lower) over a 20 s window, about 40 s in all; without `--bench` (as `cargo test
//! --all-targets` runs it, in a debug build) 200 over 2 s, to check the mechanics, not to
//! measure.

#[path = "../tests/util/dns_server.rs"]
mod dns_server;

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tarmac::config::{self, Config, Rate};
use tarmac::policy::dnsbl::query_name;
use tarmac::server::ServerHandle;

#[path = "support.rs"]
mod support;

use support::{IO_TIMEOUT, OPEN_DEADLINE, STOP_DEADLINE};

use dns_server::{DnsServer, Zone};

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

/// `[dns] timeout`: generous, so a loaded machine slows the opening rather than turning answers
/// into `TempFail` (an untarpitted client, which the first-byte check would report).
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// `[dns] cache_ttl` and `health_interval`: longer than any run, so each address is asked once
/// and no health check lands in the window.
const LONG: Duration = Duration::from_secs(3600);

/// Kernel clock ticks per second in /proc stat times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The targets from the issue.
const TARGET_BYTES: f64 = 4096.0;
const TARGET_CPU_PERCENT: f64 = 25.0;

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        run_clients(&spec);
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let (wanted, window) = if full {
        (19_000, Duration::from_secs(20))
    } else {
        (200, Duration::from_secs(2))
    };
    let n = support::fit_fd_limit("tarpit", wanted, WARM_UP);
    let note = if full {
        ""
    } else {
        " (quick mode, debug build: not a measurement)"
    };

    let dns = DnsServer::start(vec![zone()]);
    let server = ServerHandle::start(Arc::new(config(&dns, n))).expect("tarmac starts");
    let addr = server.local_addrs()[0];
    // The resolver checks the zone's two test points at start; let them pass before clients
    // come, so the zone is known healthy and no check is counted in the window.
    let deadline = Instant::now() + IO_TIMEOUT;
    while dns.queries() < 2 {
        assert!(
            Instant::now() < deadline,
            "no health checks within {IO_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }

    let mut clients = Clients::start(addr, n);
    clients.expect("warm", OPEN_DEADLINE + IO_TIMEOUT);
    let before = support::rss_kb();

    clients.send("open");
    let opened = clients.expect("open", OPEN_DEADLINE + IO_TIMEOUT);
    let open_secs = field(&opened, 1);
    let one_byte = field(&opened, 2);
    let open_rss = support::rss_kb();

    let cpu_start = Cpu::now();
    let start = Instant::now();
    clients.drain();
    thread::sleep(window);
    let cpu_end = Cpu::now();
    let elapsed = start.elapsed();
    let drained = clients.drain();
    let end_rss = support::rss_kb();
    let queries = dns.queries();

    let secs = elapsed.as_secs_f64();
    let expected = n as f64 * secs;
    let per_conn = (end_rss.saturating_sub(before) * 1024) as f64 / n as f64;
    let process_cpu = cpu_end.process.saturating_sub(cpu_start.process) as f64;
    let cpu_percent = 100.0 * process_cpu / TICKS_PER_SECOND / secs;
    let worker_user = cpu_end.worker_user.saturating_sub(cpu_start.worker_user) as f64;
    let worker_system = cpu_end
        .worker_system
        .saturating_sub(cpu_start.worker_system) as f64;
    let wakeups = cpu_end
        .worker_wakeups
        .saturating_sub(cpu_start.worker_wakeups) as f64;
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
        100.0 * worker_user / TICKS_PER_SECOND / secs,
        100.0 * worker_system / TICKS_PER_SECOND / secs,
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
    support::stop(server, STOP_DEADLINE);
}

/// [`ZONE`]: its test point (127.0.0.2 listed, 127.0.0.1 not, as health checks want) and every
/// tarpitted client's address, all answering 127.0.0.2.
fn zone() -> Zone {
    let test_point = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    std::iter::once(test_point)
        .chain((0..SOURCES).map(|i| IpAddr::V4(source_addr(i))))
        .fold(Zone::new(ZONE), |zone, ip| {
            let name = query_name(ip, ZONE);
            let label = name
                .strip_suffix(&format!(".{ZONE}."))
                .expect("the name ends in the zone");
            zone.a(label, "127.0.0.2")
        })
}

/// A loopback server that tarpits every listed client: caps and rates far above `n`, so the
/// connections are held (not refused) and stress mode stays off.
fn config(dns: &DnsServer, n: usize) -> Config {
    let mut config = Config::default();
    config.server.listen = vec!["127.0.0.1:0".parse().expect("address")];
    config.server.hostname = HOSTNAME.to_owned();
    config.server.workers = WORKERS;
    config.server.state_dir = support::state_dir("tarpit");
    // Stress mode starts at 80 % of this: out of reach at four times what is opened.
    config.server.max_connections = 4 * (n + WARM_UP);
    config.server.max_tarpitted = 2 * n;
    config.limits.max_connections_per_ip = u32::try_from(n + WARM_UP).expect("n fits u32");
    // Thousands of connections a second from one /8: rates out of reach, so the bench measures
    // held connections, not refusals.
    let unlimited = Rate {
        count: u32::MAX,
        per: Duration::from_secs(1),
    };
    config.limits.connection_rate_per_ip = unlimited;
    config.limits.connection_rate_per_subnet = unlimited;
    config.downstream.servers = vec!["127.0.0.1:9".parse().expect("address")];
    config.dns = config::Dns {
        servers: vec![dns.addr()],
        timeout: DNS_TIMEOUT,
        cache_ttl: LONG,
        rdns: false,
        health_interval: LONG,
    };
    config.dnsbl = vec![config::Dnsbl {
        zone: Arc::from(ZONE),
        weight: WEIGHT,
        codes: Vec::new(),
        reply: None,
    }];
    // The tarpit is the subject: no greet pause before the verdict, the first byte at once,
    // then one a second.
    config.tarpit.greet_pause = Duration::ZERO;
    config.tarpit.reply_delay = Duration::ZERO;
    config.tarpit.stutter = STUTTER;
    config
}

/// The whole banner a tarpitted client receives, one byte per [`STUTTER`].
fn banner() -> Vec<u8> {
    format!("220 {HOSTNAME} ESMTP tarmac\r\n").into_bytes()
}

/// Tarpitted source address `index`: 127.1.0.1 onwards, 250 per /24 (skipping .0 and the top).
fn source_addr(index: usize) -> Ipv4Addr {
    let third = u8::try_from(index / 250).expect("at most 64,000 addresses");
    let fourth = u8::try_from(index % 250 + 1).expect("below 251");
    Ipv4Addr::new(127, 1, third, fourth)
}

/// CPU times of this process and of tarmac's worker threads, in clock ticks, and how often the
/// workers went to sleep (voluntary context switches: one per `epoll_wait` that blocked, so
/// each is a wakeup).
struct Cpu {
    process: u64,
    worker_user: u64,
    worker_system: u64,
    worker_wakeups: u64,
}

impl Cpu {
    fn now() -> Cpu {
        let (user, system) = stat_times("/proc/self/stat");
        let mut cpu = Cpu {
            process: user + system,
            worker_user: 0,
            worker_system: 0,
            worker_wakeups: 0,
        };
        for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
            let dir = task.expect("a task entry").path();
            let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
                continue; // the thread ended meanwhile
            };
            if !comm.starts_with("tarmac-worker") {
                continue;
            }
            let (user, system) = stat_times(&dir.join("stat").to_string_lossy());
            cpu.worker_user += user;
            cpu.worker_system += system;
            let status = std::fs::read_to_string(dir.join("status")).expect("a task status");
            cpu.worker_wakeups += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .expect("voluntary_ctxt_switches in a task status");
        }
        cpu
    }
}

/// utime and stime from a `stat` file, in clock ticks.
fn stat_times(path: &str) -> (u64, u64) {
    let stat = std::fs::read_to_string(path).expect("a stat file");
    // The name in parentheses may hold spaces: count from the closing one. After it, state is
    // field 3, so utime (14) and stime (15) are at 11 and 12.
    let (_, rest) = stat.rsplit_once(')').expect("a stat line");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields[i].parse::<u64>().expect("CPU ticks");
    (ticks(11), ticks(12))
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

/// A child process holding connections to the server, driven by lines on its stdin.
struct Clients {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Lines the child printed; the reader thread ends at the child's EOF.
    lines: mpsc::Receiver<String>,
}

impl Clients {
    /// Starts the child; it opens the warm-up connections at once.
    fn start(addr: SocketAddr, n: usize) -> Clients {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .env(CHILD_ENV, format!("{addr},{n},{WARM_UP}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("client process starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Clients {
            child,
            stdin,
            lines,
        }
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("the child's stdin is open");
        if let Err(e) = writeln!(stdin, "{command}").and_then(|()| stdin.flush()) {
            self.fail(&format!("cannot tell the client process {command:?}: {e}"));
        }
    }

    /// The child's next line, which must start with `word`. The child has its own deadlines;
    /// this one also covers a child that hangs.
    fn expect(&mut self, word: &str, within: Duration) -> String {
        match self.lines.recv_timeout(within) {
            Ok(line) if line.split(' ').next() == Some(word) => line,
            Ok(line) => self.fail(&format!("client process said {line:?}, not {word:?}")),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.fail(&format!("client process did not say {word:?} in time"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.fail("client process ended early (see its error above)")
            }
        }
    }

    /// Has the child read what arrived on every connection.
    fn drain(&mut self) -> Drained {
        self.send("drain");
        let line = self.expect("drained", DRAIN_DEADLINE);
        let number = |i: usize| field(&line, i).parse::<u64>().expect("a number");
        Drained {
            bytes: number(1),
            min: number(2),
            max: number(3),
            complete: usize::try_from(number(4)).expect("a count"),
        }
    }

    /// Closes the child's stdin, which makes it exit and close its connections, and waits
    /// for it.
    fn close(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            match self.child.try_wait().expect("wait for client process") {
                Some(status) => {
                    assert!(status.success(), "client process failed: {status}");
                    return;
                }
                None if Instant::now() >= deadline => {
                    self.fail("client process did not exit after its stdin closed")
                }
                None => thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("{why}");
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
    let deadline = Instant::now() + OPEN_DEADLINE;
    let mut idle = Vec::with_capacity(warm);
    for i in 0..warm {
        check_deadline(deadline, i, warm);
        match connect_whole_banner(Ipv4Addr::LOCALHOST, addr) {
            Ok(stream) => idle.push(stream),
            Err(e) => child_fail(&format!("warm-up connection {i}: {e}")),
        }
    }
    say(&format!("warm {}", idle.len()));

    let mut commands = io::stdin().lock().lines();
    if !matches!(commands.next(), Some(Ok(line)) if line == "open") {
        return; // the parent gave up
    }
    let started = Instant::now();
    let deadline = started + OPEN_DEADLINE;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        check_deadline(deadline, i, n);
        let source = source_addr(i % SOURCES);
        match connect_tarpitted(source, addr, &banner) {
            Ok((stream, received)) => conns.push(Tarpitted { stream, received }),
            Err(e) => child_fail(&format!("connection {i} from {source}: {e}")),
        }
    }
    let one_byte = conns.iter().filter(|c| c.received == 1).count();
    say(&format!(
        "open {:.1} {one_byte}",
        started.elapsed().as_secs_f64()
    ));

    for line in commands {
        match line.as_deref() {
            Ok("drain") => say(&drain(&mut conns, &banner)),
            Ok(other) => child_fail(&format!("unknown command {other:?}")),
            Err(_) => break,
        }
    }
    drop(conns);
    drop(idle);
}

fn check_deadline(deadline: Instant, done: usize, of: usize) {
    if Instant::now() >= deadline {
        child_fail(&format!(
            "only {done} of {of} connections open after {OPEN_DEADLINE:?}"
        ));
    }
}

/// An unlisted connection, returned once its whole `220 ` line was read.
fn connect_whole_banner(source: Ipv4Addr, addr: SocketAddr) -> io::Result<TcpStream> {
    let mut stream = support::connect_from(source, addr, IO_TIMEOUT)?;
    let mut banner = Vec::new();
    let mut chunk = [0u8; 256];
    while !banner.ends_with(b"\r\n") && banner.len() < 512 {
        let got = stream.read(&mut chunk)?;
        if got == 0 {
            return Err(io::Error::other("closed before the banner"));
        }
        banner.extend_from_slice(&chunk[..got]);
    }
    if !banner.starts_with(b"220 ") {
        return Err(io::Error::other(format!(
            "expected a 220 banner, got {:?}",
            String::from_utf8_lossy(&banner)
        )));
    }
    Ok(stream)
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
    let mut stream = support::connect_from(source, addr, IO_TIMEOUT)?;
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
    eprintln!("tarpit bench client: {why}");
    std::process::exit(1);
}

/// A line to the parent on stdout; a parent that went away ends the child.
fn say(line: &str) {
    let mut stdout = io::stdout().lock();
    if writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(1); // the parent is gone
    }
}
