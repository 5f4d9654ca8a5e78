//! The `data` target: message bodies through `DataDecoder`, against a reference model.

use tarmac::config::BareNewline;
use tarmac::smtp::data::{DataDecoder, DataViolation};

use super::{XorShift, escape, find, has_bare_newline, to_alphabet};

/// Decodes a message body (layout in the module doc) in both `BareNewline` modes, whole and in
/// chunks cut by the input.
///
/// Properties: the output never holds a bare CR or LF nor `CRLF.CRLF` (counting the CRLF
/// before the body), each call consumes at most its input, chunking changes nothing, and
/// output, size, consumed count, end and violation match a line-by-line reference model.
pub fn data(data: &[u8]) {
    let [size_sel, seed, body @ ..] = data else {
        return;
    };
    let max_size = if size_sel & 0x80 == 0 {
        25_000_000
    } else {
        u64::from(size_sel & 0x7f)
    };
    for body in [body.to_vec(), to_alphabet(body)] {
        for mode in [BareNewline::Reject, BareNewline::Normalize] {
            decode_checked(mode, max_size, *seed, &body);
        }
    }
}

/// What decoding an input produced, whole or in chunks.
#[derive(Debug, PartialEq, Eq)]
struct Decoding {
    out: Vec<u8>,
    consumed: usize,
    done: bool,
    violation: Option<DataViolation>,
    size: u64,
}

fn decode_checked(mode: BareNewline, max_size: u64, seed: u8, body: &[u8]) {
    let whole = decode(mode, max_size, &[body]);
    let chunks = cut(body, seed);
    let pieces = decode(mode, max_size, &chunks);
    assert_eq!(
        whole,
        pieces,
        "chunking changed the result ({mode:?}, max {max_size}) for {}",
        escape(body)
    );
    check_data_output(&whole.out, body);

    let model = model_decode(body);
    assert_eq!(
        (whole.consumed, whole.done, whole.size),
        (model.consumed, model.done, model.size),
        "consumed/done/size for {}",
        escape(body)
    );
    let too_big = model.size > max_size;
    match mode {
        BareNewline::Normalize => assert_eq!(
            whole.violation,
            too_big.then_some(DataViolation::TooBig),
            "violation for {}",
            escape(body)
        ),
        BareNewline::Reject if model.bare => assert!(
            whole.violation.is_some()
                && (too_big || whole.violation == Some(DataViolation::BareNewline)),
            "bare newline not refused in {}",
            escape(body)
        ),
        BareNewline::Reject => assert_eq!(
            whole.violation,
            too_big.then_some(DataViolation::TooBig),
            "violation for {}",
            escape(body)
        ),
    }
    if whole.violation.is_none() {
        assert_eq!(
            escape(&whole.out),
            escape(&model.out),
            "output for {}",
            escape(body)
        );
    } else {
        assert!(
            model.out.starts_with(&whole.out),
            "output {} is not a prefix of {} for {}",
            escape(&whole.out),
            escape(&model.out),
            escape(body)
        );
    }
}

fn decode(mode: BareNewline, max_size: u64, chunks: &[&[u8]]) -> Decoding {
    let mut decoder = DataDecoder::new(mode, max_size);
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut done = false;
    for chunk in chunks {
        let before = out.len();
        let step = decoder.decode(chunk, &mut out);
        assert!(step.consumed <= chunk.len(), "consumed more than given");
        if done {
            assert!(step.done && step.consumed == 0 && out.len() == before);
            continue;
        }
        if !step.done {
            assert_eq!(step.consumed, chunk.len(), "stopped before the end");
        }
        consumed += step.consumed;
        done = step.done;
    }
    Decoding {
        out,
        consumed,
        done,
        violation: decoder.violation(),
        size: decoder.size(),
    }
}

/// Cuts `body` into chunks of pseudo-random lengths (empty ones included) seeded by `seed`.
fn cut(body: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut rng = XorShift::new((u64::from(seed) << 32) | body.len() as u64);
    let longest = 2 + usize::from(seed >> 4) * 4;
    let mut chunks = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let len = (rng.next() as usize % longest).min(rest.len());
        let (chunk, tail) = rest.split_at(len);
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

/// The output can never end a message early or carry a bare line end downstream.
fn check_data_output(out: &[u8], body: &[u8]) {
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(out);
    assert!(
        find(&framed, b"\r\n.\r\n").is_none(),
        "CRLF.CRLF in output {} for {}",
        escape(out),
        escape(body)
    );
    assert!(
        !has_bare_newline(out, true),
        "bare CR or LF in output {} for {}",
        escape(out),
        escape(body)
    );
}

/// The reference decoding, written differently from `DataDecoder`: find the end marker on the
/// whole input first, then cut the content at every CRLF, bare CR and bare LF.
struct Model {
    out: Vec<u8>,
    consumed: usize,
    done: bool,
    size: u64,
    /// A bare CR or LF in the content.
    bare: bool,
}

fn model_decode(body: &[u8]) -> Model {
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(body);
    let (content, consumed, done) = match find(&framed, b"\r\n.\r\n") {
        // The CRLF before the dot belongs to the content; `consumed` ends after the final LF.
        Some(at) => (body.get(..at).unwrap_or_default(), at + 3, true),
        // A trailing CR is undecided (CRLF or bare) until the next byte: nothing for it yet.
        None => (body.strip_suffix(b"\r").unwrap_or(body), body.len(), false),
    };
    let mut model = Model {
        out: Vec::new(),
        consumed,
        done,
        size: 0,
        bare: false,
    };
    let mut after_crlf = true;
    let mut rest = content;
    loop {
        let end = rest
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .unwrap_or(rest.len());
        let (mut text, tail) = rest.split_at(end);
        // Only a line start after a real CRLF has a stuffing dot to drop.
        if after_crlf && text.first() == Some(&b'.') {
            text = text.get(1..).unwrap_or_default();
        }
        if text.first() == Some(&b'.') {
            model.out.push(b'.');
        }
        model.out.extend_from_slice(text);
        model.size += text.len() as u64;
        let (newline, next) = match tail {
            [] => break,
            [b'\r', b'\n', next @ ..] => (2, next),
            [_, next @ ..] => (1, next),
        };
        model.size += newline;
        model.bare |= newline == 1;
        after_crlf = newline == 2;
        model.out.extend_from_slice(b"\r\n");
        rest = next;
    }
    model
}
