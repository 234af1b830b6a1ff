//! Plugin-side glue: implement [`Plugin`] and call [`export_plugin!`]; the macro builds the
//! root module, turns JSON into typed values and back, and runs every call under
//! `catch_unwind`. After a panic the plugin is *poisoned*: every later call answers
//! [`ErrorKind::Poisoned`], because its state can no longer be trusted.

use crate::abi::{ErrorKind, PluginError, PluginResult, TokenEventSink, TokenSink};
use crate::types::{
    BatchInferRequest, BatchInferResponse, ChatRequest, ConfigUpdate, GenerateTextRequest, InferRequest, InferResponse, LoadOptions,
    ModelInfo, PluginMetadata, PluginSettings, PromptInput, ScoreRequest, SchedulerStats, ScoreResponse, Support,
    Timings, TokenDetail, UpdateOutcome,
};
use abi_stable::std_types::{RResult, RStr, RString};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Streams generated tokens (id, answer text delta, what else the token carries); returns
/// `false` to cancel.
pub type TokenCallback<'a> = dyn FnMut(u32, &str, &TokenDetail) -> bool + 'a;

/// What a plugin implements. See [`crate::abi`] for the threading contract: all methods may be
/// called concurrently.
pub trait Plugin: Send + Sync + 'static {
    fn metadata(&self) -> PluginMetadata;
    /// Whether a model with this HF `config.json` can be loaded, and if not, why.
    fn supports_config(&self, config: &serde_json::Value) -> Support;
    fn initialize(&self, settings: PluginSettings) -> Result<(), PluginError>;
    fn load_model(&self, model_dir: &Path, options: LoadOptions) -> Result<ModelInfo, PluginError>;
    fn infer(
        &self,
        model: u64,
        request: InferRequest,
        on_token: &mut TokenCallback<'_>,
    ) -> Result<InferResponse, PluginError>;
    fn score(&self, model: u64, request: ScoreRequest) -> Result<ScoreResponse, PluginError>;
    fn update_config(&self, update: ConfigUpdate) -> Result<UpdateOutcome, PluginError>;
    fn cleanup(&self, model: u64) -> Result<(), PluginError>;

    /// Several requests as one batch. This default runs them one after another through
    /// [`Plugin::infer`] (same results, no batching); plugins that batch override it.
    fn infer_batch(&self, model: u64, request: BatchInferRequest) -> Result<BatchInferResponse, PluginError> {
        infer_one_by_one(request.requests, |one| self.infer(model, one, &mut |_, _, _| true))
    }

    /// The model's scheduler counters (ABI 1.2). This default: unsupported.
    fn stats(&self, model: u64) -> Result<SchedulerStats, PluginError> {
        let _ = model;
        Err(PluginError::new(ErrorKind::Unsupported, "this plugin keeps no scheduler counters"))
    }

    /// A plain prompt, no chat template.
    fn generate_text(
        &self,
        model: u64,
        request: GenerateTextRequest,
        on_token: &mut TokenCallback<'_>,
    ) -> Result<InferResponse, PluginError> {
        let request = InferRequest {
            input: PromptInput::Text(request.prompt),
            sampling: request.sampling,
            stop: request.stop,
            cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new(),
        };
        self.infer(model, request, on_token)
    }

    /// A conversation through the model's chat template.
    fn chat_completion(
        &self,
        model: u64,
        request: ChatRequest,
        on_token: &mut TokenCallback<'_>,
    ) -> Result<InferResponse, PluginError> {
        let request = InferRequest {
            input: PromptInput::Chat {
                messages: request.messages,
                tools: request.tools,
            },
            sampling: request.sampling,
            stop: request.stop,
            cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new(),
        };
        self.infer(model, request, on_token)
    }
}

/// A batch run as single requests, one after another (a plugin without batching, or a host
/// talking to a plugin older than `infer_batch`).
pub fn infer_one_by_one<R>(
    requests: impl IntoIterator<Item = R>,
    mut infer: impl FnMut(R) -> Result<InferResponse, PluginError>,
) -> Result<BatchInferResponse, PluginError> {
    let responses = requests.into_iter().map(&mut infer).collect::<Result<Vec<_>, _>>()?;
    Ok(BatchInferResponse { timings: sequential_timings(&responses), responses })
}

/// Timings of requests that ran one after another: counts and times add up, rates are
/// tokens over the summed times.
pub fn sequential_timings(responses: &[InferResponse]) -> Timings {
    let mut t = Timings::default();
    let mut decode_s = 0.0;
    for r in responses {
        let x = &r.timings;
        t.prompt_tokens += x.prompt_tokens;
        t.generated_tokens += x.generated_tokens;
        t.time_to_first_token_s += x.time_to_first_token_s;
        t.total_s += x.total_s;
        decode_s += (x.total_s - x.time_to_first_token_s).max(0.0);
    }
    let rate = |tokens: u64, s: f64| if s > 0.0 { tokens as f64 / s } else { 0.0 };
    t.prefill_tokens_per_s = rate(t.prompt_tokens, t.time_to_first_token_s);
    let decoded = t.generated_tokens.saturating_sub(responses.len() as u64);
    t.decode_tokens_per_s = rate(decoded, decode_s);
    t.steady_decode_tokens_per_s = t.decode_tokens_per_s;
    t
}

/// Per-library state behind the exported functions. Not for direct use: [`export_plugin!`]
/// declares one.
pub struct Exported<P: Plugin> {
    plugin: std::sync::OnceLock<P>,
    make: fn() -> P,
    poisoned: AtomicBool,
}

fn decode<T: DeserializeOwned>(what: &str, json: RStr<'_>) -> Result<T, PluginError> {
    serde_json::from_str(json.as_str())
        .map_err(|e| PluginError::invalid(format!("malformed {what} JSON: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<RString, PluginError> {
    serde_json::to_string(value)
        .map(RString::from)
        .map_err(|e| PluginError::internal(format!("cannot encode response: {e}")))
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

impl<P: Plugin> Exported<P> {
    pub const fn new(make: fn() -> P) -> Self {
        Self {
            plugin: std::sync::OnceLock::new(),
            make,
            poisoned: AtomicBool::new(false),
        }
    }

    /// Runs `f` on the plugin, catching panics and poisoning on one.
    pub fn call<T>(&self, f: impl FnOnce(&P) -> Result<T, PluginError>) -> PluginResult<T> {
        if self.poisoned.load(Ordering::SeqCst) {
            return RResult::RErr(PluginError::new(
                ErrorKind::Poisoned,
                "the plugin panicked earlier and refuses further calls",
            ));
        }
        let result = catch_unwind(AssertUnwindSafe(|| f(self.plugin.get_or_init(self.make))));
        match result {
            Ok(Ok(value)) => RResult::ROk(value),
            Ok(Err(e)) => RResult::RErr(e),
            Err(payload) => {
                self.poisoned.store(true, Ordering::SeqCst);
                RResult::RErr(PluginError::new(
                    ErrorKind::Poisoned,
                    format!("plugin panicked: {}", panic_message(payload.as_ref())),
                ))
            }
        }
    }

    pub fn metadata(&self) -> PluginResult<RString> {
        self.call(|p| encode(&p.metadata()))
    }
    pub fn supports_config(&self, config_json: RStr<'_>) -> PluginResult<RString> {
        self.call(|p| {
            let config: serde_json::Value = decode("config.json", config_json)?;
            encode(&p.supports_config(&config))
        })
    }
    pub fn initialize(&self, settings_json: RStr<'_>) -> PluginResult<()> {
        self.call(|p| p.initialize(decode("settings", settings_json)?))
    }
    pub fn load_model(&self, model_dir: RStr<'_>, options_json: RStr<'_>) -> PluginResult<RString> {
        self.call(|p| {
            let info = p.load_model(Path::new(model_dir.as_str()), decode("load options", options_json)?)?;
            encode(&info)
        })
    }
    fn streaming<R: DeserializeOwned>(
        &self,
        what: &str,
        request_json: RStr<'_>,
        mut sink: TokenSink<'_>,
        run: impl FnOnce(&P, R, &mut TokenCallback<'_>) -> Result<InferResponse, PluginError>,
    ) -> PluginResult<RString> {
        self.call(|p| {
            let request = decode(what, request_json)?;
            let mut on_token = |id: u32, text: &str, _: &TokenDetail| sink.emit(id, text);
            encode(&run(p, request, &mut on_token)?)
        })
    }
    pub fn infer_events(&self, model: u64, request_json: RStr<'_>, mut sink: TokenEventSink<'_>) -> PluginResult<RString> {
        self.call(|p| {
            let request = decode("infer request", request_json)?;
            let mut on_token = |id: u32, text: &str, detail: &TokenDetail| {
                let json = if detail.is_empty() { String::new() } else { serde_json::to_string(detail).unwrap_or_default() };
                sink.emit(id, text, &json)
            };
            encode(&p.infer(model, request, &mut on_token)?)
        })
    }
    pub fn infer(&self, model: u64, request_json: RStr<'_>, sink: TokenSink<'_>) -> PluginResult<RString> {
        self.streaming("infer request", request_json, sink, |p, r, cb| p.infer(model, r, cb))
    }
    pub fn generate_text(&self, model: u64, request_json: RStr<'_>, sink: TokenSink<'_>) -> PluginResult<RString> {
        self.streaming("generate_text request", request_json, sink, |p, r, cb| {
            p.generate_text(model, r, cb)
        })
    }
    pub fn chat_completion(&self, model: u64, request_json: RStr<'_>, sink: TokenSink<'_>) -> PluginResult<RString> {
        self.streaming("chat request", request_json, sink, |p, r, cb| {
            p.chat_completion(model, r, cb)
        })
    }
    pub fn infer_batch(&self, model: u64, request_json: RStr<'_>) -> PluginResult<RString> {
        self.call(|p| {
            let request: BatchInferRequest = decode("batch request", request_json)?;
            request.validate().map_err(PluginError::invalid)?;
            encode(&p.infer_batch(model, request)?)
        })
    }
    pub fn stats(&self, model: u64) -> PluginResult<RString> {
        self.call(|p| encode(&p.stats(model)?))
    }
    pub fn score(&self, model: u64, request_json: RStr<'_>) -> PluginResult<RString> {
        self.call(|p| encode(&p.score(model, decode("score request", request_json)?)?))
    }
    pub fn update_config(&self, update_json: RStr<'_>) -> PluginResult<RString> {
        self.call(|p| encode(&p.update_config(decode("config update", update_json)?)?))
    }
    pub fn cleanup(&self, model: u64) -> PluginResult<()> {
        self.call(|p| p.cleanup(model))
    }
}

/// The ELF section holding a plugin's declaration ([`plugin_note`]).
pub const NOTE_SECTION: &str = ".inference_pio";
/// First bytes of a declaration.
pub const NOTE_MAGIC: [u8; 8] = *b"PIO-PLG\0";
/// The longest plugin id a declaration holds.
pub const NOTE_MAX_ID: usize = 64;
/// Bytes of a declaration: magic, ABI major and minor (u32 little-endian), id length (u32),
/// the id padded with zeros.
pub const NOTE_LEN: usize = 8 + 12 + NOTE_MAX_ID;

/// The plugin's declaration, which [`export_plugin!`]`(id = "...", ...)` stores in the
/// [`NOTE_SECTION`] section of the library: the host reads it from the file without loading
/// it, so that a pinned sha256 is checked before any of the library's code runs (loading a
/// library runs its constructors). Evaluated at compile time; an id longer than
/// [`NOTE_MAX_ID`] bytes fails the build.
pub const fn plugin_note(id: &str) -> [u8; NOTE_LEN] {
    let id = id.as_bytes();
    assert!(!id.is_empty() && id.len() <= NOTE_MAX_ID, "a plugin id has 1 to 64 bytes");
    let mut out = [0u8; NOTE_LEN];
    let mut i = 0;
    while i < 8 {
        out[i] = NOTE_MAGIC[i];
        i += 1;
    }
    let fields = [crate::abi::ABI_MAJOR, crate::abi::ABI_MINOR, id.len() as u32];
    let mut f = 0;
    while f < 3 {
        let bytes = fields[f].to_le_bytes();
        let mut b = 0;
        while b < 4 {
            out[8 + 4 * f + b] = bytes[b];
            b += 1;
        }
        f += 1;
    }
    let mut i = 0;
    while i < id.len() {
        out[20 + i] = id[i];
        i += 1;
    }
    out
}

/// A declaration read back: (ABI major, ABI minor, plugin id).
pub fn parse_plugin_note(bytes: &[u8]) -> Result<(u32, u32, String), String> {
    if bytes.len() < NOTE_LEN || bytes[..8] != NOTE_MAGIC {
        return Err(format!("the {NOTE_SECTION} section is not a plugin declaration"));
    }
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let len = word(16) as usize;
    if len == 0 || len > NOTE_MAX_ID {
        return Err(format!("the {NOTE_SECTION} section declares an id of {len} bytes"));
    }
    let id = std::str::from_utf8(&bytes[20..20 + len]).map_err(|_| format!("the {NOTE_SECTION} section's id is not UTF-8"))?;
    Ok((word(8), word(12), id.to_string()))
}

/// Exports a [`Plugin`] as this library's root module. `$make` is a `fn() -> P` that builds
/// the plugin on first use. With `id = "..."` (the id its metadata answers) the library also
/// carries its declaration ([`plugin_note`]), so the host can check a pinned sha256 before
/// loading it.
///
/// ```ignore
/// inference_pio_core::export_plugin!(id = "my-model", MyPlugin, MyPlugin::new);
/// ```
#[macro_export]
macro_rules! export_plugin {
    (id = $id:expr, $plugin:ty, $make:expr) => {
        // SAFETY: a plain byte array in its own section; nothing refers to it by address, and
        // no other item of this library uses that section name.
        #[cfg_attr(target_os = "linux", unsafe(link_section = ".inference_pio"))]
        #[used]
        static __INFERENCE_PIO_NOTE: [u8; $crate::export::NOTE_LEN] = $crate::export::plugin_note($id);
        $crate::export_plugin!($plugin, $make);
    };
    ($plugin:ty, $make:expr) => {
        static __INFERENCE_PIO_EXPORTED: $crate::export::Exported<$plugin> =
            $crate::export::Exported::new($make);

        mod __inference_pio_exports {
            use super::__INFERENCE_PIO_EXPORTED as E;
            use $crate::__abi_stable::std_types::{RStr, RString};
            use $crate::abi::{PluginResult, TokenEventSink, TokenSink};

            pub extern "C" fn metadata() -> PluginResult<RString> { E.metadata() }
            pub extern "C" fn supports_config(c: RStr<'_>) -> PluginResult<RString> { E.supports_config(c) }
            pub extern "C" fn initialize(s: RStr<'_>) -> PluginResult<()> { E.initialize(s) }
            pub extern "C" fn load_model(d: RStr<'_>, o: RStr<'_>) -> PluginResult<RString> { E.load_model(d, o) }
            pub extern "C" fn infer(m: u64, r: RStr<'_>, s: TokenSink<'_>) -> PluginResult<RString> { E.infer(m, r, s) }
            pub extern "C" fn generate_text(m: u64, r: RStr<'_>, s: TokenSink<'_>) -> PluginResult<RString> { E.generate_text(m, r, s) }
            pub extern "C" fn chat_completion(m: u64, r: RStr<'_>, s: TokenSink<'_>) -> PluginResult<RString> { E.chat_completion(m, r, s) }
            pub extern "C" fn score(m: u64, r: RStr<'_>) -> PluginResult<RString> { E.score(m, r) }
            pub extern "C" fn update_config(u: RStr<'_>) -> PluginResult<RString> { E.update_config(u) }
            pub extern "C" fn cleanup(m: u64) -> PluginResult<()> { E.cleanup(m) }
            pub extern "C" fn infer_batch(m: u64, r: RStr<'_>) -> PluginResult<RString> { E.infer_batch(m, r) }
            pub extern "C" fn stats(m: u64) -> PluginResult<RString> { E.stats(m) }
            pub extern "C" fn infer_events(m: u64, r: RStr<'_>, s: TokenEventSink<'_>) -> PluginResult<RString> { E.infer_events(m, r, s) }

            #[$crate::__abi_stable::export_root_module]
            pub fn inference_pio_root_module() -> $crate::abi::PluginModuleRef {
                use $crate::__abi_stable::prefix_type::PrefixTypeTrait;
                $crate::abi::PluginModule {
                    abi_major: $crate::abi::ABI_MAJOR,
                    abi_minor: $crate::abi::ABI_MINOR,
                    metadata,
                    supports_config,
                    initialize,
                    load_model,
                    infer,
                    generate_text,
                    chat_completion,
                    score,
                    update_config,
                    cleanup,
                    infer_batch,
                    stats,
                    infer_events,
                }
                .leak_into_prefix()
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(prompt: u64, generated: u64, ttft: f64, total: f64) -> InferResponse {
        InferResponse {
            prompt_token_ids: vec![],
            token_ids: vec![],
            text: String::new(),
            reasoning: String::new(),
            tool_calls: vec![],
            finish_reason: crate::types::FinishReason::Length,
            timings: Timings { prompt_tokens: prompt, generated_tokens: generated, time_to_first_token_s: ttft, total_s: total, ..Timings::default() },
            logprobs: vec![],
        }
    }

    #[test]
    fn one_by_one_batches_add_up_and_batch_sizes_are_checked() {
        let batch = infer_one_by_one([(10, 5, 1.0, 3.0), (30, 9, 1.0, 5.0)], |(p, g, t, s)| Ok(response(p, g, t, s))).expect("batch");
        assert_eq!(batch.responses.len(), 2);
        let t = &batch.timings;
        assert_eq!((t.prompt_tokens, t.generated_tokens), (40, 14));
        assert_eq!((t.time_to_first_token_s, t.total_s), (2.0, 8.0));
        assert_eq!(t.prefill_tokens_per_s, 20.0);
        // 14 tokens, of which the first of each request came with its prefill: 12 over 6 s.
        assert_eq!(t.decode_tokens_per_s, 2.0);
        let failed = infer_one_by_one([1, 2, 3], |i| if i == 2 { Err(PluginError::invalid("row two")) } else { Ok(response(1, 1, 1.0, 1.0)) });
        assert_eq!(failed.expect_err("fails").message.as_str(), "row two");

        let request = |n| crate::types::BatchInferRequest {
            requests: vec![crate::types::InferRequest { input: PromptInput::TokenIds(vec![1]), sampling: Default::default(), stop: vec![], cache_salt: String::new(), logprobs: None, constraint: None, images: Vec::new() }; n],
        };
        assert!(request(0).validate().expect_err("empty").contains("at least one"));
        assert!(request(1).validate().is_ok() && request(crate::types::MAX_BATCH_REQUESTS).validate().is_ok());
        assert!(request(257).validate().expect_err("too many").contains("257 requests"));
    }

    #[test]
    fn a_declaration_reads_back_and_junk_is_refused() {
        let note = plugin_note("qwen3-coder-30b");
        let (major, minor, id) = parse_plugin_note(&note).expect("valid");
        assert_eq!((major, minor, id.as_str()), (crate::abi::ABI_MAJOR, crate::abi::ABI_MINOR, "qwen3-coder-30b"));
        assert!(parse_plugin_note(&note[..10]).is_err());
        let mut bad = note;
        bad[0] = b'X';
        assert!(parse_plugin_note(&bad).expect_err("bad magic").contains("not a plugin declaration"));
        let mut long = note;
        long[16] = 200;
        assert!(parse_plugin_note(&long).expect_err("too long").contains("200 bytes"));
    }
}
