//! The OpenAI request bodies as they arrive, and every check on them that needs no engine:
//! what `/v1/chat/completions` and `/v1/completions` accept, what they refuse (with the
//! parameter named), and the plain values the server then hands to the engine.
//!
//! Depends on serde and serde_json only, so the fuzz target (`inference-pio-host/fuzz`,
//! `openai_request`) builds this very file on its own.
//!
//! Reference: the OpenAI API reference (chat completions and completions request bodies).

use serde::Deserialize;
use serde_json::Value;

/// The most choices (`n`) one request may ask for.
pub const MAX_CHOICES: u32 = 16;
/// The most alternatives per token `top_logprobs` (chat) or `logprobs` (completions) may ask
/// for (OpenAI's limits: 20 and 5).
pub const MAX_TOP_LOGPROBS: u32 = 20;
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// Whether and which tools the answer must call (`tool_choice`).
#[derive(Debug, PartialEq)]
pub enum ToolChoice {
    /// The model decides.
    Auto,
    /// No tools: the prompt does not offer them.
    None,
    /// One or more calls (constrained decoding).
    Required,
    /// One call of this function (constrained decoding).
    Function(String),
}

/// What a chat answer must be (`response_format`), for constrained decoding.
#[derive(Debug, PartialEq)]
pub enum Format {
    /// Any JSON object (`json_object`).
    JsonObject,
    /// A JSON value valid against this schema (`json_schema`).
    JsonSchema(Value),
}

/// A request the server refuses (400), naming the parameter where there is one.
#[derive(Debug, PartialEq)]
pub struct BadRequest {
    pub message: String,
    pub param: Option<&'static str>,
}

fn bad(message: impl Into<String>, param: Option<&'static str>) -> BadRequest {
    BadRequest { message: message.into(), param }
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// OpenAI's end-user id: logged with the request.
    pub user: Option<String>,
    /// Extension: this request's deadline in seconds (at most the server's).
    pub timeout_s: Option<f64>,
    /// Extension (as vLLM's and llama-server's): generate `max_tokens` tokens even past an
    /// end-of-sequence token (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Deserialize)]
pub struct ChatBody {
    pub model: String,
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub response_format: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Deserialize)]
pub struct CompletionBody {
    pub model: String,
    pub prompt: Value,
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// A body as JSON of type `T`.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BadRequest> {
    serde_json::from_slice(body).map_err(|e| bad(format!("malformed request body: {e}"), None))
}

/// The sampling settings once checked, in the engine's terms.
#[derive(Debug, PartialEq)]
pub struct Checked {
    /// `temperature` 0.
    pub greedy: bool,
    /// Positive temperatures only (0 is `greedy`).
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub max_tokens: Option<u32>,
    pub seed: Option<u64>,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    /// Choices to generate (OpenAI's `n`), 1 to [`MAX_CHOICES`].
    pub n: u32,
    /// Log-probabilities wanted: `Some(k)` with `k` alternatives per token.
    pub logprobs: Option<u32>,
}

impl Sampling {
    /// The request's deadline: its own `timeout_s`, at most the server's.
    pub fn timeout(&self, server_timeout_s: f64) -> Result<f64, BadRequest> {
        match self.timeout_s {
            None => Ok(server_timeout_s),
            Some(t) if t > 0.0 && t <= server_timeout_s => Ok(t),
            Some(t) => Err(bad(format!("`timeout_s` = {t} must be positive and at most the server's {server_timeout_s} s"), Some("timeout_s"))),
        }
    }

    /// Checks the settings against the model's context and the key's `max_tokens` limit
    /// (`(limit, key id)`), which also caps a request that does not say. A setting the
    /// engine does not implement is refused by name.
    pub fn check(&self, max_context: u64, key_limit: Option<(u32, &str)>) -> Result<Checked, BadRequest> {
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_CHOICES).contains(&n) {
            return Err(bad(format!("`n` must be between 1 and {MAX_CHOICES}"), Some("n")));
        }
        for (name, value) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if value.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
                return Err(bad(format!("`{name}` must be between -2 and 2"), Some(name)));
            }
        }
        if self.repetition_penalty.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err(bad("`repetition_penalty` must be positive", Some("repetition_penalty")));
        }
        // Chat: `logprobs: true` with `top_logprobs` alternatives (0 to 20); completions:
        // `logprobs: k` alternatives (0 to 5).
        let logprobs = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(self.top_logprobs.unwrap_or(0)),
            Some(Value::Number(k)) => match k.as_u64().filter(|&k| k <= MAX_COMPLETION_LOGPROBS as u64) {
                Some(k) => Some(k as u32),
                None => return Err(bad(format!("`logprobs` must be a boolean, or (completions) an integer from 0 to {MAX_COMPLETION_LOGPROBS}"), Some("logprobs"))),
            },
            Some(_) => return Err(bad("`logprobs` must be a boolean, or (completions) an integer", Some("logprobs"))),
        };
        if let Some(k) = self.top_logprobs {
            if k > MAX_TOP_LOGPROBS {
                return Err(bad(format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}"), Some("top_logprobs")));
            }
            if self.logprobs != Some(Value::Bool(true)) {
                return Err(bad("`top_logprobs` needs `logprobs: true`", Some("top_logprobs")));
            }
        }
        let mut max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if let Some(n) = max_tokens
            && (n == 0 || n as u64 > max_context)
        {
            return Err(bad(format!("`max_tokens` = {n} must be between 1 and the model's context of {max_context} tokens"), Some("max_tokens")));
        }
        if let Some((limit, key)) = key_limit {
            match max_tokens {
                Some(n) if n > limit => return Err(bad(format!("`max_tokens` = {n} is past API key `{key}`'s limit of {limit}"), Some("max_tokens"))),
                Some(_) => {}
                None => max_tokens = Some(limit),
            }
        }
        let temperature = self.temperature;
        if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err(bad("`temperature` must be between 0 and 2", Some("temperature")));
        }
        if self.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err(bad("`top_p` must be in (0, 1]", Some("top_p")));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 16 || stop.iter().any(String::is_empty) {
            return Err(bad("`stop` takes at most 16 non-empty strings", Some("stop")));
        }
        Ok(Checked {
            greedy: temperature == Some(0.0),
            temperature: temperature.filter(|t| *t > 0.0),
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty.filter(|p| *p != 0.0),
            frequency_penalty: self.frequency_penalty.filter(|p| *p != 0.0),
            max_tokens,
            seed: self.seed,
            ignore_eos: self.ignore_eos,
            stop,
            n,
            logprobs,
        })
    }
}

/// A chat message as the chat template takes it.
#[derive(Debug, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool` (`developer` is `system`).
    pub role: &'static str,
    pub content: String,
    pub tool_calls: Option<Value>,
    pub name: Option<String>,
    /// The content's parts in order when it has images (each names one of the request's
    /// images); empty otherwise.
    pub parts: Vec<Part>,
}

/// One part of a message's content (the engine's `ContentPart`; this file is also compiled
/// alone by the fuzz target, without the plugin ABI).
#[derive(Debug, PartialEq)]
pub enum Part {
    Text(String),
    /// The request's image of this index.
    Image(u32),
}

/// The largest image a request may carry inline (decoded bytes).
pub const MAX_IMAGE_BYTES: usize = 20_000_000;

impl ChatBody {
    /// What `response_format` asks of the answer: nothing (`text` or absent), any JSON object,
    /// or a value matching a JSON schema (`{"type": "json_schema", "json_schema": {"name",
    /// "schema", "strict"}}`; the schema is enforced whether or not `strict` is set).
    pub fn format(&self) -> Result<Option<Format>, BadRequest> {
        let Some(format) = self.response_format.as_ref().filter(|f| !f.is_null()) else { return Ok(None) };
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Format::JsonObject)),
            Some("json_schema") => match format.get("json_schema").and_then(|j| j.get("schema")) {
                Some(schema) if schema.is_object() || schema.is_boolean() => Ok(Some(Format::JsonSchema(schema.clone()))),
                _ => Err(bad("`response_format.json_schema.schema` must be a JSON schema object", Some("response_format"))),
            },
            Some(other) => Err(bad(format!("`response_format` type `{other}` is not one of text, json_object, json_schema"), Some("response_format"))),
            None => Err(bad("`response_format` needs a `type`", Some("response_format"))),
        }
    }

    /// `tool_choice`: `auto` (or absent), `none`, `required`, or `{"type": "function",
    /// "function": {"name": ..}}` naming one of `tools`. The last two need `tools` and exclude a
    /// `response_format`.
    pub fn tool_choice(&self) -> Result<ToolChoice, BadRequest> {
        let choice = match &self.tool_choice {
            None | Some(Value::Null) => return Ok(ToolChoice::Auto),
            Some(Value::String(s)) if s == "auto" => return Ok(ToolChoice::Auto),
            Some(Value::String(s)) if s == "none" => return Ok(ToolChoice::None),
            Some(Value::String(s)) if s == "required" => ToolChoice::Required,
            Some(v) if v.get("type").and_then(Value::as_str) == Some("function") => match v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
                Some(name) => ToolChoice::Function(name.to_string()),
                None => return Err(bad("a named `tool_choice` needs `function.name`", Some("tool_choice"))),
            },
            Some(_) => return Err(bad("`tool_choice` must be `auto`, `none`, `required` or `{\"type\": \"function\", \"function\": {\"name\": ..}}`", Some("tool_choice"))),
        };
        let names: Vec<&str> = self
            .tools
            .as_ref()
            .and_then(Value::as_array)
            .map(|t| t.iter().filter_map(|t| t.get("function").unwrap_or(t).get("name").and_then(Value::as_str)).collect())
            .unwrap_or_default();
        if names.is_empty() {
            return Err(bad("`tool_choice` `required` or a named function needs `tools`", Some("tool_choice")));
        }
        if let ToolChoice::Function(name) = &choice
            && !names.contains(&name.as_str())
        {
            return Err(bad(format!("`tool_choice` names function `{name}`, which is not among `tools`"), Some("tool_choice")));
        }
        if self.format()?.is_some() {
            return Err(bad("`response_format` cannot be combined with `tool_choice` `required` or a named function", Some("response_format")));
        }
        Ok(choice)
    }

    /// The settings a chat request may not use, and its messages with the images their
    /// `image_url` parts carry (`data:` URLs), in order.
    pub fn messages(&self, image_dirs: &[std::path::PathBuf]) -> Result<(Vec<Message>, Vec<Vec<u8>>), BadRequest> {
        self.format()?;
        self.tool_choice()?;
        if self.messages.is_empty() {
            return Err(bad("`messages` must not be empty", Some("messages")));
        }
        let mut images = Vec::new();
        let messages = self.messages.iter().map(|m| message(m, &mut images, image_dirs)).collect::<Result<_, _>>()?;
        Ok((messages, images))
    }
}

impl ChatBody {
    /// The tools the prompt offers: none with `tool_choice: "none"` (the model is not told of
    /// tools it may not call), else `tools` as given.
    pub fn offered_tools(&self) -> Option<Value> {
        if self.tool_choice() == Ok(ToolChoice::None) { None } else { self.tools.clone() }
    }
}

/// An `image_url` part's image: the bytes of a `data:` URL (`data:image/...;base64,...`), or
/// of a file inside one of `image_dirs` (`file:///...` or an absolute path, resolved with its
/// links before the check). An `http(s)` URL is refused (this server fetches nothing), as is
/// any other path.
fn image_url(part: &Value, image_dirs: &[std::path::PathBuf]) -> Result<Vec<u8>, BadRequest> {
    use base64::Engine as _;
    let url = part.get("image_url").and_then(|u| u.get("url").or(Some(u))).and_then(Value::as_str).ok_or_else(|| bad("an `image_url` part needs `image_url.url`", Some("messages")))?;
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(bad("image URLs over http(s) are not fetched by this server; send the image inline as a `data:image/...;base64,` URL", Some("messages")));
    }
    let Some(rest) = url.strip_prefix("data:") else {
        return local_image(url.strip_prefix("file://").unwrap_or(url), image_dirs);
    };
    let (kind, data) = rest.split_once(',').ok_or_else(|| bad("a `data:` URL needs a `,` before its data", Some("messages")))?;
    if !kind.starts_with("image/") || !kind.ends_with(";base64") {
        return Err(bad(format!("a `data:` image URL must be `data:image/<format>;base64,...`, not `data:{kind},...`"), Some("messages")));
    }
    if data.len() / 4 * 3 > MAX_IMAGE_BYTES {
        return Err(bad(format!("an image is over {MAX_IMAGE_BYTES} bytes"), Some("messages")));
    }
    base64::engine::general_purpose::STANDARD.decode(data.trim()).map_err(|e| bad(format!("an image's base64 data does not decode: {e}"), Some("messages")))
}

/// A local image file named by a request, read only inside the allowed directories.
fn local_image(path: &str, image_dirs: &[std::path::PathBuf]) -> Result<Vec<u8>, BadRequest> {
    if image_dirs.is_empty() {
        return Err(bad("local image paths are not read by this server (it allows no image directory); send the image inline as a `data:image/...;base64,` URL", Some("messages")));
    }
    let unreadable = |_| bad(format!("image `{path}` cannot be read"), Some("messages"));
    let resolved = std::path::Path::new(path).canonicalize().map_err(unreadable)?;
    if !image_dirs.iter().any(|d| resolved.starts_with(d)) {
        return Err(bad(format!("image `{path}` is outside the directories this server reads images from"), Some("messages")));
    }
    let size = std::fs::metadata(&resolved).map_err(unreadable)?.len();
    if size > MAX_IMAGE_BYTES as u64 {
        return Err(bad(format!("image `{path}` is {size} bytes, over {MAX_IMAGE_BYTES}"), Some("messages")));
    }
    std::fs::read(&resolved).map_err(unreadable)
}

/// A chat message: its text (a string, or a list of text parts) and, with `image_url` parts,
/// its parts in order, the images appended to `images`.
fn message(value: &Value, images: &mut Vec<Vec<u8>>, image_dirs: &[std::path::PathBuf]) -> Result<Message, BadRequest> {
    let role = match value.get("role").and_then(Value::as_str) {
        Some("system" | "developer") => "system",
        Some("user") => "user",
        Some("assistant") => "assistant",
        Some("tool") => "tool",
        Some(other) => return Err(bad(format!("unknown message role `{other}`"), Some("messages"))),
        None => return Err(bad("every message needs a `role` string", Some("messages"))),
    };
    let mut parts = Vec::new();
    let content = match value.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(list)) => {
            let mut text = String::new();
            for part in list {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => {
                        text.push_str(t);
                        parts.push(Part::Text(t.to_string()));
                    }
                    (Some("image_url"), _) => {
                        parts.push(Part::Image(images.len() as u32));
                        images.push(image_url(part, image_dirs)?);
                    }
                    (Some(kind @ ("video_url" | "video" | "input_video")), _) => {
                        return Err(bad(format!("message content part `{kind}`: video input is not supported"), Some("messages")));
                    }
                    (kind, _) => return Err(bad(format!("message content part `{}` is not supported by this server (text and image_url)", kind.unwrap_or("?")), Some("messages"))),
                }
            }
            text
        }
        Some(_) => return Err(bad("message `content` must be a string or a list of parts", Some("messages"))),
    };
    if !parts.iter().any(|p| matches!(p, Part::Image(_))) {
        parts.clear();
    }
    Ok(Message {
        role,
        content,
        tool_calls: value.get("tool_calls").filter(|v| !v.is_null()).cloned(),
        name: value.get("name").and_then(Value::as_str).map(str::to_string),
        parts,
    })
}

/// A completion's prompt: text, or token ids.
#[derive(Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
}

impl CompletionBody {
    /// The prompt (one per request), refusing `echo`.
    pub fn prompt(&self) -> Result<Prompt, BadRequest> {
        if self.echo == Some(true) {
            return Err(bad("`echo` is not supported", Some("echo")));
        }
        match &self.prompt {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(items) if !items.is_empty() && items.iter().all(|v| v.as_u64().is_some_and(|n| n <= u32::MAX as u64)) => {
                Ok(Prompt::TokenIds(items.iter().filter_map(Value::as_u64).map(|n| n as u32).collect()))
            }
            Value::Array(items) if items.len() == 1 && items[0].is_string() => Ok(Prompt::Text(items[0].as_str().unwrap_or_default().to_string())),
            _ => Err(bad("`prompt` must be a string or a list of token ids (one prompt per request)", Some("prompt"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_bodies_are_checked_by_name() {
        let body: ChatBody = parse(br#"{"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "stop": "x", "temperature": 0}"#).expect("parses");
        let messages = body.messages(&[]).expect("messages");
        assert_eq!(messages, (vec![Message { role: "system", content: "ab".into(), tool_calls: None, name: None, parts: Vec::new() }], Vec::new()));
        let checked = body.sampling.check(100, None).expect("checks");
        assert!(checked.greedy && checked.temperature.is_none());
        assert_eq!(checked.stop, vec!["x".to_string()]);
        for (text, param) in [
            (r#"{"model": "m", "messages": [], "n": 17}"#, Some("n")),
            (r#"{"model": "m", "messages": [], "n": 0}"#, Some("n")),
            (r#"{"model": "m", "messages": [], "max_tokens": 101}"#, Some("max_tokens")),
            (r#"{"model": "m", "messages": [], "top_p": 0}"#, Some("top_p")),
            (r#"{"model": "m", "messages": [], "stop": ["", "a"]}"#, Some("stop")),
            (r#"{"model": "m", "messages": [], "logprobs": "yes"}"#, Some("logprobs")),
            (r#"{"model": "m", "messages": [], "logprobs": 6}"#, Some("logprobs")),
            (r#"{"model": "m", "messages": [], "top_logprobs": 2}"#, Some("top_logprobs")),
            (r#"{"model": "m", "messages": [], "logprobs": true, "top_logprobs": 21}"#, Some("top_logprobs")),
            (r#"{"model": "m", "messages": [], "presence_penalty": 2.5}"#, Some("presence_penalty")),
            (r#"{"model": "m", "messages": [], "frequency_penalty": -3}"#, Some("frequency_penalty")),
            (r#"{"model": "m", "messages": [], "repetition_penalty": 0}"#, Some("repetition_penalty")),
        ] {
            let body: ChatBody = parse(text.as_bytes()).expect(text);
            assert_eq!(body.sampling.check(100, None).expect_err(text).param, param, "{text}");
        }
        let logprobs = |text: &str| parse::<ChatBody>(text.as_bytes()).expect(text).sampling.check(100, None).expect(text).logprobs;
        assert_eq!(logprobs(r#"{"model": "m", "messages": [], "logprobs": true, "top_logprobs": 3}"#), Some(3));
        assert_eq!(logprobs(r#"{"model": "m", "messages": [], "logprobs": true}"#), Some(0));
        assert_eq!(logprobs(r#"{"model": "m", "messages": [], "logprobs": 2}"#), Some(2));
        assert_eq!(logprobs(r#"{"model": "m", "messages": [], "logprobs": false}"#), None);
        let format = |f: &str| parse::<ChatBody>(format!(r#"{{"model": "m", "messages": [], "response_format": {f}}}"#).as_bytes()).expect(f).format();
        assert_eq!(format(r#"{"type": "text"}"#), Ok(None));
        assert_eq!(format(r#"{"type": "json_object"}"#), Ok(Some(Format::JsonObject)));
        assert_eq!(
            format(r#"{"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": {"type": "object"}}}"#),
            Ok(Some(Format::JsonSchema(serde_json::json!({"type": "object"}))))
        );
        for f in [r#"{"type": "json_schema", "json_schema": {"name": "x"}}"#, r#"{"type": "yaml"}"#, r#"{}"#] {
            assert_eq!(format(f).expect_err(f).param, Some("response_format"), "{f}");
        }
        let body: ChatBody = parse(br#"{"model": "m", "messages": [{"role": "robot"}]}"#).expect("parses");
        assert!(body.messages(&[]).expect_err("role").message.contains("unknown message role `robot`"));
        // A local image path with no allowed directory.
        let body: ChatBody = parse(br#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///tmp/x.png"}}]}]}"#).expect("parses");
        assert!(body.messages(&[]).expect_err("path").message.contains("allows no image directory"));
        assert!(parse::<ChatBody>(b"{\"model\": 3}").err().expect("a wrong type is refused").message.starts_with("malformed request body"));
    }

    #[test]
    fn a_key_limit_caps_max_tokens() {
        let body: ChatBody = parse(br#"{"model": "m", "messages": []}"#).expect("parses");
        assert_eq!(body.sampling.check(100, Some((8, "k"))).expect("capped").max_tokens, Some(8));
        let body: ChatBody = parse(br#"{"model": "m", "messages": [], "max_tokens": 9}"#).expect("parses");
        assert!(body.sampling.check(100, Some((8, "k"))).expect_err("past").message.contains("past API key `k`'s limit of 8"));
    }

    #[test]
    fn completion_prompts_are_text_or_token_ids() {
        let prompt = |v: &str| parse::<CompletionBody>(format!(r#"{{"model": "m", "prompt": {v}}}"#).as_bytes()).expect(v).prompt();
        assert_eq!(prompt(r#""hi""#), Ok(Prompt::Text("hi".into())));
        assert_eq!(prompt("[1, 2]"), Ok(Prompt::TokenIds(vec![1, 2])));
        assert_eq!(prompt(r#"["hi"]"#), Ok(Prompt::Text("hi".into())));
        assert!(prompt("[]").is_err() && prompt("[4294967296]").is_err() && prompt(r#"["a", "b"]"#).is_err());
    }
}
