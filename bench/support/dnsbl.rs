//! A DNSBL on loopback, for the benches whose server checks clients against one (`dns`,
//! `tarpit`): the zone the real DNS server serves (`tarmac_testkit::dns_server`), `[dns]` aimed
//! at that server alone, the `[[dnsbl]]` entry, and the client source addresses.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tarmac::config;
use tarmac::policy::dnsbl::query_name;
use tarmac_testkit::dns_server::{DnsServer, Zone};

/// `[dns] timeout`: generous, so a loaded machine slows a bench rather than turning answers
/// into `TempFail` (which the benches' checks report as failures).
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// `[dns] cache_ttl` and `health_interval`: longer than any run, so the cache keeps every
/// answer (each address is asked once) and no health check lands inside a measurement.
const LONG: Duration = Duration::from_secs(3600);

/// Longest the start-up health checks may take to reach the server.
const HEALTH_DEADLINE: Duration = Duration::from_secs(10);

/// `[dns]` aimed at `server` only; no rDNS (the server has no PTRs).
pub fn loopback_dns(server: &DnsServer) -> config::Dns {
    config::Dns {
        servers: vec![server.addr()],
        timeout: DNS_TIMEOUT,
        cache_ttl: LONG,
        rdns: false,
        health_interval: LONG,
    }
}

/// The `[[dnsbl]]` entry for `zone` at `weight`, with the default codes and reply.
pub fn dnsbl(zone: &str, weight: i32) -> config::Dnsbl {
    config::Dnsbl {
        zone: Arc::from(zone),
        weight,
        codes: Vec::new(),
        reply: None,
    }
}

/// The zone `origin`: its test point (127.0.0.2 listed, 127.0.0.1 not, as health checks want)
/// and every address of `listed`, all answering 127.0.0.2. Negative answers live for the
/// default negative TTL (300 s), longer than any run.
pub fn zone(origin: &str, listed: impl IntoIterator<Item = IpAddr>) -> Zone {
    let test_point = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    std::iter::once(test_point)
        .chain(listed)
        .fold(Zone::new(origin), |zone, ip| {
            let name = query_name(ip, origin);
            let label = name
                .strip_suffix(&format!(".{origin}."))
                .expect("the name ends in the zone");
            zone.a(label, "127.0.0.2")
        })
}

/// Client source address `index`: 127.1.0.1 onwards, 250 per /24 (skipping .0 and the top),
/// so the per-IP cap and ephemeral ports are no issue and every address is one to look up.
pub fn source_addr(index: usize) -> Ipv4Addr {
    let third = u8::try_from(index / 250).expect("at most 64,000 addresses");
    let fourth = u8::try_from(index % 250 + 1).expect("below 251");
    Ipv4Addr::new(127, 1, third, fourth)
}

/// The resolver checks each zone's two test points when the server starts: waits until the
/// DNS server has had those queries for `zones` zones, so the zones are known healthy before
/// clients come and the checks are not counted against them.
pub fn wait_for_health_checks(server: &DnsServer, zones: u64) {
    let deadline = Instant::now() + HEALTH_DEADLINE;
    while server.queries() < 2 * zones {
        assert!(
            Instant::now() < deadline,
            "no health checks within {HEALTH_DEADLINE:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}
