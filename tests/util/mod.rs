//! Shared helpers for the integration tests: a real tarmac server on loopback, the project's
//! sink as downstream, and an SMTP client whose every read and write is bounded.

#![allow(dead_code)] // each test module uses its own subset

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tarmac::config::{AnnounceClient, Config, DownstreamTls, Rate};
use tarmac::server::ServerHandle;
use tarmac::sink::{Behaviour, Sink, SinkConfig};

// A real DNS server on loopback (hickory-server) for the DNS tests; benches include it by path.
pub mod dns_server;
// Test CA and loopback leaf certificates for the TLS tests.
pub mod certs;
// A real redis-server on loopback (no persistence) for the shared-state tests and bench.
pub mod redis_server;
// A private, real Postfix smtpd on loopback as the downstream (Maildir delivery, log file).
pub mod postfix;
// A Postfix-like downstream with faults drawn at random per connection (tests/faults.rs).
pub mod faulty;

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

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
const AUTO_STATE: &str = "auto-state-";

/// A state directory no other server uses, under cargo's scratch directory for tests; not
/// created (the server creates it).
pub fn auto_state_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{AUTO_STATE}{}-{n}", std::process::id()))
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
    auto_state: Option<std::path::PathBuf>,
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

/// A line-oriented SMTP client with a timeout on every read and write.
pub struct Client {
    reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl Client {
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, WAIT).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// Connects from the loopback address `source` (any of 127.0.0.0/8 works on Linux), so a
    /// test can be a client that a DNS list or a local list knows.
    #[track_caller]
    pub fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> Client {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
        socket.connect_timeout(&addr.into(), WAIT).unwrap();
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// One line, CRLF included; fails on EOF, error or timeout.
    #[track_caller]
    pub fn line(&mut self) -> String {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) => panic!("connection closed; expected a line"),
            Ok(_) if line.ends_with(b"\n") => String::from_utf8(line).unwrap(),
            Ok(_) => panic!(
                "connection closed mid-line: {:?}",
                line.escape_ascii().to_string()
            ),
            Err(e) => panic!(
                "reading a line: {e} (got {:?})",
                line.escape_ascii().to_string()
            ),
        }
    }

    /// One whole reply, every line of a multi-line one.
    #[track_caller]
    pub fn reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let line = self.line();
            let last = line.as_bytes().get(3) != Some(&b'-');
            reply.push_str(&line);
            if last {
                return reply;
            }
        }
    }

    /// One whole reply, or why none came (EOF, reset, timeout): for a test that records a
    /// missing answer as evidence instead of failing on the spot.
    pub fn try_reply(&mut self) -> Result<String, String> {
        let mut reply = String::new();
        loop {
            let mut line = Vec::new();
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => return Err(format!("connection closed after {reply:?}")),
                Ok(_) if line.ends_with(b"\n") => {
                    let last = line.get(3) != Some(&b'-');
                    reply.push_str(&String::from_utf8_lossy(&line));
                    if last {
                        return Ok(reply);
                    }
                }
                Ok(_) => {
                    return Err(format!(
                        "connection closed mid-line after {reply:?}: {:?}",
                        line.escape_ascii().to_string()
                    ));
                }
                Err(e) => return Err(format!("{e} after {reply:?}")),
            }
        }
    }

    /// Writes all of `bytes`, or says why not.
    pub fn try_send(&mut self, bytes: impl AsRef<[u8]>) -> Result<(), String> {
        self.writer
            .write_all(bytes.as_ref())
            .map_err(|e| e.to_string())
    }

    #[track_caller]
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.writer.write_all(bytes.as_ref()).unwrap();
    }

    /// Sends `command` with CRLF and returns the reply.
    #[track_caller]
    pub fn command(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n"));
        self.reply()
    }

    /// The server closes the connection without sending anything more.
    #[track_caller]
    pub fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert_eq!(rest.escape_ascii().to_string(), "", "bytes before EOF"),
            Err(e) => panic!(
                "expected EOF, got {e} after {:?}",
                rest.escape_ascii().to_string()
            ),
        }
    }

    /// Reads and discards until the server closes (EOF or reset).
    #[track_caller]
    pub fn drain_to_close(&mut self) {
        let mut buf = [0; 16 * 1024];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("waiting for the server to close: {e}"),
            }
        }
    }

    /// One short message from `a@example.org` to `b@example.net` (banner to the final dot);
    /// returns the reply to the dot.
    #[track_caller]
    pub fn send_message(&mut self) -> String {
        self.start_message("a@example.org", &["b@example.net"]);
        self.send(b"hi\r\n.\r\n");
        self.reply()
    }

    /// Banner, EHLO, MAIL, RCPT...; asserts each succeeds, returns at the 354.
    #[track_caller]
    pub fn start_message(&mut self, from: &str, to: &[&str]) {
        let banner = self.reply();
        // A `220-` teaser (greet pause) may come first; the final line is what counts.
        let last = banner.lines().last().unwrap_or_default();
        assert!(last.starts_with("220 "), "banner: {banner}");
        assert!(
            self.command("EHLO client.example").starts_with("250-"),
            "EHLO"
        );
        let r = self.command(&format!("MAIL FROM:<{from}>"));
        assert!(r.starts_with("250 "), "MAIL: {r}");
        for rcpt in to {
            let r = self.command(&format!("RCPT TO:<{rcpt}>"));
            assert!(r.starts_with("250 "), "RCPT: {r}");
        }
        let r = self.command("DATA");
        assert!(r.starts_with("354 "), "DATA: {r}");
    }
}

/// Polls `cond` until it holds or [`WAIT`] passes.
#[track_caller]
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a peer to completion within [`WAIT`] (killed otherwise); returns (success, output).
#[track_caller]
pub fn run_bounded(mut command: std::process::Command) -> (bool, String) {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn peer");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait peer") {
            let output = child.wait_with_output().expect("peer output");
            let text = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            return (status.success(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bytes that look like noise: xorshift64, deterministic per seed.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Where a program is on PATH (or in /usr/sbin for Postfix's tools).
pub fn find_program(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// An interop peer; missing outside CI is a skip (with a note), missing under `CI=true` fails.
pub fn require_program(name: &str) -> Option<std::path::PathBuf> {
    let found = find_program(name);
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is not installed, but CI must run this interop test (.ci/run installs it)"
        );
        eprintln!("note: {name} not installed; skipping this interop test");
    }
    found
}

/// The next stderr line of a child containing `needle`, within [`WAIT`].
#[track_caller]
pub fn wait_for_log(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let give_up = Instant::now() + WAIT;
    loop {
        let left = give_up.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no log line containing {needle:?}: {e}"),
        }
    }
}

/// A tarmac child whose stderr lines arrive on `lines`; killed (by its PID) when dropped, so
/// a failing test leaves nothing running.
pub struct Running {
    pub pid: u32,
    pub lines: mpsc::Receiver<String>,
    child: Option<std::process::Child>,
}

impl Running {
    /// `tarmac run -c config`, logging at info. The file must set `state_dir` (to a test
    /// directory): the default, /var/lib/tarmac, is the real one, and tests may run as root.
    #[track_caller]
    pub fn start(config: &std::path::Path) -> Running {
        let text = std::fs::read_to_string(config).unwrap();
        assert!(
            text.contains("\nstate_dir = "),
            "{}: a test's config must set [server] state_dir",
            config.display()
        );
        let mut command = tarmac();
        command
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info");
        Running::spawn(command)
    }

    /// Any tarmac command line (`demo`, ...), stdin and stdout closed, stderr read.
    #[track_caller]
    pub fn spawn(mut command: std::process::Command) -> Running {
        use std::io::BufRead;
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running {
            pid: child.id(),
            lines,
            child: Some(child),
        }
    }

    /// Sends `signal` (`HUP`, `TERM`, `INT`) to the child.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the child to exit within [`WAIT`] (failing the test otherwise); returns its
    /// exit code and the stderr lines not yet taken from `lines`.
    #[track_caller]
    pub fn wait_exit(mut self) -> (Option<i32>, String) {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tarmac did not exit within {WAIT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at the pipe's EOF, which the exit brings.
        let rest: Vec<String> = self.lines.iter().collect();
        (status.code(), rest.join("\n"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The tarmac binary, ready for arguments.
pub fn tarmac() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_tarmac"))
}

/// `tarmac check -c path`, run to its end: its exit status, stdout and stderr.
pub fn tarmac_check(path: &std::path::Path) -> std::process::Output {
    tarmac().args(["check", "-c"]).arg(path).output().unwrap()
}

/// A loopback port that was free a moment ago, for a `tarmac run` child's config file.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An empty directory for one test's files (the name tells the tests apart, the pid the runs).
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tarmac-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
