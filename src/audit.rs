//! The audit log: one row per run, turn, upload, file delete and admin action. Runs and
//! turns open their row before the agent starts (outcome `running`) and close it before the
//! answer is sent; a row still `running` after a crash is marked `abandoned` at start-up.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::governance::usage::{self, UsageEvent};
use crate::util::now_ms;

/// Outcomes as stored. `Running` only exists while work is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Running,
    Ok,
    Error,
    Timeout,
    Cancelled,
    Abandoned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// A row to insert. Fields left `None` stay NULL.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    pub token_id: Option<String>,
    pub kind: String,
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub prompt_chars: Option<i64>,
    pub outcome: Option<Outcome>,
    pub subject: Option<String>,
    pub detail: Option<String>,
    pub response_chars: Option<i64>,
    pub duration_ms: Option<i64>,
    /// For runs: whether a warm-pool process served it.
    pub warm: Option<bool>,
}

impl AuditEntry {
    /// An admin action. `actor` is the acting token id, or "admin" for the bootstrap
    /// bearer, or "cli" for the `tokens` subcommand; it goes in `detail`, never a secret.
    pub fn admin(kind: &str, actor: &str, subject: &str, note: Option<&str>) -> AuditEntry {
        AuditEntry {
            kind: kind.to_string(),
            outcome: Some(Outcome::Ok),
            subject: Some(subject.to_string()),
            detail: Some(match note {
                Some(n) => format!("by {actor}: {n}"),
                None => format!("by {actor}"),
            }),
            ..AuditEntry::default()
        }
    }
}

/// What a finished run or turn records.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub outcome: Option<Outcome>,
    pub response_chars: Option<i64>,
    pub duration_ms: Option<i64>,
    pub exit_code: Option<i64>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cost_usd: Option<f64>,
    pub detail: Option<String>,
}

pub fn insert(conn: &Connection, e: &AuditEntry) -> rusqlite::Result<i64> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO audit (at, token_id, kind, model, prompt, prompt_chars, outcome, subject,
                            detail, response_chars, duration_ms, warm)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    stmt.execute(params![
        now_ms(),
        e.token_id,
        e.kind,
        e.model,
        e.prompt,
        e.prompt_chars,
        e.outcome.unwrap_or(Outcome::Ok).as_str(),
        e.subject,
        e.detail,
        e.response_chars,
        e.duration_ms,
        e.warm,
    ])?;
    Ok(conn.last_insert_rowid())
}

/// Closes a run's or turn's row and, the first time it leaves `running`, adds its cost and
/// tokens to the usage ledger (`governance::usage`) in the same savepoint: a crash between
/// the two would otherwise leave work that cost money but never counted against a budget.
/// Usage is dated by when the work finished (UTC), which is when its cost became known.
pub fn complete(conn: &mut Connection, id: i64, c: &Completion) -> rusqlite::Result<()> {
    let sp = conn.savepoint()?;
    let before: Option<(String, Option<String>, String, Option<String>)> = sp
        .query_row(
            "SELECT outcome, token_id, kind, model FROM audit WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    sp.prepare_cached(
        "UPDATE audit SET outcome = ?2, response_chars = ?3, duration_ms = ?4, exit_code = ?5,
                input_tokens = ?6, output_tokens = ?7, cost_usd = ?8,
                detail = coalesce(?9, detail)
         WHERE id = ?1",
    )?
    .execute(params![
        id,
        c.outcome.unwrap_or(Outcome::Ok).as_str(),
        c.response_chars,
        c.duration_ms,
        c.exit_code,
        c.input_tokens,
        c.output_tokens,
        c.cost_usd,
        c.detail,
    ])?;
    if let Some((outcome, Some(token_id), kind, model)) = before {
        let metered = matches!(kind.as_str(), "run" | "turn" | "chat");
        if metered && outcome == Outcome::Running.as_str() && c.outcome != Some(Outcome::Running) {
            usage::record(
                &sp,
                &UsageEvent {
                    token_id: &token_id,
                    model: model.as_deref().unwrap_or("unknown"),
                    day: &usage::day_of(now_ms()),
                    cost_usd: c.cost_usd.unwrap_or(0.0),
                    input_tokens: c.input_tokens.unwrap_or(0),
                    output_tokens: c.output_tokens.unwrap_or(0),
                },
            )?;
        }
    }
    sp.commit()
}

/// Marks every row still `running` as `abandoned`: called at start-up, when nothing of the
/// previous process can still be running. Returns how many rows changed.
pub fn abandon_running(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE audit SET outcome = 'abandoned' WHERE outcome = 'running'",
        [],
    )
}

/// The token that started run `run_id` (its row's subject), if the row is still kept.
pub fn run_owner(conn: &Connection, run_id: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT token_id FROM audit WHERE kind = 'run' AND subject = ?1 ORDER BY id LIMIT 1",
        [run_id],
        |r| r.get::<_, Option<String>>(0),
    )
    .optional()
    .map(Option::flatten)
}

/// The subjects (run or session ids) of rows of `kind` still `running`: at start-up, the
/// work that was in flight when the previous process died.
pub fn running_subjects(
    conn: &Connection,
    kind: &str,
) -> rusqlite::Result<std::collections::HashSet<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT subject FROM audit
         WHERE kind = ?1 AND outcome = 'running' AND subject IS NOT NULL",
    )?;
    let rows = stmt.query_map([kind], |r| r.get(0))?;
    rows.collect()
}

/// Deletes rows older than `cutoff_ms`; returns how many.
pub fn trim_before(conn: &Connection, cutoff_ms: i64) -> rusqlite::Result<usize> {
    conn.execute("DELETE FROM audit WHERE at < ?1", [cutoff_ms])
}

/// A row as `GET /admin/audit` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditRow {
    pub id: i64,
    #[serde(serialize_with = "crate::util::ser_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: i64,
    pub token_id: Option<String>,
    pub kind: String,
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub prompt_chars: Option<i64>,
    pub response_chars: Option<i64>,
    pub duration_ms: Option<i64>,
    pub outcome: String,
    pub exit_code: Option<i64>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cost_usd: Option<f64>,
    pub subject: Option<String>,
    pub detail: Option<String>,
    pub warm: Option<bool>,
}

/// Which rows a page shows: each field, when given, must match exactly.
#[derive(Debug, Clone, Default)]
pub struct PageFilter {
    pub token_id: Option<String>,
    pub kind: Option<String>,
    pub outcome: Option<String>,
}

/// Newest first, filtered, strictly below row id `before`.
pub fn page(
    conn: &Connection,
    filter: &PageFilter,
    before: Option<i64>,
    limit: u32,
) -> rusqlite::Result<Vec<AuditRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, at, token_id, kind, model, prompt, prompt_chars, response_chars,
                duration_ms, outcome, exit_code, input_tokens, output_tokens, cost_usd,
                subject, detail, warm
         FROM audit
         WHERE (?1 IS NULL OR token_id = ?1) AND (?2 IS NULL OR id < ?2)
           AND (?4 IS NULL OR kind = ?4) AND (?5 IS NULL OR outcome = ?5)
         ORDER BY id DESC LIMIT ?3",
    )?;
    let args = params![filter.token_id, before, limit, filter.kind, filter.outcome];
    let rows = stmt.query_map(args, |r| {
        Ok(AuditRow {
            id: r.get(0)?,
            at: r.get(1)?,
            token_id: r.get(2)?,
            kind: r.get(3)?,
            model: r.get(4)?,
            prompt: r.get(5)?,
            prompt_chars: r.get(6)?,
            response_chars: r.get(7)?,
            duration_ms: r.get(8)?,
            outcome: r.get(9)?,
            exit_code: r.get(10)?,
            input_tokens: r.get(11)?,
            output_tokens: r.get(12)?,
            cost_usd: r.get(13)?,
            subject: r.get(14)?,
            detail: r.get(15)?,
            warm: r.get(16)?,
        })
    })?;
    rows.collect()
}
