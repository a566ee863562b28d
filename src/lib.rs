//! clawdforge: a LAN appliance that brokers access to coding agents over HTTP.
//!
//! `main.rs` parses the configuration and calls [`run`]; tests call the same function on
//! `127.0.0.1:0`. The modules, one concern each:
//! - [`config`]: every setting, from env or flags;
//! - [`http`]: routes, extractors, the error envelope;
//! - [`auth`]: app tokens, the admin bearer, CIDR allowlists;
//! - [`store`]: SQLite, its writer task and migrations;
//! - [`audit`]: the audit log;
//! - [`process`]: agent processes (env allowlist, process groups, kills);
//! - [`supervise`]: the one lifecycle of an agent process answering a request;
//! - [`runner`]: one-shot `claude -p` runs;
//! - [`compat`]: the OpenAI and Anthropic wire formats of the SDK routes;
//! - [`slots`]: admission control for agent processes;
//! - [`governance`]: token policy, the usage ledger, and admission per token;
//! - [`metrics`]: the Prometheus registry behind `/metrics`;
//! - [`files`]: uploads and staging them into working dirs;
//! - [`sessions`]: multi-turn sessions through acpx;
//! - [`sweeper`]: periodic clean-up (idle sessions, expired uploads, orphaned dirs, audit);
//! - [`probe`]: cached CLI probes (versions, login) for `/healthz` and `/metrics`;
//! - [`cli`]: subcommands that work without a server.

pub mod app;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod compat;
pub mod config;
pub mod doctor;
pub mod error;
pub mod files;
pub mod governance;
pub mod http;
#[cfg(test)]
mod layering;
pub mod lock;
pub mod metrics;
pub mod probe;
pub mod process;
pub mod runner;
pub mod sessions;
pub mod slots;
pub mod store;
pub mod supervise;
pub mod sweeper;
pub mod util;

pub use app::{run, App, AppState};
pub use config::Config;
