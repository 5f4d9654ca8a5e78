//! The `edit` target: a held message with scanners' edits, through `Outgoing::encode`.

use std::path::PathBuf;
use std::sync::OnceLock;

use tarmac::config::BareNewline;
use tarmac::content::Edit;
use tarmac::content::edit::Outgoing;
use tarmac::content::held::{self, Held};
use tarmac::content::message;
use tarmac::smtp::data::DataDecoder;

use super::{XorShift, escape, find, has_bare_newline, to_alphabet};

/// Header names the edits pick from: real ones in several cases, and names that are no field
/// names (skipped), or that start with a dot (stuffed).
const NAMES: &[&str] = &[
    "Subject", "subject", "X-A", "x-a", "Received", "From", ".Dot", "", "Bad Name", "X:Y",
];

/// Builds a held message and edits from the input, encodes it whole and in pseudo-random steps.
///
/// Layout: byte 0 bit 0 spools the message (past byte 1 & 31 bytes), bit 1 maps the input into
/// the SMTP alphabet; byte 1 also seeds the step sizes; byte 2 says which share of the rest
/// (`/255`) is the message; the other bytes are edits, each a kind byte, a name byte, an
/// index byte and a value of up to 15 bytes (its length in the kind byte's high nibble).
///
/// Properties: the stepped encoding equals the one-shot one; it decodes back (with the final
/// `.CRLF`) to content that ends exactly at the terminator with no bare CR or LF, and whose
/// stuffing is the encoding again; it is never shorter than `len()`; an unchanged message
/// that already was CRLF content comes out as itself; when the message held no bare line
/// end, a last `SetSubject` leaves one Subject and a last remove-all leaves none of its name.
pub fn edit(data: &[u8]) {
    let [flags, seed, share, rest @ ..] = data else {
        return;
    };
    let rest = if flags & 2 == 0 {
        rest.to_vec()
    } else {
        to_alphabet(rest)
    };
    let split = rest.len() * usize::from(*share) / 255;
    let (message, edit_bytes) = rest.split_at(split.min(rest.len()));
    let edits = edits(edit_bytes);
    let spool_after = (flags & 1 == 1).then_some(u64::from(seed & 31));
    let make = || {
        let held = held_message(message, spool_after);
        Outgoing::edited(held, &edits).expect("reading a held message")
    };
    let whole = encode(&mut make(), &mut None);
    let mut rng = XorShift::new(u64::from(*seed) << 8 | u64::from(*share));
    let stepped = encode(&mut make(), &mut Some(&mut rng));
    assert_eq!(
        escape(&whole),
        escape(&stepped),
        "steps changed the encoding of {} with {edits:?}",
        escape(message)
    );
    assert!(
        whole.len() as u64 >= make().len(),
        "the encoding is shorter than the content"
    );
    let content = check_decodes_back(&whole);

    let clean = !has_bare_newline(message, false) && !message.starts_with(b"\n");
    if edits.is_empty() && clean && (message.is_empty() || message.ends_with(b"\r\n")) {
        assert_eq!(
            escape(&content),
            escape(message),
            "an unchanged message changed"
        );
    }
    if clean {
        check_last_edit(&content, &edits);
    }
}

/// The edits the input spells out.
fn edits(mut bytes: &[u8]) -> Vec<Edit> {
    let mut edits = Vec::new();
    while let [kind, name, index, tail @ ..] = bytes {
        let value_len = usize::from(kind >> 4).min(tail.len());
        let (value, after) = tail.split_at(value_len);
        bytes = after;
        let name = NAMES
            .get(usize::from(*name) % NAMES.len())
            .copied()
            .unwrap_or("X")
            .to_owned();
        let value = String::from_utf8_lossy(value).into_owned();
        edits.push(match kind % 6 {
            0 => Edit::AddHeader { name, value },
            1 => Edit::InsertHeader {
                index: u32::from(*index % 12),
                name,
                value,
            },
            2 => Edit::ChangeHeader {
                index: u32::from(*index % 5),
                name,
                // An empty value deletes: make it likely.
                value: if index & 0x80 == 0 {
                    value
                } else {
                    String::new()
                },
            },
            3 => Edit::RemoveHeader {
                name,
                which: i32::from(*index as i8 % 5),
            },
            4 => Edit::SetSubject(value),
            _ => Edit::ReplaceBody(value.into_bytes()),
        });
    }
    edits
}

fn held_message(message: &[u8], spool_after: Option<u64>) -> Held {
    let Some(spool_after) = spool_after else {
        return Held::from_bytes(message.to_vec());
    };
    let mut held = Held::new(spool_after, spool());
    for chunk in message.chunks(7) {
        held.append(chunk).expect("writing the spool file");
    }
    held
}

/// One spool directory for every run, shared by every process: its files have no name, so
/// runs cannot collide, and only the empty directory stays behind.
fn spool() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let state = std::env::temp_dir().join("tarmac-fuzz-edit");
        held::spool_dir(&state).expect("making the spool directory")
    })
    .clone()
}

/// Encodes to the end, in one call or in steps of 1 to 64 bytes.
fn encode(outgoing: &mut Outgoing, steps: &mut Option<&mut XorShift>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut calls = 0usize;
    loop {
        let max = match steps {
            Some(rng) => 1 + (rng.next() % 64) as usize,
            None => usize::MAX,
        };
        if outgoing.encode(&mut out, max).expect("encoding") {
            break;
        }
        calls += 1;
        assert!(calls <= 1_000_000, "encode makes no progress");
    }
    let before = out.len();
    assert!(outgoing.encode(&mut out, 1).expect("encoding"), "finished");
    assert_eq!(out.len(), before, "bytes after the end");
    out
}

/// The encoding with its `.CRLF` decodes to content that stuffs back to the encoding.
fn check_decodes_back(encoded: &[u8]) -> Vec<u8> {
    let mut wire = encoded.to_vec();
    wire.extend_from_slice(b".\r\n");
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(&wire);
    assert_eq!(
        find(&framed, b"\r\n.\r\n"),
        Some(framed.len() - 5),
        "the terminator is not only at the end of {}",
        escape(encoded)
    );
    let mut content = Vec::new();
    let mut decoder = DataDecoder::unstuffed(BareNewline::Reject, u64::MAX);
    let step = decoder.decode(&wire, &mut content);
    assert!(step.done && step.consumed == wire.len(), "not one message");
    assert_eq!(
        decoder.violation(),
        None,
        "bare CR or LF in {}",
        escape(encoded)
    );
    let mut stuffed = Vec::new();
    let mut restuff = DataDecoder::new(BareNewline::Reject, u64::MAX);
    restuff.decode(&wire, &mut stuffed);
    assert_eq!(
        escape(&stuffed),
        escape(encoded),
        "not the canonical encoding"
    );
    content
}

/// What the last edit promises, seen in the content's header block.
fn check_last_edit(content: &[u8], edits: &[Edit]) {
    let block = message::parse(content, true);
    let count = |name: &str| {
        block
            .fields
            .iter()
            .filter(|field| field.name.eq_ignore_ascii_case(name))
            .count()
    };
    match edits.last() {
        Some(Edit::SetSubject(_)) => {
            assert_eq!(count("Subject"), 1, "Subject fields in {}", escape(content));
        }
        Some(Edit::RemoveHeader { name, which: 0 }) if !name.is_empty() => {
            assert_eq!(count(name), 0, "{name} fields in {}", escape(content));
        }
        _ => {}
    }
}
