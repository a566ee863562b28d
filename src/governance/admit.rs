//! Admission of runs and turns: [`Admitter::admit`] is the one gate between a parsed request and a
//! spawned agent. In order (cheap and global first, each refusal before anything is
//! counted against the token):
//! 1. the subscription's usage limit, when the CLI reported one → 429 `usage_limit`;
//! 2. the token's `allowed_models` → 403;
//! 3. its daily and monthly budgets against the usage ledger → 402 `budget_exhausted`;
//! 4. its `max_concurrent` (runs and turns in flight, queued or running) → 429 `overloaded`;
//! 5. its `rate_per_min` over a sliding minute → 429 `rate_limited`;
//! 6. a global slot (`slots`), waiting in line; after the wait, 1 and 3 are checked again.
//!
//! The overspend bound: the ledger grows only when work finishes, so work admitted while the
//! token was under budget may still finish over it. Because the budget is re-checked once a
//! slot is held, everything admitted before the budget was crossed was already *running*
//! then: a token overspends by at most the cost of its runs and turns running at the moment
//! its budget is crossed — at most `max_concurrent` (or `CLAWDFORGE_MAX_CONCURRENT`) of them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::tokens::TokenRecord;
use crate::error::ApiError;
use crate::governance::usage;
use crate::slots::{Slot, Slots};
use crate::store::Db;
use crate::util::now_ms;

/// The window `rate_per_min` counts over.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// In-memory admission state: per-token work in flight and recent admissions, and the
/// instant until which the CLI's usage limit holds. Cheap to clone.
#[derive(Clone, Default)]
pub struct Governor {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    tokens: HashMap<String, TokenLoad>,
    blocked_until: Option<Instant>,
}

#[derive(Default)]
struct TokenLoad {
    in_flight: u32,
    /// When each admission inside the last `RATE_WINDOW` happened, oldest first.
    recent: VecDeque<Instant>,
}

impl TokenLoad {
    fn forget_before(&mut self, cutoff: Option<Instant>) {
        while self
            .recent
            .front()
            .is_some_and(|t| cutoff.is_some_and(|c| *t <= c))
        {
            self.recent.pop_front();
        }
    }
}

/// Whole seconds until `d` has passed, at least 1 (the value of `Retry-After`).
fn ceil_secs(d: Duration) -> u64 {
    (d.as_millis().div_ceil(1000) as u64).max(1)
}

impl Governor {
    /// The counters are plain numbers that stay consistent at every await-free step, so a
    /// panic elsewhere while the lock was held leaves nothing half-written: go on using them.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses new work until `d` from now (extending, never shortening, a block).
    pub fn block_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut inner = self.lock();
        if inner.blocked_until.is_none_or(|b| b < until) {
            inner.blocked_until = Some(until);
        }
    }

    /// Looks at how a run or turn failed: a usage limit with a reset time blocks new runs
    /// and turns until then, without spawning anything that would only fail the same way.
    pub fn block_on_usage_limit(&self, err: &ApiError) {
        if let ApiError::UsageLimit {
            retry_after_secs, ..
        } = err
        {
            tracing::warn!(
                retry_after_secs,
                "the CLI reported a usage limit; refusing runs and turns until it resets"
            );
            self.block_for(Duration::from_secs(*retry_after_secs));
        }
    }

    /// `Err(usage_limit)` while a usage limit holds.
    pub fn check_blocked(&self) -> Result<(), ApiError> {
        let now = Instant::now();
        match self.lock().blocked_until {
            Some(until) if until > now => Err(ApiError::UsageLimit {
                message: "the Claude usage limit is reached; it resets at the time Retry-After \
                          gives"
                    .into(),
                retry_after_secs: ceil_secs(until - now),
            }),
            _ => Ok(()),
        }
    }

    /// Runs and turns of `token_id` in flight now.
    pub fn in_flight(&self, token_id: &str) -> u32 {
        self.lock().tokens.get(token_id).map_or(0, |l| l.in_flight)
    }

    /// Counts one more piece of work for the token if its concurrency and rate allow.
    fn enter(
        &self,
        token_id: &str,
        max_concurrent: Option<u32>,
        rate_per_min: Option<u32>,
    ) -> Result<InFlight, ApiError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let live = inner.tokens.entry(token_id.to_string()).or_default();
        if let Some(limit) = max_concurrent.filter(|l| live.in_flight >= *l) {
            return Err(ApiError::TokenOverloaded { limit });
        }
        live.forget_before(now.checked_sub(RATE_WINDOW));
        if let Some(rate) = rate_per_min {
            if live.recent.len() >= rate as usize {
                let oldest = live.recent.front().copied().unwrap_or(now);
                return Err(ApiError::RateLimited {
                    retry_after_secs: ceil_secs(
                        (oldest + RATE_WINDOW).saturating_duration_since(now),
                    ),
                });
            }
            live.recent.push_back(now);
        }
        live.in_flight += 1;
        Ok(InFlight {
            governor: self.clone(),
            token_id: token_id.to_string(),
        })
    }
}

/// One run or turn counted against its token's `max_concurrent` until dropped.
pub struct InFlight {
    governor: Governor,
    token_id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut inner = self.governor.lock();
        let Some(live) = inner.tokens.get_mut(&self.token_id) else {
            return;
        };
        live.in_flight = live.in_flight.saturating_sub(1);
        live.forget_before(Instant::now().checked_sub(RATE_WINDOW));
        // Idle tokens leave no entry behind, so the map holds only tokens in use.
        if live.in_flight == 0 && live.recent.is_empty() {
            inner.tokens.remove(&self.token_id);
        }
    }
}

/// Permission to spawn one agent process: a global slot and the token's in-flight count,
/// both released when this is dropped (when the run or turn ends, however it ends).
pub struct Admission {
    _slot: Slot,
    _in_flight: InFlight,
}

/// The gate every run and turn passes before spawning, with the handles it checks: the
/// usage ledger (budgets), the governor (usage-limit block, per-token concurrency and
/// rate) and the global slots.
#[derive(Clone)]
pub struct Admitter {
    db: Db,
    governor: Governor,
    slots: Slots,
}

impl Admitter {
    pub fn new(db: Db, governor: Governor, slots: Slots) -> Admitter {
        Admitter {
            db,
            governor,
            slots,
        }
    }

    /// See the module comment for the order of checks and the budget's overspend bound.
    /// `model` is the model the work will use (the request's, else the token's
    /// `default_model`, else the server's).
    pub async fn admit(&self, token: &TokenRecord, model: &str) -> Result<Admission, ApiError> {
        self.governor.check_blocked()?;
        if !token.policy.allows_model(model) {
            return Err(ApiError::Forbidden(format!(
                "this token may not use model '{model}'"
            )));
        }
        self.check_budget(token).await?;
        let in_flight = self.governor.enter(
            &token.id,
            token.policy.max_concurrent,
            token.policy.rate_per_min,
        )?;
        let slot = self.slots.acquire().await?;
        // The wait in line may have been long: what was true before it may not be now.
        self.governor.check_blocked()?;
        self.check_budget(token).await?;
        Ok(Admission {
            _slot: slot,
            _in_flight: in_flight,
        })
    }

    /// A global slot for work no token asked for (making a pooled session): it waits in
    /// line like any run, but no token's limits apply.
    pub async fn unmetered_slot(&self) -> Result<Slot, ApiError> {
        self.slots.acquire().await
    }

    /// 402 when the token has spent its daily or monthly budget (UTC day and month).
    async fn check_budget(&self, token: &TokenRecord) -> Result<(), ApiError> {
        let (per_day, per_month) = (
            token.policy.budget_usd_per_day,
            token.policy.budget_usd_per_month,
        );
        if per_day.is_none() && per_month.is_none() {
            return Ok(());
        }
        let today = usage::day_of(now_ms());
        let id = token.id.clone();
        let (day, month) = self.db.read(move |c| usage::spent(c, &id, &today)).await?;
        if let Some(budget) = per_day.filter(|b| day >= *b) {
            return Err(ApiError::BudgetExhausted(format!(
                "this token's daily budget of ${budget} is spent (${day:.6} today); it renews at \
                 00:00 UTC"
            )));
        }
        if let Some(budget) = per_month.filter(|b| month >= *b) {
            return Err(ApiError::BudgetExhausted(format!(
                "this token's monthly budget of ${budget} is spent (${month:.6} this month); it \
                 renews on the 1st, 00:00 UTC"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token that breaks every rule at once, and the refusal each step gives once the
    /// rules before it are lifted: the module comment's order.
    #[tokio::test]
    async fn admission_checks_run_in_order() {
        use crate::governance::policy::Policy;
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).unwrap();
        let mut token = TokenRecord {
            id: "tok_t".into(),
            name: "t".into(),
            policy: Policy {
                allowed_models: Some(vec!["opus".into()]),
                budget_usd_per_day: Some(0.0),
                max_concurrent: Some(0),
                rate_per_min: Some(0),
                ..Policy::default()
            },
            created_at: 0,
            last_used_at: None,
            revoked_at: None,
        };
        let slots = Slots::new(1, 0, Duration::from_millis(50));
        let _held = slots.acquire().await.unwrap();
        let admitter = |g: &Governor| Admitter::new(db.clone(), g.clone(), slots.clone());
        let code = |r: Result<Admission, ApiError>| r.err().map(|e| e.code());

        let blocked = Governor::default();
        blocked.block_for(Duration::from_secs(60));
        let g = Governor::default();
        let steps: [(&Governor, &str); 2] = [(&blocked, "usage_limit"), (&g, "forbidden")];
        for (governor, want) in steps {
            assert_eq!(
                code(admitter(governor).admit(&token, "sonnet").await),
                Some(want)
            );
        }
        token.policy.allowed_models = None;
        assert_eq!(
            code(admitter(&g).admit(&token, "sonnet").await),
            Some("budget_exhausted")
        );
        token.policy.budget_usd_per_day = None;
        assert!(matches!(
            admitter(&g).admit(&token, "sonnet").await,
            Err(ApiError::TokenOverloaded { limit: 0 })
        ));
        token.policy.max_concurrent = None;
        assert_eq!(
            code(admitter(&g).admit(&token, "sonnet").await),
            Some("rate_limited")
        );
        token.policy.rate_per_min = None;
        // Last, the global slot: the only one is held and nobody may queue.
        assert!(matches!(
            admitter(&g).admit(&token, "sonnet").await,
            Err(ApiError::Overloaded { .. })
        ));
        assert_eq!(g.in_flight("tok_t"), 0, "a refusal leaves nothing counted");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_window_slides() {
        let g = Governor::default();
        let a = g.enter("t", None, Some(2)).unwrap();
        tokio::time::advance(Duration::from_secs(20)).await;
        let b = g.enter("t", None, Some(2)).unwrap();
        drop((a, b));
        // Two in the last minute: the third waits until the first is a minute old.
        match g.enter("t", None, Some(2)) {
            Err(ApiError::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 40),
            other => panic!("{:?}", other.err()),
        }
        tokio::time::advance(Duration::from_secs(40)).await;
        assert!(g.enter("t", None, Some(2)).is_ok());
        // Another token has its own window.
        assert!(g.enter("u", None, Some(2)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_counts_until_drop() {
        let g = Governor::default();
        let a = g.enter("t", Some(1), None).unwrap();
        assert_eq!(g.in_flight("t"), 1);
        assert!(matches!(
            g.enter("t", Some(1), None),
            Err(ApiError::TokenOverloaded { limit: 1 })
        ));
        drop(a);
        assert_eq!(g.in_flight("t"), 0);
        assert!(
            g.inner.lock().unwrap().tokens.is_empty(),
            "idle tokens leave no entry"
        );
        assert!(g.enter("t", Some(1), None).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn usage_limit_blocks_until_reset() {
        let g = Governor::default();
        assert!(g.check_blocked().is_ok());
        g.block_on_usage_limit(&ApiError::UsageLimit {
            message: String::new(),
            retry_after_secs: 90,
        });
        tokio::time::advance(Duration::from_millis(500)).await;
        match g.check_blocked() {
            Err(ApiError::UsageLimit {
                retry_after_secs, ..
            }) => assert_eq!(retry_after_secs, 90),
            other => panic!("{other:?}"),
        }
        // A shorter report does not shorten the block.
        g.block_for(Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(89)).await;
        assert!(g.check_blocked().is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(g.check_blocked().is_ok());
    }
}
