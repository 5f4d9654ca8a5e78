//! DNSBL/DNSWL: query names, the `codes` filter, scoring.

use std::net::IpAddr;

use crate::config::Dnsbl;
use crate::dns::DnsblAnswer;

/// What one zone contributed for one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZoneOutcome {
    /// Listed with an answer that passes `codes`: the zone's weight counts (once).
    Listed(i32),
    /// Not listed, or listed only with codes the filter ignores.
    NotListed,
    /// No answer in time or a server failure: counts as not listed.
    TempFail,
    /// The zone answered with an error code or a non-127 address: counts as not listed.
    Error,
    /// The zone is set aside by its health check: not queried.
    SetAside,
}

/// The name to look up for `ip` in `zone`, fully qualified (trailing dot): reversed octets for
/// IPv4 (`2.0.0.127.zone.`), 32 reversed nibbles for IPv6.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let _ = (ip, zone);
    String::new()
}

/// Applies the zone's `codes` filter and weight to its answer.
pub fn classify(zone: &Dnsbl, answer: &DnsblAnswer) -> ZoneOutcome {
    let _ = (zone, answer);
    ZoneOutcome::NotListed
}

/// Sum of the weights of listed zones.
pub fn score(outcomes: &[ZoneOutcome]) -> i32 {
    let _ = outcomes;
    0
}

/// The text a reject names (`blocked using TEXT`): of the listed zones with a positive weight,
/// the one with the highest weight (the first on a tie), as its `reply` or else its name.
/// `zones` and `outcomes` are parallel.
pub fn blocking_zone<'a>(zones: &'a [Dnsbl], outcomes: &[ZoneOutcome]) -> Option<&'a str> {
    let _ = (zones, outcomes);
    None
}

/// The close log's `dnsbl=` field: `zone:weight` for listing zones, `zone:tempfail|error|off`,
/// joined by `,`; `-` when there is nothing to say.
pub fn log_field(zones: &[Dnsbl], outcomes: &[ZoneOutcome]) -> String {
    let _ = (zones, outcomes);
    "-".to_owned()
}
