//! What inbound STARTTLS costs: whole SMTP sessions per second through tarmac with a full TLS
//! handshake against the same sessions in plain text, and the server's RSS per idle connection
//! after a handshake against one that stayed plain.
//!
//! The server runs in this process with two workers and a certificate from
//! `testkit/src/certs.rs` (an ECDSA P-256 leaf and its CA, as rcgen makes them). Sessions per
//! second: client threads in this process run, each on its own connections from 127.0.0.x,
//! `connect, banner, EHLO, QUIT` (plain) or `connect, banner, EHLO, STARTTLS, handshake, EHLO,
//! QUIT` (TLS), checking every reply inside the timed loop; the client never resumes a TLS
//! session, so every handshake is a full one, as with a new sending host. Plain and TLS rounds
//! alternate and the median round of each is printed, with their ratio. The clients share the
//! machine with the server (and verify the server's certificate), so the figures are for the
//! whole loopback system, not the server alone.
//!
//! Memory: two child processes (this binary, re-executed with `TARMAC_BENCH_TLS_CLIENTS`)
//! hold N connections each, one set plain (banner and EHLO) and one over TLS (banner, EHLO,
//! STARTTLS, handshake, EHLO over TLS), all idle afterwards; the server process's RSS growth
//! while each set opens, ÷ N, is the cost per connection. Both sets stay open until the end,
//! so memory one set freed cannot flatter the other. Kernel socket memory is not RSS.
//!
//! `cargo bench --bench tls` runs 3 rounds of 1,500 sessions of each kind and holds 2,000
//! connections of each kind; without `--bench` (as `cargo test --all-targets` runs it, in a
//! debug build) 1 round of 8 sessions and 20 connections, to check the mechanics, not to
//! measure.

/// What this bench shares with the others: whole files of `bench/support/`, only those whose
/// every item it uses (see `bench/support/README.md`).
mod support {
    pub mod hold;
    pub mod hold_idle;
    pub mod run;
    pub mod server;
    pub mod stats;
}

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tarmac::config::Config;
use tarmac_testkit::certs::TestCerts;

use support::hold::{self, ClientProcess};
use support::hold_idle;
use support::run::Run;
use support::server;
use support::stats::{median, per_second};

/// Set in a child's environment to `addr,N,plain|tls,ca-file`: hold N connections to addr.
const CHILD_ENV: &str = "TARMAC_BENCH_TLS_CLIENTS";

/// Worker threads of the server.
const WORKERS: usize = 2;

/// Client threads running sessions at once in the rate rounds.
const CLIENT_THREADS: usize = 4;

/// TLS connections opened and closed before the memory baseline, so first-use costs (rustls'
/// and ring's lazily built tables, allocator arenas, slab growth) are not counted per
/// connection.
const WARM_UP: usize = 50;

/// How a client talks to tarmac.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Plain,
    Tls,
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        hold_connections(&spec);
        return;
    }
    let Run { full, note } = Run::from_args();
    let (rounds, sessions, wanted) = if full { (3, 1500, 2000) } else { (1, 8, 20) };
    let held = hold::fit_fd_limit("tls", 2 * wanted, WARM_UP) / 2;

    let dir = std::env::temp_dir().join(format!("tarmac-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let certs = TestCerts::generate(&dir, "bench");
    let (server, addr) = server::start(config(&certs, held));
    let client = client_config(&certs.ca);

    let mut plain = Vec::with_capacity(rounds);
    let mut tls = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        plain.push(round(addr, sessions, Mode::Plain, &client));
        tls.push(round(addr, sessions, Mode::Tls, &client));
    }
    let (plain, tls) = (median(plain), median(tls));
    println!(
        "tls/plain-sessions: {plain:.0} sessions/s (connect, banner, EHLO, QUIT; \
         {CLIENT_THREADS} client threads, workers={WORKERS}, median of {rounds} rounds of \
         {sessions}){note}"
    );
    println!(
        "tls/starttls-sessions: {tls:.0} sessions/s (connect, banner, EHLO, STARTTLS, full \
         handshake without resumption, EHLO, QUIT; same clients and rounds){note}"
    );
    println!("tls/ratio: {:.2} (STARTTLS / plain){note}", tls / plain);

    let warm_up = open_clients(addr, WARM_UP, Mode::Tls, &certs.ca);
    warm_up.close();
    let before = hold::rss_kb();
    let plain_clients = open_clients(addr, held, Mode::Plain, &certs.ca);
    let middle = hold::rss_kb();
    let tls_clients = open_clients(addr, held, Mode::Tls, &certs.ca);
    let after = hold::rss_kb();
    let plain_bytes = hold::bytes_per_connection(before, middle, held);
    let tls_bytes = hold::bytes_per_connection(middle, after, held);
    println!(
        "tls/rss-per-connection: plain {plain_bytes:.0} bytes, after STARTTLS {tls_bytes:.0} \
         bytes ({held} idle connections of each, workers={WORKERS}, RSS {before} KB, \
         {middle} KB with the plain ones, {after} KB with both){note}"
    );
    println!(
        "tls/rss-added-by-tls: {:.0} bytes per connection{note}",
        tls_bytes - plain_bytes
    );
    tls_clients.close();
    plain_clients.close();
    server::stop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A loopback server with `certs` for STARTTLS and caps above anything the bench does; the
/// downstream is never reached (nobody sends MAIL).
fn config(certs: &TestCerts, held: usize) -> Config {
    let mut config = server::config("tls", WORKERS);
    config.server.max_connections = 4 * held + WARM_UP + 1000;
    config.limits.max_connections_per_ip = u32::try_from(4 * held + 1000).expect("fits u32");
    config.limits.max_connections_per_subnet = config.limits.max_connections_per_ip;
    config.tls.cert = Some(certs.chain.clone());
    config.tls.key = Some(certs.key.clone());
    config.load_tls().expect("the test certificate loads");
    config
}

/// A client config trusting the CA at `ca` (PEM), with session resumption off.
fn client_config(ca: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).expect("CA certificate"))
        .expect("CA certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// Runs `sessions` sessions of `mode` on [`CLIENT_THREADS`] threads; sessions per second.
fn round(addr: SocketAddr, sessions: usize, mode: Mode, client: &Arc<ClientConfig>) -> f64 {
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            let client = Arc::clone(client);
            let count = sessions / CLIENT_THREADS + usize::from(t < sessions % CLIENT_THREADS);
            thread::spawn(move || {
                for i in 0..count {
                    let source = hold_idle::source(t + i * CLIENT_THREADS);
                    if let Err(e) = session(addr, source, mode, &client) {
                        panic!("{mode:?} session {i} on thread {t}: {e}");
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("client thread");
    }
    per_second(sessions, started.elapsed())
}

/// One whole session; with `Mode::Tls` the handshake and the EHLO after it too.
fn session(
    addr: SocketAddr,
    source: Ipv4Addr,
    mode: Mode,
    client: &Arc<ClientConfig>,
) -> io::Result<()> {
    let (stream, mut reader) = greet(addr, source)?;
    match mode {
        Mode::Plain => {
            expect(command(&stream, &mut reader, "QUIT")?, "221 ")?;
        }
        Mode::Tls => {
            let mut tls = starttls(stream, reader, client)?;
            expect(tls_command(&mut tls, "EHLO client.bench")?, "250-")?;
            expect(tls_command(&mut tls, "QUIT")?, "221 ")?;
        }
    }
    Ok(())
}

/// Connects from `source`, reads the banner and says EHLO in plain text.
fn greet(addr: SocketAddr, source: Ipv4Addr) -> io::Result<(TcpStream, BufReader<TcpStream>)> {
    let mut stream = hold::connect_from(source, addr)?;
    hold::read_banner(&mut stream)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    expect(command(&stream, &mut reader, "EHLO client.bench")?, "250-")?;
    Ok((stream, reader))
}

/// STARTTLS and the client side of the handshake.
fn starttls(
    stream: TcpStream,
    mut reader: BufReader<TcpStream>,
    client: &Arc<ClientConfig>,
) -> io::Result<BufReader<StreamOwned<ClientConnection, TcpStream>>> {
    expect(command(&stream, &mut reader, "STARTTLS")?, "220 ")?;
    if !reader.buffer().is_empty() {
        return Err(io::Error::other(
            "bytes after the 220, before the handshake",
        ));
    }
    let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
    let mut conn = ClientConnection::new(Arc::clone(client), name).map_err(io::Error::other)?;
    let mut socket = stream;
    while conn.is_handshaking() {
        conn.complete_io(&mut socket)?;
    }
    Ok(BufReader::new(StreamOwned::new(conn, socket)))
}

fn command(mut stream: &TcpStream, reader: &mut impl BufRead, line: &str) -> io::Result<String> {
    stream.write_all(format!("{line}\r\n").as_bytes())?;
    reply(reader)
}

fn tls_command(
    tls: &mut BufReader<StreamOwned<ClientConnection, TcpStream>>,
    line: &str,
) -> io::Result<String> {
    let stream = tls.get_mut();
    stream.write_all(format!("{line}\r\n").as_bytes())?;
    stream.flush()?;
    reply(tls)
}

/// One whole reply (every line of a multi-line one).
fn reply(reader: &mut impl BufRead) -> io::Result<String> {
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || !line.ends_with("\r\n") {
            return Err(io::Error::other(format!(
                "connection closed after {reply:?}"
            )));
        }
        let last = line.as_bytes().get(3) != Some(&b'-');
        reply.push_str(&line);
        if last {
            return Ok(reply);
        }
    }
}

fn expect(reply: String, start: &str) -> io::Result<()> {
    if reply.starts_with(start) {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "expected {start:?}, got {reply:?}"
        )))
    }
}

/// Starts a child and waits until it holds `n` connections of `mode`, idle.
fn open_clients(addr: SocketAddr, n: usize, mode: Mode, ca: &Path) -> ClientProcess {
    let mode_name = if mode == Mode::Tls { "tls" } else { "plain" };
    let spec = format!("{addr},{n},{mode_name},{}", ca.display());
    hold_idle::start(CHILD_ENV, spec, n)
}

/// The child: opens the connections `spec` asks for, each idle after its last EHLO reply,
/// prints `ready N` and holds them until stdin closes.
fn hold_connections(spec: &str) {
    let parts: Vec<&str> = spec.splitn(4, ',').collect();
    let bad_spec = || hold::child_fail("tls", &format!("bad {CHILD_ENV}={spec:?}"));
    let [addr, n, mode, ca] = parts[..] else {
        bad_spec()
    };
    let (Ok(addr), Ok(n)) = (addr.parse::<SocketAddr>(), n.parse::<usize>()) else {
        bad_spec()
    };
    let mode = if mode == "tls" {
        Mode::Tls
    } else {
        Mode::Plain
    };
    let client = client_config(&PathBuf::from(ca));
    let mut plain = Vec::new();
    let mut tls = Vec::new();
    hold::open_all("tls", n, |i| {
        let source = hold_idle::source(i);
        greet(addr, source)
            .and_then(|(stream, reader)| match mode {
                Mode::Plain => {
                    plain.push((stream, reader));
                    Ok(())
                }
                Mode::Tls => {
                    let mut conn = starttls(stream, reader, &client)?;
                    expect(tls_command(&mut conn, "EHLO client.bench")?, "250-")?;
                    tls.push(conn);
                    Ok(())
                }
            })
            .map_err(|e| format!("{mode:?} connection {i} from {source}: {e}"))
    });
    hold_idle::ready(plain.len() + tls.len());
}
