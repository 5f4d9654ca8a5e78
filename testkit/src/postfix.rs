//! A real Postfix smtpd as the downstream: a private instance started by the test, never the
//! system one. Its own `config_directory`, `queue_directory` and `data_directory` under a temp
//! dir, smtpd on `127.0.0.1:PORT` only (a free port; or the address the test gives, inside a
//! network namespace of the test's, [`PostfixOptions::listen`] and [`PostfixOptions::netns`]),
//! no DNS at all, its log in a file
//! (`maillog_file` through the `postlog` service), Maildir delivery for `example.test` (users
//! [`USERS`]) through the `virtual` agent, everything else discarded (nothing ever leaves the
//! machine). tarmac's address, 127.0.0.1, may send XCLIENT; `mynetworks` is what the test says.
//!
//! Postfix's master must start as root (it drops to `mail_owner`); where `postfix` is missing or
//! the tests do not run as root, [`Postfix::start`] is a skip with a note outside CI and a failure
//! under `CI=true`. Facts about running it privately: `/work/shared/PEERS.md`.
//!
//! The master is stopped with `postfix -c DIR stop` when dropped (and killed by its PID if that
//! does not end it), and the temp dir is removed (kept, for a look at its log and Maildirs, when
//! `TARMAC_KEEP_POSTFIX` is set).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::WAIT;
use crate::netns::Namespace;
use crate::process::alive;

/// The virtual mailbox domain; its users are [`USERS`], anyone else there is unknown (`550 5.1.1`).
pub const DOMAIN: &str = "example.test";

/// The users of [`DOMAIN`] with a Maildir.
pub const USERS: &[&str] = &["alice", "bob"];

/// Postfix's `myhostname`: its banner and its `Received:` line (`by postfix.test (Postfix)`).
pub const HOSTNAME: &str = "postfix.test";

/// What a test wants of its Postfix beyond the fixed private setup.
#[derive(Clone, Debug, Default)]
pub struct PostfixOptions {
    /// `mynetworks`: the trusted clients (`permit_mynetworks` lets them relay anywhere), e.g.
    /// `127.0.0.7/32`. Empty: nobody (tarmac's own 127.0.0.1 is never in it unless listed).
    pub mynetworks: Vec<String>,
    /// STARTTLS offered (`smtpd_tls_security_level = may`) with a fresh certificate for
    /// loopback from a private CA ([`crate::certs::TestCerts`], in its `conf/`; the CA is
    /// [`Postfix::tls_ca`]); Postfix then logs each handshake and puts it in its `Received:` line.
    pub starttls: bool,
    /// More `main.cf` lines (`name = value`), written after the fixed ones, so they win.
    pub main_cf: Vec<(String, String)>,
    /// Where its smtpd listens (`inet_interfaces` and the master.cf line), e.g.
    /// `198.51.100.25:25` inside [`PostfixOptions::netns`]. `None`: `127.0.0.1` on a free port.
    pub listen: Option<SocketAddr>,
    /// The network namespace it runs in: every `postfix` command is run through `nsenter`, and
    /// the readiness and stop checks connect from inside. The instance keeps the namespace
    /// alive until it is dropped.
    pub netns: Option<Namespace>,
}

/// A private Postfix instance (running, or stopped by [`Postfix::stop`]).
pub struct Postfix {
    dir: PathBuf,
    addr: SocketAddr,
    netns: Option<Namespace>,
    running: bool,
}

impl Postfix {
    /// Writes the configuration into a fresh temp dir, checks it (`postfix check`) and starts
    /// the instance; returns once its smtpd answers `220`. `None` when Postfix cannot run here
    /// (see the module documentation).
    #[track_caller]
    pub fn start(options: PostfixOptions) -> Option<Postfix> {
        let postfix = crate::require_program("postfix")?;
        if !is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the Postfix tests start a private Postfix, whose master must run as root; CI \
                 must run them as root"
            );
            eprintln!("note: not root, Postfix's master cannot start; skipping this Postfix test");
            return None;
        }
        let (uid, gid) = mail_owner_ids();
        // A port freed just now can be taken by someone else before the master binds it: try a
        // few. An address the test gives is its own to take: one try.
        let attempts = if options.listen.is_some() { 1 } else { 5 };
        for _attempt in 0..attempts {
            let addr = options.listen.unwrap_or_else(|| {
                TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free loopback port")
            });
            let dir = crate::process::instance_dir("postfix");
            let instance = Postfix {
                dir,
                addr,
                netns: options.netns.clone(),
                running: false,
            };
            instance.write_config(&options, uid, gid);
            let (ok, output) = instance.postfix(&postfix, "check");
            assert!(
                ok,
                "postfix check failed: {output}\n{}",
                instance.log_tail()
            );
            let mut instance = instance;
            if instance.try_start(&postfix) {
                return Some(instance);
            }
            // Dropping it cleans up; on to another port.
            eprintln!(
                "note: private Postfix did not start on {addr}:\n{}",
                instance.log_tail()
            );
        }
        panic!("a private Postfix did not start ({attempts} tries)");
    }

    /// Where its smtpd listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate (PEM) that signed its STARTTLS certificate, with
    /// [`PostfixOptions::starttls`].
    pub fn tls_ca(&self) -> Option<PathBuf> {
        let ca = self.dir.join("conf").join("postfix-ca.pem");
        ca.is_file().then_some(ca)
    }

    /// Its temp dir: `conf/` (main.cf, master.cf), `queue/`, `data/`, `mail/`, `maillog`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every message delivered to `user`'s Maildir (`new/` and `cur/`), ordered by file name
    /// (Maildir names start with the delivery time).
    pub fn maildir_messages(&self, user: &str) -> Vec<String> {
        let maildir = self.dir.join("mail").join(DOMAIN).join(user);
        let mut files: Vec<(String, String)> = ["new", "cur"]
            .iter()
            .filter_map(|sub| std::fs::read_dir(maildir.join(sub)).ok())
            .flat_map(|entries| entries.flatten())
            .filter_map(|entry| {
                let text = std::fs::read_to_string(entry.path()).ok()?;
                Some((entry.file_name().to_string_lossy().into_owned(), text))
            })
            .collect();
        files.sort();
        files.into_iter().map(|(_, text)| text).collect()
    }

    /// Waits (bounded by [`WAIT`]) until `user` has at least `count` messages; returns them all.
    #[track_caller]
    pub fn wait_for_messages(&self, user: &str, count: usize) -> Vec<String> {
        let give_up = Instant::now() + WAIT;
        loop {
            let messages = self.maildir_messages(user);
            if messages.len() >= count {
                return messages;
            }
            assert!(
                Instant::now() < give_up,
                "{user} has {} messages, expected {count}; Postfix's log:\n{}",
                messages.len(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The contents (lossy text) of every file in its mail queue (incoming, active, deferred,
    /// hold, maildrop, corrupt): a message that is neither delivered nor gone is here.
    pub fn queued(&self) -> Vec<String> {
        fn walk(dir: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else if let Ok(bytes) = std::fs::read(&path) {
                    out.push(String::from_utf8_lossy(&bytes).into_owned());
                }
            }
        }
        let mut out = Vec::new();
        for queue in [
            "incoming", "active", "deferred", "hold", "maildrop", "corrupt",
        ] {
            walk(&self.dir.join("queue").join(queue), &mut out);
        }
        out
    }

    /// The whole log so far (`maillog_file`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// The first log line containing `needle`, waiting for it (bounded by [`WAIT`]; the log is
    /// written by the postlog service, a moment after the fact).
    #[track_caller]
    pub fn wait_for_log(&self, needle: &str) -> String {
        self.wait_for_log_matching(needle, |_| true)
    }

    /// The first log line containing `needle` for which `also` holds, waiting for it (bounded).
    #[track_caller]
    pub fn wait_for_log_matching(&self, needle: &str, also: impl Fn(&str) -> bool) -> String {
        let give_up = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle) && also(l)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < give_up,
                "no line containing {needle:?} in Postfix's log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the instance (`postfix stop`: the master and every smtpd go, open connections are
    /// closed) and waits until the master is gone and the port refuses connections.
    #[track_caller]
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let program = crate::find_program("postfix").expect("postfix");
        let master = self.master_pid();
        let (ok, output) = self.postfix(&program, "stop");
        self.running = false;
        let give_up = Instant::now() + WAIT;
        loop {
            let master_gone = master.is_none_or(|pid| !alive(pid));
            if master_gone && !self.accepts() {
                break;
            }
            if Instant::now() > give_up {
                // `postfix stop` did not end it: the master we started, by its PID.
                if let Some(pid) = master {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
                panic!(
                    "private Postfix did not stop ({ok}, {output}):\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a stopped instance again, same configuration, queue and port; returns once its
    /// smtpd answers `220`.
    #[track_caller]
    pub fn start_again(&mut self) {
        assert!(!self.running, "already running");
        let program = crate::find_program("postfix").expect("postfix");
        assert!(
            self.try_start(&program),
            "private Postfix did not start again:\n{}",
            self.log_tail()
        );
    }

    /// `postfix -c conf START`; whether its smtpd then answers `220` within [`WAIT`].
    fn try_start(&mut self, program: &Path) -> bool {
        let (ok, output) = self.postfix(program, "start");
        if !ok {
            eprintln!("note: postfix start: {output}");
            return false;
        }
        self.running = true;
        let give_up = Instant::now() + WAIT;
        while Instant::now() < give_up {
            if self.answers_banner() {
                return true;
            }
            if self.master_pid().is_none_or(|pid| !alive(pid)) {
                // The master gave up (most likely the port was taken).
                self.running = false;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// `f` where its smtpd listens: inside its namespace, or here.
    fn where_it_listens<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.netns {
            Some(netns) => netns.enter(f),
            None => f(),
        }
    }

    /// Whether its smtpd accepts a connection.
    fn accepts(&self) -> bool {
        let addr = self.addr;
        self.where_it_listens(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())
    }

    /// Connects, reads a `220` banner, says QUIT.
    fn answers_banner(&self) -> bool {
        let addr = self.addr;
        let Some(stream) = self
            .where_it_listens(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reader = BufReader::new(&stream);
        let mut banner = String::new();
        let ok = reader.read_line(&mut banner).is_ok() && banner.starts_with("220 ");
        let _ = (&stream).write_all(b"QUIT\r\n");
        ok
    }

    /// `postfix -c conf <command>`, bounded: (success, output).
    fn postfix(&self, program: &Path, command: &str) -> (bool, String) {
        crate::run_bounded(self.postfix_command(program, command))
    }

    /// The command line `postfix -c conf <command>`, inside its namespace if it has one.
    fn postfix_command(&self, program: &Path, command: &str) -> Command {
        let mut cmd = match &self.netns {
            Some(netns) => netns.command(program),
            None => Command::new(program),
        };
        cmd.arg("-c").arg(self.dir.join("conf")).arg(command);
        cmd
    }

    /// The master's PID, from `queue/pid/master.pid`.
    fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("queue/pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The last lines of the log, for a failure message.
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn write_config(&self, options: &PostfixOptions, uid: u32, gid: u32) {
        let dir = &self.dir;
        let conf = dir.join("conf");
        let mail = dir.join("mail");
        let data = dir.join("data");
        for d in [&conf, &dir.join("queue"), &data, &mail] {
            std::fs::create_dir_all(d).unwrap();
        }
        // The data directory belongs to mail_owner; the Maildirs to the virtual user.
        std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
        std::os::unix::fs::chown(&mail, Some(uid), Some(gid)).unwrap();

        let mut users = String::new();
        for user in USERS {
            writeln!(users, "{user}@{DOMAIN} {DOMAIN}/{user}/").unwrap();
        }
        std::fs::write(conf.join("vmailbox"), users).unwrap();

        let d = dir.display();
        let listen_ip = self.addr.ip();
        let inet_protocols = if listen_ip.is_ipv6() { "ipv6" } else { "ipv4" };
        let mut main = format!(
            "\
# A private Postfix for one test (tarmac-testkit, testkit/src/postfix.rs); never the system instance.
compatibility_level = 3.6
config_directory = {d}/conf
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {HOSTNAME}
mydomain = {HOSTNAME}
myorigin = {HOSTNAME}
inet_interfaces = {listen_ip}
inet_protocols = {inet_protocols}
# Log to a file of its own, through the postlog service; no syslog.
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
# No DNS, ever: no lookups in smtpd, none in delivery.
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
# No local delivery, nothing ever sent on: example.test goes to Maildirs, the rest is discarded.
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
relay_domains =
default_transport = discard:never sent on by a test
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = texthash:{d}/conf/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
# tarmac (127.0.0.1) may announce its clients (a test in a namespace names its gateway in
# `main_cf`); the trusted clients are the test's.
smtpd_authorized_xclient_hosts = 127.0.0.1
mynetworks = {mynetworks}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
# One log line per message naming the client, its HELO and protocol as smtpd sees them:
# `QUEUEID: info: DATA from unknown[ADDR]: ; from=<..> to=<..> proto=ESMTP helo=<NAME>`.
smtpd_data_restrictions = check_client_access static:INFO
# Stricter defaults of current Postfix releases.
smtpd_forbid_unauth_pipelining = yes
smtpd_forbid_bare_newline = normalize
# A test wants its answers now, not after an error sleep.
smtpd_error_sleep_time = 0
",
            mynetworks = options.mynetworks.join(", "),
        );
        if options.starttls {
            let certs = crate::certs::TestCerts::generate(&conf, "postfix");
            write!(
                main,
                "\
smtpd_tls_security_level = may
smtpd_tls_cert_file = {}
smtpd_tls_key_file = {}
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
",
                certs.chain.display(),
                certs.key.display()
            )
            .unwrap();
        }
        for (name, value) in &options.main_cf {
            writeln!(main, "{name} = {value}").unwrap();
        }
        std::fs::write(conf.join("main.cf"), main).unwrap();

        // Only the services this setup uses; nothing chrooted.
        let master = format!(
            "\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
",
            listen = self.addr
        );
        std::fs::write(conf.join("master.cf"), master).unwrap();
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if self.running {
            // Never panic in drop: a failing test is already unwinding.
            if let Some(program) = crate::find_program("postfix") {
                let master = self.master_pid();
                let _ = self
                    .postfix_command(&program, "stop")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
                if let Some(pid) = master {
                    let give_up = Instant::now() + WAIT;
                    while alive(pid) && Instant::now() < give_up {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if alive(pid) {
                        let _ = Command::new("kill")
                            .args(["-KILL", &pid.to_string()])
                            .status();
                    }
                }
            }
        }
        if std::env::var_os("TARMAC_KEEP_POSTFIX").is_some() {
            eprintln!(
                "note: kept the private Postfix's files in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The `postfix` user's uid and gid (from /etc/passwd; the package creates it).
fn mail_owner_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.first() != Some(&"postfix") || fields.len() < 4 {
                return None;
            }
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        })
        .expect("the postfix user (created by the postfix package)")
}
