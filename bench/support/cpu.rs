//! CPU time from /proc, for the benches that say where the time goes (`dns`, `relay`, `scan`,
//! `tarpit`): the whole process's, or one thread's.

use std::ops::{Add, Sub};
use std::path::Path;
use std::time::Duration;

/// Kernel clock ticks per second in /proc stat times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: u64 = 100;

/// User and system CPU time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// In user mode (utime).
    pub user: Duration,
    /// In the kernel on the thread's behalf (stime).
    pub system: Duration,
}

impl Cpu {
    /// User and system together.
    pub fn total(self) -> Duration {
        self.user + self.system
    }
}

impl Add for Cpu {
    type Output = Cpu;
    fn add(self, other: Cpu) -> Cpu {
        Cpu {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }
}

/// Saturating: a sum over live threads can shrink when one of them ends between two readings.
impl Sub for Cpu {
    type Output = Cpu;
    fn sub(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// The whole process's: every thread, those already ended included.
pub fn process() -> Cpu {
    read(Path::new("/proc/self/stat")).expect("/proc/self/stat")
}

/// The CPU time in the `stat` file at `path` (`/proc/self/stat`, or a thread's
/// `/proc/self/task/<tid>/stat`); `None` if it cannot be read, as when the thread has ended.
pub fn read(path: &Path) -> Option<Cpu> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The name in parentheses may hold spaces: count from the closing one. After it, state is
    // field 3, so utime (14) and stime (15) are at 11 and 12.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let mut next = || {
        let ticks = fields.next()?.parse::<u64>().ok()?;
        Some(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
    };
    Some(Cpu {
        user: next()?,
        system: next()?,
    })
}
