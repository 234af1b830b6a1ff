//! Qwen3 mixture-of-experts models (`Qwen3MoeForCausalLM`, transformers
//! `modeling_qwen3_moe.py`): Qwen3 attention (per-head QK-norm) with a softmax top-k router
//! over `num_experts` SwiGLU experts in every `decoder_sparse_step`-th layer, dense MLPs in
//! `mlp_only_layers`. What is specific to the family is reading those keys; routing, experts,
//! attention and generation are the shared engine's.

use inference_pio_engine::{DecoderConfig, DecoderSpec, EngineError, ModelFamily, OutputFormat, MoeSpec, Router};

/// The plugin id (`[plugins.qwen3-coder-30b]` in the host config).
pub const ID: &str = "qwen3-coder-30b";

fn spec(c: &DecoderConfig) -> Result<DecoderSpec, EngineError> {
    // Hub configs say `num_experts`; transformers 5 writes `num_local_experts`.
    let num_experts = match c.get_usize("num_experts")? {
        Some(n) => n,
        None => c.get_usize("num_local_experts")?.ok_or_else(|| EngineError::Config("`num_experts` (or `num_local_experts`) is missing".into()))?,
    };
    let mut spec = DecoderSpec::dense(c, true);
    if num_experts == 0 {
        return Ok(spec);
    }
    let step = c.get_usize("decoder_sparse_step")?.unwrap_or(1);
    if step == 0 {
        return Err(EngineError::Config("`decoder_sparse_step` must be at least 1".into()));
    }
    let dense = c.get_usize_list("mlp_only_layers")?;
    if let Some(bad) = dense.iter().find(|&&l| l >= c.num_hidden_layers) {
        return Err(EngineError::Config(format!("`mlp_only_layers` names layer {bad}, but there are {}", c.num_hidden_layers)));
    }
    spec.moe = Some(MoeSpec {
        num_experts,
        top_k: c.need_usize("num_experts_per_tok")?,
        expert_intermediate: c.need_usize("moe_intermediate_size")?,
        shared_intermediate: None,
        router: Router::SoftmaxTopK { norm_topk_prob: c.get_bool("norm_topk_prob")?.unwrap_or(false) },
        sparse_layers: (0..c.num_hidden_layers).map(|l| !dense.contains(&l) && (l + 1).is_multiple_of(step)).collect(),
    });
    Ok(spec)
}

pub static FAMILY: ModelFamily = ModelFamily {
    id: ID,
    version: env!("CARGO_PKG_VERSION"),
    description: "Qwen3 mixture-of-experts decoder (softmax top-k routing, QK-norm, GQA); primary model Qwen3-Coder-30B-A3B-Instruct",
    architectures: &["Qwen3MoeForCausalLM"],
    primary_model_name: "Qwen/Qwen3-Coder-30B-A3B-Instruct",
    primary_config_json: include_str!("../primary/config.json"),
    config_defaults: "{}",
    output_format: OutputFormat::Qwen3Coder,
    spec,
};

inference_pio_engine::export_model!(FAMILY, ID);
