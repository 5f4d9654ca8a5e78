//! STARTTLS towards the downstream (`[downstream] tls`), with the driver's TLS handshake
//! played by the pair: established, failed or stalled.

use super::*;
use tarmac::config::DownstreamTls;

const MESSAGE: &[u8] =
    b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nhi\r\n.\r\n";

fn pair(tls: DownstreamTls) -> Pair {
    let mut config = config();
    config.downstream.tls = tls;
    let mut pair = Pair::new(config);
    pair.downstream.offer_starttls = true;
    pair
}

#[test]
fn opportunistic_starts_tls_then_says_ehlo_again_before_mail() {
    let mut pair = pair(DownstreamTls::Opportunistic);
    pair.send(MESSAGE);
    assert_eq!(pair.downstream_tls_starts, 1);
    assert_eq!(
        pair.downstream.commands[..4],
        [
            "EHLO mx.test",
            "STARTTLS",
            "EHLO mx.test",
            "MAIL FROM:<a@example.org>"
        ]
    );
    assert_eq!(pair.downstream.delivered.len(), 1);
    assert!(
        pair.take_output()
            .ends_with("250 2.0.0 Ok: queued as 1\r\n")
    );
}

#[test]
fn a_reply_sent_with_the_220_to_starttls_is_never_read() {
    let mut pair = pair(DownstreamTls::Opportunistic);
    pair.downstream.inject_after_starttls = true;
    pair.send(MESSAGE);
    let out = pair.take_output();
    assert!(!out.contains("forged"), "{out}");
    assert_eq!(pair.downstream.delivered.len(), 1);
}

#[test]
fn opportunistic_handshake_failure_retries_once_in_plain_text() {
    let mut pair = pair(DownstreamTls::Opportunistic);
    pair.downstream_tls = Some(false);
    pair.send(MESSAGE);
    assert_eq!(
        pair.connects.len(),
        2,
        "a second connection for the plain retry"
    );
    assert_eq!(pair.downstream_tls_starts, 1);
    assert!(!pair.downstream.commands.iter().any(|c| c == "STARTTLS"));
    assert_eq!(pair.downstream.delivered.len(), 1);
}

#[test]
fn none_never_sends_starttls() {
    let mut pair = pair(DownstreamTls::None);
    pair.send(MESSAGE);
    assert_eq!(pair.downstream_tls_starts, 0);
    assert!(!pair.downstream.commands.iter().any(|c| c == "STARTTLS"));
    assert_eq!(pair.downstream.delivered.len(), 1);
}

#[test]
fn required_without_starttls_offered_defers_the_mail() {
    let mut pair = pair(DownstreamTls::Required);
    pair.downstream.offer_starttls = false;
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    let out = pair.take_output();
    assert!(
        out.ends_with(
            "451 4.7.4 Error: downstream server does not offer TLS, please try again later\r\n"
        ),
        "{out}"
    );
    assert!(
        !pair
            .downstream
            .commands
            .iter()
            .any(|c| c.starts_with("MAIL"))
    );
    assert!(!pair.ds_open);
}

#[test]
fn required_handshake_failure_defers_the_mail_with_4_7_5() {
    let mut pair = pair(DownstreamTls::Required);
    pair.downstream_tls = Some(false);
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    let out = pair.take_output();
    assert!(out.contains("451 4.7.5"), "{out}");
    assert_eq!(
        pair.connects.len(),
        1,
        "no plain retry when TLS is required"
    );
    assert!(
        !pair
            .downstream
            .commands
            .iter()
            .any(|c| c.starts_with("MAIL"))
    );
}

#[test]
fn required_stalled_handshake_defers_the_mail_after_the_command_timeout() {
    let mut pair = pair(DownstreamTls::Required);
    pair.downstream_tls = None;
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n");
    assert!(!pair.take_output().contains("451"));
    // `pair()` keeps `config()`'s timeouts.
    pair.advance(config().timeouts.command + Duration::from_secs(1));
    let out = pair.take_output();
    assert!(out.contains("451 4.7.5"), "{out}");
    // The client may try again: a new MAIL opens a new downstream connection.
    pair.downstream_tls = Some(true);
    pair.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n");
    assert!(pair.take_output().ends_with("250 2.1.5 Ok\r\n"));
    assert_eq!(pair.connects.len(), 2);
}
