//! Connection caps shared by every worker: the global open-connection count against
//! `[server] max_connections` and the concurrent connections per client address against
//! `[limits] max_connections_per_ip`.
//!
//! A slot is taken at accept and given back by dropping its [`LimitGuard`], which the connection
//! owns, so every way a connection can end releases it. Over either cap the worker answers
//! DESIGN.md §1.1's `421 4.7.0` and closes without creating a session.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// The counters; one per server, behind an `Arc`.
#[derive(Debug)]
pub(crate) struct Limits {
    max_connections: usize,
    max_per_ip: u32,
    open: AtomicUsize,
    /// Addresses with at least one open connection; an entry is removed when it drops to 0, so
    /// the map is as large as the set of connected clients, not of every client ever seen.
    per_ip: DashMap<IpAddr, u32>,
}

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `[server] max_connections` connections are open.
    GlobalCap,
    /// `[limits] max_connections_per_ip` connections are open from this address.
    PerIpCap,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::GlobalCap => "max_connections reached",
            Refusal::PerIpCap => "max_connections_per_ip reached",
        })
    }
}

/// One counted connection; dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct LimitGuard {
    limits: Arc<Limits>,
    ip: Option<IpAddr>,
}

impl Limits {
    /// Counters for these caps.
    pub(crate) fn new(max_connections: usize, max_per_ip: u32) -> Limits {
        Limits {
            max_connections,
            max_per_ip,
            open: AtomicUsize::new(0),
            per_ip: DashMap::new(),
        }
    }

    /// Counts a new connection from `ip`, or says which cap it is over (then nothing is
    /// counted). `None` counts it against the global cap only: a load balancer from
    /// `proxy_protocol_from` carries everyone's connections under its one address.
    pub(crate) fn try_acquire(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<LimitGuard, Refusal> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::GlobalCap);
        }
        if let Some(ip) = ip
            && !self.count_ip(ip)
        {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::PerIpCap);
        }
        Ok(LimitGuard {
            limits: Arc::clone(self),
            ip,
        })
    }

    /// Counts a connection from an allow-listed client: it is in the open count (so drain and
    /// logs see it) but no cap refuses it (DESIGN.md §1.1: allow-listed clients skip these
    /// checks).
    pub(crate) fn acquire_exempt(self: &Arc<Self>) -> LimitGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        LimitGuard {
            limits: Arc::clone(self),
            ip: None,
        }
    }

    /// One more connection from `ip`, if under the per-IP cap.
    fn count_ip(&self, ip: IpAddr) -> bool {
        // The shard lock is held only for this update; no I/O happens under it.
        match self.per_ip.entry(ip) {
            Entry::Occupied(mut entry) if *entry.get() < self.max_per_ip => {
                *entry.get_mut() += 1;
                true
            }
            Entry::Occupied(_) => false,
            Entry::Vacant(entry) if self.max_per_ip > 0 => {
                entry.insert(1);
                true
            }
            Entry::Vacant(_) => false,
        }
    }

    /// Connections open now, across workers.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections open now from `ip`.
    #[cfg(test)]
    fn open_from(&self, ip: IpAddr) -> u32 {
        self.per_ip.get(&ip).map_or(0, |count| *count)
    }

    fn release(&self, ip: Option<IpAddr>) {
        if let Some(ip) = ip
            && let Entry::Occupied(mut entry) = self.per_ip.entry(ip)
        {
            if *entry.get() <= 1 {
                entry.remove();
            } else {
                *entry.get_mut() -= 1;
            }
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl LimitGuard {
    /// Counts a connection that came in unkeyed (from a balancer) against the per-IP cap of
    /// the client its PROXY header named. On refusal the guard stays unkeyed: its connection
    /// is about to be closed.
    pub(crate) fn rekey(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        if self.ip.is_some() {
            return Ok(());
        }
        if !self.limits.count_ip(ip) {
            return Err(Refusal::PerIpCap);
        }
        self.ip = Some(ip);
        Ok(())
    }
}

impl Drop for LimitGuard {
    fn drop(&mut self) {
        self.limits.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));

    #[test]
    fn unkeyed_connections_count_only_globally() {
        let limits = Arc::new(Limits::new(2, 1));
        let _a = limits.try_acquire(None).unwrap();
        let b = limits.try_acquire(None).unwrap();
        assert_eq!(limits.try_acquire(None).unwrap_err(), Refusal::GlobalCap);
        drop(b);
        assert_eq!(limits.open(), 1);
        let _c = limits.try_acquire(Some(A)).unwrap();
    }

    #[test]
    fn rekeying_counts_the_proxied_client() {
        let limits = Arc::new(Limits::new(10, 1));
        let mut first = limits.try_acquire(None).unwrap();
        first.rekey(A).unwrap();
        assert_eq!(limits.open_from(A), 1);
        let mut second = limits.try_acquire(None).unwrap();
        assert_eq!(second.rekey(A).unwrap_err(), Refusal::PerIpCap);
        drop(second);
        drop(first);
        assert_eq!(limits.open_from(A), 0);
        assert_eq!(limits.open(), 0);
    }

    #[test]
    fn per_ip_cap_refuses_the_next_and_release_makes_room() {
        let limits = Arc::new(Limits::new(100, 2));
        let first = limits.try_acquire(Some(A)).unwrap();
        let _second = limits.try_acquire(Some(A)).unwrap();
        assert_eq!(limits.try_acquire(Some(A)).unwrap_err(), Refusal::PerIpCap);
        assert_eq!(limits.open_from(A), 2);
        assert_eq!(limits.open(), 2);
        // Another address is counted apart.
        let _other = limits.try_acquire(Some(B)).unwrap();
        assert_eq!(limits.open(), 3);
        drop(first);
        assert_eq!(limits.open_from(A), 1);
        let _third = limits.try_acquire(Some(A)).unwrap();
        assert_eq!(limits.open_from(A), 2);
    }

    #[test]
    fn global_cap_refuses_and_counts_nothing() {
        let limits = Arc::new(Limits::new(2, 10));
        let _a = limits.try_acquire(Some(A)).unwrap();
        let _b = limits.try_acquire(Some(B)).unwrap();
        assert_eq!(limits.try_acquire(Some(A)).unwrap_err(), Refusal::GlobalCap);
        assert_eq!(limits.open(), 2);
        assert_eq!(limits.open_from(A), 1);
    }

    #[test]
    fn entry_is_removed_when_the_last_connection_goes() {
        let limits = Arc::new(Limits::new(10, 10));
        let a = limits.try_acquire(Some(A)).unwrap();
        let b = limits.try_acquire(Some(A)).unwrap();
        drop(a);
        drop(b);
        assert!(limits.per_ip.is_empty());
        assert_eq!(limits.open(), 0);
    }

    #[test]
    fn per_ip_refusal_leaves_no_trace() {
        let limits = Arc::new(Limits::new(10, 0));
        assert_eq!(limits.try_acquire(Some(A)).unwrap_err(), Refusal::PerIpCap);
        assert!(limits.per_ip.is_empty());
        assert_eq!(limits.open(), 0);
    }

    #[test]
    fn counts_stay_exact_under_concurrent_use() {
        let limits = Arc::new(Limits::new(1000, 1000));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let limits = Arc::clone(&limits);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let guard = limits.try_acquire(Some(A)).unwrap();
                        drop(guard);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(limits.open(), 0);
        assert!(limits.per_ip.is_empty());
    }
}
