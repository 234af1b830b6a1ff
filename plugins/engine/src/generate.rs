//! A loaded model ready to serve: decoder + tokenizer + chat template + generation defaults
//! ([`Model`]), and the requests' entry points ([`Engine`]: generate, batch, score), which
//! resolve each request's defaults and hand it to the model's step loop
//! ([`crate::serve`]: continuous batching over a paged KV cache). Semantics follow
//! transformers' `GenerationMixin.generate` and `generation_config.json`.

use crate::chat_template::ChatTemplate;
use crate::constrain::{GrammarCompiler, RowConstraint};
use crate::decoder::Decoder;
use crate::error::EngineError;
use crate::hf_config::token_ids;
use crate::multimodal::PromptMedia;
use crate::vision::PatchGrid;
use inference_pio_image_input::{DecodeLimits, ImageProcessor, Patches, decode_image};
use crate::sampling::SamplingConfig;
use crate::serve::{Event, Finished, StepLoop, Submission, Work, decode_rates};
use crate::tokenizer::TextTokenizer;
use inference_pio_chat_output::OutputFormat;
use inference_pio_core::config::OptimizationSettings;
use inference_pio_core::types::{
    BatchInferResponse, ContentPart, FinishReason, ImageData, InferRequest, InferResponse, MAX_TOP_LOGPROBS, OutputConstraint, PromptInput, SamplingOverrides, SamplingParams,
    SchedulerStats, ScoreResponse, Timings, TokenDetail, TokenLogprobs, ToolCall,
};
use std::ops::Deref;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, OnceLock};
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
                ..Default::default()
            },
            eos_token_ids: token_ids(v.get("eos_token_id")),
        })
    }
}

/// A model with everything needed to answer requests.
pub struct Model {
    pub decoder: Decoder,
    pub tokenizer: TextTokenizer,
    pub template: Option<ChatTemplate>,
    pub generation: GenerationDefaults,
    pub eos_token_ids: Vec<u32>,
    /// Context cap in tokens (model limit, possibly lowered by the profile).
    pub max_context: usize,
    /// How the model writes reasoning and tool calls (the family's).
    pub output_format: OutputFormat,
    /// The vocabulary as the grammar engine sees it, built by the first constrained request.
    pub grammar: OnceLock<Result<GrammarCompiler, String>>,
    /// A vision-language model's image processor (`preprocessor_config.json`).
    pub image_processor: Option<ImageProcessor>,
}

/// One generation request after defaults are resolved.
#[derive(Clone, Debug)]
pub struct RowRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingConfig,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    /// The request's tools (OpenAI shape), which type the parsed tool-call arguments.
    pub tools: Option<serde_json::Value>,
    /// EOS ids do not end the sequence (vLLM's `ignore_eos`; the fixtures' greedy runs).
    pub ignore_eos: bool,
    /// The prefix-cache partition (a tenant's salt); empty: the shared cache.
    pub cache_salt: Vec<u8>,
    /// Report each token's log-probability and this many alternatives.
    pub logprobs: Option<u32>,
    /// The grammar the output must match, compiled.
    pub constraint: Option<Box<RowConstraint>>,
    /// The prompt's images (a vision-language model's).
    pub media: Option<Arc<PromptMedia>>,
}

impl RowRequest {
    /// Greedy, `max_new_tokens` at most, no stop strings.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self { prompt, sampling: SamplingConfig::greedy(), max_new_tokens, stop: Vec::new(), tools: None, ignore_eos: false, cache_salt: Vec::new(), logprobs: None, constraint: None, media: None }
    }

    pub fn ignoring_eos(mut self) -> Self {
        self.ignore_eos = true;
        self
    }
}

/// Result of one row.
#[derive(Clone, Debug, PartialEq)]
pub struct RowResult {
    pub new_ids: Vec<u32>,
    /// The answer text (all of it for plain-text models).
    pub text: String,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish: FinishReason,
    /// Per generated token, when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprobs>,
}

impl Model {
    /// An image (`height` rows of `width` RGB8 pixels) as the vision tower takes it.
    pub fn image_patches(&self, rgb: &[u8], width: usize, height: usize) -> Result<Patches, EngineError> {
        let processor = self.image_processor.as_ref().ok_or_else(|| EngineError::InvalidRequest("this model does not take images".into()))?;
        processor.preprocess(rgb, width, height).map_err(|e| EngineError::InvalidRequest(e.to_string()))
    }

    /// `images` (in prompt order) placed on the prompt's image tokens, with the prompt's
    /// multimodal positions ([`PromptMedia::new`]).
    pub fn prompt_media(&self, prompt: &[u32], images: Vec<Patches>) -> Result<Arc<PromptMedia>, EngineError> {
        let spec = self.decoder.spec.vision.as_ref().ok_or_else(|| EngineError::InvalidRequest("this model does not take images".into()))?;
        let width = spec.config.patch_values();
        let images = images
            .into_iter()
            .map(|p| {
                if p.patch_width != width || p.values.len() != p.grid_thw.iter().product::<usize>() * width {
                    return Err(EngineError::InvalidRequest(format!("image patches of {} values do not fit the vision tower's {width}", p.patch_width)));
                }
                let [t, h, w] = p.grid_thw;
                Ok((p.values, PatchGrid { t, h, w }))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(PromptMedia::new(prompt, spec.image_token_id, spec.config.spatial_merge_size, images)?))
    }

    /// A prompt's token ids and, when its chat messages have image parts, its images: each
    /// decoded ([`decode_image`]) and prepared by the model's image processor, the chat
    /// template's `<|image_pad|>` for it expanded to the image's tokens (as transformers'
    /// processor does) and the images placed on them ([`Self::prompt_media`]). Every image of
    /// the request must be named by exactly one image part.
    pub fn prompt_with_images(&self, input: &PromptInput, images: &[ImageData]) -> Result<(Vec<u32>, Option<Arc<PromptMedia>>), EngineError> {
        let order: Vec<u32> = match input {
            PromptInput::Chat { messages, .. } => messages
                .iter()
                .flat_map(|m| m.parts.iter())
                .filter_map(|p| match p {
                    ContentPart::Image { image } => Some(*image),
                    ContentPart::Text { .. } => None,
                })
                .collect(),
            _ if images.is_empty() => Vec::new(),
            _ => return Err(EngineError::InvalidRequest("images go in a chat message's image parts; a text or token-id prompt cannot place them".into())),
        };
        if order.is_empty() && images.is_empty() {
            return Ok((self.prompt_ids(input)?, None));
        }
        let spec = self.decoder.spec.vision.as_ref().ok_or_else(|| EngineError::InvalidRequest("this model does not take images".into()))?;
        for (i, _) in images.iter().enumerate() {
            match order.iter().filter(|&&o| o as usize == i).count() {
                1 => {}
                0 => return Err(EngineError::InvalidRequest(format!("image {i} of the request is not placed by any message part"))),
                n => return Err(EngineError::InvalidRequest(format!("image {i} is placed {n} times; send it once per place"))),
            }
        }
        if let Some(&bad) = order.iter().find(|&&o| o as usize >= images.len()) {
            return Err(EngineError::InvalidRequest(format!("a message part names image {bad}, but the request has {} image(s)", images.len())));
        }
        let patches = order
            .iter()
            .map(|&i| {
                let rgb = decode_image(&images[i as usize].0, &DecodeLimits::default()).map_err(|e| EngineError::InvalidRequest(format!("image {i}: {e}")))?;
                self.image_patches(&rgb.pixels, rgb.width, rgb.height).map_err(|e| EngineError::InvalidRequest(format!("image {i}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let merge = spec.config.spatial_merge_size;
        let rendered = self.prompt_ids(input)?;
        let placed = rendered.iter().filter(|&&t| t == spec.image_token_id).count();
        if placed != patches.len() {
            return Err(EngineError::InvalidRequest(format!("the chat template placed {placed} image token(s) for {} image(s)", patches.len())));
        }
        let mut next = patches.iter().peekable();
        let mut prompt = Vec::with_capacity(rendered.len() + patches.iter().map(|p| p.tokens(merge)).sum::<usize>());
        for &t in &rendered {
            match next.next_if(|_| t == spec.image_token_id) {
                Some(p) => prompt.extend(std::iter::repeat_n(t, p.tokens(merge))),
                None => prompt.push(t),
            }
        }
        if prompt.len() > self.max_context {
            return Err(EngineError::InvalidRequest(format!("the prompt with its images is {} tokens, over the context of {}", prompt.len(), self.max_context)));
        }
        let media = self.prompt_media(&prompt, patches)?;
        Ok((prompt, Some(media)))
    }

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
            presence_penalty: pick_f(r.presence_penalty, host.presence_penalty, None, 0.0),
            frequency_penalty: pick_f(r.frequency_penalty, host.frequency_penalty, None, 0.0),
            seed: params.seed.unwrap_or_else(rand::random),
        };
        (config, max_new)
    }

    /// A request with defaults resolved (prompt tokenized, sampling chosen, its prefix-cache
    /// salt kept).
    pub fn row_request(&self, request: &InferRequest, host_defaults: &SamplingOverrides) -> Result<RowRequest, EngineError> {
        let InferRequest { input, sampling: params, stop, cache_salt, logprobs, constraint, images } = request;
        if stop.iter().any(String::is_empty) {
            return Err(EngineError::InvalidRequest("stop strings must not be empty".into()));
        }
        if let Some(n) = logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return Err(EngineError::InvalidRequest(format!("top_logprobs is {n}, over the limit of {MAX_TOP_LOGPROBS}")));
        }
        let tools = match input {
            PromptInput::Chat { tools, .. } => tools.clone(),
            _ => None,
        };
        let constraint = constraint.as_ref().map(|c| self.compile_constraint(c, tools.as_ref()).map(Box::new)).transpose()?;
        let (prompt, media) = self.prompt_with_images(input, images)?;
        let (sampling, max_new) = self.resolve_sampling(params, host_defaults);
        Ok(RowRequest { prompt, sampling, max_new_tokens: max_new, stop: stop.to_vec(), tools, ignore_eos: params.ignore_eos, cache_salt: cache_salt.as_bytes().to_vec(), logprobs: *logprobs, constraint, media })
    }

    /// Compiles a request's output constraint against the model's vocabulary (built once);
    /// `tools`: the request's, for [`OutputConstraint::ToolCalls`] (a grammar of the model's
    /// tool-call format).
    pub fn compile_constraint(&self, constraint: &OutputConstraint, tools: Option<&serde_json::Value>) -> Result<RowConstraint, EngineError> {
        let grammar;
        let constraint = match constraint {
            OutputConstraint::ToolCalls { function } => {
                let lark = inference_pio_chat_output::tool_call_grammar(self.output_format, tools, function.as_deref()).map_err(EngineError::InvalidRequest)?;
                grammar = OutputConstraint::Grammar { lark };
                &grammar
            }
            other => other,
        };
        let compiler = self.grammar.get_or_init(|| {
            let eos = self.eos_token_ids.first().copied().unwrap_or(0);
            GrammarCompiler::new(&self.tokenizer, self.decoder.config.vocab_size, eos).map_err(|e| e.to_string())
        });
        match compiler {
            Ok(c) => c.compile(constraint),
            Err(e) => Err(EngineError::Unsupported(format!("constrained decoding is unavailable for this model: {e}"))),
        }
    }
}

/// A loaded model and its step loop: what the plugin serves. Dereferences to the [`Model`].
pub struct Engine {
    model: Arc<Model>,
    steps: StepLoop,
}

impl Engine {
    /// The loaded model, shared (what the serving loop's recordings hold).
    pub fn shared_model(&self) -> Arc<Model> {
        Arc::clone(&self.model)
    }
}

impl Deref for Engine {
    type Target = Model;
    fn deref(&self) -> &Model {
        &self.model
    }
}

/// A submitted request's events, and its cancel flag.
struct Pending {
    events: Receiver<(usize, Event)>,
    cancels: Vec<Arc<AtomicBool>>,
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
        logprobs: result.logprobs,
    }
}

impl Engine {
    /// Starts the model's step loop, whose thread first runs `build` (loads the weights and
    /// allocates the KV pool: all of the model's device work happens on that thread); `cpu`:
    /// the model runs on the CPU (see [`StepLoop::start`]).
    pub fn start<T: Send + 'static>(
        build: impl FnOnce() -> Result<crate::serve::Built<T>, EngineError> + Send + 'static,
        optimization: &OptimizationSettings,
        cpu: bool,
    ) -> Result<(Self, T), EngineError> {
        let (steps, model, extra) = StepLoop::start(build, optimization, cpu)?;
        Ok((Self { model, steps }, extra))
    }

    /// The scheduler's counters.
    pub fn stats(&self) -> SchedulerStats {
        self.steps.stats()
    }

    /// Applies the settings that may change while serving (sequence and token caps, prefix
    /// caching).
    pub fn configure(&self, optimization: &OptimizationSettings) {
        self.steps.configure(optimization);
    }

    /// What the device-resident decode steps did (direct runs, CUDA-graph captures, replays).
    pub fn graph_counts(&self) -> crate::serve::graph::StepCounts {
        self.steps.graph_counts()
    }

    /// Tokens per KV block and blocks in the pool.
    pub fn kv_blocks(&self) -> (usize, usize) {
        (self.steps.block_tokens(), self.steps.blocks())
    }

    fn submit(&self, works: Vec<Work>, chunk: usize) -> Result<Pending, EngineError> {
        let (tx, rx) = channel();
        let mut cancels = Vec::with_capacity(works.len());
        for (tag, work) in works.into_iter().enumerate() {
            let cancel = Arc::new(AtomicBool::new(false));
            cancels.push(Arc::clone(&cancel));
            let salt = match &work {
                Work::Generate(r) => r.cache_salt.clone(),
                Work::Score { .. } => Vec::new(),
            };
            self.steps.submit(Submission { work, chunk, salt, events: tx.clone(), tag, cancel })?;
        }
        Ok(Pending { events: rx, cancels })
    }

    /// Runs requests together (each joins the running batch as the scheduler admits it);
    /// `on_token(row, id, text)` streams, and returning `false` cancels that row. A row that
    /// fails fails the call, naming its position when there are several.
    pub fn generate_rows(
        &self,
        requests: Vec<RowRequest>,
        optimization: &OptimizationSettings,
        on_token: &mut dyn FnMut(usize, u32, &str) -> bool,
        timings: &mut Timings,
    ) -> Result<Vec<RowResult>, EngineError> {
        let finished = self.run_rows(requests, optimization, &mut |row, id, text, _| on_token(row, id, text))?;
        *timings = batch_timings(&finished);
        Ok(finished.into_iter().map(|f| f.result).collect())
    }

    /// The events of `requests` until every one has ended.
    fn run_rows(
        &self,
        requests: Vec<RowRequest>,
        optimization: &OptimizationSettings,
        on_token: &mut dyn FnMut(usize, u32, &str, &TokenDetail) -> bool,
    ) -> Result<Vec<Finished>, EngineError> {
        if requests.is_empty() {
            return Err(EngineError::InvalidRequest("nothing to generate from".into()));
        }
        let rows = requests.len();
        let chunk = optimization.prefill_chunk_on(self.model.decoder.device == burn::tensor::Device::flex()) as usize;
        let pending = self.submit(requests.into_iter().map(Work::Generate).collect(), chunk)?;
        // What each row's consumer took: after a cancel, the row's result is what was
        // delivered (the loop may have run ahead by a step).
        let mut delivered: Vec<(Vec<u32>, String, bool)> = vec![(Vec::new(), String::new(), false); rows];
        let mut results: Vec<Option<Result<Finished, EngineError>>> = (0..rows).map(|_| None).collect();
        let mut left = rows;
        while left > 0 {
            let Ok((row, event)) = pending.events.recv() else {
                return Err(EngineError::Device("the model's step loop stopped while requests were running".into()));
            };
            match event {
                Event::Token { id, text, detail } => {
                    let d = &mut delivered[row];
                    if d.2 {
                        continue;
                    }
                    d.0.push(id);
                    d.1.push_str(&text);
                    if !on_token(row, id, &text, &detail) {
                        d.2 = true;
                        pending.cancels[row].store(true, Ordering::Relaxed);
                    }
                }
                Event::Done(outcome) => {
                    let outcome = (*outcome).map(|mut f| {
                        let (ids, text, cancelled) = &delivered[row];
                        if *cancelled && f.result.new_ids.len() > ids.len() {
                            f.result.new_ids.truncate(ids.len());
                            f.result.text = text.clone();
                            f.result.finish = FinishReason::Cancelled;
                            f.result.logprobs.truncate(ids.len());
                            f.token_times.truncate(ids.len());
                            f.timings.generated_tokens = ids.len() as u64;
                        }
                        f
                    });
                    results[row] = Some(outcome);
                    left -= 1;
                }
            }
        }
        let mut out = Vec::with_capacity(rows);
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Some(Ok(f)) => out.push(f),
                Some(Err(EngineError::InvalidRequest(m))) if rows > 1 => {
                    return Err(EngineError::InvalidRequest(format!("request {i} of the batch: {m}")));
                }
                Some(Err(e)) => return Err(e),
                None => return Err(EngineError::Device("a request ended without a result".into())),
            }
        }
        Ok(out)
    }

    /// One request in the shared prefix cache, streamed ([`Self::generate_request`] without a
    /// salt).
    pub fn generate(
        &self,
        input: &PromptInput,
        params: &SamplingParams,
        stop: &[String],
        host_defaults: &SamplingOverrides,
        optimization: &OptimizationSettings,
        on_token: &mut dyn FnMut(u32, &str) -> bool,
    ) -> Result<InferResponse, EngineError> {
        let request = InferRequest { input: input.clone(), sampling: params.clone(), stop: stop.to_vec(), cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new() };
        self.generate_request(&request, host_defaults, optimization, &mut |id, text, _| on_token(id, text))
    }

    /// One request, as the ABI carries it (its prefix-cache salt included), streamed with
    /// what each token carries beside its answer text (reasoning, tool calls, log-probabilities).
    pub fn generate_request(
        &self,
        request: &InferRequest,
        host_defaults: &SamplingOverrides,
        optimization: &OptimizationSettings,
        on_token: &mut dyn FnMut(u32, &str, &TokenDetail) -> bool,
    ) -> Result<InferResponse, EngineError> {
        let request = self.row_request(request, host_defaults)?;
        let prompt = request.prompt.clone();
        let mut finished = self.run_rows(vec![request], optimization, &mut |_, id, text, detail| on_token(id, text, detail))?;
        let f = finished.remove(0);
        Ok(response(prompt, f.result, f.timings))
    }

    /// Several requests submitted together (continuous batching runs them as one batch while
    /// they all fit), not streamed. A bad request fails the batch, naming its position.
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
                self.row_request(r, host_defaults).map_err(|e| match e {
                    EngineError::InvalidRequest(m) => EngineError::InvalidRequest(format!("request {i} of the batch: {m}")),
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let prompts: Vec<Vec<u32>> = rows.iter().map(|r| r.prompt.clone()).collect();
        let finished = self.run_rows(rows, optimization, &mut |_, _, _, _| true)?;
        let timings = batch_timings(&finished);
        let responses = prompts.into_iter().zip(finished).map(|(prompt, f)| response(prompt, f.result, f.timings)).collect();
        Ok(BatchInferResponse { responses, timings })
    }

    /// Logits at every prompt position: perplexity and optionally all logits.
    pub fn score(&self, input: &PromptInput, return_logits: bool) -> Result<ScoreResponse, EngineError> {
        self.score_ids(self.prompt_ids(input)?, None, return_logits)
    }

    /// [`Self::score`] of token ids, with the prompt's images when it has some.
    pub fn score_ids(&self, ids: Vec<u32>, media: Option<Arc<PromptMedia>>, return_logits: bool) -> Result<ScoreResponse, EngineError> {
        let pending = self.submit(vec![Work::Score { ids: ids.clone(), media }], 0)?;
        let finished = loop {
            match pending.events.recv() {
                Ok((_, Event::Done(outcome))) => break (*outcome)?,
                Ok(_) => continue,
                Err(_) => return Err(EngineError::Device("the model's step loop stopped while scoring".into())),
            }
        };
        let rows = finished.logits;
        if rows.len() != ids.len() {
            return Err(EngineError::Device(format!("scoring returned {} rows of logits for {} tokens", rows.len(), ids.len())));
        }
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
        Ok(ScoreResponse { logits: return_logits.then_some(rows), token_ids: ids, perplexity, mean_nll })
    }
}

/// A batch's timings: its prompts and tokens summed, time to first token when every row had
/// its first, decode rates over all rows' later tokens.
fn batch_timings(rows: &[Finished]) -> Timings {
    let mut t = Timings::default();
    let Some(start) = rows.iter().map(|f| f.submitted).min() else { return t };
    for f in rows {
        t.prompt_tokens += f.timings.prompt_tokens;
        t.generated_tokens += f.timings.generated_tokens;
        t.cached_prompt_tokens += f.timings.cached_prompt_tokens;
        t.kv_blocks_used = t.kv_blocks_used.max(f.timings.kv_blocks_used);
        t.kv_blocks_total = f.timings.kv_blocks_total;
    }
    let firsts: Vec<Instant> = rows.iter().filter_map(|f| f.token_times.first().copied()).collect();
    if let Some(&last_first) = firsts.iter().max() {
        t.time_to_first_token_s = last_first.duration_since(start).as_secs_f64();
        t.prefill_tokens_per_s = t.prompt_tokens as f64 / t.time_to_first_token_s.max(1e-9);
    }
    let mut times: Vec<Instant> = rows.iter().flat_map(|f| f.token_times.iter().copied()).collect();
    times.sort();
    decode_rates(&mut t, &times, firsts.len().max(1));
    t.total_s = rows.iter().map(|f| f.submitted + std::time::Duration::from_secs_f64(f.timings.total_s)).max().map_or(0.0, |e| e.duration_since(start).as_secs_f64());
    t
}
