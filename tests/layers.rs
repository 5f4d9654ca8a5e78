//! No module cycles (issue 14 item 5): the file-level import graph of `src/` has no cycle
//! that leaves one module's own files.
//!
//! Every product file of `src/` is read as text: comments, string and character literals and
//! `#[cfg(test)]` items are dropped, then each path through `crate::`, `super::`, `self::` or a
//! child module the file declares becomes an edge to the file that defines what it names, and
//! a module file has an edge to each child it declares (the child's impls may hold methods the
//! parent calls without naming a path; `lib.rs` is left out, it declares everything). A
//! path that ends in a module file's `pub use` is followed to the file it re-exports, and a
//! file's own `pub use` lines are not edges of that file (they only pass names through). A
//! group of files that reach each other (a strongly connected component) is a cycle unless one
//! of them is the module file of all the others (`config.rs` and `config/document.rs` may use
//! each other; `dns.rs` and `policy/dnsbl.rs` may not). Test code is not product code:
//! `tests.rs` files and `tests/` directories under `src/` are skipped.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// A module path below the crate root, e.g. `["policy", "rules"]`; empty for `lib.rs`.
type ModPath = Vec<String>;

#[derive(Debug, PartialEq, Eq, Clone)]
enum Token {
    Ident(String),
    /// `::`
    Colons,
    Punct(char),
}

/// One product file: its module path, the paths it uses, what it re-exports.
struct File {
    path: PathBuf,
    module: ModPath,
    /// Absolute paths named outside `pub use` lines.
    uses: Vec<ModPath>,
    /// `pub use` lines: exported name → absolute path.
    exports: BTreeMap<String, ModPath>,
}

#[test]
fn no_module_cycles() {
    let cycles = cycles(&read_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
    ));
    assert!(
        cycles.is_empty(),
        "module cycles between files of src/ (issue 14 item 5):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_checker_sees_a_cycle_through_a_re_export_and_allows_a_parent_and_its_child() {
    let file = |path: &str, text: &str| parse_file(PathBuf::from(path), module_of(path), text);
    let files = vec![
        file("lib.rs", "pub mod a; pub mod b;"),
        file(
            "a.rs",
            "mod inner; pub use inner::Thing; fn f() { inner::go() }",
        ),
        file(
            "a/inner.rs",
            "use super::Other; use crate::b::B; // crate::c::C",
        ),
        file(
            "b.rs",
            "use crate::a::{self, Thing}; #[cfg(test)] mod tests { use crate::c; }",
        ),
    ];
    let found = cycles(&files);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("a/inner.rs") && found[0].contains("b.rs"),
        "{found:?}"
    );
    assert!(!found[0].contains("lib.rs"), "{found:?}");
    let parent_child = vec![
        file("lib.rs", "pub mod a;"),
        file("a.rs", "mod inner; fn f() { inner::go() }"),
        file(
            "a/inner.rs",
            "use super::Other; const S: &str = \"crate::b::B\";",
        ),
    ];
    assert_eq!(cycles(&parent_child), Vec::<String>::new());
}

/// Every product `.rs` file under `src`, parsed.
fn read_files(src: &Path) -> Vec<File> {
    let mut paths = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "tests" {
                    dirs.push(path);
                }
            } else if name.ends_with(".rs") && name != "tests.rs" && name != "main.rs" {
                paths.push(path);
            }
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let relative = path
                .strip_prefix(src)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            parse_file(PathBuf::from(&relative), module_of(&relative), &text)
        })
        .collect()
}

/// `policy/rules.rs` and `policy/rules/mod.rs` → `policy::rules`; `lib.rs` → the root.
fn module_of(relative: &str) -> ModPath {
    let stem = relative.trim_end_matches(".rs");
    let mut module: ModPath = stem.split('/').map(str::to_owned).collect();
    if module
        .last()
        .is_some_and(|last| last == "mod" || last == "lib")
    {
        module.pop();
    }
    module
}

fn parse_file(path: PathBuf, module: ModPath, text: &str) -> File {
    let tokens = strip_test_items(&tokenize(text));
    let children: BTreeSet<String> = tokens
        .windows(3)
        .filter_map(|w| match w {
            [Token::Ident(m), Token::Ident(name), Token::Punct(';')] if m == "mod" => {
                Some(name.clone())
            }
            _ => None,
        })
        .collect();
    // A module file depends on the children it declares: their impls may hold the methods it
    // calls, which no path names. Not the crate root, which declares everything.
    let uses = match module.is_empty() {
        true => Vec::new(),
        false => children
            .iter()
            .map(|child| module.iter().chain([child]).cloned().collect())
            .collect(),
    };
    let mut file = File {
        path,
        module,
        uses,
        exports: BTreeMap::new(),
    };
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == Token::Ident("use".into()) {
            let public = i > 0
                && (tokens[i - 1] == Token::Ident("pub".into())
                    || tokens[i - 1] == Token::Punct(')'));
            let end = (i..tokens.len())
                .find(|&j| tokens[j] == Token::Punct(';'))
                .unwrap_or(tokens.len());
            let mut leaves = Vec::new();
            use_tree(&tokens[i + 1..end], Vec::new(), &mut leaves);
            for (segments, name) in leaves {
                let Some(absolute) = absolute(&file.module, &children, &segments) else {
                    continue;
                };
                if public {
                    file.exports.insert(name, absolute);
                } else {
                    file.uses.push(absolute);
                }
            }
            i = end + 1;
            continue;
        }
        if let Token::Ident(first) = &tokens[i] {
            let starts_path = tokens.get(i + 1) == Some(&Token::Colons)
                && (i == 0 || tokens[i - 1] != Token::Colons);
            if starts_path {
                let mut segments = vec![first.clone()];
                let mut j = i + 1;
                while tokens.get(j) == Some(&Token::Colons) {
                    let Some(Token::Ident(next)) = tokens.get(j + 1) else {
                        break;
                    };
                    segments.push(next.clone());
                    j += 2;
                }
                if let Some(absolute) = absolute(&file.module, &children, &segments) {
                    file.uses.push(absolute);
                }
                i = j;
                continue;
            }
        }
        i += 1;
    }
    file
}

/// The leaves of a `use` tree as (segments, name it is known by).
fn use_tree(tokens: &[Token], prefix: Vec<String>, out: &mut Vec<(Vec<String>, String)>) {
    let mut segments = prefix;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Ident(word) if word == "as" => {
                if let (Some(Token::Ident(alias)), false) = (tokens.get(i + 1), segments.is_empty())
                {
                    out.push((segments.clone(), alias.clone()));
                }
                return;
            }
            Token::Ident(word) if word == "self" && !segments.is_empty() => {}
            Token::Ident(word) => segments.push(word.clone()),
            Token::Colons => {}
            Token::Punct('*') => {
                out.push((segments.clone(), "*".into()));
                return;
            }
            Token::Punct('{') => {
                let mut depth = 0;
                let mut start = i + 1;
                for j in i..tokens.len() {
                    match tokens[j] {
                        Token::Punct('{') => depth += 1,
                        Token::Punct('}') => depth -= 1,
                        _ => {}
                    }
                    let item_ends = (depth == 1 && tokens[j] == Token::Punct(','))
                        || (depth == 0 && tokens[j] == Token::Punct('}'));
                    if item_ends {
                        if start < j {
                            use_tree(&tokens[start..j], segments.clone(), out);
                        }
                        start = j + 1;
                    }
                    if depth == 0 {
                        break;
                    }
                }
                return;
            }
            Token::Punct(_) => {}
        }
        i += 1;
    }
    if let Some(last) = segments.last() {
        out.push((segments.clone(), last.clone()));
    }
}

/// `segments` from inside `module` as a path from the crate root; `None` for another crate.
fn absolute(module: &ModPath, children: &BTreeSet<String>, segments: &[String]) -> Option<ModPath> {
    let (first, rest) = segments.split_first()?;
    let mut base = match first.as_str() {
        "crate" => Vec::new(),
        "self" => module.clone(),
        "super" => module[..module.len().checked_sub(1)?].to_vec(),
        name if children.contains(name) => {
            let mut base = module.clone();
            base.push(name.to_owned());
            base
        }
        _ => return None,
    };
    let mut rest = rest;
    while rest.first().is_some_and(|s| s == "super") {
        base.pop();
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The file `path` names, following module files' `pub use` re-exports.
fn resolve(files: &BTreeMap<ModPath, &File>, path: &[String], depth: usize) -> Option<ModPath> {
    let found = (0..=path.len())
        .rev()
        .find(|&n| files.contains_key(&path[..n]))?;
    let module = path[..found].to_vec();
    if depth < 8 {
        if let Some(next) = path.get(found) {
            if let Some(target) = files[&module].exports.get(next) {
                let mut target = target.clone();
                target.extend(path[found + 1..].iter().cloned());
                if let Some(resolved) = resolve(files, &target, depth + 1) {
                    return Some(resolved);
                }
            }
        }
    }
    Some(module)
}

/// One line per strongly connected group of files that is no module with its own files,
/// naming the files and one cycle through them.
fn cycles(list: &[File]) -> Vec<String> {
    let files: BTreeMap<ModPath, &File> = list.iter().map(|f| (f.module.clone(), f)).collect();
    let mut edges: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for file in list {
        let targets = edges.entry(file.module.clone()).or_default();
        for path in &file.uses {
            if let Some(target) = resolve(&files, path, 0) {
                if target != file.module {
                    targets.insert(target);
                }
            }
        }
    }
    let mut found = Vec::new();
    for component in components(&edges) {
        let is_one_module = component
            .iter()
            .any(|root| component.iter().all(|m| m.starts_with(root)));
        if component.len() < 2 || is_one_module {
            continue;
        }
        let name = |m: &ModPath| files[m].path.display().to_string();
        let cycle = one_cycle(&edges, &component);
        let cycle: Vec<String> = cycle.iter().map(name).collect();
        let members: Vec<String> = component.iter().map(name).collect();
        found.push(format!(
            "cycle {} (files reaching each other: {})",
            cycle.join(" -> "),
            members.join(", ")
        ));
    }
    found
}

/// Strongly connected components (Kosaraju).
fn components(edges: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<BTreeSet<ModPath>> {
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for start in edges.keys() {
        if !seen.insert(start.clone()) {
            continue;
        }
        let mut stack = vec![(
            start.clone(),
            edges[start].iter().cloned().collect::<Vec<_>>(),
        )];
        while let Some((node, pending)) = stack.last_mut() {
            if let Some(next) = pending.pop() {
                if edges.contains_key(&next) && seen.insert(next.clone()) {
                    let next_edges = edges[&next].iter().cloned().collect();
                    stack.push((next, next_edges));
                }
            } else {
                order.push(node.clone());
                stack.pop();
            }
        }
    }
    let mut reverse: BTreeMap<&ModPath, Vec<&ModPath>> = BTreeMap::new();
    for (from, targets) in edges {
        for to in targets {
            reverse.entry(to).or_default().push(from);
        }
    }
    let mut assigned = BTreeSet::new();
    let mut result = Vec::new();
    for root in order.iter().rev() {
        if !assigned.insert(root.clone()) {
            continue;
        }
        let mut component = BTreeSet::from([root.clone()]);
        let mut stack = vec![root];
        while let Some(node) = stack.pop() {
            for &from in reverse.get(node).into_iter().flatten() {
                if assigned.insert(from.clone()) {
                    component.insert(from.clone());
                    stack.push(from);
                }
            }
        }
        result.push(component);
    }
    result
}

/// A short cycle through two files of the component of which neither holds the other.
fn one_cycle(
    edges: &BTreeMap<ModPath, BTreeSet<ModPath>>,
    component: &BTreeSet<ModPath>,
) -> Vec<ModPath> {
    let unrelated = |a: &ModPath, b: &ModPath| !a.starts_with(b) && !b.starts_with(a);
    let pairs = component
        .iter()
        .flat_map(|a| component.iter().map(move |b| (a, b)));
    for (a, b) in pairs.filter(|(a, b)| unrelated(a, b)) {
        if let (Some(there), Some(back)) =
            (path(edges, component, a, b), path(edges, component, b, a))
        {
            let mut cycle = there;
            cycle.extend(back.into_iter().skip(1));
            return cycle;
        }
    }
    component.iter().cloned().collect()
}

/// A shortest path from `from` to `to` inside `component`, both ends included.
fn path(
    edges: &BTreeMap<ModPath, BTreeSet<ModPath>>,
    component: &BTreeSet<ModPath>,
    from: &ModPath,
    to: &ModPath,
) -> Option<Vec<ModPath>> {
    let mut parent: BTreeMap<&ModPath, &ModPath> = BTreeMap::new();
    let mut queue = VecDeque::from([from]);
    while let Some(node) = queue.pop_front() {
        if node == to {
            let mut path = vec![to.clone()];
            while let Some(&p) = parent.get(&path[path.len() - 1]) {
                path.push(p.clone());
            }
            path.reverse();
            return Some(path);
        }
        for next in &edges[node] {
            if component.contains(next) && next != from && !parent.contains_key(next) {
                parent.insert(next, node);
                queue.push_back(next);
            }
        }
    }
    None
}

/// Tokens of `text` without comments, string and character literals.
fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if (c == 'r' || c == 'b')
            && (i == 0 || !is_ident(chars[i - 1]))
            && raw_string_hashes(&chars[i..]).is_some()
        {
            let (skip, hashes) = raw_string_hashes(&chars[i..]).unwrap();
            i += skip;
            let close: Vec<char> = std::iter::once('"')
                .chain("#".repeat(hashes).chars())
                .collect();
            while i < chars.len() && !chars[i..].starts_with(&close) {
                i += 1;
            }
            i += close.len();
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
            }
        } else if is_ident(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c == ':' && next == Some(':') {
            tokens.push(Token::Colons);
            i += 2;
        } else {
            if !c.is_whitespace() {
                tokens.push(Token::Punct(c));
            }
            i += 1;
        }
    }
    tokens
}

/// For a raw (byte) string start such as `r#"`: the characters up to the text, and the `#`s.
fn raw_string_hashes(chars: &[char]) -> Option<(usize, usize)> {
    let mut i = usize::from(chars.first() == Some(&'b'));
    if chars.get(i) != Some(&'r') {
        return None;
    }
    i += 1;
    let hashes = chars[i..].iter().take_while(|&&c| c == '#').count();
    (chars.get(i + hashes) == Some(&'"')).then_some((i + hashes + 1, hashes))
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `tokens` without the items marked `#[cfg(test)]`.
fn strip_test_items(tokens: &[Token]) -> Vec<Token> {
    let marker = [
        Token::Punct('#'),
        Token::Punct('['),
        Token::Ident("cfg".into()),
        Token::Punct('('),
        Token::Ident("test".into()),
        Token::Punct(')'),
        Token::Punct(']'),
    ];
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if !tokens[i..].starts_with(&marker) {
            out.push(tokens[i].clone());
            i += 1;
            continue;
        }
        // Skip the item: to its `;` or to the `}` closing its first `{`, brackets balanced.
        i += marker.len();
        let mut depth = 0i32;
        while i < tokens.len() {
            match tokens[i] {
                Token::Punct('{' | '(' | '[') => depth += 1,
                Token::Punct('}' | ')' | ']') => {
                    depth -= 1;
                    if depth == 0 && tokens[i] == Token::Punct('}') {
                        i += 1;
                        break;
                    }
                }
                Token::Punct(';') if depth == 0 => {
                    i += 1;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
    }
    out
}
