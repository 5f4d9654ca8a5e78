//! The inbound PROXY protocol header (v1 text, v2 binary) that a load balancer listed in
//! `[server] proxy_protocol_from` sends before any SMTP, as postscreen accepts it.
//!
//! Parsing is ppp's; this module bounds the input, says how many bytes the header took, and
//! turns the result into the one thing tarmac needs: the real client address, if the header
//! carries one (`PROXY UNKNOWN` and v2 `LOCAL`, a balancer's health check, carry none).

use std::net::SocketAddr;

use ppp::{HeaderResult, PartialResult, v1, v2};

use crate::smtp::reply::Status;

/// Longest header accepted: a v1 line is at most 107 bytes; a v2 header is 16 bytes plus
/// addresses (36 for IPv6) plus TLVs, which balancers keep small. Anything longer is refused
/// rather than buffered.
pub const MAX_PROXY_HEADER: usize = 536;

/// Why a PROXY header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// Not a PROXY header, or a malformed one.
    Malformed,
    /// Longer than [`MAX_PROXY_HEADER`].
    TooLong,
}

/// The v2 signature, the first 12 bytes of a binary header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// How a v1 header starts.
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// What the first bytes of a client that is not behind a balancer say about a PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyStart {
    /// They begin with `PROXY ` or the v2 signature.
    Header,
    /// Too few to tell: a proper prefix of `PROXY ` or of the v2 signature (nothing yet too).
    Undecided,
    /// No PROXY header.
    NotProxy,
}

/// Whether `first`, the start of what a client sent, is a PROXY v1/v2 header. Only the
/// start counts: `PROXY ` as the fifth command is just an unknown command.
pub fn proxy_start(first: &[u8]) -> ProxyStart {
    let mut undecided = false;
    for signature in [&V1_PREFIX[..], &V2_SIGNATURE[..]] {
        if first.starts_with(signature) {
            return ProxyStart::Header;
        }
        undecided |= signature.starts_with(first);
    }
    if undecided {
        ProxyStart::Undecided
    } else {
        ProxyStart::NotProxy
    }
}

/// A v1 line is at most this long, CRLF included (the spec's worst case, TCP6 with maximal
/// addresses and ports).
const MAX_V1_LINE: usize = 107;

/// Parses a PROXY header at the start of `buf`: `Complete((client, length))` with the source
/// address (None for UNKNOWN/LOCAL) and the header's length in bytes; `Partial` when more
/// bytes are needed. Framing (how long the header is) is done here, so ppp only ever sees a
/// whole header: its own partial-input detection misreads some cut v1 lines as malformed.
pub fn parse_proxy_header(buf: &[u8]) -> Result<Status<(Option<SocketAddr>, usize)>, ProxyError> {
    let Some(length) = header_length(buf)? else {
        return Ok(Status::Partial);
    };
    let parsed = HeaderResult::parse(buf.get(..length).unwrap_or(buf));
    if parsed.is_incomplete() {
        return Err(ProxyError::Malformed);
    }
    Ok(Status::Complete(match parsed {
        HeaderResult::V1(Ok(header)) => {
            let client = match header.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            (client, header.header.len())
        }
        HeaderResult::V2(Ok(header)) => {
            let client = match (header.command, header.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            };
            (client, header.len())
        }
        HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => return Err(ProxyError::Malformed),
    }))
}

/// The length of the header at the start of `buf`, once it is all there.
fn header_length(buf: &[u8]) -> Result<Option<usize>, ProxyError> {
    let signature_seen = buf.len().min(V2_SIGNATURE.len());
    if buf.get(..signature_seen) == V2_SIGNATURE.get(..signature_seen) {
        let (Some(&high), Some(&low)) = (buf.get(14), buf.get(15)) else {
            return Ok(None);
        };
        let length = 16 + usize::from(u16::from_be_bytes([high, low]));
        if length > MAX_PROXY_HEADER {
            return Err(ProxyError::TooLong);
        }
        return Ok((buf.len() >= length).then_some(length));
    }
    let prefix = buf.len().min(V1_PREFIX.len());
    if buf.get(..prefix) != V1_PREFIX.get(..prefix) {
        return Err(ProxyError::Malformed);
    }
    match buf.iter().take(MAX_V1_LINE).position(|&b| b == b'\n') {
        Some(at) => Ok(Some(at + 1)),
        None if buf.len() >= MAX_V1_LINE => Err(ProxyError::TooLong),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Option<SocketAddr>, usize) {
        match parse_proxy_header(buf) {
            Ok(Status::Complete(c)) => c,
            other => panic!("{other:?} for {:?}", buf.escape_ascii().to_string()),
        }
    }

    #[test]
    fn v1_headers() {
        let line = b"PROXY TCP4 192.0.2.7 198.51.100.1 53211 25\r\nEHLO x\r\n";
        assert_eq!(
            complete(line),
            (Some("192.0.2.7:53211".parse().unwrap()), 44)
        );
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 25\r\n";
        assert_eq!(
            complete(line),
            (Some("[2001:db8::7]:4000".parse().unwrap()), line.len())
        );
        assert_eq!(complete(b"PROXY UNKNOWN\r\n"), (None, 15));
    }

    #[test]
    fn v2_headers() {
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x0c".to_vec();
        v2.extend_from_slice(&[192, 0, 2, 7, 198, 51, 100, 1]);
        v2.extend_from_slice(&53211u16.to_be_bytes());
        v2.extend_from_slice(&25u16.to_be_bytes());
        let len = v2.len();
        v2.extend_from_slice(b"EHLO x\r\n");
        assert_eq!(
            complete(&v2),
            (Some("192.0.2.7:53211".parse().unwrap()), len)
        );
        // LOCAL (a health check): no address.
        let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\0\x00";
        assert_eq!(complete(local), (None, 16));
    }

    #[test]
    fn partial_headers_wait_for_more() {
        let line = b"PROXY TCP4 192.0.2.7 198.51.100.1 53211 25\r\n";
        for cut in 0..line.len() {
            assert_eq!(
                parse_proxy_header(&line[..cut]),
                Ok(Status::Partial),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            &b"EHLO client.example\r\n"[..],
            b"PROXY TCP4 999.0.2.7 198.51.100.1 53211 25\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 53211\r\n",
        ] {
            assert_eq!(
                parse_proxy_header(bad),
                Err(ProxyError::Malformed),
                "{bad:?}"
            );
        }
        let endless = vec![b'P'; MAX_PROXY_HEADER + 10];
        assert!(parse_proxy_header(&endless).is_err());
    }

    #[test]
    fn proxy_start_table() {
        let cases: &[(&[u8], ProxyStart)] = &[
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 53211 25\r\n",
                ProxyStart::Header,
            ),
            (b"PROXY ", ProxyStart::Header),
            (b"\r\n\r\n\0\r\nQUIT\n\x21\x11", ProxyStart::Header),
            (b"\r\n\r\n\0\r\nQUIT\n", ProxyStart::Header),
            (b"", ProxyStart::Undecided),
            (b"PROX", ProxyStart::Undecided),
            (b"\r\n", ProxyStart::Undecided),
            (b"\r\n\r\n\0\r\nQUI", ProxyStart::Undecided),
            (b"PROXYTCP4", ProxyStart::NotProxy),
            (b"proxy TCP4", ProxyStart::NotProxy),
            (b"EHLO x\r\n", ProxyStart::NotProxy),
            (b"\r\nEHLO", ProxyStart::NotProxy),
            (b"\r\n\r\n\0\r\nQUIT\r\n", ProxyStart::NotProxy),
        ];
        for &(first, expected) in cases {
            assert_eq!(
                proxy_start(first),
                expected,
                "{:?}",
                first.escape_ascii().to_string()
            );
        }
    }
}
