//! Llama models (`LlamaForCausalLM`, transformers `modeling_llama.py`): the plain pre-norm
//! decoder with grouped-query attention, RoPE (default, linear or llama3 scaling) and a SwiGLU
//! MLP — exactly the shared engine's decoder with nothing added. Loads Hugging Face
//! directories and GGUF files (`general.architecture = "llama"`, e.g. SmolLM2), whose Q/K rows
//! the engine un-permutes as transformers does.

use inference_pio_engine::{DecoderConfig, DecoderSpec, EngineError, ModelFamily, OutputFormat};

/// The plugin id (`[plugins.llama]` in the host config).
pub const ID: &str = "llama";

fn spec(config: &DecoderConfig) -> Result<DecoderSpec, EngineError> {
    Ok(DecoderSpec::dense(config, false))
}

pub static FAMILY: ModelFamily = ModelFamily {
    id: ID,
    version: env!("CARGO_PKG_VERSION"),
    description: "Llama decoder (GQA, RoPE, SwiGLU) from safetensors or GGUF; primary model SmolLM2-135M-Instruct",
    architectures: &["LlamaForCausalLM"],
    primary_model_name: "HuggingFaceTB/SmolLM2-135M-Instruct",
    primary_config_json: include_str!("../primary/config.json"),
    config_defaults: "{}",
    output_format: OutputFormat::Plain,
    spec,
};

inference_pio_engine::export_model!(FAMILY, ID);
