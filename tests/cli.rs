//! The binary as an operator runs it: `--version`, `check`, `run` with SIGTERM, `demo`.

use std::path::Path;

use tarmac_testkit::sink::Behaviour;

use crate::util::{tarmac, tarmac_check};
use tarmac_testkit::dns_server::{DnsServer, Zone};
use tarmac_testkit::{Client, Running, WAIT, free_port, sink, temp_dir, wait_for_log, wait_until};

#[test]
fn version_prints_the_crate_version() {
    let out = tarmac().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("tarmac {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = tarmac().args(["frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
}

#[test]
fn check_reports_every_error_as_file_line_key_and_exits_1() {
    let dir = temp_dir("check");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"0.0.0.0:25\"]\nworkers = \"two\"\n\n[limits]\nmax_message_size = \"25XB\"\nfrobnicate = 1\n",
    )
    .unwrap();
    let out = tarmac_check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    assert!(
        stderr.contains(&format!("{p}:3: server.workers: ")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{p}:6: limits.max_message_size: invalid size \"25XB\""
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{p}:7: limits.frobnicate: unknown key")),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_accepts_the_shipped_example() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tarmac.toml");
    let out = tarmac_check(&example);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(": ok: "), "{stdout}");
    assert!(
        stdout.contains(": content: no scanner (bodies stream)\n"),
        "{stdout}"
    );
}

#[test]
fn run_relays_logs_and_drains_on_sigterm() {
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("run");
    let port = free_port();
    let path = dir.join("tarmac.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"mx.test\"\nworkers = 1\nstate_dir = \"state\"\n\n\
             [downstream]\nservers = [\"{}\"]\n\n[timeouts]\ndrain = \"5s\"\n\n[dns]\nrdns = false\n\n\
             [tarpit]\ngreet_pause = \"0s\"\n[greylist]\nenabled = false\n",
            sink.local_addr()
        ),
    )
    .unwrap();
    let child = Running::start(tarmac(), &path);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until("tarmac to listen", || {
        std::net::TcpStream::connect(addr).is_ok()
    });

    let mut client = Client::connect(addr);
    client.start_message("a@example.org", &["b@example.net"]);
    client.send(b"Subject: cli\r\n\r\nhello\r\n.\r\n");
    assert!(client.reply().starts_with("250 2.0.0 "));
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");

    // An idle session is told to go away when tarmac stops.
    let mut idle = Client::connect(addr);
    assert!(idle.reply().starts_with("220 "));
    child.signal("TERM");
    assert_eq!(
        idle.reply(),
        "421 4.3.2 mx.test Service shutting down, please try again later\r\n"
    );
    let (code, stderr) = child.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(
            " rdns=- helo=client.example verdict=pass score=0 rep=none dnsbl=- list=- rule=- \
             greylist=skip pregreet=no tls=no tls_version=- msgs=1 rcpts=1 scan=- result=delivered dur="
        ),
        "{stderr}"
    );
    assert!(stderr.contains("result=shutdown"), "{stderr}");
    assert_eq!(sink.wait_for_messages(1, WAIT).len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_writes_accepted_mail_to_demo_mail() {
    if std::net::TcpListener::bind("127.0.0.1:2525").is_err()
        || std::net::TcpListener::bind("127.0.0.1:2526").is_err()
        || std::net::TcpListener::bind("127.0.0.1:2527").is_err()
    {
        eprintln!("note: 127.0.0.1:2525, :2526 or :2527 is busy; skipping the demo test");
        return;
    }
    let dir = temp_dir("demo");
    let mut demo = tarmac();
    demo.arg("demo").current_dir(&dir);
    let child = Running::spawn(demo);
    let addr = "127.0.0.1:2525".parse().unwrap();
    wait_until("the demo to listen", || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    let mut client = Client::connect(addr);
    client.start_message("you@example.org", &["someone@example.net"]);
    client.send(b"Subject: demo\r\n\r\nhello demo\r\n.\r\n");
    assert!(client.reply().starts_with("250 2.0.0 "));
    let maildir = dir.join("demo-mail");
    let mut files = Vec::new();
    wait_until("a .eml file", || {
        files = std::fs::read_dir(&maildir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                    .collect()
            })
            .unwrap_or_default();
        !files.is_empty()
    });
    let eml = std::fs::read_to_string(&files[0]).unwrap();
    assert!(
        eml.starts_with("Received: from client.example ([127.0.0.1])\r\n\tby tarmac.demo (tarmac)"),
        "{eml}"
    );
    assert!(
        eml.ends_with("Subject: demo\r\n\r\nhello demo\r\n"),
        "{eml}"
    );
    // The defences the start-up text lists, each from its loopback address.
    let from = |source: &str| Client::connect_from(addr, source.parse().unwrap());
    let mut denied = from("127.0.0.2");
    let greeting = denied.reply();
    assert!(
        greeting.lines().last().unwrap().starts_with("554 5.7.1 "),
        "{greeting}"
    );
    let mut tarpitted = from("127.0.0.3");
    let started = std::time::Instant::now();
    assert!(
        tarpitted
            .reply()
            .lines()
            .last()
            .unwrap()
            .starts_with("220 ")
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "the tarpitted banner waits the reply delay"
    );
    assert!(tarpitted.command("QUIT").starts_with("221 "));
    // 127.0.0.4: the first attempt is deferred; a retry after the time the reply names (as
    // an MTA retries) is delivered.
    let attempt = || {
        let mut client = from("127.0.0.4");
        assert!(client.reply().lines().last().unwrap().starts_with("220 "));
        assert!(client.command("EHLO client.example").starts_with("250-"));
        assert!(
            client
                .command("MAIL FROM:<grey@example.org>")
                .starts_with("250 ")
        );
        let reply = client.command("RCPT TO:<someone@example.net>");
        if reply.starts_with("250 ") {
            assert!(client.command("DATA").starts_with("354 "));
            client.send(b"Subject: greylisted\r\n\r\nretried\r\n.\r\n");
            assert!(client.reply().starts_with("250 2.0.0 "));
        }
        assert!(client.command("QUIT").starts_with("221 "));
        reply
    };
    let deferred = attempt();
    let seconds: u64 = deferred
        .strip_prefix("451 4.7.1 Greylisted, please try again in ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the first attempt is deferred: {deferred}"));
    std::thread::sleep(std::time::Duration::from_secs(seconds));
    let retried = attempt();
    assert!(
        retried.starts_with("250 "),
        "the retry is delivered: {retried}"
    );
    // The demo's metrics count what happened, once every session above has closed.
    assert!(client.command("QUIT").starts_with("221 "));
    drop((client, denied, tarpitted));
    let scrape = || {
        use std::io::{Read, Write};
        let mut http = std::net::TcpStream::connect("127.0.0.1:2527").unwrap();
        http.write_all(b"GET /metrics HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        http.read_to_string(&mut text).unwrap();
        text
    };
    let expected = [
        "tarmac_messages_relayed_total 2",
        "tarmac_sessions_total{verdict=\"reject\"} 1",
        "tarmac_sessions_total{verdict=\"tarpit\"} 1",
    ];
    let mut last = String::new();
    let counted = std::iter::repeat_with(|| {
        last = scrape();
        expected.iter().all(|line| last.contains(line))
    })
    .take(500)
    .any(|done| {
        if !done {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        done
    });
    assert!(
        counted,
        "the demo's metrics never counted every session: {expected:?} in\n{last}"
    );
    assert!(last.starts_with("HTTP/1.1 200"), "{last}");
    child.signal("INT");
    let (code, stderr) = child.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    for (client, fields) in [
        ("127.0.0.2", "list=deny:address"),
        ("127.0.0.3", "verdict=tarpit"),
        ("127.0.0.4", "greylist=pass"),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&format!("client={client}:")) && l.contains(fields)),
            "no close line for {client} with {fields}:\n{stderr}"
        );
    }
    // The demo's state is saved in its own directory at exit: the delivery is remembered.
    let reputation = std::fs::read_to_string(dir.join("demo-mail/state/reputation.state"));
    assert!(
        reputation
            .as_deref()
            .unwrap_or_default()
            .contains("\n127.0.0.1 "),
        "{reputation:?} {stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metrics_and_required_tls_check_clean_without_a_note() {
    let dir = temp_dir("later");
    let path = dir.join("later.toml");
    // Metrics are served now (issue 16): no "not in this version" note any more.
    std::fs::write(&path, "[metrics]\nlisten = \"127.0.0.1:9425\"\n").unwrap();
    let out = tarmac_check(&path);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("note:"), "{stdout}");

    // Downstream STARTTLS is in: "required" checks clean, with no note.
    std::fs::write(
        &path,
        "[downstream]\ntls = \"required\"\ntls_verify = true\n",
    )
    .unwrap();
    let out = tarmac_check(&path);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("note:"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_rejects_a_listed_client_and_logs_the_verdict() {
    let dns = DnsServer::start(vec![
        Zone::new("bl.test")
            .a("2.0.0.127", "127.0.0.2")
            .a("10.0.0.127", "127.0.0.2"),
    ]);
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("zones");
    let port = free_port();
    let path = dir.join("tarmac.toml");
    // gone.test is in no zone the server knows: REFUSED, a temporary failure.
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"mx.test\"\nworkers = 1\nstate_dir = \"state\"\n\n\
             [downstream]\nservers = [\"{}\"]\n\n[timeouts]\ndrain = \"5s\"\n\n\
             [dns]\nservers = [\"{}\"]\nrdns = false\n\n[tarpit]\ngreet_pause = \"0s\"\n[greylist]\nenabled = false\n\n\
             [[dnsbl]]\nzone = \"bl.test\"\nweight = 3\n\n\
             [[dnsbl]]\nzone = \"gone.test\"\nweight = 1\n",
            sink.local_addr(),
            dns.addr()
        ),
    )
    .unwrap();
    let child = Running::start(tarmac(), &path);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until("tarmac to listen", || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    let mut listed = Client::connect_from(addr, "127.0.0.10".parse().unwrap());
    assert_eq!(
        listed.reply(),
        "554 5.7.1 Service unavailable; client [127.0.0.10] blocked using bl.test\r\n"
    );
    assert_eq!(listed.command("QUIT"), "221 2.0.0 Bye\r\n");
    let mut clean = Client::connect_from(addr, "127.0.0.3".parse().unwrap());
    assert!(clean.send_message().starts_with("250 "));
    assert_eq!(clean.command("QUIT"), "221 2.0.0 Bye\r\n");
    child.signal("TERM");
    let (code, stderr) = child.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(
            " rdns=- helo=- verdict=reject score=3 rep=none dnsbl=bl.test:3,gone.test:tempfail list=- \
             rule=- greylist=- pregreet=no tls=no tls_version=- msgs=0 rcpts=0 scan=- result=rejected "
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(" verdict=pass score=0 rep=none dnsbl=gone.test:tempfail list=- rule=- "),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_names_every_bad_list_line() {
    let dir = temp_dir("lists");
    std::fs::write(
        dir.join("deny.txt"),
        "# spammers\n192.0.2.0/24\n192.0.2.1/24\nspam.example\nnot an entry\n",
    )
    .unwrap();
    let path = dir.join("tarmac.toml");
    std::fs::write(
        &path,
        "[lists]\nallow = []\ndeny = [\"deny.txt\", \"missing.txt\"]\n",
    )
    .unwrap();
    let out = tarmac_check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let deny = dir.join("deny.txt");
    assert!(
        stderr.contains(&format!("{}:3: ", deny.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{}:5: ", deny.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{}: cannot read list file: ",
            dir.join("missing.txt").display()
        )),
        "{stderr}"
    );

    std::fs::write(&path, "[lists]\nallow = []\ndeny = [\"good.txt\"]\n").unwrap();
    std::fs::write(dir.join("good.txt"), "192.0.2.0/24\nspam.example\n").unwrap();
    let out = tarmac_check(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 allow and 2 deny list entries"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_names_an_unreadable_or_garbled_downstream_ca_file() {
    let dir = temp_dir("tls-ca");
    let path = dir.join("tarmac.toml");
    std::fs::write(
        &path,
        "[downstream]\ntls_verify = true\ntls_ca = \"ca/missing.pem\"\n",
    )
    .unwrap();
    let out = tarmac_check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let missing = dir.join("ca/missing.pem");
    assert!(
        stderr.contains(&format!(
            "{}: downstream.tls_ca: cannot read CA file: ",
            missing.display()
        )),
        "{stderr}"
    );

    std::fs::write(dir.join("garbled.pem"), "not a certificate\n").unwrap();
    std::fs::write(
        &path,
        "[downstream]\ntls_verify = true\ntls_ca = \"garbled.pem\"\n",
    )
    .unwrap();
    let out = tarmac_check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: downstream.tls_ca: no certificate in it",
            dir.join("garbled.pem").display()
        )),
        "{stderr}"
    );

    // A real CA file checks, with no note: the certificate is checked at each handshake.
    let certs = tarmac_testkit::certs::TestCerts::generate(&dir, "down");
    std::fs::write(
        &path,
        format!(
            "[downstream]\ntls_verify = true\ntls_ca = {:?}\n",
            certs.ca.display().to_string()
        ),
    )
    .unwrap();
    let out = tarmac_check(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("note:"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_low_descriptor_limit_is_raised_logged_and_caps_max_connections() {
    let dir = temp_dir("nofile");
    let port = free_port();
    let path = dir.join("tarmac.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"mx.test\"\nworkers = 1\n\
             state_dir = \"state\"\n\n[limits]\nmax_connections_per_ip = 1000\n\
             max_connections_per_subnet = 1000\nconnection_rate_per_ip = \"100000/s\"\n\
             connection_rate_per_subnet = \"100000/s\"\n\n[dns]\nrdns = false\n\n\
             [tarpit]\ngreet_pause = \"0s\"\n[greylist]\nenabled = false\n"
        ),
    )
    .unwrap();
    // Soft 200, hard 300: raised to 300; 131 reserved (128, plus a poll, a waker and a
    // listener for the one worker) leaves 169, two per connection: 84 connections.
    let mut command = std::process::Command::new("prlimit");
    command
        .arg("--nofile=200:300")
        .arg(env!("CARGO_BIN_EXE_tarmac"))
        .args(["run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "info");
    let child = Running::spawn(command);
    let raised = wait_for_log(&child.lines, "file descriptors: soft limit raised");
    assert!(
        raised.contains("from 200 to the hard limit 300"),
        "{raised}"
    );
    let capped = wait_for_log(&child.lines, "file descriptors: max_connections = 50000");
    assert!(
        capped.contains("the limit is 300; serving at most 84 connections"),
        "{capped}"
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until("tarmac to listen", || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    // The probe connections above may still be counted: fill up to the cap by banners.
    let mut held = Vec::new();
    let refused = loop {
        let mut client = Client::connect(addr);
        let line = client.line();
        if line.starts_with("421 ") {
            break line;
        }
        assert_eq!(line, "220 mx.test ESMTP tarmac\r\n");
        held.push(client);
        assert!(
            held.len() <= 84,
            "more than the capped max_connections served"
        );
    };
    // Refused by the global cap, with descriptors to spare: no crash, no lost answers.
    assert_eq!(
        refused,
        "421 4.7.0 mx.test Too many connections, try again later\r\n"
    );
    assert!(held.len() >= 80, "only {} served", held.len());
    let last = held.last_mut().unwrap();
    assert_eq!(last.command("NOOP"), "250 2.0.0 Ok\r\n");
    drop(held);
    child.signal("TERM");
    let (code, stderr) = child.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
