//! What the benches that hold many connections share (`idle`, `tarpit`): reading this process's
//! RSS, fitting the connection count to the open-files limit, connecting from a chosen loopback
//! source address, and a bounded server stop. Included with `#[path]`, one copy per bench.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tarmac::server::ServerHandle;

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
/// `reserved` other descriptors; says so on a `<bench>/note:` line.
pub fn fit_fd_limit(bench: &str, wanted: usize, reserved: usize) -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(usize::MAX); // "unlimited"
    let room = soft.saturating_sub(reserved);
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
