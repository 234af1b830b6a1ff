//! `quantize_lm_head`: with `quantization` int8 or int4 the LM head is quantized too, untied
//! (`llama-tiny-hf`) or tied (`llama-tiny-tied.gguf`, a quantized copy beside the dense
//! lookup); without a quantization to follow the setting is refused.

use inference_pio_core::config::Quantization;
use inference_pio_core::types::{DType, DeviceRequest, LoadOptions, PluginSettings};
use inference_pio_engine::generate::Engine;
use inference_pio_engine::plugin::load_engine;
use inference_pio_engine::testing::{all_logits, rel_l2};
use llama::FAMILY;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn load(name: &str, quantization: Option<Quantization>, head: bool) -> Result<(Engine, String), String> {
    let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::F32), random_weights: None };
    let mut settings = PluginSettings::default();
    settings.optimization.prefill_chunk_tokens = Some(0);
    settings.optimization.quantization = quantization;
    settings.optimization.quantize_lm_head = head;
    load_engine(&FAMILY, &fixture(name), &options, &settings).map(|(e, info)| (e, info.quantization)).map_err(|e| e.to_string())
}

/// The largest relative L2 of `got` from `want` over a prompt's positions.
fn worst(got: &Engine, want: &Engine, ids: &[u32]) -> f64 {
    all_logits(got, ids).iter().zip(all_logits(want, ids)).map(|(g, w)| rel_l2(g, &w)).fold(0.0, f64::max)
}

#[test]
fn the_head_is_quantized_with_the_other_linear_weights_when_asked() {
    let ids: Vec<u32> = (0..10).map(|i| (i * 31 + 7) % 260).collect();
    // (mode, bound on the worst position with the head quantized: int8 measures below 0.1; FP8's
    // 3 mantissa bits move this tiny random model's logits far more: 0.25 measured on
    // `llama-tiny-hf` with the head, 0.07-0.33 for the body alone in `packed.rs`.)
    for (mode, bound) in [(Quantization::Int8, 0.1), (Quantization::Fp8, 0.6)] {
        for (name, linear) in [("llama-tiny-hf", 14), ("llama-tiny-tied.gguf", 14)] {
            let (reference, _) = load(name, Some(Quantization::None), false).expect("dense");
            let (body, said) = load(name, Some(mode), false).expect("quantized");
            assert!(said.contains(&format!("{linear} of {linear} linear weights")), "{name} {mode:?}: `{said}`");
            let (all, said) = load(name, Some(mode), true).expect("quantized with the head");
            let with_head = linear + 1;
            assert!(said.contains(&format!("{with_head} of {with_head} linear weights")), "{name} {mode:?} with the head: `{said}`");
            // The head's own rounding adds to the body's, and stays small.
            let (b, a) = (worst(&body, &reference, &ids), worst(&all, &reference, &ids));
            assert!(a != b && a < bound, "{name} {mode:?}: body only {b:.2e}, with the head {a:.2e}");
        }
    }
}

#[test]
fn the_setting_without_a_quantization_is_refused() {
    for q in [None, Some(Quantization::None)] {
        let err = load("llama-tiny-hf", q, true).err().expect("refused");
        assert!(err.contains("quantize_lm_head"), "{err}");
    }
}
