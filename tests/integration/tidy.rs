//! Tidy checks over the source text (rust-analyzer's `tidy.rs`): the module graph has
//! no cycles beyond an explicit allow-list that may only shrink, leaf modules stay
//! leaves, `anyhow` stays at the edges, and every file opens with a `//!` line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Edges that still close a cycle. Empty: `js`, `worker` and `realtime` reach the rest
/// of the server through narrow `Env` traits of their own, which `services` (the
/// composition of the lower modules) implements. Never add an entry: break the cycle.
const ALLOWED_BACK_EDGES: &[(&str, &str)] = &[];

/// What each of these modules may depend on, at most.
const LAYERS: &[(&str, &[&str])] = &[
    ("job", &[]),
    // `metrics` holds the latency histograms: a leaf like `job`.
    ("metrics", &[]),
    ("store", &["job", "metrics"]),
    ("apps", &["store"]),
    ("js", &["apps", "job", "store"]),
    ("realtime", &["js", "store"]),
    (
        "worker",
        &["apps", "job", "js", "metrics", "realtime", "store"],
    ),
    // The composition: everything below the HTTP server and the start-up root.
    (
        "services",
        &["apps", "js", "metrics", "realtime", "store", "worker"],
    ),
];

/// Files that may use `anyhow`: the binary and the start-up and CLI edges.
const ANYHOW_EDGES: &[&str] = &["main.rs", "app.rs", "cli.rs"];

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `(path relative to src/, text)` of every source file.
fn sources() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&src)
                .expect("under src")
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&p).expect("read source");
            (rel, text)
        })
        .collect()
}

/// The text without comments (whole comment lines and trailing ` // ...`), so doc
/// links do not count as dependencies.
fn code_of(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| l.split(" // ").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Top-level modules a piece of code names: `crate::x::...` and each name of
/// `crate::{x::..., y}`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(is_ident) {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(first_ident(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            out.insert(first_ident(&item));
        } else {
            out.insert(first_ident(rest));
        }
    }
    out.remove("");
    out
}

fn first_ident(s: &str) -> String {
    s.trim_start()
        .chars()
        .take_while(|c| is_ident(*c))
        .collect()
}

/// Crate-level module → the modules it names (lib.rs and main.rs are the root).
fn module_graph() -> Graph {
    let mut g = Graph::new();
    for (rel, text) in sources() {
        if rel == "lib.rs" || rel == "main.rs" {
            continue;
        }
        let module = rel
            .split('/')
            .next()
            .unwrap_or(&rel)
            .trim_end_matches(".rs")
            .to_string();
        let deps = g.entry(module.clone()).or_default();
        for dep in crate_refs(&code_of(&text)) {
            if dep != module {
                deps.insert(dep);
            }
        }
    }
    g
}

/// A cycle of `g` as a path `a -> b -> ... -> a`, if there is one.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &Graph,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut done, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[test]
fn module_graph_has_no_cycles() {
    let mut g = module_graph();
    let shown: Vec<String> = g
        .iter()
        .map(|(m, d)| {
            format!(
                "  {m} -> {}",
                d.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    let shown = shown.join("\n");
    for (from, to) in ALLOWED_BACK_EDGES {
        let removed = g.get_mut(*from).is_some_and(|d| d.remove(*to));
        assert!(
            removed,
            "{from} -> {to} is gone: remove it from ALLOWED_BACK_EDGES\n{shown}"
        );
    }
    if let Some(cycle) = find_cycle(&g) {
        panic!(
            "module cycle: {}\n(each edge is a `crate::` path in the first module's files)\n{shown}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn leaf_modules_stay_leaves() {
    let g = module_graph();
    for (module, allowed) in LAYERS {
        let deps = g.get(*module).cloned().unwrap_or_default();
        let extra: Vec<&String> = deps
            .iter()
            .filter(|d| !allowed.contains(&d.as_str()))
            .collect();
        assert!(
            extra.is_empty(),
            "{module} may depend on {allowed:?} only, but names {extra:?}"
        );
    }
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let g = |edges: &[(&str, &str)]| {
        let mut g = Graph::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&g(&[("a", "b"), ("b", "c"), ("a", "c")])), None);
    let cycle = find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])).expect("a cycle");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4, "{cycle:?}");
    let refs = crate_refs("use crate::{js::{self, Host}, store::Error};\nlet x = crate::worker::spawn;\nfoo_crate::http::x");
    assert_eq!(refs, ["js", "store", "worker"].map(String::from).into());
}

#[test]
fn anyhow_stays_at_the_edges() {
    for (rel, text) in sources() {
        if ANYHOW_EDGES.contains(&rel.as_str()) {
            continue;
        }
        assert!(
            !code_of(&text).contains("anyhow"),
            "src/{rel} uses anyhow: library code returns its boundary's error enum"
        );
    }
}

#[test]
fn every_source_file_says_what_it_owns() {
    for (rel, text) in sources() {
        assert!(
            text.starts_with("//!"),
            "src/{rel} must open with a `//!` line saying what it owns"
        );
    }
}
