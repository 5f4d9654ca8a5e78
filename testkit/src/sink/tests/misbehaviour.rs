//! The sink's misbehaviours ([`Behaviour`]), STARTTLS ones included.

use super::*;

#[test]
fn no_banner_stays_silent_and_records_input() {
    let sink = start(|config| config.behaviour = Behaviour::NoBanner);
    let mut client = Client::connect(sink.local_addr());
    client.assert_silent();
    client.send(b"EHLO c\r\n");
    client.assert_silent();
    drop(client);
    assert_eq!(closed_sessions(&sink, 1)[0].commands, commands(&["EHLO c"]));
}

#[test]
fn close_after_banner_closes_on_the_first_command() {
    let sink = start(|config| config.behaviour = Behaviour::CloseAfterBanner);
    let mut client = Client::connect(sink.local_addr());
    assert_eq!(client.reply(), BANNER);
    client.send(b"EHLO c\r\n");
    client.assert_closed();
    assert_eq!(closed_sessions(&sink, 1)[0].commands, commands(&["EHLO c"]));
}

#[test]
fn reject_rcpt_rejects_only_matching_recipients() {
    let sink = start(|config| config.behaviour = Behaviour::RejectRcpt("bad".to_owned()));
    let mut client = Client::greeted(sink.local_addr());
    assert_eq!(client.command("MAIL FROM:<a@x>"), "250 2.1.0 Ok\r\n");
    assert_eq!(
        client.command("RCPT TO:<bad@y>"),
        "550 5.1.1 <bad@y>: Recipient address rejected: User unknown\r\n"
    );
    assert_eq!(
        client.command("DATA"),
        "554 5.5.1 Error: no valid recipients\r\n"
    );
    assert_eq!(client.command("RCPT TO:<good@y>"), "250 2.1.5 Ok\r\n");
    assert_eq!(
        client.command("DATA"),
        "354 End data with <CR><LF>.<CR><LF>\r\n"
    );
    client.send(b"hi\r\n.\r\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued as 1\r\n");
    assert_eq!(sink.messages()[0].rcpt_to, vec!["good@y".to_owned()]);
}

#[test]
fn temp_fail_mail_gets_451() {
    let sink = start(|config| config.behaviour = Behaviour::TempFailMail);
    let mut client = Client::greeted(sink.local_addr());
    assert_eq!(
        client.command("MAIL FROM:<a@x>"),
        "451 4.3.0 Try again later\r\n"
    );
    assert_eq!(
        client.command("RCPT TO:<b@y>"),
        "503 5.5.1 Error: need MAIL command\r\n"
    );
}

#[test]
fn reject_data_gets_554_after_the_dot_and_keeps_nothing() {
    let sink = start(|config| config.behaviour = Behaviour::RejectData);
    let mut client = Client::greeted(sink.local_addr());
    assert_eq!(
        client.transaction("a@x", "b@y", b"hi\r\n.\r\n"),
        "554 5.7.1 Message rejected\r\n"
    );
    assert_eq!(
        client.command("RCPT TO:<b@y>"),
        "503 5.5.1 Error: need MAIL command\r\n"
    );
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    assert_eq!(sink.messages(), vec![]);
}

#[test]
fn stall_after_data_never_replies_again() {
    let sink = start(|config| config.behaviour = Behaviour::StallAfterData);
    let mut client = Client::greeted(sink.local_addr());
    assert_eq!(client.command("MAIL FROM:<a@x>"), "250 2.1.0 Ok\r\n");
    assert_eq!(client.command("RCPT TO:<b@y>"), "250 2.1.5 Ok\r\n");
    assert_eq!(
        client.command("DATA"),
        "354 End data with <CR><LF>.<CR><LF>\r\n"
    );
    client.send(b"hi\r\n.\r\n");
    client.assert_silent();
    client.send(b"QUIT\r\n");
    client.assert_silent();
    drop(client);
    let sessions = closed_sessions(&sink, 1);
    assert_eq!(
        sessions[0].commands,
        commands(&[
            "EHLO client.test",
            "MAIL FROM:<a@x>",
            "RCPT TO:<b@y>",
            "DATA",
            "QUIT"
        ])
    );
    assert_eq!(sink.messages(), vec![]);
}

#[test]
fn close_after_data_dot_closes_without_a_reply() {
    let sink = start(|config| config.behaviour = Behaviour::CloseAfterDataDot);
    let mut client = Client::greeted(sink.local_addr());
    assert_eq!(client.command("MAIL FROM:<a@x>"), "250 2.1.0 Ok\r\n");
    assert_eq!(client.command("RCPT TO:<b@y>"), "250 2.1.5 Ok\r\n");
    assert_eq!(
        client.command("DATA"),
        "354 End data with <CR><LF>.<CR><LF>\r\n"
    );
    // Up to the CRLF before the dot the sink keeps reading.
    client.send(b"hi\r\n");
    client.assert_silent();
    client.send(b".\r\n");
    client.assert_closed();
    assert_eq!(sink.messages(), vec![]);
}

#[test]
fn multiline_rcpt_reply_has_three_lines() {
    let sink = start(|config| config.behaviour = Behaviour::MultilineRcpt);
    let mut client = Client::greeted(sink.local_addr());
    assert_eq!(client.command("MAIL FROM:<a@x>"), "250 2.1.0 Ok\r\n");
    assert_eq!(
        client.command("RCPT TO:<b@y>"),
        "250-2.1.5 first\r\n250-2.1.5 second\r\n250 2.1.5 Ok\r\n"
    );
    assert_eq!(
        client.command("DATA"),
        "354 End data with <CR><LF>.<CR><LF>\r\n"
    );
    client.send(b"hi\r\n.\r\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued as 1\r\n");
    assert_eq!(sink.messages()[0].rcpt_to, vec!["b@y".to_owned()]);
}

#[test]
fn starttls_is_an_unknown_command_without_a_certificate() {
    let sink = start(|_| {});
    // EHLO_REPLY (checked by `greeted`) lists no STARTTLS.
    let mut client = Client::greeted(sink.local_addr());
    assert_eq!(
        client.command("STARTTLS"),
        "502 5.5.2 Error: command not recognized\r\n"
    );
}

#[test]
fn refuse_starttls_offers_it_answers_454_and_stays_in_plain_text() {
    let sink = start(|config| config.behaviour = Behaviour::RefuseStartTls);
    let mut client = Client::connect(sink.local_addr());
    assert_eq!(client.reply(), BANNER);
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");
    assert_eq!(
        client.command("STARTTLS now"),
        "501 5.5.4 Syntax: STARTTLS\r\n"
    );
    assert_eq!(
        client.command("STARTTLS"),
        "454 4.7.0 TLS not available due to local problem\r\n"
    );
    // The EHLO still counts: nothing was reset.
    assert_eq!(
        client.transaction("a@x", "b@y", b"hi\r\n.\r\n"),
        "250 2.0.0 Ok: queued as 1\r\n"
    );
    assert_eq!(sink.messages()[0].tls, None);
    client.command("QUIT");
    let session = &closed_sessions(&sink, 1)[0];
    assert_eq!(session.tls, None);
    assert_eq!(session.starttls_discarded, 0);
}

#[test]
fn close_after_starttls_answers_220_then_closes() {
    let sink = start(|config| config.behaviour = Behaviour::CloseAfterStartTls);
    let mut client = Client::connect(sink.local_addr());
    assert_eq!(client.reply(), BANNER);
    assert!(client.command("EHLO c").contains("250-STARTTLS\r\n"));
    assert_eq!(
        client.command("STARTTLS"),
        "220 2.0.0 Ready to start TLS\r\n"
    );
    client.assert_closed();
}
