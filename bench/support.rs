//! What the benches share: for those that hold many connections (`idle`, `tarpit`) reading this
//! process's RSS, fitting the connection count to the open-files limit, connecting from a
//! chosen loopback source address and a bounded server stop; for every bench that starts a
//! server, its state directory. Included with `#[path]`, one copy per bench.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tarmac::server::ServerHandle;

/// File descriptors each process needs besides the connections (std streams, epoll, the
/// listeners, DNS sockets, /proc reads), with room to spare.
pub const FD_RESERVE: usize = 256;

/// Longest one connect or read may take in a client.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest the opening of all connections may take before the bench fails.
pub const OPEN_DEADLINE: Duration = Duration::from_secs(60);

/// Longest the child and the server may take to finish at the end.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// `bench`'s state directory under cargo's scratch directory, emptied: a bench never writes
/// the real /var/lib/tarmac, and state left by an earlier run (PASS entries, reputation) must
/// not change this run's figures.
pub fn state_dir(bench: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{bench}-state"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

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

/// `wanted`, or fewer if the open-files soft limit cannot hold that many connections plus
/// `extra` more (warm-up connections) and [`FD_RESERVE`]; says so on a `<bench>/note:` line.
pub fn fit_fd_limit(bench: &str, wanted: usize, extra: usize) -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(usize::MAX); // "unlimited"
    let room = soft.saturating_sub(FD_RESERVE + extra);
    if room < wanted {
        println!(
            "{bench}/note: open-files soft limit is {soft}: holding {room} connections instead \
             of {wanted} (raise it with `ulimit -n`)"
        );
        return room;
    }
    wanted
}

/// A TCP connection to `addr` from the loopback address `source` (any of 127.0.0.0/8), so
/// per-address caps and ephemeral ports are no limit; connect and reads bounded by `timeout`.
pub fn connect_from(
    source: Ipv4Addr,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())?;
    socket.connect_timeout(&addr.into(), timeout)?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(timeout))?;
    Ok(stream)
}

/// Shuts the server down and waits for it, at most `deadline`.
pub fn stop(server: ServerHandle, deadline: Duration) {
    server.shutdown();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(server.join());
    });
    match rx.recv_timeout(deadline) {
        Ok(result) => result.expect("tarmac stops cleanly"),
        Err(_) => panic!("tarmac did not stop within {deadline:?}"),
    }
}
