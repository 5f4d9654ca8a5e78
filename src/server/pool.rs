//! `[downstream] mode = "multiplexing"`: this worker's pool of downstream connections
//! (DESIGN.md §1.5). A session that reaches MAIL takes an idle connection to its server if there
//! is one, opens a new one while the worker is under its share of `pool_size`, and otherwise
//! waits in line (its connect timeout still runs). When its transaction is over the session
//! hands the connection back, with no reply outstanding, for the next transaction of any
//! client, with what it carries (whom it was announced for, whether a transaction was left
//! open). The next user announces its own client (RSET first if needed, then XCLIENT) or, when
//! the downstream will not take another XCLIENT on it, closes it and opens a new one
//! (`downstream::dialog`), so no transaction ever runs under another client's identity.
//!
//! Each worker owns its pool, with `pool_size / workers` connections (at least one): moving
//! sockets between event loops would need locking on the relay path, and a fixed share keeps
//! the downstream's total at `pool_size` whatever the load.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use super::conn::write_last;
use super::slab::ConnKey;
use super::tls_stream::TlsStream;
use crate::downstream::dialog::Carried;

/// Longest a connection stays idle in the pool before it is closed rather than reused: well
/// under Postfix's `smtpd_timeout` (300 s), so a reused connection is not one the downstream is
/// about to drop.
const IDLE_MAX: Duration = Duration::from_secs(60);

/// A worker's downstream pool.
#[derive(Debug)]
pub(crate) struct Pool {
    /// Connections this worker may have open (idle or in use).
    cap: usize,
    /// Connections open now; each [`Ticket`] holds one.
    open: Arc<AtomicUsize>,
    idle: Vec<Idle>,
    /// Sessions waiting for a connection, in arrival order.
    waiting: VecDeque<(ConnKey, SocketAddr)>,
}

/// One open pooled connection; dropping it (with its connection) frees the place.
#[derive(Debug)]
pub(crate) struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An idle connection, past its banner and EHLO, with no reply outstanding.
#[derive(Debug)]
pub(crate) struct Idle {
    pub(crate) addr: SocketAddr,
    pub(crate) stream: TcpStream,
    /// The connection's TLS layer, when STARTTLS was done on it: it stays with the socket.
    pub(crate) tls: Option<Box<TlsStream>>,
    pub(crate) carried: Carried,
    pub(crate) ticket: Ticket,
    since: Instant,
}

impl Pool {
    /// A pool for one of `workers` workers sharing `pool_size` connections.
    pub(crate) fn new(pool_size: usize, workers: usize) -> Pool {
        Pool {
            cap: (pool_size / workers.max(1)).max(1),
            open: Arc::new(AtomicUsize::new(0)),
            idle: Vec::new(),
            waiting: VecDeque::new(),
        }
    }

    /// An idle connection to `addr` that is still alive, if any. Connections idle too long, or
    /// that the downstream closed or spoke on (a timeout notice) while idle, are closed.
    pub(crate) fn checkout(&mut self, addr: SocketAddr, now: Instant) -> Option<Idle> {
        self.prune(now);
        while let Some(at) = self.idle.iter().rposition(|idle| idle.addr == addr) {
            let idle = self.idle.swap_remove(at);
            if is_quiet(&idle.stream) {
                return Some(idle);
            }
            // Closed by the downstream, or it spoke unasked (a timeout notice): not reusable,
            // and no QUIT for a connection in an unknown state.
        }
        None
    }

    /// A place for a new connection, while under the cap.
    pub(crate) fn ticket(&mut self) -> Option<Ticket> {
        let open = self.open.load(Ordering::Acquire);
        if open >= self.cap {
            return None;
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        Some(Ticket(Arc::clone(&self.open)))
    }

    /// Takes back a clean connection (already deregistered from the poll).
    pub(crate) fn park(
        &mut self,
        addr: SocketAddr,
        stream: TcpStream,
        tls: Option<Box<TlsStream>>,
        carried: Carried,
        ticket: Ticket,
        now: Instant,
    ) {
        self.idle.push(Idle {
            addr,
            stream,
            tls,
            carried,
            ticket,
            since: now,
        });
    }

    /// `key` waits for a connection to `addr`.
    pub(crate) fn wait(&mut self, key: ConnKey, addr: SocketAddr) {
        self.waiting.push_back((key, addr));
    }

    /// The first waiting session that can be served now (an idle connection to its server, or
    /// room for a new one). The caller checks the session still waits: a waiter that timed out
    /// or went away stays in line until it comes up here.
    pub(crate) fn next_waiter(&mut self, now: Instant) -> Option<(ConnKey, SocketAddr)> {
        self.prune(now);
        let room = self.open.load(Ordering::Acquire) < self.cap;
        let (key, addr) = *self.waiting.front()?;
        if room || self.idle.iter().any(|idle| idle.addr == addr) {
            self.waiting.pop_front();
            return Some((key, addr));
        }
        None
    }

    /// Whether sessions wait for a connection.
    pub(crate) fn has_waiters(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Closes idle connections past [`IDLE_MAX`], saying QUIT.
    fn prune(&mut self, now: Instant) {
        let (keep, old): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut self.idle)
            .into_iter()
            .partition(|idle| now.saturating_duration_since(idle.since) < IDLE_MAX);
        self.idle = keep;
        for mut idle in old {
            say_quit(&idle.stream, idle.tls.as_deref_mut());
        }
    }
}

impl Drop for Pool {
    /// The worker is stopping: idle connections say QUIT.
    fn drop(&mut self) {
        for mut idle in self.idle.drain(..) {
            say_quit(&idle.stream, idle.tls.as_deref_mut());
        }
    }
}

/// Says QUIT on a connection tarmac is about to drop (one nonblocking write, best effort; over
/// TLS followed by `close_notify`), so the downstream logs a clean end rather than a lost
/// connection (DESIGN.md §6).
pub(crate) fn say_quit(stream: &TcpStream, tls: Option<&mut TlsStream>) {
    write_last(stream, tls, &mut b"QUIT\r\n".to_vec());
}

/// Whether an idle connection has nothing to say: reading finds no data and no end.
fn is_quiet(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    match (&*stream).read(&mut probe) {
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        // Its end (0) or unasked-for bytes (any count): either way, not reusable.
        Ok(_n) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_capped_per_worker_and_freed_on_drop() {
        let mut pool = Pool::new(3, 2);
        let a = pool.ticket().unwrap();
        assert!(pool.ticket().is_none(), "3 / 2 workers = 1 each");
        drop(a);
        assert!(pool.ticket().is_some());
        let mut tiny = Pool::new(1, 4);
        assert!(tiny.ticket().is_some(), "at least one per worker");
    }

    #[test]
    fn idle_connections_are_reused_only_while_alive_and_fresh() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connect = || {
            let stream = std::net::TcpStream::connect(addr).unwrap();
            let (peer, _) = listener.accept().unwrap();
            (stream, peer)
        };
        // Nonblocking, as the pool gets them; with `arrived`, only once the peer's FIN or
        // bytes are there: a blocking peek returns when they arrive (and leaves them unread).
        let pooled = |stream: std::net::TcpStream, arrived: bool| {
            if arrived {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                stream
                    .peek(&mut [0u8; 1])
                    .expect("the FIN or the bytes arrive");
            }
            stream.set_nonblocking(true).unwrap();
            TcpStream::from_std(stream)
        };
        let mut pool = Pool::new(4, 1);
        let now = Instant::now();
        let (alive, _alive_peer) = connect();
        let (closed, closed_peer) = connect();
        drop(closed_peer);
        let (chatty, mut chatty_peer) = connect();
        std::io::Write::write_all(&mut chatty_peer, b"421 4.4.2 timeout\r\n").unwrap();
        let (alive, closed, chatty) = (
            pooled(alive, false),
            pooled(closed, true),
            pooled(chatty, true),
        );
        for stream in [alive, closed, chatty] {
            let ticket = pool.ticket().unwrap();
            pool.park(addr, stream, None, Carried::default(), ticket, now);
        }
        assert_eq!(pool.open.load(Ordering::Acquire), 3);
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(pool.checkout(other, now).is_none());
        let reused = pool.checkout(addr, now).expect("the live one");
        assert!(
            pool.checkout(addr, now).is_none(),
            "the dead ones were closed"
        );
        drop(reused);
        assert_eq!(pool.open.load(Ordering::Acquire), 0);

        let (fresh, _peer) = connect();
        let fresh = pooled(fresh, false);
        let ticket = pool.ticket().unwrap();
        pool.park(addr, fresh, None, Carried::default(), ticket, now);
        assert!(pool.checkout(addr, now + IDLE_MAX).is_none(), "too old");
    }

    #[test]
    fn waiters_are_served_in_order_when_a_place_frees() {
        let mut pool = Pool::new(1, 1);
        let held = pool.ticket().unwrap();
        let addr: SocketAddr = "127.0.0.1:10025".parse().unwrap();
        let (a, b) = (
            ConnKey {
                slot: 1,
                generation: 1,
            },
            ConnKey {
                slot: 2,
                generation: 1,
            },
        );
        pool.wait(a, addr);
        pool.wait(b, addr);
        let now = Instant::now();
        assert_eq!(pool.next_waiter(now), None, "no room, nothing idle");
        drop(held);
        assert_eq!(pool.next_waiter(now), Some((a, addr)));
        assert!(pool.has_waiters());
    }
}
