//! One socket of a connection, the client's or the downstream's (STYLE.md §1.4): the stream, its
//! readiness flags, the end of its input, its input buffer and outbox, and its TLS layer once
//! STARTTLS switched it. Both ends of a relayed connection are a [`Leg`], as sozu's pipe has one
//! socket type for its frontend and its backend, so every socket operation exists once: one
//! read path and one write path (plain or TLS), one start of TLS, one last write before a close.
//! What a leg carries dies with it: a new downstream connection is a new leg with an empty
//! outbox, so no byte meant for one connection opens the next.
//!
//! Readiness: each socket is registered once for `READABLE | WRITABLE`. An event sets the leg's
//! `readable`/`writable` flag ([`Leg::on_event`]); a `WouldBlock` clears it, and so does a
//! short plain read or write. So a connection that stops reading (backpressure, a tarpit
//! holding a reply) resumes later from the flag without a lost edge and without a `reregister`
//! per event; spurious events cost one `WouldBlock`. On Linux (epoll, edge-triggered) and the
//! BSDs (kqueue) a read or write that moved less than asked drained the socket, and bytes or
//! room that come later are a new edge (tokio-rs/mio#1611; epoll(7)); trusting that saves the
//! read that would only say `WouldBlock`, and the extra turn on the ready list the connection
//! would take to make it. A short read after an event that reported the peer's end (or an
//! error) does not clear the flag: that end came with the edge already seen, brings no new
//! one, and must still be read. TLS reads go through rustls, which reads less than it could
//! for its own reasons: they go on until `WouldBlock`.
//!
//! Nothing here talks to the session or decides anything: `conn.rs` moves bytes between the
//! legs and the session; this module moves them between a leg and its socket.

use std::io::{self, Read, Write};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::ProtocolVersion;

use super::tls_stream::{TlsFailure, TlsRead, TlsStream};
use crate::downstream::pool::Pooled;

/// Bytes read per socket per turn: one read of this size (of plain input, or of TLS records
/// into rustls), then the other connections get their turn; more starves neighbours, less costs
/// syscalls. It is also the worker's scratch size.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

/// An empty buffer with more capacity than this is freed: an idle connection must stay cheap
/// (the `hold` bench's target is ≤ 8 KB per connection), while small buffers are kept to save
/// reallocating for every command.
const SHRINK_ABOVE: usize = 4 * 1024;

/// A socket and what tarmac holds for it.
#[derive(Debug)]
pub(crate) struct Leg {
    stream: TcpStream,
    readable: bool,
    writable: bool,
    /// An event reported the peer's end or an error: a short read no longer proves the socket
    /// drained (see the module doc).
    hung_up: bool,
    eof: Eof,
    /// Bytes read (decrypted, over TLS) and not yet consumed.
    pub(crate) input: Vec<u8>,
    /// Bytes to write (to encrypt first, over TLS).
    pub(crate) outbox: Vec<u8>,
    /// The TLS layer after STARTTLS; boxed, as most connections never have one.
    tls: Option<Box<TlsStream>>,
}

/// The end of a leg's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Eof {
    /// Not seen.
    Open,
    /// Read, not yet told to the session: it gets the buffered input first.
    Seen,
    /// Told to the session (or no longer relevant).
    Delivered,
}

impl Leg {
    /// A socket that is not yet known readable or writable: a connect in progress.
    pub(crate) fn new(stream: TcpStream) -> Leg {
        Leg {
            stream,
            readable: false,
            writable: false,
            hung_up: false,
            eof: Eof::Open,
            input: Vec::new(),
            outbox: Vec::new(),
            tls: None,
        }
    }

    /// A connected socket with an empty send buffer (just accepted, or idle in the pool), with
    /// its TLS layer if it has one. It is assumed writable, so the first bytes go out in this
    /// turn; not readable: registering it reports data that is already there.
    pub(crate) fn connected(stream: TcpStream, tls: Option<Box<TlsStream>>) -> Leg {
        Leg {
            writable: true,
            tls,
            ..Leg::new(stream)
        }
    }

    /// Registers the socket for `READABLE | WRITABLE`, once for its life under this token.
    pub(crate) fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(
            &mut self.stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    /// Takes the socket out of the poll set while the leg lives on (a connection parked in the
    /// pool). A leg that is dropped needs no deregistering: closing its descriptor removes it
    /// from the epoll set (nothing here duplicates descriptors), which saves a system call.
    pub(crate) fn deregister(&mut self, registry: &Registry) {
        // An error only means the socket is already gone.
        let _ = registry.deregister(&mut self.stream);
    }

    /// Records the readiness in `event`. Error and hang-up bits count as readable and
    /// writable, so the next read or write reports what happened.
    pub(crate) fn on_event(&mut self, event: &Event) {
        let failed = event.is_error();
        self.hung_up |= event.is_read_closed() || failed;
        self.readable |= event.is_readable() || event.is_read_closed() || failed;
        self.writable |= event.is_writable() || event.is_write_closed() || failed;
    }

    /// Over TLS: records from the socket into rustls while it wants them, up to [`READ_CHUNK`]
    /// bytes, and the agreed version once the handshake has just finished. A plain leg does
    /// nothing here. A `Tls` failure leaves rustls' alert queued: [`Leg::send_alert`] sends it.
    pub(crate) fn fill(&mut self) -> Result<Option<ProtocolVersion>, TlsFailure> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return Ok(None);
        };
        let mut total = 0;
        while self.readable && tls.wants_read() && total < READ_CHUNK {
            match tls.read_tls(&mut &self.stream)? {
                TlsRead::Data(n) => total += n,
                TlsRead::WouldBlock => self.readable = false,
                TlsRead::Closed | TlsRead::Full => break,
            }
        }
        if tls.is_finished() && self.eof == Eof::Open {
            self.eof = Eof::Seen;
        }
        Ok(tls.take_established())
    }

    /// One read of input into `buf`: from the socket, or over TLS of what rustls decrypted.
    /// Returns the bytes read; 0 is "nothing now" or the end of the input, which
    /// [`Leg::eof`] then reports.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(tls) = self.tls.as_deref_mut() {
            let n = tls.read_plaintext(buf);
            if tls.is_finished() && self.eof == Eof::Open {
                self.eof = Eof::Seen;
            }
            return Ok(n);
        }
        loop {
            match (&self.stream).read(buf) {
                Ok(0) if !buf.is_empty() => {
                    // Nothing more will come: nothing is left to read either.
                    self.eof = Eof::Seen;
                    self.readable = false;
                    return Ok(0);
                }
                Ok(n) => {
                    if n < buf.len() && !self.hung_up {
                        self.readable = false;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(0);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Gives `bytes` (just read) to `take`, which returns how many it consumed, and keeps the
    /// rest in `input`; behind anything older already there, which goes first, so then `take`
    /// is not called (the common case needs no copy into `input`).
    pub(crate) fn feed(&mut self, bytes: &[u8], take: impl FnOnce(&[u8]) -> usize) {
        if self.input.is_empty() {
            let used = take(bytes);
            self.input
                .extend_from_slice(bytes.get(used..).unwrap_or_default());
        } else {
            self.input.extend_from_slice(bytes);
        }
    }

    /// Offers the buffered input to `take` and drops what it consumed. Returns whether it took
    /// anything.
    pub(crate) fn offer(&mut self, take: impl FnOnce(&[u8]) -> usize) -> bool {
        if self.input.is_empty() {
            return false;
        }
        let used = take(&self.input);
        self.input.drain(..used.min(self.input.len()));
        used > 0
    }

    /// Writes the outbox (over TLS: into rustls as far as its bounded buffer takes, and
    /// rustls' records, the plain-text preamble first) until everything is out or the socket
    /// would block. Returns whether anything moved (room for more output).
    pub(crate) fn write(&mut self) -> io::Result<bool> {
        if !self.writable {
            return Ok(false);
        }
        if let Some(tls) = self.tls.as_deref_mut() {
            let flush = tls.flush(&mut self.outbox, &mut &self.stream)?;
            self.writable &= !flush.blocked;
            return Ok(flush.moved);
        }
        if self.outbox.is_empty() {
            return Ok(false);
        }
        let (written, blocked) = write_out(&self.stream, &mut self.outbox)?;
        self.writable &= !blocked;
        Ok(written)
    }

    /// Switches to TLS with `connection`: what the outbox holds (the `220` to STARTTLS, ours
    /// or the peer's) goes out first in plain text, and input read before the switch and not
    /// consumed is dropped, never taken as if it came over TLS (CVE-2011-0411). Returns how
    /// many bytes were dropped, for the caller's log line.
    pub(crate) fn start_tls(&mut self, connection: impl Into<rustls::Connection>) -> usize {
        let dropped = self.input.len();
        self.input = Vec::new();
        let preamble = std::mem::take(&mut self.outbox);
        self.tls = Some(Box::new(TlsStream::new(connection, preamble)));
        dropped
    }

    /// After a `Tls` failure: the alert rustls queued for the peer, in one write, best effort.
    pub(crate) fn send_alert(&mut self) {
        if let Some(tls) = self.tls.as_deref_mut() {
            let _ = tls.write_tls(&mut &self.stream);
        }
    }

    /// The last bytes on a leg about to be dropped (a downstream's QUIT, or what was handed
    /// out before it), in one nonblocking attempt, best effort; over TLS followed by
    /// `close_notify` once the handshake is done, so the peer sees a clean end. A leg still
    /// handshaking gets nothing more: its TLS state is unknown.
    pub(crate) fn write_last(&mut self) {
        match self.tls.as_deref_mut() {
            None => {
                let _ = write_out(&self.stream, &mut self.outbox);
            }
            Some(tls) if tls.is_handshaking() => {}
            Some(tls) => {
                let _ = tls.flush(&mut self.outbox, &mut &self.stream);
                tls.send_close_notify();
                let _ = tls.flush(&mut Vec::new(), &mut &self.stream);
            }
        }
    }

    /// Frees the input and outbox when they are empty and grew past [`SHRINK_ABOVE`].
    pub(crate) fn shrink_idle(&mut self) {
        shrink_if_empty(&mut self.input);
        shrink_if_empty(&mut self.outbox);
    }

    /// Marks the end of the input as told to the session (or no longer relevant).
    pub(crate) fn set_eof(&mut self, eof: Eof) {
        self.eof = eof;
    }

    /// The socket, for what only it can say (a pending connect's outcome) or do (a shutdown).
    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Forgets the readiness a spurious event reported (a connect not finished yet): the real
    /// outcome comes as a new edge.
    pub(crate) fn clear_readiness(&mut self) {
        self.readable = false;
        self.writable = false;
    }

    /// Takes the socket and its TLS layer (into the pool); the buffers go.
    pub(crate) fn into_parts(self) -> (TcpStream, Option<Box<TlsStream>>) {
        (self.stream, self.tls)
    }

    /// The end of the input.
    pub(crate) fn eof(&self) -> Eof {
        self.eof
    }

    /// Whether an event said the socket has something (or its end, or an error) and no read
    /// since said it was drained.
    pub(crate) fn is_readable(&self) -> bool {
        self.readable
    }

    /// Whether an event said the socket has room and no write since filled it.
    pub(crate) fn is_writable(&self) -> bool {
        self.writable
    }

    /// Over TLS: whether [`Leg::fill`] would read the socket (rustls wants records and the
    /// socket has some).
    pub(crate) fn wants_fill(&self) -> bool {
        self.readable && self.tls.as_deref().is_some_and(TlsStream::wants_read)
    }

    /// Whether [`Leg::read`] may bring input: the socket is readable (plain) or rustls holds
    /// decrypted bytes (TLS).
    pub(crate) fn can_read(&self) -> bool {
        match self.tls.as_deref() {
            None => self.readable,
            Some(tls) => tls.has_plaintext(),
        }
    }

    /// Whether everything for the peer was written, TLS records included.
    pub(crate) fn is_flushed(&self) -> bool {
        self.outbox.is_empty() && !self.tls.as_deref().is_some_and(TlsStream::wants_write)
    }

    /// Whether the TLS handshake is running (false for a plain leg).
    pub(crate) fn is_handshaking(&self) -> bool {
        self.tls.as_deref().is_some_and(TlsStream::is_handshaking)
    }

    /// Over TLS: whether the peer has nothing more to say (false for a plain leg).
    pub(crate) fn is_tls_finished(&self) -> bool {
        self.tls.as_deref().is_some_and(TlsStream::is_finished)
    }

    /// Whether nothing is pending in either direction inside rustls (true for a plain leg):
    /// no handshake running, no record to write, no decrypted byte unread.
    pub(crate) fn is_tls_clean(&self) -> bool {
        self.tls
            .as_deref()
            .is_none_or(|tls| !tls.is_handshaking() && !tls.wants_write() && !tls.has_plaintext())
    }

    /// The agreed cipher suite, for logs.
    pub(crate) fn cipher_suite(&self) -> Option<rustls::CipherSuite> {
        self.tls.as_deref().and_then(TlsStream::cipher_suite)
    }
}

impl Pooled for Leg {
    /// Reading finds no data and no end: a probe of one byte, `WouldBlock` being the answer
    /// hoped for.
    fn is_quiet(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match (&self.stream).read(&mut probe) {
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            // Its end (0) or unasked-for bytes (any count): either way, not reusable.
            Ok(_n) => false,
        }
    }

    fn say_quit(&mut self) {
        self.outbox.extend_from_slice(b"QUIT\r\n");
        self.write_last();
    }
}

/// Writes `buf` to `stream` until it is empty or the socket is full, and removes what was
/// written from its front. Returns whether anything was written and whether the socket is now
/// full: it would block, or it took less than offered (a short write filled its buffer, see
/// the module doc), so no write is tried only to hear `WouldBlock`.
fn write_out(mut stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<(bool, bool)> {
    let mut written = 0;
    let result = loop {
        let Some(rest) = buf.get(written..).filter(|rest| !rest.is_empty()) else {
            break Ok(false);
        };
        match stream.write(rest) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) if n < rest.len() => {
                written += n;
                break Ok(true);
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(true),
            Err(e) => break Err(e),
        }
    };
    buf.drain(..written.min(buf.len()));
    result.map(|blocked| (written > 0, blocked))
}

fn shrink_if_empty(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > SHRINK_ABOVE {
        *buf = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::net::{Shutdown, TcpListener};
    use std::time::Duration;

    use super::*;

    /// A connected pair on loopback: our end (blocking for now) and the peer's.
    fn pair(listener: &TcpListener) -> (std::net::TcpStream, std::net::TcpStream) {
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (ours, peer)
    }

    /// Our end as the runtime has it: nonblocking, in a leg. With `arrived`, only once the
    /// peer's FIN or bytes are there: a blocking peek returns when they arrive (and leaves
    /// them unread).
    fn leg(ours: std::net::TcpStream, arrived: bool) -> Leg {
        if arrived {
            ours.peek(&mut [0u8; 1])
                .expect("the FIN or the bytes arrive");
        }
        ours.set_nonblocking(true).unwrap();
        Leg::connected(TcpStream::from_std(ours), None)
    }

    #[test]
    fn an_idle_leg_is_quiet_until_its_peer_speaks_or_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (ours, _alive_peer) = pair(&listener);
        assert!(leg(ours, false).is_quiet(), "nothing came");
        let (ours, peer) = pair(&listener);
        peer.shutdown(Shutdown::Write).unwrap();
        assert!(!leg(ours, true).is_quiet(), "its end came");
        let (ours, mut peer) = pair(&listener);
        peer.write_all(b"421 4.4.2 timeout\r\n").unwrap();
        assert!(!leg(ours, true).is_quiet(), "it spoke unasked");
    }

    #[test]
    fn say_quit_sends_quit_alone() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (ours, mut peer) = pair(&listener);
        let mut leg = leg(ours, false);
        leg.say_quit();
        drop(leg);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut peer, &mut got).unwrap();
        assert_eq!(got, b"QUIT\r\n");
    }

    #[test]
    fn a_short_read_drains_unless_the_end_was_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut buf = [0u8; 64];
        let (ours, mut peer) = pair(&listener);
        peer.write_all(b"EHLO x\r\n").unwrap();
        let mut plain = leg(ours, true);
        plain.readable = true;
        assert_eq!(plain.read(&mut buf).unwrap(), 8);
        assert!(
            !plain.is_readable(),
            "short: drained, more bytes are a new edge"
        );

        // After an event that reported the peer's end, the end may sit behind the bytes.
        let (ours, mut peer) = pair(&listener);
        peer.write_all(b"QUIT\r\n").unwrap();
        let mut hung_up = leg(ours, true);
        hung_up.readable = true;
        hung_up.hung_up = true;
        assert_eq!(hung_up.read(&mut buf).unwrap(), 6);
        assert!(hung_up.is_readable(), "read on, to the end");

        let (ours, peer) = pair(&listener);
        peer.shutdown(Shutdown::Write).unwrap();
        let mut ended = leg(ours, true);
        ended.readable = true;
        assert_eq!(ended.read(&mut buf).unwrap(), 0);
        assert_eq!(ended.eof(), Eof::Seen);
        assert!(!ended.is_readable(), "nothing comes after the end");
    }
}
