//! Reading what `claude -p` prints: the final `result` object (json mode, or the last line of
//! stream-json mode), the answer with a surrounding Markdown fence removed and JSON-parsed
//! when it parses, and the CLI's errors mapped to the API's.

use serde_json::Value;

use crate::error::ApiError;

/// What the CLI's result object says, reduced to what the API reports.
#[derive(Debug, Clone, PartialEq)]
pub struct CliResult {
    pub is_error: bool,
    pub text: Option<String>,
    pub subtype: Option<String>,
    pub stop_reason: Option<String>,
    pub cost_usd: Option<f64>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub errors: Vec<String>,
    /// What the model gave the CLI's `StructuredOutput` tool (runs with `--json-schema`).
    pub structured_output: Option<Value>,
}

impl CliResult {
    /// No result at all (the work ended before the CLI printed one).
    pub fn empty() -> CliResult {
        CliResult {
            is_error: false,
            text: None,
            subtype: None,
            stop_reason: None,
            cost_usd: None,
            input_tokens: None,
            output_tokens: None,
            errors: Vec::new(),
            structured_output: None,
        }
    }
}

/// Parses one output line as a `{"type":"result",...}` object; `None` for anything else.
pub fn parse_result_line(line: &[u8]) -> Option<CliResult> {
    result_of(&serde_json::from_slice(line).ok()?)
}

/// The line, already parsed, as a `{"type":"result",...}` object; `None` for anything else.
pub fn result_of(v: &Value) -> Option<CliResult> {
    if v.get("type")?.as_str()? != "result" {
        return None;
    }
    let usage = v.get("usage");
    let int = |k: &str| usage.and_then(|u| u.get(k)).and_then(Value::as_i64);
    Some(CliResult {
        is_error: v.get("is_error").and_then(Value::as_bool).unwrap_or(false),
        text: v.get("result").and_then(Value::as_str).map(str::to_string),
        subtype: v.get("subtype").and_then(Value::as_str).map(str::to_string),
        stop_reason: v
            .get("stop_reason")
            .and_then(Value::as_str)
            .map(str::to_string),
        cost_usd: v.get("total_cost_usd").and_then(Value::as_f64),
        input_tokens: int("input_tokens"),
        output_tokens: int("output_tokens"),
        errors: v
            .get("errors")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        structured_output: v
            .get("structured_output")
            .filter(|s| s.is_object())
            .cloned(),
    })
}

/// For a run with a JSON Schema: the answer must be the structured output (the CLI reports
/// success with plain text when the model never called its `StructuredOutput` tool), and
/// it ended the turn (the CLI says `tool_use`, having answered that tool itself).
pub fn structured(mut r: CliResult, wanted: bool) -> Result<CliResult, ApiError> {
    if !wanted {
        return Ok(r);
    }
    let Some(out) = &r.structured_output else {
        return Err(ApiError::Upstream(
            "the model answered without the structured output the json_schema asks for".into(),
        ));
    };
    r.text = Some(out.to_string());
    r.stop_reason = Some("end_turn".into());
    Ok(r)
}

/// Removes one Markdown code fence surrounding the whole text (```` ```json ```` or bare
/// ```` ``` ````, with optional whitespace around), returning the inside.
pub fn strip_fence(text: &str) -> Option<&str> {
    let t = text.trim();
    let rest = t.strip_prefix("```")?;
    let inner = rest.strip_suffix("```")?;
    // The info string ("json", "JSON", "") runs to the first newline.
    let newline = inner.find('\n')?;
    let info = inner[..newline].trim();
    if info.contains(char::is_whitespace) || info.contains('`') {
        return None;
    }
    Some(inner[newline + 1..].trim_end_matches(['\n', '\r', ' ', '\t']))
}

/// The API's `result`: fence removed, then JSON when it parses, else the CLI's text as is.
pub fn answer_value(text: &str) -> Value {
    let candidate = strip_fence(text).unwrap_or(text);
    match serde_json::from_str::<Value>(candidate.trim()) {
        Ok(v) => v,
        Err(_) => Value::String(text.to_string()),
    }
}

/// A subscription limit reads like `Claude AI usage limit reached|1763740800`: the number
/// is when it resets (unix seconds).
pub fn usage_limit(text: &str, now_secs: i64) -> Option<ApiError> {
    let lower = text.to_ascii_lowercase();
    if !lower.contains("usage limit reached") && !lower.contains("limit reached|") {
        return None;
    }
    let reset = text
        .rsplit('|')
        .next()
        .and_then(|s| s.trim().parse::<i64>().ok());
    let retry_after_secs = match reset {
        // abs_diff: no overflow even for a reset time and a clock far apart.
        Some(at) if at > now_secs => at.abs_diff(now_secs),
        // No reset time given: a conservative hint rather than an immediate retry storm.
        _ => 60,
    };
    Some(ApiError::UsageLimit {
        message: match reset {
            Some(_) => {
                "the Claude usage limit is reached; it resets at the time Retry-After gives".into()
            }
            None => "the Claude usage limit is reached".into(),
        },
        retry_after_secs,
    })
}

/// Longest CLI message quoted in an error answer.
const MESSAGE_MAX: usize = 2000;

pub(crate) fn clip(s: &str) -> String {
    let s = s.trim();
    if s.len() <= MESSAGE_MAX {
        return s.to_string();
    }
    let mut end = MESSAGE_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Turns a finished CLI into the answer's text or the API error, deciding by `is_error` and
/// the exit code (never by `subtype`).
pub fn answer_or_error(
    result: Option<CliResult>,
    exit_code: Option<i32>,
    stderr: &str,
    now_secs: i64,
) -> Result<CliResult, ApiError> {
    match result {
        Some(r) if !r.is_error && exit_code == Some(0) => Ok(r),
        Some(r) => {
            let message = r
                .text
                .clone()
                .filter(|t| !t.trim().is_empty())
                .or_else(|| (!r.errors.is_empty()).then(|| r.errors.join("; ")))
                .or_else(|| r.subtype.clone())
                .unwrap_or_else(|| "the agent reported an error".into());
            if let Some(limit) = usage_limit(&message, now_secs) {
                return Err(limit);
            }
            // Claude Code 2.1.197: `Not logged in · Please run /login`.
            if message.contains("Please run /login") || message.starts_with("Not logged in") {
                return Err(ApiError::NotLoggedIn(clip(&message)));
            }
            Err(ApiError::Upstream(clip(&message)))
        }
        None => {
            if let Some(limit) = usage_limit(stderr, now_secs) {
                return Err(limit);
            }
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            let status = match exit_code {
                Some(c) => format!("exit status {c}"),
                None => "killed by a signal".into(),
            };
            Err(ApiError::Upstream(if last.is_empty() {
                format!("the agent produced no result ({status})")
            } else {
                clip(&format!("the agent produced no result ({status}): {last}"))
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fences_and_json() {
        assert_eq!(answer_value("```json\n{\"a\":1}\n```"), json!({"a":1}));
        assert_eq!(answer_value("  ```\n[1,2]\n```  \n"), json!([1, 2]));
        assert_eq!(answer_value("{\"a\": true}"), json!({"a": true}));
        assert_eq!(answer_value("Hello there"), json!("Hello there"));
        assert_eq!(
            answer_value("```python\nprint(1)\n```"),
            json!("```python\nprint(1)\n```")
        );
        assert_eq!(
            answer_value("```json\n{broken\n```"),
            json!("```json\n{broken\n```")
        );
        assert_eq!(answer_value("```"), json!("```"));
        assert_eq!(answer_value("``````"), json!("``````"));
        assert_eq!(answer_value(""), json!(""));
        assert_eq!(
            answer_value("see ```json\n{}\n``` here"),
            json!("see ```json\n{}\n``` here")
        );
    }

    #[test]
    fn errors_are_judged_by_is_error_and_exit() {
        let line = r#"{"type":"result","subtype":"success","is_error":true,"result":"Not logged in · Please run /login"}"#;
        let r = parse_result_line(line.as_bytes()).unwrap();
        match answer_or_error(Some(r), Some(1), "", 0) {
            Err(ApiError::NotLoggedIn(m)) => assert_eq!(m, "Not logged in · Please run /login"),
            other => panic!("{other:?}"),
        }
        let line = br#"{"type":"result","subtype":"error_max_turns","is_error":true,"errors":["Reached max turns"]}"#;
        assert!(
            matches!(answer_or_error(parse_result_line(line), Some(1), "", 0), Err(ApiError::Upstream(m)) if m == "Reached max turns")
        );
        let ok = br#"{"type":"result","subtype":"success","is_error":false,"result":"hi","total_cost_usd":0.5,"usage":{"input_tokens":3,"output_tokens":4}}"#;
        let r = answer_or_error(parse_result_line(ok), Some(0), "", 0).unwrap();
        assert_eq!(
            (r.cost_usd, r.input_tokens, r.output_tokens),
            (Some(0.5), Some(3), Some(4))
        );
        // A success object with a non-zero exit is still an error.
        assert!(answer_or_error(parse_result_line(ok), Some(2), "", 0).is_err());
        assert!(
            matches!(answer_or_error(None, Some(3), "boom\n", 0), Err(ApiError::Upstream(m)) if m.contains("boom"))
        );
        assert!(parse_result_line(b"not json").is_none());
        assert!(parse_result_line(br#"{"type":"assistant"}"#).is_none());
    }

    #[test]
    fn usage_limits_carry_retry_after() {
        let e = usage_limit("Claude AI usage limit reached|1000", 400).unwrap();
        assert!(matches!(
            e,
            ApiError::UsageLimit {
                retry_after_secs: 600,
                ..
            }
        ));
        let e = usage_limit("Claude AI usage limit reached", 400).unwrap();
        assert!(matches!(
            e,
            ApiError::UsageLimit {
                retry_after_secs: 60,
                ..
            }
        ));
        assert!(usage_limit("all good", 0).is_none());
        // Found by fuzz/fuzz_targets/result_parser.rs: a far reset time against an extreme
        // clock overflowed the subtraction.
        let e = usage_limit("Claude AI usage limit reached|1763740800", i64::MIN).unwrap();
        assert!(matches!(
            e,
            ApiError::UsageLimit { retry_after_secs, .. } if retry_after_secs == 1_763_740_800u64 + (1u64 << 63)
        ));
    }
}
