//! SMTP command parser (RFC 5321 §4.1, ESMTP parameters of RFC 1870, 6152, 6531).
//!
//! Input is one command line *without* its CRLF; framing (CRLF, line length, discard to LF)
//! belongs to the session. Output borrows from the line; nothing is allocated except the
//! keyword carried by [`CommandError::BadParameter`].
//!
//! Leniencies are fixed, not flags: each is something real clients send and Postfix accepts,
//! and none can move where a command or a message ends. Accepted: extra spaces between and
//! around arguments, spaces after `FROM:`/`TO:` (`MAIL FROM: <a@b>`), a source route (dropped),
//! a quoted local part, UTF-8 in addresses and HELO, any HELO text. Refused: a control byte
//! anywhere (TAB, NUL, a stray CR), a path without angle brackets, and any ESMTP parameter
//! tarmac does not advertise.

/// Parameters of MAIL FROM that tarmac understands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=n` (RFC 1870), the client's estimate in bytes.
    pub size: Option<u64>,
    /// `BODY=7BIT|8BITMIME` (RFC 6152).
    pub body: Option<Body>,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
}

impl MailParams {
    /// The parameters as ESMTP arguments (`SIZE=1000`, `BODY=8BITMIME`, `SMTPUTF8`), for a
    /// milter's MAIL stage.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(size) = self.size {
            args.push(format!("SIZE={size}"));
        }
        match self.body {
            Some(Body::SevenBit) => args.push("BODY=7BIT".to_owned()),
            Some(Body::EightBitMime) => args.push("BODY=8BITMIME".to_owned()),
            None => {}
        }
        if self.smtputf8 {
            args.push("SMTPUTF8".to_owned());
        }
        args
    }
}

/// `BODY=` values accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// `BODY=7BIT`
    SevenBit,
    /// `BODY=8BITMIME`
    EightBitMime,
}

/// One parsed command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `EHLO domain` (the argument as sent, trimmed).
    Ehlo(&'a str),
    /// `HELO domain`
    Helo(&'a str),
    /// `MAIL FROM:<path> [params]`; `from` is the address inside the brackets, `""` for `<>`.
    Mail {
        /// Reverse-path without brackets.
        from: &'a str,
        /// Parsed parameters.
        params: MailParams,
    },
    /// `RCPT TO:<path>`; `to` is the address inside the brackets.
    Rcpt {
        /// Forward-path without brackets.
        to: &'a str,
    },
    /// `DATA`
    Data,
    /// `RSET`
    Rset,
    /// `NOOP [string]`
    Noop,
    /// `QUIT`
    Quit,
    /// `HELP [string]`
    Help,
    /// `VRFY string`
    Vrfy,
    /// `EXPN string`
    Expn,
    /// `STARTTLS`
    StartTls,
    /// `XCLIENT …` (refused: client-sent identity is never trusted).
    Xclient,
    /// `XFORWARD …` (refused, as XCLIENT).
    Xforward,
    /// `AUTH …` (not offered on an MX gateway).
    Auth,
    /// `BDAT …` (CHUNKING not offered).
    Bdat,
}

/// Why a line is not a usable command; each variant maps to exactly one reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandError {
    /// Not a command we know: `500 5.5.1`.
    Unknown,
    /// Known verb, bad syntax: `501 5.5.2 Syntax error, expected: <expected>`.
    Syntax {
        /// The expected form, e.g. `MAIL FROM:<address>`.
        expected: &'static str,
    },
    /// Malformed reverse-path: `501 5.1.7`.
    BadSender,
    /// Malformed forward-path: `501 5.1.3`.
    BadRecipient,
    /// Unknown or malformed ESMTP parameter: `555 5.5.4` (RFC 5321 §4.1.1.11).
    BadParameter {
        /// The parameter's keyword as sent (truncated), for the reply text.
        name: String,
    },
}

/// Longest address accepted, brackets excluded: RFC 5321 §4.5.3.1.3 caps a path at 256 octets
/// including `<` and `>`.
const MAX_ADDRESS: usize = 254;

/// Longest parameter keyword echoed back in a `555` reply, in characters; a cap so a client
/// cannot make us write a reply line as long as its command.
const MAX_PARAM_NAME: usize = 32;

/// Parses one command line (without CRLF).
///
/// The verb is matched ASCII-case-insensitively and must be followed by the end of the line or
/// a space; arguments may be separated by several spaces and surrounded by spaces. A control
/// byte (below 0x20, or DEL) anywhere after a known verb is a syntax error: a TAB, a NUL, or a
/// CR that the session's framing let through never separates or ends anything here. Returned
/// strings borrow from `line` and are valid UTF-8 (anything else is a syntax or address error).
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, CommandError> {
    let word_len = line
        .iter()
        .position(|&b| b == b' ' || is_control(b))
        .unwrap_or(line.len());
    let (word, rest) = line.split_at_checked(word_len).unwrap_or((line, b""));
    let Some(&(_, expected, args_form)) = VERBS
        .iter()
        .find(|(name, ..)| name.eq_ignore_ascii_case(word))
    else {
        return Err(CommandError::Unknown);
    };
    let syntax = CommandError::Syntax { expected };
    if rest.iter().any(|&b| is_control(b)) {
        return Err(syntax);
    }
    let args = trim_spaces(rest);
    match args_form {
        Args::Parsed(parse) => parse(args, syntax),
        Args::Ignored(command) => Ok(command),
        Args::None(command) if args.is_empty() => Ok(command),
        Args::Required(command) if !args.is_empty() => Ok(command),
        Args::None(_) | Args::Required(_) => Err(syntax),
    }
}

impl CommandError {
    /// The reply this error gets.
    pub fn reply(&self) -> crate::smtp::Reply {
        use crate::smtp::Reply;
        match self {
            CommandError::Unknown => Reply::new(500, "5.5.1", "Command unrecognized"),
            CommandError::Syntax { expected } => {
                Reply::new(501, "5.5.2", format!("Syntax error, expected: {expected}"))
            }
            CommandError::BadSender => Reply::new(501, "5.1.7", "Bad sender address syntax"),
            CommandError::BadRecipient => Reply::new(501, "5.1.3", "Bad recipient address syntax"),
            CommandError::BadParameter { name } => {
                Reply::new(555, "5.5.4", format!("Unsupported parameter {name}"))
            }
        }
    }
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::Unknown => f.write_str("unknown command"),
            CommandError::Syntax { expected } => write!(f, "syntax error, expected: {expected}"),
            CommandError::BadSender => f.write_str("bad sender address"),
            CommandError::BadRecipient => f.write_str("bad recipient address"),
            CommandError::BadParameter { name } => write!(f, "unsupported parameter {name}"),
        }
    }
}

impl std::error::Error for CommandError {}

/// What may follow a verb, and the command it makes.
#[derive(Clone, Copy)]
enum Args {
    /// Nothing.
    None(Command<'static>),
    /// Something, not looked at (VRFY, EXPN).
    Required(Command<'static>),
    /// Anything or nothing, not looked at.
    Ignored(Command<'static>),
    /// What this function makes of it, given the `501` for bad syntax.
    Parsed(for<'a> fn(&'a [u8], CommandError) -> Result<Command<'a>, CommandError>),
}

/// The verbs tarmac recognises (the rest are `500`): each keyword, the form quoted in its
/// `501`, and what may follow it. Matched with `eq_ignore_ascii_case`, so recognising a verb
/// never allocates.
const VERBS: [(&[u8], &str, Args); 16] = [
    (b"EHLO", "EHLO <domain>", Args::Parsed(parse_ehlo)),
    (b"HELO", "HELO <domain>", Args::Parsed(parse_helo)),
    (b"MAIL", "MAIL FROM:<address>", Args::Parsed(parse_mail)),
    (b"RCPT", "RCPT TO:<address>", Args::Parsed(parse_rcpt)),
    (b"DATA", "DATA", Args::None(Command::Data)),
    (b"RSET", "RSET", Args::None(Command::Rset)),
    (b"NOOP", "NOOP [<string>]", Args::Ignored(Command::Noop)),
    (b"QUIT", "QUIT", Args::None(Command::Quit)),
    (b"HELP", "HELP [<string>]", Args::Ignored(Command::Help)),
    (b"VRFY", "VRFY <string>", Args::Required(Command::Vrfy)),
    (b"EXPN", "EXPN <string>", Args::Required(Command::Expn)),
    (b"STARTTLS", "STARTTLS", Args::None(Command::StartTls)),
    (
        b"XCLIENT",
        "XCLIENT <attribute>=<value>",
        Args::Ignored(Command::Xclient),
    ),
    (
        b"XFORWARD",
        "XFORWARD <attribute>=<value>",
        Args::Ignored(Command::Xforward),
    ),
    (b"AUTH", "AUTH <mechanism>", Args::Ignored(Command::Auth)),
    (b"BDAT", "BDAT <size> [LAST]", Args::Ignored(Command::Bdat)),
];

/// The domain after `EHLO` and its spaces.
fn parse_ehlo(args: &[u8], syntax: CommandError) -> Result<Command<'_>, CommandError> {
    hello_name(args, syntax).map(Command::Ehlo)
}

/// The domain after `HELO` and its spaces.
fn parse_helo(args: &[u8], syntax: CommandError) -> Result<Command<'_>, CommandError> {
    hello_name(args, syntax).map(Command::Helo)
}

/// An EHLO or HELO name. Real ones are often not domains (postscreen and Postfix take almost
/// anything), so only emptiness and non-UTF-8 (unreturnable as text) are refused.
fn hello_name(args: &[u8], syntax: CommandError) -> Result<&str, CommandError> {
    std::str::from_utf8(args)
        .ok()
        .filter(|name| !name.is_empty())
        .ok_or(syntax)
}

/// `FROM:<path> [params]`, after `MAIL` and its spaces.
fn parse_mail(args: &[u8], syntax: CommandError) -> Result<Command<'_>, CommandError> {
    let (mailbox, params) = path_after(b"FROM:", args, syntax, CommandError::BadSender)?;
    let from = match mailbox {
        Mailbox::Null => "",
        Mailbox::Address(a) => a,
        Mailbox::Postmaster(_) | Mailbox::Invalid => return Err(CommandError::BadSender),
    };
    let params = parse_mail_params(params)?;
    Ok(Command::Mail { from, params })
}

/// `TO:<path> [params]`, after `RCPT` and its spaces. No RCPT parameter is offered (no DSN),
/// so any is a `555`.
fn parse_rcpt(args: &[u8], syntax: CommandError) -> Result<Command<'_>, CommandError> {
    let (mailbox, params) = path_after(b"TO:", args, syntax, CommandError::BadRecipient)?;
    let to = match mailbox {
        Mailbox::Address(a) | Mailbox::Postmaster(a) => a,
        Mailbox::Null | Mailbox::Invalid => return Err(CommandError::BadRecipient),
    };
    if let Some(token) = params.split(|&b| b == b' ').find(|t| !t.is_empty()) {
        return Err(bad_parameter(token));
    }
    Ok(Command::Rcpt { to })
}

/// The mailbox and parameter text after `prefix` (`FROM:` or `TO:`) and its spaces; a
/// malformed path is `syntax`, a malformed address in it `bad_address`.
fn path_after<'a>(
    prefix: &[u8],
    args: &'a [u8],
    syntax: CommandError,
    bad_address: CommandError,
) -> Result<(Mailbox<'a>, &'a [u8]), CommandError> {
    let Some(path) = strip_prefix_ignore_case(args, prefix) else {
        return Err(syntax);
    };
    split_path(trim_spaces(path)).map_err(|e| match e {
        PathError::Syntax => syntax,
        PathError::Address => bad_address,
    })
}

/// Why a `<path>` was refused: the brackets themselves (`501 5.5.2`) or what is inside them
/// (`501 5.1.7` / `5.1.3`).
enum PathError {
    Syntax,
    Address,
}

/// What a path's brackets held, source route removed.
enum Mailbox<'a> {
    /// `<>`
    Null,
    /// `local@domain`
    Address(&'a str),
    /// `<postmaster>` without a domain, allowed as a recipient only (RFC 5321 §4.1.1.3).
    Postmaster(&'a str),
    /// Anything else, including `<@route:>`.
    Invalid,
}

/// Splits `<path>[ params]` into the mailbox and the parameter text.
fn split_path(s: &[u8]) -> Result<(Mailbox<'_>, &[u8]), PathError> {
    let Some(inner) = s.strip_prefix(b"<") else {
        return Err(PathError::Syntax);
    };
    // A source route (`@a,@b:`) is obsolete and ignored (RFC 5321 §4.1.1.3, appendix C).
    let mut start = 0;
    if inner.first() == Some(&b'@') {
        let end = inner
            .iter()
            .position(|&b| b == b':' || b == b'>')
            .ok_or(PathError::Syntax)?;
        let route = inner.get(..end).unwrap_or_default();
        if inner.get(end) != Some(&b':') || !route.split(|&b| b == b',').all(is_route_hop) {
            return Err(PathError::Address);
        }
        start = end + 1;
    }
    // A quoted local part may hold `>`: the closing bracket is searched after it.
    let mut search = start;
    if inner.get(start) == Some(&b'"') {
        search = end_of_quoted(inner, start).ok_or(PathError::Address)?;
    }
    let close = search
        + inner
            .get(search..)
            .unwrap_or_default()
            .iter()
            .position(|&b| b == b'>')
            .ok_or(PathError::Syntax)?;
    let mailbox = inner.get(start..close).unwrap_or_default();
    let params = inner.get(close + 1..).unwrap_or_default();
    if !matches!(params, [] | [b' ', ..]) {
        return Err(PathError::Syntax);
    }
    let mailbox = if mailbox.is_empty() {
        if start == 0 {
            Mailbox::Null
        } else {
            Mailbox::Invalid
        }
    } else if mailbox.eq_ignore_ascii_case(b"postmaster") {
        std::str::from_utf8(mailbox).map_or(Mailbox::Invalid, Mailbox::Postmaster)
    } else {
        check_address(mailbox).map_or(Mailbox::Invalid, Mailbox::Address)
    };
    Ok((mailbox, params))
}

/// `local@domain`: a non-empty dot-string or a quoted string, then a non-empty domain (or
/// address literal), at most [`MAX_ADDRESS`] bytes, no space, bracket or stray quote outside
/// the quotes, and valid UTF-8 (whether SMTPUTF8 was announced is the session's business).
fn check_address(m: &[u8]) -> Option<&str> {
    if m.len() > MAX_ADDRESS {
        return None;
    }
    let at = if m.first() == Some(&b'"') {
        end_of_quoted(m, 0)?
    } else {
        m.iter().position(|&b| !is_atom_byte(b))?
    };
    let (local, rest) = m.split_at_checked(at)?;
    let domain = rest.strip_prefix(b"@")?;
    if local.is_empty() || domain.is_empty() || !domain.iter().all(|&b| is_atom_byte(b)) {
        return None;
    }
    std::str::from_utf8(m).ok()
}

/// One hop of a source route: `@domain`.
fn is_route_hop(hop: &[u8]) -> bool {
    hop.strip_prefix(b"@")
        .is_some_and(|d| !d.is_empty() && d.iter().all(|&b| is_atom_byte(b) && b != b','))
}

/// The index just past the quoted string that starts at `s[start]` (a `"`), honouring
/// backslash escapes; `None` if it never closes.
fn end_of_quoted(s: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match s.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// Space-separated `KEY[=VALUE]` after MAIL FROM's path. Only what tarmac advertises is known
/// (SIZE, 8BITMIME, SMTPUTF8); each may appear once.
fn parse_mail_params(s: &[u8]) -> Result<MailParams, CommandError> {
    let mut params = MailParams::default();
    for token in s.split(|&b| b == b' ').filter(|t| !t.is_empty()) {
        let (key, value) = match token.iter().position(|&b| b == b'=') {
            Some(eq) => (token.get(..eq).unwrap_or_default(), token.get(eq + 1..)),
            None => (token, None),
        };
        let known = if key.eq_ignore_ascii_case(b"SIZE") {
            match (params.size, value.and_then(parse_size)) {
                (None, Some(size)) => params.size.replace(size).is_none(),
                _ => false,
            }
        } else if key.eq_ignore_ascii_case(b"BODY") {
            // BINARYMIME needs CHUNKING (RFC 3030), which tarmac does not offer.
            let body = match value {
                Some(v) if v.eq_ignore_ascii_case(b"7BIT") => Some(Body::SevenBit),
                Some(v) if v.eq_ignore_ascii_case(b"8BITMIME") => Some(Body::EightBitMime),
                _ => None,
            };
            match (params.body, body) {
                (None, Some(body)) => params.body.replace(body).is_none(),
                _ => false,
            }
        } else if key.eq_ignore_ascii_case(b"SMTPUTF8") {
            let fresh = !params.smtputf8 && value.is_none();
            params.smtputf8 = true;
            fresh
        } else {
            false
        };
        if !known {
            return Err(bad_parameter(token));
        }
    }
    Ok(params)
}

/// `SIZE=` value: 1 to 20 digits that fit a `u64` (RFC 1870 §3 caps it at 20 digits).
fn parse_size(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The `555` for a parameter token, naming its keyword (or the token, if the keyword is empty).
fn bad_parameter(token: &[u8]) -> CommandError {
    let key = token.split(|&b| b == b'=').next().unwrap_or_default();
    let name = if key.is_empty() { token } else { key };
    CommandError::BadParameter {
        name: String::from_utf8_lossy(name)
            .chars()
            .take(MAX_PARAM_NAME)
            .collect(),
    }
}

/// C0 controls and DEL: never part of a well-formed command line.
fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// A byte allowed in an unquoted local part or a domain. Deliberately loose (real mail uses
/// more than RFC 5321's `atext`): only what would break the path's framing is out.
fn is_atom_byte(b: u8) -> bool {
    !is_control(b) && !matches!(b, b' ' | b'<' | b'>' | b'"' | b'@')
}

fn trim_spaces(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ').map_or(start, |i| i + 1);
    s.get(start..end).unwrap_or_default()
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let (head, tail) = s.split_at_checked(prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then_some(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax(expected: &'static str) -> Result<Command<'static>, CommandError> {
        Err(CommandError::Syntax { expected })
    }

    fn bad_param(name: &str) -> Result<Command<'static>, CommandError> {
        Err(CommandError::BadParameter {
            name: name.to_string(),
        })
    }

    fn mail(from: &str) -> Result<Command<'_>, CommandError> {
        Ok(Command::Mail {
            from,
            params: MailParams::default(),
        })
    }

    fn mail_with(from: &str, params: MailParams) -> Result<Command<'_>, CommandError> {
        Ok(Command::Mail { from, params })
    }

    fn rcpt(to: &str) -> Result<Command<'_>, CommandError> {
        Ok(Command::Rcpt { to })
    }

    #[track_caller]
    fn check(cases: &[(&[u8], Result<Command<'_>, CommandError>)]) {
        for (input, expected) in cases {
            assert_eq!(
                &parse_command(input),
                expected,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn verbs_without_arguments() {
        check(&[
            (b"DATA", Ok(Command::Data)),
            (b"data", Ok(Command::Data)),
            (b"DaTa", Ok(Command::Data)),
            (b"DATA ", Ok(Command::Data)),
            (b"DATA   ", Ok(Command::Data)),
            (b"RSET", Ok(Command::Rset)),
            (b"QUIT", Ok(Command::Quit)),
            (b"quit", Ok(Command::Quit)),
            (b"STARTTLS", Ok(Command::StartTls)),
            (b"StartTls", Ok(Command::StartTls)),
            (b"DATA x", syntax("DATA")),
            (b"RSET now", syntax("RSET")),
            (b"QUIT please", syntax("QUIT")),
            (b"STARTTLS x", syntax("STARTTLS")),
        ]);
    }

    #[test]
    fn verbs_with_optional_or_any_arguments() {
        check(&[
            (b"NOOP", Ok(Command::Noop)),
            (b"NOOP anything at all", Ok(Command::Noop)),
            (b"HELP", Ok(Command::Help)),
            (b"help me", Ok(Command::Help)),
            (b"VRFY user", Ok(Command::Vrfy)),
            (b"VRFY", syntax("VRFY <string>")),
            (b"VRFY   ", syntax("VRFY <string>")),
            (b"EXPN list", Ok(Command::Expn)),
            (b"expn", syntax("EXPN <string>")),
            (b"XCLIENT ADDR=192.0.2.1", Ok(Command::Xclient)),
            (b"XFORWARD NAME=x", Ok(Command::Xforward)),
            (b"xclient", Ok(Command::Xclient)),
            (b"AUTH PLAIN AGJvYgBzZWNyZXQ=", Ok(Command::Auth)),
            (b"BDAT 100 LAST", Ok(Command::Bdat)),
        ]);
    }

    #[test]
    fn unknown_verbs() {
        check(&[
            (b"", Err(CommandError::Unknown)),
            (b" ", Err(CommandError::Unknown)),
            (b" EHLO x", Err(CommandError::Unknown)),
            (b"\tEHLO x", Err(CommandError::Unknown)),
            (b"EHL", Err(CommandError::Unknown)),
            (b"EHLOX", Err(CommandError::Unknown)),
            (b"EHLO1 x", Err(CommandError::Unknown)),
            (b"MAILFROM:<a@b>", Err(CommandError::Unknown)),
            (b"GET / HTTP/1.1", Err(CommandError::Unknown)),
            (b"TURN", Err(CommandError::Unknown)),
            (b"ETRN x", Err(CommandError::Unknown)),
            (b"STARTTLS2", Err(CommandError::Unknown)),
            (b"\xc3\x89HLO x", Err(CommandError::Unknown)),
            (b"\x00", Err(CommandError::Unknown)),
        ]);
    }

    #[test]
    fn control_bytes_are_syntax_errors() {
        check(&[
            (b"EHLO\tx", syntax("EHLO <domain>")),
            (b"EHLO x\ty", syntax("EHLO <domain>")),
            (b"EHLO x\x00", syntax("EHLO <domain>")),
            (b"EHLO x\r", syntax("EHLO <domain>")),
            (b"HELO x\n", syntax("HELO <domain>")),
            (b"NOOP \x1b[31m", syntax("NOOP [<string>]")),
            (b"HELP \x7f", syntax("HELP [<string>]")),
            (b"DATA\r", syntax("DATA")),
            (b"QUIT\x00", syntax("QUIT")),
            (b"MAIL FROM:<a@b>\tSIZE=1", syntax("MAIL FROM:<address>")),
            (b"MAIL FROM:<a\x01b@c>", syntax("MAIL FROM:<address>")),
            (b"RCPT TO:<a@b\x00>", syntax("RCPT TO:<address>")),
            (b"RCPT\tTO:<a@b>", syntax("RCPT TO:<address>")),
            (b"XCLIENT \x00", syntax("XCLIENT <attribute>=<value>")),
        ]);
    }

    #[test]
    fn ehlo_and_helo() {
        check(&[
            (
                b"EHLO mail.example.com",
                Ok(Command::Ehlo("mail.example.com")),
            ),
            (
                b"ehlo mail.example.com",
                Ok(Command::Ehlo("mail.example.com")),
            ),
            (
                b"EHLO   mail.example.com  ",
                Ok(Command::Ehlo("mail.example.com")),
            ),
            (b"EHLO [192.0.2.1]", Ok(Command::Ehlo("[192.0.2.1]"))),
            (
                b"EHLO [IPv6:2001:db8::1]",
                Ok(Command::Ehlo("[IPv6:2001:db8::1]")),
            ),
            (b"HELO localhost", Ok(Command::Helo("localhost"))),
            (b"HELO not_a_domain!", Ok(Command::Helo("not_a_domain!"))),
            (b"HELO two words", Ok(Command::Helo("two words"))),
            (
                b"EHLO b\xc3\xbccher.example",
                Ok(Command::Ehlo("b\u{fc}cher.example")),
            ),
            (b"EHLO", syntax("EHLO <domain>")),
            (b"EHLO ", syntax("EHLO <domain>")),
            (b"HELO     ", syntax("HELO <domain>")),
            (b"EHLO \xff", syntax("EHLO <domain>")),
        ]);
    }

    #[test]
    fn mail_from_paths() {
        let long_local = "a".repeat(64);
        let at_cap = format!("{}@{}", "l".repeat(64), "d".repeat(254 - 65));
        let over_cap = format!("{}@{}", "l".repeat(64), "d".repeat(255 - 65));
        let at_cap_line = format!("MAIL FROM:<{at_cap}>");
        let over_cap_line = format!("MAIL FROM:<{over_cap}>");
        let long_local_line = format!("MAIL FROM:<{long_local}@example.com>");
        let long_local_addr = format!("{long_local}@example.com");
        check(&[
            (b"MAIL FROM:<user@example.com>", mail("user@example.com")),
            (b"mail from:<user@example.com>", mail("user@example.com")),
            (b"Mail From:<User@Example.COM>", mail("User@Example.COM")),
            (b"MAIL FROM: <user@example.com>", mail("user@example.com")),
            (
                b"MAIL FROM:   <user@example.com>   ",
                mail("user@example.com"),
            ),
            (b"MAIL   FROM:<user@example.com>", mail("user@example.com")),
            (b"MAIL FROM:<>", mail("")),
            (b"MAIL FROM: <>", mail("")),
            (
                b"MAIL FROM:<@relay.example:user@example.com>",
                mail("user@example.com"),
            ),
            (
                b"MAIL FROM:<@a.example,@b.example:user@example.com>",
                mail("user@example.com"),
            ),
            (
                b"MAIL FROM:<\"a b\"@example.com>",
                mail("\"a b\"@example.com"),
            ),
            (
                b"MAIL FROM:<\"a>b\"@example.com>",
                mail("\"a>b\"@example.com"),
            ),
            (
                b"MAIL FROM:<\"a\\\"b\"@example.com>",
                mail("\"a\\\"b\"@example.com"),
            ),
            (b"MAIL FROM:<\"\"@example.com>", mail("\"\"@example.com")),
            (b"MAIL FROM:<user@[192.0.2.1]>", mail("user@[192.0.2.1]")),
            (
                b"MAIL FROM:<first.last+tag@example.com>",
                mail("first.last+tag@example.com"),
            ),
            (
                b"MAIL FROM:<us\xc3\xa9r@exampl\xc3\xa9.com>",
                mail("us\u{e9}r@exampl\u{e9}.com"),
            ),
            (at_cap_line.as_bytes(), mail(&at_cap)),
            (long_local_line.as_bytes(), mail(&long_local_addr)),
            // Brackets or the FROM: keyword missing or broken: 501 5.5.2.
            (b"MAIL", syntax("MAIL FROM:<address>")),
            (b"MAIL FROM", syntax("MAIL FROM:<address>")),
            (b"MAIL FROM:", syntax("MAIL FROM:<address>")),
            (b"MAIL FROM :<a@b>", syntax("MAIL FROM:<address>")),
            (b"MAIL TO:<a@b>", syntax("MAIL FROM:<address>")),
            (b"MAIL FROM:user@example.com", syntax("MAIL FROM:<address>")),
            (
                b"MAIL FROM:<user@example.com",
                syntax("MAIL FROM:<address>"),
            ),
            (
                b"MAIL FROM:<user@example.com>SIZE=1",
                syntax("MAIL FROM:<address>"),
            ),
            (b"MAIL FROM:<a@b>>", syntax("MAIL FROM:<address>")),
            (b"MAIL FROM:<@a.example", syntax("MAIL FROM:<address>")),
            // What is inside the brackets is wrong: 501 5.1.7.
            (over_cap_line.as_bytes(), Err(CommandError::BadSender)),
            (b"MAIL FROM:<user>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<postmaster>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<@example.com>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<user@>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<a@b@c>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<a b@c>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<a@b c>", Err(CommandError::BadSender)),
            (b"MAIL FROM:< a@b>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<a@b >", Err(CommandError::BadSender)),
            (b"MAIL FROM:<a<b@c>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<<a@b>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<<a@b>>", syntax("MAIL FROM:<address>")),
            (b"MAIL FROM:<a\"b@c>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<\"a b\"c@d>", Err(CommandError::BadSender)),
            (
                b"MAIL FROM:<\"unterminated@d>",
                Err(CommandError::BadSender),
            ),
            (b"MAIL FROM:<@relay.example:>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<@relay.example>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<@:a@b>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<@a,b:a@b>", Err(CommandError::BadSender)),
            (b"MAIL FROM:<@a,,@b:a@b>", Err(CommandError::BadSender)),
            (
                b"MAIL FROM:<us\xe9r@example.com>",
                Err(CommandError::BadSender),
            ),
        ]);
    }

    #[test]
    fn mail_from_parameters() {
        let size = |n| MailParams {
            size: Some(n),
            ..MailParams::default()
        };
        let body = |b| MailParams {
            body: Some(b),
            ..MailParams::default()
        };
        let all = MailParams {
            size: Some(1000),
            body: Some(Body::EightBitMime),
            smtputf8: true,
        };
        let utf8 = MailParams {
            smtputf8: true,
            ..MailParams::default()
        };
        check(&[
            (b"MAIL FROM:<a@b> SIZE=1000", mail_with("a@b", size(1000))),
            (b"MAIL FROM:<a@b> size=0", mail_with("a@b", size(0))),
            (b"MAIL FROM:<a@b> SIZE=00012", mail_with("a@b", size(12))),
            (
                b"MAIL FROM:<a@b> SIZE=18446744073709551615",
                mail_with("a@b", size(u64::MAX)),
            ),
            (
                b"MAIL FROM:<a@b> BODY=7BIT",
                mail_with("a@b", body(Body::SevenBit)),
            ),
            (
                b"MAIL FROM:<a@b> body=8bitmime",
                mail_with("a@b", body(Body::EightBitMime)),
            ),
            (b"MAIL FROM:<a@b> SMTPUTF8", mail_with("a@b", utf8)),
            (b"MAIL FROM:<a@b> smtputf8", mail_with("a@b", utf8)),
            (
                b"MAIL FROM:<a@b> SIZE=1000 BODY=8BITMIME SMTPUTF8",
                mail_with("a@b", all),
            ),
            (
                b"MAIL FROM:<a@b>   SMTPUTF8  body=8BITMIME   SIZE=1000  ",
                mail_with("a@b", all),
            ),
            (
                b"MAIL FROM:<> SIZE=1000 BODY=8BITMIME SMTPUTF8",
                mail_with("", all),
            ),
            (b"MAIL FROM:<a@b> ", mail("a@b")),
            // Bad values.
            (b"MAIL FROM:<a@b> SIZE", bad_param("SIZE")),
            (b"MAIL FROM:<a@b> SIZE=", bad_param("SIZE")),
            (b"MAIL FROM:<a@b> size=-1", bad_param("size")),
            (b"MAIL FROM:<a@b> SIZE=1k", bad_param("SIZE")),
            (
                b"MAIL FROM:<a@b> SIZE=18446744073709551616",
                bad_param("SIZE"),
            ),
            (
                b"MAIL FROM:<a@b> SIZE=000000000000000000001",
                bad_param("SIZE"),
            ),
            (b"MAIL FROM:<a@b> BODY", bad_param("BODY")),
            (b"MAIL FROM:<a@b> BODY=", bad_param("BODY")),
            (b"MAIL FROM:<a@b> BODY=BINARYMIME", bad_param("BODY")),
            (b"MAIL FROM:<a@b> BODY=8BIT", bad_param("BODY")),
            (b"MAIL FROM:<a@b> SMTPUTF8=yes", bad_param("SMTPUTF8")),
            (b"MAIL FROM:<a@b> SMTPUTF8=", bad_param("SMTPUTF8")),
            // Duplicates.
            (b"MAIL FROM:<a@b> SIZE=1 SIZE=1", bad_param("SIZE")),
            (b"MAIL FROM:<a@b> BODY=7BIT body=7BIT", bad_param("body")),
            (b"MAIL FROM:<a@b> SMTPUTF8 SMTPUTF8", bad_param("SMTPUTF8")),
            // Not offered.
            (b"MAIL FROM:<a@b> AUTH=<>", bad_param("AUTH")),
            (b"MAIL FROM:<a@b> RET=HDRS", bad_param("RET")),
            (b"MAIL FROM:<a@b> ENVID=x", bad_param("ENVID")),
            (b"MAIL FROM:<a@b> SIZE=1 XYZ", bad_param("XYZ")),
            (b"MAIL FROM:<a@b> =x", bad_param("=x")),
            (b"MAIL FROM:<a@b> X\xffY=1", bad_param("X\u{fffd}Y")),
            // The sender is checked before the parameters.
            (b"MAIL FROM:<a> XYZ", Err(CommandError::BadSender)),
        ]);
        let long = format!("MAIL FROM:<a@b> {}=1", "K".repeat(100));
        check(&[(long.as_bytes(), bad_param(&"K".repeat(32)))]);
        let long_utf8 = format!("MAIL FROM:<a@b> {}", "\u{e9}".repeat(40));
        check(&[(long_utf8.as_bytes(), bad_param(&"\u{e9}".repeat(32)))]);
    }

    #[test]
    fn rcpt_to_paths() {
        let over_cap = format!("RCPT TO:<{}@{}>", "l".repeat(64), "d".repeat(190));
        check(&[
            (b"RCPT TO:<user@example.com>", rcpt("user@example.com")),
            (b"rcpt to:<user@example.com>", rcpt("user@example.com")),
            (b"RCPT TO: <user@example.com>", rcpt("user@example.com")),
            (b"RCPT  TO:  <user@example.com>  ", rcpt("user@example.com")),
            (b"RCPT TO:<postmaster>", rcpt("postmaster")),
            (b"RCPT TO:<PostMaster>", rcpt("PostMaster")),
            (b"RCPT TO:<postmaster@example.com>", rcpt("postmaster@example.com")),
            (b"RCPT TO:<@relay.example:user@example.com>", rcpt("user@example.com")),
            (b"RCPT TO:<@a,@b:user@example.com>", rcpt("user@example.com")),
            (b"RCPT TO:<\"a b\"@example.com>", rcpt("\"a b\"@example.com")),
            (b"RCPT TO:<\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b\xe5\xad\x90.\xe5\x85\xac\xe5\x8f\xb8>", rcpt("\u{7528}\u{6237}@\u{4f8b}\u{5b50}.\u{516c}\u{53f8}")),
            (b"RCPT", syntax("RCPT TO:<address>")),
            (b"RCPT TO:", syntax("RCPT TO:<address>")),
            (b"RCPT FROM:<a@b>", syntax("RCPT TO:<address>")),
            (b"RCPT TO:user@example.com", syntax("RCPT TO:<address>")),
            (b"RCPT TO:<user@example.com", syntax("RCPT TO:<address>")),
            (b"RCPT TO:<a@b>x", syntax("RCPT TO:<address>")),
            (b"RCPT TO:<>", Err(CommandError::BadRecipient)),
            (b"RCPT TO:<postmistress>", Err(CommandError::BadRecipient)),
            (b"RCPT TO:<@relay.example:>", Err(CommandError::BadRecipient)),
            (b"RCPT TO:<a b@c>", Err(CommandError::BadRecipient)),
            (b"RCPT TO:<a@>", Err(CommandError::BadRecipient)),
            (b"RCPT TO:<\xff@b>", Err(CommandError::BadRecipient)),
            (over_cap.as_bytes(), Err(CommandError::BadRecipient)),
            (b"RCPT TO:<a@b> NOTIFY=NEVER", bad_param("NOTIFY")),
            (b"RCPT TO:<a@b> ORCPT=rfc822;a@b", bad_param("ORCPT")),
            (b"RCPT TO:<a@b>   ", rcpt("a@b")),
            (b"RCPT TO:<a> NOTIFY=NEVER", Err(CommandError::BadRecipient)),
        ]);
    }

    #[test]
    fn errors_map_to_replies() {
        let wire = |e: CommandError| {
            let mut out = Vec::new();
            e.reply().write_to(&mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            wire(CommandError::Unknown),
            "500 5.5.1 Command unrecognized\r\n"
        );
        assert_eq!(
            wire(parse_command(b"MAIL FROM:a@b").unwrap_err()),
            "501 5.5.2 Syntax error, expected: MAIL FROM:<address>\r\n"
        );
        assert_eq!(
            wire(CommandError::BadSender),
            "501 5.1.7 Bad sender address syntax\r\n"
        );
        assert_eq!(
            wire(CommandError::BadRecipient),
            "501 5.1.3 Bad recipient address syntax\r\n"
        );
        assert_eq!(
            wire(parse_command(b"MAIL FROM:<> RET=FULL").unwrap_err()),
            "555 5.5.4 Unsupported parameter RET\r\n"
        );
        assert_eq!(
            CommandError::Syntax { expected: "DATA" }.to_string(),
            "syntax error, expected: DATA"
        );
    }
}
