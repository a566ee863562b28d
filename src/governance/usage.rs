//! The usage ledger: requests, tokens and dollars per app token, UTC day and model, in
//! `usage_daily`. `audit::complete` adds to it in the transaction that closes a run's or
//! turn's audit row, so every path that finishes work (runs here, turns on the sessions
//! side) is metered from the same numbers the audit row records, exactly once.
//!
//! Why a table rather than sums over `audit`: budgets are checked before every spawn and
//! must stay cheap however long the log grows, and usage must outlive
//! `CLAWDFORGE_AUDIT_RETENTION_DAYS`.

use rusqlite::{params, Connection};
use serde::Serialize;
use time::macros::format_description;
use time::{Date, OffsetDateTime};

/// One finished run or turn, as metered.
#[derive(Debug, Clone)]
pub struct UsageEvent<'a> {
    pub token_id: &'a str,
    pub model: &'a str,
    /// `YYYY-MM-DD` (UTC) of when the work finished.
    pub day: &'a str,
    pub cost_usd: f64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

/// Adds one request and its cost and tokens to the ledger.
pub fn record(conn: &Connection, e: &UsageEvent<'_>) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO usage_daily (token_id, day, model, requests, input_tokens, output_tokens,
                                  cost_usd)
         VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6)
         ON CONFLICT (token_id, day, model) DO UPDATE SET
             requests = requests + 1,
             input_tokens = input_tokens + excluded.input_tokens,
             output_tokens = output_tokens + excluded.output_tokens,
             cost_usd = cost_usd + excluded.cost_usd",
    )?;
    stmt.execute(params![
        e.token_id,
        e.day,
        e.model,
        e.input_tokens,
        e.output_tokens,
        e.cost_usd
    ])?;
    Ok(())
}

/// The UTC day of a unix-milliseconds instant, as `YYYY-MM-DD`.
pub fn day_of(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .map(|t| format_day(t.date()))
        .unwrap_or_default()
}

pub fn format_day(d: Date) -> String {
    d.format(format_description!("[year]-[month]-[day]"))
        .unwrap_or_default()
}

/// Parses `YYYY-MM-DD` (a real calendar day).
pub fn parse_day(s: &str) -> Option<Date> {
    Date::parse(s, format_description!("[year]-[month]-[day]")).ok()
}

/// `YYYY-MM-01` of the month `day` (`YYYY-MM-DD`) is in.
pub fn month_start(day: &str) -> String {
    format!("{}-01", &day[..day.len().min(7)])
}

/// Sums of a stretch of the ledger.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Totals {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
}

impl<'a> std::iter::Sum<&'a Totals> for Totals {
    fn sum<I: Iterator<Item = &'a Totals>>(iter: I) -> Totals {
        iter.fold(Totals::default(), |mut sum, t| {
            sum.requests += t.requests;
            sum.input_tokens += t.input_tokens;
            sum.output_tokens += t.output_tokens;
            sum.cost_usd += t.cost_usd;
            sum
        })
    }
}

const SUMS: &str = "coalesce(sum(requests), 0), coalesce(sum(input_tokens), 0),
                    coalesce(sum(output_tokens), 0), coalesce(sum(cost_usd), 0.0)";

fn totals_at(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Totals> {
    Ok(Totals {
        requests: r.get(first)?,
        input_tokens: r.get(first + 1)?,
        output_tokens: r.get(first + 2)?,
        cost_usd: r.get(first + 3)?,
    })
}

/// Totals of one token over `from..=to` (days as `YYYY-MM-DD`, which sort as dates).
pub fn totals(conn: &Connection, token_id: &str, from: &str, to: &str) -> rusqlite::Result<Totals> {
    conn.prepare_cached(&format!(
        "SELECT {SUMS} FROM usage_daily WHERE token_id = ?1 AND day >= ?2 AND day <= ?3"
    ))?
    .query_row(params![token_id, from, to], |r| totals_at(r, 0))
}

/// Dollars one token spent on `today` and in its month: what budgets are checked against.
pub fn spent(conn: &Connection, token_id: &str, today: &str) -> rusqlite::Result<(f64, f64)> {
    let day = totals(conn, token_id, today, today)?.cost_usd;
    let month = totals(conn, token_id, &month_start(today), today)?.cost_usd;
    Ok((day, month))
}

/// A group of the ledger: a day, a model, or a token.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Group {
    pub key: String,
    #[serde(flatten)]
    pub totals: Totals,
}

/// One token's totals over `from..=to`, grouped by `day` or by `model`, in key order.
pub fn grouped(
    conn: &Connection,
    token_id: &str,
    from: &str,
    to: &str,
    by: By,
) -> rusqlite::Result<Vec<Group>> {
    let column = match by {
        By::Day => "day",
        By::Model => "model",
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {column}, {SUMS} FROM usage_daily
         WHERE token_id = ?1 AND day >= ?2 AND day <= ?3
         GROUP BY {column} ORDER BY {column}"
    ))?;
    let rows = stmt.query_map(params![token_id, from, to], |r| {
        Ok(Group {
            key: r.get(0)?,
            totals: totals_at(r, 1)?,
        })
    })?;
    rows.collect()
}

#[derive(Debug, Clone, Copy)]
pub enum By {
    Day,
    Model,
}

/// A ledger row as `GET /admin/usage` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LedgerRow {
    pub token_id: String,
    /// The token's name (`null` if the token row is gone).
    pub token_name: Option<String>,
    pub day: String,
    pub model: String,
    #[serde(flatten)]
    pub totals: Totals,
}

/// Ledger rows over `from..=to`, optionally of one token, by day, token and model.
pub fn rows(
    conn: &Connection,
    token_id: Option<&str>,
    from: &str,
    to: &str,
) -> rusqlite::Result<Vec<LedgerRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT u.token_id, t.name, u.day, u.model,
                u.requests, u.input_tokens, u.output_tokens, u.cost_usd
         FROM usage_daily u LEFT JOIN tokens t ON t.id = u.token_id
         WHERE (?1 IS NULL OR u.token_id = ?1) AND u.day >= ?2 AND u.day <= ?3
         ORDER BY u.day, u.token_id, u.model",
    )?;
    let rows = stmt.query_map(params![token_id, from, to], |r| {
        Ok(LedgerRow {
            token_id: r.get(0)?,
            token_name: r.get(1)?,
            day: r.get(2)?,
            model: r.get(3)?,
            totals: totals_at(r, 4)?,
        })
    })?;
    rows.collect()
}

/// All-time totals per token (for `/metrics`): (token id, token name, totals).
pub fn per_token(conn: &Connection) -> rusqlite::Result<Vec<(String, String, Totals)>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT u.token_id, coalesce(t.name, ''), {SUMS}
         FROM usage_daily u LEFT JOIN tokens t ON t.id = u.token_id
         GROUP BY u.token_id ORDER BY u.token_id"
    ))?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, totals_at(r, 2)?)))?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_months() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_763_733_221_123), "2025-11-21");
        assert_eq!(month_start("2025-11-21"), "2025-11-01");
        assert!(parse_day("2025-02-29").is_none());
        assert!(parse_day("2024-02-29").is_some());
        assert!(parse_day("2024-2-9").is_none());
    }

    #[test]
    fn record_adds_up() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(include_str!("../store/migrations/0001_init.sql"))
            .unwrap();
        conn.execute_batch(include_str!("../store/migrations/0004_governance.sql"))
            .unwrap();
        let tx = conn.transaction().unwrap();
        for (day, model, cost) in [
            ("2025-11-20", "sonnet", 0.5),
            ("2025-11-21", "sonnet", 0.25),
            ("2025-11-21", "sonnet", 0.25),
            ("2025-11-21", "haiku", 0.125),
        ] {
            record(
                &tx,
                &UsageEvent {
                    token_id: "tok_a",
                    model,
                    day,
                    cost_usd: cost,
                    input_tokens: 10,
                    output_tokens: 1,
                },
            )
            .unwrap();
        }
        tx.commit().unwrap();
        assert_eq!(spent(&conn, "tok_a", "2025-11-21").unwrap(), (0.625, 1.125));
        assert_eq!(spent(&conn, "tok_b", "2025-11-21").unwrap(), (0.0, 0.0));
        let by_model = grouped(&conn, "tok_a", "2025-11-01", "2025-11-30", By::Model).unwrap();
        assert_eq!(by_model.len(), 2);
        assert_eq!(
            (by_model[1].key.as_str(), by_model[1].totals.requests),
            ("sonnet", 3)
        );
        assert_eq!(
            rows(&conn, None, "2025-11-21", "2025-11-21").unwrap().len(),
            2
        );
    }
}
