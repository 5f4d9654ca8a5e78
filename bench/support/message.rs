//! The 4 KB test message the relay benches send.

/// Bytes of message content (headers and body) the clients send, before dot-stuffing.
pub const MESSAGE_SIZE: usize = 4096;

/// [`MESSAGE_SIZE`] bytes of headers and 78-byte lines, then the terminating `.CRLF`; no line
/// starts with a dot, so the wire form equals the content.
pub fn message_body() -> Vec<u8> {
    let mut body = b"From: <sender@bench.example>\r\nTo: <rcpt@bench.example>\r\n\
                     Subject: relay bench\r\n\r\n"
        .to_vec();
    let mut n = 0u8;
    while body.len() < MESSAGE_SIZE {
        let room = (MESSAGE_SIZE - body.len()).min(78);
        let text = room.saturating_sub(2).max(1);
        body.extend(std::iter::repeat_n(b'a' + n % 26, text));
        body.extend_from_slice(&b"\r\n"[..room - text]);
        n = n.wrapping_add(1);
    }
    assert_eq!(body.len(), MESSAGE_SIZE);
    assert!(body.ends_with(b"\r\n"));
    body.extend_from_slice(b".\r\n");
    body
}
