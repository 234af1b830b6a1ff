//! One plugin as the commands use it, whatever its security level: in this process (`low`,
//! `medium`) or in a supervised worker process (`high`, `maximum`). Same calls, same errors.

use crate::plugin::LoadedPlugin;
use crate::worker::{Enforcement, WorkerPlugin};
use inference_pio_core::abi::PluginError;
use inference_pio_core::export::TokenCallback;
use inference_pio_core::types::{
    BatchInferRequest, BatchInferResponse, ChatRequest, ConfigUpdate, GenerateTextRequest, InferRequest, InferResponse, LoadOptions, ModelInfo, PluginMetadata, PluginSettings,
    SchedulerStats, ScoreRequest, ScoreResponse, Support, UpdateOutcome,
};
use std::path::Path;

/// A plugin in this process or in a worker.
pub enum PluginHandle {
    InProcess(LoadedPlugin),
    Worker(Box<WorkerPlugin>),
}

macro_rules! both {
    ($self:ident, $p:ident => $e:expr) => {
        match $self {
            PluginHandle::InProcess($p) => $e,
            PluginHandle::Worker($p) => $e,
        }
    };
}

impl PluginHandle {
    /// In-process plugins stay unusable after a panic; a worker is restarted instead.
    pub fn is_usable(&self) -> bool {
        match self {
            PluginHandle::InProcess(p) => p.is_usable(),
            PluginHandle::Worker(_) => true,
        }
    }

    /// The worker's mechanisms in force (`None` in-process).
    pub fn enforcement(&self) -> Option<Enforcement> {
        match self {
            PluginHandle::InProcess(_) => None,
            PluginHandle::Worker(w) => w.enforcement(),
        }
    }

    pub fn metadata(&self) -> Result<PluginMetadata, PluginError> {
        both!(self, p => p.metadata())
    }
    pub fn supports_config(&self, config_json: &str) -> Result<Support, PluginError> {
        both!(self, p => p.supports_config(config_json))
    }
    pub fn initialize(&self, settings: &PluginSettings) -> Result<(), PluginError> {
        both!(self, p => p.initialize(settings))
    }
    pub fn load_model(&self, dir: &Path, options: &LoadOptions) -> Result<ModelInfo, PluginError> {
        both!(self, p => p.load_model(dir, options))
    }
    pub fn infer(&self, model: u64, request: &InferRequest, on_token: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        both!(self, p => p.infer(model, request, on_token))
    }
    /// The ABI's `generate_text`: a plain prompt, streamed.
    pub fn generate_text(&self, model: u64, request: &GenerateTextRequest, on_token: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        both!(self, p => p.generate_text(model, request, on_token))
    }
    /// The ABI's `chat_completion`: messages through the chat template, streamed.
    pub fn chat_completion(&self, model: u64, request: &ChatRequest, on_token: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        both!(self, p => p.chat_completion(model, request, on_token))
    }
    /// Several requests as one batch, not streamed.
    pub fn infer_batch(&self, model: u64, request: &BatchInferRequest) -> Result<BatchInferResponse, PluginError> {
        both!(self, p => p.infer_batch(model, request))
    }
    pub fn score(&self, model: u64, request: &ScoreRequest) -> Result<ScoreResponse, PluginError> {
        both!(self, p => p.score(model, request))
    }
    /// The model's scheduler counters (ABI 1.2).
    pub fn stats(&self, model: u64) -> Result<SchedulerStats, PluginError> {
        both!(self, p => p.stats(model))
    }
    pub fn update_config(&self, update: &ConfigUpdate) -> Result<UpdateOutcome, PluginError> {
        both!(self, p => p.update_config(update))
    }
    pub fn cleanup(&self, model: u64) -> Result<(), PluginError> {
        both!(self, p => p.cleanup(model))
    }
}
