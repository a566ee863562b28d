//! The documentation a newcomer reads from a clone: `docs/api.md`'s route table lists
//! exactly what `/openapi.json` documents, and the README and docs link only to files that
//! exist in the repository.

use std::collections::BTreeSet;
use std::path::Path;

use crate::harness::{openapi_doc, repo_root, TestServer};

/// `(METHOD, /path)` of each row of the table whose first cells are `` `GET` | `/x` ``.
fn documented_routes(markdown: &str) -> BTreeSet<(String, String)> {
    markdown
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let method = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let path = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
            (method.chars().all(|c| c.is_ascii_uppercase()) && path.starts_with('/'))
                .then(|| (method.to_string(), path.to_string()))
        })
        .collect()
}

#[tokio::test]
async fn the_api_reference_lists_every_route_of_openapi_json() {
    let s = TestServer::start().await;
    let doc = openapi_doc(&s).await;
    let served: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_ascii_uppercase(), path.clone()))
        })
        .collect();
    let markdown = std::fs::read_to_string(repo_root().join("docs/api.md")).unwrap();
    let documented = documented_routes(&markdown);
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/api.md misses {missing:?} and lists {extra:?} that /openapi.json does not have"
    );
}

/// The targets of `[text](target)` links (and `![alt](target)` images) in `markdown`.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = markdown;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].to_string());
        }
    }
    out
}

#[test]
fn the_readme_and_docs_link_only_inside_the_repository() {
    let root = repo_root().canonicalize().unwrap();
    let mut files = vec![root.join("README.md"), root.join("tests/stubs/README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "md") {
            files.push(entry.path());
        }
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap();
        for target in link_targets(&text) {
            let path = target.split('#').next().unwrap();
            assert!(
                !target.contains("://") && !target.starts_with("mailto:"),
                "{} links outside the repository: {target}",
                file.display()
            );
            if path.is_empty() {
                continue; // an anchor in the same file
            }
            let resolved = dir.join(path).canonicalize().unwrap_or_else(|_| {
                panic!("{} links to {target}, which does not exist", file.display())
            });
            assert!(
                resolved.starts_with(&root) && Path::new(&resolved).exists(),
                "{} links to {target}, outside the repository",
                file.display()
            );
        }
    }
}

#[test]
fn the_route_table_parser_reads_rows() {
    let routes = documented_routes("| `GET` | `/a/{id}` | x |\n| status | code |\n| `x` | `/y` |");
    assert_eq!(routes.len(), 1);
    assert!(routes.contains(&("GET".to_string(), "/a/{id}".to_string())));
}
