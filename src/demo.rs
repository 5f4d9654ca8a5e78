//! `tarmac demo`: the gateway on 127.0.0.1:2525 relaying to the built-in sink on 127.0.0.1:2526
//! (`demo::sink`, a small one of its own), which writes each accepted message to
//! `./demo-mail/*.eml`. Everything stays on loopback and no DNS query is made (the demo
//! configures no DNS zones and no resolver use). The demo's state (PASS cache, greylist,
//! reputation) is saved in `./demo-mail/state/`, never in the real `/var/lib/tarmac`.
//!
//! It shows the defences on loopback addresses, set up in memory (no file is read): a deny-list
//! entry refuses 127.0.0.2 at the greeting, a rule tarpits 127.0.0.3 (delayed, stuttered
//! replies), a rule greylists 127.0.0.4 (its first attempt is deferred, a retry after
//! five seconds delivers), and 127.0.0.1 delivers at once (after the greet pause).
//! Its Prometheus metrics are served on 127.0.0.1:2527, so each try shows in the counters.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{AnnounceClient, Config};
use crate::policy::{List, RuleSet};

mod sink;

pub use sink::write_eml;

/// Where the demo gateway listens.
const DEMO_LISTEN: &str = "127.0.0.1:2525";
/// Where the demo sink listens.
const DEMO_SINK: &str = "127.0.0.1:2526";
/// Where the demo serves its Prometheus metrics (`/metrics`).
const DEMO_METRICS: &str = "127.0.0.1:2527";
/// Where the sink writes messages, relative to the working directory.
const DEMO_MAILDIR: &str = "demo-mail";
/// Where the demo keeps its state snapshots, relative to the working directory: inside the
/// demo's own directory, so trying the demo leaves nothing elsewhere.
const DEMO_STATE_DIR: &str = "demo-mail/state";

/// Where the demo's deny list and rules say they come from, in errors (there is no file).
const DEMO_SOURCE: &str = "tarmac demo (built in)";

/// The demo's deny list: one loopback address, refused at the greeting.
const DEMO_DENY: &str = "# refused with 554 5.7.1 at the greeting\n127.0.0.2\n";

/// The demo's rules: one loopback address tarpitted, one greylisted.
const DEMO_RULES: &str = r#"
[[rule]]
name = "demo-tarpit"
when = { client = "127.0.0.3" }
action = "tarpit"

[[rule]]
name = "demo-greylist"
when = { client = "127.0.0.4" }
action = "greylist"
"#;

/// The demo's greylist delay: long enough to see the deferral, short enough to retry.
const DEMO_GREYLIST_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// The demo's configuration: defaults, on loopback, relaying to the sink with XCLIENT so the
/// sink's `.eml` files show who the real client was, with the demo's list and rules.
fn config() -> Config {
    let mut config = Config::default();
    config.server.listen = vec![parse(DEMO_LISTEN)];
    config.server.hostname = "tarmac.demo".to_owned();
    config.server.workers = 1;
    config.server.state_dir = PathBuf::from(DEMO_STATE_DIR);
    config.downstream.servers = vec![parse(DEMO_SINK)];
    config.metrics.listen = Some(parse(DEMO_METRICS));
    config.downstream.announce_client = AnnounceClient::Xclient;
    // No DNS: the demo must never ask the system resolver (it points off the machine).
    config.dnsbl.clear();
    config.dns.rdns = false;
    // The greet pause as an operator sees it (`220-` at once, the final line later), short
    // enough for a demo; a client that waited it out skips it next time (PASS cache).
    config.tarpit.greet_pause = std::time::Duration::from_secs(1);
    // Greylisting every client would defer the demo's first message: only the rule's client
    // is greylisted, and for a few seconds.
    config.greylist.enabled = false;
    config.greylist.delay = DEMO_GREYLIST_DELAY;
    // A tarpit one can watch: a second before each reply, then ten bytes a second.
    config.tarpit.reply_delay = std::time::Duration::from_secs(1);
    config.tarpit.stutter = std::time::Duration::from_millis(100);
    let source = || PathBuf::from(DEMO_SOURCE);
    // Both texts are constants; a parse failure is a bug the demo test catches (it would
    // leave the list or the rules empty, and the test's 127.0.0.2 would not be refused).
    if let Ok(deny) = List::parse(&[(source(), DEMO_DENY.to_owned())]) {
        config.lists.entries.deny = deny;
    }
    if let Ok(rules) = RuleSet::parse(&[(source(), DEMO_RULES.to_owned())]) {
        config.rules.set = rules;
    }
    config.lists.allow.clear();
    config.lists.deny.clear();
    config.rules.files.clear();
    config
}

fn parse(addr: &str) -> std::net::SocketAddr {
    // The constants above are literals; a parse failure is a bug caught by the demo test.
    addr.parse()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Runs the demo until SIGINT/SIGTERM.
pub fn run() -> io::Result<()> {
    let config = config();
    // Room above the gateway's own limit, so the gateway's check is the one a client meets.
    let sink_limit = config.limits.max_message_size.saturating_mul(2);
    sink::start(parse(DEMO_SINK), PathBuf::from(DEMO_MAILDIR), sink_limit)?;
    let swaks =
        format!("swaks --server {DEMO_LISTEN} --from you@example.org --to someone@example.net");
    let delay = DEMO_GREYLIST_DELAY.as_secs();
    println!(
        "tarmac demo: gateway on {DEMO_LISTEN}, relaying to the sink on {DEMO_SINK}; accepted mail lands in ./{DEMO_MAILDIR}/\n\
         Try each line (swaks; or any SMTP client bound to that source address):\n  \
         {swaks} --local-interface 127.0.0.1\n      delivered: a 1 s greet pause (the 220- line first), then 250; see ./{DEMO_MAILDIR}/\n  \
         {swaks} --local-interface 127.0.0.2\n      refused: on the deny list, the greeting is 554 5.7.1\n  \
         {swaks} --local-interface 127.0.0.3\n      tarpitted by a rule: every reply waits 1 s and comes 10 bytes a second\n  \
         {swaks} --local-interface 127.0.0.4\n      greylisted by a rule: RCPT gets 451 4.7.1; run it again after {delay} s and it is delivered\n\
         Each session is logged when it closes (verdict=, rule=, greylist=, result=); the counters move at\n  \
         curl -s http://{DEMO_METRICS}/metrics | grep -v '^#'\n\
         Stop with Ctrl-C."
    );
    // The sink's threads end with the process.
    crate::server::run(Arc::new(config))
}
