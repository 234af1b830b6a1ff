//! Parity with transformers on tiny random-weight GLM-4.x MoE checkpoints (fixtures from
//! tests/fixtures/make_fixtures.py), on the CPU: QK-norm, attention bias, partial rotary,
//! a score-correction bias and group limits that change expert choices, multi-token-prediction
//! tensors in the checkpoint; and a hub-style config without QK-norm or `partial_rotary_factor`.

use inference_pio_engine::testing::{check_fixture, reference};
use glm_4_7::FAMILY;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn qk_norm_bias_groups_and_mtp_tensors_match_transformers() {
    // The fixture is only a test of routing if the bias and the group limit change choices.
    let r = reference(&fixtures(), "glm4moe-tiny-a");
    assert!(r["routing_changes"]["bias"].as_u64().unwrap_or(0) > 0, "the correction bias changes no choice");
    assert!(r["routing_changes"]["group_limit"].as_u64().unwrap_or(0) > 0, "the group limit changes no choice");
    let ckpt = inference_pio_engine::weights::Checkpoint::open(&fixtures().join("glm4moe-tiny-a")).expect("open");
    assert!(ckpt.contains("model.layers.3.eh_proj.weight"), "the fixture carries the MTP layer");
    check_fixture(&FAMILY, &fixtures(), "glm4moe-tiny-a", true);
}

#[test]
fn hub_config_without_qk_norm_uses_the_glm_rotary_default() {
    let config = std::fs::read_to_string(fixtures().join("glm4moe-tiny-b/config.json")).expect("config");
    assert!(!config.contains("partial_rotary_factor"), "the fixture must rely on the default");
    check_fixture(&FAMILY, &fixtures(), "glm4moe-tiny-b", true);
}

#[test]
fn bad_moe_configs_are_refused_with_the_key() {
    use inference_pio_core::export::Plugin;
    let plugin = inference_pio_engine::plugin::EnginePlugin::new(&FAMILY);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("glm4moe-tiny-a/config.json")).expect("config")).expect("json");
    config["n_group"] = serde_json::json!(3);
    let support = plugin.supports_config(&config);
    assert!(support.supported, "supports_config checks keys, not ratios: {}", support.reason);
    config.as_object_mut().expect("object").remove("moe_intermediate_size");
    let support = plugin.supports_config(&config);
    assert!(!support.supported && support.reason.contains("moe_intermediate_size"), "{}", support.reason);
}

#[test]
fn the_real_config_describes_glm_4_7() {
    use inference_pio_core::export::Plugin;
    let meta = inference_pio_engine::plugin::EnginePlugin::new(&FAMILY).metadata();
    // GLM-4.7: 355 B parameters in the decoder (the MTP layer adds the rest of the 358 B).
    let p = meta.primary_model.parameter_count;
    assert!((350_000_000_000..360_000_000_000).contains(&p), "{p}");
}

#[test]
fn the_glm_chat_template_renders_tools_and_calls_like_transformers() {
    inference_pio_engine::testing::check_chat_template(&FAMILY, &fixtures().join("glm4moe-tiny-a"), &fixtures().join("chat_template.reference.json"));
}

#[test]
fn incremental_decode_and_concurrent_rows_equal_the_full_pass() {
    use inference_pio_core::types::DType;
    use inference_pio_engine::testing::{all_logits, check_rows_equal_alone, incremental_logits, load_cpu, rel_l2};
    // Partial rotary, group-limited sigmoid routing with a correction bias, shared experts.
    let engine = load_cpu(&FAMILY, &fixtures().join("glm4moe-tiny-a"), DType::F32);
    let prompt: Vec<u32> = (0..17).map(|i| (i * 29 + 7) % 500 + 3).collect();
    let full = all_logits(&engine, &prompt);
    let rows = incremental_logits(&engine, &prompt, 5, 4);
    for (i, (a, b)) in rows.iter().zip(&full).enumerate() {
        assert!(rel_l2(a, b) <= 1e-5, "position {i}");
    }
    check_rows_equal_alone(&engine, &[prompt, vec![5, 9, 200]], 6);
}

#[test]
fn the_gpu_weight_layout_matches_transformers_too() {
    // Every linear and expert weight split into column blocks as on a GPU (split-K products,
    // gathered and per-expert batched experts), checked against the same references.
    inference_pio_engine::testing::with_cpu_split(4, || {
        check_fixture(&FAMILY, &fixtures(), "glm4moe-tiny-a", false);
        check_fixture(&FAMILY, &fixtures(), "glm4moe-tiny-b", false);
    });
}

#[test]
fn tensor_parallel_ranks_on_the_cpu_equal_the_whole_model() {
    use inference_pio_engine::testing::check_tensor_parallel;
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 11) % 380 + 3).collect();
    // tiny-a: 16 routed experts behind the grouped sigmoid router, a shared expert split by
    // rows, a first dense layer; tiny-b: two shared experts, 6 heads over 2 KV heads.
    for ranks in [2, 4] {
        check_tensor_parallel(&FAMILY, &fixtures().join("glm4moe-tiny-a"), ranks, &prompt, 4);
    }
    check_tensor_parallel(&FAMILY, &fixtures().join("glm4moe-tiny-b"), 2, &prompt, 4);
}

/// llama.cpp's `glm4moe` GGUF layout (`tests/fixtures/make_gguf_fixtures.py`): routers with their
/// score bias (`exp_probs_b`), stacked experts, shared experts (`ffn_*_shexp`), the first layer
/// dense, the MTP layer counted in `block_count` and left unread. The BF16 file holds the
/// safetensors checkpoint's values, so it must give that checkpoint's logits (which match
/// transformers'); the quantized one keeps its blocks (experts too) and must give what the same
/// file dequantized gives.
#[test]
fn glm4moe_gguf_files_load_with_their_experts_and_routing() {
    // Attention 4 x 3 layers, the dense MLP's 3, 16 experts x 3 in 2 layers, the shared experts'
    // 3 x 2, the LM head and the embedding table (Q8_0 in the file too).
    inference_pio_engine::testing::check_gguf_twins(&FAMILY, &fixtures(), "glm4moe-tiny-a", "mixed 4- and 8-bit groups: 119 of 119 linear weights");
}
