//! GPTQ and AWQ checkpoints (`tests/fixtures/make_packed_fixtures.py`): the tiny Llama with
//! every linear layer packed as AutoGPTQ / GPTQModel and AutoAWQ write them, beside a dense
//! twin holding the same weights dequantized in f32 as transformers' kernels compute them. The
//! packed model, its groups kept as codes, gives the twin's logits (prompt and decode paths)
//! and greedy tokens; so does the FP8 model (E4M3 weights with block scales, Qwen's FP8
//! checkpoints' layout), kept as FP8. Act-order GPTQ, whose groups are not runs of inputs,
//! loads dense.

use inference_pio_core::config::{QuantActivations, Quantization};
use inference_pio_core::types::{DType, DeviceRequest, LoadOptions, PluginSettings};
use inference_pio_engine::generate::Engine;
use inference_pio_engine::plugin::load_engine;
use inference_pio_engine::testing::{all_logits, greedy_ignoring_eos, incremental_logits, rel_l2};
use llama::FAMILY;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The engine and what it says it stored.
fn load(name: &str, quantization: Option<Quantization>) -> (Engine, String) {
    let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::F32), random_weights: None };
    let mut settings = PluginSettings::default();
    settings.optimization.prefill_chunk_tokens = Some(0);
    settings.optimization.quantization = quantization;
    // Exact activations: the weights' values are what these tests compare.
    settings.optimization.quant_activations = Some(QuantActivations::Exact);
    match load_engine(&FAMILY, &fixture(name), &options, &settings) {
        Ok((engine, info)) => (engine, info.quantization),
        Err(e) => panic!("cannot load {name}: {e}"),
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![5], vec![40, 80, 120, 9, 200, 17], (0..19).map(|i| (i * 37 + 11) % 320).collect()]
}

/// `got` and `want` agree at every position of every prompt within `bound` relative L2.
fn check_close(label: &str, got: &[Vec<f32>], want: &[Vec<f32>], bound: f64) {
    assert_eq!(got.len(), want.len(), "{label}: positions");
    for (p, (g, w)) in got.iter().zip(want).enumerate() {
        let e = rel_l2(g, w);
        assert!(e < bound, "{label}, position {p}: relative L2 {e:.2e} (bound {bound:.0e})");
    }
}

fn check_against_twin(name: &str, stored: &str) {
    let (packed, said) = load(name, None);
    assert!(said.starts_with(stored), "{name}: stored as `{said}`, expected `{stored}…`");
    let (twin, _) = load(&format!("{name}-dense"), None);
    for ids in prompts() {
        let want = all_logits(&twin, &ids);
        // Prompt rows: the dequantized rows' product; exact to f32 summation order.
        check_close(&format!("{name} prompt of {}", ids.len()), &all_logits(&packed, &ids), &want, 1e-5);
        // One row per step: the codes multiplied in place.
        check_close(&format!("{name} decode of {}", ids.len()), &incremental_logits(&packed, &ids, 1, 16), &want, 1e-5);
        assert_eq!(greedy_ignoring_eos(&packed, &ids, 8), greedy_ignoring_eos(&twin, &ids, 8), "{name}: greedy tokens after {ids:?}");
    }
}

#[test]
fn gptq_four_bit_weights_stay_packed_and_match_their_dense_twin() {
    check_against_twin("llama-tiny-gptq4", "int4 in groups of 32: 14 of 14 linear weights");
}

#[test]
fn awq_four_bit_weights_stay_packed_and_match_their_dense_twin() {
    check_against_twin("llama-tiny-awq", "int4 in groups of 32: 14 of 14 linear weights");
}

#[test]
fn act_order_gptq_loads_dense_and_matches_its_twin() {
    // Groups scattered over the inputs are not runs of codes: dequantized at load.
    check_against_twin("llama-tiny-gptq8-actorder", "");
}

#[test]
fn fp8_block_scaled_weights_stay_fp8_and_match_their_twin() {
    check_against_twin("llama-tiny-fp8", "fp8 (E4M3) with a scale per 32 inputs: 14 of 14 linear weights");
}

#[test]
fn fp8_weights_refuse_integer_activations_by_name() {
    let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::F32), random_weights: None };
    for activations in [QuantActivations::Int16, QuantActivations::Int8] {
        let mut settings = PluginSettings::default();
        settings.optimization.quant_activations = Some(activations);
        let err = match load_engine(&FAMILY, &fixture("llama-tiny-fp8"), &options, &settings) {
            Ok(_) => panic!("{activations:?} activations were taken with FP8 weights"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("quant_activations") && err.contains("FP8"), "{activations:?}: {err}");
    }
}

#[test]
fn packed_weights_follow_the_quantization_setting() {
    let ids: Vec<u32> = (0..12).map(|i| (i * 29 + 3) % 320).collect();
    let (twin, _) = load("llama-tiny-gptq4-dense", None);
    let want = all_logits(&twin, &ids);
    // `int8`: made from the unpacked values.
    let (int8, said) = load("llama-tiny-gptq4", Some(Quantization::Int8));
    assert!(said.contains("14 of 14 linear weights"), "int8 from packed weights: `{said}`");
    // (int8 per channel of this tiny model's large random weights: 7e-2 measured.)
    check_close("int8 from GPTQ", &all_logits(&int8, &ids), &want, 0.15);
    // `none`: dequantized to the model's dtype, the twin exactly.
    let (none, said) = load("llama-tiny-gptq4", Some(Quantization::None));
    assert_eq!(said, "", "`none` stores every weight dense");
    check_close("GPTQ dequantized", &all_logits(&none, &ids), &want, 1e-6);
    // `fp8`: blocks of 128x128 made from the unpacked values. E4M3 keeps 3 mantissa bits (a
    // relative error of 1/16 at most, about 3.6 % rms on these uniform weights, where int8 per
    // channel's is about 0.5 %), and this tiny random model amplifies weight errors about 14x
    // (int8: 7e-2): 0.069-0.33 measured over the 12 positions. The per-weight bound is
    // checked in `inference_pio_kernels::quant_e4m3`, and on SmolLM2 in `quantization.rs`.
    let (fp8, said) = load("llama-tiny-gptq4", Some(Quantization::Fp8));
    assert!(said.starts_with("fp8 (E4M3)") && said.contains("14 of 14 linear weights"), "fp8 from packed weights: `{said}`");
    check_close("fp8 from GPTQ", &all_logits(&fp8, &ids), &want, 0.5);
    check_close("fp8 decode from GPTQ", &incremental_logits(&fp8, &ids, 1, 16), &all_logits(&fp8, &ids), 1e-5);
}

/// Tensor parallelism over packed and FP8 checkpoints: two ranks (CPU threads), each reading
/// its slices of the GPTQ / AWQ groups or the FP8 blocks, give the dense twin's logits and
/// greedy tokens, the packed ones still stored as codes. (A rank's row-parallel slice of a
/// packed weight takes whole groups: this model's o and down split at 32 and 64 inputs, its
/// groups are 32.)
#[test]
fn packed_and_fp8_weights_split_over_two_ranks_match_their_dense_twin() {
    for (name, stored) in [("llama-tiny-gptq4", "int4 in groups of 32: 14 of 14 linear weights"), ("llama-tiny-awq", "int4 in groups of 32: 14 of 14 linear weights"), ("llama-tiny-fp8", "")] {
        let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::F32), random_weights: None };
        let mut settings = PluginSettings::default();
        settings.optimization.prefill_chunk_tokens = Some(0);
        settings.optimization.tensor_parallel = Some(2);
        settings.optimization.quant_activations = Some(QuantActivations::Exact);
        let split = match load_engine(&FAMILY, &fixture(name), &options, &settings) {
            Ok((engine, info)) => {
                // The ranks keep the groups as codes (rank 0's tally).
                assert!(info.quantization.starts_with(stored), "{name} over two ranks: stored as `{}`, expected `{stored}…`", info.quantization);
                engine
            }
            Err(e) => panic!("cannot load {name} over two ranks: {e}"),
        };
        let (twin, _) = load(&format!("{name}-dense"), None);
        for ids in prompts() {
            check_close(&format!("{name} over two ranks, prompt of {}", ids.len()), &all_logits(&split, &ids), &all_logits(&twin, &ids), 1e-5);
            assert_eq!(greedy_ignoring_eos(&split, &ids, 8), greedy_ignoring_eos(&twin, &ids, 8), "{name} over two ranks: greedy tokens after {ids:?}");
        }
    }
}
