//! Memory per idle connection: tarmac holds N connections that got their banner and then say
//! nothing; the figure is the server process's RSS growth ÷ N. Target: ≤ 8 KB per connection
//! (OpenBSD spamd preallocates about 20 KB per slot).
//!
//! The server runs in this process with two workers. The clients run in a child process (this
//! same binary, re-executed with `TARMAC_BENCH_IDLE_CLIENTS=addr,N`), so their sockets and
//! buffers do not count against tarmac: the child opens N connections from 127.0.0.1–250 (so the
//! per-IP cap and ephemeral ports are no issue), reads the `220` banner on each, which proves
//! the server accepted it and built its session, then prints `ready` and holds them until its
//! stdin closes. RSS is read from `/proc/self/status` (VmRSS) after a warm-up, and again once
//! the child is ready. Kernel socket memory is not RSS and not counted.
//!
//! `cargo bench --bench idle` holds 10,000 connections; without `--bench` (as `cargo test
//! --all-targets` runs it, in a debug build) 200, to check the mechanics, not to measure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tarmac::config::{Config, Rate};
use tarmac::server::ServerHandle;

#[path = "support.rs"]
mod support;

use support::{IO_TIMEOUT, OPEN_DEADLINE, STOP_DEADLINE};

/// Set in the child's environment to `addr,N`: open N connections to addr and hold them.
const CHILD_ENV: &str = "TARMAC_BENCH_IDLE_CLIENTS";

/// Worker threads, as the issue asks.
const WORKERS: usize = 2;

/// Source addresses 127.0.0.1 to 127.0.0.SOURCES the child spreads its connections over.
const SOURCES: usize = 250;

/// Connections opened and closed before the baseline, so first-use costs (allocator arenas,
/// the first slab and heap allocations, lazily paged code) are not counted per connection.
const WARM_UP: usize = 100;

/// The target from the issue, bytes of RSS per idle connection.
const TARGET: f64 = 8192.0;

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        hold_connections(&spec);
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let wanted = if full { 10_000 } else { 200 };
    let n = support::fit_fd_limit("idle", wanted, WARM_UP);

    let config = config(n);
    let server = ServerHandle::start(Arc::new(config)).expect("tarmac starts");
    let addr = server.local_addrs()[0];

    let warm_up = Clients::open(addr, WARM_UP);
    warm_up.close();

    let before = support::rss_kb();
    let clients = Clients::open(addr, n);
    let after = support::rss_kb();

    let per_conn = (after.saturating_sub(before) * 1024) as f64 / n as f64;
    let note = if full {
        ""
    } else {
        " (quick mode, debug build: not a measurement)"
    };
    println!(
        "idle/rss-per-connection: {per_conn:.0} bytes ({n} idle connections, workers={WORKERS}, \
         RSS before {before} KB, after {after} KB){note}"
    );
    println!(
        "idle/session-size: {} bytes (size_of::<tarmac::smtp::Session>(), inline in each slab entry)",
        std::mem::size_of::<tarmac::smtp::Session>()
    );
    println!(
        "idle/target: <= {TARGET:.0} bytes: {}{note}",
        if per_conn <= TARGET { "PASS" } else { "FAIL" }
    );

    clients.close();
    support::stop(server, STOP_DEADLINE);
}

/// A loopback server whose caps and rates are above `n`; no DNS, and the downstream is never reached
/// (idle clients never send MAIL).
fn config(n: usize) -> Config {
    let mut config = Config::default();
    config.server.listen = vec!["127.0.0.1:0".parse().expect("address")];
    config.server.hostname = "mx.bench".to_owned();
    config.server.workers = WORKERS;
    config.server.state_dir = support::state_dir("idle");
    config.server.max_connections = 2 * n + WARM_UP;
    config.limits.max_connections_per_ip = u32::try_from(n).expect("n fits u32");
    // Every client comes from 127.0.0.0/24 at once, thousands a second: rates out of reach, so
    // the bench measures held connections, not refusals.
    let unlimited = Rate {
        count: u32::MAX,
        per: Duration::from_secs(1),
    };
    config.limits.connection_rate_per_ip = unlimited;
    config.limits.connection_rate_per_subnet = unlimited;
    config.downstream.servers = vec!["127.0.0.1:9".parse().expect("address")];
    config.dns.rdns = false;
    config.dnsbl.clear();
    // Idle after the banner is what is measured; the pause would only delay it.
    config.tarpit.greet_pause = Duration::ZERO;
    config
}

/// A child process holding connections to the server.
struct Clients {
    child: Child,
    /// Lines the child printed; the reader thread ends at the child's EOF.
    lines: mpsc::Receiver<String>,
}

impl Clients {
    /// Starts the child and waits until it has read the banner on all `n` connections.
    fn open(addr: SocketAddr, n: usize) -> Clients {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .env(CHILD_ENV, format!("{addr},{n}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("client process starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let clients = Clients { child, lines };
        let expected = format!("ready {n}");
        // The child has its own deadline; this one also covers a child that hangs.
        match clients.lines.recv_timeout(OPEN_DEADLINE + IO_TIMEOUT) {
            Ok(line) if line == expected => clients,
            Ok(line) => clients.fail(&format!("client process said {line:?}")),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                clients.fail("client process not ready in time")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                clients.fail("client process ended early (see its error above)")
            }
        }
    }

    /// Closes the child's stdin, which makes it exit and close its connections, and waits
    /// for it.
    fn close(mut self) {
        drop(self.child.stdin.take());
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

    fn fail(mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("{why}");
    }
}

/// The child: opens the connections `spec` asks for, reads each banner, prints `ready N` and
/// holds them until stdin closes. Errors go to stderr with a failing exit status.
fn hold_connections(spec: &str) {
    let (addr, n) = spec
        .split_once(',')
        .and_then(|(a, n)| Some((a.parse::<SocketAddr>().ok()?, n.parse::<usize>().ok()?)))
        .unwrap_or_else(|| child_fail(&format!("bad {CHILD_ENV}={spec:?}")));
    let deadline = Instant::now() + OPEN_DEADLINE;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        if Instant::now() >= deadline {
            child_fail(&format!(
                "only {i} of {n} connections open after {OPEN_DEADLINE:?}"
            ));
        }
        let source = Ipv4Addr::new(127, 0, 0, 1 + (i % SOURCES) as u8);
        match connect_from(source, addr) {
            Ok(conn) => conns.push(conn),
            Err(e) => child_fail(&format!("connection {i} from {source}: {e}")),
        }
    }
    println!("ready {}", conns.len());
    std::io::stdout().flush().expect("stdout");
    // Hold until the parent closes our stdin (or dies).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(conns);
}

/// One connection from `source` to `addr`, returned once its `220 ` banner line was read.
fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut stream = support::connect_from(source, addr, IO_TIMEOUT)?;
    let mut banner = Vec::new();
    let mut chunk = [0u8; 256];
    while !banner.ends_with(b"\r\n") && banner.len() < 512 {
        let got = stream.read(&mut chunk)?;
        if got == 0 {
            return Err(std::io::Error::other(format!(
                "closed before the banner; got {:?}",
                String::from_utf8_lossy(&banner)
            )));
        }
        banner.extend_from_slice(&chunk[..got]);
    }
    if !banner.starts_with(b"220 ") {
        return Err(std::io::Error::other(format!(
            "expected a 220 banner, got {:?}",
            String::from_utf8_lossy(&banner)
        )));
    }
    Ok(stream)
}

fn child_fail(why: &str) -> ! {
    eprintln!("idle bench client: {why}");
    std::process::exit(1);
}
