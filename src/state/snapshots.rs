//! Keeping the in-process state across restarts (`[state] backend = "local"`, DESIGN.md §2
//! "save state", §3 `state_dir`): the PASS cache, the greylist and the reputation table are
//! read from `[server] state_dir` at start, written every [`SAVE_EVERY`] by the `tarmac-state`
//! thread, and written once more when the server stops, after the last worker is gone (so the
//! drained sessions' last events are in).
//!
//! Nothing here stops tarmac from serving: a `state_dir` that cannot be created or written is
//! one warning and a run without snapshots; a file that cannot be read or is damaged is one
//! warning and an empty table; a save that fails is one warning (and one line when saving
//! works again), and the next save tries again. The formats and the crash-safe write are
//! `state::snapshot`'s. The server opens the snapshots, loads them before the first accept,
//! starts and stops the [`Saver`] and saves once more at the end; it hands in the way to read
//! the configuration in force ([`CurrentConfig`]), which changes on reload.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use super::greylist::{Greylist, GreylistTimes};
use super::pass::PassCache;
use super::reputation::ReputationTable;
use super::snapshot::{Clocks, Kind, Restored, SnapshotError, StateDir};
use crate::config::{Config, StateBackend};

/// How often the state is written while running: what a crash (or `kill -9`) can lose at
/// most. The tables are copied out in well under a second even when full, so a minute costs
/// nothing noticeable and keeps the loss small.
pub(crate) const SAVE_EVERY: Duration = Duration::from_secs(60);

/// The configuration in force, read at each load and save (the server's reload handle).
pub(crate) type CurrentConfig = Box<dyn Fn() -> Arc<Config> + Send + Sync>;

/// The tables that are saved, shared with the workers.
#[derive(Clone, Debug)]
pub(crate) struct Tables {
    pub(crate) passes: Arc<PassCache>,
    pub(crate) greylist: Arc<Greylist>,
    pub(crate) reputation: Arc<ReputationTable>,
}

/// Loading and saving the tables in one state directory.
pub(crate) struct Snapshots {
    dir: StateDir,
    tables: Tables,
    /// The configuration in force (the greylist's times, the reputation's half-life).
    current: CurrentConfig,
    /// The last save failed somewhere: the next failure is not logged again.
    failing: AtomicBool,
}

/// The thread that saves every [`SAVE_EVERY`]; dropping `stop` ends it.
#[derive(Debug)]
pub(crate) struct Saver {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots")
            .field("dir", &self.dir)
            .field("tables", &self.tables)
            .field("failing", &self.failing)
            .finish_non_exhaustive()
    }
}

impl Snapshots {
    /// The snapshots for `config`, or `None` (with one warning if `state_dir` is unusable)
    /// when there are none: another backend, or a directory that cannot be created or
    /// written.
    pub(crate) fn open(config: &Config, tables: Tables, current: CurrentConfig) -> Option<Self> {
        if config.state.backend != StateBackend::Local {
            return None;
        }
        let path = &config.server.state_dir;
        match StateDir::open(path) {
            Ok(dir) => Some(Snapshots {
                dir: warn_if_loose(dir),
                tables,
                current,
                failing: AtomicBool::new(false),
            }),
            Err(e) => {
                log::warn!(
                    "state: cannot use state_dir {}: {e}; running without snapshots (the \
                     greylist, PASS cache and reputation start empty and are not saved)",
                    path.display()
                );
                None
            }
        }
    }

    /// Reads every table's snapshot; each file that is missing, unreadable or damaged leaves
    /// its table empty (logged), never an error.
    pub(crate) fn load(&self, clocks: &Clocks) {
        let config = (self.current)();
        for kind in Kind::ALL {
            let path = self.dir.path().join(kind.file_name());
            let bytes = match self.dir.read(kind) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => {
                    log::debug!("state: no {} snapshot at {}", kind.name(), path.display());
                    continue;
                }
                Err(e) => {
                    log::warn!(
                        "state: cannot read {}: {e}; the {} table starts empty",
                        path.display(),
                        kind.name()
                    );
                    continue;
                }
            };
            match self.restore(kind, &bytes, clocks, &config) {
                Ok(Restored { kept, dropped }) => log::info!(
                    "state: restored {kept} {} entries from {} ({dropped} expired)",
                    kind.name(),
                    path.display()
                ),
                Err(e) => log::warn!(
                    "state: {}: {e}; ignored, the {} table starts empty",
                    path.display(),
                    kind.name()
                ),
            }
        }
    }

    /// Writes every table's snapshot (each copied out of its map first, then written);
    /// returns whether all of them were written.
    pub(crate) fn save(&self, clocks: &Clocks) -> bool {
        let config = (self.current)();
        let mut failed = false;
        for kind in Kind::ALL {
            let bytes = match kind {
                Kind::Pass => self.tables.passes.snapshot(clocks),
                Kind::Greylist => self
                    .tables
                    .greylist
                    .snapshot(clocks, &GreylistTimes::of(&config.greylist)),
                Kind::Reputation => self
                    .tables
                    .reputation
                    .snapshot(clocks, config.reputation.half_life),
            };
            if let Err(e) = self.dir.write(kind, &bytes) {
                failed = true;
                if !self.failing.swap(true, Ordering::AcqRel) {
                    log::warn!(
                        "state: cannot save {}: {e}; trying again in {} s",
                        self.dir.path().join(kind.file_name()).display(),
                        SAVE_EVERY.as_secs()
                    );
                }
            }
        }
        if failed {
            return false;
        }
        if self.failing.swap(false, Ordering::AcqRel) {
            log::info!("state: saved to {} again", self.dir.path().display());
        } else {
            log::debug!("state: saved to {}", self.dir.path().display());
        }
        true
    }

    /// The directory saved to.
    pub(crate) fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn restore(
        &self,
        kind: Kind,
        bytes: &[u8],
        clocks: &Clocks,
        config: &Config,
    ) -> Result<Restored, SnapshotError> {
        match kind {
            Kind::Pass => self.tables.passes.restore(bytes, clocks),
            Kind::Greylist => {
                self.tables
                    .greylist
                    .restore(bytes, clocks, &GreylistTimes::of(&config.greylist))
            }
            Kind::Reputation => {
                self.tables
                    .reputation
                    .restore(bytes, clocks, config.reputation.half_life)
            }
        }
    }
}

impl Saver {
    /// Starts the thread that calls [`Snapshots::save`] every `every`.
    pub(crate) fn start(snapshots: Arc<Snapshots>, every: Duration) -> io::Result<Saver> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("tarmac-state".to_owned())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    // A failure is logged inside; the next round tries again.
                    let _ = snapshots.save(&clocks_now());
                }
            })?;
        Ok(Saver { stop, thread })
    }

    /// Ends the thread (a save in progress finishes first).
    pub(crate) fn stop(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            log::error!("state: the snapshot thread panicked");
        }
    }
}

/// Logs the state directory's start-up warning (DESIGN.md §6.1), if it has one.
fn warn_if_loose(dir: StateDir) -> StateDir {
    if let Some(warning) = dir.loose_permissions() {
        log::warn!("{warning}");
    }
    dir
}

/// Both clocks, read now: only the server and this module's thread read clocks.
pub(crate) fn clocks_now() -> Clocks {
    Clocks::new(Instant::now(), SystemTime::now())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::policy::reputation::Event;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tarmac-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn empty_tables() -> Tables {
        Tables {
            passes: Arc::new(PassCache::new(Duration::from_secs(3600))),
            greylist: Arc::new(Greylist::new(Instant::now())),
            reputation: Arc::new(ReputationTable::new()),
        }
    }

    fn config(state_dir: PathBuf) -> Arc<Config> {
        let mut config = Config::default();
        config.server.state_dir = state_dir;
        Arc::new(config)
    }

    fn current(config: &Arc<Config>) -> CurrentConfig {
        let config = Arc::clone(config);
        Box::new(move || Arc::clone(&config))
    }

    #[test]
    fn the_saver_saves_on_its_own_and_a_restart_loads_it() {
        let path = dir("saver");
        let config = config(path.clone());
        let tables = empty_tables();
        let snapshots = Snapshots::open(&config, tables.clone(), current(&config))
            .map(Arc::new)
            .unwrap();
        let now = Instant::now();
        let ip = "192.0.2.7".parse().unwrap();
        tables.passes.record(ip, now);
        let half_life = config.reputation.half_life;
        tables
            .reputation
            .record(ip, Event::Delivered, now, half_life);
        let saver = Saver::start(Arc::clone(&snapshots), Duration::from_millis(20)).unwrap();
        let file = path.join(Kind::Pass.file_name());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !file.exists() {
            assert!(Instant::now() < deadline, "no periodic save");
            thread::sleep(Duration::from_millis(5));
        }
        saver.stop();

        let fresh = empty_tables();
        let reopened = Snapshots::open(&config, fresh.clone(), current(&config)).unwrap();
        reopened.load(&clocks_now());
        assert!(fresh.passes.is_fresh(ip, Instant::now()));
        assert_eq!(fresh.reputation.len(), 1);
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn no_snapshots_without_a_usable_dir_or_with_another_backend() {
        let path = dir("blocked");
        std::fs::write(&path, "a file, not a directory").unwrap();
        let config = config(path.join("state"));
        assert!(Snapshots::open(&config, empty_tables(), current(&config)).is_none());
        std::fs::remove_file(&path).unwrap();

        let mut redis = Config::default();
        redis.state.backend = StateBackend::Redis;
        redis.server.state_dir = dir("redis");
        assert!(Snapshots::open(&redis, empty_tables(), current(&config)).is_none());
        assert!(!redis.server.state_dir.exists(), "not even created");
    }
}
