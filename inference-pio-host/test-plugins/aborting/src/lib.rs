//! Test plugin: aborts the process when asked for its metadata. Discovery probes run in a
//! child process, so the host lists this file as rejected and keeps going.

use inference_pio_core::abi::PluginError;
use inference_pio_core::export::{Plugin, TokenCallback};
use inference_pio_core::types::*;
use std::path::Path;

pub struct Aborting;

impl Plugin for Aborting {
    fn metadata(&self) -> PluginMetadata {
        std::process::abort()
    }
    fn supports_config(&self, _config: &serde_json::Value) -> Support {
        std::process::abort()
    }
    fn initialize(&self, _settings: PluginSettings) -> Result<(), PluginError> {
        std::process::abort()
    }
    fn load_model(&self, _dir: &Path, _options: LoadOptions) -> Result<ModelInfo, PluginError> {
        std::process::abort()
    }
    fn infer(&self, _m: u64, _r: InferRequest, _t: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        std::process::abort()
    }
    fn score(&self, _m: u64, _r: ScoreRequest) -> Result<ScoreResponse, PluginError> {
        std::process::abort()
    }
    fn update_config(&self, _u: ConfigUpdate) -> Result<UpdateOutcome, PluginError> {
        std::process::abort()
    }
    fn cleanup(&self, _m: u64) -> Result<(), PluginError> {
        std::process::abort()
    }
}

inference_pio_core::export_plugin!(Aborting, || Aborting);
