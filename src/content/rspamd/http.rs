//! The HTTP/1.1 exchange with rspamd: one connection, one `POST /checkv2`, the body streamed
//! from the held message, the answer read up to [`MAX_REPLY`] bytes.
//!
//! hyper's client connection (`hyper::client::conn::http1`) does the HTTP: header writing and
//! parsing, `Content-Length` and chunked answers, early answers and closes. Its connection
//! future is driven here, beside the request, the answer and the body feeder, in one
//! `select!`: nothing is spawned, so the borrowed held message never has to be `'static` and
//! everything stops when the caller's timeout drops the future.

use std::error::Error as _;
use std::io;
use std::pin::pin;

use http_body_util::channel::{Channel, Sender};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1;
use hyper::header::{CONTENT_LENGTH, HOST, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{MAX_REPLY, Reply, Request, parse_reply};
use crate::content::held::Held;
use crate::content::{Failure, RspamdUrl};

/// Bytes of the held message read and sent at a time: large enough that a 25 MB message is a
/// few hundred reads, small enough that a scan in flight holds little memory.
const CHUNK: usize = 64 * 1024;

/// Bytes of an error answer's body quoted in the failure: enough for rspamd's one-line JSON
/// error, not a page of HTML.
const EXCERPT: usize = 200;

/// The request body: chunks of the held message through a channel of one, so at most two
/// chunks (one queued, one being written) are in memory.
type Body = Channel<Bytes, io::Error>;

/// Connects, sends the request with `held` as its body and reads the answer. No timeout of its
/// own: [`super::check`] bounds the whole of it.
pub(super) async fn exchange(
    url: &RspamdUrl,
    request: &Request<'_>,
    held: &Held,
) -> Result<Reply, Failure> {
    let stream = TcpStream::connect(url.addr)
        .await
        .map_err(|e| Failure::Connect(format!("{}: {e}", url.addr)))?;
    // The headers and the body's last chunk are small writes; Nagle would hold one back until
    // the peer's ACK.
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .map_err(from_hyper)?;
    let (tx, body) = Channel::new(1);
    let http_request = build_request(url, request, held.len(), body);
    let mut answer = pin!(async {
        let response = sender
            .send_request(http_request)
            .await
            .map_err(from_hyper)?;
        read_answer(response).await
    });
    let mut connection = pin!(connection);
    let mut feed = pin!(feed(held, tx));
    let (mut fed, mut closed) = (false, None);
    loop {
        tokio::select! {
            result = &mut answer => {
                // After the connection broke, the answer fails with hyper's "canceled"; the
                // connection's own error says what happened.
                return match (result, closed) {
                    (Err(_), Some(Err(e))) => Err(from_hyper(e)),
                    (result, _) => result,
                };
            }
            () = &mut feed, if !fed => fed = true,
            // Ended: the answer still completes (from what was read) or fails; wait for it.
            result = &mut connection, if closed.is_none() => closed = Some(result),
        }
    }
}

/// `POST /checkv2` with DESIGN.md §7's headers and `Content-Length` (so the body goes
/// unchunked, as rspamd's own clients send it).
fn build_request(
    url: &RspamdUrl,
    request: &Request<'_>,
    len: u64,
    body: Body,
) -> hyper::Request<Body> {
    let mut http_request = hyper::Request::new(body);
    *http_request.method_mut() = Method::POST;
    *http_request.uri_mut() = hyper::Uri::from_static("/checkv2");
    let headers = http_request.headers_mut();
    headers.insert(HOST, value(&url.addr.to_string()));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    let mut add = |name: &'static str, text: &str| {
        headers.append(HeaderName::from_static(name), value(text));
    };
    add("ip", &request.ip.to_string());
    add("helo", request.helo);
    if let Some(hostname) = request.hostname {
        add("hostname", hostname);
    }
    add("from", request.from);
    for rcpt in request.rcpts {
        add("rcpt", rcpt);
    }
    add("queue-id", request.queue_id);
    if let Some((version, cipher)) = request.tls {
        add("tls-version", version);
        // Left out when the driver could not name it.
        if !cipher.is_empty() {
            add("tls-cipher", cipher);
        }
    }
    add("mta-name", request.mta_name);
    http_request
}

/// A header value from client-supplied text (a HELO name, an address): control characters,
/// which HTTP forbids in a value and which could split the header, become `?`; other bytes
/// (UTF-8 of an SMTPUTF8 address among them) go as they are.
fn value(text: &str) -> HeaderValue {
    let bytes: Vec<u8> = text
        .bytes()
        .map(|b| {
            if (b < 0x20 && b != b'\t') || b == 0x7f {
                b'?'
            } else {
                b
            }
        })
        .collect();
    HeaderValue::from_bytes(&bytes).unwrap_or(HeaderValue::from_static(""))
}

/// Sends `held` as the body, [`CHUNK`] bytes at a time, as the connection takes them. A read
/// error aborts the body, which fails the request ([`Failure::Io`]); a closed channel (hyper
/// stopped sending: an early answer or a broken connection) ends the feed quietly.
async fn feed(held: &Held, mut tx: Sender<Bytes, io::Error>) {
    let mut offset = 0u64;
    loop {
        let mut chunk = vec![0; CHUNK];
        match held.read_at(offset, &mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                chunk.truncate(n);
                offset = offset.saturating_add(n as u64);
                if tx.send_data(Bytes::from(chunk)).await.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tx.abort(e);
                return;
            }
        }
    }
}

/// The answer's body, at most [`MAX_REPLY`] bytes, parsed; any status but 200 is garbage.
async fn read_answer(response: Response<Incoming>) -> Result<Reply, Failure> {
    let status = response.status();
    let body = match Limited::new(response.into_body(), MAX_REPLY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Err(Failure::Garbage(format!(
                "an answer over {MAX_REPLY} bytes"
            )));
        }
        Err(e) => {
            return Err(match e.downcast::<hyper::Error>() {
                Ok(e) => from_hyper(*e),
                Err(e) => Failure::Io(e.to_string()),
            });
        }
    };
    if status != StatusCode::OK {
        let excerpt = body.get(..EXCERPT).unwrap_or(&body);
        return Err(Failure::Garbage(format!(
            "HTTP status {status}: {}",
            excerpt.escape_ascii()
        )));
    }
    parse_reply(&body).map_err(Failure::Garbage)
}

/// hyper's error as a failure: an answer that is not HTTP is garbage, everything else a broken
/// connection. The source is kept in the text (hyper's own message is generic).
fn from_hyper(e: hyper::Error) -> Failure {
    let text = match e.source() {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    };
    if e.is_parse() || e.is_parse_status() {
        Failure::Garbage(text)
    } else if e.is_timeout() {
        Failure::Timeout
    } else {
        Failure::Io(text)
    }
}
