//! One sequence's output as tokens arrive (vLLM v1 `detokenizer.py` and `output_processor.py`;
//! transformers' `GenerationMixin.generate` stopping criteria): sampling with its own
//! parameters and seed, incremental detokenization, EOS ids, stop strings (never streamed,
//! even in part), the length and context caps, the model's reasoning / tool-call parser,
//! log-probabilities (vLLM's `Logprobs` of the raw logits) and the grammar mask of a
//! constrained request ([`crate::constrain`]).

use crate::constrain::RowConstraint;
use crate::error::EngineError;
use crate::generate::{RowRequest, RowResult};
use crate::sampling::Sampler;
use crate::tokenizer::{StreamDecoder, TextTokenizer};
use inference_pio_chat_output::{OutputEvent, OutputFormat, OutputParser, ParsedOutput};
use inference_pio_core::types::{FinishReason, TokenDetail, TokenLogprob, TokenLogprobs, ToolCall};

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
    /// Alternatives to report per token (`None`: no log-probabilities).
    logprobs: Option<u32>,
    token_logprobs: Vec<TokenLogprobs>,
    constraint: Option<Box<RowConstraint>>,
    /// The grammar is complete: the sequence ends with the token that completed it.
    grammar_done: bool,
}

/// The log-softmax of `logits` at `id`, and the `top` most likely tokens (ties: lower id first).
pub fn logprobs_of(logits: &[f32], id: u32, top: usize, tokenizer: &TextTokenizer) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = (logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() + max as f64) as f32;
    let entry = |i: u32| TokenLogprob {
        id: i,
        text: tokenizer.decode(&[i], false).unwrap_or_default(),
        logprob: logits.get(i as usize).map_or(f32::NEG_INFINITY, |&l| l - log_sum),
    };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(order.len());
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if top > 0 && top < order.len() {
        order.select_nth_unstable_by(top - 1, by_logit);
    }
    order.truncate(top);
    order.sort_unstable_by(by_logit);
    TokenLogprobs { token: entry(id), top: order.into_iter().map(entry).collect() }
}

/// Passes a text delta through an output parser: reasoning and tool calls are collected in
/// `parsed` and in `detail` (what this delta released), the answer text is returned for
/// streaming; `finished` flushes what the parser still holds (a tag prefix, an unterminated
/// block).
pub fn stream_through(parser: &mut dyn OutputParser, parsed: &mut ParsedOutput, detail: &mut TokenDetail, delta: &str, finished: bool) -> String {
    let mut events = parser.push(delta);
    if finished {
        events.extend(parser.finish());
    }
    let mut content = String::new();
    for e in &events {
        match e {
            OutputEvent::Content(c) => content.push_str(c),
            OutputEvent::Reasoning(r) => detail.reasoning.push_str(r),
            OutputEvent::ToolCall(c) => detail.tool_calls.push(ToolCall { name: c.name.clone(), arguments: c.arguments.clone() }),
        }
    }
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
            logprobs: request.logprobs,
            token_logprobs: Vec::new(),
            constraint: request.constraint.clone(),
            grammar_done: false,
        }
    }

    /// Whether the next token is the plain argmax of the logits (greedy, no repetition
    /// penalty, no grammar, no log-probabilities wanted), so it can be picked on the device.
    pub fn is_plain_greedy(&self) -> bool {
        self.sampler.is_plain_greedy() && self.logprobs.is_none() && self.constraint.is_none()
    }

    /// Whether the sequence ends by its length limits once it has `generated` new tokens and
    /// `length` tokens in all, whatever that last token is (`max_new_tokens`, the context).
    pub fn ends_by_length(&self, generated: usize, length: usize, max_context: usize) -> bool {
        generated >= self.max_new || length >= max_context
    }

    /// Computes the grammar's mask for the next token ahead of [`Self::sample`] (while the
    /// device computes the logits); nothing for an unconstrained sequence.
    pub fn prepare_mask(&mut self) -> Result<(), EngineError> {
        match self.constraint.as_mut() {
            Some(c) => c.prepare(),
            None => Ok(()),
        }
    }

    /// Samples the next token from `logits` (the raw logits, which are not changed) after
    /// `history` (prompt and tokens so far): its log-probabilities when asked for, then the
    /// grammar's mask, then the sampler. `eos`: the model's EOS ids.
    pub fn sample(&mut self, logits: &[f32], history: &[u32], tokenizer: &TextTokenizer, eos: &[u32]) -> Result<(u32, Option<TokenLogprobs>), EngineError> {
        let mut values = logits.to_vec();
        if let Some(c) = self.constraint.as_mut() {
            c.mask(&mut values, eos)?;
        }
        let id = self.sampler.sample(&mut values, history, self.new_ids.len());
        let logprobs = self.logprobs.map(|top| logprobs_of(logits, id, top as usize, tokenizer));
        Ok((id, logprobs))
    }

    /// Takes token `id` (with its log-probabilities, when asked for); `length` is the
    /// sequence's length with it. Returns the text that may be streamed now (the answer text
    /// only, for models with a parser) and what else the token released.
    pub fn push(
        &mut self,
        tokenizer: &TextTokenizer,
        eos: &[u32],
        id: u32,
        logprobs: Option<TokenLogprobs>,
        length: usize,
        max_context: usize,
    ) -> Result<(String, TokenDetail), EngineError> {
        self.new_ids.push(id);
        let mut detail = TokenDetail { logprobs, ..TokenDetail::default() };
        if let Some(l) = &detail.logprobs {
            self.token_logprobs.push(l.clone());
        }
        if let Some(c) = self.constraint.as_mut()
            && c.commit(id, eos)?
        {
            self.grammar_done = true;
        }
        if !self.ignore_eos && eos.contains(&id) {
            self.finish = Some(FinishReason::Eos);
        } else {
            self.text.push_str(&self.stream.push(tokenizer, id)?);
            if let Some(pos) = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
                self.text.truncate(pos);
                self.finish = Some(FinishReason::Stop);
            }
        }
        if self.finish.is_none() && self.grammar_done {
            self.finish = Some(FinishReason::Stop);
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
        let text = match self.parser.as_mut() {
            None => delta,
            Some(parser) => stream_through(parser.as_mut(), &mut self.parsed, &mut detail, &delta, finished),
        };
        Ok((text, detail))
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
        RowResult { new_ids: self.new_ids, text, reasoning, tool_calls, finish: self.finish.unwrap_or(FinishReason::Length), logprobs: self.token_logprobs }
    }
}

#[cfg(test)]
mod tests {
    use super::{ParsedOutput, TokenDetail, stream_through, streamable_len};

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
        let mut released = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let mut detail = TokenDetail::default();
            let out = stream_through(p.as_mut(), &mut parsed, &mut detail, piece, i + 1 == pieces.len());
            assert!(!out.contains('<'), "a tag leaked: {out:?}");
            streamed.push_str(&out);
            // A call is released whole by the piece that closes its block, never before.
            let so_far: usize = pieces[..=i].iter().map(String::len).sum();
            assert_eq!(!detail.tool_calls.is_empty(), text[..so_far].contains("</tool_call>") && released.is_empty(), "piece {i}");
            released.extend(detail.tool_calls);
        }
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].name, "get_weather");
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
        let mut reasoning = String::new();
        for (i, piece) in pieces.iter().enumerate() {
            let mut detail = TokenDetail::default();
            streamed.push_str(&stream_through(p.as_mut(), &mut parsed, &mut detail, piece, i + 1 == pieces.len()));
            reasoning.push_str(&detail.reasoning);
        }
        assert_eq!(parsed.reasoning, "Let me see.");
        assert_eq!(reasoning, parsed.reasoning, "reasoning streams as it is released");
        assert_eq!(streamed, parsed.content);
        assert!(streamed.trim_start().starts_with("The answer is 4.") && streamed.ends_with("<tool_call>broken"), "{streamed:?}");
    }

    #[test]
    fn logprobs_are_the_log_softmax_with_the_most_likely_first() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../qwen3-4b-instruct-2507/tests/fixtures/qwen3-tokenizer/tokenizer.json");
        let tok = crate::tokenizer::TextTokenizer::from_file(&path).expect("tokenizer");
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let l = super::logprobs_of(&logits, 2, 3, &tok);
        let log_sum = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln() as f32;
        assert_eq!(l.token.id, 2);
        assert!((l.token.logprob - (2.0 - log_sum)).abs() < 1e-6);
        assert_eq!(l.token.text, tok.decode(&[2], false).expect("decode"));
        // Ties keep the lower id first.
        assert_eq!(l.top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!(super::logprobs_of(&logits, 0, 0, &tok).top.is_empty());
        assert_eq!(super::logprobs_of(&logits, 0, 20, &tok).top.len(), 5);
    }

    #[test]
    fn text_that_may_become_a_stop_string_is_held_back() {
        let stops = vec!["</end>".to_string()];
        assert_eq!(streamable_len("hello </e", &stops), 6);
        assert_eq!(streamable_len("hello", &stops), 5);
        assert_eq!(streamable_len("a<", &stops), 1);
    }
}
