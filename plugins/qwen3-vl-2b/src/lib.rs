//! Qwen3-VL (`Qwen3VLForConditionalGeneration`, transformers `modeling_qwen3_vl.py`): the
//! Qwen3 dense decoder (per-head QK-norm, GQA) under `model.language_model`, with interleaved
//! multimodal RoPE, fed by the Qwen3-VL vision tower under `model.visual` (its merged patches
//! replace the `<|image_pad|>` embeddings; DeepStack features join the first decoder layers).
//! Every piece is the shared engine's ([`inference_pio_engine::vision`],
//! [`inference_pio_engine::rope`], [`inference_pio_engine::multimodal`]); this crate names them.

use inference_pio_engine::vision::VisionSpec;
use inference_pio_engine::{DecoderConfig, DecoderSpec, EngineError, ModelFamily, OutputFormat};

/// The plugin id (`[plugins.qwen3-vl-2b]` in the host config).
pub const ID: &str = "qwen3-vl-2b";

fn spec(c: &DecoderConfig) -> Result<DecoderSpec, EngineError> {
    let section = c.mrope_section()?.ok_or_else(|| EngineError::Config("`text_config.rope_scaling.mrope_section` is missing".into()))?;
    Ok(DecoderSpec {
        prefix: "model.language_model".into(),
        mrope_section: Some(section),
        vision: Some(VisionSpec::from_config(c, "model.visual")?),
        ..DecoderSpec::dense(c, true)
    })
}

pub static FAMILY: ModelFamily = ModelFamily {
    id: ID,
    version: env!("CARGO_PKG_VERSION"),
    description: "Qwen3-VL (vision tower with DeepStack, interleaved M-RoPE, Qwen3 dense decoder); primary model Qwen3-VL-2B-Instruct",
    architectures: &["Qwen3VLForConditionalGeneration"],
    primary_model_name: "Qwen/Qwen3-VL-2B-Instruct",
    primary_config_json: include_str!("../primary/config.json"),
    // transformers' `Qwen3VLConfig` defaults.
    config_defaults: r#"{"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653}"#,
    output_format: OutputFormat::Hermes,
    spec,
};

inference_pio_engine::export_model!(FAMILY, ID);
