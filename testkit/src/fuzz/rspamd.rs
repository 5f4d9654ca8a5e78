//! The `rspamd_reply` target: rspamd `/checkv2` answers for `parse_reply`, then the verdict and
//! the changes of every answer that parses.

use tarmac::content::rspamd::{Action, Reply, parse_reply};
use tarmac::content::{Edit, Verdict};

use super::{escape, vocabulary};

/// JSON pieces of a `/checkv2` answer, so the fuzzer reaches the milter block's shapes without
/// first having to invent JSON syntax.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\"action\":",
    "\"score\":",
    "\"required_score\":",
    "\"subject\":",
    "\"messages\":",
    "\"smtp_message\":",
    "\"milter\":",
    "\"add_headers\":",
    "\"remove_headers\":",
    "\"value\":",
    "\"order\":",
    "\"index\":",
    "\"no action\"",
    "\"add header\"",
    "\"rewrite subject\"",
    "\"soft reject\"",
    "\"greylist\"",
    "\"reject\"",
    "\"discard\"",
    "\"X-Spam\"",
    "\"x-spam\"",
    "\"Subject\"",
    "\"Bad Name\"",
    "\"X:Y\"",
    "\"Yes\"",
    "\"\\r\\n\\tfolded\"",
    "\"\\u0000\"",
    "\"é\"",
    "0",
    "1",
    "-1",
    "-3",
    "15",
    "5.5",
    "1e308",
    "4294967296",
    "-2147483649",
    "null",
    "true",
    " ",
];

/// Parses the input as a `/checkv2` answer, raw and spelled out of JSON tokens (keys, actions,
/// milter shapes, awkward numbers).
///
/// Properties, for an answer that parses: the action's name reads back as the same action;
/// the verdict is the action's (`reject` → `Reject`, `soft reject`/`greylist` → `TempFail`,
/// `discard` → `Discard`, others `Continue`), and a reply it carries is `550 5.7.1` or
/// `451 4.7.1` with one line of at most 400 bytes without control characters; only a
/// `Continue` comes with changes; every header name in a change is an RFC 5322 field name;
/// `add header` ends with `X-Spam: Yes` unless rspamd's own headers set `X-Spam`; `rewrite
/// subject` ends with the answer's subject when it has one. And parsing is deterministic.
pub fn rspamd_reply(data: &[u8]) {
    check(data);
    check(vocabulary(data, TOKENS).as_bytes());
}

fn check(body: &[u8]) {
    let Ok(reply) = parse_reply(body) else {
        return;
    };
    assert_eq!(
        parse_reply(body).as_ref(),
        Ok(&reply),
        "parsed twice differently: {}",
        escape(body)
    );
    assert_eq!(Action::parse(reply.action.as_str()), reply.action);
    let verdict = reply.verdict();
    check_verdict(&reply, &verdict);
    let edits = reply.edits();
    if verdict != Verdict::Continue {
        assert!(edits.is_empty(), "{verdict:?} with changes {edits:?}");
        return;
    }
    for edit in &edits {
        let name = match edit {
            Edit::AddHeader { name, .. }
            | Edit::InsertHeader { name, .. }
            | Edit::ChangeHeader { name, .. }
            | Edit::RemoveHeader { name, .. } => name,
            Edit::SetSubject(_) | Edit::ReplaceBody(_) => continue,
        };
        assert!(
            !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':'),
            "header name {name:?} in {}",
            escape(body)
        );
    }
    match reply.action {
        Action::AddHeader => {
            let own = reply
                .add_headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("X-Spam"));
            let marked = matches!(edits.last(),
                Some(Edit::AddHeader { name, value }) if name == "X-Spam" && value == "Yes");
            assert!(own || marked, "add header without X-Spam: {edits:?}");
        }
        Action::RewriteSubject => {
            if let Some(subject) = &reply.subject {
                assert_eq!(edits.last(), Some(&Edit::SetSubject(subject.clone())));
            }
        }
        _ => {}
    }
}

fn check_verdict(reply: &Reply, verdict: &Verdict) {
    let (smtp, code, enhanced) = match (&reply.action, verdict) {
        (Action::Reject, Verdict::Reject(smtp)) => match smtp {
            Some(smtp) => (smtp, 550, "5.7.1"),
            None => return,
        },
        (Action::SoftReject | Action::Greylist, Verdict::TempFail(smtp)) => match smtp {
            Some(smtp) => (smtp, 451, "4.7.1"),
            None => return,
        },
        (Action::Other(name), Verdict::Discard) if name == "discard" => return,
        (
            Action::NoAction | Action::AddHeader | Action::RewriteSubject | Action::Other(_),
            Verdict::Continue,
        ) => return,
        (action, verdict) => panic!("{action:?} gave {verdict:?}"),
    };
    assert_eq!(smtp.code, code, "{smtp:?}");
    assert_eq!(
        smtp.enhanced.map(|e| e.to_string()).as_deref(),
        Some(enhanced)
    );
    assert_eq!(smtp.lines.len(), 1, "{smtp:?}");
    let text = smtp.lines.first().map_or("", String::as_str);
    assert!(text.len() <= 400, "{} bytes of text", text.len());
    assert!(!text.chars().any(char::is_control), "{text:?}");
    assert_eq!(reply.smtp_message.as_deref(), Some(text));
}
