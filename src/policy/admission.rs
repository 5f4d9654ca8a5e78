//! Admission: what the worker does with a new connection, before any session exists
//! (DESIGN.md §1.1). Pure: the caller passes the configuration the connection's session will
//! get, the client's address, whether the rates live in a shared store, and a way to ask the
//! failed-handshake record; it gets back an [`Admission`] and carries it out (counting against
//! the caps, the `421` on a [`Refusal`], the session).
//!
//! - An allow-listed client is exempt from the caps and the rates ([`Count::Exempt`]).
//! - A configured proxy sender (a balancer in `proxy_protocol_from`) carries everyone's
//!   connections under its one address: it is counted against the global cap only
//!   ([`Count::Unkeyed`]), and its client is checked once the PROXY header names it. The
//!   allow list is about that client too, so it is not consulted for the balancer.
//! - Any other client takes a rate token, then is counted against its caps ([`Count::Rated`]);
//!   with the rates in a shared store (Redis), whose answer cannot be waited for at accept, it
//!   is counted now and its rate asked afterwards ([`Count::Unrated`], [`Admission::asks_rate`]);
//!   so is a proxy sender's client, once named.
//! - STARTTLS is offered when a certificate is loaded, unless the client's last handshake
//!   failed recently ([`StartTls::Withhold`]); a balancer's clients are looked up once named
//!   ([`starttls`]).
//! - A client whose rate is asked after accept is admitted by [`admit_named`] when the answer
//!   comes: its rate first, then its place under the caps.
//! - Above [`STRESS_PERCENT`] of `max_connections` the server is in stress mode
//!   ([`is_stressed`]), which every session hears of.

use std::fmt;
use std::net::IpAddr;

use crate::config::Config;
use crate::policy::lists::ListMatch;
use crate::policy::rates::RateRefusal;

/// Share of `max_connections` (in percent) at which stress mode starts: late enough that a
/// busy server does not shorten its pauses for nothing, early enough to act before the cap
/// refuses anyone.
pub(crate) const STRESS_PERCENT: usize = 80;

/// What to do with a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// How it is counted against the limits.
    pub count: Count,
    /// The session starts admitting: it asks the shared store for the client's rate (a proxy
    /// sender's client's, once its header names it) and waits for the answer before its
    /// checks. Only with the rates in a shared store, and never for an allow-listed client.
    pub asks_rate: bool,
    /// Whether its session offers STARTTLS.
    pub starttls: StartTls,
}

/// How a new connection is counted against the caps and rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// Allow-listed: in the open count (so drain and logs see it), against no cap and no rate.
    Exempt,
    /// A proxy sender's: against the global cap only, until its PROXY header names the client.
    Unkeyed,
    /// The client's rate first, then the global, per-IP and per-subnet caps.
    Rated(IpAddr),
    /// The caps now, the rate asked of the shared store afterwards ([`Admission::asks_rate`]).
    Unrated(IpAddr),
}

/// Whether the session offers STARTTLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartTls {
    /// A certificate is loaded and nothing speaks against it.
    Offer,
    /// The client's TLS handshake failed within the last hour: say so and do not offer it.
    Withhold,
    /// No certificate is loaded.
    Unavailable,
}

/// Why a connection is refused with `421 4.7.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `[server] max_connections` connections are open.
    GlobalCap,
    /// `[limits] max_connections_per_ip` connections are open from this address.
    PerIpCap,
    /// `[limits] max_connections_per_subnet` connections are open from this address's /24 or
    /// /64.
    PerSubnetCap,
    /// The address or its network connected faster than `[limits] connection_rate_per_*`.
    Rate(RateRefusal),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::GlobalCap => f.write_str("max_connections reached"),
            Refusal::PerIpCap => f.write_str("max_connections_per_ip reached"),
            Refusal::PerSubnetCap => f.write_str("max_connections_per_subnet reached"),
            Refusal::Rate(rate) => rate.fmt(f),
        }
    }
}

/// Decides how a connection from `client` is admitted under `config`. `shared_rates`: the
/// rates live in a shared store. `failed_tls` says whether an address's TLS handshake failed
/// recently; it is asked only when the answer matters.
pub(crate) fn admit(
    config: &Config,
    client: IpAddr,
    shared_rates: bool,
    failed_tls: impl FnOnce(IpAddr) -> bool,
) -> Admission {
    let proxy_sender = config.server.expects_proxy_header(client);
    let allowed = !proxy_sender
        && config.lists.entries.check_ip(client.to_canonical()) == Some(ListMatch::Allow);
    let count = if allowed {
        Count::Exempt
    } else if proxy_sender {
        Count::Unkeyed
    } else if shared_rates {
        Count::Unrated(client)
    } else {
        Count::Rated(client)
    };
    // The balancer's record says nothing of its clients: each is looked up once named.
    let starttls = if proxy_sender {
        starttls(config, client, |_| false)
    } else {
        starttls(config, client, failed_tls)
    };
    Admission {
        count,
        asks_rate: shared_rates && !allowed,
        starttls,
    }
}

/// Whether STARTTLS is offered to `client`: when a certificate is loaded, unless its last
/// handshake failed recently (`failed_tls`, asked only when a certificate is loaded). Also for
/// a balancer's client once its PROXY header names it.
pub(crate) fn starttls(
    config: &Config,
    client: IpAddr,
    failed_tls: impl FnOnce(IpAddr) -> bool,
) -> StartTls {
    if config.tls.loaded.is_none() {
        StartTls::Unavailable
    } else if failed_tls(client) {
        StartTls::Withhold
    } else {
        StartTls::Offer
    }
}

/// Whether a client whose rate was asked after accept may stay (a balancer's client once its
/// PROXY header names it, or any client with the rates in a shared store), given the store's
/// `rate` answer: its rate first, then its place under the per-IP and per-subnet caps, taken by
/// `take_place` only when the rate allows, the order of accept, so a client over its rate
/// takes no place.
pub(crate) fn admit_named(
    rate: Result<(), RateRefusal>,
    take_place: impl FnOnce() -> Result<(), Refusal>,
) -> Result<(), Refusal> {
    rate.map_err(Refusal::Rate)?;
    take_place()
}

/// Whether `open` connections put the server in stress mode: at [`STRESS_PERCENT`] of
/// `max_connections` (postscreen's stress: shorter greet pause and command timeout; like
/// spamd near `maxcon`, no stutter). A server that takes nobody is always full.
pub(crate) fn is_stressed(open: usize, max_connections: usize) -> bool {
    open.saturating_mul(100) >= max_connections.saturating_mul(STRESS_PERCENT)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Cidr;
    use crate::policy::{List, ListSet};
    use crate::tls::ServerTls;

    const BALANCER: &str = "10.0.0.1";
    const ALLOWED: &str = "192.0.2.1";
    const OTHER: &str = "198.51.100.7";

    /// A config with a balancer, an allow-listed address (the balancer's too, which must not
    /// count) and, with `tls`, a certificate.
    fn config(tls: bool) -> Config {
        let mut config = Config::default();
        config.server.proxy_protocol_from = vec![BALANCER.parse::<Cidr>().unwrap()];
        let allow = format!("{ALLOWED}\n{BALANCER}\n");
        config.lists.entries = ListSet {
            allow: List::parse(&[(PathBuf::from("allow.txt"), allow)]).unwrap(),
            deny: List::default(),
        };
        if tls {
            config.tls.loaded = Some(test_tls());
        }
        config
    }

    fn test_tls() -> ServerTls {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["mx.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        ServerTls::from_pem(
            cert.pem().as_bytes(),
            "chain.pem".as_ref(),
            key.serialize_pem().as_bytes(),
            "key.pem".as_ref(),
        )
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn who_is_counted_how() {
        let config = config(false);
        // (client, shared rates) → count, session asks for the rate
        let table = [
            (ALLOWED, false, Count::Exempt, false),
            (ALLOWED, true, Count::Exempt, false),
            (BALANCER, false, Count::Unkeyed, false),
            (BALANCER, true, Count::Unkeyed, true),
            (OTHER, false, Count::Rated(ip(OTHER)), false),
            (OTHER, true, Count::Unrated(ip(OTHER)), true),
        ];
        for (client, shared, count, asks) in table {
            let admission = admit(&config, ip(client), shared, |_| false);
            assert_eq!(admission.count, count, "{client}, shared {shared}");
            assert_eq!(admission.asks_rate, asks, "{client}, shared {shared}");
        }
        // A v4-mapped address is the same client for the allow list.
        let mapped = ip(&format!("::ffff:{ALLOWED}"));
        assert_eq!(
            admit(&config, mapped, false, |_| false).count,
            Count::Exempt
        );
    }

    #[test]
    fn starttls_is_withheld_only_from_a_client_that_failed_with_a_certificate_loaded() {
        // (certificate loaded, client, its handshake failed) → offer
        let table = [
            (false, OTHER, true, StartTls::Unavailable),
            (false, OTHER, false, StartTls::Unavailable),
            (true, OTHER, false, StartTls::Offer),
            (true, OTHER, true, StartTls::Withhold),
            (true, ALLOWED, true, StartTls::Withhold),
            // The balancer's record says nothing of its clients: looked up once named.
            (true, BALANCER, true, StartTls::Offer),
        ];
        let with_tls = config(true);
        let without = config(false);
        for (tls, client, failed, expected) in table {
            let config = if tls { &with_tls } else { &without };
            let mut asked = Vec::new();
            let admission = admit(config, ip(client), false, |ip| {
                asked.push(ip);
                failed
            });
            assert_eq!(
                admission.starttls, expected,
                "tls {tls}, {client}, {failed}"
            );
            if !tls || client == BALANCER {
                assert!(asked.is_empty(), "the record is asked only when it matters");
            }
        }
    }

    #[test]
    fn a_named_client_gets_starttls_unless_its_handshake_failed_with_a_certificate_loaded() {
        // (certificate loaded, its handshake failed) → offer, record asked
        let table = [
            (false, false, StartTls::Unavailable, false),
            (false, true, StartTls::Unavailable, false),
            (true, false, StartTls::Offer, true),
            (true, true, StartTls::Withhold, true),
        ];
        let with_tls = config(true);
        let without = config(false);
        for (tls, failed, expected, asks) in table {
            let config = if tls { &with_tls } else { &without };
            let mut asked = Vec::new();
            let offer = starttls(config, ip(OTHER), |ip| {
                asked.push(ip);
                failed
            });
            assert_eq!(offer, expected, "tls {tls}, failed {failed}");
            let expected_asked = if asks { vec![ip(OTHER)] } else { Vec::new() };
            assert_eq!(asked, expected_asked, "tls {tls}, failed {failed}");
        }
    }

    #[test]
    fn a_named_client_is_rated_before_it_takes_a_place() {
        let rate_refused = Err(RateRefusal::PerIp);
        // (rate answer, the caps' answer) → admission, place asked for
        let table = [
            (Ok(()), Ok(()), Ok(()), true),
            (Ok(()), Err(Refusal::PerIpCap), Err(Refusal::PerIpCap), true),
            (
                Ok(()),
                Err(Refusal::PerSubnetCap),
                Err(Refusal::PerSubnetCap),
                true,
            ),
            (
                rate_refused,
                Ok(()),
                Err(Refusal::Rate(RateRefusal::PerIp)),
                false,
            ),
            (
                rate_refused,
                Err(Refusal::PerIpCap),
                Err(Refusal::Rate(RateRefusal::PerIp)),
                false,
            ),
        ];
        for (rate, place, expected, asks) in table {
            let mut asked = false;
            let admitted = admit_named(rate, || {
                asked = true;
                place
            });
            assert_eq!(admitted, expected, "rate {rate:?}, place {place:?}");
            assert_eq!(asked, asks, "rate {rate:?}, place {place:?}");
        }
    }

    #[test]
    fn stress_starts_at_80_percent() {
        // (open, max_connections) → stressed
        let table = [
            (79, 100, false),
            (80, 100, true),
            (100, 100, true),
            (0, 1000, false),
            (0, 0, true), // a server that takes nobody is full
            (usize::MAX, usize::MAX, true),
        ];
        for (open, max, stressed) in table {
            assert_eq!(is_stressed(open, max), stressed, "{open} of {max}");
        }
    }

    #[test]
    fn refusals_read_as_the_log_says_them() {
        let table = [
            (Refusal::GlobalCap, "max_connections reached"),
            (Refusal::PerIpCap, "max_connections_per_ip reached"),
            (Refusal::PerSubnetCap, "max_connections_per_subnet reached"),
            (
                Refusal::Rate(RateRefusal::PerSubnet),
                "connection_rate_per_subnet exceeded",
            ),
        ];
        for (refusal, text) in table {
            assert_eq!(refusal.to_string(), text);
        }
    }
}
