//! A real `redis-server` for the shared-state tests and the greylist bench: started by the test on
//! a free loopback port, bound to 127.0.0.1 only, with no persistence (no RDB snapshots, no AOF,
//! its directory a temporary one), killed by its PID when dropped. It can be stopped and started
//! again on the same port, empty, as a Redis that crashed and came back.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long the server may take to answer PING after a start.
const START_WAIT: Duration = Duration::from_secs(10);

/// A running (or stopped) `redis-server` child.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one, or `None` when `redis-server` is not installed: a skip with a note outside
    /// CI, a failure under `CI=true` (`.ci/run` installs it).
    #[track_caller]
    pub fn start() -> Option<RedisServer> {
        let Some(program) = program() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "redis-server is not installed, but CI must run the Redis tests (.ci/run \
                 installs it)"
            );
            eprintln!("note: redis-server not installed; skipping this Redis test");
            return None;
        };
        // A port freed just now can be taken by someone else before redis binds it: try a
        // few, each bounded.
        for attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free loopback port");
            let dir = std::env::temp_dir().join(format!(
                "tarmac-redis-{}-{port}-{attempt}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).expect("redis dir");
            let mut server = RedisServer {
                port,
                dir,
                child: None,
            };
            if server.spawn(&program) {
                return Some(server);
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL, by its PID, which also ends a paused one) and waits for it:
    /// Redis gone without warning.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process without closing anything (SIGSTOP): connections stay open and
    /// nothing is answered, as a Redis stuck on a slow command or a full disk.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let Some(child) = self.child.as_ref() else {
            return;
        };
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Starts it again on the same port, empty (nothing was persisted).
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        let program = program().expect("redis-server");
        assert!(self.spawn(&program), "redis-server did not restart");
    }

    /// A connection of the test's own, to look at keys.
    #[track_caller]
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(START_WAIT)
            .unwrap()
    }

    /// Starts the child on `self.port`; whether it answers PING within [`START_WAIT`].
    fn spawn(&mut self, program: &PathBuf) -> bool {
        let child = Command::new(program)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
                "--logfile",
                "",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server");
        let mut child = child;
        let url = self.url();
        if crate::process::wait_ready(&mut child, START_WAIT, || answers_ping(&url)) {
            self.child = Some(child);
            return true;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

/// Whether the Redis at `url` answers PING.
fn answers_ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
        return false;
    };
    redis::cmd("PING").query::<String>(&mut con).is_ok()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-server` on PATH, or where Debian puts it.
fn program() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
}
