//! The script each connection runs: Postfix's replies to a banner, EHLO/HELO, XCLIENT, MAIL,
//! RCPT, DATA, RSET, NOOP and QUIT, in order, strict where tarmac could get things wrong (the
//! `sink` module says where), with the configured [`Behaviour`] applied at each step. STARTTLS
//! is in `tls`, the data phase in `data`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::ProxyVersion;
use super::behaviour::Behaviour;
use super::data::{DataEnd, read_data, unstuff};
use super::record::{Shared, SinkMessage};
use super::tls::Stream;
use tarmac::demo::write_eml;

/// Per-read and per-write timeout on a connection, so a silent peer cannot keep a thread forever.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest command line accepted, CRLF included; tarmac's own `max_line_length` default. Longer
/// gets `500` and a close.
const MAX_COMMAND_LINE: u64 = 4096;

/// Longest PROXY v1 header, CRLF included (the limit in the PROXY protocol specification).
const MAX_PROXY_V1: u64 = 107;

/// Recipients per transaction, Postfix's `smtpd_recipient_limit` default; bounds memory.
const MAX_RECIPIENTS: usize = 1000;

/// The first 12 bytes of every PROXY v2 header.
pub(super) const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The XCLIENT attributes the sink advertises and accepts.
const XCLIENT_ATTRIBUTES: [&str; 5] = ["ADDR", "NAME", "PORT", "HELO", "PROTO"];

/// One client connection, driven by its own thread.
pub(super) struct Connection<'a> {
    pub(super) shared: &'a Shared,
    pub(super) index: usize,
    /// Commands are read through this buffer, so pipelined commands are answered in order;
    /// replies are written to the stream inside it.
    pub(super) reader: BufReader<Stream>,
    pub(super) helo: Option<String>,
    pub(super) xclient: Option<String>,
    pub(super) proxy_header: Option<Vec<u8>>,
    pub(super) transaction: Option<Transaction>,
}

/// An open mail transaction: between an accepted MAIL and the end of DATA or RSET.
pub(super) struct Transaction {
    mail_from: String,
    rcpt_to: Vec<String>,
}

/// One command line read from the client.
pub(super) enum Input {
    /// A line ended by CRLF, without it.
    Line(String),
    /// A line ended by a bare LF, without it.
    BareLf(String),
    /// No line end within [`MAX_COMMAND_LINE`] bytes.
    TooLong,
    /// The client closed (a partial last line is dropped).
    Eof,
}

/// Whether the connection goes on after a command.
pub(super) enum Next {
    Continue,
    Close,
}

impl<'a> Connection<'a> {
    pub(super) fn new(stream: TcpStream, shared: &'a Shared, index: usize) -> io::Result<Self> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        // Replies are small writes answered by the next command; Nagle would add a delayed-ACK
        // round trip to each of them.
        stream.set_nodelay(true)?;
        Ok(Self {
            shared,
            index,
            reader: BufReader::new(Stream::Plain(stream)),
            helo: None,
            xclient: None,
            proxy_header: None,
            transaction: None,
        })
    }

    pub(super) fn run(&mut self) -> io::Result<()> {
        if let Some(version) = self.shared.config.expect_proxy {
            let Some(header) = self.read_proxy_header(version)? else {
                return Ok(());
            };
            self.proxy_header = Some(header.clone());
            self.shared
                .update_session(self.index, |session| session.proxy_header = Some(header));
        }
        if self.shared.config.behaviour == Behaviour::NoBanner {
            return self.drain_silently();
        }
        self.send(&self.banner())?;
        loop {
            let line = match self.read_command()? {
                Input::Line(line) => line,
                Input::BareLf(line) => {
                    self.record(&line);
                    return self.send("521 5.5.2 Error: bare <LF> received\r\n");
                }
                Input::TooLong => return self.send("500 5.5.2 Error: line too long\r\n"),
                Input::Eof => return Ok(()),
            };
            self.record(&line);
            if self.shared.config.behaviour == Behaviour::CloseAfterBanner {
                return Ok(());
            }
            let (verb, arg) = line.split_once(' ').unwrap_or((&line, ""));
            let reply = match verb.to_ascii_uppercase().as_str() {
                "EHLO" => self.handle_helo(arg, true),
                "HELO" => self.handle_helo(arg, false),
                "XCLIENT" if self.shared.config.offer_xclient => self.handle_xclient(arg),
                "STARTTLS" if self.offers_starttls() || self.is_tls() => {
                    match self.handle_starttls(arg)? {
                        Next::Continue => continue,
                        Next::Close => return Ok(()),
                    }
                }
                "MAIL" => self.handle_mail(arg),
                "RCPT" => self.handle_rcpt(arg),
                "DATA" => match self.handle_data(arg)? {
                    Next::Continue => continue,
                    Next::Close => return Ok(()),
                },
                "RSET" => {
                    self.transaction = None;
                    "250 2.0.0 Ok\r\n".to_owned()
                }
                "NOOP" => "250 2.0.0 Ok\r\n".to_owned(),
                "QUIT" => {
                    self.send("221 2.0.0 Bye\r\n")?;
                    return self.reader.get_mut().finish();
                }
                _ => "502 5.5.2 Error: command not recognized\r\n".to_owned(),
            };
            self.send(&reply)?;
        }
    }

    fn handle_helo(&mut self, arg: &str, extended: bool) -> String {
        if arg.is_empty() {
            let verb = if extended { "EHLO" } else { "HELO" };
            return format!("501 5.5.4 Syntax: {verb} hostname\r\n");
        }
        // RFC 5321 §4.1.4: EHLO/HELO also resets any transaction in progress.
        self.helo = Some(arg.to_owned());
        self.transaction = None;
        let config = &self.shared.config;
        if !extended {
            return format!("250 {}\r\n", config.hostname);
        }
        let mut reply = format!(
            "250-{}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n",
            config.hostname, config.max_message_size
        );
        if self.may_xclient() {
            reply.push_str("250-XCLIENT ADDR NAME PORT HELO PROTO\r\n");
        }
        if self.offers_starttls() {
            reply.push_str("250-STARTTLS\r\n");
        }
        reply.push_str("250 SMTPUTF8\r\n");
        reply
    }

    /// Whether XCLIENT is offered and accepted now: configured, and not used yet on this
    /// connection (or [`SinkConfig::xclient_again`](super::SinkConfig::xclient_again)).
    fn may_xclient(&self) -> bool {
        let config = &self.shared.config;
        config.offer_xclient && (self.xclient.is_none() || config.xclient_again)
    }

    /// Postfix's XCLIENT: attributes replace what the server knows about the client and the
    /// session starts over with a fresh banner, so the client has to send EHLO again.
    fn handle_xclient(&mut self, arg: &str) -> String {
        if self.transaction.is_some() {
            return "503 5.5.1 Error: MAIL transaction in progress\r\n".to_owned();
        }
        if !self.may_xclient() {
            return "550 5.7.0 Error: insufficient authorization\r\n".to_owned();
        }
        if arg.is_empty() {
            return "501 5.5.4 Syntax: XCLIENT attribute=value...\r\n".to_owned();
        }
        for attribute in arg.split(' ') {
            let Some((name, value)) = attribute.split_once('=') else {
                return "501 5.5.4 Error: bad XCLIENT attribute syntax\r\n".to_owned();
            };
            if !XCLIENT_ATTRIBUTES
                .iter()
                .any(|known| known.eq_ignore_ascii_case(name))
            {
                return "501 5.5.4 Error: bad XCLIENT attribute name\r\n".to_owned();
            }
            if !is_xtext(value.as_bytes()) {
                return "501 5.5.4 Error: bad XCLIENT attribute value\r\n".to_owned();
            }
        }
        let xclient = arg.to_owned();
        self.xclient = Some(xclient.clone());
        self.helo = None;
        self.shared
            .update_session(self.index, |session| session.xclient = Some(xclient));
        self.banner()
    }

    fn handle_mail(&mut self, arg: &str) -> String {
        if self.helo.is_none() {
            return "503 5.5.1 Error: send HELO/EHLO first\r\n".to_owned();
        }
        if self.transaction.is_some() {
            return "503 5.5.1 Error: nested MAIL command\r\n".to_owned();
        }
        let Some(from) = strip_prefix_ignore_case(arg, "FROM:") else {
            return "501 5.5.4 Syntax: MAIL FROM:<address>\r\n".to_owned();
        };
        let Some((_address, params)) = from.strip_prefix('<').and_then(|r| r.split_once('>'))
        else {
            return "501 5.1.7 Bad sender address syntax\r\n".to_owned();
        };
        for param in params.split_whitespace() {
            let Some(size) = strip_prefix_ignore_case(param, "SIZE=") else {
                continue;
            };
            match size.parse::<u64>() {
                Ok(size) if size > self.shared.config.max_message_size => {
                    return "552 5.3.4 Message size exceeds fixed limit\r\n".to_owned();
                }
                Ok(_) => {}
                Err(_) => return "501 5.5.4 Bad message size syntax\r\n".to_owned(),
            }
        }
        if self.shared.config.behaviour == Behaviour::TempFailMail {
            return "451 4.3.0 Try again later\r\n".to_owned();
        }
        self.transaction = Some(Transaction {
            mail_from: from.to_owned(),
            rcpt_to: Vec::new(),
        });
        "250 2.1.0 Ok\r\n".to_owned()
    }

    fn handle_rcpt(&mut self, arg: &str) -> String {
        let Some(transaction) = self.transaction.as_mut() else {
            return "503 5.5.1 Error: need MAIL command\r\n".to_owned();
        };
        let Some(to) = strip_prefix_ignore_case(arg, "TO:") else {
            return "501 5.5.4 Syntax: RCPT TO:<address>\r\n".to_owned();
        };
        let Some((address, _params)) = to.strip_prefix('<').and_then(|r| r.split_once('>')) else {
            return "501 5.1.3 Bad recipient address syntax\r\n".to_owned();
        };
        if address.is_empty() {
            return "501 5.1.3 Bad recipient address syntax\r\n".to_owned();
        }
        if transaction.rcpt_to.len() >= MAX_RECIPIENTS {
            return "452 4.5.3 Error: too many recipients\r\n".to_owned();
        }
        match &self.shared.config.behaviour {
            Behaviour::RejectRcpt(needle) if address.contains(needle.as_str()) => {
                format!("550 5.1.1 <{address}>: Recipient address rejected: User unknown\r\n")
            }
            Behaviour::MultilineRcpt => {
                transaction.rcpt_to.push(address.to_owned());
                "250-2.1.5 first\r\n250-2.1.5 second\r\n250 2.1.5 Ok\r\n".to_owned()
            }
            _ => {
                transaction.rcpt_to.push(address.to_owned());
                "250 2.1.5 Ok\r\n".to_owned()
            }
        }
    }

    /// DATA, the message, and the reply to the final dot. The transaction ends here whatever
    /// the outcome.
    fn handle_data(&mut self, arg: &str) -> io::Result<Next> {
        if !arg.is_empty() {
            self.send("501 5.5.4 Syntax: DATA\r\n")?;
            return Ok(Next::Continue);
        }
        let has_recipients = match &self.transaction {
            None => {
                self.send("503 5.5.1 Error: need RCPT command\r\n")?;
                return Ok(Next::Continue);
            }
            Some(transaction) => !transaction.rcpt_to.is_empty(),
        };
        if !has_recipients {
            self.send("554 5.5.1 Error: no valid recipients\r\n")?;
            return Ok(Next::Continue);
        }
        self.send("354 End data with <CR><LF>.<CR><LF>\r\n")?;
        let end = read_data(&mut self.reader, self.shared.config.max_message_size)?;
        let Some(transaction) = self.transaction.take() else {
            // Checked above; nothing between there and here clears it.
            return Ok(Next::Close);
        };
        let (raw, bare_newline) = match end {
            DataEnd::Abandoned => return Ok(Next::Close),
            _ if self.shared.config.behaviour == Behaviour::CloseAfterDataDot => {
                return Ok(Next::Close);
            }
            _ if self.shared.config.behaviour == Behaviour::StallAfterData => {
                self.drain_silently()?;
                return Ok(Next::Close);
            }
            DataEnd::TooBig => {
                self.send("552 5.3.4 Message size exceeds fixed limit\r\n")?;
                return Ok(Next::Continue);
            }
            DataEnd::Complete { .. } if self.shared.config.behaviour == Behaviour::RejectData => {
                self.send("554 5.7.1 Message rejected\r\n")?;
                return Ok(Next::Continue);
            }
            DataEnd::Complete { raw, bare_newline } => (raw, bare_newline),
        };
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let content = unstuff(&raw);
        if let Some(dir) = &self.shared.config.maildir {
            if let Err(err) = write_eml(dir, id, &content) {
                log::warn!("sink: cannot write to {}: {err}", dir.display());
                self.send("451 4.3.0 Error: queue file write error\r\n")?;
                return Ok(Next::Continue);
            }
        }
        let queue_id = format!("{id:X}");
        let message = SinkMessage {
            queue_id: queue_id.clone(),
            helo: self.helo.clone().unwrap_or_default(),
            xclient: self.xclient.clone(),
            proxy_header: self.proxy_header.clone(),
            mail_from: transaction.mail_from,
            rcpt_to: transaction.rcpt_to,
            raw,
            content,
            bare_newline_seen: bare_newline,
            tls: self.reader.get_ref().tls_version(),
        };
        self.shared.update(|state| state.messages.push(message));
        self.send(&format!("250 2.0.0 Ok: queued as {queue_id}\r\n"))?;
        Ok(Next::Continue)
    }

    /// Reads and records whatever the client sends, answering nothing, until it closes or the
    /// read times out.
    fn drain_silently(&mut self) -> io::Result<()> {
        loop {
            match self.read_command()? {
                Input::Line(line) | Input::BareLf(line) => self.record(&line),
                Input::TooLong => {}
                Input::Eof => return Ok(()),
            }
        }
    }

    /// Reads a PROXY header; `None` when it is malformed or the client closed first.
    fn read_proxy_header(&mut self, version: ProxyVersion) -> io::Result<Option<Vec<u8>>> {
        match version {
            ProxyVersion::V1 => {
                let mut line = Vec::new();
                (&mut self.reader)
                    .take(MAX_PROXY_V1)
                    .read_until(b'\n', &mut line)?;
                let valid = line.starts_with(b"PROXY ") && line.ends_with(b"\r\n");
                Ok(valid.then_some(line))
            }
            ProxyVersion::V2 => {
                let mut head = [0; 16];
                self.reader.read_exact(&mut head)?;
                let [signature @ .., version_command, _family, len_high, len_low] = head;
                if signature != PROXY_V2_SIGNATURE || version_command >> 4 != 2 {
                    return Ok(None);
                }
                let mut payload = vec![0; usize::from(u16::from_be_bytes([len_high, len_low]))];
                self.reader.read_exact(&mut payload)?;
                let mut header = head.to_vec();
                header.extend_from_slice(&payload);
                Ok(Some(header))
            }
        }
    }

    fn read_command(&mut self) -> io::Result<Input> {
        let mut line = Vec::new();
        (&mut self.reader)
            .take(MAX_COMMAND_LINE)
            .read_until(b'\n', &mut line)?;
        if let Some(text) = line.strip_suffix(b"\r\n") {
            return Ok(Input::Line(String::from_utf8_lossy(text).into_owned()));
        }
        if let Some(text) = line.strip_suffix(b"\n") {
            return Ok(Input::BareLf(String::from_utf8_lossy(text).into_owned()));
        }
        Ok(if line.len() as u64 >= MAX_COMMAND_LINE {
            Input::TooLong
        } else {
            Input::Eof
        })
    }

    fn record(&self, line: &str) {
        self.shared
            .update_session(self.index, |session| session.commands.push(line.to_owned()));
    }

    fn banner(&self) -> String {
        format!("220 {} ESMTP tarmac-sink\r\n", self.shared.config.hostname)
    }

    pub(super) fn send(&mut self, reply: &str) -> io::Result<()> {
        let stream = self.reader.get_mut();
        stream.write_all(reply.as_bytes())?;
        stream.flush()
    }
}

/// xtext (RFC 3461 §4): printable ASCII except `+` and `=`, which appear as `+XX` (uppercase
/// hex), like every other byte outside that range.
fn is_xtext(value: &[u8]) -> bool {
    let mut bytes = value.iter();
    while let Some(&byte) = bytes.next() {
        let valid = match byte {
            b'+' => {
                let is_hex =
                    |b: Option<&u8>| b.is_some_and(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F'));
                is_hex(bytes.next()) && is_hex(bytes.next())
            }
            b'=' => false,
            33..=126 => true,
            _ => false,
        };
        if !valid {
            return false;
        }
    }
    true
}

fn strip_prefix_ignore_case<'s>(text: &'s str, prefix: &str) -> Option<&'s str> {
    let head = text.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        text.get(prefix.len()..)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::is_xtext;

    #[test]
    fn xtext_accepts_printable_and_uppercase_hex_escapes() {
        assert!(is_xtext(b""));
        assert!(is_xtext(b"[UNAVAILABLE]"));
        assert!(is_xtext(b"IPV6:2001:db8::1"));
        assert!(is_xtext(b"a+2Bb+3D"));
        assert!(!is_xtext(b"a b"));
        assert!(!is_xtext(b"a=b"));
        assert!(!is_xtext(b"a+2b"));
        assert!(!is_xtext(b"a+"));
        assert!(!is_xtext("é".as_bytes()));
    }
}
