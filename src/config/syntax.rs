//! The value syntaxes of DESIGN.md §3: durations, sizes, rates, socket addresses, DNS names and
//! answer codes, each parsed from the string an operator wrote (CIDR blocks parse as
//! [`Cidr`](crate::policy::Cidr)).
//!
//! Every parser returns the whole error message (quoting the input and showing the expected form),
//! so the document walker only has to add `path:line: key: `. Nothing here knows about TOML.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use crate::policy::rates::Rate;

/// Longest duration accepted, ten years: far beyond any sensible timeout or TTL, and small enough
/// that `Instant + Duration` can never overflow (which would panic) in the timer wheel.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

const DURATION_HINT: &str =
    r#"expected a number with a unit such as "250ms", "30s", "5m", "4h", "36d""#;
const SIZE_HINT: &str = r#"expected a number with a unit such as "64KB", "25MB", "10MiB""#;
const RATE_HINT: &str = r#"expected a count per period such as "30/min", "5/s", "1000/h""#;
const ADDR_HINT: &str = r#"expected ip:port such as "0.0.0.0:25" or "[::1]:25""#;
const DNS_SERVER_HINT: &str =
    r#"expected ip or ip:port such as "192.0.2.53", "192.0.2.53:5353", "::1" or "[::1]:53""#;

/// Port used for a `[dns] servers` entry written without one.
const DNS_PORT: u16 = 53;

/// `"250ms"`, `"30s"`, `"5m"`, `"4h"`, `"36d"`; `"0s"` is zero (callers decide whether zero is
/// allowed). No fractions, no spaces, no compound forms: one number, one unit.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let invalid = |why: &str| format!("invalid duration {s:?}: {why}");
    let (number, unit) = split_number(s).map_err(|why| invalid(why.message(DURATION_HINT)))?;
    let Some(number) = number else {
        return Err(format!("duration {s:?} is too large; at most \"3650d\""));
    };
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => return Err(invalid(&format!("missing unit; {DURATION_HINT}"))),
        _ => return Err(invalid(DURATION_HINT)),
    };
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| format!("duration {s:?} is too large; at most \"3650d\""))
}

/// `"64KB"`, `"25MB"`, `"1GB"` (powers of 1000), `"64KiB"`, `"10MiB"`, `"1GiB"` (powers of 1024),
/// `"512B"`; units are case-insensitive. Returns bytes.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let invalid = |why: &str| format!("invalid size {s:?}: {why}");
    let (number, unit) = split_number(s).map_err(|why| invalid(why.message(SIZE_HINT)))?;
    let too_large = || format!("size {s:?} is too large");
    let Some(number) = number else {
        return Err(too_large());
    };
    let bytes_per_unit: u64 = match unit.to_ascii_lowercase().as_str() {
        "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "" => return Err(invalid(&format!("missing unit; {SIZE_HINT}"))),
        _ => return Err(invalid(SIZE_HINT)),
    };
    number.checked_mul(bytes_per_unit).ok_or_else(too_large)
}

/// `"30/min"`, `"5/s"`, `"1000/h"`; the period may also be `sec`, `second`, `minute`, `hour`,
/// `d` or `day`. The count is at least 1: a rate of zero would refuse every connection, which is
/// never what an operator means.
pub(crate) fn parse_rate(s: &str) -> Result<Rate, String> {
    let invalid = |why: &str| format!("invalid rate {s:?}: {why}");
    let Some((count, period)) = s.split_once('/') else {
        return Err(invalid(RATE_HINT));
    };
    let (number, rest) = split_number(count).map_err(|why| invalid(why.message(RATE_HINT)))?;
    if !rest.is_empty() {
        return Err(invalid(RATE_HINT));
    }
    let count = number
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| invalid(&format!("count is too large; at most {}", u32::MAX)))?;
    if count == 0 {
        return Err(invalid("count must be at least 1"));
    }
    let secs = match period {
        "s" | "sec" | "second" => 1,
        "min" | "minute" => 60,
        "h" | "hour" => 3_600,
        "d" | "day" => 86_400,
        _ => return Err(invalid(RATE_HINT)),
    };
    Ok(Rate {
        count,
        per: Duration::from_secs(secs),
    })
}

/// `"ip:port"`, with IPv6 in brackets (`"[::1]:25"`). Names are not resolved: the listeners and
/// the downstream must not depend on DNS at startup.
pub(crate) fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    SocketAddr::from_str(s).map_err(|_| format!("invalid address {s:?}: {ADDR_HINT}"))
}

/// A `[dns] servers` entry: like [`parse_socket_addr`], but the port may be left out (53), and an
/// IPv6 address may then be written bare (`::1`) or in brackets (`[::1]`).
pub(crate) fn parse_dns_server(s: &str) -> Result<SocketAddr, String> {
    let addr = if let Ok(addr) = SocketAddr::from_str(s) {
        addr
    } else if let Ok(ip) = IpAddr::from_str(s) {
        SocketAddr::new(ip, DNS_PORT)
    } else if let Some(ip) = s
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| Ipv6Addr::from_str(inner).ok())
    {
        SocketAddr::new(IpAddr::V6(ip), DNS_PORT)
    } else {
        return Err(format!("invalid DNS server {s:?}: {DNS_SERVER_HINT}"));
    };
    if addr.port() == 0 {
        return Err(format!(
            "invalid DNS server {s:?}: port 0 cannot be queried"
        ));
    }
    Ok(addr)
}

/// A host name as used in the banner and in EHLO: dot-separated labels of letters, digits and
/// hyphens (RFC 1123), no label empty, longer than 63 or starting or ending with a hyphen, at
/// most 253 characters in all.
pub(crate) fn check_hostname(s: &str) -> Result<(), String> {
    check_dns_name(s, false)
}

/// A DNS zone such as `zen.spamhaus.org`: like a host name, but labels may also hold `_`, which
/// some list operators use in zone names (zones are never put in EHLO).
pub(crate) fn check_zone(s: &str) -> Result<(), String> {
    check_dns_name(s, true)
}

/// One entry of `[[dnsbl]] codes`: `"127.0.0.2"` or an inclusive range `"127.0.0.2-127.0.0.11"`,
/// every address in 127.0.0.0/8 (RFC 5782 §2.1: list answers live there; anything else is an
/// error from the list, not a listing).
pub(crate) fn parse_code_range(s: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let hint = r#"expected an address in 127.0.0.0/8 or a range such as "127.0.0.2-127.0.0.11""#;
    let one = |part: &str| -> Result<Ipv4Addr, String> {
        let ip = Ipv4Addr::from_str(part.trim())
            .map_err(|_| format!("invalid answer code {s:?}: {hint}"))?;
        if ip.octets().first() != Some(&127) {
            return Err(format!(
                "invalid answer code {s:?}: {ip} is not in 127.0.0.0/8, where DNSBL answers live"
            ));
        }
        Ok(ip)
    };
    let (low, high) = match s.split_once('-') {
        Some((low, high)) => (one(low)?, one(high)?),
        None => {
            let ip = one(s)?;
            (ip, ip)
        }
    };
    if low > high {
        return Err(format!(
            "invalid answer code range {s:?}: {low} is above {high}; write the lower address first"
        ));
    }
    Ok((low, high))
}

/// A duration the way an operator writes it, for messages and `tarmac check`: the largest unit
/// that divides it (`"90s"`, `"5m"`), so the text parses back to the same value.
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let units: [(u128, &str); 5] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
        (1, "ms"),
    ];
    for (size, unit) in units {
        if ms % size == 0 && ms != 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    "0s".to_owned()
}

/// A size the way an operator writes it, for `tarmac check`: the largest unit that divides it,
/// the power of 1000 before the power of 1024 of the same prefix (`"256KB"`, `"256KiB"`,
/// `"25MB"`), else bytes; the text parses back to the same value.
pub(crate) fn format_size(bytes: u64) -> String {
    let units: [(u64, &str); 6] = [
        (1_000_000_000, "GB"),
        (1 << 30, "GiB"),
        (1_000_000, "MB"),
        (1 << 20, "MiB"),
        (1_000, "KB"),
        (1 << 10, "KiB"),
    ];
    for (size, unit) in units {
        if bytes != 0 && bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

/// Why [`split_number`] found no number.
enum NumberError {
    Negative,
    Missing,
}

impl NumberError {
    fn message<'h>(&self, hint: &'h str) -> &'h str {
        match self {
            Self::Negative => "must not be negative",
            Self::Missing => hint,
        }
    }
}

/// Splits leading ASCII digits from the rest: `Ok((Some(n), unit))`, or `Ok((None, unit))` when
/// the digits do not fit a u64.
fn split_number(s: &str) -> Result<(Option<u64>, &str), NumberError> {
    if s.starts_with('-') {
        return Err(NumberError::Negative);
    }
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(end);
    if digits.is_empty() {
        return Err(NumberError::Missing);
    }
    Ok((digits.parse().ok(), unit))
}

fn check_dns_name(s: &str, allow_underscore: bool) -> Result<(), String> {
    let invalid = |why: &str| Err(format!("invalid DNS name {s:?}: {why}"));
    if s.is_empty() {
        return invalid("must not be empty");
    }
    if s.len() > 253 {
        return invalid("longer than 253 characters");
    }
    for label in s.split('.') {
        if label.is_empty() {
            return invalid("empty label (two dots in a row, or a dot at either end)");
        }
        if label.len() > 63 {
            return invalid("a label is longer than 63 characters");
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || (allow_underscore && c == '_')))
        {
            return invalid(&format!(
                "{c:?} is not allowed; use letters, digits, hyphens and dots"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return invalid("a label starts or ends with a hyphen");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatted_durations_and_sizes_parse_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(86_400), "1d"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d));
        }
        for (bytes, text) in [
            (0, "0B"),
            (999, "999B"),
            (256 * 1024, "256KiB"),
            (256_000, "256KB"),
            (25_000_000, "25MB"),
            (3 << 30, "3GiB"),
            (1_000_000_000, "1GB"),
        ] {
            assert_eq!(format_size(bytes), text);
            assert_eq!(parse_size(text), Ok(bytes));
        }
    }

    #[test]
    fn durations() {
        let ok: &[(&str, Duration)] = &[
            ("250ms", Duration::from_millis(250)),
            ("0ms", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("4h", Duration::from_secs(14_400)),
            ("36d", Duration::from_secs(36 * 86_400)),
            ("3650d", MAX_DURATION),
            ("007s", Duration::from_secs(7)),
        ];
        for (input, want) in ok {
            assert_eq!(parse_duration(input), Ok(*want), "{input}");
        }
        let bad: &[(&str, &str)] = &[
            (
                "30",
                r#"invalid duration "30": missing unit; expected a number with a unit such as "250ms", "30s", "5m", "4h", "36d""#,
            ),
            ("-5s", r#"invalid duration "-5s": must not be negative"#),
            (
                "5x",
                r#"invalid duration "5x": expected a number with a unit such as "250ms", "30s", "5m", "4h", "36d""#,
            ),
            (
                "s",
                r#"invalid duration "s": expected a number with a unit such as "250ms", "30s", "5m", "4h", "36d""#,
            ),
            (
                "",
                r#"invalid duration "": expected a number with a unit such as "250ms", "30s", "5m", "4h", "36d""#,
            ),
            (
                "1.5s",
                r#"invalid duration "1.5s": expected a number with a unit such as "250ms", "30s", "5m", "4h", "36d""#,
            ),
            (
                "5 s",
                r#"invalid duration "5 s": expected a number with a unit such as "250ms", "30s", "5m", "4h", "36d""#,
            ),
            ("3651d", r#"duration "3651d" is too large; at most "3650d""#),
            (
                "99999999999999999999s",
                r#"duration "99999999999999999999s" is too large; at most "3650d""#,
            ),
            (
                "18446744073709551615d",
                r#"duration "18446744073709551615d" is too large; at most "3650d""#,
            ),
            (
                "5S",
                r#"invalid duration "5S": expected a number with a unit such as "250ms", "30s", "5m", "4h", "36d""#,
            ),
        ];
        for (input, want) in bad {
            assert_eq!(parse_duration(input), Err((*want).to_owned()), "{input}");
        }
    }

    #[test]
    fn sizes() {
        let ok: &[(&str, u64)] = &[
            ("0B", 0),
            ("512B", 512),
            ("64KB", 64_000),
            ("64kb", 64_000),
            ("25MB", 25_000_000),
            ("1GB", 1_000_000_000),
            ("64KiB", 65_536),
            ("10MiB", 10_485_760),
            ("1GiB", 1_073_741_824),
            ("18446744073709551615B", u64::MAX),
        ];
        for (input, want) in ok {
            assert_eq!(parse_size(input), Ok(*want), "{input}");
        }
        let bad: &[(&str, &str)] = &[
            (
                "25XB",
                r#"invalid size "25XB": expected a number with a unit such as "64KB", "25MB", "10MiB""#,
            ),
            (
                "1024",
                r#"invalid size "1024": missing unit; expected a number with a unit such as "64KB", "25MB", "10MiB""#,
            ),
            ("-1MB", r#"invalid size "-1MB": must not be negative"#),
            (
                "MB",
                r#"invalid size "MB": expected a number with a unit such as "64KB", "25MB", "10MiB""#,
            ),
            (
                "18446744073709551615KB",
                r#"size "18446744073709551615KB" is too large"#,
            ),
            (
                "99999999999999999999B",
                r#"size "99999999999999999999B" is too large"#,
            ),
        ];
        for (input, want) in bad {
            assert_eq!(parse_size(input), Err((*want).to_owned()), "{input}");
        }
    }

    #[test]
    fn rates() {
        let rate = |count, secs| Rate {
            count,
            per: Duration::from_secs(secs),
        };
        let ok: &[(&str, Rate)] = &[
            ("30/min", rate(30, 60)),
            ("30/minute", rate(30, 60)),
            ("5/s", rate(5, 1)),
            ("5/sec", rate(5, 1)),
            ("5/second", rate(5, 1)),
            ("1000/h", rate(1000, 3600)),
            ("1000/hour", rate(1000, 3600)),
            ("1/d", rate(1, 86_400)),
            ("1/day", rate(1, 86_400)),
            ("4294967295/s", rate(u32::MAX, 1)),
        ];
        for (input, want) in ok {
            assert_eq!(parse_rate(input), Ok(*want), "{input}");
        }
        let bad: &[(&str, &str)] = &[
            (
                "30",
                r#"invalid rate "30": expected a count per period such as "30/min", "5/s", "1000/h""#,
            ),
            ("0/min", r#"invalid rate "0/min": count must be at least 1"#),
            ("-1/min", r#"invalid rate "-1/min": must not be negative"#),
            (
                "30/fortnight",
                r#"invalid rate "30/fortnight": expected a count per period such as "30/min", "5/s", "1000/h""#,
            ),
            (
                "30/m",
                r#"invalid rate "30/m": expected a count per period such as "30/min", "5/s", "1000/h""#,
            ),
            (
                "4294967296/s",
                r#"invalid rate "4294967296/s": count is too large; at most 4294967295"#,
            ),
            (
                "/min",
                r#"invalid rate "/min": expected a count per period such as "30/min", "5/s", "1000/h""#,
            ),
            (
                "3x/min",
                r#"invalid rate "3x/min": expected a count per period such as "30/min", "5/s", "1000/h""#,
            ),
        ];
        for (input, want) in bad {
            assert_eq!(parse_rate(input), Err((*want).to_owned()), "{input}");
        }
    }

    #[test]
    fn socket_addrs() {
        assert_eq!(
            parse_socket_addr("0.0.0.0:25"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 25)))
        );
        assert_eq!(
            parse_socket_addr("[::1]:2525"),
            Ok(SocketAddr::from((Ipv6Addr::LOCALHOST, 2525)))
        );
        assert_eq!(
            parse_socket_addr("[2001:db8::25]:25"),
            Ok("[2001:db8::25]:25".parse().unwrap())
        );
        for bad in ["::1:25", "localhost:25", "127.0.0.1", "127.0.0.1:70000", ""] {
            assert_eq!(
                parse_socket_addr(bad),
                Err(format!(
                    r#"invalid address {bad:?}: expected ip:port such as "0.0.0.0:25" or "[::1]:25""#
                ))
            );
        }
    }

    #[test]
    fn dns_servers() {
        let ok: &[(&str, &str)] = &[
            ("192.0.2.53", "192.0.2.53:53"),
            ("192.0.2.53:5353", "192.0.2.53:5353"),
            ("::1", "[::1]:53"),
            ("[::1]", "[::1]:53"),
            ("[::1]:5353", "[::1]:5353"),
            ("2001:db8::53", "[2001:db8::53]:53"),
        ];
        for (input, want) in ok {
            assert_eq!(
                parse_dns_server(input),
                Ok(want.parse().unwrap()),
                "{input}"
            );
        }
        assert_eq!(
            parse_dns_server("192.0.2.53:0"),
            Err(r#"invalid DNS server "192.0.2.53:0": port 0 cannot be queried"#.to_owned())
        );
        for bad in ["dns.example", "[::1", "192.0.2.300", ""] {
            assert!(
                parse_dns_server(bad).unwrap_err().starts_with(&format!(
                    "invalid DNS server {bad:?}: expected ip or ip:port"
                )),
                "{bad}"
            );
        }
    }

    #[test]
    fn dns_names() {
        for ok in ["localhost", "mx1.example.org", "a-b.c", "x"] {
            assert_eq!(check_hostname(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_zone("_dnsbl.example.org"), Ok(()));
        let long_label = "a".repeat(64);
        let long_name = ["a"; 127].join(".") + ".aa";
        let bad: &[(&str, &str)] = &[
            ("", "must not be empty"),
            (
                "mx 1.example.org",
                "' ' is not allowed; use letters, digits, hyphens and dots",
            ),
            (
                "mx1..example.org",
                "empty label (two dots in a row, or a dot at either end)",
            ),
            (
                "mx1.example.org.",
                "empty label (two dots in a row, or a dot at either end)",
            ),
            ("-mx.example.org", "a label starts or ends with a hyphen"),
            (
                "_dnsbl.example.org",
                "'_' is not allowed; use letters, digits, hyphens and dots",
            ),
            (&long_label, "a label is longer than 63 characters"),
            (&long_name, "longer than 253 characters"),
        ];
        for (input, why) in bad {
            assert_eq!(
                check_hostname(input),
                Err(format!("invalid DNS name {input:?}: {why}")),
                "{input}"
            );
        }
    }

    #[test]
    fn code_ranges() {
        let ip = |d| Ipv4Addr::new(127, 0, 0, d);
        assert_eq!(parse_code_range("127.0.0.2"), Ok((ip(2), ip(2))));
        assert_eq!(
            parse_code_range("127.0.0.2-127.0.0.11"),
            Ok((ip(2), ip(11)))
        );
        assert_eq!(
            parse_code_range("127.0.0.11-127.0.0.2"),
            Err(
                "invalid answer code range \"127.0.0.11-127.0.0.2\": 127.0.0.11 is above \
                 127.0.0.2; write the lower address first"
                    .to_owned()
            )
        );
        assert_eq!(
            parse_code_range("10.0.0.2"),
            Err(
                "invalid answer code \"10.0.0.2\": 10.0.0.2 is not in 127.0.0.0/8, where DNSBL \
                 answers live"
                    .to_owned()
            )
        );
        assert!(parse_code_range("127.0.0.2/31").is_err());
        assert!(parse_code_range("127.0.0.2-").is_err());
    }
}
