//! The `[content]` settings (DESIGN.md §7) and the scanners' addresses as operators write
//! them. A leaf module: `config` reads into these types, so nothing here imports the rest of
//! the crate (`tests/layers.rs`).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `[content]`: which scanners see each message, and what happens when one fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// rspamd's normal worker (`POST /checkv2`); `None`: off.
    pub rspamd: Option<RspamdUrl>,
    /// Milters, called in this order.
    pub milters: Vec<MilterAddr>,
    /// One scanner's answer for one message (milters: for each stage).
    pub timeout: Duration,
    /// What a scanner that is down, slow or broken means for the message.
    pub on_failure: OnFailure,
    /// Body bytes held in memory per message; beyond, an unlinked file in `state_dir/spool`.
    pub spool_after: u64,
    /// Messages being scanned at once, across workers.
    pub max_scans: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            rspamd: None,
            milters: Vec::new(),
            timeout: Duration::from_secs(30),
            on_failure: OnFailure::TempFail,
            spool_after: 256 * 1024,
            max_scans: 256,
        }
    }
}

impl Settings {
    /// Whether any scanner is configured: then bodies are held, else they stream as before.
    pub fn scans(&self) -> bool {
        self.rspamd.is_some() || !self.milters.is_empty()
    }
}

/// `on_failure`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnFailure {
    /// `451 4.7.1`: the sender retries later.
    #[default]
    TempFail,
    /// Relay the message unscanned (logged).
    Accept,
}

/// Where rspamd's normal worker listens: `http://IP:PORT` (a loopback or private address; no
/// name, so no resolver is asked on the scanning path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RspamdUrl {
    /// The worker's address.
    pub addr: SocketAddr,
}

/// A milter's socket, as Postfix writes it: `inet:IP:PORT` or `unix:/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MilterAddr {
    /// `inet:127.0.0.1:8891` (`inet:[::1]:8891` for IPv6).
    Inet(SocketAddr),
    /// `unix:/run/opendkim/opendkim.sock`.
    Unix(PathBuf),
}

impl fmt::Display for MilterAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MilterAddr::Inet(addr) => write!(f, "inet:{addr}"),
            MilterAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl MilterAddr {
    /// Reads `inet:IP:PORT` (IPv6 in brackets) or `unix:/absolute/path`; the error says what
    /// was expected.
    pub fn parse(text: &str) -> Result<MilterAddr, String> {
        if let Some(addr) = text.strip_prefix("inet:") {
            return addr.parse().map(MilterAddr::Inet).map_err(|_| {
                format!("{text:?} is not inet:IP:PORT (such as inet:127.0.0.1:8891)")
            });
        }
        if let Some(path) = text.strip_prefix("unix:") {
            if path.starts_with('/') {
                return Ok(MilterAddr::Unix(PathBuf::from(path)));
            }
            return Err(format!("{text:?}: the socket path must be absolute"));
        }
        Err(format!(
            "{text:?} is neither inet:IP:PORT nor unix:/path (as Postfix's smtpd_milters)"
        ))
    }
}

impl RspamdUrl {
    /// Reads `http://IP:PORT` (IPv6 in brackets), with or without a trailing `/`.
    pub fn parse(text: &str) -> Result<RspamdUrl, String> {
        let rest = text.strip_prefix("http://").ok_or_else(|| {
            format!("{text:?} is not http://IP:PORT (such as http://127.0.0.1:11333)")
        })?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        rest.parse()
            .map(|addr| RspamdUrl { addr })
            .map_err(|_| format!("{text:?} is not http://IP:PORT (such as http://127.0.0.1:11333)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milter_addresses_read_as_postfix_writes_them() {
        assert_eq!(
            MilterAddr::parse("inet:127.0.0.1:8891"),
            Ok(MilterAddr::Inet("127.0.0.1:8891".parse().unwrap()))
        );
        assert_eq!(
            MilterAddr::parse("inet:[::1]:8891"),
            Ok(MilterAddr::Inet("[::1]:8891".parse().unwrap()))
        );
        assert_eq!(
            MilterAddr::parse("unix:/run/opendkim/opendkim.sock"),
            Ok(MilterAddr::Unix("/run/opendkim/opendkim.sock".into()))
        );
        assert!(MilterAddr::parse("unix:opendkim.sock").is_err());
        assert!(MilterAddr::parse("inet:localhost:8891").is_err());
        assert!(MilterAddr::parse("127.0.0.1:8891").is_err());
        assert_eq!(
            MilterAddr::parse("inet:127.0.0.1:8891")
                .unwrap()
                .to_string(),
            "inet:127.0.0.1:8891"
        );
    }

    #[test]
    fn rspamd_urls_are_http_ip_port() {
        let url = RspamdUrl::parse("http://127.0.0.1:11333/").unwrap();
        assert_eq!(url.addr, "127.0.0.1:11333".parse().unwrap());
        assert!(RspamdUrl::parse("http://[::1]:11333").is_ok());
        assert!(RspamdUrl::parse("https://127.0.0.1:11333").is_err());
        assert!(RspamdUrl::parse("http://localhost:11333").is_err());
        assert!(RspamdUrl::parse("http://127.0.0.1").is_err());
    }

    #[test]
    fn scanning_is_on_with_any_scanner() {
        let mut settings = Settings::default();
        assert!(!settings.scans());
        settings.milters.push(MilterAddr::Unix("/x".into()));
        assert!(settings.scans());
        settings.milters.clear();
        settings.rspamd = Some(RspamdUrl::parse("http://127.0.0.1:1").unwrap());
        assert!(settings.scans());
    }
}
