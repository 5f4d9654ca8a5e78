//! The config reader's tests: every section, every error message, the shipped example and docs.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::*;

const EXAMPLE: &str = include_str!("../../examples/tarmac.toml");
const DOCS: &str = include_str!("../../docs/configuration.md");
const PATH: &str = "/etc/tarmac/tarmac.toml";

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_toml(text, Path::new(PATH))
}

/// The errors of `text`, one `path:line: key: message` per line.
#[track_caller]
fn errors(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("expected errors, the config was accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// What an empty file at [`PATH`] must give: the defaults, paths anchored in /etc/tarmac.
fn defaults_at_path() -> Config {
    let mut config = Config::default();
    document::resolve_paths(&mut config, Path::new("/etc/tarmac"));
    config.path = Some(PathBuf::from(PATH));
    config
}

#[test]
fn empty_file_gives_defaults() {
    let config = parse("").unwrap();
    assert_eq!(config, defaults_at_path());
    assert_eq!(config.server.listen, [SocketAddr::from(([0, 0, 0, 0], 25))]);
    assert!(config.server.workers >= 1);
    assert!(config.dnsbl.is_empty());
    assert_eq!(
        config.lists.allow,
        [PathBuf::from("/etc/tarmac/blocklists/allow.txt")]
    );
    assert_eq!(
        config.rules.files,
        [PathBuf::from("/etc/tarmac/rules/default.toml")]
    );
    assert_eq!(config.server.state_dir, PathBuf::from("/var/lib/tarmac"));
    assert_eq!(config.tls.cert, None);
    assert_eq!(config.metrics.listen, None);
    assert!(config.dns.servers.is_empty());
}

#[test]
fn default_hostname_is_a_dns_name() {
    let config = Config::default();
    assert_eq!(syntax::check_hostname(&config.server.hostname), Ok(()));
}

#[test]
fn example_file_equals_defaults() {
    let config = match parse(EXAMPLE) {
        Ok(config) => config,
        Err(e) => panic!("examples/tarmac.toml does not parse:\n{e}"),
    };
    assert_eq!(config, defaults_at_path());
    // Spelled out, so a wrong default cannot hide behind an equally wrong example.
    assert_eq!(config.limits.max_message_size, 25_000_000);
    assert_eq!(
        config.limits.connection_rate_per_ip,
        Rate {
            count: 30,
            per: Duration::from_secs(60)
        }
    );
    assert_eq!(
        config.limits.connection_rate_per_subnet,
        Rate {
            count: 120,
            per: Duration::from_secs(60)
        }
    );
    assert_eq!(config.timeouts.command, Duration::from_secs(300));
    assert_eq!(config.dns.cache_ttl, Duration::from_secs(3600));
    assert_eq!(config.tarpit.pass_ttl, Duration::from_secs(86_400));
    assert_eq!(config.greylist.pass_ttl, Duration::from_secs(36 * 86_400));
    assert_eq!(config.reputation.half_life, Duration::from_secs(7 * 86_400));
    assert_eq!(config.limits.max_connections_per_subnet, 100);
    assert_eq!(config.limits.max_junk_commands, 100);
    assert_eq!(config.limits.max_errors, 20);
    assert_eq!(config.greylist.max_entries, 500_000);
    assert_eq!(config.greylist.max_new_per_subnet, 1000);
    assert_eq!(
        config.downstream.servers,
        [SocketAddr::from(([127, 0, 0, 1], 10025))]
    );
}

#[test]
fn example_commented_dnsbl_tables_parse() {
    let uncommented: String = EXAMPLE
        .lines()
        .skip_while(|line| !line.starts_with("# [[dnsbl]]"))
        .take_while(|line| line.starts_with('#'))
        .map(|line| line.trim_start_matches('#').trim_start())
        .collect::<Vec<_>>()
        .join("\n");
    let config = parse(&uncommented).unwrap();
    assert_eq!(
        config.dnsbl,
        [
            Dnsbl {
                zone: "zen.spamhaus.org".into(),
                weight: 3,
                codes: vec![(Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 11))],
                reply: Some("client listed, see https://example.org/lookup".to_owned()),
            },
            Dnsbl {
                zone: "list.dnswl.org".into(),
                weight: -2,
                codes: Vec::new(),
                reply: None,
            },
        ]
    );
}

/// The example sets every key but `hostname` (whose default depends on the machine) and the
/// commented-out `[[dnsbl]]` tables; the docs have a table row for every key.
#[test]
fn example_and_docs_cover_every_key() {
    let doc = toml::de::DeTable::parse(EXAMPLE).unwrap();
    let mut in_example = BTreeSet::new();
    for (section, value) in doc.get_ref() {
        for (key, _) in value.get_ref().as_table().unwrap() {
            in_example.insert(format!("{}.{}", section.get_ref(), key.get_ref()));
        }
    }
    let mut in_schema = BTreeSet::new();
    for (section, keys) in document::SCHEMA {
        for key in *keys {
            assert!(
                DOCS.contains(&format!("| `{key}` |")),
                "docs/configuration.md has no row for {section}.{key}"
            );
            if *section != "dnsbl" && (*section, *key) != ("server", "hostname") {
                in_schema.insert(format!("{section}.{key}"));
            }
        }
    }
    assert_eq!(in_example, in_schema);
}

#[test]
fn all_errors_are_reported_with_lines() {
    let text = r#"
[server]
workers = 5000
listen = []

[limits]
max_message_size = "25XB"
bare_newline = "strip"

[timeouts]
connect = "0s"
idle = 600
"#;
    assert_eq!(
        errors(text),
        r#"/etc/tarmac/tarmac.toml:3: server.workers: must be from 0 to 1024, got 5000
/etc/tarmac/tarmac.toml:4: server.listen: must not be empty; give at least one address such as "0.0.0.0:25"
/etc/tarmac/tarmac.toml:7: limits.max_message_size: invalid size "25XB": expected a number with a unit such as "64KB", "25MB", "10MiB"
/etc/tarmac/tarmac.toml:8: limits.bare_newline: unknown value "strip"; expected one of: reject, normalize
/etc/tarmac/tarmac.toml:11: timeouts.connect: must be longer than 0s
/etc/tarmac/tarmac.toml:12: timeouts.idle: expected a duration such as "30s", found integer"#
    );
}

#[test]
fn unknown_key() {
    assert_eq!(
        errors("[timeouts]\nconect = \"30s\"\n"),
        "/etc/tarmac/tarmac.toml:2: timeouts.conect: unknown key; expected one of: connect, \
             command, data, idle, drain"
    );
}

#[test]
fn unknown_section() {
    assert_eq!(
        errors("[limit]\nmax_recipients = 5\n"),
        "/etc/tarmac/tarmac.toml:1: limit: unknown section; expected one of: server, limits, \
             timeouts, downstream, tls, dns, dnsbl, scoring, tarpit, greylist, reputation, \
             state, metrics, lists, rules, content, transparent"
    );
    assert_eq!(
        errors("max_recipients = 5\n"),
        "/etc/tarmac/tarmac.toml:1: max_recipients: unknown section; expected one of: \
             server, limits, timeouts, downstream, tls, dns, dnsbl, scoring, tarpit, greylist, \
             reputation, state, metrics, lists, rules, content, transparent"
    );
}

#[test]
fn wrong_types() {
    let text = r#"[server]
listen = "0.0.0.0:25"
max_connections = "many"
[dns]
rdns = "yes"
servers = [53]
[limits]
max_recipients = 1.5
[tarpit]
pregreet = false
[metrics]
listen = 9425
[state]
prefix = ""
[scoring]
reject_mode = ["enforce"]
tarpit_at = 2
reject_at = 5
allow_at = 0
[rules]
files = "rules.toml"
[lists]
"#;
    assert_eq!(
        errors(text),
        r#"/etc/tarmac/tarmac.toml:2: server.listen: expected an array, found string
/etc/tarmac/tarmac.toml:3: server.max_connections: expected an integer, found string
/etc/tarmac/tarmac.toml:5: dns.rdns: expected true or false, found string
/etc/tarmac/tarmac.toml:6: dns.servers[0]: expected an address such as "192.0.2.53", found integer
/etc/tarmac/tarmac.toml:8: limits.max_recipients: expected an integer, found float
/etc/tarmac/tarmac.toml:10: tarpit.pregreet: expected one of: ignore, reject, drop, found boolean
/etc/tarmac/tarmac.toml:12: metrics.listen: expected an address such as "127.0.0.1:9425", or "", found integer
/etc/tarmac/tarmac.toml:14: state.prefix: must not be empty; for example "tarmac:"
/etc/tarmac/tarmac.toml:16: scoring.reject_mode: expected one of: immediate, enforce, found array
/etc/tarmac/tarmac.toml:21: rules.files: expected an array, found string"#
    );
    assert_eq!(
        errors("server = 1\n"),
        "/etc/tarmac/tarmac.toml:1: server: expected a table [server], found integer"
    );
}

#[test]
fn integers_that_do_not_fit_are_errors() {
    let text = "[limits]
max_connections_per_ip = 4294967296
max_unknown_commands = -1
max_line_length = 511
[reputation]
weight = 2147483648
[scoring]
reject_at = -9223372036854775808
[server]
max_tarpitted = -1
max_connections = 0
";
    assert_eq!(
        errors(text),
        "/etc/tarmac/tarmac.toml:2: limits.max_connections_per_ip: 4294967296 is too large
/etc/tarmac/tarmac.toml:3: limits.max_unknown_commands: must be from 0 to 1000, got -1
/etc/tarmac/tarmac.toml:4: limits.max_line_length: must be from 512 to 65536, got 511
/etc/tarmac/tarmac.toml:6: reputation.weight: 2147483648 is out of range
/etc/tarmac/tarmac.toml:8: scoring.reject_at: -9223372036854775808 is out of range
/etc/tarmac/tarmac.toml:10: server.max_tarpitted: must be at least 0, got -1
/etc/tarmac/tarmac.toml:11: server.max_connections: must be at least 1, got 0"
    );
}

#[test]
fn abuse_bounds_are_read_and_checked() {
    let config = parse(
        "[limits]
max_connections_per_subnet = 7
max_junk_commands = 5
max_errors = 3
[greylist]
max_entries = 2000
max_new_per_subnet = 9
",
    )
    .unwrap();
    assert_eq!(config.limits.max_connections_per_subnet, 7);
    assert_eq!(config.limits.max_junk_commands, 5);
    assert_eq!(config.limits.max_errors, 3);
    assert_eq!(config.greylist.max_entries, 2000);
    assert_eq!(config.greylist.max_new_per_subnet, 9);

    let text = "[limits]
max_connections_per_subnet = 0
max_junk_commands = 200000
max_errors = \"20\"
[greylist]
max_entries = 999
max_new_per_subnet = 0
";
    assert_eq!(
        errors(text),
        "/etc/tarmac/tarmac.toml:2: limits.max_connections_per_subnet: must be at least 1, got 0
/etc/tarmac/tarmac.toml:3: limits.max_junk_commands: must be from 0 to 100000, got 200000
/etc/tarmac/tarmac.toml:4: limits.max_errors: expected an integer, found string
/etc/tarmac/tarmac.toml:6: greylist.max_entries: must be from 1000 to 1000000, got 999
/etc/tarmac/tarmac.toml:7: greylist.max_new_per_subnet: must be at least 1, got 0"
    );
}

#[test]
fn integers_in_other_radixes() {
    let config = parse("[server]\nworkers = 0x10\nmax_connections = 1_000\n").unwrap();
    assert_eq!(config.server.workers, 16);
    assert_eq!(config.server.max_connections, 1000);
}

#[test]
fn message_size_forms() {
    let size = |text: &str| parse(text).map(|c| c.limits.max_message_size);
    assert_eq!(size("limits.max_message_size = \"10MiB\""), Ok(10_485_760));
    assert_eq!(size("limits.max_message_size = 1048576"), Ok(1_048_576));
    assert_eq!(
        errors("limits.max_message_size = \"999B\""),
        "/etc/tarmac/tarmac.toml:1: limits.max_message_size: must be at least 1KB, got 999 \
             bytes"
    );
    assert_eq!(
        errors("limits.max_message_size = -5"),
        "/etc/tarmac/tarmac.toml:1: limits.max_message_size: -5 is out of range"
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let text = "[server]\nworkers = = 4\n\n[limits]\nbare_newline = \"reject\n";
    assert_eq!(
        errors(text),
        "/etc/tarmac/tarmac.toml:2: toml: extra `=`, expected nothing\n\
             /etc/tarmac/tarmac.toml:5: toml: invalid basic string, expected `\"`"
    );
    // An unclosed array runs on to the next line that cannot continue it.
    let text = "[server]\nlisten = [\"0.0.0.0:25\"\n\n[limits]\n";
    assert_eq!(
        errors(text),
        "/etc/tarmac/tarmac.toml:4: toml: missing comma between array elements, expected `,`"
    );

    let e = parse("[server]\nworkers = 4\nworkers = 5\n").unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert_eq!(
        e.to_string(),
        "/etc/tarmac/tarmac.toml:3: toml: duplicate key"
    );
}

#[test]
fn dnsbl_tables() {
    let text = r#"
[[dnsbl]]
zone = "zen.spamhaus.org"
weight = 3
codes = ["127.0.0.2", "127.0.0.10-127.0.0.11"]
reply = "listed"

[[dnsbl]]
zone = "list.dnswl.org"
weight = -2
"#;
    let config = parse(text).unwrap();
    let ip = |d| Ipv4Addr::new(127, 0, 0, d);
    assert_eq!(config.dnsbl.len(), 2);
    assert_eq!(&*config.dnsbl[0].zone, "zen.spamhaus.org");
    assert_eq!(config.dnsbl[0].codes, [(ip(2), ip(2)), (ip(10), ip(11))]);
    assert_eq!(config.dnsbl[0].reply.as_deref(), Some("listed"));
    assert_eq!(config.dnsbl[1].weight, -2);
    assert_eq!(config.dnsbl[1].reply, None);
}

#[test]
fn dnsbl_errors_name_the_table() {
    let text = r#"[[dnsbl]]
zone = "zen.spamhaus.org"
weight = 0
codes = ["127.0.0.2", "10.0.0.1"]

[[dnsbl]]
weight = 2
reply = "bad\r\nreply"
colour = "red"

[[dnsbl]]
zone = "ZEN.spamhaus.org"
weight = 1

[[dnsbl]]
zone = "zen.spamhaus.org"
weight = 1
"#;
    assert_eq!(
        errors(text),
        r#"/etc/tarmac/tarmac.toml:3: dnsbl[0].weight: must not be 0; a zone that adds nothing need not be queried
/etc/tarmac/tarmac.toml:4: dnsbl[0].codes[1]: invalid answer code "10.0.0.1": 10.0.0.1 is not in 127.0.0.0/8, where DNSBL answers live
/etc/tarmac/tarmac.toml:6: dnsbl[1].zone: missing; give the zone to query, such as zone = "zen.spamhaus.org"
/etc/tarmac/tarmac.toml:8: dnsbl[1].reply: '\r' is not allowed; reply text is one line of printable ASCII
/etc/tarmac/tarmac.toml:9: dnsbl[1].colour: unknown key; expected one of: zone, weight, codes, reply
/etc/tarmac/tarmac.toml:16: dnsbl[3].zone: zone "zen.spamhaus.org" is already dnsbl[2]"#
    );
    assert_eq!(
        errors("[dnsbl]\nzone = \"zen.spamhaus.org\"\nweight = 3\n"),
        "/etc/tarmac/tarmac.toml:1: dnsbl: expected an array of tables; write [[dnsbl]] with \
             double brackets, one table per zone"
    );
    assert_eq!(
        errors("[[dnsbl]]\nzone = \"zen.spamhaus.org\"\n"),
        "/etc/tarmac/tarmac.toml:1: dnsbl[0].weight: missing; give the score a listing \
             adds, such as weight = 3 (negative for an allowlist)"
    );
    assert_eq!(
        errors("[[dnsbl]]\nzone = \"zen spamhaus\"\nweight = 1\n"),
        "/etc/tarmac/tarmac.toml:2: dnsbl[0].zone: invalid DNS name \"zen spamhaus\": ' ' \
             is not allowed; use letters, digits, hyphens and dots"
    );
}

#[test]
fn relative_paths_are_anchored_at_the_config_directory() {
    let text = r#"
[server]
state_dir = "state"
[tls]
cert = "tls/cert.pem"
key = "/etc/ssl/private/key.pem"
[lists]
allow = ["allow.txt", "/srv/lists/allow.txt"]
deny = []
[rules]
files = ["rules/a.toml", "../shared/b.toml"]
"#;
    let config = Config::from_toml(text, Path::new("/srv/tarmac/tarmac.toml")).unwrap();
    assert_eq!(config.path, Some(PathBuf::from("/srv/tarmac/tarmac.toml")));
    assert_eq!(config.server.state_dir, PathBuf::from("/srv/tarmac/state"));
    assert_eq!(
        config.tls.cert,
        Some(PathBuf::from("/srv/tarmac/tls/cert.pem"))
    );
    assert_eq!(
        config.tls.key,
        Some(PathBuf::from("/etc/ssl/private/key.pem"))
    );
    assert_eq!(
        config.lists.allow,
        [
            PathBuf::from("/srv/tarmac/allow.txt"),
            PathBuf::from("/srv/lists/allow.txt")
        ]
    );
    assert!(config.lists.deny.is_empty());
    assert_eq!(
        config.rules.files,
        [
            PathBuf::from("/srv/tarmac/rules/a.toml"),
            PathBuf::from("/srv/tarmac/../shared/b.toml")
        ]
    );

    // A bare file name: relative to the working directory, where the file is.
    let config = Config::from_toml("", Path::new("tarmac.toml")).unwrap();
    assert_eq!(config.lists.deny, [PathBuf::from("blocklists/deny.txt")]);
}

#[test]
fn downstream_tls_ca_is_a_path_anchored_at_the_config_directory() {
    let config = parse("[downstream]\ntls_verify = true\ntls_ca = \"ca/down.pem\"\n").unwrap();
    assert_eq!(
        config.downstream.tls_ca,
        Some(PathBuf::from("/etc/tarmac/ca/down.pem"))
    );
    // Read only by `load`: `from_toml` does no I/O.
    assert!(config.downstream.tls_ca_certs.is_empty());
    assert_eq!(
        parse("downstream.tls_ca = \"\"").unwrap().downstream.tls_ca,
        None
    );
    assert_eq!(Config::default().downstream.tls_ca, None);
    assert_eq!(
        errors("[downstream]\ntls_ca = false\n"),
        "/etc/tarmac/tarmac.toml:2: downstream.tls_ca: expected a file path, or \"\" for \
             none, found boolean"
    );
}

#[test]
fn unreadable_or_garbled_tls_ca_names_the_file() {
    let dir = std::env::temp_dir().join(format!("tarmac-config-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let load = |ca: &str, contents: Option<&str>| {
        let file = dir.join(ca);
        if let Some(contents) = contents {
            std::fs::write(&file, contents).unwrap();
        }
        let mut config = parse(&format!(
            "downstream.tls_ca = {:?}",
            file.display().to_string()
        ))
        .unwrap();
        config.load_tls_ca().unwrap_err().to_string()
    };
    let path = |ca: &str| dir.join(ca).display().to_string();
    assert_eq!(
        load("missing.pem", None),
        format!(
            "{}: downstream.tls_ca: cannot read CA file: No such file or directory (os error 2)",
            path("missing.pem")
        )
    );
    assert_eq!(
        load("empty.pem", Some("no PEM here\n")),
        format!(
            "{}: downstream.tls_ca: no certificate in it; expected PEM \
                 \"-----BEGIN CERTIFICATE-----\" blocks",
            path("empty.pem")
        )
    );
    let broken = load(
        "broken.pem",
        Some("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
    );
    assert!(
        broken.starts_with(&format!(
            "{}: downstream.tls_ca: not a PEM certificate file: ",
            path("broken.pem")
        )),
        "{broken}"
    );
    let not_der = load(
        "junk.pem",
        Some("-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n"),
    );
    assert!(
        not_der.starts_with(&format!(
            "{}: downstream.tls_ca: certificate 1 of 1 is not usable as a CA: ",
            path("junk.pem")
        )),
        "{not_der}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ipv6_addresses() {
    let text = r#"
[server]
listen = ["[::]:25", "0.0.0.0:25", "[2001:db8::25]:2525"]
proxy_protocol_from = ["2001:db8:1::/48", "10.0.0.0/8"]
[downstream]
servers = ["[::1]:10025"]
[dns]
servers = ["::1", "[2001:db8::53]", "[2001:db8::53]:5353", "192.0.2.53"]
[metrics]
listen = "[::1]:9425"
"#;
    let config = parse(text).unwrap();
    let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    assert_eq!(
        config.server.listen,
        [
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 25)),
            SocketAddr::from(([0, 0, 0, 0], 25)),
            SocketAddr::from((v6("2001:db8::25"), 2525)),
        ]
    );
    assert_eq!(
        config.server.proxy_protocol_from,
        [
            Cidr {
                addr: IpAddr::V6(v6("2001:db8:1::")),
                prefix: 48
            },
            Cidr {
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)),
                prefix: 8
            },
        ]
    );
    assert_eq!(
        config.downstream.servers,
        [SocketAddr::from((Ipv6Addr::LOCALHOST, 10025))]
    );
    assert_eq!(
        config.dns.servers,
        [
            SocketAddr::from((Ipv6Addr::LOCALHOST, 53)),
            SocketAddr::from((v6("2001:db8::53"), 53)),
            SocketAddr::from((v6("2001:db8::53"), 5353)),
            SocketAddr::from(([192, 0, 2, 53], 53)),
        ]
    );
    assert_eq!(
        config.metrics.listen,
        Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 9425)))
    );
}

#[test]
fn address_errors() {
    let text = r#"
[server]
listen = ["::1:25", "localhost:25"]
proxy_protocol_from = ["192.0.2.1/24"]
[downstream]
servers = ["127.0.0.1:0"]
"#;
    assert_eq!(
        errors(text),
        r#"/etc/tarmac/tarmac.toml:3: server.listen[0]: invalid address "::1:25": expected ip:port such as "0.0.0.0:25" or "[::1]:25"
/etc/tarmac/tarmac.toml:3: server.listen[1]: invalid address "localhost:25": expected ip:port such as "0.0.0.0:25" or "[::1]:25"
/etc/tarmac/tarmac.toml:4: server.proxy_protocol_from[0]: invalid CIDR "192.0.2.1/24": host bits are set; did you mean 192.0.2.0/24?
/etc/tarmac/tarmac.toml:6: downstream.servers[0]: 127.0.0.1:0: port 0 cannot be connected to"#
    );
}

#[test]
fn checks_across_keys() {
    assert_eq!(
        errors("[scoring]\nallow_at = 1\ntarpit_at = 1\n"),
        "/etc/tarmac/tarmac.toml:3: scoring.tarpit_at: must be greater than scoring.allow_at \
             (1), got 1"
    );
    // Only the earlier key is in the file: the error goes there.
    assert_eq!(
        errors("[scoring]\nallow_at = 2\n"),
        "/etc/tarmac/tarmac.toml:2: scoring.allow_at: must be less than scoring.tarpit_at \
             (1), got 2"
    );
    assert_eq!(
        errors("[scoring]\nreject_at = 0\n"),
        "/etc/tarmac/tarmac.toml:2: scoring.reject_at: must be at least scoring.tarpit_at \
             (1), got 0"
    );
    assert!(parse("[scoring]\ntarpit_at = 3\nreject_at = 3\n").is_ok());
    // A key that failed to parse is not compared with its neighbours.
    assert_eq!(
        errors("[scoring]\nallow_at = 2\ntarpit_at = \"2\"\n"),
        "/etc/tarmac/tarmac.toml:3: scoring.tarpit_at: expected an integer, found string"
    );
    assert_eq!(
        errors("[tls]\ncert = 5\nkey = \"k.pem\"\n"),
        "/etc/tarmac/tarmac.toml:2: tls.cert: expected a file path, or \"\" for none, found \
             integer"
    );
    assert_eq!(
        errors("[greylist]\ndelay = \"5h\"\n"),
        "/etc/tarmac/tarmac.toml:2: greylist.delay: must be shorter than \
             greylist.retry_window (4h), got 5h"
    );
    assert_eq!(
        errors("[tls]\ncert = \"cert.pem\"\n"),
        "/etc/tarmac/tarmac.toml:2: tls.key: tls.cert is set but tls.key is not; give both \
             (STARTTLS on) or neither (off)"
    );
    assert_eq!(
        errors("[tls]\ncert = \"\"\nkey = \"key.pem\"\n"),
        "/etc/tarmac/tarmac.toml:2: tls.cert: tls.key is set but tls.cert is not; give both \
             (STARTTLS on) or neither (off)"
    );
    let config = parse("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n").unwrap();
    assert_eq!(config.tls.cert, Some(PathBuf::from("/etc/tarmac/c.pem")));
    assert_eq!(
        errors("[downstream]\nmode = \"multiplexing\"\nannounce_client = \"proxy-v2\"\n"),
        "/etc/tarmac/tarmac.toml:3: downstream.announce_client: a PROXY header cannot \
             announce the clients of a pooled connection; use \"xclient\" or \"none\" with \
             mode = \"multiplexing\""
    );
    assert!(parse("[downstream]\nmode = \"multiplexing\"\n").is_ok());
}

#[test]
fn other_value_checks() {
    let text = r#"[greylist]
key = ["subnet", "sender", "subnet"]
[state]
redis = "127.0.0.1:6379"
[server]
hostname = "mx1 example"
[downstream]
servers = []
mode = "pooled"
"#;
    assert_eq!(
        errors(text),
        r#"/etc/tarmac/tarmac.toml:2: greylist.key[2]: listed twice
/etc/tarmac/tarmac.toml:4: state.redis: invalid Redis URL "127.0.0.1:6379": expected redis:// or unix://, such as "redis://127.0.0.1:6379/0"
/etc/tarmac/tarmac.toml:6: server.hostname: invalid DNS name "mx1 example": ' ' is not allowed; use letters, digits, hyphens and dots
/etc/tarmac/tarmac.toml:8: downstream.servers: must not be empty; give the MTA to relay to, such as "127.0.0.1:10025"
/etc/tarmac/tarmac.toml:9: downstream.mode: unknown value "pooled"; expected one of: synchronous, multiplexing"#
    );
    assert_eq!(
        errors("greylist.key = []"),
        "/etc/tarmac/tarmac.toml:1: greylist.key: must not be empty; for example [\"subnet\", \
             \"sender\", \"recipient\"]"
    );
    let config = parse(
        r#"
[greylist]
key = ["ip", "helo", "rdns"]
[state]
backend = "redis"
redis = "unix:///run/redis.sock"
[downstream]
mode = "multiplexing"
announce_client = "none"
tls = "required"
tls_verify = true
[tarpit]
stutter = "0s"
greet_pause = "250ms"
pregreet = "drop"
"#,
    )
    .unwrap();
    assert_eq!(
        config.greylist.key,
        [GreylistKey::Ip, GreylistKey::Helo, GreylistKey::Rdns]
    );
    assert_eq!(config.state.backend, StateBackend::Redis);
    assert_eq!(config.downstream.mode, DownstreamMode::Multiplexing);
    assert_eq!(config.downstream.announce_client, AnnounceClient::None);
    assert_eq!(config.downstream.tls, DownstreamTls::Required);
    assert!(config.downstream.tls_verify);
    assert_eq!(config.tarpit.stutter, Duration::ZERO);
    assert_eq!(config.tarpit.greet_pause, Duration::from_millis(250));
    assert_eq!(config.tarpit.pregreet, Pregreet::Drop);
}

#[test]
fn redis_urls_are_checked_by_the_redis_client() {
    let bad = [
        (
            "redis://",
            r#"invalid Redis URL "redis://": missing hostname"#,
        ),
        (
            "redis://127.0.0.1:6379/x",
            r#"invalid Redis URL "redis://127.0.0.1:6379/x": invalid database number"#,
        ),
        (
            "redis://127.0.0.1:99999/0",
            r#"invalid Redis URL "redis://127.0.0.1:99999/0": redis URL did not parse"#,
        ),
        ("unix://", r#"invalid Redis URL "unix://": missing path"#),
        (
            "http://127.0.0.1:6379",
            r#"invalid Redis URL "http://127.0.0.1:6379": expected redis:// or unix://, such as "redis://127.0.0.1:6379/0""#,
        ),
        (
            "rediss://127.0.0.1:6379",
            r#"invalid Redis URL "rediss://127.0.0.1:6379": TLS to Redis (rediss://) is not supported; use redis:// on a trusted network, or unix://"#,
        ),
        (
            "redis://:secret@/0",
            "invalid Redis URL (with credentials, not shown): redis URL did not parse",
        ),
    ];
    for (url, message) in bad {
        assert_eq!(
            errors(&format!("[state]\nredis = \"{url}\"\n")),
            format!("/etc/tarmac/tarmac.toml:2: state.redis: {message}"),
            "{url}"
        );
    }
    // Checked whatever the backend: a bad URL is found before someone switches to it.
    assert!(
        errors("[state]\nbackend = \"local\"\nredis = \"redis://\"\n")
            .contains("state.redis: invalid Redis URL")
    );
    for good in [
        "redis://127.0.0.1:6379/0",
        "redis://[::1]:6380/3",
        "redis://tarmac:secret@10.0.0.5/1",
        "unix:///run/redis/redis.sock",
    ] {
        let config = parse(&format!(
            "[state]\nbackend = \"redis\"\nredis = \"{good}\"\n"
        ))
        .unwrap();
        assert_eq!(config.state.redis, good);
    }
    assert_eq!(
        errors("[state]\ntimeout = \"0s\""),
        "/etc/tarmac/tarmac.toml:2: state.timeout: must be longer than 0s"
    );
    let config = parse("[state]\ntimeout = \"100ms\"").unwrap();
    assert_eq!(config.state.timeout, Duration::from_millis(100));
    assert_eq!(Config::default().state.timeout, Duration::from_millis(250));
}

#[test]
fn workers_zero_means_one_per_core() {
    let config = parse("server.workers = 0").unwrap();
    assert_eq!(config.server.workers, schema::default_workers());
    let config = parse("server.workers = 3").unwrap();
    assert_eq!(config.server.workers, 3);
}

#[test]
fn unreadable_file_is_one_error() {
    let path = Path::new("/nonexistent/tarmac/tarmac.toml");
    let e = Config::load(path).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/nonexistent/tarmac/tarmac.toml: cannot read: No such file or directory (os error 2)"
    );
}

#[test]
fn error_display_without_key_or_line() {
    let e = ConfigError {
        path: PathBuf::from("/etc/tarmac/tarmac.toml"),
        line: Some(12),
        key: "limits.max_message_size".to_owned(),
        message: "too big".to_owned(),
    };
    assert_eq!(
        e.to_string(),
        "/etc/tarmac/tarmac.toml:12: limits.max_message_size: too big"
    );
}

#[test]
fn content_section_is_read() {
    use crate::content::{MilterAddr, OnFailure, RspamdUrl};

    let config = parse(
        r#"[content]
rspamd = "http://127.0.0.1:11333/"
milters = ["inet:127.0.0.1:8891", "unix:/run/opendkim/opendkim.sock", "inet:[::1]:8892"]
timeout = "10m"
on_failure = "accept"
spool_after = "1MiB"
max_scans = 65536
"#,
    )
    .unwrap();
    let c = &config.content;
    assert_eq!(
        c.rspamd,
        Some(RspamdUrl {
            addr: SocketAddr::from(([127, 0, 0, 1], 11333))
        })
    );
    assert_eq!(
        c.milters,
        [
            MilterAddr::Inet(SocketAddr::from(([127, 0, 0, 1], 8891))),
            MilterAddr::Unix(PathBuf::from("/run/opendkim/opendkim.sock")),
            MilterAddr::Inet(SocketAddr::from((Ipv6Addr::LOCALHOST, 8892))),
        ]
    );
    assert_eq!(c.timeout, Duration::from_secs(600));
    assert_eq!(c.on_failure, OnFailure::Accept);
    assert_eq!(c.spool_after, 1 << 20);
    assert_eq!(c.max_scans, 65_536);
    assert!(c.scans());

    // The other ends of each range, and the forms that mean "off" or "always".
    let config = parse(
        r#"[content]
rspamd = ""
milters = []
timeout = "1ms"
on_failure = "tempfail"
spool_after = 0
max_scans = 1
"#,
    )
    .unwrap();
    let c = &config.content;
    assert_eq!((c.rspamd.clone(), c.milters.is_empty()), (None, true));
    assert!(!c.scans());
    assert_eq!(c.timeout, Duration::from_millis(1));
    assert_eq!(c.on_failure, OnFailure::TempFail);
    assert_eq!(c.spool_after, 0, "0: every message spools");
    assert_eq!(c.max_scans, 1);
    assert_eq!(
        parse("content.spool_after = \"1KB\"")
            .unwrap()
            .content
            .spool_after,
        1000
    );
    assert_eq!(
        parse("content.spool_after = 4096")
            .unwrap()
            .content
            .spool_after,
        4096
    );
    // A scanner with a pooled downstream is fine: the scan happens before the relay.
    assert!(
        parse("[content]\nmilters = [\"inet:127.0.0.1:8891\"]\n[downstream]\nmode = \"multiplexing\"\n")
            .is_ok()
    );
    // Holding more than the largest message is allowed: nothing ever spools then.
    let config =
        parse("[content]\nspool_after = \"1GB\"\n[limits]\nmax_message_size = \"10MB\"\n").unwrap();
    assert_eq!(config.content.spool_after, 1_000_000_000);
}

#[test]
fn content_errors_name_the_key_and_line() {
    let text = r#"[content]
rspamd = "http://localhost:11333"
milters = ["inet:127.0.0.1:8891", "local:/run/milter.sock", "unix:run/milter.sock", "inet:127.0.0.1:0", 8891]
timeout = "0s"
on_failure = "reject"
spool_after = "999B"
max_scans = 0
scanners = ["rspamd"]
"#;
    assert_eq!(
        errors(text),
        r#"/etc/tarmac/tarmac.toml:2: content.rspamd: "http://localhost:11333" is not http://IP:PORT (such as http://127.0.0.1:11333)
/etc/tarmac/tarmac.toml:3: content.milters[1]: "local:/run/milter.sock" is neither inet:IP:PORT nor unix:/path (as Postfix's smtpd_milters)
/etc/tarmac/tarmac.toml:3: content.milters[2]: "unix:run/milter.sock": the socket path must be absolute
/etc/tarmac/tarmac.toml:3: content.milters[3]: "inet:127.0.0.1:0": port 0 cannot be connected to
/etc/tarmac/tarmac.toml:3: content.milters[4]: expected a milter socket such as "inet:127.0.0.1:8891", found integer
/etc/tarmac/tarmac.toml:4: content.timeout: must be longer than 0s
/etc/tarmac/tarmac.toml:5: content.on_failure: unknown value "reject"; expected one of: tempfail, accept
/etc/tarmac/tarmac.toml:6: content.spool_after: must be 0 (always spool) or at least 1KB, got 999 bytes
/etc/tarmac/tarmac.toml:7: content.max_scans: must be from 1 to 65536, got 0
/etc/tarmac/tarmac.toml:8: content.scanners: unknown key; expected one of: rspamd, milters, timeout, on_failure, spool_after, max_scans"#
    );

    let text = r#"[content]
rspamd = "https://127.0.0.1:11333"
milters = ["inet:127.0.0.1:8891",
           "unix:/run/a.sock",
           "inet:127.0.0.1:8891"]
timeout = "11m"
on_failure = 1
spool_after = "lots"
max_scans = 65537
"#;
    assert_eq!(
        errors(text),
        r#"/etc/tarmac/tarmac.toml:2: content.rspamd: "https://127.0.0.1:11333" is not http://IP:PORT (such as http://127.0.0.1:11333)
/etc/tarmac/tarmac.toml:5: content.milters[2]: inet:127.0.0.1:8891 is already content.milters[0]
/etc/tarmac/tarmac.toml:6: content.timeout: must be at most 10m, got 11m
/etc/tarmac/tarmac.toml:7: content.on_failure: expected one of: tempfail, accept, found integer
/etc/tarmac/tarmac.toml:8: content.spool_after: invalid size "lots": expected a number with a unit such as "64KB", "25MB", "10MiB"
/etc/tarmac/tarmac.toml:9: content.max_scans: must be from 1 to 65536, got 65537"#
    );

    let text = r#"[content]
rspamd = 11333
milters = "inet:127.0.0.1:8891"
timeout = 30
spool_after = -1
"#;
    assert_eq!(
        errors(text),
        r#"/etc/tarmac/tarmac.toml:2: content.rspamd: expected a URL such as "http://127.0.0.1:11333", or "" for none, found integer
/etc/tarmac/tarmac.toml:3: content.milters: expected an array, found string
/etc/tarmac/tarmac.toml:4: content.timeout: expected a duration such as "30s", found integer
/etc/tarmac/tarmac.toml:5: content.spool_after: -1 is out of range"#
    );
    assert_eq!(
        errors("[content]\nrspamd = \"http://127.0.0.1:0\"\n"),
        "/etc/tarmac/tarmac.toml:2: content.rspamd: \"http://127.0.0.1:0\": port 0 cannot be \
             connected to"
    );
    assert_eq!(
        errors("content = []\n"),
        "/etc/tarmac/tarmac.toml:1: content: expected a table [content], found array"
    );
    // A duplicate written differently is still the same socket.
    assert_eq!(
        errors("content.milters = [\"unix:/run/m.sock\", \"unix:/run//m.sock\"]"),
        "/etc/tarmac/tarmac.toml:1: content.milters[1]: unix:/run//m.sock is already \
             content.milters[0]"
    );
}

#[test]
fn content_summary_names_scanners_in_order() {
    assert_eq!(
        Config::default().content_summary(),
        "content: no scanner (bodies stream)"
    );
    let config = parse(
        r#"[content]
rspamd = "http://[::1]:11333"
milters = ["unix:/run/opendkim/opendkim.sock", "inet:127.0.0.1:8891"]
"#,
    )
    .unwrap();
    assert_eq!(
        config.content_summary(),
        "content: rspamd http://[::1]:11333, milters unix:/run/opendkim/opendkim.sock, \
         inet:127.0.0.1:8891; timeout 30s, on_failure tempfail, spool_after 256KiB, max_scans 256"
    );
    let config = parse(
        r#"[content]
milters = ["inet:127.0.0.1:8891"]
timeout = "90s"
on_failure = "accept"
spool_after = "1MB"
max_scans = 8
"#,
    )
    .unwrap();
    assert_eq!(
        config.content_summary(),
        "content: milters inet:127.0.0.1:8891; timeout 90s, on_failure accept, spool_after 1MB, \
         max_scans 8"
    );
}

#[test]
fn cidr_contains() {
    let net: Cidr = "192.0.2.0/24".parse().unwrap();
    assert!(net.contains("192.0.2.0".parse().unwrap()));
    assert!(net.contains("192.0.2.255".parse().unwrap()));
    assert!(!net.contains("192.0.3.0".parse().unwrap()));
    assert!(net.contains("::ffff:192.0.2.7".parse().unwrap()));
    assert!(!net.contains("2001:db8::1".parse().unwrap()));

    let net: Cidr = "2001:db8::/32".parse().unwrap();
    assert!(net.contains("2001:db8:ffff::1".parse().unwrap()));
    assert!(!net.contains("2001:db9::1".parse().unwrap()));
    assert!(!net.contains("192.0.2.7".parse().unwrap()));

    let all4: Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(all4.contains("255.255.255.255".parse().unwrap()));
    assert!(!all4.contains("::1".parse().unwrap()));
    let all6: Cidr = "::/0".parse().unwrap();
    assert!(all6.contains("::1".parse().unwrap()));

    let host: Cidr = "2001:db8::7".parse().unwrap();
    assert_eq!(host.prefix, 128);
    assert!(host.contains("2001:db8::7".parse().unwrap()));
    assert!(!host.contains("2001:db8::8".parse().unwrap()));
    assert_eq!(host.to_string(), "2001:db8::7/128");

    let e = "192.0.2.1/24".parse::<Cidr>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid CIDR \"192.0.2.1/24\": host bits are set; did you mean 192.0.2.0/24?"
    );
}

#[test]
fn downstream_health_keys() {
    let config =
        parse("[downstream]\nbalance = \"round-robin\"\ndown_after = 5\nretry_after = \"2m\"\n")
            .unwrap();
    assert_eq!(config.downstream.balance, Balance::RoundRobin);
    assert_eq!(config.downstream.down_after, 5);
    assert_eq!(config.downstream.retry_after, Duration::from_secs(120));
    let defaults = Config::default().downstream;
    assert_eq!(
        (defaults.balance, defaults.down_after, defaults.retry_after),
        (Balance::Failover, 3, Duration::from_secs(30))
    );
    let text = "[downstream]\nbalance = \"random\"\ndown_after = 0\nretry_after = \"11m\"\n";
    assert_eq!(
        errors(text),
        "/etc/tarmac/tarmac.toml:2: downstream.balance: unknown value \"random\"; expected one \
         of: failover, round-robin
/etc/tarmac/tarmac.toml:3: downstream.down_after: must be from 1 to 1000, got 0
/etc/tarmac/tarmac.toml:4: downstream.retry_after: must be at most 600s (the probes' back-off \
         stops there)"
    );
    assert_eq!(
        errors("[downstream]\nretry_after = \"0s\"\n"),
        "/etc/tarmac/tarmac.toml:2: downstream.retry_after: must be longer than 0s"
    );
}

#[test]
fn user_and_group_name_local_accounts() {
    // Every Linux system has root (uid 0, group root) in its files.
    let config = parse("[server]\nuser = \"root\"\ngroup = \"root\"\n").unwrap();
    assert_eq!(
        (config.server.user.as_str(), config.server.group.as_str()),
        ("root", "root")
    );
    assert_eq!(
        errors("[server]\nuser = \"no-such-user-tarmac\"\n"),
        "/etc/tarmac/tarmac.toml:2: server.user: no user \"no-such-user-tarmac\" in /etc/passwd"
    );
    assert_eq!(
        errors("[server]\nuser = \"root\"\ngroup = \"no-such-group-tarmac\"\n"),
        "/etc/tarmac/tarmac.toml:3: server.group: no group \"no-such-group-tarmac\" in /etc/group"
    );
    assert_eq!(
        errors("[server]\ngroup = \"root\"\n"),
        "/etc/tarmac/tarmac.toml:2: server.group: needs [server] user: tarmac changes groups \
         only when it becomes a user"
    );
    assert_eq!(
        errors("[server]\nuser = \"mail:x\"\n"),
        "/etc/tarmac/tarmac.toml:2: server.user: invalid name \"mail:x\": ':' is not allowed"
    );
}

#[test]
fn transparent_listeners_and_spoofing() {
    assert_eq!(Config::default().transparent, Transparent::default());
    assert!(Config::default().transparent_summary().is_empty());
    let config =
        parse("[transparent]\nlisten = [\"0.0.0.0:10025\", \"[::]:10025\"]\nspoof_source = true\n")
            .unwrap();
    assert_eq!(
        config.transparent.listen,
        [
            SocketAddr::from(([0, 0, 0, 0], 10025)),
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 10025)),
        ]
    );
    assert!(config.transparent.spoof_source);
    assert_eq!(
        config.transparent_summary(),
        [
            "transparent: 0.0.0.0:10025, [::]:10025 relay to each connection's original \
          destination, from the client's own address (spoof_source; CAP_NET_ADMIN kept), no \
          announcement"
        ]
    );
}

#[test]
fn transparent_with_multiplexing_gets_a_note() {
    let config = parse(
        "[downstream]\nmode = \"multiplexing\"\n[transparent]\nlisten = [\"0.0.0.0:10025\"]\n",
    )
    .unwrap();
    let summary = config.transparent_summary();
    assert_eq!(summary.len(), 2, "{summary:?}");
    assert!(
        summary[0].ends_with("from this host, announced with XCLIENT"),
        "{summary:?}"
    );
    assert!(summary[1].starts_with("note: transparent sessions relay synchronously"));
}

#[test]
fn transparent_errors_name_the_line() {
    assert_eq!(
        errors("[server]\nlisten = [\"0.0.0.0:25\"]\n[transparent]\nlisten = [\"0.0.0.0:25\"]\n"),
        "/etc/tarmac/tarmac.toml:4: transparent.listen: 0.0.0.0:25 is also in [server] listen; \
         a transparent listener needs a port of its own"
    );
    assert_eq!(
        errors("[transparent]\nlisten = [\"nowhere\"]\nspoof_source = \"yes\"\n"),
        "/etc/tarmac/tarmac.toml:2: transparent.listen[0]: invalid address \"nowhere\": \
         expected ip:port such as \"0.0.0.0:25\" or \"[::1]:25\"\n\
         /etc/tarmac/tarmac.toml:3: transparent.spoof_source: expected true or false, found string"
    );
}
