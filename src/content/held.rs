//! The held message (DESIGN.md §7): while scanners are configured, a message is kept whole
//! until the client's final dot, in memory up to `spool_after` bytes and then in a spool file
//! that has no name.
//!
//! The file is made with `O_TMPFILE` in `state_dir/spool`, so it never appears in the
//! directory: a crash or a kill leaves nothing behind, and no other process can open it by
//! name. Where the file system has no `O_TMPFILE`, a uniquely named file is created
//! (`O_EXCL`, mode 0600) and unlinked at once, which leaves a name only for that instant.
//!
//! The bytes are the message as the downstream will get it before any scanner's change:
//! tarmac's `Received:` first, CRLF line ends, no dot-stuffing. A `Held` moves between
//! threads (the session, the scanner thread, back), never shared: reads take `&self`
//! (`read_at`), so the scanner thread reads while nobody writes.
//!
//! Like Postfix's queue file, the spool file is a buffer on the local disk: writes and reads
//! go to the page cache, not to the network, and are made where the bytes are (the session
//! core holds the message). That is the one file the core touches (docs/architecture.md).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The spool directory's name under `state_dir`.
pub const SPOOL: &str = "spool";

/// A message held for scanning.
#[derive(Debug)]
pub struct Held {
    /// The first bytes, up to `spool_after`.
    memory: Vec<u8>,
    /// The rest, once there is more than `spool_after`: the whole message then lives in the
    /// file (the memory part is written to it first, then freed).
    file: Option<File>,
    len: u64,
    spool_after: u64,
    spool_dir: PathBuf,
}

impl Held {
    /// An empty message that spills to a file in `spool_dir` (see [`spool_dir`]) past
    /// `spool_after` bytes. The directory is not touched until then.
    pub fn new(spool_after: u64, spool_dir: PathBuf) -> Held {
        Held {
            memory: Vec::new(),
            file: None,
            len: 0,
            spool_after,
            spool_dir,
        }
    }

    /// A message held in memory only (`bytes`), for a scanner's replacement body or a test.
    pub fn from_bytes(bytes: Vec<u8>) -> Held {
        Held {
            len: bytes.len() as u64,
            memory: bytes,
            file: None,
            spool_after: u64::MAX,
            spool_dir: PathBuf::new(),
        }
    }

    /// Appends `bytes`; past `spool_after` the message moves to an unnamed spool file. An
    /// error (no room on the disk, no spool directory) leaves the message unusable: the
    /// caller answers `451`.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let new_len = self.len.saturating_add(bytes.len() as u64);
        if self.file.is_none() && new_len > self.spool_after {
            let mut file = unnamed_file(&self.spool_dir)?;
            file.write_all(&self.memory)?;
            self.memory = Vec::new();
            self.file = Some(file);
        }
        match self.file.as_mut() {
            Some(file) => file.write_all(bytes)?,
            None => self.memory.extend_from_slice(bytes),
        }
        self.len = new_len;
        Ok(())
    }

    /// Bytes held.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the message went to a spool file.
    pub fn is_spooled(&self) -> bool {
        self.file.is_some()
    }

    /// Reads up to `buf.len()` bytes at `offset`; 0 at the end.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset >= self.len || buf.is_empty() {
            return Ok(0);
        }
        match &self.file {
            Some(file) => {
                let want = usize::try_from(self.len - offset)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let buf = buf.get_mut(..want).unwrap_or_default();
                file.read_at(buf, offset)
            }
            None => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let rest = self.memory.get(start..).unwrap_or_default();
                let n = rest.len().min(buf.len());
                if let (Some(to), Some(from)) = (buf.get_mut(..n), rest.get(..n)) {
                    to.copy_from_slice(from);
                }
                Ok(n)
            }
        }
    }

    /// The bytes from `offset` to `end` (at most), read whole: for a header block or a milter's
    /// body chunk, which the caller bounds.
    pub fn read_range(&self, offset: u64, end: u64) -> io::Result<Vec<u8>> {
        let end = end.min(self.len);
        let want = usize::try_from(end.saturating_sub(offset)).unwrap_or(usize::MAX);
        let mut out = vec![0; want];
        let mut filled = 0;
        while filled < want {
            let at = offset + filled as u64;
            match self.read_at(at, out.get_mut(filled..).unwrap_or_default())? {
                0 => break,
                n => filled += n,
            }
        }
        out.truncate(filled);
        Ok(out)
    }
}

/// `state_dir/spool`, created (mode 0700) if missing; its path for [`Held::new`].
pub fn spool_dir(state_dir: &Path) -> io::Result<PathBuf> {
    let dir = state_dir.join(SPOOL);
    DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    Ok(dir)
}

/// A file in `dir` that has no name: `O_TMPFILE`, or a fresh name unlinked at once where the
/// file system cannot make one without.
fn unnamed_file(dir: &Path) -> io::Result<File> {
    let flags =
        rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC;
    match rustix::fs::open(dir, flags, rustix::fs::Mode::from_raw_mode(0o600)) {
        Ok(fd) => return Ok(File::from(fd)),
        // EOPNOTSUPP / EISDIR: the file system has no O_TMPFILE; anything else is real.
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::ISDIR => {}
        Err(e) => return Err(e.into()),
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = dir.join(format!(
        ".held-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&name)?;
    std::fs::remove_file(&name)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tarmac-held-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn read_all(held: &Held) -> Vec<u8> {
        held.read_range(0, held.len()).unwrap()
    }

    #[test]
    fn a_small_message_stays_in_memory() {
        let dir = temp_dir("small");
        let mut held = Held::new(16, dir.join("spool-not-made"));
        held.append(b"Subject: a\r\n").unwrap();
        held.append(b"\r\nhi").unwrap();
        assert!(!held.is_spooled());
        assert_eq!(held.len(), 16);
        assert_eq!(read_all(&held), b"Subject: a\r\n\r\nhi");
        assert!(
            !dir.join("spool-not-made").exists(),
            "nothing touched the disk"
        );
    }

    #[test]
    fn past_spool_after_the_message_moves_to_a_file_without_a_name() {
        let state = temp_dir("spill");
        let dir = spool_dir(&state).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&dir).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o700);
        let mut held = Held::new(8, dir.clone());
        let mut expected = Vec::new();
        for i in 0..100u32 {
            let chunk = format!("line {i}\r\n");
            held.append(chunk.as_bytes()).unwrap();
            expected.extend_from_slice(chunk.as_bytes());
        }
        assert!(held.is_spooled());
        assert_eq!(held.len(), expected.len() as u64);
        assert_eq!(read_all(&held), expected);
        assert_eq!(held.read_range(5, 11).unwrap(), b"0\r\nlin");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "the spool stays empty"
        );
        let mut buf = [0; 4];
        assert_eq!(held.read_at(held.len(), &mut buf).unwrap(), 0);
        std::fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn a_missing_spool_directory_is_an_error_not_a_panic() {
        let mut held = Held::new(1, PathBuf::from("/nonexistent/tarmac/spool"));
        assert!(held.append(b"ab").is_err());
    }
}
