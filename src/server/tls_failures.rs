//! Clients whose STARTTLS handshake failed: for [`WITHHOLD_FOR`] they are not offered STARTTLS
//! again, so a sender with broken TLS (an old library, a middlebox that eats the handshake)
//! delivers in plain text on its retry instead of failing the same way forever. An MTA that
//! sees STARTTLS offered uses it, and most only fall back to plain text when it is not.
//!
//! Keyed by address, shared by every worker (a dashmap: no lock across I/O, short shard locks).
//! Memory is bounded: at [`MAX_ENTRIES`] the expired entries are swept, and if the map is still
//! full the oldest tenth is dropped, so a flood of failing addresses costs at most that many
//! entries and a full sweep once per tenth of them.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// How long a failed handshake withholds STARTTLS from that address: long enough for a sender's
/// next retry (commonly 15 to 60 minutes) to come back in plain text, short enough that a
/// sender that was fixed gets TLS again the same day.
pub(crate) const WITHHOLD_FOR: Duration = Duration::from_secs(3600);

/// Most addresses remembered at once (about half a megabyte of map).
pub(crate) const MAX_ENTRIES: usize = 10_000;

/// Addresses whose handshake failed, and when.
#[derive(Debug, Default)]
pub(crate) struct TlsFailures {
    failed: DashMap<IpAddr, Instant>,
}

impl TlsFailures {
    /// Whether `ip`'s last handshake failed within [`WITHHOLD_FOR`] before `now`.
    pub(crate) fn failed_recently(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = ip.to_canonical();
        self.failed
            .get(&ip)
            .is_some_and(|at| now.saturating_duration_since(*at) < WITHHOLD_FOR)
    }

    /// Records a failed handshake from `ip` at `now`.
    pub(crate) fn record(&self, ip: IpAddr, now: Instant) {
        let ip = ip.to_canonical();
        if self.failed.len() >= MAX_ENTRIES && !self.failed.contains_key(&ip) {
            self.make_room(now);
        }
        self.failed.insert(ip, now);
    }

    /// Entries held (recent or not yet swept).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.failed.len()
    }

    /// Drops the expired entries, then, if that freed nothing, the oldest tenth.
    fn make_room(&self, now: Instant) {
        self.failed
            .retain(|_, at| now.saturating_duration_since(*at) < WITHHOLD_FOR);
        if self.failed.len() < MAX_ENTRIES {
            return;
        }
        let mut times: Vec<Instant> = self.failed.iter().map(|entry| *entry.value()).collect();
        let tenth = times.len() / 10;
        let (_, cutoff, _) = times.select_nth_unstable(tenth);
        let cutoff = *cutoff;
        self.failed.retain(|_, at| *at > cutoff);
    }
}

/// Puts `client` on the failed-handshake record and says so (with how the connection ended).
pub(crate) fn remember_failed_handshake(
    failures: &TlsFailures,
    client: SocketAddr,
    result: &str,
    now: Instant,
) {
    failures.record(client.ip(), now);
    log::info!(
        "STARTTLS from {client} did not complete (result={result}); not offering STARTTLS to {} for {} s",
        client.ip().to_canonical(),
        WITHHOLD_FOR.as_secs()
    );
}

/// Says that `client` is not offered STARTTLS because of an earlier failed handshake.
pub(crate) fn log_withheld(client: SocketAddr) {
    log::info!(
        "not offering STARTTLS to {client}: a TLS handshake from {} failed within the last {} s",
        client.ip().to_canonical(),
        WITHHOLD_FOR.as_secs()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_withholds_for_an_hour() {
        let t0 = Instant::now();
        let failures = TlsFailures::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(!failures.failed_recently(ip, t0));
        failures.record(ip, t0);
        assert!(failures.failed_recently(ip, t0 + WITHHOLD_FOR - Duration::from_secs(1)));
        assert!(!failures.failed_recently(ip, t0 + WITHHOLD_FOR));
        assert!(!failures.failed_recently("192.0.2.8".parse().unwrap(), t0));
        // An IPv4 client on an IPv6 socket is the same client.
        assert!(failures.failed_recently("::ffff:192.0.2.7".parse().unwrap(), t0));
    }

    #[test]
    fn a_full_record_drops_the_oldest() {
        let t0 = Instant::now();
        let failures = TlsFailures::default();
        for n in 0..MAX_ENTRIES as u32 {
            let at = t0 + Duration::from_millis(u64::from(n));
            failures.record(IpAddr::from(n.to_be_bytes()), at);
        }
        assert_eq!(failures.len(), MAX_ENTRIES);
        let late_time = t0 + Duration::from_secs(60);
        let late: IpAddr = "2001:db8::1".parse().unwrap();
        failures.record(late, late_time);
        assert!(failures.failed_recently(late, late_time));
        assert!(failures.len() <= MAX_ENTRIES - MAX_ENTRIES / 10 + 1);
        let oldest = IpAddr::from(0u32.to_be_bytes());
        let newest = IpAddr::from((MAX_ENTRIES as u32 - 1).to_be_bytes());
        assert!(!failures.failed_recently(oldest, late_time), "dropped");
        assert!(failures.failed_recently(newest, late_time), "kept");
    }
}
