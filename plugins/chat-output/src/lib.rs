//! # inference-pio-chat-output
//!
//! Turns the text an LLM generates into structured chat output — plain content, reasoning and
//! tool calls — incrementally while streaming ([`parser`]) or in one go ([`parse`]).
//!
//! ## References
//!
//! The semantics follow vLLM (the code here is written from scratch):
//! - Qwen3-Coder XML tool calls: vLLM's `qwen3coder_tool_parser.py`
//!   (`vllm/tool_parsers/qwen3coder_tool_parser.py`, formerly under
//!   `vllm/entrypoints/openai/tool_parsers/`), its `_convert_param_value` in particular.
//! - Hermes JSON tool calls (Qwen2.5 / Qwen3 dense): vLLM's `hermes_tool_parser.py`.
//! - GLM-4.5/4.6 tool calls: vLLM's `glm4_moe_tool_parser.py` (`_is_string_type`,
//!   `_deserialize`, `func_arg_regex`), and the GLM-4.5/4.6 reasoning parser
//!   `vllm/reasoning/glm4_moe_reasoning_parser.py` (`<think>…</think>`).
//!
//! ## Streaming
//!
//! Text that could still become a tag (`<tool_call>`, and `<think>` / `</think>` for GLM) is held
//! back until it completes the tag or can no longer match. A `<tool_call>…</tool_call>` block is
//! held until its closing tag and then released as one [`OutputEvent::ToolCall`] per call; a
//! block that does not parse, or is still open at [`OutputParser::finish`], is released verbatim
//! as content. Whitespace directly after a tool-call block is dropped, and so is a stretch of
//! content that is only whitespace directly before one (or before `<think>`); all other content
//! is released verbatim (vLLM's Qwen3-Coder parser skips whitespace after a call, its GLM
//! parser drops whitespace-only content). To do that, whitespace that opens a content stretch
//! is held until something other than whitespace follows.
//!
//! ## Where this departs from vLLM
//!
//! - Every split of the same text gives the same result (vLLM's streaming and non-streaming
//!   paths differ): content after and between calls is kept (vLLM's non-streaming Qwen3-Coder
//!   and GLM paths keep only the content before the first call); an unterminated block is
//!   content, not a call; an unterminated `<think>` is reasoning.
//! - A block ends at the first `</tool_call>`; a bare `<function=…>` outside `<tool_call>` is
//!   content.
//! - Qwen3-Coder booleans other than `true`/`false` stay strings (vLLM makes them `false`);
//!   `"type": [..]` lists are read like `anyOf` (first non-null type, nullable if `"null"` is
//!   listed) where vLLM stringifies the list. Python literals are decoded by a subset of
//!   `ast.literal_eval` (see `pylit`); integers beyond 64 bits stay strings.
//! - GLM: a stray `</think>` in content is dropped; `<think>` may open reasoning anywhere in
//!   content; tool-call tags inside reasoning are reasoning text.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod convert;
mod glm;
mod grammar;
mod hermes;
mod pylit;
mod qwen;
#[cfg(test)]
mod test_support;

use convert::Tools;
pub use grammar::{compact_json_options, tool_call_grammar};

const TOOL_OPEN: &str = "<tool_call>";
const TOOL_CLOSE: &str = "</tool_call>";
const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// One function call the model made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Map<String, Value>,
}

impl ToolCall {
    /// The arguments as a JSON text (what OpenAI's `function.arguments` carries).
    pub fn arguments_json(&self) -> String {
        Value::Object(self.arguments.clone()).to_string()
    }
}

/// A piece of structured output, in generation order.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputEvent {
    Content(String),
    Reasoning(String),
    ToolCall(ToolCall),
}

/// How the model writes reasoning and tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// Everything is content.
    Plain,
    /// `<tool_call><function=NAME><parameter=KEY>VALUE</parameter>…</function></tool_call>`.
    Qwen3Coder,
    /// `<tool_call>{"name": NAME, "arguments": {…}}</tool_call>` (Hermes; Qwen2.5 and Qwen3
    /// dense instruct models).
    Hermes,
    /// `<think>…</think>` reasoning and
    /// `<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>…</tool_call>`.
    /// `starts_in_reasoning`: the prompt ended with `<think>`, so the text starts as reasoning.
    Glm4 { starts_in_reasoning: bool },
}

/// Incremental parsing of generated text.
pub trait OutputParser: Send {
    /// Feed the next piece of generated text (any split, even inside a tag); returns everything
    /// that can be released now, in order. Adjacent text of the same kind may be merged.
    fn push(&mut self, delta: &str) -> Vec<OutputEvent>;
    /// End of generation: release whatever is held back. The parser is then back at its start.
    fn finish(&mut self) -> Vec<OutputEvent>;
}

/// A parser for `format`. `tools`: the OpenAI-style tools list given with the request
/// (`[{"type":"function","function":{"name":..,"parameters": <JSON schema>}}]`), or `None`.
pub fn parser(format: OutputFormat, tools: Option<&Value>) -> Box<dyn OutputParser> {
    match format {
        OutputFormat::Plain => Box::new(PlainParser),
        OutputFormat::Qwen3Coder => Box::new(TaggedParser::new(Dialect::Qwen3Coder, false, Tools::new(tools))),
        OutputFormat::Hermes => Box::new(TaggedParser::new(Dialect::Hermes, false, Tools::new(tools))),
        OutputFormat::Glm4 { starts_in_reasoning } => {
            Box::new(TaggedParser::new(Dialect::Glm4, starts_in_reasoning, Tools::new(tools)))
        }
    }
}

/// Everything a generation produced, merged.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ParsedOutput {
    pub content: String,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCall>,
}

impl ParsedOutput {
    pub fn add(&mut self, event: OutputEvent) {
        match event {
            OutputEvent::Content(s) => self.content.push_str(&s),
            OutputEvent::Reasoning(s) => self.reasoning.push_str(&s),
            OutputEvent::ToolCall(c) => self.tool_calls.push(c),
        }
    }
}

impl Extend<OutputEvent> for ParsedOutput {
    fn extend<I: IntoIterator<Item = OutputEvent>>(&mut self, events: I) {
        events.into_iter().for_each(|e| self.add(e));
    }
}

impl FromIterator<OutputEvent> for ParsedOutput {
    fn from_iter<I: IntoIterator<Item = OutputEvent>>(events: I) -> Self {
        let mut out = Self::default();
        out.extend(events);
        out
    }
}

/// Whole text at once (same result as pushing it in any split and finishing).
pub fn parse(format: OutputFormat, tools: Option<&Value>, text: &str) -> ParsedOutput {
    let mut p = parser(format, tools);
    let mut out: ParsedOutput = p.push(text).into_iter().collect();
    out.extend(p.finish());
    out
}

struct PlainParser;

impl OutputParser for PlainParser {
    fn push(&mut self, delta: &str) -> Vec<OutputEvent> {
        if delta.is_empty() { Vec::new() } else { vec![OutputEvent::Content(delta.to_owned())] }
    }

    fn finish(&mut self) -> Vec<OutputEvent> {
        Vec::new()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    Qwen3Coder,
    Hermes,
    Glm4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Content,
    Reasoning,
    /// Inside `<tool_call>`; `buf` holds the body.
    Call,
}

/// Length of the longest suffix of `text` that is a proper prefix of one of `tags`.
fn partial_tag_len(text: &str, tags: &[&str]) -> usize {
    tags.iter().flat_map(|tag| (1..tag.len()).rev().find(|&k| text.ends_with(&tag[..k]))).max().unwrap_or(0)
}

struct TaggedParser {
    dialect: Dialect,
    tools: Tools,
    initial: Mode,
    mode: Mode,
    /// Text not yet released in the current mode.
    buf: String,
    /// In `Call` mode: `buf[..scanned]` holds no `</tool_call>` start.
    scanned: usize,
    /// Whitespace opening the current content stretch, held until it is known not to sit
    /// right before a tool call.
    pending_ws: String,
    /// `pending_ws` as it was when the current block opened (given back if it is not a call).
    ws_before_call: String,
    /// Something other than whitespace has been released in the current content stretch.
    run_has_text: bool,
    /// The current content stretch follows a tool call: drop its leading whitespace.
    strip_leading: bool,
    out: Vec<OutputEvent>,
}

impl TaggedParser {
    fn new(dialect: Dialect, starts_in_reasoning: bool, tools: Tools) -> Self {
        let initial = if starts_in_reasoning { Mode::Reasoning } else { Mode::Content };
        Self {
            dialect,
            tools,
            initial,
            mode: initial,
            buf: String::new(),
            scanned: 0,
            pending_ws: String::new(),
            ws_before_call: String::new(),
            run_has_text: false,
            strip_leading: false,
            out: Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.mode = self.initial;
        self.buf.clear();
        self.scanned = 0;
        self.pending_ws.clear();
        self.ws_before_call.clear();
        self.run_has_text = false;
        self.strip_leading = false;
    }

    fn content_tags(&self) -> &'static [&'static str] {
        match self.dialect {
            Dialect::Qwen3Coder | Dialect::Hermes => &[TOOL_OPEN],
            Dialect::Glm4 => &[TOOL_OPEN, THINK_OPEN, THINK_CLOSE],
        }
    }

    /// Removes and returns `buf[..at]`.
    fn take_head(&mut self, at: usize) -> String {
        let tail = self.buf.split_off(at);
        std::mem::replace(&mut self.buf, tail)
    }

    fn emit(&mut self, event: OutputEvent) {
        match (self.out.last_mut(), &event) {
            (Some(OutputEvent::Content(a)), OutputEvent::Content(b))
            | (Some(OutputEvent::Reasoning(a)), OutputEvent::Reasoning(b)) => a.push_str(b),
            _ => self.out.push(event),
        }
    }

    fn emit_reasoning(&mut self, text: &str) {
        if !text.is_empty() {
            self.emit(OutputEvent::Reasoning(text.to_owned()));
        }
    }

    fn emit_content(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if self.run_has_text {
            self.emit(OutputEvent::Content(text.to_owned()));
            return;
        }
        let trimmed = text.trim_start();
        if trimmed.is_empty() {
            if !self.strip_leading {
                self.pending_ws.push_str(text);
            }
            return;
        }
        let released = if self.strip_leading {
            trimmed.to_owned()
        } else {
            let mut s = std::mem::take(&mut self.pending_ws);
            s.push_str(text);
            s
        };
        self.pending_ws.clear();
        self.run_has_text = true;
        self.strip_leading = false;
        self.emit(OutputEvent::Content(released));
    }

    /// A new content stretch starts (after reasoning, or on `<think>`).
    fn new_stretch(&mut self) {
        self.pending_ws.clear();
        self.run_has_text = false;
        self.strip_leading = false;
    }

    /// A `<tool_call>` block ended (`closed`) or generation ended inside it.
    fn end_block(&mut self, body: &str, closed: bool) {
        let calls = if closed {
            match self.dialect {
                Dialect::Qwen3Coder => qwen::parse_block(body, &self.tools),
                Dialect::Hermes => hermes::parse_block(body),
                Dialect::Glm4 => glm::parse_block(body, &self.tools),
            }
        } else {
            None
        };
        match calls {
            Some(calls) => {
                self.ws_before_call.clear();
                for call in calls {
                    self.emit(OutputEvent::ToolCall(call));
                }
                self.pending_ws.clear();
                self.run_has_text = false;
                self.strip_leading = true;
            }
            None => {
                self.pending_ws = std::mem::take(&mut self.ws_before_call);
                let mut raw = String::with_capacity(TOOL_OPEN.len() + body.len() + TOOL_CLOSE.len());
                raw.push_str(TOOL_OPEN);
                raw.push_str(body);
                if closed {
                    raw.push_str(TOOL_CLOSE);
                }
                self.emit_content(&raw);
            }
        }
    }

    /// Releases all that `buf` allows.
    fn run(&mut self) {
        loop {
            match self.mode {
                Mode::Content => {
                    let tags = self.content_tags();
                    let found = tags.iter().filter_map(|&t| self.buf.find(t).map(|at| (at, t))).min();
                    let Some((at, tag)) = found else {
                        let keep = partial_tag_len(&self.buf, tags);
                        let head = self.take_head(self.buf.len() - keep);
                        self.emit_content(&head);
                        return;
                    };
                    let head = self.take_head(at);
                    self.emit_content(&head);
                    self.buf.drain(..tag.len());
                    match tag {
                        TOOL_OPEN => {
                            self.ws_before_call = std::mem::take(&mut self.pending_ws);
                            self.scanned = 0;
                            self.mode = Mode::Call;
                        }
                        THINK_OPEN => {
                            self.new_stretch();
                            self.mode = Mode::Reasoning;
                        }
                        // A stray `</think>` outside reasoning: dropped.
                        _ => {}
                    }
                }
                Mode::Reasoning => {
                    let Some(at) = self.buf.find(THINK_CLOSE) else {
                        let keep = partial_tag_len(&self.buf, &[THINK_CLOSE]);
                        let head = self.take_head(self.buf.len() - keep);
                        self.emit_reasoning(&head);
                        return;
                    };
                    let head = self.take_head(at);
                    self.emit_reasoning(&head);
                    self.buf.drain(..THINK_CLOSE.len());
                    self.new_stretch();
                    self.mode = Mode::Content;
                }
                Mode::Call => {
                    let Some(rel) = self.buf[self.scanned..].find(TOOL_CLOSE) else {
                        let mut scanned = self.buf.len().saturating_sub(TOOL_CLOSE.len() - 1);
                        while !self.buf.is_char_boundary(scanned) {
                            scanned -= 1;
                        }
                        self.scanned = scanned;
                        return;
                    };
                    let body = self.take_head(self.scanned + rel);
                    self.buf.drain(..TOOL_CLOSE.len());
                    self.scanned = 0;
                    self.mode = Mode::Content;
                    self.end_block(&body, true);
                }
            }
        }
    }
}

impl OutputParser for TaggedParser {
    fn push(&mut self, delta: &str) -> Vec<OutputEvent> {
        self.buf.push_str(delta);
        self.run();
        std::mem::take(&mut self.out)
    }

    fn finish(&mut self) -> Vec<OutputEvent> {
        self.run();
        let rest = std::mem::take(&mut self.buf);
        match self.mode {
            Mode::Content => self.emit_content(&rest),
            Mode::Reasoning => self.emit_reasoning(&rest),
            Mode::Call => self.end_block(&rest, false),
        }
        let ws = std::mem::take(&mut self.pending_ws);
        if !ws.is_empty() {
            self.emit(OutputEvent::Content(ws));
        }
        self.reset();
        std::mem::take(&mut self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{check, tools};
    use serde_json::json;

    #[test]
    fn plain_passes_text_through() {
        for text in [
            "",
            "Hello",
            "<think>not reasoning</think> <tool_call>\n<function=f>\n</function>\n</tool_call>\n  ",
            "  ünïcödé ☃ \n\n",
        ] {
            assert_eq!(
                check(OutputFormat::Plain, None, text),
                ParsedOutput { content: text.to_owned(), ..ParsedOutput::default() }
            );
            let mut p = parser(OutputFormat::Plain, None);
            let events: Vec<OutputEvent> = text.chars().flat_map(|c| p.push(c.encode_utf8(&mut [0; 4]))).collect();
            assert_eq!(events.len(), text.chars().count(), "released at once, char by char");
            assert!(p.finish().is_empty());
        }
    }

    #[test]
    fn whitespace_only_output_is_kept() {
        for format in [OutputFormat::Qwen3Coder, OutputFormat::Glm4 { starts_in_reasoning: false }] {
            assert_eq!(check(format, None, " \n\t").content, " \n\t");
        }
    }

    #[test]
    fn parser_is_reusable_after_finish() {
        let tools = tools();
        let mut p = parser(OutputFormat::Glm4 { starts_in_reasoning: true }, Some(&tools));
        let text = "think</think>\n<tool_call>get_time</tool_call>\nbye <tool_";
        let first: ParsedOutput = p.push(text).into_iter().chain(p.finish()).collect();
        let second: ParsedOutput = p.push(text).into_iter().chain(p.finish()).collect();
        assert_eq!(first, second);
        assert_eq!(first.reasoning, "think");
        assert_eq!(first.content, "bye <tool_");
    }

    #[test]
    fn long_call_streams_in_linear_chunks() {
        // A long argument pushed in small pieces: only the closing tag completes the call.
        let tools = tools();
        let code = "x = 1  # ü\n".repeat(2000);
        let text =
            format!("<tool_call>\n<function=write>\n<parameter=code>\n{code}\n</parameter>\n</function>\n</tool_call>");
        let mut p = parser(OutputFormat::Qwen3Coder, Some(&tools));
        let mut events = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + 7).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            let batch = p.push(&text[start..end]);
            if end < text.len() {
                assert!(batch.is_empty(), "nothing released before </tool_call>");
            }
            events.extend(batch);
            start = end;
        }
        events.extend(p.finish());
        let expected = ToolCall {
            name: "write".to_owned(),
            arguments: json!({"code": code}).as_object().cloned().unwrap_or_default(),
        };
        assert_eq!(events, vec![OutputEvent::ToolCall(expected.clone())]);
        assert_eq!(parse(OutputFormat::Qwen3Coder, Some(&tools), &text).tool_calls, vec![expected]);
    }

    #[test]
    fn tool_call_serde_and_arguments_json() {
        let call = ToolCall {
            name: "f".to_owned(),
            arguments: json!({"b": 1, "a": [true]}).as_object().cloned().unwrap_or_default(),
        };
        assert_eq!(call.arguments_json(), r#"{"b":1,"a":[true]}"#);
        let text = serde_json::to_string(&call).unwrap_or_default();
        let back: ToolCall = serde_json::from_str(&text).expect("round trip");
        assert_eq!(back, call);
        let out = ParsedOutput { content: "c".to_owned(), reasoning: String::new(), tool_calls: vec![call] };
        assert_eq!(
            serde_json::to_value(&out).expect("serialize"),
            json!({"content": "c", "reasoning": "", "tool_calls": [{"name": "f", "arguments": {"b": 1, "a": [true]}}]})
        );
    }

    #[test]
    fn partial_tag_len_finds_longest_prefix() {
        assert_eq!(partial_tag_len("abc <tool_ca", &[TOOL_OPEN]), 8);
        assert_eq!(partial_tag_len("abc <", &[TOOL_OPEN, THINK_CLOSE]), 1);
        assert_eq!(partial_tag_len("abc </th", &[TOOL_OPEN, THINK_OPEN, THINK_CLOSE]), 4);
        assert_eq!(partial_tag_len("abc <tool_call", &[TOOL_OPEN]), 10);
        assert_eq!(partial_tag_len("abc", &[TOOL_OPEN]), 0);
        assert_eq!(partial_tag_len("é<", &[TOOL_OPEN]), 1);
    }
}
