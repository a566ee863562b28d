//! Reading what `acpx --format json` prints during one turn: every JSON-RPC message, one
//! per line. The turn's answer is the result whose id is the id of *this* turn's
//! `session/prompt` request (it varies: 2 on a cold agent, 5 or 7 on a warm one), and
//! lines can follow that result. Its text is the `agent_message_chunk`s sent after that
//! request; its cost comes from ACP `usage_update.cost`, which is cumulative.

use serde_json::Value;

/// The end of the turn as acpx reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptResult {
    pub stop_reason: String,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
}

/// A JSON-RPC error line (`data.acpxCode` names acpx's error class).
#[derive(Debug, Clone, PartialEq)]
pub struct AcpxError {
    pub message: String,
    pub acpx_code: Option<String>,
}

/// Everything one turn printed, folded as the lines arrive.
#[derive(Debug, Default)]
pub struct TurnLog {
    prompt_id: Option<Value>,
    /// The lines a client sees: all JSON lines except `available_commands_update`.
    pub events: Vec<Value>,
    text: String,
    pub result: Option<PromptResult>,
    pub error: Option<AcpxError>,
    /// acpx printed `initialize`: it started a new agent process, whose cost count starts
    /// at zero (a warm queue owner skips the handshake).
    saw_initialize: bool,
    /// Content (message, thought, tool call) of this turn has started.
    content_started: bool,
    /// A cumulative cost reported after the prompt but before any content: the agent's own
    /// statement of the total before this turn.
    early_cost: Option<f64>,
    last_cost: Option<f64>,
}

/// `session/update` kinds that are the agent doing something (as opposed to bookkeeping).
const CONTENT_UPDATES: &[&str] = &[
    "agent_message_chunk",
    "agent_thought_chunk",
    "tool_call",
    "tool_call_update",
    "plan",
];

impl TurnLog {
    /// Folds one stdout line in. Returns the value to show the client, or `None` for lines
    /// that are not JSON and for the large `available_commands_update` notifications, which
    /// repeat on every turn and say nothing about it.
    pub fn push(&mut self, line: &[u8]) -> Option<Value> {
        let v: Value = serde_json::from_slice(line).ok()?;
        if !v.is_object() {
            return None;
        }
        let method = v.get("method").and_then(Value::as_str);
        match method {
            Some("initialize") => self.saw_initialize = true,
            Some("session/prompt") => {
                self.prompt_id = v.get("id").cloned();
                self.text.clear();
                self.content_started = false;
                self.early_cost = None;
            }
            Some("session/update") => {
                let update = v.pointer("/params/update").unwrap_or(&Value::Null);
                let kind = update.get("sessionUpdate").and_then(Value::as_str);
                if kind == Some("available_commands_update") {
                    return None;
                }
                self.fold_update(kind.unwrap_or(""), update);
            }
            _ => {}
        }
        if method.is_none() {
            self.fold_response(&v);
        }
        self.events.push(v.clone());
        Some(v)
    }

    fn fold_update(&mut self, kind: &str, update: &Value) {
        if self.prompt_id.is_none() {
            // Replayed history (session/load) is not this turn.
            return;
        }
        if CONTENT_UPDATES.contains(&kind) {
            self.content_started = true;
        }
        if kind == "agent_message_chunk" {
            if let Some(t) = update
                .get("content")
                .filter(|c| c.get("type").and_then(Value::as_str) == Some("text"))
                .and_then(|c| c.get("text"))
                .and_then(Value::as_str)
            {
                self.text.push_str(t);
            }
        }
        if kind == "usage_update" {
            if let Some(amount) = update.pointer("/cost/amount").and_then(Value::as_f64) {
                if !self.content_started && self.result.is_none() {
                    self.early_cost = Some(amount);
                }
                self.last_cost = Some(amount);
            }
        }
    }

    fn fold_response(&mut self, v: &Value) {
        let id = v.get("id");
        if let Some(err) = v.get("error") {
            // An error for this prompt, for no request in particular (id null), or for a
            // request before the prompt was even sent all end the turn.
            let ours = self.prompt_id.is_none()
                || id.is_none_or(Value::is_null)
                || id == self.prompt_id.as_ref();
            if ours {
                self.error = Some(AcpxError {
                    message: err
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("the agent reported an error")
                        .to_string(),
                    acpx_code: err
                        .pointer("/data/acpxCode")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                });
            }
            return;
        }
        // The agent's own requests to the client reuse small ids (a permission answer may
        // carry the prompt's id): the prompt's result is the one with a stop reason.
        if self.prompt_id.is_some() && id == self.prompt_id.as_ref() {
            if let Some(result) = v.get("result").filter(|r| r.get("stopReason").is_some()) {
                let int = |k: &str| {
                    result
                        .pointer(&format!("/usage/{k}"))
                        .and_then(Value::as_i64)
                };
                self.result = Some(PromptResult {
                    stop_reason: result
                        .get("stopReason")
                        .and_then(Value::as_str)
                        .unwrap_or("end_turn")
                        .to_string(),
                    input_tokens: int("inputTokens"),
                    output_tokens: int("outputTokens"),
                    total_tokens: int("totalTokens"),
                });
            }
        }
    }

    /// The agent's message chunks of this turn, joined.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// This turn's cost and the session's new cumulative total, given the total recorded
    /// after the previous turn. ACP's `usage_update.cost` counts from the start of the agent
    /// process, so the baseline is: what the agent itself reported before this turn's
    /// content, else zero when acpx started a new agent, else the recorded total.
    pub fn cost(&self, previous_total: f64) -> (Option<f64>, f64) {
        let Some(last) = self.last_cost else {
            return (None, previous_total);
        };
        let baseline = match (self.early_cost, self.saw_initialize) {
            (Some(early), _) => early,
            (None, true) => 0.0,
            (None, false) => previous_total,
        };
        // Rounded to micro-dollars: the difference of two floats is otherwise noisy.
        let cost = ((last - baseline).max(0.0) * 1e6).round() / 1e6;
        // Absurd amounts (an agent reporting ±1e308) overflow to infinity, which would
        // answer as JSON null and poison every sum over the audit log: no cost instead.
        (cost.is_finite().then_some(cost), last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn feed(log: &mut TurnLog, lines: &[Value]) -> Vec<Value> {
        lines
            .iter()
            .filter_map(|l| log.push(l.to_string().as_bytes()))
            .collect()
    }

    fn update(body: Value) -> Value {
        json!({"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s","update":body}})
    }

    fn chunk(text: &str) -> Value {
        update(json!({"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":text}}))
    }

    fn cost(amount: f64) -> Value {
        update(
            json!({"sessionUpdate":"usage_update","used":1,"size":2,"cost":{"amount":amount,"currency":"USD"}}),
        )
    }

    #[test]
    fn warm_turn_matches_the_result_by_prompt_id_and_skips_command_lists() {
        let mut log = TurnLog::default();
        let shown = feed(
            &mut log,
            &[
                json!({"jsonrpc":"2.0","id":5,"method":"session/prompt","params":{}}),
                update(json!({"sessionUpdate":"available_commands_update","availableCommands":[]})),
                // A stray result for another request is not the answer, nor an answer to
                // the agent's own request that reuses the prompt's id.
                json!({"jsonrpc":"2.0","id":4,"result":{"stopReason":"refusal"}}),
                json!({"jsonrpc":"2.0","id":5,"result":{"outcome":{"outcome":"selected"}}}),
                chunk("Hello "),
                chunk("world"),
                cost(0.5),
                json!({"jsonrpc":"2.0","id":5,"result":{"stopReason":"end_turn","usage":{"inputTokens":3,"outputTokens":4,"totalTokens":7}}}),
                update(json!({"sessionUpdate":"session_info_update","title":"t"})),
            ],
        );
        assert_eq!(shown.len(), 8);
        assert_eq!(log.events.len(), 8);
        assert_eq!(log.text(), "Hello world");
        let r = log.result.clone().unwrap();
        assert_eq!(
            (r.stop_reason.as_str(), r.input_tokens, r.output_tokens),
            ("end_turn", Some(3), Some(4))
        );
        // Warm agent: the baseline is the recorded total.
        assert_eq!(log.cost(0.2), (Some(0.3), 0.5));
        assert!(log.push(b"not json").is_none());
    }

    #[test]
    fn a_new_agent_counts_cost_from_zero_unless_it_reports_a_baseline() {
        let handshake = [
            json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}),
            json!({"jsonrpc":"2.0","id":0,"result":{}}),
            json!({"jsonrpc":"2.0","id":2,"method":"session/prompt","params":{}}),
        ];
        let mut fresh = TurnLog::default();
        feed(&mut fresh, &handshake);
        feed(&mut fresh, &[chunk("a"), cost(0.0004)]);
        assert_eq!(fresh.cost(0.9), (Some(0.0004), 0.0004));

        // The stub reports the previous total before the content starts.
        let mut reported = TurnLog::default();
        feed(&mut reported, &handshake);
        feed(&mut reported, &[cost(0.0024), chunk("a"), cost(0.0036)]);
        assert_eq!(reported.cost(0.0), (Some(0.0012), 0.0036));

        let mut none = TurnLog::default();
        feed(&mut none, &handshake);
        assert_eq!(none.cost(0.7), (None, 0.7));
    }

    #[test]
    fn errors_for_the_prompt_or_for_nothing_end_the_turn() {
        let mut log = TurnLog::default();
        feed(
            &mut log,
            &[
                json!({"jsonrpc":"2.0","id":2,"method":"session/prompt","params":{}}),
                json!({"jsonrpc":"2.0","id":2,"error":{"code":-32603,"message":"boom","data":{"acpxCode":"RUNTIME"}}}),
            ],
        );
        assert_eq!(
            log.error,
            Some(AcpxError {
                message: "boom".into(),
                acpx_code: Some("RUNTIME".into())
            })
        );
        let mut log = TurnLog::default();
        feed(
            &mut log,
            &[
                json!({"jsonrpc":"2.0","id":null,"error":{"code":-32002,"message":"no session","data":{"acpxCode":"NO_SESSION"}}}),
            ],
        );
        assert_eq!(log.error.unwrap().acpx_code.as_deref(), Some("NO_SESSION"));
    }

    #[test]
    fn absurd_costs_give_no_turn_cost_rather_than_infinity() {
        // The acp_lines fuzz target's property, on an input kept as
        // fuzz/corpus/acp_lines/seed-regression-infinite-cost.
        let mut log = TurnLog::default();
        feed(
            &mut log,
            &[
                json!({"jsonrpc":"2.0","id":2,"method":"session/prompt","params":{"sessionId":"s","prompt":[]}}),
                update(
                    json!({"sessionUpdate":"usage_update","cost":{"amount":-1.7e308,"currency":"USD"}}),
                ),
                update(
                    json!({"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"hi"}}),
                ),
                update(
                    json!({"sessionUpdate":"usage_update","cost":{"amount":1.7e308,"currency":"USD"}}),
                ),
            ],
        );
        assert_eq!(log.cost(0.0), (None, 1.7e308));
    }
}
