//! The binary interface between the host and a plugin `cdylib`.
//!
//! A plugin exports one root module ([`PluginModule`]) through `abi_stable`'s
//! `#[export_root_module]`. The module is a *prefix type*: later ABI minor versions may only
//! append fields after the last one, and a host reading an older plugin sees the missing fields
//! as absent. `abi_stable` checks the layout of every type reachable from the module when the
//! library is loaded; the host then checks [`ABI_MAJOR`].
//!
//! What crosses: JSON documents (the serde types of [`crate::types`]) as `RStr`/`RString`,
//! model handles as `u64`, errors as [`PluginError`], and streamed tokens through a
//! [`TokenSink`] borrowed for the duration of one call. Never tensors, never `std` types.
//!
//! Threading contract: every function may be called from several host threads at once
//! (`infer`, `score`, `generate_text` and `chat_completion` in particular, also on the same
//! model handle); a plugin serialises internally what it must. `cleanup(handle)` is called once
//! no call on that handle is in flight. Every function runs under `catch_unwind` in the plugin;
//! after a panic the plugin answers every later call with [`ErrorKind::Poisoned`].

use abi_stable::{
    StableAbi, declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RResult, RStr, RString},
};
use core::ffi::c_void;
use core::marker::PhantomData;

/// Incompatible changes bump this; the host refuses a plugin with another major version.
pub const ABI_MAJOR: u32 = 1;
/// Appended fields bump this (of the root module, or of the JSON requests, which a plugin
/// built before them would ignore); a host accepts plugins with any minor version and refuses
/// to send a request field to a plugin older than it. 1.5: images (`InferRequest::images`,
/// `ChatMessage::parts`).
pub const ABI_MINOR: u32 = 5;

/// What went wrong, coarsely, so the host can react without parsing messages.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A request, option or configuration was malformed or out of range.
    InvalidInput = 0,
    /// A file could not be read or parsed (config, weights, tokenizer).
    Io = 1,
    /// The model directory is not something this plugin can load.
    Unsupported = 2,
    /// A resource limit refused the operation.
    ResourceLimit = 3,
    /// The model handle is unknown (never loaded, or cleaned up).
    UnknownModel = 4,
    /// The plugin panicked earlier (or just now) and refuses further work.
    Poisoned = 5,
    /// The caller cancelled the request.
    Cancelled = 6,
    /// Anything else that failed inside the plugin.
    Internal = 7,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Io => "i/o",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::ResourceLimit => "resource limit",
            ErrorKind::UnknownModel => "unknown model",
            ErrorKind::Poisoned => "plugin poisoned",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }
}

/// An error crossing the boundary: a kind and a human-readable message.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    pub kind: ErrorKind,
    pub message: RString,
}

impl PluginError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: RString::from(message.into()),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl core::fmt::Display for PluginError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for PluginError {}

pub type PluginResult<T> = RResult<T, PluginError>;

/// Receives streamed tokens during one call. Returning `false` cancels the request.
///
/// Built by the host from a closure that outlives the call ([`TokenSink::from_closure`]); the
/// plugin only calls [`TokenSink::emit`].
#[repr(C)]
#[derive(StableAbi)]
pub struct TokenSink<'a> {
    context: *mut c_void,
    on_token: unsafe extern "C" fn(context: *mut c_void, token_id: u32, text: RStr<'_>) -> bool,
    _borrow: PhantomData<&'a mut ()>,
}

type DynSink<'a> = dyn FnMut(u32, &str) -> bool + 'a;

unsafe extern "C" fn call_closure(context: *mut c_void, token_id: u32, text: RStr<'_>) -> bool {
    // SAFETY: `context` was made in `from_closure` from a `&mut &mut DynSink` that the
    // `TokenSink`'s lifetime keeps alive and exclusively borrowed.
    let closure = unsafe { &mut *(context as *mut &mut DynSink<'_>) };
    // The closure is host code; never let a host panic unwind into the plugin.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| closure(token_id, text.as_str())))
        .unwrap_or(false)
}

unsafe extern "C" fn discard(_context: *mut c_void, _token_id: u32, _text: RStr<'_>) -> bool {
    true
}

impl<'a> TokenSink<'a> {
    /// Wraps `closure`; it receives each new token id with its decoded text delta.
    pub fn from_closure(closure: &'a mut &'a mut DynSink<'a>) -> Self {
        Self {
            context: closure as *mut &mut DynSink<'a> as *mut c_void,
            on_token: call_closure,
            _borrow: PhantomData,
        }
    }

    /// A sink that accepts and drops every token.
    pub fn discard() -> TokenSink<'static> {
        TokenSink {
            context: core::ptr::null_mut(),
            on_token: discard,
            _borrow: PhantomData,
        }
    }

    /// Sends one token; `false` means the receiver asks to stop.
    pub fn emit(&mut self, token_id: u32, text: &str) -> bool {
        // SAFETY: `context` and `on_token` were paired by `from_closure` or `discard`, and
        // `'a` keeps the context alive for as long as this sink exists.
        unsafe { (self.on_token)(self.context, token_id, RStr::from(text)) }
    }
}

/// ABI 1.4: receives streamed tokens with what each carries beside its answer text (reasoning,
/// completed tool calls, log-probabilities) as [`crate::types::TokenDetail`] JSON, empty when
/// the token carries nothing more. Returning `false` cancels the request.
#[repr(C)]
#[derive(StableAbi)]
pub struct TokenEventSink<'a> {
    context: *mut c_void,
    on_token: unsafe extern "C" fn(context: *mut c_void, token_id: u32, text: RStr<'_>, detail_json: RStr<'_>) -> bool,
    _borrow: PhantomData<&'a mut ()>,
}

type DynEventSink<'a> = dyn FnMut(u32, &str, &str) -> bool + 'a;

unsafe extern "C" fn call_event_closure(context: *mut c_void, token_id: u32, text: RStr<'_>, detail_json: RStr<'_>) -> bool {
    // SAFETY: `context` was made in `TokenEventSink::from_closure` from a
    // `&mut &mut DynEventSink` that the sink's lifetime keeps alive and exclusively borrowed.
    let closure = unsafe { &mut *(context as *mut &mut DynEventSink<'_>) };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| closure(token_id, text.as_str(), detail_json.as_str()))).unwrap_or(false)
}

impl<'a> TokenEventSink<'a> {
    /// Wraps `closure`; it receives each new token id, its answer text delta and its detail
    /// JSON (empty: nothing more).
    pub fn from_closure(closure: &'a mut &'a mut DynEventSink<'a>) -> Self {
        Self {
            context: closure as *mut &mut DynEventSink<'a> as *mut c_void,
            on_token: call_event_closure,
            _borrow: PhantomData,
        }
    }

    /// Sends one token; `false` means the receiver asks to stop.
    pub fn emit(&mut self, token_id: u32, text: &str, detail_json: &str) -> bool {
        // SAFETY: `context` and `on_token` were paired by `from_closure`, and `'a` keeps the
        // context alive for as long as this sink exists.
        unsafe { (self.on_token)(self.context, token_id, RStr::from(text), RStr::from(detail_json)) }
    }
}

/// The root module every plugin exports. Fields may only be appended (after `cleanup`),
/// bumping [`ABI_MINOR`]; an appended field is optional (`missing_field(option)`), so a host
/// reads it as `None` from a plugin built before it existed.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// [`ABI_MAJOR`] as the plugin was built.
    pub abi_major: u32,
    /// [`ABI_MINOR`] as the plugin was built.
    pub abi_minor: u32,
    /// JSON [`crate::types::PluginMetadata`].
    pub metadata: extern "C" fn() -> PluginResult<RString>,
    /// Takes a model's HF `config.json` text; JSON [`crate::types::Support`].
    pub supports_config: extern "C" fn(config_json: RStr<'_>) -> PluginResult<RString>,
    /// Takes JSON [`crate::types::PluginSettings`]; called once before anything is loaded.
    pub initialize: extern "C" fn(settings_json: RStr<'_>) -> PluginResult<()>,
    /// Takes a model directory and JSON [`crate::types::LoadOptions`]; JSON
    /// [`crate::types::ModelInfo`] (which carries the handle).
    pub load_model: extern "C" fn(model_dir: RStr<'_>, options_json: RStr<'_>) -> PluginResult<RString>,
    /// Takes JSON [`crate::types::InferRequest`]; streams tokens to `sink`; JSON
    /// [`crate::types::InferResponse`].
    pub infer: extern "C" fn(model: u64, request_json: RStr<'_>, sink: TokenSink<'_>) -> PluginResult<RString>,
    /// Takes JSON [`crate::types::GenerateTextRequest`]; JSON [`crate::types::InferResponse`].
    pub generate_text: extern "C" fn(model: u64, request_json: RStr<'_>, sink: TokenSink<'_>) -> PluginResult<RString>,
    /// Takes JSON [`crate::types::ChatRequest`]; JSON [`crate::types::InferResponse`].
    pub chat_completion: extern "C" fn(model: u64, request_json: RStr<'_>, sink: TokenSink<'_>) -> PluginResult<RString>,
    /// Takes JSON [`crate::types::ScoreRequest`]; JSON [`crate::types::ScoreResponse`].
    pub score: extern "C" fn(model: u64, request_json: RStr<'_>) -> PluginResult<RString>,
    /// Takes JSON [`crate::types::ConfigUpdate`]; JSON [`crate::types::UpdateOutcome`].
    pub update_config: extern "C" fn(update_json: RStr<'_>) -> PluginResult<RString>,
    /// Frees a loaded model and its device memory.
    #[sabi(last_prefix_field)]
    pub cleanup: extern "C" fn(model: u64) -> PluginResult<()>,
    /// ABI 1.1. Takes JSON [`crate::types::BatchInferRequest`] and runs its requests together
    /// as one batch (one forward pass per step for all rows); not streamed. JSON
    /// [`crate::types::BatchInferResponse`]. Absent from 1.0 plugins: the host then runs the
    /// requests one after another through `infer`.
    #[sabi(missing_field(option))]
    pub infer_batch: extern "C" fn(model: u64, request_json: RStr<'_>) -> PluginResult<RString>,
    /// ABI 1.2: the model's scheduler counters ([`crate::types::SchedulerStats`] as JSON).
    #[sabi(missing_field(option))]
    pub stats: extern "C" fn(model: u64) -> PluginResult<RString>,
    /// ABI 1.4: `infer` whose sink also receives each token's [`crate::types::TokenDetail`]
    /// (streamed reasoning and tool calls, log-probabilities). Absent from older plugins: the
    /// host then calls `infer` and refuses the 1.4 request fields (`logprobs`, `constraint`).
    #[sabi(missing_field(option))]
    pub infer_events: extern "C" fn(model: u64, request_json: RStr<'_>, sink: TokenEventSink<'_>) -> PluginResult<RString>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "inference_pio_plugin";
    const NAME: &'static str = "inference_pio_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
