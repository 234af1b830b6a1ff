//! Micro-benchmark on the CPU: the fused quantized product of one decode row
//! (`QuantizedMatrix::matmul`, the codes read in place) over SmolLM2-135M's linear shapes
//! (4-bit codes in groups of 32, as its Q4_1 GGUF), f32 activations, 16-bit and 8-bit activation
//! blocks, and four rows at once (f32, 8-bit blocks), through the same rayon pool.
//! Reports µs per product, weights per ns and the code bytes read per second; first the
//! f32-activation loops with AVX-512 against AVX2 only, and the 8-bit-activation loop with
//! AVX-512 VNNI against AVX2, where the CPU has them
//! (`--widths-only`: just that; `--avx2`: the rest with AVX-512 off; `--model-sized`: one
//! token's products over a model's worth of distinct matrices, which do not stay in the caches).
//! `cargo run --example cpu_matvec [--release]`; results in `benches/results/`.

use inference_pio_kernels::quant::{Activations, GroupScales, QuantizedMatrix};
use std::time::Instant;

/// A deterministic 4-bit matrix of `rows x cols` in groups of 32.
fn matrix(rows: usize, cols: usize) -> QuantizedMatrix {
    matrix_bits(rows, cols, 4)
}

/// A deterministic matrix of `bits`-bit codes (4 or 8), `rows x cols` in groups of 32.
fn matrix_bits(rows: usize, cols: usize, bits: u32) -> QuantizedMatrix {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as u32
    };
    let groups = cols / 32;
    QuantizedMatrix {
        rows,
        cols,
        bits,
        group: 32,
        codes: (0..rows * cols * bits as usize / 32).map(|_| next()).collect(),
        // f16 values, as a GGUF's Q4_0/Q4_1/Q8_0 blocks store them (kept in f16).
        groups: GroupScales::new(
            (0..rows * groups).map(|i| half::f16::from_f32(0.01 + (i % 7) as f32 * 1e-3).to_f32()).collect(),
            (0..rows * groups).map(|i| half::f16::from_f32(-0.08 + (i % 5) as f32 * 1e-3).to_f32()).collect(),
        ),
        format: Default::default(),
    }
}

/// Median µs of `runs` calls of `f`.
fn time(runs: usize, mut f: impl FnMut() -> f32) -> f64 {
    let mut sink = 0.0;
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            sink += f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    std::hint::black_box(sink);
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

/// The f32-activation loops (the default CPU path) with AVX-512 and with AVX2 only, over
/// SmolLM2-135M's Q4_1 layer products and its Q8_0 LM head, one and four rows: medians of
/// several alternating rounds, so a noisy machine shifts both alike.
fn vector_widths() {
    if !inference_pio_kernels::quant::uses_avx512() {
        println!("AVX-512: not on this CPU (the AVX2 loops run)");
        return;
    }
    let shapes = [("q/k/v 576->960", 960, 576, 4), ("o 576->576", 576, 576, 4), ("gate/up 576->3072", 3072, 576, 4), ("down 1536->576", 576, 1536, 4), ("head Q8 576->49152", 49152, 576, 8)];
    let mut token = [[0.0f64; 3]; 2];
    for (what, rows, cols, bits) in shapes {
        let m = matrix_bits(rows, cols, bits);
        let x: Vec<f32> = (0..cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let x4: Vec<f32> = (0..4).flat_map(|k| x.iter().map(move |v| v * (1.0 + k as f32))).collect();
        let runs = if rows > 10_000 { 20 } else { 200 };
        // [wide?][f32 rows 1 / 4, 8-bit activations 1 row]: medians over five rounds.
        let mut rounds = [[Vec::new(), Vec::new(), Vec::new()], [Vec::new(), Vec::new(), Vec::new()]];
        for _ in 0..5 {
            for (w, wide) in [(0, false), (1, true)] {
                inference_pio_kernels::quant::use_avx512(wide);
                rounds[w][0].push(time(runs, || m.matmul(&x, 1, Activations::F32)[0]));
                rounds[w][1].push(time(runs, || m.matmul(&x4, 4, Activations::F32)[0]) / 4.0);
                rounds[w][2].push(time(runs, || m.matmul(&x, 1, Activations::Blocks8)[0]));
            }
        }
        inference_pio_kernels::quant::use_avx512(true);
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let us: Vec<[f64; 3]> = rounds.iter_mut().map(|[a, b, c]| [med(a), med(b), med(c)]).collect();
        let times = if what.starts_with("head") { 1.0 } else { 30.0 };
        for w in 0..2 {
            for r in 0..3 {
                token[w][r] += us[w][r] * times;
            }
        }
        println!(
            "{what:<20} f32 acts, 1 row: AVX2 {:8.1} µs, AVX-512 {:8.1} µs ({:.2}x) | 4 rows: AVX2 {:8.1}, AVX-512 {:8.1} µs a row ({:.2}x) | 8-bit acts, 1 row: AVX2 {:8.1}, VNNI {:8.1} µs ({:.2}x)",
            us[0][0],
            us[1][0],
            us[0][0] / us[1][0],
            us[0][1],
            us[1][1],
            us[0][1] / us[1][1],
            us[0][2],
            us[1][2],
            us[0][2] / us[1][2]
        );
    }
    println!(
        "per token (30 layers + Q8 head): f32 acts, 1 row AVX2 {:.2} ms, AVX-512 {:.2} ms ({:.2}x); 4 rows AVX2 {:.2}, AVX-512 {:.2} ms a row ({:.2}x); 8-bit acts, 1 row AVX2 {:.2} ms, VNNI {:.2} ms ({:.2}x)",
        token[0][0] / 1e3,
        token[1][0] / 1e3,
        token[0][0] / token[1][0],
        token[0][1] / 1e3,
        token[1][1] / 1e3,
        token[0][1] / token[1][1],
        token[0][2] / 1e3,
        token[1][2] / 1e3,
        token[0][2] / token[1][2]
    );
}

/// `--prefill N`: a prompt of `N` rows of f32 activations through the layer products (the
/// dequantized tiles, `QuantizedMatrix::matmul_tiled`), µs and GFLOP/s per product and the
/// 30 layers' sum (the README main job's prompt is 37 tokens).
fn prefill(n: usize) {
    let shapes = [("q/k/v 576->960", 960, 576), ("o 576->576", 576, 576), ("gate/up 576->3072", 3072, 576), ("down 1536->576", 576, 1536)];
    let mut layer = 0.0;
    for (what, rows, cols) in shapes {
        let m = matrix(rows, cols);
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let us = time(200, || m.matmul(&x, n, Activations::F32)[0]);
        layer += us;
        println!("prefill {n} rows, {what:18}: {us:8.1} µs {:6.1} GFLOP/s", 2.0 * (n * rows * cols) as f64 / us / 1e3);
    }
    println!("prefill {n} rows, 30 layers' products: {:.1} ms", 30.0 * layer / 1e3);
}

/// One decode token's products over distinct matrices, as a model holds them (SmolLM2-135M's
/// 30 layers of 4-bit codes and its 8-bit head, about 98 MB, more than the caches): f32 and
/// 8-bit activations, medians of 15 tokens; the products read memory as a real step does,
/// where the shapes above each hit the caches.
fn model_sized() {
    let shapes = [(960, 576, 4), (576, 576, 4), (3072, 576, 4), (576, 1536, 4)];
    let mut ms: Vec<QuantizedMatrix> = (0..30).flat_map(|_| shapes.iter().map(|&(r, c, b)| matrix_bits(r, c, b))).collect();
    ms.push(matrix_bits(49152, 576, 8));
    let mb = ms.iter().map(|m| m.bytes() as f64).sum::<f64>() / 1e6;
    println!("model-sized token: {} matrices, {mb:.1} MB", ms.len());
    let inputs: Vec<Vec<f32>> = ms.iter().map(|m| (0..m.cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect()).collect();
    for _ in 0..2 {
        for act in [Activations::F32, Activations::Blocks8] {
            let ms_per_token = time(15, || ms.iter().zip(&inputs).map(|(m, x)| m.matmul(x, 1, act)[0]).sum()) / 1e3;
            println!("{act:?}: {ms_per_token:.2} ms a token ({:.1} GB/s)", mb / ms_per_token);
        }
    }
}

fn main() {
    println!("threads: {}", rayon::current_num_threads());
    vector_widths();
    if std::env::args().any(|a| a == "--avx2") {
        // The rest as on a CPU without AVX-512.
        inference_pio_kernels::quant::use_avx512(false);
        println!("AVX-512 off from here");
    }
    if std::env::args().any(|a| a == "--widths-only") {
        return;
    }
    if std::env::args().any(|a| a == "--model-sized") {
        model_sized();
        return;
    }
    if let Some(n) = std::env::args().skip_while(|a| a != "--prefill").nth(1).and_then(|n| n.parse::<usize>().ok()) {
        prefill(n);
        return;
    }
    // (what, rows, cols): q/k/v fused, o, gate/up fused, down, LM head (SmolLM2-135M).
    let shapes = [("q/k/v 576->960", 960, 576), ("o 576->576", 576, 576), ("gate/up 576->3072", 3072, 576), ("down 1536->576", 576, 1536), ("head 576->49152", 49152, 576)];
    let mut per_token = [0.0f64; 5];
    for (what, rows, cols) in shapes {
        let m = matrix(rows, cols);
        let x: Vec<f32> = (0..cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let runs = if rows > 10_000 { 50 } else { 400 };
        let f32_us = time(runs, || m.matmul(&x, 1, Activations::F32)[0]);
        let i16_us = time(runs, || m.matmul(&x, 1, Activations::Blocks16)[0]);
        let i8_us = time(runs, || m.matmul(&x, 1, Activations::Blocks8)[0]);
        // Four rows at once (batched decode, short prompts): µs per row.
        let x4: Vec<f32> = (0..4).flat_map(|k| x.iter().map(move |v| v * (1.0 + k as f32))).collect();
        let f32_4_us = time(runs, || m.matmul(&x4, 4, Activations::F32)[0]) / 4.0;
        let i8_4_us = time(runs, || m.matmul(&x4, 4, Activations::Blocks8)[0]) / 4.0;
        per_token[2] += f32_4_us * if what.starts_with("head") { 1.0 } else { 30.0 };
        per_token[3] += i8_us * if what.starts_with("head") { 1.0 } else { 30.0 };
        per_token[4] += i8_4_us * if what.starts_with("head") { 1.0 } else { 30.0 };
        let weights = (rows * cols) as f64;
        let bytes = weights / 2.0 + (rows * cols / 32 * 8) as f64;
        // Per token: 30 layers of the four layer products, one head.
        let times = if what.starts_with("head") { 1.0 } else { 30.0 };
        per_token[0] += f32_us * times;
        per_token[1] += i16_us * times;
        println!(
            "{what:<20} f32 acts {f32_us:8.1} µs ({:5.2} weights/ns, {:5.2} GB/s) | 16-bit blocks {i16_us:8.1} µs ({:5.2} weights/ns, {:5.2} GB/s) | f32, 4 rows {f32_4_us:8.1} µs a row | 8-bit blocks {i8_us:8.1} µs ({:5.2} weights/ns), 4 rows {i8_4_us:8.1} µs a row",
            weights / f32_us / 1e3,
            bytes / f32_us / 1e3,
            weights / i16_us / 1e3,
            bytes / i16_us / 1e3,
            weights / i8_us / 1e3
        );
    }
    // Prompt rows: the fused product in passes of four rows against the linear's prompt path
    // (8 MB slices of rows dequantized and multiplied by the backend), µs per row.
    let device = burn::tensor::Device::flex();
    for (what, rows, cols) in [("gate/up 576->3072", 3072, 576), ("head 576->49152", 49152, 576)] {
        let m = matrix(rows, cols);
        // 16-bit blocks read the codes in place for at most 4 rows: more take dequantized slices.
        let linear = inference_pio_kernels::quant::QuantizedLinear::new(m.clone(), &device).with_activations(Activations::Blocks16);
        for n in [8usize, 16, 32] {
            let x: Vec<f32> = (0..n * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let runs = if rows > 10_000 { 10 } else { 50 };
            // Fours and one product alternate over five rounds (medians): the machine's speed drifts.
            let (mut fours, mut ones) = (Vec::new(), Vec::new());
            for _ in 0..5 {
                fours.push(time(runs, || x.chunks(4 * cols).map(|c| m.matmul(c, c.len() / cols, Activations::F32)[0]).sum()) / n as f64);
                ones.push(time(runs, || m.matmul(&x, n, Activations::F32)[0]) / n as f64);
            }
            fours.sort_by(f64::total_cmp);
            ones.sort_by(f64::total_cmp);
            let (fused, tiles) = (fours[2], ones[2]);
            let fused8 = time(runs, || m.matmul(&x, n, Activations::Blocks8)[0]) / n as f64;
            // "one product": all rows at once, in dequantized tiles on an AVX-512 CPU.

            let prompt = time(runs, || {
                let t = burn::tensor::Tensor::<2>::from_data(burn::tensor::TensorData::new(x.clone(), [n, cols]), &device);
                linear.forward(t).into_data().convert::<f32>().as_slice::<f32>().map_or(0.0, |v| v[0])
            }) / n as f64;
            println!("{what:<20} {n:2} rows: fused in fours {fused:8.1} µs a row | one product {tiles:8.1} µs a row | 8-bit blocks {fused8:8.1} µs a row | dequantized slices {prompt:8.1} µs a row");
        }
    }
    println!(
        "per token (30 layers + head): f32 acts {:.2} ms, 16-bit blocks {:.2} ms, f32 in rows of 4 {:.2} ms, 8-bit blocks {:.2} ms, 8-bit blocks in rows of 4 {:.2} ms",
        per_token[0] / 1e3,
        per_token[1] / 1e3,
        per_token[2] / 1e3,
        per_token[3] / 1e3,
        per_token[4] / 1e3
    );
}
