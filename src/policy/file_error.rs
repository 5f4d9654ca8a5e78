//! The error of the operator's policy files (lists, rules): one bad line of one file. The config
//! loader that read the files turns each into its own `path:line: key: message` error.

use std::fmt;
use std::path::PathBuf;

/// One problem in a list or rule file, displayed as `path:line: key: message` (`path:line:
/// message` when the key is empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    /// The file, as the caller named it.
    pub path: PathBuf,
    /// 1-based line of the offending entry, key or value.
    pub line: usize,
    /// Dotted key path in a rule file (`rule[2].when.helo`, `toml` for a syntax error); empty
    /// in a list file.
    pub key: String,
    /// What is wrong, and the expected form when there is one.
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)?;
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for FileError {}
