//! A plugin library loaded into this process, behind a safe, typed wrapper.
//!
//! Loading goes through `abi_stable` (`lib_header_from_path` + `init_root_module`), which
//! checks the library's abi_stable version and the layout of every type in the root module;
//! then [`ABI_MAJOR`] is compared. Libraries are never unloaded. A plugin that answers
//! [`ErrorKind::Poisoned`] once (it panicked) is marked unusable and not called again.

use abi_stable::library::{LibraryError, RootModule, lib_header_from_path};
use abi_stable::std_types::{RResult, RStr, RString};
use inference_pio_core::abi::{ABI_MAJOR, ErrorKind, PluginError, PluginModuleRef, PluginResult, TokenEventSink, TokenSink};
use inference_pio_core::export::TokenCallback;
use inference_pio_core::types::{
    BatchInferRequest, BatchInferResponse, ChatRequest, ConfigUpdate, GenerateTextRequest, InferRequest, InferResponse, LoadOptions, ModelInfo, PluginMetadata,
    PluginSettings, SchedulerStats, ScoreRequest, ScoreResponse, Support, TokenDetail, UpdateOutcome,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// A loaded plugin library.
pub struct LoadedPlugin {
    path: PathBuf,
    module: PluginModuleRef,
    unusable: AtomicBool,
}

/// Why a file is not a usable plugin, in one line.
pub fn describe_load_error(error: &LibraryError) -> String {
    let one_line = |s: String| s.split_whitespace().collect::<Vec<_>>().join(" ");
    match error {
        LibraryError::OpenError { err, .. } => one_line(format!("cannot be loaded as a shared library: {err}")),
        LibraryError::GetSymbolError { .. } => {
            "not an Inference-PIO plugin: it exports no abi_stable root module".to_string()
        }
        LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => format!(
            "incompatible plugin interface version: the host expects {expected_version}, the plugin was built against {actual_version}"
        ),
        LibraryError::AbiInstability(e) => {
            let text = one_line(e.to_string());
            let short: String = text.chars().take(300).collect();
            format!("fails the abi_stable layout check: {short}")
        }
        other => one_line(format!("cannot load plugin: {other}")),
    }
}

impl LoadedPlugin {
    /// Loads `path` and checks it. Runs the library's initialisers in this process: use
    /// [`crate::discovery`] (a separate process) for files that have not been probed.
    pub fn open(path: &Path) -> Result<Self, String> {
        let header = lib_header_from_path(path).map_err(|e| describe_load_error(&e))?;
        let module = header
            .init_root_module::<PluginModuleRef>()
            .map_err(|e| describe_load_error(&e))?;
        let major = module.abi_major();
        if major != ABI_MAJOR {
            return Err(format!(
                "ABI major version {major}, this host speaks {ABI_MAJOR}; rebuild the plugin against inference-pio-core {}",
                PluginModuleRef::VERSION_STRINGS.version
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            module,
            unusable: AtomicBool::new(false),
        })
    }

    /// [`LoadedPlugin::open`], with the file's sha256 checked first when one is pinned: the
    /// library is hashed through an open descriptor and loaded through that same descriptor
    /// (`/proc/self/fd/N`), so a file swapped at its path after the check is not the one
    /// loaded. The descriptor stays open for the process's life.
    pub fn open_pinned(path: &Path, sha256: Option<&str>) -> Result<Self, String> {
        use std::os::fd::AsRawFd;
        let Some(expected) = sha256 else { return Self::open(path) };
        let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        crate::digest::check_digest(path, &crate::digest::sha256_of(&mut file, path)?, expected)?;
        let mut plugin = Self::open(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))?;
        plugin.path = path.to_path_buf();
        // Libraries are never unloaded: keeping the descriptor open means its number, and so
        // the name the library was opened under, is never reused.
        std::mem::forget(file);
        Ok(plugin)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_usable(&self) -> bool {
        !self.unusable.load(Ordering::SeqCst)
    }

    fn check<T>(&self, result: RResult<T, PluginError>) -> Result<T, PluginError> {
        match result {
            RResult::ROk(v) => Ok(v),
            RResult::RErr(e) => {
                if e.kind == ErrorKind::Poisoned {
                    self.unusable.store(true, Ordering::SeqCst);
                }
                Err(e)
            }
        }
    }

    fn guard(&self) -> Result<(), PluginError> {
        if self.is_usable() {
            Ok(())
        } else {
            Err(PluginError::new(
                ErrorKind::Poisoned,
                format!("plugin {} is marked unusable after a panic", self.path.display()),
            ))
        }
    }

    /// A plugin built before ABI 1.3 would ignore a request's prefix-cache salt (and share
    /// one tenant's cached prompts with another), one before 1.5 its images: such requests
    /// are refused, not sent.
    fn check_request_fields(&self, requests: &[InferRequest]) -> Result<(), PluginError> {
        let minor = self.module.abi_minor();
        if minor < 3 && requests.iter().any(|r| !r.cache_salt.is_empty()) {
            return Err(PluginError::new(
                ErrorKind::Unsupported,
                format!("plugin {} predates ABI 1.3 (it is 1.{minor}) and cannot keep tenants' prefix caches apart; rebuild it", self.path.display()),
            ));
        }
        if minor < 5 && requests.iter().any(|r| !r.images.is_empty()) {
            return Err(PluginError::new(
                ErrorKind::Unsupported,
                format!("plugin {} predates ABI 1.5 (it is 1.{minor}) and cannot take images; rebuild it", self.path.display()),
            ));
        }
        Ok(())
    }

    fn json<T: DeserializeOwned>(&self, text: RString) -> Result<T, PluginError> {
        serde_json::from_str(text.as_str()).map_err(|e| {
            PluginError::internal(format!("plugin {} returned malformed JSON: {e}", self.path.display()))
        })
    }

    fn to_json<T: Serialize>(value: &T) -> Result<String, PluginError> {
        serde_json::to_string(value).map_err(|e| PluginError::internal(e.to_string()))
    }

    pub fn metadata(&self) -> Result<PluginMetadata, PluginError> {
        self.guard()?;
        let text = self.check((self.module.metadata())())?;
        self.json(text)
    }

    pub fn supports_config(&self, config_json: &str) -> Result<Support, PluginError> {
        self.guard()?;
        let text = self.check((self.module.supports_config())(RStr::from(config_json)))?;
        self.json(text)
    }

    pub fn initialize(&self, settings: &PluginSettings) -> Result<(), PluginError> {
        self.guard()?;
        let json = Self::to_json(settings)?;
        self.check((self.module.initialize())(RStr::from(json.as_str())))
    }

    pub fn load_model(&self, dir: &Path, options: &LoadOptions) -> Result<ModelInfo, PluginError> {
        self.guard()?;
        let dir = dir.to_str().ok_or_else(|| {
            PluginError::invalid(format!("model path {} is not valid UTF-8", dir.display()))
        })?;
        let json = Self::to_json(options)?;
        let text = self.check((self.module.load_model())(RStr::from(dir), RStr::from(json.as_str())))?;
        self.json(text)
    }

    /// Runs a request; `on_token` gets each new token, its text delta and what else it
    /// carries (ABI 1.4 `infer_events`; from an older plugin, nothing), and returns `false` to
    /// cancel. A request asking for 1.4 features (log-probabilities, an output constraint) is
    /// refused for an older plugin, which would ignore them.
    pub fn infer(&self, model: u64, request: &InferRequest, on_token: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        self.guard()?;
        self.check_request_fields(std::slice::from_ref(request))?;
        let json = Self::to_json(request)?;
        let Some(infer_events) = self.module.infer_events() else {
            let minor = self.module.abi_minor();
            let wanted = [(request.logprobs.is_some(), "log-probabilities"), (request.constraint.is_some(), "constrained decoding (response_format)")];
            if let Some((_, what)) = wanted.iter().find(|(on, _)| *on) {
                return Err(PluginError::new(
                    ErrorKind::Unsupported,
                    format!("plugin {} predates ABI 1.4 (it is 1.{minor}) and cannot do {what}; rebuild it", self.path.display()),
                ));
            }
            return self.streamed(self.module.infer(), model, &json, on_token);
        };
        let bad_detail = std::cell::RefCell::new(None);
        let mut events = |id: u32, text: &str, detail: &str| {
            if detail.is_empty() {
                return on_token(id, text, &TokenDetail::default());
            }
            match serde_json::from_str::<TokenDetail>(detail) {
                Ok(d) => on_token(id, text, &d),
                Err(e) => {
                    *bad_detail.borrow_mut() = Some(e.to_string());
                    false
                }
            }
        };
        let mut callback: &mut dyn FnMut(u32, &str, &str) -> bool = &mut events;
        let sink = TokenEventSink::from_closure(&mut callback);
        let text = self.check(infer_events(model, RStr::from(json.as_str()), sink))?;
        if let Some(e) = bad_detail.take() {
            return Err(PluginError::internal(format!("plugin {} streamed a malformed token detail: {e}", self.path.display())));
        }
        self.json(text)
    }

    /// The ABI's `generate_text` (a plain prompt, no chat template), streamed (text only: the
    /// entry point predates token details).
    pub fn generate_text(&self, model: u64, request: &GenerateTextRequest, on_token: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        self.guard()?;
        self.streamed(self.module.generate_text(), model, &Self::to_json(request)?, on_token)
    }

    /// The ABI's `chat_completion` (messages through the model's chat template), streamed.
    pub fn chat_completion(&self, model: u64, request: &ChatRequest, on_token: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        self.guard()?;
        self.streamed(self.module.chat_completion(), model, &Self::to_json(request)?, on_token)
    }

    /// Calls one of the text-only streaming entry points (`infer` before 1.4, `generate_text`,
    /// `chat_completion`) with `json`; its tokens reach `on_token` with no detail.
    fn streamed(
        &self,
        entry: extern "C" fn(u64, RStr<'_>, TokenSink<'_>) -> PluginResult<RString>,
        model: u64,
        json: &str,
        on_token: &mut TokenCallback<'_>,
    ) -> Result<InferResponse, PluginError> {
        let mut plain = |id: u32, text: &str| on_token(id, text, &TokenDetail::default());
        let mut callback: &mut dyn FnMut(u32, &str) -> bool = &mut plain;
        let sink = TokenSink::from_closure(&mut callback);
        let text = self.check(entry(model, RStr::from(json), sink))?;
        self.json(text)
    }

    /// Runs several requests as one batch (not streamed). A plugin built before ABI 1.1 has
    /// no `infer_batch`: its requests then run one after another through `infer`.
    pub fn infer_batch(&self, model: u64, request: &BatchInferRequest) -> Result<BatchInferResponse, PluginError> {
        self.guard()?;
        request.validate().map_err(PluginError::invalid)?;
        self.check_request_fields(&request.requests)?;
        match self.module.infer_batch() {
            Some(infer_batch) => {
                let json = Self::to_json(request)?;
                let text = self.check(infer_batch(model, RStr::from(json.as_str())))?;
                let response: BatchInferResponse = self.json(text)?;
                if response.responses.len() != request.requests.len() {
                    return Err(PluginError::internal(format!(
                        "plugin {} answered {} of a batch of {} requests",
                        self.path.display(),
                        response.responses.len(),
                        request.requests.len()
                    )));
                }
                Ok(response)
            }
            None => inference_pio_core::export::infer_one_by_one(&request.requests, |one| self.infer(model, one, &mut |_, _, _| true)),
        }
    }

    /// The model's scheduler counters; a plugin built before ABI 1.2 has none (an
    /// `unsupported` error saying so).
    pub fn stats(&self, model: u64) -> Result<SchedulerStats, PluginError> {
        self.guard()?;
        match self.module.stats() {
            Some(stats) => {
                let text = self.check(stats(model))?;
                self.json(text)
            }
            None => Err(PluginError::new(
                inference_pio_core::abi::ErrorKind::Unsupported,
                format!("plugin {} predates ABI 1.2 and reports no scheduler counters", self.path.display()),
            )),
        }
    }

    pub fn score(&self, model: u64, request: &ScoreRequest) -> Result<ScoreResponse, PluginError> {
        self.guard()?;
        let json = Self::to_json(request)?;
        let text = self.check((self.module.score())(model, RStr::from(json.as_str())))?;
        self.json(text)
    }

    pub fn update_config(&self, update: &ConfigUpdate) -> Result<UpdateOutcome, PluginError> {
        self.guard()?;
        let json = Self::to_json(update)?;
        let text = self.check((self.module.update_config())(RStr::from(json.as_str())))?;
        self.json(text)
    }

    pub fn cleanup(&self, model: u64) -> Result<(), PluginError> {
        self.guard()?;
        self.check((self.module.cleanup())(model))
    }
}
