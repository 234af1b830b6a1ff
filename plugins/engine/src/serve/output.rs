//! One sequence's output as tokens arrive (vLLM v1 `detokenizer.py` and `output_processor.py`;
//! transformers' `GenerationMixin.generate` stopping criteria): sampling with its own
//! parameters and seed, incremental detokenization, EOS ids, stop strings (never streamed,
//! even in part), the length and context caps, and the model's reasoning / tool-call parser.

use crate::error::EngineError;
use crate::generate::{RowRequest, RowResult};
use crate::sampling::Sampler;
use crate::tokenizer::{StreamDecoder, TextTokenizer};
use inference_pio_chat_output::{OutputEvent, OutputFormat, OutputParser, ParsedOutput};
use inference_pio_core::types::{FinishReason, ToolCall};

pub struct Output {
    sampler: Sampler,
    new_ids: Vec<u32>,
    text: String,
    emitted: usize,
    stream: StreamDecoder,
    pub finish: Option<FinishReason>,
    max_new: usize,
    stop: Vec<String>,
    /// Splits the text into answer, reasoning and tool calls (`None`: plain text).
    parser: Option<Box<dyn OutputParser>>,
    parsed: ParsedOutput,
    ignore_eos: bool,
}

/// Passes a text delta through an output parser: reasoning and tool calls are collected in
/// `parsed`, the answer text is returned for streaming; `finished` flushes what the parser
/// still holds (a tag prefix, an unterminated block).
pub fn stream_through(parser: &mut dyn OutputParser, parsed: &mut ParsedOutput, delta: &str, finished: bool) -> String {
    let mut events = parser.push(delta);
    if finished {
        events.extend(parser.finish());
    }
    let content: String = events
        .iter()
        .filter_map(|e| match e {
            OutputEvent::Content(c) => Some(c.as_str()),
            _ => None,
        })
        .collect();
    parsed.extend(events);
    content
}

/// Bytes of `text` that may be streamed now: everything except a tail that could still
/// become a stop string.
pub fn streamable_len(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for stop in stops {
        for (i, _) in stop.char_indices().skip(1) {
            if text.ends_with(&stop[..i]) {
                hold = hold.max(i);
            }
        }
    }
    text.len() - hold
}

impl Output {
    pub fn new(request: &RowRequest, format: OutputFormat) -> Self {
        Self {
            sampler: Sampler::new(request.sampling.clone()),
            new_ids: Vec::new(),
            text: String::new(),
            emitted: 0,
            stream: StreamDecoder::default(),
            finish: None,
            max_new: request.max_new_tokens,
            stop: request.stop.clone(),
            parser: (format != OutputFormat::Plain).then(|| inference_pio_chat_output::parser(format, request.tools.as_ref())),
            parsed: ParsedOutput::default(),
            ignore_eos: request.ignore_eos,
        }
    }

    /// Whether the next token is the plain argmax of the logits (greedy, no repetition
    /// penalty), so it can be picked on the device.
    pub fn is_plain_greedy(&self) -> bool {
        self.sampler.is_plain_greedy()
    }

    /// Samples the next token from `logits` after `history` (prompt and tokens so far).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.sampler.sample(logits, history, self.new_ids.len())
    }

    /// Takes token `id`; `length` is the sequence's length with it. Returns the text that
    /// may be streamed now (the answer text only, for models with a parser).
    pub fn push(&mut self, tokenizer: &TextTokenizer, eos: &[u32], id: u32, length: usize, max_context: usize) -> Result<String, EngineError> {
        self.new_ids.push(id);
        if !self.ignore_eos && eos.contains(&id) {
            self.finish = Some(FinishReason::Eos);
        } else {
            self.text.push_str(&self.stream.push(tokenizer, id)?);
            if let Some(pos) = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
                self.text.truncate(pos);
                self.finish = Some(FinishReason::Stop);
            }
        }
        if self.finish.is_none() && self.new_ids.len() >= self.max_new {
            self.finish = Some(FinishReason::Length);
        }
        // The sequence (prompt + generated) never exceeds the context.
        if self.finish.is_none() && length >= max_context {
            self.finish = Some(FinishReason::ContextFull);
        }
        let until = if self.finish.is_some() { self.text.len() } else { streamable_len(&self.text, &self.stop) };
        let delta = if until > self.emitted { self.text[self.emitted..until].to_string() } else { String::new() };
        self.emitted = self.emitted.max(until);
        let finished = self.finish.is_some();
        Ok(match self.parser.as_mut() {
            None => delta,
            Some(parser) => stream_through(parser.as_mut(), &mut self.parsed, &delta, finished),
        })
    }

    /// Ends the sequence early: what the parser still holds is kept in the result (not
    /// streamed: the consumer asked to stop).
    pub fn cancel(&mut self) {
        if self.finish.is_none() {
            self.finish = Some(FinishReason::Cancelled);
            if let Some(parser) = self.parser.as_mut() {
                let held = parser.finish();
                self.parsed.extend(held);
            }
        }
    }

    pub fn into_result(self) -> RowResult {
        let (text, reasoning, tool_calls) = match self.parser {
            None => (self.text, String::new(), Vec::new()),
            Some(_) => (
                self.parsed.content,
                self.parsed.reasoning,
                self.parsed.tool_calls.into_iter().map(|c| ToolCall { name: c.name, arguments: c.arguments }).collect(),
            ),
        };
        RowResult { new_ids: self.new_ids, text, reasoning, tool_calls, finish: self.finish.unwrap_or(FinishReason::Length) }
    }
}

#[cfg(test)]
mod tests {
    use super::{ParsedOutput, stream_through, streamable_len};

    #[test]
    fn tool_calls_and_reasoning_never_stream_and_are_collected() {
        use inference_pio_chat_output::{OutputFormat, parser};
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]);
        let text = "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>";
        // Token-sized pieces, as the stream decoder releases them.
        let pieces: Vec<String> = text.chars().collect::<Vec<_>>().chunks(3).map(|c| c.iter().collect()).collect();
        let mut p = parser(OutputFormat::Qwen3Coder, Some(&tools));
        let mut parsed = ParsedOutput::default();
        let mut streamed = String::new();
        for (i, piece) in pieces.iter().enumerate() {
            let out = stream_through(p.as_mut(), &mut parsed, piece, i + 1 == pieces.len());
            assert!(!out.contains('<'), "a tag leaked: {out:?}");
            streamed.push_str(&out);
        }
        assert_eq!(streamed, parsed.content);
        assert_eq!(parsed.content.trim(), "Checking.");
        assert_eq!(parsed.tool_calls.len(), 1);
        assert_eq!(parsed.tool_calls[0].name, "get_weather");
        assert_eq!(parsed.tool_calls[0].arguments["days"], serde_json::json!(3));
        // GLM: reasoning is collected, the answer streams; an unterminated block is flushed
        // as text when generation ends.
        let mut p = parser(OutputFormat::Glm4 { starts_in_reasoning: false }, None);
        let mut parsed = ParsedOutput::default();
        let mut streamed = String::new();
        let pieces = ["\n<thi", "nk>Let me see", ".</think>\nThe answer", " is 4. <tool_c", "all>broken"];
        for (i, piece) in pieces.iter().enumerate() {
            streamed.push_str(&stream_through(p.as_mut(), &mut parsed, piece, i + 1 == pieces.len()));
        }
        assert_eq!(parsed.reasoning, "Let me see.");
        assert_eq!(streamed, parsed.content);
        assert!(streamed.trim_start().starts_with("The answer is 4.") && streamed.ends_with("<tool_call>broken"), "{streamed:?}");
    }

    #[test]
    fn text_that_may_become_a_stop_string_is_held_back() {
        let stops = vec!["</end>".to_string()];
        assert_eq!(streamable_len("hello </e", &stops), 6);
        assert_eq!(streamable_len("hello", &stops), 5);
        assert_eq!(streamable_len("a<", &stops), 1);
    }
}
