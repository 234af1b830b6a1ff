//! GLM-4.5 / 4.6 / 4.7 mixture-of-experts models (`Glm4MoeForCausalLM`, transformers
//! `modeling_glm4_moe.py`): attention with q/k/v bias (none on `o_proj`), optional QK-norm
//! (`use_qk_norm`) and partial rotary embeddings (`partial_rotary_factor`, 0.5 by default);
//! dense MLPs in the first `first_k_dense_replace` layers, then sigmoid-scored routing with
//! `e_score_correction_bias`, group-limited top-k (`n_group`, `topk_group`),
//! `routed_scaling_factor` and shared experts. The multi-token-prediction layers
//! (`num_nextn_predict_layers`, stored as `model.layers.{num_hidden_layers}...`) are not part
//! of the decoder and are left unread.

use inference_pio_engine::{DecoderConfig, DecoderSpec, EngineError, ModelFamily, OutputFormat, MoeSpec, Router};

/// The plugin id (`[plugins.glm-4-7]` in the host config).
pub const ID: &str = "glm-4-7";

fn spec(c: &DecoderConfig) -> Result<DecoderSpec, EngineError> {
    let moe_intermediate = c.need_usize("moe_intermediate_size")?;
    let shared = c.get_usize("n_shared_experts")?.unwrap_or(1);
    let first_dense = c.get_usize("first_k_dense_replace")?.unwrap_or(1);
    Ok(DecoderSpec {
        qk_norm: c.get_bool("use_qk_norm")?.unwrap_or(false),
        o_proj_bias: false,
        moe: Some(MoeSpec {
            num_experts: match c.get_usize("n_routed_experts")? {
                Some(n) => n,
                None => c.need_usize("num_local_experts").map_err(|_| EngineError::Config("`n_routed_experts` is missing".into()))?,
            },
            top_k: c.need_usize("num_experts_per_tok")?,
            expert_intermediate: moe_intermediate,
            shared_intermediate: (shared > 0).then_some(moe_intermediate * shared),
            router: Router::SigmoidGrouped {
                n_group: c.get_usize("n_group")?.unwrap_or(1),
                topk_group: c.get_usize("topk_group")?.unwrap_or(1),
                norm_topk_prob: c.get_bool("norm_topk_prob")?.unwrap_or(true),
                routed_scaling_factor: c.get_f64("routed_scaling_factor")?.unwrap_or(1.0),
            },
            sparse_layers: (0..c.num_hidden_layers).map(|l| l >= first_dense).collect(),
        }),
        ..DecoderSpec::dense(c, false)
    })
}

pub static FAMILY: ModelFamily = ModelFamily {
    id: ID,
    version: env!("CARGO_PKG_VERSION"),
    description: "GLM-4.x mixture-of-experts decoder (sigmoid group-limited routing, shared experts, partial RoPE); primary model GLM-4.7",
    architectures: &["Glm4MoeForCausalLM"],
    primary_model_name: "zai-org/GLM-4.7",
    primary_config_json: include_str!("../primary/config.json"),
    // Glm4MoeConfig's default that differs from the engine's (full rotary).
    config_defaults: r#"{"partial_rotary_factor": 0.5}"#,
    output_format: OutputFormat::Glm4 { starts_in_reasoning: false },
    spec,
};

inference_pio_engine::export_model!(FAMILY, ID);
