//! tarmac itself on loopback, in the test's own process: the base configuration every test
//! builds on ([`config`]), and a [`Server`] that stops (bounded) when the test ends.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use crate::sink::{Behaviour, Sink, SinkConfig};
use tarmac::config::{AnnounceClient, Config, DownstreamTls, Rate};
use tarmac::server::ServerHandle;

use crate::WAIT;

/// Drain time for servers in tests: long enough that a test never races it by accident.
pub const DRAIN: Duration = Duration::from_secs(5);

/// A config for tests: a loopback listener on a free port, two workers, a known hostname, no
/// DNS, XCLIENT towards the downstream (default `127.0.0.1:10025`, nothing listening),
/// connection rates out of reach, and a state directory of its own ([`auto_state_dir`]).
pub fn config() -> Config {
    let mut config = Config::default();
    // Never the default /var/lib/tarmac: the tests may run as root, and one test's state must
    // not leak into another's.
    config.server.state_dir = auto_state_dir();
    config.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.server.hostname = "mx.test".to_owned();
    config.server.workers = 2;
    config.downstream.announce_client = AnnounceClient::Xclient;
    config.downstream.tls = DownstreamTls::None;
    config.dns.rdns = false;
    config.dnsbl.clear();
    // Most tests are about what follows the banner; the greet pause has tests of its own.
    config.tarpit.greet_pause = Duration::ZERO;
    // Greylisting defers every first attempt; its own tests turn it on.
    config.greylist.enabled = false;
    // Many tests misbehave from 127.0.0.1 on purpose (pregreet, errors, rejects); a history
    // of that would tarpit the next test's client. `tests/reputation.rs` turns it on.
    config.reputation.enabled = false;
    config.timeouts.drain = DRAIN;
    // Most tests open many connections from 127.0.0.1 in well under a minute, far past the
    // default 30/min per address; `tests/rates.rs` sets the rates it tests.
    config.limits.connection_rate_per_ip = UNLIMITED_RATE;
    config.limits.connection_rate_per_subnet = UNLIMITED_RATE;
    // Every client of the tests is in 127.0.0.0/24 unless it picks another source address;
    // the per-address cap is what most tests raise or test. `tests/rates.rs` sets this one.
    config.limits.max_connections_per_subnet = u32::MAX;
    config
}

/// Name prefix of the state directories [`config`] makes; a [`Server`] removes its own when it
/// stops (a test that restarts on the same state sets its own directory).
const AUTO_STATE: &str = "tarmac-auto-state-";

/// A state directory no other server uses, under the system's temporary directory (cargo's
/// `CARGO_TARGET_TMPDIR` is given to test targets only, not to this library); not created (the
/// server creates it).
pub fn auto_state_dir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("{AUTO_STATE}{}-{n}", std::process::id()))
}

/// A connection rate no test reaches (the bucket refills once a nanosecond).
pub const UNLIMITED_RATE: Rate = Rate {
    count: u32::MAX,
    per: Duration::from_secs(1),
};

/// [`config`] relaying to `downstream`.
pub fn test_config(downstream: SocketAddr) -> Config {
    let mut config = config();
    config.downstream.servers = vec![downstream];
    config
}

/// The project's sink, offering XCLIENT, behaving as told.
pub fn sink(behaviour: Behaviour) -> Sink {
    Sink::start(SinkConfig {
        offer_xclient: true,
        behaviour,
        ..SinkConfig::default()
    })
    .expect("sink starts")
}

/// A server that is shut down (bounded) when the test ends, also on panic.
pub struct Server {
    handle: Option<ServerHandle>,
    pub addr: SocketAddr,
    /// The [`auto_state_dir`] to remove once stopped.
    auto_state: Option<PathBuf>,
}

impl Server {
    #[track_caller]
    pub fn start(config: Config) -> Server {
        // RUST_LOG=debug shows the server's side, close lines included, for a failing test.
        let _ = env_logger::builder().is_test(true).try_init();
        let state_dir = &config.server.state_dir;
        assert_ne!(
            state_dir,
            &Config::default().server.state_dir,
            "tests never use the real state directory"
        );
        let auto_state = state_dir
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with(AUTO_STATE))
            .then(|| state_dir.clone());
        let handle = ServerHandle::start(Arc::new(config)).unwrap();
        let addr = handle.local_addrs()[0];
        assert_ne!(addr.port(), 0);
        Server {
            handle: Some(handle),
            addr,
            auto_state,
        }
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    /// Shuts down and joins, failing the test if that takes longer than `limit`; returns how
    /// long it took.
    #[track_caller]
    pub fn stop_within(mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        let handle = self.handle.take().unwrap();
        handle.shutdown();
        match join_within(handle, limit) {
            Some(result) => result.unwrap(),
            None => panic!("server did not stop within {limit:?}"),
        }
        started.elapsed()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
            // Bounded: a hung server must not hang the test run, and a panic here would abort.
            let _ = join_within(handle, WAIT);
        }
        if let Some(dir) = self.auto_state.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub fn join_within(handle: ServerHandle, limit: Duration) -> Option<io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(handle.join());
    });
    rx.recv_timeout(limit).ok()
}
