//! Anthropic Messages (`POST /v1/messages`): the request body, the `message` answer, its
//! event stream (`message_start` … `message_stop`) and `{"type":"error",...}` errors.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    ending, forwards_deltas, Chat, CompatError, CompatResult, Ending, Extension, Frame, Role,
    StreamFormat,
};
use crate::error::ApiError;
use crate::runner::invocation::Image;
use crate::runner::RunAnswer;

/// The fields read; `metadata`, `stop_sequences`, `temperature`, `top_p`, `top_k` and
/// unknown fields are accepted and ignored, as documented.
#[derive(Debug, Deserialize)]
pub struct MessagesBody {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub messages: Option<Vec<Message>>,
    pub system: Option<Content>,
    pub stream: Option<bool>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub thinking: Option<Value>,
    pub clawdforge: Option<Extension>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize)]
pub struct Block {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub source: Option<Source>,
}

#[derive(Debug, Deserialize)]
pub struct Source {
    #[serde(rename = "type")]
    pub kind: String,
    pub media_type: Option<String>,
    pub data: Option<String>,
}

/// Text of a string or text blocks; images collected into `images`.
fn text_of(c: Content, images: Option<&mut Vec<Image>>, field: &str) -> CompatResult<String> {
    let blocks = match c {
        Content::Text(t) => return Ok(t),
        Content::Blocks(b) => b,
    };
    let mut text = String::new();
    let mut images = images;
    for b in blocks {
        match (b.kind.as_str(), b.text, b.source, images.as_deref_mut()) {
            ("text", Some(t), _, _) => {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&t);
            }
            ("image", _, Some(src), Some(images)) => {
                if src.kind != "base64" {
                    return Err(CompatError::param(
                        field,
                        "only base64 image sources are supported; image URLs are not fetched",
                    ));
                }
                images.push(Image::parse(
                    src.media_type.as_deref().unwrap_or(""),
                    src.data.as_deref().unwrap_or(""),
                )?);
            }
            (other, ..) => {
                return Err(CompatError::param(
                    field,
                    format!("content blocks of type '{other}' are not supported here"),
                ))
            }
        }
    }
    Ok(text)
}

/// The request as a [`Chat`].
pub fn parse(b: MessagesBody) -> CompatResult<Chat> {
    let model = b
        .model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| CompatError::param("model", "model: Field required"))?;
    if b.max_tokens.is_none() {
        return Err(CompatError::param(
            "max_tokens",
            "max_tokens: Field required",
        ));
    }
    if b.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(CompatError::param(
            "tools",
            "client-side tool use is not supported",
        ));
    }
    if b.tool_choice.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(CompatError::param(
            "tool_choice",
            "tool_choice is not supported (no client-side tools)",
        ));
    }
    let thinking_on = b
        .thinking
        .as_ref()
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|t| t != "disabled");
    if thinking_on {
        return Err(CompatError::param(
            "thinking",
            "extended thinking is not supported",
        ));
    }
    let messages = b
        .messages
        .ok_or_else(|| CompatError::param("messages", "messages: Field required"))?;
    let mut images = Vec::new();
    let mut turns = Vec::new();
    for m in messages {
        let role = match m.role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(CompatError::param(
                    "messages",
                    format!("role must be user or assistant, not '{other}'"),
                ))
            }
        };
        turns.push((role, text_of(m.content, Some(&mut images), "messages")?));
    }
    Image::check_count(images.len())?;
    let system = match b.system {
        Some(s) => text_of(s, None, "system")?,
        None => String::new(),
    };
    Ok(Chat {
        model,
        system,
        turns,
        images,
        json_schema: None,
        stream: b.stream.unwrap_or(false),
        include_usage: false,
        extension: b.clawdforge.unwrap_or_default(),
    })
}

fn stop_reason(e: Ending) -> &'static str {
    match e {
        Ending::Stop => "end_turn",
        Ending::Length => "max_tokens",
        Ending::Refusal => "refusal",
    }
}

/// `msg_` and the run id's random part.
pub fn message_id(run_id: &str) -> String {
    format!("msg_{}", run_id.trim_start_matches("run_"))
}

/// The non-streaming answer.
pub fn message(a: &RunAnswer, model: &str) -> Value {
    json!({
        "id": message_id(&a.run_id),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": a.text}],
        "stop_reason": stop_reason(ending(a)),
        "stop_sequence": null,
        "usage": {"input_tokens": a.usage.input_tokens, "output_tokens": a.usage.output_tokens},
    })
}

/// The error body, `error.type` following the status as Anthropic's does, the clawdforge
/// code beside it.
pub fn error_body(e: &ApiError) -> Value {
    let kind = match e.status().as_u16() {
        400 | 405 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": e.public_message(), "code": e.code()}})
}

/// A streamed message in Anthropic's event sequence.
pub struct Stream {
    pub id: String,
    pub model: String,
    pub forward_deltas: bool,
}

impl Stream {
    pub fn new(chat: &Chat, run_id: &str, model: &str) -> Stream {
        Stream {
            id: message_id(run_id),
            model: model.to_string(),
            forward_deltas: forwards_deltas(chat),
        }
    }

    fn text_delta(text: &str) -> Frame {
        Frame::named(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": text}}),
        )
    }
}

impl StreamFormat for Stream {
    fn start(&mut self) -> Vec<Frame> {
        vec![
            Frame::named(
                "message_start",
                &json!({"type": "message_start", "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                }}),
            ),
            Frame::named(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
            ),
            Frame::named("ping", &json!({"type": "ping"})),
        ]
    }

    fn delta(&mut self, text: &str) -> Vec<Frame> {
        if !self.forward_deltas || text.is_empty() {
            return Vec::new();
        }
        vec![Self::text_delta(text)]
    }

    fn finish(&mut self, a: &RunAnswer) -> Vec<Frame> {
        let mut frames = Vec::new();
        if !self.forward_deltas {
            frames.push(Self::text_delta(&a.text));
        }
        frames.push(Frame::named(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ));
        frames.push(Frame::named(
            "message_delta",
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": stop_reason(ending(a)), "stop_sequence": null},
                    "usage": {"input_tokens": a.usage.input_tokens, "output_tokens": a.usage.output_tokens}}),
        ));
        frames.push(Frame::named(
            "message_stop",
            &json!({"type": "message_stop"}),
        ));
        frames
    }

    fn error(&mut self, e: &ApiError) -> Vec<Frame> {
        vec![Frame::named("error", &error_body(e))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> MessagesBody {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn messages_map_and_refusals_name_their_parameter() {
        let chat = parse(body(json!({
            "model": "haiku", "max_tokens": 100, "temperature": 1, "top_k": 3,
            "metadata": {"user_id": "u"}, "stop_sequences": ["x"],
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        })))
        .unwrap();
        assert_eq!((chat.system.as_str(), chat.turns.len()), ("Be brief.", 1));
        let base = json!({"model": "haiku", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]});
        for (extra, param) in [
            (json!({"tools": [{"name": "t"}]}), "tools"),
            (json!({"tool_choice": {"type": "auto"}}), "tool_choice"),
            (
                json!({"thinking": {"type": "enabled", "budget_tokens": 1024}}),
                "thinking",
            ),
            (json!({"max_tokens": null}), "max_tokens"),
        ] {
            let mut b = base.clone();
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            assert_eq!(parse(body(b)).unwrap_err().param.as_deref(), Some(param));
        }
        let mut ok = base.clone();
        ok["thinking"] = json!({"type": "disabled"});
        assert!(parse(body(ok)).is_ok());
    }

    #[test]
    fn errors_follow_the_status() {
        let v = error_body(&ApiError::BudgetExhausted("spent".into()));
        assert_eq!(v["error"]["type"], "billing_error");
        assert_eq!(v["error"]["code"], "budget_exhausted");
        assert_eq!(
            error_body(&ApiError::Unauthorized)["error"]["type"],
            "authentication_error"
        );
    }
}
