//! The errors of loading a configuration: one [`ConfigError`] per problem, displayed as
//! `path:line: key: message`, and [`ConfigErrors`], all of a file's problems together. A leaf:
//! nothing else of the crate is needed to build or show one.

use std::fmt;
use std::path::PathBuf;

/// Every error found in one config file, in line order; never empty when returned as an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// One problem in a config file, displayed as `path:line: key: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line of the offending key or value; `None` when the file could not be read.
    pub line: Option<usize>,
    /// Dotted key path (`limits.max_message_size`, `dnsbl[1].weight`); `toml` for a syntax
    /// error; empty when the file could not be read.
    pub key: String,
    /// What is wrong, and the expected form when there is one.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigErrors {
    /// One error per line, no trailing newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
