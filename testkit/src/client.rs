//! An SMTP client for tests: line-oriented, with a timeout on every read and write, and
//! helpers that assert each step of a transaction.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::WAIT;

/// A line-oriented SMTP client with a timeout on every read and write.
pub struct Client {
    reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl Client {
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> Client {
        Client::over(TcpStream::connect_timeout(&addr, WAIT).unwrap())
    }

    /// Connects from the loopback address `source` (any of 127.0.0.0/8 works on Linux), so a
    /// test can be a client that a DNS list or a local list knows.
    #[track_caller]
    pub fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> Client {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
        socket.connect_timeout(&addr.into(), WAIT).unwrap();
        Client::over(socket.into())
    }

    /// A client on a connected stream (one made in a network namespace, or from a transparent
    /// socket), every read and write bounded by [`WAIT`].
    #[track_caller]
    pub fn over(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// One line, CRLF included; fails on EOF, error or timeout.
    #[track_caller]
    pub fn line(&mut self) -> String {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) => panic!("connection closed; expected a line"),
            Ok(_) if line.ends_with(b"\n") => String::from_utf8(line).unwrap(),
            Ok(_) => panic!(
                "connection closed mid-line: {:?}",
                line.escape_ascii().to_string()
            ),
            Err(e) => panic!(
                "reading a line: {e} (got {:?})",
                line.escape_ascii().to_string()
            ),
        }
    }

    /// One whole reply, every line of a multi-line one.
    #[track_caller]
    pub fn reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let line = self.line();
            let last = line.as_bytes().get(3) != Some(&b'-');
            reply.push_str(&line);
            if last {
                return reply;
            }
        }
    }

    /// One whole reply, or why none came (EOF, reset, timeout): for a test that records a
    /// missing answer as evidence instead of failing on the spot.
    pub fn try_reply(&mut self) -> Result<String, String> {
        let mut reply = String::new();
        loop {
            let mut line = Vec::new();
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => return Err(format!("connection closed after {reply:?}")),
                Ok(_) if line.ends_with(b"\n") => {
                    let last = line.get(3) != Some(&b'-');
                    reply.push_str(&String::from_utf8_lossy(&line));
                    if last {
                        return Ok(reply);
                    }
                }
                Ok(_) => {
                    return Err(format!(
                        "connection closed mid-line after {reply:?}: {:?}",
                        line.escape_ascii().to_string()
                    ));
                }
                Err(e) => return Err(format!("{e} after {reply:?}")),
            }
        }
    }

    /// Writes all of `bytes`, or says why not.
    pub fn try_send(&mut self, bytes: impl AsRef<[u8]>) -> Result<(), String> {
        self.writer
            .write_all(bytes.as_ref())
            .map_err(|e| e.to_string())
    }

    #[track_caller]
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.writer.write_all(bytes.as_ref()).unwrap();
    }

    /// Sends `command` with CRLF and returns the reply.
    #[track_caller]
    pub fn command(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n"));
        self.reply()
    }

    /// The server closes the connection without sending anything more.
    #[track_caller]
    pub fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert_eq!(rest.escape_ascii().to_string(), "", "bytes before EOF"),
            Err(e) => panic!(
                "expected EOF, got {e} after {:?}",
                rest.escape_ascii().to_string()
            ),
        }
    }

    /// Reads and discards until the server closes (EOF or reset).
    #[track_caller]
    pub fn drain_to_close(&mut self) {
        let mut buf = [0; 16 * 1024];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("waiting for the server to close: {e}"),
            }
        }
    }

    /// One short message from `a@example.org` to `b@example.net` (banner to the final dot);
    /// returns the reply to the dot.
    #[track_caller]
    pub fn send_message(&mut self) -> String {
        self.start_message("a@example.org", &["b@example.net"]);
        self.send(b"hi\r\n.\r\n");
        self.reply()
    }

    /// Banner, EHLO, MAIL, RCPT...; asserts each succeeds, returns at the 354.
    #[track_caller]
    pub fn start_message(&mut self, from: &str, to: &[&str]) {
        let banner = self.reply();
        // A `220-` teaser (greet pause) may come first; the final line is what counts.
        let last = banner.lines().last().unwrap_or_default();
        assert!(last.starts_with("220 "), "banner: {banner}");
        assert!(
            self.command("EHLO client.example").starts_with("250-"),
            "EHLO"
        );
        let r = self.command(&format!("MAIL FROM:<{from}>"));
        assert!(r.starts_with("250 "), "MAIL: {r}");
        for rcpt in to {
            let r = self.command(&format!("RCPT TO:<{rcpt}>"));
            assert!(r.starts_with("250 "), "RCPT: {r}");
        }
        let r = self.command("DATA");
        assert!(r.starts_with("354 "), "DATA: {r}");
    }
}
