//! A real OpenDKIM 2.11 milter for the content-inspection tests (DESIGN.md §7): a private
//! instance started by the test, never the system one. Everything it reads and writes is in a
//! temp dir of its own: a fresh test key (`opendkim-genkey`), its configuration, its PID file,
//! its stderr, and the Unbound configuration that points its resolver at a loopback DNS server
//! the instance owns ([`DnsServer`] with no zones, so every query gets REFUSED; in signing mode
//! it should ask nothing, and never asks the system resolver). It listens on
//! `inet:PORT@127.0.0.1` (a free port), signs mail of its one domain (`Mode s`) from clients in
//! 127.0.0.0/8 (`InternalHosts`), and logs nothing to syslog.
//!
//! Where `opendkim` or `opendkim-genkey` is missing, [`OpenDkim::start`] is a skip with a note
//! outside CI and a failure under `CI=true` (`.ci/run` installs them). Facts about running it
//! privately: `/work/shared/PEERS.md`.
//!
//! Dropping it kills the process by its PID (SIGKILL: it keeps no state worth a graceful stop,
//! and its SIGTERM shutdown takes seconds) and removes the temp dir (kept, for a look at its
//! files, when `TARMAC_KEEP_OPENDKIM` is set).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::WAIT;
use crate::dns_server::DnsServer;

/// A running private OpenDKIM milter.
pub struct OpenDkim {
    dir: PathBuf,
    port: u16,
    domain: String,
    selector: String,
    record: String,
    child: Child,
    // Its resolver's only upstream; lives as long as the milter (taken back for a retry).
    dns: Option<DnsServer>,
}

impl OpenDkim {
    /// Makes a key for `selector._domainkey.domain`, writes the configuration, starts
    /// `opendkim -f -x FILE` and returns once its milter port accepts connections. `None`
    /// when OpenDKIM is not installed (see the module documentation).
    #[track_caller]
    pub fn start(domain: &str, selector: &str) -> Option<OpenDkim> {
        let opendkim = crate::require_program("opendkim")?;
        let genkey = crate::require_program("opendkim-genkey")?;
        let mut dns = Some(DnsServer::start(Vec::new()));
        // A port freed just now can be taken by someone else before OpenDKIM binds it: try a
        // few.
        for _attempt in 0..5 {
            let port = crate::free_port();
            let dir = crate::process::instance_dir("opendkim");
            // It holds the private key: the test's user only.
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .unwrap();
            let record = make_key(&genkey, &dir, domain, selector);
            let dns_addr = dns.as_ref().expect("the DNS server").addr();
            write_config(&dir, port, domain, selector, dns_addr);
            let stderr = std::fs::File::create(dir.join("stderr")).expect("opendkim stderr file");
            let child = Command::new(&opendkim)
                .arg("-f")
                .arg("-x")
                .arg(dir.join("opendkim.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("spawning opendkim");
            let mut instance = OpenDkim {
                dir,
                port,
                domain: domain.to_owned(),
                selector: selector.to_owned(),
                record,
                child,
                dns: dns.take(),
            };
            let addr = instance.addr();
            let ready = || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
            if crate::process::wait_ready(&mut instance.child, WAIT, ready) {
                return Some(instance);
            }
            eprintln!(
                "note: private OpenDKIM did not start on port {port}:\n{}",
                instance.stderr()
            );
            // Dropping it kills it and cleans up; on to another port (with the same DNS).
            dns = instance.dns.take();
        }
        panic!("a private OpenDKIM did not start on any of 5 free ports");
    }

    /// The milter socket in OpenDKIM's (and sendmail's) notation: `inet:PORT@127.0.0.1`.
    pub fn socket(&self) -> String {
        format!("inet:{}@127.0.0.1", self.port)
    }

    /// The same socket in Postfix's notation, for `smtpd_milters`: `inet:127.0.0.1:PORT`.
    pub fn postfix_milter(&self) -> String {
        format!("inet:127.0.0.1:{}", self.port)
    }

    /// Where the milter listens.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The signing domain (`d=`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The selector (`s=`).
    pub fn selector(&self) -> &str {
        &self.selector
    }

    /// The DNS name of the public key: `selector._domainkey.domain`.
    pub fn dns_name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }

    /// The public key's TXT record, its strings joined: `v=DKIM1; h=sha256; k=rsa; p=...`.
    pub fn dns_record(&self) -> &str {
        &self.record
    }

    /// Its temp dir: `opendkim.conf`, `SELECTOR.private`, `SELECTOR.txt`, `unbound.conf`,
    /// `opendkim.pid`, `stderr`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }
}

impl Drop for OpenDkim {
    fn drop(&mut self) {
        // By its PID (the child we spawned, `-f`: no fork); never panic in drop.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("TARMAC_KEEP_OPENDKIM").is_some() {
            eprintln!(
                "note: kept the private OpenDKIM's files in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `opendkim-genkey` into `dir`: `SELECTOR.private` and `SELECTOR.txt`; returns the TXT
/// record's strings joined.
#[track_caller]
fn make_key(genkey: &Path, dir: &Path, domain: &str, selector: &str) -> String {
    let mut cmd = Command::new(genkey);
    cmd.arg("-D")
        .arg(dir)
        .args(["-d", domain, "-s", selector, "-b", "2048"]);
    let (ok, output) = crate::run_bounded(cmd);
    assert!(ok, "opendkim-genkey failed: {output}");
    let txt = std::fs::read_to_string(dir.join(format!("{selector}.txt")))
        .expect("opendkim-genkey's .txt file");
    txt_record(&txt)
}

/// The quoted strings of a zone-file TXT record (`opendkim-genkey`'s `.txt`), joined.
fn txt_record(zone_line: &str) -> String {
    let record: String = zone_line
        .split('"')
        .skip(1)
        .step_by(2)
        .collect::<Vec<_>>()
        .concat();
    assert!(
        record.starts_with("v=DKIM1") && record.contains("p="),
        "not a DKIM key record: {zone_line}"
    );
    record
}

fn write_config(dir: &Path, port: u16, domain: &str, selector: &str, dns: SocketAddr) {
    let d = dir.display();
    // Unbound (OpenDKIM's resolver here): everything to the instance's own loopback server.
    let unbound = format!(
        "\
server:
    do-not-query-localhost: no
forward-zone:
    name: \".\"
    forward-addr: {ip}@{port}
",
        ip = dns.ip(),
        port = dns.port()
    );
    std::fs::write(dir.join("unbound.conf"), unbound).unwrap();
    let conf = format!(
        "\
# A private OpenDKIM for one test (tarmac-testkit, testkit/src/opendkim.rs); never the system one.
Syslog no
Socket inet:{port}@127.0.0.1
Mode s
Domain {domain}
Selector {selector}
KeyFile {d}/{selector}.private
# The key is 0600 in a 0700 dir, but under /tmp, which others may write: OpenDKIM's path check
# (every directory up to /) refuses it unless told the key may be \"unsafe\".
RequireSafeKeys false
InternalHosts 127.0.0.0/8
PidFile {d}/opendkim.pid
ResolverConfiguration {d}/unbound.conf
"
    );
    std::fs::write(dir.join("opendkim.conf"), conf).unwrap();
}

/// Debian's Python (the one `python3-dkim` installs into), not whatever `python3` a PATH
/// prefers; `None` (skip, with a note) where dkimpy is missing outside CI, a failure under
/// `CI=true` (`.ci/run` installs it).
#[track_caller]
pub fn dkimpy() -> Option<&'static str> {
    const PYTHON: &str = "/usr/bin/python3";
    let ok = Command::new(PYTHON)
        .args(["-c", "import dkim"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "dkimpy (python3-dkim) is not installed, but CI must run the OpenDKIM tests (.ci/run \
             installs it)"
        );
        eprintln!("note: python3-dkim not installed; skipping this OpenDKIM test");
        return None;
    }
    Some(PYTHON)
}

/// Whether dkimpy (`python`, from [`dkimpy`]) verifies `message` (LF or CRLF lines), answering
/// its one DNS question, which must be `name`, with `record` (the launcher's
/// [`OpenDkim::dns_name`] and [`OpenDkim::dns_record`]).
#[track_caller]
pub fn dkim_verifies(python: &str, message: &[u8], name: &str, record: &str) -> bool {
    const SCRIPT: &str = r#"
import sys, dkim
name, record, path = sys.argv[1], sys.argv[2], sys.argv[3]
msg = open(path, "rb").read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
asked = []
def dnsfunc(qname, timeout=5):
    q = qname.decode() if isinstance(qname, bytes) else qname
    asked.append(q)
    return record.encode() if q.rstrip(".") == name else None
ok = dkim.verify(msg, dnsfunc=dnsfunc)
assert asked == [name + "."] or asked == [name], asked
print("verified" if ok else "failed")
"#;
    // One directory per call: tests verify in parallel, and each removes its own.
    let dir = crate::process::instance_dir("dkim-verify");
    let path = dir.join("message.eml");
    std::fs::write(&path, message).expect("the message to verify");
    let mut cmd = Command::new(python);
    cmd.args(["-c", SCRIPT, name, record]).arg(&path);
    let (ok, output) = crate::run_bounded(cmd);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "dkimpy: {output}");
    match output.trim() {
        "verified" => true,
        "failed" => false,
        other => panic!("dkimpy said {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::txt_record;

    #[test]
    fn joins_the_quoted_strings_of_a_genkey_record() {
        let txt = "sel._domainkey\tIN\tTXT\t( \"v=DKIM1; h=sha256; k=rsa; \"\n\t  \"p=MIIB\"\n\t  \"AQAB\" )  ; ----- DKIM key sel for d.test\n";
        assert_eq!(txt_record(txt), "v=DKIM1; h=sha256; k=rsa; p=MIIBAQAB");
    }
}
