//! The model's own chat template (`tokenizer_config.json` `chat_template`, `chat_template.jinja`
//! or `chat_template.json`) rendered with `minijinja` the way transformers'
//! `apply_chat_template` renders it with jinja2: `trim_blocks` and `lstrip_blocks` on, Python
//! string methods, `raise_exception`, and a `tojson` that writes `json.dumps` spacing.

use crate::error::EngineError;
use inference_pio_core::types::{ChatMessage, ContentPart};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;
use std::path::Path;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn special_token(config: &Json, key: &str) -> String {
    match config.get(key) {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

fn template_from(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        // A list of named templates: take "default".
        Json::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(String::from),
        _ => None,
    }
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)` formatting.
fn write_py_json(value: &Json, indent: Option<usize>, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_py_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(v, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

impl ChatTemplate {
    /// Finds the template of a model directory, as transformers' tokenizer does:
    /// `chat_template.jinja`, else `tokenizer_config.json`'s, else `chat_template.json`;
    /// `Ok(None)` when it has none.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, EngineError> {
        Self::find(dir, false)
    }

    /// The template a vision-language model's processor applies (transformers'
    /// `ProcessorMixin`): `chat_template.jinja` or the processor's `chat_template.json` before
    /// `tokenizer_config.json`'s, which may be a text-only one.
    pub fn for_processor(dir: &Path) -> Result<Option<Self>, EngineError> {
        Self::find(dir, true)
    }

    fn find(dir: &Path, processor_first: bool) -> Result<Option<Self>, EngineError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| EngineError::Template(format!("cannot read {}: {e}", config_path.display())))?;
            serde_json::from_str(&text)
                .map_err(|e| EngineError::Template(format!("{} is not valid JSON: {e}", config_path.display())))?
        } else {
            Json::Null
        };
        let mut source = config.get("chat_template").and_then(template_from);
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            source = Some(std::fs::read_to_string(&jinja).map_err(|e| EngineError::Template(format!("cannot read {}: {e}", jinja.display())))?);
        }
        let json_path = dir.join("chat_template.json");
        if (source.is_none() || (processor_first && !jinja.is_file())) && json_path.is_file() {
            let text = std::fs::read_to_string(&json_path).map_err(|e| EngineError::Template(format!("cannot read {}: {e}", json_path.display())))?;
            let value: Json = serde_json::from_str(&text).map_err(|e| EngineError::Template(format!("{} is not valid JSON: {e}", json_path.display())))?;
            if let Some(processor) = value.get("chat_template").and_then(template_from) {
                source = Some(processor);
            }
        }
        match source {
            None => Ok(None),
            Some(source) => Self::new(source, special_token(&config, "bos_token"), special_token(&config, "eos_token")).map(Some),
        }
    }

    /// The template a GGUF file carries (`tokenizer.chat_template`), with its BOS/EOS tokens;
    /// `Ok(None)` when it has none.
    pub fn from_gguf(file: &inference_pio_formats::gguf::Gguf) -> Result<Option<Self>, EngineError> {
        let err = |e: inference_pio_formats::FormatError| EngineError::Template(format!("GGUF metadata: {e}"));
        let Some(source) = file.get_str("tokenizer.chat_template").map_err(err)? else {
            return Ok(None);
        };
        let token = |key: &str| -> Result<String, EngineError> {
            Ok(file.special_token(key).map_err(err)?.map(|(t, _)| t.to_string()).unwrap_or_default())
        };
        Self::new(source.to_string(), token("tokenizer.ggml.bos_token_id")?, token("tokenizer.ggml.eos_token_id")?).map(Some)
    }

    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        // jinja2's `iterable` is Python's `iter()`: strings, lists and mappings are, `None` is
        // not (minijinja's treats none as an empty sequence, and Qwen3-Coder's template then
        // takes the length of a missing tool list).
        env.add_test("iterable", |v: Value| {
            matches!(v.kind(), minijinja::value::ValueKind::Seq | minijinja::value::ValueKind::Map | minijinja::value::ValueKind::String | minijinja::value::ValueKind::Iterable | minijinja::value::ValueKind::Bytes)
        });
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| EngineError::Template(format!("cannot parse: {e}")))?;
        Ok(Self { env, bos_token, eos_token })
    }

    /// Renders a conversation (with `tools` as the OpenAI-style list, if any).
    pub fn render(&self, messages: &[ChatMessage], tools: Option<&Json>, add_generation_prompt: bool) -> Result<String, EngineError> {
        if messages.is_empty() {
            return Err(EngineError::InvalidRequest("a chat needs at least one message".into()));
        }
        let template = self.env.get_template("chat").map_err(|e| EngineError::Template(e.to_string()))?;
        // A message with image parts reaches the template with its content as transformers'
        // processors pass it: a list of `{"type": "text", "text": ..}` and `{"type": "image"}`.
        let messages: Vec<Json> = messages
            .iter()
            .map(|m| {
                let mut v = serde_json::to_value(m).unwrap_or(Json::Null);
                if m.parts.iter().any(|p| matches!(p, ContentPart::Image { .. }))
                    && let Some(o) = v.as_object_mut()
                {
                    let parts = m
                        .parts
                        .iter()
                        .map(|p| match p {
                            ContentPart::Text { text } => serde_json::json!({"type": "text", "text": text}),
                            ContentPart::Image { .. } => serde_json::json!({"type": "image"}),
                        })
                        .collect();
                    o.insert("content".into(), Json::Array(parts));
                }
                if let Some(o) = v.as_object_mut() {
                    o.remove("parts");
                }
                v
            })
            .collect();
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(&messages)),
            tools => tools.map(|t| Value::from(minijinja::value::Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        };
        template
            .render(ctx)
            .map_err(|e| EngineError::Template(format!("rendering failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_uses_python_spacing() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}".into(), String::new(), String::new()).expect("template");
        let mut env_ctx = serde_json::Map::new();
        env_ctx.insert("x".into(), serde_json::json!({"b": [1, "é"], "a": {}}));
        let tmpl = t.env.get_template("chat").expect("get");
        let out = tmpl.render(Value::from(minijinja::value::Serde(&env_ctx))).expect("render");
        assert_eq!(out, "{\"b\": [1, \"é\"], \"a\": {}}|{\n  \"b\": [\n    1,\n    \"é\"\n  ],\n  \"a\": {}\n}");
    }

    #[test]
    fn a_processor_takes_chat_template_json_before_the_tokenizer_config() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": "text"}"#).expect("write");
        std::fs::write(dir.path().join("chat_template.json"), r#"{"chat_template": "vision"}"#).expect("write");
        let render = |t: Option<ChatTemplate>| t.expect("a template").render(&[ChatMessage::new("user", "hi")], None, true).expect("render");
        assert_eq!(render(ChatTemplate::from_model_dir(dir.path()).expect("tokenizer")), "text");
        assert_eq!(render(ChatTemplate::for_processor(dir.path()).expect("processor")), "vision");
        std::fs::write(dir.path().join("chat_template.jinja"), "jinja").expect("write");
        assert_eq!(render(ChatTemplate::from_model_dir(dir.path()).expect("tokenizer")), "jinja");
        assert_eq!(render(ChatTemplate::for_processor(dir.path()).expect("processor")), "jinja");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}".into(), String::new(), String::new()).expect("template");
        let err = t.render(&[ChatMessage::new("user", "hi")], None, true).expect_err("raise");
        assert!(err.to_string().contains("no system role"), "{err}");
    }
}
