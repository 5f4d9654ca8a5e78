//! Reading the operator's files: the error of a policy file (lists, rules), one bad line of one
//! file, which the config loader that read the files turns into its own `path:line: key:
//! message` error; and what every TOML reader of the crate (the rule files, the config file)
//! needs: the line of a byte offset (`Lines`) and the typed accessors of a value, each
//! failing with the message the operator sees.

use std::fmt;
use std::path::PathBuf;

use toml::Spanned;
use toml::de::DeValue;

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

/// Where each line of a text starts, so a byte offset (a TOML span's) becomes a 1-based line.
#[derive(Clone, Debug)]
pub(crate) struct Lines {
    /// Byte offset where each line starts; `starts[0] == 0`.
    starts: Vec<usize>,
}

impl Lines {
    /// The line starts of `text`.
    pub(crate) fn new(text: &str) -> Lines {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i.saturating_add(1)))
            .collect();
        Lines { starts }
    }

    /// 1-based line holding byte `offset`.
    pub(crate) fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|&start| start <= offset)
    }

    /// Byte offset where 1-based `line` starts (line 0 is taken as 1); `None` past the last
    /// line.
    pub(crate) fn start(&self, line: usize) -> Option<usize> {
        self.starts.get(line.saturating_sub(1)).copied()
    }
}

/// "expected `what`, found" and the type of `v`: the message of a value of the wrong type.
pub(crate) fn expected(what: &str, v: &DeValue<'_>) -> String {
    format!("expected {what}, found {}", v.type_str())
}

/// The string `v` holds, or "expected `what`, found …".
pub(crate) fn string<'v>(v: &'v DeValue<'_>, what: &str) -> Result<&'v str, String> {
    v.as_str().ok_or_else(|| expected(what, v))
}

/// The items of `[[name]]`, an array of tables (each still to be checked for a table), or what
/// is wrong with `v`; `[name]` written with single brackets gets the fix, "one table per
/// `each`".
pub(crate) fn array_of_tables<'a, 'v>(
    v: &'a DeValue<'v>,
    name: &str,
    each: &str,
) -> Result<&'a [Spanned<DeValue<'v>>], String> {
    match v {
        DeValue::Array(items) => Ok(items),
        DeValue::Table(_) => Err(format!(
            "expected an array of tables; write [[{name}]] with double brackets, one table per \
             {each}"
        )),
        other => Err(expected(&format!("an array of tables ([[{name}]])"), other)),
    }
}

/// The boolean `v` holds.
pub(crate) fn boolean(v: &DeValue<'_>) -> Result<bool, String> {
    v.as_bool().ok_or_else(|| expected("true or false", v))
}

/// The integer `v` holds, as an `i128`; callers check the range their field allows.
pub(crate) fn integer(v: &DeValue<'_>) -> Result<i128, String> {
    let Some(n) = v.as_integer() else {
        return Err(expected("an integer", v));
    };
    // TOML integers are 64-bit, so i128 always holds them; the fallback is for form's sake.
    i128::from_str_radix(n.as_str(), n.radix())
        .map_err(|_| format!("integer {} is out of range", n.as_str()))
}

/// The option whose name `v` holds; a name not in `options` is "unknown `noun` …", listing them.
pub(crate) fn choice<T: Copy>(
    v: &DeValue<'_>,
    options: &[(&str, T)],
    noun: &str,
) -> Result<T, String> {
    let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
    let s = string(v, &format!("one of: {}", names.join(", ")))?;
    options
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            format!(
                "unknown {noun} {s:?}; expected one of: {}",
                names.join(", ")
            )
        })
}
