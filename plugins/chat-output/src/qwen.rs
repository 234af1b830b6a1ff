//! Qwen3-Coder tool calls: the body of one `<tool_call>…</tool_call>` block.
//!
//! ```text
//! <function=get_weather>
//! <parameter=city>
//! Paris
//! </parameter>
//! </function>
//! ```

use serde_json::Map;

use crate::ToolCall;
use crate::convert::{Tools, qwen_value};

const FUNCTION_OPEN: &str = "<function=";
const FUNCTION_CLOSE: &str = "</function>";
const PARAMETER_OPEN: &str = "<parameter=";
const PARAMETER_CLOSE: &str = "</parameter>";

/// The calls in a block body (each `<function=…>` is one), or `None` when the block is not a
/// valid call: no `<function=`, no `>` after the name, or a name that is not an identifier-ish
/// token (vLLM's `_is_valid_function_name`).
pub(crate) fn parse_block(body: &str, tools: &Tools) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    let mut rest = body;
    while let Some(start) = rest.find(FUNCTION_OPEN) {
        let after = &rest[start + FUNCTION_OPEN.len()..];
        let gt = after.find('>')?;
        let name = &after[..gt];
        if !valid_function_name(name) {
            return None;
        }
        let (arguments, used) = parse_function(&after[gt + 1..], name, tools);
        calls.push(ToolCall { name: name.to_owned(), arguments });
        rest = &after[gt + 1 + used..];
    }
    (!calls.is_empty()).then_some(calls)
}

fn valid_function_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| "{}<>\"' \t\n\r".contains(c))
}

/// Earliest of `needles` in `s`.
fn find_first(s: &str, needles: &[&str]) -> Option<(usize, usize)> {
    needles.iter().enumerate().filter_map(|(k, n)| s.find(n).map(|i| (i, k))).min()
}

/// The first `<parameter=` that starts a line: a missing `</parameter>` ends there.
fn next_line_parameter(value_text: &str) -> Option<usize> {
    value_text.match_indices(PARAMETER_OPEN).map(|(i, _)| i).find(|&i| i == 0 || value_text[..i].ends_with('\n'))
}

/// The parameters of one function body (the text after `<function=NAME>`), and how many bytes
/// of `body` the function took (through its `</function>`, or all of it when that is missing).
///
/// A value runs to its `</parameter>`, or to a `<parameter=` starting a line before that (a
/// missing `</parameter>`); with no `</parameter>` at all, to the next `<parameter=` or
/// `</function>` (vLLM's `tool_call_parameter_regex`). A `</function>` inside a closed value
/// is text. One newline is stripped from each end.
/// A repeated name keeps the later value. Text between parameters is ignored.
fn parse_function(body: &str, name: &str, tools: &Tools) -> (Map<String, serde_json::Value>, usize) {
    let properties = tools.properties(name);
    let mut arguments = Map::new();
    let mut pos = 0;
    loop {
        let rest = &body[pos..];
        let Some((at, which)) = find_first(rest, &[PARAMETER_OPEN, FUNCTION_CLOSE]) else {
            return (arguments, body.len());
        };
        if which == 1 {
            return (arguments, pos + at + FUNCTION_CLOSE.len());
        }
        let name_start = at + PARAMETER_OPEN.len();
        let Some(name_len) = rest[name_start..].find('>') else {
            return (arguments, body.len());
        };
        let param = &rest[name_start..name_start + name_len];
        let value_start = name_start + name_len + 1;
        let value_text = &rest[value_start..];
        let close = value_text.find(PARAMETER_CLOSE);
        let (value, next) = match (close, next_line_parameter(value_text)) {
            (Some(end), Some(open)) if open < end => (&value_text[..open], value_start + open),
            (Some(end), _) => (&value_text[..end], value_start + end + PARAMETER_CLOSE.len()),
            (None, _) => match find_first(value_text, &[PARAMETER_OPEN, FUNCTION_CLOSE]) {
                Some((end, _)) => (&value_text[..end], value_start + end),
                None => (value_text, rest.len()),
            },
        };
        let value = value.strip_prefix('\n').unwrap_or(value);
        let value = value.strip_suffix('\n').unwrap_or(value);
        let schema = properties.and_then(|p| p.get(param));
        arguments.insert(param.to_owned(), qwen_value(value, schema));
        pos += next;
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::{call, check, tools};
    use crate::{OutputFormat, ParsedOutput};
    use serde_json::json;

    const F: OutputFormat = OutputFormat::Qwen3Coder;

    fn weather(city: &str, days: &str) -> String {
        format!(
            "<tool_call>\n<function=get_weather>\n<parameter=city>\n{city}\n</parameter>\n<parameter=days>\n{days}\n</parameter>\n</function>\n</tool_call>"
        )
    }

    #[test]
    fn plain_text_only() {
        let tools = tools();
        for text in [
            "Hello, world!",
            "  leading and trailing whitespace \n\n",
            "2 < 3, <b>bold</b>, a <tool_cal> tag, <tool_callx>, <function=f> alone, <tool",
            "ends with a half tag <tool_call",
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
        assert_eq!(out.content, "");
        assert_eq!(out.reasoning, "");
        assert_eq!(out.tool_calls, vec![call("get_weather", json!({"city": "Paris", "days": 3}))]);
    }

    #[test]
    fn two_calls() {
        let tools = tools();
        let text = format!("{}\n{}\n", weather("Paris", "3"), weather("Zürich 🌧", "x"));
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
    fn content_before_between_after() {
        let tools = tools();
        let text = format!(
            "Let me check the weather ☀️.\n\n{}\n\nBetween.{}  \n\nIt is sunny. ✓\n",
            weather("Paris", "1"),
            weather("Oslo", "2")
        );
        let out = check(F, Some(&tools), &text);
        assert_eq!(out.content, "Let me check the weather ☀️.\n\nBetween.It is sunny. ✓\n");
        assert_eq!(out.tool_calls.len(), 2);
        // Whitespace-only content next to a call is dropped.
        let text = format!("\n\n{}\n  \n", weather("Paris", "1"));
        assert_eq!(check(F, Some(&tools), &text).content, "");
    }

    #[test]
    fn event_order() {
        let tools = tools();
        let text = format!("Before {}after", weather("Paris", "1"));
        let mut p = crate::parser(F, Some(&tools));
        let mut events = p.push(&text);
        events.extend(p.finish());
        assert_eq!(
            events,
            vec![
                crate::OutputEvent::Content("Before ".to_owned()),
                crate::OutputEvent::ToolCall(call("get_weather", json!({"city": "Paris", "days": 1}))),
                crate::OutputEvent::Content("after".to_owned()),
            ]
        );
    }

    #[test]
    fn type_conversion() {
        let tools = tools();
        let param = |k: &str, v: &str| format!("<parameter={k}>\n{v}\n</parameter>\n");
        let text = [
            "<tool_call>\n<function=convert>\n".to_owned(),
            param("s", "  keep   as is \n"),
            param("i", "42"),
            param("i_bad", "forty-two"),
            param("n", "2.5"),
            param("n_int", "3.0"),
            param("n_bad", "1.2.3"),
            param("b", "True"),
            param("b_bad", "maybe"),
            param("o", "{\"a\": {\"b\": [1, 2, {\"c\": null}]}}"),
            param("o_py", "{'a': True, 'b': None, 'c': (1, 2)}"),
            param("o_bad", "{\"a\": "),
            param("a", "[1, \"two\", [3.5, false]]"),
            param("a_bad", "[1, 2"),
            param("nul", "null"),
            param("opt", "None"),
            param("opt2", "7"),
            param("i_null", "null"),
            param("s_null", "null"),
            param("untyped", "42"),
            param("extra", "42"),
            "</function>\n</tool_call>".to_owned(),
        ]
        .concat();
        let out = check(F, Some(&tools), &text);
        let expected = json!({
            "s": "  keep   as is \n", "i": 42, "i_bad": "forty-two", "n": 2.5, "n_int": 3, "n_bad": "1.2.3",
            "b": true, "b_bad": "maybe", "o": {"a": {"b": [1, 2, {"c": null}]}},
            "o_py": {"a": true, "b": null, "c": [1, 2]}, "o_bad": "{\"a\": ",
            "a": [1, "two", [3.5, false]], "a_bad": "[1, 2", "nul": null, "opt": null, "opt2": 7,
            "i_null": null, "s_null": "null", "untyped": "42", "extra": "42",
        });
        assert_eq!(out.tool_calls, vec![call("convert", expected)]);
        // Key order follows the text.
        let keys: Vec<&str> = out.tool_calls[0].arguments.keys().map(String::as_str).collect();
        assert_eq!(keys[..3], ["s", "i", "i_bad"]);
    }

    #[test]
    fn unknown_tool_and_no_tools_keep_strings() {
        let text = "<tool_call>\n<function=mystery>\n<parameter=n>\n3\n</parameter>\n<parameter=o>\n{\"a\": 1}\n</parameter>\n</function>\n</tool_call>";
        let expected = vec![call("mystery", json!({"n": "3", "o": "{\"a\": 1}"}))];
        let tools = tools();
        assert_eq!(check(F, Some(&tools), text).tool_calls, expected);
        assert_eq!(check(F, None, text).tool_calls, expected);
        // Known tool under no tools list: strings as well.
        assert_eq!(
            check(F, None, &weather("Paris", "3")).tool_calls,
            vec![call("get_weather", json!({"city": "Paris", "days": "3"}))]
        );
    }

    #[test]
    fn lenient_structure() {
        let tools = tools();
        // Missing </parameter>, value spanning lines, a literal </function> inside a value,
        // no newline around values, call without parameters, two functions in one block.
        let text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\
                    <tool_call><function=get_weather><parameter=city>Rome</function></tool_call>\
                    <tool_call><function=write><parameter=code>\nfn f() {\n    g(\"</function>\");\n}\n\n</parameter></function></tool_call>\
                    <tool_call>\n<function=get_time>\n</function>\n</tool_call>\
                    <tool_call><function=a><parameter=x>1</parameter></function><function=b></function></tool_call>";
        let out = check(F, Some(&tools), text);
        assert_eq!(out.content, "");
        assert_eq!(
            out.tool_calls,
            vec![
                call("get_weather", json!({"city": "Paris", "days": 3})),
                call("get_weather", json!({"city": "Rome"})),
                call("write", json!({"code": "fn f() {\n    g(\"</function>\");\n}\n"})),
                call("get_time", json!({})),
                call("a", json!({"x": "1"})),
                call("b", json!({})),
            ]
        );
    }

    #[test]
    fn malformed_block_is_content() {
        let tools = tools();
        for block in [
            "<tool_call>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",
            "<tool_call>\n<function=get weather>\n</function>\n</tool_call>",
            "<tool_call>\n<function=>\n</function>\n</tool_call>",
            "<tool_call>\n<function=get_weather\n</tool_call>",
            "<tool_call></tool_call>",
        ] {
            let text = format!("Hi \n{block}\n tail");
            let out = check(F, Some(&tools), &text);
            assert_eq!(out.content, text, "{block:?}");
            assert!(out.tool_calls.is_empty());
        }
        // A malformed block between real calls stays content, the calls still parse.
        let text = format!("{}\n<tool_call>oops</tool_call>\n{}", weather("A", "1"), weather("B", "2"));
        let out = check(F, Some(&tools), &text);
        assert_eq!(out.content, "<tool_call>oops</tool_call>\n");
        assert_eq!(out.tool_calls.len(), 2);
    }

    #[test]
    fn unterminated_block_is_content_at_finish() {
        let tools = tools();
        for text in [
            "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar".to_owned(),
            format!("{}\n<tool_call>\n<function=get_weather>\n</function>\n</tool_c", weather("A", "1")),
            "<tool_call>".to_owned(),
        ] {
            let out = check(F, Some(&tools), &text);
            let raw = &text[text.rfind("<tool_call>").unwrap_or_default()..];
            assert!(out.content.ends_with(raw), "{text:?} -> {out:?}");
            assert!(out.tool_calls.len() <= 1);
        }
        let out = check(F, Some(&tools), "Sure.\n<tool_call>\n<function=f>");
        assert_eq!(out.content, "Sure.\n<tool_call>\n<function=f>");
    }

    #[test]
    fn held_back_until_the_tag_resolves() {
        let tools = tools();
        let mut p = crate::parser(F, Some(&tools));
        assert_eq!(p.push("Hi <tool"), vec![crate::OutputEvent::Content("Hi ".to_owned())]);
        assert_eq!(p.push("_ca"), vec![]);
        assert_eq!(p.push("x"), vec![crate::OutputEvent::Content("<tool_cax".to_owned())]);
        assert_eq!(
            p.push(" <tool_call>\n<function=get_time>\n</function>\n</tool_"),
            vec![crate::OutputEvent::Content(" ".to_owned())]
        );
        assert_eq!(p.push("call>"), vec![crate::OutputEvent::ToolCall(call("get_time", json!({})))]);
        assert_eq!(p.finish(), vec![]);
        // `<<tool_call>`: the first `<` is text.
        let out = check(F, Some(&tools), &format!("<{}", weather("P", "1")));
        assert_eq!((out.content.as_str(), out.tool_calls.len()), ("<", 1));
    }
}
