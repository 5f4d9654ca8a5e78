//! DNSBL/DNSWL: query names, the `codes` filter, scoring.
//!
//! The resolver (`crate::dns`) asks [`query_name`] what to look up and hands back a classified
//! [`DnsblAnswer`]; [`classify`] turns it into what the zone contributes, [`score`] adds the
//! contributions up, [`blocking_zone`] names the zone a reject reply cites and [`log_field`]
//! writes the close log's `dnsbl=` value. Nothing here does I/O or reads a clock.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crate::smtp::question::DnsblAnswer;

/// One DNSBL or DNSWL zone and what its answers are worth: a `[[dnsbl]]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dnsbl {
    /// The zone queried, e.g. `zen.spamhaus.org`.
    pub zone: Arc<str>,
    /// Added to the score when listed; negative = allowlist.
    pub weight: i32,
    /// Which answers count, as inclusive ranges; empty = any 127.0.0.0/8 answer.
    pub codes: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Text used instead of the zone name in reject replies.
    pub reply: Option<String>,
}

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
/// IPv4 (`2.0.0.127.zone.`), 32 reversed nibbles for IPv6 (RFC 5782 §2.1, §2.4).
///
/// An IPv4-mapped IPv6 address (`::ffff:192.0.2.7`, what a dual-stack socket reports for an
/// IPv4 client) is looked up as the IPv4 address it carries: lists publish IPv4 clients under
/// their octets, and the nibble form would never be listed. A trailing dot already on `zone`
/// is not doubled.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.strip_suffix('.').unwrap_or(zone);
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    // 64 = the longest reversed IPv6 form (32 nibbles, 32 dots); plus the zone and the root.
    let mut name = String::with_capacity(64 + zone.len() + 1);
    match ip {
        IpAddr::V4(v4) => {
            for octet in v4.octets().iter().rev() {
                // Writing to a String cannot fail.
                let _ = write!(name, "{octet}.");
            }
        }
        IpAddr::V6(v6) => {
            for byte in v6.octets().iter().rev() {
                let _ = write!(name, "{:x}.{:x}.", byte & 0x0f, byte >> 4);
            }
        }
    }
    name.push_str(zone);
    name.push('.');
    name
}

/// Applies the zone's `codes` filter and weight to its answer.
///
/// A listing counts when at least one returned address is in 127.0.0.0/8 (RFC 5782 §2.1; the
/// resolver already sorts other answers into [`DnsblAnswer::Error`], this keeps the rule true
/// for any caller) and, if `codes` is not empty, inside one of its inclusive ranges. Lists
/// answer with several codes at once (zen: SBL and PBL), and one wanted code is enough. The
/// other answers map one to one.
pub fn classify(zone: &Dnsbl, answer: &DnsblAnswer) -> ZoneOutcome {
    match answer {
        DnsblAnswer::Listed(addrs) => {
            if addrs.iter().any(|addr| counts(zone, *addr)) {
                ZoneOutcome::Listed(zone.weight)
            } else {
                ZoneOutcome::NotListed
            }
        }
        DnsblAnswer::NotListed => ZoneOutcome::NotListed,
        DnsblAnswer::Error(_) => ZoneOutcome::Error,
        DnsblAnswer::TempFail => ZoneOutcome::TempFail,
        DnsblAnswer::SetAside => ZoneOutcome::SetAside,
    }
}

/// Sum of the weights of listed zones.
///
/// Saturating, so absurd weights cannot wrap a reject into an allow. Each zone is expected once
/// in `outcomes` (config refuses a zone listed twice), so each counts once.
pub fn score(outcomes: &[ZoneOutcome]) -> i32 {
    outcomes.iter().fold(0i32, |sum, outcome| match outcome {
        ZoneOutcome::Listed(weight) => sum.saturating_add(*weight),
        _ => sum,
    })
}

/// The text a reject names (`blocked using TEXT`): of the listed zones with a positive weight,
/// the one with the highest weight (the first on a tie), as its `reply` or else its name.
/// `zones` and `outcomes` are parallel; elements past the shorter one are ignored. `None` when
/// no blocking zone is listed (the reject came from elsewhere, e.g. reputation or a rule).
pub fn blocking_zone<'a>(zones: &'a [Dnsbl], outcomes: &[ZoneOutcome]) -> Option<&'a str> {
    let mut best: Option<(&Dnsbl, i32)> = None;
    for (zone, outcome) in zones.iter().zip(outcomes) {
        let ZoneOutcome::Listed(weight) = *outcome else {
            continue;
        };
        // Strictly greater: the first zone wins a tie, so config order decides.
        if weight > 0 && best.is_none_or(|(_, top)| weight > top) {
            best = Some((zone, weight));
        }
    }
    best.map(|(zone, _)| zone.reply.as_deref().unwrap_or(&zone.zone))
}

/// The close log's `dnsbl=` value: `zone:weight` for each listed zone, `zone:tempfail`,
/// `zone:error`, `zone:off` (set aside by the health check), in config order, joined by `,`;
/// zones that answered "not listed" are left out, and `-` stands for nothing at all
/// (`zen.spamhaus.org:3,list.dnswl.org:-2,bl.example:tempfail`).
///
/// Failures are logged next to listings because a zone that keeps timing out silently turns
/// into "not listed" for every client; the log is where an operator sees it. `zones` and
/// `outcomes` are parallel, as for [`blocking_zone`]. Zone names are operator config, checked
/// at load to hold no spaces or `=`, so the value needs no escaping.
pub fn log_field(zones: &[Dnsbl], outcomes: &[ZoneOutcome]) -> String {
    let mut field = String::new();
    for (zone, outcome) in zones.iter().zip(outcomes) {
        let mark = match outcome {
            ZoneOutcome::NotListed => continue,
            ZoneOutcome::Listed(weight) => {
                push_zone(&mut field, zone);
                // Writing to a String cannot fail.
                let _ = write!(field, "{weight}");
                continue;
            }
            ZoneOutcome::TempFail => "tempfail",
            ZoneOutcome::Error => "error",
            ZoneOutcome::SetAside => "off",
        };
        push_zone(&mut field, zone);
        field.push_str(mark);
    }
    if field.is_empty() {
        field.push('-');
    }
    field
}

/// Whether one returned address counts as a listing for `zone`.
fn counts(zone: &Dnsbl, addr: Ipv4Addr) -> bool {
    addr.octets().first() == Some(&127)
        && (zone.codes.is_empty()
            || zone
                .codes
                .iter()
                .any(|(low, high)| (*low..=*high).contains(&addr)))
}

/// Appends `zone:` to the log field, after a `,` unless it is the first item.
fn push_zone(field: &mut String, zone: &Dnsbl) {
    if !field.is_empty() {
        field.push(',');
    }
    field.push_str(&zone.zone);
    field.push(':');
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn zone(name: &str, weight: i32, codes: &[(u8, u8)], reply: Option<&str>) -> Dnsbl {
        Dnsbl {
            zone: name.into(),
            weight,
            codes: codes
                .iter()
                .map(|&(low, high)| {
                    (
                        Ipv4Addr::new(127, 0, 0, low),
                        Ipv4Addr::new(127, 0, 0, high),
                    )
                })
                .collect(),
            reply: reply.map(str::to_owned),
        }
    }

    fn code(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, last)
    }

    #[test]
    fn query_names() {
        let nibbles = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2";
        let table: &[(&str, &str, String)] = &[
            (
                "127.0.0.2",
                "zen.spamhaus.org",
                "2.0.0.127.zen.spamhaus.org.".into(),
            ),
            ("192.0.2.99", "bl.example", "99.2.0.192.bl.example.".into()),
            ("0.0.0.0", "bl.example", "0.0.0.0.bl.example.".into()),
            ("255.255.255.255", "x", "255.255.255.255.x.".into()),
            // RFC 5782 §2.4's example address.
            (
                "2001:db8:1:2:3:4:567:89ab",
                "ugly.example.com",
                "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com."
                    .into(),
            ),
            (
                "2001:db8::1",
                "bl.example",
                format!("{nibbles}.bl.example."),
            ),
            ("::", "z", format!("{}z.", "0.".repeat(32))),
            (
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "z",
                format!("{}z.", "f.".repeat(32)),
            ),
            // Mapped IPv4 is queried as IPv4.
            (
                "::ffff:192.0.2.7",
                "bl.example",
                "7.2.0.192.bl.example.".into(),
            ),
            // IPv4-compatible (deprecated) and other ::/96 addresses stay IPv6.
            (
                "::192.0.2.7",
                "z",
                format!("7.0.2.0.0.0.0.c.{}z.", "0.".repeat(24)),
            ),
            // A zone written with its root dot is not doubled.
            ("192.0.2.1", "bl.example.", "1.2.0.192.bl.example.".into()),
        ];
        for (ip, zone, expected) in table {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(&query_name(ip, zone), expected, "{ip} in {zone}");
        }
    }

    #[test]
    fn query_name_nibbles_invert() {
        // Rebuild the address from the name: 32 single hex digits, lowest first.
        let ip: Ipv6Addr = "2a01:4f8:c0c:1234:abcd:ef01:2345:6789".parse().unwrap();
        let name = query_name(IpAddr::V6(ip), "z");
        let labels: Vec<&str> = name.trim_end_matches("z.").split_terminator('.').collect();
        assert_eq!(labels.len(), 32);
        let hex: String = labels.iter().rev().copied().collect();
        assert_eq!(u128::from_str_radix(&hex, 16).unwrap(), u128::from(ip));
    }

    #[test]
    fn classify_answers() {
        let any = zone("any.example", 2, &[], None);
        let filtered = zone("zen.example", 3, &[(2, 3), (9, 11)], None);
        let allow = zone("wl.example", -2, &[], None);
        let table: &[(&Dnsbl, DnsblAnswer, ZoneOutcome)] = &[
            (
                &any,
                DnsblAnswer::Listed(vec![code(2)]),
                ZoneOutcome::Listed(2),
            ),
            (
                &any,
                DnsblAnswer::Listed(vec![code(255)]),
                ZoneOutcome::Listed(2),
            ),
            (&any, DnsblAnswer::Listed(vec![]), ZoneOutcome::NotListed),
            // Outside 127.0.0.0/8 never counts, even with an empty filter.
            (
                &any,
                DnsblAnswer::Listed(vec![Ipv4Addr::new(10, 0, 0, 2)]),
                ZoneOutcome::NotListed,
            ),
            (
                &any,
                DnsblAnswer::Listed(vec![Ipv4Addr::new(10, 0, 0, 2), code(4)]),
                ZoneOutcome::Listed(2),
            ),
            (
                &allow,
                DnsblAnswer::Listed(vec![code(2)]),
                ZoneOutcome::Listed(-2),
            ),
            // Range ends are inclusive.
            (
                &filtered,
                DnsblAnswer::Listed(vec![code(2)]),
                ZoneOutcome::Listed(3),
            ),
            (
                &filtered,
                DnsblAnswer::Listed(vec![code(3)]),
                ZoneOutcome::Listed(3),
            ),
            (
                &filtered,
                DnsblAnswer::Listed(vec![code(9)]),
                ZoneOutcome::Listed(3),
            ),
            (
                &filtered,
                DnsblAnswer::Listed(vec![code(11)]),
                ZoneOutcome::Listed(3),
            ),
            (
                &filtered,
                DnsblAnswer::Listed(vec![code(1)]),
                ZoneOutcome::NotListed,
            ),
            (
                &filtered,
                DnsblAnswer::Listed(vec![code(4)]),
                ZoneOutcome::NotListed,
            ),
            (
                &filtered,
                DnsblAnswer::Listed(vec![code(8)]),
                ZoneOutcome::NotListed,
            ),
            (
                &filtered,
                DnsblAnswer::Listed(vec![code(12)]),
                ZoneOutcome::NotListed,
            ),
            (
                &filtered,
                DnsblAnswer::Listed(vec![Ipv4Addr::new(127, 0, 1, 2)]),
                ZoneOutcome::NotListed,
            ),
            // One wanted code among ignored ones is enough.
            (
                &filtered,
                DnsblAnswer::Listed(vec![code(4), code(10)]),
                ZoneOutcome::Listed(3),
            ),
            (
                &filtered,
                DnsblAnswer::Listed(vec![code(4), code(8)]),
                ZoneOutcome::NotListed,
            ),
            // The other answers map one to one, whatever the filter.
            (&filtered, DnsblAnswer::NotListed, ZoneOutcome::NotListed),
            (
                &filtered,
                DnsblAnswer::Error(Ipv4Addr::new(127, 255, 255, 254)),
                ZoneOutcome::Error,
            ),
            (
                &any,
                DnsblAnswer::Error(Ipv4Addr::new(10, 0, 0, 1)),
                ZoneOutcome::Error,
            ),
            (&filtered, DnsblAnswer::TempFail, ZoneOutcome::TempFail),
            (&any, DnsblAnswer::SetAside, ZoneOutcome::SetAside),
        ];
        for (zone, answer, expected) in table {
            assert_eq!(
                classify(zone, answer),
                *expected,
                "{} {answer:?}",
                zone.zone
            );
        }
    }

    #[test]
    fn scores() {
        use ZoneOutcome::*;
        let table: &[(&[ZoneOutcome], i32)] = &[
            (&[], 0),
            (&[NotListed, TempFail, Error, SetAside], 0),
            (&[Listed(3)], 3),
            (&[Listed(3), Listed(-2)], 1),
            (&[Listed(3), TempFail, Listed(1), NotListed], 4),
            (&[Listed(-2), Listed(-1)], -3),
            (&[Listed(i32::MAX), Listed(5)], i32::MAX),
            (&[Listed(i32::MIN), Listed(-5)], i32::MIN),
            (
                &[Listed(i32::MAX), Listed(i32::MAX), Listed(-1)],
                i32::MAX - 1,
            ),
        ];
        for (outcomes, expected) in table {
            assert_eq!(score(outcomes), *expected, "{outcomes:?}");
        }
    }

    #[test]
    fn blocking_zones() {
        use ZoneOutcome::*;
        let zones = [
            zone("a.example", 2, &[], None),
            zone("b.example", 3, &[], Some("b, see https://b.example/lookup")),
            zone("c.example", 3, &[], None),
            zone("wl.example", -5, &[], None),
        ];
        let table: &[(&[ZoneOutcome], Option<&str>)] = &[
            (&[], None),
            (&[NotListed, NotListed, NotListed, NotListed], None),
            (&[TempFail, Error, SetAside, NotListed], None),
            (
                &[Listed(2), NotListed, NotListed, NotListed],
                Some("a.example"),
            ),
            // Highest weight wins; its reply text replaces its name.
            (
                &[Listed(2), Listed(3), NotListed, NotListed],
                Some("b, see https://b.example/lookup"),
            ),
            (
                &[Listed(2), NotListed, Listed(3), NotListed],
                Some("c.example"),
            ),
            // Tie: the first in config order.
            (
                &[NotListed, Listed(3), Listed(3), NotListed],
                Some("b, see https://b.example/lookup"),
            ),
            // An allowlist zone never names a block.
            (&[NotListed, NotListed, NotListed, Listed(-5)], None),
            (
                &[Listed(2), NotListed, NotListed, Listed(-5)],
                Some("a.example"),
            ),
            // Outcomes shorter than zones: the rest is ignored.
            (&[NotListed, NotListed, Listed(3)], Some("c.example")),
        ];
        for (outcomes, expected) in table {
            assert_eq!(blocking_zone(&zones, outcomes), *expected, "{outcomes:?}");
        }
        // Zones shorter than outcomes: likewise.
        assert_eq!(blocking_zone(&zones[..1], &[NotListed, Listed(3)]), None);
        // A zero weight is not a block.
        assert_eq!(blocking_zone(&zones[..1], &[Listed(0)]), None);
    }

    #[test]
    fn log_fields() {
        use ZoneOutcome::*;
        let zones = [
            zone("zen.spamhaus.org", 3, &[], None),
            zone("list.dnswl.org", -2, &[], None),
            zone("bl.example", 1, &[], None),
        ];
        let table: &[(&[ZoneOutcome], &str)] = &[
            (&[], "-"),
            (&[NotListed, NotListed, NotListed], "-"),
            (
                &[Listed(3), Listed(-2), TempFail],
                "zen.spamhaus.org:3,list.dnswl.org:-2,bl.example:tempfail",
            ),
            (&[NotListed, Listed(-2), NotListed], "list.dnswl.org:-2"),
            (&[NotListed, NotListed, Error], "bl.example:error"),
            (
                &[SetAside, NotListed, Listed(1)],
                "zen.spamhaus.org:off,bl.example:1",
            ),
            (
                &[TempFail, Error, SetAside],
                "zen.spamhaus.org:tempfail,list.dnswl.org:error,bl.example:off",
            ),
        ];
        for (outcomes, expected) in table {
            assert_eq!(log_field(&zones, outcomes), *expected, "{outcomes:?}");
        }
    }

    /// The pieces together, as a session uses them: answers in, score, reject text, log.
    #[test]
    fn answers_to_score_and_log() {
        let zones = [
            zone(
                "zen.example",
                3,
                &[(2, 11)],
                Some("see https://zen.example"),
            ),
            zone("wl.example", -2, &[], None),
            zone("slow.example", 2, &[], None),
        ];
        let answers = [
            DnsblAnswer::Listed(vec![code(4)]),
            DnsblAnswer::Listed(vec![code(15)]),
            DnsblAnswer::TempFail,
        ];
        let outcomes: Vec<ZoneOutcome> = zones
            .iter()
            .zip(&answers)
            .map(|(z, a)| classify(z, a))
            .collect();
        assert_eq!(score(&outcomes), 1);
        assert_eq!(
            blocking_zone(&zones, &outcomes),
            Some("see https://zen.example")
        );
        assert_eq!(
            log_field(&zones, &outcomes),
            "zen.example:3,wl.example:-2,slow.example:tempfail"
        );
    }
}
