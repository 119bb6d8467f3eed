//! The crate's layers, read from its source: the arrows point down.
//!
//! - The actors form no circle: each holds its peers as `Recipient`s of
//!   the messages in `actors/messages.rs`, never another actor's type.
//! - `config` is plain data: it imports nothing from the layers above it.
//! - A concrete backend (embedded, kafka, sqs) is named only inside
//!   `src/backends/` and in the one file that wires the service together,
//!   `src/service.rs`. Elsewhere code asks for a capability (a trait in
//!   `backends/mod.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// Every `.rs` file under `dir`, with its path relative to `src/`.
fn rust_files(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p: PathBuf = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p
                    .strip_prefix(SRC)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The file's code without comments (line comments and doc comments), and
/// without its `#[cfg(test)]` module at the end.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap();
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers in `code`, in order.
fn words(code: &str) -> Vec<&str> {
    code.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect()
}

/// The paths in `code` that start with `start` (e.g. `crate` or `super`),
/// as their segments: `crate::backends::kafka::KafkaDlq` gives
/// `["backends", "kafka", "KafkaDlq"]`. A `use a::{b, c::d}` gives the
/// first segment after the brace too.
fn paths<'a>(code: &'a str, start: &str) -> Vec<Vec<&'a str>> {
    let mut out = Vec::new();
    let pat = format!("{start}::");
    let mut rest = code;
    while let Some(i) = rest.find(&pat) {
        let before = rest[..i].chars().last();
        rest = &rest[i + pat.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let mut segs = Vec::new();
        let mut s = rest;
        loop {
            let s2 = s.trim_start_matches('{').trim_start();
            let end = s2
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(s2.len());
            if end == 0 {
                break;
            }
            segs.push(&s2[..end]);
            s = &s2[end..];
            if !s.starts_with("::") {
                break;
            }
            s = &s[2..];
            if s.starts_with('{') {
                // A group: take each first segment inside it.
                let close = s.find('}').unwrap_or(s.len());
                for item in s[1..close].split(',') {
                    let item = item.trim();
                    let end = item
                        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .unwrap_or(item.len());
                    if end > 0 {
                        let mut g = segs.clone();
                        g.push(&item[..end]);
                        out.push(g);
                    }
                }
                segs.clear();
                break;
            }
        }
        if !segs.is_empty() {
            out.push(segs);
        }
    }
    out
}

#[test]
fn the_actors_form_no_circle() {
    let actors = rust_files(&Path::new(SRC).join("actors"));
    let modules: BTreeSet<String> = actors
        .iter()
        .map(|(f, _)| {
            f.trim_start_matches("actors/")
                .trim_end_matches(".rs")
                .to_string()
        })
        .filter(|m| m != "mod")
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, text) in &actors {
        let from = file.trim_start_matches("actors/").trim_end_matches(".rs");
        if from == "mod" {
            continue;
        }
        let code = code(text);
        let mut to = BTreeSet::new();
        for p in paths(&code, "super") {
            to.insert(p[0].to_string());
        }
        for p in paths(&code, "crate") {
            if p[0] == "actors" && p.len() > 1 {
                to.insert(p[1].to_string());
            }
        }
        to.retain(|m| modules.contains(m) && m != from);
        edges.insert(from.to_string(), to);
    }
    assert!(
        edges.values().any(|to| !to.is_empty()),
        "the parser found no arrows among the actors at all: {edges:?}"
    );
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut circle = path[i..].to_vec();
            circle.push(m.to_string());
            return Some(circle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in edges.keys() {
        if let Some(circle) = visit(m, &edges, &mut Vec::new(), &mut done) {
            panic!(
                "the actors import each other in a circle: {}",
                circle.join(" -> ")
            );
        }
    }
}

/// What `config` may import: the crate's bottom floor only.
const BELOW_CONFIG: [&str; 4] = ["routing", "entry", "stats", "config"];

#[test]
fn config_imports_nothing_above_it() {
    let mut found = Vec::new();
    for (file, text) in rust_files(&Path::new(SRC).join("config")) {
        for p in paths(&code(&text), "crate") {
            if !BELOW_CONFIG.contains(&p[0]) {
                found.push(format!("{file}: crate::{}", p.join("::")));
            }
        }
    }
    assert!(
        found.is_empty(),
        "config imports from above it:\n{}",
        found.join("\n")
    );
}

/// The one file that wires the service together.
const WIRING: &str = "service.rs";

/// The names of the concrete backends: their modules, the enum variants
/// that stand for them, and the types their folders declare (less the
/// names that code outside `src/backends/` declares for itself).
fn concrete_names() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = ["embedded", "kafka", "sqs"]
        .iter()
        .map(|b| format!("backends::{b}"))
        .collect();
    for enum_name in [
        "NamespaceBackend",
        "AnyDlq",
        "AnyConsumer",
        "AnyDelivery",
        "AnyCheckpointer",
    ] {
        for v in ["Embedded", "Kafka", "Sqs", "Composite"] {
            names.insert(format!("{enum_name}::{v}"));
        }
    }
    let declared = |text: &str, public: bool| -> Vec<String> {
        let code = code(text);
        let w = words(&code);
        w.windows(3)
            .filter(|t| {
                (!public || t[0] == "pub") && matches!(t[1], "struct" | "enum" | "trait" | "type")
            })
            .map(|t| t[2].to_string())
            .collect()
    };
    for b in ["embedded", "kafka", "sqs"] {
        for (_, text) in rust_files(&Path::new(SRC).join("backends").join(b)) {
            names.extend(declared(&text, true));
        }
    }
    for (file, text) in rust_files(Path::new(SRC)) {
        if !file.starts_with("backends/") {
            for name in declared(&text, false) {
                names.remove(&name);
            }
        }
    }
    names
}

#[test]
fn concrete_backends_are_named_only_in_backends_and_the_wiring() {
    let names = concrete_names();
    assert!(
        names.contains("EmbeddedLog") && names.contains("KafkaDlq"),
        "{names:?}"
    );
    let mut found: BTreeSet<(String, String)> = BTreeSet::new();
    for (file, text) in rust_files(Path::new(SRC)) {
        if file.starts_with("backends/") || file == WIRING {
            continue;
        }
        let code = code(&text);
        let w: BTreeSet<&str> = words(&code).into_iter().collect();
        for name in &names {
            let named = if name.contains("::") {
                code.contains(name.as_str())
            } else {
                w.contains(name.as_str())
            };
            if named {
                found.insert((file.clone(), name.clone()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "a concrete backend is named outside src/backends/ and {WIRING}; ask for a capability instead: {found:?}"
    );
}
