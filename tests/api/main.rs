//! Integration tests: a real server on 127.0.0.1:0, spoken to over HTTP, with assertions on
//! status, body and what is left behind. One binary (modules below) to keep linking cheap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod binary;
mod console;
mod console_browser;
mod docs;
mod drills;
#[path = "../common/fake_upstream.rs"]
mod fake_upstream;
mod files;
mod foundation;
mod governance;
mod hardening;
mod idempotency;
// Not every test module uses every helper.
#[allow(dead_code)]
mod harness;
mod netns;
mod openapi_client;
mod ops;
mod readme;
mod real;
mod run_tools;
mod runs;
mod sdk;
mod sessions;
mod sessions_pool;
mod sessions_real;
mod warm;
