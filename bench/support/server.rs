//! A tarmac server in the bench's own process: the base config every bench that starts one
//! builds on, and a start and a bounded stop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use tarmac::config::{Config, Rate};
use tarmac::server::ServerHandle;

/// Longest the server may take to stop at the end.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// A server on 127.0.0.1 (a port of the kernel's choosing) with `workers` worker threads and
/// `bench`'s own emptied state directory, and nothing in the way of what a bench measures:
/// connection rates out of reach, no DNS checks, no greet pause, no greylisting. The
/// downstream is the discard port, never reached unless the bench sets its own (as `relay`
/// does). Caps (`max_connections`, the per-IP one) are each bench's to size; reputation keeps
/// its default, so a bench measures the session's usual path to its banner.
pub fn config(bench: &str, workers: usize) -> Config {
    let mut config = Config::default();
    config.server.listen = vec!["127.0.0.1:0".parse().expect("address")];
    config.server.hostname = "mx.bench".to_owned();
    config.server.workers = workers;
    config.server.state_dir = state_dir(bench);
    // Benches connect by the thousand a second from a few loopback addresses: rates out of
    // reach, so they measure held or relayed connections, not refusals.
    let unlimited = Rate {
        count: u32::MAX,
        per: Duration::from_secs(1),
    };
    config.limits.connection_rate_per_ip = unlimited;
    config.limits.connection_rate_per_subnet = unlimited;
    config.downstream.servers = vec!["127.0.0.1:9".parse().expect("address")];
    // The benches that measure DNS checks aim `[dns]` at their own loopback server and set
    // their zones; no other bench may ask any resolver.
    config.dns.rdns = false;
    config.dnsbl.clear();
    // The greet pause is a wait, not work: it would only delay what is measured.
    config.tarpit.greet_pause = Duration::ZERO;
    // Greylisting defers every first attempt; the `greylist` bench measures it on its own.
    config.greylist.enabled = false;
    config
}

/// Starts tarmac with `config`; the handle and the address it listens on.
pub fn start(config: Config) -> (ServerHandle, SocketAddr) {
    let server = ServerHandle::start(Arc::new(config)).expect("tarmac starts");
    let addr = *server.local_addrs().first().expect("a listening address");
    (server, addr)
}

/// Shuts the server down and waits for it, at most [`STOP_DEADLINE`].
pub fn stop(server: ServerHandle) {
    server.shutdown();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(server.join());
    });
    match rx.recv_timeout(STOP_DEADLINE) {
        Ok(result) => result.expect("tarmac stops cleanly"),
        Err(_) => panic!("tarmac did not stop within {STOP_DEADLINE:?}"),
    }
}

/// `bench`'s state directory under cargo's scratch directory, emptied: a bench never writes
/// the real /var/lib/tarmac, and state left by an earlier run (PASS entries, reputation) must
/// not change this run's figures.
fn state_dir(bench: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{bench}-state"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
