//! One-message SMTP sessions from many blocking client threads, as the relay and scan benches
//! drive tarmac and the sink: connect, banner, EHLO, MAIL, RCPT, DATA, body, `.`, QUIT, each
//! step waiting for its reply.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Longest any single connect, read or write may take before the bench fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts `clients` threads each sending `per_client` messages to `addr`, one per session;
/// returns the messages sent and the time from the common start to the last thread's end.
pub fn run_clients(
    addr: SocketAddr,
    clients: usize,
    body: &[u8],
    per_client: usize,
) -> (usize, Duration) {
    let start = Arc::new(Barrier::new(clients + 1));
    let body: Arc<[u8]> = Arc::from(body);
    let threads: Vec<_> = (0..clients)
        .map(|n| {
            let start = Arc::clone(&start);
            let body = Arc::clone(&body);
            thread::Builder::new()
                .name(format!("client-{n}"))
                .spawn(move || {
                    start.wait();
                    for _ in 0..per_client {
                        send_one(addr, &body);
                    }
                })
                .expect("client thread starts")
        })
        .collect();
    start.wait();
    let started = Instant::now();
    for thread in threads {
        thread.join().expect("client thread succeeded");
    }
    (clients * per_client, started.elapsed())
}

/// One whole SMTP session delivering one message; panics (failing the bench) on any reply
/// other than the expected success.
pub fn send_one(addr: SocketAddr, body: &[u8]) {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    expect_reply(&mut reader, &mut line, "220");
    for (command, code) in [
        (&b"EHLO client.bench\r\n"[..], "250"),
        (b"MAIL FROM:<sender@bench.example>\r\n", "250"),
        (b"RCPT TO:<rcpt@bench.example>\r\n", "250"),
        (b"DATA\r\n", "354"),
        (body, "250"),
        (b"QUIT\r\n", "221"),
    ] {
        writer.write_all(command).expect("write");
        expect_reply(&mut reader, &mut line, code);
    }
}

/// Reads one (possibly multi-line) reply and checks its code.
pub fn expect_reply(reader: &mut BufReader<TcpStream>, line: &mut Vec<u8>, code: &str) {
    loop {
        line.clear();
        let n = reader.read_until(b'\n', line).expect("read reply");
        assert!(n > 0, "connection closed while waiting for {code}");
        let text = String::from_utf8_lossy(line);
        assert!(
            text.starts_with(code) && text.ends_with("\r\n"),
            "expected {code}, got {text:?}"
        );
        if line.get(3) != Some(&b'-') {
            return;
        }
    }
}
