//! What the sink saw: the messages it accepted and what each connection did, kept in memory
//! behind one lock with a condition variable, so tests can wait (bounded) for a change; and the
//! optional maildir copy of each message.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustls::ProtocolVersion;

use super::SinkConfig;

/// One message the sink accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkMessage {
    /// Queue id given in `250 2.0.0 Ok: queued as <id>` (an uppercase hex counter from 1).
    pub queue_id: String,
    /// The argument of the last EHLO or HELO before this message.
    pub helo: String,
    /// The raw arguments of the last XCLIENT command of the session (after `XCLIENT `), if any.
    pub xclient: Option<String>,
    /// The raw PROXY header bytes read before the banner, if one was expected.
    pub proxy_header: Option<Vec<u8>>,
    /// The MAIL argument as sent after `FROM:`, e.g. `<a@example.com> SIZE=123`.
    pub mail_from: String,
    /// The addresses inside `<>` of the accepted RCPT commands, in order.
    pub rcpt_to: Vec<String>,
    /// The data bytes between the `354` and the terminating `.CRLF`, as on the wire: still
    /// dot-stuffed, and including the CRLF before the final dot.
    pub raw: Vec<u8>,
    /// `raw` with dot-unstuffing applied: the message as delivered.
    pub content: Vec<u8>,
    /// The data contained a bare LF (not after CR) or a bare CR (not before LF). tarmac must
    /// never pass one on (SMTP smuggling), so tests assert this is false.
    pub bare_newline_seen: bool,
    /// The TLS version the message came over, `None` for plain text: tests of downstream
    /// STARTTLS assert that the message itself, not only the session, was encrypted.
    pub tls: Option<ProtocolVersion>,
}

/// What one client connection did, recorded as it happens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkSession {
    /// The raw PROXY header bytes, once a valid one was read.
    pub proxy_header: Option<Vec<u8>>,
    /// The raw arguments of the last accepted XCLIENT command.
    pub xclient: Option<String>,
    /// Every command line received, without its line end, in order (data lines excluded),
    /// before and after STARTTLS alike.
    pub commands: Vec<String>,
    /// The TLS version negotiated after STARTTLS, once the handshake completed; `None` while
    /// the session is plain text.
    pub tls: Option<ProtocolVersion>,
    /// Bytes that had arrived after the client's STARTTLS line by the time the sink answered
    /// it, thrown away unread (RFC 3207 §4.2); a correct client sends nothing before the `220`,
    /// so tests expect 0.
    pub starttls_discarded: usize,
    /// The connection has ended and its thread is done.
    pub closed: bool,
}

/// State shared by the accept thread, the connection threads and the [`Sink`](super::Sink) handle.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: SinkConfig,
    pub(super) stopping: AtomicBool,
    /// Next queue id, also the `<n>` in maildir file names.
    pub(super) next_id: AtomicU64,
    pub(super) state: Mutex<State>,
    /// Notified on every change to `state`.
    pub(super) changed: Condvar,
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) messages: Vec<SinkMessage>,
    pub(super) sessions: Vec<SinkSession>,
}

impl Shared {
    /// A poisoned lock only means a connection thread panicked mid-update; the records are
    /// still worth reading, so the poison is ignored.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }

    pub(super) fn update_session(&self, index: usize, change: impl FnOnce(&mut SinkSession)) {
        self.update(|state| {
            if let Some(session) = state.sessions.get_mut(index) {
                change(session);
            }
        });
    }

    /// Waits until `done` holds or `timeout` passed and returns the lock either way.
    pub(super) fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&State) -> bool,
    ) -> MutexGuard<'_, State> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.lock();
        while !done(&state) {
            state = match deadline {
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    self.changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        state
    }
}
