//! Transparent mode (DESIGN.md §9, issue 17) end to end, in network namespaces of the test's
//! own (`tarmac_testkit::netns`): a client network, a gateway where the real `tarmac` binary
//! runs with a transparent listener fed by an nft TPROXY rule, and a server network with private,
//! real Postfix instances on 198.51.100.25:25 and 198.51.100.26:25. The client connects to the
//! servers' addresses as if tarmac were not there; tarmac must answer, check, and relay to the
//! address the client dialled.
//!
//! The first tests check the harness itself, without tarmac: routing, the TPROXY hand-over to a
//! plain transparent listener, the fail-closed reset of port 25 when nothing takes it, and that a
//! dropped topology leaves nothing behind.
//!
//! Each test skips with a note where namespaces, nft or Postfix are unavailable, except under
//! `CI=true` (CI runs as root with nftables installed).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};

use socket2::{Domain, Socket, Type};
use tarmac_testkit::netns::{
    CLIENT, CLIENT_OTHER, CLIENT6, GATEWAY_CLIENT_SIDE, GATEWAY_SERVER_SIDE, Namespace, SERVER,
    SERVER_OTHER, SERVER6, Topology, at,
};
use tarmac_testkit::postfix::{DOMAIN, Postfix, PostfixOptions};
use tarmac_testkit::{Client, Running, WAIT, alive, temp_dir, wait_for_log, wait_until};

use crate::util::tarmac;

/// The gateway's transparent listener port (the namespace is the test's: any port is free).
const TPROXY_PORT: u16 = 10025;

/// A TCP connection from `source` to `dest`, made in the current thread's namespace; the
/// error is returned, not a panic, for the tests that expect a refusal.
fn connect_from(source: IpAddr, dest: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(dest), Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&dest.into(), WAIT)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(WAIT))?;
    stream.set_write_timeout(Some(WAIT))?;
    Ok(stream)
}

/// Whether `error` is how a TCP reset or refusal shows to a connecting client.
fn refused(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
    )
}

/// A listener on `addr` inside `ns`, non-blocking so the test can see that nothing came.
fn listener_in(ns: &Namespace, addr: SocketAddr) -> TcpListener {
    let listener = ns.enter(|| TcpListener::bind(addr)).unwrap();
    listener.set_nonblocking(true).unwrap();
    listener
}

/// The next connection on a non-blocking `listener`, waiting for it (bounded).
#[track_caller]
fn accept_within(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let mut accepted = None;
    wait_until("a connection on the listener", || {
        match listener.accept() {
            Ok(conn) => accepted = Some(conn),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        accepted.is_some()
    });
    let (stream, peer) = accepted.unwrap();
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    (stream, peer)
}

/// Fails if `listener` has a connection waiting.
#[track_caller]
fn nothing_accepted(listener: &TcpListener, what: &str) {
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("{what}: a connection from {peer} got through"),
        Err(e) => panic!("{what}: accept: {e}"),
    }
}

/// A transparent listener (IP_TRANSPARENT, what tarmac's `[transparent] listen` makes) on
/// `addr` inside `ns`, non-blocking.
fn transparent_listener_in(ns: &Namespace, addr: SocketAddr) -> TcpListener {
    let listener = ns.enter(|| {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        if addr.is_ipv4() {
            socket.set_ip_transparent_v4(true)?;
        } else {
            socket.set_ip_transparent_v6(true)?;
            // Beside the IPv4 listener on the same port.
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(16)?;
        std::io::Result::Ok(TcpListener::from(socket))
    });
    let listener = listener.unwrap();
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Connects `source` → `dest` from the client namespace, sends `ping`, and has `accepting`
/// (inside its own namespace) answer `pong`; returns the accepted socket's peer and local
/// addresses.
#[track_caller]
fn ping(
    topology: &Topology,
    source: IpAddr,
    dest: SocketAddr,
    accepting: &TcpListener,
) -> (SocketAddr, SocketAddr) {
    let mut stream = topology
        .client
        .enter(|| connect_from(source, dest))
        .unwrap_or_else(|e| panic!("{source} -> {dest}: {e}\n{}", topology.ruleset()));
    stream.write_all(b"ping").unwrap();
    let (mut accepted, peer) = accept_within(accepting);
    let mut buf = [0; 4];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    accepted.write_all(b"pong").unwrap();
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    (peer, accepted.local_addr().unwrap())
}

#[test]
fn harness_routes_other_ports_and_resets_port_25_that_nothing_takes() {
    let Some(topology) = Topology::dual_stack(TPROXY_PORT) else {
        return;
    };
    // Port 80 is routed like by any router, the client's own address intact.
    let web = listener_in(&topology.server, at(SERVER, 80));
    let (peer, local) = ping(&topology, CLIENT.into(), at(SERVER, 80), &web);
    assert_eq!(peer.ip(), IpAddr::from(CLIENT));
    assert_eq!(local, at(SERVER, 80));
    let web6 = listener_in(&topology.server, at(SERVER6, 80));
    let (peer, _) = ping(&topology, CLIENT6.into(), at(SERVER6, 80), &web6);
    assert_eq!(peer.ip(), IpAddr::from(CLIENT6));

    // Port 25 with nothing on the gateway's transparent port: reset by the gateway, never
    // forwarded to the server listening there.
    let smtp = listener_in(&topology.server, at(SERVER, 25));
    let smtp6 = listener_in(&topology.server, at(SERVER6, 25));
    for (source, dest) in [
        (IpAddr::from(CLIENT), at(SERVER, 25)),
        (IpAddr::from(CLIENT_OTHER), at(SERVER_OTHER, 25)),
        (IpAddr::from(CLIENT6), at(SERVER6, 25)),
    ] {
        let result = topology.client.enter(|| connect_from(source, dest));
        match result {
            Err(e) if refused(&e) => {}
            other => panic!(
                "{source} -> {dest}: {other:?}, expected a reset\n{}",
                topology.ruleset()
            ),
        }
    }
    nothing_accepted(&smtp, "port 25 around the proxy");
    nothing_accepted(&smtp6, "port 25 around the proxy (IPv6)");
}

#[test]
fn harness_hands_port_25_to_the_gateways_transparent_listener() {
    let Some(topology) = Topology::dual_stack(TPROXY_PORT) else {
        return;
    };
    let server = listener_in(&topology.server, at(SERVER, 25));
    let proxy = transparent_listener_in(&topology.gateway, at([0, 0, 0, 0], TPROXY_PORT));
    let proxy6 = transparent_listener_in(
        &topology.gateway,
        at(std::net::Ipv6Addr::UNSPECIFIED, TPROXY_PORT),
    );
    // The accepted socket's local address is the original destination: what tarmac relays to.
    for dest in [at(SERVER, 25), at(SERVER_OTHER, 25)] {
        let (peer, local) = ping(&topology, CLIENT.into(), dest, &proxy);
        assert_eq!(peer.ip(), IpAddr::from(CLIENT));
        assert_eq!(local, dest);
    }
    let (peer, local) = ping(&topology, CLIENT6.into(), at(SERVER6, 25), &proxy6);
    assert_eq!((peer.ip(), local), (IpAddr::from(CLIENT6), at(SERVER6, 25)));
    nothing_accepted(&server, "the server behind the proxy");

    // A transparent socket on the gateway connects from the client's address, and the server's
    // replies come back to it through the gateway (the spoof_source path).
    let spoofed = topology.gateway.enter(|| {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_ip_transparent_v4(true)?;
        socket.bind(&at(CLIENT, 0).into())?;
        socket.connect_timeout(&at(SERVER, 25).into(), WAIT)?;
        std::io::Result::Ok(TcpStream::from(socket))
    });
    let mut spoofed =
        spoofed.unwrap_or_else(|e| panic!("spoofed connect: {e}\n{}", topology.ruleset()));
    let (mut accepted, peer) = accept_within(&server);
    assert_eq!(
        peer.ip(),
        IpAddr::from(CLIENT),
        "the server sees the client"
    );
    accepted.write_all(b"220").unwrap();
    let mut buf = [0; 3];
    spoofed.set_read_timeout(Some(WAIT)).unwrap();
    spoofed.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"220");
}

/// Names of the links in the test's own namespace.
fn host_links() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let mut links: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned()))
        .collect();
    links.sort();
    links
}

#[test]
fn harness_leaves_nothing_behind() {
    if !Namespace::available() {
        return;
    }
    let before = host_links();
    let topology = Topology::dual_stack(TPROXY_PORT).unwrap();
    assert_eq!(
        host_links(),
        before,
        "nothing is made in the test's namespace"
    );
    let holders: Vec<u32> = [&topology.client, &topology.gateway, &topology.server]
        .iter()
        .map(|ns| ns.pid())
        .collect();
    // A socket made inside keeps its namespace when used from this thread.
    let listener = listener_in(&topology.server, at(SERVER, 80));
    assert_eq!(listener.local_addr().unwrap(), at(SERVER, 80));
    drop(listener);
    drop(topology);
    for pid in &holders {
        // Reaped, not a zombie: the process is gone from /proc.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "holder {pid} was killed and reaped"
        );
    }
    assert_eq!(host_links(), before);
}

#[test]
fn harness_postfix_servers_judge_their_peer_and_announced_client() {
    let Some(topology) = Topology::new(TPROXY_PORT) else {
        return;
    };
    let Some((first, second)) = servers(&topology) else {
        return;
    };
    // From the gateway's own address with XCLIENT, which the first server takes from it.
    let mut client = topology
        .gateway
        .enter(|| Client::connect_from(at(SERVER, 25), GATEWAY_SERVER_SIDE.into()));
    assert!(client.reply().starts_with("220 "));
    assert!(client.command("EHLO gw.test").contains("XCLIENT"));
    let reply = client.command(&format!("XCLIENT ADDR={CLIENT} NAME=[UNAVAILABLE]"));
    assert!(reply.starts_with("220 "), "{reply}");
    postfix_transaction(&mut client, "announced");
    the_message(&first, "announced");
    assert_eq!(
        seen_by(&first),
        (GATEWAY_SERVER_SIDE.to_string(), CLIENT.to_string())
    );

    // From the client's own address (a transparent socket on the gateway): no XCLIENT offered.
    let stream = topology.gateway.enter(|| {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_ip_transparent_v4(true)?;
        socket.bind(&at(CLIENT, 0).into())?;
        socket.connect_timeout(&at(SERVER_OTHER, 25).into(), WAIT)?;
        std::io::Result::Ok(TcpStream::from(socket))
    });
    let mut client = Client::over(stream.unwrap());
    assert!(client.reply().starts_with("220 "));
    assert!(!client.command("EHLO gw.test").contains("XCLIENT"));
    postfix_transaction(&mut client, "spoofed");
    the_message(&second, "spoofed");
    assert_eq!(seen_by(&second), (CLIENT.to_string(), CLIENT.to_string()));
    let disconnect = second.wait_for_log(&format!("disconnect from unknown[{CLIENT}]"));
    assert!(!disconnect.contains("xclient"), "{disconnect}");
    assert_eq!(outside_connects(&first).len(), 1);
}

/// EHLO (again, after XCLIENT), one message to alice, QUIT, straight to Postfix.
#[track_caller]
fn postfix_transaction(client: &mut Client, subject: &str) {
    for (command, expect) in [
        ("EHLO client.example", "250"),
        ("MAIL FROM:<sender@example.org>", "250 "),
        (&format!("RCPT TO:<alice@{DOMAIN}>"), "250 "),
        ("DATA", "354 "),
    ] {
        let reply = client.command(command);
        assert!(reply.starts_with(expect), "{command}: {reply}");
    }
    client.send(format!("Subject: {subject}\r\n\r\nhello\r\n.\r\n"));
    assert!(client.reply().starts_with("250 "));
    assert!(client.command("QUIT").starts_with("221 "));
}

// ---------------------------------------------------------------------------------------------
// tarmac on the gateway.

/// tarmac's hostname on the gateway: its banner, its 421 and its `Received:` line say it.
const HOSTNAME: &str = "gw.test";
/// tarmac's plain listener on the gateway, reachable only from inside the gateway.
const PLAIN: &str = "127.0.0.1:2525";

/// How a test runs tarmac on the gateway.
#[derive(Default)]
struct GatewayOptions {
    spoof_source: bool,
    /// `[server] user`.
    user: Option<&'static str>,
    /// Also the IPv6 transparent listener `[::]:PORT`.
    ipv6: bool,
    /// `[downstream] mode = "multiplexing"` with a pool of one (which transparent sessions
    /// must not use).
    multiplexing: bool,
}

/// The `tarmac run` child in the gateway namespace, and its files.
struct Gateway {
    child: Running,
    _dir: Removed,
}

/// A directory removed when dropped.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The config of the gateway's tarmac: a plain listener on [`PLAIN`], transparent listeners on
/// [`TPROXY_PORT`], `[downstream] servers` pointing at nothing (a transparent session that
/// used them would fail), 192.0.2.66 deny-listed, no DNS, no pause, no greylisting.
fn write_config(dir: &Path, options: &GatewayOptions) -> PathBuf {
    std::fs::write(dir.join("deny.txt"), format!("{CLIENT_OTHER}\n")).unwrap();
    let user = options
        .user
        .map(|user| format!("user = \"{user}\"\n"))
        .unwrap_or_default();
    let listen = if options.ipv6 {
        format!("\"0.0.0.0:{TPROXY_PORT}\", \"[::]:{TPROXY_PORT}\"")
    } else {
        format!("\"0.0.0.0:{TPROXY_PORT}\"")
    };
    let mode = if options.multiplexing {
        "mode = \"multiplexing\"\npool_size = 1\n"
    } else {
        ""
    };
    let path = dir.join("tarmac.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"{PLAIN}\"]\nhostname = \"{HOSTNAME}\"\nworkers = 1\n\
             state_dir = \"state\"\n{user}\n\
             [transparent]\nlisten = [{listen}]\nspoof_source = {spoof}\n\n\
             [downstream]\nservers = [\"127.0.0.1:1\"]\nannounce_client = \"xclient\"\ntls = \"none\"\n{mode}\n\
             [timeouts]\nconnect = \"5s\"\ndrain = \"2s\"\n\n\
             [dns]\nrdns = false\n\n[tarpit]\ngreet_pause = \"0s\"\n\n\
             [greylist]\nenabled = false\n\n[reputation]\nenabled = false\n\n\
             [lists]\nallow = []\ndeny = [\"deny.txt\"]\n\n[rules]\nfiles = []\n",
            spoof = options.spoof_source,
        ),
    )
    .unwrap();
    path
}

/// Starts the real binary inside the gateway namespace and waits until its transparent
/// listener accepts.
#[track_caller]
fn start_tarmac(topology: &Topology, name: &str, options: GatewayOptions) -> Gateway {
    let dir = temp_dir(&format!("transparent-{name}"));
    let path = write_config(&dir, &options);
    // nsenter execs tarmac in its own process: the PID is tarmac's.
    let child = Running::start(topology.gateway.wrap(&tarmac()), &path);
    let gateway = Gateway {
        child,
        _dir: Removed(dir),
    };
    let transparent = at([127, 0, 0, 1], TPROXY_PORT);
    let plain: SocketAddr = PLAIN.parse().unwrap();
    let pid = gateway.child.pid;
    let ready = topology.gateway.enter(|| {
        let mut ready = false;
        wait_until("tarmac's listeners in the gateway", || {
            ready = TcpStream::connect(plain).is_ok() && TcpStream::connect(transparent).is_ok();
            ready || !alive(pid)
        });
        ready
    });
    if !ready {
        let log: Vec<String> = gateway.child.lines.try_iter().collect();
        panic!("tarmac exited at start:\n{}", log.join("\n"));
    }
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", gateway.child.pid)).unwrap();
    assert_eq!(comm.trim(), "tarmac", "the child is tarmac itself");
    gateway
}

impl Gateway {
    /// The next close line (`tarmac::conn`) containing `needle`.
    #[track_caller]
    fn close_line(&self, needle: &str) -> String {
        loop {
            let line = wait_for_log(&self.child.lines, needle);
            if line.contains("tarmac::conn") {
                return line;
            }
        }
    }
}

/// The text of a close line from its `conn=` on.
fn close_fields(line: &str) -> &str {
    &line[line.find("conn=").unwrap_or(0)..]
}

/// A private Postfix listening on `addr:25` in the server namespace, which lets the gateway
/// (and only it) announce clients with XCLIENT.
#[track_caller]
fn postfix_at(topology: &Topology, addr: IpAddr) -> Option<Postfix> {
    let gateway = match addr {
        IpAddr::V4(_) => GATEWAY_SERVER_SIDE.to_string(),
        IpAddr::V6(_) => format!("[{}]", tarmac_testkit::netns::GATEWAY6_SERVER_SIDE),
    };
    Postfix::start(PostfixOptions {
        listen: Some(SocketAddr::new(addr, 25)),
        netns: Some(topology.server.clone()),
        main_cf: vec![("smtpd_authorized_xclient_hosts".into(), gateway)],
        ..PostfixOptions::default()
    })
}

/// The two servers of the server network, .25 and .26, started side by side (`postfix check`
/// alone takes over a second).
fn servers(topology: &Topology) -> Option<(Postfix, Postfix)> {
    let (first, second) = std::thread::scope(|scope| {
        let first = scope.spawn(|| postfix_at(topology, SERVER.into()));
        let second = postfix_at(topology, SERVER_OTHER.into());
        (first.join().unwrap(), second)
    });
    Some((first?, second?))
}

/// Postfix's `connect from` lines for connections from outside the server namespace (its own
/// readiness checks come from its own addresses).
fn outside_connects(postfix: &Postfix) -> Vec<String> {
    postfix
        .log()
        .lines()
        .filter(|l| l.contains(" connect from "))
        .filter(|l| {
            ![
                SERVER.to_string(),
                SERVER_OTHER.to_string(),
                SERVER6.to_string(),
            ]
            .iter()
            .any(|own| l.contains(&format!("[{own}]")))
        })
        .map(str::to_owned)
        .collect()
}

/// A client of `dest` from `source` in the client namespace; asserts tarmac's banner.
#[track_caller]
fn client_of(topology: &Topology, source: IpAddr, dest: SocketAddr) -> Client {
    let mut client = topology.client.enter(|| Client::connect_from(dest, source));
    let banner = client.reply();
    assert!(
        banner.starts_with(&format!("220 {HOSTNAME} ")),
        "tarmac's banner, not the server's: {banner}"
    );
    client
}

/// EHLO, one message to alice with `subject`, QUIT; every reply must succeed.
#[track_caller]
fn deliver(client: &mut Client, subject: &str) {
    let reply = client.command("EHLO client.example");
    assert!(reply.starts_with("250-"), "EHLO: {reply}");
    let reply = client.command("MAIL FROM:<sender@example.org>");
    assert!(reply.starts_with("250 "), "MAIL: {reply}");
    let reply = client.command(&format!("RCPT TO:<alice@{DOMAIN}>"));
    assert!(reply.starts_with("250 "), "RCPT: {reply}");
    let reply = client.command("DATA");
    assert!(reply.starts_with("354 "), "DATA: {reply}");
    client.send(format!(
        "Subject: {subject}\r\n\r\nthrough the gateway\r\n.\r\n"
    ));
    let reply = client.reply();
    assert!(reply.starts_with("250 "), "end of data: {reply}");
    assert!(client.command("QUIT").starts_with("221 "));
}

/// The one message `postfix` delivered to alice, which must have `subject`.
#[track_caller]
fn the_message(postfix: &Postfix, subject: &str) -> String {
    let messages = postfix.wait_for_messages("alice", 1);
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert!(
        messages[0].contains(&format!("\nSubject: {subject}\n")),
        "{}",
        messages[0]
    );
    messages[0].clone()
}

/// What Postfix saw: the TCP peer of its one outside connection, and the client it recorded for
/// the message (the queue-id line's `client=`, after any XCLIENT).
#[track_caller]
fn seen_by(postfix: &Postfix) -> (String, String) {
    let connects = outside_connects(postfix);
    assert_eq!(connects.len(), 1, "one connection: {connects:#?}");
    let peer = between(&connects[0], "connect from unknown[", "]");
    let client = postfix.wait_for_log(": client=");
    (peer, between(&client, "client=unknown[", "]"))
}

/// The text of `line` between `start` and the next `end`.
#[track_caller]
fn between(line: &str, start: &str, end: &str) -> String {
    let from = line
        .find(start)
        .unwrap_or_else(|| panic!("no {start:?} in {line}"))
        + start.len();
    let len = line[from..]
        .find(end)
        .unwrap_or_else(|| panic!("no {end:?} after {start:?} in {line}"));
    line[from..from + len].to_owned()
}

/// Nothing reached `postfix` from outside its namespace and nothing is delivered or queued.
#[track_caller]
fn untouched(postfix: &Postfix, what: &str) {
    assert_eq!(outside_connects(postfix), Vec::<String>::new(), "{what}");
    assert!(postfix.maildir_messages("alice").is_empty(), "{what}");
    assert!(postfix.queued().is_empty(), "{what}");
}

#[test]
fn a_client_dialling_a_server_gets_tarmac_which_relays_to_that_server_announcing_the_client() {
    let Some(topology) = Topology::new(TPROXY_PORT) else {
        return;
    };
    let Some((first, second)) = servers(&topology) else {
        return;
    };
    let gateway = start_tarmac(&topology, "relay", GatewayOptions::default());

    let mut client = client_of(&topology, CLIENT.into(), at(SERVER, 25));
    deliver(&mut client, "to the first");
    let message = the_message(&first, "to the first");
    // Relayed by tarmac: its Received: line comes first, then Postfix's.
    assert!(
        message.contains(&format!("by {HOSTNAME}")),
        "tarmac's Received: line in\n{message}"
    );
    // Announced by XCLIENT from the gateway's own address (spoof_source = false).
    assert_eq!(
        seen_by(&first),
        (GATEWAY_SERVER_SIDE.to_string(), CLIENT.to_string()),
        "Postfix's TCP peer is the gateway, its client the real one:\n{}",
        first.log()
    );
    let line = gateway.close_line(&format!("client={CLIENT}:"));
    let fields = close_fields(&line);
    let client_field = fields.split(' ').nth(1).unwrap();
    assert!(
        fields.starts_with(&format!(
            "{} {client_field} dst={SERVER}:25 ",
            fields.split(' ').next().unwrap()
        )),
        "dst= right after client=: {line}"
    );
    assert!(line.contains(" result=delivered "), "{line}");
    untouched(&second, "the first server's message went to the second");

    // The other address is the other server: its original destination, not the first one's.
    let mut client = client_of(&topology, CLIENT.into(), at(SERVER_OTHER, 25));
    deliver(&mut client, "to the second");
    the_message(&second, "to the second");
    assert_eq!(
        seen_by(&second),
        (GATEWAY_SERVER_SIDE.to_string(), CLIENT.to_string())
    );
    let line = gateway.close_line(&format!("dst={SERVER_OTHER}:25 "));
    assert!(line.contains(&format!(" client={CLIENT}:")), "{line}");
    assert_eq!(
        first.maildir_messages("alice").len(),
        1,
        "nothing more for the first"
    );
    assert_eq!(outside_connects(&first).len(), 1);
}

#[test]
fn a_deny_listed_source_is_refused_by_tarmac_and_nothing_reaches_the_server() {
    let Some(topology) = Topology::new(TPROXY_PORT) else {
        return;
    };
    let Some(server) = postfix_at(&topology, SERVER.into()) else {
        return;
    };
    let gateway = start_tarmac(&topology, "deny", GatewayOptions::default());

    let mut denied = topology
        .client
        .enter(|| Client::connect_from(at(SERVER, 25), CLIENT_OTHER.into()));
    let banner = denied.reply();
    assert!(banner.starts_with("554 5.7.1 "), "deny list: {banner}");
    let reply = denied.command("MAIL FROM:<sender@example.org>");
    assert!(!reply.starts_with("250"), "nothing after a 554: {reply}");
    assert!(denied.command("QUIT").starts_with("221 "));
    let line = gateway.close_line(&format!("client={CLIENT_OTHER}:"));
    assert!(line.contains(&format!(" dst={SERVER}:25 ")), "{line}");
    assert!(line.contains(" msgs=0 "), "{line}");

    // An allowed client afterwards: its connection is the only one Postfix ever saw, so the
    // refused one never reached it (the log is written in order).
    let mut allowed = client_of(&topology, CLIENT.into(), at(SERVER, 25));
    deliver(&mut allowed, "allowed");
    the_message(&server, "allowed");
    assert_eq!(
        seen_by(&server),
        (GATEWAY_SERVER_SIDE.to_string(), CLIENT.to_string())
    );
    assert!(
        !server.log().contains(&CLIENT_OTHER.to_string()),
        "{}",
        server.log()
    );
}

#[test]
fn spoof_source_connects_from_the_clients_own_address_without_xclient() {
    let Some(topology) = Topology::new(TPROXY_PORT) else {
        return;
    };
    let Some(server) = postfix_at(&topology, SERVER.into()) else {
        return;
    };
    let gateway = start_tarmac(
        &topology,
        "spoof",
        GatewayOptions {
            spoof_source: true,
            ..GatewayOptions::default()
        },
    );
    let mut client = client_of(&topology, CLIENT.into(), at(SERVER, 25));
    deliver(&mut client, "spoofed");
    the_message(&server, "spoofed");
    // Postfix authorises XCLIENT from 198.51.100.1 only: from the client's address an XCLIENT
    // would be refused and counted on the disconnect line.
    assert_eq!(
        seen_by(&server),
        (CLIENT.to_string(), CLIENT.to_string()),
        "{}",
        server.log()
    );
    let disconnect = server.wait_for_log(&format!("disconnect from unknown[{CLIENT}]"));
    assert!(!disconnect.contains("xclient"), "no XCLIENT: {disconnect}");
    let line = gateway.close_line(&format!("client={CLIENT}:"));
    assert!(line.contains(&format!(" dst={SERVER}:25 ")), "{line}");
}

/// The `key:` line of `/proc/PID/status`.
fn status_line(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key}: line in {status}"))
        .trim()
        .to_owned()
}

/// CAP_NET_ADMIN (capability 12) as `/proc/PID/status` shows a capability set.
const CAP_NET_ADMIN_ONLY: &str = "0000000000001000";

#[test]
fn spoof_source_as_nobody_keeps_cap_net_admin_only_and_still_relays_as_the_client() {
    if !tarmac::privileges::running_as_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the privilege-drop tests need root, and CI runs as root"
        );
        eprintln!("note: not root; skipping the privilege-drop test");
        return;
    }
    let Some(topology) = Topology::new(TPROXY_PORT) else {
        return;
    };
    let Some(server) = postfix_at(&topology, SERVER.into()) else {
        return;
    };
    let nobody = tarmac::privileges::Account::lookup("nobody", "").unwrap();
    let gateway = start_tarmac(
        &topology,
        "spoof-nobody",
        GatewayOptions {
            spoof_source: true,
            user: Some("nobody"),
            ..GatewayOptions::default()
        },
    );
    wait_for_log(&gateway.child.lines, "privileges dropped");
    let pid = gateway.child.pid;
    let uid = nobody.uid.to_string();
    assert_eq!(
        status_line(pid, "Uid")
            .split_whitespace()
            .collect::<Vec<_>>(),
        [uid.as_str(); 4]
    );
    assert_eq!(status_line(pid, "CapEff"), CAP_NET_ADMIN_ONLY);
    assert_eq!(status_line(pid, "CapPrm"), CAP_NET_ADMIN_ONLY);

    let mut client = client_of(&topology, CLIENT.into(), at(SERVER, 25));
    deliver(&mut client, "as nobody");
    the_message(&server, "as nobody");
    assert_eq!(
        seen_by(&server),
        (CLIENT.to_string(), CLIENT.to_string()),
        "{}",
        server.log()
    );
    // Still only that one, after serving.
    assert_eq!(status_line(pid, "CapEff"), CAP_NET_ADMIN_ONLY);
}

#[test]
fn port_25_fails_closed_when_tarmac_is_not_running() {
    let Some(topology) = Topology::new(TPROXY_PORT) else {
        return;
    };
    let Some(server) = postfix_at(&topology, SERVER.into()) else {
        return;
    };
    let try_connect = || {
        topology
            .client
            .enter(|| connect_from(CLIENT.into(), at(SERVER, 25)))
    };
    // Never started: the connection is reset by the gateway, not routed to the server.
    match try_connect() {
        Err(e) if refused(&e) => {}
        other => panic!("before tarmac: {other:?}, expected a reset"),
    }

    // Serving, then killed by its PID: the same.
    let gateway = start_tarmac(&topology, "down", GatewayOptions::default());
    let mut client = client_of(&topology, CLIENT.into(), at(SERVER, 25));
    deliver(&mut client, "while up");
    the_message(&server, "while up");
    gateway.child.signal("KILL");
    let (code, _) = gateway.child.wait_exit();
    assert_eq!(code, None, "killed by a signal");
    match try_connect() {
        Err(e) if refused(&e) => {}
        other => panic!("after tarmac: {other:?}, expected a reset"),
    }
    assert_eq!(
        outside_connects(&server).len(),
        1,
        "only the message sent while tarmac ran reached the server:\n{}",
        server.log()
    );
}

/// The client dials `dest`, an address of the gateway itself: tarmac answers `421 4.3.5` and
/// closes, refusing at accept, before any session (no close line), as the caps and rates do.
#[track_caller]
fn refused_as_this_host(topology: &Topology, gateway: &Gateway, dest: SocketAddr) {
    let mut client = topology
        .client
        .enter(|| Client::connect_from(dest, CLIENT.into()));
    let reply = client.reply();
    assert!(
        reply.starts_with(&format!("421 4.3.5 {HOSTNAME} ")),
        "{dest}: {reply}"
    );
    client.drain_to_close();
    let line = wait_for_log(
        &gateway.child.lines,
        &format!("refused transparent connection from {CLIENT}"),
    );
    assert!(
        line.contains(&format!(" to {dest}: an address of this host (loop)")),
        "{line}"
    );
}

#[test]
fn a_connection_to_tarmacs_own_transparent_port_gets_421_not_a_loop() {
    let Some(topology) = Topology::new(TPROXY_PORT) else {
        return;
    };
    let gateway = start_tarmac(&topology, "loop", GatewayOptions::default());
    refused_as_this_host(&topology, &gateway, at(GATEWAY_CLIENT_SIDE, TPROXY_PORT));
    // From inside the gateway, to the listener's loopback address: the same.
    let mut local = topology
        .gateway
        .enter(|| Client::connect(at([127, 0, 0, 1], TPROXY_PORT)));
    let reply = local.reply();
    assert!(reply.starts_with("421 4.3.5 "), "{reply}");
    local.drain_to_close();
}

#[test]
fn a_diverted_connection_for_the_gateways_own_mta_never_reaches_it_from_the_gateway() {
    let Some(topology) = Topology::new(TPROXY_PORT) else {
        return;
    };
    // The gateway's own MTA on port 25, which (as Postfix's mynetworks does) would trust a
    // connection from the gateway's own address. The harness diverts port 25 whatever the
    // destination (no `fib daddr type local accept`), as a careless rule set would.
    let local_mta = topology
        .gateway
        .enter(|| {
            tarmac_testkit::sink::Sink::start(tarmac_testkit::sink::SinkConfig {
                listen: at([0, 0, 0, 0], 25),
                ..Default::default()
            })
        })
        .unwrap();
    let gateway = start_tarmac(&topology, "local-mta", GatewayOptions::default());
    refused_as_this_host(&topology, &gateway, at(GATEWAY_CLIENT_SIDE, 25));
    assert_eq!(
        local_mta.connections(),
        0,
        "relayed to the gateway's own MTA"
    );
}

#[test]
fn a_transparent_listener_without_cap_net_admin_is_a_start_up_error_naming_it() {
    if !Namespace::available() {
        return;
    }
    let ns = Namespace::new("no-caps");
    let dir = temp_dir("transparent-no-caps");
    let _removed = Removed(dir.clone());
    let path = write_config(&dir, &GatewayOptions::default());
    // The state directory is nobody's, so that only the capability can stop the start.
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let mut command = ns.command("setpriv");
    command
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(tarmac().get_program());
    let (code, stderr) = Running::start(command, &path).wait_exit();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("CAP_NET_ADMIN"), "{stderr}");
}

#[test]
fn an_ipv6_client_is_relayed_to_the_address_it_dialled() {
    ipv6_relay(false);
}

#[test]
fn an_ipv6_client_with_spoof_source_reaches_the_server_from_its_own_address() {
    ipv6_relay(true);
}

/// An IPv6 client through the dual-stack gateway; Postfix's TCP peer is the gateway (XCLIENT
/// naming the client) or, with `spoof_source`, the client itself.
#[track_caller]
fn ipv6_relay(spoof_source: bool) {
    let Some(topology) = Topology::dual_stack(TPROXY_PORT) else {
        return;
    };
    let Some(server) = postfix_at(&topology, SERVER6.into()) else {
        return;
    };
    let gateway = start_tarmac(
        &topology,
        if spoof_source { "ipv6-spoof" } else { "ipv6" },
        GatewayOptions {
            ipv6: true,
            spoof_source,
            ..GatewayOptions::default()
        },
    );
    let mut client = client_of(&topology, CLIENT6.into(), at(SERVER6, 25));
    deliver(&mut client, "over IPv6");
    the_message(&server, "over IPv6");
    let peer = if spoof_source {
        CLIENT6
    } else {
        tarmac_testkit::netns::GATEWAY6_SERVER_SIDE
    };
    assert_eq!(
        seen_by(&server),
        (peer.to_string(), CLIENT6.to_string()),
        "{}",
        server.log()
    );
    let line = gateway.close_line(&format!("client=[{CLIENT6}]:"));
    assert!(line.contains(&format!(" dst=[{SERVER6}]:25 ")), "{line}");
}

#[test]
fn transparent_sessions_relay_synchronously_even_in_multiplexing_mode() {
    let Some(topology) = Topology::new(TPROXY_PORT) else {
        return;
    };
    let Some((first, second)) = servers(&topology) else {
        return;
    };
    let gateway = start_tarmac(
        &topology,
        "multiplexing",
        GatewayOptions {
            multiplexing: true,
            ..GatewayOptions::default()
        },
    );
    // Two clients at once, one to each server: a shared pool of one would hold the first
    // server's connection (or wait for it) and never reach the second.
    let mut to_first = client_of(&topology, CLIENT.into(), at(SERVER, 25));
    let mut to_second = client_of(&topology, CLIENT.into(), at(SERVER_OTHER, 25));
    for client in [&mut to_first, &mut to_second] {
        assert!(client.command("EHLO client.example").starts_with("250-"));
        let reply = client.command("MAIL FROM:<sender@example.org>");
        assert!(reply.starts_with("250 "), "MAIL: {reply}");
    }
    for (client, subject) in [(&mut to_second, "second"), (&mut to_first, "first")] {
        let reply = client.command(&format!("RCPT TO:<alice@{DOMAIN}>"));
        assert!(reply.starts_with("250 "), "RCPT: {reply}");
        assert!(client.command("DATA").starts_with("354 "));
        client.send(format!("Subject: {subject}\r\n\r\nhello\r\n.\r\n"));
        let reply = client.reply();
        assert!(reply.starts_with("250 "), "end of data: {reply}");
        assert!(client.command("QUIT").starts_with("221 "));
    }
    the_message(&first, "first");
    the_message(&second, "second");
    for server in [&first, &second] {
        assert_eq!(
            seen_by(server),
            (GATEWAY_SERVER_SIDE.to_string(), CLIENT.to_string())
        );
    }
    gateway.close_line(&format!("dst={SERVER}:25 "));
}

#[test]
fn an_unreachable_original_destination_is_a_temporary_failure_never_the_configured_servers() {
    let Some(topology) = Topology::new(TPROXY_PORT) else {
        return;
    };
    // `[downstream] servers` (127.0.0.1:1 in the gateway) answers here, and counts: a
    // transparent session must not fall back to it when its own destination fails.
    let configured = topology
        .gateway
        .enter(|| {
            tarmac_testkit::sink::Sink::start(tarmac_testkit::sink::SinkConfig {
                listen: at([127, 0, 0, 1], 1),
                offer_xclient: true,
                ..Default::default()
            })
        })
        .unwrap();
    let gateway = start_tarmac(&topology, "unreachable", GatewayOptions::default());
    // Nothing listens on 198.51.100.25:25: the server namespace resets the connection.
    let mut client = client_of(&topology, CLIENT.into(), at(SERVER, 25));
    assert!(client.command("EHLO client.example").starts_with("250-"));
    let reply = client.command("MAIL FROM:<sender@example.org>");
    assert!(reply.starts_with("451 4.4."), "MAIL: {reply}");
    assert!(client.command("QUIT").starts_with("221 "));
    let line = gateway.close_line(&format!("client={CLIENT}:"));
    assert!(line.contains(&format!(" dst={SERVER}:25 ")), "{line}");
    assert_eq!(
        configured.connections(),
        0,
        "fell back to [downstream] servers"
    );
    assert!(configured.messages().is_empty());

    // The control: the plain listener's sessions do go to `[downstream] servers`, so the sink
    // would have seen a fallback.
    let plain: SocketAddr = PLAIN.parse().unwrap();
    let mut local = topology.gateway.enter(|| Client::connect(plain));
    assert!(local.send_message().starts_with("250 "));
    assert_eq!(configured.wait_for_messages(1, WAIT).len(), 1);
}
