//! Downstream health and balance (DESIGN.md §8): which server a new downstream connection goes
//! to, and which servers are down. A server is marked down after `down_after` consecutive
//! failures (a failed connect, a connect or banner timeout, a `421` banner), skipped while down,
//! and given one probe connection after `retry_after`; a probe that fails puts the next one off
//! twice as long, up to [`MAX_RETRY_AFTER`]. Any banner that is not `421` counts as a success
//! and marks the server up again. One log line when a server goes down, one when it is back.
//!
//! One table serves every worker (the server shares it, `server::shared`), so the first
//! clients that find a server down spare all the others the wait. It is memory, not I/O: the
//! relay (`downstream::relay`) asks it and tells it what happened, with the time it was given,
//! so the decisions are tested here on invented time. While no server has a failure on record
//! (the usual case) neither a choice nor a success takes the lock.
//!
//! A session's connection attempts follow one order: `balance = "failover"` starts at the first
//! server, `"round-robin"` at the next healthy one in turn, and a failure moves on along
//! `servers` (wrapping round) to the next server not down. A down server whose probe is due is
//! taken first, whatever the order, so that round-robin probes too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Balance, Downstream, MAX_RETRY_AFTER};

/// The health of every downstream server tarmac has spoken to, shared by the workers.
#[derive(Debug, Default)]
pub struct Health {
    /// Whether any server has a failure on record; while not, nothing needs the lock.
    troubled: AtomicBool,
    servers: Mutex<HashMap<SocketAddr, Record>>,
    /// Round-robin: the turn of the next session's first choice.
    turn: AtomicUsize,
}

/// One server's record.
#[derive(Clone, Copy, Debug, Default)]
struct Record {
    /// Consecutive failures since its last success.
    failures: u32,
    down: Option<Down>,
}

/// A server marked down.
#[derive(Clone, Copy, Debug)]
struct Down {
    /// When the next probe connection may go to it.
    probe_at: Instant,
    /// The wait before the probe after that one.
    backoff: Duration,
}

/// Where a session's connection attempts stand in its order over `servers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    /// Index of the server the order starts with.
    first: usize,
    /// Steps along the order already taken (the next attempt looks from there on).
    next: usize,
}

impl Route {
    /// The order of `balance = "failover"` without a health table: the servers as listed.
    pub(crate) fn in_order() -> Route {
        Route { first: 0, next: 0 }
    }

    /// The next server along the order over `n` servers, or `None` once each was tried.
    pub(crate) fn advance(&mut self, n: usize) -> Option<usize> {
        if self.next >= n {
            return None;
        }
        let server = (self.first + self.next) % n;
        self.next += 1;
        Some(server)
    }
}

/// A server chosen for a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pick {
    /// Index into `servers`.
    pub(crate) server: usize,
    /// The connection is the down server's probe: a new one, never a pooled one.
    pub(crate) probe: bool,
}

impl Health {
    /// An empty table: every server up.
    pub fn new() -> Health {
        Health::default()
    }

    /// Where a new session's order over `config.servers` starts: the first server for
    /// failover, the next healthy one in turn for round-robin.
    pub(crate) fn route(&self, config: &Downstream) -> Route {
        let n = config.servers.len().max(1);
        let first = match config.balance {
            Balance::Failover => 0,
            Balance::RoundRobin => {
                let turn = self.turn.fetch_add(1, Ordering::Relaxed);
                if self.troubled.load(Ordering::Acquire) {
                    let servers = self.lock();
                    let healthy: Vec<usize> = (0..config.servers.len())
                        .filter(|&i| {
                            config
                                .servers
                                .get(i)
                                .and_then(|addr| servers.get(addr))
                                .is_none_or(|record| record.down.is_none())
                        })
                        .collect();
                    healthy
                        .get(turn % healthy.len().max(1))
                        .copied()
                        .unwrap_or(0)
                } else {
                    turn % n
                }
            }
        };
        Route { first, next: 0 }
    }

    /// The server for the next connection along `route` (moved past it), or `None` when every
    /// server left is down with no probe due: the client gets its `451` at once.
    pub(crate) fn pick(
        &self,
        config: &Downstream,
        route: &mut Route,
        now: Instant,
    ) -> Option<Pick> {
        let n = config.servers.len();
        if !self.troubled.load(Ordering::Acquire) {
            return route.advance(n).map(|server| Pick {
                server,
                probe: false,
            });
        }
        let mut servers = self.lock();
        // A due probe first, whatever the order: round-robin would otherwise never start at a
        // down server. Claiming it schedules the next one, so one connection probes.
        for (server, addr) in config.servers.iter().enumerate() {
            if let Some(down) = servers.get_mut(addr).and_then(|r| r.down.as_mut())
                && down.probe_at <= now
            {
                down.probe_at = now + down.backoff;
                down.backoff = (down.backoff * 2).min(MAX_RETRY_AFTER);
                log::debug!("downstream {addr} is down: probing it");
                return Some(Pick {
                    server,
                    probe: true,
                });
            }
        }
        while let Some(server) = route.advance(n) {
            let down = config
                .servers
                .get(server)
                .and_then(|addr| servers.get(addr))
                .is_some_and(|record| record.down.is_some());
            if !down {
                return Some(Pick {
                    server,
                    probe: false,
                });
            }
        }
        None
    }

    /// A connection to `addr` failed before or at its banner (`why`, for the log): one more
    /// consecutive failure, which marks the server down at `config.down_after`.
    pub(crate) fn failed(&self, config: &Downstream, addr: SocketAddr, why: &str, now: Instant) {
        let mut servers = self.lock();
        self.troubled.store(true, Ordering::Release);
        let record = servers.entry(addr).or_default();
        record.failures = record.failures.saturating_add(1);
        match record.down {
            None if record.failures >= config.down_after => {
                record.down = Some(Down {
                    probe_at: now + config.retry_after,
                    backoff: (config.retry_after * 2).min(MAX_RETRY_AFTER),
                });
                log::warn!(
                    "downstream {addr} is down after {} consecutive failures (last: {why}); \
                     skipping it, first probe in {}s",
                    record.failures,
                    config.retry_after.as_secs_f64()
                );
            }
            // Its probe failed (the next one is scheduled already), or a connection begun
            // before it went down.
            Some(_) => log::debug!("downstream {addr} is still down: {why}"),
            None => log::debug!(
                "downstream {addr}: failure {} of {} ({why})",
                record.failures,
                config.down_after
            ),
        }
    }

    /// `addr` greeted a connection: it is up, its failures forgotten.
    pub(crate) fn succeeded(&self, addr: SocketAddr) {
        if !self.troubled.load(Ordering::Acquire) {
            return;
        }
        let mut servers = self.lock();
        if let Some(record) = servers.remove(&addr)
            && record.down.is_some()
        {
            log::warn!("downstream {addr} is back up");
        }
        if servers.is_empty() {
            self.troubled.store(false, Ordering::Release);
        }
    }

    /// Each of `servers` (the configuration in force), whether it is up and its consecutive
    /// failures: what an exporter publishes as `tarmac_downstream_up{server}`. A server tarmac
    /// has not failed to reach is up with none.
    pub fn snapshot(&self, servers: &[SocketAddr]) -> Vec<(SocketAddr, bool, u32)> {
        let table = self.lock();
        servers
            .iter()
            .map(|addr| {
                let record = table.get(addr).copied().unwrap_or_default();
                (*addr, record.down.is_none(), record.failures)
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Record>> {
        self.servers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(servers: u16, balance: Balance) -> Downstream {
        Downstream {
            servers: (0..servers)
                .map(|i| SocketAddr::from(([127, 0, 0, 1], 10025 + i)))
                .collect(),
            balance,
            down_after: 2,
            retry_after: Duration::from_secs(30),
            ..Downstream::default()
        }
    }

    /// The servers a new session tries, in order, at `now` (claiming any probe it meets).
    fn order(health: &Health, config: &Downstream, now: Instant) -> Vec<(usize, bool)> {
        let mut route = health.route(config);
        std::iter::from_fn(|| health.pick(config, &mut route, now))
            .map(|pick| (pick.server, pick.probe))
            .collect()
    }

    #[test]
    fn failover_skips_a_down_server_until_its_probe() {
        let config = config(2, Balance::Failover);
        let health = Health::new();
        let t0 = Instant::now();
        let a = config.servers[0];
        assert_eq!(order(&health, &config, t0), [(0, false), (1, false)]);
        health.failed(&config, a, "refused", t0);
        assert_eq!(order(&health, &config, t0), [(0, false), (1, false)]);
        assert_eq!(health.snapshot(&config.servers)[0], (a, true, 1));
        health.failed(&config, a, "refused", t0);
        assert_eq!(health.snapshot(&config.servers)[0], (a, false, 2));
        // Down: skipped until its probe is due, then one session probes it.
        assert_eq!(order(&health, &config, t0), [(1, false)]);
        let due = t0 + config.retry_after;
        assert_eq!(
            order(&health, &config, due - Duration::from_millis(1)),
            [(1, false)]
        );
        assert_eq!(order(&health, &config, due), [(0, true), (1, false)]);
        assert_eq!(order(&health, &config, due), [(1, false)], "one probe");
        // Back up on its first banner.
        health.succeeded(a);
        assert_eq!(health.snapshot(&config.servers)[0], (a, true, 0));
        assert_eq!(order(&health, &config, due), [(0, false), (1, false)]);
        assert!(!health.troubled.load(Ordering::Acquire));
    }

    #[test]
    fn failed_probes_back_off_doubling_to_ten_minutes() {
        let config = config(1, Balance::Failover);
        let health = Health::new();
        let a = config.servers[0];
        let mut now = Instant::now();
        health.failed(&config, a, "timeout", now);
        health.failed(&config, a, "timeout", now);
        assert_eq!(order(&health, &config, now), [], "all down: nothing to try");
        let mut waits = Vec::new();
        let mut wait = config.retry_after;
        for _ in 0..7 {
            // Not a moment before the wait is over, then exactly one probe.
            let early = now + wait - Duration::from_millis(1);
            assert_eq!(order(&health, &config, early), []);
            now += wait;
            assert_eq!(order(&health, &config, now), [(0, true)]);
            health.failed(&config, a, "probe refused", now);
            waits.push(wait.as_secs());
            wait = (wait * 2).min(MAX_RETRY_AFTER);
        }
        assert_eq!(waits, [30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(health.snapshot(&config.servers)[0], (a, false, 9));
    }

    #[test]
    fn a_success_resets_the_count_of_consecutive_failures() {
        let config = config(1, Balance::Failover);
        let health = Health::new();
        let a = config.servers[0];
        let now = Instant::now();
        health.failed(&config, a, "refused", now);
        health.succeeded(a);
        health.failed(&config, a, "refused", now);
        assert_eq!(health.snapshot(&config.servers), [(a, true, 1)]);
        assert_eq!(order(&health, &config, now), [(0, false)]);
    }

    #[test]
    fn round_robin_takes_the_healthy_servers_in_turn() {
        let config = config(3, Balance::RoundRobin);
        let health = Health::new();
        let now = Instant::now();
        let firsts = |health: &Health, n: usize| -> Vec<usize> {
            (0..n).map(|_| order(health, &config, now)[0].0).collect()
        };
        assert_eq!(firsts(&health, 6), [0, 1, 2, 0, 1, 2]);
        // The whole order wraps round from the first choice.
        assert_eq!(
            order(&health, &config, now),
            [(0, false), (1, false), (2, false)]
        );
        let b = config.servers[1];
        health.failed(&config, b, "refused", now);
        health.failed(&config, b, "refused", now);
        let picks = firsts(&health, 6);
        assert_eq!(picks.iter().filter(|&&s| s == 0).count(), 3, "{picks:?}");
        assert_eq!(picks.iter().filter(|&&s| s == 2).count(), 3, "{picks:?}");
        // Its probe comes first when due, whatever the turn.
        let due = now + config.retry_after;
        assert_eq!(order(&health, &config, due)[0], (1, true));
    }

    #[test]
    fn servers_not_configured_are_not_reported() {
        let config = config(2, Balance::Failover);
        let health = Health::new();
        let gone: SocketAddr = "192.0.2.1:25".parse().unwrap();
        health.failed(&config, gone, "refused", Instant::now());
        let snapshot = health.snapshot(&config.servers);
        assert_eq!(
            snapshot,
            [(config.servers[0], true, 0), (config.servers[1], true, 0)]
        );
    }
}
