//! Transparent mode's loop guard (DESIGN.md §9). A connection on a transparent listener is
//! relayed to the address the client connected to. When that address is this host's own,
//! relaying would make tarmac connect to its own host: to one of its own listeners (through the
//! transparent listener again without end, or through a plain one that checks the same client
//! twice and relays it to `[downstream] servers`), or to another local service, such as the
//! gateway's own MTA, from this host's own address, which that service trusts (Postfix's
//! `mynetworks` holds it by default): the client would speak with the gateway's identity.
//! Traffic for the gateway itself belongs to its listeners, not to the interception (the
//! firewall rules in docs/transparent.md exclude it); whatever a rule diverts anyway is
//! refused at accept.

use std::net::{IpAddr, SocketAddr};

/// Whether `destination` is this host: one of `listeners` (the transparent listeners, real
/// ports: one may be bound, with `IP_TRANSPARENT`, to an address the host lacks), or an
/// address `is_local` says belongs to this host (loopback and the unspecified address always
/// do; every other listener's address is the host's own).
pub(crate) fn is_this_host(
    destination: SocketAddr,
    listeners: &[SocketAddr],
    is_local: impl FnOnce(IpAddr) -> bool,
) -> bool {
    let ip = destination.ip().to_canonical();
    listeners.contains(&destination) || ip.is_loopback() || ip.is_unspecified() || is_local(ip)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn listeners() -> Vec<SocketAddr> {
        [
            "0.0.0.0:25",
            "[::]:25",
            "203.0.113.1:10025",
            "127.0.0.1:9425",
        ]
        .iter()
        .map(|s| addr(s))
        .collect()
    }

    /// This host: 198.51.100.1 and 2001:db8::1.
    fn host(ip: IpAddr) -> bool {
        ["198.51.100.1", "2001:db8::1"].contains(&ip.to_string().as_str())
    }

    #[test]
    fn a_listener_itself_is_this_host_even_on_a_foreign_address() {
        // A transparent listener bound (with IP_TRANSPARENT) to an address the host lacks.
        assert!(is_this_host(
            addr("203.0.113.1:10025"),
            &listeners(),
            |_| false
        ));
        assert!(!is_this_host(addr("203.0.113.1:25"), &listeners(), |_| {
            false
        }));
    }

    #[test]
    fn any_port_of_this_hosts_addresses_is_this_host() {
        for this in [
            "198.51.100.1:25",
            "198.51.100.1:587",
            "[2001:db8::1]:25",
            "127.0.0.2:25",
            "[::1]:10025",
            "0.0.0.0:25",
            "[::ffff:127.0.0.1]:25",
        ] {
            assert!(is_this_host(addr(this), &listeners(), host), "{this}");
        }
    }

    #[test]
    fn another_hosts_port_25_is_the_point_of_transparent_mode() {
        for other in ["198.51.100.25:25", "[2001:db8::25]:25", "192.0.2.1:10025"] {
            assert!(!is_this_host(addr(other), &listeners(), host), "{other}");
            assert!(!is_this_host(addr(other), &[], host), "{other}");
        }
    }

    #[test]
    fn the_host_is_not_asked_when_the_answer_is_known() {
        let asked = Cell::new(0);
        let counting = |_: IpAddr| {
            asked.set(asked.get() + 1);
            false
        };
        assert!(is_this_host(addr("127.0.0.1:9425"), &listeners(), counting));
        assert_eq!(asked.get(), 0);
        assert!(!is_this_host(
            addr("198.51.100.25:25"),
            &listeners(),
            counting
        ));
        assert_eq!(asked.get(), 1);
    }
}
