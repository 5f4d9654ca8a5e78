//! Interop with real peers: swaks and Python's smtplib as clients, Postfix's smtp-source as a
//! load client and smtp-sink as the downstream, rbldnsd as a DNS block list. Each test skips with a note where its peer is
//! not installed, except under `CI=true` (see `tarmac_testkit::require_program`).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tarmac_testkit::sink::Behaviour;

use tarmac_testkit::{
    Client, Server, WAIT, require_program, run_bounded, sink, test_config, wait_until,
};

#[test]
fn swaks_delivers_through_tarmac() {
    let Some(swaks) = require_program("swaks") else {
        return;
    };
    let sink = sink(Behaviour::Normal);
    let server = Server::start(test_config(sink.local_addr()));
    for pipelining in [false, true] {
        let mut command = Command::new(&swaks);
        command.args([
            "--server",
            &server.addr.to_string(),
            "--from",
            "sender@example.org",
            "--to",
            "rcpt@example.net",
            "--header",
            "Subject: swaks interop",
            "--body",
            "Hello from swaks.\n.leading dot line\n",
            "--timeout",
            "10",
        ]);
        if pipelining {
            command.arg("--pipeline");
        }
        let (ok, output) = run_bounded(command);
        assert!(ok, "swaks failed:\n{output}");
        assert!(output.contains("<-  250 2.0.0 Ok: queued as"), "{output}");
    }
    let messages = sink.wait_for_messages(2, WAIT);
    assert_eq!(messages.len(), 2);
    for m in &messages {
        assert_eq!(m.rcpt_to, ["rcpt@example.net"]);
        let content = String::from_utf8_lossy(&m.content);
        assert!(content.contains("Subject: swaks interop\r\n"), "{content}");
        assert!(content.contains("\r\n.leading dot line\r\n"), "{content}");
        assert!(!m.bare_newline_seen);
    }
}

#[test]
fn python_smtplib_delivers_through_tarmac() {
    let Some(python) = require_program("python3") else {
        return;
    };
    let sink = sink(Behaviour::RejectRcpt("nobody".to_owned()));
    let server = Server::start(test_config(sink.local_addr()));
    let script = r#"
import smtplib, sys
from email.message import EmailMessage
host, port = sys.argv[1], int(sys.argv[2])
msg = EmailMessage()
msg["From"] = "sender@example.org"
msg["To"] = "rcpt@example.net"
msg["Subject"] = "smtplib interop"
msg.set_content("Grüße from smtplib\n.dot line\n", cte="8bit")
with smtplib.SMTP(host, port, timeout=10) as s:
    code, caps = s.ehlo("python.example")
    assert code == 250, code
    assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("size"), caps
    assert not s.has_extn("xclient")
    refused = s.send_message(msg, to_addrs=["rcpt@example.net", "nobody@example.net"])
    assert list(refused) == ["nobody@example.net"], refused
    assert refused["nobody@example.net"][0] == 550, refused
    code, text = s.noop()
    assert code == 250, code
print("sent")
"#;
    let mut command = Command::new(python);
    command.args(["-c", script, "127.0.0.1", &server.addr.port().to_string()]);
    let (ok, output) = run_bounded(command);
    assert!(ok && output.contains("sent"), "smtplib failed:\n{output}");
    let messages = sink.wait_for_messages(1, WAIT);
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].rcpt_to, ["rcpt@example.net"]);
    let content = String::from_utf8_lossy(&messages[0].content);
    assert!(
        content.contains("Grüße from smtplib\r\n.dot line\r\n"),
        "{content}"
    );
}

/// Postfix's smtp-sink, killed on drop.
struct PostfixSink {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for PostfixSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn postfix_sink(program: &std::path::Path) -> PostfixSink {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("tarmac-smtp-sink-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // smtp-sink drops privileges when run as root; the dump directory must stay writable.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut command = Command::new(program);
    if std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0) {
        command.args(["-u", "nobody"]);
    }
    command
        .arg("-d")
        .arg(dir.join("msg."))
        .arg(format!("127.0.0.1:{port}"))
        .arg("64")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = command.spawn().expect("start smtp-sink");
    let sink = PostfixSink { child, port, dir };
    wait_until("smtp-sink to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    sink
}

fn dumped(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter(|text| text.contains("\n\n") || text.contains("\r\n\r\n"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn postfix_smtp_sink_as_downstream_sees_the_real_client() {
    let Some(program) = require_program("smtp-sink") else {
        return;
    };
    let postfix = postfix_sink(&program);
    let server = Server::start(test_config(
        format!("127.0.0.1:{}", postfix.port).parse().unwrap(),
    ));
    let mut client = Client::connect(server.addr);
    client.start_message("a@example.org", &["b@example.net"]);
    client.send(b"Subject: to postfix\r\n\r\nbody line\r\n.\r\n");
    let reply = client.reply();
    assert!(reply.starts_with("250 2.0.0 "), "{reply}");
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    let mut dumps = Vec::new();
    wait_until("smtp-sink to dump the message", || {
        dumps = dumped(&postfix.dir);
        !dumps.is_empty()
    });
    let dump = &dumps[0];
    // smtp-sink offers `XCLIENT NAME HELO` and answers it 250 (Postfix's smtpd says 220):
    // tarmac sends what is offered, then EHLO again with the client's own name.
    assert!(dump.contains("X-Client-Addr: 127.0.0.1"), "{dump}");
    assert!(dump.contains("X-Helo-Args: client.example"), "{dump}");
    assert!(dump.contains("X-Mail-Args: <a@example.org>"), "{dump}");
    assert!(
        dump.contains("Received: from client.example ([127.0.0.1])"),
        "{dump}"
    );
    assert!(dump.contains("body line"), "{dump}");
}

#[test]
fn postfix_smtp_source_load_through_tarmac() {
    let Some(program) = require_program("smtp-source") else {
        return;
    };
    let sink = sink(Behaviour::Normal);
    let server = Server::start(test_config(sink.local_addr()));
    let mut command = Command::new(program);
    command.args([
        "-s",
        "5",
        "-m",
        "40",
        "-l",
        "4096",
        "-f",
        "load@example.org",
        "-t",
        "rcpt@example.net",
    ]);
    command.arg(server.addr.to_string());
    let (ok, output) = run_bounded(command);
    assert!(ok, "smtp-source failed:\n{output}");
    assert_eq!(sink.wait_for_messages(40, WAIT).len(), 40);
}

/// rbldnsd, killed (by its own PID) when the test ends.
struct Rbldnsd {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Rbldnsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts rbldnsd on a free loopback UDP port serving `zone` as an `ip4set` with `data`, and
/// waits until it answers.
fn rbldnsd(program: &std::path::Path, zone: &str, data: &str) -> (Rbldnsd, u16) {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let dir = std::env::temp_dir().join(format!("tarmac-rbldnsd-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("zone.txt"), data).unwrap();
    let mut command = Command::new(program);
    // -n: stay in the foreground, so the PID is the server's; -a: minimal answers.
    command.args(["-n", "-a", "-b", &format!("127.0.0.1/{port}"), "-w"]);
    command.arg(&dir);
    if std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0) {
        // rbldnsd drops root; the zone file in the temp dir is world-readable.
        command.args(["-u", "nobody"]);
    }
    command
        .arg(format!("{zone}:ip4set:zone.txt"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let server = Rbldnsd {
        child: command.spawn().expect("start rbldnsd"),
        dir,
    };
    wait_until("rbldnsd to answer", || dns_answers(port, zone));
    (server, port)
}

/// Whether a DNS server on loopback `port` answers an A query for `2.0.0.127.<zone>` (one
/// hand-built UDP query; any reply with our id counts).
fn dns_answers(port: u16, zone: &str) -> bool {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut query = vec![0x4a, 0x17, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in format!("2.0.0.127.{zone}").split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    if socket.send_to(&query, ("127.0.0.1", port)).is_err() {
        return false;
    }
    let mut reply = [0; 512];
    matches!(socket.recv(&mut reply), Ok(n) if n >= 12 && reply[..2] == [0x4a, 0x17])
}

#[test]
fn rbldnsd_zone_decides_who_is_rejected() {
    let Some(program) = require_program("rbldnsd") else {
        return;
    };
    // An ip4set: the default value line, then the listed addresses and ranges. The zone lists
    // 127.0.0.2 and not 127.0.0.1, as a real list's test points, so its health check passes.
    let (_rbldnsd, port) = rbldnsd(
        &program,
        "bl.test",
        ":127.0.0.2:Listed, see https://bl.test/lookup\n127.0.0.2\n127.0.0.10-127.0.0.11\n",
    );
    let sink = sink(Behaviour::Normal);
    let mut config = test_config(sink.local_addr());
    config.dns.servers = vec![format!("127.0.0.1:{port}").parse().unwrap()];
    config.dnsbl = vec![tarmac::config::Dnsbl {
        zone: "bl.test".into(),
        weight: 3,
        codes: vec![],
        reply: None,
    }];
    let server = Server::start(config);

    let mut listed = Client::connect_from(server.addr, "127.0.0.10".parse().unwrap());
    assert_eq!(
        listed.reply(),
        "554 5.7.1 Service unavailable; client [127.0.0.10] blocked using bl.test\r\n"
    );
    assert_eq!(
        listed.command("EHLO c"),
        "503 5.7.1 Error: service unavailable; only QUIT is accepted\r\n"
    );
    assert_eq!(listed.command("QUIT"), "221 2.0.0 Bye\r\n");

    let mut clean = Client::connect_from(server.addr, "127.0.0.3".parse().unwrap());
    let reply = clean.send_message();
    assert!(reply.starts_with("250 "), "{reply}");
    wait_until("the message at the sink", || sink.messages().len() == 1);
}
