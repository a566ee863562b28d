//! The wire formats of the official OpenAI and Anthropic SDKs, mapped onto one-shot runs:
//! request bodies as those APIs define them (unknown fields ignored, as their servers do),
//! the mapping from a conversation to one prompt, and the answers, stream events and errors
//! in each API's own shape. Pure functions, no HTTP: `http::v1` drives them.
//!
//! Why a prompt and not a conversation: `claude -p` takes one user message, so earlier
//! turns are given to the model as a transcript (see [`render_prompt`]; the README quotes
//! the exact form). Tools stay off and Claude Code's own system prompt is replaced by the
//! request's system text (empty when it has none): that is what an SDK caller expects, and
//! it takes a request upstream from ~78 KB to ~1 KB.

pub mod anthropic;
pub mod openai;

use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::runner::invocation::{Image, Tools};
use crate::runner::RunAnswer;

/// A failure on an SDK route: the API error (status, stable code) and, for a refused or
/// malformed parameter, its name (OpenAI's `param`).
#[derive(Debug)]
pub struct CompatError {
    pub error: ApiError,
    pub param: Option<String>,
}

impl From<ApiError> for CompatError {
    fn from(error: ApiError) -> Self {
        CompatError { error, param: None }
    }
}

impl CompatError {
    pub fn param(param: &str, message: impl Into<String>) -> CompatError {
        CompatError {
            error: ApiError::BadRequest(message.into()),
            param: Some(param.to_string()),
        }
    }
}

pub type CompatResult<T> = Result<T, CompatError>;

/// The clawdforge extension both formats accept: `"clawdforge": {"tools": …,
/// "timeout_secs": …}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    pub tools: Option<Tools>,
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

/// A request in either format, reduced to what a run takes.
#[derive(Debug)]
pub struct Chat {
    /// As requested; `"default"` means the token's or the server's default.
    pub model: String,
    /// The system text (empty: none, which still replaces Claude Code's own).
    pub system: String,
    pub turns: Vec<(Role, String)>,
    /// Every image of every message, in order.
    pub images: Vec<Image>,
    pub json_schema: Option<Value>,
    pub stream: bool,
    /// OpenAI `stream_options.include_usage`.
    pub include_usage: bool,
    pub extension: Extension,
}

/// The prompt a conversation becomes. One user message: its text. With history, the
/// earlier messages as a transcript, then the last user message:
///
/// ```text
/// Earlier in this conversation:
///
/// User: <text>
///
/// Assistant: <text>
///
/// The user's new message:
///
/// <text>
/// ```
pub fn render_prompt(turns: &[(Role, String)]) -> CompatResult<String> {
    let Some(((last_role, last), earlier)) = turns.split_last() else {
        return Err(CompatError::param("messages", "messages must not be empty"));
    };
    if *last_role != Role::User {
        return Err(CompatError::param(
            "messages",
            "the last message must be from the user",
        ));
    }
    if last.trim().is_empty() {
        return Err(CompatError::param(
            "messages",
            "the last user message has no text",
        ));
    }
    if earlier.is_empty() {
        return Ok(last.clone());
    }
    let mut out = String::from("Earlier in this conversation:\n\n");
    for (role, text) in earlier {
        let who = match role {
            Role::User => "User",
            Role::Assistant => "Assistant",
        };
        out.push_str(&format!("{who}: {text}\n\n"));
    }
    out.push_str("The user's new message:\n\n");
    out.push_str(last);
    Ok(out)
}

/// A `data:image/...;base64,...` URL as an image; any other URL is refused.
pub fn data_url_image(url: &str) -> CompatResult<Image> {
    let refuse = || {
        CompatError::param(
            "messages",
            "only data: URLs (data:image/png;base64,...) can carry images here; remote image URLs are not fetched",
        )
    };
    let rest = url.strip_prefix("data:").ok_or_else(refuse)?;
    let (media, data) = rest.split_once(',').ok_or_else(refuse)?;
    let media_type = media.strip_suffix(";base64").ok_or_else(refuse)?;
    Ok(Image::parse(media_type, data)?)
}

/// How the run ended, in the terms both APIs share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Stop,
    Length,
    Refusal,
}

pub fn ending(answer: &RunAnswer) -> Ending {
    match answer.stop_reason.as_str() {
        "max_tokens" => Ending::Length,
        "refusal" => Ending::Refusal,
        _ => Ending::Stop,
    }
}

/// One server-sent event: an optional `event:` name and its `data:` text.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub event: Option<&'static str>,
    pub data: String,
}

impl Frame {
    pub fn data(v: &Value) -> Frame {
        Frame {
            event: None,
            data: v.to_string(),
        }
    }

    pub fn named(event: &'static str, v: &Value) -> Frame {
        Frame {
            event: Some(event),
            data: v.to_string(),
        }
    }
}

/// A stream in one API's event format: what to send first, for each text delta, at the
/// end, and on a failure after the stream began.
pub trait StreamFormat: Send + 'static {
    fn start(&mut self) -> Vec<Frame>;
    fn delta(&mut self, text: &str) -> Vec<Frame>;
    fn finish(&mut self, answer: &RunAnswer) -> Vec<Frame>;
    fn error(&mut self, e: &ApiError) -> Vec<Frame>;
}

/// The text deltas a stream forwards: none for a schema run (its text deltas are the
/// model's attempts, not the answer, which comes whole at the end).
pub fn forwards_deltas(chat: &Chat) -> bool {
    chat.json_schema.is_none()
}

/// Unix seconds now (OpenAI's `created`).
pub fn unix_now() -> i64 {
    crate::util::now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_is_the_prompt_and_history_is_a_transcript() {
        assert_eq!(render_prompt(&[(Role::User, "hi".into())]).unwrap(), "hi");
        let p = render_prompt(&[
            (Role::User, "I'm Sam.".into()),
            (Role::Assistant, "Hello Sam!".into()),
            (Role::User, "My name?".into()),
        ])
        .unwrap();
        assert_eq!(
            p,
            "Earlier in this conversation:\n\nUser: I'm Sam.\n\nAssistant: Hello Sam!\n\nThe user's new message:\n\nMy name?"
        );
        let e =
            render_prompt(&[(Role::User, "a".into()), (Role::Assistant, "b".into())]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(render_prompt(&[]).is_err());
    }

    #[test]
    fn only_data_urls_carry_images() {
        let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
        let img = data_url_image(&format!("data:image/png;base64,{png}")).unwrap();
        assert_eq!(img.media_type, "image/png");
        assert!(data_url_image("https://example.com/cat.png").is_err());
        assert!(data_url_image(&format!("data:image/png,{png}")).is_err());
        assert!(data_url_image(&format!("data:image/tiff;base64,{png}")).is_err());
    }
}
