//! `tarmac check --live` against a real Postfix (issue 16 item 8), in both of its XCLIENT
//! configurations: out of the box (XCLIENT from tarmac's address, once per connection; no
//! relaying for it) and with `smtpd_authorized_xclient_hosts = static:all` and tarmac's
//! address in `mynetworks` (a second XCLIENT taken, relaying allowed: the risk to report);
//! one that offers no XCLIENT to tarmac (exit 1); and a server that is not there (exit 1).
//! Nothing is sent as mail: the Postfix queue stays empty.

use std::net::SocketAddr;
use std::process::Output;

use tarmac_testkit::postfix::{Postfix, PostfixOptions};
use tarmac_testkit::{free_port, temp_dir};

use crate::util::tarmac;

/// `tarmac check --live` with a config relaying to `server` (multiplexing when asked).
fn check_live(server: SocketAddr, multiplexing: bool) -> (Option<i32>, String) {
    let dir = temp_dir(&format!("probe-{}", server.port()));
    let path = dir.join("tarmac.toml");
    let mode = if multiplexing {
        "multiplexing"
    } else {
        "synchronous"
    };
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"mx.test\"\nstate_dir = \"{}\"\n\
             [downstream]\nservers = [\"{server}\"]\nmode = \"{mode}\"\n\
             [timeouts]\nconnect = \"5s\"\ncommand = \"10s\"\n\
             [dns]\nrdns = false\nservers = [\"127.0.0.1:1\"]\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let Output { status, stdout, .. } = tarmac()
        .args(["check", "--live", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (status.code(), String::from_utf8_lossy(&stdout).into_owned())
}

#[test]
fn postfix_out_of_the_box_takes_one_xclient_and_relays_nothing_for_tarmac() {
    let Some(postfix) = Postfix::start(PostfixOptions {
        starttls: true,
        ..PostfixOptions::default()
    }) else {
        return;
    };
    let (code, out) = check_live(postfix.addr(), true);
    assert_eq!(code, Some(0), "{out}");
    for line in [
        "banner: 220 ",
        "STARTTLS: offered; TLSv1_3 ",
        "certificate not verified (tls_verify = false)",
        "XCLIENT: accepted from this host",
        "second XCLIENT on one connection: refused",
        "WARNING: mode = \"multiplexing\" will open a new connection for every transaction",
        "relay without an announcement: refused (554 5.7.1 ",
        "  ok",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    assert!(postfix.queued().is_empty(), "nothing was sent as mail");
}

#[test]
fn postfix_trusting_tarmac_everywhere_takes_a_second_xclient_and_is_a_relay_risk() {
    let Some(postfix) = Postfix::start(PostfixOptions {
        mynetworks: vec!["127.0.0.1/32".into()],
        main_cf: vec![("smtpd_authorized_xclient_hosts".into(), "static:all".into())],
        ..PostfixOptions::default()
    }) else {
        return;
    };
    let (code, out) = check_live(postfix.addr(), true);
    assert_eq!(code, Some(0), "a risk is reported, not refused:\n{out}");
    for line in [
        "XCLIENT: accepted from this host",
        "second XCLIENT on one connection: accepted",
        "relay without an announcement: ACCEPTED (250 ",
        "WARNING: it relays for this host without an announcement",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    assert!(postfix.queued().is_empty(), "nothing was sent as mail");
}

#[test]
fn a_downstream_without_xclient_for_tarmac_or_not_there_fails_the_check() {
    if let Some(postfix) = Postfix::start(PostfixOptions {
        main_cf: vec![("smtpd_authorized_xclient_hosts".into(), String::new())],
        ..PostfixOptions::default()
    }) {
        let (code, out) = check_live(postfix.addr(), false);
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("XCLIENT: not offered"), "{out}");
        assert!(
            out.contains("FAIL: XCLIENT is not offered to this host"),
            "{out}"
        );
    }
    let nobody = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (code, out) = check_live(nobody, false);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL: cannot probe it: "), "{out}");
}
