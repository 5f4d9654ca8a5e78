//! One connection to one milter for one SMTP session, over tokio (the scanner thread's
//! runtime): connect and negotiate, then one call per SMTP stage, each bounded by a timeout
//! that `SMFIR_PROGRESS` restarts. Every decision is the [`Conversation`]'s; this file moves
//! bytes and reads the held message.
//!
//! Any I/O error, timeout or malformed answer is an `Err(Failure)`; the link is then unusable
//! (the caller drops it, which closes the socket) and `on_failure` decides.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use super::codec::{Command, MAX_BODY_CHUNK, ResponseDecoder};
use super::conversation::{
    Conversation, MAX_REPLACED_BODY, Stage, Start, Step, bracketed, connect_command,
    header_value_out,
};
use crate::content::held::Held;
use crate::content::message::header_block;
use crate::content::{Edit, Failure, MilterAddr, Verdict};

/// The usual macros, given by the caller per stage as (name, value) pairs: `j`,
/// `{client_addr}`, `{client_name}`, `{daemon_name}`, `{mail_addr}`, `{rcpt_addr}`,
/// `{tls_version}`, `i`. Milters such as OpenDKIM read them to log and to decide.
pub type Macros<'a> = &'a [(&'a str, &'a str)];

/// The client as `SMFIC_CONNECT` describes it.
#[derive(Clone, Copy, Debug)]
pub struct ConnectInfo<'a> {
    /// The verified rDNS name, or `unknown` (sent as `[address]`, as Postfix does).
    pub hostname: &'a str,
    /// The client's address and port.
    pub addr: SocketAddr,
}

/// What one milter said about one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageOutcome {
    /// The final verdict.
    pub verdict: Verdict,
    /// The header and body changes to apply (empty unless the verdict relays).
    pub edits: Vec<Edit>,
    /// One log text per refused request: envelope changes (never applied), quarantine.
    pub refused: Vec<String>,
}

/// Bytes read from the milter per read call.
const READ_CHUNK: usize = 16 * 1024;

/// Unanswered frames (NR stages, body chunks of a milter that does not answer them) are
/// gathered up to this size before being written, so a body costs few writes.
const WRITE_BATCH: usize = 256 * 1024;

#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    async fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = match self {
                Stream::Tcp(s) => {
                    s.writable().await?;
                    s.try_write(bytes)
                }
                Stream::Unix(s) => {
                    s.writable().await?;
                    s.try_write(bytes)
                }
            };
            match n {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = match self {
                Stream::Tcp(s) => {
                    s.readable().await?;
                    s.try_read(buf)
                }
                Stream::Unix(s) => {
                    s.readable().await?;
                    s.try_read(buf)
                }
            };
            match n {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
        }
    }

    /// One non-blocking write attempt, for QUIT on the way out.
    fn try_write(&self, bytes: &[u8]) {
        let _ = match self {
            Stream::Tcp(s) => s.try_write(bytes),
            Stream::Unix(s) => s.try_write(bytes),
        };
    }
}

/// One connection to one milter (`Send`: it moves with its session's requests).
#[derive(Debug)]
pub struct MilterLink {
    stream: Stream,
    decoder: ResponseDecoder,
    conversation: Conversation,
    out: Vec<u8>,
}

/// `future` within `timeout`; an elapsed timer is [`Failure::Timeout`].
async fn bounded<T>(
    deadline: Instant,
    future: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout_at(deadline, future)
        .await
        .unwrap_or(Err(Failure::Timeout))
}

fn io_failure(e: io::Error) -> Failure {
    Failure::Io(e.to_string())
}

impl MilterLink {
    /// Connects to `addr` and negotiates (version 6; see [`Conversation::handle_optneg`] for
    /// what is refused). The connect and the negotiation each have `timeout`.
    pub async fn open(addr: &MilterAddr, timeout: Duration) -> Result<MilterLink, Failure> {
        let connect = async {
            match addr {
                MilterAddr::Inet(sa) => TcpStream::connect(sa).await.map(|s| {
                    // Small frames answered one by one: Nagle would add delays.
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
                MilterAddr::Unix(path) => UnixStream::connect(path).await.map(Stream::Unix),
            }
            .map_err(|e| Failure::Connect(e.to_string()))
        };
        let stream = bounded(Instant::now() + timeout, connect).await?;
        let mut link = MilterLink {
            stream,
            decoder: ResponseDecoder::new(),
            conversation: Conversation::new(MAX_REPLACED_BODY),
            out: Vec::new(),
        };
        link.conversation.offer(&mut link.out);
        link.flush(timeout).await?;
        let deadline = Instant::now() + timeout;
        let response = bounded(deadline, link.next_response()).await?;
        link.conversation.handle_optneg(response)?;
        Ok(link)
    }

    /// The client's connection (`SMFIC_CONNECT`).
    pub async fn connect(
        &mut self,
        info: &ConnectInfo<'_>,
        macros: Macros<'_>,
        timeout: Duration,
    ) -> Result<Verdict, Failure> {
        let command = connect_command(info.hostname, info.addr);
        self.stage(Stage::Connect, &command, macros, timeout).await
    }

    /// HELO or EHLO (`SMFIC_HELO`).
    pub async fn helo(
        &mut self,
        helo: &str,
        macros: Macros<'_>,
        timeout: Duration,
    ) -> Result<Verdict, Failure> {
        let command = Command::Helo(helo.to_owned());
        self.stage(Stage::Helo, &command, macros, timeout).await
    }

    /// MAIL FROM (`SMFIC_MAIL`): `from` without brackets (empty: the null sender) and its
    /// ESMTP arguments. A transaction still open is aborted first.
    pub async fn mail(
        &mut self,
        from: &str,
        args: &[&str],
        macros: Macros<'_>,
        timeout: Duration,
    ) -> Result<Verdict, Failure> {
        let command = Command::Mail(envelope_args(from, args));
        self.stage(Stage::Mail, &command, macros, timeout).await
    }

    /// RCPT TO (`SMFIC_RCPT`): `to` without brackets and its ESMTP arguments. A refusal is
    /// for this recipient; a discard is for the whole message.
    pub async fn rcpt(
        &mut self,
        to: &str,
        args: &[&str],
        macros: Macros<'_>,
        timeout: Duration,
    ) -> Result<Verdict, Failure> {
        let command = Command::Rcpt(envelope_args(to, args));
        self.stage(Stage::Rcpt, &command, macros, timeout).await
    }

    /// DATA (if negotiated), each header of `held` (content::message::header_block), EOH, the
    /// body from `body_offset` in chunks of at most 65,535 bytes (stop early on SKIP), EOB;
    /// then the modifications and the final verdict. The macros go with DATA and with EOB.
    /// `timeout` bounds each stage (each header, each body chunk, the final answer), as
    /// `[content] timeout` says for milters, and `SMFIR_PROGRESS` restarts it.
    /// A verdict other than continue before EOB ends the message there (the transaction is
    /// closed with `SMFIC_ABORT`); either way the link is ready for the next MAIL.
    pub async fn message(
        &mut self,
        held: &Held,
        macros: Macros<'_>,
        timeout: Duration,
    ) -> Result<MessageOutcome, Failure> {
        let early = self.message_stages(held, macros, timeout).await?;
        let verdict = match early {
            Some(verdict) => verdict,
            None => {
                self.stage(Stage::Eob, &Command::BodyEob, macros, timeout)
                    .await?
            }
        };
        let (edits, refused) = self.conversation.take_outcome(&verdict);
        // Ended before EOB was answered: close the transaction for the next MAIL.
        self.conversation.end_message(&mut self.out);
        if !self.out.is_empty() {
            self.flush(timeout).await?;
        }
        Ok(MessageOutcome {
            verdict,
            edits,
            refused,
        })
    }

    /// DATA, headers, EOH and body; `Some(verdict)` when one of them ended the message.
    async fn message_stages(
        &mut self,
        held: &Held,
        macros: Macros<'_>,
        timeout: Duration,
    ) -> Result<Option<Verdict>, Failure> {
        let early = |v: Verdict| (v != Verdict::Continue).then_some(v);
        if let Some(v) = early(
            self.stage(Stage::Data, &Command::Data, macros, timeout)
                .await?,
        ) {
            return Ok(Some(v));
        }
        let block = header_block(held).map_err(io_failure)?;
        let leading_space = self
            .conversation
            .negotiated()
            .is_some_and(|n| n.leading_space());
        if !self.conversation.skips(Stage::Header) {
            for field in &block.fields {
                let command = Command::Header {
                    name: field.name.clone(),
                    value: header_value_out(&field.value, field.trimmed_value(), leading_space),
                };
                let v = self.stage(Stage::Header, &command, &[], timeout).await?;
                if let Some(v) = early(v) {
                    return Ok(Some(v));
                }
            }
        }
        if let Some(v) = early(self.stage(Stage::Eoh, &Command::Eoh, &[], timeout).await?) {
            return Ok(Some(v));
        }
        let mut offset = block.body_offset;
        while !self.conversation.skips(Stage::Body) {
            let chunk = held
                .read_range(offset, offset.saturating_add(MAX_BODY_CHUNK as u64))
                .map_err(io_failure)?;
            if chunk.is_empty() {
                break;
            }
            offset += chunk.len() as u64;
            let v = self
                .stage(Stage::Body, &Command::Body(chunk), &[], timeout)
                .await?;
            if let Some(v) = early(v) {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// The client's transaction ended without a message reaching EOB (RSET, a refused RCPT
    /// set, …): `SMFIC_ABORT` (nothing when no transaction is open).
    pub async fn abort(&mut self, timeout: Duration) -> Result<(), Failure> {
        self.conversation.end_message(&mut self.out);
        self.flush(timeout).await
    }

    /// `SMFIC_QUIT` and close. The QUIT is one non-blocking write: a milter that does not
    /// take it sees the connection close, which libmilter treats the same.
    pub async fn quit(mut self) {
        Command::Quit.encode(&mut self.out);
        self.stream.try_write(&self.out);
    }

    /// Texts for the log outside a message (a discard at connection level, ignored).
    pub fn take_notes(&mut self) -> Vec<String> {
        self.conversation.take_notes()
    }

    /// One stage: send it (or not), then read until its answer.
    async fn stage(
        &mut self,
        stage: Stage,
        command: &Command,
        macros: Macros<'_>,
        timeout: Duration,
    ) -> Result<Verdict, Failure> {
        match self
            .conversation
            .start(stage, command, macros, &mut self.out)
        {
            Start::Answered(verdict) => {
                if self.out.len() >= WRITE_BATCH || !stage_batches(stage) {
                    self.flush(timeout).await?;
                }
                Ok(verdict)
            }
            Start::Await => {
                self.flush(timeout).await?;
                let mut deadline = Instant::now() + timeout;
                loop {
                    let response = bounded(deadline, self.next_response()).await?;
                    match self.conversation.handle_response(response)? {
                        Step::Done(verdict) => return Ok(verdict),
                        Step::Recorded => {}
                        Step::Progress => deadline = Instant::now() + timeout,
                    }
                }
            }
        }
    }

    async fn flush(&mut self, timeout: Duration) -> Result<(), Failure> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let stream = &mut self.stream;
        let write = async { stream.write_all(&out).await.map_err(io_failure) };
        let result = bounded(Instant::now() + timeout, write).await;
        // Keep the allocation for the next frames.
        self.out = out;
        self.out.clear();
        result
    }

    /// Reads until one whole response is decoded.
    async fn next_response(&mut self) -> Result<super::codec::Response, Failure> {
        let mut buf = [0u8; READ_CHUNK];
        loop {
            if let Some(response) = self.decoder.next_response()? {
                return Ok(response);
            }
            match self.stream.read(&mut buf).await.map_err(io_failure)? {
                0 => {
                    return Err(Failure::Io("the milter closed the connection".to_owned()));
                }
                n => self.decoder.push(buf.get(..n).unwrap_or_default()),
            }
        }
    }
}

/// Whether unanswered frames of `stage` may wait in the batch (header and body frames of one
/// message); the others go out at once.
fn stage_batches(stage: Stage) -> bool {
    matches!(
        stage,
        Stage::Header | Stage::Body | Stage::Eoh | Stage::Data
    )
}

fn envelope_args(address: &str, args: &[&str]) -> Vec<String> {
    let mut all = vec![bracketed(address)];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    all
}
