//! The one place that builds the per-connection close line (DESIGN.md §4):
//!
//! ```text
//! conn=7f3a client=192.0.2.7:53211 rdns=mail.example.com helo=mail.example.com verdict=tarpit score=2 rep=neutral dnsbl=zen.spamhaus.org:2 list=- rule=- greylist=pass pregreet=no tls=no tls_version=- msgs=1 rcpts=2 scan=- result=delivered dur=14.2s
//! ```
//!
//! It is logged at info level with target `tarmac::conn`, so operators can route or filter it
//! (`RUST_LOG=tarmac::conn=info`). Client-supplied text goes through
//! [`escape`]: a HELO argument
//! can hold spaces, `=`, quotes or control bytes that would forge fields or lines if logged raw.
//! `rdns` and `list` are additions to DESIGN.md §4's example: the forward-confirmed name (or
//! `unverified`, `unknown`, `tempfail`, `-`) and which local list matched what (`deny:helo`).
//! `rep` is another: the client's reputation when it was checked (`none`, `neutral`, `good`,
//! `bad`; `-` when not checked); `score` includes the weight a `bad` one adds.
//! `dnsbl` (zones are operator text, not client text) is printed as the policy formats it.
//! `tls` is `yes` after a STARTTLS handshake and `no` otherwise, as DESIGN.md §4 has it, and
//! `tls_version`, another addition, names the version agreed (`TLSv1.3`, `TLSv1.2`; `-` when
//! plain): what an operator greps for when deciding whether TLS 1.2 can be turned off.
//! `dst` (DESIGN.md §9) follows `client` on a transparent session only: the address the
//! client connected to, where the session relayed.

use std::fmt;
use std::time::Duration;

use crate::smtp::Report;
use crate::smtp::log_text::escape;

/// A connection's id in logs: unique per process, printed as hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConnId(pub(crate) u64);

impl ConnId {
    /// The `seq`-th connection of worker `worker` out of `workers`. Interleaving the workers
    /// (`seq * workers + worker`) keeps ids unique without a shared counter and as short as the
    /// total number of connections allows.
    pub(crate) fn new(worker: usize, workers: usize, seq: u64) -> ConnId {
        let workers = workers.max(1) as u64;
        ConnId(seq.wrapping_mul(workers).wrapping_add(worker as u64))
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// Logs the close line for a connection.
pub(crate) fn log_close(conn: ConnId, report: &Report<'_>, dur: Duration) {
    log::info!(target: "tarmac::conn", "{}", close_line(conn, report, dur));
}

/// The close line's text. IPv6 clients print as `[v6]:port`; an absent HELO as `-`.
pub(crate) fn close_line(conn: ConnId, report: &Report<'_>, dur: Duration) -> String {
    let helo = match report.helo {
        Some(helo) if !helo.is_empty() => escape(helo),
        _ => "-".to_owned(),
    };
    let dst = match report.dst {
        Some(dst) => format!(" dst={dst}"),
        None => String::new(),
    };
    format!(
        "conn={conn} client={client}{dst} rdns={rdns} helo={helo} verdict={verdict} score={score} \
         rep={rep} dnsbl={dnsbl} list={list} rule={rule} greylist={greylist} pregreet={pregreet} tls={tls} \
         tls_version={tls_version} \
         msgs={msgs} rcpts={rcpts} scan={scan} \
         result={result} dur={dur:.1}s",
        client = report.client,
        rdns = escape(report.rdns.as_bytes()),
        verdict = report.verdict,
        score = report.score,
        rep = report.reputation,
        dnsbl = report.dnsbl,
        list = report.list,
        rule = report.rule,
        greylist = report.greylist,
        pregreet = if report.pregreet { "yes" } else { "no" },
        tls = if report.tls == "no" { "no" } else { "yes" },
        tls_version = if report.tls == "no" { "-" } else { report.tls },
        msgs = report.msgs,
        rcpts = report.rcpts,
        scan = report.scan,
        result = report.result,
        dur = dur.as_secs_f64(),
    )
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use super::*;

    fn report(client: SocketAddr, helo: Option<&[u8]>) -> Report<'_> {
        Report {
            client,
            dst: None,
            helo,
            rdns: "mail.example.com",
            verdict: "tarpit",
            score: 2,
            reputation: "neutral",
            dnsbl: "zen.spamhaus.org:2".to_owned(),
            list: "-",
            pregreet: false,
            rule: "-",
            greylist: "pass",
            msgs: 1,
            rcpts: 2,
            tls: "no",
            refusals: crate::smtp::session::Refusals::default(),
            scan: "-",
            result: "delivered",
        }
    }

    #[test]
    fn line_has_every_field_in_order() {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 53211);
        let line = close_line(
            ConnId(0x7f3a),
            &report(client, Some(b"mail.example.com")),
            Duration::from_millis(14_240),
        );
        assert_eq!(
            line,
            "conn=7f3a client=192.0.2.7:53211 rdns=mail.example.com helo=mail.example.com \
             verdict=tarpit score=2 rep=neutral dnsbl=zen.spamhaus.org:2 list=- rule=- greylist=pass pregreet=no tls=no tls_version=- msgs=1 \
             rcpts=2 scan=- result=delivered dur=14.2s"
        );
    }

    #[test]
    fn ipv6_client_is_bracketed_and_absent_helo_is_a_dash() {
        let client = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 25);
        let line = close_line(ConnId(1), &report(client, None), Duration::ZERO);
        assert_eq!(
            line,
            "conn=1 client=[::1]:25 rdns=mail.example.com helo=- verdict=tarpit score=2 rep=neutral \
             dnsbl=zen.spamhaus.org:2 list=- rule=- greylist=pass pregreet=no tls=no tls_version=- msgs=1 rcpts=2 \
             scan=- result=delivered dur=0.0s"
        );
        let empty = close_line(ConnId(1), &report(client, Some(b"")), Duration::ZERO);
        assert!(empty.contains(" helo=- "), "{empty}");
    }

    #[test]
    fn hostile_helo_cannot_forge_fields_or_lines() {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1);
        let line = close_line(
            ConnId(2),
            &report(client, Some(b"x result=ok\r\nconn=1")),
            Duration::from_secs(3),
        );
        assert!(
            line.starts_with(
                "conn=2 client=127.0.0.1:1 rdns=mail.example.com \
                 helo=x\\x20result\\x3dok\\x0d\\x0aconn\\x3d1 verdict=tarpit"
            ),
            "{line}"
        );
    }

    #[test]
    fn tls_names_the_version() {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1);
        let mut over_tls = report(client, None);
        over_tls.tls = "TLSv1.3";
        let line = close_line(ConnId(3), &over_tls, Duration::ZERO);
        assert!(
            line.contains(" pregreet=no tls=yes tls_version=TLSv1.3 msgs=1 "),
            "{line}"
        );
    }

    #[test]
    fn a_transparent_session_names_its_destination_after_the_client() {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 40000);
        let mut transparent = report(client, None);
        transparent.dst = Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 25)),
            25,
        ));
        let line = close_line(ConnId(4), &transparent, Duration::ZERO);
        assert!(
            line.starts_with("conn=4 client=192.0.2.10:40000 dst=198.51.100.25:25 rdns="),
            "{line}"
        );
    }

    #[test]
    fn conn_ids_interleave_workers() {
        assert_eq!(ConnId::new(0, 2, 0), ConnId(0));
        assert_eq!(ConnId::new(1, 2, 0), ConnId(1));
        assert_eq!(ConnId::new(0, 2, 1), ConnId(2));
        assert_eq!(ConnId::new(1, 2, 0x3f9d).to_string(), "7f3b");
    }
}
