//! Network namespaces made by a test, and the three-namespace [`Topology`] the transparent-mode
//! tests route through (`/work/shared/PEERS.md`, "Network namespaces and TPROXY").
//!
//! A [`Namespace`] is held by a child process (`unshare --net sh -c 'read x'`) whose stdin is a
//! pipe from the test: dropping the namespace kills and reaps that holder by its PID, and if the
//! test process dies the pipe's EOF ends it. Either way the namespace goes, with every veth pair,
//! address, route and nft rule made in it (once the processes started inside it are gone).
//! Nothing is ever named in `/run/netns` (no `ip netns add`), and nothing is configured in the
//! machine's own namespace: links are made from inside the namespaces, the far end of a veth
//! pair created directly in its peer namespace.
//!
//! Commands run inside with `nsenter --net=/proc/PID/ns/net` ([`Namespace::command`],
//! [`Namespace::run`]); the test's own sockets are made inside by a thread that has joined the
//! namespace ([`Namespace::enter`]). A socket belongs to the namespace it was created in, so it
//! can be used from any thread afterwards.

use std::fmt;
use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::WAIT;

/// A network namespace of the test's own, alive while any clone of it is (and while processes
/// started inside it live).
#[derive(Clone)]
pub struct Namespace(Arc<Holder>);

/// The child process whose network namespace this is.
struct Holder {
    name: String,
    pid: u32,
    child: Mutex<Option<Child>>,
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Namespace({} held by pid {})", self.0.name, self.0.pid)
    }
}

impl Namespace {
    /// Whether this machine lets the test make network namespaces and configure them (`unshare`,
    /// `nsenter`, `ip` and `nft` installed, `unshare --net true` allowed). Where it does not,
    /// prints why and the test should return (a skip); under `CI=true` that is a failure.
    #[track_caller]
    pub fn available() -> bool {
        let ci = std::env::var("CI").as_deref() == Ok("true");
        for program in ["unshare", "nsenter", "ip", "sysctl"] {
            if crate::find_program(program).is_none() {
                assert!(
                    !ci,
                    "{program} is not installed, but CI must run the network-namespace tests"
                );
                eprintln!("skipping: network namespaces unavailable ({program} is not installed)");
                return false;
            }
        }
        if crate::require_program("nft").is_none() {
            return false;
        }
        let mut probe = Command::new("unshare");
        probe.args(["--net", "true"]);
        let (ok, output) = crate::run_bounded(probe);
        if !ok {
            assert!(
                !ci,
                "network namespaces unavailable (unshare --net true: {}), but CI must run the \
                 network-namespace tests (as root)",
                output.trim()
            );
            eprintln!(
                "skipping: network namespaces unavailable (unshare --net true: {})",
                output.trim()
            );
        }
        ok
    }

    /// A fresh, empty network namespace (`name` only tells namespaces apart in messages) with
    /// `lo` up. Returns once the holder is inside it.
    #[track_caller]
    pub fn new(name: &str) -> Namespace {
        let mut child = Command::new("unshare")
            .args(["--net", "sh", "-c", "read x"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn unshare --net");
        let pid = child.id();
        let namespace = Namespace(Arc::new(Holder {
            name: name.to_owned(),
            pid,
            child: Mutex::new(None),
        }));
        // `unshare` execs `sh` in the same process once it has made the namespace: until then
        // /proc/PID/ns/net is the test's own, which must never be configured.
        let own = std::fs::read_link("/proc/self/ns/net").expect("/proc/self/ns/net");
        let give_up = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for unshare") {
                panic!("unshare --net for namespace {name} exited: {status}");
            }
            match std::fs::read_link(namespace.path()) {
                Ok(link) if link != own => break,
                _ => {}
            }
            assert!(
                Instant::now() < give_up,
                "unshare --net did not make namespace {name} within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        *namespace.0.child.lock().unwrap() = Some(child);
        namespace.run(&["ip", "link", "set", "lo", "up"]);
        namespace
    }

    /// The holder's PID: `ip link ... netns PID` moves a link into this namespace.
    pub fn pid(&self) -> u32 {
        self.0.pid
    }

    /// `/proc/PID/ns/net` of the holder.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.0.pid))
    }

    /// A command that runs `program` inside the namespace (`nsenter --net=... -- program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        command
    }

    /// Wraps `inner` (a program with its arguments and environment) so it runs inside the
    /// namespace; its current directory is kept.
    pub fn wrap(&self, inner: &Command) -> Command {
        let mut command = self.command(inner.get_program());
        command.args(inner.get_args());
        for (key, value) in inner.get_envs() {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        if let Some(dir) = inner.get_current_dir() {
            command.current_dir(dir);
        }
        command
    }

    /// Runs `args` inside the namespace to completion (bounded by [`WAIT`]): (success, stdout
    /// and stderr).
    #[track_caller]
    pub fn try_run(&self, args: &[&str]) -> (bool, String) {
        let mut command = self.command(args[0]);
        command.args(&args[1..]);
        crate::run_bounded(command)
    }

    /// Runs `args` inside the namespace and fails the test, with the command's output, unless it
    /// succeeds; returns its output.
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> String {
        let (ok, output) = self.try_run(args);
        assert!(
            ok,
            "in namespace {}: {} failed:\n{output}",
            self.0.name,
            args.join(" ")
        );
        output
    }

    /// Loads an nft ruleset (`nft -f`) inside the namespace, failing the test with nft's message.
    #[track_caller]
    pub fn nft(&self, ruleset: &str) {
        let dir = crate::process::instance_dir("nft");
        let file = dir.join("ruleset.nft");
        File::create(&file)
            .and_then(|mut f| f.write_all(ruleset.as_bytes()))
            .unwrap();
        let (ok, output) = self.try_run(&["nft", "-f", &file.display().to_string()]);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            ok,
            "in namespace {}: nft -f failed:\n{output}\nruleset:\n{ruleset}",
            self.0.name
        );
    }

    /// Runs `f` on a fresh thread that has joined the namespace, and returns what it returns:
    /// sockets made there (listeners, clients, the testkit's sink) belong to the namespace for
    /// good, whichever thread uses them later. A panic in `f` is the test's.
    #[track_caller]
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        let name = &self.0.name;
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                let fd = File::open(&path)
                    .unwrap_or_else(|e| panic!("{}: {e} (namespace {name})", path.display()));
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&fd),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap_or_else(|e| panic!("setns into namespace {name}: {e}"));
                // This thread, not the process: the thread is the one that moved.
                assert_eq!(
                    std::fs::read_link("/proc/thread-self/ns/net").ok(),
                    std::fs::read_link(&path).ok(),
                    "the thread is in namespace {name}"
                );
                f()
            });
            match thread.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Never panic in drop: a failing test may be unwinding. Killed by its PID (the Child),
        // and reaped, so no zombie holds the namespace.
        if let Some(mut child) = self.child.lock().ok().and_then(|mut c| c.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The client network's address of the gateway, the client's default route.
pub const GATEWAY_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The server network's address of the gateway, the servers' default route.
pub const GATEWAY_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The client's first address (its interface's primary one).
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The client's second address, for a source the test treats differently (a deny list).
pub const CLIENT_OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
/// The server namespace's first address.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 25);
/// The server namespace's second address.
pub const SERVER_OTHER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 26);

/// IPv6 counterparts ([`Topology::dual_stack`]): the client network 2001:db8:c::/64.
pub const GATEWAY6_CLIENT_SIDE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);
/// The server network 2001:db8:5::/64's gateway address.
pub const GATEWAY6_SERVER_SIDE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 1);
/// The client's IPv6 address.
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0x10);
/// The server namespace's IPv6 address.
pub const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x25);

/// Three namespaces joined by two veth pairs, as a transparent gateway sits between an MTA and
/// the servers it sends to:
///
/// ```text
/// client  c0 ──── g0  gateway  g1 ──── s0  server
/// 192.0.2.10/24   192.0.2.1/24  198.51.100.1/24   198.51.100.25/24
/// 192.0.2.66/24                                   198.51.100.26/24
/// default via .1   forwarding, rp_filter 0,        default via 198.51.100.1
///                  fwmark 1 -> table 100 (local)
/// ```
///
/// The gateway's nft ruleset (table `inet tarmac_test`): in prerouting (mangle priority),
/// packets of its own transparent sockets are marked for local delivery (`socket transparent 1`),
/// and TCP to port 25 entering from the client side (`g0`) is handed to the transparent listener
/// on [`Topology::tproxy_port`] (`tproxy ... meta mark set 1`). In forward, TCP to port 25 is
/// reset: traffic that did not go to the proxy (nobody listening there) fails closed, so nothing
/// can be routed around it. Other ports are forwarded as by any router.
///
/// The servers' default route is the gateway, so replies to the client network go back through
/// it: what a gateway that connects from the client's own address (spoof_source) needs.
pub struct Topology {
    pub client: Namespace,
    pub gateway: Namespace,
    pub server: Namespace,
    tproxy_port: u16,
    ipv6: bool,
}

impl Topology {
    /// The IPv4 topology, port-25 traffic from the client handed to `tproxy_port` on the gateway.
    /// `None` (a skip, see [`Namespace::available`]) where namespaces cannot be made.
    #[track_caller]
    pub fn new(tproxy_port: u16) -> Option<Topology> {
        Topology::build(tproxy_port, false)
    }

    /// [`Topology::new`] with IPv6 too: 2001:db8:c::/64 on the client side, 2001:db8:5::/64 on
    /// the server side, the same interception for `tproxy ip6`.
    #[track_caller]
    pub fn dual_stack(tproxy_port: u16) -> Option<Topology> {
        Topology::build(tproxy_port, true)
    }

    #[track_caller]
    fn build(tproxy_port: u16, ipv6: bool) -> Option<Topology> {
        if !Namespace::available() {
            return None;
        }
        let topology = Topology {
            client: Namespace::new("client"),
            gateway: Namespace::new("gateway"),
            server: Namespace::new("server"),
            tproxy_port,
            ipv6,
        };
        topology.wire();
        Some(topology)
    }

    /// The gateway's transparent listener port that port-25 traffic is handed to.
    pub fn tproxy_port(&self) -> u16 {
        self.tproxy_port
    }

    /// Whether IPv6 is configured ([`Topology::dual_stack`]).
    pub fn has_ipv6(&self) -> bool {
        self.ipv6
    }

    #[track_caller]
    fn wire(&self) {
        let (client, gateway, server) = (&self.client, &self.gateway, &self.server);
        let gateway_pid = gateway.pid().to_string();
        // The links, each made inside the namespace of one end, its peer created directly in
        // the gateway: nothing ever appears in the machine's own namespace.
        client.run(&[
            "ip",
            "link",
            "add",
            "c0",
            "type",
            "veth",
            "peer",
            "name",
            "g0",
            "netns",
            &gateway_pid,
        ]);
        server.run(&[
            "ip",
            "link",
            "add",
            "s0",
            "type",
            "veth",
            "peer",
            "name",
            "g1",
            "netns",
            &gateway_pid,
        ]);

        // The gateway: a router with forwarding on and no reverse-path filter (transparent
        // sockets answer from addresses that are not its own).
        for setting in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.lo.rp_filter=0",
            "net.ipv4.conf.g0.rp_filter=0",
            "net.ipv4.conf.g1.rp_filter=0",
        ] {
            gateway.run(&["sysctl", "-qw", setting]);
        }
        gateway.run(&["ip", "addr", "add", "192.0.2.1/24", "dev", "g0"]);
        gateway.run(&["ip", "addr", "add", "198.51.100.1/24", "dev", "g1"]);
        // Marked packets are delivered locally, whatever their destination.
        gateway.run(&["ip", "rule", "add", "fwmark", "1", "lookup", "100"]);
        gateway.run(&[
            "ip",
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ]);

        client.run(&["ip", "addr", "add", "192.0.2.10/24", "dev", "c0"]);
        client.run(&["ip", "addr", "add", "192.0.2.66/24", "dev", "c0"]);
        server.run(&["ip", "addr", "add", "198.51.100.25/24", "dev", "s0"]);
        server.run(&["ip", "addr", "add", "198.51.100.26/24", "dev", "s0"]);

        if self.ipv6 {
            gateway.run(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
            gateway.run(&[
                "ip",
                "-6",
                "addr",
                "add",
                "2001:db8:c::1/64",
                "dev",
                "g0",
                "nodad",
            ]);
            gateway.run(&[
                "ip",
                "-6",
                "addr",
                "add",
                "2001:db8:5::1/64",
                "dev",
                "g1",
                "nodad",
            ]);
            gateway.run(&["ip", "-6", "rule", "add", "fwmark", "1", "lookup", "100"]);
            gateway.run(&[
                "ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100",
            ]);
            client.run(&[
                "ip",
                "-6",
                "addr",
                "add",
                "2001:db8:c::10/64",
                "dev",
                "c0",
                "nodad",
            ]);
            server.run(&[
                "ip",
                "-6",
                "addr",
                "add",
                "2001:db8:5::25/64",
                "dev",
                "s0",
                "nodad",
            ]);
        }

        for (namespace, link) in [
            (client, "c0"),
            (gateway, "g0"),
            (gateway, "g1"),
            (server, "s0"),
        ] {
            namespace.run(&["ip", "link", "set", link, "up"]);
        }
        client.run(&["ip", "route", "add", "default", "via", "192.0.2.1"]);
        server.run(&["ip", "route", "add", "default", "via", "198.51.100.1"]);
        if self.ipv6 {
            client.run(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                "2001:db8:c::1",
            ]);
            server.run(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                "2001:db8:5::1",
            ]);
        }

        let port = self.tproxy_port;
        let tproxy6 = if self.ipv6 {
            format!(
                "        iifname \"g0\" meta nfproto ipv6 tcp dport 25 tproxy ip6 to :{port} meta mark set 1 accept\n"
            )
        } else {
            String::new()
        };
        gateway.nft(&format!(
            "\
table inet tarmac_test {{
    chain prerouting {{
        type filter hook prerouting priority mangle; policy accept;
        meta l4proto tcp socket transparent 1 meta mark set 1 accept
        iifname \"g0\" meta nfproto ipv4 tcp dport 25 tproxy ip to :{port} meta mark set 1 accept
{tproxy6}    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        tcp dport 25 reject with tcp reset
    }}
}}
"
        ));
    }

    /// The gateway's nft ruleset as nft lists it, for a failure message.
    pub fn ruleset(&self) -> String {
        self.gateway.try_run(&["nft", "list", "ruleset"]).1
    }
}

/// `addr:port` as a socket address.
pub fn at(addr: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}
