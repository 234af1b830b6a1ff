//! The serde types that cross the plugin boundary as JSON, and travel unchanged over the
//! worker-process socket at the higher security levels.
//!
//! Reference: the OpenAI chat-completions request shape (messages, tools, sampling fields) and
//! transformers' `GenerationConfig` (sampling semantics).

use crate::config::{OptimizationSettings, ResourceLimits, SecurityLevel};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a plugin's tensors live; chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "kind", content = "index")]
pub enum DeviceRequest {
    /// CUDA device 0 when the plugin has CUDA and a device answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(u32),
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<u32>) {
                Some(Ok(index)) => Ok(Self::Cuda(index)),
                _ => Err(format!("unknown device `{s}` (expected auto, cpu, cuda or cuda:N)")),
            },
        }
    }
}

impl std::fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Numeric type of weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
    F16,
}

impl DType {
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" => Ok(Self::F16),
            _ => Err(format!("unknown dtype `{s}` (expected f32, bf16 or f16)")),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        })
    }
}

/// What a plugin says about itself; returned by `metadata`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginMetadata {
    /// Stable identifier used on the command line and in the config file.
    pub id: String,
    pub version: String,
    pub description: String,
    /// HF `architectures` values this plugin loads (e.g. `Qwen3ForCausalLM`).
    pub architectures: Vec<String>,
    pub primary_model: PrimaryModel,
    /// e.g. `["text"]`, later `["text", "image"]`.
    pub modalities: Vec<String>,
    /// Features the plugin implements (e.g. `streaming`, `chat-template`, `kv-cache`).
    pub capabilities: Vec<String>,
    /// Optimization settings the plugin honours (the keys of `OptimizationSettings`).
    pub optimizations: Vec<String>,
    /// Tensor backends compiled in (e.g. `cpu`, `cuda`).
    pub backends: Vec<String>,
    pub build: BuildInfo,
}

/// The model a plugin is primarily built for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrimaryModel {
    pub name: String,
    pub parameter_count: u64,
    /// Bytes of weights in the model's native dtype.
    pub memory_bytes: u64,
}

/// How the plugin was built.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildInfo {
    pub rustc: String,
    pub burn: String,
    pub abi_major: u32,
    pub abi_minor: u32,
}

/// Answer of `supports_config`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Support {
    pub supported: bool,
    /// Why not (or a note on how), for error messages.
    pub reason: String,
}

/// Plugin-wide settings handed to `initialize`, from the host's config file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PluginSettings {
    pub security: SecurityLevel,
    pub limits: ResourceLimits,
    pub optimization: OptimizationSettings,
    /// Default sampling for requests that leave fields unset (over the model's own
    /// `generation_config.json`).
    pub sampling_defaults: SamplingOverrides,
    /// A directory the plugin may write caches into (compiled kernels, autotune results).
    pub cache_dir: Option<String>,
    /// Security level `medium` and up: the only files and directories the plugin may open
    /// (its own library, the model, the cache directory); every open goes through
    /// [`crate::file_access::validate_file_access`]. `None`: no restriction (`low`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_paths: Option<Vec<String>>,
}

/// Per-load options.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadOptions {
    pub device: DeviceRequest,
    /// Overrides the profile's dtype.
    pub dtype: Option<DType>,
    /// Benchmarking: ignore the checkpoint and generate deterministic random weights with this
    /// seed on the device, from `config.json` alone (real-size models without their weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_weights: Option<u64>,
}

/// Returned by `load_model`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Pass to `infer`, `score`, `cleanup`.
    pub handle: u64,
    /// CPU threads the plugin computes with, when `limits.cpu_percent` capped them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_threads: Option<u32>,
    pub architecture: String,
    pub parameter_count: u64,
    /// Bytes the weights occupy on the device, in `dtype`.
    pub weight_bytes: u64,
    pub dtype: DType,
    /// The device actually used (`cpu`, `cuda:0`).
    pub device: String,
    pub max_context: u64,
    pub vocab_size: u64,
    pub has_chat_template: bool,
    /// Sampling defaults read from the model's `generation_config.json`.
    pub generation_defaults: SamplingOverrides,
    pub load_seconds: f64,
    /// The paged KV cache preallocated at load: blocks, tokens per block, bytes, and what
    /// sized it.
    #[serde(default)]
    pub kv_cache_blocks: u64,
    #[serde(default)]
    pub kv_block_tokens: u64,
    #[serde(default)]
    pub kv_cache_bytes: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kv_cache_sized_by: String,
    /// How the KV cache stores keys and values (`bf16`, `f32`, `int8`); empty from plugins
    /// built before `kv_cache_dtype`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kv_cache_dtype: String,
    /// How the linear weights are stored when any is quantized (`int4 (groups of 128): 252
    /// of 253 linear weights`); empty when none is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub quantization: String,
}

/// Sampling fields that may be left unset (then: the request's default chain).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingOverrides {
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<u32>,
    /// OpenAI's penalties on the generated tokens (vLLM's semantics): each logit minus
    /// `presence_penalty` if its token was generated at all, minus `frequency_penalty` times
    /// how often. In [-2, 2]; 0 or unset: none. A plugin built before them refuses a request
    /// that sets them (an unknown field), never ignores them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
}

/// Sampling of one request. `greedy` wins over every other field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    #[serde(default)]
    pub greedy: bool,
    #[serde(default, flatten)]
    pub values: SamplingOverrides,
    pub seed: Option<u64>,
    /// EOS ids do not end generation: it runs to `max_new_tokens` (vLLM's `ignore_eos`;
    /// benchmarks).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
}

/// One chat message, in the OpenAI / transformers shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: String,
    /// Assistant tool calls, passed to the chat template as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// ABI 1.5: the content as ordered parts, text and images (OpenAI's content-part list),
    /// for models that take images; `content` then holds the text parts joined. An image part
    /// names one of [`InferRequest::images`]. Empty: `content` is the whole message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<ContentPart>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
            tool_calls: None,
            name: None,
            parts: Vec::new(),
        }
    }

    /// A message of ordered text and image parts (`content`: the text parts joined).
    pub fn with_parts(role: &str, parts: Vec<ContentPart>) -> Self {
        let content = parts
            .iter()
            .filter_map(|p| match p {
                ContentPart::Text { text } => Some(text.as_str()),
                ContentPart::Image { .. } => None,
            })
            .collect::<String>();
        Self { parts, ..Self::new(role, &content) }
    }
}

/// One part of a chat message's content (ABI 1.5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ContentPart {
    Text { text: String },
    /// `InferRequest::images[image]`.
    Image { image: u32 },
}

/// An image file (PNG, JPEG or WebP) as its bytes; base64 in JSON.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageData(pub Vec<u8>);

impl std::fmt::Debug for ImageData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageData({} bytes)", self.0.len())
    }
}

impl Serialize for ImageData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for ImageData {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text.as_bytes()).map(ImageData).map_err(|e| serde::de::Error::custom(format!("an image is not valid base64: {e}")))
    }
}

/// What to generate from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptInput {
    /// Raw text, tokenized without a chat template.
    Text(String),
    /// Token ids, used as they are.
    TokenIds(Vec<u32>),
    /// A conversation rendered with the model's chat template (generation prompt added).
    Chat {
        messages: Vec<ChatMessage>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tools: Option<serde_json::Value>,
    },
}

/// One generation request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    pub input: PromptInput,
    #[serde(default)]
    pub sampling: SamplingParams,
    /// Extra stop strings (generation also stops on every EOS id of the model).
    #[serde(default)]
    pub stop: Vec<String>,
    /// ABI 1.3: a key the prefix cache is partitioned by. Requests with different salts never
    /// share cached blocks (the server derives one per API key, so one tenant can neither hit
    /// nor probe another's cached prompts); empty: the shared cache. The host refuses to send
    /// a salt to a plugin older than 1.3, which would ignore it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cache_salt: String,
    /// ABI 1.4: report each generated token's log-probability and, for `Some(k)`, the `k` most
    /// likely tokens at its position (at most [`MAX_TOP_LOGPROBS`]). The host refuses it for a
    /// plugin older than 1.4, which would ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// ABI 1.4: constrain the output to a JSON value (`json_object`), one matching a JSON
    /// schema (`json_schema`) or a Lark grammar (`grammar`), by masking the tokens that would
    /// leave it (constrained decoding). The host refuses it for a plugin older than 1.4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<OutputConstraint>,
    /// ABI 1.5: the images the prompt's chat messages name in their image parts. The host
    /// refuses them for a plugin older than 1.5, which would ignore them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageData>,
}

/// The most alternatives a request may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// What generated text must match (`InferRequest::constraint`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum OutputConstraint {
    /// Any JSON object.
    JsonObject,
    /// A JSON value valid against `schema` (a JSON Schema document).
    JsonSchema { schema: serde_json::Value },
    /// A grammar in llguidance's Lark dialect.
    Grammar { lark: String },
    /// Tool calls only, in the model's own tool-call format, of the request's tools (OpenAI's
    /// `tool_choice: "required"`: one or more calls) or exactly one call of `function` (a named
    /// `tool_choice`). Refused for models without a tool-call format.
    ToolCalls {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        function: Option<String>,
    },
}

/// ABI 1.4: what a streamed token carries beside its id and answer text. Empty for most
/// tokens; the text of the answer itself stays the sink's `text`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenDetail {
    /// Reasoning text this token released (models that write reasoning).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reasoning: String,
    /// Tool calls this token completed, in order (the parser releases a call whole, once it
    /// parses, never half-parsed text).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The token's log-probability, when the request asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<TokenLogprobs>,
}

impl TokenDetail {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.tool_calls.is_empty() && self.logprobs.is_none()
    }
}

/// One generated token's log-probability under the model (the log-softmax of its raw logits,
/// before penalties, temperature or truncation: vLLM's default `raw_logprobs`), and the most
/// likely tokens at its position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    pub token: TokenLogprob,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TokenLogprob>,
}

/// A token, its text (decoded alone) and its log-probability.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
}

/// The most requests one `infer_batch` call takes.
pub const MAX_BATCH_REQUESTS: usize = 256;

/// Several generation requests submitted together (`infer_batch`): the engine's scheduler
/// runs them in its continuous batch, every step computing all the rows it admitted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchInferRequest {
    /// 1 to [`MAX_BATCH_REQUESTS`] requests; each keeps its own sampling and stop strings.
    pub requests: Vec<InferRequest>,
}

impl BatchInferRequest {
    /// The batch size is in range.
    pub fn validate(&self) -> Result<(), String> {
        match self.requests.len() {
            0 => Err("a batch needs at least one request".into()),
            n if n > MAX_BATCH_REQUESTS => Err(format!("a batch of {n} requests is more than the {MAX_BATCH_REQUESTS} allowed")),
            _ => Ok(()),
        }
    }
}

/// Result of `infer_batch`: one response per request, in order.
///
/// Each response's `timings` are the batch's (the rows shared every step), except
/// `prompt_tokens` and `generated_tokens`, which are the row's own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchInferResponse {
    pub responses: Vec<InferResponse>,
    /// The whole batch: token counts summed over rows, rates in tokens of all rows per second.
    pub timings: Timings,
}

/// `generate_text` request: a plain prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateTextRequest {
    pub prompt: String,
    #[serde(default)]
    pub sampling: SamplingParams,
    #[serde(default)]
    pub stop: Vec<String>,
}

/// `chat_completion` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<serde_json::Value>,
    #[serde(default)]
    pub sampling: SamplingParams,
    #[serde(default)]
    pub stop: Vec<String>,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token was produced.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
    /// The context window is full.
    ContextFull,
    /// The caller's sink asked to stop.
    Cancelled,
}

/// Wall-clock timings of one request, in seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Prompt processing up to the first sampled token.
    pub time_to_first_token_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Decode rate over the second half of the decode steps only: past first-use kernel
    /// compilation and autotuning, the rate a long generation settles at.
    #[serde(default)]
    pub steady_decode_tokens_per_s: f64,
    pub total_s: f64,
    /// Prompt tokens taken from the prefix cache instead of being computed.
    #[serde(default)]
    pub cached_prompt_tokens: u64,
    /// The paged KV cache when the request ended: blocks in use (all sequences) and in all.
    #[serde(default)]
    pub kv_blocks_used: u64,
    #[serde(default)]
    pub kv_blocks_total: u64,
    /// From submission until the scheduler first gave the request a place in a step (its
    /// time waiting for admission); 0 from plugins that do not report it.
    #[serde(default)]
    pub queued_s: f64,
}

/// A loaded model's scheduler counters (ABI 1.2 `stats`): the server's `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SchedulerStats {
    /// Sequences being stepped, and waiting for admission.
    pub running: u64,
    pub waiting: u64,
    /// Sequences whose blocks were freed to make room, to be recomputed.
    pub preemptions: u64,
    pub kv_blocks_used: u64,
    pub kv_blocks_total: u64,
    pub kv_block_tokens: u64,
    /// Full blocks holding a known prefix (free or in use).
    pub kv_blocks_cached: u64,
    /// Admissions that looked up the prefix cache, the prompt tokens they covered, and those
    /// found there (not computed).
    pub prefix_cache_queries: u64,
    pub prefix_cache_query_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    /// Tokens computed as prompts (recomputation included) and as decode rows.
    pub prompt_tokens_computed: u64,
    pub decode_tokens_computed: u64,
    /// Scheduler steps run, and requests finished (any reason).
    pub steps: u64,
    pub requests_finished: u64,
}

/// Result of a generation request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferResponse {
    /// The prompt as token ids (after the chat template, if any).
    pub prompt_token_ids: Vec<u32>,
    /// The new tokens only.
    pub token_ids: Vec<u32>,
    /// The decoded new tokens (stop string removed); for models whose output carries
    /// reasoning or tool calls, the answer text only (what was streamed).
    pub text: String,
    /// The model's reasoning (`<think>…</think>`), when its format has one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reasoning: String,
    /// Tool calls the model made, parsed from its output format.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: FinishReason,
    pub timings: Timings,
    /// ABI 1.4: per generated token, when the request asked for log-probabilities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprobs>,
}

/// A tool call parsed from model output, in the OpenAI shape (`arguments` already typed by
/// the tool's JSON schema).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub name: String,
    pub arguments: serde_json::Map<String, serde_json::Value>,
}

/// One forward pass over a sequence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreRequest {
    pub input: PromptInput,
    /// Return the full per-position logits (one row per input token, full vocabulary).
    #[serde(default)]
    pub return_logits: bool,
}

/// Result of `score`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreResponse {
    pub token_ids: Vec<u32>,
    /// exp(mean negative log-likelihood of tokens 1..n given their prefix); `None` for one token.
    pub perplexity: Option<f64>,
    /// Mean negative log-likelihood in nats.
    pub mean_nll: Option<f64>,
    /// `[n_tokens][vocab]` when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<Vec<f32>>>,
}

/// A runtime configuration update (`update_config`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigUpdate {
    pub sampling_defaults: Option<SamplingOverrides>,
    pub limits: Option<ResourceLimits>,
    pub optimization: Option<OptimizationSettings>,
    pub security: Option<SecurityLevel>,
}

/// What `update_config` applied and what it refused, with reasons.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateOutcome {
    pub applied: Vec<String>,
    /// setting -> reason it cannot change while running.
    pub refused: BTreeMap<String, String>,
}
