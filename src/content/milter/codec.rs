//! The milter wire format (sendmail's libmilter, protocol version 6), sans-IO: frames are a
//! 4-byte big-endian length, a command byte and the data (the length counts the command byte).
//!
//! [`Command`]s go from the MTA to the milter, [`Response`]s come back. Both directions have an
//! encoder and a parser, so the test milter (in the testkit) and the fuzz target use the same
//! code as the client; tarmac itself only encodes commands and decodes responses.
//!
//! Input is untrusted: [`FrameDecoder`] takes bytes split anywhere, checks a frame's announced
//! length against its cap as soon as the four length bytes are in (so a huge length is an error
//! at once, and nothing is allocated for it), and keeps at most one frame plus the last chunk
//! pushed. A frame whose data does not parse as its command (a missing NUL, bytes left over,
//! data after a command that has none, a malformed reply code) is a [`Failure::Garbage`].
//! Nothing here panics.

use crate::content::Failure;
use crate::smtp::reply::{Reply, Status, parse_reply};

/// The protocol version tarmac offers (libmilter 8.14+ and Postfix ≥ 2.6 speak it).
pub const VERSION: u32 = 6;

/// The longest body chunk sent in one `SMFIC_BODY`, as libmilter and Postfix cut them
/// (`MILTER_CHUNK_SIZE`).
pub const MAX_BODY_CHUNK: usize = 65_535;

/// The longest frame accepted from a milter (command byte and data): the largest legitimate
/// ones are body replacement chunks (≤ 65,535 bytes in practice) and headers; 1 MiB leaves
/// room without letting a broken milter make tarmac buffer much.
pub const MAX_FRAME: usize = 1024 * 1024;

/// Actions a milter may ask for at negotiation (`SMFIF_*`).
pub mod action {
    /// Add headers (`SMFIR_ADDHEADER`, `SMFIR_INSHEADER`).
    pub const ADDHDRS: u32 = 0x01;
    /// Replace the body (`SMFIR_REPLBODY`).
    pub const CHGBODY: u32 = 0x02;
    /// Add recipients (`SMFIR_ADDRCPT`).
    pub const ADDRCPT: u32 = 0x04;
    /// Delete recipients (`SMFIR_DELRCPT`).
    pub const DELRCPT: u32 = 0x08;
    /// Change or delete headers (`SMFIR_CHGHEADER`).
    pub const CHGHDRS: u32 = 0x10;
    /// Quarantine the message (`SMFIR_QUARANTINE`).
    pub const QUARANTINE: u32 = 0x20;
    /// Change the sender (`SMFIR_CHGFROM`).
    pub const CHGFROM: u32 = 0x40;
    /// Add recipients with ESMTP arguments (`SMFIR_ADDRCPT_PAR`).
    pub const ADDRCPT_PAR: u32 = 0x80;
    /// Send lists of macro names in the negotiation reply.
    pub const SETSYMLIST: u32 = 0x100;
}

/// Protocol flags negotiated with `SMFIC_OPTNEG` (`SMFIP_*`): stages a milter does not want
/// (`NO*`), stages it will not answer (`NR_*`), and extensions.
pub mod protocol {
    /// No `SMFIC_CONNECT`.
    pub const NOCONNECT: u32 = 0x1;
    /// No `SMFIC_HELO`.
    pub const NOHELO: u32 = 0x2;
    /// No `SMFIC_MAIL`.
    pub const NOMAIL: u32 = 0x4;
    /// No `SMFIC_RCPT`.
    pub const NORCPT: u32 = 0x8;
    /// No `SMFIC_BODY`.
    pub const NOBODY: u32 = 0x10;
    /// No `SMFIC_HEADER`.
    pub const NOHDRS: u32 = 0x20;
    /// No `SMFIC_EOH`.
    pub const NOEOH: u32 = 0x40;
    /// No reply to `SMFIC_HEADER`.
    pub const NR_HDR: u32 = 0x80;
    /// No `SMFIC_UNKNOWN` (tarmac never sends it).
    pub const NOUNKNOWN: u32 = 0x100;
    /// No `SMFIC_DATA`.
    pub const NODATA: u32 = 0x200;
    /// The MTA understands `SMFIR_SKIP`.
    pub const SKIP: u32 = 0x400;
    /// The milter wants rejected recipients too.
    pub const RCPT_REJ: u32 = 0x800;
    /// No reply to `SMFIC_CONNECT`.
    pub const NR_CONN: u32 = 0x1000;
    /// No reply to `SMFIC_HELO`.
    pub const NR_HELO: u32 = 0x2000;
    /// No reply to `SMFIC_MAIL`.
    pub const NR_MAIL: u32 = 0x4000;
    /// No reply to `SMFIC_RCPT`.
    pub const NR_RCPT: u32 = 0x8000;
    /// No reply to `SMFIC_DATA`.
    pub const NR_DATA: u32 = 0x10000;
    /// No reply to `SMFIC_UNKNOWN`.
    pub const NR_UNKN: u32 = 0x20000;
    /// No reply to `SMFIC_EOH`.
    pub const NR_EOH: u32 = 0x40000;
    /// No reply to `SMFIC_BODY`.
    pub const NR_BODY: u32 = 0x80000;
    /// Header values keep the space after the colon (both directions).
    pub const HDR_LEADSPC: u32 = 0x100000;
}

/// The client's address family in `SMFIC_CONNECT` (`SMFIA_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `'4'`: IPv4, with a port and the address.
    Inet4,
    /// `'6'`: IPv6, with a port and the address.
    Inet6,
    /// `'L'`: a Unix socket, with port 0 and the path.
    Unix,
    /// `'U'`: unknown, nothing after the family.
    Unknown,
}

impl Family {
    fn code(self) -> u8 {
        match self {
            Family::Inet4 => b'4',
            Family::Inet6 => b'6',
            Family::Unix => b'L',
            Family::Unknown => b'U',
        }
    }
}

/// A command from the MTA to the milter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `SMFIC_OPTNEG` (`O`): the MTA's version, the actions it allows and the protocol flags it
    /// supports.
    OptNeg {
        /// Protocol version.
        version: u32,
        /// `SMFIF_*` the milter may use.
        actions: u32,
        /// `SMFIP_*` the MTA can honour.
        protocol: u32,
    },
    /// `SMFIC_MACRO` (`D`): macro values for the stage whose command byte is `stage`, sent
    /// just before that stage's command (even when the milter does not want the command).
    Macro {
        /// The command byte of the stage (`C`, `H`, `M`, `R`, `T`, `E`...).
        stage: u8,
        /// `(name, value)`, e.g. `("{client_addr}", "192.0.2.1")`.
        pairs: Vec<(String, String)>,
    },
    /// `SMFIC_CONNECT` (`C`).
    Connect {
        /// The client's host name, or `[address]` when it has none.
        hostname: String,
        /// Address family.
        family: Family,
        /// Client port (0 for Unix sockets; absent on the wire for `Unknown`).
        port: u16,
        /// Client address as text (absent on the wire for `Unknown`).
        address: String,
    },
    /// `SMFIC_HELO` (`H`): the HELO/EHLO argument.
    Helo(String),
    /// `SMFIC_MAIL` (`M`): the sender in angle brackets, then ESMTP arguments.
    Mail(Vec<String>),
    /// `SMFIC_RCPT` (`R`): the recipient in angle brackets, then ESMTP arguments.
    Rcpt(Vec<String>),
    /// `SMFIC_DATA` (`T`).
    Data,
    /// `SMFIC_HEADER` (`L`): one header field.
    Header {
        /// Field name.
        name: String,
        /// Field value (folded lines separated by LF, as sendmail and Postfix send them).
        value: Vec<u8>,
    },
    /// `SMFIC_EOH` (`N`).
    Eoh,
    /// `SMFIC_BODY` (`B`): a body chunk of at most [`MAX_BODY_CHUNK`] bytes.
    Body(Vec<u8>),
    /// `SMFIC_BODYEOB` (`E`): the end of the message.
    BodyEob,
    /// `SMFIC_ABORT` (`A`): the transaction ended without a message.
    Abort,
    /// `SMFIC_QUIT` (`Q`): the connection ends.
    Quit,
}

/// A response from the milter to the MTA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// `SMFIC_OPTNEG` (`O`): what the milter chose from the MTA's offer.
    OptNeg {
        /// Its protocol version.
        version: u32,
        /// `SMFIF_*` it wants.
        actions: u32,
        /// `SMFIP_*` it wants.
        protocol: u32,
    },
    /// `SMFIR_ACCEPT` (`a`).
    Accept,
    /// `SMFIR_CONTINUE` (`c`).
    Continue,
    /// `SMFIR_DISCARD` (`d`).
    Discard,
    /// `SMFIR_REJECT` (`r`).
    Reject,
    /// `SMFIR_TEMPFAIL` (`t`).
    TempFail,
    /// `SMFIR_REPLYCODE` (`y`): its own SMTP reply, checked as Postfix checks it (4xx or 5xx,
    /// an enhanced code of the same class when there is one, the same code on every line).
    ReplyCode(Reply),
    /// `SMFIR_SKIP` (`s`): send no more events of this kind (body chunks).
    Skip,
    /// `SMFIR_PROGRESS` (`p`): still working; the timeout starts again.
    Progress,
    /// `SMFIR_ADDHEADER` (`h`).
    AddHeader {
        /// Field name.
        name: String,
        /// Field value.
        value: String,
    },
    /// `SMFIR_INSHEADER` (`i`): insert at `index` (0: the first).
    InsHeader {
        /// Position among all headers.
        index: u32,
        /// Field name.
        name: String,
        /// Field value.
        value: String,
    },
    /// `SMFIR_CHGHEADER` (`m`): change the `index`-th occurrence of `name`; empty: delete.
    ChgHeader {
        /// Occurrence, from 1 (0 is taken as 1, as Postfix does).
        index: u32,
        /// Field name.
        name: String,
        /// New value.
        value: String,
    },
    /// `SMFIR_REPLBODY` (`b`): a chunk of the replacement body.
    ReplBody(Vec<u8>),
    /// `SMFIR_ADDRCPT` (`+`).
    AddRcpt(String),
    /// `SMFIR_ADDRCPT_PAR` (`2`): a recipient and its ESMTP arguments.
    AddRcptPar {
        /// The recipient.
        rcpt: String,
        /// ESMTP arguments, when sent.
        args: Option<String>,
    },
    /// `SMFIR_DELRCPT` (`-`).
    DelRcpt(String),
    /// `SMFIR_CHGFROM` (`e`): a new sender and its ESMTP arguments.
    ChgFrom {
        /// The sender.
        from: String,
        /// ESMTP arguments, when sent.
        args: Option<String>,
    },
    /// `SMFIR_QUARANTINE` (`q`): the reason.
    Quarantine(String),
    /// `SMFIR_CONN_FAIL` (`f`): fail the connection.
    ConnFail,
    /// `SMFIR_SHUTDOWN` (`4`): `421` and close.
    Shutdown,
    /// `SMFIR_SETSYMLIST` (`l`): a macro list for a stage (only meaningful inside the
    /// negotiation reply, where it is ignored).
    SetSymList {
        /// The stage number (libmilter's `SMFIM_*`).
        stage: u32,
        /// Space-separated macro names.
        macros: String,
    },
}

/// Appends one frame: length, `code`, `data`.
pub fn encode_frame(code: u8, data: &[u8], out: &mut Vec<u8>) {
    // Frames tarmac builds are bounded (body chunks, a header block capped at 1 MiB); a length
    // past u32 cannot occur, and saturating keeps the arithmetic honest if it did.
    let len = u32::try_from(data.len().saturating_add(1)).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(code);
    out.extend_from_slice(data);
}

/// A NUL-terminated string; NULs inside (which the protocol cannot carry) are dropped.
fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend(s.iter().copied().filter(|&b| b != 0));
    out.push(0);
}

impl Command {
    /// The command byte.
    pub fn code(&self) -> u8 {
        match self {
            Command::OptNeg { .. } => b'O',
            Command::Macro { .. } => b'D',
            Command::Connect { .. } => b'C',
            Command::Helo(_) => b'H',
            Command::Mail(_) => b'M',
            Command::Rcpt(_) => b'R',
            Command::Data => b'T',
            Command::Header { .. } => b'L',
            Command::Eoh => b'N',
            Command::Body(_) => b'B',
            Command::BodyEob => b'E',
            Command::Abort => b'A',
            Command::Quit => b'Q',
        }
    }

    /// Appends the frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        match self {
            Command::OptNeg {
                version,
                actions,
                protocol,
            } => {
                data.extend_from_slice(&version.to_be_bytes());
                data.extend_from_slice(&actions.to_be_bytes());
                data.extend_from_slice(&protocol.to_be_bytes());
            }
            Command::Macro { stage, pairs } => {
                data.push(*stage);
                for (name, value) in pairs {
                    put_str(&mut data, name.as_bytes());
                    put_str(&mut data, value.as_bytes());
                }
            }
            Command::Connect {
                hostname,
                family,
                port,
                address,
            } => {
                put_str(&mut data, hostname.as_bytes());
                data.push(family.code());
                if *family != Family::Unknown {
                    data.extend_from_slice(&port.to_be_bytes());
                    put_str(&mut data, address.as_bytes());
                }
            }
            Command::Helo(helo) => put_str(&mut data, helo.as_bytes()),
            Command::Mail(args) | Command::Rcpt(args) => {
                for arg in args {
                    put_str(&mut data, arg.as_bytes());
                }
            }
            Command::Header { name, value } => {
                put_str(&mut data, name.as_bytes());
                put_str(&mut data, value);
            }
            Command::Body(chunk) => {
                // The body is raw bytes; the caller keeps chunks within MAX_BODY_CHUNK.
                encode_frame(b'B', chunk, out);
                return;
            }
            Command::Data | Command::Eoh | Command::BodyEob | Command::Abort | Command::Quit => {}
        }
        encode_frame(self.code(), &data, out);
    }

    /// Parses a command frame's data (the test milter's side).
    pub fn parse(code: u8, data: &[u8]) -> Result<Command, Failure> {
        let mut r = Reader::new(data);
        let command = match code {
            b'O' => Command::OptNeg {
                version: r.u32()?,
                actions: r.u32()?,
                protocol: r.u32()?,
            },
            b'D' => {
                let stage = r.u8()?;
                let mut pairs = Vec::new();
                while !r.is_empty() {
                    pairs.push((r.string()?, r.string()?));
                }
                Command::Macro { stage, pairs }
            }
            b'C' => {
                let hostname = r.string()?;
                let family = match r.u8()? {
                    b'4' => Family::Inet4,
                    b'6' => Family::Inet6,
                    b'L' => Family::Unix,
                    b'U' => Family::Unknown,
                    other => return Err(garbage(format!("address family {other:#04x}"))),
                };
                let (port, address) = match family {
                    Family::Unknown => (0, String::new()),
                    _ => (r.u16()?, r.string()?),
                };
                Command::Connect {
                    hostname,
                    family,
                    port,
                    address,
                }
            }
            b'H' => Command::Helo(r.string()?),
            b'M' | b'R' => {
                let mut args = vec![r.string()?];
                while !r.is_empty() {
                    args.push(r.string()?);
                }
                if code == b'M' {
                    Command::Mail(args)
                } else {
                    Command::Rcpt(args)
                }
            }
            b'T' => Command::Data,
            b'L' => Command::Header {
                name: r.string()?,
                value: r.bytes_nul()?.to_vec(),
            },
            b'N' => Command::Eoh,
            b'B' => Command::Body(r.rest().to_vec()),
            b'E' => {
                // libmilter accepts data with EOB (a last chunk); tarmac never sends it.
                Command::BodyEob
            }
            b'A' => Command::Abort,
            b'Q' => Command::Quit,
            other => return Err(garbage(format!("unknown command {}", show(other)))),
        };
        if code != b'E' {
            r.finish(code)?;
        }
        Ok(command)
    }
}

impl Response {
    /// The response byte.
    pub fn code(&self) -> u8 {
        match self {
            Response::OptNeg { .. } => b'O',
            Response::Accept => b'a',
            Response::Continue => b'c',
            Response::Discard => b'd',
            Response::Reject => b'r',
            Response::TempFail => b't',
            Response::ReplyCode(_) => b'y',
            Response::Skip => b's',
            Response::Progress => b'p',
            Response::AddHeader { .. } => b'h',
            Response::InsHeader { .. } => b'i',
            Response::ChgHeader { .. } => b'm',
            Response::ReplBody(_) => b'b',
            Response::AddRcpt(_) => b'+',
            Response::AddRcptPar { .. } => b'2',
            Response::DelRcpt(_) => b'-',
            Response::ChgFrom { .. } => b'e',
            Response::Quarantine(_) => b'q',
            Response::ConnFail => b'f',
            Response::Shutdown => b'4',
            Response::SetSymList { .. } => b'l',
        }
    }

    /// Appends the frame to `out` (the test milter's side).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        match self {
            Response::OptNeg {
                version,
                actions,
                protocol,
            } => {
                data.extend_from_slice(&version.to_be_bytes());
                data.extend_from_slice(&actions.to_be_bytes());
                data.extend_from_slice(&protocol.to_be_bytes());
            }
            Response::ReplyCode(reply) => {
                let mut text = Vec::new();
                reply.write_to(&mut text);
                let mut text = text.strip_suffix(b"\r\n").unwrap_or(&text).to_vec();
                // An empty last line is written as the bare code; libmilter's form (and
                // Postfix's check) wants the space after it.
                let last_line = text.rsplit(|&b| b == b'\n').next().unwrap_or_default();
                if last_line.len() == 3 {
                    text.push(b' ');
                }
                // sendmail reads the text as a format string: `%` goes doubled.
                let mut doubled = Vec::with_capacity(text.len());
                for &b in &text {
                    if b == b'%' {
                        doubled.push(b'%');
                    }
                    doubled.push(b);
                }
                put_str(&mut data, &doubled);
            }
            Response::AddHeader { name, value } => {
                put_str(&mut data, name.as_bytes());
                put_str(&mut data, value.as_bytes());
            }
            Response::InsHeader { index, name, value }
            | Response::ChgHeader { index, name, value } => {
                data.extend_from_slice(&index.to_be_bytes());
                put_str(&mut data, name.as_bytes());
                put_str(&mut data, value.as_bytes());
            }
            Response::ReplBody(chunk) => data.extend_from_slice(chunk),
            Response::AddRcpt(s) | Response::DelRcpt(s) | Response::Quarantine(s) => {
                put_str(&mut data, s.as_bytes());
            }
            Response::AddRcptPar { rcpt: s, args } | Response::ChgFrom { from: s, args } => {
                put_str(&mut data, s.as_bytes());
                if let Some(args) = args {
                    put_str(&mut data, args.as_bytes());
                }
            }
            Response::SetSymList { stage, macros } => {
                data.extend_from_slice(&stage.to_be_bytes());
                put_str(&mut data, macros.as_bytes());
            }
            Response::Accept
            | Response::Continue
            | Response::Discard
            | Response::Reject
            | Response::TempFail
            | Response::Skip
            | Response::Progress
            | Response::ConnFail
            | Response::Shutdown => {}
        }
        encode_frame(self.code(), &data, out);
    }

    /// Parses a response frame's data.
    pub fn parse(code: u8, data: &[u8]) -> Result<Response, Failure> {
        let mut r = Reader::new(data);
        let response = match code {
            b'O' => {
                let response = Response::OptNeg {
                    version: r.u32()?,
                    actions: r.u32()?,
                    protocol: r.u32()?,
                };
                // Macro lists (SMFIR_SETSYMLIST pairs) may follow; tarmac sends the macros it
                // has to every milter and ignores them, so they are not even parsed.
                return Ok(response);
            }
            b'a' => Response::Accept,
            b'c' => Response::Continue,
            b'd' => Response::Discard,
            b'r' => Response::Reject,
            b't' => Response::TempFail,
            b's' => Response::Skip,
            b'p' => Response::Progress,
            b'f' => Response::ConnFail,
            b'4' => Response::Shutdown,
            b'y' => Response::ReplyCode(reply_code(r.bytes_nul()?)?),
            b'h' => Response::AddHeader {
                name: r.string()?,
                value: r.string()?,
            },
            b'i' => Response::InsHeader {
                index: r.u32()?,
                name: r.string()?,
                value: r.string()?,
            },
            b'm' => Response::ChgHeader {
                index: r.u32()?,
                name: r.string()?,
                value: r.string()?,
            },
            b'b' => Response::ReplBody(r.rest().to_vec()),
            b'+' => Response::AddRcpt(r.string()?),
            b'-' => Response::DelRcpt(r.string()?),
            b'q' => Response::Quarantine(r.string()?),
            b'2' => Response::AddRcptPar {
                rcpt: r.string()?,
                args: r.optional_string()?,
            },
            b'e' => Response::ChgFrom {
                from: r.string()?,
                args: r.optional_string()?,
            },
            b'l' => Response::SetSymList {
                stage: r.u32()?,
                macros: r.string()?,
            },
            other => return Err(garbage(format!("unknown response {}", show(other)))),
        };
        r.finish(code)?;
        Ok(response)
    }
}

/// Checks a `SMFIR_REPLYCODE` text as Postfix's `milter8_valid_smtp_reply` does — every line
/// `[45]dd` then `-` (all but the last) or a space (the last), an enhanced code (when the text
/// starts with a digit) of the same class, lines joined by CRLF, no NUL — and that every line
/// has the same code; then undoes sendmail's `%` doubling (`%%` is `%`, a lone `%` goes).
pub fn reply_code(text: &[u8]) -> Result<Reply, Failure> {
    let bad = || garbage(format!("malformed reply code {:?}", show_bytes(text)));
    if !valid_reply_lines(text) {
        return Err(bad());
    }
    let mut unpercent = Vec::with_capacity(text.len() + 2);
    let mut bytes = text.iter().copied();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            if let Some(next) = bytes.next() {
                unpercent.push(next);
            }
        } else {
            unpercent.push(b);
        }
    }
    // Checked again once undoubled (Postfix checks only before): `550-%1` would otherwise
    // become `550-1`, a reply that breaks the rules (found by the fuzz target).
    if !valid_reply_lines(&unpercent) {
        return Err(bad());
    }
    unpercent.extend_from_slice(b"\r\n");
    match parse_reply(&unpercent) {
        Ok(Status::Complete((reply, used))) if used == unpercent.len() => Ok(reply),
        _ => Err(bad()),
    }
}

/// Postfix's `milter8_valid_smtp_reply`, plus one code on every line.
fn valid_reply_lines(text: &[u8]) -> bool {
    if text.is_empty() || text.contains(&0) {
        return false;
    }
    let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    let last = lines.len().saturating_sub(1);
    let mut code: Option<&[u8]> = None;
    for (i, line) in lines.iter().enumerate() {
        let line = if i < last {
            match line.strip_suffix(b"\r") {
                Some(line) => line,
                None => return false,
            }
        } else {
            line
        };
        if line.contains(&b'\r') {
            return false;
        }
        let (Some(&first), Some(digits), Some(&sep)) = (line.first(), line.get(..3), line.get(3))
        else {
            return false;
        };
        let ok = matches!(first, b'4' | b'5')
            && digits.iter().all(u8::is_ascii_digit)
            && sep == if i == last { b' ' } else { b'-' }
            && line
                .get(4)
                .is_none_or(|&b| !b.is_ascii_digit() || b == first);
        if !ok || code.is_some_and(|c| c != digits) {
            return false;
        }
        code = Some(digits);
    }
    true
}

/// Splits a byte stream into frames. Bytes are pushed as they arrive, in chunks of any size;
/// [`FrameDecoder::next_frame`] hands out whole frames.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_frame` bytes (command byte included).
    pub fn new(max_frame: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            max_frame,
        }
    }

    /// Adds bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that are not a whole frame yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame (`code`, data), `Ok(None)` when more bytes are needed, or an error
    /// for a length of 0 or over the cap (known from the first four bytes, before the frame's
    /// bytes arrive). After an error the stream is out of sync and should be dropped.
    pub fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, Failure> {
        let Some(len) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([
            len.first().copied().unwrap_or(0),
            len.get(1).copied().unwrap_or(0),
            len.get(2).copied().unwrap_or(0),
            len.get(3).copied().unwrap_or(0),
        ]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len == 0 {
            return Err(garbage("a frame of length 0".to_owned()));
        }
        if len > self.max_frame {
            return Err(garbage(format!(
                "a frame of {len} bytes (at most {} accepted)",
                self.max_frame
            )));
        }
        let end = 4 + len;
        let (Some(&code), Some(data)) = (self.buf.get(4), self.buf.get(5..end)) else {
            return Ok(None);
        };
        let data = data.to_vec();
        self.buf.drain(..end);
        Ok(Some((code, data)))
    }
}

/// Frames parsed as [`Response`]s: what the client reads from a milter.
#[derive(Debug)]
pub struct ResponseDecoder {
    frames: FrameDecoder,
}

impl Default for ResponseDecoder {
    fn default() -> Self {
        ResponseDecoder::new()
    }
}

impl ResponseDecoder {
    /// A decoder with the [`MAX_FRAME`] cap.
    pub fn new() -> ResponseDecoder {
        ResponseDecoder {
            frames: FrameDecoder::new(MAX_FRAME),
        }
    }

    /// Adds bytes read from the milter.
    pub fn push(&mut self, bytes: &[u8]) {
        self.frames.push(bytes);
    }

    /// Bytes held that are not a whole response yet.
    pub fn buffered(&self) -> usize {
        self.frames.buffered()
    }

    /// The next whole response; `Ok(None)` when more bytes are needed.
    pub fn next_response(&mut self) -> Result<Option<Response>, Failure> {
        match self.frames.next_frame()? {
            Some((code, data)) => Response::parse(code, &data).map(Some),
            None => Ok(None),
        }
    }
}

/// A cursor over a frame's data; every read is checked.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Failure> {
        let (Some(head), Some(tail)) = (self.data.get(..n), self.data.get(n..)) else {
            return Err(garbage("a frame shorter than its contents".to_owned()));
        };
        self.data = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Failure> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }

    fn u16(&mut self) -> Result<u16, Failure> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([
            b.first().copied().unwrap_or(0),
            b.get(1).copied().unwrap_or(0),
        ]))
    }

    fn u32(&mut self) -> Result<u32, Failure> {
        let b = self.take(4)?;
        let mut a = [0; 4];
        a.copy_from_slice(b);
        Ok(u32::from_be_bytes(a))
    }

    fn bytes_nul(&mut self) -> Result<&'a [u8], Failure> {
        let nul = self
            .data
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| garbage("a string without its NUL".to_owned()))?;
        let s = self.take(nul)?;
        self.take(1)?;
        Ok(s)
    }

    fn string(&mut self) -> Result<String, Failure> {
        Ok(String::from_utf8_lossy(self.bytes_nul()?).into_owned())
    }

    fn optional_string(&mut self) -> Result<Option<String>, Failure> {
        if self.is_empty() {
            Ok(None)
        } else {
            self.string().map(Some)
        }
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    fn finish(&self, code: u8) -> Result<(), Failure> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(garbage(format!(
                "{} bytes left over in a {} frame",
                self.data.len(),
                show(code)
            )))
        }
    }
}

fn garbage(why: String) -> Failure {
    Failure::Garbage(why)
}

/// A command byte for a message: printable as a character, else in hex.
fn show(code: u8) -> String {
    if code.is_ascii_graphic() {
        format!("'{}'", char::from(code))
    } else {
        format!("{code:#04x}")
    }
}

/// Bytes for a message, escaped and cut at 200.
fn show_bytes(bytes: &[u8]) -> String {
    let cut = bytes.get(..200).unwrap_or(bytes);
    cut.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::EnhancedCode;

    fn commands() -> Vec<Command> {
        vec![
            Command::OptNeg {
                version: 6,
                actions: 0x1ff,
                protocol: 0x1f_ffff,
            },
            Command::Macro {
                stage: b'C',
                pairs: vec![
                    ("j".into(), "mx.test".into()),
                    ("{client_addr}".into(), "192.0.2.1".into()),
                ],
            },
            Command::Macro {
                stage: b'E',
                pairs: vec![],
            },
            Command::Connect {
                hostname: "client.test".into(),
                family: Family::Inet4,
                port: 40000,
                address: "192.0.2.1".into(),
            },
            Command::Connect {
                hostname: "[2001:db8::1]".into(),
                family: Family::Inet6,
                port: 25,
                address: "2001:db8::1".into(),
            },
            Command::Connect {
                hostname: "localhost".into(),
                family: Family::Unix,
                port: 0,
                address: "/run/x.sock".into(),
            },
            Command::Connect {
                hostname: "unknown".into(),
                family: Family::Unknown,
                port: 0,
                address: String::new(),
            },
            Command::Helo("client.test".into()),
            Command::Mail(vec!["<a@b.test>".into(), "SIZE=10".into()]),
            Command::Mail(vec!["<>".into()]),
            Command::Rcpt(vec!["<c@d.test>".into()]),
            Command::Data,
            Command::Header {
                name: "Subject".into(),
                value: b"hi\n\tthere".to_vec(),
            },
            Command::Eoh,
            Command::Body(b"body\r\n".to_vec()),
            Command::Body(Vec::new()),
            Command::BodyEob,
            Command::Abort,
            Command::Quit,
        ]
    }

    fn responses() -> Vec<Response> {
        vec![
            Response::OptNeg {
                version: 6,
                actions: 0x13,
                protocol: 0x80,
            },
            Response::Accept,
            Response::Continue,
            Response::Discard,
            Response::Reject,
            Response::TempFail,
            Response::ReplyCode(Reply::new(550, "5.7.1", "100% no thanks")),
            Response::ReplyCode(Reply::multiline(554, None, vec!["x".into(), String::new()])),
            Response::ReplyCode(Reply::multiline(
                451,
                Some(EnhancedCode(4, 7, 1)),
                vec!["one".into(), "two".into()],
            )),
            Response::Skip,
            Response::Progress,
            Response::AddHeader {
                name: "X-A".into(),
                value: "1".into(),
            },
            Response::InsHeader {
                index: 0,
                name: "DKIM-Signature".into(),
                value: "v=1;\n\tb=x".into(),
            },
            Response::ChgHeader {
                index: 2,
                name: "Subject".into(),
                value: String::new(),
            },
            Response::ReplBody(b"new\r\n".to_vec()),
            Response::AddRcpt("<x@y>".into()),
            Response::AddRcptPar {
                rcpt: "<x@y>".into(),
                args: Some("NOTIFY=NEVER".into()),
            },
            Response::AddRcptPar {
                rcpt: "<x@y>".into(),
                args: None,
            },
            Response::DelRcpt("<x@y>".into()),
            Response::ChgFrom {
                from: "<s@t>".into(),
                args: None,
            },
            Response::Quarantine("looks bad".into()),
            Response::ConnFail,
            Response::Shutdown,
            Response::SetSymList {
                stage: 1,
                macros: "{client_addr} j".into(),
            },
        ]
    }

    fn decode_commands(wire: &[u8], step: usize) -> Vec<Command> {
        let mut frames = FrameDecoder::new(MAX_FRAME);
        let mut out = Vec::new();
        for chunk in wire.chunks(step) {
            frames.push(chunk);
            while let Some((code, data)) = frames.next_frame().unwrap() {
                out.push(Command::parse(code, &data).unwrap());
            }
        }
        assert_eq!(frames.buffered(), 0);
        out
    }

    fn decode_responses(wire: &[u8], step: usize) -> Vec<Response> {
        let mut decoder = ResponseDecoder::new();
        let mut out = Vec::new();
        for chunk in wire.chunks(step) {
            decoder.push(chunk);
            while let Some(response) = decoder.next_response().unwrap() {
                out.push(response);
            }
        }
        assert_eq!(decoder.buffered(), 0);
        out
    }

    #[test]
    fn every_command_round_trips_whole_and_byte_by_byte() {
        let mut wire = Vec::new();
        for c in commands() {
            c.encode(&mut wire);
        }
        assert_eq!(decode_commands(&wire, wire.len()), commands());
        assert_eq!(decode_commands(&wire, 1), commands());
        assert_eq!(decode_commands(&wire, 7), commands());
    }

    #[test]
    fn every_response_round_trips_whole_and_byte_by_byte() {
        let mut wire = Vec::new();
        for r in responses() {
            r.encode(&mut wire);
        }
        assert_eq!(decode_responses(&wire, wire.len()), responses());
        assert_eq!(decode_responses(&wire, 1), responses());
        assert_eq!(decode_responses(&wire, 5), responses());
    }

    #[test]
    fn frames_are_as_libmilter_writes_them() {
        let mut wire = Vec::new();
        Command::OptNeg {
            version: 6,
            actions: 1,
            protocol: 2,
        }
        .encode(&mut wire);
        assert_eq!(wire, b"\0\0\0\x0dO\0\0\0\x06\0\0\0\x01\0\0\0\x02");
        wire.clear();
        Command::Connect {
            hostname: "h".into(),
            family: Family::Inet4,
            port: 25,
            address: "1.2.3.4".into(),
        }
        .encode(&mut wire);
        assert_eq!(wire, b"\0\0\0\x0eCh\x004\x00\x191.2.3.4\0");
        wire.clear();
        Command::Data.encode(&mut wire);
        assert_eq!(wire, b"\0\0\0\x01T");
        wire.clear();
        // NUL cannot be carried inside a string: dropped.
        Command::Helo("a\0b".into()).encode(&mut wire);
        assert_eq!(wire, b"\0\0\0\x04Hab\0");
    }

    #[test]
    fn optneg_reply_with_macro_lists_is_read_and_the_lists_ignored() {
        let mut data = Vec::new();
        data.extend_from_slice(&6u32.to_be_bytes());
        data.extend_from_slice(&0x101u32.to_be_bytes());
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(b"{client_addr}\0");
        assert_eq!(
            Response::parse(b'O', &data),
            Ok(Response::OptNeg {
                version: 6,
                actions: 0x101,
                protocol: 0
            })
        );
        assert!(Response::parse(b'O', &data[..11]).is_err());
    }

    #[test]
    fn lengths_zero_huge_and_truncated() {
        let mut d = ResponseDecoder::new();
        d.push(b"\0\0\0\0");
        assert!(matches!(d.next_response(), Err(Failure::Garbage(_))));

        // A huge length fails on its four bytes, before anything is allocated for it.
        let mut d = ResponseDecoder::new();
        d.push(&u32::MAX.to_be_bytes());
        assert!(matches!(d.next_response(), Err(Failure::Garbage(_))));
        let mut d = ResponseDecoder::new();
        d.push(&((MAX_FRAME + 1) as u32).to_be_bytes());
        assert!(matches!(d.next_response(), Err(Failure::Garbage(_))));

        // Exactly the cap is fine.
        let mut wire = Vec::new();
        Response::ReplBody(vec![b'x'; MAX_FRAME - 1]).encode(&mut wire);
        let mut d = ResponseDecoder::new();
        d.push(&wire);
        assert!(
            matches!(d.next_response(), Ok(Some(Response::ReplBody(b))) if b.len() == MAX_FRAME - 1)
        );

        // Truncated: partial, never an error.
        let mut wire = Vec::new();
        Response::AddHeader {
            name: "X".into(),
            value: "y".into(),
        }
        .encode(&mut wire);
        for end in 0..wire.len() {
            let mut d = ResponseDecoder::new();
            d.push(&wire[..end]);
            assert_eq!(d.next_response(), Ok(None), "prefix {end}");
        }
    }

    #[test]
    fn malformed_frames_are_garbage() {
        let cases: &[(u8, &[u8])] = &[
            (b'c', b"x"),                   // data after a bare verdict
            (b'a', b"\0"),                  // same
            (b'h', b"X-A\0value"),          // missing NUL
            (b'h', b"X-A\0v\0extra"),       // left over
            (b'i', b"\0\0\0"),              // short index
            (b'm', b"\0\0\0\x01Subject\0"), // missing value
            (b'O', b"\0\0\0\x06"),          // short negotiation
            (b'Z', b""),                    // unknown
            (b'y', b"250 2.0.0 ok\0"),      // not 4xx/5xx
            (b'y', b"550 5.7.1 no"),        // no NUL
            (b'l', b"\0\0\0\x01"),          // symlist without names
        ];
        for (code, data) in cases {
            assert!(
                matches!(Response::parse(*code, data), Err(Failure::Garbage(_))),
                "{} {:?}",
                char::from(*code),
                data.escape_ascii().to_string()
            );
        }
    }

    #[test]
    fn reply_codes_follow_postfix_rules() {
        type Case<'a> = (&'a [u8], u16, Option<EnhancedCode>, &'a [&'a str]);
        let ok: &[Case] = &[
            (
                b"550 5.7.1 Go away",
                550,
                Some(EnhancedCode(5, 7, 1)),
                &["Go away"],
            ),
            (
                b"451 4.7.1 Later",
                451,
                Some(EnhancedCode(4, 7, 1)),
                &["Later"],
            ),
            (b"554 no enhanced code", 554, None, &["no enhanced code"]),
            (
                b"550-5.7.1 one\r\n550 5.7.1 two",
                550,
                Some(EnhancedCode(5, 7, 1)),
                &["one", "two"],
            ),
            (
                b"550 5.7.1 100%% sure %x",
                550,
                Some(EnhancedCode(5, 7, 1)),
                &["100% sure x"],
            ),
        ];
        for (text, code, enhanced, lines) in ok {
            let reply = reply_code(text).unwrap();
            assert_eq!(reply.code, *code);
            assert_eq!(reply.enhanced, *enhanced);
            assert_eq!(reply.lines, *lines);
        }
        let bad: &[&[u8]] = &[
            b"",
            b"250 2.0.0 ok",
            b"350 go on",
            b"650 x",
            b"55 short",
            b"550",
            b"550-last line with a dash",
            b"550 5.7.1 one\r\n550 5.7.1 two", // a space on a non-final line
            b"550-one\n550 two",               // bare LF
            b"550-one\r\n451 two",             // codes differ
            b"550 4.7.1 class differs",
            b"5x0 5.7.1 x",
            b"550 a\rb",
            b"550 a\0b",
            b"550-%1 one\r\n550 two", // a digit of another class once undoubled
        ];
        for text in bad {
            assert!(
                reply_code(text).is_err(),
                "{:?}",
                text.escape_ascii().to_string()
            );
        }
    }
}
