//! `GET /usage`: the calling token's own usage and what is left of its budgets.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use serde::Serialize;

use crate::app::AppState;
use crate::error::ApiResult;
use crate::governance::usage::{self, By, Totals};
use crate::http::extract::AppCaller;
use crate::http::ok;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DayUsage {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    #[serde(flatten)]
    pub totals: Totals,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MonthUsage {
    /// `YYYY-MM`, UTC.
    pub month: String,
    #[serde(flatten)]
    pub totals: Totals,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelUsage {
    pub model: String,
    #[serde(flatten)]
    pub totals: Totals,
}

/// The token's budgets and what is left of them (`null`: no such budget).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BudgetState {
    pub usd_per_day: Option<f64>,
    pub usd_per_month: Option<f64>,
    pub remaining_today: Option<f64>,
    pub remaining_this_month: Option<f64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageSummary {
    pub token_id: String,
    pub today: DayUsage,
    pub month: MonthUsage,
    /// This month, oldest day first (days without use are left out).
    pub by_day: Vec<DayUsage>,
    /// This month.
    pub by_model: Vec<ModelUsage>,
    pub budget: BudgetState,
}

pub async fn usage(
    caller: AppCaller,
    State(state): State<Arc<AppState>>,
) -> ApiResult<impl IntoResponse> {
    let today = usage::day_of(crate::util::now_ms());
    let month_start = usage::month_start(&today);
    let token_id = caller.token.id.clone();
    let (id, t, m) = (token_id.clone(), today.clone(), month_start.clone());
    let (by_day, by_model) = state
        .db
        .read(move |c| {
            Ok((
                usage::grouped(c, &id, &m, &t, By::Day)?,
                usage::grouped(c, &id, &m, &t, By::Model)?,
            ))
        })
        .await?;
    let month_totals: Totals = by_day.iter().map(|g| &g.totals).sum();
    let today_totals = by_day
        .iter()
        .find(|g| g.key == today)
        .map(|g| g.totals.clone())
        .unwrap_or_default();
    let policy = &caller.token.policy;
    let left = |budget: Option<f64>, spent: f64| budget.map(|b| (b - spent).max(0.0));
    Ok(ok(UsageSummary {
        budget: BudgetState {
            usd_per_day: policy.budget_usd_per_day,
            usd_per_month: policy.budget_usd_per_month,
            remaining_today: left(policy.budget_usd_per_day, today_totals.cost_usd),
            remaining_this_month: left(policy.budget_usd_per_month, month_totals.cost_usd),
        },
        token_id,
        today: DayUsage {
            day: today,
            totals: today_totals,
        },
        month: MonthUsage {
            month: month_start[..7].to_string(),
            totals: month_totals,
        },
        by_day: by_day
            .into_iter()
            .map(|g| DayUsage {
                day: g.key,
                totals: g.totals,
            })
            .collect(),
        by_model: by_model
            .into_iter()
            .map(|g| ModelUsage {
                model: g.key,
                totals: g.totals,
            })
            .collect(),
    }))
}
