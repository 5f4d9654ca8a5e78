//! Crash-safe snapshots of the in-process state (DESIGN.md §3 `[server] state_dir`,
//! `[state] backend = "local"`): the PASS cache, the greylist and the reputation table are
//! written to `state_dir` now and then and on shutdown, and read back at start.
//!
//! # Format
//! One text file per kind (`pass.state`, `greylist.state`, `reputation.state`), so a damaged
//! file costs only its own kind:
//! ```text
//! tarmac-state 1 greylist
//! 192.0.2.0/24%1fa@example.org%1fb@example.net 1795438862123 -
//! end 1 3f2a9c0d11b7e845
//! ```
//! The first line names the format ([`MAGIC`]), its [`VERSION`] and the kind. Then one entry
//! per line, fields separated by one space (each table's module says which); times are wall
//! clock, milliseconds since the Unix epoch, converted from and to `Instant`s through one
//! [`Clocks`] reading per save or load, so a restart (which restarts the monotonic clock)
//! keeps them. The last line holds the entry count and the FNV-1a 64 hash of every byte before
//! it, in hex: a file cut short, a flipped byte or someone else's file is refused as a whole
//! ([`SnapshotError`]), never half loaded. The hash catches accidents, not forgeries: the
//! directory is the operator's (created mode 0700).
//!
//! # Writing
//! [`StateDir::write`] writes `NAME.tmp` in the same directory, fsyncs it, renames it over
//! `NAME` and fsyncs the directory, so a crash leaves either the old snapshot or the new one.
//! The tables are copied out first (no map guard is held during I/O).
//!
//! Temporary files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600
//! ([`create_private`]): one left by a crash is unlinked first (which removes a symlink, never
//! what it points to), and whatever appears at the path between the unlink and the create
//! makes the create fail rather than be followed or reused. Snapshots are read with
//! `O_NOFOLLOW` too. A `state_dir` that group or others may write to is a start-up warning
//! ([`StateDir::loose_permissions`]): whoever can write there can plant links and files.
//!
//! # Reading
//! [`entries`] checks the framing; each table then parses its lines, drops expired entries and
//! clamps times a wrong clock put in the future. Nothing in a file can panic the process or
//! make a table exceed its bound.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// First word of every snapshot file.
pub const MAGIC: &str = "tarmac-state";

/// The format written; another version is refused (and overwritten by the next save).
pub const VERSION: u32 = 1;

/// Largest snapshot file read: far above what the tables' bounds can produce (the greylist's
/// at most 1,000,000 triplets, `[greylist] max_entries`, at a few hundred bytes each), so only
/// a foreign file can reach it.
pub const MAX_FILE_BYTES: u64 = 512 * 1024 * 1024;

/// Most entries a snapshot may declare: at least every table's bound (the greylist's
/// `[greylist] max_entries` is at most this), so a file can never make a load allocate for
/// more.
pub const MAX_ENTRIES: usize = 1_000_000;

/// Which table a snapshot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The PASS cache (`state::PassCache`).
    Pass,
    /// Greylisting triplets (`state::Greylist`).
    Greylist,
    /// Per-address histories (`state::ReputationTable`).
    Reputation,
}

/// The monotonic and the wall clock read at one moment, to turn `Instant`s (which mean nothing
/// to another process) into Unix times and back.
#[derive(Clone, Copy, Debug)]
pub struct Clocks {
    instant: Instant,
    unix_ms: u64,
}

/// Why a snapshot file was not loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotError {
    /// The file is empty.
    Empty,
    /// The first line is not a tarmac snapshot header.
    Foreign,
    /// A snapshot of another format version.
    Version(u32),
    /// A snapshot of another table.
    WrongKind,
    /// The file does not end with its `end` line: cut short.
    Truncated,
    /// The content does not match its hash or entry count.
    Checksum,
    /// More entries than any table holds ([`MAX_ENTRIES`]).
    TooMany(usize),
    /// An entry line (1-based line number in the file) does not parse.
    Entry(usize),
}

/// What a restore did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Entries put in the table.
    pub kept: usize,
    /// Entries left out: expired, or past the table's bound.
    pub dropped: usize,
}

impl Kind {
    /// Every kind, in the order they are saved and loaded.
    pub const ALL: [Kind; 3] = [Kind::Pass, Kind::Greylist, Kind::Reputation];

    /// The name in the header and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pass => "pass",
            Kind::Greylist => "greylist",
            Kind::Reputation => "reputation",
        }
    }

    /// The file in `state_dir`.
    pub fn file_name(self) -> &'static str {
        match self {
            Kind::Pass => "pass.state",
            Kind::Greylist => "greylist.state",
            Kind::Reputation => "reputation.state",
        }
    }
}

impl Clocks {
    /// The clocks as read by the caller at one moment (the server reads them; tests invent
    /// them).
    pub fn new(instant: Instant, wall: SystemTime) -> Clocks {
        let unix_ms = wall.duration_since(UNIX_EPOCH).map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        });
        Clocks { instant, unix_ms }
    }

    /// The monotonic reading: "now" for the tables.
    pub fn now(&self) -> Instant {
        self.instant
    }

    /// `at` as milliseconds since the Unix epoch.
    pub fn to_unix_ms(&self, at: Instant) -> u64 {
        if at >= self.instant {
            let ahead = u64::try_from(at.duration_since(self.instant).as_millis());
            self.unix_ms.saturating_add(ahead.unwrap_or(u64::MAX))
        } else {
            let behind = u64::try_from(self.instant.duration_since(at).as_millis());
            self.unix_ms.saturating_sub(behind.unwrap_or(u64::MAX))
        }
    }

    /// The `Instant` of a Unix time in milliseconds; `None` when the monotonic clock cannot
    /// express it (long before this boot): such an entry is long expired.
    pub fn to_instant(&self, unix_ms: u64) -> Option<Instant> {
        if unix_ms >= self.unix_ms {
            self.instant
                .checked_add(Duration::from_millis(unix_ms - self.unix_ms))
        } else {
            self.instant
                .checked_sub(Duration::from_millis(self.unix_ms - unix_ms))
        }
    }
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Empty => write!(f, "empty file"),
            SnapshotError::Foreign => write!(f, "not a tarmac state snapshot"),
            SnapshotError::Version(v) => {
                write!(
                    f,
                    "snapshot format version {v}, this tarmac reads {VERSION}"
                )
            }
            SnapshotError::WrongKind => write!(f, "a snapshot of another table"),
            SnapshotError::Truncated => write!(f, "cut short (no end line)"),
            SnapshotError::Checksum => write!(f, "checksum mismatch (damaged)"),
            SnapshotError::TooMany(n) => write!(f, "{n} entries, more than any table holds"),
            SnapshotError::Entry(line) => write!(f, "line {line}: malformed entry"),
        }
    }
}

impl std::error::Error for SnapshotError {}

/// Builds one snapshot file in memory.
#[derive(Debug)]
pub struct Writer {
    text: String,
    count: usize,
}

impl Writer {
    /// A file for `kind`, header written.
    pub fn new(kind: Kind) -> Writer {
        Writer {
            text: format!("{MAGIC} {VERSION} {}\n", kind.name()),
            count: 0,
        }
    }

    /// Adds one entry line; `line` must hold no line break (the tables write numbers,
    /// addresses and [`escape`]d keys).
    pub fn entry(&mut self, line: fmt::Arguments<'_>) {
        use fmt::Write as _;
        // Writing to a String cannot fail.
        let _ = self.text.write_fmt(line);
        self.text.push('\n');
        self.count += 1;
    }

    /// The finished file: the entries and the `end` line with count and hash.
    pub fn finish(mut self) -> Vec<u8> {
        let hash = fnv1a(self.text.as_bytes());
        self.text
            .push_str(&format!("end {} {hash:016x}\n", self.count));
        self.text.into_bytes()
    }
}

/// Checks a snapshot file of `kind` (header, end line, count, hash) and returns its entry
/// lines with their 1-based line numbers in the file.
pub fn entries(kind: Kind, bytes: &[u8]) -> Result<Vec<(usize, &str)>, SnapshotError> {
    if bytes.is_empty() {
        return Err(SnapshotError::Empty);
    }
    let header_end = bytes.iter().position(|&b| b == b'\n');
    let header = bytes
        .get(..header_end.unwrap_or(bytes.len()))
        .unwrap_or_default();
    let mut words = header.split(|&b| b == b' ');
    if words.next() != Some(MAGIC.as_bytes()) {
        return Err(SnapshotError::Foreign);
    }
    let version = words
        .next()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or(SnapshotError::Foreign)?;
    if version != VERSION {
        return Err(SnapshotError::Version(version));
    }
    if words.next() != Some(kind.name().as_bytes()) || words.next().is_some() {
        return Err(SnapshotError::WrongKind);
    }
    // The end line: the last one, ending the file.
    let Some(body) = bytes.strip_suffix(b"\n") else {
        return Err(SnapshotError::Truncated);
    };
    let end_start = body
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    let (hashed, end) = bytes.split_at(end_start);
    let end = end.strip_suffix(b"\n").unwrap_or(end);
    let Some(end) = end.strip_prefix(b"end ") else {
        return Err(SnapshotError::Truncated);
    };
    let end = std::str::from_utf8(end).map_err(|_| SnapshotError::Truncated)?;
    let (count, hash) = end.split_once(' ').ok_or(SnapshotError::Truncated)?;
    let count: usize = count.parse().map_err(|_| SnapshotError::Truncated)?;
    let hash = u64::from_str_radix(hash, 16).map_err(|_| SnapshotError::Truncated)?;
    if end_start == 0 || fnv1a(hashed) != hash {
        return Err(SnapshotError::Checksum);
    }
    if count > MAX_ENTRIES {
        return Err(SnapshotError::TooMany(count));
    }
    let text = std::str::from_utf8(hashed).map_err(|_| SnapshotError::Checksum)?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .skip(1)
        .take(count.saturating_add(1))
        .map(|(n, line)| (n + 1, line))
        .collect();
    if lines.len() != count {
        return Err(SnapshotError::Checksum);
    }
    Ok(lines)
}

/// Exactly `N` space-separated fields of an entry line.
pub fn fields<const N: usize>(line: &str) -> Option<[&str; N]> {
    let mut out = [""; N];
    let mut parts = line.split(' ');
    for slot in &mut out {
        *slot = parts.next()?;
    }
    parts.next().is_none().then_some(out)
}

/// A key made safe for one field: bytes outside printable ASCII, and `%`, become `%XX`.
pub fn escape(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for &b in key.as_bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

/// The inverse of [`escape`]; `None` for a bad escape, a raw byte `escape` never leaves, or
/// a result that is not UTF-8.
pub fn unescape(field: &str) -> Option<String> {
    let mut out = Vec::with_capacity(field.len());
    let mut bytes = field.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            let hex = std::str::from_utf8(&hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
        } else if b.is_ascii_graphic() {
            out.push(b);
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// A time field: Unix milliseconds.
pub fn parse_ms(field: &str) -> Option<u64> {
    if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

/// The directory snapshots live in.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Opens `path`, creating it (and its parents) with mode 0700 when missing, and checks
    /// that a file can be written there. An error means no snapshots for this run.
    pub fn open(path: &Path) -> io::Result<StateDir> {
        DirBuilder::new().recursive(true).mode(0o700).create(path)?;
        let dir = StateDir {
            path: path.to_path_buf(),
        };
        let probe = dir.path.join(".write-probe.tmp");
        let written = create_private(&probe).and_then(|mut file| file.write_all(b"probe\n"));
        let _ = fs::remove_file(&probe);
        written?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A warning when group or others may write to the directory (its mode has `0o022`
    /// bits): they could plant files and symlinks where tarmac writes its state. `None` when
    /// the mode is private enough or cannot be read.
    pub fn loose_permissions(&self) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&self.path).ok()?.permissions().mode() & 0o7777;
        (mode & 0o022 != 0).then(|| {
            format!(
                "state: state_dir {} is writable by {} (mode {mode:04o}); anyone who can write \
                 there can tamper with the saved state: chmod go-w it (tarmac creates it 0700)",
                self.path.display(),
                match (mode & 0o020 != 0, mode & 0o002 != 0) {
                    (true, true) => "group and others",
                    (true, false) => "its group",
                    _ => "others",
                }
            )
        })
    }

    /// The snapshot file of `kind`, or `None` when there is none. A file over
    /// [`MAX_FILE_BYTES`] is an `InvalidData` error.
    pub fn read(&self, kind: Kind) -> io::Result<Option<Vec<u8>>> {
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(no_follow())
            .open(self.path.join(kind.file_name()));
        let file = match opened {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {MAX_FILE_BYTES} bytes"),
            ));
        }
        Ok(Some(bytes))
    }

    /// Replaces the snapshot of `kind` with `bytes`, crash-safely: temp file, fsync, rename,
    /// fsync of the directory (see the module docs).
    pub fn write(&self, kind: Kind, bytes: &[u8]) -> io::Result<()> {
        let target = self.path.join(kind.file_name());
        let temp = self.path.join(format!("{}.tmp", kind.file_name()));
        let written = create_private(&temp)
            .and_then(|mut file| {
                file.write_all(bytes)?;
                file.sync_all()
            })
            .and_then(|()| fs::rename(&temp, &target));
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        File::open(&self.path)?.sync_all()
    }
}

/// A new file at `path`, mode 0600, created by this call (`O_CREAT | O_EXCL | O_NOFOLLOW`):
/// a leftover at `path` (a crashed write's temp file, or a symlink someone planted) is unlinked
/// first, and anything that appears there again before the create makes it fail
/// (`AlreadyExists`); a symlink is never followed.
pub fn create_private(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(path)
}

/// `O_NOFOLLOW` as `OpenOptionsExt::custom_flags` takes it.
fn no_follow() -> i32 {
    // The flag is a small positive constant (0o400000 on Linux); the cast cannot truncate.
    i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).unwrap_or(0)
}

/// FNV-1a, 64 bits: a few lines instead of a checksum dependency, and strong enough to notice
/// truncation and stray bytes.
fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut writer = Writer::new(Kind::Pass);
        writer.entry(format_args!("192.0.2.7 {}", 1_795_438_862_123u64));
        writer.entry(format_args!("2001:db8::1 {}", 1_795_438_900_000u64));
        writer.finish()
    }

    #[test]
    fn a_written_file_reads_back() {
        let bytes = sample();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.starts_with("tarmac-state 1 pass\n192.0.2.7 1795438862123\n"),
            "{text}"
        );
        assert_eq!(
            entries(Kind::Pass, &bytes).unwrap(),
            [
                (2, "192.0.2.7 1795438862123"),
                (3, "2001:db8::1 1795438900000")
            ]
        );
        let empty = Writer::new(Kind::Reputation).finish();
        assert_eq!(entries(Kind::Reputation, &empty).unwrap(), []);
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(
            fnv1a(b"a"),
            0xaf63_dc4c_8601_ec8c,
            "the published FNV-1a test vector"
        );
    }

    #[test]
    fn damaged_files_are_refused() {
        let good = sample();
        let table: Vec<(Vec<u8>, SnapshotError)> = vec![
            (Vec::new(), SnapshotError::Empty),
            (b"\n".to_vec(), SnapshotError::Foreign),
            (b"[server]\nlisten = []\n".to_vec(), SnapshotError::Foreign),
            (
                b"\x7fELF\x02\x01\x01\0\0\0".to_vec(),
                SnapshotError::Foreign,
            ),
            (b"tarmac-state x pass\n".to_vec(), SnapshotError::Foreign),
            (
                b"tarmac-state 2 pass\nwhatever\n".to_vec(),
                SnapshotError::Version(2),
            ),
            (
                b"tarmac-state 1 greylist\nend 0 0\n".to_vec(),
                SnapshotError::WrongKind,
            ),
            (
                b"tarmac-state 1 pass extra\n".to_vec(),
                SnapshotError::WrongKind,
            ),
            (b"tarmac-state 1 pass".to_vec(), SnapshotError::Truncated),
            (b"tarmac-state 1 pass\n".to_vec(), SnapshotError::Truncated),
            (
                b"tarmac-state 1 pass\nend 0 zz\n".to_vec(),
                SnapshotError::Truncated,
            ),
            (
                b"tarmac-state 1 pass\nend 0 1\n".to_vec(),
                SnapshotError::Checksum,
            ),
        ];
        for (bytes, expected) in table {
            assert_eq!(
                entries(Kind::Pass, &bytes),
                Err(expected.clone()),
                "{:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
        // Every cut is refused, whatever it leaves.
        for at in 0..good.len() {
            assert!(entries(Kind::Pass, &good[..at]).is_err(), "cut at {at}");
        }
        // So is every flipped byte, as something (header, hash, end line) no longer matches.
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            assert!(entries(Kind::Pass, &bad).is_err(), "flip at {at}");
        }
        // A wrong count with a right hash.
        let mut writer = Writer::new(Kind::Pass);
        writer.entry(format_args!("192.0.2.7 1"));
        writer.count = 2;
        assert_eq!(
            entries(Kind::Pass, &writer.finish()),
            Err(SnapshotError::Checksum)
        );
    }

    #[test]
    fn escaping_round_trips_and_rejects_junk() {
        for key in [
            "192.0.2.0/24\u{1f}a@example.org\u{1f}b@example.net",
            "\"a b\"@example.org",
            "100%",
            "δοκιμή@παράδειγμα.δοκιμή",
            "",
        ] {
            let escaped = escape(key);
            assert!(!escaped.contains([' ', '\n', '\r']), "{escaped}");
            assert_eq!(unescape(&escaped).as_deref(), Some(key));
        }
        assert_eq!(escape("a b%"), "a%20b%25");
        for junk in ["%", "%4", "%zz", "a b", "%ff", "é"] {
            assert_eq!(unescape(junk), None, "{junk}");
        }
        assert_eq!(fields::<2>("a b"), Some(["a", "b"]));
        assert_eq!(fields::<2>("a b c"), None);
        assert_eq!(fields::<2>("a"), None);
        assert_eq!(parse_ms("0"), Some(0));
        for bad in ["", "-1", "+1", "1.5", "99999999999999999999999"] {
            assert_eq!(parse_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn clocks_convert_both_ways() {
        let now = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_millis(1_795_438_862_123);
        let clocks = Clocks::new(now, wall);
        assert_eq!(clocks.to_unix_ms(now), 1_795_438_862_123);
        let later = now + Duration::from_secs(60);
        assert_eq!(clocks.to_unix_ms(later), 1_795_438_922_123);
        assert_eq!(clocks.to_instant(1_795_438_922_123), Some(later));
        // After a restart the monotonic clock starts elsewhere; the wall time stays.
        let restarted = Clocks::new(
            now + Duration::from_secs(3600),
            wall + Duration::from_secs(3600),
        );
        assert_eq!(restarted.to_instant(1_795_438_922_123), Some(later));
        // Extremes are answered, never a panic: far past or future may not be expressible.
        let _ = clocks.to_instant(u64::MAX);
        let _ = clocks.to_instant(0);
        let before_1970 = Clocks::new(now, UNIX_EPOCH - Duration::from_secs(1));
        assert_eq!(before_1970.to_unix_ms(now), 0);
    }

    #[test]
    fn the_state_dir_is_made_private_and_written_atomically() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("tarmac-unit-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let path = base.join("nested/state");
        let dir = StateDir::open(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(dir.read(Kind::Greylist).unwrap(), None, "no file yet");
        dir.write(Kind::Greylist, b"one").unwrap();
        dir.write(Kind::Greylist, b"two").unwrap();
        assert_eq!(
            dir.read(Kind::Greylist).unwrap().as_deref(),
            Some(&b"two"[..])
        );
        let names: Vec<String> = fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["greylist.state"], "no temp file left");
        let file_mode = fs::metadata(path.join("greylist.state"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(file_mode & 0o777, 0o600);
        // A path through a regular file can never be a directory, even for root.
        let blocked = path.join("greylist.state").join("sub");
        assert!(StateDir::open(&blocked).is_err());
        fs::remove_dir_all(&base).unwrap();
    }

    /// A directory of its own under the system temp dir, removed by the test.
    fn scratch(name: &str) -> PathBuf {
        let base = std::env::temp_dir().join(format!("tarmac-unit-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        base
    }

    #[test]
    fn a_symlink_planted_at_the_temp_path_is_not_followed() {
        use std::os::unix::fs::symlink;
        let base = scratch("symlink");
        let dir = StateDir::open(&base.join("state")).unwrap();
        // A file the attacker wants overwritten, and a link to it where the temp file goes.
        let victim = base.join("victim");
        fs::write(&victim, b"precious").unwrap();
        let temp = dir.path().join("greylist.state.tmp");
        symlink(&victim, &temp).unwrap();
        dir.write(Kind::Greylist, b"snapshot").unwrap();
        assert_eq!(
            fs::read(&victim).unwrap(),
            b"precious",
            "not written through"
        );
        assert_eq!(
            dir.read(Kind::Greylist).unwrap().as_deref(),
            Some(&b"snapshot"[..])
        );
        assert!(fs::symlink_metadata(&temp).is_err(), "the link is gone");
        // A dangling link too: nothing is created where it points.
        let target = base.join("created-through-link");
        symlink(&target, &temp).unwrap();
        dir.write(Kind::Greylist, b"again").unwrap();
        assert!(!target.exists());
        // A snapshot that is a link is not read through.
        let snapshot = dir.path().join("greylist.state");
        fs::remove_file(&snapshot).unwrap();
        symlink(&victim, &snapshot).unwrap();
        assert!(dir.read(Kind::Greylist).is_err());
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_stale_temp_file_is_replaced_by_a_private_one() {
        use std::os::unix::fs::PermissionsExt;
        let base = scratch("stale");
        let dir = StateDir::open(&base).unwrap();
        let temp = dir.path().join("pass.state.tmp");
        fs::write(&temp, b"left by a crash, and long").unwrap();
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o666)).unwrap();
        let mut file = create_private(&temp).unwrap();
        file.write_all(b"new").unwrap();
        drop(file);
        assert_eq!(
            fs::read(&temp).unwrap(),
            b"new",
            "a new file, not the old one truncated"
        );
        let mode = fs::metadata(&temp).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_state_dir_writable_by_others_is_a_warning() {
        use std::os::unix::fs::PermissionsExt;
        let base = scratch("loose");
        let dir = StateDir::open(&base).unwrap();
        assert_eq!(dir.loose_permissions(), None, "created 0700");
        fs::set_permissions(&base, fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(dir.loose_permissions(), None, "group may read, not write");
        fs::set_permissions(&base, fs::Permissions::from_mode(0o1777)).unwrap();
        let warning = dir.loose_permissions().unwrap();
        assert!(
            warning.contains("writable by group and others (mode 1777)"),
            "{warning}"
        );
        fs::set_permissions(&base, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(dir.loose_permissions().unwrap().contains("by its group"));
        fs::remove_dir_all(&base).unwrap();
    }
}
