//! OpenAI Chat Completions (`POST /v1/chat/completions`): the request body, the answer,
//! `chat.completion.chunk` stream events and `{"error": {...}}` errors.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    data_url_image, ending, forwards_deltas, Chat, CompatError, CompatResult, Ending, Extension,
    Frame, Role, StreamFormat,
};
use crate::error::ApiError;
use crate::runner::invocation::Image;
use crate::runner::RunAnswer;

/// The fields read; everything else (`temperature`, `top_p`, `max_tokens`, `seed`, `user`,
/// …) is accepted and ignored, as documented.
#[derive(Debug, Deserialize)]
pub struct ChatBody {
    pub model: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub response_format: Option<Value>,
    pub n: Option<u64>,
    pub tools: Option<Vec<Value>>,
    pub functions: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub logprobs: Option<bool>,
    pub audio: Option<Value>,
    pub modalities: Option<Vec<String>>,
    pub prediction: Option<Value>,
    pub clawdforge: Option<Extension>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub image_url: Option<ImageUrl>,
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

/// Refuses what cannot be honoured here, naming the parameter.
fn refuse_unsupported(b: &ChatBody) -> CompatResult<()> {
    if b.n.is_some_and(|n| n > 1) {
        return Err(CompatError::param(
            "n",
            "only one choice (n = 1) is supported",
        ));
    }
    if b.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(CompatError::param(
            "tools",
            "client-side tool calling is not supported",
        ));
    }
    if b.functions.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(CompatError::param(
            "functions",
            "client-side function calling is not supported",
        ));
    }
    if b.tool_choice.as_ref().is_some_and(|c| c != "none") {
        return Err(CompatError::param(
            "tool_choice",
            "tool_choice can only be \"none\"",
        ));
    }
    if b.logprobs == Some(true) {
        return Err(CompatError::param("logprobs", "logprobs are not available"));
    }
    if b.audio.as_ref().is_some_and(|a| !a.is_null()) {
        return Err(CompatError::param("audio", "audio output is not supported"));
    }
    if b.modalities
        .as_ref()
        .is_some_and(|m| m.iter().any(|m| m != "text"))
    {
        return Err(CompatError::param(
            "modalities",
            "only text output is supported",
        ));
    }
    if b.prediction.as_ref().is_some_and(|p| !p.is_null()) {
        return Err(CompatError::param(
            "prediction",
            "predicted outputs are not supported",
        ));
    }
    Ok(())
}

/// `response_format` → the JSON Schema of the run, if any.
fn schema_of(format: Option<&Value>) -> CompatResult<Option<Value>> {
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "object"}))),
        Some("json_schema") => match format.pointer("/json_schema/schema") {
            Some(s) if s.is_object() => Ok(Some(s.clone())),
            _ => Err(CompatError::param(
                "response_format",
                "response_format json_schema needs json_schema.schema, an object",
            )),
        },
        _ => Err(CompatError::param(
            "response_format",
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

/// The request as a [`Chat`].
pub fn parse(b: ChatBody) -> CompatResult<Chat> {
    refuse_unsupported(&b)?;
    let model = b
        .model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| CompatError::param("model", "model is required"))?;
    let messages = b
        .messages
        .ok_or_else(|| CompatError::param("messages", "messages is required"))?;
    let mut system = Vec::new();
    let mut turns = Vec::new();
    let mut images: Vec<Image> = Vec::new();
    for m in messages {
        let mut text = String::new();
        match m.content {
            None => {}
            Some(Content::Text(t)) => text = t,
            Some(Content::Parts(parts)) => {
                for p in parts {
                    match (p.kind.as_str(), p.text, p.image_url) {
                        ("text", Some(t), _) => {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(&t);
                        }
                        ("image_url", _, Some(u)) => images.push(data_url_image(&u.url)?),
                        (other, ..) => {
                            return Err(CompatError::param(
                                "messages",
                                format!("content parts of type '{other}' are not supported (text and image_url are)"),
                            ))
                        }
                    }
                }
            }
        }
        match m.role.as_str() {
            "system" | "developer" => system.push(text),
            "user" => turns.push((Role::User, text)),
            "assistant" => turns.push((Role::Assistant, text)),
            other => {
                return Err(CompatError::param(
                    "messages",
                    format!("messages with role '{other}' are not supported (no tool calling)"),
                ))
            }
        }
    }
    Image::check_count(images.len())?;
    Ok(Chat {
        model,
        system: system.join("\n\n"),
        turns,
        images,
        json_schema: schema_of(b.response_format.as_ref())?,
        stream: b.stream.unwrap_or(false),
        include_usage: b
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        extension: b.clawdforge.unwrap_or_default(),
    })
}

fn finish_reason(e: Ending) -> &'static str {
    match e {
        Ending::Stop => "stop",
        Ending::Length => "length",
        Ending::Refusal => "content_filter",
    }
}

fn usage(a: &RunAnswer) -> Value {
    json!({
        "prompt_tokens": a.usage.input_tokens,
        "completion_tokens": a.usage.output_tokens,
        "total_tokens": a.usage.input_tokens + a.usage.output_tokens,
    })
}

/// `chatcmpl-` and the run id's random part, so an answer names its run.
pub fn completion_id(run_id: &str) -> String {
    format!("chatcmpl-{}", run_id.trim_start_matches("run_"))
}

/// The non-streaming answer.
pub fn completion(a: &RunAnswer, model: &str, created: i64) -> Value {
    json!({
        "id": completion_id(&a.run_id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": a.text, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason(ending(a)),
        }],
        "usage": usage(a),
        "system_fingerprint": null,
    })
}

/// The error body: `{"error": {"message", "type", "param", "code"}}`, `code` the stable
/// clawdforge code.
pub fn error_body(e: &ApiError, param: Option<&str>) -> Value {
    let kind = match e.status().as_u16() {
        400 | 404 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "insufficient_quota",
        403 => "permission_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    json!({"error": {
        "message": e.public_message(),
        "type": kind,
        "param": param,
        "code": e.code(),
    }})
}

/// A streamed completion: role first, then content deltas, the finish reason, usage if
/// asked for, `[DONE]`.
pub struct Stream {
    pub id: String,
    pub model: String,
    pub created: i64,
    pub include_usage: bool,
    pub forward_deltas: bool,
}

impl Stream {
    pub fn new(chat: &Chat, run_id: &str, model: &str) -> Stream {
        Stream {
            id: completion_id(run_id),
            model: model.to_string(),
            created: super::unix_now(),
            include_usage: chat.include_usage,
            forward_deltas: forwards_deltas(chat),
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Frame {
        let mut c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        Frame::data(&c)
    }
}

impl StreamFormat for Stream {
    fn start(&mut self) -> Vec<Frame> {
        vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
    }

    fn delta(&mut self, text: &str) -> Vec<Frame> {
        if !self.forward_deltas || text.is_empty() {
            return Vec::new();
        }
        vec![self.chunk(json!({"content": text}), None)]
    }

    fn finish(&mut self, a: &RunAnswer) -> Vec<Frame> {
        let mut frames = Vec::new();
        if !self.forward_deltas {
            frames.push(self.chunk(json!({"content": a.text}), None));
        }
        frames.push(self.chunk(json!({}), Some(finish_reason(ending(a)))));
        if self.include_usage {
            frames.push(Frame::data(&json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": usage(a),
            })));
        }
        frames.push(Frame {
            event: None,
            data: "[DONE]".into(),
        });
        frames
    }

    fn error(&mut self, e: &ApiError) -> Vec<Frame> {
        vec![Frame::data(&error_body(e, None))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> ChatBody {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn messages_map_and_ignored_fields_pass() {
        let chat = parse(body(json!({
            "model": "sonnet", "temperature": 0.2, "max_tokens": 5, "seed": 1, "user": "u",
            "some_future_field": true,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "No emoji."}]},
                {"role": "user", "content": "I'm Sam."},
                {"role": "assistant", "content": "Hi Sam."},
                {"role": "user", "content": [{"type": "text", "text": "My name?"}]},
            ],
            "stream": true, "stream_options": {"include_usage": true},
        })))
        .unwrap();
        assert_eq!(chat.system, "Be brief.\n\nNo emoji.");
        assert_eq!(chat.turns.len(), 3);
        assert!(chat.stream && chat.include_usage);
    }

    #[test]
    fn impossible_parameters_are_refused_by_name() {
        let base = json!({"model": "sonnet", "messages": [{"role": "user", "content": "x"}]});
        for (extra, param) in [
            (json!({"n": 2}), "n"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
            (json!({"functions": [{}]}), "functions"),
            (json!({"tool_choice": "auto"}), "tool_choice"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"audio": {"voice": "x"}}), "audio"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"prediction": {"type": "content"}}), "prediction"),
            (
                json!({"response_format": {"type": "yaml"}}),
                "response_format",
            ),
            (json!({"model": null}), "model"),
        ] {
            let mut b = base.clone();
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let e = parse(body(b)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param));
            assert_eq!(
                error_body(&e.error, e.param.as_deref())["error"]["param"],
                param
            );
        }
        let mut ok = base.clone();
        ok["n"] = json!(1);
        ok["tools"] = json!([]);
        ok["tool_choice"] = json!("none");
        assert!(parse(body(ok)).is_ok());
    }

    #[test]
    fn response_formats() {
        let f = |v: Value| schema_of(Some(&v)).unwrap();
        assert_eq!(f(json!({"type": "text"})), None);
        assert_eq!(
            f(json!({"type": "json_object"})),
            Some(json!({"type": "object"}))
        );
        assert_eq!(
            f(
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
            ),
            Some(json!({"type": "object"}))
        );
    }
}
