//! How a run becomes a `claude -p` command line and what goes to its stdin: the one place
//! argv is built, for cold runs and for the warm pool alike.
//!
//! Measured with claude 2.1.197 (see the README's cost section): with no `--tools` the CLI
//! sends its 24 tool definitions upstream (~78 KB for a two-word prompt); `--tools ""`
//! drops them but keeps Claude Code's own system prompt (~6.9 KB for opus, ~27 KB for
//! sonnet and haiku); only `--system-prompt` replaces that prompt. Images need the CLI's
//! stream-json input (one user message whose content is a list of blocks), which in turn
//! needs stream-json output; streamed runs add `--include-partial-messages` so the token
//! deltas (`stream_event` lines) arrive as the model produces them.

use std::ffi::OsString;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::ApiError;

/// Which of Claude Code's built-in tools a run may use.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Tools {
    /// `"none"` or `"default"`.
    Preset(ToolPreset),
    /// Built-in tool names, e.g. `["Read","Grep"]`.
    Only(Vec<ToolName>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ToolPreset {
    /// No tools at all (`--tools ""`).
    None,
    /// Claude Code's built-in set (no `--tools` flag).
    Default,
}

/// A built-in tool name: a letter, then letters, digits or `_` (at most 64), safe in argv.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String)]
pub struct ToolName(String);

impl TryFrom<String> for ToolName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = s.len() <= 64
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if ok {
            Ok(ToolName(s))
        } else {
            Err(format!(
                "'{}' is not a tool name (letters, digits and _, e.g. Read)",
                s.chars().take(64).collect::<String>()
            ))
        }
    }
}

impl From<ToolName> for String {
    fn from(t: ToolName) -> String {
        t.0
    }
}

impl ToolName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Tools {
    pub const NONE: Tools = Tools::Preset(ToolPreset::None);
    pub const DEFAULT: Tools = Tools::Preset(ToolPreset::Default);

    /// An empty list means the same as `"none"`; one form per meaning keeps the warm pool
    /// key honest.
    pub fn normalised(self) -> Tools {
        match self {
            Tools::Only(mut names) => {
                if names.is_empty() {
                    return Tools::NONE;
                }
                names.sort_by(|a, b| a.0.cmp(&b.0));
                names.dedup();
                Tools::Only(names)
            }
            preset => preset,
        }
    }

    /// Whether a request for `self` stays within what `allowed` permits.
    pub fn within(&self, allowed: &Tools) -> bool {
        match (self, allowed) {
            (_, Tools::Preset(ToolPreset::Default)) => true,
            (Tools::Preset(ToolPreset::None), _) => true,
            (Tools::Only(asked), Tools::Only(allowed)) => asked.iter().all(|t| allowed.contains(t)),
            _ => false,
        }
    }

    fn args(&self) -> Option<OsString> {
        match self {
            Tools::Preset(ToolPreset::Default) => None,
            Tools::Preset(ToolPreset::None) => Some("--tools=".into()),
            Tools::Only(names) => {
                let list: Vec<&str> = names.iter().map(ToolName::as_str).collect();
                Some(format!("--tools={}", list.join(",")).into())
            }
        }
    }
}

/// One image for the model, checked at the edge: a known type, valid base64, at most
/// [`IMAGE_MAX_BYTES`] decoded, and bytes that start like the type they claim.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub media_type: &'static str,
    /// Base64, as given (it travels on as base64).
    pub data: String,
}

pub const IMAGES_MAX: usize = 8;
pub const IMAGE_MAX_BYTES: usize = 5 * 1024 * 1024;
/// What the JSON body limit of a route taking images grows by: 8 images at the limit, in
/// base64 (4 characters per 3 bytes), plus a little for their JSON.
pub const IMAGES_BODY_ALLOWANCE: usize = IMAGES_MAX * (IMAGE_MAX_BYTES.div_ceil(3) * 4 + 256);

const IMAGE_TYPES: [(&str, &[u8]); 4] = [
    ("image/png", b"\x89PNG\r\n\x1a\n"),
    ("image/jpeg", b"\xff\xd8\xff"),
    ("image/gif", b"GIF8"),
    ("image/webp", b"RIFF"),
];

impl Image {
    pub fn parse(media_type: &str, data: &str) -> Result<Image, ApiError> {
        let Some((known, magic)) = IMAGE_TYPES.iter().find(|(t, _)| *t == media_type) else {
            return Err(ApiError::BadRequest(format!(
                "image media_type must be image/png, image/jpeg, image/gif or image/webp, not '{}'",
                media_type.chars().take(64).collect::<String>()
            )));
        };
        // Checked before decoding, so an oversized image costs no allocation.
        if data.len() > IMAGE_MAX_BYTES.div_ceil(3) * 4 + 4 {
            return Err(too_big());
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|_| ApiError::bad_request("image data is not valid base64"))?;
        if bytes.len() > IMAGE_MAX_BYTES {
            return Err(too_big());
        }
        if !bytes.starts_with(magic) {
            return Err(ApiError::BadRequest(format!(
                "image data is not a {known} image"
            )));
        }
        Ok(Image {
            media_type: known,
            data: data.trim().to_string(),
        })
    }

    /// Several images, at most [`IMAGES_MAX`].
    pub fn check_count(n: usize) -> Result<(), ApiError> {
        if n > IMAGES_MAX {
            return Err(ApiError::BadRequest(format!(
                "at most {IMAGES_MAX} images may be sent; this request has {n}"
            )));
        }
        Ok(())
    }

    fn block(&self) -> Value {
        json!({"type": "image", "source": {"type": "base64", "media_type": self.media_type, "data": self.data}})
    }
}

fn too_big() -> ApiError {
    ApiError::BadRequest(format!(
        "an image may be at most {IMAGE_MAX_BYTES} bytes (5 MiB) decoded"
    ))
}

/// What a process is fixed to at spawn (also the warm pool's key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fixed {
    pub model: String,
    /// `Some("")` replaces Claude Code's own system prompt with nothing; `None` keeps it.
    pub system: Option<String>,
    pub tools: Tools,
    /// The JSON Schema as compact JSON text.
    pub json_schema: Option<String>,
}

impl Fixed {
    /// Flags shared by cold and warm runs. `--flag=value` keeps a value that starts with
    /// `-` from being read as a flag; one-shot runs need no resumable transcript on disk.
    fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![format!("--model={}", self.model).into()];
        if let Some(system) = &self.system {
            args.push(format!("--system-prompt={system}").into());
        }
        args.extend(self.tools.args());
        if let Some(schema) = &self.json_schema {
            args.push(format!("--json-schema={schema}").into());
        }
        args.push("--no-session-persistence".into());
        args
    }
}

const STREAM_IO: [&str; 6] = [
    "--input-format",
    "stream-json",
    "--output-format",
    "stream-json",
    "--verbose",
    "--include-partial-messages",
];

/// The argv of a warm process: stream-json both ways, token deltas on (a streamed run
/// forwards them; a plain one skips them), waiting for its one user message.
pub fn warm_args(fixed: &Fixed) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-p".into()];
    args.extend(STREAM_IO.iter().map(OsString::from));
    args.extend(fixed.args());
    args
}

/// A cold run's argv and the bytes for its stdin (which is then closed). Plain prompts go
/// as text; with images the prompt is one stream-json user message.
pub fn cold(
    fixed: &Fixed,
    prompt: &str,
    images: &[Image],
    streaming: bool,
) -> (Vec<OsString>, String) {
    let mut args: Vec<OsString> = vec!["-p".into()];
    let stdin = if !images.is_empty() {
        args.extend(STREAM_IO.iter().map(OsString::from));
        let mut line = user_message(prompt, images);
        line.push('\n');
        line
    } else {
        if streaming {
            args.extend(STREAM_IO[2..].iter().map(OsString::from));
        } else {
            args.extend(["--output-format".into(), "json".into()]);
        }
        prompt.to_string()
    };
    args.extend(fixed.args());
    (args, stdin)
}

/// One stream-json user message (no trailing newline): the images as blocks, then the
/// prompt as text; without images the content is the plain string.
pub fn user_message(prompt: &str, images: &[Image]) -> String {
    let content = if images.is_empty() {
        Value::String(prompt.to_string())
    } else {
        let mut blocks: Vec<Value> = images.iter().map(Image::block).collect();
        blocks.push(json!({"type": "text", "text": prompt}));
        Value::Array(blocks)
    };
    json!({"type": "user", "message": {"role": "user", "content": content}}).to_string()
}

/// The text piece of a `stream_event` line that carries a token delta, if it is one.
pub fn text_delta(line: &Value) -> Option<&str> {
    if line.get("type")?.as_str()? != "stream_event" {
        return None;
    }
    let event = line.get("event")?;
    if event.get("type")?.as_str()? != "content_block_delta" {
        return None;
    }
    let delta = event.get("delta")?;
    if delta.get("type")?.as_str()? != "text_delta" {
        return None;
    }
    delta.get("text")?.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n0000";

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    fn fixed(tools: Tools, schema: Option<&str>) -> Fixed {
        Fixed {
            model: "sonnet".into(),
            system: Some(String::new()),
            tools,
            json_schema: schema.map(str::to_string),
        }
    }

    #[test]
    fn argv_carries_tools_schema_and_system() {
        let (args, stdin) = cold(
            &fixed(Tools::NONE, Some(r#"{"type":"object"}"#)),
            "hi",
            &[],
            false,
        );
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
        assert_eq!(
            args,
            [
                "-p",
                "--output-format",
                "json",
                "--model=sonnet",
                "--system-prompt=",
                "--tools=",
                r#"--json-schema={"type":"object"}"#,
                "--no-session-persistence"
            ]
        );
        assert_eq!(stdin, "hi");
        let only = Tools::Only(vec![
            ToolName::try_from("Read".to_string()).unwrap(),
            ToolName::try_from("Grep".to_string()).unwrap(),
        ])
        .normalised();
        let (args, _) = cold(&fixed(only, None), "hi", &[], true);
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
        assert!(args.contains(&"--tools=Grep,Read".to_string()), "{args:?}");
        assert!(args.contains(&"--include-partial-messages".to_string()));
        let (args, _) = cold(&fixed(Tools::DEFAULT, None), "hi", &[], false);
        assert!(!args
            .iter()
            .any(|a| a.to_string_lossy().starts_with("--tools")));
    }

    #[test]
    fn images_go_as_one_stream_json_message() {
        let img = Image::parse("image/png", &b64(PNG)).unwrap();
        let (args, stdin) = cold(&fixed(Tools::NONE, None), "what is this?", &[img], false);
        assert!(args.iter().any(|a| a == "--input-format"));
        assert!(stdin.ends_with('\n'));
        let v: Value = serde_json::from_str(&stdin).unwrap();
        assert_eq!(
            v["message"]["content"][0]["source"]["media_type"],
            "image/png"
        );
        assert_eq!(
            v["message"]["content"][1],
            json!({"type":"text","text":"what is this?"})
        );
    }

    #[test]
    fn images_are_checked() {
        assert!(Image::parse("image/bmp", &b64(PNG)).is_err());
        assert!(Image::parse("image/png", "not base64!").is_err());
        assert!(
            Image::parse("image/jpeg", &b64(PNG)).is_err(),
            "wrong magic"
        );
        let big = [PNG, &vec![0u8; IMAGE_MAX_BYTES]].concat();
        assert!(Image::parse("image/png", &b64(&big)).is_err());
        let exact = [PNG, &vec![0u8; IMAGE_MAX_BYTES - PNG.len()]].concat();
        assert!(
            Image::parse("image/png", &b64(&exact)).is_ok(),
            "exactly at the limit"
        );
        assert!(Image::check_count(8).is_ok() && Image::check_count(9).is_err());
    }

    #[test]
    fn tool_bounds() {
        let t = |v: Value| serde_json::from_value::<Tools>(v).unwrap().normalised();
        assert!(t(json!(["Read"])).within(&t(json!(["Read", "Grep"]))));
        assert!(!t(json!(["Read", "Bash"])).within(&t(json!(["Read", "Grep"]))));
        assert!(!t(json!("default")).within(&t(json!(["Read"]))));
        assert!(t(json!("none")).within(&t(json!("none"))));
        assert!(!t(json!(["Read"])).within(&t(json!("none"))));
        assert!(t(json!(["Bash"])).within(&t(json!("default"))));
        assert_eq!(t(json!([])), Tools::NONE);
        assert!(serde_json::from_value::<Tools>(json!("some")).is_err());
        assert!(serde_json::from_value::<Tools>(json!(["--evil"])).is_err());
    }

    #[test]
    fn deltas_are_found() {
        let line = json!({"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}});
        assert_eq!(text_delta(&line), Some("Hel"));
        assert_eq!(text_delta(&json!({"type":"assistant"})), None);
    }
}
