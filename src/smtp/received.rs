//! The one `Received:` header tarmac prepends to each relayed message (RFC 5321 §4.4).
//!
//! The date comes from a `SystemTime` the driver handed in; nothing here reads a clock.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// What the trace header says about the hop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Trace<'a> {
    /// The client's HELO/EHLO argument, as sent.
    pub helo: &'a [u8],
    /// The client's address.
    pub client: IpAddr,
    /// tarmac's hostname.
    pub by: &'a str,
    /// `ESMTP` or `SMTP` (RFC 3848 `with` keyword).
    pub with: &'static str,
    /// When the message arrived.
    pub at: SystemTime,
}

/// Longest HELO text copied into the header; the rest is cut, since a header line should stay
/// under 998 bytes (RFC 5322 §2.1.1) whatever the client sent.
const MAX_HELO_IN_HEADER: usize = 200;

/// Characters of a HELO name that would let it pose as trace syntax: the address part
/// `([192.0.2.1])`, a comment, a quoted string, an address (`@`, `<>`), a header field (`:`)
/// or a clause's end (`;`). Postfix replaces the same in its `Received:`.
const TRACE_SPECIALS: &[char] = &['<', '>', '(', ')', '[', ']', '\\', '"', ';', ':', '@'];

/// Appends `Received: from helo ([ip]) by host (tarmac) with ESMTP; date` (folded, CRLF).
/// Client text is reduced to printable ASCII and UTF-8 letters so it cannot break the header,
/// and `TRACE_SPECIALS` become `?`, so `EHLO mx.google.com([209.85.128.1])` cannot make the
/// line look as if that host had sent the message. An IPv4 client seen as `::ffff:a.b.c.d` is
/// written as `a.b.c.d`.
pub(crate) fn write_received(trace: &Trace<'_>, out: &mut Vec<u8>) {
    let helo = sanitize_helo(trace.helo);
    let ip = match trace.client.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
    };
    let header = format!(
        "Received: from {helo} ([{ip}])\r\n\tby {} (tarmac) with {};\r\n\t{}\r\n",
        trace.by,
        trace.with,
        rfc5322_date(trace.at)
    );
    out.extend_from_slice(header.as_bytes());
}

/// The HELO name as it goes into the header: control bytes, spaces, invalid UTF-8 and
/// `TRACE_SPECIALS` replaced by `?`, at most `MAX_HELO_IN_HEADER` characters.
pub(crate) fn sanitize_helo(helo: &[u8]) -> String {
    String::from_utf8_lossy(helo)
        .chars()
        .map(|c| {
            let printable = c.is_ascii_graphic() || (!c.is_ascii() && !c.is_control());
            if printable && !TRACE_SPECIALS.contains(&c) && c != char::REPLACEMENT_CHARACTER {
                c
            } else {
                '?'
            }
        })
        .take(MAX_HELO_IN_HEADER)
        .collect()
}

/// `Mon, 23 Nov 2026 13:01:02 +0000` (RFC 5322 §3.3), always in UTC.
pub(crate) fn rfc5322_date(at: SystemTime) -> String {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday.
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let weekday = WEEKDAYS.get((days % 7) as usize).copied().unwrap_or("Thu");
    let month = MONTHS
        .get((month as usize).saturating_sub(1))
        .copied()
        .unwrap_or("Jan");
    format!(
        "{weekday}, {day} {month} {year} {:02}:{:02}:{:02} +0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month 1–12, day 1–31): Howard Hinnant's `civil_from_days`,
/// exact for every date a `SystemTime` after the epoch can hold.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 1 Jan 1970 00:00:00 +0000");
        // 2026-11-23 13:01:02 UTC
        let t = UNIX_EPOCH + Duration::from_secs(1_795_438_862);
        assert_eq!(rfc5322_date(t), "Mon, 23 Nov 2026 13:01:02 +0000");
        // Leap day.
        let t = UNIX_EPOCH + Duration::from_secs(1_709_164_800);
        assert_eq!(rfc5322_date(t), "Thu, 29 Feb 2024 00:00:00 +0000");
    }

    #[test]
    fn header_is_folded_and_sanitised() {
        let mut out = Vec::new();
        write_received(
            &Trace {
                helo: b"evil\r\nBcc: x",
                client: "2001:db8::1".parse().unwrap(),
                by: "mx.test",
                with: "ESMTP",
                at: UNIX_EPOCH,
            },
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Received: from evil??Bcc??x ([IPv6:2001:db8::1])\r\n\tby mx.test (tarmac) with ESMTP;\r\n\tThu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
    }

    #[test]
    fn a_helo_cannot_spoof_the_trace() {
        let mut out = Vec::new();
        write_received(
            &Trace {
                helo: b"mx.google.com([209.85.128.1])",
                client: "::ffff:192.0.2.7".parse().unwrap(),
                by: "mx.test",
                with: "ESMTP",
                at: UNIX_EPOCH,
            },
            &mut out,
        );
        let header = String::from_utf8(out).unwrap();
        assert!(
            header.starts_with(
                "Received: from mx.google.com??209.85.128.1?? ([192.0.2.7])\r\n\tby mx.test"
            ),
            "{header}"
        );
    }

    #[test]
    fn every_special_and_control_byte_becomes_a_question_mark() {
        assert_eq!(
            sanitize_helo(b"<a>(b)[c]\\d\"e;f:g@h\x00\x7f\t i"),
            "?a??b??c??d?e?f?g?h????i"
        );
        // Ordinary names, address literals' digits and UTF-8 letters stay.
        assert_eq!(sanitize_helo(b"mail-01.example.org"), "mail-01.example.org");
        assert_eq!(sanitize_helo("bücher.example".as_bytes()), "bücher.example");
        assert_eq!(sanitize_helo(b"\xff\xfe"), "??");
        assert_eq!(sanitize_helo(&[b'a'; 300]).len(), MAX_HELO_IN_HEADER);
    }
}
