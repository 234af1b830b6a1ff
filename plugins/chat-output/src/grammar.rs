//! A grammar (llguidance's Lark dialect) for "the answer is tool calls" in a model's own
//! tool-call format: what OpenAI's `tool_choice: "required"` (one or more calls of the offered
//! tools) and a named `tool_choice` (one call of that function) ask, enforced by constrained
//! decoding, as vLLM builds a structural grammar from the tools for the same choices.
//!
//! Hermes (Qwen3 dense): each call is `<tool_call>\n` + a JSON object (`name` the function,
//! `arguments` valid against its parameters schema) + `\n</tool_call>`. The XML formats below:
//! each function's parameters come in its schema's order, each at most once, the required ones
//! always; values are typed by their schema where the format writes them bare (Qwen3-Coder's
//! `<parameter=K>` and GLM's `<arg_value>`): `integer`, `number` and `boolean` as their JSON
//! spelling, `enum`s of strings as one of the listed strings, anything else as free text up to
//! the closing tag. The texts match what the format's parser ([`crate::parser`]) reads back.

use serde_json::Value;

use crate::OutputFormat;
use crate::convert::Tools;

/// The most calls a `required` answer may make (a model that keeps calling is stopped there).
pub const MAX_CALLS: usize = 16;

/// The Lark grammar of one or more calls (`function: None`) or exactly one call of `function`,
/// of the tools `tools` (OpenAI's list) in `format`. Errors name what is missing.
pub fn tool_call_grammar(format: OutputFormat, tools: Option<&Value>, function: Option<&str>) -> Result<String, String> {
    let layout = match format {
        OutputFormat::Plain => {
            return Err("this model writes no tool-call format the engine parses, so `tool_choice` `required` or a named function cannot be enforced".into());
        }
        OutputFormat::Hermes => Layout::Json,
        OutputFormat::Qwen3Coder => Layout::Tagged {
            call_open: |name| format!("<tool_call>\n<function={name}>\n"),
            call_close: "</function>\n</tool_call>",
            arg_open: |key| format!("<parameter={key}>\n"),
            arg_close: "\n</parameter>\n",
        },
        OutputFormat::Glm4 { .. } => Layout::Tagged {
            call_open: |name| format!("<tool_call>{name}\n"),
            call_close: "</tool_call>",
            arg_open: |key| format!("<arg_key>{key}</arg_key>\n<arg_value>"),
            arg_close: "</arg_value>\n",
        },
    };
    let tools = Tools::new(tools);
    if tools.names().is_empty() {
        return Err("`tool_choice` needs `tools`".into());
    }
    let names: Vec<&str> = match function {
        Some(f) if tools.names().contains(&f) => vec![f],
        Some(f) => return Err(format!("`tool_choice` names function `{f}`, which is not among the request's tools")),
        None => tools.names(),
    };
    let mut rules = Vec::new();
    let mut calls = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let call = format!("c{i}");
        match layout {
            Layout::Json => {
                // The whole call is one JSON object: `name` this function, `arguments` its schema.
                let parameters = tools.parameters(name).cloned().unwrap_or_else(|| serde_json::json!({"type": "object"}));
                let schema = serde_json::json!({
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                    "x-guidance": compact_json_options(),
                });
                rules.push(format!("{call}: \"<tool_call>\\n\" %json {schema} \"\\n</tool_call>\""));
            }
            Layout::Tagged { call_open, call_close, arg_open, arg_close } => {
                let properties = tools.properties(name).cloned().unwrap_or_default();
                let required = tools.required(name);
                let mut body = String::new();
                for (j, (key, schema)) in properties.iter().enumerate() {
                    let value = format!("v{i}_{j}");
                    let (expr, text_rule) = value_rule(schema, arg_close, &format!("t{i}_{j}"));
                    rules.push(format!("{value}: {} {expr}", lark_string(&arg_open(key))));
                    rules.extend(text_rule);
                    body.push_str(&format!(" {value}{}", if required.contains(&key.as_str()) { "" } else { "?" }));
                }
                rules.push(format!("{call}: {} {body} {}", lark_string(&call_open(name)), lark_string(call_close)));
            }
        }
        calls.push(call);
    }
    let one = calls.join(" | ");
    let start = match (format, function) {
        (OutputFormat::Glm4 { starts_in_reasoning: true }, _) => "start: reasoning \"\\n\"? calls\nreasoning[lazy]: /(.|\\n)*<\\/think>/".to_string(),
        (OutputFormat::Glm4 { starts_in_reasoning: false }, _) => "start: (\"<think>\" reasoning \"\\n\"?)? calls\nreasoning[lazy]: /(.|\\n)*<\\/think>/".to_string(),
        _ => "start: calls".to_string(),
    };
    let calls_rule = match function {
        Some(_) => format!("calls: {one}"),
        None => format!("calls: call (\"\\n\" call){{0,{}}}\ncall: {one}", MAX_CALLS - 1),
    };
    Ok(format!("{start}\n{calls_rule}\n{}\n", rules.join("\n")))
}

/// llguidance's JSON options for generated JSON (a schema's `x-guidance`): written as Python's
/// `json.dumps` writes it (`", "` and `": "`, no other whitespace), since free whitespace lets
/// a model pad its answer without end (vLLM offers the same as `disable-any-whitespace`).
pub fn compact_json_options() -> Value {
    serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// How a format writes a call: one JSON object, or tags around the name and each argument
/// (whose value is written bare).
#[derive(Clone, Copy)]
enum Layout {
    Json,
    Tagged { call_open: fn(&str) -> String, call_close: &'static str, arg_open: fn(&str) -> String, arg_close: &'static str },
}

/// A value of `schema` written bare, then `close`: the expression, and the lazy free-text
/// rule `name` it uses when the value is text.
fn value_rule(schema: &Value, close: &str, name: &str) -> (String, Option<String>) {
    let close_lit = lark_string(close);
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.is_empty()
        && options.iter().all(Value::is_string)
    {
        let alternatives: Vec<String> = options.iter().filter_map(Value::as_str).map(lark_string).collect();
        return (format!("({}) {close_lit}", alternatives.join(" | ")), None);
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("integer") => (format!("/-?(0|[1-9][0-9]{{0,17}})/ {close_lit}"), None),
        Some("number") => (format!("/-?(0|[1-9][0-9]{{0,17}})(\\.[0-9]{{1,17}})?([eE][-+]?[0-9]{{1,3}})?/ {close_lit}"), None),
        Some("boolean") => (format!("(\"true\" | \"false\") {close_lit}"), None),
        // Free text up to the first closing tag (a lazy lexeme ends at its first match).
        _ => (name.to_string(), Some(format!("{name}[lazy]: /(.|\\n)*{}/", regex_escape(close)))),
    }
}

/// A Lark string literal.
fn lark_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// `s` as a literal inside a Lark `/regex/`.
fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '/' => out.push_str("\\/"),
            c if "\\.+*?()|[]{}^$-".contains(c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}
