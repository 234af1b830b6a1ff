// Shared by the hostile test plugins (included with `include!`): a plugin that claims a
// made-up architecture and misbehaves in one chosen method.

use inference_pio_core::abi::{ABI_MAJOR, ABI_MINOR, PluginError};
use inference_pio_core::types::*;

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
        finish_reason: FinishReason::Length,
        timings: Timings::default(),
    }
}

fn unsupported<T>() -> Result<T, PluginError> {
    Err(PluginError::invalid("test plugin"))
}
