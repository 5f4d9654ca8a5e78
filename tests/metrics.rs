//! `[metrics] listen` through the real server: `/metrics` scraped before and after a delivered
//! message, a deny-listed client, a refusal at accept, greylisted recipients and a DNSBL hit,
//! each counter moving by exactly what happened. The exposition is parsed by the Prometheus
//! project's own Python parsers (`prometheus_client`, the OpenMetrics one and the classic text
//! one), and no label value may come from a client.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tarmac::config::{Config, Dnsbl};
use tarmac::policy::{List, ListSet};
use tarmac_testkit::dns_server::{DnsServer, Zone};
use tarmac_testkit::sink::Behaviour;
use tarmac_testkit::{Client, Server, WAIT, sink, test_config, wait_until};

/// Samples by `name{label="value",...}`, labels sorted by name.
type Samples = BTreeMap<String, f64>;

/// The Python that parses an exposition: strictly as OpenMetrics (every family must have its
/// HELP), and again as the classic Prometheus text format; prints the samples as JSON.
const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as classic
text = sys.stdin.read()
samples = []
for family in openmetrics(text):
    if not family.documentation:
        sys.exit("no HELP for " + family.name)
    if family.type not in ("counter", "gauge"):
        sys.exit("unexpected type " + family.type + " for " + family.name)
    for s in family.samples:
        samples.append([s.name, s.labels, s.value])
list(classic(text))
print(json.dumps(samples))
"#;

/// Debian's python3 (not a virtualenv's first on PATH), where `python3-prometheus-client` is.
const PYTHON: &str = "/usr/bin/python3";

/// The test config relaying to `downstream`, with metrics on a free loopback port.
fn metrics_config(downstream: SocketAddr) -> Config {
    let mut config = test_config(downstream);
    config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    config
}

/// `GET /metrics`: asserts a `200` with the OpenMetrics type, returns the body.
#[track_caller]
fn scrape_text(server: &Server) -> String {
    let addr = server.handle().metrics_addr().expect("metrics are on");
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: tarmac\r\nAccept: */*\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}\r\n", body.len())),
        "{head}"
    );
    body.to_owned()
}

/// Whether the real parser is there; without it (a developer's machine) the samples are read
/// by [`parse_simply`] and the parser check is skipped with a note. Under CI it must be there.
fn have_parser() -> bool {
    let found = Command::new(PYTHON)
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI needs {PYTHON} with prometheus_client (apt-get install python3-prometheus-client)"
        );
        eprintln!("note: no {PYTHON} with prometheus_client; parsing the scrape by hand");
    }
    found
}

/// One scrape, parsed.
#[track_caller]
fn scrape(server: &Server) -> Samples {
    let text = scrape_text(server);
    if have_parser() {
        parse_with_python(&text)
    } else {
        parse_simply(&text)
    }
}

#[track_caller]
fn parse_with_python(text: &str) -> Samples {
    let mut child = Command::new(PYTHON)
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parsers refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    samples
        .into_iter()
        .map(|(name, labels, value)| (key(&name, &labels), value))
        .collect()
}

/// A fallback reader for `name{a="x",b="y"} value` lines (our label values hold no quotes or
/// commas).
fn parse_simply(text: &str) -> Samples {
    let mut samples = Samples::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels: BTreeMap<String, String> = labels
            .split("\",")
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap();
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        samples.insert(key(name, &labels), value.parse().unwrap());
    }
    samples
}

fn key(name: &str, labels: &BTreeMap<String, String>) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

/// A sample's value; 0 for a series not (yet) in the scrape.
fn get(samples: &Samples, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

/// Asserts that between `before` and `after` exactly the `moved` series changed, each by its
/// amount, among every counter of the two scrapes (`_total` series; gauges are checked by
/// the tests themselves, `downstream_bytes_sent` too).
#[track_caller]
fn assert_moved(before: &Samples, after: &Samples, moved: &[(&str, f64)]) {
    let mut series: Vec<&String> = before.keys().chain(after.keys()).collect();
    series.sort();
    series.dedup();
    for name in series {
        if !name.contains("_total{") || name.starts_with("tarmac_downstream_bytes_sent") {
            continue;
        }
        let delta = get(after, name) - get(before, name);
        let expected = moved
            .iter()
            .find(|(m, _)| *m == name.as_str())
            .map_or(0.0, |(_, by)| *by);
        assert_eq!(
            delta, expected,
            "{name} moved by {delta}, expected {expected}"
        );
    }
    for (name, _) in moved {
        assert!(after.contains_key(*name), "{name} is not in the scrape");
    }
}

/// Waits until `series` reads `value`.
#[track_caller]
fn wait_for(server: &Server, series: &str, value: f64) -> Samples {
    let mut last = Samples::new();
    wait_until(&format!("{series} = {value}"), || {
        last = scrape(server);
        get(&last, series) == value
    });
    last
}

#[test]
fn a_delivered_message_moves_its_counters_and_no_client_text_becomes_a_label() {
    let sink = sink(Behaviour::Normal);
    let server = Server::start(metrics_config(sink.local_addr()));
    let downstream = sink.local_addr().to_string();
    let before = scrape(&server);
    assert_eq!(get(&before, "tarmac_connections_open{}"), 0.0);

    // A marker in everything a client says: none of it may reach a label.
    let marker = "zq7marker";
    let mut client = Client::connect(server.addr);
    assert!(client.reply().starts_with("220 "));
    assert!(
        client
            .command(&format!("EHLO {marker}.example"))
            .starts_with("250")
    );
    assert!(
        client
            .command(&format!("MAIL FROM:<{marker}@example.org>"))
            .starts_with("250 ")
    );
    assert!(
        client
            .command(&format!("RCPT TO:<{marker}@example.net>"))
            .starts_with("250 ")
    );
    assert!(client.command("DATA").starts_with("354 "));
    let body = format!("Subject: {marker}\r\n\r\nhi\r\n.\r\n");
    client.send(&body);
    assert!(client.reply().starts_with("250 "));
    assert!(client.command("QUIT").starts_with("221 "));
    sink.wait_for_messages(1, WAIT);
    let client_addr = client.writer.local_addr().unwrap().to_string();

    let verdict = "tarmac_sessions_total{verdict=\"pass\"}";
    wait_for(&server, verdict, get(&before, verdict) + 1.0);
    let after = wait_for(&server, "tarmac_connections_open{}", 0.0);
    assert_moved(
        &before,
        &after,
        &[
            ("tarmac_connections_accepted_total{}", 1.0),
            (verdict, 1.0),
            ("tarmac_session_results_total{result=\"delivered\"}", 1.0),
            ("tarmac_messages_relayed_total{}", 1.0),
            ("tarmac_recipients_relayed_total{}", 1.0),
            (
                &format!("tarmac_downstream_connections_total{{server=\"{downstream}\"}}"),
                1.0,
            ),
        ],
    );
    let sent = get(&after, "tarmac_downstream_bytes_sent_total{}")
        - get(&before, "tarmac_downstream_bytes_sent_total{}");
    assert!(
        sent >= body.len() as f64,
        "{sent} bytes to the downstream, the body alone is {}",
        body.len()
    );
    assert_eq!(get(&after, "tarmac_connections_tarpitted{}"), 0.0);
    assert_eq!(get(&after, "tarmac_stress{}"), 0.0);

    let text = scrape_text(&server);
    assert!(!text.contains(marker), "client text in the scrape:\n{text}");
    assert!(
        !text.contains(&client_addr),
        "the client's address {client_addr} in the scrape:\n{text}"
    );
}

#[test]
fn a_deny_listed_client_and_a_refusal_at_accept_are_counted_once() {
    let sink = sink(Behaviour::Normal);
    let mut config = metrics_config(sink.local_addr());
    config.lists.entries = ListSet {
        allow: List::default(),
        deny: List::parse(&[(PathBuf::from("deny.txt"), "127.0.0.20\n".to_owned())]).unwrap(),
    };
    config.limits.max_connections_per_ip = 1;
    let server = Server::start(config);
    let before = scrape(&server);

    let mut denied = Client::connect_from(server.addr, "127.0.0.20".parse().unwrap());
    assert!(denied.reply().starts_with("554 "), "deny-listed");
    // Its one connection is open: a second from the same address is over the per-IP cap.
    let mut second = Client::connect_from(server.addr, "127.0.0.20".parse().unwrap());
    assert!(second.reply().starts_with("421 "), "over the per-IP cap");
    second.expect_eof();
    assert!(denied.command("QUIT").starts_with("221 "));

    let reject = "tarmac_sessions_total{verdict=\"reject\"}";
    wait_for(&server, reject, get(&before, reject) + 1.0);
    let after = wait_for(&server, "tarmac_connections_open{}", 0.0);
    let result = after
        .keys()
        .find(|k| {
            k.starts_with("tarmac_session_results_total{") && get(&after, k) > get(&before, k)
        })
        .cloned()
        .expect("one session result moved");
    assert_moved(
        &before,
        &after,
        &[
            ("tarmac_connections_accepted_total{}", 2.0),
            (
                "tarmac_connections_refused_total{reason=\"max_connections_per_ip\"}",
                1.0,
            ),
            (reject, 1.0),
            ("tarmac_list_matches_total{list=\"deny:address\"}", 1.0),
            (&result, 1.0),
        ],
    );
}

#[test]
fn greylisted_recipients_count_by_outcome() {
    let sink = sink(Behaviour::Normal);
    let mut config = metrics_config(sink.local_addr());
    config.greylist.enabled = true;
    config.greylist.delay = Duration::from_secs(3600);
    let server = Server::start(config);
    let before = scrape(&server);

    let mut client = Client::connect(server.addr);
    assert!(client.reply().starts_with("220 "));
    assert!(client.command("EHLO client.example").starts_with("250"));
    assert!(
        client
            .command("MAIL FROM:<a@example.org>")
            .starts_with("250 ")
    );
    assert!(
        client
            .command("RCPT TO:<b@example.net>")
            .starts_with("451 ")
    );
    // The greylist answers before the reply is written: counted already.
    let between = scrape(&server);
    assert_moved(
        &before,
        &between,
        &[
            ("tarmac_connections_accepted_total{}", 1.0),
            ("tarmac_greylist_checks_total{outcome=\"new\"}", 1.0),
            // The downstream connection opens at MAIL.
            (
                &format!(
                    "tarmac_downstream_connections_total{{server=\"{}\"}}",
                    sink.local_addr()
                ),
                1.0,
            ),
        ],
    );
    assert!(
        client
            .command("RCPT TO:<b@example.net>")
            .starts_with("451 ")
    );
    assert!(client.command("QUIT").starts_with("221 "));

    let pass = "tarmac_sessions_total{verdict=\"pass\"}";
    wait_for(&server, pass, get(&before, pass) + 1.0);
    let after = scrape(&server);
    // The close line says `tempfail`: the last thing refused was a recipient, with a 4xx.
    let tempfail = "tarmac_session_results_total{result=\"tempfail\"}";
    assert_moved(
        &between,
        &after,
        &[
            ("tarmac_greylist_checks_total{outcome=\"early\"}", 1.0),
            (pass, 1.0),
            (tempfail, 1.0),
        ],
    );
    assert_eq!(get(&after, "tarmac_messages_relayed_total{}"), 0.0);
}

#[test]
fn a_dnsbl_hit_and_a_clean_lookup_count_per_zone() {
    let dns = DnsServer::start(vec![
        Zone::new("bl.test")
            .a("2.0.0.127", "127.0.0.2")
            .a("10.0.0.127", "127.0.0.2"),
    ]);
    let sink = sink(Behaviour::Normal);
    let mut config = metrics_config(sink.local_addr());
    config.dns.servers = vec![dns.addr()];
    config.dns.timeout = Duration::from_secs(2);
    config.dnsbl = vec![Dnsbl {
        zone: "bl.test".into(),
        weight: 3,
        codes: Vec::new(),
        reply: None,
    }];
    let server = Server::start(config);
    let before = scrape(&server);
    assert_eq!(get(&before, "tarmac_dns_zone_up{zone=\"bl.test\"}"), 1.0);

    let listed: IpAddr = "127.0.0.10".parse().unwrap();
    let mut client = Client::connect_from(server.addr, listed);
    assert!(client.reply().starts_with("554 "), "listed");
    assert!(client.command("QUIT").starts_with("221 "));
    let mut clean = Client::connect_from(server.addr, "127.0.0.11".parse().unwrap());
    assert!(clean.reply().starts_with("220 "), "not listed");
    assert!(clean.command("QUIT").starts_with("221 "));

    let reject = "tarmac_sessions_total{verdict=\"reject\"}";
    let pass = "tarmac_sessions_total{verdict=\"pass\"}";
    wait_for(&server, reject, get(&before, reject) + 1.0);
    wait_for(&server, pass, get(&before, pass) + 1.0);
    let after = wait_for(&server, "tarmac_connections_open{}", 0.0);
    let results: Vec<String> = after
        .keys()
        .filter(|k| {
            k.starts_with("tarmac_session_results_total{") && get(&after, k) > get(&before, k)
        })
        .cloned()
        .collect();
    let mut moved: Vec<(&str, f64)> = vec![
        ("tarmac_connections_accepted_total{}", 2.0),
        (reject, 1.0),
        (pass, 1.0),
        (
            "tarmac_dns_lookups_total{result=\"listed\",zone=\"bl.test\"}",
            1.0,
        ),
        (
            "tarmac_dns_lookups_total{result=\"not_listed\",zone=\"bl.test\"}",
            1.0,
        ),
        // One query per client (two distinct addresses: no cache hit).
        ("tarmac_dns_queries_total{}", 2.0),
    ];
    let total_results: f64 = results
        .iter()
        .map(|k| get(&after, k) - get(&before, k))
        .sum();
    assert_eq!(total_results, 2.0, "{results:?}");
    moved.extend(
        results
            .iter()
            .map(|k| (k.as_str(), get(&after, k) - get(&before, k))),
    );
    // The health checks may run meanwhile: their queries are theirs to count.
    let mut after = after;
    let mut before = before;
    for samples in [&mut before, &mut after] {
        samples.remove("tarmac_dns_health_queries_total{}");
    }
    assert_moved(&before, &after, &moved);
}

#[test]
fn other_paths_and_methods_are_refused() {
    let sink = sink(Behaviour::Normal);
    let server = Server::start(metrics_config(sink.local_addr()));
    let addr = server.handle().metrics_addr().unwrap();
    for (request, status) in [
        ("GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 404 "),
        (
            "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 405 ",
        ),
        ("HELO x\r\n\r\n", "HTTP/1.1 400 "),
    ] {
        let mut stream = TcpStream::connect_timeout(&addr, WAIT).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with(status), "{request:?}: {response}");
    }
    // Still serving after them.
    assert!(scrape_text(&server).ends_with("# EOF\n"));
}
