//! rspamd's `/checkv2` answer: the JSON parser ([`parse_reply`]), and what the answer means for
//! the message ([`Reply::verdict`], [`Reply::edits`]), with the semantics of rspamd's own milter
//! code (`src/libserver/milter.c`, `rspamd_milter_send_task_results`), which its proxy worker
//! runs for Postfix and Sendmail.
//!
//! Strict on what decides the message: `action` must be a string and `score` a number, or the
//! whole answer is [`Failure::Garbage`](crate::content::Failure) for the caller. Liberal, as
//! rspamd's milter code is, on the `milter` block: every shape rspamd has written over its
//! versions is read (`add_headers` values as a string, an object `{value, order}` or an array of
//! either; `remove_headers` counts as a number or an array of numbers), and an entry of another
//! shape is skipped, not an error.

use serde_json::{Map, Value};

use crate::content::message::is_field_name;
use crate::content::{Edit, Verdict};
use crate::smtp::reply::Reply as SmtpReply;

/// The header rspamd's milter sets for `add header` (its `spam_header` default).
const SPAM_HEADER: &str = "X-Spam";

/// Longest `smtp_message` kept, in bytes: a reply line must stay under RFC 5321's 512 bytes
/// with the code and the enhanced code in front.
const MAX_SMTP_MESSAGE: usize = 400;

/// rspamd's answer, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// What rspamd wants done with the message.
    pub action: Action,
    /// The message's score.
    pub score: f64,
    /// The score at which rspamd rejects (`required_score`), when it says.
    pub required_score: Option<f64>,
    /// `messages.smtp_message`: the text for the SMTP reply, when rspamd gave one.
    pub smtp_message: Option<String>,
    /// The new subject for `rewrite subject`.
    pub subject: Option<String>,
    /// `milter.add_headers`, in the order rspamd wrote them.
    pub add_headers: Vec<AddHeader>,
    /// `milter.remove_headers`: name and which occurrence (0 every one, `n > 0` the n-th,
    /// `n < 0` the n-th from the end), in the order rspamd wrote them.
    pub remove_headers: Vec<(String, i32)>,
}

/// One header of `milter.add_headers`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddHeader {
    /// Field name.
    pub name: String,
    /// Field value, as rspamd sent it.
    pub value: String,
    /// `order` (or `index`): where among the headers to insert it; `None` appends.
    pub order: Option<i64>,
}

/// rspamd's `action`, as its configuration names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `no action`: relay.
    NoAction,
    /// `add header`: relay, marked as spam.
    AddHeader,
    /// `rewrite subject`: relay with the reply's `subject`.
    RewriteSubject,
    /// `soft reject`: try later (rate limits, greylisting in rspamd's own module).
    SoftReject,
    /// `greylist`: try later.
    Greylist,
    /// `reject`: refuse.
    Reject,
    /// Any other action (`discard`, `quarantine`, a custom one), as rspamd wrote it.
    Other(String),
}

impl Action {
    /// Reads rspamd's name of an action; an unknown name is kept as [`Action::Other`].
    pub fn parse(name: &str) -> Action {
        match name {
            "no action" => Action::NoAction,
            "add header" => Action::AddHeader,
            "rewrite subject" => Action::RewriteSubject,
            "soft reject" => Action::SoftReject,
            "greylist" => Action::Greylist,
            "reject" => Action::Reject,
            other => Action::Other(other.to_owned()),
        }
    }

    /// The action as rspamd writes it (`no action`, `add header`, ...), for the close line.
    pub fn as_str(&self) -> &str {
        match self {
            Action::NoAction => "no action",
            Action::AddHeader => "add header",
            Action::RewriteSubject => "rewrite subject",
            Action::SoftReject => "soft reject",
            Action::Greylist => "greylist",
            Action::Reject => "reject",
            Action::Other(name) => name,
        }
    }

    /// Whether the message is relayed (so rspamd's header changes apply).
    fn relays(&self) -> bool {
        match self {
            Action::NoAction | Action::AddHeader | Action::RewriteSubject => true,
            Action::SoftReject | Action::Greylist | Action::Reject => false,
            Action::Other(name) => name != "discard",
        }
    }
}

/// Parses a `/checkv2` JSON body. The error says what was wrong: not JSON, not an object, no
/// string `action`, no number `score`, a `required_score` that is not a number.
pub fn parse_reply(body: &[u8]) -> Result<Reply, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(top) = value else {
        return Err("not a JSON object".to_owned());
    };
    let action = match top.get("action") {
        Some(Value::String(name)) => Action::parse(name),
        Some(_) => return Err("\"action\" is not a string".to_owned()),
        None => return Err("no \"action\"".to_owned()),
    };
    let score = match top.get("score") {
        Some(Value::Number(n)) => n.as_f64().ok_or("\"score\" is out of range")?,
        Some(_) => return Err("\"score\" is not a number".to_owned()),
        None => return Err("no \"score\"".to_owned()),
    };
    let required_score = match top.get("required_score") {
        Some(Value::Number(n)) => n.as_f64(),
        None | Some(Value::Null) => None,
        Some(_) => return Err("\"required_score\" is not a number".to_owned()),
    };
    let smtp_message = top
        .get("messages")
        .and_then(|m| m.get("smtp_message"))
        .and_then(Value::as_str)
        .map(clean_smtp_message);
    let subject = top
        .get("subject")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let milter = top.get("milter").and_then(Value::as_object);
    let add_headers = milter
        .and_then(|m| m.get("add_headers"))
        .and_then(Value::as_object)
        .map(read_add_headers)
        .unwrap_or_default();
    let remove_headers = milter
        .and_then(|m| m.get("remove_headers"))
        .and_then(Value::as_object)
        .map(read_remove_headers)
        .unwrap_or_default();
    Ok(Reply {
        action,
        score,
        required_score,
        smtp_message,
        subject,
        add_headers,
        remove_headers,
    })
}

impl Reply {
    /// The verdict per DESIGN.md §7: `no action`, `add header`, `rewrite subject` →
    /// [`Verdict::Continue`]; `soft reject`, `greylist` → [`Verdict::TempFail`] (`451 4.7.1`
    /// with `smtp_message` as the text when there is one); `reject` → [`Verdict::Reject`]
    /// (`550 5.7.1`, likewise).
    ///
    /// Other actions follow rspamd's milter code, which is what rspamd itself does for an MTA:
    /// `discard` → [`Verdict::Discard`]; anything else (`quarantine`, which tarmac has no queue
    /// to hold in, or a custom action) falls into its `default:` branch, accept →
    /// [`Verdict::Continue`]. (The milter's tempfail for an action "not registered" cannot
    /// happen here: rspamd only answers with actions of its own configuration.)
    pub fn verdict(&self) -> Verdict {
        match &self.action {
            Action::NoAction | Action::AddHeader | Action::RewriteSubject => Verdict::Continue,
            Action::SoftReject | Action::Greylist => Verdict::TempFail(
                self.smtp_message
                    .as_ref()
                    .map(|text| SmtpReply::new(451, "4.7.1", text.clone())),
            ),
            Action::Reject => Verdict::Reject(
                self.smtp_message
                    .as_ref()
                    .map(|text| SmtpReply::new(550, "5.7.1", text.clone())),
            ),
            Action::Other(name) if name == "discard" => Verdict::Discard,
            Action::Other(_) => Verdict::Continue,
        }
    }

    /// The changes to the message, in the order rspamd's milter code makes them:
    /// `milter.remove_headers`, then `milter.add_headers` (with `order`: an insert at that
    /// index; `-1` or none: appended; another negative order counts from the end in rspamd,
    /// which needs the header count, so it is appended too), then the action's own change:
    /// `add header` removes every `X-Spam` and adds `X-Spam: Yes`, unless `add_headers`
    /// already sets `X-Spam`; `rewrite subject` replaces the subject with `subject` (nothing
    /// when rspamd sent none). An action that does not relay has no changes. Header names
    /// that are not RFC 5322 field names are left out, so a change can never break the
    /// header block.
    pub fn edits(&self) -> Vec<Edit> {
        if !self.action.relays() {
            return Vec::new();
        }
        let mut edits = Vec::new();
        for (name, which) in &self.remove_headers {
            if is_field_name(name.as_bytes()) {
                edits.push(Edit::RemoveHeader {
                    name: name.clone(),
                    which: *which,
                });
            }
        }
        for add in &self.add_headers {
            if !is_field_name(add.name.as_bytes()) {
                continue;
            }
            let (name, value) = (add.name.clone(), add.value.clone());
            edits.push(match add.order.and_then(|o| u32::try_from(o).ok()) {
                Some(index) => Edit::InsertHeader { index, name, value },
                None => Edit::AddHeader { name, value },
            });
        }
        match self.action {
            Action::AddHeader => {
                let set = self
                    .add_headers
                    .iter()
                    .any(|a| a.name.eq_ignore_ascii_case(SPAM_HEADER));
                if !set {
                    edits.push(Edit::RemoveHeader {
                        name: SPAM_HEADER.to_owned(),
                        which: 0,
                    });
                    edits.push(Edit::AddHeader {
                        name: SPAM_HEADER.to_owned(),
                        value: "Yes".to_owned(),
                    });
                }
            }
            Action::RewriteSubject => {
                if let Some(subject) = &self.subject {
                    edits.push(Edit::SetSubject(subject.clone()));
                }
            }
            _ => {}
        }
        edits
    }
}

/// `milter.add_headers`: `{"Name": "value"}`, `{"Name": {"value": "v", "order": 0}}` (`index`
/// is an older spelling of `order`), or `{"Name": [either, ...]}`. rspamd's milter code skips
/// plain strings inside an array; taking them costs nothing and loses no header.
fn read_add_headers(map: &Map<String, Value>) -> Vec<AddHeader> {
    let mut out = Vec::new();
    for (name, value) in map {
        match value {
            Value::Array(items) => {
                out.extend(items.iter().filter_map(|item| one_add_header(name, item)));
            }
            other => out.extend(one_add_header(name, other)),
        }
    }
    out
}

fn one_add_header(name: &str, value: &Value) -> Option<AddHeader> {
    let (value, order) = match value {
        Value::String(text) => (text.clone(), None),
        Value::Object(fields) => {
            let text = fields.get("value")?.as_str()?.to_owned();
            let order = fields
                .get("order")
                .or_else(|| fields.get("index"))
                .and_then(order_number);
            (text, order)
        }
        _ => return None,
    };
    Some(AddHeader {
        name: name.to_owned(),
        value,
        order,
    })
}

/// An `order`: an integer, or a float truncated as `ucl_object_toint` does.
fn order_number(value: &Value) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
}

/// `milter.remove_headers`: `{"Name": n}` or `{"Name": [n, ...]}`; a number that is not an
/// integer in `i32` is skipped, as rspamd's milter code skips what is not an integer.
fn read_remove_headers(map: &Map<String, Value>) -> Vec<(String, i32)> {
    let which = |v: &Value| v.as_i64().and_then(|n| i32::try_from(n).ok());
    let mut out = Vec::new();
    for (name, value) in map {
        match value {
            Value::Array(items) => {
                out.extend(items.iter().filter_map(which).map(|n| (name.clone(), n)));
            }
            other => out.extend(which(other).map(|n| (name.clone(), n))),
        }
    }
    out
}

/// `smtp_message` as one reply line: control characters (CR and LF among them) become
/// spaces, and it is cut to [`MAX_SMTP_MESSAGE`] bytes at a character boundary.
fn clean_smtp_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_SMTP_MESSAGE));
    for c in text.chars() {
        if out.len() + c.len_utf8() > MAX_SMTP_MESSAGE {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_read_and_write_as_rspamd_names_them() {
        for name in [
            "no action",
            "add header",
            "rewrite subject",
            "soft reject",
            "greylist",
            "reject",
            "discard",
            "custom",
        ] {
            assert_eq!(Action::parse(name).as_str(), name);
        }
        assert_eq!(Action::parse("reject"), Action::Reject);
        assert_eq!(
            Action::parse("quarantine"),
            Action::Other("quarantine".to_owned())
        );
    }

    #[test]
    fn strict_on_action_and_score() {
        for (body, why) in [
            (&b"not json"[..], "not JSON"),
            (b"[1]", "not a JSON object"),
            (br#"{"score": 1}"#, "no \"action\""),
            (
                br#"{"action": 1, "score": 1}"#,
                "\"action\" is not a string",
            ),
            (br#"{"action": "reject"}"#, "no \"score\""),
            (
                br#"{"action": "reject", "score": "15"}"#,
                "\"score\" is not a number",
            ),
            (
                br#"{"action": "reject", "score": 1, "required_score": "x"}"#,
                "\"required_score\" is not a number",
            ),
        ] {
            let err = parse_reply(body).unwrap_err();
            assert!(err.starts_with(why), "{err} for {body:?}");
        }
    }

    #[test]
    fn liberal_on_the_milter_block() {
        let reply = parse_reply(
            br#"{"action": "add header", "score": 7,
                 "milter": {"add_headers": {
                     "X-A": "plain",
                     "X-B": {"value": "ordered", "order": 0},
                     "X-C": [{"value": "one", "index": 2.0}, "two", 5, {"order": 1}],
                     "X-D": 17,
                     "X-E": {"value": "last", "order": -1}
                 },
                 "remove_headers": {"X-Spam": 0, "X-F": [1, -1, "x", 1.5], "X-G": "no"}}}"#,
        )
        .unwrap();
        let add = |name: &str, value: &str, order| AddHeader {
            name: name.into(),
            value: value.into(),
            order,
        };
        assert_eq!(
            reply.add_headers,
            vec![
                add("X-A", "plain", None),
                add("X-B", "ordered", Some(0)),
                add("X-C", "one", Some(2)),
                add("X-C", "two", None),
                add("X-E", "last", Some(-1)),
            ]
        );
        assert_eq!(
            reply.remove_headers,
            vec![
                ("X-Spam".to_owned(), 0),
                ("X-F".to_owned(), 1),
                ("X-F".to_owned(), -1)
            ]
        );
        // The milter block of another type is no milter block.
        let reply = parse_reply(br#"{"action":"no action","score":0,"milter":[]}"#).unwrap();
        assert!(reply.add_headers.is_empty() && reply.remove_headers.is_empty());
    }

    /// A real rspamd 3.4 answer for GTUBE (tests/rspamd.rs).
    const GTUBE: &[u8] = include_bytes!("fixtures/gtube.json");
    /// A real rspamd 3.4 answer for a clean message.
    const CLEAN: &[u8] = include_bytes!("fixtures/clean.json");
    /// A real rspamd 3.4 answer with `add header` (the testkit's marker rule).
    const ADD_HEADER: &[u8] = include_bytes!("fixtures/add_header.json");
    /// A real rspamd 3.4 answer with `rewrite subject` (the testkit's marker rule).
    const REWRITE_SUBJECT: &[u8] = include_bytes!("fixtures/rewrite_subject.json");

    #[test]
    fn real_gtube_reply_is_a_reject_with_rspamds_text() {
        let reply = parse_reply(GTUBE).unwrap();
        assert_eq!(reply.action, Action::Reject);
        assert!(reply.score >= 15.0, "{reply:?}");
        assert_eq!(reply.smtp_message.as_deref(), Some("Gtube pattern"));
        assert_eq!(
            reply.verdict(),
            Verdict::Reject(Some(SmtpReply::new(550, "5.7.1", "Gtube pattern")))
        );
        assert_eq!(reply.edits(), vec![]);
    }

    #[test]
    fn real_clean_reply_relays_and_strips_x_spam() {
        let reply = parse_reply(CLEAN).unwrap();
        assert_eq!(reply.action, Action::NoAction);
        assert!(reply.required_score.is_some());
        assert_eq!(reply.smtp_message, None);
        assert_eq!(reply.verdict(), Verdict::Continue);
        assert_eq!(
            reply.edits(),
            vec![Edit::RemoveHeader {
                name: "X-Spam".into(),
                which: 0
            }]
        );
    }

    #[test]
    fn real_add_header_reply_marks_the_message() {
        let reply = parse_reply(ADD_HEADER).unwrap();
        assert_eq!(reply.action, Action::AddHeader);
        assert_eq!(reply.verdict(), Verdict::Continue);
        let edits = reply.edits();
        assert_eq!(
            edits.last(),
            Some(&Edit::AddHeader {
                name: "X-Spam".into(),
                value: "Yes".into()
            }),
            "{edits:?}"
        );
    }

    #[test]
    fn real_rewrite_subject_reply_sets_the_subject() {
        let reply = parse_reply(REWRITE_SUBJECT).unwrap();
        assert_eq!(reply.action, Action::RewriteSubject);
        assert_eq!(reply.verdict(), Verdict::Continue);
        let subject = reply.subject.clone().unwrap();
        assert!(subject.starts_with("*** SPAM ***"), "{subject}");
        assert_eq!(reply.edits().last(), Some(&Edit::SetSubject(subject)));
    }

    fn reply(action: &str, extra: &str) -> Reply {
        let json = format!(r#"{{"action": "{action}", "score": 5.5{extra}}}"#);
        parse_reply(json.as_bytes()).unwrap()
    }

    #[test]
    fn verdicts_per_action() {
        let text = r#", "messages": {"smtp_message": "Try\r\nlater"}"#;
        assert_eq!(reply("no action", text).verdict(), Verdict::Continue);
        assert_eq!(reply("add header", "").verdict(), Verdict::Continue);
        assert_eq!(reply("rewrite subject", "").verdict(), Verdict::Continue);
        assert_eq!(reply("greylist", "").verdict(), Verdict::TempFail(None));
        assert_eq!(
            reply("soft reject", text).verdict(),
            Verdict::TempFail(Some(SmtpReply::new(451, "4.7.1", "Try  later")))
        );
        assert_eq!(reply("reject", "").verdict(), Verdict::Reject(None));
        assert_eq!(reply("discard", "").verdict(), Verdict::Discard);
        assert_eq!(reply("quarantine", "").verdict(), Verdict::Continue);
        assert_eq!(reply("my action", "").verdict(), Verdict::Continue);
    }

    #[test]
    fn a_long_smtp_message_is_cut_at_a_character() {
        let long = "é".repeat(300);
        let r = reply(
            "reject",
            &format!(r#", "messages": {{"smtp_message": "{long}"}}"#),
        );
        let text = r.smtp_message.unwrap();
        assert_eq!(text.len(), MAX_SMTP_MESSAGE);
        assert!(text.chars().all(|c| c == 'é'));
    }

    #[test]
    fn edits_follow_rspamds_milter_order() {
        let milter = r#", "subject": "[SPAM] hi", "milter": {
            "remove_headers": {"X-Old": -1},
            "add_headers": {"X-Top": {"value": "1", "order": 0}, "X-End": "2",
                            "Bad Name": "3", "X-Neg": {"value": "4", "order": -3}}}"#;
        let common = vec![
            Edit::RemoveHeader {
                name: "X-Old".into(),
                which: -1,
            },
            Edit::InsertHeader {
                index: 0,
                name: "X-Top".into(),
                value: "1".into(),
            },
            Edit::AddHeader {
                name: "X-End".into(),
                value: "2".into(),
            },
            Edit::AddHeader {
                name: "X-Neg".into(),
                value: "4".into(),
            },
        ];
        assert_eq!(reply("no action", milter).edits(), common);
        let mut subject = common.clone();
        subject.push(Edit::SetSubject("[SPAM] hi".into()));
        assert_eq!(reply("rewrite subject", milter).edits(), subject);
        let mut spam = common.clone();
        spam.push(Edit::RemoveHeader {
            name: "X-Spam".into(),
            which: 0,
        });
        spam.push(Edit::AddHeader {
            name: "X-Spam".into(),
            value: "Yes".into(),
        });
        assert_eq!(reply("add header", milter).edits(), spam);
        for refused in ["reject", "soft reject", "greylist", "discard"] {
            assert_eq!(reply(refused, milter).edits(), vec![], "{refused}");
        }
    }

    #[test]
    fn rspamds_own_x_spam_replaces_the_default_one() {
        let own = r#", "milter": {"add_headers": {"x-spam": {"value": "Yes, 7.5", "order": 1}}}"#;
        assert_eq!(
            reply("add header", own).edits(),
            vec![Edit::InsertHeader {
                index: 1,
                name: "x-spam".into(),
                value: "Yes, 7.5".into()
            }]
        );
    }

    #[test]
    fn rewrite_subject_without_a_subject_changes_nothing() {
        assert_eq!(reply("rewrite subject", "").edits(), vec![]);
    }
}
