//! The real server on loopback (two workers) with the project's SMTP sink as the downstream.

use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tarmac_testkit::sink::Behaviour;

use crate::util::tarmac;
use tarmac_testkit::{Client, DRAIN, Running, Server, WAIT, config, noise, sink, wait_for_log};

const BANNER: &str = "220 mx.test ESMTP tarmac\r\n";

const EHLO_REPLY: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 25000000\r\n\
                          250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n";

const TOO_MANY: &str = "421 4.7.0 mx.test Too many connections, try again later\r\n";

const SHUTTING_DOWN: &str = "421 4.3.2 mx.test Service shutting down, please try again later\r\n";

/// Banner, EHLO and QUIT: the server is serving.
#[track_caller]
fn assert_serves(addr: SocketAddr) {
    let mut client = Client::connect(addr);
    assert_eq!(client.reply(), BANNER);
    assert_eq!(client.command("EHLO other.example"), EHLO_REPLY);
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    client.expect_eof();
}

#[test]
fn pipelined_transaction_is_answered_in_order() {
    let sink = sink(Behaviour::Normal);
    let mut config = config();
    config.downstream.servers = vec![sink.local_addr()];
    let server = Server::start(config);

    let mut client = Client::connect(server.addr);
    assert_eq!(client.reply(), BANNER);
    client.send(
        "EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n\
         RCPT TO:<c@example.net>\r\nDATA\r\n",
    );
    assert_eq!(client.reply(), EHLO_REPLY);
    assert_eq!(client.reply(), "250 2.1.0 Ok\r\n");
    assert_eq!(client.reply(), "250 2.1.5 Ok\r\n");
    assert_eq!(client.reply(), "250 2.1.5 Ok\r\n");
    assert_eq!(client.reply(), "354 End data with <CR><LF>.<CR><LF>\r\n");
    client.send("one line\r\n.\r\nQUIT\r\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok: queued as 1\r\n");
    assert_eq!(client.reply(), "221 2.0.0 Bye\r\n");
    client.expect_eof();
    let messages = sink.wait_for_messages(1, WAIT);
    assert_eq!(messages[0].rcpt_to, vec!["b@example.net", "c@example.net"]);
    server.stop_within(DRAIN);
}

#[test]
fn over_the_per_ip_cap_gets_421_and_a_close() {
    let mut config = config();
    config.limits.max_connections_per_ip = 2;
    let server = Server::start(config);

    let mut first = Client::connect(server.addr);
    let mut second = Client::connect(server.addr);
    assert_eq!(first.reply(), BANNER);
    assert_eq!(second.reply(), BANNER);
    let mut third = Client::connect(server.addr);
    assert_eq!(third.line(), TOO_MANY);
    third.expect_eof();

    // Once one leaves, its slot is given back (after the server noticed: retry, bounded).
    assert_eq!(first.command("QUIT"), "221 2.0.0 Bye\r\n");
    first.expect_eof();
    let give_up = Instant::now() + WAIT;
    loop {
        let mut next = Client::connect(server.addr);
        match next.line().as_str() {
            BANNER => break,
            TOO_MANY => assert!(Instant::now() < give_up, "slot never released"),
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(second);
    server.stop_within(DRAIN);
}

#[test]
fn over_the_global_cap_gets_421_and_a_close() {
    let mut config = config();
    config.server.max_connections = 1;
    let server = Server::start(config);

    let mut first = Client::connect(server.addr);
    assert_eq!(first.reply(), BANNER);
    let mut second = Client::connect(server.addr);
    assert_eq!(second.line(), TOO_MANY);
    second.expect_eof();
    assert_eq!(first.command("NOOP"), "250 2.0.0 Ok\r\n");
    server.stop_within(DRAIN);
}

#[test]
fn many_idle_connections_are_all_served_a_banner() {
    const N: usize = 500;
    let mut config = config();
    config.limits.max_connections_per_ip = 1000;
    let server = Server::start(config);

    let mut streams = Vec::with_capacity(N);
    for _ in 0..N {
        let stream = TcpStream::connect_timeout(&server.addr, WAIT).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        streams.push(stream);
    }
    for (n, stream) in streams.iter_mut().enumerate() {
        let mut banner = [0; BANNER.len()];
        stream
            .read_exact(&mut banner)
            .unwrap_or_else(|e| panic!("connection {n}: {e}"));
        assert_eq!(
            banner.escape_ascii().to_string(),
            BANNER.escape_default().to_string()
        );
    }
    // All still open and served: the last one still answers.
    let last = streams.last_mut().unwrap();
    last.write_all(b"NOOP\r\n").unwrap();
    let mut reply = [0; 14];
    last.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"250 2.0.0 Ok\r\n");
    drop(streams);
    server.stop_within(DRAIN);
}

#[test]
fn ipv6_listener_works() {
    let loopback6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 0));
    if TcpListener::bind(loopback6).is_err() {
        println!("note: cannot bind [::1]:0 here; skipping the IPv6 listener test");
        return;
    }
    let mut config = config();
    config.server.listen = vec![loopback6];
    let server = Server::start(config);
    assert!(server.addr.is_ipv6());
    assert_serves(server.addr);
    server.stop_within(DRAIN);
}

#[test]
fn endless_line_gets_500_while_others_are_served() {
    let server = Server::start(config());
    let mut talker = Client::connect(server.addr);
    assert_eq!(talker.reply(), BANNER);

    let mut writer = talker.writer.try_clone().unwrap();
    let flood = thread::spawn(move || -> io::Result<()> {
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..20 {
            writer.write_all(&chunk)?;
        }
        writer.write_all(b"\r\n")
    });
    // Served while the 20 MB line streams in.
    assert_serves(server.addr);
    flood.join().unwrap().unwrap();

    assert_eq!(talker.reply(), "500 5.5.2 Error: line too long\r\n");
    // The connection resynchronised at the LF and still works.
    assert_eq!(talker.command("NOOP"), "250 2.0.0 Ok\r\n");
    server.stop_within(DRAIN);
}

#[test]
fn random_bytes_do_not_kill_the_server() {
    let server = Server::start(config());
    let mut client = Client::connect(server.addr);
    assert_eq!(client.reply(), BANNER);
    // The server may give up on this client (too many errors) and close while we still write.
    let _ = client
        .writer
        .write_all(&noise(1 << 20, 0x9e37_79b9_7f4a_7c15));
    let _ = client.writer.shutdown(Shutdown::Write);
    client.drain_to_close();
    assert_serves(server.addr);
    server.stop_within(DRAIN);
}

#[test]
fn graceful_shutdown_ends_idle_sessions_with_421_at_once() {
    let server = Server::start(config());
    let addr = server.addr;
    let mut client = Client::connect(addr);
    assert_eq!(client.reply(), BANNER);
    assert_eq!(client.command("EHLO client.example"), EHLO_REPLY);

    server.handle().shutdown();
    assert_eq!(client.reply(), SHUTTING_DOWN);
    client.expect_eof();
    let took = server.stop_within(DRAIN);
    assert!(took < DRAIN, "took {took:?}");
    // The listeners are closed.
    let refused = TcpStream::connect_timeout(&addr, WAIT).unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
}

#[test]
fn shutdown_lets_a_transaction_run_until_the_drain_time() {
    let sink = sink(Behaviour::Normal);
    let mut config = config();
    config.downstream.servers = vec![sink.local_addr()];
    config.timeouts.drain = Duration::from_millis(500);
    let server = Server::start(config);

    let mut client = Client::connect(server.addr);
    assert_eq!(client.reply(), BANNER);
    assert_eq!(client.command("EHLO client.example"), EHLO_REPLY);
    assert_eq!(
        client.command("MAIL FROM:<a@example.org>"),
        "250 2.1.0 Ok\r\n"
    );

    let started = Instant::now();
    server.handle().shutdown();
    // Mid-transaction: still served during the drain time...
    assert_eq!(
        client.command("RCPT TO:<b@example.net>"),
        "250 2.1.5 Ok\r\n"
    );
    // ...then ended.
    assert_eq!(client.reply(), SHUTTING_DOWN);
    client.expect_eof();
    assert!(started.elapsed() >= Duration::from_millis(500));
    server.stop_within(DRAIN);
    assert!(sink.messages().is_empty());
}

#[test]
fn binary_reloads_on_sighup_and_drains_on_sigterm() {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir =
        std::env::temp_dir().join(format!("tarmac-server-test-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tarmac.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"mx.test\"\nworkers = 2\nstate_dir = \"state\"\n\
         [timeouts]\ndrain = \"5s\"\n[dns]\nrdns = false\n\
         [tarpit]\ngreet_pause = \"0s\"\n[greylist]\nenabled = false\n[lists]\nallow = []\ndeny = [\"deny.txt\"]\n",
    )
    .unwrap();
    let deny = dir.join("deny.txt");
    std::fs::write(&deny, "# nobody yet\n").unwrap();
    // Killed by its PID if the test fails before it exits.
    let child = Running::start(tarmac(), &config);
    let lines = &child.lines;

    let listening = wait_for_log(lines, "listening on ");
    let addr: SocketAddr = listening.rsplit(' ').next().unwrap().parse().unwrap();
    let mut client = Client::connect(addr);
    assert_eq!(client.reply(), BANNER);

    // A new deny list: new clients are checked against it at once, and the session opened
    // before the reload lives on and meets it at its next decision.
    std::fs::write(&deny, "127.0.0.50\nspam.example\n").unwrap();
    child.signal("HUP");
    wait_for_log(lines, "reloaded ");
    let mut denied = Client::connect_from(addr, "127.0.0.50".parse().unwrap());
    assert_eq!(
        denied.reply(),
        "554 5.7.1 Service unavailable; client [127.0.0.50] blocked by local policy\r\n"
    );
    assert_eq!(client.command("NOOP"), "250 2.0.0 Ok\r\n", "not dropped");
    assert_eq!(
        client.command("EHLO mail.spam.example"),
        "554 5.7.1 <mail.spam.example>: Helo command rejected: Access denied\r\n"
    );

    // A broken list: the whole reload is refused with the file and line, the old set stays.
    std::fs::write(&deny, "127.0.0.50\nnot an entry\n").unwrap();
    child.signal("HUP");
    let refused = wait_for_log(lines, "reload refused");
    assert!(
        refused.contains(&format!("{}:2: ", deny.display())),
        "{refused}"
    );
    let mut still = Client::connect_from(addr, "127.0.0.50".parse().unwrap());
    assert!(
        still.reply().starts_with("554 5.7.1 "),
        "the old list is in force"
    );
    assert_eq!(still.command("QUIT"), "221 2.0.0 Bye\r\n");
    assert_eq!(denied.command("QUIT"), "221 2.0.0 Bye\r\n");
    still.expect_eof();
    denied.expect_eof();

    child.signal("TERM");
    // The two denied clients are gone, but their slots may be freed a moment after their EOF.
    wait_for_log(lines, "shutting down: draining ");
    assert_eq!(client.reply(), SHUTTING_DOWN);
    client.expect_eof();
    let (code, _) = child.wait_exit();
    assert_eq!(code, Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clients_behind_a_balancer_are_known_by_their_proxy_header() {
    let sink = sink(Behaviour::Normal);
    let mut config = config();
    config.downstream.servers = vec![sink.local_addr()];
    config.server.proxy_protocol_from = vec!["127.0.0.0/8".parse().unwrap()];
    // The balancer's own address is everyone's: the per-IP cap is about the clients behind it.
    config.limits.max_connections_per_ip = 1;
    let server = Server::start(config);

    let mut idle = Client::connect(server.addr);
    idle.send("PROXY TCP4 203.0.113.8 127.0.0.1 40001 25\r\n");
    assert_eq!(idle.reply(), BANNER);

    let mut client = Client::connect(server.addr);
    client.send("PROXY TCP4 203.0.113.9 127.0.0.1 40000 25\r\n");
    assert!(client.send_message().starts_with("250 2.0.0 "));
    let messages = sink.wait_for_messages(1, WAIT);
    let xclient = messages[0].xclient.as_deref().unwrap_or_default();
    assert!(
        xclient.starts_with("ADDR=203.0.113.9 PORT=40000 "),
        "{xclient}"
    );
    assert!(
        String::from_utf8_lossy(&messages[0].content)
            .starts_with("Received: from client.example ([203.0.113.9])")
    );

    // The cap applies to the client the header names: a second connection from 203.0.113.8
    // while the first is open is refused, as a direct one would be.
    let mut twin = Client::connect(server.addr);
    twin.send("PROXY TCP4 203.0.113.8 127.0.0.1 40002 25\r\n");
    assert_eq!(twin.reply(), TOO_MANY);
    twin.expect_eof();

    // No header: closed without a banner.
    let mut bare = Client::connect(server.addr);
    bare.send("EHLO client.example\r\n");
    bare.expect_eof();
}

#[test]
fn stalled_clients_are_timed_out_while_others_are_served() {
    let mut config = config();
    config.timeouts.idle = Duration::from_millis(600);
    let command = Duration::from_millis(300);
    config.timeouts.command = command;
    let server = Server::start(config);
    let timeout = "421 4.4.2 mx.test Error: timeout exceeded\r\n";

    // Says nothing at all after the banner: the command time runs from the banner.
    let silent_since = Instant::now();
    let mut silent = Client::connect(server.addr);
    assert_eq!(silent.reply(), BANNER);
    // Starts a command and stops: the command time runs out first.
    let halfway_since = Instant::now();
    let mut halfway = Client::connect(server.addr);
    assert_eq!(halfway.reply(), BANNER);
    halfway.send("EHLO half");
    assert_serves(server.addr);
    assert_eq!(halfway.reply(), timeout);
    halfway.expect_eof();
    // Lower bounds only (each reply read is bounded by WAIT): neither was cut off before its
    // command time, counted from a moment before the server started it.
    assert!(halfway_since.elapsed() >= command);
    assert_eq!(silent.reply(), timeout);
    silent.expect_eof();
    assert!(silent_since.elapsed() >= command);
}

#[test]
fn a_client_that_never_reads_is_held_back_not_buffered() {
    let mut config = config();
    // The flood is NOOPs: out of reach of the junk and error limits, which would close it
    // long before the kernel's buffers fill and this test could see the backpressure.
    config.limits.max_junk_commands = u32::MAX;
    config.limits.max_errors = u32::MAX;
    let server = Server::start(config);
    // A small receive buffer on the client fills fast, so tarmac's replies back up.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect_timeout(&server.addr.into(), WAIT).unwrap();
    let mut flood: TcpStream = socket.into();
    flood
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // 64 MB of pipelined NOOPs, never reading a reply: if tarmac kept reading (and buffering
    // replies) the whole flood would go through; with backpressure the writes stall.
    let chunk = "NOOP\r\n".repeat(10_000);
    let mut written = 0usize;
    let stalled = loop {
        match flood.write(chunk.as_bytes()) {
            Ok(n) => written += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
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
        "tarmac took {written} bytes from a client that reads nothing"
    );
    // Meanwhile everyone else is served.
    assert_serves(server.addr);
    drop(flood);
    assert_serves(server.addr);
}

#[test]
fn proxy_header_from_an_unlisted_address_is_closed_without_a_reply() {
    let server = Server::start(config());
    // Its first command after the banner: no reply to it or to what follows, only the close.
    let mut client = Client::connect(server.addr);
    assert_eq!(client.reply(), BANNER);
    client.send("PROXY TCP4 203.0.113.9 127.0.0.1 4000 25\r\nEHLO spoofed.example\r\n");
    client.expect_eof();
    assert_serves(server.addr);
}
