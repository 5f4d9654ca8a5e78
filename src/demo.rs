//! `tarmac demo`: the gateway on 127.0.0.1:2525 relaying to the built-in sink on 127.0.0.1:2526
//! (`demo::sink`, a small one of its own), which writes each accepted message to
//! `./demo-mail/*.eml`. Everything stays on loopback and no DNS query is made (the demo
//! configures no DNS zones and no resolver use). The demo's state (PASS cache, greylist,
//! reputation) is saved in `./demo-mail/state/`, never in the real `/var/lib/tarmac`.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{AnnounceClient, Config};

mod sink;

pub use sink::write_eml;

/// Where the demo gateway listens.
const DEMO_LISTEN: &str = "127.0.0.1:2525";
/// Where the demo sink listens.
const DEMO_SINK: &str = "127.0.0.1:2526";
/// Where the sink writes messages, relative to the working directory.
const DEMO_MAILDIR: &str = "demo-mail";
/// Where the demo keeps its state snapshots, relative to the working directory: inside the
/// demo's own directory, so trying the demo leaves nothing elsewhere.
const DEMO_STATE_DIR: &str = "demo-mail/state";

/// The demo's configuration: defaults, on loopback, relaying to the sink with XCLIENT so the
/// sink's `.eml` files show who the real client was.
fn config() -> Config {
    let mut config = Config::default();
    config.server.listen = vec![parse(DEMO_LISTEN)];
    config.server.hostname = "tarmac.demo".to_owned();
    config.server.workers = 1;
    config.server.state_dir = PathBuf::from(DEMO_STATE_DIR);
    config.downstream.servers = vec![parse(DEMO_SINK)];
    config.downstream.announce_client = AnnounceClient::Xclient;
    // No DNS: the demo must never ask the system resolver (it points off the machine).
    config.dnsbl.clear();
    config.dns.rdns = false;
    // The greet pause as an operator sees it (`220-` at once, the final line later), short
    // enough for a demo; a client that waited it out skips it next time (PASS cache).
    config.tarpit.greet_pause = std::time::Duration::from_secs(1);
    // Greylisting would defer the demo's first message for 5 minutes.
    config.greylist.enabled = false;
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
    println!(
        "tarmac demo: gateway on {DEMO_LISTEN}, relaying to the sink on {DEMO_SINK}; accepted mail lands in ./{DEMO_MAILDIR}/\n\
         Try:\n  \
         swaks --server {DEMO_LISTEN} --from you@example.org --to someone@example.net\n  \
         python3 -c \"import smtplib; s=smtplib.SMTP('127.0.0.1', 2525); s.sendmail('you@example.org', ['someone@example.net'], 'Subject: hi\\r\\n\\r\\nhello\\r\\n'); s.quit()\"\n\
         Each session is logged when it closes. Stop with Ctrl-C."
    );
    // The sink's threads end with the process.
    crate::server::run(Arc::new(config))
}
