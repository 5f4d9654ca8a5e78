//! TLS towards the downstream, with real rustls handshakes on loopback: the sink's STARTTLS
//! (what tarmac's downstream tests rely on) and the sink's record of it, and tarmac's client
//! configuration (`downstream::tls`) from `[downstream] tls_verify` and `tls_ca` as
//! `Config::load` reads them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ProtocolVersion, RootCertStore, StreamOwned};
use tarmac::config::Config;
use tarmac::downstream::tls::{client_config, server_name};
use tarmac_testkit::sink::{
    self, Behaviour, INJECTED_AFTER_STARTTLS, Sink, SinkConfig, SinkSession,
};

use tarmac_testkit::WAIT;
use tarmac_testkit::certs::TestCerts;

/// A sink offering STARTTLS with `certs`, behaving as told.
fn tls_sink(certs: &TestCerts, behaviour: Behaviour) -> Sink {
    Sink::start(SinkConfig {
        tls: Some(sink::tls_server_config(&certs.chain, &certs.key).unwrap()),
        behaviour,
        ..SinkConfig::default()
    })
    .unwrap()
}

/// A client configuration trusting only `ca` (no system roots), TLS 1.2 and 1.3 or only `version`.
fn trusting(
    ca: &Path,
    version: Option<&'static rustls::SupportedProtocolVersion>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider);
    let builder = match version {
        Some(version) => builder.with_protocol_versions(&[version]),
        None => builder.with_safe_default_protocol_versions(),
    };
    Arc::new(
        builder
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// An SMTP client that can switch to TLS; every read and write is bounded by [`WAIT`].
struct Client {
    reader: BufReader<Box<dyn ReadWrite>>,
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

impl Client {
    #[track_caller]
    fn send(&mut self, bytes: &[u8]) {
        let stream = self.reader.get_mut();
        stream.write_all(bytes).unwrap();
        stream.flush().unwrap();
    }

    /// One whole reply, every line of a multi-line one.
    #[track_caller]
    fn reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(n > 0, "connection closed; reply so far: {reply:?}");
            reply.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return reply;
            }
        }
    }

    #[track_caller]
    fn command(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n").as_bytes());
        self.reply()
    }

    /// After the server's `220` to STARTTLS: returns what the server sent after it in plain
    /// text (already read, thrown away here as a correct client must), then runs the TLS
    /// handshake over the same socket. `Err` carries the handshake's error.
    fn start_tls(
        self,
        tcp: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<(Client, Vec<u8>), rustls::Error> {
        let leftover = self.reader.buffer().to_vec();
        drop(self);
        let mut tls = StreamOwned::new(ClientConnection::new(config, name).unwrap(), tcp);
        while tls.conn.is_handshaking() {
            if let Err(error) = tls.conn.complete_io(&mut tls.sock) {
                return Err(
                    match error.into_inner().map(|e| e.downcast::<rustls::Error>()) {
                        Some(Ok(tls_error)) => *tls_error,
                        _ => rustls::Error::General("connection lost in the handshake".to_owned()),
                    },
                );
            }
        }
        let client = Client {
            reader: BufReader::new(Box::new(tls)),
        };
        Ok((client, leftover))
    }
}

/// Connects, says EHLO (which must offer STARTTLS), sends STARTTLS (followed by `pipelined`
/// in the same write) and reads the `220`. Returns the client and a second handle on its socket
/// for [`Client::start_tls`].
#[track_caller]
fn up_to_starttls(addr: SocketAddr, pipelined: &[u8]) -> (Client, TcpStream) {
    let tcp = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.set_write_timeout(Some(WAIT)).unwrap();
    let mut client = Client {
        reader: BufReader::new(Box::new(tcp.try_clone().unwrap())),
    };
    assert!(client.reply().starts_with("220 "));
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");
    let mut command = b"STARTTLS\r\n".to_vec();
    command.extend_from_slice(pipelined);
    client.send(&command);
    assert_eq!(client.reply(), "220 2.0.0 Ready to start TLS\r\n");
    (client, tcp)
}

fn loopback() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}

/// Waits (bounded) until the sink has `n` sessions and all are closed.
#[track_caller]
fn closed_sessions(sink: &Sink, n: usize) -> Vec<SinkSession> {
    tarmac_testkit::wait_until("sink sessions closed", || {
        let sessions = sink.sessions();
        sessions.len() == n && sessions.iter().all(|s| s.closed)
    });
    sink.sessions()
}

#[test]
fn sink_starttls_encrypts_the_rest_of_the_session_and_forgets_the_ehlo() {
    let dir = tarmac_testkit::temp_dir("sink-starttls");
    let certs = TestCerts::generate(&dir, "sink");
    let sink = tls_sink(&certs, Behaviour::Normal);
    let (client, tcp) = up_to_starttls(sink.local_addr(), b"");
    let (mut client, leftover) = client
        .start_tls(tcp, trusting(&certs.ca, None), loopback())
        .unwrap();
    assert!(leftover.is_empty());
    // RFC 3207 §4.2: the server forgot the EHLO it had.
    assert_eq!(
        client.command("MAIL FROM:<a@x>"),
        "503 5.5.1 Error: send HELO/EHLO first\r\n"
    );
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.starts_with("250-"), "{ehlo}");
    assert!(
        !ehlo.contains("STARTTLS"),
        "not offered again inside TLS: {ehlo}"
    );
    assert_eq!(
        client.command("STARTTLS"),
        "554 5.5.1 Error: TLS already active\r\n"
    );
    assert_eq!(client.command("MAIL FROM:<a@x>"), "250 2.1.0 Ok\r\n");
    assert_eq!(client.command("RCPT TO:<b@y>"), "250 2.1.5 Ok\r\n");
    assert_eq!(
        client.command("DATA"),
        "354 End data with <CR><LF>.<CR><LF>\r\n"
    );
    client.send(b"secret\r\n.\r\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued as 1\r\n");
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");

    let messages = sink.wait_for_messages(1, WAIT);
    assert_eq!(messages[0].tls, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(messages[0].content, b"secret\r\n");
    let session = &closed_sessions(&sink, 1)[0];
    assert_eq!(session.tls, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(session.starttls_discarded, 0);
    assert_eq!(
        session.commands,
        [
            "EHLO client.test",
            "STARTTLS",
            "MAIL FROM:<a@x>",
            "EHLO client.test",
            "STARTTLS",
            "MAIL FROM:<a@x>",
            "RCPT TO:<b@y>",
            "DATA",
            "QUIT"
        ]
    );
}

#[test]
fn sink_records_a_tls_1_2_session() {
    let dir = tarmac_testkit::temp_dir("sink-tls12");
    let certs = TestCerts::generate(&dir, "sink");
    let sink = tls_sink(&certs, Behaviour::Normal);
    let (client, tcp) = up_to_starttls(sink.local_addr(), b"");
    let config = trusting(&certs.ca, Some(&rustls::version::TLS12));
    let (mut client, _) = client.start_tls(tcp, config, loopback()).unwrap();
    assert!(client.command("EHLO client.test").starts_with("250-"));
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    assert_eq!(
        closed_sessions(&sink, 1)[0].tls,
        Some(ProtocolVersion::TLSv1_2)
    );
}

#[test]
fn sink_discards_commands_pipelined_after_starttls() {
    let dir = tarmac_testkit::temp_dir("sink-starttls-pipelined");
    let certs = TestCerts::generate(&dir, "sink");
    let sink = tls_sink(&certs, Behaviour::Normal);
    // One write: the EHLO arrives with the STARTTLS, before the sink answers it.
    let (client, tcp) = up_to_starttls(sink.local_addr(), b"EHLO evil.test\r\n");
    let (mut client, _) = client
        .start_tls(tcp, trusting(&certs.ca, None), loopback())
        .unwrap();
    // Had the sink run the plain-text EHLO, MAIL would be accepted inside TLS.
    assert_eq!(
        client.command("MAIL FROM:<a@x>"),
        "503 5.5.1 Error: send HELO/EHLO first\r\n"
    );
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    let session = &closed_sessions(&sink, 1)[0];
    assert_eq!(session.starttls_discarded, "EHLO evil.test\r\n".len());
    assert!(!session.commands.iter().any(|c| c.contains("evil")));
    assert_eq!(session.tls, Some(ProtocolVersion::TLSv1_3));
}

#[test]
fn sink_can_inject_a_plain_text_reply_after_its_220() {
    let dir = tarmac_testkit::temp_dir("sink-starttls-inject");
    let certs = TestCerts::generate(&dir, "sink");
    let sink = tls_sink(&certs, Behaviour::InjectAfterStartTls);
    let (client, tcp) = up_to_starttls(sink.local_addr(), b"");
    // The injected reply came in the same write as the 220, so it is already buffered; a
    // correct client throws it away, and the handshake and the session go on.
    let (mut client, leftover) = client
        .start_tls(tcp, trusting(&certs.ca, None), loopback())
        .unwrap();
    assert_eq!(leftover, INJECTED_AFTER_STARTTLS.as_bytes());
    assert!(client.command("EHLO client.test").starts_with("250-"));
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    assert_eq!(
        closed_sessions(&sink, 1)[0].tls,
        Some(ProtocolVersion::TLSv1_3)
    );
}

#[test]
fn sink_close_after_starttls_breaks_the_handshake() {
    let dir = tarmac_testkit::temp_dir("sink-starttls-close");
    let certs = TestCerts::generate(&dir, "sink");
    let sink = tls_sink(&certs, Behaviour::CloseAfterStartTls);
    let (client, tcp) = up_to_starttls(sink.local_addr(), b"");
    assert!(
        client
            .start_tls(tcp, trusting(&certs.ca, None), loopback())
            .is_err()
    );
    assert_eq!(closed_sessions(&sink, 1)[0].tls, None);
}

#[test]
fn sink_tls_server_config_errors_name_the_file() {
    let dir = tarmac_testkit::temp_dir("sink-tls-config");
    let certs = TestCerts::generate(&dir, "sink");
    let missing = dir.join("missing-key.pem");
    let error = sink::tls_server_config(&certs.chain, &missing).unwrap_err();
    assert!(error.to_string().contains("missing-key.pem"), "{error}");
    // A certificate where the key should be: no private key in it.
    let error = sink::tls_server_config(&certs.chain, &certs.ca).unwrap_err();
    assert!(error.to_string().contains("sink-ca.pem"), "{error}");
}

/// tarmac's client configuration for `[downstream]` with `tls_verify` and, optionally, a
/// `tls_ca` file, loaded from a config file the way `tarmac run` does.
fn tarmac_client(dir: &Path, verify: bool, ca: Option<&Path>) -> Arc<ClientConfig> {
    let path = dir.join("tarmac.toml");
    let ca = ca.map_or(String::new(), |ca| ca.display().to_string());
    std::fs::write(
        &path,
        format!("[downstream]\ntls_verify = {verify}\ntls_ca = {ca:?}\n"),
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    client_config(
        config.downstream.tls_verify,
        &config.downstream.tls_ca_certs,
    )
    .unwrap()
}

/// STARTTLS with tarmac's client configuration against `sink`, named as tarmac names it.
fn handshake(sink: &Sink, config: Arc<ClientConfig>) -> Result<(), rustls::Error> {
    let (client, tcp) = up_to_starttls(sink.local_addr(), b"");
    let (mut client, _) = client.start_tls(tcp, config, server_name(sink.local_addr()))?;
    assert!(client.command("EHLO mx.test").starts_with("250-"));
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    Ok(())
}

#[test]
fn verify_with_the_tls_ca_accepts_a_loopback_leaf() {
    let dir = tarmac_testkit::temp_dir("verify-ca");
    let certs = TestCerts::generate(&dir, "down");
    let sink = tls_sink(&certs, Behaviour::Normal);
    handshake(&sink, tarmac_client(&dir, true, Some(&certs.ca))).unwrap();
    assert_eq!(
        closed_sessions(&sink, 1)[0].tls,
        Some(ProtocolVersion::TLSv1_3)
    );
}

#[test]
fn verify_without_the_tls_ca_rejects_a_private_ca() {
    let dir = tarmac_testkit::temp_dir("verify-no-ca");
    let certs = TestCerts::generate(&dir, "down");
    let sink = tls_sink(&certs, Behaviour::Normal);
    let error = handshake(&sink, tarmac_client(&dir, true, None)).unwrap_err();
    assert_eq!(
        error,
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
    );
    // Another CA in tls_ca does not help either.
    let other = TestCerts::generate(&dir, "other");
    let error = handshake(&sink, tarmac_client(&dir, true, Some(&other.ca))).unwrap_err();
    assert_eq!(
        error,
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
    );
}

#[test]
fn verify_checks_the_servers_ip_address() {
    // The leaf names 127.0.0.1, ::1 and localhost; the sink listens on 127.0.0.2.
    let dir = tarmac_testkit::temp_dir("verify-name");
    let certs = TestCerts::generate(&dir, "down");
    let sink = Sink::start(SinkConfig {
        listen: "127.0.0.2:0".parse().unwrap(),
        tls: Some(sink::tls_server_config(&certs.chain, &certs.key).unwrap()),
        ..SinkConfig::default()
    })
    .unwrap();
    let error = handshake(&sink, tarmac_client(&dir, true, Some(&certs.ca))).unwrap_err();
    assert!(
        matches!(
            error,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{error:?}"
    );
    // Without verification the name does not matter.
    handshake(&sink, tarmac_client(&dir, false, None)).unwrap();
}

#[test]
fn no_verify_accepts_a_self_signed_certificate() {
    let dir = tarmac_testkit::temp_dir("no-verify");
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["mx.elsewhere.example".to_owned()]).unwrap();
    let (chain, key) = (dir.join("self.pem"), dir.join("self-key.pem"));
    std::fs::write(&chain, cert.pem()).unwrap();
    std::fs::write(&key, signing_key.serialize_pem()).unwrap();
    let sink = Sink::start(SinkConfig {
        tls: Some(sink::tls_server_config(&chain, &key).unwrap()),
        ..SinkConfig::default()
    })
    .unwrap();
    handshake(&sink, tarmac_client(&dir, false, None)).unwrap();
    assert_eq!(
        closed_sessions(&sink, 1)[0].tls,
        Some(ProtocolVersion::TLSv1_3)
    );
    // The same certificate fails verification, so the acceptance above is the verifier's doing.
    let error = handshake(&sink, tarmac_client(&dir, true, Some(&chain))).unwrap_err();
    assert!(
        matches!(error, rustls::Error::InvalidCertificate(_)),
        "{error:?}"
    );
}
