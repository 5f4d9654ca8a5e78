//! File descriptors (DESIGN.md §6.1): at start the soft `RLIMIT_NOFILE` is raised to the hard
//! limit and logged, and `[server] max_connections` is capped to what the limit can hold, so
//! running out of descriptors is refused at accept with the global cap's `421` rather than met
//! by a DNS socket, a downstream connect or a state file that cannot be opened.
//!
//! Each client connection may hold two descriptors: its own socket and its downstream's. The
//! rest of the process needs a reserve ([`reserve`]): standard streams, each worker's poll
//! instance and waker and its listener sockets, the DNS resolver's sockets, the Redis
//! connection, the metrics listener and its clients, snapshot and certificate files. What is
//! left over, halved, is how many clients can be connected at once.
//!
//! Running out is still handled where it happens: the accept path pauses on `EMFILE`/`ENFILE`
//! instead of spinning (`worker.rs`), and a DNS lookup that cannot be made answers `TempFail`,
//! never "not listed" (`dns::lookup`).

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::config::Config;

/// Descriptors kept back from client connections whatever the configuration: standard
/// streams, the log, the resolver's UDP and TCP sockets (hickory opens one per query in
/// flight, up to its concurrency), the Redis connection, the metrics listener and a few of its
/// clients, snapshot, list, rule and certificate files opened on reload.
const BASE_RESERVE: u64 = 128;

/// Descriptors per worker beyond its connections: its poll instance and its waker.
const PER_WORKER: u64 = 2;

/// Descriptors a client connection may hold: its socket and its downstream connection.
pub(crate) const PER_CONNECTION: u64 = 2;

/// The soft descriptor limit before and after [`raise_nofile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NoFile {
    /// The soft limit found at start; `None` = unlimited.
    pub(crate) before: Option<u64>,
    /// The soft limit in force now; `None` = unlimited.
    pub(crate) now: Option<u64>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs what it did (info). On failure
/// (a container that forbids it) the limit stays and a warning says so.
pub(crate) fn raise_nofile() -> NoFile {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current == limit.maximum {
        log::info!("file descriptors: limit {}", show(before));
        return NoFile {
            before,
            now: before,
        };
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            let now = getrlimit(Resource::Nofile).current;
            log::info!(
                "file descriptors: soft limit raised from {} to the hard limit {}",
                show(before),
                show(now)
            );
            NoFile { before, now }
        }
        Err(e) => {
            log::warn!(
                "file descriptors: cannot raise the soft limit {} to the hard limit {}: {e}",
                show(before),
                show(limit.maximum)
            );
            NoFile {
                before,
                now: before,
            }
        }
    }
}

/// Descriptors kept back from client connections for this configuration.
pub(crate) fn reserve(config: &Config) -> u64 {
    let workers = u64::try_from(config.server.workers.max(1)).unwrap_or(u64::MAX);
    let listeners = u64::try_from(config.server.listen.len()).unwrap_or(u64::MAX);
    BASE_RESERVE.saturating_add(workers.saturating_mul(PER_WORKER.saturating_add(listeners)))
}

/// The `max_connections` to run with under a soft limit of `nofile` (`None` = unlimited):
/// the configured one, or less when the limit cannot hold it, with the warning to log.
pub(crate) fn cap_connections(config: &Config, nofile: Option<u64>) -> (usize, Option<String>) {
    let wanted = config.server.max_connections;
    let Some(nofile) = nofile else {
        return (wanted, None);
    };
    let reserve = reserve(config);
    let fits = nofile.saturating_sub(reserve) / PER_CONNECTION;
    let fits = usize::try_from(fits).unwrap_or(usize::MAX);
    if wanted <= fits {
        return (wanted, None);
    }
    // At least one, so the server still serves someone (and says why it serves so few).
    let capped = fits.max(1);
    let needed = u64::try_from(wanted)
        .unwrap_or(u64::MAX)
        .saturating_mul(PER_CONNECTION)
        .saturating_add(reserve);
    let warning = format!(
        "file descriptors: max_connections = {wanted} needs {needed} ({PER_CONNECTION} per \
         connection plus {reserve} reserved), the limit is {nofile}; serving at most {capped} \
         connections (raise the hard limit: LimitNOFILE= in the systemd unit, or ulimit -Hn)"
    );
    (capped, Some(warning))
}

fn show(limit: Option<u64>) -> String {
    limit.map_or_else(|| "unlimited".to_owned(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_connections: usize, workers: usize, listeners: usize) -> Config {
        let mut config = Config::default();
        config.server.max_connections = max_connections;
        config.server.workers = workers;
        config.server.listen = vec!["127.0.0.1:25".parse().unwrap(); listeners];
        config
    }

    #[test]
    fn the_reserve_grows_with_workers_and_listeners() {
        assert_eq!(reserve(&config(1, 1, 1)), 128 + 3);
        assert_eq!(reserve(&config(1, 4, 2)), 128 + 4 * 4);
    }

    #[test]
    fn max_connections_is_capped_to_what_the_limit_holds() {
        let c = config(50_000, 2, 1);
        // 1024 - 134 reserved = 890, two per connection: 445.
        let (capped, warning) = cap_connections(&c, Some(1024));
        assert_eq!(capped, 445);
        let warning = warning.unwrap();
        assert!(
            warning.contains("max_connections = 50000 needs 100134")
                && warning.contains("the limit is 1024; serving at most 445 connections"),
            "{warning}"
        );
        // Enough descriptors, or no limit: as configured, no warning.
        assert_eq!(cap_connections(&c, Some(1_048_576)), (50_000, None));
        assert_eq!(cap_connections(&c, None), (50_000, None));
        assert_eq!(cap_connections(&config(445, 2, 1), Some(1024)), (445, None));
        // A limit below the reserve still serves one connection, with the warning.
        let (capped, warning) = cap_connections(&c, Some(64));
        assert_eq!(capped, 1);
        assert!(warning.is_some());
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        // The test process's own limit: raising it is what the server does at start anyway.
        let found = raise_nofile();
        let limit = getrlimit(Resource::Nofile);
        assert_eq!(found.now, limit.current);
        assert_eq!(limit.current, limit.maximum);
    }
}
