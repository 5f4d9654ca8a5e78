//! Lookups through hickory, classified into this module's answers with how long each may be
//! cached. Runs only on the resolver thread; no hickory type goes further than this file and
//! `thread.rs`.
//!
//! Classification (STYLE.md §1.3): `NoRecordsFound` with NXDOMAIN or NOERROR (NODATA) is a
//! negative answer; every other error (timeout, SERVFAIL, REFUSED, I/O) is a temporary failure.
//! For a DNSBL, an A record outside 127.0.0.0/8 or inside 127.255.255.0/24 is an error code
//! (e.g. Spamhaus's 127.255.255.254, "query via public resolver"), not a listing.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};

use super::{DnsblAnswer, LookupAnswer, MAX_PTR_NAMES, Query, RdnsAnswer, TEMPFAIL_TTL};
use crate::policy::dnsbl::query_name;

/// At most one error-code warning per zone per this interval: a blocked resolver turns every
/// lookup into one.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// An answer and until when it may be cached (`None`: not at all).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Classified<T> {
    pub(super) answer: T,
    pub(super) valid_until: Option<Instant>,
}

/// The hickory resolver and what classifying its answers needs.
pub(super) struct Lookups {
    resolver: TokioResolver,
    /// `[dns] cache_ttl`: the cap on every cached answer's life.
    cache_ttl: Duration,
    /// When each zone's error code was last logged.
    error_logged: Mutex<HashMap<Arc<str>, Instant>>,
}

/// One hickory lookup's result, reduced to what classification needs.
#[derive(Debug)]
enum Outcome {
    /// Records (possibly none of the wanted type), valid until the given instant.
    Found(Lookup),
    /// NXDOMAIN or NODATA, with the SOA's negative TTL in seconds if the server sent one.
    Missing { negative_ttl: Option<u32> },
    /// Anything else; the text is for debug logs.
    Failed(String),
}

impl Lookups {
    pub(super) fn new(resolver: TokioResolver, cache_ttl: Duration) -> Lookups {
        Lookups {
            resolver,
            cache_ttl,
            error_logged: Mutex::new(HashMap::new()),
        }
    }

    /// Looks `query` up, counting each DNS lookup made in `sent`.
    pub(super) async fn answer(&self, query: &Query, sent: &AtomicU64) -> Classified<LookupAnswer> {
        match query {
            Query::Dnsbl { zone, ip } => {
                let Classified {
                    answer,
                    valid_until,
                } = self.dnsbl(zone, *ip, sent).await;
                Classified {
                    answer: LookupAnswer::Dnsbl(answer),
                    valid_until,
                }
            }
            Query::Rdns(ip) => {
                let Classified {
                    answer,
                    valid_until,
                } = self.rdns(*ip, sent).await;
                Classified {
                    answer: LookupAnswer::Rdns(answer),
                    valid_until,
                }
            }
        }
    }

    /// `ip` in `zone`: an A lookup of [`query_name`].
    pub(super) async fn dnsbl(
        &self,
        zone: &Arc<str>,
        ip: IpAddr,
        sent: &AtomicU64,
    ) -> Classified<DnsblAnswer> {
        let now = Instant::now();
        let name = match Name::from_ascii(query_name(ip, zone)) {
            Ok(name) => name,
            Err(err) => {
                // Config validation should make this unreachable; a bad zone fails softly.
                log::warn!("dns: zone {zone}: not a valid DNS name: {err}");
                return self.temp_fail(DnsblAnswer::TempFail, now);
            }
        };
        match self.lookup(name, RecordType::A, sent).await {
            Outcome::Found(lookup) => {
                let addrs = lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .collect();
                let answer = classify_dnsbl(addrs);
                let mut valid_until = lookup.valid_until().min(now + self.cache_ttl);
                if let DnsblAnswer::Error(code) = answer {
                    self.warn_error_code(zone, code, now);
                    valid_until = valid_until.min(now + TEMPFAIL_TTL);
                }
                Classified {
                    answer,
                    valid_until: Some(valid_until),
                }
            }
            Outcome::Missing { negative_ttl } => Classified {
                answer: DnsblAnswer::NotListed,
                valid_until: Some(self.negative_until(negative_ttl, now)),
            },
            Outcome::Failed(why) => {
                log::debug!("dns: {ip} in {zone}: {why}");
                self.temp_fail(DnsblAnswer::TempFail, now)
            }
        }
    }

    /// The PTR names of `ip`, forward-confirmed: the first of at most [`MAX_PTR_NAMES`] names
    /// whose A (IPv4) or AAAA (IPv6) records include `ip` is verified. Cached for the shortest
    /// life among the lookups it took.
    pub(super) async fn rdns(&self, ip: IpAddr, sent: &AtomicU64) -> Classified<RdnsAnswer> {
        let now = Instant::now();
        // An IPv4-mapped client is an IPv4 client: its PTR is under in-addr.arpa.
        let ip = ip.to_canonical();
        let ptr = match self.lookup(Name::from(ip), RecordType::PTR, sent).await {
            Outcome::Found(lookup) => lookup,
            Outcome::Missing { negative_ttl } => {
                return Classified {
                    answer: RdnsAnswer::NoName,
                    valid_until: Some(self.negative_until(negative_ttl, now)),
                };
            }
            Outcome::Failed(why) => {
                log::debug!("dns: PTR of {ip}: {why}");
                return self.temp_fail(RdnsAnswer::TempFail, now);
            }
        };
        let mut valid_until = ptr.valid_until().min(now + self.cache_ttl);
        let names: Vec<&Name> = ptr
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::PTR(ptr) => Some(&ptr.0),
                _ => None,
            })
            .take(MAX_PTR_NAMES)
            .collect();
        if names.is_empty() {
            return Classified {
                answer: RdnsAnswer::NoName,
                valid_until: Some(valid_until),
            };
        }
        let record_type = match ip {
            IpAddr::V4(_) => RecordType::A,
            IpAddr::V6(_) => RecordType::AAAA,
        };
        let mut failed = false;
        // One at a time: most addresses have one name, and the first verified one ends it.
        for name in names {
            match self.lookup(name.clone(), record_type, sent).await {
                Outcome::Found(lookup) => {
                    valid_until = valid_until.min(lookup.valid_until());
                    let confirmed = lookup.answers().iter().any(|record| match &record.data {
                        RData::A(a) => IpAddr::V4(a.0) == ip,
                        RData::AAAA(aaaa) => IpAddr::V6(aaaa.0) == ip,
                        _ => false,
                    });
                    if confirmed {
                        return Classified {
                            answer: RdnsAnswer::Verified(display_name(name)),
                            valid_until: Some(valid_until),
                        };
                    }
                }
                Outcome::Missing { negative_ttl } => {
                    valid_until = valid_until.min(self.negative_until(negative_ttl, now));
                }
                Outcome::Failed(why) => {
                    log::debug!("dns: forward lookup of {name} for {ip}: {why}");
                    failed = true;
                }
            }
        }
        if failed {
            // A name that could not be checked might have verified.
            return self.temp_fail(RdnsAnswer::TempFail, now);
        }
        Classified {
            answer: RdnsAnswer::Unverified,
            valid_until: Some(valid_until),
        }
    }

    async fn lookup(&self, name: Name, record_type: RecordType, sent: &AtomicU64) -> Outcome {
        sent.fetch_add(1, Ordering::Relaxed);
        outcome(self.resolver.lookup(name, record_type).await)
    }

    /// A temporary failure, cached briefly.
    fn temp_fail<T>(&self, answer: T, now: Instant) -> Classified<T> {
        Classified {
            answer,
            valid_until: Some(now + TEMPFAIL_TTL.min(self.cache_ttl)),
        }
    }

    /// When a negative answer goes stale: the SOA's negative TTL if sent, capped at
    /// `cache_ttl`.
    fn negative_until(&self, negative_ttl: Option<u32>, now: Instant) -> Instant {
        let ttl = negative_ttl.map_or(self.cache_ttl, |secs| {
            Duration::from_secs(u64::from(secs)).min(self.cache_ttl)
        });
        now + ttl
    }

    /// Warns about a zone's error code, at most once per zone per [`ERROR_LOG_INTERVAL`].
    fn warn_error_code(&self, zone: &Arc<str>, code: Ipv4Addr, now: Instant) {
        {
            let mut logged = self
                .error_logged
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(at) = logged.get(zone) {
                if now.saturating_duration_since(*at) < ERROR_LOG_INTERVAL {
                    return;
                }
            }
            logged.insert(Arc::clone(zone), now);
        }
        log::warn!(
            "dns: zone {zone} answered {code}: an error code, not a listing (a public or open \
             resolver blocked by the list is a usual cause: use a local recursive resolver)"
        );
    }
}

/// Listed, or an error code: the first A record outside 127.0.0.0/8 or inside
/// 127.255.255.0/24. No A record at all is not a listing.
pub(super) fn classify_dnsbl(addrs: Vec<Ipv4Addr>) -> DnsblAnswer {
    if let Some(code) = addrs.iter().find(|addr| is_error_code(**addr)) {
        return DnsblAnswer::Error(*code);
    }
    if addrs.is_empty() {
        return DnsblAnswer::NotListed;
    }
    DnsblAnswer::Listed(addrs)
}

/// An A record a DNSBL uses to report a problem rather than a listing.
fn is_error_code(addr: Ipv4Addr) -> bool {
    let [first, second, third, _] = addr.octets();
    first != 127 || (second == 255 && third == 255)
}

fn outcome(result: Result<Lookup, NetError>) -> Outcome {
    match result {
        Ok(lookup) => Outcome::Found(lookup),
        Err(NetError::Dns(DnsError::NoRecordsFound(NoRecords {
            response_code: ResponseCode::NXDomain | ResponseCode::NoError,
            negative_ttl,
            ..
        }))) => Outcome::Missing { negative_ttl },
        Err(err) => Outcome::Failed(err.to_string()),
    }
}

/// A name as sessions and logs use it: lowercase, no trailing dot, ASCII (IDNA as `xn--`).
fn display_name(name: &Name) -> Arc<str> {
    let ascii = name.to_lowercase().to_ascii();
    Arc::from(ascii.strip_suffix('.').unwrap_or(&ascii))
}

#[cfg(test)]
mod tests {
    use hickory_resolver::proto::op::Query as DnsQuery;
    use hickory_resolver::proto::rr::Record;
    use hickory_resolver::proto::rr::rdata::A;

    use super::*;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn dnsbl_classification() {
        let cases: &[(&[&str], DnsblAnswer)] = &[
            (&[], DnsblAnswer::NotListed),
            (&["127.0.0.2"], DnsblAnswer::Listed(vec![v4("127.0.0.2")])),
            (
                &["127.0.0.2", "127.0.0.11"],
                DnsblAnswer::Listed(vec![v4("127.0.0.2"), v4("127.0.0.11")]),
            ),
            (
                &["127.255.254.1"],
                DnsblAnswer::Listed(vec![v4("127.255.254.1")]),
            ),
            // Spamhaus: "query via public/open resolver".
            (
                &["127.255.255.254"],
                DnsblAnswer::Error(v4("127.255.255.254")),
            ),
            (
                &["127.255.255.252"],
                DnsblAnswer::Error(v4("127.255.255.252")),
            ),
            // A wildcard or hijacked answer outside 127/8 is not a listing either.
            (&["192.0.2.1"], DnsblAnswer::Error(v4("192.0.2.1"))),
            // One error code spoils the set; the first such is reported.
            (
                &["127.0.0.2", "198.51.100.1", "127.255.255.254"],
                DnsblAnswer::Error(v4("198.51.100.1")),
            ),
        ];
        for (addrs, expected) in cases {
            let addrs = addrs.iter().map(|a| v4(a)).collect();
            assert_eq!(classify_dnsbl(addrs), *expected);
        }
    }

    #[test]
    fn hickory_results_map_to_outcomes() {
        let name = Name::from_ascii("2.0.0.127.bl.test.").unwrap();
        let query = DnsQuery::query(name.clone(), RecordType::A);
        let no_records = |code, negative_ttl| {
            let mut no = NoRecords::new(query.clone(), code);
            no.negative_ttl = negative_ttl;
            Err(NetError::from(no))
        };
        assert!(matches!(
            outcome(no_records(ResponseCode::NXDomain, Some(60))),
            Outcome::Missing {
                negative_ttl: Some(60)
            }
        ));
        // NODATA: the name exists without A records.
        assert!(matches!(
            outcome(no_records(ResponseCode::NoError, None)),
            Outcome::Missing { negative_ttl: None }
        ));
        for err in [
            NetError::Timeout,
            NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)),
            NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)),
            NetError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            // A lookup that could not be made (DESIGN.md §6.1): out of descriptors for its
            // socket (EMFILE, ENFILE), or no name server connection at all. A failure, so
            // `TempFail`, never "not listed".
            NetError::from(std::io::Error::from_raw_os_error(24)),
            NetError::from(std::io::Error::from_raw_os_error(23)),
            NetError::NoConnections,
        ] {
            assert!(matches!(outcome(Err(err)), Outcome::Failed(_)));
        }
        let record = Record::from_rdata(name, 60, RData::A(A::new(127, 0, 0, 2)));
        let lookup = Lookup::new_with_max_ttl(query, [record]);
        assert!(matches!(outcome(Ok(lookup)), Outcome::Found(_)));
    }

    #[test]
    fn display_names_are_lowercase_without_the_root_dot() {
        let name = Name::from_ascii("Mail.Example.TEST.").unwrap();
        assert_eq!(&*display_name(&name), "mail.example.test");
    }
}
