//! The `[metrics] listen` endpoint: a minimal HTTP/1.1 server on a thread of its own
//! (`tarmac-metrics`), never on a worker's event loop. `GET /metrics` (or `HEAD`) answers `200`
//! with the exposition; another method on `/metrics` `405`; any other path `404`; a request
//! that is not HTTP `400`. One connection at a time, each closed after its answer: a scraper
//! asks every few seconds, so neither keep-alive nor concurrency is worth a server crate (and
//! hyper's server half, the alternative, would bring a runtime to this thread for one
//! request line). A request head is read for at most [`REQUEST_TIME`] and [`MAX_REQUEST`]
//! bytes, so a client that dribbles or floods holds the thread no longer than that.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};

use super::exposition::Metrics;

/// Longest a request head may take to arrive, in all; then the connection is closed.
const REQUEST_TIME: Duration = Duration::from_secs(5);

/// Longest one write of the answer may block on a scraper that does not read.
const WRITE_TIME: Duration = Duration::from_secs(5);

/// Most bytes of a request head read; a longer one gets `431`. A scraper's is a few hundred.
const MAX_REQUEST: usize = 8 * 1024;

/// The content type `prometheus-client`'s text encoder writes (Prometheus asks for it).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);

/// The running endpoint; stopped by [`MetricsServer::stop`] or when dropped.
#[derive(Debug)]
pub(crate) struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (an error names it), then serves `metrics` from a new thread.
    pub(crate) fn start(addr: SocketAddr, metrics: Metrics) -> io::Result<MetricsServer> {
        let named =
            |e: io::Error| io::Error::new(e.kind(), format!("metrics listen on {addr}: {e}"));
        let mut listener = TcpListener::bind(addr).map_err(named)?;
        let local = listener.local_addr()?;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("tarmac-metrics".to_owned())
                .spawn(move || serve(poll, listener, &stop, &metrics))?
        };
        Ok(MetricsServer {
            addr: local,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// The address served, with the real port where the configuration said 0.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the thread (after the answer it may be writing) and waits for it.
    pub(crate) fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.waker.wake() {
            log::warn!("metrics: cannot wake the metrics thread: {e}");
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("metrics: the metrics thread panicked");
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The thread: accepts until told to stop, answering one connection at a time.
fn serve(mut poll: Poll, listener: TcpListener, stop: &AtomicBool, metrics: &Metrics) {
    let mut events = Events::with_capacity(8);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("metrics: poll failed ({e}); metrics are no longer served");
            return;
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    if let Err(e) = answer(stream.into(), metrics) {
                        log::debug!("metrics: request from {peer}: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors and the like: the next connection's edge retries.
                    log::debug!("metrics: accept failed: {e}");
                    break;
                }
            }
            if stop.load(Ordering::Acquire) {
                return;
            }
        }
    }
}

/// Reads one request head and writes the answer.
fn answer(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIME))?;
    let head = read_head(&mut stream)?;
    let response = match head {
        Head::TooLarge => respond("431 Request Header Fields Too Large", "", None),
        Head::Complete(head) => route(&head, metrics),
    };
    stream.write_all(&response)?;
    stream.flush()?;
    // Errors only mean the scraper is gone already.
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// A request head, read up to its blank line.
enum Head {
    Complete(Vec<u8>),
    TooLarge,
}

/// Reads until the blank line ending the head, within [`REQUEST_TIME`] and [`MAX_REQUEST`].
fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let deadline = Instant::now() + REQUEST_TIME;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Head::Complete(head));
        }
        if head.len() >= MAX_REQUEST {
            return Ok(Head::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head too slow",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let room = MAX_REQUEST.saturating_sub(head.len()).min(chunk.len());
        let buf = chunk.get_mut(..room).unwrap_or_default();
        match stream.read(buf)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the end of the request head",
                ));
            }
            n => head.extend_from_slice(buf.get(..n).unwrap_or_default()),
        }
    }
}

/// The answer to a request head.
fn route(head: &[u8], metrics: &Metrics) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return respond("400 Bad Request", "", None);
    };
    if !version.starts_with(b"HTTP/1.") {
        return respond("400 Bad Request", "", None);
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if path != b"/metrics" {
        return respond("404 Not Found", "", None);
    }
    match method {
        b"GET" => respond("200 OK", &metrics.render(), Some(CONTENT_TYPE)),
        b"HEAD" => {
            let mut response = respond("200 OK", &metrics.render(), Some(CONTENT_TYPE));
            // The head alone: the headers say the length the body would have.
            if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                response.truncate(end.saturating_add(4));
            }
            response
        }
        _ => respond("405 Method Not Allowed", "", None),
    }
}

/// A whole response; `405` says what is allowed.
fn respond(status: &str, body: &str, content_type: Option<&str>) -> Vec<u8> {
    let content_type = content_type.unwrap_or("text/plain; charset=utf-8");
    let allow = if status.starts_with("405") {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Gauges, WorkerCounters};

    fn metrics() -> Metrics {
        Metrics::new(
            vec![Arc::new(WorkerCounters::new())],
            Box::new(Gauges::default),
        )
    }

    fn status(response: &[u8]) -> String {
        let text = String::from_utf8_lossy(response);
        text.lines().next().unwrap_or_default().to_owned()
    }

    #[test]
    fn routes_by_path_and_method() {
        let m = metrics();
        let get = route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m);
        assert_eq!(status(&get), "HTTP/1.1 200 OK");
        assert!(String::from_utf8_lossy(&get).contains("tarmac_connections_open 0"));
        let head = route(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n", &m);
        assert_eq!(status(&head), "HTTP/1.1 200 OK");
        assert!(head.ends_with(b"\r\n\r\n"), "no body");
        assert_eq!(
            status(&route(b"POST /metrics HTTP/1.1\r\n\r\n", &m)),
            "HTTP/1.1 405 Method Not Allowed"
        );
        assert_eq!(
            status(&route(b"GET / HTTP/1.1\r\n\r\n", &m)),
            "HTTP/1.1 404 Not Found"
        );
        for bad in [
            &b"\r\n\r\n"[..],
            b"GET /metrics\r\n\r\n",
            b"GET /metrics SMTP/1\r\n\r\n",
        ] {
            assert_eq!(status(&route(bad, &m)), "HTTP/1.1 400 Bad Request");
        }
    }

    #[test]
    fn serves_over_tcp_and_stops() {
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), metrics()).unwrap();
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains(CONTENT_TYPE));
        assert!(response.ends_with("# EOF\n"));
        let mut flood = TcpStream::connect(server.local_addr()).unwrap();
        flood
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // The server may close before reading it all: a write error is fine.
        let _ = flood.write_all(&[b'a'; MAX_REQUEST + 10]);
        let mut response = String::new();
        let _ = flood.read_to_string(&mut response);
        assert!(
            response.is_empty() || response.starts_with("HTTP/1.1 431 "),
            "{response}"
        );
        server.stop();
    }
}
