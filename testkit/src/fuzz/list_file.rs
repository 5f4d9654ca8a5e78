//! The `list_file` target: allow and deny list files, against a linear model.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use tarmac::config::Cidr;
use tarmac::policy::List;

use super::vocabulary;

/// Parses the input as a list file (`[lists]`), and again built from list entries and their
/// pieces.
///
/// Properties: each line is judged alone: a line's error is the same inside the file as on its
/// own, and a file whose lines all parse alone parses; errors name the path, a line inside the
/// text and no key, and display as one line; `len` counts the lines with an entry; reversing
/// the lines or splitting the file in two gives an equal list; lookups agree with a linear
/// model built from each line with `config::Cidr` (addresses around each block's ends and from
/// the input) and with plain suffix comparison (each domain, names under it, in upper case,
/// with a trailing dot, and near misses). A second list, of blocks whose addresses and prefix
/// lengths come from the first half of the input's bytes, is checked against that model too,
/// with addresses from the whole input: text rarely spells out wide or overlapping blocks.
pub fn list_file(data: &[u8]) {
    list_text(&String::from_utf8_lossy(data));
    list_text(&vocabulary(data, LIST_TOKENS));
    list_probes(data);
}

const LIST_PATH: &str = "/fuzz/allow.txt";

/// Entries of each kind checked against the model per input; each costs a scan of all entries.
const LIST_MODEL_ENTRIES: usize = 32;

/// One line's entry, as the model reads it.
enum ModelEntry {
    Net(Cidr),
    Domain(String),
}

fn list_text(text: &str) {
    let path = PathBuf::from(LIST_PATH);
    let parse = |files: &[&str]| {
        let files: Vec<(PathBuf, String)> = files
            .iter()
            .map(|text| (path.clone(), (*text).to_owned()))
            .collect();
        List::parse(&files)
    };
    let whole = parse(&[text]);
    // A byte order mark is skipped only at the start of a file, so it stays with line 1.
    let body = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = body.lines().collect();
    let mut expected_errors = Vec::new();
    let mut entries = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        // Alone, but on line 2, so a byte order mark inside the file stays an error here too.
        match parse(&[&format!("\n{line}")]) {
            Ok(alone) => match alone.len() {
                0 => {}
                1 => entries.push(model_entry(line)),
                n => panic!("{n} entries from one line {line:?}"),
            },
            Err(mut errors) => {
                assert_eq!(errors.len(), 1, "{errors:?} from one line {line:?}");
                let mut error = errors.remove(0);
                assert_eq!(error.line, 2, "{error:?}");
                error.line = i + 1;
                expected_errors.push(error);
            }
        }
    }
    let list = match whole {
        Err(errors) => {
            assert!(!errors.is_empty(), "error without errors for {text:?}");
            for error in &errors {
                let shown = error.to_string();
                assert!(
                    !shown.contains(['\n', '\r']) && !error.message.trim().is_empty(),
                    "{shown:?} for {text:?}"
                );
                assert!(error.key.is_empty(), "{error:?}");
                let line = error.line;
                assert!(
                    shown.starts_with(&format!("{LIST_PATH}:{line}: ")),
                    "{shown:?}"
                );
            }
            assert_eq!(
                errors, expected_errors,
                "errors in the file and line by line"
            );
            return;
        }
        Ok(list) => list,
    };
    assert_eq!(
        expected_errors,
        [],
        "lines that fail alone pass in {text:?}"
    );
    assert_eq!(list.len(), entries.len(), "entries in {text:?}");
    assert_eq!(list.is_empty(), entries.is_empty());

    let reversed: Vec<&str> = lines.iter().rev().copied().collect();
    assert_eq!(
        parse(&[&reversed.join("\n")]).as_ref(),
        Ok(&list),
        "reversed lines of {text:?}"
    );
    let (head, tail) = lines.split_at(lines.len() / 2);
    assert_eq!(
        parse(&[&head.join("\n"), &tail.join("\n")]).as_ref(),
        Ok(&list),
        "{text:?} split in two files"
    );

    let nets: Vec<Cidr> = entries
        .iter()
        .filter_map(|entry| match entry {
            ModelEntry::Net(cidr) => Some(*cidr),
            ModelEntry::Domain(_) => None,
        })
        .collect();
    let domains: Vec<&str> = entries
        .iter()
        .filter_map(|entry| match entry {
            ModelEntry::Domain(name) => Some(name.as_str()),
            ModelEntry::Net(_) => None,
        })
        .collect();
    for cidr in nets.iter().take(LIST_MODEL_ENTRIES) {
        let (first, last) = cidr_ends(cidr);
        assert!(list.contains_ip(first), "{cidr} lacks {first}");
        assert!(list.contains_ip(last), "{cidr} lacks {last}");
        for probe in [Some(first), Some(last), step(first, -1), step(last, 1)]
            .into_iter()
            .flatten()
        {
            check_ip_probe(&list, &nets, probe);
        }
    }
    for domain in domains.iter().take(LIST_MODEL_ENTRIES) {
        let upper = domain.to_ascii_uppercase();
        for name in [
            domain.to_string(),
            format!("{domain}."),
            format!("x.{domain}"),
            format!("X.{upper}."),
            upper,
        ] {
            assert!(list.contains_domain(&name), "{domain} lacks {name:?}");
        }
        let parent = domain.split_once('.').map_or("", |(_, parent)| parent);
        for name in [
            format!("x{domain}"),
            format!("{domain}.x"),
            format!("{domain}.."),
            parent.to_owned(),
        ] {
            let expected = model_contains_domain(&domains, &name);
            assert_eq!(
                list.contains_domain(&name),
                expected,
                "{name:?} in {text:?}"
            );
        }
    }
    for probe in input_probes(body.as_bytes()) {
        check_ip_probe(&list, &nets, probe);
    }
}

/// A list of blocks read from the first half of the input in binary, checked at addresses
/// from the whole input.
fn list_probes(data: &[u8]) {
    let (entries, probes) = data.split_at(data.len() / 2);
    let mut text = String::new();
    let mut nets = Vec::new();
    for (i, probe) in input_probes(entries).into_iter().enumerate() {
        let max = if probe.is_ipv4() { 32 } else { 128 };
        let prefix = entries.get(i).map_or(max, |b| b % (max + 1));
        let Ok(cidr) = format!("{}/{prefix}", mask(probe, prefix)).parse::<Cidr>() else {
            panic!("{probe} masked to /{prefix} is not a block");
        };
        text.push_str(&format!("{cidr}\n"));
        nets.push(cidr);
    }
    let path = PathBuf::from(LIST_PATH);
    let list = List::parse(&[(path, text.clone())])
        .unwrap_or_else(|errors| panic!("{errors:?} from {text:?}"));
    for probe in input_probes(probes)
        .into_iter()
        .chain(input_probes(entries))
    {
        check_ip_probe(&list, &nets, probe);
    }
}

/// The entry on a line that parses alone to one entry: a `Cidr` if it reads as one, else a
/// domain, lowercase without its trailing dot.
fn model_entry(line: &str) -> ModelEntry {
    let word = line.split('#').next().unwrap_or_default().trim();
    match word.parse::<Cidr>() {
        Ok(cidr) => ModelEntry::Net(cidr),
        Err(_) => {
            assert!(
                !word.contains([':', '/']),
                "{word:?} accepted, but not as an address or block"
            );
            let name = word.strip_suffix('.').unwrap_or(word);
            ModelEntry::Domain(name.to_ascii_lowercase())
        }
    }
}

fn check_ip_probe(list: &List, nets: &[Cidr], probe: IpAddr) {
    let mut forms = vec![probe];
    if let IpAddr::V4(v4) = probe {
        forms.push(IpAddr::V6(v4.to_ipv6_mapped()));
    }
    for form in forms {
        let expected = nets.iter().any(|cidr| model_contains_ip(cidr, form));
        assert_eq!(list.contains_ip(form), expected, "{form} in {nets:?}");
    }
}

/// `Cidr::contains`, with a block written in IPv4-mapped form (`::ffff:192.0.2.0/120`) read as
/// the IPv4 block it means, as lists store it.
fn model_contains_ip(cidr: &Cidr, ip: IpAddr) -> bool {
    let cidr = match cidr.addr {
        IpAddr::V6(v6) if cidr.prefix >= 96 => match v6.to_ipv4_mapped() {
            Some(v4) => Cidr {
                addr: IpAddr::V4(v4),
                prefix: cidr.prefix - 96,
            },
            None => *cidr,
        },
        _ => *cidr,
    };
    cidr.contains(ip)
}

fn model_contains_domain(domains: &[&str], name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    domains
        .iter()
        .any(|domain| name == *domain || name.ends_with(&format!(".{domain}")))
}

/// A block's first and last address, computed in `u128` so no shift overflows.
fn cidr_ends(cidr: &Cidr) -> (IpAddr, IpAddr) {
    let (start, bits) = match cidr.addr {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    };
    let hosts = u32::from(bits - cidr.prefix);
    let span = if hosts == 128 {
        u128::MAX
    } else {
        (1u128 << hosts) - 1
    };
    (cidr.addr, from_bits(cidr.addr.is_ipv4(), start | span))
}

/// The address `delta` (±1) away, if it stays in the family's range.
fn step(ip: IpAddr, delta: i8) -> Option<IpAddr> {
    Some(match ip {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(
            u32::from(v4).checked_add_signed(i32::from(delta))?,
        )),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(
            u128::from(v6).checked_add_signed(i128::from(delta))?,
        )),
    })
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    let (bits, width) = match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    };
    let hosts = width - u32::from(prefix);
    let kept = if hosts == 128 {
        0
    } else {
        bits >> hosts << hosts
    };
    from_bits(ip.is_ipv4(), kept)
}

fn from_bits(v4: bool, bits: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

/// Addresses read from the input: alternately 4 bytes as IPv4 and 16 as IPv6, at most 16.
fn input_probes(data: &[u8]) -> Vec<IpAddr> {
    let mut probes = Vec::new();
    let mut rest = data;
    while probes.len() < 16 {
        if probes.len() % 2 == 0 {
            let Some((head, tail)) = rest.split_first_chunk::<4>() else {
                break;
            };
            probes.push(IpAddr::V4(Ipv4Addr::from(*head)));
            rest = tail;
        } else {
            let Some((head, tail)) = rest.split_first_chunk::<16>() else {
                break;
            };
            probes.push(IpAddr::V6(Ipv6Addr::from(*head)));
            rest = tail;
        }
    }
    probes
}

/// Entries, pieces of entries and syntax of list files; input bytes pick from it.
const LIST_TOKENS: &[&str] = &[
    "\n",
    "\n",
    "\r\n",
    " ",
    "\t",
    "#",
    " # comment\n",
    ".",
    ":",
    "::",
    "/",
    "0",
    "1",
    "2",
    "7",
    "9",
    "25",
    "255",
    "256",
    "00",
    "ff",
    "ffff",
    "192.0.2.",
    "192.0.2.7",
    "198.51.100.0/24",
    "203.0.113.128/25",
    "192.0.2.1/24",
    "0.0.0.0/0",
    "::/0",
    "2001:db8::",
    "2001:db8::/32",
    "::ffff:",
    "::ffff:192.0.2.0/120",
    "/8",
    "/16",
    "/24",
    "/25",
    "/31",
    "/32",
    "/33",
    "/48",
    "/64",
    "/96",
    "/120",
    "/127",
    "/128",
    "example.com",
    "EXAMPLE.net",
    "mail.",
    "x.",
    "-",
    "_",
    "*.",
    "*",
    ",",
    "xn--",
    "\u{e9}",
    ".invalid",
    "localhost",
    "a",
    "\u{feff}",
    "\0",
];
