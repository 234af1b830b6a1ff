//! GLM-4.5/4.6 tool calls: the body of one `<tool_call>…</tool_call>` block.
//!
//! ```text
//! get_weather
//! <arg_key>city</arg_key>
//! <arg_value>Paris</arg_value>
//! ```

use serde_json::Map;

use crate::ToolCall;
use crate::convert::{Tools, glm_value};

const ARG_KEY_OPEN: &str = "<arg_key>";
const ARG_KEY_CLOSE: &str = "</arg_key>";
const ARG_VALUE_OPEN: &str = "<arg_value>";
const ARG_VALUE_CLOSE: &str = "</arg_value>";

/// The call in a block body, or `None` when it has no function name. The name is the text up
/// to the first newline or `<arg_key>` (trimmed); then every
/// `<arg_key>K</arg_key>` + whitespace + `<arg_value>V</arg_value>` pair is an argument
/// (vLLM's `func_arg_regex`); anything else in the body is ignored.
pub(crate) fn parse_block(body: &str, tools: &Tools) -> Option<Vec<ToolCall>> {
    let cut = [body.find('\n'), body.find(ARG_KEY_OPEN)].into_iter().flatten().min().unwrap_or(body.len());
    let name = body[..cut].trim();
    if name.is_empty() {
        return None;
    }
    let mut arguments = Map::new();
    let mut rest = &body[cut..];
    while let Some(k) = rest.find(ARG_KEY_OPEN) {
        let after_open = &rest[k + ARG_KEY_OPEN.len()..];
        let Some(key_len) = after_open.find(ARG_KEY_CLOSE) else { break };
        let key = after_open[..key_len].trim();
        let after_key = &after_open[key_len + ARG_KEY_CLOSE.len()..];
        let Some(value_text) = after_key.trim_start().strip_prefix(ARG_VALUE_OPEN) else {
            // A key without a value: skip it.
            rest = after_key;
            continue;
        };
        let Some(value_len) = value_text.find(ARG_VALUE_CLOSE) else { break };
        let value = glm_value(&value_text[..value_len], tools.is_string_arg(name, key));
        arguments.insert(key.to_owned(), value);
        rest = &value_text[value_len + ARG_VALUE_CLOSE.len()..];
    }
    Some(vec![ToolCall { name: name.to_owned(), arguments }])
}

#[cfg(test)]
mod tests {
    use crate::test_support::{call, check, tools};
    use crate::{OutputEvent, OutputFormat, ParsedOutput};
    use serde_json::json;

    const F: OutputFormat = OutputFormat::Glm4 { starts_in_reasoning: false };
    const R: OutputFormat = OutputFormat::Glm4 { starts_in_reasoning: true };

    fn weather(city: &str, days: &str) -> String {
        format!(
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>{city}</arg_value>\n<arg_key>days</arg_key>\n<arg_value>{days}</arg_value>\n</tool_call>"
        )
    }

    #[test]
    fn plain_text_only() {
        let tools = tools();
        for text in [
            "Hello, world!",
            " a < b, <thinking> is not <think, <tool_cal>, <b>bold</b>\n\n",
            "ends with a half tag <thi",
            "",
        ] {
            let out = check(F, Some(&tools), text);
            assert_eq!(out, ParsedOutput { content: text.to_owned(), ..ParsedOutput::default() }, "{text:?}");
        }
    }

    #[test]
    fn one_call() {
        let tools = tools();
        let out = check(F, Some(&tools), &weather("Paris", "3"));
        assert_eq!(
            out,
            ParsedOutput {
                tool_calls: vec![call("get_weather", json!({"city": "Paris", "days": 3}))],
                ..ParsedOutput::default()
            }
        );
    }

    #[test]
    fn two_calls() {
        let tools = tools();
        let text = format!("{}\n{}", weather("Paris", "3"), weather("Zürich 🌧", "x"));
        let out = check(F, Some(&tools), &text);
        assert_eq!(out.content, "");
        assert_eq!(
            out.tool_calls,
            vec![
                call("get_weather", json!({"city": "Paris", "days": 3})),
                call("get_weather", json!({"city": "Zürich 🌧", "days": "x"})),
            ]
        );
    }

    #[test]
    fn content_before_and_after() {
        let tools = tools();
        let text = format!("I'll look it up ☂.\n{}\n\nDone: ✓", weather("Oslo", "2"));
        let out = check(F, Some(&tools), &text);
        assert_eq!(out.content, "I'll look it up ☂.\nDone: ✓");
        assert_eq!(out.tool_calls, vec![call("get_weather", json!({"city": "Oslo", "days": 2}))]);
    }

    #[test]
    fn calls_without_arguments() {
        let tools = tools();
        let text = "<tool_call>get_time</tool_call><tool_call> get_time \n</tool_call>\
                    <tool_call>get_weather<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>";
        let out = check(F, Some(&tools), text);
        assert_eq!(
            out.tool_calls,
            vec![
                call("get_time", json!({})),
                call("get_time", json!({})),
                call("get_weather", json!({"city": "Rome"}))
            ]
        );
        assert_eq!(out.content, "");
    }

    #[test]
    fn type_conversion() {
        let tools = tools();
        let arg = |k: &str, v: &str| format!("<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n");
        let text = [
            "<tool_call>convert\n".to_owned(),
            arg("s", " keep  as is "),
            arg("s_num", "42"),
            arg("i", "42"),
            arg("i_bad", "forty-two"),
            arg("n", " 2.5 "),
            arg("b", "true"),
            arg("b_py", "False"),
            arg("o", "{\"a\": {\"b\": [1, {\"c\": null}]}}"),
            arg("o_py", "{'a': True, 'b': None}"),
            arg("o_bad", "{\"a\": "),
            arg("a", "[1, \"two\", [3]]"),
            arg("nul", "null"),
            arg("untyped", "7"),
            arg("extra", "plain words"),
            "</tool_call>".to_owned(),
        ]
        .concat();
        let out = check(F, Some(&tools), &text);
        let expected = json!({
            "s": " keep  as is ", "s_num": "42", "i": 42, "i_bad": "forty-two", "n": 2.5, "b": true,
            "b_py": false, "o": {"a": {"b": [1, {"c": null}]}}, "o_py": {"a": true, "b": null},
            "o_bad": "{\"a\":", "a": [1, "two", [3]], "nul": null, "untyped": 7, "extra": "plain words",
        });
        assert_eq!(out.tool_calls, vec![call("convert", expected)]);
    }

    #[test]
    fn unknown_tool_decodes_everything() {
        let text = "<tool_call>mystery\n<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>n</arg_key><arg_value>3</arg_value></tool_call>";
        let expected = vec![call("mystery", json!({"city": "Paris", "n": 3}))];
        let tools = tools();
        assert_eq!(check(F, Some(&tools), text).tool_calls, expected);
        assert_eq!(check(F, None, text).tool_calls, expected);
        // Without a schema a numeric-looking string is decoded too (vLLM's behaviour).
        assert_eq!(
            check(F, None, &weather("1984", "3")).tool_calls,
            vec![call("get_weather", json!({"city": 1984, "days": 3}))]
        );
        assert_eq!(
            check(F, Some(&tools), &weather("1984", "3")).tool_calls,
            vec![call("get_weather", json!({"city": "1984", "days": 3}))]
        );
    }

    #[test]
    fn malformed_block_is_content() {
        let tools = tools();
        for block in [
            "<tool_call>\nget_weather\n<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
            "<tool_call><arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
            "<tool_call>   </tool_call>",
        ] {
            let text = format!("Hi\n{block}\ntail");
            let out = check(F, Some(&tools), &text);
            assert_eq!(out.content, text, "{block:?}");
            assert!(out.tool_calls.is_empty());
        }
    }

    #[test]
    fn unterminated_block_is_content_at_finish() {
        let tools = tools();
        let text = "Checking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par";
        assert_eq!(check(F, Some(&tools), text), ParsedOutput { content: text.to_owned(), ..ParsedOutput::default() });
        let text = format!("{}\n<tool_call>get_time</tool_c", weather("A", "1"));
        let out = check(F, Some(&tools), &text);
        assert_eq!(out.content, "<tool_call>get_time</tool_c");
        assert_eq!(out.tool_calls.len(), 1);
    }

    #[test]
    fn reasoning() {
        let tools = tools();
        let out = check(F, Some(&tools), "<think>Let me think: 2+2.\nIt is 4.</think>\nThe answer is 4.");
        assert_eq!(out.reasoning, "Let me think: 2+2.\nIt is 4.");
        assert_eq!(out.content, "\nThe answer is 4.");
        // Starting inside reasoning: no opening tag in the text.
        let out = check(R, Some(&tools), "2+2 is 4, ☺ <b>sure</b>.</think>The answer is 4.");
        assert_eq!(out.reasoning, "2+2 is 4, ☺ <b>sure</b>.");
        assert_eq!(out.content, "The answer is 4.");
        // Empty reasoning, unterminated reasoning, and tool-call tags inside reasoning.
        assert_eq!(
            check(F, Some(&tools), "<think></think>Hi"),
            ParsedOutput { content: "Hi".to_owned(), ..ParsedOutput::default() }
        );
        assert_eq!(check(R, Some(&tools), "still thinking </thi").reasoning, "still thinking </thi");
        let out = check(F, Some(&tools), "<think>maybe <tool_call>get_time</tool_call>?</think>No.");
        assert_eq!(
            (out.reasoning.as_str(), out.content.as_str(), out.tool_calls.len()),
            ("maybe <tool_call>get_time</tool_call>?", "No.", 0)
        );
        // A stray closing tag in content is dropped; a whitespace-only stretch before <think> too.
        assert_eq!(check(F, Some(&tools), "Hello</think> there").content, "Hello there");
        let out = check(F, Some(&tools), "\n<think>a</think>b");
        assert_eq!((out.reasoning.as_str(), out.content.as_str()), ("a", "b"));
    }

    #[test]
    fn reasoning_then_tool_call() {
        let tools = tools();
        let expected = ParsedOutput {
            content: String::new(),
            reasoning: "I need the weather.".to_owned(),
            tool_calls: vec![call("get_weather", json!({"city": "Paris", "days": 3}))],
        };
        let tail = format!("I need the weather.</think>\n{}", weather("Paris", "3"));
        assert_eq!(check(R, Some(&tools), &tail), expected);
        assert_eq!(check(F, Some(&tools), &format!("<think>{tail}")), expected);
        // With content between, and the event order.
        let text = format!("<think>hmm</think>\nOne moment.\n{}", weather("Paris", "3"));
        let mut p = crate::parser(F, Some(&tools));
        let mut events = p.push(&text);
        events.extend(p.finish());
        assert_eq!(
            events,
            vec![
                OutputEvent::Reasoning("hmm".to_owned()),
                OutputEvent::Content("\nOne moment.\n".to_owned()),
                OutputEvent::ToolCall(call("get_weather", json!({"city": "Paris", "days": 3}))),
            ]
        );
        check(F, Some(&tools), &text);
    }
}
