//! One milter's side of one SMTP session, sans-IO: what was negotiated, which stage to send
//! and whether to wait for its answer, which answers are legal where, and what they mean in
//! tarmac's terms ([`Verdict`], [`Edit`]). The connection itself is `link.rs`'s.
//!
//! # Lifecycle
//! - **Negotiation:** [`Conversation::offer`] writes `SMFIC_OPTNEG`; the milter's reply goes
//!   to [`Conversation::handle_optneg`], which refuses a version outside 2..=6 and actions or
//!   protocol flags tarmac did not offer (as Postfix, such a milter is broken).
//! - **Stages:** [`Conversation::start`] writes a stage's macros and command and says whether
//!   the answer is already known ([`Start::Answered`]: a stage the milter skips with
//!   `SMFIP_NO*` or `SMFIR_SKIP`, one it does not answer with `SMFIP_NR_*`, one after an
//!   accept, discard or connection-level refusal) or must be read ([`Start::Await`]); then
//!   each response goes to [`Conversation::handle_response`] until it returns
//!   [`Step::Done`]. `SMFIR_PROGRESS` is [`Step::Progress`] (the caller restarts its timeout).
//! - **Connection:** accept at connect or HELO means nothing more is sent on this connection
//!   (later stages answer `Continue`, messages `Accept`); reject, tempfail, a reply code,
//!   `SMFIR_SHUTDOWN` or `SMFIR_CONN_FAIL` there refuse the connection (later stages answer the
//!   same verdict, as Postfix repeats it).
//! - **Transaction:** opened by MAIL; accept or discard at MAIL, RCPT or a message stage ends
//!   it for this milter (later stages are answered without sending); a reject or tempfail at
//!   a message stage ends the message. [`Conversation::end_message`] closes an open
//!   transaction with `SMFIC_ABORT` when end-of-body was not answered, so the next MAIL
//!   finds the milter ready (after end-of-body none is needed).
//! - **End of body:** only there may the milter send modifications: header changes become
//!   [`Edit`]s, `SMFIR_REPLBODY` chunks one [`Edit::ReplaceBody`] (capped), envelope changes
//!   and quarantine requests are refused and noted for the log. Edits are handed out only
//!   with a verdict that relays (continue or accept).
//!
//! Errors: any response illegal where it comes is a [`Failure::Garbage`]; after one, the
//! caller drops the connection.

use super::codec::{Command, Family, Response, VERSION, action, protocol};
use crate::content::{Edit, Failure, Verdict};
use crate::smtp::reply::Reply;

/// The actions tarmac offers: every header and body change, and the envelope changes and
/// quarantine so that a milter that asks for them still works (they are refused and logged).
pub const OFFERED_ACTIONS: u32 = action::ADDHDRS
    | action::CHGBODY
    | action::ADDRCPT
    | action::DELRCPT
    | action::CHGHDRS
    | action::QUARANTINE
    | action::CHGFROM
    | action::ADDRCPT_PAR;

/// The protocol flags tarmac honours: every stage may be left out or left unanswered, SKIP,
/// leading spaces kept, rejected recipients (tarmac sends only the recipients it accepts, so
/// it has none to show).
pub const OFFERED_PROTOCOL: u32 =
    NO_MASK | NR_MASK | protocol::SKIP | protocol::HDR_LEADSPC | protocol::RCPT_REJ;

const NO_MASK: u32 = protocol::NOCONNECT
    | protocol::NOHELO
    | protocol::NOMAIL
    | protocol::NORCPT
    | protocol::NOBODY
    | protocol::NOHDRS
    | protocol::NOEOH
    | protocol::NOUNKNOWN
    | protocol::NODATA;

const NR_MASK: u32 = protocol::NR_CONN
    | protocol::NR_HELO
    | protocol::NR_MAIL
    | protocol::NR_RCPT
    | protocol::NR_DATA
    | protocol::NR_UNKN
    | protocol::NR_HDR
    | protocol::NR_EOH
    | protocol::NR_BODY;

/// The oldest protocol version accepted from a milter.
pub const MIN_VERSION: u32 = 2;

/// The largest replacement body accepted (the chunks of `SMFIR_REPLBODY` joined), unless the
/// caller sets another: beyond it the milter's answer is garbage.
pub const MAX_REPLACED_BODY: usize = 64 * 1024 * 1024;

/// A stage of the protocol, in the order an SMTP session reaches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// `SMFIC_CONNECT`.
    Connect,
    /// `SMFIC_HELO`.
    Helo,
    /// `SMFIC_MAIL`.
    Mail,
    /// `SMFIC_RCPT`.
    Rcpt,
    /// `SMFIC_DATA`.
    Data,
    /// `SMFIC_HEADER` (one per field).
    Header,
    /// `SMFIC_EOH`.
    Eoh,
    /// `SMFIC_BODY` (one per chunk).
    Body,
    /// `SMFIC_BODYEOB`: the milter's final word on the message.
    Eob,
}

impl Stage {
    /// The stage's command byte, also the stage code of its `SMFIC_MACRO`.
    pub fn code(self) -> u8 {
        match self {
            Stage::Connect => b'C',
            Stage::Helo => b'H',
            Stage::Mail => b'M',
            Stage::Rcpt => b'R',
            Stage::Data => b'T',
            Stage::Header => b'L',
            Stage::Eoh => b'N',
            Stage::Body => b'B',
            Stage::Eob => b'E',
        }
    }

    /// The `SMFIP_NO*` flag that leaves it out (end-of-body has none).
    fn no_flag(self) -> u32 {
        match self {
            Stage::Connect => protocol::NOCONNECT,
            Stage::Helo => protocol::NOHELO,
            Stage::Mail => protocol::NOMAIL,
            Stage::Rcpt => protocol::NORCPT,
            Stage::Data => protocol::NODATA,
            Stage::Header => protocol::NOHDRS,
            Stage::Eoh => protocol::NOEOH,
            Stage::Body => protocol::NOBODY,
            Stage::Eob => 0,
        }
    }

    /// The `SMFIP_NR_*` flag that leaves it unanswered (end-of-body has none).
    fn nr_flag(self) -> u32 {
        match self {
            Stage::Connect => protocol::NR_CONN,
            Stage::Helo => protocol::NR_HELO,
            Stage::Mail => protocol::NR_MAIL,
            Stage::Rcpt => protocol::NR_RCPT,
            Stage::Data => protocol::NR_DATA,
            Stage::Header => protocol::NR_HDR,
            Stage::Eoh => protocol::NR_EOH,
            Stage::Body => protocol::NR_BODY,
            Stage::Eob => 0,
        }
    }

    fn is_connection_level(self) -> bool {
        matches!(self, Stage::Connect | Stage::Helo)
    }

    fn is_message_level(self) -> bool {
        matches!(
            self,
            Stage::Data | Stage::Header | Stage::Eoh | Stage::Body | Stage::Eob
        )
    }
}

/// What the milter chose at negotiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Its protocol version (2..=6).
    pub version: u32,
    /// `SMFIF_*` it may use.
    pub actions: u32,
    /// `SMFIP_*` it asked for.
    pub protocol: u32,
}

impl Negotiated {
    /// Stages that do not exist in the milter's protocol version, which must not be sent
    /// at all, macros included (Postfix's `np_mask`): DATA before version 4.
    fn absent(&self) -> u32 {
        if self.version < 4 {
            protocol::NODATA | protocol::NOUNKNOWN
        } else {
            0
        }
    }

    /// Whether the milter asked for `SMFIP_HDR_LEADSPC`: header values keep their leading
    /// space both ways.
    pub fn leading_space(&self) -> bool {
        self.protocol & protocol::HDR_LEADSPC != 0
    }
}

/// What [`Conversation::start`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// The answer is known without reading (the stage was not sent, or sent unanswered).
    Answered(Verdict),
    /// The command was written; feed responses to [`Conversation::handle_response`].
    Await,
}

/// What one response meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// `SMFIR_PROGRESS`: still working; restart the timeout and read on.
    Progress,
    /// A modification or a note was recorded; read on for the verdict.
    Recorded,
    /// The stage's answer.
    Done(Verdict),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Connection {
    /// Not negotiated yet.
    Negotiating,
    /// Stages are sent.
    Open,
    /// Accepted at connect or HELO: nothing more is sent.
    Accepted,
    /// Refused at connect or HELO: every later stage gets this verdict.
    Refused(Verdict),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Transaction {
    /// No MAIL sent since the last end of body or abort.
    Idle,
    /// MAIL sent; stages go to the milter.
    Open,
    /// Accepted, discarded or refused by this milter: the transaction's later stages are not
    /// sent and the message gets this verdict.
    Decided(Verdict),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyReplacement {
    None,
    Collecting,
    /// Another response came after the chunks: a new chunk now would be a second body.
    Closed,
}

/// One milter's conversation over one connection.
#[derive(Debug)]
pub struct Conversation {
    negotiated: Option<Negotiated>,
    connection: Connection,
    transaction: Transaction,
    /// The stage an `SMFIR_SKIP` applies to, until another kind of stage is sent.
    skip: Option<Stage>,
    /// The stage whose answer is being read.
    awaiting: Option<Stage>,
    edits: Vec<Edit>,
    notes: Vec<String>,
    body: Vec<u8>,
    body_state: BodyReplacement,
    max_body: usize,
}

/// Adds `note` to `notes`, up to a bound.
fn appended(notes: &mut Vec<String>, note: String) {
    // Bound the notes a hostile milter can make tarmac keep (each is one log line).
    const MAX_NOTES: usize = 100;
    if notes.len() < MAX_NOTES {
        notes.push(note);
    }
}

impl Conversation {
    /// A conversation before negotiation; replacement bodies over `max_body` bytes are
    /// garbage (see [`MAX_REPLACED_BODY`]).
    pub fn new(max_body: usize) -> Conversation {
        Conversation {
            negotiated: None,
            connection: Connection::Negotiating,
            transaction: Transaction::Idle,
            skip: None,
            awaiting: None,
            edits: Vec::new(),
            notes: Vec::new(),
            body: Vec::new(),
            body_state: BodyReplacement::None,
            max_body,
        }
    }

    /// Writes tarmac's `SMFIC_OPTNEG`: version 6, [`OFFERED_ACTIONS`], [`OFFERED_PROTOCOL`].
    pub fn offer(&self, out: &mut Vec<u8>) {
        Command::OptNeg {
            version: VERSION,
            actions: OFFERED_ACTIONS,
            protocol: OFFERED_PROTOCOL,
        }
        .encode(out);
    }

    /// Takes the milter's negotiation reply.
    pub fn handle_optneg(&mut self, response: Response) -> Result<Negotiated, Failure> {
        let Response::OptNeg {
            version,
            actions,
            protocol,
        } = response
        else {
            return Err(Failure::Garbage(format!(
                "negotiation answered with {}",
                name(&response)
            )));
        };
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(Failure::Garbage(format!(
                "protocol version {version} (tarmac speaks {MIN_VERSION} to {VERSION})"
            )));
        }
        if actions & !OFFERED_ACTIONS != 0 {
            return Err(Failure::Garbage(format!(
                "actions {actions:#x} beyond those offered ({OFFERED_ACTIONS:#x})"
            )));
        }
        if protocol & !OFFERED_PROTOCOL != 0 {
            return Err(Failure::Garbage(format!(
                "protocol flags {protocol:#x} beyond those offered ({OFFERED_PROTOCOL:#x})"
            )));
        }
        let negotiated = Negotiated {
            version,
            actions,
            protocol,
        };
        self.negotiated = Some(negotiated);
        self.connection = Connection::Open;
        Ok(negotiated)
    }

    /// What was negotiated (`None` before).
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.negotiated
    }

    /// Whether the milter skips `stage` now (`SMFIP_NO*`, `SMFIR_SKIP`, an earlier decision):
    /// the caller need not even prepare it (a body it would have to read).
    pub fn skips(&self, stage: Stage) -> bool {
        let Some(n) = self.negotiated else {
            return true;
        };
        if self.connection != Connection::Open {
            return true;
        }
        if stage.is_message_level() || stage == Stage::Rcpt {
            if let Transaction::Decided(_) = self.transaction {
                return true;
            }
        }
        let flag = stage.no_flag();
        self.skip == Some(stage) || (flag != 0 && (n.protocol | n.absent()) & flag != 0)
    }

    /// Writes `stage`'s macros (when any) and `command`, unless the milter skips the stage;
    /// says whether to read an answer. MAIL while a transaction is open first closes it with
    /// `SMFIC_ABORT`.
    pub fn start(
        &mut self,
        stage: Stage,
        command: &Command,
        macros: &[(&str, &str)],
        out: &mut Vec<u8>,
    ) -> Start {
        let Some(n) = self.negotiated else {
            return Start::Answered(Verdict::TempFail(None));
        };
        match &self.connection {
            Connection::Open => {}
            Connection::Negotiating => return Start::Answered(Verdict::TempFail(None)),
            Connection::Accepted => {
                let verdict = if stage == Stage::Eob {
                    Verdict::Accept
                } else {
                    Verdict::Continue
                };
                return Start::Answered(verdict);
            }
            Connection::Refused(verdict) => return Start::Answered(verdict.clone()),
        }
        if stage == Stage::Mail {
            self.end_message(out);
            self.transaction = Transaction::Open;
        }
        if stage.is_message_level() || stage == Stage::Rcpt {
            if let Transaction::Decided(verdict) = &self.transaction {
                let verdict = if stage == Stage::Eob {
                    verdict.clone()
                } else {
                    Verdict::Continue
                };
                return Start::Answered(verdict);
            }
        }
        // Not in the milter's protocol version: not even the macros (as Postfix).
        if n.absent() & stage.no_flag() != 0 {
            return Start::Answered(Verdict::Continue);
        }
        match self.skip {
            Some(skipped) if skipped == stage => return Start::Answered(Verdict::Continue),
            Some(_) => self.skip = None,
            None => {}
        }
        if !macros.is_empty() {
            Command::Macro {
                stage: stage.code(),
                pairs: macros
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            }
            .encode(out);
        }
        // Macros go even for a stage the milter does not want (Postfix does the same: later
        // stages may ask for them).
        if n.protocol & stage.no_flag() != 0 {
            return Start::Answered(Verdict::Continue);
        }
        command.encode(out);
        if stage.nr_flag() & n.protocol != 0 {
            return Start::Answered(Verdict::Continue);
        }
        self.awaiting = Some(stage);
        Start::Await
    }

    /// Takes one response to the stage being awaited.
    pub fn handle_response(&mut self, response: Response) -> Result<Step, Failure> {
        let Some(stage) = self.awaiting else {
            return Err(Failure::Garbage(format!(
                "{} when no answer was due",
                name(&response)
            )));
        };
        let Some(n) = self.negotiated else {
            return Err(Failure::Garbage("a response before negotiation".to_owned()));
        };
        // A response other than a body chunk ends the replacement body (as Postfix).
        if self.body_state == BodyReplacement::Collecting
            && !matches!(response, Response::ReplBody(_))
        {
            self.body_state = BodyReplacement::Closed;
        }
        let verdict = match response {
            Response::Progress => return Ok(Step::Progress),
            Response::Continue => Verdict::Continue,
            Response::Skip => {
                self.skip = Some(stage);
                Verdict::Continue
            }
            Response::Accept => Verdict::Accept,
            Response::Discard if stage.is_connection_level() => {
                // libmilter documents no effect at connection level; Postfix warns and goes on.
                appended(
                    &mut self.notes,
                    format!("asked to discard at {stage:?}: ignored (only messages are discarded)"),
                );
                Verdict::Continue
            }
            Response::Discard => Verdict::Discard,
            Response::Reject => Verdict::Reject(None),
            Response::TempFail => Verdict::TempFail(None),
            Response::ReplyCode(reply) => {
                if reply.class() == 4 {
                    Verdict::TempFail(Some(reply))
                } else {
                    Verdict::Reject(Some(reply))
                }
            }
            Response::Shutdown | Response::ConnFail => {
                let reply = Reply::new(421, "4.7.0", "Service unavailable - closing connection");
                self.connection = Connection::Refused(Verdict::TempFail(Some(reply.clone())));
                self.finish_stage(stage);
                return Ok(Step::Done(Verdict::TempFail(Some(reply))));
            }
            Response::Quarantine(reason) => {
                appended(
                    &mut self.notes,
                    format!("asked to quarantine the message ({reason}): ignored"),
                );
                return Ok(Step::Recorded);
            }
            Response::OptNeg { .. } | Response::SetSymList { .. } => {
                return Err(Failure::Garbage(format!(
                    "{} after negotiation",
                    name(&response)
                )));
            }
            modification => {
                if stage != Stage::Eob {
                    return Err(Failure::Garbage(format!(
                        "{} after {stage:?} (modifications come only at end of body)",
                        name(&modification)
                    )));
                }
                self.modify(n, modification)?;
                return Ok(Step::Recorded);
            }
        };
        self.finish_stage(stage);
        self.decide(stage, &verdict);
        Ok(Step::Done(verdict))
    }

    fn finish_stage(&mut self, stage: Stage) {
        self.awaiting = None;
        if stage == Stage::Eob {
            self.transaction = Transaction::Idle;
        }
    }

    /// What a stage's verdict means for the stages after it.
    fn decide(&mut self, stage: Stage, verdict: &Verdict) {
        match (stage, verdict) {
            (_, Verdict::Continue) => {}
            (Stage::Connect | Stage::Helo, Verdict::Accept) => {
                self.connection = Connection::Accepted;
            }
            (Stage::Connect | Stage::Helo, refusal) => {
                self.connection = Connection::Refused(refusal.clone());
            }
            // A refused recipient is that recipient only.
            (Stage::Rcpt, Verdict::Reject(_) | Verdict::TempFail(_)) => {}
            (Stage::Eob, _) => {}
            (_, decided) => {
                if self.transaction == Transaction::Open {
                    self.transaction = Transaction::Decided(decided.clone());
                }
            }
        }
    }

    fn modify(&mut self, n: Negotiated, response: Response) -> Result<(), Failure> {
        let need = |flag: u32, what: &str| {
            if n.actions & flag == 0 {
                Err(Failure::Garbage(format!(
                    "{what} without having negotiated it"
                )))
            } else {
                Ok(())
            }
        };
        let value = |v: String| header_value(v, n.leading_space());
        match response {
            Response::AddHeader { name, value: v } => {
                need(action::ADDHDRS, "a header added")?;
                check_name(&name)?;
                self.edits.push(Edit::AddHeader {
                    name,
                    value: value(v),
                });
            }
            Response::InsHeader {
                index,
                name,
                value: v,
            } => {
                need(action::ADDHDRS, "a header inserted")?;
                check_name(&name)?;
                self.edits.push(Edit::InsertHeader {
                    index,
                    name,
                    value: value(v),
                });
            }
            Response::ChgHeader {
                index,
                name,
                value: v,
            } => {
                need(action::CHGHDRS, "a header changed")?;
                check_name(&name)?;
                // sendmail 8 compatibility: index 0 is the first occurrence (as Postfix).
                self.edits.push(Edit::ChangeHeader {
                    index: index.max(1),
                    name,
                    value: value(v),
                });
            }
            Response::ReplBody(chunk) => {
                need(action::CHGBODY, "the body replaced")?;
                if self.body_state == BodyReplacement::Closed {
                    return Err(Failure::Garbage(
                        "body replacement chunks mixed with other requests".to_owned(),
                    ));
                }
                if self.body.len().saturating_add(chunk.len()) > self.max_body {
                    return Err(Failure::Garbage(format!(
                        "a replacement body over {} bytes",
                        self.max_body
                    )));
                }
                self.body_state = BodyReplacement::Collecting;
                self.body.extend_from_slice(&chunk);
            }
            Response::AddRcpt(rcpt) => {
                need(action::ADDRCPT, "a recipient added")?;
                self.refuse(format!("asked to add recipient {rcpt}"));
            }
            Response::AddRcptPar { rcpt, args } => {
                need(action::ADDRCPT_PAR, "a recipient added")?;
                let args = args.map(|a| format!(" {a}")).unwrap_or_default();
                self.refuse(format!("asked to add recipient {rcpt}{args}"));
            }
            Response::DelRcpt(rcpt) => {
                need(action::DELRCPT, "a recipient deleted")?;
                self.refuse(format!("asked to delete recipient {rcpt}"));
            }
            Response::ChgFrom { from, args } => {
                need(action::CHGFROM, "the sender changed")?;
                let args = args.map(|a| format!(" {a}")).unwrap_or_default();
                self.refuse(format!("asked to change the sender to {from}{args}"));
            }
            other => {
                return Err(Failure::Garbage(format!("{} at end of body", name(&other))));
            }
        }
        // Bound what a hostile milter can make tarmac hold: edits are small, but many.
        const MAX_EDITS: usize = 10_000;
        if self.edits.len() > MAX_EDITS {
            return Err(Failure::Garbage(format!("over {MAX_EDITS} header changes")));
        }
        Ok(())
    }

    fn refuse(&mut self, what: String) {
        appended(
            &mut self.notes,
            format!("{what}: refused, envelope changes are not applied"),
        );
    }

    /// The message's changes and notes, taken for the verdict at end of body: edits (with the
    /// replacement body last) only when `verdict` relays the message, notes always.
    pub fn take_outcome(&mut self, verdict: &Verdict) -> (Vec<Edit>, Vec<String>) {
        let mut edits = std::mem::take(&mut self.edits);
        let body = std::mem::take(&mut self.body);
        if self.body_state != BodyReplacement::None {
            edits.push(Edit::ReplaceBody(body));
        }
        self.body_state = BodyReplacement::None;
        if !matches!(verdict, Verdict::Continue | Verdict::Accept) {
            edits.clear();
        }
        (edits, std::mem::take(&mut self.notes))
    }

    /// Notes taken outside a message (a discard at connect, say), for the log.
    pub fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }

    /// Closes an open transaction (MAIL sent, end of body not answered) with `SMFIC_ABORT`;
    /// does nothing otherwise. Forgets edits of a message that did not end.
    pub fn end_message(&mut self, out: &mut Vec<u8>) {
        if self.transaction != Transaction::Idle {
            if self.connection == Connection::Open {
                Command::Abort.encode(out);
            }
            self.transaction = Transaction::Idle;
        }
        self.awaiting = None;
        self.edits.clear();
        self.body.clear();
        self.body_state = BodyReplacement::None;
    }

    /// Whether a transaction is open (MAIL sent, not yet ended).
    pub fn in_transaction(&self) -> bool {
        self.transaction != Transaction::Idle
    }
}

/// The client's hostname for `SMFIC_CONNECT`, as Postfix gives it: `[address]` when there is
/// no verified name.
pub fn connect_command(hostname: &str, addr: std::net::SocketAddr) -> Command {
    let ip = addr.ip().to_string();
    let hostname = if hostname.is_empty() || hostname == "unknown" {
        format!("[{ip}]")
    } else {
        hostname.to_owned()
    };
    Command::Connect {
        hostname,
        family: if addr.is_ipv4() {
            Family::Inet4
        } else {
            Family::Inet6
        },
        port: addr.port(),
        address: ip,
    }
}

/// An address in angle brackets, as Postfix sends MAIL and RCPT (`<>` for the null sender).
pub fn bracketed(address: &str) -> String {
    if address.starts_with('<') && address.ends_with('>') && address.len() >= 2 {
        address.to_owned()
    } else {
        format!("<{address}>")
    }
}

/// A header value as tarmac sends it: without the one leading space unless the milter keeps
/// it (`leading_space`), folded lines joined by LF as sendmail and Postfix send them.
pub fn header_value_out(raw: &[u8], trimmed: &[u8], leading_space: bool) -> Vec<u8> {
    let value = if leading_space { raw } else { trimmed };
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        if b == b'\r' && value.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(b);
        i += 1;
    }
    out
}

/// A milter's header value as an [`Edit`] value (written after `Name: `): without the leading
/// space the milter included when it kept spaces, folded lines with CRLF (milters fold with a
/// bare LF, as sendmail's queue files do), NULs impossible (they end the string on the wire).
fn header_value(value: String, leading_space: bool) -> String {
    let value = if leading_space {
        value.strip_prefix(' ').map(str::to_owned).unwrap_or(value)
    } else {
        value
    };
    let mut out = String::with_capacity(value.len() + 8);
    let mut prev = '\0';
    for c in value.chars() {
        if c == '\n' && prev != '\r' {
            out.push('\r');
        }
        if prev == '\r' && c != '\n' {
            out.push('\n');
        }
        out.push(c);
        prev = c;
    }
    if prev == '\r' {
        out.push('\n');
    }
    out
}

/// A header name from a milter: printable, no colon, not empty.
fn check_name(name: &str) -> Result<(), Failure> {
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if ok {
        Ok(())
    } else {
        Err(Failure::Garbage(format!("header name {name:?}")))
    }
}

/// A response's protocol name, for messages.
pub fn name(response: &Response) -> &'static str {
    match response {
        Response::OptNeg { .. } => "SMFIC_OPTNEG",
        Response::Accept => "SMFIR_ACCEPT",
        Response::Continue => "SMFIR_CONTINUE",
        Response::Discard => "SMFIR_DISCARD",
        Response::Reject => "SMFIR_REJECT",
        Response::TempFail => "SMFIR_TEMPFAIL",
        Response::ReplyCode(_) => "SMFIR_REPLYCODE",
        Response::Skip => "SMFIR_SKIP",
        Response::Progress => "SMFIR_PROGRESS",
        Response::AddHeader { .. } => "SMFIR_ADDHEADER",
        Response::InsHeader { .. } => "SMFIR_INSHEADER",
        Response::ChgHeader { .. } => "SMFIR_CHGHEADER",
        Response::ReplBody(_) => "SMFIR_REPLBODY",
        Response::AddRcpt(_) => "SMFIR_ADDRCPT",
        Response::AddRcptPar { .. } => "SMFIR_ADDRCPT_PAR",
        Response::DelRcpt(_) => "SMFIR_DELRCPT",
        Response::ChgFrom { .. } => "SMFIR_CHGFROM",
        Response::Quarantine(_) => "SMFIR_QUARANTINE",
        Response::ConnFail => "SMFIR_CONN_FAIL",
        Response::Shutdown => "SMFIR_SHUTDOWN",
        Response::SetSymList { .. } => "SMFIR_SETSYMLIST",
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::FrameDecoder;
    use super::*;

    fn negotiated(protocol: u32) -> Conversation {
        let mut c = Conversation::new(MAX_REPLACED_BODY);
        c.handle_optneg(Response::OptNeg {
            version: 6,
            actions: OFFERED_ACTIONS,
            protocol,
        })
        .unwrap();
        c
    }

    fn sent(out: &[u8]) -> Vec<Command> {
        let mut frames = FrameDecoder::new(1 << 20);
        frames.push(out);
        let mut commands = Vec::new();
        while let Some((code, data)) = frames.next_frame().unwrap() {
            commands.push(Command::parse(code, &data).unwrap());
        }
        commands
    }

    fn run(c: &mut Conversation, stage: Stage, command: Command, answer: Response) -> Verdict {
        let mut out = Vec::new();
        assert_eq!(c.start(stage, &command, &[], &mut out), Start::Await);
        match c.handle_response(answer).unwrap() {
            Step::Done(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn negotiation_refuses_more_than_offered_and_odd_versions() {
        let mut out = Vec::new();
        Conversation::new(1).offer(&mut out);
        assert_eq!(
            sent(&out),
            [Command::OptNeg {
                version: 6,
                actions: OFFERED_ACTIONS,
                protocol: OFFERED_PROTOCOL
            }]
        );
        for (version, actions, protocol) in [
            (7, 0, 0),
            (1, 0, 0),
            (6, action::SETSYMLIST, 0),
            (6, 0, 0x1000_0000),
        ] {
            let mut c = Conversation::new(1);
            assert!(
                c.handle_optneg(Response::OptNeg {
                    version,
                    actions,
                    protocol
                })
                .is_err()
            );
        }
        assert!(
            Conversation::new(1)
                .handle_optneg(Response::Continue)
                .is_err()
        );
        for version in 2..=6 {
            let mut c = Conversation::new(1);
            assert!(
                c.handle_optneg(Response::OptNeg {
                    version,
                    actions: 0,
                    protocol: 0
                })
                .is_ok()
            );
        }
    }

    #[test]
    fn no_and_nr_flags_are_honoured_and_macros_still_sent() {
        let mut c = negotiated(protocol::NOHELO | protocol::NR_MAIL);
        let mut out = Vec::new();
        let macros = [("{client_addr}", "192.0.2.1")];
        assert_eq!(
            c.start(Stage::Helo, &Command::Helo("x".into()), &macros, &mut out),
            Start::Answered(Verdict::Continue)
        );
        assert_eq!(
            sent(&out),
            [Command::Macro {
                stage: b'H',
                pairs: vec![("{client_addr}".into(), "192.0.2.1".into())]
            }]
        );
        out.clear();
        let mail = Command::Mail(vec!["<a@b>".into()]);
        assert_eq!(
            c.start(Stage::Mail, &mail, &[], &mut out),
            Start::Answered(Verdict::Continue)
        );
        assert_eq!(sent(&out), [mail]);
    }

    #[test]
    fn data_is_not_sent_to_a_version_2_milter() {
        let mut c = Conversation::new(1);
        c.handle_optneg(Response::OptNeg {
            version: 2,
            actions: 0,
            protocol: 0,
        })
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(
            c.start(Stage::Data, &Command::Data, &[("i", "1")], &mut out),
            Start::Answered(Verdict::Continue)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn verdicts_map_and_accept_at_connect_covers_the_connection() {
        let mut c = negotiated(0);
        let reply = Reply::new(550, "5.7.1", "go away");
        assert_eq!(
            run(
                &mut c,
                Stage::Mail,
                Command::Mail(vec!["<>".into()]),
                Response::Continue
            ),
            Verdict::Continue
        );
        assert_eq!(
            run(
                &mut c,
                Stage::Rcpt,
                Command::Rcpt(vec!["<a@b>".into()]),
                Response::ReplyCode(reply.clone())
            ),
            Verdict::Reject(Some(reply))
        );
        // A refused recipient is that recipient only.
        assert_eq!(
            run(
                &mut c,
                Stage::Rcpt,
                Command::Rcpt(vec!["<c@d>".into()]),
                Response::TempFail
            ),
            Verdict::TempFail(None)
        );
        assert_eq!(
            run(
                &mut c,
                Stage::Rcpt,
                Command::Rcpt(vec!["<e@f>".into()]),
                Response::Discard
            ),
            Verdict::Discard
        );
        // Discarded: the rest of the message is not sent, and it stays discarded.
        let mut out = Vec::new();
        assert_eq!(
            c.start(
                Stage::Rcpt,
                &Command::Rcpt(vec!["<g@h>".into()]),
                &[],
                &mut out
            ),
            Start::Answered(Verdict::Continue)
        );
        assert_eq!(
            c.start(Stage::Eob, &Command::BodyEob, &[], &mut out),
            Start::Answered(Verdict::Discard)
        );
        assert!(out.is_empty());
        c.end_message(&mut out);
        assert_eq!(sent(&out), [Command::Abort]);

        let mut c = negotiated(0);
        assert_eq!(
            run(
                &mut c,
                Stage::Connect,
                connect_command("unknown", "192.0.2.1:5".parse().unwrap()),
                Response::Accept
            ),
            Verdict::Accept
        );
        let mut out = Vec::new();
        assert_eq!(
            c.start(
                Stage::Mail,
                &Command::Mail(vec!["<>".into()]),
                &[],
                &mut out
            ),
            Start::Answered(Verdict::Continue)
        );
        assert_eq!(
            c.start(Stage::Eob, &Command::BodyEob, &[], &mut out),
            Start::Answered(Verdict::Accept)
        );
        assert!(out.is_empty());

        let mut c = negotiated(0);
        assert_eq!(
            run(
                &mut c,
                Stage::Helo,
                Command::Helo("x".into()),
                Response::Reject
            ),
            Verdict::Reject(None)
        );
        let mut out = Vec::new();
        assert_eq!(
            c.start(
                Stage::Mail,
                &Command::Mail(vec!["<>".into()]),
                &[],
                &mut out
            ),
            Start::Answered(Verdict::Reject(None))
        );
    }

    #[test]
    fn modifications_only_at_end_of_body_and_envelope_changes_refused() {
        let mut c = negotiated(0);
        let mut out = Vec::new();
        c.start(
            Stage::Mail,
            &Command::Mail(vec!["<>".into()]),
            &[],
            &mut out,
        );
        assert!(
            c.handle_response(Response::AddHeader {
                name: "X".into(),
                value: "y".into()
            })
            .is_err()
        );

        let mut c = negotiated(0);
        c.start(
            Stage::Mail,
            &Command::Mail(vec!["<>".into()]),
            &[],
            &mut out,
        );
        c.handle_response(Response::Continue).unwrap();
        assert_eq!(
            c.start(Stage::Eob, &Command::BodyEob, &[], &mut out),
            Start::Await
        );
        for r in [
            Response::InsHeader {
                index: 0,
                name: "DKIM-Signature".into(),
                value: "v=1;\n\tb=x".into(),
            },
            Response::ChgHeader {
                index: 0,
                name: "Subject".into(),
                value: String::new(),
            },
            Response::ReplBody(b"a".to_vec()),
            Response::ReplBody(b"b".to_vec()),
            Response::AddRcpt("<x@y>".into()),
            Response::Quarantine("why".into()),
            Response::Progress,
        ] {
            assert!(matches!(
                c.handle_response(r).unwrap(),
                Step::Recorded | Step::Progress
            ));
        }
        // A body chunk after other requests would be a second body.
        assert!(
            c.clone_for_test()
                .handle_response(Response::ReplBody(b"c".to_vec()))
                .is_err()
        );
        assert_eq!(
            c.handle_response(Response::Continue).unwrap(),
            Step::Done(Verdict::Continue)
        );
        let (edits, notes) = c.take_outcome(&Verdict::Continue);
        assert_eq!(
            edits,
            [
                Edit::InsertHeader {
                    index: 0,
                    name: "DKIM-Signature".into(),
                    value: "v=1;\r\n\tb=x".into()
                },
                Edit::ChangeHeader {
                    index: 1,
                    name: "Subject".into(),
                    value: String::new()
                },
                Edit::ReplaceBody(b"ab".to_vec()),
            ]
        );
        assert_eq!(notes.len(), 2);
        assert!(
            notes[0].contains("<x@y>") && notes[0].contains("refused"),
            "{notes:?}"
        );
        // End of body answered: no ABORT needed.
        out.clear();
        c.end_message(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn skip_stops_the_body_until_another_stage() {
        let mut c = negotiated(protocol::SKIP);
        let mut out = Vec::new();
        let chunk = Command::Body(b"x".to_vec());
        assert_eq!(c.start(Stage::Body, &chunk, &[], &mut out), Start::Await);
        assert_eq!(
            c.handle_response(Response::Skip).unwrap(),
            Step::Done(Verdict::Continue)
        );
        assert!(c.skips(Stage::Body));
        out.clear();
        assert_eq!(
            c.start(Stage::Body, &chunk, &[], &mut out),
            Start::Answered(Verdict::Continue)
        );
        assert!(out.is_empty());
        assert_eq!(
            c.start(Stage::Eob, &Command::BodyEob, &[], &mut out),
            Start::Await
        );
        assert!(!c.skips(Stage::Body));
    }

    #[test]
    fn leading_space_and_folding_of_values() {
        assert_eq!(header_value(" a\n\tb".into(), true), "a\r\n\tb");
        assert_eq!(header_value(" a\r\n\tb".into(), false), " a\r\n\tb");
        assert_eq!(header_value("a\r".into(), false), "a\r\n");
        assert_eq!(
            header_value_out(b" a\r\n\tb", b"a\r\n\tb", false),
            b"a\n\tb"
        );
        assert_eq!(header_value_out(b" a", b"a", true), b" a");
        assert_eq!(bracketed(""), "<>");
        assert_eq!(bracketed("a@b"), "<a@b>");
        assert_eq!(bracketed("<a@b>"), "<a@b>");
    }

    impl Conversation {
        fn clone_for_test(&self) -> Conversation {
            Conversation {
                negotiated: self.negotiated,
                connection: self.connection.clone(),
                transaction: self.transaction.clone(),
                skip: self.skip,
                awaiting: self.awaiting,
                edits: self.edits.clone(),
                notes: self.notes.clone(),
                body: self.body.clone(),
                body_state: self.body_state,
                max_body: self.max_body,
            }
        }
    }
}
