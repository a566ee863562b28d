//! Configuration: every setting of `shared/API.md`, read from its environment variable or
//! the matching `--flag`, parsed once into typed values. A bad value stops start-up with
//! clap's message, which names the variable (each value name *is* the variable's name).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnetwork::IpNetwork;

use crate::governance::policy::{Cidr, Count, ModelList, ModelName, PolicyPatch, Rfc3339, Usd};

/// The command line: settings are global, so `serve --help`, `doctor --help` and the
/// bare `--help` all list every one of them with its env name.
#[derive(Debug, Parser)]
#[command(
    name = "clawdforge",
    version,
    about = "A LAN appliance that brokers access to coding agents (claude -p, acpx) over HTTP.",
    long_about = None
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default when no subcommand is given).
    Serve,
    /// Mint, list and revoke app tokens directly in the database (no server needed).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Check the CLIs, the login, the data directories and the database.
    Doctor {
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a consistent copy of the database to PATH (safe while the server runs).
    Backup {
        /// Where to write the copy.
        path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token; its plaintext is printed once.
    Mint {
        /// A name for the app that will use the token.
        #[arg(long)]
        name: String,
        /// A CIDR the token may be used from (repeatable); checked on top of ALLOW_CIDRS.
        #[arg(long = "cidr", value_name = "CIDR")]
        cidrs: Vec<IpNetwork>,
        #[command(flatten)]
        policy: PolicyFlags,
        /// Print a JSON object instead of the bare token.
        #[arg(long)]
        json: bool,
    },
    /// Give a token a new secret (printed once); the old one stops working at once. The
    /// token keeps its id, policy, usage and history.
    Rotate {
        /// The token's id (`tok_...`).
        id: String,
        /// Print a JSON object instead of the bare token.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never their plaintext or hash).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id; it stops working on the next request.
    Revoke {
        /// The token's id (`tok_...`).
        id: String,
    },
}

/// Policy flags of `tokens mint` (the same fields as the admin API's mint body). Three of
/// them carry a `token-` prefix because a server setting of the same name is a global flag.
#[derive(Debug, Clone, Args)]
pub struct PolicyFlags {
    /// Dollars the token may spend per UTC day (runs and turns past it: 402).
    #[arg(long, value_name = "USD")]
    pub budget_usd_per_day: Option<Usd>,
    /// Dollars the token may spend per UTC calendar month.
    #[arg(long, value_name = "USD")]
    pub budget_usd_per_month: Option<Usd>,
    /// Runs and turns of this token in flight at once (policy `max_concurrent`).
    #[arg(
        long = "token-max-concurrent",
        id = "token_max_concurrent",
        value_name = "N"
    )]
    pub max_concurrent: Option<Count>,
    /// Runs and turns admitted per sliding minute.
    #[arg(long, value_name = "N")]
    pub rate_per_min: Option<Count>,
    /// A model the token may use (repeatable); without any, every model.
    #[arg(long = "allowed-model", value_name = "MODEL")]
    pub allowed_models: Vec<ModelName>,
    /// Model for requests of this token that name none (policy `default_model`).
    #[arg(
        long = "token-default-model",
        id = "token_default_model",
        value_name = "MODEL"
    )]
    pub default_model: Option<ModelName>,
    /// acpx permission mode for this token's turns (policy `session_permissions`).
    #[arg(
        long = "token-session-permissions",
        id = "token_session_permissions",
        value_enum,
        value_name = "MODE"
    )]
    pub session_permissions: Option<SessionPermissions>,
    /// When the token stops working (RFC 3339, e.g. 2026-12-31T23:59:59Z).
    #[arg(long, value_name = "TIME")]
    pub expires_at: Option<Rfc3339>,
}

impl PolicyFlags {
    /// The flags as a policy patch (a flag not given leaves its field unset).
    pub fn into_patch(self, cidrs: Vec<IpNetwork>) -> PolicyPatch {
        PolicyPatch {
            ip_cidrs: Some(Some(cidrs.into_iter().map(Cidr::from).collect())),
            budget_usd_per_day: self.budget_usd_per_day.map(Some),
            budget_usd_per_month: self.budget_usd_per_month.map(Some),
            max_concurrent: self.max_concurrent.map(Some),
            rate_per_min: self.rate_per_min.map(Some),
            allowed_models: (!self.allowed_models.is_empty()).then(|| {
                Some(ModelList(
                    self.allowed_models.into_iter().map(|m| m.0).collect(),
                ))
            }),
            default_model: self.default_model.map(Some),
            session_permissions: self.session_permissions.map(Some),
            expires_at: self.expires_at.map(Some),
            allowed_tools: None,
            // Set through the admin API (mint body or PATCH); no flags of their own.
            max_open_sessions: None,
            max_upload_bytes_stored: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionPermissions {
    ApproveReads,
    ApproveAll,
    DenyAll,
}

impl SessionPermissions {
    /// The name used in settings, token policies and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionPermissions::ApproveReads => "approve-reads",
            SessionPermissions::ApproveAll => "approve-all",
            SessionPermissions::DenyAll => "deny-all",
        }
    }

    /// The acpx global flag for this mode.
    pub fn acpx_flag(self) -> &'static str {
        match self {
            SessionPermissions::ApproveReads => "--approve-reads",
            SessionPermissions::ApproveAll => "--approve-all",
            SessionPermissions::DenyAll => "--deny-all",
        }
    }
}

/// Every setting. Field docs become `--help` lines; `value_name` is the env var's name so
/// clap's parse errors ("invalid value 'nope' for '--listen <CLAWDFORGE_LISTEN>'") name it.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address to bind.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_LISTEN",
        value_name = "CLAWDFORGE_LISTEN",
        default_value = "0.0.0.0:8800"
    )]
    pub listen: SocketAddr,

    /// SQLite database `clawdforge.db`, uploads and run dirs live here.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_DATA_DIR",
        value_name = "CLAWDFORGE_DATA_DIR",
        default_value = "./data"
    )]
    pub data_dir: PathBuf,

    /// Bearer for /admin/*; unset = the admin API answers 403.
    #[arg(
        long,
        global = true,
        env = "ADMIN_BOOTSTRAP_TOKEN",
        value_name = "ADMIN_BOOTSTRAP_TOKEN",
        hide_env_values = true
    )]
    pub admin_bootstrap_token: Option<String>,

    /// Comma-separated IPv4/IPv6 CIDRs allowed to connect; loopback is always allowed.
    #[arg(
        long,
        global = true,
        env = "ALLOW_CIDRS",
        value_name = "ALLOW_CIDRS",
        value_delimiter = ','
    )]
    pub allow_cidrs: Vec<IpNetwork>,

    /// The claude program driven for /run.
    #[arg(
        long,
        global = true,
        env = "CLAUDE_BIN",
        value_name = "CLAUDE_BIN",
        default_value = "claude"
    )]
    pub claude_bin: PathBuf,

    /// The acpx program driven for sessions.
    #[arg(
        long,
        global = true,
        env = "ACPX_BIN",
        value_name = "ACPX_BIN",
        default_value = "acpx"
    )]
    pub acpx_bin: PathBuf,

    /// Per-run staged working dirs [default: $CLAWDFORGE_DATA_DIR/runs].
    #[arg(long, global = true, env = "RUNS_DIR", value_name = "RUNS_DIR")]
    pub runs_dir: Option<PathBuf>,

    /// Per-session working dirs [default: $CLAWDFORGE_DATA_DIR/acpx-cwds].
    #[arg(
        long,
        global = true,
        env = "ACPX_SESSIONS_CWD",
        value_name = "ACPX_SESSIONS_CWD"
    )]
    pub acpx_sessions_cwd: Option<PathBuf>,

    /// Model when a request names none.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_DEFAULT_MODEL",
        value_name = "CLAWDFORGE_DEFAULT_MODEL",
        default_value = "sonnet"
    )]
    pub default_model: String,

    /// Agent processes (runs + turns) at once.
    #[arg(long, global = true, env = "CLAWDFORGE_MAX_CONCURRENT",
          value_name = "CLAWDFORGE_MAX_CONCURRENT", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_concurrent: u32,

    /// Requests waiting for a slot; beyond it: 429.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_MAX_QUEUE",
        value_name = "CLAWDFORGE_MAX_QUEUE",
        default_value_t = 64
    )]
    pub max_queue: u32,

    /// Longest wait for a slot, in seconds; then 429.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_QUEUE_TIMEOUT_SECS",
        value_name = "CLAWDFORGE_QUEUE_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub queue_timeout_secs: u64,

    /// Upper bound for a request's timeout_secs (whose default is 120).
    #[arg(long, global = true, env = "CLAWDFORGE_MAX_TIMEOUT_SECS",
          value_name = "CLAWDFORGE_MAX_TIMEOUT_SECS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_timeout_secs: u64,

    /// Larger uploads: 413.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_MAX_UPLOAD_BYTES",
        value_name = "CLAWDFORGE_MAX_UPLOAD_BYTES",
        default_value_t = 104_857_600
    )]
    pub max_upload_bytes: u64,

    /// Larger prompts: 413.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_MAX_PROMPT_BYTES",
        value_name = "CLAWDFORGE_MAX_PROMPT_BYTES",
        default_value_t = 1_048_576
    )]
    pub max_prompt_bytes: usize,

    /// A child printing more is killed: 502 output_too_large.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_MAX_OUTPUT_BYTES",
        value_name = "CLAWDFORGE_MAX_OUTPUT_BYTES",
        default_value_t = 16_777_216
    )]
    pub max_output_bytes: u64,

    /// Sweeper period in seconds.
    #[arg(long, global = true, env = "CLAWDFORGE_SWEEP_INTERVAL_SECS",
          value_name = "CLAWDFORGE_SWEEP_INTERVAL_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub sweep_interval_secs: u64,

    /// Idle sessions are soft-closed after this many seconds.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_SESSION_TTL_SECS",
        value_name = "CLAWDFORGE_SESSION_TTL_SECS",
        default_value_t = 3600
    )]
    pub session_ttl_secs: u64,

    /// Closed sessions are deleted this many seconds after closing.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_SESSION_HARD_TTL_SECS",
        value_name = "CLAWDFORGE_SESSION_HARD_TTL_SECS",
        default_value_t = 86_400
    )]
    pub session_hard_ttl_secs: u64,

    /// Store prompt text in the audit log (false: lengths only).
    #[arg(long, global = true, env = "CLAWDFORGE_AUDIT_PROMPTS",
          value_name = "CLAWDFORGE_AUDIT_PROMPTS", default_value = "true",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub audit_prompts: bool,

    /// Older audit rows are deleted by the sweeper.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_AUDIT_RETENTION_DAYS",
        value_name = "CLAWDFORGE_AUDIT_RETENTION_DAYS",
        default_value_t = 90
    )]
    pub audit_retention_days: u32,

    /// CIDRs of reverse proxies whose X-Forwarded-For is believed.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_TRUSTED_PROXIES",
        value_name = "CLAWDFORGE_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<IpNetwork>,

    /// Extra env var names passed through to agent processes (comma-separated).
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_CHILD_ENV",
        value_name = "CLAWDFORGE_CHILD_ENV",
        value_delimiter = ','
    )]
    pub child_env: Vec<String>,

    /// Agents a session may ask acpx for (comma-separated).
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_AGENTS",
        value_name = "CLAWDFORGE_AGENTS",
        value_delimiter = ',',
        default_value = "claude"
    )]
    pub agents: Vec<String>,

    /// acpx permission mode for turns.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_SESSION_PERMISSIONS",
        value_name = "CLAWDFORGE_SESSION_PERMISSIONS",
        value_enum,
        default_value = "approve-reads"
    )]
    pub session_permissions: SessionPermissions,

    /// Serve /metrics without the admin bearer.
    #[arg(long, global = true, env = "CLAWDFORGE_METRICS_OPEN",
          value_name = "CLAWDFORGE_METRICS_OPEN", default_value = "false",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub metrics_open: bool,

    /// Models GET /v1/models lists for a token without allowed_models (comma-separated).
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_MODELS",
        value_name = "CLAWDFORGE_MODELS",
        value_delimiter = ',',
        default_value = "sonnet,opus,haiku"
    )]
    pub models: Vec<ModelName>,

    /// Serve the operator console at `/`.
    #[arg(long, global = true, env = "CLAWDFORGE_CONSOLE",
          value_name = "CLAWDFORGE_CONSOLE", default_value = "true",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub console: bool,

    /// Origins (`scheme://host[:port]`, comma-separated) whose browser pages may call the
    /// app routes (CORS); credentials are never allowed.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_CORS_ORIGINS",
        value_name = "CLAWDFORGE_CORS_ORIGINS",
        value_delimiter = ',',
        value_parser = parse_origin
    )]
    pub cors_origins: Vec<String>,

    /// Pre-started claude processes kept idle for /run (0 = off).
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_WARM_POOL",
        value_name = "CLAWDFORGE_WARM_POOL",
        default_value_t = 2
    )]
    pub warm_pool: u32,

    /// An idle warm process is replaced after this many seconds.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_WARM_MAX_IDLE_SECS",
        value_name = "CLAWDFORGE_WARM_MAX_IDLE_SECS",
        default_value_t = 600
    )]
    pub warm_max_idle_secs: u64,

    /// Sessions created ahead of time for the default agent and model with no system
    /// prompt, their agent started; `POST /sessions` asking for nothing else takes one
    /// (0 = off).
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_SESSION_POOL",
        value_name = "CLAWDFORGE_SESSION_POOL",
        default_value_t = 1
    )]
    pub session_pool: u32,

    /// At most this many session agents (acpx queue owner, adapter and claude, ~400 MB)
    /// stay alive between turns; beyond it the least recently used idle one is stopped.
    #[arg(long, global = true, env = "CLAWDFORGE_MAX_WARM_AGENTS",
          value_name = "CLAWDFORGE_MAX_WARM_AGENTS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_warm_agents: u32,

    /// How often the cached CLI probes behind /healthz are refreshed, in seconds.
    #[arg(long, global = true, env = "CLAWDFORGE_PROBE_INTERVAL_SECS",
          value_name = "CLAWDFORGE_PROBE_INTERVAL_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub probe_interval_secs: u64,

    /// Seconds a connection may take to send a whole request head; also how long an idle
    /// keep-alive connection is kept open waiting for its next request.
    #[arg(long, global = true, env = "CLAWDFORGE_HEADER_TIMEOUT_SECS",
          value_name = "CLAWDFORGE_HEADER_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_secs: u64,

    /// Seconds a request body may stall (no byte) before the request ends with 408.
    #[arg(long, global = true, env = "CLAWDFORGE_BODY_TIMEOUT_SECS",
          value_name = "CLAWDFORGE_BODY_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_timeout_secs: u64,

    /// Client connections served at once; beyond it new ones wait in the listen backlog.
    #[arg(long, global = true, env = "CLAWDFORGE_MAX_CONNECTIONS",
          value_name = "CLAWDFORGE_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Log format: text for people, json for collectors. Filter with RUST_LOG.
    #[arg(
        long,
        global = true,
        env = "CLAWDFORGE_LOG_FORMAT",
        value_name = "CLAWDFORGE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// A browser origin as it appears in an `Origin` header: `http` or `https`, a host and an
/// optional port, nothing after it (no path, not even a trailing `/`), lower case.
fn parse_origin(s: &str) -> Result<String, String> {
    let s = s.trim();
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or("an origin starts with http:// or https://")?;
    let host_ok = !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !host_ok {
        return Err("an origin is scheme://host[:port], with no path".into());
    }
    Ok(s.to_ascii_lowercase())
}

/// The resolved configuration the server runs with. Built from [`Settings`]; tests build it
/// the same way and may add `child_env_overrides` (values the children see, as if they had
/// been in the server's own environment).
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    pub db_path: PathBuf,
    pub runs_dir: PathBuf,
    pub sessions_dir: PathBuf,
    pub uploads_dir: PathBuf,
    /// Extra variables for every child, on top of the allowlisted server environment.
    pub child_env_overrides: Vec<(String, String)>,
}

impl Config {
    pub fn from_settings(settings: Settings) -> Config {
        let data = settings.data_dir.clone();
        Config {
            db_path: data.join("clawdforge.db"),
            runs_dir: settings
                .runs_dir
                .clone()
                .unwrap_or_else(|| data.join("runs")),
            sessions_dir: settings
                .acpx_sessions_cwd
                .clone()
                .unwrap_or_else(|| data.join("acpx-cwds")),
            uploads_dir: data.join("uploads"),
            child_env_overrides: Vec::new(),
            settings,
        }
    }

    /// Settings as they are with no env and no flags: the API.md defaults. Used by tests.
    pub fn defaults_for(data_dir: &std::path::Path) -> Config {
        // Parsing an empty argv cannot fail: every setting has a default or is optional.
        let cli = Cli::try_parse_from(["clawdforge"]).unwrap_or_else(|e| panic!("{e}"));
        let mut settings = cli.settings;
        settings.data_dir = data_dir.to_path_buf();
        Config::from_settings(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_variable() {
        let err = Cli::try_parse_from(["clawdforge", "--allow-cidrs", "10.0.0.0/33"])
            .expect_err("must fail");
        assert!(err.to_string().contains("ALLOW_CIDRS"), "{err}");
        let err = Cli::try_parse_from(["clawdforge", "--listen", "nope"]).expect_err("must fail");
        assert!(err.to_string().contains("CLAWDFORGE_LISTEN"), "{err}");
    }

    #[test]
    fn cors_origins_are_bare_origins() {
        let cli = Cli::try_parse_from([
            "clawdforge",
            "--cors-origins",
            "http://192.168.1.5:3000,https://Apps.lan",
        ])
        .expect("parses");
        assert_eq!(
            cli.settings.cors_origins,
            ["http://192.168.1.5:3000", "https://apps.lan"]
        );
        for bad in ["apps.lan", "http://apps.lan/", "ftp://x", "http://"] {
            let err =
                Cli::try_parse_from(["clawdforge", "--cors-origins", bad]).expect_err("must fail");
            assert!(err.to_string().contains("CLAWDFORGE_CORS_ORIGINS"), "{err}");
        }
    }

    #[test]
    fn cidr_lists_split_on_commas() {
        let cli = Cli::try_parse_from(["clawdforge", "--allow-cidrs", "10.0.0.0/8,fd00::/8"])
            .expect("parses");
        assert_eq!(cli.settings.allow_cidrs.len(), 2);
    }
}
