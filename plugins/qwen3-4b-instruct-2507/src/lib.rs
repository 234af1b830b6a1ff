//! Qwen3 dense models (`Qwen3ForCausalLM`, transformers `modeling_qwen3.py`): a Llama-style
//! decoder whose queries and keys are RMS-normalised per head before RoPE. Everything else is
//! the shared engine.

use inference_pio_engine::{DecoderConfig, DecoderSpec, EngineError, ModelFamily, OutputFormat};

/// The plugin id (`[plugins.qwen3-4b-instruct-2507]` in the host config).
pub const ID: &str = "qwen3-4b-instruct-2507";

fn spec(config: &DecoderConfig) -> Result<DecoderSpec, EngineError> {
    Ok(DecoderSpec::dense(config, true))
}

pub static FAMILY: ModelFamily = ModelFamily {
    id: ID,
    version: env!("CARGO_PKG_VERSION"),
    description: "Qwen3 dense decoder (per-head QK-norm, GQA, RoPE); primary model Qwen3-4B-Instruct-2507",
    architectures: &["Qwen3ForCausalLM"],
    primary_model_name: "Qwen/Qwen3-4B-Instruct-2507",
    primary_config_json: include_str!("../primary/config.json"),
    config_defaults: "{}",
    output_format: OutputFormat::Hermes,
    spec,
};

inference_pio_engine::export_model!(FAMILY, ID);
