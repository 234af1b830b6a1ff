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

#[test]
fn routed_experts_quantized_at_load_stay_close_to_the_f32_model() {
    use inference_pio_core::config::Quantization;
    use inference_pio_core::types::{DeviceRequest, LoadOptions, PluginSettings};
    use inference_pio_engine::plugin::load_engine;
    let path = fixtures().join("qwen3moe-tiny-a");
    let prompt: Vec<u32> = (0..16).map(|i| (i * 37 + 11) % 500 + 3).collect();
    let want = all_logits(&load_cpu(&FAMILY, &path, DType::F32), &prompt);
    // (mode, bound on the mean relative L2 over the positions: about twice what was measured,
    // 0.054, 0.54 and 0.22 for FP8's 3 mantissa bits). A position whose top-k experts change under quantization moves far
    // (int8: one of 16 at 0.41, the others 0.016-0.053), so the mean is bounded, not the
    // largest; int4 in groups of 32 of this 64-wide model moves every position far. That the
    // per-expert products place each pair's output exactly is checked in the engine's MoE
    // tests, with dense experts.
    for (mode, bound, layout) in [(Quantization::Int8, 0.12, "int8 per output channel"), (Quantization::Int4, 1.1, "int4 in groups of 32"), (Quantization::Fp8, 0.45, "fp8 (E4M3)")] {
        let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::F32), random_weights: None };
        let mut settings = PluginSettings::default();
        settings.optimization.prefill_chunk_tokens = Some(0);
        settings.optimization.quantization = Some(mode);
        let (engine, info) = load_engine(&FAMILY, &path, &options, &settings).expect("loads quantized");
        // Attention (q, k, v, o) of 3 layers, the dense layer's MLP, and 2 sparse layers x 8
        // experts x (gate, up, down): every linear weight, the experts included.
        assert!(info.quantization.starts_with(layout) && info.quantization.contains(": 63 of 63 linear weights"), "{mode:?}: {}", info.quantization);
        let got = all_logits(&engine, &prompt);
        let errors: Vec<f64> = got.iter().zip(&want).map(|(g, w)| rel_l2(g, w)).collect();
        let mean = errors.iter().sum::<f64>() / errors.len() as f64;
        eprintln!("{mode:?}: mean relative L2 {mean:.5} over {errors:.4?}");
        assert!(mean <= bound && errors.iter().all(|&e| e > 1e-6), "{mode:?}: relative L2 {errors:?}");
        // Decode (one row a step) takes the same per-expert products as the prompt pass.
        let rows = incremental_logits(&engine, &prompt, 5, 4);
        for (i, (a, b)) in rows.iter().zip(&got).enumerate() {
            assert!(rel_l2(a, b) <= 1e-5, "{mode:?}: position {i}");
        }
    }
}

/// E4M3 byte nearest `x` (|x| ≤ 448), by search over the OCP values: the test's own encoder.
fn e4m3_nearest(x: f32) -> u8 {
    let value = |b: u8| {
        let (e, m) = (i32::from((b >> 3) & 0xF), f32::from(b & 7));
        let v = if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) };
        if b & 0x80 != 0 { -v } else { v }
    };
    (0..=255u8).filter(|b| b & 0x7F != 0x7F).min_by(|&a, &b| (value(a) - x).abs().total_cmp(&(value(b) - x).abs())).expect("a code")
}

/// A tensor as a safetensors file stores it: name, dtype, shape, bytes.
type Stored = (String, &'static str, Vec<usize>, Vec<u8>);

/// `qwen3moe-tiny-a` written to a fresh directory (`tag`) with every linear weight (attention,
/// the dense MLP, each expert: `[rows, cols]` values) replaced by the tensors `store` makes of
/// it, and `quantization_config` in its config.
fn rewritten_checkpoint(tag: &str, quantization_config: serde_json::Value, store: impl Fn(&str, [usize; 2], &[f32]) -> Vec<Stored>) -> PathBuf {
    let from = fixtures().join("qwen3moe-tiny-a");
    let dir = std::env::temp_dir().join(format!("pio-qwen3moe-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bytes = std::fs::read(from.join("model.safetensors")).expect("fixture");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("header length")) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let data = &bytes[8 + n..];
    let (mut out_header, mut out_data) = (serde_json::Map::new(), Vec::new());
    let mut put = |name: &str, dtype: &str, shape: &[usize], raw: &[u8]| {
        out_header.insert(name.into(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [out_data.len(), out_data.len() + raw.len()]}));
        out_data.extend_from_slice(raw);
    };
    for (name, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let shape: Vec<usize> = info["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim") as usize).collect();
        let [start, end] = [0, 1].map(|i| info["data_offsets"][i].as_u64().expect("offset") as usize);
        let raw = &data[start..end];
        assert_eq!(info["dtype"], "BF16");
        if !(name.ends_with("_proj.weight") && shape.len() == 2) {
            put(name, "BF16", &shape, raw);
            continue;
        }
        let values: Vec<f32> = raw.chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect();
        for (tensor, dtype, shape, raw) in store(name, [shape[0], shape[1]], &values) {
            put(&tensor, dtype, &shape, &raw);
        }
    }
    let header = serde_json::to_vec(&out_header).expect("header");
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend_from_slice(&out_data);
    std::fs::write(dir.join("model.safetensors"), file).expect("write");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(from.join("config.json")).expect("config")).expect("json");
    config["quantization_config"] = quantization_config;
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).expect("json")).expect("write");
    for f in ["generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(from.join(f), dir.join(f)).expect("copy");
    }
    dir
}

/// Every linear weight as an FP8 checkpoint stores it: E4M3 bytes and an f32
/// `weight_scale_inv` per block of 32x32 (`quant_method` `fp8`, as Qwen's FP8 checkpoints).
fn fp8_checkpoint() -> PathBuf {
    const B: usize = 32;
    let config = serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [B, B]});
    rewritten_checkpoint("fp8", config, |name, [rows, cols], values| {
        let (br, bc) = (rows.div_ceil(B), cols.div_ceil(B));
        let scales: Vec<f32> = (0..br * bc)
            .map(|i| {
                let (r0, c0) = ((i / bc) * B, (i % bc) * B);
                let amax = (r0..(r0 + B).min(rows)).flat_map(|r| &values[r * cols + c0..r * cols + (c0 + B).min(cols)]).fold(0f32, |m, v| m.max(v.abs()));
                if amax > 0.0 { amax / 448.0 } else { 1.0 }
            })
            .collect();
        let codes: Vec<u8> = values.iter().enumerate().map(|(i, &v)| e4m3_nearest(v / scales[(i / cols / B) * bc + (i % cols) / B])).collect();
        let scale_name = format!("{}.weight_scale_inv", name.strip_suffix(".weight").expect("weight"));
        vec![(name.to_string(), "F8_E4M3", vec![rows, cols], codes), (scale_name, "F32", vec![br, bc], scales.iter().flat_map(|s| s.to_le_bytes()).collect())]
    })
}

/// Every linear weight as GPTQ (`checkpoint_format` `gptq_v2`) stores it: 4-bit codes with a
/// zero point and an f16 scale per group of 32 inputs, round-to-nearest, `qweight` `[in / 8,
/// out]` and `qzeros` `[groups, out / 8]` packed eight codes a word, low nibble first,
/// `g_idx` the inputs' groups in order.
fn gptq_checkpoint() -> PathBuf {
    const G: usize = 32;
    let config = serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": false, "sym": false, "checkpoint_format": "gptq_v2"});
    rewritten_checkpoint("gptq", config, |name, [rows, cols], values| {
        let groups = cols / G;
        let (mut codes, mut zeros, mut scales) = (vec![0u32; rows * cols], vec![0u32; groups * rows], vec![half::f16::ZERO; groups * rows]);
        for g in 0..groups {
            for o in 0..rows {
                let part = &values[o * cols + g * G..o * cols + (g + 1) * G];
                let (lo, hi) = part.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                let s = half::f16::from_f32((hi - lo) / 15.0);
                let s = if s.to_f32() == 0.0 { half::f16::ONE } else { s };
                let z = (-lo / s.to_f32()).round().clamp(0.0, 15.0);
                (scales[g * rows + o], zeros[g * rows + o]) = (s, z as u32);
                for (i, &v) in part.iter().enumerate() {
                    codes[o * cols + g * G + i] = ((v / s.to_f32()).round() + z).clamp(0.0, 15.0) as u32;
                }
            }
        }
        let word = |eight: &mut dyn Iterator<Item = u32>| eight.enumerate().fold(0u32, |w, (p, c)| w | (c << (4 * p)));
        let qweight: Vec<u8> = (0..cols / 8).flat_map(|iw| (0..rows).map(move |o| (iw, o))).flat_map(|(iw, o)| word(&mut (0..8).map(|p| codes[o * cols + 8 * iw + p])).to_le_bytes()).collect();
        let qzeros: Vec<u8> = (0..groups).flat_map(|g| (0..rows / 8).map(move |ow| (g, ow))).flat_map(|(g, ow)| word(&mut (0..8).map(|p| zeros[g * rows + 8 * ow + p])).to_le_bytes()).collect();
        let prefix = name.strip_suffix(".weight").expect("weight");
        vec![
            (format!("{prefix}.qweight"), "I32", vec![cols / 8, rows], qweight),
            (format!("{prefix}.qzeros"), "I32", vec![groups, rows / 8], qzeros),
            (format!("{prefix}.scales"), "F16", vec![groups, rows], scales.iter().flat_map(|s| s.to_le_bytes()).collect()),
            (format!("{prefix}.g_idx"), "I32", vec![cols], (0..cols).flat_map(|i| ((i / G) as i32).to_le_bytes()).collect()),
        ]
    })
}

/// An FP8 and a GPTQ checkpoint of the tiny MoE: their linear weights, the experts' included,
/// stay as codes (one quantized MLP per expert) and give what the same checkpoint dequantized
/// at load (`quantization = "none"`) gives, on the prompt path and one row a step.
#[test]
fn quantized_checkpoint_experts_keep_their_codes_and_match_their_dequantized_values() {
    use inference_pio_core::config::Quantization;
    use inference_pio_core::types::{DeviceRequest, LoadOptions, PluginSettings};
    use inference_pio_engine::plugin::load_engine;
    // Attention of 3 layers, the dense layer's MLP, 2 sparse layers x 8 experts x 3.
    for (dir, stored) in [(fp8_checkpoint(), "fp8 (E4M3) with a scale per 32 inputs: 63 of 63 linear weights"), (gptq_checkpoint(), "int4 in groups of 32: 63 of 63 linear weights")] {
        let load = |quantization: Option<Quantization>| {
            let options = LoadOptions { device: DeviceRequest::Cpu, dtype: Some(DType::F32), random_weights: None };
            let mut settings = PluginSettings::default();
            settings.optimization.prefill_chunk_tokens = Some(0);
            settings.optimization.quantization = quantization;
            load_engine(&FAMILY, &dir, &options, &settings).expect("loads the quantized checkpoint")
        };
        let (kept, info) = load(None);
        assert_eq!(info.quantization.split(',').next(), Some(stored), "{}", info.quantization);
        let (dense, info) = load(Some(Quantization::None));
        assert_eq!(info.quantization, "");
        let prompt: Vec<u32> = (0..16).map(|i| (i * 37 + 11) % 500 + 3).collect();
        let want = all_logits(&dense, &prompt);
        for (i, (g, w)) in all_logits(&kept, &prompt).iter().zip(&want).enumerate() {
            assert!(rel_l2(g, w) <= 1e-5, "{stored}: prompt position {i}: {}", rel_l2(g, w));
        }
        // Decode rows read the codes in place (the row loops), per expert.
        for (i, (a, b)) in incremental_logits(&kept, &prompt, 5, 4).iter().zip(&want).enumerate() {
            assert!(rel_l2(a, b) <= 1e-5, "{stored}: decode position {i}: {}", rel_l2(a, b));
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// llama.cpp's `qwen3moe` GGUF layout (`tests/fixtures/make_gguf_fixtures.py`): routers and
/// stacked experts. The BF16 twin holds the safetensors checkpoint's values, so it must give
/// that checkpoint's logits and tokens; the quantized twin keeps its blocks as codes (the
/// experts' Q4_1 and Q8_0 rows included) and must give what the same file dequantized gives.
#[test]
fn qwen3moe_gguf_files_load_with_their_stacked_experts() {
    // The 63 of the safetensors model (attention, the dense MLP, 16 experts x 3), the LM head
    // and the embedding table, which the file stores in Q8_0 too.
    inference_pio_engine::testing::check_gguf_twins(&FAMILY, &fixtures(), "qwen3moe-tiny-a", "mixed 4- and 8-bit groups: 65 of 65 linear weights");
}
