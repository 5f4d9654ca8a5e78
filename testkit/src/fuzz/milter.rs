//! The `milter` target: milter responses for the client's decoder and conversation.
//!
//! Input layout: byte 0 seeds the chunking and picks the first stage, bytes 1–4 the protocol
//! flags the milter negotiates (masked to what tarmac offers), byte 5 its actions; the rest is
//! the milter's byte stream.

use tarmac::content::milter::codec::{Command, FrameDecoder};
use tarmac::content::milter::codec::{MAX_FRAME, Response, ResponseDecoder};
use tarmac::content::milter::conversation::{
    Conversation, OFFERED_ACTIONS, OFFERED_PROTOCOL, Stage, Start, Step,
};
use tarmac::content::{Edit, Verdict};

use super::XorShift;

/// Replacement bodies are capped low here so the cap is reached.
const MAX_BODY: usize = 1000;

/// Properties: the decoder gives the same responses (and the same first error) whether fed
/// whole or in random chunks, never holds more than a frame and a chunk, and every response
/// re-encodes to bytes that parse back to it; the conversation, fed the responses stage after
/// stage, accepts modifications only at end of body, maps reply codes by their class, keeps
/// the replacement body under its cap, hands out edits only with a verdict that relays, and
/// writes only well-formed frames of the stage it was asked for.
pub fn milter(data: &[u8]) {
    let (head, stream) = data.split_at(data.len().min(6));
    let seed = head.first().copied().unwrap_or(0);
    let whole = decode(stream, &mut XorShift::new(0), false);
    let chunked = decode(stream, &mut XorShift::new(u64::from(seed) + 1), true);
    assert_eq!(whole, chunked, "chunking changed the responses");
    for response in whole.0.iter() {
        let mut wire = Vec::new();
        response.encode(&mut wire);
        let mut d = ResponseDecoder::new();
        d.push(&wire);
        assert_eq!(
            d.next_response().as_ref(),
            Ok(&Some(response.clone())),
            "{response:?} does not survive encode and parse"
        );
    }
    converse(head, whole.0);
}

type Decoded = (Vec<Response>, Option<String>);

fn decode(stream: &[u8], rng: &mut XorShift, chunked: bool) -> Decoded {
    let mut decoder = ResponseDecoder::new();
    let mut responses = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let n = if chunked {
            1 + (rng.next() % 64) as usize
        } else {
            rest.len()
        }
        .min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        decoder.push(chunk);
        assert!(
            decoder.buffered() <= MAX_FRAME + 4 + n,
            "decoder holds too much"
        );
        loop {
            match decoder.next_response() {
                Ok(Some(r)) => responses.push(r),
                Ok(None) => break,
                Err(e) => return (responses, Some(e.to_string())),
            }
        }
    }
    (responses, None)
}

const STAGES: [Stage; 9] = [
    Stage::Connect,
    Stage::Helo,
    Stage::Mail,
    Stage::Rcpt,
    Stage::Data,
    Stage::Header,
    Stage::Eoh,
    Stage::Body,
    Stage::Eob,
];

fn command(stage: Stage) -> Command {
    match stage {
        Stage::Connect => Command::Connect {
            hostname: "[192.0.2.1]".into(),
            family: tarmac::content::milter::codec::Family::Inet4,
            port: 25,
            address: "192.0.2.1".into(),
        },
        Stage::Helo => Command::Helo("fuzz".into()),
        Stage::Mail => Command::Mail(vec!["<a@b>".into()]),
        Stage::Rcpt => Command::Rcpt(vec!["<c@d>".into()]),
        Stage::Data => Command::Data,
        Stage::Header => Command::Header {
            name: "Subject".into(),
            value: b"x".to_vec(),
        },
        Stage::Eoh => Command::Eoh,
        Stage::Body => Command::Body(b"body\r\n".to_vec()),
        Stage::Eob => Command::BodyEob,
    }
}

fn is_modification(r: &Response) -> bool {
    matches!(
        r,
        Response::AddHeader { .. }
            | Response::InsHeader { .. }
            | Response::ChgHeader { .. }
            | Response::ReplBody(_)
            | Response::AddRcpt(_)
            | Response::AddRcptPar { .. }
            | Response::DelRcpt(_)
            | Response::ChgFrom { .. }
    )
}

fn converse(head: &[u8], responses: Vec<Response>) {
    let b = |i: usize| head.get(i).copied().unwrap_or(0);
    let flags = u32::from_be_bytes([b(1), b(2), b(3), b(4)]) & OFFERED_PROTOCOL;
    let actions = u32::from(b(5)) & OFFERED_ACTIONS;
    let mut c = Conversation::new(MAX_BODY);
    c.handle_optneg(Response::OptNeg {
        version: 6,
        actions,
        protocol: flags,
    })
    .expect("an offer within tarmac's is accepted");
    let first = usize::from(b(0));
    let mut responses = responses.into_iter();
    let mut out = Vec::new();
    'stages: for step in 0..64 {
        let stage = STAGES[(first + step) % STAGES.len()];
        out.clear();
        let start = c.start(stage, &command(stage), &[("i", "1")], &mut out);
        check_frames(&out, stage);
        if let Start::Answered(_) = start {
            if stage == Stage::Eob {
                let _ = c.take_outcome(&Verdict::Continue);
            }
            continue;
        }
        loop {
            let Some(response) = responses.next() else {
                break 'stages;
            };
            let modification = is_modification(&response);
            let reply = match &response {
                Response::ReplyCode(r) => Some(r.clone()),
                _ => None,
            };
            match c.handle_response(response) {
                Err(_) => break 'stages,
                Ok(Step::Progress) => {}
                Ok(Step::Recorded) => {
                    assert!(
                        !modification || stage == Stage::Eob,
                        "a modification accepted at {stage:?}"
                    );
                }
                Ok(Step::Done(verdict)) => {
                    if let Some(r) = reply {
                        let expected = if r.class() == 4 {
                            Verdict::TempFail(Some(r))
                        } else {
                            Verdict::Reject(Some(r))
                        };
                        assert_eq!(verdict, expected);
                    }
                    if stage == Stage::Eob {
                        let (edits, _) = c.take_outcome(&verdict);
                        if !matches!(verdict, Verdict::Continue | Verdict::Accept) {
                            assert!(edits.is_empty(), "edits with {verdict:?}");
                        }
                        for edit in edits {
                            if let Edit::ReplaceBody(body) = edit {
                                assert!(body.len() <= MAX_BODY);
                            }
                        }
                    }
                    break;
                }
            }
        }
    }
}

/// What a stage wrote: at most a macro frame for it and its own command, in that order.
fn check_frames(out: &[u8], stage: Stage) {
    let mut frames = FrameDecoder::new(MAX_FRAME);
    frames.push(out);
    let mut codes = Vec::new();
    while let Some((code, data)) = frames.next_frame().expect("tarmac's own frames") {
        let command = Command::parse(code, &data).expect("tarmac's own commands parse");
        if let Command::Macro { stage: s, .. } = command {
            assert_eq!(s, stage.code(), "macros of another stage");
        }
        codes.push(code);
    }
    assert_eq!(frames.buffered(), 0, "a partial frame written");
    let ok = match codes.as_slice() {
        [] => true,
        [b'D'] => true,
        [b'A', rest @ ..] => {
            stage == Stage::Mail && rest.iter().all(|&c| c == b'D' || c == stage.code())
        }
        rest => rest.iter().all(|&c| c == b'D' || c == stage.code()),
    };
    assert!(ok, "{stage:?} wrote {codes:?}");
}
