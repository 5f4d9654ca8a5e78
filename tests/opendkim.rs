//! The OpenDKIM launcher (`tarmac_testkit::opendkim`) gives a working, private milter: a real
//! Postfix smtpd (`tarmac_testkit::postfix`) as its milter client signs a message from the test
//! domain, and the delivered `DKIM-Signature:` verifies against the test key with dkimpy (Debian's
//! `python3-dkim`), whose DNS lookup is answered with the launcher's TXT record; a changed body
//! fails. Mail from another domain is left unsigned. Skips with a note where OpenDKIM, Postfix or
//! dkimpy cannot run, except under `CI=true`.

use tarmac_testkit::Client;
use tarmac_testkit::opendkim::{OpenDkim, dkim_verifies as verifies, dkimpy};
use tarmac_testkit::postfix::{Postfix, PostfixOptions};

const DOMAIN: &str = "dkim.test";
const SELECTOR: &str = "tk1";

/// Sends one message straight to Postfix's smtpd (from 127.0.0.1) and asserts the `250`.
#[track_caller]
fn send(postfix: &Postfix, from: &str, to: &str, subject: &str, body: &str) {
    let mut client = Client::connect(postfix.addr());
    client.start_message(from, &[to]);
    client.send(format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\
         Date: Mon, 07 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{subject}@{DOMAIN}>\r\n\r\n\
         {body}.\r\n"
    ));
    let reply = client.reply();
    assert!(reply.starts_with("250 "), "end of data: {reply}");
    assert!(client.command("QUIT").starts_with("221"), "QUIT");
}

#[test]
fn postfix_through_opendkim_signs_mail_that_verifies_against_the_test_key() {
    let Some(python) = dkimpy() else { return };
    let Some(opendkim) = OpenDkim::start(DOMAIN, SELECTOR) else {
        return;
    };
    let Some(postfix) = Postfix::start(PostfixOptions {
        main_cf: vec![
            ("smtpd_milters".into(), opendkim.postfix_milter()),
            // A milter that cannot be reached must not let mail through unsigned.
            ("milter_default_action".into(), "tempfail".into()),
        ],
        ..PostfixOptions::default()
    }) else {
        return;
    };
    assert_eq!(
        opendkim.socket(),
        format!("inet:{}@127.0.0.1", opendkim.addr().port())
    );

    let body = "Signed by a private OpenDKIM.\r\nSecond line.\r\n";
    send(
        &postfix,
        &format!("alice@{DOMAIN}"),
        "alice@example.test",
        "signed",
        body,
    );
    send(
        &postfix,
        "carol@elsewhere.test",
        "bob@example.test",
        "unsigned",
        body,
    );

    let signed = postfix.wait_for_messages("alice", 1).remove(0);
    let signature = signed
        .lines()
        .find(|l| l.starts_with("DKIM-Signature:"))
        .unwrap_or_else(|| {
            panic!(
                "no DKIM-Signature:\n{signed}\nOpenDKIM: {}",
                opendkim.stderr()
            )
        });
    assert!(signature.contains(&format!("d={DOMAIN};")), "{signature}");
    assert!(signature.contains(&format!("s={SELECTOR};")), "{signature}");

    let name = opendkim.dns_name();
    assert!(
        verifies(python, signed.as_bytes(), &name, opendkim.dns_record()),
        "the signature does not verify:\n{signed}"
    );
    let changed = signed.replace("Second line.", "Second line!");
    assert_ne!(changed, signed);
    assert!(
        !verifies(python, changed.as_bytes(), &name, opendkim.dns_record()),
        "a changed body still verifies"
    );

    let unsigned = postfix.wait_for_messages("bob", 1).remove(0);
    assert!(
        !unsigned.contains("DKIM-Signature:"),
        "mail from another domain was signed:\n{unsigned}"
    );
}

/// tarmac with OpenDKIM as its milter (DESIGN.md §7): a message from the test domain reaches
/// the downstream (the project's sink) with a `DKIM-Signature:` that verifies against the test
/// key, so the milter saw exactly the message the downstream got (tarmac's `Received:`
/// first, unstuffed) and its header went where it asked; mail from another domain is not
/// signed.
#[test]
fn tarmac_through_opendkim_relays_mail_whose_signature_verifies() {
    use tarmac_testkit::sink::Behaviour;
    use tarmac_testkit::{Server, WAIT, sink, test_config};

    let Some(python) = dkimpy() else { return };
    let Some(opendkim) = OpenDkim::start(DOMAIN, SELECTOR) else {
        return;
    };
    let sink = sink(Behaviour::Normal);
    let mut config = test_config(sink.local_addr());
    config.content.milters =
        vec![tarmac::content::MilterAddr::parse(&format!("inet:{}", opendkim.addr())).unwrap()];
    let server = Server::start(config);
    for (from, subject) in [
        (format!("alice@{DOMAIN}"), "signed"),
        ("carol@elsewhere.test".to_owned(), "unsigned"),
    ] {
        let mut client = Client::connect(server.addr);
        client.start_message(&from, &["bob@example.test"]);
        client.send(format!(
            "From: <{from}>\r\nTo: <bob@example.test>\r\nSubject: {subject}\r\n\
             Date: Mon, 07 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{subject}@{DOMAIN}>\r\n\r\n\
             Signed through tarmac.\r\n..A line that starts with a dot.\r\n.\r\n"
        ));
        let reply = client.reply();
        assert!(
            reply.starts_with("250 "),
            "end of data: {reply}\nOpenDKIM: {}",
            opendkim.stderr()
        );
        assert!(client.command("QUIT").starts_with("221"));
    }
    let messages = sink.wait_for_messages(2, WAIT);
    let signed = String::from_utf8(messages[0].content.clone()).unwrap();
    assert!(
        signed.starts_with("DKIM-Signature:"),
        "inserted first, as OpenDKIM asks:\n{signed}"
    );
    assert!(signed.contains(&format!("d={DOMAIN};")), "{signed}");
    assert!(
        signed.contains("\r\n.A line that starts with a dot.\r\n"),
        "{signed}"
    );
    let name = opendkim.dns_name();
    assert!(
        verifies(python, signed.as_bytes(), &name, opendkim.dns_record()),
        "the signature does not verify:\n{signed}"
    );
    let unsigned = String::from_utf8(messages[1].content.clone()).unwrap();
    assert!(!unsigned.contains("DKIM-Signature:"), "{unsigned}");
}
