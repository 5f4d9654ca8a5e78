//! Inbound STARTTLS end to end on loopback: a rustls client and Python's smtplib delivering
//! over TLS through tarmac to the sink, commands injected before the handshake, a broken
//! handshake next to a healthy session, certificates replaced and refused on SIGHUP, and
//! `tarmac check` on bad certificate files. Certificates come from `tarmac_testkit::certs`
//! (a private CA per test); nothing is trusted from the system store.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ProtocolVersion, RootCertStore, StreamOwned};
use tarmac::config::Config;
use tarmac_testkit::sink::{Behaviour, Sink};

use crate::util::{tarmac, tarmac_check};
use tarmac_testkit::certs::TestCerts;
use tarmac_testkit::redis_server::RedisServer;
use tarmac_testkit::{
    Client, Running, Server, WAIT, noise, require_program, run_bounded, sink, temp_dir,
    test_config, wait_for_log,
};

const READY: &str = "220 2.0.0 Ready to start TLS\r\n";

/// [`test_config`] with `certs` as `[tls]`, loaded as `Config::load` would.
fn tls_config(sink: &Sink, certs: &TestCerts) -> Config {
    let mut config = test_config(sink.local_addr());
    config.tls.cert = Some(certs.chain.clone());
    config.tls.key = Some(certs.key.clone());
    config.load_tls().unwrap();
    config
}

/// A client config trusting exactly the CAs in `cas`, speaking `versions`.
fn client_config(
    cas: &[&Path],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(CertificateDer::from_pem_file(ca).unwrap())
            .unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// SMTP over a finished TLS handshake, every read and write bounded by the socket's timeouts.
struct TlsClient {
    stream: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl TlsClient {
    /// Banner, EHLO (which must offer STARTTLS), STARTTLS and the handshake, as `localhost`.
    #[track_caller]
    fn start(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsClient {
        let mut plain = Client::connect(addr);
        assert!(plain.reply().starts_with("220 "));
        let ehlo = plain.command("EHLO client.example");
        assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");
        assert_eq!(plain.command("STARTTLS"), READY);
        TlsClient::handshake(plain.writer.try_clone().unwrap(), config)
    }

    /// The client side of the handshake on `socket`, right after the server's `220`.
    #[track_caller]
    fn handshake(mut socket: TcpStream, config: Arc<ClientConfig>) -> TlsClient {
        let name = ServerName::try_from("localhost").unwrap();
        let mut conn = ClientConnection::new(config, name).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut socket).unwrap();
        }
        TlsClient {
            stream: BufReader::new(StreamOwned::new(conn, socket)),
        }
    }

    /// One whole reply, every line of a multi-line one.
    #[track_caller]
    fn reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let mut line = Vec::new();
            self.stream.read_until(b'\n', &mut line).unwrap();
            assert!(line.ends_with(b"\r\n"), "cut off: {reply}{line:?}");
            let line = String::from_utf8(line).unwrap();
            let last = line.as_bytes().get(3) != Some(&b'-');
            reply.push_str(&line);
            if last {
                return reply;
            }
        }
    }

    #[track_caller]
    fn send(&mut self, bytes: &[u8]) {
        let stream = self.stream.get_mut();
        stream.write_all(bytes).unwrap();
        stream.flush().unwrap();
    }

    #[track_caller]
    fn command(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n").as_bytes());
        self.reply()
    }

    /// EHLO again (RFC 3207), then one message; returns the reply to the dot.
    #[track_caller]
    fn deliver(&mut self, subject: &str) -> String {
        let ehlo = self.command("EHLO client.example");
        assert!(ehlo.starts_with("250-mx.test\r\n"), "{ehlo}");
        assert!(!ehlo.contains("STARTTLS"), "not offered twice: {ehlo}");
        assert!(
            self.command("MAIL FROM:<a@example.org>")
                .starts_with("250 ")
        );
        assert!(self.command("RCPT TO:<b@example.net>").starts_with("250 "));
        assert!(self.command("DATA").starts_with("354 "));
        self.send(format!("Subject: {subject}\r\n\r\nover TLS\r\n.\r\n").as_bytes());
        self.reply()
    }

    fn version(&self) -> Option<ProtocolVersion> {
        self.stream.get_ref().conn.protocol_version()
    }

    /// The leaf certificate the server presented (DER).
    fn peer_leaf(&self) -> Vec<u8> {
        let certs = self.stream.get_ref().conn.peer_certificates().unwrap();
        certs[0].to_vec()
    }
}

/// A config file for `tarmac run`/`check` in `dir`: loopback on a free port, one worker, the
/// sink (or nothing) as downstream, no DNS, no pause, no greylisting, `[tls]` as given.
fn write_config(dir: &Path, downstream: Option<SocketAddr>, tls: &str) -> PathBuf {
    let path = dir.join("tarmac.toml");
    let servers = downstream.map_or(String::new(), |addr| format!("servers = [\"{addr}\"]\n"));
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"mx.test\"\nworkers = 1\nstate_dir = \"state\"\n\
             [downstream]\n{servers}announce_client = \"xclient\"\ntls = \"none\"\n\
             [timeouts]\ndrain = \"5s\"\n[dns]\nrdns = false\n[tarpit]\ngreet_pause = \"0s\"\n\
             [greylist]\nenabled = false\n[lists]\nallow = []\ndeny = []\n\
             [tls]\n{tls}"
        ),
    )
    .unwrap();
    path
}

/// The 1-based line of the config file at `path` that starts with `start`.
fn line_of(path: &Path, start: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    1 + text.lines().position(|l| l.starts_with(start)).unwrap()
}

/// Where a `tarmac run` child listens, from its log.
fn listening(child: &Running) -> SocketAddr {
    let line = wait_for_log(&child.lines, "listening on ");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn rustls_client_delivers_over_starttls_and_the_close_line_names_the_version() {
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("tls-deliver");
    let certs = TestCerts::generate(&dir, "mx");
    let tls = format!(
        "cert = \"{}\"\nkey = \"{}\"\n",
        certs.chain.display(),
        certs.key.display()
    );
    let child = Running::start(tarmac(), &write_config(&dir, Some(sink.local_addr()), &tls));
    let addr = listening(&child);

    let tls13 = client_config(&[&certs.ca], &[&rustls::version::TLS13]);
    let mut client = TlsClient::start(addr, tls13);
    assert_eq!(client.version(), Some(ProtocolVersion::TLSv1_3));
    assert!(client.deliver("one").starts_with("250 "));
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    let line = wait_for_log(&child.lines, "result=delivered");
    assert!(
        line.contains(" tls=yes tls_version=TLSv1.3 msgs=1 rcpts=1 "),
        "{line}"
    );

    let tls12 = client_config(&[&certs.ca], &[&rustls::version::TLS12]);
    let mut client = TlsClient::start(addr, tls12);
    assert_eq!(client.version(), Some(ProtocolVersion::TLSv1_2));
    assert!(client.deliver("two").starts_with("250 "));
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    let line = wait_for_log(&child.lines, "result=delivered");
    assert!(line.contains(" tls=yes tls_version=TLSv1.2 "), "{line}");

    // A plain session says so.
    let mut plain = Client::connect(addr);
    assert_eq!(plain.send_message().get(..4), Some("250 "));
    assert_eq!(plain.command("QUIT"), "221 2.0.0 Bye\r\n");
    let line = wait_for_log(&child.lines, "result=delivered");
    assert!(line.contains(" tls=no tls_version=- "), "{line}");

    let messages = sink.wait_for_messages(3, WAIT);
    assert_eq!(messages.len(), 3);
    for message in &messages[..2] {
        let raw = String::from_utf8_lossy(&message.raw);
        assert!(raw.contains("(tarmac) with ESMTPS;"), "{raw}");
        assert_eq!(
            message.helo, "client.example",
            "the client's own name after XCLIENT"
        );
    }
    assert!(String::from_utf8_lossy(&messages[2].raw).contains("(tarmac) with ESMTP;"));
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn swaks_starttls_verifies_the_certificate_and_delivers() {
    let Some(swaks) = require_program("swaks") else {
        return;
    };
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("tls-swaks");
    let certs = TestCerts::generate(&dir, "mx");
    let server = Server::start(tls_config(&sink, &certs));
    let mut command = Command::new(swaks);
    command.args([
        "--server",
        "localhost",
        "--port",
        &server.addr.port().to_string(),
        "--from",
        "sender@example.org",
        "--to",
        "rcpt@example.net",
        "--tls",
        "--tls-verify",
        "--tls-ca-path",
        &certs.ca.display().to_string(),
        "--timeout",
        "10",
    ]);
    let (ok, output) = run_bounded(command);
    assert!(ok, "swaks failed:\n{output}");
    assert!(output.contains("TLS started"), "{output}");
    assert!(output.contains("<~  250 2.0.0 Ok: queued as"), "{output}");
    assert_eq!(sink.wait_for_messages(1, WAIT).len(), 1);
}

#[test]
fn python_smtplib_starttls_delivers() {
    let Some(python) = require_program("python3") else {
        return;
    };
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("tls-python");
    let certs = TestCerts::generate(&dir, "mx");
    let server = Server::start(tls_config(&sink, &certs));
    let script = r#"
import smtplib, ssl, sys
from email.message import EmailMessage
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=ca)
msg = EmailMessage()
msg["From"] = "sender@example.org"
msg["To"] = "rcpt@example.net"
msg["Subject"] = "smtplib over TLS"
msg.set_content("sent after STARTTLS\n")
with smtplib.SMTP(host, port, timeout=10) as s:
    s.ehlo("python.example")
    assert s.has_extn("starttls"), s.esmtp_features
    code, _ = s.starttls(context=context)
    assert code == 220, code
    s.ehlo("python.example")
    assert not s.has_extn("starttls"), s.esmtp_features
    print(s.sock.version())
    s.send_message(msg)
print("sent")
"#;
    let mut command = Command::new(python);
    command.args([
        "-c",
        script,
        "localhost",
        &server.addr.port().to_string(),
        &certs.ca.display().to_string(),
    ]);
    let (ok, output) = run_bounded(command);
    assert!(ok && output.contains("sent"), "smtplib failed:\n{output}");
    assert!(output.contains("TLSv1."), "{output}");
    let messages = sink.wait_for_messages(1, WAIT);
    assert_eq!(messages.len(), 1);
    assert!(String::from_utf8_lossy(&messages[0].raw).contains("sent after STARTTLS"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn commands_pipelined_after_starttls_are_not_answered_over_tls() {
    // CVE-2011-0411: a man in the middle appends NOOP (here: a MAIL too) to the client's
    // STARTTLS; the server must not answer it once TLS is up.
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("tls-inject");
    let certs = TestCerts::generate(&dir, "mx");
    let server = Server::start(tls_config(&sink, &certs));
    let mut plain = Client::connect(server.addr);
    assert!(plain.reply().starts_with("220 "));
    assert!(plain.command("EHLO client.example").contains("STARTTLS"));
    plain.send("STARTTLS\r\nNOOP\r\nMAIL FROM:<evil@example.org>\r\n");
    assert_eq!(plain.reply(), READY);
    let config = client_config(&[&certs.ca], rustls::ALL_VERSIONS);
    let mut client = TlsClient::handshake(plain.writer.try_clone().unwrap(), config);
    let first = client.command("EHLO client.example");
    assert!(
        first.starts_with("250-mx.test\r\n"),
        "the first reply over TLS must answer the EHLO: {first}"
    );
    assert_eq!(
        client.command("RCPT TO:<b@example.net>"),
        "503 5.5.1 Error: need MAIL command\r\n",
        "the injected MAIL was dropped"
    );
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_garbage_handshake_closes_only_its_connection_and_withholds_starttls() {
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("tls-garbage");
    let certs = TestCerts::generate(&dir, "mx");
    let server = Server::start(tls_config(&sink, &certs));

    // A healthy session, opened first, in the middle of its dialog.
    let mut healthy = Client::connect(server.addr);
    assert!(healthy.reply().starts_with("220 "));
    assert!(healthy.command("EHLO client.example").starts_with("250-"));

    let mut broken = Client::connect(server.addr);
    assert!(broken.reply().starts_with("220 "));
    assert!(
        broken
            .command("EHLO client.example")
            .contains("250-STARTTLS\r\n")
    );
    assert_eq!(broken.command("STARTTLS"), READY);
    // Not a TLS record: the first byte is no content type.
    let mut garbage = b"GARBAGE ".to_vec();
    garbage.extend(noise(4096, 0x2545_f491_4f6c_dd1d));
    broken.send(&garbage);
    broken.drain_to_close();

    // The healthy session is untouched.
    assert!(
        healthy
            .command("MAIL FROM:<a@example.org>")
            .starts_with("250 ")
    );
    assert!(
        healthy
            .command("RCPT TO:<b@example.net>")
            .starts_with("250 ")
    );
    assert!(healthy.command("DATA").starts_with("354 "));
    healthy.send("hi\r\n.\r\n");
    assert!(healthy.reply().starts_with("250 "));
    assert_eq!(sink.wait_for_messages(1, WAIT).len(), 1);

    // The address whose handshake failed is not offered STARTTLS, so it can deliver in
    // plain text; it cannot force it either.
    let mut again = Client::connect(server.addr);
    assert!(again.reply().starts_with("220 "));
    let ehlo = again.command("EHLO client.example");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(
        again.command("STARTTLS"),
        "502 5.5.1 Error: STARTTLS not available\r\n"
    );
    // Another address still is.
    let mut other = Client::connect_from(server.addr, "127.0.0.2".parse().unwrap());
    assert!(other.reply().starts_with("220 "));
    assert!(other.command("EHLO client.example").contains("STARTTLS"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// With the connection rates in Redis a direct client's session asks for its admission after
/// accept; its STARTTLS offer was decided at accept already, so a client whose handshake
/// failed is named in exactly one "not offering STARTTLS" line per connection, not in a second
/// one when the rate answer comes.
#[test]
fn a_withheld_client_under_shared_rates_is_logged_once_per_connection() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("tls-withheld-redis");
    let certs = TestCerts::generate(&dir, "mx");
    let tls = format!(
        "cert = \"{}\"\nkey = \"{}\"\n[state]\nbackend = \"redis\"\nredis = \"{}\"\n",
        certs.chain.display(),
        certs.key.display(),
        redis.url()
    );
    let child = Running::start(tarmac(), &write_config(&dir, Some(sink.local_addr()), &tls));
    let addr = listening(&child);

    let mut broken = Client::connect(addr);
    assert!(broken.reply().starts_with("220 "));
    assert!(
        broken
            .command("EHLO client.example")
            .contains("250-STARTTLS\r\n")
    );
    assert_eq!(broken.command("STARTTLS"), READY);
    broken.send("GARBAGE, not a TLS record\r\n");
    broken.drain_to_close();

    let mut again = Client::connect(addr);
    assert!(again.reply().starts_with("220 "));
    assert!(!again.command("EHLO client.example").contains("STARTTLS"));
    assert_eq!(again.command("QUIT"), "221 2.0.0 Bye\r\n");
    // Every line up to the second connection's close line (the first one's says
    // `result=tls-failed`).
    let mut withheld = Vec::new();
    loop {
        let line = wait_for_log(&child.lines, "");
        // `... to 127.0.0.1:PORT: a TLS handshake ...` (the line recording the failure names
        // the address without a port).
        if line.contains("not offering STARTTLS to 127.0.0.1:") {
            withheld.push(line);
        } else if line.contains(" result=") && !line.contains("result=tls-failed") {
            break;
        }
    }
    assert_eq!(withheld.len(), 1, "{withheld:#?}");
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_silent_handshake_times_out_under_the_command_timeout() {
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("tls-silent");
    let certs = TestCerts::generate(&dir, "mx");
    let mut config = tls_config(&sink, &certs);
    config.timeouts.command = std::time::Duration::from_millis(300);
    let server = Server::start(config);
    let mut client = Client::connect(server.addr);
    assert!(client.reply().starts_with("220 "));
    assert_eq!(client.command("STARTTLS"), READY);
    let started = std::time::Instant::now();
    client.expect_eof();
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
}

#[test]
fn sighup_swaps_the_certificate_and_refuses_a_broken_key() {
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("tls-reload");
    let first = TestCerts::generate(&dir, "first");
    let second = TestCerts::generate(&dir, "second");
    // The config names fixed paths; the test replaces what is in them.
    let chain = dir.join("chain.pem");
    let key = dir.join("key.pem");
    std::fs::copy(&first.chain, &chain).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let path = write_config(
        &dir,
        Some(sink.local_addr()),
        "cert = \"chain.pem\"\nkey = \"key.pem\"\n",
    );
    let child = Running::start(tarmac(), &path);
    let addr = listening(&child);
    let trust_both = client_config(&[&first.ca, &second.ca], rustls::ALL_VERSIONS);

    let mut before = TlsClient::start(addr, Arc::clone(&trust_both));
    let first_leaf = before.peer_leaf();
    // A session over TLS from before the reload keeps working.
    assert!(before.command("EHLO client.example").starts_with("250-"));

    std::fs::copy(&second.chain, &chain).unwrap();
    std::fs::copy(&second.key, &key).unwrap();
    child.signal("HUP");
    wait_for_log(&child.lines, "reloaded ");
    let after = TlsClient::start(addr, Arc::clone(&trust_both));
    let second_leaf = after.peer_leaf();
    assert_ne!(first_leaf, second_leaf, "new handshakes use the new pair");
    assert_eq!(
        second_leaf,
        CertificateDer::from_pem_file(&second.chain)
            .unwrap()
            .to_vec()
    );

    // The first pair's key with the second pair's chain: refused as a whole.
    std::fs::copy(&first.key, &key).unwrap();
    child.signal("HUP");
    let refused = wait_for_log(&child.lines, "reload refused");
    assert!(
        refused.contains(&format!(
            "{}:{}: tls.key: {}: does not match the certificate in {}",
            path.display(),
            line_of(&path, "key ="),
            key.display(),
            chain.display()
        )),
        "{refused}"
    );
    let still = TlsClient::start(addr, trust_both);
    assert_eq!(still.peer_leaf(), second_leaf, "the pair in force stays");
    assert!(before.deliver("from before").starts_with("250 "));
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_names_a_missing_or_garbled_certificate_file() {
    let dir = temp_dir("tls-check");
    let certs = TestCerts::generate(&dir, "mx");
    let garbled = dir.join("garbled.pem");
    std::fs::write(
        &garbled,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n",
    )
    .unwrap();
    let check = |tls: &str| {
        let path = write_config(&dir, None, tls);
        let out = tarmac_check(&path);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stderr, path)
    };

    let (code, stderr, path) = check(&format!(
        "cert = \"missing.pem\"\nkey = \"{}\"\n",
        certs.key.display()
    ));
    assert_eq!(code, Some(1));
    let prefix = format!(
        "{}:{}: tls.cert: {}: cannot read: ",
        path.display(),
        line_of(&path, "cert ="),
        dir.join("missing.pem").display()
    );
    assert!(stderr.starts_with(&prefix), "{stderr}");

    let (code, stderr, path) = check(&format!(
        "cert = \"garbled.pem\"\nkey = \"{}\"\n",
        certs.key.display()
    ));
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr.trim_end(),
        format!(
            "{}:{}: tls.cert: {}: a PEM section has no END line",
            path.display(),
            line_of(&path, "cert ="),
            garbled.display()
        )
    );

    let (code, stderr, path) = check(&format!(
        "cert = \"{}\"\nkey = \"{}\"\n",
        certs.chain.display(),
        certs.chain.display()
    ));
    assert_eq!(code, Some(1));
    assert!(
        stderr.starts_with(&format!(
            "{}:{}: tls.key: {}: no private key found",
            path.display(),
            line_of(&path, "key ="),
            certs.chain.display()
        )),
        "{stderr}"
    );

    let (code, stderr, _) = check(&format!(
        "cert = \"{}\"\nkey = \"{}\"\n",
        certs.chain.display(),
        certs.key.display()
    ));
    assert_eq!(code, Some(0), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Over TLS as in plain text: a client that pipelines and never reads its replies cannot make
/// tarmac buffer without bound; its writes stall once the bounded buffers are full (the
/// session's outbox, rustls' own, the socket's), and everyone else is served meanwhile.
#[test]
fn a_tls_client_that_never_reads_is_held_back_not_buffered() {
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("tls-backpressure");
    let certs = TestCerts::generate(&dir, "mx");
    let mut config = tls_config(&sink, &certs);
    // The flood is NOOPs: out of reach of the junk and error limits, which would close it
    // long before the buffers fill and this test could see the backpressure.
    config.limits.max_junk_commands = u32::MAX;
    config.limits.max_errors = u32::MAX;
    let server = Server::start(config);
    // A small receive buffer on the client fills fast, so tarmac's replies back up.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect_timeout(&server.addr.into(), WAIT).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut plain = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    let mut command = |text: &str, plain: &mut BufReader<TcpStream>| {
        if !text.is_empty() {
            (&stream).write_all(text.as_bytes()).unwrap();
        }
        loop {
            line.clear();
            plain.read_line(&mut line).unwrap();
            if line.as_bytes().get(3) != Some(&b'-') {
                return line.clone();
            }
        }
    };
    assert!(command("", &mut plain).starts_with("220 "));
    assert!(command("EHLO client.example\r\n", &mut plain).starts_with("250 "));
    assert_eq!(command("STARTTLS\r\n", &mut plain), READY);
    let config = client_config(&[&certs.ca], rustls::ALL_VERSIONS);
    let mut client = TlsClient::handshake(stream.try_clone().unwrap(), config);
    stream
        .set_write_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    // 64 MB of pipelined NOOPs, never reading a reply: with backpressure the writes stall.
    let chunk = "NOOP\r\n".repeat(10_000);
    let mut written = 0usize;
    let stalled = loop {
        match client.stream.get_mut().write(chunk.as_bytes()) {
            Ok(0) => break true,
            Ok(n) => written += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break true;
            }
            Err(e) => panic!("flood write failed: {e}"),
        }
        if written > 64 << 20 {
            break false;
        }
    };
    assert!(
        stalled,
        "tarmac took {written} bytes from a TLS client that reads nothing"
    );
    let mut other = Client::connect(server.addr);
    assert!(other.reply().starts_with("220 "));
    assert_eq!(other.command("NOOP"), "250 2.0.0 Ok\r\n");
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}
