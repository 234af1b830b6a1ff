//! `inference-pio serve`: an OpenAI-compatible HTTP server (axum + tokio) in front of the
//! engines of one or more loaded models. Each request becomes one `infer` call on its own
//! blocking thread; concurrent calls meet in the model's continuous-batching scheduler and
//! stream back through their own sinks.
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (both with `stream`,
//! server-sent events ending in `data: [DONE]`), `GET /v1/models`, `GET /health` (503 while
//! the models load: the server listens from the start, as vLLM's and llama-server's do),
//! `GET /metrics` (Prometheus text, with histograms of time to first token, inter-token
//! latency and end-to-end latency). Errors use OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`).
//!
//! What a request gets here: the `model` field routes (unknown: 404); API keys (Bearer, from
//! `--api-key-file`; without one the server binds to loopback only unless
//! `--allow-unauthenticated`), each a tenant with its own limits (429 with `Retry-After`) and
//! its own prefix-cache partition ([`tenants`]); a bounded queue (`--max-queue`: 503 with
//! `Retry-After` when full); a client that goes away (stream or not) cancels its request at
//! the next token; image parts come inline as `data:` URLs or as paths inside the directories
//! the operator allows (`--image-dir`; an `http(s)` URL or any other path is refused by name,
//! as is video); settings the engine does not implement are refused by name, never ignored;
//! `tool_choice: "none"` renders the prompt without the tools.
//!
//! References: the OpenAI API reference (chat completions, completions, models, errors,
//! streaming chunks); vLLM's `entrypoints/openai/serving_chat.py` (SSE framing, `usage`,
//! `stream_options.include_usage`); llama.cpp's `tools/server`.

pub mod request;
pub mod tenants;

use crate::handle::PluginHandle;
use axum::{Extension, Router};
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use inference_pio_core::abi::ErrorKind;
use inference_pio_core::types::{
    ChatMessage, ContentPart, FinishReason, ImageData, InferRequest, InferResponse, ModelInfo, OutputConstraint, PromptInput, SamplingOverrides, SamplingParams, TokenDetail,
    TokenLogprob, TokenLogprobs, ToolCall,
};
use serde_json::{Value, json};
use std::sync::Arc;
use request::{BadRequest, ChatBody, CompletionBody, Format, Prompt, Sampling, ToolChoice};
use tenants::{Tenant, Tenants};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The largest request body accepted: room for an inline image of
/// [`request::MAX_IMAGE_BYTES`] in base64.
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// One loaded model as the server routes to it.
pub struct ServedModel {
    /// The name clients send in `model`.
    pub name: String,
    pub plugin_id: String,
    pub plugin: Arc<PluginHandle>,
    pub info: ModelInfo,
}

/// The models a server routes to, added as they finish loading.
pub struct ServedModels {
    models: std::sync::RwLock<Vec<Arc<ServedModel>>>,
    loading: AtomicBool,
}

impl ServedModels {
    /// None yet: models are loading (`/health` answers 503 until [`Self::loaded`]).
    pub fn loading() -> Arc<Self> {
        Arc::new(Self { models: std::sync::RwLock::new(Vec::new()), loading: AtomicBool::new(true) })
    }

    /// One more model, routed to from now on.
    pub fn add(&self, model: ServedModel) {
        if let Ok(mut models) = self.models.write() {
            models.push(Arc::new(model));
        }
    }

    /// Every model is loaded.
    pub fn loaded(&self) {
        self.loading.store(false, Ordering::SeqCst);
    }

    fn is_loading(&self) -> bool {
        self.loading.load(Ordering::SeqCst)
    }

    fn all(&self) -> Vec<Arc<ServedModel>> {
        self.models.read().map(|m| m.clone()).unwrap_or_default()
    }
}

/// How the server runs.
pub struct ServerOptions {
    pub models: Arc<ServedModels>,
    /// Accepted Bearer keys and their tenants (`None`: no authentication, one shared tenant).
    pub api_keys: Option<Tenants>,
    /// Requests admitted at once (queued in the engines or running); more get 503.
    pub max_queue: usize,
    /// The longest a request may run (seconds); a request may ask for less (`timeout_s`).
    pub request_timeout_s: f64,
    /// Directories (canonical) whose image files requests may name by path.
    pub image_dirs: Vec<std::path::PathBuf>,
}

struct AppState {
    models: Arc<ServedModels>,
    api_keys: Option<Tenants>,
    queue: Arc<tokio::sync::Semaphore>,
    max_queue: usize,
    request_timeout_s: f64,
    image_dirs: Vec<std::path::PathBuf>,
    next_id: AtomicU64,
    metrics: Metrics,
}

#[derive(Default)]
struct Metrics {
    requests_ok: AtomicU64,
    requests_error: AtomicU64,
    requests_rejected: AtomicU64,
    requests_rate_limited: AtomicU64,
    requests_cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    e2e_latency: Histogram,
    queue_time: Histogram,
}

/// Upper bounds (seconds) of the latency histograms' buckets (vLLM's, shortened).
const BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];

/// A Prometheus histogram: counts per bucket, the sum and the count.
#[derive(Default)]
struct Histogram(std::sync::Mutex<(Vec<u64>, f64, u64)>);

impl Histogram {
    fn observe(&self, seconds: f64) {
        if let Ok(mut h) = self.0.lock() {
            if h.0.is_empty() {
                h.0 = vec![0; BUCKETS.len()];
            }
            for (i, bound) in BUCKETS.iter().enumerate() {
                if seconds <= *bound {
                    h.0[i] += 1;
                }
            }
            h.1 += seconds;
            h.2 += 1;
        }
    }

    fn render(&self, name: &str, help: &str) -> String {
        let (buckets, sum, count) = self.0.lock().map(|h| h.clone()).unwrap_or_default();
        let mut out = format!("# HELP inference_pio:{name} {help}\n# TYPE inference_pio:{name} histogram\n");
        for (i, bound) in BUCKETS.iter().enumerate() {
            out.push_str(&format!("inference_pio:{name}_bucket{{le=\"{bound}\"}} {}\n", buckets.get(i).copied().unwrap_or(0)));
        }
        out.push_str(&format!("inference_pio:{name}_bucket{{le=\"+Inf\"}} {count}\ninference_pio:{name}_sum {sum}\ninference_pio:{name}_count {count}\n"));
        out
    }
}

/// An error in OpenAI's shape.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    retry_after: Option<u32>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param, retry_after: None }
    }
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, retry_after: None }
    }
}

impl ApiError {
    /// OpenAI's error object (the response body, and a stream's error event).
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status.as_u16()}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Builds the router (used by `serve` and by tests).
pub fn router(options: ServerOptions) -> Router {
    let state = Arc::new(AppState {
        models: options.models,
        api_keys: options.api_keys,
        queue: Arc::new(tokio::sync::Semaphore::new(options.max_queue)),
        max_queue: options.max_queue,
        request_timeout_s: options.request_timeout_s,
        image_dirs: options.image_dirs,
        next_id: AtomicU64::new(1),
        metrics: Metrics::default(),
    });
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state), authenticate));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(refuse_declared_oversize))
        .with_state(state)
}

/// A body whose declared length is past [`MAX_BODY_BYTES`] is refused before any of it is
/// read (the body limit still stops a longer body sent without a length).
async fn refuse_declared_oversize(request: Request, next: Next) -> Response {
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("the request body is larger than {MAX_BODY_BYTES} bytes")).into_response();
    }
    next.run(request).await
}

/// Checks the Bearer key and hands its tenant to the handler (as a request extension).
async fn authenticate(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    if let Some(keys) = &state.api_keys {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given.and_then(|key| keys.find(key.trim())) {
            Some(tenant) => {
                request.extensions_mut().insert(tenant);
            }
            None if given.is_some() => return ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", "invalid API key").into_response(),
            None => return ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", "missing API key: send `Authorization: Bearer KEY`").into_response(),
        }
    }
    next.run(request).await
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// 200 `ok` once every model is loaded; 503 before.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.models.is_loading() {
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, "loading").into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(LOADING_RETRY_AFTER_S));
        response
    } else {
        "ok".into_response()
    }
}

/// `Retry-After` (seconds) of an answer given while models load.
const LOADING_RETRY_AFTER_S: u32 = 5;

async fn models(State(state): State<Arc<AppState>>) -> Response {
    let data: Vec<Value> = state
        .models
        .all()
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": now_s(), "owned_by": "inference-pio", "max_model_len": m.info.max_context, "plugin": m.plugin_id}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64, labels: &str| {
        out.push_str(&format!("# HELP inference_pio:{name} {help}\n# TYPE inference_pio:{name} counter\ninference_pio:{name}{labels} {value}\n"));
    };
    counter("request_success_total", "Requests answered in full.", m.requests_ok.load(Ordering::Relaxed), "");
    counter("request_failure_total", "Requests that failed in the engine.", m.requests_error.load(Ordering::Relaxed), "");
    counter("request_rejected_total", "Requests refused before the engine (queue full).", m.requests_rejected.load(Ordering::Relaxed), "");
    counter("request_rate_limited_total", "Requests refused because their API key was over a limit (429).", m.requests_rate_limited.load(Ordering::Relaxed), "");
    counter("request_cancelled_total", "Requests whose client went away.", m.requests_cancelled.load(Ordering::Relaxed), "");
    counter("prompt_tokens_total", "Prompt tokens of answered requests.", m.prompt_tokens.load(Ordering::Relaxed), "");
    counter("generation_tokens_total", "Generated tokens of answered requests.", m.generation_tokens.load(Ordering::Relaxed), "");
    out.push_str(&m.time_to_first_token.render("time_to_first_token_seconds", "Time from the request's arrival to its first token."));
    out.push_str(&m.inter_token_latency.render("inter_token_latency_seconds", "Time between a request's consecutive tokens."));
    out.push_str(&m.e2e_latency.render("e2e_request_latency_seconds", "Time from the request's arrival to its last token."));
    out.push_str(&m.queue_time.render("request_queue_time_seconds", "Time a request waited in the engine's queue before its first step."));
    for model in state.models.all() {
        let (plugin, handle) = (Arc::clone(&model.plugin), model.info.handle);
        let Ok(Ok(stats)) = tokio::task::spawn_blocking(move || plugin.stats(handle)).await else { continue };
        let labels = format!("{{model_name=\"{}\"}}", model.name);
        let gauge = |name: &str, help: &str, value: f64| format!("# HELP inference_pio:{name} {help}\n# TYPE inference_pio:{name} gauge\ninference_pio:{name}{labels} {value}\n");
        out.push_str(&gauge("num_requests_running", "Sequences in the running batch.", stats.running as f64));
        out.push_str(&gauge("num_requests_waiting", "Sequences waiting for admission.", stats.waiting as f64));
        let usage = if stats.kv_blocks_total > 0 { stats.kv_blocks_used as f64 / stats.kv_blocks_total as f64 } else { 0.0 };
        out.push_str(&gauge("kv_cache_usage_perc", "Share of KV-cache blocks in use.", usage));
        out.push_str(&gauge("num_preemptions", "Sequences preempted so far.", stats.preemptions as f64));
        out.push_str(&gauge("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_query_tokens as f64));
        out.push_str(&gauge("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hit_tokens as f64));
        out.push_str(&gauge("prompt_tokens_computed", "Prompt tokens the engine computed (cache hits excluded).", stats.prompt_tokens_computed as f64));
        out.push_str(&gauge("generation_tokens_computed", "Tokens the engine decoded.", stats.decode_tokens_computed as f64));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

impl From<BadRequest> for ApiError {
    fn from(e: BadRequest) -> Self {
        ApiError::bad(e.message, e.param)
    }
}

/// How a request is answered, apart from what the engine computes.
struct Delivery {
    stream: bool,
    include_usage: bool,
    /// The deadline in seconds: the request's own `timeout_s`, at most the server's.
    timeout_s: f64,
    /// OpenAI's end-user id, logged with the request.
    user: Option<String>,
    /// The API key's tenant (limits, prefix-cache partition); `None` without keys.
    tenant: Option<Arc<Tenant>>,
}

fn delivery(sampling: &Sampling, server_timeout_s: f64, tenant: Option<Arc<Tenant>>) -> Result<Delivery, ApiError> {
    Ok(Delivery {
        stream: sampling.stream,
        include_usage: sampling.stream_options.as_ref().is_some_and(|o| o.include_usage),
        timeout_s: sampling.timeout(server_timeout_s)?,
        user: sampling.user.clone(),
        tenant,
    })
}

/// The engine's parameters, stop strings and number of choices (checked in [`request`]),
/// with the tenant's `max_tokens` limit applied.
fn params(sampling: &Sampling, info: &ModelInfo, tenant: Option<&Tenant>) -> Result<(SamplingParams, Vec<String>, u32, Option<u32>), ApiError> {
    let key_limit = tenant.and_then(|t| t.limits.max_tokens.map(|l| (l, t.id.as_str())));
    let c = sampling.check(info.max_context, key_limit)?;
    let params = SamplingParams {
        greedy: c.greedy,
        values: SamplingOverrides {
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            min_p: c.min_p,
            repetition_penalty: c.repetition_penalty,
            max_new_tokens: c.max_tokens,
            presence_penalty: c.presence_penalty,
            frequency_penalty: c.frequency_penalty,
        },
        seed: c.seed,
        ignore_eos: c.ignore_eos,
    };
    Ok((params, c.stop, c.n, c.logprobs))
}

/// One API request as the engine runs it: the requests of its `n` choices (the tenant's
/// prefix-cache salt and `max_tokens` limit applied) and how it is answered.
fn engine_requests(
    state: &AppState,
    info: &ModelInfo,
    tenant: Option<Arc<Tenant>>,
    sampling: &Sampling,
    input: PromptInput,
    constraint: Option<OutputConstraint>,
    images: Vec<ImageData>,
) -> Result<(Vec<InferRequest>, Delivery), ApiError> {
    let (params, stop, n, logprobs) = params(sampling, info, tenant.as_deref())?;
    let cache_salt = tenant.as_ref().map(|t| t.cache_salt()).unwrap_or_default();
    let delivery = delivery(sampling, state.request_timeout_s, tenant)?;
    Ok((choices(InferRequest { input, sampling: params, stop, cache_salt, logprobs, constraint, images }, n), delivery))
}

/// The engine requests of `n` choices: the same prompt (its blocks shared through the prefix
/// cache), choice `i` seeded with `seed + i` when a seed is given (so each choice is what a
/// single request with that seed gets), else each with its own random seed.
fn choices(request: InferRequest, n: u32) -> Vec<InferRequest> {
    (0..n as u64)
        .map(|i| {
            let mut r = request.clone();
            r.sampling.seed = request.sampling.seed.map(|s| s.wrapping_add(i));
            r
        })
        .collect()
}

fn find_model(state: &AppState, name: &str) -> Result<Arc<ServedModel>, ApiError> {
    if let Some(model) = state.models.all().into_iter().find(|m| m.name == name) {
        return Ok(model);
    }
    if state.models.is_loading() {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("the model `{name}` is not loaded yet: the server is still loading its models"),
            kind: "server_loading",
            param: Some("model"),
            retry_after: Some(LOADING_RETRY_AFTER_S),
        });
    }
    Err(ApiError { status: StatusCode::NOT_FOUND, message: format!("the model `{name}` does not exist"), kind: "invalid_request_error", param: Some("model"), retry_after: None })
}

/// Sets the flag when the request's handler is dropped (the client went away).
struct CancelOnDrop(Arc<AtomicBool>);
impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn finish_reason(response: &InferResponse) -> &'static str {
    if !response.tool_calls.is_empty() {
        return "tool_calls";
    }
    match response.finish_reason {
        FinishReason::Length | FinishReason::ContextFull => "length",
        _ => "stop",
    }
}

/// OpenAI's usage of an answer's choices: the prompt counted once, the completions summed.
fn usage(responses: &[InferResponse]) -> Value {
    let p = responses.first().map_or(0, |r| r.prompt_token_ids.len());
    let c: usize = responses.iter().map(|r| r.token_ids.len()).sum();
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

fn engine_error(e: &inference_pio_core::abi::PluginError) -> ApiError {
    match e.kind {
        ErrorKind::InvalidInput | ErrorKind::Unsupported => ApiError::bad(e.message.clone(), None),
        ErrorKind::ResourceLimit => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", e.message.clone()),
        _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.message.clone()),
    }
}

/// What a streaming request's engine thread sends to the response.
enum Piece {
    /// A token of choice `.0`: its answer text and what else it carries.
    Token(usize, String, TokenDetail),
    /// Choice `.0` ended.
    Done(usize, Result<InferResponse, ApiError>),
}

/// Runs one request on a blocking thread, sending each token's text to `stream` (when
/// streaming) and stopping at the next token once `cancel` is raised or the deadline passes.
async fn generate(
    state: &Arc<AppState>,
    model: &Arc<ServedModel>,
    tenant: Option<&Arc<Tenant>>,
    request: InferRequest,
    timeout_s: f64,
    cancel: Arc<AtomicBool>,
    stream: Option<(usize, tokio::sync::mpsc::UnboundedSender<Piece>)>,
) -> Result<InferResponse, ApiError> {
    let deadline = Instant::now() + std::time::Duration::from_secs_f64(timeout_s);
    let timed_out = Arc::new(AtomicBool::new(false));
    let late = Arc::clone(&timed_out);
    let plugin = Arc::clone(&model.plugin);
    let handle = model.info.handle;
    let flag = Arc::clone(&cancel);
    let timing = Arc::clone(state);
    let arrived = Instant::now();
    let joined = tokio::task::spawn_blocking(move || {
        let mut last: Option<Instant> = None;
        let response = plugin.infer(handle, &request, &mut |_, text, detail| {
            let now = Instant::now();
            match last {
                None => timing.metrics.time_to_first_token.observe(now.duration_since(arrived).as_secs_f64()),
                Some(before) => timing.metrics.inter_token_latency.observe(now.duration_since(before).as_secs_f64()),
            }
            last = Some(now);
            if flag.load(Ordering::SeqCst) {
                return false;
            }
            if now > deadline {
                late.store(true, Ordering::SeqCst);
                return false;
            }
            match &stream {
                Some((choice, tx)) => tx.send(Piece::Token(*choice, text.to_string(), detail.clone())).is_ok(),
                None => true,
            }
        });
        timing.metrics.e2e_latency.observe(arrived.elapsed().as_secs_f64());
        response
    })
    .await;
    if timed_out.load(Ordering::SeqCst) {
        state.metrics.requests_cancelled.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", format!("the request ran past its deadline of {timeout_s} s and was stopped")));
    }
    match joined {
        Ok(Ok(response)) => {
            if response.finish_reason == FinishReason::Cancelled || cancel.load(Ordering::SeqCst) {
                state.metrics.requests_cancelled.fetch_add(1, Ordering::Relaxed);
            } else {
                state.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
            }
            state.metrics.queue_time.observe(response.timings.queued_s);
            state.metrics.prompt_tokens.fetch_add(response.prompt_token_ids.len() as u64, Ordering::Relaxed);
            state.metrics.generation_tokens.fetch_add(response.token_ids.len() as u64, Ordering::Relaxed);
            if let Some(t) = tenant {
                t.record((response.prompt_token_ids.len() + response.token_ids.len()) as u64, Instant::now());
            }
            Ok(response)
        }
        Ok(Err(e)) => {
            state.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
            Err(engine_error(&e))
        }
        Err(e) => {
            state.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", format!("the request's thread failed: {e}")))
        }
    }
}

/// Places in the server's queue for a request's `n` choices (each runs as a sequence).
fn admit(state: &Arc<AppState>, n: usize) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    Arc::clone(&state.queue).try_acquire_many_owned(n as u32).map_err(|_| {
        state.metrics.requests_rejected.fetch_add(1, Ordering::Relaxed);
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("the server is at its limit of {} requests at once; retry later", state.max_queue),
            kind: "server_overloaded",
            param: None,
            retry_after: Some(1),
        }
    })
}

/// What every answer names: its id, creation time and model.
struct Meta {
    id: String,
    created: u64,
    model: String,
}

/// One streamed chunk: the opening one, a token (its text, what else it carries, and how many
/// tool calls the choice streamed before it), or the last one (with the tool calls and
/// reasoning not streamed yet: all of them from a plugin before ABI 1.4).
enum Chunk<'a> {
    Start,
    Token { text: &'a str, detail: &'a TokenDetail, calls_before: usize, text_before: usize },
    /// A tool call's first delta (its index among the choice's calls, id and name), then its
    /// arguments in fragments (one per argument), as OpenAI streams them.
    CallStart { index: usize, name: &'a str },
    CallArguments { index: usize, fragment: &'a str },
    Finish { response: &'a InferResponse, calls_streamed: usize, reasoning_streamed: usize },
}

/// The two endpoints' shared path: one request of `requests.len()` choices (OpenAI's `n`,
/// each its own sequence in the engine's batch), answered whole (`whole`) or streamed as SSE
/// chunks (`chunk`, which names the choice), each in its endpoint's shape.
async fn respond(
    state: Arc<AppState>,
    model: Arc<ServedModel>,
    requests: Vec<InferRequest>,
    delivery: Delivery,
    id_prefix: &str,
    whole: impl FnOnce(&Meta, &[InferResponse]) -> Value + Send + 'static,
    chunk: impl Fn(&Meta, usize, Chunk<'_>) -> Value + Send + 'static,
) -> Result<Response, ApiError> {
    let Delivery { stream, include_usage, timeout_s, user, tenant } = delivery;
    let n = requests.len();
    if n > state.max_queue {
        return Err(ApiError::bad(format!("`n` = {n} is more than this server admits at once ({})", state.max_queue), Some("n")));
    }
    // The key's limits first (429: this client should slow down), then the server's (503).
    let admitted = match &tenant {
        Some(t) => Some(t.admit(Instant::now()).map_err(|over| {
            state.metrics.requests_rate_limited.fetch_add(1, Ordering::Relaxed);
            ApiError { status: StatusCode::TOO_MANY_REQUESTS, message: over.message, kind: "rate_limit_exceeded", param: None, retry_after: Some(over.retry_after_s) }
        })?),
        None => None,
    };
    let permit = admit(&state, n)?;
    let meta = Meta { id: format!("{id_prefix}-{}", state.next_id.fetch_add(1, Ordering::Relaxed)), created: now_s(), model: model.name.clone() };
    let cancel = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let key_id = tenant.as_ref().map(|t| t.id.clone());
    if !stream {
        // Dropped with this future if the client goes away first: the engine then stops.
        let guard = CancelOnDrop(Arc::clone(&cancel));
        let results = futures_util::future::join_all(
            requests.into_iter().map(|request| generate(&state, &model, tenant.as_ref(), request, timeout_s, Arc::clone(&cancel), None)),
        )
        .await;
        drop((permit, admitted));
        drop(guard);
        let responses = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        for (i, response) in responses.iter().enumerate() {
            log_request(&meta, i, key_id.as_deref(), user.as_deref(), response, started);
        }
        return Ok(axum::Json(whole(&meta, &responses)).into_response());
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Piece>();
    // The places are given back when the last choice ends.
    let held = Arc::new((permit, admitted));
    for (i, request) in requests.into_iter().enumerate() {
        let (task_state, model, tenant, flag, tx, held) = (Arc::clone(&state), Arc::clone(&model), tenant.clone(), Arc::clone(&cancel), tx.clone(), Arc::clone(&held));
        tokio::spawn(async move {
            let result = generate(&task_state, &model, tenant.as_ref(), request, timeout_s, flag, Some((i, tx.clone()))).await;
            drop(held);
            let _ = tx.send(Piece::Done(i, result));
        });
    }
    drop((tx, held));
    let events = async_stream(move |out| async move {
        // Cancels the engine's sequences if the client goes away (the stream is dropped).
        let _guard = CancelOnDrop(cancel);
        for i in 0..n {
            let _ = out.send(chunk(&meta, i, Chunk::Start).to_string());
        }
        let mut finished: Vec<Option<InferResponse>> = (0..n).map(|_| None).collect();
        // Per choice, streamed so far: tool calls, reasoning bytes and answer bytes.
        let mut streamed = vec![(0usize, 0usize, 0usize); n];
        while let Some(piece) = rx.recv().await {
            match piece {
                Piece::Token(i, text, mut detail) => {
                    let (calls_before, _, text_before) = streamed[i];
                    let calls = std::mem::take(&mut detail.tool_calls);
                    streamed[i].0 += calls.len();
                    streamed[i].1 += detail.reasoning.len();
                    streamed[i].2 += text.len();
                    let mut sent = Vec::new();
                    // The token's text, reasoning and log-probabilities (a token that only
                    // completes calls has none of them).
                    if calls.is_empty() || !text.is_empty() || !detail.is_empty() {
                        sent.push(chunk(&meta, i, Chunk::Token { text: &text, detail: &detail, calls_before, text_before }));
                    }
                    for (k, call) in calls.iter().enumerate() {
                        let index = calls_before + k;
                        sent.push(chunk(&meta, i, Chunk::CallStart { index, name: &call.name }));
                        for fragment in argument_fragments(call) {
                            sent.push(chunk(&meta, i, Chunk::CallArguments { index, fragment: &fragment }));
                        }
                    }
                    if sent.into_iter().any(|c| out.send(c.to_string()).is_err()) {
                        return;
                    }
                }
                Piece::Done(i, Ok(response)) => {
                    log_request(&meta, i, key_id.as_deref(), user.as_deref(), &response, started);
                    let (calls_streamed, reasoning_streamed, _) = streamed[i];
                    let _ = out.send(chunk(&meta, i, Chunk::Finish { response: &response, calls_streamed, reasoning_streamed }).to_string());
                    finished[i] = Some(response);
                    if finished.iter().all(Option::is_some) {
                        // OpenAI's usage chunk: no choices, the usage of all of them.
                        if include_usage {
                            let responses: Vec<InferResponse> = finished.into_iter().flatten().collect();
                            let mut last = chunk(&meta, 0, Chunk::Finish { response: &responses[0], calls_streamed: 0, reasoning_streamed: 0 });
                            last["choices"] = json!([]);
                            last["usage"] = usage(&responses);
                            let _ = out.send(last.to_string());
                        }
                        break;
                    }
                }
                Piece::Done(_, Err(e)) => {
                    let _ = out.send(e.body().to_string());
                    break;
                }
            }
        }
        let _ = out.send("[DONE]".to_string());
    });
    Ok(Sse::new(events).into_response())
}

/// A stream of SSE events fed by `body` through a channel (ends when `body` returns).
fn async_stream<F, Fut>(body: F) -> impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<String>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let task = tokio::spawn(body(tx));
    let abort = AbortOnDrop(task);
    futures_util::stream::unfold((rx, abort), |(mut rx, abort)| async move {
        let data = rx.recv().await?;
        Some((Ok(Event::default().data(data)), (rx, abort)))
    })
}

/// Aborts the producing task when the response stream is dropped (the client left).
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn log_request(meta: &Meta, choice: usize, key: Option<&str>, user: Option<&str>, response: &InferResponse, started: Instant) {
    tracing::info!(
        "request {}{} model={} key={} user={} prompt_tokens={} completion_tokens={} finish={:?} ttft_s={:.3} total_s={:.3}",
        meta.id,
        if choice > 0 { format!(" choice {choice}") } else { String::new() },
        meta.model,
        key.unwrap_or("-"),
        user.unwrap_or("-"),
        response.prompt_token_ids.len(),
        response.token_ids.len(),
        response.finish_reason,
        response.timings.time_to_first_token_s,
        started.elapsed().as_secs_f64()
    );
}

async fn chat_completions(State(state): State<Arc<AppState>>, tenant: Option<Extension<Arc<Tenant>>>, body: Bytes) -> Result<Response, ApiError> {
    let tenant = tenant.map(|Extension(t)| t);
    let body: ChatBody = request::parse(&body)?;
    let model = find_model(&state, &body.model)?;
    let (messages, images) = body.messages(&state.image_dirs)?;
    let messages = messages
        .into_iter()
        .map(|m| {
            let mut message = ChatMessage::new(m.role, &m.content);
            message.tool_calls = m.tool_calls;
            message.name = m.name;
            message.parts = m
                .parts
                .into_iter()
                .map(|p| match p {
                    request::Part::Text(text) => ContentPart::Text { text },
                    request::Part::Image(image) => ContentPart::Image { image },
                })
                .collect();
            message
        })
        .collect();
    let input = PromptInput::Chat { messages, tools: body.offered_tools() };
    let constraint = match (body.format()?, body.tool_choice()?) {
        (Some(Format::JsonObject), _) => Some(OutputConstraint::JsonObject),
        (Some(Format::JsonSchema(schema)), _) => Some(OutputConstraint::JsonSchema { schema }),
        (None, ToolChoice::Required) => Some(OutputConstraint::ToolCalls { function: None }),
        (None, ToolChoice::Function(name)) => Some(OutputConstraint::ToolCalls { function: Some(name) }),
        (None, ToolChoice::Auto | ToolChoice::None) => None,
    };
    let images = images.into_iter().map(ImageData).collect();
    let (requests, delivery) = engine_requests(&state, &model.info, tenant, &body.sampling, input, constraint, images)?;
    respond(
        Arc::clone(&state),
        model,
        requests,
        delivery,
        "chatcmpl",
        |meta, responses| {
            let choices: Vec<Value> = responses
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let mut message = json!({"role": "assistant", "content": r.text});
                    if !r.reasoning.is_empty() {
                        message["reasoning_content"] = json!(r.reasoning);
                    }
                    if !r.tool_calls.is_empty() {
                        message["tool_calls"] = tool_calls(&r.tool_calls, 0);
                    }
                    json!({"index": i, "message": message, "finish_reason": finish_reason(r), "logprobs": chat_logprobs(&r.logprobs)})
                })
                .collect();
            json!({"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
                   "choices": choices, "usage": usage(responses)})
        },
        |meta, i, chunk| {
            let (delta, finish, logprobs) = match chunk {
                Chunk::Start => (json!({"role": "assistant", "content": ""}), Value::Null, Value::Null),
                Chunk::Token { text, detail, calls_before, .. } => {
                    let mut delta = json!({});
                    if !text.is_empty() || (detail.reasoning.is_empty() && detail.tool_calls.is_empty()) {
                        delta["content"] = json!(text);
                    }
                    if !detail.reasoning.is_empty() {
                        delta["reasoning_content"] = json!(detail.reasoning);
                    }
                    if !detail.tool_calls.is_empty() {
                        delta["tool_calls"] = tool_calls(&detail.tool_calls, calls_before);
                    }
                    (delta, Value::Null, chat_logprobs(detail.logprobs.as_slice()))
                }
                Chunk::CallStart { index, name } => (
                    json!({"tool_calls": [{"index": index, "id": format!("call_{index}"), "type": "function", "function": {"name": name, "arguments": ""}}]}),
                    Value::Null,
                    Value::Null,
                ),
                Chunk::CallArguments { index, fragment } => (json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}), Value::Null, Value::Null),
                Chunk::Finish { response: r, calls_streamed, reasoning_streamed } => {
                    let mut delta = json!({});
                    if r.tool_calls.len() > calls_streamed {
                        delta["tool_calls"] = tool_calls(&r.tool_calls[calls_streamed..], calls_streamed);
                    }
                    if r.reasoning.len() > reasoning_streamed && r.reasoning.is_char_boundary(reasoning_streamed) {
                        delta["reasoning_content"] = json!(r.reasoning[reasoning_streamed..]);
                    }
                    (delta, json!(finish_reason(r)), Value::Null)
                }
            };
            json!({"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                   "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}], "usage": null})
        },
    )
    .await
}

/// Tool calls in OpenAI's shape, numbered from `first` (their place among the choice's
/// calls): each whole, with its id, name and arguments (the parser releases a call only once
/// it parses).
fn tool_calls(calls: &[ToolCall], first: usize) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let i = first + k;
                json!({"index": i, "id": format!("call_{i}"), "type": "function",
                       "function": {"name": c.name, "arguments": Value::Object(c.arguments.clone()).to_string()}})
            })
            .collect(),
    )
}

/// A call's arguments (the JSON text of `arguments`) in fragments, one per argument, whose
/// concatenation is the whole text: `{"a":1`, `,"b":2`, `}`.
fn argument_fragments(call: &ToolCall) -> Vec<String> {
    if call.arguments.is_empty() {
        return vec!["{}".to_string()];
    }
    let mut fragments: Vec<String> = call
        .arguments
        .iter()
        .enumerate()
        .map(|(k, (key, value))| format!("{}{}:{}", if k == 0 { "{" } else { "," }, Value::String(key.clone()), value))
        .collect();
    fragments.push("}".to_string());
    fragments
}

/// A token and its alternatives in the chat shape (`{token, logprob, bytes}`).
fn logprob_entry(t: &TokenLogprob) -> Value {
    json!({"token": t.text, "logprob": t.logprob, "bytes": t.text.as_bytes()})
}

/// Chat `logprobs`: `{"content": [...]}` per token, `null` when none were asked for.
fn chat_logprobs(tokens: &[TokenLogprobs]) -> Value {
    if tokens.is_empty() {
        return Value::Null;
    }
    let content: Vec<Value> = tokens
        .iter()
        .map(|l| {
            let mut entry = logprob_entry(&l.token);
            entry["top_logprobs"] = Value::Array(l.top.iter().map(logprob_entry).collect());
            entry
        })
        .collect();
    json!({"content": content})
}

/// Completions `logprobs` (the legacy shape): tokens, their log-probabilities, a map of the
/// alternatives per token and each token's offset in the text; `null` when none were asked
/// for.
fn completion_logprobs(tokens: &[TokenLogprobs], offset: usize) -> Value {
    if tokens.is_empty() {
        return Value::Null;
    }
    let mut at = offset;
    let mut offsets = Vec::with_capacity(tokens.len());
    for l in tokens {
        offsets.push(at);
        at += l.token.text.len();
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|l| Value::Object(l.top.iter().map(|t| (t.text.clone(), json!(t.logprob))).collect()))
        .collect();
    json!({
        "tokens": tokens.iter().map(|l| l.token.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|l| l.token.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

async fn completions(State(state): State<Arc<AppState>>, tenant: Option<Extension<Arc<Tenant>>>, body: Bytes) -> Result<Response, ApiError> {
    let tenant = tenant.map(|Extension(t)| t);
    let body: CompletionBody = request::parse(&body)?;
    let model = find_model(&state, &body.model)?;
    let input = match body.prompt()? {
        Prompt::Text(text) => PromptInput::Text(text),
        Prompt::TokenIds(ids) => PromptInput::TokenIds(ids),
    };
    let (requests, delivery) = engine_requests(&state, &model.info, tenant, &body.sampling, input, None, Vec::new())?;
    respond(
        Arc::clone(&state),
        model,
        requests,
        delivery,
        "cmpl",
        |meta, responses| {
            let choices: Vec<Value> = responses
                .iter()
                .enumerate()
                .map(|(i, r)| json!({"index": i, "text": r.text, "finish_reason": finish_reason(r), "logprobs": completion_logprobs(&r.logprobs, 0)}))
                .collect();
            json!({"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                   "choices": choices, "usage": usage(responses)})
        },
        |meta, i, chunk| {
            let (text, finish, logprobs) = match chunk {
                Chunk::Start => ("", Value::Null, Value::Null),
                Chunk::Token { text, detail, text_before, .. } => (text, Value::Null, completion_logprobs(detail.logprobs.as_slice(), text_before)),
                // Completions carry text only: a call the model wrote is not part of it.
                Chunk::CallStart { .. } | Chunk::CallArguments { .. } => ("", Value::Null, Value::Null),
                Chunk::Finish { response: r, .. } => ("", json!(finish_reason(r)), Value::Null),
            };
            json!({"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                   "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs}], "usage": null})
        },
    )
    .await
}
