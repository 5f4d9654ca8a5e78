//! Nonblocking TCP connects to the downstream MTA.
//!
//! The server asks for a connection when the session emits `Action::ConnectDownstream`, registers
//! the returned stream for `READABLE | WRITABLE` and, on each event while the connect is pending,
//! calls [`finish_connect`]: the first writable event after a finished connect says "connected"
//! or carries the error (`mio::net::TcpStream::connect`'s documented protocol: `take_error`,
//! then `peer_addr` to tell a finished connect from a spurious event). The connect timeout is
//! the session's timer, not the socket's.
//!
//! A clean writable edge (writable, and neither an error nor a hang-up reported) needs neither
//! question, which saves two system calls per downstream connection. On Linux a connecting
//! socket reports no readiness at all before its handshake completes (`tcp_poll` in `SYN_SENT`
//! reports nothing), and a failed connect always comes with `EPOLLERR`; with kqueue a failed
//! connect comes with `EV_EOF` and its error, which mio reports as an error. Should the
//! connection fail after that edge, the first read or write says so, as for any connection.

use std::io;
use std::net::{IpAddr, SocketAddr};

use mio::event::Event;
use mio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};

/// Starts a nonblocking connect to `addr`, from `from` when given (a transparent session's
/// `spoof_source`: see [`connect_from`]). An immediate error (no route, no local port) comes
/// back here; a refusal usually comes later through [`finish_connect`]. Nagle is off: the
/// relay writes whole SMTP commands and waits for their replies, so batching only adds
/// latency.
pub(crate) fn connect(addr: SocketAddr, from: Option<IpAddr>) -> io::Result<TcpStream> {
    let stream = match from {
        Some(from) => connect_from(addr, from)?,
        None => TcpStream::connect(addr)?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A nonblocking connect to `addr` whose source is `from`, an address of another host (the
/// client's): `IP_TRANSPARENT` (which needs `CAP_NET_ADMIN`) lets the socket bind it, and the
/// kernel chooses the port. The replies come back to this host only where routing sends
/// them here (DESIGN.md §9; docs/transparent.md).
pub(crate) fn connect_from(addr: SocketAddr, from: IpAddr) -> io::Result<TcpStream> {
    let socket = transparent_socket(addr)?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        // A nonblocking connect has started: it ends as any other (`finish_connect`).
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// A nonblocking TCP socket of `addr`'s family with `IP_TRANSPARENT` (or `IPV6_TRANSPARENT`)
/// set. The error names the capability it needs, so a start-up or log line says what to grant.
pub(crate) fn transparent_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    let set = if addr.is_ipv6() {
        socket.set_ip_transparent_v6(true)
    } else {
        socket.set_ip_transparent_v4(true)
    };
    set.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("IP_TRANSPARENT needs the CAP_NET_ADMIN capability: {e}"),
        )
    })?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Whether a pending connect has finished: `Ok(true)` connected, `Ok(false)` still in progress
/// (a spurious or early event; wait for the next one), `Err` failed (refused, unreachable,
/// reset). Call it on each event of the stream until it returns something other than
/// `Ok(false)`. `clean_writable`: the events since the connect started said writable and
/// reported no error and no hang-up ([`is_clean_writable`]); then it is connected without
/// asking the socket (see the module doc).
pub(crate) fn finish_connect(stream: &TcpStream, clean_writable: bool) -> io::Result<bool> {
    if clean_writable {
        return Ok(true);
    }
    if let Some(error) = stream.take_error()? {
        return Err(error);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(error) => Err(error),
    }
}

/// Whether `event` is a clean writable edge for [`finish_connect`]: writable, with no error
/// and neither end reported closed.
pub(crate) fn is_clean_writable(event: &Event) -> bool {
    event.is_writable() && !event.is_error() && !event.is_read_closed() && !event.is_write_closed()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};
    use std::time::{Duration, Instant};

    use mio::{Events, Interest, Poll, Token};

    use super::*;

    /// A poll with `stream` registered as the worker registers it.
    fn registered(stream: &mut TcpStream) -> Poll {
        let poll = Poll::new().unwrap();
        let interest = Interest::READABLE | Interest::WRITABLE;
        poll.registry()
            .register(stream, Token(0), interest)
            .unwrap();
        poll
    }

    /// Polls `stream` until [`finish_connect`] decides, for at most five seconds, telling it
    /// whether the events were clean writable edges when `trust_edges`; returns its answer and
    /// whether the events it was given were all clean.
    #[track_caller]
    fn wait_for_connect(mut stream: TcpStream, trust_edges: bool) -> (io::Result<bool>, bool) {
        let mut poll = registered(&mut stream);
        let mut events = Events::with_capacity(4);
        let give_up = Instant::now() + Duration::from_secs(5);
        let mut clean = None;
        loop {
            if let Some(clean) = clean {
                match finish_connect(&stream, trust_edges && clean) {
                    Ok(false) => {}
                    done => return (done, clean),
                }
            }
            let left = give_up.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "connect did not finish in 5 s");
            poll.poll(&mut events, Some(left)).unwrap();
            for event in &events {
                let edge = is_clean_writable(event);
                clean = Some(clean.map_or(edge, |before: bool| before && edge));
            }
        }
    }

    #[test]
    fn connects_to_a_listener_with_nodelay() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect(addr, None).unwrap();
        assert!(stream.nodelay().unwrap());
        let (connected, _) = wait_for_connect(stream, false);
        assert!(connected.unwrap());
    }

    #[test]
    fn a_clean_writable_edge_is_a_finished_connect() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut stream = connect(addr, None).unwrap();
        let mut poll = registered(&mut stream);
        let mut events = Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        let event = events.iter().next().expect("an event within 5 s");
        assert!(is_clean_writable(event), "{event:?}");
        // What the fast path skips would have said the same.
        assert!(stream.take_error().unwrap().is_none());
        assert_eq!(stream.peer_addr().unwrap(), addr);
        assert!(finish_connect(&stream, true).unwrap());
    }

    #[test]
    fn refused_connect_is_an_error() {
        // A port that was just free: nothing listens there any more.
        let addr = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap();
        for trust_edges in [false, true] {
            let stream = connect(addr, None).unwrap();
            let (outcome, clean) = wait_for_connect(stream, trust_edges);
            // The refusal's edge is never clean, so trusting clean edges still asks the socket.
            assert!(!clean, "trust_edges {trust_edges}");
            let error = outcome.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
        }
    }
}
