//! systemd's readiness protocol (`sd_notify(3)`, DESIGN.md §8): with `Type=notify`, systemd
//! passes a unix datagram socket in `NOTIFY_SOCKET`, and the service sends it newline-separated
//! `KEY=value` lines: `READY=1` once the listeners are bound and privileges dropped (so units
//! ordered after tarmac start only when port 25 answers), `RELOADING=1` with `MONOTONIC_USEC`
//! and then `READY=1` around a SIGHUP reload (what `Type=notify-reload` of systemd 253+ expects;
//! `Type=notify` ignores the timestamp), and `STOPPING=1` when a drain starts.
//!
//! Hand-written over std's `UnixDatagram`: the protocol is one `sendto` of a short text per
//! event, std reaches both address forms (a path, or `@name` in the abstract namespace), and a
//! crate would add nothing but a dependency. Without `NOTIFY_SOCKET` (not started by systemd)
//! every call does nothing. A failed send is logged, never an error: readiness is a courtesy
//! to the service manager, not a reason to stop serving mail.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where and how to tell systemd about start, reload and stop; inert when not under systemd.
#[derive(Debug)]
pub(super) struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`: unset or empty is no systemd; a value that is neither an absolute
    /// path nor `@name` is one warning and no notifications.
    pub(super) fn from_env() -> Notifier {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { target: None };
        };
        if value.is_empty() {
            return Notifier { target: None };
        }
        let addr = match value.to_str() {
            Some(name) if name.starts_with('@') => {
                SocketAddr::from_abstract_name(name.get(1..).unwrap_or_default().as_bytes())
            }
            _ if value.as_encoded_bytes().starts_with(b"/") => SocketAddr::from_pathname(&value),
            _ => Err(std::io::Error::other("neither an absolute path nor @name")),
        };
        let target = addr.and_then(|addr| Ok((UnixDatagram::unbound()?, addr)));
        match target {
            Ok(target) => Notifier {
                target: Some(target),
            },
            Err(e) => {
                log::warn!(
                    "NOTIFY_SOCKET={}: {e}; systemd is not told",
                    value.to_string_lossy()
                );
                Notifier { target: None }
            }
        }
    }

    /// The listeners are bound and the workers serve: `READY=1`, with the addresses as status.
    pub(super) fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\n"));
    }

    /// A reload starts: `RELOADING=1` and the monotonic clock in µs, as systemd 253+ wants.
    pub(super) fn reloading(&self) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = u64::try_from(now.tv_sec)
            .unwrap_or(0)
            .saturating_mul(1_000_000)
            .saturating_add(u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\n"));
    }

    /// The reload is over (put in force or refused): serving again.
    pub(super) fn reloaded(&self, status: &str) {
        self.ready(status);
    }

    /// SIGTERM or SIGINT: the drain starts.
    pub(super) fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining\n");
    }

    fn send(&self, text: &str) {
        if let Some((socket, addr)) = &self.target
            && let Err(e) = socket.send_to_addr(text.as_bytes(), addr)
        {
            log::warn!(
                "cannot notify systemd ({}): {e}",
                text.lines().next().unwrap_or("")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    #[test]
    fn messages_reach_an_abstract_socket() {
        let name = format!("tarmac-notify-unit-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        listener
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let notifier = Notifier {
            target: Some((UnixDatagram::unbound().unwrap(), addr)),
        };
        let mut buf = [0; 256];
        notifier.reloading();
        let n = listener.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        let usec = text
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|rest| rest.strip_suffix('\n'))
            .unwrap();
        assert!(usec.parse::<u64>().unwrap() > 0, "{text}");
        notifier.stopping();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\nSTATUS=draining\n");
    }
}
