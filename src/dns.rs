//! The resolver thread: DNSBL/DNSWL and rDNS lookups off the event loop (DESIGN.md §5,
//! STYLE.md §1.3).
//!
//! SKELETON: the types below are the agreed interface; the bodies are being written.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use mio::Waker;

use crate::config;

/// What a session asks the resolver.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Query {
    /// The client's address in a DNSBL/DNSWL zone: an A lookup of the reversed octets (IPv4)
    /// or nibbles (IPv6) under `zone`.
    Dnsbl {
        /// The zone, as configured (`zen.spamhaus.org`).
        zone: Arc<str>,
        /// The client's address.
        ip: IpAddr,
    },
    /// The client's PTR names, forward-confirmed (FCrDNS).
    Rdns(IpAddr),
}

/// A classified answer; no hickory type leaves this module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// For [`Query::Dnsbl`].
    Dnsbl(DnsblAnswer),
    /// For [`Query::Rdns`].
    Rdns(RdnsAnswer),
}

/// A zone's answer for one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsblAnswer {
    /// Listed: the A records returned, every one inside 127.0.0.0/8 and none an error code.
    Listed(Vec<Ipv4Addr>),
    /// NXDOMAIN or NODATA.
    NotListed,
    /// The zone answered with an error code (127.255.255.x, e.g. "public resolver blocked")
    /// or an address outside 127.0.0.0/8: not a listing. Carries the first such address.
    Error(Ipv4Addr),
    /// Timeout, SERVFAIL, REFUSED, unreachable server, or too many lookups in flight.
    TempFail,
    /// The zone is set aside by the health check (it answered its test points wrongly) and
    /// was not queried.
    SetAside,
}

/// The forward-confirmed reverse name of an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RdnsAnswer {
    /// A PTR name whose A/AAAA records include the address: lowercase, no trailing dot.
    Verified(Arc<str>),
    /// PTR names exist but none resolves back to the address.
    Unverified,
    /// No PTR record (NXDOMAIN or NODATA).
    NoName,
    /// Timeout or server failure.
    TempFail,
}

/// Who waits for an answer: a worker (the index [`Resolver::add_worker`] gave it) and an
/// opaque key the worker uses to find the connection (a generation-tagged slab key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter {
    /// The worker's index.
    pub worker: usize,
    /// The connection's key in that worker.
    pub key: u64,
}

/// An answer for a waiter, read by its worker from its [`Inbox`] after a wake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The waiter's key.
    pub key: u64,
    /// The query answered.
    pub query: Query,
    /// The answer.
    pub answer: Answer,
}

/// A worker's receiving end.
#[derive(Debug)]
pub struct Inbox {
    rx: std::sync::mpsc::Receiver<Delivery>,
}

impl Inbox {
    /// The next delivery, without blocking.
    pub fn try_recv(&self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }
}

/// The resolver thread's owner.
#[derive(Debug)]
pub struct Resolver {
    handle: ResolverHandle,
    senders: Vec<(std::sync::mpsc::Sender<Delivery>, Arc<Waker>)>,
}

/// A cheap, cloneable handle for lookups.
#[derive(Clone, Debug)]
pub struct ResolverHandle {
    _zones: Arc<[Arc<str>]>,
}

impl Resolver {
    /// Starts the resolver thread for `dns`; `zones` get health checks.
    pub fn start(_dns: &config::Dns, zones: &[config::Dnsbl]) -> io::Result<Resolver> {
        Ok(Resolver {
            handle: ResolverHandle {
                _zones: zones.iter().map(|z| Arc::clone(&z.zone)).collect(),
            },
            senders: Vec::new(),
        })
    }

    /// Registers a worker: answers for it go to the returned inbox, followed by a wake.
    pub fn add_worker(&mut self, waker: Arc<Waker>) -> (usize, Inbox) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.senders.push((tx, waker));
        (self.senders.len() - 1, Inbox { rx })
    }

    /// A handle for lookups.
    pub fn handle(&self) -> ResolverHandle {
        self.handle.clone()
    }
}

impl ResolverHandle {
    /// Answers at once from the cache (or `SetAside`, or `TempFail` when overloaded), else
    /// queues the lookup (merged with one in flight) and returns `None`: the answer comes to
    /// the waiter's inbox.
    pub fn lookup(&self, query: &Query, _waiter: Waiter) -> Option<Answer> {
        Some(match query {
            Query::Dnsbl { .. } => Answer::Dnsbl(DnsblAnswer::TempFail),
            Query::Rdns(_) => Answer::Rdns(RdnsAnswer::TempFail),
        })
    }
}
