//! systemd readiness (DESIGN.md §8): the real binary with `NOTIFY_SOCKET` pointing at a unix
//! datagram socket the test owns, as systemd would pass it to a `Type=notify` unit.

use std::os::unix::net::UnixDatagram;

use tarmac_testkit::{Running, WAIT, free_port, temp_dir};

use crate::util::tarmac;

/// The next datagram on `socket`, as text (within [`WAIT`]).
fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0; 1024];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification within {WAIT:?}: {e}"));
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// A config for a tarmac child listening on `port` with its files in `dir`.
fn config(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("tarmac.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nworkers = 1\nstate_dir = \"state\"\n\n\
             [downstream]\nservers = [\"127.0.0.1:9\"]\n\n[dns]\nrdns = false\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn ready_after_binding_reloading_around_sighup_stopping_at_sigterm() {
    let dir = temp_dir("notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let port = free_port();
    let path = config(&dir, port);
    let mut command = tarmac();
    command.env("NOTIFY_SOCKET", &socket_path);
    let child = Running::start(command, &path);

    let ready = next(&socket);
    assert_eq!(
        ready,
        format!("READY=1\nSTATUS=listening on 127.0.0.1:{port}\n")
    );
    // Ready means the port accepts now, without waiting for anything.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("the port accepts once READY=1");

    child.signal("HUP");
    let reloading = next(&socket);
    let usec = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("{reloading:?}"));
    assert!(usec.parse::<u64>().unwrap() > 0);
    assert!(next(&socket).starts_with("READY=1\n"));

    child.signal("TERM");
    assert_eq!(next(&socket), "STOPPING=1\nSTATUS=draining\n");
    let (code, stderr) = child.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    if tarmac::privileges::running_as_root() {
        // Root without [server] user: said once at start (DESIGN.md §8).
        assert_eq!(
            stderr
                .matches("running as root without [server] user")
                .count(),
            1,
            "{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_abstract_notify_socket_is_reached_too() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("tarmac-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let dir = temp_dir("notify-abstract");
    let path = config(&dir, free_port());
    let mut command = tarmac();
    command.env("NOTIFY_SOCKET", format!("@{name}"));
    let child = Running::start(command, &path);
    assert!(next(&socket).starts_with("READY=1\n"));
    child.signal("INT");
    assert!(next(&socket).starts_with("STOPPING=1\n"));
    let (code, stderr) = child.wait_exit();
    assert_eq!(code, Some(0), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
