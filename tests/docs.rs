//! The operator's two references must not drift (issue 16 item 7): every key that
//! `examples/tarmac.toml` shows (set, or commented out as `# key = ...`) has a row in
//! `docs/configuration.md`'s table for its section, and every row there is shown in the
//! example. (That the example itself parses is `tests/cli.rs`'s check of the shipped file.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Keys = BTreeMap<String, BTreeSet<String>>;

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `[section]` or `[[section]]` → `section`.
fn section_name(line: &str) -> Option<&str> {
    let inner = line.strip_prefix('[')?.strip_suffix(']')?;
    let inner = inner.strip_prefix('[').unwrap_or(inner);
    let inner = inner.strip_suffix(']').unwrap_or(inner);
    inner
        .chars()
        .all(|c| c.is_ascii_lowercase() || c == '_')
        .then_some(inner)
}

/// A TOML key at the start of `line` (`key = ...`, `key=...`), or `None`.
fn key_of(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim_end();
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then_some(key)
}

/// The example's keys by section: set ones, and ones commented out as `# key = value` (the
/// example's way of showing a key without a default).
fn example_keys(text: &str) -> Keys {
    let mut keys = Keys::new();
    let mut section = None;
    for line in text.lines() {
        // A section shown commented out (`# [[dnsbl]]`) is a section too.
        let header = line.strip_prefix("# ").unwrap_or(line).trim();
        if let Some(name) = section_name(header) {
            section = Some(name.to_owned());
            keys.entry(name.to_owned()).or_default();
            continue;
        }
        let Some(section) = &section else { continue };
        let code = line.strip_prefix("# ").unwrap_or(line);
        if let Some(key) = key_of(code) {
            keys.entry(section.clone())
                .or_default()
                .insert(key.to_owned());
        }
    }
    keys
}

/// The documentation's keys by section: the rows of the `| Key | Type | Default | Meaning |`
/// tables under each ``## `[section]` `` heading (other tables, such as the rule files' own
/// keys, are not the configuration's).
fn documented_keys(text: &str) -> Keys {
    let mut keys = Keys::new();
    let mut section = None;
    let mut in_key_table = false;
    for line in text.lines() {
        if line.starts_with("| Key | Type | Default | Meaning |") {
            in_key_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_key_table = false;
        }
        if let Some(heading) = line.strip_prefix("## ") {
            section = heading
                .strip_prefix('`')
                .and_then(|h| h.strip_suffix('`'))
                .and_then(section_name)
                .map(str::to_owned);
            if let Some(name) = &section {
                keys.entry(name.clone()).or_default();
            }
            continue;
        }
        let Some(section) = section.as_ref().filter(|_| in_key_table) else {
            continue;
        };
        let Some(rest) = line.strip_prefix("| `") else {
            continue;
        };
        if let Some((key, _)) = rest.split_once("` |")
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            keys.entry(section.clone())
                .or_default()
                .insert(key.to_owned());
        }
    }
    keys
}

#[test]
fn the_example_and_the_configuration_reference_list_the_same_keys() {
    let example = example_keys(&read("examples/tarmac.toml"));
    let documented = documented_keys(&read("docs/configuration.md"));
    assert!(
        example
            .get("server")
            .is_some_and(|keys| keys.contains("listen")),
        "the example's reader found no keys: {example:?}"
    );
    let mut drift = Vec::new();
    let sections: BTreeSet<&String> = example.keys().chain(documented.keys()).collect();
    for section in sections {
        let empty = BTreeSet::new();
        let shown = example.get(section).unwrap_or(&empty);
        let described = documented.get(section).unwrap_or(&empty);
        for key in shown.difference(described) {
            drift.push(format!(
                "[{section}] {key}: in examples/tarmac.toml, not in docs/configuration.md"
            ));
        }
        for key in described.difference(shown) {
            drift.push(format!(
                "[{section}] {key}: in docs/configuration.md, not in examples/tarmac.toml"
            ));
        }
    }
    assert!(
        drift.is_empty(),
        "the references drifted:\n{}",
        drift.join("\n")
    );
}

#[test]
fn the_readers_see_keys_in_both_shapes() {
    let example = example_keys(
        "[server]\nlisten = []\n# hostname = \"x\"\n# Prose = not a key\n# [[dnsbl]]\n# zone = \"z\"\n",
    );
    assert_eq!(
        example["server"],
        BTreeSet::from(["hostname".to_owned(), "listen".to_owned()])
    );
    assert_eq!(example["dnsbl"], BTreeSet::from(["zone".to_owned()]));
    let documented = documented_keys(
        "## `[server]`\n| Key | Type | Default | Meaning |\n|---|---|\n| `listen` | x |\n\n| Key | Meaning |\n| `sub` | x |\n## Values\n| Key | Type | Default | Meaning |\n| `later` | x |\n## `[[dnsbl]]`\n| Key | Type | Default | Meaning |\n| `zone` | x |\n",
    );
    assert_eq!(documented["server"], BTreeSet::from(["listen".to_owned()]));
    assert_eq!(documented["dnsbl"], BTreeSet::from(["zone".to_owned()]));
    assert_eq!(
        documented.len(),
        2,
        "rows outside a section heading are not keys"
    );
}
