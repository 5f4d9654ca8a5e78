//! Worst-case memory per connection (DESIGN.md §6.1 "Memory"): what one connection can make
//! tarmac hold, as the server process's RSS growth ÷ N, against the targets of 16 KB for a
//! connection that relays nothing and 160 KB for one relaying a body.
//!
//! Two scenarios, each in a fresh process of its own (this binary re-executed with
//! `TARMAC_BENCH_MEMORY_PHASE`), so memory freed by one is not reused by the other:
//! - `commands`: N clients send EHLO, then pipeline NOOPs without ever reading a reply until
//!   their writes stall, i.e. until tarmac stopped reading them because their replies back up.
//!   The junk and error limits are lifted for this run (they would close the clients after
//!   120 NOOPs and hide the buffers' bound, which must hold whatever the limits are).
//! - `relay`: N clients start a message (EHLO, MAIL, RCPT, DATA) to a downstream that answers
//!   up to its `354` and then never reads again, and stream a body until their writes stall.
//!
//! The clients, and the stalled downstream, run in a child process (`TARMAC_BENCH_MEMORY_CLIENTS`),
//! so their sockets, threads and buffers do not count against tarmac. Each client's socket has
//! a small send buffer, so the kernel's share (not RSS, not counted) stays small. "Stalled"
//! means the clients' sockets took next to nothing over [`SETTLE`] ([`TRICKLE`]);
//! the whole flood is bounded by [`STALL_DEADLINE`]. RSS is read from
//! `/proc/self/status` after a warm-up of idle connections and again once the child says its
//! writes stalled. Loopback only.
//!
//! `cargo bench --bench memory` runs 100 `commands` and 50 `relay` connections (more and the
//! kernel's own socket memory, up to megabytes per connection here, nears its limits and changes
//! how the flood stalls); without
//! `--bench` (as `cargo test --all-targets` runs it, in a debug build) 50 and 10, to check the
//! mechanics, not to measure.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tarmac::config::{AnnounceClient, Config};

/// What this bench shares with the others: whole files of `bench/support/`, only those whose
/// every item it uses (see `bench/support/README.md`).
mod support {
    pub mod hold;
    pub mod run;
    pub mod server;
}

use support::hold::{self, ClientProcess, IO_TIMEOUT, OPEN_DEADLINE};
use support::run::Run;
use support::server;

/// Set (to `commands` or `relay`) in a phase process's environment.
const PHASE_ENV: &str = "TARMAC_BENCH_MEMORY_PHASE";

/// Set (to `commands` or `relay`) in the client process's environment.
const CLIENT_ENV: &str = "TARMAC_BENCH_MEMORY_CLIENTS";

/// Worker threads.
const WORKERS: usize = 2;

/// Idle connections opened and closed before the baseline, so first-use costs (allocator
/// arenas, the slab, the timer heap) are not counted per connection. Idle ones, so the warm-up
/// frees little that the measured connections could reuse.
const WARM_UP: usize = 100;

/// DESIGN.md §6.1's targets, bytes per connection.
const TARGET_COMMANDS: f64 = 16.0 * 1024.0;
const TARGET_RELAY: f64 = 160.0 * 1024.0;

/// A flood has stalled when, over this long, the client sockets took less than [`TRICKLE`]
/// (commands) or [`BODY_TRICKLE`] (a body) bytes per connection: long against a worker turn over every connection, so a server that
/// is merely busy is not taken for one that stopped reading.
const SETTLE: Duration = Duration::from_secs(2);

/// Bytes per connection per [`SETTLE`] below which a flood of commands counts as stalled:
/// 8 KiB/s, far below what tarmac answers per connection when nothing holds it back (a higher
/// figure took a server busy answering NOOPs for a stalled one).
const TRICKLE: u64 = 16 * 1024;

/// The same for a body: 128 KiB/s. Relaying costs tarmac little CPU, while a downstream
/// socket that is never read still takes about 100 KB/s now and then on this machine's
/// loopback (the kernel packing its receive queue), for minutes; tarmac's buffers are at their
/// caps all the while, which is what is measured.
const BODY_TRICKLE: u64 = 256 * 1024;

/// Longest a flood may take to stall before the bench fails.
const STALL_DEADLINE: Duration = Duration::from_secs(120);

/// Send buffer the child asks for on each client socket: small, so the kernel holds little of
/// the flood on the client's side. (The kernel's share is not RSS and not counted; it only
/// makes the flood longer.) (The downstream keeps the default receive buffer: a tiny
/// one makes the kernel trickle data into it for minutes as it packs its queue.)
const SMALL_SOCKET_BUFFER: usize = 4096;

/// Source addresses 127.0.0.1 to 127.0.0.SOURCES, so the per-IP cap and ephemeral ports are
/// no limit.
const SOURCES: usize = 250;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Commands,
    Relay,
}

impl Kind {
    fn parse(name: &str) -> Kind {
        match name {
            "commands" => Kind::Commands,
            "relay" => Kind::Relay,
            other => panic!("unknown scenario {other:?}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Commands => "commands",
            Kind::Relay => "relay",
        }
    }
}

fn main() {
    if let Ok(kind) = std::env::var(CLIENT_ENV) {
        return client_process(Kind::parse(&kind));
    }
    let run = Run::from_args();
    if let Ok(kind) = std::env::var(PHASE_ENV) {
        return phase(Kind::parse(&kind), &run);
    }
    for kind in [Kind::Commands, Kind::Relay] {
        let status = Command::new(std::env::current_exe().expect("own path"))
            .args(std::env::args().skip(1))
            .env(PHASE_ENV, kind.name())
            .status()
            .expect("phase process starts");
        assert!(status.success(), "memory/{}: {status}", kind.name());
    }
}

/// One scenario in this (fresh) process: a server, a child with the clients (and, for
/// `relay`, the stalled downstream), RSS before and after.
fn phase(kind: Kind, run: &Run) {
    let note = run.note;
    let (wanted, target) = match (kind, run.full) {
        (Kind::Commands, true) => (100, TARGET_COMMANDS),
        (Kind::Commands, false) => (50, TARGET_COMMANDS),
        (Kind::Relay, true) => (50, TARGET_RELAY),
        (Kind::Relay, false) => (10, TARGET_RELAY),
    };
    let n = hold::fit_fd_limit("memory", wanted, WARM_UP);

    let mut clients = ClientProcess::start(CLIENT_ENV, kind.name().to_owned());
    let line = clients.expect("downstream", IO_TIMEOUT);
    let downstream: SocketAddr = line
        .split(' ')
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| clients.fail(&format!("bad line {line:?}")));
    let (server, addr) = server::start(config(kind, n, downstream));

    command(&mut clients, &format!("warm {addr} {WARM_UP}"));
    clients.expect("warm", OPEN_DEADLINE + IO_TIMEOUT);
    command(&mut clients, "close");
    clients.expect("closed", IO_TIMEOUT);

    let before = hold::rss_kb();
    let started = Instant::now();
    command(&mut clients, &format!("flood {addr} {n}"));
    let line = clients.expect("stalled", OPEN_DEADLINE + STALL_DEADLINE + IO_TIMEOUT);
    let after = hold::rss_kb();
    let written: u64 = line
        .split(' ')
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| clients.fail(&format!("bad line {line:?}")));

    let per_conn = hold::bytes_per_connection(before, after, n);
    let what = match kind {
        Kind::Commands => "clients pipelining NOOPs without reading a reply",
        Kind::Relay => "clients streaming a body to a downstream that stopped reading",
    };
    println!(
        "memory/{}: {per_conn:.0} bytes per connection ({n} {what}, workers={WORKERS}, \
         RSS before {before} KB, after {after} KB, {} KB written per client until stalled, \
         {:.1}s){note}",
        kind.name(),
        written / n as u64 / 1024,
        started.elapsed().as_secs_f64()
    );
    println!(
        "memory/{}-ratio: {:.2} of the target {:.0} KB: {}{note}",
        kind.name(),
        per_conn / target,
        target / 1024.0,
        if per_conn <= target { "PASS" } else { "FAIL" }
    );

    clients.close();
    server::stop(server);
}

/// Writes one command line to the child.
fn command(clients: &mut ClientProcess, line: &str) {
    let stdin = clients.stdin.as_mut().expect("child stdin");
    if let Err(e) = writeln!(stdin, "{line}").and_then(|()| stdin.flush()) {
        clients.fail(&format!("writing to the client process: {e}"));
    }
}

/// A loopback server with caps above `n` and the timeouts out of the way. For `commands`
/// the junk and error limits are lifted (see the module doc); for `relay` the downstream is
/// the child's, announced with nothing (it speaks no XCLIENT), and the size limit is out of
/// reach (past it tarmac would read and discard the body instead of holding it back).
fn config(kind: Kind, n: usize, downstream: SocketAddr) -> Config {
    let mut config = server::config("memory", WORKERS);
    config.server.max_connections = 2 * n + WARM_UP;
    config.limits.max_connections_per_ip = u32::try_from(n).expect("n fits u32");
    match kind {
        Kind::Commands => {
            config.limits.max_junk_commands = u32::MAX;
            config.limits.max_errors = u32::MAX;
        }
        Kind::Relay => {
            config.downstream.servers = vec![downstream];
            config.downstream.announce_client = AnnounceClient::None;
            config.limits.max_message_size = 1 << 40;
        }
    }
    config
}

// ---- the client process ----

/// The child: starts the stalled downstream (listening either way, so the parent always gets
/// an address), then runs the parent's commands from stdin: `warm ADDR N` opens N idle
/// connections, `close` closes them, `flood ADDR N` runs the scenario and says `stalled
/// BYTES` once no socket takes more. Ends at stdin's EOF.
fn client_process(kind: Kind) {
    let downstream = stalled_downstream();
    hold::say(&format!("downstream {downstream}"));
    let mut held: Vec<TcpStream> = Vec::new();
    let mut flooded: Vec<TcpStream> = Vec::new();
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["warm", addr, n] => {
                let (addr, n) = parse(addr, n);
                held = hold::open_all("memory", n, |i| {
                    let mut stream = connect(i, addr)?;
                    hold::read_banner(&mut stream).map_err(|e| e.to_string())?;
                    Ok(stream)
                });
                hold::say("warm");
            }
            ["close"] => {
                held.clear();
                hold::say("closed");
            }
            ["flood", addr, n] => {
                let (addr, n) = parse(addr, n);
                flooded = hold::open_all("memory", n, |i| start(kind, i, addr));
                let written = flood(kind, &flooded);
                hold::say(&format!("stalled {written}"));
            }
            _ => hold::child_fail("memory", &format!("unknown command {line:?}")),
        }
    }
    drop(flooded);
}

fn parse(addr: &str, n: &str) -> (SocketAddr, usize) {
    match (addr.parse(), n.parse()) {
        (Ok(addr), Ok(n)) => (addr, n),
        _ => hold::child_fail("memory", &format!("bad arguments {addr:?} {n:?}")),
    }
}

/// Connection `i` to `addr`, from 127.0.0.(1 + i % 250), with a small send buffer.
fn connect(i: usize, addr: SocketAddr) -> Result<TcpStream, String> {
    let source = Ipv4Addr::new(127, 0, 0, 1 + (i % SOURCES) as u8);
    hold::connect_from(source, addr)
        .and_then(|stream| {
            SockRef::from(&stream).set_send_buffer_size(SMALL_SOCKET_BUFFER)?;
            Ok(stream)
        })
        .map_err(|e| format!("connection {i} from {source}: {e}"))
}

/// Opens connection `i` and takes it to where the flood starts: after EHLO for `commands`
/// (its reply is never read), after the `354` for `relay`.
fn start(kind: Kind, i: usize, addr: SocketAddr) -> Result<TcpStream, String> {
    let mut stream = connect(i, addr)?;
    let fail = |e: io::Error| format!("connection {i}: {e}");
    hold::read_banner(&mut stream).map_err(fail)?;
    match kind {
        Kind::Commands => stream.write_all(b"EHLO client.bench\r\n").map_err(fail)?,
        Kind::Relay => {
            stream
                .write_all(
                    b"EHLO client.bench\r\nMAIL FROM:<a@bench.example>\r\n\
                      RCPT TO:<b@bench.example>\r\nDATA\r\n",
                )
                .map_err(fail)?;
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).map_err(fail)? == 0 {
                    return Err(format!("connection {i}: closed before 354"));
                }
                if line.starts_with("354") {
                    break;
                }
                if !line.starts_with('2') {
                    return Err(format!("connection {i}: {line:?} before 354"));
                }
            }
        }
    }
    stream.set_nonblocking(true).map_err(fail)?;
    Ok(stream)
}

/// Writes the scenario's stream (pipelined NOOPs, or body lines) to every connection, never
/// reading, until they take next to nothing (see [`SETTLE`]). Each connection keeps its place in the
/// pattern, so partial writes never cut a line in two. Returns the bytes written in all.
fn flood(kind: Kind, conns: &[TcpStream]) -> u64 {
    let pattern: Vec<u8> = match kind {
        Kind::Commands => b"NOOP\r\n".repeat(1024),
        Kind::Relay => [&[b'x'; 78][..], b"\r\n"].concat().repeat(100),
    };
    let mut offsets = vec![0usize; conns.len()];
    let mut written = 0u64;
    let deadline = Instant::now() + STALL_DEADLINE;
    let mut window = (Instant::now(), 0u64);
    loop {
        let mut moved = false;
        for (stream, offset) in conns.iter().zip(&mut offsets) {
            loop {
                let rest = pattern.get(*offset..).unwrap_or_default();
                match (&*stream).write(rest) {
                    Ok(n) => {
                        written += n as u64;
                        moved |= n > 0;
                        *offset = (*offset + n) % pattern.len();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => hold::child_fail("memory", &format!("flood write: {e}")),
                }
            }
        }
        let now = Instant::now();
        if now.duration_since(window.0) >= SETTLE {
            let trickle = match kind {
                Kind::Commands => TRICKLE,
                Kind::Relay => BODY_TRICKLE,
            };
            if written - window.1 < trickle * conns.len() as u64 {
                return written;
            }
            window = (now, written);
        }
        if now >= deadline {
            hold::child_fail(
                "memory",
                &format!("still writing after {STALL_DEADLINE:?} ({written} bytes)"),
            );
        }
        if !moved {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A downstream that answers the handshake, MAIL, RCPT and DATA, then never reads again: the
/// slow (stalled) downstream during a large body. A thread per connection.
fn stalled_downstream() -> SocketAddr {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .and_then(|socket| {
            socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
            socket.listen(1024)?;
            Ok(socket)
        })
        .unwrap_or_else(|e| hold::child_fail("memory", &format!("downstream listener: {e}")));
    let listener = TcpListener::from(socket);
    let addr = listener.local_addr().expect("listener address");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            thread::spawn(move || {
                // Errors end only this connection: tarmac closing it is no failure here.
                let _ = stall_after_354(stream);
            });
        }
    });
    addr
}

fn stall_after_354(stream: TcpStream) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    writer.write_all(b"220 downstream.bench ESMTP\r\n")?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250 downstream.bench\r\n",
            "DATA" => {
                writer.write_all(b"354 go ahead\r\n")?;
                break;
            }
            "QUIT" => return writer.write_all(b"221 bye\r\n"),
            _ => b"250 ok\r\n",
        };
        writer.write_all(reply)?;
    }
    // Never read again: hold the connection (both halves) until the process ends.
    let _held = (reader, writer);
    loop {
        thread::park();
    }
}
