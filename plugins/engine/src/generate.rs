//! A loaded model ready to serve: decoder + tokenizer + chat template + generation defaults,
//! and the generation loop (chunked prefill, decode, sampling, EOS ids and stop strings,
//! streaming text, cancellation) over a batch of left-padded rows, plus scoring.
//! Semantics follow transformers' `GenerationMixin.generate` and `generation_config.json`.

use crate::chat_template::ChatTemplate;
use crate::decode_graph::DecodeSteps;
use crate::decoder::{Decoder, Logits};
use crate::error::EngineError;
use crate::hf_config::token_ids;
use crate::sampling::{Sampler, SamplingConfig};
use crate::tokenizer::{StreamDecoder, TextTokenizer};
use burn::tensor::Tensor;
use inference_pio_core::config::OptimizationSettings;
use inference_pio_chat_output::{OutputEvent, OutputFormat, OutputParser, ParsedOutput};
use inference_pio_core::types::{
    BatchInferResponse, FinishReason, InferRequest, InferResponse, PromptInput, SamplingOverrides, SamplingParams, ScoreResponse, Timings, ToolCall,
};
use std::path::Path;
use std::time::Instant;

/// When neither request, host config nor `generation_config.json` says.
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 256;

/// `generation_config.json`, the fields generation uses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    pub do_sample: Option<bool>,
    pub values: SamplingOverrides,
    pub eos_token_ids: Vec<u32>,
}

impl GenerationDefaults {
    pub fn from_model_dir(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::Io(format!("cannot read {}: {e}", path.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::Config(format!("{} is not valid JSON: {e}", path.display())))?;
        let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).map(|x| x as f32);
        Ok(Self {
            do_sample: v.get("do_sample").and_then(serde_json::Value::as_bool),
            values: SamplingOverrides {
                temperature: f("temperature"),
                top_k: v.get("top_k").and_then(serde_json::Value::as_u64).map(|x| x as u32),
                top_p: f("top_p"),
                min_p: f("min_p"),
                repetition_penalty: f("repetition_penalty"),
                max_new_tokens: v.get("max_new_tokens").and_then(serde_json::Value::as_u64).map(|x| x as u32),
            },
            eos_token_ids: token_ids(v.get("eos_token_id")),
        })
    }
}

/// A model with everything needed to answer requests.
pub struct Engine {
    pub decoder: Decoder,
    pub tokenizer: TextTokenizer,
    pub template: Option<ChatTemplate>,
    pub generation: GenerationDefaults,
    pub eos_token_ids: Vec<u32>,
    /// Context cap in tokens (model limit, possibly lowered by the profile).
    pub max_context: usize,
    /// How the model writes reasoning and tool calls (the family's).
    pub output_format: OutputFormat,
}

/// Per-row state of a running generation.
struct Row {
    sampler: Sampler,
    history: Vec<u32>,
    new_ids: Vec<u32>,
    text: String,
    emitted: usize,
    stream: StreamDecoder,
    finish: Option<FinishReason>,
    max_new: usize,
    stop: Vec<String>,
    /// Splits the text into answer, reasoning and tool calls (`None`: plain text).
    parser: Option<Box<dyn OutputParser>>,
    parsed: ParsedOutput,
}

/// One generation request after defaults are resolved.
pub struct RowRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingConfig,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    /// The request's tools (OpenAI shape), which type the parsed tool-call arguments.
    pub tools: Option<serde_json::Value>,
}

/// Result of one row.
pub struct RowResult {
    pub new_ids: Vec<u32>,
    /// The answer text (all of it for plain-text models).
    pub text: String,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish: FinishReason,
}

/// Passes a text delta through an output parser: reasoning and tool calls are collected in
/// `parsed`, the answer text is returned for streaming; `finished` flushes what the parser
/// still holds (a tag prefix, an unterminated block).
fn stream_through(parser: &mut dyn OutputParser, parsed: &mut ParsedOutput, delta: &str, finished: bool) -> String {
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
fn streamable_len(text: &str, stops: &[String]) -> usize {
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

impl Engine {
    /// Token ids of a prompt (chat template applied for chats).
    pub fn prompt_ids(&self, input: &PromptInput) -> Result<Vec<u32>, EngineError> {
        let ids = match input {
            PromptInput::TokenIds(ids) => ids.clone(),
            PromptInput::Text(text) => self.tokenizer.encode(text, true)?,
            PromptInput::Chat { messages, tools } => {
                let template = self.template.as_ref().ok_or_else(|| {
                    EngineError::InvalidRequest("this model has no chat template; send text or token ids".into())
                })?;
                let text = template.render(messages, tools.as_ref(), true)?;
                self.tokenizer.encode(&text, false)?
            }
        };
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        let vocab = self.decoder.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!("prompt token id {bad} is outside the vocabulary (size {vocab})")));
        }
        if ids.len() >= self.max_context {
            return Err(EngineError::InvalidRequest(format!(
                "prompt of {} tokens does not fit the context of {} tokens",
                ids.len(),
                self.max_context
            )));
        }
        Ok(ids)
    }

    /// Request sampling + host defaults + `generation_config.json`, resolved.
    pub fn resolve_sampling(&self, params: &SamplingParams, host: &SamplingOverrides) -> (SamplingConfig, usize) {
        let g = &self.generation.values;
        let r = &params.values;
        let pick_f = |a: Option<f32>, b: Option<f32>, c: Option<f32>, d: f32| a.or(b).or(c).unwrap_or(d);
        let temperature = pick_f(r.temperature, host.temperature, g.temperature, 1.0);
        let request_sets_sampling = r.temperature.is_some() || r.top_k.is_some() || r.top_p.is_some() || r.min_p.is_some() || params.seed.is_some();
        let default_sample = self.generation.do_sample.unwrap_or(false) || host.temperature.is_some();
        let greedy = params.greedy || temperature == 0.0 || !(request_sets_sampling || default_sample);
        let max_new = r.max_new_tokens.or(host.max_new_tokens).or(g.max_new_tokens).unwrap_or(DEFAULT_MAX_NEW_TOKENS) as usize;
        let config = SamplingConfig {
            greedy,
            temperature,
            top_k: r.top_k.or(host.top_k).or(g.top_k).unwrap_or(0),
            top_p: pick_f(r.top_p, host.top_p, g.top_p, 1.0),
            min_p: pick_f(r.min_p, host.min_p, g.min_p, 0.0),
            repetition_penalty: pick_f(r.repetition_penalty, host.repetition_penalty, g.repetition_penalty, 1.0),
            seed: params.seed.unwrap_or_else(rand::random),
        };
        (config, max_new)
    }

    fn last_logits(logits: Tensor<3>) -> Result<Vec<Vec<f32>>, EngineError> {
        let [batch, rows, vocab] = logits.dims();
        let values = logits
            .narrow(1, rows - 1, 1)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| EngineError::Device(format!("cannot read logits: {e:?}")))?;
        Ok((0..batch).map(|b| values[b * vocab..(b + 1) * vocab].to_vec()).collect())
    }

    /// Generates for several prompts at once (left-padded into one batch). `on_token(row,
    /// id, text)` streams; returning `false` cancels every row.
    pub fn generate_rows(
        &self,
        requests: Vec<RowRequest>,
        optimization: &OptimizationSettings,
        on_token: &mut dyn FnMut(usize, u32, &str) -> bool,
        timings: &mut Timings,
    ) -> Result<Vec<RowResult>, EngineError> {
        let started = Instant::now();
        let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        if requests.is_empty() || longest == 0 {
            return Err(EngineError::InvalidRequest("nothing to generate from".into()));
        }
        let pads: Vec<usize> = requests.iter().map(|r| longest - r.prompt.len()).collect();
        let pad_id = self.decoder.config.pad_token_id.or(self.eos_token_ids.first().copied()).unwrap_or(0);
        let padded: Vec<Vec<u32>> = requests
            .iter()
            .map(|r| std::iter::repeat_n(pad_id, longest - r.prompt.len()).chain(r.prompt.iter().copied()).collect())
            .collect();
        let mut rows: Vec<Row> = requests
            .into_iter()
            .map(|r| Row {
                sampler: Sampler::new(r.sampling),
                history: r.prompt,
                new_ids: Vec::new(),
                text: String::new(),
                emitted: 0,
                stream: StreamDecoder::default(),
                finish: None,
                max_new: r.max_new_tokens,
                stop: r.stop,
                parser: (self.output_format != OutputFormat::Plain)
                    .then(|| inference_pio_chat_output::parser(self.output_format, r.tools.as_ref())),
                parsed: ParsedOutput::default(),
            })
            .collect();
        let mut cache = self.decoder.new_cache(pads, self.max_context);

        // Prefill, in chunks if the profile says so.
        let chunk = match optimization.prefill_chunk_tokens as usize {
            0 => longest,
            n => n,
        };
        let mut logits = None;
        let mut offset = 0;
        while offset < longest {
            let end = (offset + chunk).min(longest);
            let part: Vec<Vec<u32>> = padded.iter().map(|p| p[offset..end].to_vec()).collect();
            crate::progress::log(|| format!("prefill tokens {offset}..{end} of {longest}"));
            logits = Some(self.decoder.forward(&part, &mut cache, Logits::Last)?);
            offset = end;
        }
        let mut logits = Self::last_logits(logits.ok_or_else(|| EngineError::InvalidRequest("empty prompt".into()))?)?;
        crate::progress::log(|| "prefill done, first logits on the host".to_string());
        timings.prompt_tokens = rows.iter().map(|r| r.history.len() as u64).sum();
        timings.time_to_first_token_s = started.elapsed().as_secs_f64();
        timings.prefill_tokens_per_s = (longest * rows.len()) as f64 / timings.time_to_first_token_s.max(1e-9);
        let decode_start = Instant::now();
        let mut steps = DecodeSteps::new(&self.decoder, cache, optimization.cuda_graphs);
        crate::progress::log(|| format!("decode steps: {:?}", steps.mode()));
        // When each decode step ended (its count is the number of steps).
        let mut step_ends: Vec<Instant> = Vec::new();

        loop {
            let mut cancelled = false;
            for (b, row) in rows.iter_mut().enumerate() {
                if row.finish.is_some() {
                    continue;
                }
                let id = row.sampler.sample(&mut logits[b], &row.history);
                row.history.push(id);
                row.new_ids.push(id);
                if self.eos_token_ids.contains(&id) {
                    row.finish = Some(FinishReason::Eos);
                } else {
                    row.text.push_str(&row.stream.push(&self.tokenizer, id)?);
                    if let Some(pos) = row.stop.iter().filter_map(|s| row.text.find(s.as_str())).min() {
                        row.text.truncate(pos);
                        row.finish = Some(FinishReason::Stop);
                    }
                }
                if row.finish.is_none() && row.new_ids.len() >= row.max_new {
                    row.finish = Some(FinishReason::Length);
                }
                // The sequence (prompt + generated) never exceeds the context.
                if row.finish.is_none() && steps.len() + 1 >= steps.capacity() {
                    row.finish = Some(FinishReason::ContextFull);
                }
                let until = if row.finish.is_some() { row.text.len() } else { streamable_len(&row.text, &row.stop) };
                let delta = if until > row.emitted { &row.text[row.emitted..until] } else { "" };
                let finished = row.finish.is_some();
                let keep_going = match row.parser.as_mut() {
                    None => on_token(b, id, delta),
                    Some(parser) => {
                        let content = stream_through(parser.as_mut(), &mut row.parsed, delta, finished);
                        on_token(b, id, &content)
                    }
                };
                if !keep_going {
                    cancelled = true;
                }
                row.emitted = row.emitted.max(until);
            }
            if cancelled {
                for row in rows.iter_mut().filter(|r| r.finish.is_none()) {
                    row.finish = Some(FinishReason::Cancelled);
                    // What the parser still holds is kept in the result (not streamed: the
                    // consumer asked to stop).
                    if let Some(parser) = row.parser.as_mut() {
                        let held = parser.finish();
                        row.parsed.extend(held);
                    }
                }
            }
            if rows.iter().all(|r| r.finish.is_some()) {
                break;
            }
            // Finished rows keep stepping (their output is ignored) so the batch stays rectangular.
            let next: Vec<u32> = rows.iter().map(|r| *r.history.last().unwrap_or(&pad_id)).collect();
            logits = Self::last_logits(steps.step(&next)?)?;
            step_ends.push(Instant::now());
            let n = step_ends.len();
            if crate::progress::enabled() && (n <= 3 || n.is_power_of_two()) {
                let step = if n >= 2 { step_ends[n - 1].duration_since(step_ends[n - 2]) } else { step_ends[0].duration_since(decode_start) };
                crate::progress::log(|| format!("decode step {n}: {:.1} ms", step.as_secs_f64() * 1e3));
            }
        }
        crate::progress::log(|| format!("decode steps done: {:?}", steps.counts));
        let decode_steps = step_ends.len();
        let half = decode_steps / 2;
        if half > 0 {
            let span = step_ends[decode_steps - 1].duration_since(step_ends[half - 1]).as_secs_f64();
            timings.steady_decode_tokens_per_s = ((decode_steps - half) * rows.len()) as f64 / span.max(1e-9);
        }
        timings.generated_tokens = rows.iter().map(|r| r.new_ids.len() as u64).sum();
        timings.decode_tokens_per_s = if decode_steps > 0 {
            (decode_steps * rows.len()) as f64 / decode_start.elapsed().as_secs_f64().max(1e-9)
        } else {
            0.0
        };
        timings.total_s = started.elapsed().as_secs_f64();
        Ok(rows
            .into_iter()
            .map(|r| {
                let (text, reasoning, tool_calls) = match r.parser {
                    None => (r.text, String::new(), Vec::new()),
                    Some(_) => (
                        r.parsed.content,
                        r.parsed.reasoning,
                        r.parsed.tool_calls.into_iter().map(|c| ToolCall { name: c.name, arguments: c.arguments }).collect(),
                    ),
                };
                RowResult { new_ids: r.new_ids, text, reasoning, tool_calls, finish: r.finish.unwrap_or(FinishReason::Length) }
            })
            .collect())
    }

    /// A request with defaults resolved (prompt tokenized, sampling chosen).
    fn row_request(
        &self,
        input: &PromptInput,
        params: &SamplingParams,
        stop: &[String],
        host_defaults: &SamplingOverrides,
    ) -> Result<RowRequest, EngineError> {
        if stop.iter().any(String::is_empty) {
            return Err(EngineError::InvalidRequest("stop strings must not be empty".into()));
        }
        let prompt = self.prompt_ids(input)?;
        let (sampling, max_new) = self.resolve_sampling(params, host_defaults);
        let tools = match input {
            PromptInput::Chat { tools, .. } => tools.clone(),
            _ => None,
        };
        Ok(RowRequest { prompt, sampling, max_new_tokens: max_new, stop: stop.to_vec(), tools })
    }

    fn response(prompt: Vec<u32>, result: RowResult, timings: Timings) -> InferResponse {
        InferResponse {
            prompt_token_ids: prompt,
            token_ids: result.new_ids,
            text: result.text,
            reasoning: result.reasoning,
            tool_calls: result.tool_calls,
            finish_reason: result.finish,
            timings,
        }
    }

    /// One request, streamed.
    pub fn generate(
        &self,
        input: &PromptInput,
        params: &SamplingParams,
        stop: &[String],
        host_defaults: &SamplingOverrides,
        optimization: &OptimizationSettings,
        on_token: &mut dyn FnMut(u32, &str) -> bool,
    ) -> Result<InferResponse, EngineError> {
        let request = self.row_request(input, params, stop, host_defaults)?;
        let prompt = request.prompt.clone();
        let mut timings = Timings::default();
        let mut results = self.generate_rows(vec![request], optimization, &mut |_, id, text| on_token(id, text), &mut timings)?;
        Ok(Self::response(prompt, results.remove(0), timings))
    }

    /// Several requests as one batch (left-padded rows, one forward pass per step), not
    /// streamed. A bad request fails the batch, naming its position.
    pub fn generate_batch(
        &self,
        requests: &[InferRequest],
        host_defaults: &SamplingOverrides,
        optimization: &OptimizationSettings,
    ) -> Result<BatchInferResponse, EngineError> {
        let rows = requests
            .iter()
            .enumerate()
            .map(|(i, r)| {
                self.row_request(&r.input, &r.sampling, &r.stop, host_defaults).map_err(|e| match e {
                    EngineError::InvalidRequest(m) => EngineError::InvalidRequest(format!("request {i} of the batch: {m}")),
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let prompts: Vec<Vec<u32>> = rows.iter().map(|r| r.prompt.clone()).collect();
        let mut timings = Timings::default();
        let results = self.generate_rows(rows, optimization, &mut |_, _, _| true, &mut timings)?;
        let responses = prompts
            .into_iter()
            .zip(results)
            .map(|(prompt, result)| {
                let row_timings = Timings {
                    prompt_tokens: prompt.len() as u64,
                    generated_tokens: result.new_ids.len() as u64,
                    ..timings.clone()
                };
                Self::response(prompt, result, row_timings)
            })
            .collect();
        Ok(BatchInferResponse { responses, timings })
    }

    /// One forward pass over the whole sequence: perplexity and optionally all logits.
    pub fn score(&self, input: &PromptInput, return_logits: bool) -> Result<ScoreResponse, EngineError> {
        let ids = self.prompt_ids(input)?;
        let mut cache = self.decoder.new_cache(vec![0], self.max_context);
        let logits = self.decoder.forward(std::slice::from_ref(&ids), &mut cache, Logits::All)?;
        let vocab = self.decoder.config.vocab_size;
        let values = logits
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| EngineError::Device(format!("cannot read logits: {e:?}")))?;
        let rows: Vec<&[f32]> = values.chunks(vocab).collect();
        let (perplexity, mean_nll) = if ids.len() > 1 {
            let mut nll = 0.0f64;
            for (row, &next) in rows.iter().zip(&ids[1..]) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let log_sum = row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
                nll += log_sum - row[next as usize] as f64;
            }
            let mean = nll / (ids.len() - 1) as f64;
            (Some(mean.exp()), Some(mean))
        } else {
            (None, None)
        };
        Ok(ScoreResponse {
            logits: return_logits.then(|| rows.iter().map(|r| r.to_vec()).collect()),
            token_ids: ids,
            perplexity,
            mean_nll,
        })
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
