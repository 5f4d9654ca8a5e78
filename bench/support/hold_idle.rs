//! Children that open their connections, say `ready N` and then hold them idle until their
//! stdin closes, spread over the loopback addresses 127.0.0.1–250 (`idle`, `tls`). Built on
//! `hold.rs`, which the bench includes beside it; the `tarpit` bench's child takes commands and
//! picks addresses its DNSBL lists, so none of this is its.

use std::io::Read;
use std::net::Ipv4Addr;

use super::hold::{ClientProcess, IO_TIMEOUT, OPEN_DEADLINE, say};

/// Source addresses 127.0.0.1 to 127.0.0.SOURCES the connections are spread over, so the per-IP
/// cap and ephemeral ports are no issue.
const SOURCES: usize = 250;

/// The source address of connection `i`: 127.0.0.1 to 127.0.0.250 in turn.
pub fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 1 + (i % SOURCES) as u8)
}

/// The parent's side: starts the child with `spec` in `env` and waits until it holds all `n`
/// connections it was asked for.
pub fn start(env: &str, spec: String, n: usize) -> ClientProcess {
    let mut clients = ClientProcess::start(env, spec);
    let line = clients.expect("ready", OPEN_DEADLINE + IO_TIMEOUT);
    if line != format!("ready {n}") {
        clients.fail(&format!("client process said {line:?}, not \"ready {n}\""));
    }
    clients
}

/// The child's side, once its `n` connections are open: says `ready N` and holds them until the
/// parent closes our stdin (or dies).
pub fn ready(n: usize) {
    say(&format!("ready {n}"));
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}
