//! Child processes of a test: interop peers run to completion, and a `tarmac` child whose
//! stderr the test reads line by line. Every wait is bounded by [`WAIT`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::WAIT;

/// Runs a peer to completion within [`WAIT`] (killed otherwise); returns (success, output).
#[track_caller]
pub fn run_bounded(mut command: Command) -> (bool, String) {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn peer");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait peer") {
            let output = child.wait_with_output().expect("peer output");
            let text = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            return (status.success(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` still runs (a zombie has ended).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Where a program is on PATH (or in /usr/sbin for Postfix's tools).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// An interop peer; missing outside CI is a skip (with a note), missing under `CI=true` fails.
pub fn require_program(name: &str) -> Option<PathBuf> {
    let found = find_program(name);
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is not installed, but CI must run this interop test (.ci/run installs it)"
        );
        eprintln!("note: {name} not installed; skipping this interop test");
    }
    found
}

/// Waits until `ready()` says the child `child` serves, polling for at most `wait`; false when
/// the child exits first (a bad configuration, or a port someone else took) or `wait` runs out.
/// The one readiness loop of every peer a test starts (Redis, rspamd, OpenDKIM).
pub fn wait_ready(
    child: &mut std::process::Child,
    wait: Duration,
    mut ready: impl FnMut() -> bool,
) -> bool {
    let give_up = Instant::now() + wait;
    while Instant::now() < give_up {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        if ready() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// An empty directory for one peer instance (`tarmac-KIND-PID-N`): the pid tells the runs
/// apart, the counter the instances of one run.
pub fn instance_dir(kind: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tarmac-{kind}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The next stderr line of a child containing `needle`, within [`WAIT`].
#[track_caller]
pub fn wait_for_log(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let give_up = Instant::now() + WAIT;
    loop {
        let left = give_up.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no log line containing {needle:?}: {e}"),
        }
    }
}

/// A tarmac child whose stderr lines arrive on `lines`; killed (by its PID) when dropped, so
/// a failing test leaves nothing running.
pub struct Running {
    pub pid: u32,
    pub lines: mpsc::Receiver<String>,
    child: Option<std::process::Child>,
}

impl Running {
    /// `tarmac run -c config`, logging at info; `tarmac` is the binary's command (the tests'
    /// `util::tarmac()`, from `CARGO_BIN_EXE_tarmac`). The file must set `state_dir` (to a test
    /// directory): the default, /var/lib/tarmac, is the real one, and tests may run as root.
    #[track_caller]
    pub fn start(mut tarmac: Command, config: &Path) -> Running {
        let text = std::fs::read_to_string(config).unwrap();
        assert!(
            text.contains("\nstate_dir = "),
            "{}: a test's config must set [server] state_dir",
            config.display()
        );
        tarmac
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info");
        Running::spawn(tarmac)
    }

    /// Any tarmac command line (`demo`, ...), stdin and stdout closed, stderr read.
    #[track_caller]
    pub fn spawn(mut command: Command) -> Running {
        use std::io::BufRead;
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running {
            pid: child.id(),
            lines,
            child: Some(child),
        }
    }

    /// Sends `signal` (`HUP`, `TERM`, `INT`) to the child.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the child to exit within [`WAIT`] (failing the test otherwise); returns its
    /// exit code and the stderr lines not yet taken from `lines`.
    #[track_caller]
    pub fn wait_exit(mut self) -> (Option<i32>, String) {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tarmac did not exit within {WAIT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at the pipe's EOF, which the exit brings.
        let rest: Vec<String> = self.lines.iter().collect();
        (status.code(), rest.join("\n"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
