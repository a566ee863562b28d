//! The one rule of direction (docs/architecture.md), checked: below `app` and `http`, no
//! module imports either of them or names `AppState`. Only `main`, `cli`, `lib` (which
//! re-exports the app for tests and `main`), `app` and `http/` may.

use std::path::{Path, PathBuf};

/// Files allowed to reach `app` and `http`, relative to `src/`.
const ABOVE: &[&str] = &["main.rs", "lib.rs", "cli.rs", "app.rs", "http/"];
const UPWARD: &[&str] = &[
    "crate::app",
    "crate::http",
    "AppState",
    "super::app",
    "super::http",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `(file, line)` of every upward reference below the top layers of `src`.
fn upward_references(src: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let rel = file
            .strip_prefix(src)
            .map(|p| p.to_string_lossy().replace('\\', "/"))
            .unwrap_or_default();
        if ABOVE
            .iter()
            .any(|a| rel == *a || (a.ends_with('/') && rel.starts_with(a)))
        {
            continue;
        }
        // This file names the patterns it looks for.
        if rel == "layering.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            if UPWARD.iter().any(|u| code.contains(u)) {
                found.push((rel.clone(), line.trim().to_string()));
            }
        }
    }
    found
}

#[test]
fn nothing_below_app_and_http_reaches_up() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = upward_references(&src);
    assert!(found.is_empty(), "upward references: {found:#?}");
}

#[test]
fn the_check_sees_an_upward_import() {
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("runner");
    std::fs::create_dir_all(&services).unwrap();
    std::fs::write(services.join("mod.rs"), "use crate::app::AppState;\n").unwrap();
    std::fs::write(dir.path().join("app.rs"), "use crate::http::router;\n").unwrap();
    std::fs::write(
        dir.path().join("util.rs"),
        "// crate::http is named here only\n",
    )
    .unwrap();
    let found = upward_references(dir.path());
    assert_eq!(
        found,
        [(
            "runner/mod.rs".to_string(),
            "use crate::app::AppState;".to_string()
        )]
    );
}
