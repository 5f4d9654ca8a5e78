//! Nonblocking TCP connects to the downstream MTA.
//!
//! The server asks for a connection when the session emits `Action::ConnectDownstream`, registers
//! the returned stream for `READABLE | WRITABLE` and, on each event while the connect is pending,
//! calls [`finish_connect`]: the first writable event after a finished connect says "connected"
//! or carries the error (`mio::net::TcpStream::connect`'s documented protocol). The connect
//! timeout is the session's timer, not the socket's.

use std::io;
use std::net::SocketAddr;

use mio::net::TcpStream;

/// Starts a nonblocking connect to `addr`. An immediate error (no route, no local port) comes
/// back here; a refusal usually comes later through [`finish_connect`]. Nagle is off: the relay
/// writes whole SMTP commands and waits for their replies, so batching only adds latency.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Whether a pending connect has finished: `Ok(true)` connected, `Ok(false)` still in progress
/// (a spurious or early event; wait for the next one), `Err` failed (refused, unreachable,
/// reset). Call it on each event of the stream until it returns something other than
/// `Ok(false)`.
pub fn finish_connect(stream: &TcpStream) -> io::Result<bool> {
    if let Some(error) = stream.take_error()? {
        return Err(error);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};
    use std::time::{Duration, Instant};

    use mio::{Events, Interest, Poll, Token};

    use super::*;

    /// Polls `stream` until [`finish_connect`] decides, for at most five seconds.
    #[track_caller]
    fn wait_for_connect(mut stream: TcpStream) -> io::Result<bool> {
        let mut poll = Poll::new().unwrap();
        poll.registry()
            .register(
                &mut stream,
                Token(0),
                Interest::READABLE | Interest::WRITABLE,
            )
            .unwrap();
        let mut events = Events::with_capacity(4);
        let give_up = Instant::now() + Duration::from_secs(5);
        loop {
            match finish_connect(&stream) {
                Ok(false) => {}
                done => return done,
            }
            let left = give_up.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "connect did not finish in 5 s");
            poll.poll(&mut events, Some(left)).unwrap();
        }
    }

    #[test]
    fn connects_to_a_listener_with_nodelay() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect(addr).unwrap();
        assert!(stream.nodelay().unwrap());
        assert!(wait_for_connect(stream).unwrap());
    }

    #[test]
    fn refused_connect_is_an_error() {
        // A port that was just free: nothing listens there any more.
        let addr = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        let outcome = connect(addr).and_then(wait_for_connect);
        let error = outcome.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
    }
}
