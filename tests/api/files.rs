//! Uploads: `POST /files` (multipart, streamed to disk, limits, ttl, sanitised names),
//! `GET`/`DELETE /files/{file_token}`, who may see a file, attaching files to runs, and the
//! sweeper's `delete_expired`.

use std::collections::BTreeMap;

use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

async fn show(s: &TestServer, token: &str, ft: &str) -> (u16, Value) {
    send(s.app(token, Method::GET, &format!("/files/{ft}"))).await
}

async fn delete(s: &TestServer, token: &str, ft: &str) -> (u16, Value) {
    send(s.app(token, Method::DELETE, &format!("/files/{ft}"))).await
}

/// Names in the uploads dir, sorted (temp files included).
fn uploads(s: &TestServer) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(s.state.config.uploads_dir.as_path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn file_rows(s: &TestServer) -> i64 {
    s.db()
        .query_row("SELECT count(*) FROM files", [], |r| r.get(0))
        .unwrap()
}

/// Run dirs still present among the runs the stub answered (idle warm-pool dirs, which
/// answered nothing yet, do not count).
fn run_dirs(s: &TestServer) -> usize {
    crate::harness::records(&s.record_dir)
        .iter()
        .filter(|r| !crate::harness::dir_gone(r))
        .count()
}

/// The prompts the claude stub was given, in no particular order.
fn recorded_prompts(s: &TestServer) -> Vec<String> {
    std::fs::read_dir(&s.record_dir)
        .unwrap()
        .filter_map(|e| {
            let v: Value = serde_json::from_slice(&std::fs::read(e.unwrap().path()).ok()?).ok()?;
            Some(v["prompt"].as_str()?.to_string())
        })
        .collect()
}

#[tokio::test]
async fn upload_show_delete() {
    let s = TestServer::start().await;
    let (token_id, token) = s.mint("files").await;
    let data = b"%PDF-1.7 not really a pdf\n".repeat(500);

    let (st, v) = post_files(&s, &token, &[file_part("a.pdf", &data)]).await;
    assert_eq!(st, 201, "{v}");
    let ft = v["file_token"].as_str().unwrap().to_string();
    assert!(ft.starts_with("ff_") && ft.len() >= 3 + 22, "{ft}");
    assert!(ft[3..].bytes().all(|b| b.is_ascii_alphanumeric()), "{ft}");
    let sha = hex::encode(Sha256::digest(&data));
    assert_eq!(
        v,
        json!({"ok": true, "file_token": ft, "ttl_secs": 3600, "size": data.len(),
               "sha256": sha, "filename": "a.pdf"})
    );
    // The bytes sit under the file token, nothing else in the uploads dir.
    assert_eq!(uploads(&s), [ft.as_str()]);
    assert_eq!(
        std::fs::read(s.state.config.uploads_dir.join(&ft)).unwrap(),
        data
    );

    let (st, v) = show(&s, &token, &ft).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["file_token"], ft.as_str());
    assert_eq!(v["filename"], "a.pdf");
    assert_eq!(v["stored_name"], "a.pdf");
    assert_eq!(v["size"], data.len());
    assert_eq!(v["sha256"], sha.as_str());
    let created = clawdforge::util::parse_rfc3339(v["created_at"].as_str().unwrap()).unwrap();
    let expires = clawdforge::util::parse_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires - created, 3_600_000);
    assert!(v.get("token_id").is_none(), "{v}");

    let (st, v) = delete(&s, &token, &ft).await;
    assert_eq!((st, &v), (200, &json!({"ok": true})));
    assert!(uploads(&s).is_empty());
    assert_eq!(file_rows(&s), 0);
    assert_eq!(show(&s, &token, &ft).await.0, 404);
    let (st, v) = delete(&s, &token, &ft).await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")));

    let up = s.audit_rows("upload");
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0]["token_id"], token_id.as_str());
    assert_eq!(up[0]["subject"], ft.as_str());
    assert_eq!(up[0]["outcome"], "ok");
    assert_eq!(up[0]["detail"], format!("{} bytes", data.len()));
    assert_eq!(up[0]["prompt"], Value::Null);
    assert_eq!(up[0]["response_chars"], Value::Null);
    let del = s.audit_rows("file_delete");
    assert_eq!(del.len(), 1, "{del:?}");
    assert_eq!(del[0]["subject"], ft.as_str());
    assert_eq!(del[0]["token_id"], token_id.as_str());
}

#[tokio::test]
async fn ttl_secs_is_bounded_and_may_come_in_any_order() {
    let s = TestServer::start().await;
    let (_, token) = s.mint("files").await;

    let (st, v) = post_files(&s, &token, &[ttl_part("60"), file_part("a.txt", b"a")]).await;
    assert_eq!((st, &v["ttl_secs"]), (201, &json!(60)), "{v}");
    let (st, v) = post_files(&s, &token, &[file_part("b.txt", b"b"), ttl_part("86400")]).await;
    assert_eq!((st, &v["ttl_secs"]), (201, &json!(86400)), "{v}");
    let (_, shown) = show(&s, &token, v["file_token"].as_str().unwrap()).await;
    let created = clawdforge::util::parse_rfc3339(shown["created_at"].as_str().unwrap()).unwrap();
    let expires = clawdforge::util::parse_rfc3339(shown["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires - created, 86_400_000);

    for bad in ["59", "86401", "0", "-1", "soon", ""] {
        for parts in [
            vec![ttl_part(bad), file_part("c.txt", b"c")],
            vec![file_part("c.txt", b"c"), ttl_part(bad)],
        ] {
            let (st, v) = post_files(&s, &token, &parts).await;
            assert_eq!(
                (st, v["code"].as_str()),
                (400, Some("bad_request")),
                "{bad}"
            );
            assert!(v["error"].as_str().unwrap().contains("ttl_secs"), "{v}");
        }
    }
    // The refused ones left nothing: two files, two rows.
    assert_eq!(uploads(&s).len(), 2, "{:?}", uploads(&s));
    assert_eq!(file_rows(&s), 2);
}

#[tokio::test]
async fn malformed_uploads_are_refused_with_400() {
    let s = TestServer::start().await;
    let (_, token) = s.mint("files").await;

    let (st, v) = post_files(&s, &token, &[ttl_part("60")]).await;
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")));
    assert!(v["error"].as_str().unwrap().contains("file"), "{v}");

    let (st, v) = post_files(&s, &token, &[file_part("a", b"a"), file_part("b", b"b")]).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = post_files(
        &s,
        &token,
        &[
            file_part("a", b"a"),
            Part {
                name: "colour",
                filename: None,
                data: b"red",
            },
        ],
    )
    .await;
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("colour"), "{v}");

    // Not multipart at all, or cut short.
    let (st, v) = send(
        s.app(&token, Method::POST, "/files")
            .json(&json!({"file": "a"})),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")));
    let mut truncated = multipart(&[file_part("a.txt", b"hello")]);
    truncated.truncate(truncated.len() - 20);
    let (st, _) = send(with_multipart(
        s.app(&token, Method::POST, "/files"),
        truncated,
    ))
    .await;
    assert_eq!(st, 400);

    // No token: 401 before the body is looked at.
    let (st, _) = send(with_multipart(
        s.req(Method::POST, "/files"),
        multipart(&[file_part("a.txt", b"a")]),
    ))
    .await;
    assert_eq!(st, 401);

    assert!(uploads(&s).is_empty(), "{:?}", uploads(&s));
    assert_eq!(file_rows(&s), 0);
    assert!(s.audit_rows("upload").is_empty());
}

#[tokio::test]
async fn the_upload_limit_counts_the_files_bytes_not_the_json_limit() {
    const LIMIT: usize = 256 * 1024;
    let s = TestServer::start_with(|c| {
        c.settings.max_upload_bytes = LIMIT as u64;
        // The JSON body limit (about 70 KB here) must not apply to uploads.
        c.settings.max_prompt_bytes = 1024;
    })
    .await;
    assert!(s.state.json_body_limit() < LIMIT);
    let (_, token) = s.mint("files").await;

    // Exactly at the limit: accepted, although the whole body is larger than the limit.
    let (st, v) = post_files(&s, &token, &[file_part("max.bin", &vec![7u8; LIMIT])]).await;
    assert_eq!((st, &v["size"]), (201, &json!(LIMIT)), "{v}");
    let kept = v["file_token"].as_str().unwrap().to_string();

    // One byte more: 413, and neither bytes nor a row are left of it.
    let (st, v) = post_files(&s, &token, &[file_part("big.bin", &vec![7u8; LIMIT + 1])]).await;
    assert_eq!((st, v["code"].as_str()), (413, Some("too_large")), "{v}");
    assert_eq!(uploads(&s), [kept]);
    assert_eq!(file_rows(&s), 1);
    assert_eq!(s.audit_rows("upload").len(), 1);

    // A declared length that cannot fit is refused before any of the body is sent.
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(upload_head(&s, &token, 999_999_999_999).as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    sock.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""code":"too_large""#), "{answer}");
    assert_eq!(file_rows(&s), 1);
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_upload_leaves_nothing() {
    let s = TestServer::start().await;
    let (_, token) = s.mint("files").await;

    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(upload_head(&s, &token, 50_000_000).as_bytes())
        .await
        .unwrap();
    sock.write_all(&multipart_head("file", Some(b"big.bin")))
        .await
        .unwrap();
    // More than the server's write buffer, so some of it reaches the temp file.
    sock.write_all(&vec![b'x'; 3 * 1024 * 1024]).await.unwrap();
    sock.flush().await.unwrap();
    let uploads_dir = s.state.config.uploads_dir.clone();
    let temp_with_bytes = || {
        std::fs::read_dir(&uploads_dir).unwrap().any(|e| {
            let e = e.unwrap();
            e.file_name().to_string_lossy().starts_with(".upload-")
                && e.metadata().unwrap().len() > 0
        })
    };
    eventually(
        "the server writes the upload to a temp file",
        temp_with_bytes,
    )
    .await;

    drop(sock);
    eventually("the temp file is removed after the client left", || {
        std::fs::read_dir(&uploads_dir).unwrap().count() == 0
    })
    .await;
    assert_eq!(file_rows(&s), 0);
    assert!(s.audit_rows("upload").is_empty());
}

#[tokio::test]
async fn stored_names_are_sanitised_and_the_original_kept() {
    let s = TestServer::start().await;
    let (_, token) = s.mint("files").await;
    let long = format!("{}.txt", "n".repeat(10_000));
    let cases: &[(&str, &str)] = &[
        ("../../etc/passwd", "passwd"),
        ("/etc/shadow", "shadow"),
        ("C:\\Users\\me\\report.pdf", "report.pdf"),
        ("tab\there.txt", "tab_here.txt"),
        (".", "file"),
        ("..", "file"),
        ("", "file"),
        ("CON", "_CON"),
        ("-rf", "_-rf"),
        (".env", "_.env"),
        ("Übersicht 2026.xlsx", "Übersicht 2026.xlsx"),
        ("evil\u{202E}fdp.exe", "evil_fdp.exe"),
    ];
    let mut tokens = Vec::new();
    for (original, stored) in cases {
        let ft = upload(&s, &token, original, b"x").await;
        let (_, v) = show(&s, &token, &ft).await;
        assert_eq!(v["filename"], *original);
        assert_eq!(v["stored_name"], *stored, "{original:?}");
        tokens.push(ft);
    }
    let ft = upload(&s, &token, &long, b"x").await;
    let (_, v) = show(&s, &token, &ft).await;
    assert_eq!(v["filename"], long.as_str());
    let stored = v["stored_name"].as_str().unwrap();
    assert!(
        stored.len() <= 120 && stored.ends_with("nnn.txt"),
        "{stored}"
    );
    tokens.push(ft);

    // A NUL (or another control byte the multipart parser refuses in a header) is a 400.
    for raw in [&b"a\0b.txt"[..], b"a\x01b.txt"] {
        let (st, v) = post_files(
            &s,
            &token,
            &[Part {
                name: "file",
                filename: Some(raw),
                data: b"x",
            }],
        )
        .await;
        assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")), "{v}");
    }

    // Nothing was written anywhere but under the file tokens.
    tokens.sort();
    assert_eq!(uploads(&s), tokens);
    assert!(!s.data_dir().join("etc").exists());
}

#[tokio::test]
async fn only_the_uploading_token_sees_a_file() {
    let s = TestServer::start().await;
    let (_, alice) = s.mint("alice").await;
    let (_, bob) = s.mint("bob").await;
    let ft = upload(&s, &alice, "secret.txt", b"alice's").await;

    let (st, v) = show(&s, &bob, &ft).await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")));
    let unknown = show(&s, &bob, "ff_doesnotexist000000000000").await.1;
    assert_eq!(
        v["error"],
        unknown["error"]
            .as_str()
            .unwrap()
            .replace("ff_doesnotexist000000000000", &ft)
    );
    assert_eq!(delete(&s, &bob, &ft).await.0, 404);
    let (st, v) = run(&s, &bob, json!({"prompt": "@stub:cwd", "files": [ft]})).await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")), "{v}");
    assert_eq!(run_dirs(&s), 0);

    // Still there for its owner.
    assert_eq!(show(&s, &alice, &ft).await.0, 200);
    assert_eq!(uploads(&s), [ft]);
    assert!(s.audit_rows("file_delete").is_empty());
}

#[tokio::test]
async fn attached_files_are_readable_in_the_run_dir() {
    let s = TestServer::start().await;
    let (_, token) = s.mint("files").await;
    let a = upload(&s, &token, "notes.txt", b"remember the milk").await;

    let (st, v) = run(&s, &token, json!({"prompt": "@stub:cwd", "files": [a]})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["result"], json!({"notes.txt": "remember the milk"}));
    let prompts = recorded_prompts(&s);
    assert_eq!(prompts.len(), 1, "{prompts:?}");
    assert!(prompts[0].starts_with("@stub:cwd"), "{prompts:?}");
    assert_eq!(prompts[0].lines().last(), Some("Attached files: notes.txt"));
    assert_eq!(run_dirs(&s), 0);
    // Staging copies: the upload is still there, and can be attached again.
    assert_eq!(uploads(&s), [a.as_str()]);
}

#[tokio::test]
async fn attachments_with_the_same_name_do_not_overwrite_each_other() {
    let s = TestServer::start().await;
    let (_, token) = s.mint("files").await;
    let one = upload(&s, &token, "a.txt", b"one").await;
    let two = upload(&s, &token, "../elsewhere/a.txt", b"two").await;
    let three = upload(&s, &token, "a-2.txt", b"three").await;

    let (st, v) = run(
        &s,
        &token,
        json!({"prompt": "@stub:cwd", "files": [one, two, three, one]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let files: BTreeMap<String, String> = serde_json::from_value(v["result"].clone()).unwrap();
    assert_eq!(
        files,
        BTreeMap::from([
            ("a.txt".to_string(), "one".to_string()),
            ("a-2.txt".to_string(), "two".to_string()),
            ("a-2-2.txt".to_string(), "three".to_string()),
        ])
    );
    let prompts = recorded_prompts(&s);
    assert_eq!(
        prompts[0].lines().last(),
        Some("Attached files: a.txt, a-2.txt, a-2-2.txt")
    );
    assert_eq!(run_dirs(&s), 0);
}

#[tokio::test]
async fn expired_files_are_gone_before_and_after_the_sweeper() {
    let s = TestServer::start().await;
    let (_, token) = s.mint("files").await;
    let old = upload(&s, &token, "old.txt", b"old").await;
    let fresh = upload(&s, &token, "fresh.txt", b"fresh").await;

    // Expire one: the server is not asked, the row just says so.
    let past = clawdforge::util::now_ms() - 1;
    let rw = rusqlite::Connection::open(s.data_dir().join("clawdforge.db")).unwrap();
    rw.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    rw.execute(
        "UPDATE files SET expires_at = ?1 WHERE file_token = ?2",
        rusqlite::params![past, old],
    )
    .unwrap();
    drop(rw);

    assert_eq!(show(&s, &token, &old).await.0, 404);
    assert_eq!(delete(&s, &token, &old).await.0, 404);
    let (st, _) = run(&s, &token, json!({"prompt": "@stub:cwd", "files": [old]})).await;
    assert_eq!(st, 404);
    assert_eq!(run_dirs(&s), 0);

    // The sweeper's part: rows and bytes of expired files only.
    let uploads_dir = s.state.config.uploads_dir.clone();
    let n =
        clawdforge::files::delete_expired(&s.state.db, &uploads_dir, clawdforge::util::now_ms())
            .await
            .unwrap();
    assert_eq!(n, 1);
    assert_eq!(uploads(&s), [fresh.as_str()]);
    assert_eq!(file_rows(&s), 1);
    assert_eq!(show(&s, &token, &fresh).await.0, 200);
    let n =
        clawdforge::files::delete_expired(&s.state.db, &uploads_dir, clawdforge::util::now_ms())
            .await
            .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn start_up_removes_uploads_a_crash_interrupted() {
    let s = TestServer::start().await;
    let (_, token) = s.mint("files").await;
    let kept = upload(&s, &token, "kept.txt", b"kept").await;
    let dir = s.stop().await;

    let uploads_dir = dir.path().join("data/uploads");
    std::fs::write(uploads_dir.join(".upload-interrupted"), b"partial").unwrap();
    std::fs::write(uploads_dir.join("ff_renamedButNoRow0000000000"), b"x").unwrap();

    let s = TestServer::start_in(dir, |_| {}).await;
    assert_eq!(uploads(&s), [kept.as_str()]);
    assert_eq!(show(&s, &token, &kept).await.0, 200);
}
