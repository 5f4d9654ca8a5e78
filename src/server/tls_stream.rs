//! A TLS layer on a nonblocking socket, driven by a worker's mio loop with rustls 0.23's
//! buffered API (STYLE.md §1.2). It works on the [`rustls::Connection`] enum, so the same type
//! serves the client leg (a `ServerConnection` after the client's STARTTLS) and can serve the
//! downstream leg (a `ClientConnection`).
//!
//! Reading: socket → [`TlsStream::read_tls`] (one `read_tls`, then `process_new_packets`) →
//! [`TlsStream::read_plaintext`] (rustls' `reader()`). Writing: [`TlsStream::write_plaintext`]
//! (`writer()`) → [`TlsStream::write_tls`] (`write_tls`) → socket. The caller derives its I/O
//! from [`TlsStream::wants_read`] and [`TlsStream::wants_write`] and keeps the socket's
//! readiness flags, as for a plain socket; nothing here registers or blocks.
//!
//! Bounds: rustls holds at most 16 KiB of decrypted input before `wants_read` turns false (its
//! fixed received-plaintext limit; a `read_tls` past it is backpressure, [`TlsRead::Full`], not
//! an error), and at most [`TLS_BUFFER_LIMIT`] of our output, encrypted or not yet; handshake
//! messages are not counted against it, and a handshake message over 64 KiB is refused by
//! rustls.
//!
//! A STARTTLS reply must reach the peer in plain text before the first TLS record: it is the
//! stream's *preamble*, written ahead of anything rustls produces.

use std::io::{self, Read, Write};

use rustls::ProtocolVersion;

/// Bytes of our output rustls may hold (plaintext waiting for the handshake, and encrypted
/// records not yet written): about one full record, so a client that does not read holds this
/// much of ours in rustls on top of the connection's own outbox, no more.
pub(crate) const TLS_BUFFER_LIMIT: usize = 16 * 1024;

/// One TLS connection over a socket the caller owns.
#[derive(Debug)]
pub(crate) struct TlsStream {
    conn: rustls::Connection,
    /// Plain bytes to write before any TLS record (the `220 Ready to start TLS`).
    preamble: Vec<u8>,
    /// Decrypted bytes rustls holds that `read_plaintext` has not taken yet.
    plaintext: usize,
    /// The socket reached its end.
    socket_eof: bool,
    /// The peer sent `close_notify`: nothing more will be decrypted.
    peer_closed: bool,
    /// [`TlsStream::take_established`] reported the end of the handshake.
    reported: bool,
}

/// What one [`TlsStream::read_tls`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TlsRead {
    /// This many bytes of TLS came from the socket and were processed.
    Data(usize),
    /// The socket has nothing now: clear its readable flag.
    WouldBlock,
    /// The socket's end or the peer's `close_notify`: nothing more will come.
    Closed,
    /// rustls holds all the decrypted input it takes: take some with `read_plaintext` first.
    Full,
}

/// What one [`TlsStream::flush`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Flush {
    /// Something was taken from the outbox or written to the socket (room for more output).
    pub(crate) moved: bool,
    /// The socket would block: clear its writable flag.
    pub(crate) blocked: bool,
}

/// Why a TLS stream cannot go on.
#[derive(Debug)]
pub(crate) enum TlsFailure {
    /// The socket failed.
    Io(io::Error),
    /// The peer broke the TLS protocol (a bad handshake, garbage, a fatal alert).
    Tls(rustls::Error),
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsFailure::Io(e) => write!(f, "{e}"),
            TlsFailure::Tls(e) => write!(f, "{e}"),
        }
    }
}

impl TlsStream {
    /// Wraps a fresh rustls connection (`ServerConnection` or `ClientConnection`); `preamble`
    /// goes out in plain text before its first record.
    pub(crate) fn new(conn: impl Into<rustls::Connection>, preamble: Vec<u8>) -> TlsStream {
        let mut conn = conn.into();
        conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        TlsStream {
            conn,
            preamble,
            plaintext: 0,
            socket_eof: false,
            peer_closed: false,
            reported: false,
        }
    }

    /// One read from `socket` into rustls, and the processing of what it brought. A rustls
    /// error ends the stream; the caller should still [`TlsStream::write_tls`] once, which
    /// sends the alert rustls queued for it.
    pub(crate) fn read_tls(&mut self, socket: &mut dyn Read) -> Result<TlsRead, TlsFailure> {
        let read = loop {
            match self.conn.read_tls(socket) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(TlsRead::WouldBlock),
                // "received plaintext buffer full": rustls' backpressure.
                Err(e) if e.kind() == io::ErrorKind::Other && self.plaintext > 0 => {
                    return Ok(TlsRead::Full);
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    // The deframer refused the input (a record or handshake message too big).
                    return Err(TlsFailure::Tls(rustls::Error::General(e.to_string())));
                }
                Err(e) => return Err(TlsFailure::Io(e)),
            }
        };
        if read == 0 {
            self.socket_eof = true;
        }
        let state = self.conn.process_new_packets().map_err(TlsFailure::Tls)?;
        self.plaintext = state.plaintext_bytes_to_read();
        self.peer_closed |= state.peer_has_closed();
        Ok(if read == 0 || self.peer_closed {
            TlsRead::Closed
        } else {
            TlsRead::Data(read)
        })
    }

    /// Copies decrypted bytes into `buf`; 0 when there are none now.
    pub(crate) fn read_plaintext(&mut self, buf: &mut [u8]) -> usize {
        // `Err` is "none now" (`WouldBlock`) or the end of the stream, which `is_finished`
        // reports on its own.
        let n = self.conn.reader().read(buf).unwrap_or(0);
        self.plaintext = self.plaintext.saturating_sub(n);
        n
    }

    /// Hands plaintext to rustls (encrypted once the handshake is done); returns how much it
    /// took, which is less than all when its buffer is at [`TLS_BUFFER_LIMIT`]. Fails once the
    /// connection had a fatal error.
    pub(crate) fn write_plaintext(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.conn.writer().write(bytes)
    }

    /// One write to `socket`: the preamble while there is one, then TLS records.
    pub(crate) fn write_tls(&mut self, socket: &mut dyn Write) -> io::Result<usize> {
        if !self.preamble.is_empty() {
            let n = socket.write(&self.preamble)?;
            self.preamble.drain(..n.min(self.preamble.len()));
            if self.preamble.is_empty() {
                self.preamble = Vec::new();
            }
            return Ok(n);
        }
        self.conn.write_tls(socket)
    }

    /// Moves `outbox` into rustls (as much as its bounded buffer takes) and rustls' records
    /// (the preamble first) to `socket`, until both are empty or the socket would block. A
    /// socket that takes nothing, or a connection rustls has failed, is an error.
    pub(crate) fn flush(
        &mut self,
        outbox: &mut Vec<u8>,
        socket: &mut dyn Write,
    ) -> io::Result<Flush> {
        let mut moved = false;
        loop {
            if !outbox.is_empty() {
                let n = self.write_plaintext(outbox)?;
                outbox.drain(..n.min(outbox.len()));
                moved |= n > 0;
            }
            if !self.wants_write() {
                return Ok(Flush {
                    moved,
                    blocked: false,
                });
            }
            match self.write_tls(socket) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => moved = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Flush {
                        moved,
                        blocked: true,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues a `close_notify` alert (write it with [`TlsStream::write_tls`]).
    pub(crate) fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    /// The agreed version, once, when the handshake has just finished (call after each
    /// `read_tls`); `None` before and after.
    pub(crate) fn take_established(&mut self) -> Option<ProtocolVersion> {
        if self.reported || self.conn.is_handshaking() {
            return None;
        }
        let version = self.conn.protocol_version()?;
        self.reported = true;
        Some(version)
    }

    /// Whether the socket should be read: rustls has room (no decrypted input waiting, no
    /// handshake message waiting to go out) and the stream has not ended.
    pub(crate) fn wants_read(&self) -> bool {
        !self.socket_eof && !self.peer_closed && self.conn.wants_read()
    }

    /// Whether there is something to write to the socket.
    pub(crate) fn wants_write(&self) -> bool {
        !self.preamble.is_empty() || self.conn.wants_write()
    }

    /// Whether decrypted input is waiting for `read_plaintext`.
    pub(crate) fn has_plaintext(&self) -> bool {
        self.plaintext > 0
    }

    /// Whether the input has ended (socket end or `close_notify`) and every decrypted byte was
    /// taken: the peer has nothing more to say.
    pub(crate) fn is_finished(&self) -> bool {
        (self.socket_eof || self.peer_closed) && self.plaintext == 0
    }

    /// Whether the handshake is still running (it never finished, if the stream ended).
    pub(crate) fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The agreed cipher suite, for logs.
    pub(crate) fn cipher_suite(&self) -> Option<rustls::CipherSuite> {
        self.conn
            .negotiated_cipher_suite()
            .map(|suite| suite.suite())
    }
}

#[cfg(test)]
mod tests {
    //! Both sides of a handshake through in-memory "sockets": one `TlsStream` for a server and
    //! one for a client, bytes moved between them by hand, so the API serves both legs.

    use std::sync::Arc;

    use rcgen::{CertificateParams, KeyPair};
    use rustls::pki_types::{CertificateDer, ServerName};

    use super::*;
    use crate::tls::ServerTls;

    /// A socket end: reads from `input`, writes to `output`, `WouldBlock` when empty.
    #[derive(Default)]
    struct Pipe {
        input: Vec<u8>,
        output: Vec<u8>,
        /// Most bytes one write takes (a full socket buffer).
        room: Option<usize>,
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.input.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.input.len());
            buf[..n].copy_from_slice(&self.input[..n]);
            self.input.drain(..n);
            Ok(n)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.room.map_or(buf.len(), |room| room.min(buf.len()));
            if n == 0 && !buf.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.output.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn streams() -> (TlsStream, TlsStream) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["mx.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let server = ServerTls::from_pem(
            cert.pem().as_bytes(),
            std::path::Path::new("chain.pem"),
            key.serialize_pem().as_bytes(),
            std::path::Path::new("key.pem"),
        )
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(cert.der().to_vec()))
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("mx.test").unwrap();
        let client = rustls::ClientConnection::new(Arc::new(client_config), name).unwrap();
        (
            TlsStream::new(server.start().unwrap(), b"220 2.0.0 Ready\r\n".to_vec()),
            TlsStream::new(client, Vec::new()),
        )
    }

    /// Moves every byte `from` wants to write to `to`; returns whether there were any.
    fn carry(from: &mut TlsStream, to: &mut TlsStream) -> bool {
        let mut wire = Pipe::default();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        if wire.output.is_empty() {
            return false;
        }
        wire.input = std::mem::take(&mut wire.output);
        while !wire.input.is_empty() {
            to.read_tls(&mut wire).unwrap();
        }
        true
    }

    /// Carries bytes both ways until neither side has any to write.
    fn exchange(a: &mut TlsStream, b: &mut TlsStream) {
        for _ in 0..20 {
            let there = carry(a, b);
            let back = carry(b, a);
            if !there && !back {
                return;
            }
        }
        panic!("the handshake did not settle");
    }

    #[test]
    fn preamble_goes_first_in_plain_text_then_the_handshake() {
        let (mut server, mut client) = streams();
        let mut wire = Pipe::default();
        assert!(server.wants_write(), "the preamble");
        server.write_tls(&mut wire).unwrap();
        assert_eq!(wire.output, b"220 2.0.0 Ready\r\n");
        assert!(!server.wants_write(), "nothing before the ClientHello");

        exchange(&mut client, &mut server);
        assert_eq!(server.take_established(), Some(ProtocolVersion::TLSv1_3));
        assert_eq!(server.take_established(), None, "reported once");
        assert!(server.cipher_suite().is_some());
        assert_eq!(client.take_established(), Some(ProtocolVersion::TLSv1_3));

        client.write_plaintext(b"EHLO client.test\r\n").unwrap();
        exchange(&mut client, &mut server);
        let mut buf = [0u8; 64];
        let n = server.read_plaintext(&mut buf);
        assert_eq!(&buf[..n], b"EHLO client.test\r\n");
        assert!(!server.has_plaintext());
        assert_eq!(server.read_plaintext(&mut buf), 0, "none now");

        client.send_close_notify();
        exchange(&mut client, &mut server);
        assert!(server.is_finished());
        assert!(!server.wants_read());
    }

    #[test]
    fn flush_stops_at_a_full_socket_and_finishes_later() {
        let (mut server, mut client) = streams();
        let mut wire = Pipe::default();
        server.write_tls(&mut wire).unwrap();
        exchange(&mut client, &mut server);
        let mut outbox = vec![b'z'; 6000];
        let mut full = Pipe {
            room: Some(1000),
            ..Pipe::default()
        };
        let first = server.flush(&mut outbox, &mut full).unwrap();
        assert_eq!(
            first,
            Flush {
                moved: true,
                blocked: false
            },
            "1000 bytes a write, but every write takes some"
        );
        assert!(outbox.is_empty(), "all of it was taken into rustls");
        let mut none = Pipe {
            room: Some(0),
            ..Pipe::default()
        };
        server.write_plaintext(b"more").unwrap();
        assert_eq!(
            server.flush(&mut Vec::new(), &mut none).unwrap(),
            Flush {
                moved: false,
                blocked: true
            }
        );
        let mut wire = Pipe::default();
        let last = server.flush(&mut Vec::new(), &mut wire).unwrap();
        assert!(last.moved && !last.blocked);
        // The client reads the 6000 bytes and the 4 after them.
        wire.input = std::mem::take(&mut full.output);
        wire.input.extend_from_slice(&wire.output);
        while !wire.input.is_empty() {
            client.read_tls(&mut wire).unwrap();
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = client.read_plaintext(&mut buf);
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got.len(), 6004);
        assert!(got.ends_with(b"zzmore"));
    }

    #[test]
    fn garbage_is_a_tls_failure_with_an_alert_to_send() {
        let (mut server, _) = streams();
        let mut wire = Pipe::default();
        server.write_tls(&mut wire).unwrap();
        let mut wire = Pipe {
            input: b"\x17\x03\x03\x00\x05hello".to_vec(),
            ..Pipe::default()
        };
        // Application data before any handshake.
        let error = server.read_tls(&mut wire).unwrap_err();
        assert!(matches!(error, TlsFailure::Tls(_)), "{error:?}");
        assert!(server.is_handshaking());
        let mut wire = Pipe::default();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        assert_eq!(wire.output.first(), Some(&0x15), "an alert record");
    }

    #[test]
    fn plaintext_past_rustls_limit_is_backpressure() {
        let (mut server, mut client) = streams();
        let mut wire = Pipe::default();
        server.write_tls(&mut wire).unwrap();
        exchange(&mut client, &mut server);
        server.take_established();
        // 40 KiB from the client: more than rustls holds decrypted (16 KiB).
        let mut sent = 0;
        let mut records = Pipe::default();
        while sent < 40 * 1024 {
            sent += client.write_plaintext(&[b'x'; 4096]).unwrap();
            while client.wants_write() {
                client.write_tls(&mut records).unwrap();
            }
        }
        records.input = std::mem::take(&mut records.output);
        // Read on regardless of `wants_read`: rustls refuses past its plaintext limit, and
        // that is backpressure, not an error.
        let mut outcomes = Vec::new();
        while outcomes.last() != Some(&TlsRead::Full) && !records.input.is_empty() {
            outcomes.push(server.read_tls(&mut records).unwrap());
        }
        assert_eq!(outcomes.last(), Some(&TlsRead::Full), "{outcomes:?}");
        assert!(!server.wants_read());
        assert!(!records.input.is_empty(), "the rest waits in the socket");
        let mut received = 0;
        let mut buf = [0u8; 8192];
        while received < sent {
            let n = server.read_plaintext(&mut buf);
            received += n;
            if n == 0 {
                assert!(
                    server.wants_read(),
                    "room again once the plaintext was taken"
                );
                server.read_tls(&mut records).unwrap();
            }
        }
        assert_eq!(received, sent);
    }

    #[test]
    fn output_is_bounded_when_the_peer_does_not_read() {
        let (mut server, mut client) = streams();
        let mut wire = Pipe::default();
        server.write_tls(&mut wire).unwrap();
        exchange(&mut client, &mut server);
        server.take_established();
        // The session tickets TLS 1.3 sends after the handshake are already queued.
        let mut full = Pipe {
            room: Some(0),
            ..Pipe::default()
        };
        let mut taken = 0;
        loop {
            let n = server.write_plaintext(&[b'y'; 4096]).unwrap();
            if n == 0 {
                break;
            }
            taken += n;
            let _ = server.write_tls(&mut full);
        }
        assert!(taken <= TLS_BUFFER_LIMIT, "took {taken}");
        assert!(taken > 0);
    }
}
