//! Hermes-style tool calls (Qwen2.5 and Qwen3 dense instruct models, as their chat templates ask
//! for them): the body of one `<tool_call>…</tool_call>` block is a JSON object, after vLLM's
//! `hermes_tool_parser.py`.
//!
//! ```text
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! ```

use serde_json::{Map, Value};

use crate::ToolCall;

/// The call in a block body, or `None` when the body is not a JSON object with a string
/// `name`. `arguments` is an object, or a string holding one (some models write it so), or
/// absent (no arguments); anything else is not a call.
pub(crate) fn parse_block(body: &str) -> Option<Vec<ToolCall>> {
    let Value::Object(mut call) = serde_json::from_str::<Value>(body.trim()).ok()? else { return None };
    let Some(Value::String(name)) = call.remove("name") else { return None };
    let arguments = match call.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(arguments)) => arguments,
        Some(Value::String(text)) => match serde_json::from_str::<Value>(&text).ok()? {
            Value::Object(arguments) => arguments,
            _ => return None,
        },
        Some(_) => return None,
    };
    Some(vec![ToolCall { name, arguments }])
}

#[cfg(test)]
mod tests {
    use crate::{OutputFormat, parse};
    use serde_json::json;

    #[test]
    fn json_calls_parse_and_anything_else_stays_content() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 3}}\n</tool_call>";
        let out = parse(OutputFormat::Hermes, None, text);
        assert_eq!(out.content.trim(), "Let me look.");
        assert_eq!(out.tool_calls.len(), 1);
        assert_eq!(out.tool_calls[0].name, "get_weather");
        assert_eq!(out.tool_calls[0].arguments["days"], json!(3));
        // Arguments as a JSON string; two calls in a row.
        let two = "<tool_call>\n{\"name\": \"a\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>\n<tool_call>\n{\"name\": \"b\"}\n</tool_call>";
        let out = parse(OutputFormat::Hermes, None, two);
        assert_eq!(out.tool_calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(out.tool_calls[0].arguments["x"], json!(1));
        assert!(out.tool_calls[1].arguments.is_empty());
        // Not JSON, no name, or arguments of the wrong kind: the block is content, verbatim.
        for bad in ["<tool_call>\nget_weather(Paris)\n</tool_call>", "<tool_call>{\"arguments\": {}}</tool_call>", "<tool_call>{\"name\": \"a\", \"arguments\": [1]}</tool_call>"] {
            let out = parse(OutputFormat::Hermes, None, bad);
            assert!(out.tool_calls.is_empty(), "{bad}");
            assert_eq!(out.content, bad);
        }
        // Split anywhere, the same result.
        let whole = parse(OutputFormat::Hermes, None, text);
        let mut p = crate::parser(OutputFormat::Hermes, None);
        let mut pieces: crate::ParsedOutput = text.chars().map(|c| c.to_string()).flat_map(|c| p.push(&c)).collect();
        pieces.extend(p.finish());
        assert_eq!(pieces, whole);
    }
}
