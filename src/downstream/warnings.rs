//! Warnings about the downstream's configuration that only its operator can fix: logged once
//! per server and hour, so a busy gateway says it plainly without a line per client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::AnnounceClient;
use crate::smtp::Reply;

/// How often the same warning about the same server is repeated.
const EVERY: Duration = Duration::from_secs(3600);

/// Which warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    AnnouncementRefused,
    Retired,
}

/// When each warning was last logged, per server. Bounded by the servers configured (times
/// two kinds), whatever the clients do.
static LAST: Mutex<Option<HashMap<(Kind, SocketAddr), Instant>>> = Mutex::new(None);

/// Whether the warning `kind` about `server` is due at `now` (and, if so, marks it logged).
fn due(kind: Kind, server: SocketAddr, now: Instant) -> bool {
    let mut last = LAST.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let last = last.get_or_insert_with(HashMap::new);
    match last.get(&(kind, server)) {
        Some(&at) if now.saturating_duration_since(at) < EVERY => false,
        _ => {
            last.insert((kind, server), now);
            true
        }
    }
}

/// A new connection to `server` would not take XCLIENT (`reply`: its refusal; `None`: not
/// offered), so clients' mail is deferred rather than relayed under tarmac's address.
pub(crate) fn announcement_refused(server: SocketAddr, reply: Option<&Reply>, now: Instant) {
    if !due(Kind::AnnouncementRefused, server, now) {
        return;
    }
    let what = match reply {
        None => "does not offer XCLIENT".to_owned(),
        Some(reply) => format!(
            "refused XCLIENT ({} {})",
            reply.code,
            reply.lines.first().map_or("", String::as_str)
        ),
    };
    log::warn!(
        "downstream {server} {what}: clients' MAIL gets 451 4.3.5 instead of being relayed \
         under tarmac's own address; add tarmac's address to the downstream's \
         smtpd_authorized_xclient_hosts (Postfix), or set [downstream] announce_client = \"none\" \
         to relay anonymously"
    );
}

/// A connection to `server` that served one client could not be announced for the next
/// (`announce`), so it was closed and a new one opened.
pub(crate) fn connection_retired(server: SocketAddr, announce: AnnounceClient, now: Instant) {
    if !due(Kind::Retired, server, now) {
        return;
    }
    match announce {
        AnnounceClient::Xclient => log::warn!(
            "downstream {server} refuses a second XCLIENT on one connection, so every client \
             transaction opens a new connection; to let pooled connections be reused, set \
             smtpd_authorized_xclient_hosts = static:all on a port only tarmac can reach"
        ),
        _ => log::warn!(
            "downstream {server}: a PROXY header names one client per connection, so every \
             client transaction opens a new connection; mode = \"multiplexing\" cannot reuse them"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_warning_is_due_once_an_hour_per_server() {
        let a: SocketAddr = "192.0.2.1:10025".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:10025".parse().unwrap();
        let t0 = Instant::now();
        assert!(due(Kind::AnnouncementRefused, a, t0));
        assert!(!due(Kind::AnnouncementRefused, a, t0 + EVERY / 2));
        assert!(due(Kind::Retired, a, t0), "another warning");
        assert!(due(Kind::AnnouncementRefused, b, t0), "another server");
        assert!(due(Kind::AnnouncementRefused, a, t0 + EVERY));
    }
}
