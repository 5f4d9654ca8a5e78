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

use std::net::SocketAddr;

use tarmac::config::Config;

/// What this bench shares with the others: whole files of `bench/support/`, only those whose
/// every item it uses (see `bench/support/README.md`).
mod support {
    pub mod hold;
    pub mod hold_idle;
    pub mod run;
    pub mod server;
}

use support::run::Run;
use support::server;
use support::{hold, hold_idle};

/// Set in the child's environment to `addr,N`: open N connections to addr and hold them.
const CHILD_ENV: &str = "TARMAC_BENCH_IDLE_CLIENTS";

/// Worker threads, as the issue asks.
const WORKERS: usize = 2;

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
    let Run { full, note } = Run::from_args();
    let wanted = if full { 10_000 } else { 200 };
    let n = hold::fit_fd_limit("idle", wanted, WARM_UP);

    let (server, addr) = server::start(config(n));

    let warm_up = hold_idle::start(CHILD_ENV, format!("{addr},{WARM_UP}"), WARM_UP);
    warm_up.close();

    let before = hold::rss_kb();
    let clients = hold_idle::start(CHILD_ENV, format!("{addr},{n}"), n);
    let after = hold::rss_kb();

    let per_conn = hold::bytes_per_connection(before, after, n);
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
    server::stop(server);
}

/// A loopback server whose caps are above `n`; the downstream is never reached (idle clients
/// never send MAIL).
fn config(n: usize) -> Config {
    let mut config = server::config("idle", WORKERS);
    config.server.max_connections = 2 * n + WARM_UP;
    config.limits.max_connections_per_ip = u32::try_from(n).expect("n fits u32");
    config.limits.max_connections_per_subnet = config.limits.max_connections_per_ip;
    config
}

/// The child: opens the connections `spec` asks for, reads each banner, prints `ready N` and
/// holds them until stdin closes. Errors go to stderr with a failing exit status.
fn hold_connections(spec: &str) {
    let (addr, n) = spec
        .split_once(',')
        .and_then(|(a, n)| Some((a.parse::<SocketAddr>().ok()?, n.parse::<usize>().ok()?)))
        .unwrap_or_else(|| hold::child_fail("idle", &format!("bad {CHILD_ENV}={spec:?}")));
    let conns = hold::open_all("idle", n, |i| {
        let source = hold_idle::source(i);
        hold::connect_from(source, addr)
            .and_then(|mut stream| hold::read_banner(&mut stream).map(|()| stream))
            .map_err(|e| format!("connection {i} from {source}: {e}"))
    });
    hold_idle::ready(conns.len());
    drop(conns);
}
