//! The private rspamd of `tarmac_testkit::rspamd` is a working peer for the content-inspection
//! tests (DESIGN.md §7): started by the test on a free loopback port with its DNS on the test's
//! own loopback server, it rejects the GTUBE message and lets a clean one through, with the
//! deterministic scores its network-free module set promises. One instance serves both checks.
//!
//! Skips with a note where rspamd is not installed, except under `CI=true`.

use tarmac_testkit::dns_server::{DnsServer, Zone};
use tarmac_testkit::rspamd::Rspamd;

/// The GTUBE pattern: any message whose body carries it gets `reject`.
const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// A message from `sender.test` to `example.test` with `body`, CRLF lines.
fn message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Alice <alice@sender.test>\r\n\
         To: Bob <bob@example.test>\r\n\
         Subject: {subject}\r\n\
         Date: Mon, 07 Dec 2026 12:00:00 +0000\r\n\
         Message-ID: <{subject}@sender.test>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         {body}\r\n"
    )
    .into_bytes()
}

/// The envelope and connection, as tarmac would pass them.
const ENVELOPE: &[(&str, &str)] = &[
    ("IP", "192.0.2.10"),
    ("Helo", "mail.sender.test"),
    ("From", "alice@sender.test"),
    ("Rcpt", "bob@example.test"),
];

#[test]
fn gtube_is_rejected_and_a_clean_message_has_no_action() {
    // An empty zone: every name rspamd might look up is REFUSED or NXDOMAIN, answered at once.
    let dns = DnsServer::start(vec![Zone::new("sender.test")]);
    let Some(rspamd) = Rspamd::start(dns.addr()) else {
        return;
    };
    assert!(rspamd.addr().ip().is_loopback());

    let reply = rspamd.check(
        ENVELOPE,
        &message("gtube", &format!("Test message.\r\n{GTUBE}")),
    );
    assert_eq!(reply["action"], "reject", "GTUBE: {reply}");
    assert_eq!(
        reply["messages"]["smtp_message"], "Gtube pattern",
        "GTUBE: {reply}"
    );
    assert!(
        reply["score"].as_f64().is_some_and(|s| s >= 15.0),
        "GTUBE score: {reply}"
    );

    let reply = rspamd.check(
        ENVELOPE,
        &message("clean", "Hello Bob,\r\n\r\nlunch at noon?\r\n\r\nAlice"),
    );
    assert_eq!(
        reply["action"],
        "no action",
        "clean message: {reply}\n{}",
        rspamd.log_tail()
    );
    assert!(
        reply["messages"]["smtp_message"].is_null(),
        "clean message: {reply}"
    );

    // Its lookups (the client's PTR, for the clean message) went to the test's DNS server.
    assert!(
        dns.queries() >= 1,
        "rspamd never asked the test's DNS server"
    );
    // Everything it wrote stayed in its temp dir: its log is there.
    assert!(rspamd.dir().join("log").join("rspamd.log").is_file());
}
