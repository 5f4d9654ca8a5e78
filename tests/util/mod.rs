//! Shared helpers for the integration tests: a real tarmac server on loopback, the project's
//! sink as downstream, and an SMTP client whose every read is bounded.

#![allow(dead_code)] // each test module uses its own subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tarmac::config::{AnnounceClient, Config};
use tarmac::server::ServerHandle;
use tarmac::sink::{Behaviour, Sink, SinkConfig};

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A config for tests: loopback listener on a free port, two workers, short timeouts.
pub fn test_config(downstream: SocketAddr) -> Config {
    let mut config = Config::default();
    config.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.server.hostname = "mx.test".to_owned();
    config.server.workers = 2;
    config.downstream.servers = vec![downstream];
    config.downstream.announce_client = AnnounceClient::Xclient;
    config.dns.rdns = false;
    config.dnsbl.clear();
    config
}

/// A running server, shut down and joined on drop.
pub struct Server {
    handle: Option<ServerHandle>,
    pub addr: SocketAddr,
}

impl Server {
    #[track_caller]
    pub fn start(config: Config) -> Server {
        let handle = ServerHandle::start(Arc::new(config)).expect("server starts");
        let addr = handle.local_addrs()[0];
        Server {
            handle: Some(handle),
            addr,
        }
    }

    /// Graceful shutdown; returns how long `join` took.
    pub fn stop(mut self) -> Duration {
        let handle = self.handle.take().unwrap();
        let started = Instant::now();
        handle.shutdown();
        handle.join().expect("server joins");
        started.elapsed()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
            let _ = handle.join();
        }
    }
}

pub fn sink(behaviour: Behaviour) -> Sink {
    Sink::start(SinkConfig {
        offer_xclient: true,
        behaviour,
        ..SinkConfig::default()
    })
    .expect("sink starts")
}

/// An SMTP client over a real socket; every read times out after [`WAIT`].
pub struct Client {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Client {
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads one whole (possibly multi-line) reply, lines joined with CRLF kept.
    #[track_caller]
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = Vec::new();
            let n = self
                .reader
                .read_until(b'\n', &mut line)
                .expect("read reply");
            assert!(
                n > 0,
                "connection closed while waiting for a reply; got so far: {all:?}"
            );
            let line = String::from_utf8_lossy(&line).into_owned();
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    /// Sends a command and returns its reply.
    #[track_caller]
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// True when the server closed the connection (EOF) before `WAIT`.
    #[track_caller]
    pub fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.reader.read(&mut byte), Ok(0) | Err(_))
    }

    /// Banner, EHLO, MAIL, RCPT...; asserts each succeeds, returns at the 354.
    #[track_caller]
    pub fn start_message(&mut self, from: &str, to: &[&str]) {
        assert!(self.reply().starts_with("220 "), "banner");
        assert!(self.cmd("EHLO client.example").starts_with("250-"), "EHLO");
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert!(r.starts_with("250 "), "MAIL: {r}");
        for rcpt in to {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>"));
            assert!(r.starts_with("250 "), "RCPT: {r}");
        }
        let r = self.cmd("DATA");
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
