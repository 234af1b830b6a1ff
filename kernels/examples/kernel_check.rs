//! The CubeCL kernels against their reference versions, on CUDA, and timed there:
//! - the split matrix-vector kernel (`inference_pio_kernels::matvec`) on the decode shapes of
//!   Qwen3-4B and Qwen3-Coder-30B-A3B (dense rows and gathered experts), against
//!   `matvec_reference` (the gathered weights through `batched_linear`, the engine's path
//!   before the kernel);
//! - the paged decode-attention kernel (`inference_pio_kernels::paged::paged_decode_attention`)
//!   against the gathered keys and values through `gqa_attention`, over a pool in shuffled
//!   blocks, with padding, a partly seen context and a sliding window; the same kernel on a
//!   step's prefill chunks in one launch (`paged_attention_prefill_kernel`) against the gathered, masked
//!   reference (`paged_attention_reference`), chunks of mixed lengths over cached prefixes;
//!   both over int8 pages too (`kv_cache_dtype = "int8"`, against the reference over the
//!   dequantized values), and the KV write into int8 pages;
//!   prefill's scaled, masked softmax (`inference_pio_kernels::softmax`) against burn's
//!   operations;
//! - the fused RMSNorm, residual add + RMSNorm (`inference_pio_kernels::norm`) and SwiGLU
//!   (`inference_pio_kernels::activation`) kernels against the burn operations they replace,
//!   on Qwen3-4B's hidden, QK-norm (a strided view of the fused q|k|v output, one weight per
//!   head) and MLP shapes at 1, 32 and 2,048 rows; the fused QK-norm + rotary embedding
//!   (`inference_pio_kernels::rotary`) against the normalisation, transpose and rotation;
//! - the vision tower's LayerNorm (`inference_pio_kernels::norm::fused_layer_norm`) and f32
//!   rotation of queries and keys (`inference_pio_kernels::rotary::fused_rotary_f32`) at
//!   Qwen3-VL-2B's shapes for 448x448 and 1344x1344 images, against the burn operations;
//! - the many-row products through cuBLAS (`inference_pio_kernels::cublas`; linear layers on
//!   the `[out, in]` weight read in place, prefill attention's batched products over a cache
//!   view) against burn's (CubeCL's) matmul. (The weight-layout comparison of 2026-12-02,
//!   which settled that CubeCL's matmul was the prefill gap whatever the layout, is in git
//!   history and `benches/results/gpu-h200-2026-12-02-final/kernel_check.txt`.)
//!
//! - the quantized products (`inference_pio_kernels::quant`): the matrix-vector kernel (1, 2
//!   and 4 rows) and the dequantize-then-cuBLAS path (32 and 512 rows) for int8 per channel,
//!   int4 in groups of 128 and GGUF-like groups (4-bit in 32, 8-bit in 16) on Qwen3-4B's
//!   shapes, against the dequantized weight's dense product, timed beside the bf16 weight's
//!   product; the rate is the quantized bytes read per second (`KERNEL_CHECK_QUANT_ROWS=1,2`
//!   checks those row counts only).
//!
//! f32 and bf16; timings are CUDA-graph replays of ten calls. Exits non-zero when a result is
//! outside its tolerance: f32 1e-3 relative L2 (the reference runs in TF32), bf16 1e-2 for the
//! products and 2e-2 for attention (the reference rounds scores and probabilities to bf16);
//! the elementwise kernels 1e-4 in f32 and 1e-2 in bf16.
//!
//! `kernel_check` on a machine with CUDA runs every group; `kernel_check matvec attention
//! kv-write elementwise vision cublas quant launch` (any of them) runs those only (`launch`:
//! the cost of a kernel in a recorded chain, timings only; `prefill`: the prefill attention
//! checks of `attention` alone). `kernel_check flash` (only when
//! named) times cubek's flash attention beside the prefill reference's products. With cuBLAS loadable the engine keeps
//! weights unsplit (`split_parts` is 1), so the matvec group then checks the kernel on the
//! plain layout and times it against the cuBLAS product.

mod common;

use burn::tensor::{DType, Device, Distribution, FloatDType, Int, Tensor, TensorData};
use common::{time_graph, values};
use inference_pio_kernels::attention::gqa_attention;
use inference_pio_kernels::flash::{cubek_flash_attention, repeat_kv_heads};
use inference_pio_kernels::paged::{PagedLayout, Span, mask_values, paged_attention_prefill_kernel, paged_attention_reference, DecodeTuning, paged_decode_attention, paged_decode_attention_tuned};
use inference_pio_kernels::matvec::{gathered_split_matvec, matvec_reference, split_matvec, split_matvec_swiglu};
use inference_pio_kernels::activation::fused_swiglu_halves;
use inference_pio_kernels::argmax::fused_row_argmax;
use inference_pio_kernels::router::{combine_reference, fused_combine, fused_softmax_top_k, softmax_top_k_reference};
use inference_pio_kernels::norm::{add_rms_norm_reference, fused_add_rms_norm, fused_layer_norm, fused_rms_norm};
use inference_pio_kernels::reference::{layer_norm, rms_norm, swiglu_halves};
use inference_pio_kernels::rotary::{fused_qk_norm_rotary, fused_rotary_f32, fused_rotate_into_pages, qk_norm_rotary_reference, rotary_f32_reference};
use inference_pio_kernels::softmax::{fused_scaled_masked_softmax, fused_scaled_softmax, scaled_masked_softmax_reference};
use inference_pio_kernels::{batched_linear, split_parts, split_stacked, write_kv_pair, write_kv_slots};
use inference_pio_kernels::kv_pages::{KvCodes, KvPages, KvStorage, quantize_heads, quantize_heads_on_host};
use burn::tensor::IndexingUpdateOp;

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// What one call does, for a rate beside its time.
#[derive(Clone, Copy)]
enum Work {
    /// Bytes moved.
    Bytes(f64),
    /// Floating-point operations.
    Flops(f64),
}

/// One check: `kernel` against `reference` within `tol` relative L2, then `kernel` and
/// `before` (the path the kernel replaces) timed; `work` per call gives a rate. Prints one
/// line headed `label`; returns whether the check failed.
fn check(
    device: &Device,
    label: &str,
    tol: f64,
    work: Work,
    kernel: &dyn Fn() -> Tensor<2>,
    reference: &dyn Fn() -> Tensor<2>,
    before: &dyn Fn() -> Tensor<2>,
) -> bool {
    let (got, want) = match (values(kernel()), values(reference())) {
        (Ok(g), Ok(w)) => (g, w),
        (g, w) => {
            println!("{label}: failed to run: kernel {:?} reference {:?}", g.err(), w.err());
            return true;
        }
    };
    let err = rel_l2(&got, &want);
    let ok = err <= tol;
    // Each call's output is summed in f32, as the checks compare it.
    let timing = |op: &dyn Fn() -> Tensor<2>| match (time_graph(device, &|| op().cast(DType::F32)), work) {
        (Ok(s), Work::Bytes(bytes)) => format!("{:7.1} µs {:6.0} GB/s", s * 1e6, bytes / s / 1e9),
        (Ok(s), Work::Flops(flops)) => format!("{:7.1} µs {:6.1} TFLOP/s", s * 1e6, flops / s / 1e12),
        (Err(e), _) => format!("({e})"),
    };
    println!("{label}: rel L2 {err:.2e} {} | kernel {} | before {}", if ok { "ok" } else { "FAIL" }, timing(kernel), timing(before));
    !ok
}

struct Case {
    name: &'static str,
    experts: usize,
    out: usize,
    inp: usize,
    rows: usize,
    /// Input rows: each repeated `rows / x_rows` times (one token over its chosen experts).
    x_rows: usize,
}

fn main() {
    let device = Device::cuda(0usize);
    let cases = [
        Case { name: "4B q/k/v-like 2560->4096", experts: 1, out: 4096, inp: 2560, rows: 1, x_rows: 1 },
        Case { name: "4B gate/up 2560->9728", experts: 1, out: 9728, inp: 2560, rows: 1, x_rows: 1 },
        Case { name: "4B down 9728->2560", experts: 1, out: 2560, inp: 9728, rows: 1, x_rows: 1 },
        // The decoder's fused projections: q|k|v, and gate|up.
        Case { name: "4B fused q/k/v 2560->6144", experts: 1, out: 6144, inp: 2560, rows: 1, x_rows: 1 },
        Case { name: "4B fused gate/up 2560->19456", experts: 1, out: 19456, inp: 2560, rows: 1, x_rows: 1 },
        Case { name: "4B fused gate/up, 32 rows", experts: 1, out: 19456, inp: 2560, rows: 32, x_rows: 32 },
        Case { name: "4B head 2560->151936", experts: 1, out: 151936, inp: 2560, rows: 1, x_rows: 1 },
        Case { name: "4B gate/up, 8 rows", experts: 1, out: 9728, inp: 2560, rows: 8, x_rows: 8 },
        Case { name: "4B gate/up, 2 rows", experts: 1, out: 9728, inp: 2560, rows: 2, x_rows: 2 },
        Case { name: "4B fused gate/up, 2 rows", experts: 1, out: 19456, inp: 2560, rows: 2, x_rows: 2 },
        Case { name: "tiny fused gate/up 64->2x37, 2 rows", experts: 1, out: 74, inp: 64, rows: 2, x_rows: 2 },
        Case { name: "tiny dense 64->96, 5 rows", experts: 1, out: 96, inp: 64, rows: 5, x_rows: 5 },
        Case { name: "30B expert gate_up 2048->1536, 8 of 128", experts: 128, out: 1536, inp: 2048, rows: 8, x_rows: 1 },
        Case { name: "30B expert gate_up, 2 tokens", experts: 128, out: 1536, inp: 2048, rows: 16, x_rows: 2 },
        Case { name: "30B expert gate_up, 5 tokens", experts: 128, out: 1536, inp: 2048, rows: 40, x_rows: 5 },
        Case { name: "tiny expert 64->32, 5 tokens of 8 experts, top 2", experts: 8, out: 32, inp: 64, rows: 10, x_rows: 5 },
        Case { name: "30B expert down 768->2048, 8 of 128", experts: 128, out: 2048, inp: 768, rows: 8, x_rows: 8 },
        Case { name: "30B head 2048->151936", experts: 1, out: 151936, inp: 2048, rows: 1, x_rows: 1 },
    ];
    let mut failed = 0;
    // `kernel_check [matvec] [attention] [kv-write] [elementwise] [vision] [cublas] [quant]`: those
    // groups only (all without arguments; `attention` includes `kv-write`).
    let chosen: Vec<String> = std::env::args().skip(1).collect();
    const GROUPS: [&str; 10] = ["matvec", "attention", "prefill", "kv-write", "elementwise", "vision", "cublas", "quant", "launch", "flash"];
    if let Some(unknown) = chosen.iter().find(|a| !GROUPS.contains(&a.as_str())) {
        eprintln!("kernel_check: unknown group `{unknown}`; the groups are {}", GROUPS.join(", "));
        std::process::exit(2);
    }
    let runs = |group: &str| chosen.is_empty() || chosen.iter().any(|a| a == group);
    for case in cases.iter().filter(|_| runs("matvec")) {
        for dtype in [DType::F32, DType::BF16] {
            let parts = split_parts(case.inp, &device);
            let w = Tensor::<3>::random([case.experts, case.out, case.inp], Distribution::Uniform(-0.05, 0.05), &device).cast(dtype);
            let w = split_stacked(w, parts);
            let x = Tensor::<2>::random([case.x_rows, case.inp], Distribution::Uniform(-1.0, 1.0), &device).cast(dtype);
            // As the router makes them: the top-k of random logits, token-major.
            let experts = if case.experts > 1 {
                let k = case.rows / case.x_rows;
                let logits = Tensor::<2>::random([case.x_rows, case.experts], Distribution::Uniform(-1.0, 1.0), &device);
                logits.topk_with_indices(k, 1).1.reshape([case.rows])
            } else {
                Tensor::<1, Int>::zeros([case.rows], &device)
            };
            let reference = || matvec_reference(x.clone(), &w, experts.clone());
            let kernel = || {
                if case.experts == 1 {
                    split_matvec(x.clone(), &w.clone().reshape([parts, case.out, case.inp / parts]))
                } else {
                    gathered_split_matvec(x.clone(), &w, experts.clone())
                }
            };
            // The engine's path before the kernel: split-K as a batched matmul and an f32 sum.
            let dense = || {
                let w = w.clone().reshape([1, parts, case.out, case.inp / parts]);
                batched_linear(x.clone().unsqueeze_dim(0), w).squeeze_dim(0)
            };
            // The reference's f32 matmul runs in TF32 on the H200 (about 3e-4 from exact f32).
            let tol = if dtype == DType::F32 { 1e-3 } else { 1e-2 };
            let bytes = (case.rows.min(case.experts) * case.out * case.inp * dtype.size()) as f64;
            let label = format!("{:42} {:5} parts {:2}", case.name, format!("{dtype:?}"), parts);
            let before: &dyn Fn() -> Tensor<2> = if case.experts == 1 { &dense } else { &reference };
            failed += usize::from(check(&device, &label, tol, Work::Bytes(bytes), &kernel, &reference, before));
            // A `[gate | up]` product with the SwiGLU gate in its kernel: the bits of the
            // product and the gate's own kernel, timed against the two.
            if case.experts == 1 && case.name.contains("gate/up") && case.rows <= 2 {
                let w = w.clone().reshape([parts, case.out, case.inp / parts]);
                let fused = || split_matvec_swiglu(x.clone(), &w);
                let two = || fused_swiglu_halves(split_matvec(x.clone(), &w));
                let label = format!("{:42} {:5} SwiGLU in the product", case.name, format!("{dtype:?}"));
                failed += usize::from(check(&device, &label, 0.0, Work::Bytes(bytes), &fused, &two, &two));
            }
        }
    }
    if runs("attention") {
        failed += check_attention(&device);
    }
    if runs("attention") || runs("prefill") {
        failed += check_prefill_attention(&device);
    }
    if runs("attention") || runs("kv-write") {
        failed += check_kv_write(&device);
    }
    if runs("elementwise") {
        failed += check_elementwise(&device);
    }
    if runs("vision") {
        failed += check_vision(&device);
    }
    if runs("launch") {
        time_kernel_chains(&device);
    }
    if runs("cublas") {
        failed += check_cublas(&device);
    }
    if runs("quant") {
        failed += check_quant(&device);
    }
    // Only when named: a measurement of a kernel the engine does not run.
    if chosen.iter().any(|a| a == "flash") {
        failed += check_flash(&device);
    }
    if failed > 0 {
        println!("{failed} checks failed");
        std::process::exit(1);
    }
    println!("all checks passed");
}

/// The paged decode-attention kernel against `gqa_attention` over the gathered keys and
/// values (the reference the engine runs where the kernel does not apply): one query token
/// per row over a pool whose blocks of 16 slots are handed out in shuffled order, row `r`
/// seeing `seen - r % 3` tokens of a `width`-slot table (the rest padding), optionally in a
/// window; the row counts cover both the split context (few rows) and one cube per row.
fn check_attention(device: &Device) -> usize {
    let mut failed = 0;
    let bt = 16usize;
    // (name, rows, heads, kv heads, head dim, width, seen, window)
    let cases = [
        ("4B paged attention, 1 row, 100 of 256", 1, 32, 8, 128, 256, 100, None),
        ("4B paged attention, 1 row, 3000 of 3072", 1, 32, 8, 128, 3072, 3000, None),
        ("4B paged attention, 1 row, 300 of 4096 (a wide padded table)", 1, 32, 8, 128, 4096, 300, None),
        ("30B paged attention, 1 row, window 64, 1000 of 2048", 1, 32, 4, 128, 2048, 1000, Some(64)),
        ("4B paged attention, 32 rows, 256 of 256", 32, 32, 8, 128, 256, 256, None),
        ("4B paged attention, 256 rows, 600 of 768", 256, 32, 8, 128, 768, 600, None),
        ("30B paged attention, 2 rows, window 64", 2, 32, 4, 128, 256, 200, Some(64)),
        ("GLM paged attention, 8 rows, 12 per key head", 8, 96, 8, 128, 512, 500, None),
        ("30B paged attention, 256 rows, 600 of 768", 256, 32, 4, 128, 768, 600, None),
        ("VL-2B paged attention, 64 rows, 2 per key head", 64, 16, 8, 128, 1024, 900, None),
        ("tiny paged attention, 7 of 16", 2, 4, 2, 16, 16, 7, None),
    ];
    for (name, rows, heads, kv, dim, width, seen, window) in cases {
        let max_blocks = width / bt;
        let blocks = rows * max_blocks + 3;
        // Block b of row r is pool block order[r * max_blocks + b].
        let mut order: Vec<usize> = (0..blocks).collect();
        order.reverse();
        order.rotate_left(blocks / 3);
        let table: Vec<i64> = (0..rows * max_blocks).map(|i| order[i] as i64).collect();
        let table = Tensor::<2, Int>::from_data(TensorData::new(table, [rows, max_blocks]), device);
        let lens: Vec<i64> = (0..rows).map(|r: usize| usize::saturating_sub(seen, r % 3).max(1) as i64).collect();
        let slots: Vec<i64> = (0..rows * width).map(|i| (order[i / bt] * bt + i % bt) as i64).collect();
        let slots = Tensor::<1, Int>::from_data(TensorData::new(slots, [rows * width]), device);
        let masks: Vec<f32> = lens.iter().flat_map(|&l| mask_values(1, l as usize, width, window)).collect();
        let mask = Tensor::<5>::from_data(TensorData::new(masks, [rows, 1, 1, 1, width]), device);
        let lens = Tensor::<1, Int>::from_data(TensorData::new(lens, [rows]), device);
        for dtype in [DType::F32, DType::BF16] {
            let q = Tensor::<3>::random([rows, heads, dim], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
            let k = Tensor::<3>::random([blocks * bt, kv, dim], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
            let v = Tensor::<3>::random([blocks * bt, kv, dim], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
            let scale = (dim as f64).powf(-0.5);
            let (k, v) = (KvPages::Dense(k), KvPages::Dense(v));
            let kernel = || match paged_decode_attention(q.clone(), &k, &v, &table, &lens, bt, window, scale) {
                Some(out) => out.reshape([rows * heads, dim]),
                None => panic!("{name}: the paged decode-attention kernel does not apply"),
            };
            let gathered = |pool: &KvPages| pool.select(slots.clone(), dtype).reshape([rows, width, kv, dim]).swap_dims(1, 2);
            let reference = || {
                let q4 = q.clone().reshape([rows, heads, 1, dim]);
                gqa_attention(q4, &gathered(&k), &gathered(&v), Some(&mask), scale).reshape([rows * heads, dim])
            };
            // The reference rounds its scores and probabilities to the dtype; the kernel keeps
            // them in f32. Bytes: the keys and values each row sees, once.
            let tol = if dtype == DType::F32 { 1e-3 } else { 2e-2 };
            let label = format!("{name:46} {:5}", format!("{dtype:?}"));
            let bytes = (rows * seen.min(window.unwrap_or(usize::MAX)) * kv * dim * 2 * dtype.size()) as f64;
            failed += usize::from(check(device, &label, tol, Work::Bytes(bytes), &kernel, &reference, &reference));
            // The tile sizes the kernel can take (score passes of `32 / 4` keys each), the
            // default above; bf16 only.
            if dtype == DType::BF16 {
                for passes in [4usize, 2, 1] {
                    let tuning = DecodeTuning { passes: Some(passes), ..DecodeTuning::default() };
                    let tiled = || match paged_decode_attention_tuned(q.clone(), &k, &v, &table, &lens, bt, window, scale, tuning) {
                        Some(out) => out.reshape([rows * heads, dim]),
                        None => panic!("{name}: the paged decode-attention kernel does not apply"),
                    };
                    let label = format!("{name:46} BF16  {passes} passes");
                    failed += usize::from(check(device, &label, tol, Work::Bytes(bytes), &tiled, &reference, &kernel));
                }
                // An int8 cache (`kv_cache_dtype = "int8"`), then an fp8 one: the same keys and
                // values quantized, the kernel against the reference over the decoded ones;
                // timed against the bf16 kernel. Bytes: a head's codes and its scale.
                let everything = Tensor::<1, Int>::arange(0..(blocks * bt) as i64, device);
                let coded = |format: KvCodes, pool: &KvPages| KvPages::zeroed(KvStorage::Coded(format), [blocks * bt, kv, dim], device).write(everything.clone(), pool.values(DType::F32));
                let bytes8 = (rows * seen.min(window.unwrap_or(usize::MAX)) * kv * (dim + 4) * 2) as f64;
                for format in [KvCodes::Fp8, KvCodes::Int8] {
                    let (kc, vc) = (coded(format, &k), coded(format, &v));
                    let tuned = |tuning: DecodeTuning| match paged_decode_attention_tuned(q.clone(), &kc, &vc, &table, &lens, bt, window, scale, tuning) {
                        Some(out) => out.reshape([rows * heads, dim]),
                        None => panic!("{name}: the paged decode-attention kernel does not take {} pages", format.name()),
                    };
                    let kernel_coded = || tuned(DecodeTuning::default());
                    let reference_coded = || {
                        let q4 = q.clone().reshape([rows, heads, 1, dim]);
                        gqa_attention(q4, &gathered(&kc), &gathered(&vc), Some(&mask), scale).reshape([rows * heads, dim])
                    };
                    let label = format!("{name:46} {} KV", format.name().to_uppercase());
                    failed += usize::from(check(device, &label, tol, Work::Bytes(bytes8), &kernel_coded, &reference_coded, &kernel));
                    // Int8 codes' other conversion to f32 (bits or instruction: the same
                    // values), timed against the engine's.
                    if format == KvCodes::Int8 {
                        let other = DecodeTuning { codes_via_bits: !DecodeTuning::default().codes_via_bits, ..DecodeTuning::default() };
                        let kernel_other = || tuned(other);
                        let how = if other.codes_via_bits { "bits" } else { "cast" };
                        let label = format!("{label}, codes by {how}");
                        failed += usize::from(check(device, &label, tol, Work::Bytes(bytes8), &kernel_other, &reference_coded, &kernel_coded));
                    }
                }
            }
        }
    }
    // Prefill's scaled, masked softmax (`inference_pio_kernels::softmax`) against the burn
    // operations it replaces: causal masks, the second batch entry left-padded by 3.
    for (batch, kv, group, t) in [(2usize, 2usize, 2usize, 7usize), (1, 8, 4, 512), (1, 8, 4, 2048)] {
        for dtype in [DType::F32, DType::BF16] {
            let scores = Tensor::<4>::random([batch, kv, group * t, t], Distribution::Uniform(-30.0, 30.0), device).cast(dtype);
            let values: Vec<f32> = (0..batch * t * t)
                .map(|i| {
                    let (b, q, s) = (i / (t * t), (i / t) % t, i % t);
                    if s <= q && s >= 3 * b { 0.0 } else { -1.0e9 }
                })
                .collect();
            let mask = Tensor::<5>::from_data(TensorData::new(values, [batch, 1, 1, t, t]), device);
            let scale = 128f64.powf(-0.5);
            let flat = |x: Tensor<4>| x.reshape([batch * kv * group * t, t]);
            let kernel = || flat(fused_scaled_masked_softmax(scores.clone(), &mask, scale, t));
            let reference = || flat(scaled_masked_softmax_reference(scores.clone(), Some(&mask), scale, t));
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
            let bytes = Work::Bytes((2 * batch * kv * group * t * t * dtype.size()) as f64);
            let label = format!("softmax {batch} x {kv} x {group} x {t:5} tokens {:5}", format!("{dtype:?}"));
            failed += usize::from(check(device, &label, tol, bytes, &kernel, &reference, &reference));
        }
    }
    // Unmasked (a vision tower's full attention within an image): Qwen3-VL's 16 heads over a
    // 448-pixel image's 784 patches and a 1344-pixel image's 7,056.
    for patches in [784usize, 7056] {
        let scores = Tensor::<4>::random([1, 16, patches, patches], Distribution::Uniform(-30.0, 30.0), device).cast(DType::BF16);
        let flat = |x: Tensor<4>| x.reshape([16 * patches, patches]);
        let kernel = || flat(fused_scaled_softmax(scores.clone(), 0.125));
        let reference = || flat(scaled_masked_softmax_reference(scores.clone(), None, 0.125, patches));
        let bytes = Work::Bytes((2 * 16 * patches * patches * 2) as f64);
        failed += usize::from(check(device, &format!("unmasked softmax 16 x {patches:5}² BF16"), 1e-2, bytes, &kernel, &reference, &reference));
    }
    failed
}

/// The prefill attention kernel (`paged_attention_prefill_kernel`: every chunk of the step in
/// one launch, as `paged_attention` runs it where its cost model favours it) against the reference (`paged_attention_reference`: each run of chunks of one shape
/// gathered, masked and through `gqa_attention`, the engine's path before the kernel), over a
/// pool whose blocks are handed out in shuffled order: chunks of different lengths, over
/// cached prefixes, with and without a window. Flops: the causal products' multiply-adds.
fn check_prefill_attention(device: &Device) -> usize {
    let mut failed = 0;
    let bt = 16usize;
    // (name, heads, kv heads, head dim, chunks as (queries, context), window)
    type PrefillCase = (&'static str, usize, usize, usize, Vec<(usize, usize)>, Option<usize>);
    let cases: [PrefillCase; 7] = [
        ("4B prefill, 16 x 512 (the offline workload's step)", 32, 8, 128, vec![(512, 512); 16], None),
        ("4B prefill, one 2048-token prompt", 32, 8, 128, vec![(2048, 2048)], None),
        ("4B prefill, mixed lengths over cached prefixes", 32, 8, 128, vec![(512, 512), (64, 2112), (7, 7), (100, 300), (33, 33), (2, 40)], None),
        ("4B prefill, 20-token prompt", 32, 8, 128, vec![(20, 20)], None),
        ("30B prefill, window 64", 32, 4, 128, vec![(200, 1000), (33, 33), (130, 130)], Some(64)),
        ("GLM prefill, 12 per key head", 96, 8, 128, vec![(100, 500), (37, 37)], None),
        ("VL-2B prefill, 2 per key head", 16, 8, 128, vec![(300, 300), (5, 900)], None),
    ];
    for (name, heads, kv, dim, chunks, window) in cases {
        // Blocks in shuffled order: chunk c's blocks from a reversed, rotated list.
        let need: Vec<usize> = chunks.iter().map(|&(_, c)| c.div_ceil(bt)).collect();
        let blocks = need.iter().sum::<usize>() + 3;
        let mut order: Vec<u32> = (0..blocks as u32).collect();
        order.reverse();
        order.rotate_left(blocks / 3);
        let mut next = 0;
        let spans: Vec<Span> = chunks
            .iter()
            .zip(&need)
            .map(|(&(queries, context), &n)| {
                let span = Span { queries, context, blocks: order[next..next + n].to_vec() };
                next += n;
                span
            })
            .collect();
        let tokens: usize = chunks.iter().map(|&(q, _)| q).sum();
        let layout = PagedLayout::new(&spans, bt, &[window], device);
        // Dense pools, but for the mixed case: int8 pages under f32 queries, and besides the
        // dense bf16 pools fp8 pages under bf16 queries.
        let mixed = name.contains("mixed");
        let runs: Vec<(DType, Option<KvCodes>)> = if mixed {
            vec![(DType::F32, Some(KvCodes::Int8)), (DType::BF16, None), (DType::BF16, Some(KvCodes::Fp8))]
        } else {
            vec![(DType::F32, None), (DType::BF16, None)]
        };
        for (dtype, codes) in runs {
            let q = Tensor::<3>::random([tokens, heads, dim], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
            let k = Tensor::<3>::random([blocks * bt, kv, dim], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
            let v = Tensor::<3>::random([blocks * bt, kv, dim], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
            let scale = (dim as f64).powf(-0.5);
            let (k, v) = match codes {
                Some(format) => {
                    let everything = Tensor::<1, Int>::arange(0..(blocks * bt) as i64, device);
                    let coded = |pool: Tensor<3>| KvPages::zeroed(KvStorage::Coded(format), [blocks * bt, kv, dim], device).write(everything.clone(), pool);
                    (coded(k), coded(v))
                }
                None => (KvPages::Dense(k), KvPages::Dense(v)),
            };
            let kernel = || paged_attention_prefill_kernel(q.clone(), &k, &v, &layout, window, scale).reshape([tokens * heads, dim]);
            let reference = || paged_attention_reference(q.clone(), &k, &v, &layout, window, scale).reshape([tokens * heads, dim]);
            let tol = if dtype == DType::F32 { 1e-3 } else { 2e-2 };
            let pairs: usize = chunks
                .iter()
                .map(|&(queries, context)| (context - queries + 1..=context).map(|l| l.min(window.unwrap_or(usize::MAX))).sum::<usize>())
                .sum();
            let flops = Work::Flops((4 * pairs * heads * dim) as f64);
            let stored = codes.map_or(String::new(), |c| format!(" {} KV", c.name().to_uppercase()));
            let label = format!("{name:52} {:5}{stored}", format!("{dtype:?}"));
            failed += usize::from(check(device, &label, tol, flops, &kernel, &reference, &reference));
        }
    }
    failed
}

/// cubek's flash attention (`inference_pio_kernels::flash`) against the prefill reference's
/// products (`gqa_attention` over the whole causal square, the mask added), timed: one prompt
/// of Qwen3-4B's heads (32 query heads, 8 key heads of 128) of 2,048 and of 512 tokens, bf16,
/// 2, 4 and 8 planes a cube (what burn's autotune tries). cubek takes as many key
/// heads as query heads, so its keys and values are repeated to 32 heads, inside its timing.
/// A configuration the routine refuses is reported and counted as failed; the others still run.
fn check_flash(device: &Device) -> usize {
    let mut failed = 0;
    for tokens in [2048usize, 512] {
        let (heads, kv, d) = (32usize, 8usize, 128usize);
        for dtype in [DType::BF16] {
            let random = |heads: usize| Tensor::<4>::random([1, heads, tokens, d], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
            let (q, k, v) = (random(heads), random(kv), random(kv));
            let mask = Tensor::<5>::from_data(TensorData::new(mask_values(tokens, tokens, tokens, None), [1, 1, 1, tokens, tokens]), (device, DType::F32));
            let scale = (d as f64).powf(-0.5);
            let reference = || gqa_attention(q.clone(), &k, &v, Some(&mask), scale).reshape([heads * tokens, d]);
            // The causal pairs' multiply-adds, as the prefill checks count them.
            let flops = Work::Flops((4 * heads * d * tokens * (tokens + 1) / 2) as f64);
            for planes in [2usize, 4, 8] {
                let kernel = || cubek_flash_attention(q.clone(), repeat_kv_heads(&k, heads), repeat_kv_heads(&v, heads), true, planes).expect("a CUDA device").reshape([heads * tokens, d]);
                let label = format!("flash (cubek, {planes} planes), {tokens} tokens, {heads} heads over {kv} of {d} {:5}", format!("{dtype:?}"));
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(device, &label, 2e-2, flops, &kernel, &reference, &reference))) {
                    Ok(bad) => failed += usize::from(bad),
                    Err(_) => {
                        println!("{label}: did not run (the panic above)");
                        failed += 1;
                    }
                }
            }
        }
    }
    failed
}

/// The KV pool write (`inference_pio_kernels::kv_write`) against burn's `select_assign` (the
/// path before it), exactly: a step's keys (a view inside a fused q|k|v output, as the decoder
/// passes them) into scattered slots of a pool. Both timings include a copy of the pool (the
/// check keeps its input, so neither writes in place): 32 MiB in bf16.
fn check_kv_write(device: &Device) -> usize {
    let mut failed = 0;
    let (slots, heads, kv, dim) = (16_384usize, 32usize, 8usize, 128usize);
    for (tokens, dtype) in [(1usize, DType::BF16), (256, DType::BF16), (8192, DType::BF16), (37, DType::F32)] {
        let pool = Tensor::<3>::random([slots, kv, dim], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
        let qkv = Tensor::<3>::random([tokens, heads + 2 * kv, dim], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
        let k = qkv.clone().narrow(1, heads, kv);
        // Distinct slots spread over the pool (7,919 is odd, so i -> 7,919 i mod 2^14 is one-to-one).
        let idx: Vec<i64> = (0..tokens).map(|i| ((i * 7919 + 13) % slots) as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [tokens]), device);
        let flat = |t: Tensor<3>| t.reshape([slots * kv, dim]);
        let kernel = || flat(write_kv_slots(pool.clone(), idx.clone(), k.clone()));
        let reference = || flat(pool.clone().select_assign(0, idx.clone(), k.clone(), IndexingUpdateOp::Assign));
        let label = format!("kv write {tokens:5} tokens x {kv} x {dim} {:5} into {slots}", format!("{dtype:?}"));
        let bytes = (2 * tokens * kv * dim * dtype.size()) as f64;
        failed += usize::from(check(device, &label, 0.0, Work::Bytes(bytes), &kernel, &reference, &reference));
        // Keys and values in one launch (`write_kv_pair`), against two `select_assign`s; timed
        // against the two single writes it replaces.
        let v = qkv.narrow(1, heads + kv, kv);
        let v_pool = pool.clone().mul_scalar(0.5);
        let both = |(a, b): (Tensor<3>, Tensor<3>)| Tensor::cat(vec![flat(a), flat(b)], 0);
        let kernel = || both(write_kv_pair(pool.clone(), v_pool.clone(), idx.clone(), k.clone(), v.clone()));
        let reference = || {
            both((
                pool.clone().select_assign(0, idx.clone(), k.clone(), IndexingUpdateOp::Assign),
                v_pool.clone().select_assign(0, idx.clone(), v.clone(), IndexingUpdateOp::Assign),
            ))
        };
        let singles = || both((write_kv_slots(pool.clone(), idx.clone(), k.clone()), write_kv_slots(v_pool.clone(), idx.clone(), v.clone())));
        failed += usize::from(check(device, &format!("{label} keys+values"), 0.0, Work::Bytes(2.0 * bytes), &kernel, &reference, &singles));
        // Into int8 and fp8 pages: the codes and scales as the engine writes them
        // (`KvPages::write`: the fused quantize-and-write kernel on CubeCL devices) against the
        // reference (int8: burn's operations, `quantize_heads` then `select_assign`; fp8: the
        // host loop, `quantize_heads_on_host`; both round half to even), and the values read
        // back against the written ones, to the rounding (int8: a step is 1/127 of a head's
        // largest value; fp8: 1/16 of each value at most). Timed against the reference (fp8:
        // its codes made once beforehand, a host loop cannot be captured in a CUDA graph; so
        // only their write is timed).
        if dtype == DType::BF16 {
            for format in [KvCodes::Int8, KvCodes::Fp8] {
                let pages = KvPages::zeroed(KvStorage::Coded(format), [slots, kv, dim], device);
                let written = || pages.clone().write(idx.clone(), k.clone());
                let host_codes = (format == KvCodes::Fp8).then(|| quantize_heads_on_host(format, k.clone()));
                let reference_codes = || match &host_codes {
                    Some(made) => made.clone(),
                    None => quantize_heads(k.clone()),
                };
                let parts = |p: KvPages| match p {
                    KvPages::Coded { codes, scales, .. } => (codes, scales),
                    KvPages::Dense(_) => unreachable!("coded pages"),
                };
                let bytes_of = |codes: Tensor<3, Int>| codes.cast(FloatDType::F32).reshape([slots * kv, dim]);
                let kernel = || bytes_of(parts(written()).0);
                let reference = || {
                    let (q, _) = reference_codes();
                    bytes_of(parts(pages.clone()).0.select_assign(0, idx.clone(), q, IndexingUpdateOp::Assign))
                };
                let label = format!("kv write {tokens:5} tokens x {kv} x {dim} {:5} into {slots}", format.name().to_uppercase());
                let bytes8 = (tokens * kv * (dim * 2 + dim + 4)) as f64;
                failed += usize::from(check(device, &format!("{label} codes"), 1e-4, Work::Bytes(bytes8), &kernel, &reference, &reference));
                let kernel_scales = || parts(written()).1.reshape([slots, kv]);
                let reference_scales = || {
                    let (_, s) = reference_codes();
                    parts(pages.clone()).1.select_assign(0, idx.clone(), s, IndexingUpdateOp::Assign).reshape([slots, kv])
                };
                failed += usize::from(check(device, &format!("{label} scales"), 1e-6, Work::Bytes(bytes8), &kernel_scales, &reference_scales, &reference_scales));
                let back = || flat(written().values(DType::F32));
                let zeros = Tensor::<3>::zeros([slots, kv, dim], (device, dtype));
                let dense = || flat(zeros.clone().select_assign(0, idx.clone(), k.clone(), IndexingUpdateOp::Assign).cast(DType::F32));
                let tol = if format == KvCodes::Int8 { 1e-2 } else { 5e-2 };
                failed += usize::from(check(device, &format!("{label} values"), tol, Work::Bytes(bytes8), &back, &dense, &dense));
            }
        }
    }
    failed
}

/// The normalisation and SwiGLU kernels against the burn operations the engine ran before
/// them (the references), which are also the "before" timings.
fn check_elementwise(device: &Device) -> usize {
    let mut failed = 0;
    // Greedy decoding's token pick (`inference_pio_kernels::argmax`) over Qwen3's vocabulary:
    // the index must hold the row's largest value and be the first that does (bf16 rows have
    // many equal values), checked on the host; timed against burn's argmax.
    for rows in [1usize, 256] {
        for dtype in [DType::F32, DType::BF16] {
            let vocab = 151_936;
            let logits = Tensor::<2>::random([rows, vocab], Distribution::Uniform(-10.0, 10.0), device).cast(dtype);
            let (Ok(ids), Ok(host)) = (values(fused_row_argmax(logits.clone()).float().reshape([rows, 1])), values(logits.clone())) else {
                println!("argmax {rows} rows {dtype:?}: FAIL (cannot read back)");
                failed += 1;
                continue;
            };
            let bad = (0..rows)
                .filter(|&r| {
                    let row = &host[r * vocab..(r + 1) * vocab];
                    let top = row.iter().cloned().fold(f32::MIN, f32::max);
                    row.iter().position(|&x| x == top) != Some(ids[r] as usize)
                })
                .count();
            let time = |op: &dyn Fn() -> Tensor<2>| time_graph(device, op).map_or_else(|e| format!("({e})"), |s| format!("{:7.1} µs", s * 1e6));
            let kernel = time(&|| fused_row_argmax(logits.clone()).float().reshape([rows, 1]));
            let burn = time(&|| logits.clone().argmax(1).float());
            println!("argmax {rows:3} rows x {vocab} {dtype:?}: {} | kernel {kernel} | burn {burn}", if bad == 0 { "ok" } else { "FAIL" });
            failed += usize::from(bad > 0);
        }
    }
    // A mixture-of-experts router's softmax and top-k (`inference_pio_kernels::router`):
    // Qwen3-MoE's 128 experts choosing 8, and 60 choosing 4 (Qwen2-MoE: lanes past the end),
    // the ids equal and the weights within 1e-5, timed against burn's operations.
    for (experts, k, dtype) in [(128usize, 8usize, DType::F32), (128, 8, DType::BF16), (60, 4, DType::F32)] {
        for rows in [1usize, 8, 256] {
            for normalize in [true, false] {
                let logits = Tensor::<2>::random([rows, experts], Distribution::Uniform(-4.0, 4.0), device).cast(dtype);
                let tag = format!("router top-{k} of {experts:3} {dtype:?} {rows:3} rows{}", if normalize { " normalised" } else { "" });
                let ids = |(i, _): (Tensor<2, Int>, Tensor<2>)| i.float();
                let weights = |(_, w): (Tensor<2, Int>, Tensor<2>)| w;
                let bytes = Work::Bytes((rows * (experts + 2 * k) * 4) as f64);
                let kernel = || ids(fused_softmax_top_k(logits.clone(), k, normalize));
                let reference = || ids(softmax_top_k_reference(logits.clone(), k, normalize));
                failed += usize::from(check(device, &format!("{tag} ids"), 0.0, Work::Bytes(0.0), &kernel, &reference, &reference));
                let kernel = || weights(fused_softmax_top_k(logits.clone(), k, normalize));
                let reference = || weights(softmax_top_k_reference(logits.clone(), k, normalize));
                failed += usize::from(check(device, &format!("{tag} weights"), 1e-5, bytes, &kernel, &reference, &reference));
            }
        }
    }
    // The experts' outputs weighted and summed (`inference_pio_kernels::router::combine`):
    // Qwen3-Coder-30B-A3B's 2,048 wide, 8 experts a token, the weights a strided view (the
    // second half of the router kernel's `[rows, 2k]` picks).
    for dtype in [DType::F32, DType::BF16] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 5e-3 };
        for rows in [1usize, 8, 64] {
            let (k, width) = (8, 2048);
            let slots = Tensor::<2>::random([rows * k, width], Distribution::Uniform(-2.0, 2.0), device).cast(dtype);
            let picks = Tensor::<2>::random([rows, 2 * k], Distribution::Uniform(0.0, 1.0), device);
            let weights = picks.narrow(1, k, k);
            let kernel = || fused_combine(slots.clone(), weights.clone());
            let reference = || combine_reference(slots.clone(), weights.clone());
            let bytes = Work::Bytes(((rows * k + rows) * width * dtype.size()) as f64);
            failed += usize::from(check(device, &format!("moe combine {k} x {width} {dtype:?} {rows:3} rows"), tol, bytes, &kernel, &reference, &reference));
        }
    }
    let eps = 1e-6;
    let (hidden, heads, kv, dim, inner) = (2560, 32, 8, 128, 9728);
    for dtype in [DType::F32, DType::BF16] {
        let tol = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
        let random = |shape: [usize; 2], low: f64, high: f64| Tensor::<2>::random(shape, Distribution::Uniform(low, high), device).cast(dtype);
        let weight = random([1, hidden], 0.5, 1.5).reshape([hidden]);
        let head_weights = random([heads + kv, dim], 0.5, 1.5);
        for rows in [1, 32, 2048] {
            let tag = format!("{:5} {rows:4} rows", format!("{dtype:?}"));
            let bytes = |elements: usize| Work::Bytes((elements * dtype.size()) as f64);
            // The final norm: x read once, written once.
            let x = random([rows, hidden], -2.0, 2.0);
            let kernel = || fused_rms_norm(x.clone(), &weight, eps);
            let reference = || rms_norm(x.clone(), &weight, eps);
            failed += usize::from(check(device, &format!("rms_norm {hidden:18} {tag}"), tol, bytes(2 * rows * hidden), &kernel, &reference, &reference));
            // The residual add with the norm after it: two reads, two writes.
            let y = random([rows, hidden], -2.0, 2.0);
            let both = |(sum, normed): (Tensor<2>, Tensor<2>)| Tensor::cat(vec![sum, normed], 1);
            let kernel = || both(fused_add_rms_norm(x.clone(), y.clone(), &weight, eps));
            let reference = || both(add_rms_norm_reference(x.clone(), y.clone(), &weight, eps));
            failed += usize::from(check(device, &format!("add + rms_norm {hidden:12} {tag}"), tol, bytes(4 * rows * hidden), &kernel, &reference, &reference));
            // QK-norm: queries and keys, a view inside the fused q|k|v output.
            let qkv_view = |batch: usize, tokens: usize| {
                let qkv = random([rows, (heads + 2 * kv) * dim], -2.0, 2.0).reshape([batch, tokens, heads + 2 * kv, dim]);
                qkv.narrow(2, 0, heads + kv)
            };
            let qk = qkv_view(1, rows);
            let flat = |t: Tensor<4>| t.reshape([rows * (heads + kv), dim]);
            let kernel = || flat(fused_rms_norm(qk.clone(), &head_weights, eps));
            let reference = || flat(rms_norm(qk.clone(), &head_weights, eps));
            failed += usize::from(check(device, &format!("qk-norm {:3} heads x {dim:7} {tag}", heads + kv), tol, bytes(2 * rows * (heads + kv) * dim), &kernel, &reference, &reference));
            // QK-norm and rotary embedding in one kernel: the tokens of one row (prefill) and
            // one token of each row (batched decode), full and partial (half) rotation.
            for (batch, tokens, rotary) in [(1, rows, dim), (rows, 1, dim), (1, rows, dim / 2)] {
                let qk = qkv_view(batch, tokens);
                let angles = Tensor::<4>::random([batch, 1, tokens, rotary / 2], Distribution::Uniform(0.0, 100.0), device);
                let angles = Tensor::cat(vec![angles.clone(), angles], 3);
                let (cos, sin) = (angles.clone().cos().cast(dtype), angles.sin().cast(dtype));
                let flat = |t: Tensor<4>| t.reshape([rows * (heads + kv), dim]);
                let kernel = || flat(fused_qk_norm_rotary(qk.clone(), &head_weights, &cos, &sin, eps));
                let reference = || flat(qk_norm_rotary_reference(qk.clone(), &head_weights, &cos, &sin, eps));
                let label = format!("qk-norm + rope {batch:4} x {tokens:4} rot {rotary:3} {tag}");
                failed += usize::from(check(device, &label, tol, bytes(2 * rows * (heads + kv) * dim), &kernel, &reference, &reference));
            }
            // The same with the keys and values written into their pages in the same kernel
            // (`fused_rotate_into_pages`, what the decoder runs), against the reference
            // rotation and two `select_assign`s (the queries and the rows written compared);
            // timed against the two kernels it replaces.
            {
                let tokens = rows;
                let qkv = random([tokens, (heads + 2 * kv) * dim], -2.0, 2.0).reshape([1, tokens, heads + 2 * kv, dim]);
                let angles = Tensor::<4>::random([1, 1, tokens, dim / 2], Distribution::Uniform(0.0, 100.0), device);
                let angles = Tensor::cat(vec![angles.clone(), angles], 3);
                let (cos, sin) = (angles.clone().cos().cast(dtype), angles.sin().cast(dtype));
                let pool_slots = 4096usize;
                let k_pool = random([pool_slots, kv * dim], -1.0, 1.0).reshape([pool_slots, kv, dim]);
                let v_pool = random([pool_slots, kv * dim], -1.0, 1.0).reshape([pool_slots, kv, dim]);
                // Distinct slots (1,031 is odd, the pool a power of two).
                let idx: Vec<i64> = (0..tokens).map(|i| ((i * 1031 + 7) % pool_slots) as i64).collect();
                let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [tokens]), device);
                let all = |(q, kp, vp): (Tensor<3>, KvPages, KvPages)| {
                    let written = |p: &KvPages| p.select(idx.clone(), dtype).reshape([tokens * kv, dim]);
                    Tensor::cat(vec![q.reshape([tokens * heads, dim]), written(&kp), written(&vp)], 0)
                };
                let kernel = || {
                    let (q, kp, vp) = fused_rotate_into_pages(qkv.clone(), &head_weights, kv, &cos, &sin, eps, k_pool.clone(), v_pool.clone(), idx.clone());
                    all((q, KvPages::Dense(kp), KvPages::Dense(vp)))
                };
                // Queries, keys and values of the rotated heads `qk` (and `qkv`'s values).
                let split = |qk: Tensor<4>| {
                    let q = qk.clone().narrow(1, 0, heads).swap_dims(1, 2).reshape([tokens, heads, dim]);
                    let k = qk.narrow(1, heads, kv).swap_dims(1, 2).reshape([tokens, kv, dim]);
                    (q, k, qkv.clone().narrow(2, heads + kv, kv).reshape([tokens, kv, dim]))
                };
                let reference = || {
                    let (q, k, v) = split(qk_norm_rotary_reference(qkv.clone().narrow(2, 0, heads + kv), &head_weights, &cos, &sin, eps));
                    let kp = k_pool.clone().select_assign(0, idx.clone(), k, IndexingUpdateOp::Assign);
                    let vp = v_pool.clone().select_assign(0, idx.clone(), v, IndexingUpdateOp::Assign);
                    all((q, KvPages::Dense(kp), KvPages::Dense(vp)))
                };
                let two = || {
                    let (q, k, v) = split(fused_qk_norm_rotary(qkv.clone().narrow(2, 0, heads + kv), &head_weights, &cos, &sin, eps));
                    let (kp, vp) = write_kv_pair(k_pool.clone(), v_pool.clone(), idx.clone(), k, v);
                    all((q, KvPages::Dense(kp), KvPages::Dense(vp)))
                };
                let label = format!("qk-norm + rope into pages {tokens:4} tokens {tag}");
                failed += usize::from(check(device, &label, tol, bytes(2 * tokens * (heads + 2 * kv) * dim), &kernel, &reference, &two));
            }
            // SwiGLU over the fused gate|up output: 2 * inner read, inner written.
            let gate_up = random([rows, 2 * inner], -4.0, 4.0);
            let kernel = || fused_swiglu_halves(gate_up.clone());
            let reference = || swiglu_halves(gate_up.clone());
            failed += usize::from(check(device, &format!("swiglu {:20} {tag}", 2 * inner), tol, bytes(3 * rows * inner), &kernel, &reference, &reference));
        }
    }
    failed
}

/// What a recorded step's kernels cost apart from their work: chains of `n` dependent
/// launches of one kernel replayed from a CUDA graph, per launch. One-row RMSNorms of 2,560
/// values (almost no work: the floor of a launch in a graph, ramp and tail included), and
/// one-row products of 2,560 x 2,560 bf16 weights (13 MB, 3.9 µs at 3.35 TB/s). No check;
/// timings only.
fn time_kernel_chains(device: &Device) {
    let dtype = DType::BF16;
    let hidden = 2560;
    let x = Tensor::<2>::random([1, hidden], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
    let norm = Tensor::<1>::random([hidden], Distribution::Uniform(0.5, 1.5), device).cast(dtype);
    let w = Tensor::<2>::random([hidden, hidden], Distribution::Uniform(-0.02, 0.02), device).cast(dtype).reshape([1, hidden, hidden]);
    for n in [1usize, 16, 128] {
        let norms = || (0..n).fold(x.clone(), |y, _| fused_rms_norm(y, &norm, 1e-6));
        let products = || (0..n).fold(x.clone(), |y, _| fused_rms_norm(split_matvec(y, &w), &norm, 1e-6));
        let per = |op: &dyn Fn() -> Tensor<2>, kernels: usize| time_graph(device, op).map_or_else(|e| format!("({e})"), |s| format!("{:6.2} µs", s * 1e6 / kernels as f64));
        println!("launch chain {n:3}: rms_norm {} a kernel | matvec 2560x2560 + rms_norm {} a pair", per(&norms, n), per(&products, n));
    }
}

/// The vision tower's kernels at Qwen3-VL-2B's shapes (width 1,024, 16 heads of 64) for a
/// 448x448 image (784 patches) and a 1344x1344 one (7,056): the LayerNorm (blocks, and the
/// merger's 4,096-wide rows, an odd row count too) and the f32 rotation of queries and keys
/// read from the fused q|k|v projection, against the burn operations they replace.
fn check_vision(device: &Device) -> usize {
    let mut failed = 0;
    let (width, heads, dim) = (1024, 16, 64);
    for dtype in [DType::F32, DType::BF16] {
        let tol = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
        let random = |shape: [usize; 2], low: f64, high: f64| Tensor::<2>::random(shape, Distribution::Uniform(low, high), device).cast(dtype);
        let bytes = |elements: usize| Work::Bytes((elements * dtype.size()) as f64);
        for (rows, n) in [(784, width), (7056, width), (196, 4 * width), (37, 4 * width)] {
            // An offset mean, as hidden states have, tests the centring.
            let x = random([rows, n], -2.0, 6.0);
            let (weight, bias) = (random([1, n], 0.5, 1.5).reshape([n]), random([1, n], -0.5, 0.5).reshape([n]));
            let kernel = || fused_layer_norm(x.clone(), &weight, &bias, 1e-6);
            let reference = || layer_norm(x.clone(), &weight, &bias, 1e-6);
            let tag = format!("vision layer_norm {n:5} x {rows:5} {dtype:?}");
            failed += usize::from(check(device, &tag, tol, bytes(2 * rows * n), &kernel, &reference, &reference));
        }
        for patches in [784, 7056] {
            let qkv = random([patches, 3 * heads * dim], -2.0, 2.0).reshape([1, patches, 3 * heads, dim]);
            let qk = qkv.narrow(2, 0, 2 * heads);
            let angles = Tensor::<4>::random([1, 1, patches, dim / 2], Distribution::Uniform(0.0, 40.0), device);
            let angles = Tensor::cat(vec![angles.clone(), angles], 3);
            let (cos, sin) = (angles.clone().cos(), angles.sin());
            let flat = |t: Tensor<4>| t.reshape([2 * heads * patches, dim]);
            let kernel = || flat(fused_rotary_f32(qk.clone(), &cos, &sin));
            let reference = || flat(rotary_f32_reference(qk.clone(), &cos, &sin));
            let tag = format!("vision rope f32 {:3} heads x {patches:5} {dtype:?}", 2 * heads);
            failed += usize::from(check(device, &tag, tol, bytes(4 * heads * patches * dim), &kernel, &reference, &reference));
        }
    }
    failed
}

/// The many-row products through cuBLAS (`inference_pio_kernels::cublas`) against burn's
/// matmul (CubeCL's, the path before): linear layers on the HF `[out, in]` weight read in
/// place (a transposed view) at batched-decode and prefill row counts, and prefill
/// attention's two batched products with the keys and values a view of a larger cache.
fn check_cublas(device: &Device) -> usize {
    let mut failed = 0;
    if !inference_pio_kernels::cublas::available(device) {
        println!("cublas: the cuBLAS library is not loadable here; nothing to check");
        return 1;
    }
    for dtype in [DType::F32, DType::BF16] {
        // CubeCL's f32 matmul runs in TF32 on the H200, cuBLAS's here in full f32.
        let tol = if dtype == DType::F32 { 1e-3 } else { 1e-2 };
        let tag = format!("{dtype:?}");
        for (name, out, inp) in [("fused q/k/v 2560->6144", 6144usize, 2560usize), ("gate|up 2560->19456", 19456, 2560), ("down 9728->2560", 2560, 9728), ("head 2560->151936", 151936, 2560)] {
            let w = Tensor::<2>::random([out, inp], Distribution::Uniform(-0.05, 0.05), device).cast(dtype);
            let w3 = w.clone().reshape([1, out, inp]);
            for rows in [3usize, 8, 32, 512, 2048] {
                if out > 100_000 && rows > 32 {
                    continue;
                }
                let x = Tensor::<2>::random([rows, inp], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
                let kernel = || inference_pio_kernels::linear(x.clone(), &w3);
                let reference = || x.clone().matmul(w.clone().transpose());
                let flops = Work::Flops((2 * rows * out * inp) as f64);
                let label = format!("cublas linear {name:24} {rows:5} rows {tag:5}");
                failed += usize::from(check(device, &label, tol, flops, &kernel, &reference, &reference));
            }
        }
        // Prefill attention at Qwen3-4B's heads: 8 key heads of 4 queries, 128 channels,
        // keys and values the first `t` slots of a 4,096-slot cache.
        let (kv, group, dim, capacity) = (8usize, 4usize, 128usize, 4096usize);
        for t in [512usize, 2048] {
            let cache = |seed: f64| Tensor::<4>::random([1, kv, capacity, dim], Distribution::Uniform(-seed, seed), device).cast(dtype);
            let (k, v) = (cache(1.0).narrow(2, 0, t), cache(1.0).narrow(2, 0, t));
            let q = Tensor::<4>::random([1, kv, group * t, dim], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
            let flat = |x: Tensor<4>| {
                let [a, b, c, d] = x.dims();
                x.reshape([a * b * c, d])
            };
            let scores = || flat(inference_pio_kernels::batched_matmul(q.clone(), k.clone().transpose()));
            let scores_ref = || flat(q.clone().matmul(k.clone().transpose()));
            let flops = Work::Flops((2 * kv * group * t * t * dim) as f64);
            failed += usize::from(check(device, &format!("cublas attention q·kᵀ {t:5} tokens {tag:5}"), tol, flops, &scores, &scores_ref, &scores_ref));
            let probs = Tensor::<4>::random([1, kv, group * t, t], Distribution::Uniform(0.0, 1.0 / t as f64), device).cast(dtype);
            let mixed = || flat(inference_pio_kernels::batched_matmul(probs.clone(), v.clone()));
            let mixed_ref = || flat(probs.clone().matmul(v.clone()));
            failed += usize::from(check(device, &format!("cublas attention p·v  {t:5} tokens {tag:5}"), tol, flops, &mixed, &mixed_ref, &mixed_ref));
        }
    }
    failed
}

/// A `[rows, cols]` matrix of `bits`-bit codes in groups of `group`, codes, scales and offsets
/// drawn from `random` (values in ±0.05).
fn gguf_like(
    random: &mut impl FnMut(usize) -> Vec<f32>,
    rows: usize,
    cols: usize,
    bits: u32,
    group: usize,
) -> Result<inference_pio_kernels::quant::QuantizedMatrix, inference_pio_kernels::quant::QuantError> {
    let top = ((1u32 << bits) - 1) as f32;
    let codes: Vec<u8> = random(rows * cols).into_iter().map(|v| ((v + 0.05) * 10.0 * top).round().clamp(0.0, top) as u8).collect();
    let groups = rows * (cols / group);
    let scales = random(groups).into_iter().map(|v| v * 0.2 / top).collect();
    let mins = random(groups).into_iter().map(|v| v * 0.5).collect();
    inference_pio_kernels::quant::QuantizedMatrix::from_codes(rows, cols, bits, group, &codes, scales, mins)
}

/// The quantized products against the dense product of their dequantized weights.
fn check_quant(device: &Device) -> usize {
    use inference_pio_kernels::quant::{QuantizedLinear, QuantizedMatrix};
    let mut failed = 0;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect()
    };
    // `KERNEL_CHECK_QUANT_ROWS=1,2`: only those row counts (all of them unset).
    let only_rows: Option<Vec<usize>> = std::env::var("KERNEL_CHECK_QUANT_ROWS").ok().map(|v| {
        v.split(',').map(|r| r.trim().parse().ok()).collect::<Option<Vec<usize>>>().unwrap_or_else(|| {
            eprintln!("kernel_check: KERNEL_CHECK_QUANT_ROWS={v:?}: expected row counts separated by commas");
            std::process::exit(2);
        })
    });
    let shapes = [("4B fused q/k/v 2560->6144", 6144usize, 2560usize), ("4B fused gate/up 2560->19456", 19456, 2560), ("4B down 9728->2560", 2560, 9728)];
    for (name, out, inp) in shapes {
        let values = random(out * inp);
        let dense_w = Tensor::<2>::from_data(TensorData::new(values.clone(), [out, inp]), device);
        let layouts = [
            ("int8/channel", QuantizedMatrix::quantize_int8(&values, out, inp)),
            ("int4/128", QuantizedMatrix::quantize_int4(&values, out, inp, 128)),
            ("int4/32", QuantizedMatrix::quantize_int4(&values, out, inp, 32)),
            // FP8 E4M3 in blocks of 128x128 (`quantization = "fp8"`, Qwen's FP8 checkpoints).
            ("fp8/128", QuantizedMatrix::quantize_fp8(&values, out, inp)),
            // The layouts GGUF blocks keep: Q8_0 (8 bits in 32s), Q6_K (8-bit codes in 16s),
            // Q4_K (4 bits in 32s), with scales and offsets of both signs.
            ("gguf 8/32", gguf_like(&mut random, out, inp, 8, 32)),
            ("gguf 8/16", gguf_like(&mut random, out, inp, 8, 16)),
            ("gguf 4/32", gguf_like(&mut random, out, inp, 4, 32)),
        ];
        for (tag, m) in layouts {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    println!("quant {name} {tag}: cannot quantize: {e}");
                    failed += 1;
                    continue;
                }
            };
            let bytes = m.bytes() as f64;
            let deq = Tensor::<2>::from_data(TensorData::new(m.dequantize(), [out, inp]), device);
            let q = QuantizedLinear::new(m, device);
            for dtype in [DType::F32, DType::BF16] {
                let w = deq.clone().cast(dtype);
                let plain = dense_w.clone().cast(dtype).reshape([1, out, inp]);
                for rows in [1usize, 2, 4, 8, 16, 32, 512] {
                    if only_rows.as_ref().is_some_and(|only| !only.contains(&rows)) {
                        continue;
                    }
                    let x = Tensor::<2>::random([rows, inp], Distribution::Uniform(-1.0, 1.0), device).cast(dtype);
                    let kernel = || q.forward(x.clone());
                    let reference = || batched_linear(x.clone().unsqueeze_dim(0), w.clone().reshape([1, 1, out, inp])).squeeze_dim(0);
                    // The same product with the unquantized weight in `dtype`, as the engine runs it.
                    let before = || inference_pio_kernels::linear(x.clone(), &plain);
                    let tol = if dtype == DType::F32 { 1e-3 } else { 1e-2 };
                    let label = format!("quant {name:28} {tag:12} {rows:4} rows {:5}", format!("{dtype:?}"));
                    failed += usize::from(check(device, &label, tol, Work::Bytes(bytes), &kernel, &reference, &before));
                    if (16..=32).contains(&rows) {
                        // The path these rows took before the kernel took them: the weight
                        // dequantized to `dtype` and multiplied by cuBLAS.
                        let dequantized = || batched_linear(x.clone().unsqueeze_dim(0), q.dequantize(dtype).reshape([1, 1, out, inp])).squeeze_dim(0);
                        let label = format!("quant {name:28} {tag:12} {rows:4} rows {:5} dequantized+cuBLAS", format!("{dtype:?}"));
                        failed += usize::from(check(device, &label, tol, Work::Bytes(bytes), &dequantized, &reference, &before));
                    }
                }
            }
        }
    }
    failed
}
