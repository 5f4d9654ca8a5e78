//! The relay path end to end: a real client, the real server, the project's sink as downstream.

use std::time::Duration;

use tarmac::config::{AnnounceClient, BareNewline};
use tarmac_testkit::sink::{Behaviour, ProxyVersion, Sink, SinkConfig};

use tarmac_testkit::{Client, Server, WAIT, sink, test_config, wait_until};

#[test]
fn message_is_relayed_byte_exact_with_one_received_header() {
    let sink = sink(Behaviour::Normal);
    let server = Server::start(test_config(sink.local_addr()));
    let mut client = Client::connect(server.addr);
    client.start_message("a@example.org", &["b@example.net", "c@example.net"]);
    // Lines starting with dots, 8-bit bytes, a 10,000-byte line, an empty line: the content as
    // delivered, and the dot-stuffed form the client sends.
    let long = "x".repeat(10_000);
    let lines = [
        "Subject: test",
        "",
        ".one leading dot",
        "..two",
        ".\t",
        ".",
        "\u{e9}t\u{e9} \u{fffd}",
        &long,
        "",
        "end",
    ];
    let content: String = lines.iter().map(|l| format!("{l}\r\n")).collect();
    let stuffed: String = lines
        .iter()
        .map(|l| {
            if l.starts_with('.') {
                format!(".{l}\r\n")
            } else {
                format!("{l}\r\n")
            }
        })
        .collect();
    client.send(stuffed.as_bytes());
    client.send(b".\r\n");
    let r = client.reply();
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");

    let messages = sink.wait_for_messages(1, WAIT);
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.rcpt_to, ["b@example.net", "c@example.net"]);
    assert_eq!(m.mail_from, "<a@example.org>");
    assert!(!m.bare_newline_seen);
    let delivered = String::from_utf8(m.content.clone()).unwrap();
    let header =
        "Received: from client.example ([127.0.0.1])\r\n\tby mx.test (tarmac) with ESMTP;\r\n\t";
    assert!(delivered.starts_with(header), "{delivered}");
    assert_eq!(delivered.matches("Received:").count(), 1);
    let (_, after_header) = delivered.split_once(" +0000\r\n").unwrap();
    assert_eq!(after_header, content, "body altered");
    // The wire form is stuffed again by tarmac's own encoder.
    assert!(String::from_utf8_lossy(&m.raw).ends_with(&stuffed[..]));
}

#[test]
fn xclient_tells_the_downstream_who_the_client_is() {
    let sink = sink(Behaviour::Normal);
    let server = Server::start(test_config(sink.local_addr()));
    let mut client = Client::connect(server.addr);
    assert!(client.send_message().starts_with("250 "));
    let m = &sink.wait_for_messages(1, WAIT)[0];
    let xclient = m.xclient.as_deref().expect("XCLIENT sent");
    assert!(xclient.starts_with("ADDR=127.0.0.1 PORT="), "{xclient}");
    assert!(
        xclient.ends_with("NAME=[UNAVAILABLE] PROTO=ESMTP HELO=client.example"),
        "{xclient}"
    );
    assert_eq!(
        m.helo, "client.example",
        "after XCLIENT tarmac greets with the client's own name"
    );
}

#[test]
fn proxy_headers_reach_the_downstream() {
    for (mode, version, prefix) in [
        (
            AnnounceClient::ProxyV1,
            ProxyVersion::V1,
            &b"PROXY TCP4 127.0.0.1 127.0.0.1 "[..],
        ),
        (
            AnnounceClient::ProxyV2,
            ProxyVersion::V2,
            &b"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x0c\x7f\0\0\x01"[..],
        ),
    ] {
        let sink = Sink::start(SinkConfig {
            expect_proxy: Some(version),
            ..SinkConfig::default()
        })
        .unwrap();
        let mut config = test_config(sink.local_addr());
        config.downstream.announce_client = mode;
        let server = Server::start(config);
        let mut client = Client::connect(server.addr);
        assert!(client.send_message().starts_with("250 "), "{mode:?}");
        let m = &sink.wait_for_messages(1, WAIT)[0];
        let header = m.proxy_header.as_deref().expect("PROXY header");
        assert!(header.starts_with(prefix), "{mode:?}: {header:?}");
    }
}

#[test]
fn downstream_replies_are_passed_back() {
    let sink = sink(Behaviour::RejectRcpt("nobody".to_owned()));
    let server = Server::start(test_config(sink.local_addr()));
    let mut client = Client::connect(server.addr);
    client.reply();
    client.command("EHLO c");
    client.command("MAIL FROM:<a@example.org>");
    assert_eq!(
        client.command("RCPT TO:<nobody@example.net>"),
        "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown\r\n"
    );
    assert_eq!(
        client.command("DATA"),
        "554 5.5.1 Error: no valid recipients\r\n"
    );

    let sink = self::sink(Behaviour::MultilineRcpt);
    let server = Server::start(test_config(sink.local_addr()));
    let mut client = Client::connect(server.addr);
    client.reply();
    client.command("EHLO c");
    client.command("MAIL FROM:<a@example.org>");
    assert_eq!(
        client.command("RCPT TO:<b@example.net>"),
        "250-2.1.5 first\r\n250-2.1.5 second\r\n250 2.1.5 Ok\r\n"
    );

    for (behaviour, at_mail, expect) in [
        (
            Behaviour::TempFailMail,
            true,
            "451 4.3.0 Try again later\r\n",
        ),
        (
            Behaviour::RejectData,
            false,
            "554 5.7.1 Message rejected\r\n",
        ),
    ] {
        let sink = self::sink(behaviour);
        let server = Server::start(test_config(sink.local_addr()));
        let mut client = Client::connect(server.addr);
        if at_mail {
            client.reply();
            client.command("EHLO c");
            assert_eq!(client.command("MAIL FROM:<a@example.org>"), expect);
        } else {
            assert_eq!(client.send_message(), expect);
        }
    }
}

#[test]
fn downstream_failures_are_451_and_nothing_is_acknowledged() {
    for behaviour in [Behaviour::NoBanner, Behaviour::CloseAfterBanner] {
        let sink = sink(behaviour.clone());
        let mut config = test_config(sink.local_addr());
        config.timeouts.command = Duration::from_millis(500);
        let server = Server::start(config);
        let mut client = Client::connect(server.addr);
        client.reply();
        client.command("EHLO c");
        assert_eq!(
            client.command("MAIL FROM:<a@example.org>"),
            "451 4.4.2 Error: downstream server unavailable, please try again later\r\n",
            "{behaviour:?}"
        );
        // The session goes on: local commands still work.
        assert_eq!(client.command("NOOP"), "250 2.0.0 Ok\r\n");
    }
    for behaviour in [Behaviour::StallAfterData, Behaviour::CloseAfterDataDot] {
        let sink = sink(behaviour.clone());
        let mut config = test_config(sink.local_addr());
        config.timeouts.command = Duration::from_millis(500);
        let server = Server::start(config);
        let mut client = Client::connect(server.addr);
        assert_eq!(
            client.send_message(),
            "451 4.4.2 Error: downstream server unavailable, please try again later\r\n",
            "{behaviour:?}"
        );
    }
}

#[test]
fn servers_are_tried_in_order() {
    // A port nobody listens on: bind, note the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sink = sink(Behaviour::Normal);
    let mut config = test_config(dead);
    config.downstream.servers.push(sink.local_addr());
    let server = Server::start(config);
    let mut client = Client::connect(server.addr);
    assert!(client.send_message().starts_with("250 "));

    let server = Server::start(test_config(dead));
    let mut client = Client::connect(server.addr);
    client.reply();
    client.command("EHLO c");
    assert!(
        client
            .command("MAIL FROM:<a@example.org>")
            .starts_with("451 4.4.2 ")
    );
}

#[test]
fn client_gone_mid_data_delivers_nothing() {
    let sink = sink(Behaviour::Normal);
    let server = Server::start(test_config(sink.local_addr()));
    let mut client = Client::connect(server.addr);
    client.start_message("a@example.org", &["b@example.net"]);
    client.send(b"Subject: half\r\n\r\nthis message is never finished\r\n");
    drop(client);
    wait_until("the downstream session to close", || {
        let sessions = sink.sessions();
        !sessions.is_empty() && sessions.iter().all(|s| s.closed)
    });
    assert!(sink.messages().is_empty());
}

#[test]
fn smuggling_through_the_real_server() {
    for mode in [BareNewline::Reject, BareNewline::Normalize] {
        let sink = sink(Behaviour::Normal);
        let mut config = test_config(sink.local_addr());
        config.limits.bare_newline = mode;
        let server = Server::start(config);
        let mut client = Client::connect(server.addr);
        client.start_message("a@example.org", &["b@example.net"]);
        client.send(b"Subject: x\r\n\r\nfirst\n.\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled\r\n.\r\n");
        let r = client.reply();
        match mode {
            BareNewline::Reject => {
                assert!(r.starts_with("550 5.6.0 "), "{r}");
                assert_eq!(client.command("NOOP"), "250 2.0.0 Ok\r\n");
                assert!(sink.messages().is_empty());
            }
            BareNewline::Normalize => {
                assert!(r.starts_with("250 2.0.0 "), "{r}");
                let messages = sink.wait_for_messages(1, WAIT);
                assert_eq!(messages.len(), 1);
                assert!(!messages[0].bare_newline_seen);
                assert!(messages[0].rcpt_to == ["b@example.net"]);
            }
        }
        assert!(
            sink.messages()
                .iter()
                .all(|m| !m.mail_from.contains("evil"))
        );
    }
}

#[test]
fn oversized_message_gets_552_and_nothing_delivered() {
    let sink = sink(Behaviour::Normal);
    let mut config = test_config(sink.local_addr());
    config.limits.max_message_size = 10_000;
    let server = Server::start(config);
    let mut client = Client::connect(server.addr);
    client.start_message("a@example.org", &["b@example.net"]);
    let line = "y".repeat(998) + "\r\n";
    for _ in 0..20 {
        client.send(line.as_bytes());
    }
    client.send(b".\r\n");
    assert_eq!(
        client.reply(),
        "552 5.3.4 Error: message size exceeds fixed limit\r\n"
    );
    assert_eq!(client.command("NOOP"), "250 2.0.0 Ok\r\n");
    assert!(sink.messages().is_empty());
}

#[test]
fn second_transaction_reuses_the_downstream() {
    let sink = sink(Behaviour::Normal);
    let server = Server::start(test_config(sink.local_addr()));
    let mut client = Client::connect(server.addr);
    client.start_message("a@example.org", &["b@example.net"]);
    client.send(b"one\r\n.\r\n");
    assert!(client.reply().starts_with("250 "));
    assert!(
        client
            .command("MAIL FROM:<a2@example.org>")
            .starts_with("250 ")
    );
    assert!(
        client
            .command("RCPT TO:<b2@example.net>")
            .starts_with("250 ")
    );
    assert!(client.command("DATA").starts_with("354 "));
    client.send(b"two\r\n.\r\n");
    assert!(client.reply().starts_with("250 "));
    assert_eq!(sink.wait_for_messages(2, WAIT).len(), 2);
    assert_eq!(sink.connections(), 1);
}

#[test]
fn multiplexing_keeps_the_downstream_within_pool_size() {
    // A downstream that takes XCLIENT again on a connection (Postfix with
    // `smtpd_authorized_xclient_hosts = static:all`), so pooled connections are reused.
    let sink = Sink::start(SinkConfig {
        offer_xclient: true,
        xclient_again: true,
        ..SinkConfig::default()
    })
    .expect("sink starts");
    let mut config = test_config(sink.local_addr());
    config.downstream.mode = tarmac::config::DownstreamMode::Multiplexing;
    config.downstream.pool_size = 2;
    config.server.workers = 1;
    let server = Server::start(config);
    let clients: Vec<_> = (0..8)
        .map(|n| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                let port = client.writer.local_addr().unwrap().port();
                client.start_message(&format!("a{n}@example.org"), &["b@example.net"]);
                client.send(format!("Subject: {n}\r\n\r\none\r\n.\r\n"));
                assert!(client.reply().starts_with("250 2.0.0 "));
                assert!(
                    client
                        .command(&format!("MAIL FROM:<a{n}@example.org>"))
                        .starts_with("250 ")
                );
                assert!(
                    client
                        .command("RCPT TO:<c@example.net>")
                        .starts_with("250 ")
                );
                assert!(client.command("DATA").starts_with("354 "));
                client.send(format!("Subject: {n}\r\n\r\ntwo\r\n.\r\n"));
                assert!(client.reply().starts_with("250 2.0.0 "));
                assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
                (n, port)
            })
        })
        .collect();
    let ports: Vec<(usize, u16)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let messages = sink.wait_for_messages(16, WAIT);
    assert_eq!(messages.len(), 16);
    assert!(
        sink.connections() <= 2,
        "{} downstream connections",
        sink.connections()
    );
    // XCLIENT goes per transaction: each message names the client that sent it.
    for m in &messages {
        let n: usize = m
            .mail_from
            .trim_start_matches("<a")
            .split('@')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let port = ports.iter().find(|(k, _)| *k == n).unwrap().1;
        let xclient = m.xclient.as_deref().unwrap_or_default();
        assert!(
            xclient.contains(&format!(" PORT={port} ")),
            "message {n}: {xclient}"
        );
    }
}
