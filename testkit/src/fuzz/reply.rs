//! The `reply` target: downstream reply streams for `parse_reply`, and replies built from the input.

use tarmac::smtp::reply::{
    EnhancedCode, MAX_REPLY_LINE, MAX_REPLY_LINES, Reply, Status, parse_reply,
};

use super::{escape, to_alphabet};

/// Parses a downstream reply stream and builds replies from the input.
///
/// Properties: a complete reply used at most the input, ends on an LF, has a code in
/// 200..=599, text without CR/LF and an enhanced code of the code's class; it parses the same
/// without the bytes after it; every shorter prefix is `Partial`, never an error; and what
/// `write_to` makes of it (and of replies built from the input) parses back to an equal reply.
pub fn reply(data: &[u8]) {
    reply_stream(data);
    reply_stream(&to_alphabet(data));
    reply_built(data);
}

fn reply_stream(data: &[u8]) {
    let result = parse_reply(data);
    match &result {
        Ok(Status::Complete((reply, used))) => {
            let used = *used;
            assert!(
                used > 0 && used <= data.len(),
                "used {used} of {}",
                data.len()
            );
            assert_eq!(data.get(used - 1), Some(&b'\n'), "reply not ended by LF");
            check_reply_invariants(reply);
            let head = data.get(..used).unwrap_or_default();
            assert_eq!(
                parse_reply(head),
                Ok(Status::Complete((reply.clone(), used))),
                "bytes after the reply changed it"
            );
            check_prefixes_partial(head);
            round_trip(reply);
        }
        Ok(Status::Partial) => {
            assert!(
                data.len() < MAX_REPLY_LINE * MAX_REPLY_LINES,
                "partial after {} bytes",
                data.len()
            );
            check_prefixes_partial(data);
        }
        Err(_) => {}
    }
}

fn check_reply_invariants(reply: &Reply) {
    assert!((200..=599).contains(&reply.code), "code {}", reply.code);
    assert!(!reply.lines.is_empty() && reply.lines.len() <= MAX_REPLY_LINES);
    for line in &reply.lines {
        assert!(!line.contains(['\r', '\n']), "line end in text {line:?}");
    }
    if let Some(enhanced) = reply.enhanced {
        assert_eq!(u16::from(enhanced.class()), reply.code / 100, "{reply:?}");
    }
}

/// Incomplete input is not an error: every strict prefix of `whole` (a complete reply, or
/// input that is itself partial) must be `Partial`. Checked on short inputs only, as each
/// prefix is a full rescan.
fn check_prefixes_partial(whole: &[u8]) {
    if whole.len() > 300 {
        return;
    }
    for end in 0..whole.len() {
        let prefix = whole.get(..end).unwrap_or_default();
        assert_eq!(
            parse_reply(prefix),
            Ok(Status::Partial),
            "prefix {} of {}",
            escape(prefix),
            escape(whole)
        );
    }
}

/// `write_to` then `parse_reply` gives back `reply` (when the written lines fit the parser's
/// caps: a relayed line grows by the enhanced code, and lossy text by U+FFFD).
fn round_trip(reply: &Reply) {
    let mut wire = Vec::new();
    reply.write_to(&mut wire);
    if wire
        .split_inclusive(|&b| b == b'\n')
        .any(|line| line.len() > MAX_REPLY_LINE)
    {
        return;
    }
    check_written_lines(&wire, reply.code);
    assert_eq!(
        parse_reply(&wire),
        Ok(Status::Complete((reply.clone(), wire.len()))),
        "{reply:?} written as {}",
        escape(&wire)
    );
}

/// Builds a reply from the input: bytes 0–1 the code, byte 2 the enhanced code, the rest
/// lines split at 0xFF (CR/LF turned into spaces, as `write_to` would).
fn reply_built(data: &[u8]) {
    let [a, b, c, d, rest @ ..] = data else {
        return;
    };
    let code = 200 + u16::from_le_bytes([*a, *b]) % 400;
    let class = u8::try_from(code / 100).unwrap_or(0);
    let enhanced = (c & 1 == 1 && class != 3)
        .then(|| EnhancedCode(class, u16::from(c >> 1) * 7, u16::from(*d) * 3 % 1000));
    let lines: Vec<String> = rest
        .split(|&b| b == 0xff)
        .take(MAX_REPLY_LINES)
        .map(|l| String::from_utf8_lossy(l).replace(['\r', '\n'], " "))
        .collect();
    // The one ambiguity of the wire form (see `reply`'s module doc): without an enhanced
    // code, text that starts with one would be read as one.
    if enhanced.is_none() {
        let first = lines.first().map_or("", String::as_str);
        let word = first.split(' ').next().unwrap_or("");
        if EnhancedCode::parse(word).is_some_and(|e| e.class() == class) {
            return;
        }
    }
    round_trip(&Reply::multiline(code, enhanced, lines));
}

/// Each line of a written reply: the code, `-` on all but the last line and a space (or
/// nothing, for an empty last line) on the last, no CR or LF inside, CRLF at the end.
fn check_written_lines(wire: &[u8], code: u16) {
    let digits = code.to_string();
    let lines: Vec<&[u8]> = wire.split_inclusive(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(body) = line.strip_suffix(b"\r\n") else {
            panic!("line without CRLF: {}", escape(line));
        };
        assert!(!body.contains(&b'\r'), "CR inside {}", escape(line));
        assert!(
            body.starts_with(digits.as_bytes()),
            "code of {}",
            escape(line)
        );
        let sep = body.get(3).copied();
        if i + 1 < lines.len() {
            assert_eq!(sep, Some(b'-'), "continuation {}", escape(line));
        } else {
            assert!(
                matches!(sep, None | Some(b' ')),
                "last line {}",
                escape(line)
            );
        }
    }
}
