//! Transparent mode's loop guard (DESIGN.md §9). A connection on a transparent listener is
//! relayed to the address the client connected to. When that address is one of tarmac's own
//! listeners (a client aiming at the transparent port itself, or a firewall rule that also
//! diverts traffic for this host's own port 25), relaying would connect tarmac to itself:
//! through the transparent listener again without end, or through a plain one that checks
//! the same client twice and relays it to `[downstream] servers` the operator never meant
//! for it. Such a connection is refused at accept instead.

use std::net::{IpAddr, SocketAddr};

/// Whether `destination` is one of `listeners` (every address tarmac listens on, with the
/// real port where one said 0): the same address and port, or the port of a wildcard
/// listener (`0.0.0.0`, `[::]`) of the same family on an address `is_local` says belongs to
/// this host. Loopback addresses are always this host's.
pub(crate) fn is_own_listener(
    destination: SocketAddr,
    listeners: &[SocketAddr],
    is_local: impl Fn(IpAddr) -> bool,
) -> bool {
    let mut local = None;
    listeners.iter().any(|listener| {
        if listener.port() != destination.port() || listener.is_ipv4() != destination.is_ipv4() {
            return false;
        }
        if listener.ip() == destination.ip() {
            return true;
        }
        listener.ip().is_unspecified()
            && *local
                .get_or_insert_with(|| destination.ip().is_loopback() || is_local(destination.ip()))
    })
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const LISTENERS: [&str; 4] = ["0.0.0.0:25", "[::]:25", "192.0.2.1:10025", "127.0.0.1:9425"];

    fn listeners() -> Vec<SocketAddr> {
        LISTENERS.iter().map(|s| addr(s)).collect()
    }

    #[test]
    fn a_listener_itself_is_a_loop() {
        let none = |_: IpAddr| false;
        assert!(is_own_listener(addr("192.0.2.1:10025"), &listeners(), none));
        assert!(is_own_listener(addr("127.0.0.1:9425"), &listeners(), none));
    }

    #[test]
    fn a_wildcard_port_loops_on_this_hosts_addresses_only() {
        let host = |ip: IpAddr| ip == "198.51.100.1".parse::<IpAddr>().unwrap();
        assert!(is_own_listener(addr("198.51.100.1:25"), &listeners(), host));
        assert!(is_own_listener(addr("127.0.0.2:25"), &listeners(), host));
        assert!(is_own_listener(addr("[::1]:25"), &listeners(), host));
        // Another host's port 25: the whole point of transparent mode.
        assert!(!is_own_listener(
            addr("198.51.100.25:25"),
            &listeners(),
            host
        ));
        assert!(!is_own_listener(
            addr("[2001:db8::25]:25"),
            &listeners(),
            host
        ));
    }

    #[test]
    fn other_ports_and_addresses_are_not_loops() {
        let all = |_: IpAddr| true;
        // A specific listener's port on another address of this host is not that listener.
        assert!(!is_own_listener(addr("192.0.2.2:10025"), &listeners(), all));
        assert!(!is_own_listener(addr("127.0.0.1:587"), &listeners(), all));
        assert!(!is_own_listener(addr("198.51.100.25:25"), &[], all));
    }

    #[test]
    fn the_host_is_asked_at_most_once_and_only_for_a_wildcard_port() {
        let asked = Cell::new(0);
        let counting = |_: IpAddr| {
            asked.set(asked.get() + 1);
            false
        };
        assert!(!is_own_listener(
            addr("198.51.100.25:587"),
            &listeners(),
            counting
        ));
        assert_eq!(asked.get(), 0, "no listener on that port");
        let both = [addr("0.0.0.0:25"), addr("0.0.0.0:25")];
        assert!(!is_own_listener(addr("198.51.100.25:25"), &both, counting));
        assert_eq!(asked.get(), 1);
    }
}
