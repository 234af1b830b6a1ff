//! Shared test helpers: the tools fixture and the streaming-equivalence check.

use serde_json::{Value, json};

use crate::{OutputEvent, OutputFormat, ParsedOutput, THINK_CLOSE, THINK_OPEN, TOOL_OPEN, ToolCall, parse, parser};

/// A tool call with `args` (a JSON object) as its arguments.
pub(crate) fn call(name: &str, args: Value) -> ToolCall {
    let Value::Object(arguments) = args else { panic!("arguments must be an object") };
    ToolCall { name: name.to_owned(), arguments }
}

/// A tools list covering every schema type the converters know.
pub(crate) fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "write", "parameters": {"type": "object", "properties": {
            "code": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "convert", "parameters": {"type": "object", "properties": {
            "s": {"type": "string"}, "s_num": {"type": "string"}, "s_null": {"type": "string"},
            "i": {"type": "integer"}, "i_bad": {"type": "integer"}, "i_null": {"type": "integer"},
            "n": {"type": "number"}, "n_int": {"type": "number"}, "n_bad": {"type": "number"},
            "b": {"type": "boolean"}, "b_bad": {"type": "boolean"}, "b_py": {"type": "boolean"},
            "o": {"type": "object"}, "o_py": {"type": "object"}, "o_bad": {"type": "object"},
            "a": {"type": "array", "items": {}}, "a_bad": {"type": "array"},
            "nul": {"type": "null"}, "opt": {"type": ["integer", "null"]}, "opt2": {"type": ["integer", "null"]},
            "untyped": {"description": "no type given"}}}}},
    ])
}

fn tags(format: OutputFormat) -> &'static [&'static str] {
    match format {
        OutputFormat::Plain => &[],
        OutputFormat::Qwen3Coder | OutputFormat::Hermes => &[TOOL_OPEN],
        OutputFormat::Glm4 { .. } => &[TOOL_OPEN, THINK_OPEN, THINK_CLOSE],
    }
}

struct Run<'a> {
    format: OutputFormat,
    text: &'a str,
    whole: &'a ParsedOutput,
    out: ParsedOutput,
    forbidden: Vec<&'static str>,
}

impl Run<'_> {
    /// Take a batch of events released after the first `consumed` bytes of the text were pushed.
    fn take(&mut self, events: Vec<OutputEvent>, consumed: Option<usize>, what: &str) {
        for event in &events {
            if let OutputEvent::Content(c) = event {
                assert!(!c.is_empty(), "{what}: empty content event");
                for f in &self.forbidden {
                    assert!(!c.contains(f), "{what}: content event {c:?} contains {f:?}");
                }
            }
        }
        self.out.extend(events);
        let Some(end) = consumed else { return };
        // Held back: a tag prefix at the end of the pushed text that really starts a tag must
        // not have been released as content (unless the same text also sits right before it,
        // as in `<<tool_call>`, where the first `<` is content).
        let pushed = &self.text[..end];
        for tag in tags(self.format) {
            for k in 1..tag.len() {
                let p = &tag[..k];
                if pushed.ends_with(p) && self.text[end - k..].starts_with(tag) && !self.text[..end - k].ends_with(p) {
                    assert!(
                        !self.out.content.ends_with(p),
                        "{what}: released {p:?} of a real {tag:?}: {:?}",
                        self.out.content
                    );
                }
            }
        }
    }

    fn done(self, what: &str) {
        assert_eq!(&self.out, self.whole, "{what}: streaming differs from parse for {:?}", self.text);
    }
}

/// `parse(text)`, after checking that pushing the text split at every char boundary, one char
/// at a time, and in chunks of a few bytes gives the same result, and that no content event
/// leaks a tag (or the start of one that then completed).
pub(crate) fn check(format: OutputFormat, tools: Option<&Value>, text: &str) -> ParsedOutput {
    let whole = parse(format, tools, text);
    let forbidden: Vec<&'static str> = match format {
        OutputFormat::Plain => Vec::new(),
        _ => ["<tool_call", "<think", "</think"].into_iter().filter(|f| !whole.content.contains(f)).collect(),
    };
    let new_run = || Run { format, text, whole: &whole, out: ParsedOutput::default(), forbidden: forbidden.clone() };

    // Two pieces, split at every char boundary.
    for i in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
        let what = format!("split at {i}");
        let mut run = new_run();
        let mut p = parser(format, tools);
        run.take(p.push(&text[..i]), Some(i), &what);
        run.take(p.push(&text[i..]), Some(text.len()), &what);
        run.take(p.finish(), None, &what);
        run.done(&what);
    }

    // One char at a time; then chunks of n bytes, widened to the next char boundary.
    for n in [1, 2, 3, 5, 8, 13] {
        let what = format!("chunks of {n}");
        let mut run = new_run();
        let mut p = parser(format, tools);
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + n).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            run.take(p.push(&text[start..end]), Some(end), &what);
            // Empty pushes change nothing.
            run.take(p.push(""), Some(end), &what);
            start = end;
        }
        run.take(p.finish(), None, &what);
        run.done(&what);
    }
    whole
}
