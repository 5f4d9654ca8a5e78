//! Integration tests: the session on invented time against the testkit's doubles, and the real server
//! on loopback with a real downstream SMTP listener.

// The tarmac binary for the tests that run it (the shared helpers are in `tarmac-testkit`).
mod util;

// The session on invented time, driven by the testkit's `Pair` and scripted downstream.
mod session;
// The relay path end to end through the real server and the project's sink.
mod relay;
// Real peers: swaks, Python smtplib, Postfix smtp-sink/smtp-source, rbldnsd.
mod interop;
// The binary: --version, check, run with SIGTERM, demo.
mod cli;
// The runtime end to end: limits, shutdown, signals, hostile input, many connections.
mod server;
// Connection rates per address and per /24 at accept, allow-list exemption, PROXY clients.
mod rates;
// No module cycles between the files of src/ (issue 14 item 5).
mod layers;
// Fuzz corpus replay and pseudo-random inputs through `tarmac_testkit::fuzz`, on stable.
mod corpus;
// The resolver thread against a real DNS server on loopback: DNSBL, rDNS, cache, zone health.
mod dns;
// DNS checks and verdicts end to end: zones on a loopback DNS server, lists, reject modes.
mod checks;
// Greet pause, pregreet talkers, the PASS cache and tarpitting end to end.
mod tarpit;
// Rule files: `tarmac check` on bad and shipped rule files, `Config::load` reading them.
mod rules;
// Greylisting at RCPT through the server.
mod greylist;
// STARTTLS towards the downstream: the sink's side, with a real rustls client.
mod downstream_tls;
// STARTTLS towards the downstream through the server: opportunistic, required, verify, pool.
mod relay_tls;
// Reputation end to end: misbehaving addresses get the weight, one with deliveries does not.
mod reputation;
// State across restarts: snapshots in state_dir kept, damaged ones ignored, expired ones dropped.
mod state;
// Inbound STARTTLS: rustls and smtplib clients, injection, broken handshakes, reload, check.
mod tls;
// [state] backend = "redis": two servers sharing greylisting and rates through a real Redis.
mod redis_state;
// tarmac in front of a private, real Postfix smtpd: client identity, relay trust, TLS, faults.
mod postfix;
// rspamd: the testkit's private, real rspamd (DNS on a loopback server) answering tarmac's
// client; a fake one for the failures.
mod rspamd;
// Random downstream faults under concurrent clients: nothing acknowledged that was not
// delivered, nothing written before the handshake or under another client's XCLIENT.
mod faults;
// The OpenDKIM launcher: a private milter that a real Postfix signs through, verified by dkimpy.
mod opendkim;
// The milter client against the testkit's scripted milter (TCP, Unix socket) and a real OpenDKIM.
mod milter;
// Content inspection end to end: milters through the server, failures, the spool.
mod content;
// The operator's references: examples/tarmac.toml and docs/configuration.md list the same keys.
mod docs;
// `tarmac check --live` against a real Postfix in its XCLIENT configurations.
mod probe;
// Downstream health and balance: down servers skipped and probed, round-robin, all down → 451.
mod health;
// [server] user: the binary started as root drops to nobody after binding (needs root).
mod privileges;
// systemd readiness: READY, RELOADING and STOPPING on a test-owned NOTIFY_SOCKET.
mod notify;
// `[metrics] listen`: counters before and after real sessions, parsed by Prometheus' parsers.
mod metrics;
// Transparent mode in network namespaces of the test's own: TPROXY on a gateway, real Postfix
// servers behind it, the client's original destination and address (needs root and nft).
mod transparent;
