//! Connection limits shared by every worker: the connection-rate buckets of `[limits]
//! connection_rate_per_ip` and `connection_rate_per_subnet` (decided by
//! [`ConnectionRates`](crate::policy::ConnectionRates)), the global open-connection count against
//! `[server] max_connections` and the concurrent connections per client address and per
//! network (IPv4 /24, IPv6 /64) against `[limits] max_connections_per_ip` and
//! `max_connections_per_subnet`. Addresses are counted canonical: `::ffff:a.b.c.d` (a
//! dual-stack listener, a PROXY header) is `a.b.c.d`, so one client has one count whichever
//! way it arrives, and a host rotating through the addresses of its /64 is held by the
//! network's count.
//!
//! The rates are checked first, so a client over its rate is refused without touching the
//! counts. A PROXY client's rate is asked once its header names it (through `state::Store`):
//! it comes in unkeyed and is counted against its per-IP cap by [`LimitGuard::rekey`] once its
//! rate allowed it. With the rates in Redis a direct client is counted at accept
//! ([`Limits::try_acquire_unrated`]) and its rate asked afterwards. A slot is then taken at accept and given back by dropping its [`LimitGuard`], which
//! the connection owns, so every way a connection can end releases it. Over any limit the worker
//! answers DESIGN.md §1.1's `421 4.7.0` and closes without creating a session. The rate buckets'
//! stale keys are dropped by [`Limits::sweep_rates`], which the workers call every turn and
//! which does the work at most once per [`RATE_SWEEP_INTERVAL`] across all of them.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::policy::ConnectionRates;
use crate::policy::admission::Count;
pub(crate) use crate::policy::admission::Refusal;
use crate::policy::rates::network;

/// How often the rate buckets' stale keys are dropped: often enough that their memory follows
/// the addresses of the last `per` closely, rare enough that the pass over every key (each
/// shard lock taken in turn) costs the accept path nothing noticeable.
pub(crate) const RATE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The counters; one per server, behind an `Arc`.
#[derive(Debug)]
pub(crate) struct Limits {
    max_connections: usize,
    max_per_ip: u32,
    max_per_subnet: u32,
    open: AtomicUsize,
    /// Addresses (canonical) with at least one open connection; an entry is removed when it
    /// drops to 0, so the map is as large as the set of connected clients, not of every client
    /// ever seen.
    per_ip: DashMap<IpAddr, u32>,
    /// The same per network ([`network`]: the /24 or /64, host bits zero).
    per_subnet: DashMap<IpAddr, u32>,
    /// Checked before the counts, for every client not exempt; shared with the local state
    /// store, which answers the rate question for clients checked after accept.
    rates: Arc<ConnectionRates>,
    /// When the next sweep of `rates` is due, in milliseconds after `epoch`; the worker that
    /// moves it on does the sweep.
    next_sweep: AtomicU64,
    epoch: Instant,
}

/// One counted connection; dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct LimitGuard {
    limits: Arc<Limits>,
    /// The client counted against the per-IP and per-subnet caps, canonical.
    ip: Option<IpAddr>,
}

impl Limits {
    /// Counters for these caps, and these rate buckets.
    pub(crate) fn new(
        max_connections: usize,
        max_per_ip: u32,
        max_per_subnet: u32,
        rates: Arc<ConnectionRates>,
    ) -> Limits {
        Limits {
            max_connections,
            max_per_ip,
            max_per_subnet,
            open: AtomicUsize::new(0),
            per_ip: DashMap::new(),
            per_subnet: DashMap::new(),
            rates,
            next_sweep: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Counts a new connection as its admission says ([`Count`]), or says which limit it is
    /// over.
    pub(crate) fn acquire(self: &Arc<Self>, count: Count) -> Result<LimitGuard, Refusal> {
        match count {
            Count::Exempt => Ok(self.acquire_exempt()),
            Count::Unkeyed => self.try_acquire(None),
            Count::Rated(ip) => self.try_acquire(Some(ip)),
            Count::Unrated(ip) => self.try_acquire_unrated(ip),
        }
    }

    /// Takes a token from `ip`'s rate buckets and counts a new connection from it, or says
    /// which limit it is over (then nothing is counted; a refusal by the network's bucket has
    /// still taken the address's token, see [`ConnectionRates::check`]). `None` skips the rates
    /// and counts the connection against the global cap only: a load balancer from
    /// `proxy_protocol_from` carries everyone's connections under its one address, and its
    /// clients are checked once their header names them ([`LimitGuard::rekey`]).
    pub(crate) fn try_acquire(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<LimitGuard, Refusal> {
        if let Some(ip) = ip {
            self.rates.check(ip).map_err(Refusal::Rate)?;
        }
        self.count(ip)
    }

    /// Counts a new connection from `ip` against the caps without taking a rate token: with
    /// the rates in Redis the token is asked for afterwards, and dropping the guard undoes the
    /// count if the rate refuses. Counting first keeps one address from holding more than
    /// `max_connections_per_ip` places while its answers are on their way.
    pub(crate) fn try_acquire_unrated(self: &Arc<Self>, ip: IpAddr) -> Result<LimitGuard, Refusal> {
        self.count(Some(ip))
    }

    /// One more connection against the global cap and, with `ip`, against its per-IP and
    /// per-subnet caps.
    fn count(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<LimitGuard, Refusal> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::GlobalCap);
        }
        let ip = ip.map(|ip| ip.to_canonical());
        if let Some(ip) = ip
            && let Err(refusal) = self.count_client(ip)
        {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(refusal);
        }
        Ok(LimitGuard {
            limits: Arc::clone(self),
            ip,
        })
    }

    /// Counts a connection from an allow-listed client: it is in the open count (so drain and
    /// logs see it) but no cap or rate refuses it, and it takes no rate token (DESIGN.md §1.1:
    /// allow-listed clients skip these checks).
    pub(crate) fn acquire_exempt(self: &Arc<Self>) -> LimitGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        LimitGuard {
            limits: Arc::clone(self),
            ip: None,
        }
    }

    /// One more connection from `ip` (canonical), if under its per-IP cap and its network's;
    /// on refusal nothing stays counted. The two counts are taken one after the other, not
    /// atomically together: two connections racing can at worst see a count one too high for
    /// an instant and be refused, never get past a cap.
    fn count_client(&self, ip: IpAddr) -> Result<(), Refusal> {
        if !take(&self.per_ip, ip, self.max_per_ip) {
            return Err(Refusal::PerIpCap);
        }
        if !take(&self.per_subnet, network(ip), self.max_per_subnet) {
            give_back(&self.per_ip, ip);
            return Err(Refusal::PerSubnetCap);
        }
        Ok(())
    }

    /// Drops the rate buckets' stale keys if [`RATE_SWEEP_INTERVAL`] has passed since the last
    /// sweep by any worker; otherwise one atomic load. Returns whether this call swept. A
    /// worker calls it every turn, so an idle server (no turns) keeps its keys until the next
    /// connection, but nothing adds keys meanwhile either.
    pub(crate) fn sweep_rates(&self, now: Instant) -> bool {
        let at = millis(now.saturating_duration_since(self.epoch));
        let due = self.next_sweep.load(Ordering::Relaxed);
        if at < due {
            return false;
        }
        let next = at.saturating_add(millis(RATE_SWEEP_INTERVAL));
        // Whoever moves the deadline on sweeps; a worker that lost the race goes on serving.
        if self
            .next_sweep
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        self.rates.sweep();
        true
    }

    /// Connections open now, across workers.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections open now from `ip`.
    #[cfg(test)]
    fn open_from(&self, ip: IpAddr) -> u32 {
        self.per_ip
            .get(&ip.to_canonical())
            .map_or(0, |count| *count)
    }

    /// Connections open now from `ip`'s network.
    #[cfg(test)]
    fn open_from_subnet(&self, ip: IpAddr) -> u32 {
        self.per_subnet.get(&network(ip)).map_or(0, |count| *count)
    }

    fn release(&self, ip: Option<IpAddr>) {
        if let Some(ip) = ip {
            give_back(&self.per_ip, ip);
            give_back(&self.per_subnet, network(ip));
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One more for `key` in `counts`, if under `cap`.
fn take(counts: &DashMap<IpAddr, u32>, key: IpAddr, cap: u32) -> bool {
    // The shard lock is held only for this update; no I/O happens under it.
    match counts.entry(key) {
        Entry::Occupied(mut entry) if *entry.get() < cap => {
            *entry.get_mut() += 1;
            true
        }
        Entry::Occupied(_) => false,
        Entry::Vacant(entry) if cap > 0 => {
            entry.insert(1);
            true
        }
        Entry::Vacant(_) => false,
    }
}

/// One less for `key` in `counts`; the entry goes with its last connection.
fn give_back(counts: &DashMap<IpAddr, u32>, key: IpAddr) {
    if let Entry::Occupied(mut entry) = counts.entry(key) {
        if *entry.get() <= 1 {
            entry.remove();
        } else {
            *entry.get_mut() -= 1;
        }
    }
}

impl LimitGuard {
    /// Whether the guard counts a client address: the client was known at accept (not a
    /// balancer's connection waiting for its PROXY header to name one).
    pub(crate) fn is_keyed(&self) -> bool {
        self.ip.is_some()
    }

    /// Counts a connection that came in unkeyed (from a balancer) against the per-IP and
    /// per-subnet caps of its client, whose rate the caller has already checked (the order of
    /// [`Limits::try_acquire`]: rates first). A guard already keyed (by
    /// [`Limits::try_acquire_unrated`]) is counted already. On refusal the guard stays
    /// unkeyed: its connection is about to be closed.
    pub(crate) fn rekey(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        if self.ip.is_some() {
            return Ok(());
        }
        let ip = ip.to_canonical();
        self.limits.count_client(ip)?;
        self.ip = Some(ip);
        Ok(())
    }
}

impl Drop for LimitGuard {
    fn drop(&mut self) {
        self.limits.release(self.ip);
    }
}

/// Whole milliseconds in `d`, saturating (a `u64` of them outlasts any uptime).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::config::Rate;
    use crate::policy::RateRefusal;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));

    fn rate(count: u32) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(3600),
        }
    }

    /// Caps as given, a per-subnet cap no test here reaches unless it says so; rates no test
    /// here reaches.
    fn limits(max_connections: usize, max_per_ip: u32) -> Arc<Limits> {
        limits_per_subnet(max_connections, max_per_ip, u32::MAX)
    }

    fn limits_per_subnet(
        max_connections: usize,
        max_per_ip: u32,
        max_per_subnet: u32,
    ) -> Arc<Limits> {
        let rates = ConnectionRates::new(rate(u32::MAX), rate(u32::MAX));
        Arc::new(Limits::new(
            max_connections,
            max_per_ip,
            max_per_subnet,
            Arc::new(rates),
        ))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn over_the_rate_is_refused_before_anything_is_counted() {
        let rates = ConnectionRates::new(rate(2), rate(3));
        let limits = Arc::new(Limits::new(100, 100, 100, Arc::new(rates)));
        let first = limits.try_acquire(Some(A)).unwrap();
        drop(first);
        let _second = limits.try_acquire(Some(A)).unwrap();
        // Closing a connection gives no token back: the rate counts connections made.
        assert_eq!(
            limits.try_acquire(Some(A)).unwrap_err(),
            Refusal::Rate(RateRefusal::PerIp)
        );
        assert_eq!(limits.open(), 1);
        assert_eq!(limits.open_from(A), 1);
        // A neighbour in the same /24 takes the network's last token, the next is refused.
        let neighbour = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
        let _third = limits.try_acquire(Some(neighbour)).unwrap();
        let last = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3));
        let refusal = limits.try_acquire(Some(last)).unwrap_err();
        assert_eq!(refusal, Refusal::Rate(RateRefusal::PerSubnet));
        assert_eq!(refusal.to_string(), "connection_rate_per_subnet exceeded");
        assert_eq!(limits.open(), 2);
        // Unkeyed (a balancer) and exempt (allow-listed) connections take no token.
        let _balancer = limits.try_acquire(None).unwrap();
        let _allowed = limits.acquire_exempt();
        assert_eq!(limits.open(), 4);
    }

    #[test]
    fn rate_sweeps_happen_at_most_once_an_interval() {
        let limits = limits(10, 10);
        let t0 = limits.epoch;
        assert!(limits.sweep_rates(t0), "the first sweep is due at once");
        assert!(!limits.sweep_rates(t0));
        assert!(!limits.sweep_rates(t0 + RATE_SWEEP_INTERVAL - Duration::from_millis(1)));
        assert!(limits.sweep_rates(t0 + RATE_SWEEP_INTERVAL));
        assert!(!limits.sweep_rates(t0 + RATE_SWEEP_INTERVAL));
        // A late turn sweeps once, then waits a whole interval from then.
        let late = t0 + 10 * RATE_SWEEP_INTERVAL;
        assert!(limits.sweep_rates(late));
        assert!(!limits.sweep_rates(late + RATE_SWEEP_INTERVAL / 2));
        assert!(limits.sweep_rates(late + RATE_SWEEP_INTERVAL));
    }

    #[test]
    fn unrated_connections_are_counted_and_take_no_token() {
        let rates = ConnectionRates::new(rate(1), rate(1));
        let limits = Arc::new(Limits::new(100, 2, 100, Arc::new(rates)));
        let mut first = limits.try_acquire_unrated(A).unwrap();
        let _second = limits.try_acquire_unrated(A).unwrap();
        assert_eq!(
            limits.try_acquire_unrated(A).unwrap_err(),
            Refusal::PerIpCap
        );
        assert_eq!(limits.open_from(A), 2);
        // Counted already: rekeying (after the rate answered) counts nothing more.
        first.rekey(A).unwrap();
        assert_eq!(limits.open_from(A), 2);
        drop(first);
        assert_eq!(limits.open_from(A), 1);
        // No token was taken: the one token of A's bucket is still there.
        assert_eq!(limits.rates.check(A), Ok(()));
    }

    #[test]
    fn unkeyed_connections_count_only_globally() {
        let limits = limits(2, 1);
        let _a = limits.try_acquire(None).unwrap();
        let b = limits.try_acquire(None).unwrap();
        assert_eq!(limits.try_acquire(None).unwrap_err(), Refusal::GlobalCap);
        drop(b);
        assert_eq!(limits.open(), 1);
        let _c = limits.try_acquire(Some(A)).unwrap();
    }

    #[test]
    fn rekeying_counts_the_proxied_client() {
        let limits = limits(10, 1);
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
        let limits = limits(100, 2);
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
    fn an_ipv6_64_cannot_take_more_than_the_subnet_cap_one_address_at_a_time() {
        let limits = limits_per_subnet(1000, 20, 3);
        // Every connection from another address of the same /64, each under its per-IP cap.
        let held: Vec<LimitGuard> = (1..=3)
            .map(|n| {
                let addr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, n));
                limits.try_acquire(Some(addr)).unwrap()
            })
            .collect();
        let fourth = ip("2001:db8:1:2:ffff:ffff:ffff:ffff");
        let refusal = limits.try_acquire(Some(fourth)).unwrap_err();
        assert_eq!(refusal, Refusal::PerSubnetCap);
        assert_eq!(refusal.to_string(), "max_connections_per_subnet reached");
        // The refused address holds nothing: neither its own count nor the network's moved.
        assert_eq!(limits.open_from(fourth), 0);
        assert_eq!(limits.open_from_subnet(fourth), 3);
        assert_eq!(limits.open(), 3);
        // The next /64 is another network; a PROXY-named client of the full one is refused too.
        let _next = limits.try_acquire(Some(ip("2001:db8:1:3::1"))).unwrap();
        let mut proxied = limits.try_acquire(None).unwrap();
        assert_eq!(proxied.rekey(fourth).unwrap_err(), Refusal::PerSubnetCap);
        drop(proxied);
        // One of the three goes: the network has room again.
        let mut held = held;
        drop(held.pop());
        let now = limits.try_acquire(Some(fourth)).unwrap();
        // The network's entry goes with its last connection.
        drop(held);
        drop(now);
        assert_eq!(limits.open_from_subnet(fourth), 0);
        assert_eq!(limits.per_subnet.len(), 1, "only the next /64 is left");
    }

    #[test]
    fn an_ipv4_24_shares_one_subnet_count() {
        let limits = limits_per_subnet(1000, 20, 2);
        let _a = limits.try_acquire(Some(ip("192.0.2.1"))).unwrap();
        let _b = limits.try_acquire(Some(ip("192.0.2.200"))).unwrap();
        assert_eq!(
            limits.try_acquire(Some(ip("192.0.2.77"))).unwrap_err(),
            Refusal::PerSubnetCap
        );
        let _other = limits.try_acquire(Some(ip("192.0.3.1"))).unwrap();
        // Allow-listed clients are exempt from every cap.
        let _allowed = limits.acquire_exempt();
        assert_eq!(limits.open(), 4);
    }

    #[test]
    fn a_mapped_and_a_plain_ipv4_address_share_one_count() {
        let limits = limits_per_subnet(1000, 2, 3);
        let plain = ip("192.0.2.7");
        let mapped = ip("::ffff:192.0.2.7");
        let first = limits.try_acquire(Some(plain)).unwrap();
        let _second = limits.try_acquire_unrated(mapped).unwrap();
        assert_eq!(limits.open_from(plain), 2);
        assert_eq!(
            limits.try_acquire(Some(mapped)).unwrap_err(),
            Refusal::PerIpCap
        );
        let mut proxied = limits.try_acquire(None).unwrap();
        assert_eq!(proxied.rekey(mapped).unwrap_err(), Refusal::PerIpCap);
        drop(proxied);
        // The mapped form counts in the IPv4 /24, not in some ::ffff:... /64.
        let _neighbour = limits.try_acquire(Some(ip("::ffff:192.0.2.8"))).unwrap();
        assert_eq!(limits.open_from_subnet(plain), 3);
        assert_eq!(
            limits.try_acquire(Some(ip("192.0.2.9"))).unwrap_err(),
            Refusal::PerSubnetCap
        );
        // Released under the same key it was counted under.
        drop(first);
        assert_eq!(limits.open_from(mapped), 1);
        assert_eq!(limits.open_from_subnet(mapped), 2);
    }

    #[test]
    fn global_cap_refuses_and_counts_nothing() {
        let limits = limits(2, 10);
        let _a = limits.try_acquire(Some(A)).unwrap();
        let _b = limits.try_acquire(Some(B)).unwrap();
        assert_eq!(limits.try_acquire(Some(A)).unwrap_err(), Refusal::GlobalCap);
        assert_eq!(limits.open(), 2);
        assert_eq!(limits.open_from(A), 1);
    }

    #[test]
    fn entry_is_removed_when_the_last_connection_goes() {
        let limits = limits(10, 10);
        let a = limits.try_acquire(Some(A)).unwrap();
        let b = limits.try_acquire(Some(A)).unwrap();
        drop(a);
        drop(b);
        assert!(limits.per_ip.is_empty());
        assert!(limits.per_subnet.is_empty());
        assert_eq!(limits.open(), 0);
    }

    #[test]
    fn per_ip_refusal_leaves_no_trace() {
        let limits = limits(10, 0);
        assert_eq!(limits.try_acquire(Some(A)).unwrap_err(), Refusal::PerIpCap);
        assert!(limits.per_ip.is_empty());
        assert_eq!(limits.open(), 0);
    }

    #[test]
    fn counts_stay_exact_under_concurrent_use() {
        let limits = limits(1000, 1000);
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
