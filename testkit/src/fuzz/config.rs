//! The `config` target: `tarmac.toml` files.

use std::path::Path;

use tarmac::config::Config;

use super::vocabulary;

/// Loads the input as a config file, and again built from config keys and values.
///
/// Properties: no panic; an error list is non-empty, each error has a non-empty message, the
/// given path and a line inside the text, and the list displays as one line per error.
pub fn config(data: &[u8]) {
    config_text(&String::from_utf8_lossy(data));
    config_text(&vocabulary(data, CONFIG_TOKENS));
}

const CONFIG_PATH: &str = "/fuzz/tarmac.toml";

fn config_text(text: &str) {
    let path = Path::new(CONFIG_PATH);
    match Config::from_toml(text, path) {
        Ok(config) => {
            assert_eq!(config.path.as_deref(), Some(path));
            assert!(config.server.workers > 0, "workers = 0 left unresolved");
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "error without errors for {text:?}");
            let lines = text.split('\n').count();
            for error in &errors.0 {
                assert!(!error.message.trim().is_empty(), "{error:?} for {text:?}");
                assert_eq!(error.path, path);
                if let Some(line) = error.line {
                    assert!((1..=lines).contains(&line), "{error:?} for {text:?}");
                }
            }
            let shown = errors.to_string();
            assert_eq!(
                shown.lines().count(),
                errors.0.len(),
                "not one line per error: {shown:?} for {text:?}"
            );
        }
    }
}

/// Keys, values and syntax of `tarmac.toml`; input bytes pick from it.
const CONFIG_TOKENS: &[&str] = &[
    "\n",
    " ",
    "=",
    "\"",
    ",",
    "[",
    "]",
    "#",
    "\n[server]\n",
    "\n[limits]\n",
    "\n[timeouts]\n",
    "\n[downstream]\n",
    "\n[tls]\n",
    "\n[dns]\n",
    "\n[[dnsbl]]\n",
    "\n[scoring]\n",
    "\n[tarpit]\n",
    "\n[greylist]\n",
    "\n[reputation]\n",
    "\n[state]\n",
    "\n[metrics]\n",
    "\n[lists]\n",
    "\n[rules]\n",
    "\n[content]\n",
    "listen = ",
    "hostname = ",
    "workers = ",
    "max_connections = ",
    "max_tarpitted = ",
    "state_dir = ",
    "proxy_protocol_from = ",
    "max_connections_per_ip = ",
    "connection_rate_per_ip = ",
    "connection_rate_per_subnet = ",
    "max_message_size = ",
    "max_recipients = ",
    "max_unknown_commands = ",
    "max_junk_commands = ",
    "max_errors = ",
    "max_line_length = ",
    "bare_newline = ",
    "connect = ",
    "command = ",
    "data = ",
    "idle = ",
    "drain = ",
    "servers = ",
    "mode = ",
    "pool_size = ",
    "announce_client = ",
    "tls = ",
    "tls_verify = ",
    "cert = ",
    "key = ",
    "timeout = ",
    "cache_ttl = ",
    "rdns = ",
    "zone = ",
    "weight = ",
    "codes = ",
    "reply = ",
    "allow_at = ",
    "tarpit_at = ",
    "reject_at = ",
    "reject_mode = ",
    "greet_pause = ",
    "banner_continuation = ",
    "pregreet = ",
    "reply_delay = ",
    "stutter = ",
    "pass_ttl = ",
    "enabled = ",
    "delay = ",
    "retry_window = ",
    "half_life = ",
    "backend = ",
    "redis = ",
    "prefix = ",
    "allow = ",
    "deny = ",
    "files = ",
    "rspamd = ",
    "milters = ",
    "on_failure = ",
    "spool_after = ",
    "max_scans = ",
    "\"0.0.0.0:25\"",
    "[\"127.0.0.1:10025\"]",
    "\"[::1]:25\"",
    "\"192.0.2.1\"",
    "\"mx.example.org\"",
    "\"-bad-\"",
    "0",
    "1",
    "-1",
    "4096",
    "99999999999999999999",
    "1.5",
    "\"25MB\"",
    "\"64KiB\"",
    "\"0B\"",
    "\"30/min\"",
    "\"5/s\"",
    "\"0/h\"",
    "\"250ms\"",
    "\"0s\"",
    "\"36d\"",
    "\"9999999999999d\"",
    "\"reject\"",
    "\"normalize\"",
    "\"xclient\"",
    "\"proxy-v1\"",
    "\"proxy-v2\"",
    "\"none\"",
    "\"required\"",
    "\"multiplexing\"",
    "\"enforce\"",
    "\"drop\"",
    "\"redis\"",
    "true",
    "false",
    "[\"subnet\", \"sender\", \"recipient\"]",
    "\"127.0.0.2-127.0.0.11\"",
    "\"192.0.2.0/24\"",
    "\"2001:db8::/129\"",
    "\"zen.spamhaus.org\"",
    "\"cert.pem\"",
    "\"http://127.0.0.1:11333\"",
    "\"inet:127.0.0.1:8891\"",
    "\"unix:/run/milter.sock\"",
    "\"tempfail\"",
    "\"accept\"",
    "\"\"",
    "[]",
    "{}",
    "\"\u{e9}\"",
    "\"\\u0000\"",
    "'''x\n'''",
    "\r\n",
];
