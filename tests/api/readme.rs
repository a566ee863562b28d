//! The README's snippets, executed: every fenced block whose info string is `sh test` or
//! `python test` runs (bash, python3) against a live server with the stub CLIs, reading
//! `CLAWDFORGE_URL`, `ADMIN_BOOTSTRAP_TOKEN` and `TOKEN` from the environment as a person
//! pasting it would. It must exit 0, and when an `output` block follows it, print that
//! output, where `…` stands for any text (ids, timings, fields not shown). Blocks marked
//! `python test sdk` run in .venv-tests, which holds the pinned official `openai` and
//! `anthropic` SDKs (scripts/install-sdk-tests.sh).

use std::process::Stdio;
use std::time::Duration;

use crate::harness::{repo_root, TestServer, ADMIN};

/// What the stub `claude` answers, so the README can show a real-looking result.
const HERBS: &str = r#"["basil","thyme","sage"]"#;

#[derive(Debug)]
struct Snippet {
    lang: String,
    /// Needs the official SDKs (runs in .venv-tests).
    sdk: bool,
    code: String,
    /// The `output` block after it, if any.
    expected: Option<String>,
    line: usize,
}

/// The fenced blocks marked `test`, each with the `output` block that follows it (before
/// the next marked block).
fn snippets(markdown: &str) -> Vec<Snippet> {
    let mut out: Vec<Snippet> = Vec::new();
    let mut lines = markdown.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let words: Vec<&str> = info.split_whitespace().collect();
        let body: Vec<&str> = lines
            .by_ref()
            .map(|(_, l)| l)
            .take_while(|l| !l.starts_with("```"))
            .collect();
        let body = body.join("\n");
        match words.as_slice() {
            [lang, rest @ ..] if rest.contains(&"test") => out.push(Snippet {
                lang: lang.to_string(),
                sdk: rest.contains(&"sdk"),
                code: body,
                expected: None,
                line: n + 1,
            }),
            ["output"] => {
                if let Some(last) = out.last_mut().filter(|s| s.expected.is_none()) {
                    last.expected = Some(body);
                }
            }
            _ => {}
        }
    }
    out
}

/// Whether `actual` is `pattern` with each `…` standing for any text (possibly none).
fn matches(pattern: &str, actual: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    let (first, rest) = parts.split_first().expect("split yields one part at least");
    let Some(mut tail) = actual.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return tail.is_empty();
    };
    for part in middle {
        match tail.find(part) {
            Some(i) => tail = &tail[i + part.len()..],
            None => return false,
        }
    }
    tail.ends_with(last)
}

#[test]
fn the_matcher_reads_ellipses_as_anything() {
    assert!(matches("a…c", "abbbc"));
    assert!(matches("a…c", "ac"));
    assert!(matches(
        r#"{"id":"tok_…","n":…}"#,
        r#"{"id":"tok_12","n":3}"#
    ));
    assert!(!matches("a…c", "abd"));
    assert!(!matches("abc", "abcd"));
    assert!(matches("…", "anything"));
    let found = snippets("x\n```sh test\necho hi\n```\ntext\n```output\nhi\n```\n```sh\nno\n```\n");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].code, "echo hi");
    assert_eq!(found[0].expected.as_deref(), Some("hi"));
}

#[tokio::test]
async fn readme_snippets_run_against_a_live_server() {
    let python_ok = std::process::Command::new("python3")
        .args(["-c", "import requests"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        python_ok,
        "python3 cannot import requests: run scripts/test.sh (it installs it), or `pip install requests`"
    );

    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let found = snippets(&readme);
    for lang in ["sh", "python"] {
        assert!(
            found.iter().any(|s| s.lang == lang),
            "the README has no `{lang} test` block"
        );
    }
    let s = TestServer::start_with(|c| {
        c.child_env_overrides
            .push(("CLAUDE_STUB_RESULT".into(), HERBS.into()));
    })
    .await;
    let (_, token) = s.mint("readme").await;

    for snippet in &found {
        let venv = repo_root().join(".venv-tests/bin/python");
        let (program, flag) = match snippet.lang.as_str() {
            "sh" => ("bash".as_ref(), "-c"),
            "python" if snippet.sdk => (venv.as_os_str(), "-c"),
            "python" => ("python3".as_ref(), "-c"),
            other => panic!("README line {}: no runner for {other}", snippet.line),
        };
        let run = tokio::process::Command::new(program)
            .arg(flag)
            .arg(&snippet.code)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", s.dir.path())
            .env("CLAWDFORGE_URL", &s.url)
            .env("ADMIN_BOOTSTRAP_TOKEN", ADMIN)
            .env("TOKEN", &token)
            .stdin(Stdio::null())
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .unwrap_or_else(|_| panic!("README line {}: snippet hung", snippet.line))
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "README line {} exited {:?}:\n{}\nstdout: {stdout}\nstderr: {stderr}",
            snippet.line,
            out.status.code(),
            snippet.code
        );
        if let Some(expected) = &snippet.expected {
            assert!(
                matches(expected.trim(), stdout.trim()),
                "README line {}: printed\n{}\nbut the README says\n{}",
                snippet.line,
                stdout.trim(),
                expected.trim()
            );
        }
    }
}
