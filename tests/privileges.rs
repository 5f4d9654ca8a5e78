//! `[server] user` (DESIGN.md §8): the real binary started as root binds its listener, gives
//! `state_dir` to the user and becomes it for good, then serves, reloads and saves its state
//! as that user.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tarmac::privileges::Account;
use tarmac_testkit::sink::Behaviour;
use tarmac_testkit::{Client, Running, WAIT, free_port, sink, temp_dir, wait_for_log, wait_until};

use crate::util::tarmac;

/// Root is needed to become another user. CI runs as root, so there it is a failure.
fn require_root() -> bool {
    if tarmac::privileges::running_as_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the privilege-drop tests need root, and CI runs as root"
    );
    eprintln!("note: not root; skipping the privilege-drop test");
    false
}

/// The `Uid:` or `Gid:` line of `/proc/PID/status`: real, effective, saved, file-system IDs.
fn status_ids(pid: u32, key: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key}: line in {status}"));
    line.split_whitespace()
        .map(|id| id.parse().unwrap())
        .collect()
}

/// Everything under `dir`, `dir` included.
fn tree(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    if std::fs::symlink_metadata(dir).unwrap().is_dir() {
        for entry in std::fs::read_dir(dir).unwrap() {
            all.extend(tree(&entry.unwrap().path()));
        }
    }
    all
}

#[test]
fn root_becomes_nobody_after_binding_and_still_serves_reloads_and_saves() {
    if !require_root() {
        return;
    }
    let nobody = Account::lookup("nobody", "").unwrap();
    let sink = sink(Behaviour::Normal);
    let dir = temp_dir("privileges");
    // Something root left in an existing state_dir is given away too.
    let state = dir.join("state");
    std::fs::create_dir_all(state.join("spool")).unwrap();
    std::fs::write(state.join("spool").join("left-over"), b"").unwrap();
    let port = free_port();
    let path = dir.join("tarmac.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"mx.test\"\nworkers = 1\n\
             state_dir = \"state\"\nuser = \"nobody\"\n\n\
             [downstream]\nservers = [\"{}\"]\n\n[timeouts]\ndrain = \"5s\"\n\n[dns]\nrdns = false\n\n\
             [tarpit]\ngreet_pause = \"0s\"\n[greylist]\nenabled = false\n",
            sink.local_addr()
        ),
    )
    .unwrap();
    let child = Running::start(tarmac(), &path);
    let dropped = wait_for_log(&child.lines, "privileges dropped");
    assert!(
        dropped.contains(&format!("running as user nobody (uid {}", nobody.uid)),
        "{dropped}"
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until("tarmac to listen", || {
        std::net::TcpStream::connect(addr).is_ok()
    });

    // Real, effective, saved (and file-system) IDs: none is left as root.
    assert_eq!(status_ids(child.pid, "Uid"), [nobody.uid; 4]);
    assert_eq!(status_ids(child.pid, "Gid"), [nobody.gid; 4]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid)).unwrap();
    assert!(
        status.contains("\nCapEff:\t0000000000000000\n"),
        "no capability left: {status}"
    );

    let mut client = Client::connect(addr);
    client.start_message("a@example.org", &["b@example.net"]);
    client.send(b"Subject: privileges\r\n\r\nhello\r\n.\r\n");
    assert!(client.reply().starts_with("250 2.0.0 "));
    assert_eq!(client.command("QUIT"), "221 2.0.0 Bye\r\n");
    assert_eq!(sink.wait_for_messages(1, WAIT).len(), 1);

    // The reload reads the files as nobody.
    child.signal("HUP");
    let reloaded = wait_for_log(&child.lines, "reloaded ");
    assert!(reloaded.contains("tarmac.toml"), "{reloaded}");

    child.signal("TERM");
    let (code, stderr) = child.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("state: saved to"), "{stderr}");
    let files = tree(&state);
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "state")),
        "snapshots were written: {files:?}"
    );
    for file in files {
        let metadata = std::fs::symlink_metadata(&file).unwrap();
        assert_eq!(
            (metadata.uid(), metadata.gid()),
            (nobody.uid, nobody.gid),
            "{} belongs to nobody",
            file.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_user_stops_the_start_with_its_name() {
    let dir = temp_dir("privileges-unknown");
    let path = dir.join("tarmac.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"state\"\nuser = \"no-such-user-tarmac\"\n",
    )
    .unwrap();
    let (code, stderr) = Running::start(tarmac(), &path).wait_exit();
    assert_eq!(code, Some(1));
    assert!(
        stderr
            .contains("tarmac.toml:4: server.user: no user \"no-such-user-tarmac\" in /etc/passwd"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
