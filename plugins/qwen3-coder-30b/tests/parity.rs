//! Parity with transformers on tiny random-weight Qwen3-MoE checkpoints (fixtures from
//! tests/fixtures/make_fixtures.py), on the CPU: a dense layer in `mlp_only_layers`,
//! renormalised and raw top-k weights, `decoder_sparse_step` 2.

use inference_pio_core::types::DType;
use inference_pio_engine::testing::{all_logits, check_fixture, check_rows_equal_alone, incremental_logits, load_cpu, rel_l2};
use qwen3_coder_30b::FAMILY;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn dense_layer_and_renormalised_routing_match_transformers() {
    check_fixture(&FAMILY, &fixtures(), "qwen3moe-tiny-a", true);
}

#[test]
fn sparse_step_and_raw_topk_weights_match_transformers() {
    check_fixture(&FAMILY, &fixtures(), "qwen3moe-tiny-b", true);
}

#[test]
fn incremental_decode_and_batches_equal_the_full_pass() {
    let engine = load_cpu(&FAMILY, &fixtures().join("qwen3moe-tiny-a"), DType::F32);
    let prompt: Vec<u32> = (0..20).map(|i| (i * 37 + 11) % 500 + 3).collect();
    let full = all_logits(&engine, &prompt);
    let rows = incremental_logits(&engine, &prompt, 6, 4);
    assert_eq!(rows.len(), full.len());
    for (i, (a, b)) in rows.iter().zip(&full).enumerate() {
        assert!(rel_l2(a, b) <= 1e-5, "position {i}");
    }
    check_rows_equal_alone(&engine, &[vec![5, 9, 200, 31], prompt.clone(), vec![77]], 8);
}

#[test]
fn the_real_config_describes_the_30b_model() {
    use inference_pio_core::export::Plugin;
    let meta = inference_pio_engine::plugin::EnginePlugin::new(&FAMILY).metadata();
    // Qwen3-Coder-30B-A3B: 30.5 B parameters.
    assert!((30_000_000_000..31_000_000_000).contains(&meta.primary_model.parameter_count), "{}", meta.primary_model.parameter_count);
}

#[test]
fn the_coder_chat_template_renders_tools_and_calls_like_transformers() {
    inference_pio_engine::testing::check_chat_template(&FAMILY, &fixtures().join("qwen3moe-tiny-a"), &fixtures().join("chat_template.reference.json"));
}

#[test]
fn the_gpu_weight_layout_matches_transformers_too() {
    // Every linear and expert weight split into column blocks as on a GPU (split-K products,
    // gathered and per-expert batched experts), checked against the same references.
    inference_pio_engine::testing::with_cpu_split(4, || {
        check_fixture(&FAMILY, &fixtures(), "qwen3moe-tiny-a", false);
        check_fixture(&FAMILY, &fixtures(), "qwen3moe-tiny-b", false);
    });
}

#[test]
fn tensor_parallel_ranks_on_the_cpu_equal_the_whole_model() {
    use inference_pio_engine::testing::check_tensor_parallel;
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 11) % 500 + 3).collect();
    // 8 routed experts split 4 or 2 a rank, a dense layer split by rows.
    for ranks in [2, 4] {
        check_tensor_parallel(&FAMILY, &fixtures().join("qwen3moe-tiny-a"), ranks, &prompt, 4);
    }
}
