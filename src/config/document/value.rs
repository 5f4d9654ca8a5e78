//! The value readers: one TOML value into a field's type, or the message saying why not (the
//! walker adds `path:line: key: `). Strings go through `syntax`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::de::DeValue;

use crate::config::syntax;
use crate::config::{
    AnnounceClient, BareNewline, DownstreamMode, DownstreamTls, GreylistKey, Pregreet, RejectMode,
    StateBackend,
};
use crate::config::{Balance, MAX_RETRY_AFTER};
use crate::content::{MilterAddr, OnFailure, RspamdUrl};
use crate::policy::cidr::{Cidr, CidrError};
use crate::policy::rates::Rate;
use crate::policy::reading::{self, integer};
pub(super) use crate::policy::reading::{boolean, string};

/// An integer of the field's type within `min..=max`; out of range is an error, never a
/// truncation.
pub(super) fn int<T: TryFrom<i128>>(v: &DeValue<'_>, min: i128, max: i128) -> Result<T, String> {
    let n = integer(v)?;
    if n < min || n > max {
        return Err(format!("must be from {min} to {max}, got {n}"));
    }
    T::try_from(n).map_err(|_| format!("must be from {min} to {max}, got {n}"))
}

/// An integer of at least `min`, at most what the field's type holds.
pub(super) fn at_least<T: TryFrom<i128>>(v: &DeValue<'_>, min: i128) -> Result<T, String> {
    let n = integer(v)?;
    if n < min {
        return Err(format!("must be at least {min}, got {n}"));
    }
    T::try_from(n).map_err(|_| format!("{n} is too large"))
}

/// Any integer the field's type holds.
pub(super) fn any_int<T: TryFrom<i128>>(v: &DeValue<'_>) -> Result<T, String> {
    let n = integer(v)?;
    T::try_from(n).map_err(|_| format!("{n} is out of range"))
}

pub(super) fn nonzero_weight(v: &DeValue<'_>) -> Result<i32, String> {
    let weight: i32 = any_int(v)?;
    if weight == 0 {
        return Err("must not be 0; a zone that adds nothing need not be queried".to_owned());
    }
    Ok(weight)
}

/// The option whose name `v` holds, from one of the tables below.
pub(super) fn choice<T: Copy>(v: &DeValue<'_>, options: &[(&str, T)]) -> Result<T, String> {
    reading::choice(v, options, "value")
}

/// The names of each [`BareNewline`], in the order an error lists them.
pub(super) const BARE_NEWLINES: &[(&str, BareNewline)] = &[
    ("reject", BareNewline::Reject),
    ("normalize", BareNewline::Normalize),
];

/// The names of each [`DownstreamMode`], in the order an error lists them.
pub(super) const DOWNSTREAM_MODES: &[(&str, DownstreamMode)] = &[
    ("synchronous", DownstreamMode::Synchronous),
    ("multiplexing", DownstreamMode::Multiplexing),
];

/// The names of each [`Balance`], in the order an error lists them.
pub(super) const BALANCES: &[(&str, Balance)] = &[
    ("failover", Balance::Failover),
    ("round-robin", Balance::RoundRobin),
];

/// The names of each [`AnnounceClient`], in the order an error lists them.
pub(super) const ANNOUNCE_CLIENTS: &[(&str, AnnounceClient)] = &[
    ("xclient", AnnounceClient::Xclient),
    ("proxy-v1", AnnounceClient::ProxyV1),
    ("proxy-v2", AnnounceClient::ProxyV2),
    ("none", AnnounceClient::None),
];

/// The names of each [`DownstreamTls`], in the order an error lists them.
pub(super) const DOWNSTREAM_TLS: &[(&str, DownstreamTls)] = &[
    ("none", DownstreamTls::None),
    ("opportunistic", DownstreamTls::Opportunistic),
    ("required", DownstreamTls::Required),
];

/// The names of each [`RejectMode`], in the order an error lists them.
pub(super) const REJECT_MODES: &[(&str, RejectMode)] = &[
    ("immediate", RejectMode::Immediate),
    ("enforce", RejectMode::Enforce),
];

/// The names of each [`Pregreet`], in the order an error lists them.
pub(super) const PREGREETS: &[(&str, Pregreet)] = &[
    ("ignore", Pregreet::Ignore),
    ("reject", Pregreet::Reject),
    ("drop", Pregreet::Drop),
];

/// The names of each [`GreylistKey`], in the order an error lists them.
pub(super) const GREYLIST_KEY_PARTS: &[(&str, GreylistKey)] = &[
    ("subnet", GreylistKey::Subnet),
    ("ip", GreylistKey::Ip),
    ("helo", GreylistKey::Helo),
    ("sender", GreylistKey::Sender),
    ("recipient", GreylistKey::Recipient),
    ("rdns", GreylistKey::Rdns),
];

/// The names of each [`StateBackend`], in the order an error lists them.
pub(super) const STATE_BACKENDS: &[(&str, StateBackend)] = &[
    ("local", StateBackend::Local),
    ("redis", StateBackend::Redis),
];

/// The names of each [`OnFailure`], in the order an error lists them.
pub(super) const ON_FAILURES: &[(&str, OnFailure)] = &[
    ("tempfail", OnFailure::TempFail),
    ("accept", OnFailure::Accept),
];

pub(super) fn duration(v: &DeValue<'_>) -> Result<Duration, String> {
    syntax::parse_duration(string(v, r#"a duration such as "30s""#)?)
}

/// `[downstream] retry_after`: a positive duration no longer than the back-off's ceiling
/// ([`MAX_RETRY_AFTER`]), which it could never exceed anyway.
pub(super) fn retry_after(v: &DeValue<'_>) -> Result<Duration, String> {
    let d = positive_duration(v)?;
    if d > MAX_RETRY_AFTER {
        return Err(format!(
            "must be at most {}s (the probes' back-off stops there)",
            MAX_RETRY_AFTER.as_secs()
        ));
    }
    Ok(d)
}

pub(super) fn positive_duration(v: &DeValue<'_>) -> Result<Duration, String> {
    let d = duration(v)?;
    if d.is_zero() {
        return Err("must be longer than 0s".to_owned());
    }
    Ok(d)
}

pub(super) fn rate(v: &DeValue<'_>) -> Result<Rate, String> {
    syntax::parse_rate(string(v, r#"a rate such as "30/min""#)?)
}

/// A size string, or a bare integer of bytes; at least 1KB, since a limit below that would refuse
/// the headers of any real message.
pub(super) fn message_size(v: &DeValue<'_>) -> Result<u64, String> {
    let bytes = match v {
        DeValue::Integer(_) => any_int(v)?,
        _ => syntax::parse_size(string(v, r#"a size such as "25MB""#)?)?,
    };
    if bytes < 1000 {
        return Err(format!("must be at least 1KB, got {bytes} bytes"));
    }
    Ok(bytes)
}

/// `[content] spool_after`: a size as [`message_size`] reads it. `0` spools every message from
/// its first byte; otherwise at least 1KB, since a smaller buffer would spool every message
/// anyway (its headers alone are larger): `0` says that plainly.
pub(super) fn spool_size(v: &DeValue<'_>) -> Result<u64, String> {
    let bytes = match v {
        DeValue::Integer(_) => any_int(v)?,
        _ => syntax::parse_size(string(v, r#"a size such as "256KiB""#)?)?,
    };
    if bytes != 0 && bytes < 1000 {
        return Err(format!(
            "must be 0 (always spool) or at least 1KB, got {bytes} bytes"
        ));
    }
    Ok(bytes)
}

/// Longest `[content] timeout`: a scanner that needs longer for one message is broken, and a
/// client waiting at its final dot gives up after a few minutes (RFC 5321 §4.5.3.2.6 gives it
/// 10).
const MAX_SCAN_TIMEOUT: Duration = Duration::from_secs(600);

/// `[content] timeout`: longer than 0 (a scanner cannot answer at once), at most
/// [`MAX_SCAN_TIMEOUT`].
pub(super) fn scan_timeout(v: &DeValue<'_>) -> Result<Duration, String> {
    let d = positive_duration(v)?;
    if d > MAX_SCAN_TIMEOUT {
        return Err(format!(
            "must be at most {}, got {}",
            syntax::format_duration(MAX_SCAN_TIMEOUT),
            syntax::format_duration(d)
        ));
    }
    Ok(d)
}

/// `[content] rspamd`: `""` is off, else `http://IP:PORT` as [`RspamdUrl::parse`] reads it, not
/// port 0.
pub(super) fn rspamd_url(v: &DeValue<'_>) -> Result<Option<RspamdUrl>, String> {
    let s = string(
        v,
        r#"a URL such as "http://127.0.0.1:11333", or "" for none"#,
    )?;
    if s.is_empty() {
        return Ok(None);
    }
    let url = RspamdUrl::parse(s)?;
    if url.addr.port() == 0 {
        return Err(format!("{s:?}: port 0 cannot be connected to"));
    }
    Ok(Some(url))
}

/// One `[content] milters` entry: `inet:IP:PORT` or `unix:/path` as [`MilterAddr::parse`] reads
/// it, not port 0.
pub(super) fn milter_addr(v: &DeValue<'_>) -> Result<MilterAddr, String> {
    let s = string(v, r#"a milter socket such as "inet:127.0.0.1:8891""#)?;
    let addr = MilterAddr::parse(s)?;
    if let MilterAddr::Inet(inet) = &addr
        && inet.port() == 0
    {
        return Err(format!("{s:?}: port 0 cannot be connected to"));
    }
    Ok(addr)
}

pub(super) fn socket_addr(v: &DeValue<'_>) -> Result<SocketAddr, String> {
    syntax::parse_socket_addr(string(v, r#"an address such as "0.0.0.0:25""#)?)
}

pub(super) fn downstream_addr(v: &DeValue<'_>) -> Result<SocketAddr, String> {
    let addr = socket_addr(v)?;
    if addr.port() == 0 {
        return Err(format!("{addr}: port 0 cannot be connected to"));
    }
    Ok(addr)
}

pub(super) fn dns_server(v: &DeValue<'_>) -> Result<SocketAddr, String> {
    syntax::parse_dns_server(string(v, r#"an address such as "192.0.2.53""#)?)
}

pub(super) fn cidr(v: &DeValue<'_>) -> Result<Cidr, String> {
    string(v, r#"a CIDR block such as "192.0.2.0/24""#)?
        .parse()
        .map_err(|e: CidrError| e.to_string())
}

pub(super) fn hostname(v: &DeValue<'_>) -> Result<String, String> {
    let s = string(v, r#"a host name such as "mx1.example.org""#)?;
    syntax::check_hostname(s)?;
    Ok(s.to_owned())
}

/// `[server] user` or `group`: "" (stay) or a name as `/etc/passwd` and `/etc/group` hold it
/// (whether it exists is checked once both keys are read).
pub(super) fn account_name(v: &DeValue<'_>) -> Result<String, String> {
    let s = string(v, r#"a user or group name such as "tarmac", or """#)?;
    if let Some(bad) = s
        .chars()
        .find(|c| matches!(c, ':' | ',' | '/') || c.is_whitespace() || c.is_control())
    {
        return Err(format!("invalid name {s:?}: {bad:?} is not allowed"));
    }
    Ok(s.to_owned())
}

pub(super) fn zone_name(v: &DeValue<'_>) -> Result<String, String> {
    let s = string(v, r#"a DNS zone such as "zen.spamhaus.org""#)?;
    syntax::check_zone(s)?;
    Ok(s.to_owned())
}

pub(super) fn code_range(
    v: &DeValue<'_>,
) -> Result<(std::net::Ipv4Addr, std::net::Ipv4Addr), String> {
    syntax::parse_code_range(string(v, r#"an answer such as "127.0.0.2""#)?)
}

/// Reply text goes into an SMTP reply line: printable ASCII only (RFC 5321 §4.2 `textstring`),
/// so no CR or LF can end the line early and inject a reply of the operator's own making.
pub(super) fn reply_text(v: &DeValue<'_>) -> Result<Option<String>, String> {
    let s = string(v, "a string")?;
    if s.is_empty() {
        return Ok(None);
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(format!(
            "{c:?} is not allowed; reply text is one line of printable ASCII"
        ));
    }
    Ok(Some(s.to_owned()))
}

pub(super) fn path(v: &DeValue<'_>) -> Result<PathBuf, String> {
    let s = string(v, "a file path")?;
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(PathBuf::from(s))
}

/// A path where `""` means "not set".
pub(super) fn optional_path(v: &DeValue<'_>) -> Result<Option<PathBuf>, String> {
    let s = string(v, r#"a file path, or "" for none"#)?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

/// A Redis URL the client can use: `redis://` or `unix://`, then whatever the `redis` crate's
/// own parser accepts (host, port, database number, credentials), so nothing that passes
/// `tarmac check` fails to parse when the server starts. A URL with credentials is not quoted
/// back, so a password never reaches a terminal or a log.
pub(super) fn redis_url(v: &DeValue<'_>) -> Result<String, String> {
    let s = string(v, r#"a URL such as "redis://127.0.0.1:6379/0""#)?;
    let shown = if s.contains('@') {
        "(with credentials, not shown)".to_owned()
    } else {
        format!("{s:?}")
    };
    if s.starts_with("rediss://") {
        return Err(format!(
            "invalid Redis URL {shown}: TLS to Redis (rediss://) is not supported; use \
             redis:// on a trusted network, or unix://"
        ));
    }
    if !["redis://", "unix://"]
        .iter()
        .any(|scheme| s.starts_with(scheme))
    {
        return Err(format!(
            "invalid Redis URL {shown}: expected redis:// or unix://, such as \
             \"redis://127.0.0.1:6379/0\""
        ));
    }
    match redis::Client::open(s) {
        Ok(_) => Ok(s.to_owned()),
        Err(e) => Err(format!(
            "invalid Redis URL {shown}: {}",
            redis_error_text(&e)
        )),
    }
}

/// The crate's description of a URL error as a fragment starting lowercase: its `Display` is
/// "Description - KindName[: detail]", and the kind's name means nothing to an operator.
fn redis_error_text(e: &redis::RedisError) -> String {
    let shown = e.to_string();
    let description = shown.split(" - ").next().unwrap_or(&shown);
    let mut chars = description.chars();
    let mut text: String = chars
        .next()
        .map(|c| c.to_ascii_lowercase())
        .into_iter()
        .collect();
    text.push_str(chars.as_str());
    if let Some(detail) = e.detail() {
        text.push_str(": ");
        text.push_str(detail);
    }
    text
}
