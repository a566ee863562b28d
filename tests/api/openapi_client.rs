//! A client generated from the served `/openapi.json` by `openapi-python-client` (pinned in
//! tests/sdk/requirements.txt) calls `/healthz`, `POST /files` and `POST /run`
//! (tests/sdk/generated_client.py): the document is right when the generated models build
//! the requests the server takes and parse the answers it gives.

use reqwest::Method;
use serde_json::Value;

use crate::harness::{records, repo_root, stdout_of, venv_bin, TestServer};

#[tokio::test]
async fn a_generated_python_client_calls_healthz_files_and_run() {
    let s = TestServer::start().await;
    let (id, t) = s.mint("generated").await;
    let res = s.req(Method::GET, "/openapi.json").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let doc = res.text().await.unwrap();

    let work = tempfile::tempdir().unwrap();
    let spec = work.path().join("openapi.json");
    std::fs::write(&spec, &doc).unwrap();
    // No post-hooks: the generator would otherwise run ruff over its output.
    let config = work.path().join("config.yml");
    std::fs::write(
        &config,
        "post_hooks: []\nproject_name_override: cf-client\npackage_name_override: cf_client\n",
    )
    .unwrap();
    let client_dir = work.path().join("client");
    let mut generate = tokio::process::Command::new(venv_bin("openapi-python-client"));
    generate
        .arg("generate")
        .arg("--path")
        .arg(&spec)
        .arg("--config")
        .arg(&config)
        .arg("--output-path")
        .arg(&client_dir);
    stdout_of(generate).await;
    assert!(client_dir.join("cf_client/api/runs/run.py").exists());

    let mut script = tokio::process::Command::new(venv_bin("python"));
    script
        .arg(repo_root().join("tests/sdk/generated_client.py"))
        .env("CF_BASE_URL", &s.url)
        .env("CF_TOKEN", &t)
        .env("CF_CLIENT_DIR", &client_dir);
    let out = stdout_of(script).await;

    // The run the script printed is this token's, answered, with the uploaded file in its
    // dir and the tools the generated model sent (`"none"`).
    let run_id = out.trim();
    let rows = s.audit_rows("run");
    let row = rows
        .iter()
        .find(|r| r["subject"] == run_id)
        .unwrap_or_else(|| panic!("no audit row for {run_id}: {rows:?}"));
    assert_eq!(
        (row["outcome"].as_str(), row["token_id"].as_str()),
        (Some("ok"), Some(id.as_str()))
    );
    let record = records(&s.record_dir)
        .into_iter()
        .find(|r| {
            r["argv"]
                .as_array()
                .is_some_and(|a| a.contains(&Value::from("--tools=")))
        })
        .expect("the run asked for no tools");
    assert_eq!(
        record["cwd_files"]["notes.txt"], "hello from the generated client\n",
        "{record}"
    );
    drop(work);
}
