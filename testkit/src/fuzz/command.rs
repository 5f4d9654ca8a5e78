//! The `command` target: command lines for `parse_command`.

use tarmac::smtp::command::{Body, Command, MailParams, parse_command};
use tarmac::smtp::reply::{Status, parse_reply};

use super::{check_client_lines, escape, is_control, to_alphabet};

/// Parses command lines: the whole input, and each of its lines without the line end.
///
/// Properties: MAIL/RCPT addresses hold no control byte (so no CR/LF) and no `<`/`>` outside a
/// quoted local part, and the command tarmac relays for them parses back to the same command;
/// EHLO/HELO names are trimmed and clean; every error's reply is one well-formed reply line.
pub fn command(data: &[u8]) {
    command_lines(data);
    command_lines(&to_alphabet(data));
}

fn command_lines(data: &[u8]) {
    check_command(data);
    for line in data.split(|&b| b == b'\n') {
        check_command(line.strip_suffix(b"\r").unwrap_or(line));
    }
}

fn check_command(line: &[u8]) {
    match parse_command(line) {
        Ok(Command::Mail { from, params }) => {
            check_address(from, line);
            // What the session sends downstream (`send_mail`, all parameters offered).
            let relayed = mail_line(from, params);
            assert_eq!(
                parse_command(relayed.as_bytes()),
                Ok(Command::Mail { from, params }),
                "relayed {relayed:?} for {}",
                escape(line)
            );
        }
        Ok(Command::Rcpt { to }) => {
            assert!(!to.is_empty(), "empty recipient from {}", escape(line));
            check_address(to, line);
            let relayed = format!("RCPT TO:<{to}>");
            assert_eq!(
                parse_command(relayed.as_bytes()),
                Ok(Command::Rcpt { to }),
                "relayed {relayed:?} for {}",
                escape(line)
            );
        }
        Ok(Command::Ehlo(name) | Command::Helo(name)) => {
            assert!(!name.is_empty(), "empty HELO from {}", escape(line));
            assert_eq!(name, name.trim_matches(' '), "untrimmed {}", escape(line));
            assert!(
                !name.bytes().any(is_control),
                "control byte in HELO from {}",
                escape(line)
            );
        }
        Ok(_) => {}
        Err(error) => {
            let reply = error.reply();
            assert!(
                matches!(reply.code, 500 | 501 | 555),
                "{error:?} answers {}",
                reply.code
            );
            let mut wire = Vec::new();
            reply.write_to(&mut wire);
            check_client_lines(&wire);
            assert_eq!(
                wire.iter().filter(|&&b| b == b'\n').count(),
                1,
                "{error:?} writes {}",
                escape(&wire)
            );
            assert_eq!(
                parse_reply(&wire),
                Ok(Status::Complete((reply, wire.len()))),
                "{error:?} does not parse back"
            );
        }
    }
}

/// No control byte anywhere, at most 254 bytes, and `<`, `>` or a space only inside a quoted
/// local part: nothing in an address can end the path or the line it is relayed in.
fn check_address(address: &str, line: &[u8]) {
    assert!(
        !address.bytes().any(is_control),
        "control byte in {address:?} from {}",
        escape(line)
    );
    assert!(address.len() <= 254, "{address:?} is too long");
    let unquoted = after_quoted(address.as_bytes());
    assert!(
        !unquoted.iter().any(|b| b"<> ".contains(b)),
        "bracket or space outside quotes in {address:?} from {}",
        escape(line)
    );
}

/// What follows a leading quoted string (with backslash escapes), or all of `s`.
fn after_quoted(s: &[u8]) -> &[u8] {
    let Some(rest) = s.strip_prefix(b"\"") else {
        return s;
    };
    let mut i = 0;
    while let Some(&b) = rest.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return rest.get(i + 1..).unwrap_or_default(),
            _ => i += 1,
        }
    }
    b""
}

fn mail_line(from: &str, params: MailParams) -> String {
    let mut line = format!("MAIL FROM:<{from}>");
    if let Some(size) = params.size {
        line.push_str(&format!(" SIZE={size}"));
    }
    match params.body {
        Some(Body::SevenBit) => line.push_str(" BODY=7BIT"),
        Some(Body::EightBitMime) => line.push_str(" BODY=8BITMIME"),
        None => {}
    }
    if params.smtputf8 {
        line.push_str(" SMTPUTF8");
    }
    line
}
