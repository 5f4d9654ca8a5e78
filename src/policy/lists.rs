//! Local allow and deny lists (DESIGN.md §3.1).
//!
//! A list file holds one entry per line:
//! - an IP address, IPv4 or IPv6 (`192.0.2.7`, `2001:db8::7`);
//! - a CIDR block (`192.0.2.0/24`, `2001:db8::/32`), whose address must be the block's first
//!   one: `192.0.2.1/24` is refused with the fix (`did you mean 192.0.2.0/24?`), as Postfix's
//!   cidr tables do, because host bits set are almost always a typo in the network;
//! - a domain (`example.com`), which matches itself and every name under it
//!   (`mail.example.com`), case-insensitively, a trailing dot ignored on both sides. Labels
//!   are letters, digits, `-` and `_` (real rDNS and HELO names use both), at most 63
//!   characters, 253 in all; an internationalized name is written in its `xn--` form.
//!
//! `#` starts a comment, at the start of a line or after an entry; blank lines are ignored and
//! whitespace around an entry is trimmed. Everything else is an error naming `path:line`: an
//! unparsable address or block, a domain with a bad character or an empty or over-long label,
//! a name ending in a number (`192.0.2`, an IP address cut short), `*.example.com` (a domain
//! already covers its subdomains, so the wildcard would only mislead), or two entries on one
//! line. [`List::parse`] reports every bad line of every file before failing, so one run of
//! `tarmac check` shows them all.
//!
//! Which names are checked (verified rDNS, HELO, sender domain) is the caller's choice; this
//! module only answers "is it listed". An IPv4 client seen through a dual-stack socket
//! (`::ffff:192.0.2.7`) matches IPv4 entries, and an entry written in that mapped form is
//! stored as the IPv4 block it means. Other IPv6 blocks never match IPv4 clients, `::/0`
//! included, as with [`Cidr::contains`].
//!
//! **Allow wins.** [`ListSet`] checks the allow list first: an operator who allow-lists an
//! address or domain means it, even if a broader deny entry (a whole provider's block, say)
//! also covers it. Allow skips every check and limit; deny gets `554 5.7.1` like an immediate
//! DNSBL reject. Those actions belong to the session; this module only says which list matched.
//!
//! Lookups stay fast for lists of 100 000 entries and more: addresses are kept as sorted,
//! merged ranges (`u32` for IPv4, `u128` for IPv6) searched by bisection, and domains in a hash
//! set probed once per label boundary of the name (`a.b.example.com`, `b.example.com`,
//! `example.com`, `com`). No I/O: callers read the files and pass their text.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use super::cidr::Cidr;
use super::reading::FileError;

/// One list (allow or deny), compiled from all its files.
///
/// Equal lists hold the same addresses, the same domains and the same number of entries,
/// whatever the order or the split into files they were read from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct List {
    /// IPv4 entries as inclusive ranges, sorted, with overlapping and adjacent ones merged, so
    /// at most one range can hold an address.
    v4: Vec<(u32, u32)>,
    /// IPv6 entries (other than IPv4-mapped ones), kept like `v4`.
    v6: Vec<(u128, u128)>,
    /// Domain entries, lowercase, without a trailing dot.
    domains: HashSet<Box<str>>,
    /// Length of the longest domain entry: a suffix longer than it cannot be in `domains`, so
    /// a long client-supplied name costs one pass, not one hash per label.
    longest_domain: usize,
    /// Lines that held an entry, duplicates included.
    entries: usize,
}

/// Which list matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListMatch {
    /// On the allow list.
    Allow,
    /// On the deny list.
    Deny,
}

/// The allow and deny lists together; allow wins when both match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListSet {
    /// `[lists] allow`
    pub allow: List,
    /// `[lists] deny`
    pub deny: List,
}

impl List {
    /// Parses the texts of a list's files (path, contents), in order. Every bad line is an
    /// error naming `path:line` (empty key).
    ///
    /// All files are read to the end and every bad line reported, in file and line order; a
    /// list with any bad line is refused as a whole, so a reload never runs with half a list.
    /// Lines end with LF or CRLF; a UTF-8 byte order mark at the start of a file is skipped.
    pub fn parse(files: &[(PathBuf, String)]) -> Result<List, Vec<FileError>> {
        let mut list = List::default();
        let mut errors = Vec::new();
        for (path, text) in files {
            let text = text.strip_prefix('\u{feff}').unwrap_or(text);
            for (index, line) in text.lines().enumerate() {
                match parse_line(line) {
                    Ok(None) => {}
                    Ok(Some(entry)) => list.insert(entry),
                    Err(message) => errors.push(FileError {
                        path: path.clone(),
                        line: index.saturating_add(1),
                        key: String::new(),
                        message,
                    }),
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        merge(&mut list.v4, |end| end.checked_add(1));
        merge(&mut list.v6, |end| end.checked_add(1));
        Ok(list)
    }

    /// Whether `ip` is listed (an IP entry or inside a CIDR entry).
    ///
    /// An IPv4-mapped IPv6 address is looked up as the IPv4 address it carries.
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => in_ranges(&self.v4, u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => in_ranges(&self.v4, u32::from(v4)),
                None => in_ranges(&self.v6, u128::from(v6)),
            },
        }
    }

    /// Whether `name` is listed: equal to an entry or under it, case-insensitive, trailing dot
    /// ignored.
    ///
    /// `name` may be anything a client sent (HELO is not validated): it is compared, never
    /// parsed, and costs time linear in its length.
    pub fn contains_domain(&self, name: &str) -> bool {
        if self.domains.is_empty() {
            return false;
        }
        let name = name.strip_suffix('.').unwrap_or(name);
        let lower = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        };
        let mut suffix: &str = &lower;
        loop {
            if suffix.len() <= self.longest_domain && self.domains.contains(suffix) {
                return true;
            }
            let Some((_, parent)) = suffix.split_once('.') else {
                return false;
            };
            suffix = parent;
        }
    }

    /// Lines that held an entry, across all files, duplicates included: the figure
    /// `tarmac check` reports, so an operator sees a list file was read at all.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Whether no file held an entry (the shipped example files are all comments): such a
    /// list matches nothing.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    fn insert(&mut self, entry: Entry) {
        self.entries = self.entries.saturating_add(1);
        match entry {
            Entry::V4(start, end) => self.v4.push((start, end)),
            Entry::V6(start, end) => self.v6.push((start, end)),
            Entry::Domain(name) => {
                self.longest_domain = self.longest_domain.max(name.len());
                self.domains.insert(name);
            }
        }
    }
}

impl ListSet {
    /// The match for an address, allow first.
    pub fn check_ip(&self, ip: IpAddr) -> Option<ListMatch> {
        self.check(|list| list.contains_ip(ip))
    }

    /// The match for a domain (verified rDNS name, HELO, sender domain), allow first.
    pub fn check_domain(&self, name: &str) -> Option<ListMatch> {
        self.check(|list| list.contains_domain(name))
    }

    /// The list that `contains` something, allow first.
    fn check(&self, contains: impl Fn(&List) -> bool) -> Option<ListMatch> {
        if contains(&self.allow) {
            Some(ListMatch::Allow)
        } else if contains(&self.deny) {
            Some(ListMatch::Deny)
        } else {
            None
        }
    }
}

/// One parsed line's entry, addresses already as inclusive ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    /// IPv4 block, first and last address.
    V4(u32, u32),
    /// IPv6 block, first and last address.
    V6(u128, u128),
    /// Lowercase domain without a trailing dot.
    Domain(Box<str>),
}

/// Longest domain entry in characters, trailing dot excluded (RFC 1035 §2.3.4's 255 octets on
/// the wire).
const MAX_DOMAIN: usize = 253;

/// Longest label (RFC 1035 §2.3.4).
const MAX_LABEL: usize = 63;

/// The entry on one line, `None` for a blank or comment line, or what is wrong with it.
fn parse_line(line: &str) -> Result<Option<Entry>, String> {
    let content = line
        .split_once('#')
        .map_or(line, |(before, _)| before)
        .trim();
    if content.is_empty() {
        return Ok(None);
    }
    let mut words = content.split_whitespace();
    let (Some(entry), None) = (words.next(), words.next()) else {
        return Err(format!(
            "more than one entry on one line ({content:?}); put each on a line of its own"
        ));
    };
    parse_entry(entry).map(Some)
}

/// One entry, already trimmed and free of spaces.
fn parse_entry(s: &str) -> Result<Entry, String> {
    // ':' is IPv6, '/' a block; either way `Cidr`'s parser and its messages (host bits set,
    // prefix too long) apply. Neither can occur in a domain.
    if s.contains([':', '/']) {
        return s
            .parse::<Cidr>()
            .map(block)
            .map_err(|error| error.to_string());
    }
    // Digits and dots only would otherwise pass as a domain (`192.0.2` is a valid host name
    // syntax but a truncated address in a list).
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return s
            .parse::<Ipv4Addr>()
            .map(|ip| Entry::V4(u32::from(ip), u32::from(ip)))
            .map_err(|_| {
                format!(
                    "invalid IP address {s:?}: expected four numbers from 0 to 255 without \
                     leading zeros, such as 192.0.2.7"
                )
            });
    }
    parse_domain(s).map(Entry::Domain)
}

/// A CIDR block as a range; an IPv4-mapped IPv6 block becomes the IPv4 block it means, since
/// mapped clients are looked up as IPv4.
fn block(cidr: Cidr) -> Entry {
    match cidr.addr {
        IpAddr::V4(v4) => {
            let start = u32::from(v4);
            // checked_shr: a shift by the full width (prefix 32) is None, i.e. no host bits.
            let hosts = u32::MAX.checked_shr(u32::from(cidr.prefix)).unwrap_or(0);
            Entry::V4(start, start | hosts)
        }
        IpAddr::V6(v6) => match (v6.to_ipv4_mapped(), cidr.prefix.checked_sub(96)) {
            (Some(v4), Some(prefix)) => block(Cidr {
                addr: IpAddr::V4(v4),
                prefix,
            }),
            _ => {
                let start = u128::from(v6);
                let hosts = u128::MAX.checked_shr(u32::from(cidr.prefix)).unwrap_or(0);
                Entry::V6(start, start | hosts)
            }
        },
    }
}

/// A domain entry, lowercased and without its trailing dot, or what is wrong with it.
fn parse_domain(s: &str) -> Result<Box<str>, String> {
    let invalid = |why: &str| format!("invalid domain {s:?}: {why}");
    if let Some(rest) = s.strip_prefix("*.") {
        return Err(invalid(&format!(
            "a domain already matches every name under it; write {rest}"
        )));
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(invalid(&match c {
            ',' | ';' => format!("{c:?} is not a separator here; put one entry per line"),
            '*' => "'*' is not a wildcard here; a domain already matches every name under it"
                .to_owned(),
            c if !c.is_ascii() => {
                format!("{c:?} is not ASCII; write an internationalized name in its xn-- form")
            }
            c => {
                format!("{c:?} is not allowed; use letters, digits, hyphens, underscores and dots")
            }
        }));
    }
    if name.len() > MAX_DOMAIN {
        return Err(invalid(&format!("longer than {MAX_DOMAIN} characters")));
    }
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err(invalid(
                "empty label (two dots in a row, or a dot at the start)",
            ));
        }
        if label.len() > MAX_LABEL {
            return Err(invalid(&format!(
                "a label is longer than {MAX_LABEL} characters"
            )));
        }
        last = label;
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            "ends in a number, which no top-level domain is; an IP address has four numbers",
        ));
    }
    Ok(name.to_ascii_lowercase().into_boxed_str())
}

/// Sorts ranges and merges the overlapping and adjacent ones; `next` is the value after an
/// end (`None` past the type's maximum).
fn merge<T: Copy + Ord>(ranges: &mut Vec<(T, T)>, next: impl Fn(T) -> Option<T>) {
    ranges.sort_unstable();
    let mut merged: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for &(start, end) in ranges.iter() {
        if let Some(last) = merged.last_mut() {
            if next(last.1).is_none_or(|after| start <= after) {
                last.1 = last.1.max(end);
                continue;
            }
        }
        merged.push((start, end));
    }
    merged.shrink_to_fit();
    *ranges = merged;
}

/// Whether `x` is in one of `ranges` (sorted, disjoint): the last range starting at or before
/// `x` is the only candidate.
fn in_ranges<T: Copy + Ord>(ranges: &[(T, T)], x: T) -> bool {
    let after = ranges.partition_point(|&(start, _)| start <= x);
    after
        .checked_sub(1)
        .and_then(|i| ranges.get(i))
        .is_some_and(|&(_, end)| x <= end)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn list(text: &str) -> List {
        List::parse(&[(PathBuf::from("list.txt"), text.to_owned())]).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn v4(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    fn v6(s: &str) -> u128 {
        u128::from(s.parse::<Ipv6Addr>().unwrap())
    }

    #[test]
    fn lines() {
        let table: &[(&str, Option<Entry>)] = &[
            ("", None),
            ("   \t ", None),
            ("# comment", None),
            ("   # indented comment", None),
            ("#192.0.2.7", None),
            (
                "192.0.2.7",
                Some(Entry::V4(v4("192.0.2.7"), v4("192.0.2.7"))),
            ),
            (
                "  192.0.2.7  ",
                Some(Entry::V4(v4("192.0.2.7"), v4("192.0.2.7"))),
            ),
            (
                "192.0.2.7 # the office",
                Some(Entry::V4(v4("192.0.2.7"), v4("192.0.2.7"))),
            ),
            (
                "192.0.2.7#no space",
                Some(Entry::V4(v4("192.0.2.7"), v4("192.0.2.7"))),
            ),
            (
                "192.0.2.7\r",
                Some(Entry::V4(v4("192.0.2.7"), v4("192.0.2.7"))),
            ),
            (
                "192.0.2.0/24",
                Some(Entry::V4(v4("192.0.2.0"), v4("192.0.2.255"))),
            ),
            (
                "192.0.2.7/32",
                Some(Entry::V4(v4("192.0.2.7"), v4("192.0.2.7"))),
            ),
            ("0.0.0.0/0", Some(Entry::V4(0, u32::MAX))),
            (
                "198.51.100.128/25",
                Some(Entry::V4(v4("198.51.100.128"), v4("198.51.100.255"))),
            ),
            (
                "2001:db8::7",
                Some(Entry::V6(v6("2001:db8::7"), v6("2001:db8::7"))),
            ),
            (
                "2001:db8::/32",
                Some(Entry::V6(
                    v6("2001:db8::"),
                    v6("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"),
                )),
            ),
            ("::/0", Some(Entry::V6(0, u128::MAX))),
            (
                "2001:DB8::A",
                Some(Entry::V6(v6("2001:db8::a"), v6("2001:db8::a"))),
            ),
            // Written in the mapped form: stored as the IPv4 it means.
            (
                "::ffff:192.0.2.7",
                Some(Entry::V4(v4("192.0.2.7"), v4("192.0.2.7"))),
            ),
            (
                "::ffff:192.0.2.0/120",
                Some(Entry::V4(v4("192.0.2.0"), v4("192.0.2.255"))),
            ),
            ("::ffff:0.0.0.0/96", Some(Entry::V4(0, u32::MAX))),
            // Wider than the mapped range: stays IPv6.
            ("::/80", Some(Entry::V6(0, v6("::ffff:ffff:ffff")))),
            ("example.com", Some(Entry::Domain("example.com".into()))),
            (
                "Mail.EXAMPLE.com.",
                Some(Entry::Domain("mail.example.com".into())),
            ),
            ("localhost", Some(Entry::Domain("localhost".into()))),
            (
                "_dmarc.x-1.example.net",
                Some(Entry::Domain("_dmarc.x-1.example.net".into())),
            ),
            (
                "xn--bcher-kva.example",
                Some(Entry::Domain("xn--bcher-kva.example".into())),
            ),
            (
                "192-0-2-7.dsl.example.net",
                Some(Entry::Domain("192-0-2-7.dsl.example.net".into())),
            ),
            (
                "host.invalid # test",
                Some(Entry::Domain("host.invalid".into())),
            ),
            ("1a", Some(Entry::Domain("1a".into()))),
        ];
        for (line, expected) in table {
            assert_eq!(parse_line(line), Ok(expected.clone()), "{line:?}");
        }
    }

    #[test]
    fn bad_lines() {
        let long_label = format!("{}.example", "a".repeat(64));
        let long_name = format!("{}.example", ["a"; 125].join("."));
        let max_name = format!("{}.example", ["a"; 123].join("."));
        assert_eq!(max_name.len(), 253);
        assert!(parse_line(&max_name).is_ok());
        let table: &[(&str, &str)] = &[
            (
                "192.0.2.1/24",
                "invalid CIDR \"192.0.2.1/24\": host bits are set; did you mean 192.0.2.0/24?",
            ),
            (
                "2001:db8::1/32",
                "invalid CIDR \"2001:db8::1/32\": host bits are set; did you mean 2001:db8::/32?",
            ),
            (
                "192.0.2.0/33",
                "invalid CIDR \"192.0.2.0/33\": prefix length must be 0 to 32",
            ),
            (
                "example.com/24",
                "invalid CIDR \"example.com/24\": expected an address or block such as \
                 \"192.0.2.0/24\" or \"2001:db8::/32\"",
            ),
            (
                "2001:db8::zz",
                "invalid CIDR \"2001:db8::zz\": expected an address or block such as \
                 \"192.0.2.0/24\" or \"2001:db8::/32\"",
            ),
            (
                "[2001:db8::1]",
                "invalid CIDR \"[2001:db8::1]\": expected an address or block such as \
                 \"192.0.2.0/24\" or \"2001:db8::/32\"",
            ),
            (
                "192.0.2.256",
                "invalid IP address \"192.0.2.256\": expected four numbers from 0 to 255 \
                 without leading zeros, such as 192.0.2.7",
            ),
            (
                "192.0.2",
                "invalid IP address \"192.0.2\": expected four numbers from 0 to 255 without \
                 leading zeros, such as 192.0.2.7",
            ),
            (
                "192.000.2.7",
                "invalid IP address \"192.000.2.7\": expected four numbers from 0 to 255 \
                 without leading zeros, such as 192.0.2.7",
            ),
            (
                "192.0.2.7.",
                "invalid IP address \"192.0.2.7.\": expected four numbers from 0 to 255 \
                 without leading zeros, such as 192.0.2.7",
            ),
            (
                "host.123",
                "invalid domain \"host.123\": ends in a number, which no top-level domain is; \
                 an IP address has four numbers",
            ),
            (
                "192.0.2.7 192.0.2.8",
                "more than one entry on one line (\"192.0.2.7 192.0.2.8\"); put each on a line \
                 of its own",
            ),
            (
                "example.com\texample.net # two",
                "more than one entry on one line (\"example.com\\texample.net\"); put each on \
                 a line of its own",
            ),
            (
                "*.example.com",
                "invalid domain \"*.example.com\": a domain already matches every name under \
                 it; write example.com",
            ),
            (
                "mail*.example.com",
                "invalid domain \"mail*.example.com\": '*' is not a wildcard here; a domain \
                 already matches every name under it",
            ),
            (
                "example.com,example.net",
                "invalid domain \"example.com,example.net\": ',' is not a separator here; put \
                 one entry per line",
            ),
            (
                "bücher.example",
                "invalid domain \"bücher.example\": 'ü' is not ASCII; write an \
                 internationalized name in its xn-- form",
            ),
            (
                "exa\0mple.com",
                "invalid domain \"exa\\0mple.com\": '\\0' is not allowed; use letters, digits, \
                 hyphens, underscores and dots",
            ),
            (
                "user@example.com",
                "invalid domain \"user@example.com\": '@' is not allowed; use letters, digits, \
                 hyphens, underscores and dots",
            ),
            (
                "example..com",
                "invalid domain \"example..com\": empty label (two dots in a row, or a dot at \
                 the start)",
            ),
            (
                ".example.com",
                "invalid domain \".example.com\": empty label (two dots in a row, or a dot at \
                 the start)",
            ),
            (
                "example.com..",
                "invalid domain \"example.com..\": empty label (two dots in a row, or a dot at \
                 the start)",
            ),
            (
                &long_label,
                &format!("invalid domain {long_label:?}: a label is longer than 63 characters"),
            ),
            (
                &long_name,
                &format!("invalid domain {long_name:?}: longer than 253 characters"),
            ),
        ];
        for (line, message) in table {
            assert_eq!(parse_line(line), Err(message.to_string()), "{line:?}");
        }
        // The root alone is all digits and dots: an address cut short, not the root domain.
        assert!(parse_line(".").is_err());
    }

    #[test]
    fn ip_matching() {
        let list = list(
            "192.0.2.7\n\
             198.51.100.0/24\n\
             203.0.113.128/25\n\
             2001:db8::7\n\
             2001:db8:1::/48\n\
             ::ffff:203.0.113.0/124\n",
        );
        let table = [
            ("192.0.2.7", true),
            ("192.0.2.6", false),
            ("192.0.2.8", false),
            ("198.51.100.0", true),
            ("198.51.100.255", true),
            ("198.51.99.255", false),
            ("198.51.101.0", false),
            ("203.0.113.127", false),
            ("203.0.113.128", true),
            ("203.0.113.255", true),
            // From the mapped entry ::ffff:203.0.113.0/124 = 203.0.113.0/28.
            ("203.0.113.0", true),
            ("203.0.113.15", true),
            ("203.0.113.16", false),
            // IPv4 clients seen through a dual-stack socket.
            ("::ffff:192.0.2.7", true),
            ("::ffff:192.0.2.8", false),
            ("::ffff:198.51.100.42", true),
            ("::ffff:203.0.113.1", true),
            // IPv4-compatible (not mapped) is IPv6, and no IPv6 entry covers it.
            ("::192.0.2.7", false),
            ("2001:db8::7", true),
            ("2001:db8::6", false),
            ("2001:db8::8", false),
            ("2001:db8:1::", true),
            ("2001:db8:1:ffff:ffff:ffff:ffff:ffff", true),
            ("2001:db8:2::", false),
            ("2001:db8:0:ffff:ffff:ffff:ffff:ffff", false),
            ("0.0.0.0", false),
            ("255.255.255.255", false),
            ("::", false),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", false),
        ];
        for (addr, expected) in table {
            assert_eq!(list.contains_ip(ip(addr)), expected, "{addr}");
        }
    }

    #[test]
    fn whole_ranges_and_families() {
        let all_v4 = list("0.0.0.0/0");
        assert!(all_v4.contains_ip(ip("0.0.0.0")));
        assert!(all_v4.contains_ip(ip("255.255.255.255")));
        assert!(all_v4.contains_ip(ip("::ffff:10.1.2.3")));
        assert!(!all_v4.contains_ip(ip("2001:db8::1")));
        // `::/0` means every IPv6 client, not IPv4 clients through their mapped form.
        let all_v6 = list("::/0");
        assert!(all_v6.contains_ip(ip("::")));
        assert!(all_v6.contains_ip(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!all_v6.contains_ip(ip("192.0.2.7")));
        assert!(!all_v6.contains_ip(ip("::ffff:192.0.2.7")));
        let empty = List::default();
        assert!(!empty.contains_ip(ip("192.0.2.7")));
        assert!(!empty.contains_domain("example.com"));
        assert!(!list("example.com").contains_ip(ip("192.0.2.7")));
        assert!(!list("192.0.2.7").contains_domain("example.com"));
    }

    #[test]
    fn merged_ranges() {
        let merged = list(
            "# overlapping, adjacent, contained and duplicate entries, out of order\n\
             192.0.2.0/25\n\
             192.0.2.128/25\n\
             192.0.2.7\n\
             192.0.2.7\n\
             198.51.100.0/24\n\
             198.51.100.7\n\
             203.0.113.9\n\
             203.0.113.8\n\
             255.255.255.255\n\
             255.255.255.254\n\
             0.0.0.0\n\
             2001:db8::/33\n\
             2001:db8:8000::/33\n\
             2001:db8::1\n\
             ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff\n",
        );
        assert_eq!(
            merged.v4,
            [
                (0, 0),
                (v4("192.0.2.0"), v4("192.0.2.255")),
                (v4("198.51.100.0"), v4("198.51.100.255")),
                (v4("203.0.113.8"), v4("203.0.113.9")),
                (v4("255.255.255.254"), u32::MAX),
            ]
        );
        assert_eq!(
            merged.v6,
            [
                (
                    v6("2001:db8::"),
                    v6("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")
                ),
                (u128::MAX, u128::MAX),
            ]
        );
        assert_eq!(merged.len(), 15);
        // Everything after a range reaching the maximum folds into it.
        let mut ranges = vec![(5u8, 255), (7, 9), (250, 255), (0, 3)];
        merge(&mut ranges, |end| end.checked_add(1));
        assert_eq!(ranges, [(0, 3), (5, 255)]);
        let mut ranges = vec![(4u8, 6), (0, 3), (8, 8), (7, 7)];
        merge(&mut ranges, |end| end.checked_add(1));
        assert_eq!(ranges, [(0, 8)]);
    }

    #[test]
    fn domain_matching() {
        let list = list("example.com\nMail.Example.NET.\nlocalhost\n_spf.example.org\n");
        let table = [
            ("example.com", true),
            ("EXAMPLE.COM", true),
            ("example.com.", true),
            ("mail.example.com", true),
            ("a.b.c.example.com", true),
            ("A.B.Example.Com.", true),
            ("example.net", false),
            ("mail.example.net", true),
            ("MAIL.EXAMPLE.NET.", true),
            ("smtp.mail.example.net", true),
            ("xmail.example.net", false),
            ("notexample.com", false),
            ("example.com.evil.test", false),
            ("example.comx", false),
            ("com", false),
            ("localhost", true),
            ("localhost.", true),
            ("my.localhost", true),
            ("localhost.example", false),
            ("_spf.example.org", true),
            ("example.org", false),
            ("", false),
            (".", false),
            ("..", false),
            // Client-supplied junk is compared, never trusted to be a name.
            ("a..example.com", true),
            ("bad name.example.com", true),
            ("bücher.example.com", true),
            ("example.com..", false),
            ("[192.0.2.7]", false),
        ];
        for (name, expected) in table {
            assert_eq!(list.contains_domain(name), expected, "{name:?}");
        }
        let tld = self::list("com");
        assert!(tld.contains_domain("anything.com"));
        assert!(tld.contains_domain("COM."));
        assert!(!tld.contains_domain("anything.net"));
    }

    #[test]
    fn long_names_are_cheap_and_correct() {
        let list = list("example.com\n");
        // 4096 bytes of labels, as an over-long HELO might hold: only suffixes up to the
        // longest entry are hashed, and the match at the end is still found.
        let many_labels = format!("{}example.com", "a.".repeat(2042));
        assert!(list.contains_domain(&many_labels));
        let no_match = format!("{}example.net", "a.".repeat(2042));
        assert!(!list.contains_domain(&no_match));
        let one_label = "x".repeat(10_000);
        assert!(!list.contains_domain(&one_label));
    }

    #[test]
    fn large_list() {
        // 100 000 addresses and 100 000 domains; every other address, so nothing merges.
        let mut text = String::new();
        for i in 0..100_000u32 {
            let addr = Ipv4Addr::from(0x0a00_0000 + 2 * i);
            text.push_str(&format!("{addr}\nhost{i}.example.net\n"));
        }
        let list = list(&text);
        assert_eq!(list.len(), 200_000);
        assert_eq!(list.v4.len(), 100_000);
        for i in (0..100_000u32).step_by(997) {
            let listed = Ipv4Addr::from(0x0a00_0000 + 2 * i);
            let gap = Ipv4Addr::from(0x0a00_0000 + 2 * i + 1);
            assert!(list.contains_ip(IpAddr::V4(listed)), "{listed}");
            assert!(!list.contains_ip(IpAddr::V4(gap)), "{gap}");
            assert!(list.contains_domain(&format!("mx.HOST{i}.example.net")));
            assert!(!list.contains_domain(&format!("host{i}x.example.net")));
        }
        assert!(!list.contains_ip(ip("9.255.255.255")));
        assert!(!list.contains_ip(ip(&Ipv4Addr::from(0x0a00_0000 + 200_000).to_string())));
    }

    #[test]
    fn errors_from_every_file() {
        let files = [
            (
                PathBuf::from("/etc/tarmac/allow.txt"),
                "192.0.2.7\n192.0.2.1/24   # office\n\nexample.com\n".to_owned(),
            ),
            (
                PathBuf::from("/etc/tarmac/allow-ok.txt"),
                "198.51.100.0/24\n".to_owned(),
            ),
            (
                PathBuf::from("/etc/tarmac/allow2.txt"),
                "# header\r\nbad name\r\n*.example.net\r\n".to_owned(),
            ),
        ];
        let errors = List::parse(&files).unwrap_err();
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "/etc/tarmac/allow.txt:2: invalid CIDR \"192.0.2.1/24\": host bits are set; did \
                 you mean 192.0.2.0/24?",
                "/etc/tarmac/allow2.txt:2: more than one entry on one line (\"bad name\"); put \
                 each on a line of its own",
                "/etc/tarmac/allow2.txt:3: invalid domain \"*.example.net\": a domain already \
                 matches every name under it; write example.net",
            ]
        );
        assert!(errors.iter().all(|e| e.key.is_empty()));
    }

    #[test]
    fn files_combine_in_any_order() {
        let a = (
            PathBuf::from("a.txt"),
            "192.0.2.0/25\nexample.com\n".to_owned(),
        );
        let b = (
            PathBuf::from("b.txt"),
            "\u{feff}192.0.2.128/25\r\n2001:db8::/32\r\nEXAMPLE.net".to_owned(),
        );
        let ab = List::parse(&[a.clone(), b.clone()]).unwrap();
        let ba = List::parse(&[b, a]).unwrap();
        assert_eq!(ab, ba);
        assert_eq!(ab.len(), 5);
        assert_eq!(
            ab,
            list("example.net\n2001:db8::/32\nexample.com\n192.0.2.0/24\n192.0.2.0/24")
        );
        assert_eq!(ab.v4, [(v4("192.0.2.0"), v4("192.0.2.255"))]);
        assert!(ab.contains_domain("example.net"));
        assert!(List::parse(&[]).unwrap().is_empty());
        assert!(list("# nothing\n\n").is_empty());
    }

    #[test]
    fn allow_wins() {
        let set = ListSet {
            allow: list("192.0.2.7\n2001:db8::7\ngood.example.com\n"),
            deny: list("192.0.2.0/24\n2001:db8::/32\nexample.com\n"),
        };
        let ips = [
            ("192.0.2.7", Some(ListMatch::Allow)),
            ("::ffff:192.0.2.7", Some(ListMatch::Allow)),
            ("192.0.2.8", Some(ListMatch::Deny)),
            ("2001:db8::7", Some(ListMatch::Allow)),
            ("2001:db8::8", Some(ListMatch::Deny)),
            ("198.51.100.7", None),
            ("2001:db9::7", None),
        ];
        for (addr, expected) in ips {
            assert_eq!(set.check_ip(ip(addr)), expected, "{addr}");
        }
        let names = [
            ("good.example.com", Some(ListMatch::Allow)),
            ("mx.GOOD.example.com.", Some(ListMatch::Allow)),
            ("bad.example.com", Some(ListMatch::Deny)),
            ("example.com", Some(ListMatch::Deny)),
            ("example.net", None),
        ];
        for (name, expected) in names {
            assert_eq!(set.check_domain(name), expected, "{name}");
        }
        assert_eq!(ListSet::default().check_ip(ip("192.0.2.7")), None);
    }

    /// The example files shipped in `blocklists/` parse, change nothing (every example is
    /// commented out), and each example, uncommented, is a valid entry from the documentation
    /// ranges (RFC 5737, RFC 3849) or reserved names (RFC 2606).
    #[test]
    fn shipped_list_files() {
        let shipped = [
            (
                "blocklists/allow.txt",
                include_str!("../../blocklists/allow.txt"),
            ),
            (
                "blocklists/deny.txt",
                include_str!("../../blocklists/deny.txt"),
            ),
        ];
        let documentation: [Cidr; 4] = [
            "192.0.2.0/24".parse().unwrap(),
            "198.51.100.0/24".parse().unwrap(),
            "203.0.113.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        for (path, text) in shipped {
            let list = List::parse(&[(PathBuf::from(path), text.to_owned())]).unwrap();
            assert!(
                list.is_empty(),
                "{path} has an entry that is not commented out"
            );
            // Examples are `#entry` (no space); prose is `# text`.
            let mut examples = 0;
            for line in text.lines() {
                let Some(example) = line.strip_prefix('#') else {
                    continue;
                };
                if example.is_empty() || example.starts_with([' ', '#']) {
                    continue;
                }
                examples += 1;
                let entry = parse_line(example)
                    .unwrap_or_else(|e| panic!("{path}: {line:?}: {e}"))
                    .unwrap_or_else(|| panic!("{path}: {line:?} holds no entry"));
                let word = example.split('#').next().unwrap().trim();
                match entry {
                    Entry::Domain(name) => assert!(
                        ["example.com", "example.net", "invalid"]
                            .iter()
                            .any(|reserved| *name == **reserved
                                || name.ends_with(&format!(".{reserved}"))),
                        "{path}: {name} is not a reserved name"
                    ),
                    Entry::V4(..) | Entry::V6(..) => {
                        let cidr: Cidr = word.parse().unwrap();
                        let last = match block(cidr) {
                            Entry::V4(_, end) => IpAddr::V4(Ipv4Addr::from(end)),
                            Entry::V6(_, end) => IpAddr::V6(Ipv6Addr::from(end)),
                            Entry::Domain(_) => unreachable!(),
                        };
                        assert!(
                            documentation
                                .iter()
                                .any(|doc| doc.contains(cidr.addr) && doc.contains(last)),
                            "{path}: {word} is outside the documentation ranges"
                        );
                    }
                }
            }
            assert!(examples >= 5, "{path} has only {examples} examples");
        }
    }
}
