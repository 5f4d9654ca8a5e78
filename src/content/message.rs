//! The header block of a held message, as scanners see it and edits change it: a list of
//! fields and where the body starts.
//!
//! A field starts on a line that begins with a name and a colon; lines that begin with a space
//! or a tab continue it. The block ends at the empty line (which belongs to neither part: the
//! body starts after it) or, as Postfix's cleanup does, at the first line that is neither a
//! field nor a continuation (the body starts on that line), or after [`MAX_HEADER_BLOCK`]
//! bytes, so a hostile message cannot make the block unbounded.

use std::io;

use super::held::Held;

/// The longest header block read (1 MiB, ten times Postfix's `header_size_limit`); what
/// follows counts as body.
pub const MAX_HEADER_BLOCK: u64 = 1024 * 1024;

/// One header field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// The name, as written (compare without regard to case).
    pub name: String,
    /// Everything after the colon up to the field's last CRLF (not included): the leading
    /// space and any folded continuation lines (with their CRLFs) are kept.
    pub value: Vec<u8>,
}

impl Field {
    /// The value without the one leading space that follows the colon, as libmilter hands it
    /// to a milter that did not ask for `SMFIP_HDR_LEADSPC`.
    pub fn trimmed_value(&self) -> &[u8] {
        self.value.strip_prefix(b" ").unwrap_or(&self.value)
    }
}

/// A message's header fields and where its body starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderBlock {
    /// The fields in order.
    pub fields: Vec<Field>,
    /// The offset of the body's first byte (after the empty line, when there is one).
    pub body_offset: u64,
}

/// The first read of a header block. Most blocks are a few KiB: later reads grow fourfold up to
/// [`MAX_HEADER_BLOCK`], so a large (spooled) message is not read a whole MiB deep for its
/// headers, once per milter and once more for the edits.
const FIRST_READ: u64 = 16 * 1024;

/// Reads the header block of `held`: the same block as parsing its first [`MAX_HEADER_BLOCK`]
/// bytes, read only until the empty line that ends it (parsing never looks past that line).
pub fn header_block(held: &Held) -> io::Result<HeaderBlock> {
    let mut head = Vec::new();
    let mut end = FIRST_READ.min(MAX_HEADER_BLOCK);
    loop {
        let more = held.read_range(head.len() as u64, end)?;
        head.extend_from_slice(&more);
        let whole = head.len() as u64 == held.len();
        if whole || end >= MAX_HEADER_BLOCK || has_empty_line(&head) {
            return Ok(parse(&head, whole));
        }
        end = end.saturating_mul(4).min(MAX_HEADER_BLOCK);
    }
}

/// Whether `head` holds a whole empty line, the header block's end.
fn has_empty_line(head: &[u8]) -> bool {
    head.starts_with(b"\r\n") || head.windows(4).any(|w| w == b"\r\n\r\n")
}

/// Splits `head` (the message's first bytes; `whole`: the entire message) into fields and
/// the body's offset.
pub fn parse(head: &[u8], whole: bool) -> HeaderBlock {
    let mut block = HeaderBlock::default();
    let mut at = 0;
    while at < head.len() {
        let rest = head.get(at..).unwrap_or_default();
        let Some(line_len) = rest.windows(2).position(|w| w == b"\r\n").map(|p| p + 2) else {
            // An unterminated last line: a header only when it is the message's end.
            if whole && let Some(field) = field_start(rest) {
                block.fields.push(field);
                at = head.len();
            }
            break;
        };
        let line = rest.get(..line_len).unwrap_or_default();
        if line == b"\r\n" {
            block.body_offset = (at + line_len) as u64;
            return block;
        }
        let content = line.get(..line_len - 2).unwrap_or_default();
        if matches!(content.first(), Some(b' ' | b'\t')) {
            if let Some(last) = block.fields.last_mut() {
                last.value.extend_from_slice(b"\r\n");
                last.value.extend_from_slice(content);
                at += line_len;
                continue;
            }
            break;
        }
        match field_start(content) {
            Some(field) => block.fields.push(field),
            None => break,
        }
        at += line_len;
    }
    block.body_offset = at as u64;
    block
}

/// RFC 5322 §3.6.8 `field-name` (`ftext`): one or more printable ASCII characters other than
/// `:`.
pub fn is_field_name(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| b.is_ascii_graphic() && b != b':')
}

/// A field from its first line (without CRLF): a printable name without spaces, a colon.
fn field_start(line: &[u8]) -> Option<Field> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = line.get(..colon)?;
    if !is_field_name(name) {
        return None;
    }
    Some(Field {
        name: String::from_utf8_lossy(name).into_owned(),
        value: line.get(colon + 1..).unwrap_or_default().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_continuations_and_the_empty_line() {
        let msg = b"Received: from a\r\n\tby b\r\nSubject:  hi\r\n\r\nbody\r\n";
        let block = parse(msg, true);
        assert_eq!(block.fields.len(), 2);
        assert_eq!(block.fields[0].name, "Received");
        assert_eq!(block.fields[0].value, b" from a\r\n\tby b");
        assert_eq!(block.fields[1].trimmed_value(), b" hi");
        assert_eq!(&msg[block.body_offset as usize..], b"body\r\n");
    }

    #[test]
    fn a_line_that_is_no_field_starts_the_body() {
        let msg = b"Subject: x\r\nnot a header\r\nmore\r\n";
        let block = parse(msg, true);
        assert_eq!(block.fields.len(), 1);
        assert_eq!(
            &msg[block.body_offset as usize..],
            b"not a header\r\nmore\r\n"
        );
    }

    #[test]
    fn headers_only_and_an_unterminated_last_field() {
        let block = parse(b"A: 1\r\nB: 2", true);
        assert_eq!(block.fields.len(), 2);
        assert_eq!(block.body_offset, 10);
        let cut = parse(b"A: 1\r\nB: 2", false);
        assert_eq!(cut.fields.len(), 1);
        assert_eq!(cut.body_offset, 6);
    }

    #[test]
    fn a_continuation_before_any_field_is_body() {
        let block = parse(b" folded\r\nA: 1\r\n\r\n", true);
        assert!(block.fields.is_empty());
        assert_eq!(block.body_offset, 0);
    }

    #[test]
    fn a_block_longer_than_the_first_read_is_read_whole() {
        // 40 KiB of fields, then a body longer than MAX_HEADER_BLOCK.
        let mut message = Vec::new();
        for n in 0..1000 {
            message.extend_from_slice(format!("X-Field-{n:04}: {}\r\n", "v".repeat(24)).as_bytes());
        }
        let fields_end = message.len() as u64;
        message.extend_from_slice(b"\r\n");
        message.resize(message.len() + 2 * MAX_HEADER_BLOCK as usize, b'b');
        let expected = parse(&message[..MAX_HEADER_BLOCK as usize], false);
        let held = Held::from_bytes(message);
        let block = header_block(&held).unwrap();
        assert_eq!(block, expected);
        assert_eq!(block.fields.len(), 1000);
        assert_eq!(block.body_offset, fields_end + 2);
        // Without an empty line the block stops where it always did.
        let endless = Held::from_bytes(b"X-A: 1\r\n".repeat(200_000));
        let whole = endless.read_range(0, MAX_HEADER_BLOCK).unwrap();
        assert_eq!(header_block(&endless).unwrap(), parse(&whole, false));
    }

    #[test]
    fn the_block_is_read_from_a_held_message() {
        let held = Held::from_bytes(b"X-A: 1\r\n\r\nbody".to_vec());
        let block = header_block(&held).unwrap();
        assert_eq!(block.fields[0].name, "X-A");
        assert_eq!(block.body_offset, 10);
    }
}
