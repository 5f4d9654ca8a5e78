//! A real rspamd for the content-inspection tests: a private instance started by the test, never
//! the system one. The stock `/etc/rspamd/rspamd.conf` with `LOCAL_CONFDIR`, `DBDIR`, `RUNDIR` and
//! `LOGDIR` pointed into a temp dir (`conf/`, `db/`, `run/`, `log/`), so it reads only this
//! module's `local.d/` and `override.d/` files and writes nothing outside the temp dir; its normal
//! worker on a free loopback port ([`Rspamd::addr`]), the controller and proxy workers not run
//! (`count = 0`, on free loopback ports of their own so nothing touches the stock 11332–11334);
//! its DNS at the test's own loopback server.
//!
//! The modules that ask the network (RBL, SURBL, SPF, DKIM, DMARC, ARC, hfilter, fuzzy, ...) are
//! off, so scores do not depend on lookups timing out: a clean message is `no action`, GTUBE is
//! `reject`. Hyperscan's compiled databases go to a directory kept between tests
//! ([`hs_cache_dir`]): the first start on a machine compiles them (~10 s), later ones take well
//! under a second.
//!
//! Test markers: a message whose text carries [`MARK_GREYLIST`], [`MARK_ADD_HEADER`] or
//! [`MARK_REWRITE_SUBJECT`] scores between the `greylist`, `add header` and `rewrite subject`
//! thresholds (4, 6, 8; `reject` stays at 15), through Lua rules in `conf/rspamd.local.lua`, so a
//! test can get each of those actions from the real rspamd; the rewritten subject is
//! `*** SPAM *** <subject>`. A message carrying [`MARK_ECHO`] gets, in the answer's
//! `milter.add_headers`, an [`ECHO_HEADER`] whose value echoes what rspamd understood of the
//! request headers: `ip=…; helo=…; hostname=…; from=…; rcpt=…` (each) `; queue_id=…;
//! mta_name=…; tls_version=…; tls_cipher=…` (a key left out when rspamd has no value).
//!
//! Run as root (`-i`, as the tests do here and in CI) in the foreground (`-f`); stopped by its PID
//! (SIGTERM, then SIGKILL) when dropped, and its temp dir removed (kept, with its log, when
//! `TARMAC_KEEP_RSPAMD` is set). Where `rspamd` is missing, [`Rspamd::start`] is a skip with a
//! note outside CI and a failure under `CI=true`. Facts about running it privately:
//! `/work/shared/PEERS.md`.
//!
//! [`check`] is a minimal blocking HTTP/1.1 client for `POST /checkv2`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::WAIT;

/// How long a start may take: the first one on a machine compiles the Hyperscan databases.
const START_WAIT: Duration = Duration::from_secs(60);

/// How long a stop may take after SIGTERM before SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Modules that do DNS or other network lookups (or need Redis), switched off for deterministic
/// scores: each gets `local.d/MODULE.conf` with `enabled = false;`.
const NETWORK_MODULES: &[&str] = &[
    "asn",
    "arc",
    "bimi",
    "dcc",
    "dkim",
    "dkim_signing",
    "dmarc",
    "emails",
    "fuzzy_check",
    "greylist",
    "hfilter",
    "history_redis",
    "mx_check",
    "neural",
    "phishing",
    "ratelimit",
    "rbl",
    "replies",
    "reputation",
    "rspamd_update",
    "spf",
    "surbl",
    "url_redirector",
    "whitelist",
];

/// Scores 4.5: `greylist`.
pub const MARK_GREYLIST: &str = "TARMAC-TEST-GREYLIST";
/// Scores 6.5: `add header`.
pub const MARK_ADD_HEADER: &str = "TARMAC-TEST-ADD-HEADER";
/// Scores 9: `rewrite subject`.
pub const MARK_REWRITE_SUBJECT: &str = "TARMAC-TEST-REWRITE-SUBJECT";
/// Asks for [`ECHO_HEADER`] in the answer (see the module docs); scores 0.
pub const MARK_ECHO: &str = "TARMAC-TEST-ECHO";
/// The header of `milter.add_headers` that echoes the request headers.
pub const ECHO_HEADER: &str = "X-Tarmac-Echo";

/// The Lua rules of the markers and of [`ENVELOPE_SYMBOL`].
const LOCAL_LUA: &str = r#"
local markers = {
  TARMAC_TEST_GREYLIST = {'TARMAC-TEST-GREYLIST', 4.5},
  TARMAC_TEST_ADD_HEADER = {'TARMAC-TEST-ADD-HEADER', 6.5},
  TARMAC_TEST_REWRITE_SUBJECT = {'TARMAC-TEST-REWRITE-SUBJECT', 9.0},
}
for sym, m in pairs(markers) do
  rspamd_config[sym] = {
    callback = function(task)
      return tostring(task:get_content()):find(m[1], 1, true) ~= nil
    end,
    score = m[2],
    description = 'tarmac test marker ' .. m[1],
  }
end

rspamd_config.TARMAC_TEST_ECHO = {
  callback = function(task)
    if not tostring(task:get_content()):find('TARMAC-TEST-ECHO', 1, true) then
      return false
    end
    local opts = {}
    local function add(key, value)
      if value ~= nil then table.insert(opts, key .. '=' .. tostring(value)) end
    end
    add('ip', task:get_ip())
    add('helo', task:get_helo())
    add('hostname', task:get_hostname())
    local from = task:get_from('smtp')
    if from and from[1] then add('from', from[1].addr) end
    for _, rcpt in ipairs(task:get_recipients('smtp') or {}) do add('rcpt', rcpt.addr) end
    add('queue_id', task:get_queue_id())
    add('mta_name', task:get_request_header('MTA-Name'))
    add('tls_version', task:get_request_header('TLS-Version'))
    add('tls_cipher', task:get_request_header('TLS-Cipher'))
    task:set_milter_reply({add_headers = {['X-Tarmac-Echo'] = table.concat(opts, '; ')}})
    return true
  end,
  score = 0.0,
  description = 'tarmac test: the request headers rspamd read',
}
"#;

/// A running private rspamd.
pub struct Rspamd {
    dir: PathBuf,
    addr: SocketAddr,
    child: Option<Child>,
}

impl Rspamd {
    /// Writes the configuration into a fresh temp dir and starts rspamd with its DNS at `dns`
    /// (a loopback server of the test's own); returns once the normal worker answers
    /// `GET /ping`. `None` when rspamd is not installed (see the module documentation).
    #[track_caller]
    pub fn start(dns: SocketAddr) -> Option<Rspamd> {
        assert!(
            dns.ip().is_loopback(),
            "rspamd's DNS must be a loopback server of the test's own, not {dns}"
        );
        let program = crate::require_program("rspamd")?;
        // A port freed just now can be taken by someone else before rspamd binds it: try a few.
        for _attempt in 0..5 {
            let dir = crate::process::instance_dir("rspamd");
            let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
            let mut rspamd = Rspamd {
                dir,
                addr,
                child: None,
            };
            rspamd.write_config(dns);
            if rspamd.spawn(&program) {
                return Some(rspamd);
            }
            eprintln!(
                "note: private rspamd did not start on {addr}:\n{}",
                rspamd.log_tail()
            );
        }
        panic!("a private rspamd did not start on any of 5 free ports");
    }

    /// Where its normal worker (`/checkv2`) listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its temp dir: `conf/` (`local.d/`, `override.d/`), `db/`, `run/`, `log/rspamd.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.join("log").join("rspamd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Scans `message` with `POST /checkv2`, see [`check`].
    #[track_caller]
    pub fn check(&self, headers: &[(&str, &str)], message: &[u8]) -> serde_json::Value {
        check(self.addr, headers, message)
    }

    fn write_config(&self, dns: SocketAddr) {
        let conf = self.dir.join("conf");
        let local = conf.join("local.d");
        let over = conf.join("override.d");
        for sub in [&local, &over, &self.dir.join("db"), &self.dir.join("run")] {
            std::fs::create_dir_all(sub).expect("rspamd dir");
        }
        std::fs::create_dir_all(self.dir.join("log")).expect("rspamd log dir");
        let hs = hs_cache_dir();
        std::fs::create_dir_all(&hs).expect("rspamd hs_cache_dir");
        let write = |path: PathBuf, text: String| std::fs::write(path, text).expect("rspamd conf");
        write(
            over.join("options.inc"),
            format!(
                "dns {{\n  nameserver = [\"{dns}\"];\n  timeout = 1s;\n  retransmits = 1;\n}}\n\
                 hs_cache_dir = \"{}\";\n",
                hs.display()
            ),
        );
        write(
            over.join("worker-normal.inc"),
            format!("bind_socket = \"{}\";\ncount = 1;\n", self.addr),
        );
        for worker in ["worker-controller.inc", "worker-proxy.inc"] {
            write(
                over.join(worker),
                format!(
                    "bind_socket = \"127.0.0.1:{}\";\ncount = 0;\n",
                    crate::free_port()
                ),
            );
        }
        write(
            over.join("logging.inc"),
            "type = \"file\";\nlevel = \"info\";\n".to_owned(),
        );
        write(conf.join("rspamd.local.lua"), LOCAL_LUA.to_owned());
        write(
            local.join("actions.conf"),
            "rewrite_subject = 8;\nsubject = \"*** SPAM *** %s\";\n".to_owned(),
        );
        for module in NETWORK_MODULES {
            write(
                local.join(format!("{module}.conf")),
                "enabled = false;\n".to_owned(),
            );
        }
    }

    /// Starts the child; whether its normal worker answers `/ping` within [`START_WAIT`].
    fn spawn(&mut self, program: &Path) -> bool {
        let var = |name: &str, sub: &str| format!("--var={name}={}", self.dir.join(sub).display());
        let child = Command::new(program)
            .args(["-f", "-i", "-c", "/etc/rspamd/rspamd.conf"])
            .arg(var("LOCAL_CONFDIR", "conf"))
            .arg(var("DBDIR", "db"))
            .arg(var("RUNDIR", "run"))
            .arg(var("LOGDIR", "log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning rspamd");
        let mut child = child;
        let addr = self.addr;
        if crate::process::wait_ready(&mut child, START_WAIT, || ping(addr)) {
            self.child = Some(child);
            return true;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// SIGTERM to the main process (which stops its workers), SIGKILL after [`STOP_WAIT`].
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_WAIT;
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Rspamd {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("TARMAC_KEEP_RSPAMD").is_some() {
            eprintln!("note: rspamd dir kept at {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Where rspamd keeps its compiled Hyperscan databases between tests and runs.
pub fn hs_cache_dir() -> PathBuf {
    std::env::temp_dir().join("tarmac-rspamd-hs")
}

/// `POST /checkv2` to the rspamd at `addr`, with `headers` (`IP`, `Helo`, `From`, `Rcpt`, ...)
/// and `message` as the body; the reply's JSON. Fails the test on anything but `200` or when a
/// read or write takes longer than [`WAIT`].
#[track_caller]
pub fn check(addr: SocketAddr, headers: &[(&str, &str)], message: &[u8]) -> serde_json::Value {
    let (status, body) = request(addr, "POST", "/checkv2", headers, message)
        .unwrap_or_else(|e| panic!("POST /checkv2 to {addr}: {e}"));
    assert_eq!(
        status,
        200,
        "POST /checkv2: status {status}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "POST /checkv2: not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    })
}

/// Whether `GET /ping` answers `200` (a short timeout: it is polled).
fn ping(addr: SocketAddr) -> bool {
    matches!(request(addr, "GET", "/ping", &[], b""), Ok((200, _)))
}

/// One HTTP/1.1 request on its own connection (`Connection: close`); the status and the body
/// (of `Content-Length` bytes, or up to EOF without one).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.set_write_timeout(Some(WAIT))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;

    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut length = None;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(bad("EOF in the response header".to_owned()));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .map_err(|e| bad(format!("Content-Length {value:?}: {e}")))?,
            );
        }
    }
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            reader.read_exact(&mut body)?;
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    Ok((status, body))
}

fn bad(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}
