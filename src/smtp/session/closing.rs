//! Replies and the close: every reply to the client goes through [`Session::reply`] or
//! [`Session::say`], the error and junk-command counts that end an abusive session, and the
//! sticky close ([`Session::close`]).

use std::time::Instant;

use crate::policy::reputation::Event;
use crate::smtp::reply::{EnhancedCode, Reply};

use super::{Action, Phase, Session, Timers};

/// What the client did wrong since its last delivered message, as Postfix's smtpd counts it
/// (`error_count`, `junk_cmds`): a message accepted for delivery forgives both (`smtpd.c`,
/// `data_cmd` on `CLEANUP_STAT_OK`), so a sender that delivers many messages over one session
/// is not closed for an RSET per message or a bad recipient now and then, while one that
/// delivers nothing runs into the limits.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Strikes {
    /// `Session::msgs` when these counts started: a delivery since then starts them over.
    /// Kept as a count rather than reset where the downstream's 250 is handled, so the
    /// relay path needs no hook.
    pub(super) since_msgs: u32,
    /// 4xx/5xx replies to the client's commands, greylisting's aside (`max_errors`).
    pub(super) errors: u32,
    /// NOOP, RSET, VRFY, HELP and repeated HELO/EHLO (`max_junk_commands`).
    pub(super) junk: u32,
}

impl Strikes {
    /// The counts for the period since the last delivery, `msgs` being the messages
    /// delivered so far.
    pub(super) fn current(&mut self, msgs: u32) -> &mut Strikes {
        if self.since_msgs != msgs {
            *self = Strikes {
                since_msgs: msgs,
                ..Strikes::default()
            };
        }
        self
    }
}

/// Why the session closed; becomes `result=` unless a message was delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CloseReason {
    Quit,
    Disconnect,
    Timeout,
    TooManyErrors,
    Shutdown,
    BadProxy,
    Refused,
    /// A rejected client's session ended by tarmac (enforce mode after DATA).
    Blocked,
    /// The TLS handshake failed, or a TLS record after it.
    TlsFailed,
}

impl CloseReason {
    /// `result=` in the close line when nothing more telling happened.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            CloseReason::Quit => "quit",
            CloseReason::Disconnect => "disconnect",
            CloseReason::Timeout => "timeout",
            CloseReason::TooManyErrors => "too-many-errors",
            CloseReason::Shutdown => "shutdown",
            CloseReason::BadProxy => "bad-proxy",
            CloseReason::Refused => "refused",
            CloseReason::Blocked => "rejected",
            CloseReason::TlsFailed => "tls-failed",
        }
    }
}

/// The reply that closes a session over `max_unknown_commands` or `max_errors` (Postfix's
/// wording for its hard error limit).
pub(super) fn too_many_errors(hostname: &str) -> Reply {
    let text = format!("{hostname} Error: too many errors");
    Reply::new(421, "4.7.0", text)
}

/// The refusal for a client over a connection cap (DESIGN.md §1.1), whether the driver gives
/// it at accept, before any session exists, or the session after a PROXY header.
pub fn too_many_connections(hostname: &str) -> Reply {
    let text = format!("{hostname} Too many connections, try again later");
    Reply::new(421, "4.7.0", text)
}

/// The refusal for a transparent connection whose original destination is this host itself
/// (DESIGN.md §9; `policy::transparent`): relaying it would connect tarmac to itself, again
/// and again, or to a local service under the host's own address. Given at accept, before any session exists. `4.3.5` is RFC 3463's "system incorrectly
/// configured": the firewall rule that sent the connection here, or a client aiming at the
/// transparent port itself.
pub fn loop_refusal(hostname: &str) -> Reply {
    let text = format!("{hostname} Error: destination is this gateway itself (mail loop)");
    Reply::new(421, "4.3.5", text)
}

impl Session {
    /// Answers a client command. A 4xx or 5xx (tarmac's own or the downstream's, relayed)
    /// counts toward `max_errors`; the one that reaches it is followed at once by `421 4.7.0
    /// <hostname> Error: too many errors` and the close. Postfix checks `error_count >=
    /// smtpd_hard_error_limit` before reading the next command, so it says the same after the
    /// same reply; closing here rather than at the next read also closes a client that sends
    /// nothing more, without waiting for its timeout.
    pub(super) fn reply(&mut self, reply: Reply) {
        let failed = reply.code >= 400;
        self.refusals.count(self.answering, reply.code);
        self.say(reply);
        if failed {
            self.count_error();
        }
    }

    /// Writes a reply for the client that is no answer to a command (greeting, the close's
    /// `421`), or whose failure is not the client's doing (greylisting): nothing is counted.
    pub(super) fn say(&mut self, reply: Reply) {
        reply.write_to(&mut self.to_client);
    }

    /// One more junk command (NOOP, RSET, VRFY, HELP, a repeated HELO/EHLO), counted after its
    /// reply as Postfix's smtpd does with `smtpd_junk_command_limit`: past `max_junk_commands`
    /// each one counts as an error toward `max_errors` (Postfix: `if (junk_cmds++ >
    /// limit) error_count++`, per session, forgiven by a delivered message), so the client gets
    /// Postfix's `421 4.7.0 <hostname> Error: too many errors` once errors reach that limit,
    /// not a reply of its own. Without this a client could hold its session, and the downstream
    /// connection it opened, for ever with a NOOP every few minutes. One difference: Postfix's
    /// post-increment lets one more junk command through than its limit says; here the first
    /// one past `max_junk_commands` counts.
    pub(super) fn count_junk(&mut self) {
        if self.is_closed() {
            return;
        }
        let strikes = self.strikes.current(self.msgs);
        strikes.junk += 1;
        if strikes.junk > self.config.limits.max_junk_commands {
            self.count_error();
        }
    }

    /// One more error against `max_errors` (see [`Session::reply`]).
    pub(super) fn count_error(&mut self) {
        if self.is_closed() {
            return;
        }
        let strikes = self.strikes.current(self.msgs);
        strikes.errors += 1;
        if strikes.errors >= self.config.limits.max_errors {
            log::info!(
                "too many errors from {}: {} since its last delivered message",
                self.peer.client,
                strikes.errors
            );
            self.last_failure = Some("too-many-errors");
            // As over `max_unknown_commands`: a client that piles up errors (a dictionary
            // attack on recipients, a NOOP flood) is abusing the protocol.
            self.record_reputation(Event::ProtocolAbuse);
            let reply = too_many_errors(&self.config.server.hostname);
            self.close(CloseReason::TooManyErrors, Some(reply));
        }
    }

    /// A downstream reply goes back to the client as it came, with an enhanced code added
    /// when the downstream gave none (every tarmac reply carries one, RFC 3463).
    pub(super) fn relay_reply(&mut self, mut reply: Reply) {
        if reply.enhanced.is_none() && reply.code != 354 {
            let class = u8::try_from(reply.code / 100).unwrap_or(4);
            reply.enhanced = Some(EnhancedCode(class, 0, 0));
        }
        self.reply(reply);
    }

    pub(super) fn check_shutdown(&mut self, _now: Instant) {
        if self.shutting_down
            && !self.is_closed()
            && matches!(self.phase, Phase::Command)
            && self.tx.is_none()
            && self.lines.partial().is_empty()
        {
            self.close_for_shutdown();
        }
    }

    pub(super) fn close_for_shutdown(&mut self) {
        // No tarpit for the goodbye: shutting down is bounded by the drain time.
        self.leave_tarpit();
        let text = format!(
            "{} Service shutting down, please try again later",
            self.config.server.hostname
        );
        self.close(CloseReason::Shutdown, Some(Reply::new(421, "4.3.2", text)));
    }

    /// Ends tarpitting: what is held goes out at once, whole, ahead of anything newer, so the
    /// client reads complete lines.
    pub(super) fn leave_tarpit(&mut self) {
        if let Some(mut tarpit) = self.tarpit.take() {
            let mut held = Vec::new();
            tarpit.release_all(&mut held);
            held.append(&mut self.to_client);
            self.to_client = held;
        }
    }

    /// Enters the sticky closed state: final reply queued, downstream dropped, `Close` once.
    /// While a handshake is due or running, no reply: the client expects TLS records.
    pub(super) fn close(&mut self, reason: CloseReason, reply: Option<Reply>) {
        if self.is_closed() {
            return;
        }
        if let Some(reply) = reply.filter(|_| !matches!(self.phase, Phase::StartingTls)) {
            self.say(reply);
        }
        self.let_go_of_relay(true);
        self.quit_milters();
        self.phase = Phase::Closed(reason);
        self.timers = Timers::default();
        self.lines.free();
        if reason == CloseReason::Disconnect {
            // Nobody is left to read what the tarpit holds.
            if let Some(tarpit) = self.tarpit.as_deref_mut() {
                tarpit.discard();
            }
            self.to_client.clear();
        } else if self.is_holding() {
            // The last reply goes out on its schedule; `poll_transmit` sends `Close` after it.
            self.phase = Phase::Closing(reason);
            return;
        }
        self.actions.push_back(Action::Close);
    }
}
