//! Session rows: what `GET /sessions` and `GET /sessions/{id}` show, and the updates turns,
//! closes and the sweeper make.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionRecord {
    pub session_id: String,
    #[serde(skip)]
    pub token_id: String,
    pub agent: String,
    pub model: String,
    #[serde(skip)]
    pub system_prompt: Option<String>,
    #[serde(skip)]
    pub acpx_name: String,
    #[serde(skip)]
    pub acpx_record_id: Option<String>,
    #[serde(skip)]
    pub cwd: String,
    pub status: String,
    #[serde(serialize_with = "crate::util::ser_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
    #[serde(serialize_with = "crate::util::ser_rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub last_used_at: i64,
    #[serde(serialize_with = "crate::util::ser_opt_rfc3339")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub closed_at: Option<i64>,
    pub turn_count: i64,
    /// The agent's cumulative cost as last reported (see `acp_log::TurnLog::cost`).
    #[serde(skip)]
    pub cost_total: f64,
    /// Whether a turn is running now (filled from memory, not stored).
    pub busy: bool,
}

const COLUMNS: &str = "id, token_id, agent, model, system_prompt, acpx_name, acpx_record_id, cwd,
                       status, created_at, last_used_at, closed_at, turn_count, cost_total";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    Ok(SessionRecord {
        session_id: r.get(0)?,
        token_id: r.get(1)?,
        agent: r.get(2)?,
        model: r.get(3)?,
        system_prompt: r.get(4)?,
        acpx_name: r.get(5)?,
        acpx_record_id: r.get(6)?,
        cwd: r.get(7)?,
        status: r.get(8)?,
        created_at: r.get(9)?,
        last_used_at: r.get(10)?,
        closed_at: r.get(11)?,
        turn_count: r.get(12)?,
        cost_total: r.get(13)?,
        busy: false,
    })
}

pub fn insert(conn: &Connection, s: &SessionRecord) -> rusqlite::Result<()> {
    conn.execute(
        &format!("INSERT INTO sessions ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
        params![
            s.session_id, s.token_id, s.agent, s.model, s.system_prompt, s.acpx_name,
            s.acpx_record_id, s.cwd, s.status, s.created_at, s.last_used_at, s.closed_at,
            s.turn_count, s.cost_total
        ],
    )?;
    Ok(())
}

/// The caller's session, or `None` (also for another token's: they look the same).
pub fn get_for(
    conn: &Connection,
    token_id: &str,
    id: &str,
) -> rusqlite::Result<Option<SessionRecord>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM sessions WHERE id = ?1 AND token_id = ?2"),
        params![id, token_id],
        from_row,
    )
    .optional()
}

/// How many sessions of `token_id` are open.
pub fn open_count(conn: &Connection, token_id: &str) -> rusqlite::Result<u32> {
    conn.query_row(
        "SELECT count(*) FROM sessions WHERE token_id = ?1 AND status = 'open'",
        [token_id],
        |r| r.get(0),
    )
}

pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<SessionRecord>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM sessions WHERE id = ?1"),
        [id],
        from_row,
    )
    .optional()
}

/// The caller's sessions, newest first; `status` filters when given.
pub fn list_for(
    conn: &Connection,
    token_id: &str,
    status: Option<&str>,
) -> rusqlite::Result<Vec<SessionRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM sessions WHERE token_id = ?1 AND (?2 IS NULL OR status = ?2)
         ORDER BY created_at DESC, id DESC"
    ))?;
    let rows = stmt.query_map(params![token_id, status], from_row)?;
    rows.collect()
}

/// Every token's sessions (for the operator), newest first; `token_id` and `status`
/// filter when given. Pooled ones are nobody's yet and not shown.
pub fn list_all(
    conn: &Connection,
    token_id: Option<&str>,
    status: Option<&str>,
) -> rusqlite::Result<Vec<SessionRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM sessions WHERE (?1 IS NULL OR token_id = ?1)
         AND (?2 IS NULL OR status = ?2) AND status NOT IN ('{POOLED}', '{WARMING}')
         ORDER BY created_at DESC, id DESC"
    ))?;
    let rows = stmt.query_map(params![token_id, status], from_row)?;
    rows.collect()
}

fn select_where(
    conn: &Connection,
    condition: &str,
    args: impl rusqlite::Params,
) -> rusqlite::Result<Vec<SessionRecord>> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {COLUMNS} FROM sessions WHERE {condition}"))?;
    let rows = stmt.query_map(args, from_row)?;
    rows.collect()
}

/// The open sessions of `token_id` (to close them when it is revoked).
pub fn open_of_token(conn: &Connection, token_id: &str) -> rusqlite::Result<Vec<SessionRecord>> {
    select_where(conn, "token_id = ?1 AND status = 'open'", [token_id])
}

/// Every session acpx has a record of (to reconcile their queue owners at start-up).
pub fn with_acpx_record(conn: &Connection) -> rusqlite::Result<Vec<SessionRecord>> {
    select_where(conn, "acpx_record_id IS NOT NULL", [])
}

/// Open sessions unused since `cutoff` (ms), or whose token was revoked.
pub fn idle_since(conn: &Connection, cutoff: i64) -> rusqlite::Result<Vec<SessionRecord>> {
    select_where(
        conn,
        "status = 'open' AND (last_used_at < ?1
           OR token_id IN (SELECT id FROM tokens WHERE revoked_at IS NOT NULL))",
        [cutoff],
    )
}

/// Sessions closed before `cutoff` (ms).
pub fn closed_before(conn: &Connection, cutoff: i64) -> rusqlite::Result<Vec<SessionRecord>> {
    select_where(conn, "status = 'closed' AND closed_at < ?1", [cutoff])
}

/// The ids of every open session, pooled ones included (their dirs are in use).
pub fn open_ids(conn: &Connection) -> rusqlite::Result<std::collections::HashSet<String>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT id FROM sessions WHERE status IN ('open', '{POOLED}', '{WARMING}')"
    ))?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    rows.collect()
}

/// Counts a turn as started (and as use, for the idle TTL); returns its index, or `None`
/// if the session is no longer open.
pub fn begin_turn(conn: &Connection, id: &str, now: i64) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "UPDATE sessions SET turn_count = turn_count + 1, last_used_at = ?2
         WHERE id = ?1 AND status = 'open' RETURNING turn_count",
        params![id, now],
        |r| r.get(0),
    )
    .optional()
}

/// Records the end of a turn: its time (a long turn is use until it ends) and the agent's
/// cumulative cost.
pub fn end_turn(conn: &Connection, id: &str, now: i64, cost_total: f64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE sessions SET last_used_at = max(last_used_at, ?2), cost_total = ?3 WHERE id = ?1",
        params![id, now, cost_total],
    )?;
    Ok(())
}

pub fn mark_closed(conn: &Connection, id: &str, now: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE sessions SET status = 'closed', closed_at = ?2 WHERE id = ?1 AND status = 'open'",
        params![id, now],
    )?;
    Ok(())
}

pub fn delete(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM sessions WHERE id = ?1", [id])?;
    Ok(())
}
/// Status of a session made ahead of time and ready to be taken; `token_id` is empty.
pub const POOLED: &str = "pooled";
/// Status of a pooled session whose agent is still being started: not taken yet.
pub const WARMING: &str = "warming";

/// Hands the oldest pooled session for `agent` and `model` with no system prompt to
/// `token_id`, as if created `now`; `None` when there is none.
pub fn take_pooled(
    conn: &Connection,
    token_id: &str,
    agent: &str,
    model: &str,
    now: i64,
) -> rusqlite::Result<Option<SessionRecord>> {
    conn.query_row(
        &format!(
            "UPDATE sessions SET token_id = ?1, status = 'open', created_at = ?4, last_used_at = ?4
             WHERE id = (SELECT id FROM sessions
                         WHERE status = '{POOLED}' AND agent = ?2 AND model = ?3
                           AND system_prompt IS NULL
                         ORDER BY created_at, id LIMIT 1)
             RETURNING {COLUMNS}"
        ),
        params![token_id, agent, model, now],
        from_row,
    )
    .optional()
}

/// A warming session is ready to be taken.
pub fn mark_pooled(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute(
        &format!("UPDATE sessions SET status = '{POOLED}' WHERE id = ?1 AND status = '{WARMING}'"),
        [id],
    )?;
    Ok(())
}

/// Every pooled or warming session.
pub fn pooled(conn: &Connection) -> rusqlite::Result<Vec<SessionRecord>> {
    select_where(conn, &format!("status IN ('{POOLED}', '{WARMING}')"), [])
}

/// Deletes pooled or warming session `id` unless it was taken; whether it was deleted.
pub fn delete_pooled(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    let n = conn.execute(
        &format!("DELETE FROM sessions WHERE id = ?1 AND status IN ('{POOLED}', '{WARMING}')"),
        [id],
    )?;
    Ok(n > 0)
}
