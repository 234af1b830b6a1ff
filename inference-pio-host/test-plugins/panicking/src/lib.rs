//! Test plugin: loads a "model" fine, then panics inside `infer` (and in `load_model` for a
//! directory named `panic-on-load`). The host must turn this into an error and keep running.

use inference_pio_core::abi::{ABI_MAJOR, ABI_MINOR, PluginError};
use inference_pio_core::export::{Plugin, TokenCallback};
use inference_pio_core::types::*;
use std::path::Path;


fn test_metadata(id: &str, description: &str) -> PluginMetadata {
    PluginMetadata {
        id: id.to_string(),
        version: "0.0.1".to_string(),
        description: description.to_string(),
        architectures: vec![format!("PioTest{}ForCausalLM", id.replace('-', ""))],
        primary_model: PrimaryModel { name: "none".into(), parameter_count: 0, memory_bytes: 0 },
        modalities: vec!["text".into()],
        capabilities: vec![],
        optimizations: vec![],
        backends: vec!["cpu".into()],
        build: BuildInfo { rustc: "n/a".into(), burn: "n/a".into(), abi_major: ABI_MAJOR, abi_minor: ABI_MINOR },
    }
}

fn echo_response(request: &InferRequest) -> InferResponse {
    let ids = match &request.input {
        PromptInput::TokenIds(ids) => ids.clone(),
        _ => vec![],
    };
    InferResponse {
        prompt_token_ids: ids.clone(),
        token_ids: ids,
        text: String::new(),
        reasoning: String::new(),
        tool_calls: Vec::new(),
        finish_reason: FinishReason::Length,
        timings: Timings::default(),
            logprobs: Vec::new(),
    }
}

fn unsupported<T>() -> Result<T, PluginError> {
    Err(PluginError::invalid("test plugin"))
}


pub struct Panicking;

impl Plugin for Panicking {
    fn metadata(&self) -> PluginMetadata {
        test_metadata("test-panicking", "hostile test plugin: panics in infer")
    }
    fn supports_config(&self, _config: &serde_json::Value) -> Support {
        Support { supported: true, reason: String::new() }
    }
    fn initialize(&self, _settings: PluginSettings) -> Result<(), PluginError> {
        Ok(())
    }
    fn load_model(&self, dir: &Path, _options: LoadOptions) -> Result<ModelInfo, PluginError> {
        if dir.ends_with("panic-on-load") {
            panic!("test plugin panics in load_model");
        }
        Ok(ModelInfo {
            handle: 1,
            cpu_threads: None,
            architecture: "PioTesttestpanickingForCausalLM".into(),
            parameter_count: 0,
            weight_bytes: 0,
            dtype: DType::F32,
            device: "cpu".into(),
            max_context: 16,
            vocab_size: 16,
            has_chat_template: false,
            generation_defaults: SamplingOverrides::default(),
            load_seconds: 0.0,
            kv_cache_blocks: 0,
            kv_block_tokens: 0,
            kv_cache_bytes: 0,
            kv_cache_sized_by: String::new(),
            kv_cache_dtype: String::new(),
            quantization: String::new(),
        })
    }
    fn infer(&self, _m: u64, request: InferRequest, on_token: &mut TokenCallback<'_>) -> Result<InferResponse, PluginError> {
        on_token(1, "partial ", &Default::default());
        if request.stop.iter().any(|s| s == "no-panic") {
            return Ok(echo_response(&request));
        }
        panic!("test plugin panics in infer");
    }
    fn score(&self, _m: u64, _r: ScoreRequest) -> Result<ScoreResponse, PluginError> {
        unsupported()
    }
    fn update_config(&self, _u: ConfigUpdate) -> Result<UpdateOutcome, PluginError> {
        unsupported()
    }
    fn cleanup(&self, _m: u64) -> Result<(), PluginError> {
        Ok(())
    }
}

inference_pio_core::export_plugin!(Panicking, || Panicking);
