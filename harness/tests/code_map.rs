//! `docs/ARCHITECTURE.md`'s code map names every source file, or a folder
//! that holds it, so a newcomer can trust it as the map of the repository.
//! A row may name files by their full path or, after one full path, by a
//! bare name in the same folder (`withdrawal.rs`, `provider.rs`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// Every Rust, proto and SQL source file of the workspace's crates.
fn sources(dir: &Path, out: &mut Vec<String>) {
    let root = root();
    for entry in std::fs::read_dir(dir).expect("readable") {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                sources(&path, out);
            }
        } else if [".rs", ".proto", ".sql"].iter().any(|e| name.ends_with(e)) {
            let rel = path
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .to_string();
            // Only crates' own sources: build scripts name themselves.
            if ["/src/", "/tests/", "/proto/", "/migrations/"]
                .iter()
                .any(|d| rel.contains(d))
            {
                out.push(rel);
            }
        }
    }
}

/// What the code map names: full paths, folders (ending in `/`), brace
/// groups expanded, and bare names joined to their row's first folder.
fn named(map: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for row in map.lines().filter(|l| l.starts_with("| `")) {
        let first_cell = row.split(" | ").next().unwrap_or("");
        let mut folder = String::new();
        for quoted in first_cell.split('`').skip(1).step_by(2) {
            for path in expand(quoted) {
                if path.contains('/') {
                    folder = match path.rfind('/') {
                        Some(i) if !path.ends_with('/') => path[..=i].to_string(),
                        _ => path.clone(),
                    };
                    names.insert(path);
                } else {
                    names.insert(format!("{folder}{path}"));
                }
            }
        }
    }
    names
}

/// `a/{b,c}/d` → `a/b/d`, `a/c/d`; `a/*/d` stands for any one folder.
fn expand(p: &str) -> Vec<String> {
    match (p.find('{'), p.find('}')) {
        (Some(i), Some(j)) if i < j => p[i + 1..j]
            .split(',')
            .flat_map(|alt| expand(&format!("{}{alt}{}", &p[..i], &p[j + 1..])))
            .collect(),
        _ => vec![p.to_string()],
    }
}

fn covered(file: &str, names: &BTreeSet<String>) -> bool {
    names.iter().any(|n| {
        if n == file {
            return true;
        }
        // A folder, written with or without its trailing slash.
        if n.ends_with('/') || root().join(n).is_dir() {
            return file.starts_with(&format!("{}/", n.trim_end_matches('/')));
        }
        // `cell/migrations/*/0003_money.sql`
        if let Some((head, tail)) = n.split_once("/*/") {
            return file.starts_with(head)
                && file.ends_with(tail)
                && file[head.len() + 1..file.len() - tail.len()]
                    .matches('/')
                    .count()
                    == 1;
        }
        false
    })
}

#[test]
fn the_code_map_names_every_source_file() {
    let root = root();
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).expect("docs");
    let names = named(&doc);
    let mut files = Vec::new();
    for krate in [
        "cell",
        "common",
        "control-plane",
        "proto",
        "region-router",
        "harness",
        "bench",
    ] {
        sources(&root.join(krate), &mut files);
    }
    assert!(files.len() > 100, "found only {} files", files.len());
    let missing: Vec<&String> = files.iter().filter(|f| !covered(f, &names)).collect();
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md's code map does not name these files or their folders:\n{}",
        missing
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // And names nothing that is gone.
    let gone: Vec<&String> = names
        .iter()
        .filter(|n| !n.contains('*') && !root.join(n.as_str()).exists())
        .collect();
    assert!(
        gone.is_empty(),
        "the code map names what is not there: {gone:?}"
    );
}

/// Only `cell/src/db/` knows which database a cell runs on: a store writes
/// `stmt(…)` and runs it, and nothing else in the cell matches a backend,
/// reaches a pool or builds an sqlx query itself (ARCHITECTURE.md, "One SQL
/// text for both backends").
#[test]
fn only_the_datastore_knows_the_backend() {
    let root = root();
    let mut files = Vec::new();
    sources(&root.join("cell/src"), &mut files);
    const BACKEND: &[&str] = &[
        "Datastore::Sqlite",
        "Datastore::Postgres",
        "SqlitePool",
        "PgPool",
        "sqlx::query",
        "sqlx::raw_sql",
        "QueryBuilder",
        "SQLITE_WRITER",
        "#[macro_export]",
    ];
    let mut found = Vec::new();
    for f in files.iter().filter(|f| !f.starts_with("cell/src/db/")) {
        let text = std::fs::read_to_string(root.join(f)).expect("readable");
        for (n, line) in text.lines().enumerate() {
            if let Some(word) = BACKEND.iter().find(|w| line.contains(**w)) {
                found.push(format!("{f}:{}: {word}", n + 1));
            }
        }
    }
    assert!(files.len() > 40, "found only {} files", files.len());
    assert!(
        found.is_empty(),
        "backend code outside cell/src/db/:\n{}",
        found.join("\n")
    );
}
