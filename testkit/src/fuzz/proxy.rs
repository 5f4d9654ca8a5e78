//! The `proxy` target: inbound PROXY headers (v1 and v2).

/// Parses an inbound PROXY header (v1 or v2), raw and with a valid v2 signature or v1 prefix
/// put in front so the parser gets past its first check.
///
/// Properties: a complete header used at most the input (and at most
/// `MAX_PROXY_HEADER` bytes); it parses the same without the bytes after it; every shorter
/// prefix of it is `Partial`; `Partial` only while the input is shorter than the cap.
pub fn proxy(data: &[u8]) {
    for prefix in [&b""[..], b"PROXY ", b"\r\n\r\n\0\r\nQUIT\n"] {
        let mut input = prefix.to_vec();
        input.extend_from_slice(data);
        proxy_header(&input);
    }
}

fn proxy_header(input: &[u8]) {
    use tarmac::smtp::proxy::{MAX_PROXY_HEADER, parse_proxy_header};
    use tarmac::smtp::reply::Status;
    match parse_proxy_header(input) {
        Ok(Status::Complete((client, length))) => {
            assert!(
                length <= input.len() && length <= MAX_PROXY_HEADER,
                "{length}"
            );
            let header = &input[..length];
            assert_eq!(
                parse_proxy_header(header),
                Ok(Status::Complete((client, length))),
                "the bytes after the header changed it"
            );
            for cut in 0..length {
                assert_eq!(
                    parse_proxy_header(&header[..cut]),
                    Ok(Status::Partial),
                    "prefix of {cut} bytes of a complete header"
                );
            }
        }
        Ok(Status::Partial) => assert!(input.len() < MAX_PROXY_HEADER),
        Err(_) => {}
    }
}
