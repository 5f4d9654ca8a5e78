//! STARTTLS towards the downstream through the server (`[downstream] tls`, `tls_verify`,
//! `tls_ca`): a plain client relays through tarmac to the sink, which offers STARTTLS with a
//! certificate the test made, and records whether each message came over TLS.

use std::path::Path;

use rustls::ProtocolVersion;
use tarmac::config::{Config, DownstreamMode, DownstreamTls};
use tarmac_testkit::sink::{self, Behaviour, Sink, SinkConfig};

use tarmac_testkit::certs::TestCerts;
use tarmac_testkit::{Client, Server, WAIT, temp_dir, test_config};

/// A sink offering XCLIENT and STARTTLS with a fresh certificate, behaving as told.
fn tls_sink(dir: &Path, behaviour: Behaviour) -> (Sink, TestCerts) {
    let certs = TestCerts::generate(dir, "sink");
    let sink = Sink::start(SinkConfig {
        offer_xclient: true,
        tls: Some(sink::tls_server_config(&certs.chain, &certs.key).unwrap()),
        behaviour,
        ..SinkConfig::default()
    })
    .unwrap();
    (sink, certs)
}

/// [`test_config`] towards `sink` with `tls`, its CA file read as `Config::load` would.
fn relay_config(sink: &Sink, tls: DownstreamTls, verify: bool, ca: Option<&Path>) -> Config {
    let mut config = test_config(sink.local_addr());
    config.downstream.tls = tls;
    config.downstream.tls_verify = verify;
    config.downstream.tls_ca = ca.map(Path::to_path_buf);
    config.load_tls_ca().unwrap();
    config
}

/// A server relaying to `sink` with `tls`, certificates not verified.
fn relay(sink: &Sink, tls: DownstreamTls) -> Server {
    Server::start(relay_config(sink, tls, false, None))
}

/// Relays one message through `server`, and returns the TLS version the sink received it
/// over (`None`: plain text).
#[track_caller]
fn relay_one(server: &Server, sink: &Sink) -> Option<ProtocolVersion> {
    let before = sink.messages().len();
    let reply = Client::connect(server.addr).send_message();
    assert!(reply.starts_with("250 "), "{reply}");
    let messages = sink.wait_for_messages(before + 1, WAIT);
    messages
        .get(before)
        .expect("the message reached the sink")
        .tls
}

/// `required` under `relay_config`: the client's MAIL gets `code` and nothing is relayed.
#[track_caller]
fn required_defers(sink: &Sink, verify: bool, code: &str) {
    let delivered = sink.messages().len();
    let server = Server::start(relay_config(sink, DownstreamTls::Required, verify, None));
    let reply = mail_reply(&server);
    assert!(reply.starts_with(code), "{reply}");
    assert_eq!(
        sink.messages().len(),
        delivered,
        "nothing more was delivered"
    );
}

/// Banner to MAIL: the reply to MAIL.
fn mail_reply(server: &Server) -> String {
    let mut client = Client::connect(server.addr);
    client.reply();
    client.command("EHLO client.example");
    client.command("MAIL FROM:<a@example.org>")
}

#[test]
fn opportunistic_relays_over_tls_and_announces_the_client_inside_it() {
    let dir = temp_dir("relay-tls-opportunistic");
    let (sink, _certs) = tls_sink(&dir, Behaviour::Normal);
    let server = relay(&sink, DownstreamTls::Opportunistic);
    assert_eq!(relay_one(&server, &sink), Some(ProtocolVersion::TLSv1_3));
    let session = &sink.sessions()[0];
    let verbs: Vec<&str> = session
        .commands
        .iter()
        .map(|c| c.split(' ').next().unwrap())
        .collect();
    assert_eq!(verbs[..5], ["EHLO", "STARTTLS", "EHLO", "XCLIENT", "EHLO"]);
    assert_eq!(session.starttls_discarded, 0);
    assert!(
        session
            .xclient
            .as_deref()
            .unwrap()
            .contains("ADDR=127.0.0.1")
    );
}

#[test]
fn a_reply_injected_after_the_220_is_not_trusted_and_mail_still_goes_through() {
    let dir = temp_dir("relay-tls-inject");
    let (sink, _certs) = tls_sink(&dir, Behaviour::InjectAfterStartTls);
    let server = relay(&sink, DownstreamTls::Required);
    // Were the injected 554 read as the reply to the EHLO after STARTTLS, the handshake would
    // fail and MAIL would get a 4xx.
    assert_eq!(relay_one(&server, &sink), Some(ProtocolVersion::TLSv1_3));
}

#[test]
fn a_refused_starttls_relays_in_plain_text_unless_tls_is_required() {
    let dir = temp_dir("relay-tls-refused");
    let (sink, _certs) = tls_sink(&dir, Behaviour::RefuseStartTls);
    let server = relay(&sink, DownstreamTls::Opportunistic);
    assert_eq!(relay_one(&server, &sink), None);
    drop(server);
    required_defers(&sink, false, "451 4.7.4 ");
}

#[test]
fn a_broken_handshake_retries_in_plain_text_unless_tls_is_required() {
    let dir = temp_dir("relay-tls-broken");
    let (sink, _certs) = tls_sink(&dir, Behaviour::CloseAfterStartTls);
    let server = relay(&sink, DownstreamTls::Opportunistic);
    assert_eq!(relay_one(&server, &sink), None);
    let sessions = sink.sessions();
    assert_eq!(
        sessions.len(),
        2,
        "the handshake's connection, then the plain one"
    );
    assert!(!sessions[1].commands.iter().any(|c| c == "STARTTLS"));
    drop(server);
    required_defers(&sink, false, "451 4.7.5 ");
}

#[test]
fn tls_verify_trusts_the_tls_ca_and_refuses_an_unknown_one() {
    let dir = temp_dir("relay-tls-verify");
    let (sink, certs) = tls_sink(&dir, Behaviour::Normal);
    let server = Server::start(relay_config(
        &sink,
        DownstreamTls::Required,
        true,
        Some(&certs.ca),
    ));
    assert_eq!(relay_one(&server, &sink), Some(ProtocolVersion::TLSv1_3));
    drop(server);
    // The sink's CA is not among the web roots: without `tls_ca` its certificate is refused.
    required_defers(&sink, true, "451 4.7.5 ");
}

#[test]
fn none_relays_in_plain_text_even_when_starttls_is_offered() {
    let dir = temp_dir("relay-tls-none");
    let (sink, _certs) = tls_sink(&dir, Behaviour::Normal);
    let server = relay(&sink, DownstreamTls::None);
    assert_eq!(relay_one(&server, &sink), None);
    assert!(!sink.sessions()[0].commands.iter().any(|c| c == "STARTTLS"));
}

#[test]
fn a_pooled_connection_keeps_its_tls_for_the_next_transaction() {
    let dir = temp_dir("relay-tls-pool");
    let certs = TestCerts::generate(&dir, "sink");
    // XCLIENT again on one connection (Postfix's `static:all`), so the pool reuses it.
    let sink = Sink::start(SinkConfig {
        offer_xclient: true,
        xclient_again: true,
        tls: Some(sink::tls_server_config(&certs.chain, &certs.key).unwrap()),
        ..SinkConfig::default()
    })
    .unwrap();
    let mut config = relay_config(&sink, DownstreamTls::Required, false, None);
    config.server.workers = 1;
    config.downstream.mode = DownstreamMode::Multiplexing;
    config.downstream.pool_size = 1;
    let server = Server::start(config);
    for _ in 0..3 {
        assert_eq!(relay_one(&server, &sink), Some(ProtocolVersion::TLSv1_3));
    }
    let sessions = sink.sessions();
    assert_eq!(sessions.len(), 1, "one downstream connection, reused");
    let starttls = sessions[0]
        .commands
        .iter()
        .filter(|c| *c == "STARTTLS")
        .count();
    assert_eq!(starttls, 1);
}
