//! Holding many connections to tarmac from a child process, for the benches that measure what
//! each held connection costs the server (`idle`, `tarpit`, `tls`).
//!
//! The clients run in a child process (the bench's own binary, re-executed with its spec in an
//! environment variable), so their sockets and buffers do not count against the server's RSS
//! and each process stays under the open-files limit. The child opens its connections from
//! chosen loopback source addresses (so per-IP caps and ephemeral ports are no limit), says
//! what it did on stdout one line at a time, and exits when its stdin closes. The parent reads
//! its own RSS before and after, and [`bytes_per_connection`] is the growth ÷ N.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// File descriptors each process needs besides the connections (std streams, epoll, the
/// listeners, DNS sockets, /proc reads), with room to spare.
const FD_RESERVE: usize = 256;

/// Longest one connect, read or write may take in a client.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest the opening of all connections may take before the bench fails.
pub const OPEN_DEADLINE: Duration = Duration::from_secs(60);

/// Longest the child may take to exit once its stdin closed.
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

/// VmRSS of this process, in KB.
pub fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// RSS growth from `before_kb` to `after_kb` while `n` connections opened, in bytes per
/// connection. A shrink counts as none.
pub fn bytes_per_connection(before_kb: u64, after_kb: u64, n: usize) -> f64 {
    (after_kb.saturating_sub(before_kb) * 1024) as f64 / n as f64
}

/// `wanted`, or fewer if the server in this process could not hold that many connections plus
/// `extra` more (warm-up connections) unstressed; says so on a `<bench>/note:` line. The server
/// caps `max_connections` at what the open-files limit holds at two descriptors a connection
/// (client and downstream) after its reserve, and enters stress mode at 80 % of that cap, which
/// shortens tarpits and greet pauses: a bench stays under three quarters of it.
pub fn fit_fd_limit(bench: &str, wanted: usize, extra: usize) -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(usize::MAX); // "unlimited"
    let room = (soft.saturating_sub(FD_RESERVE) / 2 * 3 / 4).saturating_sub(extra);
    if room < wanted {
        println!(
            "{bench}/note: open-files soft limit is {soft}: holding {room} connections instead \
             of {wanted}, under three quarters of the server's cap at two descriptors a \
             connection (raise the limit with `ulimit -n`)"
        );
        return room;
    }
    wanted
}

/// A TCP connection to `addr` from the loopback address `source` (any of 127.0.0.0/8); the
/// connect, reads and writes bounded by [`IO_TIMEOUT`].
pub fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())?;
    socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Reads the server's banner, a single `220 ` line, whole: proof the server accepted the
/// connection and built its session. Nothing follows it before the client speaks, so no byte
/// after the line is taken.
pub fn read_banner(stream: &mut TcpStream) -> io::Result<()> {
    let mut banner = Vec::new();
    let mut chunk = [0u8; 256];
    while !banner.ends_with(b"\r\n") && banner.len() < 512 {
        let got = stream.read(&mut chunk)?;
        if got == 0 {
            return Err(io::Error::other(format!(
                "closed before the banner; got {:?}",
                String::from_utf8_lossy(&banner)
            )));
        }
        banner.extend_from_slice(chunk.get(..got).unwrap_or_default());
    }
    if !banner.starts_with(b"220 ") {
        return Err(io::Error::other(format!(
            "expected a 220 banner, got {:?}",
            String::from_utf8_lossy(&banner)
        )));
    }
    Ok(())
}

/// The parent's side: a child process holding connections to the server.
pub struct ClientProcess {
    child: Child,
    /// The child's stdin: commands, for a child that takes them. Closing it ends the child.
    pub stdin: Option<ChildStdin>,
    /// Lines the child printed; the reader thread ends at the child's EOF.
    lines: mpsc::Receiver<String>,
}

impl ClientProcess {
    /// Runs this binary again with `spec` in the environment variable `env`, which makes it
    /// the child; its stderr is ours, so its errors show above the parent's.
    pub fn start(env: &str, spec: String) -> ClientProcess {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .env(env, spec)
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
        ClientProcess {
            child,
            stdin,
            lines,
        }
    }

    /// The child's next line, which must start with the word `word`. The child has its own
    /// deadlines; `within` also covers a child that hangs.
    pub fn expect(&mut self, word: &str, within: Duration) -> String {
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

    /// Closes the child's stdin, which makes it close its connections and exit, and waits for
    /// it, at most [`EXIT_DEADLINE`].
    pub fn close(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + EXIT_DEADLINE;
        loop {
            match self.child.try_wait().expect("wait for client process") {
                Some(status) if status.success() => return,
                Some(status) => self.fail(&format!("client process failed: {status}")),
                None if Instant::now() >= deadline => {
                    self.fail("client process did not exit after its stdin closed")
                }
                None => thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Kills the child (so it does not outlive a failed bench) and fails with `why`.
    pub fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("{why}");
    }
}

/// The child's side: opens `n` connections, `open(i)` each, within [`OPEN_DEADLINE`] from now.
/// The first error, or the deadline passing, fails the child.
pub fn open_all<T>(
    bench: &str,
    n: usize,
    mut open: impl FnMut(usize) -> Result<T, String>,
) -> Vec<T> {
    let deadline = Instant::now() + OPEN_DEADLINE;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        if Instant::now() >= deadline {
            child_fail(
                bench,
                &format!("only {i} of {n} connections open after {OPEN_DEADLINE:?}"),
            );
        }
        match open(i) {
            Ok(conn) => conns.push(conn),
            Err(why) => child_fail(bench, &why),
        }
    }
    conns
}

/// The child's side: a line to the parent on stdout; a parent that went away ends the child.
pub fn say(line: &str) {
    let mut stdout = io::stdout().lock();
    if writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(1); // the parent is gone
    }
}

/// The child's side: `why` on stderr and a failing exit status, which the parent reports.
pub fn child_fail(bench: &str, why: &str) -> ! {
    eprintln!("{bench} bench client: {why}");
    std::process::exit(1);
}
