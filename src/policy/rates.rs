//! Connection-rate token buckets (DESIGN.md §1.1, §3 `[limits]`): one bucket per client address
//! (`connection_rate_per_ip`) and one per network (`connection_rate_per_subnet`: IPv4 /24, IPv6
//! /64), so a client that reconnects too fast, or a network that spreads its connections over
//! many addresses, is refused at accept before it costs a session.
//!
//! A bucket holds `count` tokens (the burst, the rate's numerator) and gets one back every
//! `per / count`; a connection takes one from its address's bucket and one from its network's.
//! The buckets are governor's keyed GCRA limiters (a dashmap inside), shared by every worker
//! behind the server's `Arc`. An IPv4 client seen as IPv4-mapped IPv6 (`::ffff:192.0.2.7`, from
//! a dual-stack socket or a PROXY header) is keyed as the IPv4 address it is, so it shares its
//! buckets with its plain IPv4 connections.
//!
//! Time comes from governor's clock, the one exception to "callers pass `now`" in this module
//! tree (STYLE.md §1.1): governor reads its clock itself. The server uses the monotonic clock
//! ([`DefaultClock`]); tests use a `FakeRelativeClock` they advance, so nothing sleeps.
//!
//! Memory is bounded by time, not by a count: governor keeps a key until
//! [`ConnectionRates::sweep`] finds its bucket full again (then the key is no different from one
//! never seen) and drops it. The server sweeps about once a second, so the maps hold only the
//! addresses and networks that connected within the last `per` (plus one refill interval and
//! the sweep interval); a flood of distinct addresses cannot grow them beyond what arrives in
//! that window.
//!
//! Who is exempt (allow-listed clients) and who is keyed by the address in a PROXY header is the
//! caller's business; this module only answers "may this address connect now", and never does
//! I/O.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

/// Leading bits that make an IPv4 client's network: a /24 is the smallest block commonly
/// assigned to one customer or routed (and what DNSBLs list as a unit), so a spammer holding a
/// few addresses in it shares one budget.
const SUBNET_V4_PREFIX: u32 = 24;

/// Leading bits that make an IPv6 client's network: a /64 is one LAN, the smallest block a site
/// gets, and a single host can pick any address in it (RFC 4291, privacy addresses), so per
/// address alone would limit nothing.
const SUBNET_V6_PREFIX: u32 = 64;

/// A rate such as `30/min`: `count` events per `per` (`[limits] connection_rate_per_ip` and
/// `_per_subnet`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed per period; also the bucket's burst.
    pub count: u32,
    /// The period.
    pub per: Duration,
}

/// The connection-rate buckets: per address and per network. Generic over governor's clock so
/// tests can drive time; the server uses [`ConnectionRates::new`] (the monotonic clock).
pub struct ConnectionRates<C: Clock = DefaultClock> {
    per_ip: Buckets<C>,
    per_subnet: Buckets<C>,
}

/// Which bucket refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateRefusal {
    /// The client's own address connected more than `connection_rate_per_ip` allows.
    PerIp,
    /// Its /24 (IPv4) or /64 (IPv6) connected more than `connection_rate_per_subnet` allows.
    PerSubnet,
}

/// One keyed limiter; the key is an address (per IP) or a network address (per subnet).
type Buckets<C> =
    RateLimiter<IpAddr, DashMapStateStore<IpAddr>, C, NoOpMiddleware<<C as Clock>::Instant>>;

impl fmt::Display for RateRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RateRefusal::PerIp => "connection_rate_per_ip exceeded",
            RateRefusal::PerSubnet => "connection_rate_per_subnet exceeded",
        })
    }
}

impl ConnectionRates<DefaultClock> {
    /// Buckets for `[limits] connection_rate_per_ip` and `connection_rate_per_subnet`, on the
    /// monotonic clock.
    pub fn new(per_ip: Rate, per_subnet: Rate) -> ConnectionRates<DefaultClock> {
        ConnectionRates::with_clock(per_ip, per_subnet, DefaultClock::default())
    }
}

impl<C: Clock + Clone> ConnectionRates<C> {
    /// Buckets on `clock` (both share it; a `FakeRelativeClock` clone shares its time).
    pub fn with_clock(per_ip: Rate, per_subnet: Rate, clock: C) -> ConnectionRates<C> {
        ConnectionRates {
            per_ip: RateLimiter::dashmap_with_clock(quota(per_ip), clock.clone()),
            per_subnet: RateLimiter::dashmap_with_clock(quota(per_subnet), clock),
        }
    }
}

impl<C: Clock> ConnectionRates<C> {
    /// Takes a token from `ip`'s bucket, then from its network's, or says which was empty.
    ///
    /// The per-address bucket goes first because governor takes a token whenever a check
    /// passes and has no way to give one back: in this order a refusal by the network's bucket
    /// costs the client one token of its own (it is being refused anyway, and only while its
    /// network is over its rate), whereas the other order would let one address hammering
    /// past its own limit drain its whole network's bucket and lock its neighbours out. A
    /// refusal by the per-address bucket takes nothing from either.
    pub fn check(&self, ip: IpAddr) -> Result<(), RateRefusal> {
        let ip = ip.to_canonical();
        self.per_ip.check_key(&ip).map_err(|_| RateRefusal::PerIp)?;
        self.per_subnet
            .check_key(&subnet(ip))
            .map_err(|_| RateRefusal::PerSubnet)
    }

    /// Forgets every key whose bucket has been full again for one refill interval (governor's
    /// `retain_recent`: it is then the same as a key never seen) and gives the freed map
    /// capacity back. Costs one pass over each map with its shard locks taken in turn, so the
    /// server calls it about once a second, not per connection.
    pub fn sweep(&self) {
        for buckets in [&self.per_ip, &self.per_subnet] {
            buckets.retain_recent();
            buckets.shrink_to_fit();
        }
    }

    /// Keys held now, addresses plus networks: the memory [`ConnectionRates::sweep`] bounds,
    /// for tests and metrics.
    pub fn keys(&self) -> usize {
        self.per_ip.len().saturating_add(self.per_subnet.len())
    }
}

/// By hand: the derived form would print every key in both maps.
impl<C: Clock> fmt::Debug for ConnectionRates<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionRates")
            .field("ip_keys", &self.per_ip.len())
            .field("subnet_keys", &self.per_subnet.len())
            .finish_non_exhaustive()
    }
}

/// The bucket for `rate`: `count` tokens, one back every `per / count`.
///
/// `parse_rate` refuses a count of 0; a `Rate` built in code with one is taken as 1 rather
/// than as "refuse everyone" or "no limit", neither of which a caller could have meant
/// silently. Above 10⁹ a second the refill interval rounds down to 0 ns, which governor cannot
/// represent: it becomes 1 ns with the full burst, in effect no limit (what benches use
/// `u32::MAX` per second for).
fn quota(rate: Rate) -> Quota {
    let burst = NonZeroU32::new(rate.count).unwrap_or(NonZeroU32::MIN);
    let interval = (rate.per / burst.get()).max(Duration::from_nanos(1));
    // `with_period` is `None` only for a zero interval, excluded just above.
    Quota::with_period(interval)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst)
}

/// The network `ip` is counted in, as text (`192.0.2.0/24`, `2001:db8::/64`): the name of its
/// per-subnet bucket where buckets are kept by name (the Redis backend, `state::redis`).
pub(crate) fn network_name(ip: IpAddr) -> String {
    let ip = ip.to_canonical();
    let bits = if ip.is_ipv4() {
        SUBNET_V4_PREFIX
    } else {
        SUBNET_V6_PREFIX
    };
    format!("{}/{bits}", subnet(ip))
}

/// The network `ip` is counted in (its /24 or /64, as an address with the host bits zero),
/// `::ffff:a.b.c.d` taken as `a.b.c.d`: the key of the per-subnet concurrency cap
/// (`server::limits`), the same networks as the rate buckets'.
pub(crate) fn network(ip: IpAddr) -> IpAddr {
    subnet(ip.to_canonical())
}

/// The network `ip` (already canonical) belongs to: its first [`SUBNET_V4_PREFIX`] or
/// [`SUBNET_V6_PREFIX`] bits.
fn subnet(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX << (32 - SUBNET_V4_PREFIX);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX << (128 - SUBNET_V6_PREFIX);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rate(count: u32, secs: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(secs),
        }
    }

    /// Generous: tests of one bucket must not be refused by the other.
    fn lots() -> Rate {
        rate(1_000_000, 60)
    }

    fn buckets(
        per_ip: Rate,
        per_subnet: Rate,
    ) -> (ConnectionRates<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (
            ConnectionRates::with_clock(per_ip, per_subnet, clock.clone()),
            clock,
        )
    }

    /// Checks `ip` `n` times; all must pass.
    #[track_caller]
    fn take(rates: &ConnectionRates<FakeRelativeClock>, ip: IpAddr, n: u32) {
        for i in 0..n {
            assert_eq!(rates.check(ip), Ok(()), "{ip}, check {i}");
        }
    }

    #[test]
    fn burst_is_the_count_then_refused() {
        let (rates, _clock) = buckets(rate(3, 60), lots());
        let a = ip("192.0.2.1");
        take(&rates, a, 3);
        assert_eq!(rates.check(a), Err(RateRefusal::PerIp));
        // A refusal takes nothing: still refused, not worse.
        assert_eq!(rates.check(a), Err(RateRefusal::PerIp));
    }

    #[test]
    fn one_token_comes_back_per_interval() {
        // 3/min: one token every 20 s.
        let (rates, clock) = buckets(rate(3, 60), lots());
        let a = ip("192.0.2.1");
        take(&rates, a, 3);
        clock.advance(Duration::from_secs(19));
        assert_eq!(rates.check(a), Err(RateRefusal::PerIp));
        clock.advance(Duration::from_secs(1));
        take(&rates, a, 1);
        assert_eq!(rates.check(a), Err(RateRefusal::PerIp));
        // A whole period refills the whole burst, and no more.
        clock.advance(Duration::from_secs(600));
        take(&rates, a, 3);
        assert_eq!(rates.check(a), Err(RateRefusal::PerIp));
    }

    #[test]
    fn one_address_does_not_use_up_another() {
        let (rates, _clock) = buckets(rate(2, 60), lots());
        let a = ip("192.0.2.1");
        take(&rates, a, 2);
        assert_eq!(rates.check(a), Err(RateRefusal::PerIp));
        take(&rates, ip("192.0.2.2"), 2);
        take(&rates, ip("2001:db8::1"), 2);
    }

    #[test]
    fn ipv4_networks_are_slash_24() {
        let (rates, _clock) = buckets(lots(), rate(2, 60));
        take(&rates, ip("192.0.2.1"), 1);
        take(&rates, ip("192.0.2.200"), 1);
        assert_eq!(rates.check(ip("192.0.2.77")), Err(RateRefusal::PerSubnet));
        // The next /24 has its own bucket.
        take(&rates, ip("192.0.3.1"), 2);
        assert_eq!(rates.check(ip("192.0.3.1")), Err(RateRefusal::PerSubnet));
    }

    #[test]
    fn ipv6_networks_are_slash_64() {
        let (rates, _clock) = buckets(lots(), rate(2, 60));
        take(&rates, ip("2001:db8:0:1::1"), 1);
        take(&rates, ip("2001:db8:0:1:ffff:ffff:ffff:ffff"), 1);
        assert_eq!(
            rates.check(ip("2001:db8:0:1:1234::9")),
            Err(RateRefusal::PerSubnet)
        );
        take(&rates, ip("2001:db8:0:2::1"), 2);
    }

    #[test]
    fn mapped_ipv6_is_the_ipv4_address() {
        let (rates, _clock) = buckets(rate(2, 60), rate(3, 60));
        take(&rates, ip("192.0.2.1"), 1);
        take(&rates, ip("::ffff:192.0.2.1"), 1);
        // Same address: its own bucket is empty.
        assert_eq!(rates.check(ip("::ffff:192.0.2.1")), Err(RateRefusal::PerIp));
        assert_eq!(rates.check(ip("192.0.2.1")), Err(RateRefusal::PerIp));
        // Same /24: the third connection from it, in either form, empties the network's.
        take(&rates, ip("::ffff:192.0.2.9"), 1);
        assert_eq!(rates.check(ip("192.0.2.10")), Err(RateRefusal::PerSubnet));
    }

    #[test]
    fn a_refusal_by_the_address_leaves_the_network_alone() {
        let (rates, _clock) = buckets(rate(1, 60), rate(2, 60));
        let a = ip("192.0.2.1");
        take(&rates, a, 1);
        for _ in 0..100 {
            assert_eq!(rates.check(a), Err(RateRefusal::PerIp));
        }
        // The network gave one token, to `a`'s first connection; a neighbour gets the other.
        take(&rates, ip("192.0.2.2"), 1);
        assert_eq!(rates.check(ip("192.0.2.3")), Err(RateRefusal::PerSubnet));
    }

    #[test]
    fn sweep_forgets_keys_once_their_buckets_are_full_again() {
        // 3/min: one token every 20 s. An address that took one token at t0 has a full bucket
        // again at t0 + 20 s; `a`, which took all three, at t0 + 60 s. governor drops a key one
        // interval after that, when it is indistinguishable from a fresh one.
        let (rates, clock) = buckets(rate(3, 60), rate(1000, 60));
        for n in 0..=255u8 {
            take(&rates, IpAddr::V4(Ipv4Addr::new(198, 51, 100, n)), 1);
        }
        let a = ip("192.0.2.1");
        take(&rates, a, 3);
        assert_eq!(rates.keys(), 256 + 1 + 2, "addresses plus two networks");
        rates.sweep();
        assert_eq!(rates.keys(), 259, "nothing is stale yet");

        clock.advance(Duration::from_secs(40));
        rates.sweep();
        assert_eq!(
            rates.keys(),
            1,
            "only `a`, whose bucket is not full again, is kept"
        );

        clock.advance(Duration::from_secs(40));
        rates.sweep();
        assert_eq!(rates.keys(), 0, "every bucket is full again: nothing kept");
        // A forgotten key starts over with a full bucket, as it would have anyway.
        take(&rates, a, 3);
        assert_eq!(rates.check(a), Err(RateRefusal::PerIp));
    }

    #[test]
    fn a_flood_of_addresses_does_not_outlive_its_window() {
        // 1/s per address: a key is stale 2 s after its one connection, so after each sweep
        // only the last second's addresses are held, however many came before.
        let (rates, clock) = buckets(rate(1, 1), lots());
        for round in 0..10u32 {
            for n in 0..1000u32 {
                let addr = Ipv4Addr::from(0x0a00_0000 + round * 1000 + n);
                take(&rates, IpAddr::V4(addr), 1);
            }
            clock.advance(Duration::from_secs(1));
            rates.sweep();
            assert_eq!(rates.keys(), 1000, "round {round}");
        }
        clock.advance(Duration::from_secs(1));
        rates.sweep();
        assert_eq!(rates.keys(), 0);
    }

    #[test]
    fn network_names_are_the_buckets_networks() {
        assert_eq!(network_name(ip("192.0.2.77")), "192.0.2.0/24");
        assert_eq!(network_name(ip("::ffff:192.0.2.77")), "192.0.2.0/24");
        assert_eq!(
            network_name(ip("2001:db8:0:1:1234::9")),
            "2001:db8:0:1::/64"
        );
    }

    #[test]
    fn extreme_rates_do_not_break_the_quota() {
        // 10⁹+ a second rounds to a 1 ns interval: no limit in practice.
        let (rates, _clock) = buckets(rate(u32::MAX, 1), rate(u32::MAX, 1));
        take(&rates, ip("192.0.2.1"), 10_000);
        // A count of 0 (not parsable, only constructible) acts as 1.
        let (rates, _clock) = buckets(rate(0, 60), lots());
        take(&rates, ip("192.0.2.1"), 1);
        assert_eq!(rates.check(ip("192.0.2.1")), Err(RateRefusal::PerIp));
    }
}
