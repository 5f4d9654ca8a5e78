//! How loaded the server is, beyond the hard caps of `limits.rs`: the places for tarpitted
//! sessions (`[server] max_tarpitted`, spamd's `maxblack`) and stress mode (above 80 % of
//! `max_connections`, postscreen's stress: shorter greet pause and command timeout; like spamd
//! near `maxcon`, no stutter; the threshold is policy's, `policy::admission::is_stressed`).
//!
//! Shared by every worker. A tarpit place is held by a [`TarpitGuard`] the connection owns, so
//! every way a connection ends gives it back. Stress is derived from the open-connection count;
//! each worker compares it once per turn and tells its sessions when it changes, and
//! [`Load::note_stress`] logs the entry and the exit once for the whole server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::policy::admission;

/// The server-wide load figures.
#[derive(Debug)]
pub(crate) struct Load {
    max_connections: usize,
    max_tarpitted: usize,
    tarpitted: AtomicUsize,
    /// Stress mode as last logged.
    stressed: AtomicBool,
}

/// One tarpit place; dropping it gives the place back.
#[derive(Debug)]
pub(crate) struct TarpitGuard {
    load: Arc<Load>,
}

impl Load {
    /// Figures for these caps.
    pub(crate) fn new(max_connections: usize, max_tarpitted: usize) -> Load {
        Load {
            max_connections,
            max_tarpitted,
            tarpitted: AtomicUsize::new(0),
            stressed: AtomicBool::new(false),
        }
    }

    /// A tarpit place, or `None` when `max_tarpitted` sessions hold one.
    pub(crate) fn try_tarpit(self: &Arc<Self>) -> Option<TarpitGuard> {
        let before = self.tarpitted.fetch_add(1, Ordering::AcqRel);
        if before >= self.max_tarpitted {
            self.tarpitted.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(TarpitGuard {
            load: Arc::clone(self),
        })
    }

    /// Tarpitted sessions now.
    pub(crate) fn tarpitted(&self) -> usize {
        self.tarpitted.load(Ordering::Acquire)
    }

    /// Whether `open` connections put the server in stress mode (policy's
    /// [`admission::is_stressed`]).
    pub(crate) fn is_stressed(&self, open: usize) -> bool {
        admission::is_stressed(open, self.max_connections)
    }

    /// A worker saw stress mode begin or end at `open` connections: logged once per change
    /// for the whole server, whichever worker sees it first.
    pub(crate) fn note_stress(&self, stressed: bool, open: usize) {
        if self.stressed.swap(stressed, Ordering::AcqRel) == stressed {
            return;
        }
        if stressed {
            log::warn!(
                "stress mode on: {open} of {} connections open ({} tarpitted); greet pause \
                 and command timeout shortened, no stutter",
                self.max_connections,
                self.tarpitted()
            );
        } else {
            log::info!(
                "stress mode off: {open} of {} connections open",
                self.max_connections
            );
        }
    }
}

impl Drop for TarpitGuard {
    fn drop(&mut self) {
        self.load.tarpitted.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tarpit_places_are_capped_and_given_back() {
        let load = Arc::new(Load::new(100, 2));
        let a = load.try_tarpit().unwrap();
        let _b = load.try_tarpit().unwrap();
        assert!(load.try_tarpit().is_none());
        assert_eq!(load.tarpitted(), 2);
        drop(a);
        assert!(load.try_tarpit().is_some());
    }

    #[test]
    fn stress_starts_at_80_percent() {
        let load = Load::new(100, 1);
        assert!(!load.is_stressed(79));
        assert!(load.is_stressed(80));
        assert!(
            Load::new(0, 0).is_stressed(0),
            "a server that takes nobody is full"
        );
    }
}
