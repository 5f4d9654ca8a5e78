//! STARTTLS on the sink's side (RFC 3207): the server configuration from PEM files, the
//! connection's stream (plain until STARTTLS, then TLS over the same socket), and the command
//! itself, with the STARTTLS misbehaviours.

use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ProtocolVersion, ServerConfig, ServerConnection, StreamOwned};

use super::behaviour::{Behaviour, INJECTED_AFTER_STARTTLS};
use super::session::{Connection, Next};

/// Builds a TLS server configuration for [`SinkConfig::tls`](super::SinkConfig::tls) from PEM
/// files: `chain` holds the leaf certificate first, then any intermediates; `key` its private key.
/// Any TLS version rustls supports by default (1.2 and 1.3), no client certificates. Errors name
/// the file.
pub fn tls_server_config(chain: &Path, key: &Path) -> io::Result<Arc<ServerConfig>> {
    let named = |path: &Path, e: rustls::pki_types::pem::Error| {
        io::Error::other(format!("{}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(chain)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| named(chain, e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| named(key, e))?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(certs, key))
            .map_err(io::Error::other)?;
    Ok(Arc::new(config))
}

/// A connection's byte stream: plain TCP until STARTTLS, then TLS over the same socket.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Stream {
    pub(super) fn tls_version(&self) -> Option<ProtocolVersion> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(tls) => tls.conn.protocol_version(),
        }
    }

    /// Ends TLS politely (close_notify) before the socket closes; nothing to do in plain text.
    pub(super) fn finish(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(tls) => {
                tls.conn.send_close_notify();
                tls.flush()
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

impl Connection<'_> {
    /// STARTTLS is offered in plain text when a certificate is configured, or when a behaviour
    /// fails it on purpose; never again inside TLS (RFC 3207 §4.2).
    pub(super) fn offers_starttls(&self) -> bool {
        let config = &self.shared.config;
        !self.is_tls()
            && (config.tls.is_some()
                || matches!(
                    config.behaviour,
                    Behaviour::RefuseStartTls | Behaviour::CloseAfterStartTls
                ))
    }

    pub(super) fn is_tls(&self) -> bool {
        matches!(self.reader.get_ref(), Stream::Tls(_))
    }

    /// STARTTLS (RFC 3207): `220`, then whatever the client pipelined after the command is
    /// thrown away unread (a client must wait for the `220`, and bytes sent in plain text must
    /// never count as sent inside TLS, CVE-2011-0411), the handshake runs within the socket's
    /// 30 s timeouts, and the session starts over without HELO/EHLO or transaction. A failed
    /// handshake ends the connection (an error for the thread's debug log).
    pub(super) fn handle_starttls(&mut self, arg: &str) -> io::Result<Next> {
        if self.is_tls() {
            // Postfix's reply to a second STARTTLS.
            self.send("554 5.5.1 Error: TLS already active\r\n")?;
            return Ok(Next::Continue);
        }
        if !arg.is_empty() {
            self.send("501 5.5.4 Syntax: STARTTLS\r\n")?;
            return Ok(Next::Continue);
        }
        let tls = match (&self.shared.config.behaviour, &self.shared.config.tls) {
            (Behaviour::CloseAfterStartTls, _) => {
                self.send("220 2.0.0 Ready to start TLS\r\n")?;
                return Ok(Next::Close);
            }
            (Behaviour::RefuseStartTls, _) | (_, None) => {
                self.send("454 4.7.0 TLS not available due to local problem\r\n")?;
                return Ok(Next::Continue);
            }
            (Behaviour::InjectAfterStartTls, Some(tls)) => {
                let tls = Arc::clone(tls);
                self.send(&format!(
                    "220 2.0.0 Ready to start TLS\r\n{INJECTED_AFTER_STARTTLS}"
                ))?;
                tls
            }
            (_, Some(tls)) => {
                let tls = Arc::clone(tls);
                self.send("220 2.0.0 Ready to start TLS\r\n")?;
                tls
            }
        };
        let discarded = self.reader.buffer().len();
        let Stream::Plain(tcp) = self.reader.get_ref() else {
            return Ok(Next::Close);
        };
        // A second handle on the same socket (same timeouts); replacing the reader below drops
        // the buffered bytes and the first handle, not the socket.
        let mut stream = StreamOwned::new(
            ServerConnection::new(tls).map_err(io::Error::other)?,
            tcp.try_clone()?,
        );
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        let version = stream.conn.protocol_version();
        self.reader = BufReader::new(Stream::Tls(Box::new(stream)));
        self.helo = None;
        self.transaction = None;
        self.shared.update_session(self.index, |session| {
            session.tls = version;
            session.starttls_discarded = discarded;
        });
        Ok(Next::Continue)
    }
}
