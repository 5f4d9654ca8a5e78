//! The demo's downstream: a small SMTP server on loopback that accepts whatever tarmac relays
//! and writes each message to a directory as an `.eml` file.
//!
//! It speaks just enough SMTP for tarmac's relay (DESIGN.md §1.6, §6): a banner; EHLO or HELO,
//! whose reply offers `XCLIENT ADDR NAME PORT HELO PROTO` (the demo announces each client, and
//! tarmac does not relay without an announcement); XCLIENT, answered with a new `220` as Postfix
//! does; MAIL, RCPT, DATA, RSET, NOOP and QUIT. Every XCLIENT is taken: this sink trusts its
//! only client, as Postfix with `smtpd_authorized_xclient_hosts = static:all`. No STARTTLS, no
//! PROXY header, no checks beyond the order of commands.
//!
//! One accept thread and one thread per connection, every read and write bounded by
//! [`IO_TIMEOUT`], so a connection thread ends on its own; the threads live until the process
//! exits. The test peer that can misbehave, speaks STARTTLS and records sessions is the
//! testkit's sink (`testkit/src/sink/`), not this one.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Per-read and per-write timeout on a connection, so a silent peer cannot keep a thread forever.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest command or data line read at once, CRLF included; tarmac's own `max_line_length`
/// default for commands. A longer data line is read in several pieces, which changes nothing.
const MAX_LINE: u64 = 4096;

/// Pause after a failed accept (e.g. out of file descriptors) so the thread does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(20);

/// Binds `listen`, creates `maildir` and serves on a thread of its own until the process exits.
/// Messages are accepted up to `max_message_size` bytes (advertised as `SIZE`).
pub(super) fn start(listen: SocketAddr, maildir: PathBuf, max_message_size: u64) -> io::Result<()> {
    fs::create_dir_all(&maildir)?;
    let listener = TcpListener::bind(listen)?;
    let sink = Arc::new(Sink {
        maildir,
        max_message_size,
        next_id: AtomicU64::new(1),
    });
    thread::Builder::new()
        .name("demo-sink".to_owned())
        .spawn(move || accept_loop(&listener, &sink))?;
    Ok(())
}

/// What every connection shares.
struct Sink {
    maildir: PathBuf,
    max_message_size: u64,
    /// The next queue id, also the `<n>` of the file names.
    next_id: AtomicU64,
}

fn accept_loop(listener: &TcpListener, sink: &Arc<Sink>) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(err) => {
                log::warn!("demo sink: accept failed: {err}");
                thread::sleep(ACCEPT_ERROR_PAUSE);
                continue;
            }
        };
        let sink = Arc::clone(sink);
        let spawned = thread::Builder::new()
            .name("demo-sink-conn".to_owned())
            .spawn(move || {
                if let Err(err) = serve(stream, &sink) {
                    log::debug!("demo sink: connection ended: {err}");
                }
            });
        if let Err(err) = spawned {
            log::warn!("demo sink: cannot spawn a connection thread: {err}");
        }
    }
}

/// One connection, banner to QUIT or EOF.
fn serve(stream: TcpStream, sink: &Sink) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let banner = "220 sink.demo ESMTP tarmac demo sink\r\n";
    writer.write_all(banner.as_bytes())?;
    let mut greeted = false;
    // The open transaction's recipient count, from MAIL to the end of DATA or RSET.
    let mut transaction: Option<usize> = None;
    loop {
        let Some(line) = read_line(&mut reader)? else {
            return Ok(());
        };
        let line = String::from_utf8_lossy(line.strip_suffix(b"\r\n").unwrap_or(line.as_slice()));
        let verb = line.split(' ').next().unwrap_or_default();
        let reply = match verb.to_ascii_uppercase().as_str() {
            "EHLO" => {
                greeted = true;
                transaction = None;
                format!(
                    "250-sink.demo\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n\
                     250-ENHANCEDSTATUSCODES\r\n250-XCLIENT ADDR NAME PORT HELO PROTO\r\n\
                     250 SMTPUTF8\r\n",
                    sink.max_message_size
                )
            }
            "HELO" => {
                greeted = true;
                transaction = None;
                "250 sink.demo\r\n".to_owned()
            }
            // Postfix's XCLIENT: the session starts over, so the client greets again.
            "XCLIENT" if transaction.is_none() => {
                greeted = false;
                banner.to_owned()
            }
            "MAIL" if greeted && transaction.is_none() => {
                transaction = Some(0);
                "250 2.1.0 Ok\r\n".to_owned()
            }
            "RCPT" => match transaction.as_mut() {
                Some(recipients) => {
                    *recipients += 1;
                    "250 2.1.5 Ok\r\n".to_owned()
                }
                None => "503 5.5.1 Error: need MAIL command\r\n".to_owned(),
            },
            "DATA" => match transaction.take() {
                Some(recipients) if recipients > 0 => {
                    writer.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
                    let Some(content) = read_data(&mut reader, sink.max_message_size)? else {
                        return Ok(());
                    };
                    deliver(sink, content)
                }
                _ => "503 5.5.1 Error: need RCPT command\r\n".to_owned(),
            },
            "RSET" => {
                transaction = None;
                "250 2.0.0 Ok\r\n".to_owned()
            }
            "NOOP" => "250 2.0.0 Ok\r\n".to_owned(),
            "QUIT" => {
                writer.write_all(b"221 2.0.0 Bye\r\n")?;
                return Ok(());
            }
            "MAIL" | "XCLIENT" => "503 5.5.1 Error: bad sequence of commands\r\n".to_owned(),
            _ => "502 5.5.2 Error: command not recognized\r\n".to_owned(),
        };
        writer.write_all(reply.as_bytes())?;
    }
}

/// One line of at most [`MAX_LINE`] bytes, its line end included; `None` at EOF.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    reader.take(MAX_LINE).read_until(b'\n', &mut line)?;
    Ok((!line.is_empty()).then_some(line))
}

/// The message up to the final `.CRLF`, dot-unstuffed (RFC 5321 §4.5.2), CRLF before the dot
/// included; `Err` of kind `InvalidData` when it is over `max_size` (the whole message is still
/// read, so the connection stays in step); `None` if the client closed first.
fn read_data(reader: &mut impl BufRead, max_size: u64) -> io::Result<Option<io::Result<Vec<u8>>>> {
    let mut content = Vec::new();
    let mut too_big = false;
    // Only a line that a CRLF ended may be the final dot: a longer line read in pieces is not.
    let mut line_start = true;
    loop {
        let Some(line) = read_line(reader)? else {
            return Ok(None);
        };
        if line_start && line == b".\r\n" {
            return Ok(Some(if too_big {
                Err(io::Error::new(io::ErrorKind::InvalidData, "over SIZE"))
            } else {
                Ok(content)
            }));
        }
        let unstuffed = match line.strip_prefix(b".") {
            Some(rest) if line_start => rest,
            _ => &line,
        };
        line_start = line.ends_with(b"\r\n");
        too_big |= content.len() as u64 + unstuffed.len() as u64 > max_size;
        if !too_big {
            content.extend_from_slice(unstuffed);
        }
    }
}

/// Writes one message to the maildir; the reply to the final dot.
fn deliver(sink: &Sink, content: io::Result<Vec<u8>>) -> String {
    let Ok(content) = content else {
        return "552 5.3.4 Message size exceeds fixed limit\r\n".to_owned();
    };
    let id = sink.next_id.fetch_add(1, Ordering::Relaxed);
    match write_eml(&sink.maildir, id, &content) {
        Ok(()) => format!("250 2.0.0 Ok: queued as {id:X}\r\n"),
        Err(err) => {
            log::warn!(
                "demo sink: cannot write to {}: {err}",
                sink.maildir.display()
            );
            "451 4.3.0 Error: queue file write error\r\n".to_owned()
        }
    }
}

/// Writes `<unix-nanos>-<id>.eml` under a hidden temporary name first, so a reader of `*.eml`
/// never sees half a file. The demo's maildir format; the testkit's sink records messages in
/// the same one, through this function.
pub fn write_eml(dir: &Path, id: u64, content: &[u8]) -> io::Result<()> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let name = format!("{nanos}-{id}.eml");
    let temporary = dir.join(format!(".{name}.tmp"));
    fs::write(&temporary, content)?;
    fs::rename(&temporary, dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_unstuffed_and_ends_at_the_lone_dot() {
        let mut input: &[u8] = b"a\r\n..b\r\n.c\r\n.\r\nNEXT\r\n";
        let content = read_data(&mut input, 100).unwrap().unwrap().unwrap();
        assert_eq!(content, b"a\r\n.b\r\nc\r\n");
        assert_eq!(input, b"NEXT\r\n");
    }

    #[test]
    fn data_over_the_size_is_read_to_the_dot_and_refused() {
        let mut input: &[u8] = b"0123456789\r\n.\r\nNEXT\r\n";
        let content = read_data(&mut input, 5).unwrap().unwrap();
        assert_eq!(content.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(input, b"NEXT\r\n");
    }

    #[test]
    fn data_cut_short_is_no_message() {
        let mut input: &[u8] = b"a\r\n";
        assert!(read_data(&mut input, 100).unwrap().is_none());
    }
}
