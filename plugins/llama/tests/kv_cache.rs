//! The reduced KV caches (`kv_cache_dtype = "int8"` and `"fp8"` codes, and `"f16"` and
//! `"bf16"` pages of the f32 model) on the real SmolLM2-135M-Instruct, on the CPU: their logits
//! against the f32 cache's over the committed evaluation texts (teacher-forced, as
//! `quantization.rs` measures weight storage: mean and largest KL and top-1 agreement), through
//! the prompt path (the chunk's keys written, then read in place by the prefill tiles) and the
//! decode path (one token a step, read in place); the blocks that fit in the same budget; and
//! the settings refused.

mod common;

use inference_pio_core::config::KvCacheDtype;
use inference_pio_core::types::{DType, DeviceRequest, LoadOptions, ModelInfo, PluginSettings};
use inference_pio_engine::generate::Engine;
use inference_pio_engine::plugin::load_engine;
use inference_pio_engine::testing::{Divergence, divergence};
use common::{decode_logits, eval_texts, prompt_logits};
use llama::FAMILY;

fn load(kv: KvCacheDtype) -> Result<(Engine, ModelInfo), String> {
    let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::F32), random_weights: None };
    let mut settings = PluginSettings::default();
    settings.optimization.prefill_chunk_tokens = Some(0);
    settings.optimization.kv_cache_dtype = kv;
    load_engine(&FAMILY, &common::smollm2_path(), &options, &settings).map_err(|e| e.to_string())
}

#[test]
fn reduced_kv_caches_stay_within_their_measured_divergence_and_hold_their_share_more_tokens() {
    let (reference, dense) = load(KvCacheDtype::Auto).expect("loads");
    assert_eq!(dense.kv_cache_dtype, "f32");
    let texts = eval_texts(&reference);
    let want = [prompt_logits(&reference, &texts), decode_logits(&reference, &texts)];
    drop(reference);
    // Measured (2026-12-06, 245 positions, both paths alike): int8 mean KL 0.00063, largest
    // 0.0063, top-1 agreement 0.984; fp8 mean KL 0.0034-0.0038, largest 0.034-0.048, top-1
    // 0.967-0.971 (E4M3 keeps 3 mantissa bits: relative steps of 1/8, where int8 steps are
    // 1/127 of the largest value).
    // f16 (2026-12-08): mean KL 3.0-3.5e-7, largest 3.9e-6, top-1 1.0; bf16 (8 mantissa bits
    // against f16's 11): mean 1.9-2.0e-5, largest 4.4e-4, top-1 0.996-1.0.
    // Bounds about twice that; a lost scale or a wrong code moves them by orders of
    // magnitude (dropping the int8 value scale gave a KL of 18.5).
    for (kv, name, mean, max, top1, head_bytes) in [
        (KvCacheDtype::Int8, "int8", 1.3e-3, 0.013, 0.96, 68.0),
        (KvCacheDtype::Fp8, "fp8", 7.5e-3, 0.1, 0.94, 68.0),
        (KvCacheDtype::F16, "f16", 1e-6, 1e-5, 0.99, 128.0),
        (KvCacheDtype::Bf16, "bf16", 5e-5, 1e-3, 0.98, 128.0),
    ] {
        let (engine, info) = load(kv).unwrap_or_else(|e| panic!("loads with an {name} KV cache: {e}"));
        assert_eq!(info.kv_cache_dtype, name);
        // The same budget (the CPU default of 0.5 GB): a head of 64 values takes 64 + 4 bytes
        // (codes) or 128 (16-bit) instead of 256.
        assert_eq!((dense.kv_cache_bytes / 1_000_000, info.kv_cache_bytes / 1_000_000), (499, 499), "{dense:?} {info:?}");
        let ratio = info.kv_cache_blocks as f64 / dense.kv_cache_blocks as f64;
        assert!((ratio - 256.0 / head_bytes).abs() < 0.01, "{} blocks against {}: {ratio}", info.kv_cache_blocks, dense.kv_cache_blocks);
        for (path, want) in ["prefill", "decode"].into_iter().zip(&want) {
            let got = if path == "prefill" { prompt_logits(&engine, &texts) } else { decode_logits(&engine, &texts) };
            let d: Divergence = divergence(want, &got);
            eprintln!("{name} KV cache, {path}: {d:?}");
            assert!(d.positions > 150, "{} positions", d.positions);
            assert!(d.mean_kl <= mean && d.max_kl <= max && d.top1_agreement >= top1, "{name}, {path}: {d:?}");
        }
    }
}

#[test]
fn kv_cache_dtypes_the_engine_cannot_store_are_refused_by_name() {
    // A 16-bit cache of a bf16 model is its own dtype, or refused.
    let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::Bf16), random_weights: None };
    for kv in [KvCacheDtype::F16, KvCacheDtype::F32] {
        let mut settings = PluginSettings::default();
        settings.optimization.kv_cache_dtype = kv;
        let err = load_engine(&FAMILY, &common::smollm2_path(), &options, &settings).err().unwrap_or_else(|| panic!("{kv:?} loads")).to_string();
        assert!(err.contains("kv_cache_dtype") && err.contains("differs from the model's dtype (bf16)"), "{kv:?}: {err}");
    }
    // The model's own dtype, named, is `auto`.
    assert_eq!(load(KvCacheDtype::F32).expect("f32 loads").1.kv_cache_dtype, "f32");
}
