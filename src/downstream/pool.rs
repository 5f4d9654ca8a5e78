//! `[downstream] mode = "multiplexing"`: a worker's pool of downstream connections
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
//!
//! The pool is bookkeeping: it holds idle connections of whatever type the runtime gives it (the
//! server's downstream legs), each a [`Pooled`], and the keys of the sessions waiting in line.
//! Its only I/O is through [`Pooled`]: a probe at checkout and a QUIT when it closes one.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::downstream::dialog::Carried;

/// Longest a connection stays idle in the pool before it is closed rather than reused: well
/// under Postfix's `smtpd_timeout` (300 s), so a reused connection is not one the downstream is
/// about to drop.
const IDLE_MAX: Duration = Duration::from_secs(60);

/// What the pool needs of an idle connection.
pub(crate) trait Pooled {
    /// Whether the connection has nothing to say: reading finds no data and no end. One that
    /// the downstream closed, or spoke on unasked (a timeout notice), is not reusable.
    fn is_quiet(&mut self) -> bool;

    /// Says QUIT on a connection about to be dropped (one nonblocking write, best effort; over
    /// TLS followed by `close_notify`), so the downstream logs a clean end rather than a lost
    /// connection (DESIGN.md §6).
    fn say_quit(&mut self);
}

/// A worker's downstream pool of idle connections `C`, with sessions named by `K` in line.
#[derive(Debug)]
pub(crate) struct Pool<C: Pooled, K> {
    /// Connections this worker may have open (idle or in use).
    cap: usize,
    /// Connections open now; each [`Ticket`] holds one.
    open: Arc<AtomicUsize>,
    idle: Vec<Idle<C>>,
    /// Sessions waiting for a connection, in arrival order.
    waiting: VecDeque<(K, SocketAddr)>,
}

/// One open pooled connection; dropping it (with its connection) frees the place.
#[derive(Debug)]
pub(crate) struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a session asking for a connection gets ([`Pool::take`]).
#[derive(Debug)]
pub(crate) enum Take<C> {
    /// An idle connection to its server, alive when last probed.
    Reuse(Idle<C>),
    /// A place for a new connection: the pool was under its cap.
    Open(Ticket),
    /// A place in line: [`Pool::next_waiter`] names the session when its turn comes.
    Wait,
}

/// An idle connection, past its banner and EHLO, with no reply outstanding.
#[derive(Debug)]
pub(crate) struct Idle<C> {
    pub(crate) addr: SocketAddr,
    /// The connection, with its TLS layer when STARTTLS was done on it.
    pub(crate) conn: C,
    pub(crate) carried: Carried,
    pub(crate) ticket: Ticket,
    since: Instant,
}

impl<C: Pooled, K: Copy> Pool<C, K> {
    /// A pool for one of `workers` workers sharing `pool_size` connections.
    pub(crate) fn new(pool_size: usize, workers: usize) -> Pool<C, K> {
        Pool {
            cap: (pool_size / workers.max(1)).max(1),
            open: Arc::new(AtomicUsize::new(0)),
            idle: Vec::new(),
            waiting: VecDeque::new(),
        }
    }

    /// A connection to `addr` for session `key`: an idle one when `reuse` allows (a session that
    /// never held one may reuse one), else a place for a new one while under the cap (at the
    /// cap, an idle connection to another server is closed to make one: with several servers,
    /// idle connections to one must not keep the others waiting), else a place in line.
    pub(crate) fn take(&mut self, key: K, addr: SocketAddr, reuse: bool, now: Instant) -> Take<C> {
        if reuse && let Some(idle) = self.checkout(addr, now) {
            return Take::Reuse(idle);
        }
        if let Some(ticket) = self.ticket() {
            return Take::Open(ticket);
        }
        if self.evict_other(addr)
            && let Some(ticket) = self.ticket()
        {
            return Take::Open(ticket);
        }
        self.wait(key, addr);
        Take::Wait
    }

    /// An idle connection to `addr` that is still alive, if any. Connections idle too long, or
    /// that the downstream closed or spoke on (a timeout notice) while idle, are closed.
    fn checkout(&mut self, addr: SocketAddr, now: Instant) -> Option<Idle<C>> {
        self.prune(now);
        while let Some(at) = self.idle.iter().rposition(|idle| idle.addr == addr) {
            let mut idle = self.idle.swap_remove(at);
            if idle.conn.is_quiet() {
                return Some(idle);
            }
            // Closed by the downstream, or it spoke unasked (a timeout notice): not reusable,
            // and no QUIT for a connection in an unknown state.
        }
        None
    }

    /// Closes the idle connection to a server other than `addr` that has been idle longest
    /// (saying QUIT), freeing its place. Whether there was one.
    fn evict_other(&mut self, addr: SocketAddr) -> bool {
        let oldest = self
            .idle
            .iter()
            .enumerate()
            .filter(|(_, idle)| idle.addr != addr)
            .min_by_key(|(_, idle)| idle.since)
            .map(|(at, _)| at);
        let Some(at) = oldest else {
            return false;
        };
        let mut idle = self.idle.swap_remove(at);
        idle.conn.say_quit();
        true
    }

    /// A place for a new connection, while under the cap.
    fn ticket(&mut self) -> Option<Ticket> {
        let open = self.open.load(Ordering::Acquire);
        if open >= self.cap {
            return None;
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        Some(Ticket(Arc::clone(&self.open)))
    }

    /// Takes back a clean connection (already out of the poll set).
    pub(crate) fn park(
        &mut self,
        addr: SocketAddr,
        conn: C,
        carried: Carried,
        ticket: Ticket,
        now: Instant,
    ) {
        self.idle.push(Idle {
            addr,
            conn,
            carried,
            ticket,
            since: now,
        });
    }

    /// `key` waits for a connection to `addr`.
    fn wait(&mut self, key: K, addr: SocketAddr) {
        self.waiting.push_back((key, addr));
    }

    /// The first waiting session that can be served now (an idle connection to its server, or
    /// room for a new one). The caller checks the session still waits: a waiter that timed out
    /// or went away stays in line until it comes up here.
    pub(crate) fn next_waiter(&mut self, now: Instant) -> Option<(K, SocketAddr)> {
        self.prune(now);
        let room = self.open.load(Ordering::Acquire) < self.cap;
        let (key, addr) = *self.waiting.front()?;
        // Any idle connection will do: one to its server is reused, another closed for room.
        if room || !self.idle.is_empty() {
            self.waiting.pop_front();
            return Some((key, addr));
        }
        None
    }

    /// Whether sessions wait for a connection.
    pub(crate) fn has_waiters(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// For metrics: connections open (idle or in use), idle among them, and places in line
    /// (a waiter that gave up keeps its place until its turn comes, so this can run high).
    pub(crate) fn figures(&self) -> (usize, usize, usize) {
        (
            self.open.load(Ordering::Relaxed),
            self.idle.len(),
            self.waiting.len(),
        )
    }

    /// Closes idle connections past [`IDLE_MAX`], saying QUIT.
    fn prune(&mut self, now: Instant) {
        let (keep, old): (Vec<Idle<C>>, Vec<Idle<C>>) = std::mem::take(&mut self.idle)
            .into_iter()
            .partition(|idle| now.saturating_duration_since(idle.since) < IDLE_MAX);
        self.idle = keep;
        for mut idle in old {
            idle.conn.say_quit();
        }
    }
}

impl<C: Pooled, K> Drop for Pool<C, K> {
    /// The worker is stopping: idle connections say QUIT.
    fn drop(&mut self) {
        for mut idle in self.idle.drain(..) {
            idle.conn.say_quit();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;

    /// An idle connection whose probe answers `quiet`, counting the QUITs said on it.
    #[derive(Debug)]
    struct Fake {
        quiet: bool,
        quits: Rc<Cell<u32>>,
    }

    impl Pooled for Fake {
        fn is_quiet(&mut self) -> bool {
            self.quiet
        }

        fn say_quit(&mut self) {
            self.quits.set(self.quits.get() + 1);
        }
    }

    #[test]
    fn tickets_are_capped_per_worker_and_freed_on_drop() {
        let mut pool: Pool<Fake, u32> = Pool::new(3, 2);
        let a = pool.ticket().unwrap();
        assert!(pool.ticket().is_none(), "3 / 2 workers = 1 each");
        drop(a);
        assert!(pool.ticket().is_some());
        let mut tiny: Pool<Fake, u32> = Pool::new(1, 4);
        assert!(tiny.ticket().is_some(), "at least one per worker");
    }

    #[test]
    fn idle_connections_are_reused_only_while_quiet_and_fresh() {
        let quits = Rc::new(Cell::new(0));
        let fake = |quiet| Fake {
            quiet,
            quits: Rc::clone(&quits),
        };
        let addr: SocketAddr = "127.0.0.1:10025".parse().unwrap();
        let mut pool: Pool<Fake, u32> = Pool::new(4, 1);
        let now = Instant::now();
        // Checked out last parked first: the two that spoke or closed come up before the live one.
        for quiet in [true, false, false] {
            let ticket = pool.ticket().unwrap();
            pool.park(addr, fake(quiet), Carried::default(), ticket, now);
        }
        assert_eq!(pool.open.load(Ordering::Acquire), 3);
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(pool.checkout(other, now).is_none());
        let reused = pool.checkout(addr, now).expect("the live one");
        assert!(reused.conn.quiet);
        assert!(
            pool.checkout(addr, now).is_none(),
            "the dead ones were closed"
        );
        assert_eq!(
            quits.get(),
            0,
            "no QUIT on a connection in an unknown state"
        );
        drop(reused);
        assert_eq!(pool.open.load(Ordering::Acquire), 0);

        let ticket = pool.ticket().unwrap();
        pool.park(addr, fake(true), Carried::default(), ticket, now);
        assert!(pool.checkout(addr, now + IDLE_MAX).is_none(), "too old");
        assert_eq!(quits.get(), 1, "the old one said QUIT");
        let ticket = pool.ticket().unwrap();
        pool.park(addr, fake(true), Carried::default(), ticket, now);
        drop(pool);
        assert_eq!(quits.get(), 2, "a stopping worker's idle ones say QUIT");
    }

    #[test]
    fn waiters_are_served_in_order_when_a_place_frees() {
        let mut pool: Pool<Fake, u32> = Pool::new(1, 1);
        let held = pool.ticket().unwrap();
        let addr: SocketAddr = "127.0.0.1:10025".parse().unwrap();
        pool.wait(1, addr);
        pool.wait(2, addr);
        let now = Instant::now();
        assert_eq!(pool.next_waiter(now), None, "no room, nothing idle");
        drop(held);
        assert_eq!(pool.next_waiter(now), Some((1, addr)));
        assert!(pool.has_waiters());
    }

    #[test]
    fn idle_connections_to_another_server_make_room_at_the_cap() {
        let quits = Rc::new(Cell::new(0));
        let idle = || Fake {
            quiet: true,
            quits: Rc::clone(&quits),
        };
        let a: SocketAddr = "127.0.0.1:10025".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:10026".parse().unwrap();
        let now = Instant::now();
        let mut pool: Pool<Fake, u32> = Pool::new(2, 1);
        for at in [now, now + Duration::from_secs(1)] {
            let Take::Open(ticket) = pool.take(1, a, false, at) else {
                panic!("a place under the cap");
            };
            pool.park(a, idle(), Carried::default(), ticket, at);
        }
        // At the cap with two idle connections to `a`: a session for `b` gets a place.
        let later = now + Duration::from_secs(2);
        let Take::Open(held) = pool.take(2, b, true, later) else {
            panic!("room made for b");
        };
        assert_eq!(quits.get(), 1, "the older idle connection to a said QUIT");
        assert_eq!(pool.open.load(Ordering::Acquire), 2, "never over the cap");
        // The last idle one goes the same way; then the line.
        let Take::Open(_second) = pool.take(3, b, true, later) else {
            panic!("room made again");
        };
        assert!(matches!(pool.take(4, b, true, later), Take::Wait));
        assert_eq!(pool.next_waiter(later), None, "nothing idle, no room");
        drop(held);
        assert_eq!(pool.next_waiter(later), Some((4, b)));
        assert_eq!(quits.get(), 2);
    }

    #[test]
    fn a_session_reuses_then_opens_then_waits() {
        let addr: SocketAddr = "127.0.0.1:10025".parse().unwrap();
        let quits = Rc::new(Cell::new(0));
        let idle = || Fake {
            quiet: true,
            quits: Rc::clone(&quits),
        };
        let now = Instant::now();
        let mut pool: Pool<Fake, u32> = Pool::new(2, 1);
        // Under the cap, nothing idle: a new connection.
        let Take::Open(first) = pool.take(1, addr, true, now) else {
            panic!("a place under the cap");
        };
        pool.park(addr, idle(), Carried::default(), first, now);
        // (reuse allowed) → what the session gets, with one idle connection and a free place
        let table = [(true, "reuse"), (false, "open")];
        for (reuse, expected) in table {
            let got = match pool.take(2, addr, reuse, now) {
                Take::Reuse(idle) => {
                    pool.park(addr, idle.conn, idle.carried, idle.ticket, now);
                    "reuse"
                }
                Take::Open(_) => "open",
                Take::Wait => "wait",
            };
            assert_eq!(got, expected, "reuse {reuse}");
            assert!(!pool.has_waiters(), "reuse {reuse}");
        }
        // The cap held by an open connection and the idle one: a session that may not reuse
        // waits in line.
        let Take::Open(_held) = pool.take(3, addr, false, now) else {
            panic!("the second place");
        };
        assert!(matches!(pool.take(4, addr, false, now), Take::Wait));
        assert!(pool.has_waiters());
        assert_eq!(
            pool.next_waiter(now),
            Some((4, addr)),
            "an idle one is there"
        );
        assert_eq!(quits.get(), 0);
    }
}
