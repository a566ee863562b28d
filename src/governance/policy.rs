//! Token policy: the limits an operator sets per app token, parsed once at the edge (HTTP
//! bodies and `tokens mint` flags share the newtypes below) and stored as columns of
//! `tokens`. `PATCH /admin/tokens/{id}` semantics live here too: an omitted field keeps its
//! value, `null` clears it, anything else replaces it.

use std::str::FromStr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::SessionPermissions;
use crate::runner::invocation::Tools;

/// A token's policy as stored and shown. `None` means no limit (for `default_model` and
/// `session_permissions`: the server's setting).
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Policy {
    /// Client CIDRs the token may be used from, on top of `ALLOW_CIDRS`; empty: any.
    pub ip_cidrs: Vec<String>,
    pub budget_usd_per_day: Option<f64>,
    pub budget_usd_per_month: Option<f64>,
    /// Runs and turns of this token in flight at once (queued or running).
    pub max_concurrent: Option<u32>,
    /// Runs and turns admitted per sliding minute.
    pub rate_per_min: Option<u32>,
    pub allowed_models: Option<Vec<String>>,
    pub default_model: Option<String>,
    #[schema(value_type = Option<String>, example = "approve-reads")]
    pub session_permissions: Option<SessionPermissions>,
    #[serde(serialize_with = "crate::util::ser_opt_rfc3339")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<i64>,
    /// Tools a run may ask for (`"none"`, `"default"` or names); a run naming none gets
    /// these. `None`: any.
    pub allowed_tools: Option<Tools>,
    /// Open sessions at once; `POST /sessions` beyond it answers 429 `overloaded`.
    pub max_open_sessions: Option<u32>,
    /// Bytes of this token's unexpired uploads; an upload that would pass it answers 413.
    pub max_upload_bytes_stored: Option<u64>,
}

impl Policy {
    /// Whether the token has passed its `expires_at` (the instant itself counts as expired).
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_at.is_some_and(|at| now_ms >= at)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|m| m == model))
    }
}

/// A dollar amount: finite and not negative (0 means nothing may be spent).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "f64")]
pub struct Usd(pub f64);

impl TryFrom<f64> for Usd {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if v.is_finite() && v >= 0.0 {
            Ok(Usd(v))
        } else {
            Err(format!("{v} is not a budget: use a number of dollars >= 0"))
        }
    }
}

impl FromStr for Usd {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse::<f64>()
            .map_err(|_| format!("'{s}' is not a number"))
            .and_then(Usd::try_from)
    }
}

/// A positive count (`max_concurrent`, `rate_per_min`); 0 would only lock the token out,
/// which revoking does more honestly.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "u64")]
pub struct Count(pub u32);

impl TryFrom<u64> for Count {
    type Error = String;
    fn try_from(v: u64) -> Result<Self, String> {
        match u32::try_from(v) {
            Ok(n) if (1..=1_000_000).contains(&n) => Ok(Count(n)),
            _ => Err(format!("{v} is out of range: use 1..1000000")),
        }
    }
}

impl FromStr for Count {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("'{s}' is not a whole number"))
            .and_then(Count::try_from)
    }
}

/// A positive number of bytes (`max_upload_bytes_stored`), at most what SQLite's integer
/// holds.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "u64")]
pub struct ByteCount(pub u64);

impl TryFrom<u64> for ByteCount {
    type Error = String;
    fn try_from(v: u64) -> Result<Self, String> {
        if (1..=i64::MAX as u64).contains(&v) {
            Ok(ByteCount(v))
        } else {
            Err(format!("{v} is out of range: use a number of bytes >= 1"))
        }
    }
}

/// Whether `s` is a model name or alias as the CLI takes it (`sonnet`,
/// `claude-sonnet-4-5-20250929`, `us.anthropic.claude...:0`) and safe in argv.
pub fn valid_model(s: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._:-/@[]".contains(c);
    !s.is_empty() && s.len() <= 128 && !s.starts_with('-') && s.chars().all(ok_char)
}

pub const MODEL_RULE: &str = "model must be 1 to 128 characters of A-Z a-z 0-9 . _ : - / @ [ ]";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct ModelName(pub String);

impl TryFrom<String> for ModelName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if valid_model(&s) {
            Ok(ModelName(s))
        } else {
            Err(MODEL_RULE.into())
        }
    }
}

impl FromStr for ModelName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ModelName::try_from(s.to_string())
    }
}

/// `allowed_models`: a non-empty list (an empty one would refuse every request; `null`
/// means any model).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Vec<ModelName>")]
pub struct ModelList(pub Vec<String>);

impl TryFrom<Vec<ModelName>> for ModelList {
    type Error = String;
    fn try_from(v: Vec<ModelName>) -> Result<Self, String> {
        if v.is_empty() {
            return Err("allowed_models must not be empty (null allows every model)".into());
        }
        let mut names: Vec<String> = v.into_iter().map(|m| m.0).collect();
        names.dedup();
        Ok(ModelList(names))
    }
}

/// A CIDR, kept in its canonical text form.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr(pub String);

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.trim()
            .parse::<IpNetwork>()
            .map(|n| Cidr(n.to_string()))
            .map_err(|_| format!("'{s}' is not a CIDR"))
    }
}

impl From<IpNetwork> for Cidr {
    fn from(n: IpNetwork) -> Self {
        Cidr(n.to_string())
    }
}

/// An RFC 3339 instant (`2026-12-31T23:59:59Z`), held as unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct Rfc3339(pub i64);

impl TryFrom<String> for Rfc3339 {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::util::parse_rfc3339(&s)
            .map(Rfc3339)
            .ok_or_else(|| format!("'{s}' is not an RFC 3339 time such as 2026-12-31T23:59:59Z"))
    }
}

impl FromStr for Rfc3339 {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Rfc3339::try_from(s.to_string())
    }
}

/// `Some(None)` for an explicit `null`, `Some(Some(v))` for a value; with
/// `#[serde(default)]` an omitted field stays `None`.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Policy fields as a mint or PATCH body carries them: omitted (`None`), `null`
/// (`Some(None)`) or a value (`Some(Some(_))`). Unknown fields are refused.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyPatch {
    /// CIDRs the token may be used from (on top of ALLOW_CIDRS); null or [] = any.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Vec<String>>)]
    pub ip_cidrs: Option<Option<Vec<Cidr>>>,
    /// Dollars per UTC day; spent >= budget answers 402.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<f64>)]
    pub budget_usd_per_day: Option<Option<Usd>>,
    /// Dollars per UTC calendar month.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<f64>)]
    pub budget_usd_per_month: Option<Option<Usd>>,
    /// Runs and turns in flight at once, 1..1000000.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u32>)]
    pub max_concurrent: Option<Option<Count>>,
    /// Runs and turns admitted per sliding minute, 1..1000000.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u32>)]
    pub rate_per_min: Option<Option<Count>>,
    /// Non-empty list of model names; null = any model.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allowed_models: Option<Option<ModelList>>,
    /// Model for requests naming none; must be in allowed_models.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub default_model: Option<Option<ModelName>>,
    /// Approve-reads, approve-all or deny-all; null = CLAWDFORGE_SESSION_PERMISSIONS.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub session_permissions: Option<Option<SessionPermissions>>,
    /// RFC 3339; from then on the token answers 401.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Option<Rfc3339>>,
    /// "none", "default" or a list of built-in tool names; null = any.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Tools>)]
    pub allowed_tools: Option<Option<Tools>>,
    /// Open sessions at once, 1..1000000; beyond it POST /sessions answers 429.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 1000000)]
    pub max_open_sessions: Option<Option<Count>>,
    /// Bytes of unexpired uploads the token may hold, >= 1; beyond it POST /files is 413.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<u64>, minimum = 1)]
    pub max_upload_bytes_stored: Option<Option<ByteCount>>,
}

/// Writes a present field into its slot, noting its name.
fn put<T, U>(
    name: &'static str,
    field: Option<Option<T>>,
    slot: &mut Option<U>,
    map: impl FnOnce(T) -> U,
    changed: &mut Vec<&'static str>,
) {
    if let Some(value) = field {
        *slot = value.map(map);
        changed.push(name);
    }
}

impl PolicyPatch {
    /// Applies the patch to `policy`, returning the names of the fields it set or cleared.
    /// Refuses a result whose `default_model` is not among its `allowed_models`, since every
    /// request relying on the default would then be refused.
    pub fn apply(self, policy: &mut Policy) -> Result<Vec<&'static str>, String> {
        let mut next = policy.clone();
        let mut changed = Vec::new();
        if let Some(cidrs) = self.ip_cidrs {
            next.ip_cidrs = cidrs.unwrap_or_default().into_iter().map(|c| c.0).collect();
            changed.push("ip_cidrs");
        }
        let p = &mut next;
        let c = &mut changed;
        put(
            "budget_usd_per_day",
            self.budget_usd_per_day,
            &mut p.budget_usd_per_day,
            |u| u.0,
            c,
        );
        put(
            "budget_usd_per_month",
            self.budget_usd_per_month,
            &mut p.budget_usd_per_month,
            |u| u.0,
            c,
        );
        put(
            "max_concurrent",
            self.max_concurrent,
            &mut p.max_concurrent,
            |n| n.0,
            c,
        );
        put(
            "rate_per_min",
            self.rate_per_min,
            &mut p.rate_per_min,
            |n| n.0,
            c,
        );
        put(
            "allowed_models",
            self.allowed_models,
            &mut p.allowed_models,
            |l| l.0,
            c,
        );
        put(
            "default_model",
            self.default_model,
            &mut p.default_model,
            |m| m.0,
            c,
        );
        put(
            "session_permissions",
            self.session_permissions,
            &mut p.session_permissions,
            |s| s,
            c,
        );
        put("expires_at", self.expires_at, &mut p.expires_at, |t| t.0, c);
        put(
            "allowed_tools",
            self.allowed_tools,
            &mut p.allowed_tools,
            Tools::normalised,
            c,
        );
        put(
            "max_open_sessions",
            self.max_open_sessions,
            &mut p.max_open_sessions,
            |n| n.0,
            c,
        );
        put(
            "max_upload_bytes_stored",
            self.max_upload_bytes_stored,
            &mut p.max_upload_bytes_stored,
            |n| n.0,
            c,
        );
        if let Some(default) = next
            .default_model
            .as_deref()
            .filter(|m| !next.allows_model(m))
        {
            return Err(format!(
                "default_model '{default}' is not one of allowed_models"
            ));
        }
        *policy = next;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patch(v: serde_json::Value) -> Result<PolicyPatch, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn omitted_keeps_null_clears_value_sets() {
        let mut p = Policy {
            budget_usd_per_day: Some(1.0),
            rate_per_min: Some(5),
            ..Policy::default()
        };
        let changed = patch(json!({"budget_usd_per_day": null, "max_concurrent": 2}))
            .unwrap()
            .apply(&mut p)
            .unwrap();
        assert_eq!(changed, ["budget_usd_per_day", "max_concurrent"]);
        assert_eq!(
            (p.budget_usd_per_day, p.max_concurrent, p.rate_per_min),
            (None, Some(2), Some(5))
        );
    }

    #[test]
    fn bad_values_and_unknown_fields_are_refused() {
        for bad in [
            json!({"budget_usd_per_day": -1}),
            json!({"max_concurrent": 0}),
            json!({"rate_per_min": -3}),
            json!({"allowed_models": []}),
            json!({"default_model": "--evil"}),
            json!({"session_permissions": "approve-some"}),
            json!({"expires_at": "tomorrow"}),
            json!({"ip_cidrs": ["10.0.0.0/33"]}),
            json!({"budget": 1}),
            json!({"max_open_sessions": 0}),
            json!({"max_upload_bytes_stored": 0}),
            json!({"max_upload_bytes_stored": -5}),
        ] {
            assert!(patch(bad.clone()).is_err(), "{bad}");
        }
        let mut p = Policy::default();
        let err = patch(json!({"allowed_models": ["haiku"], "default_model": "opus"}))
            .unwrap()
            .apply(&mut p)
            .unwrap_err();
        assert!(err.contains("default_model"), "{err}");
        assert_eq!(p, Policy::default(), "a refused patch changes nothing");
    }

    #[test]
    fn expiry_and_models() {
        let p = Policy {
            expires_at: Some(1000),
            allowed_models: Some(vec!["haiku".into()]),
            ..Policy::default()
        };
        assert!(!p.expired(999) && p.expired(1000));
        assert!(p.allows_model("haiku") && !p.allows_model("opus"));
        assert!(Policy::default().allows_model("anything"));
    }
}
