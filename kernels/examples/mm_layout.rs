//! Micro-benchmark: decode matrix-vector products on the CPU (burn-flex) with the weight in
//! HF `[out, in]` layout used through `transpose()` versus a contiguous `[in, out]` copy.
//! `cargo run --example mm_layout -p inference-pio-kernels`; results in
//! `benches/results/cpu-matvec-layout.md`.

use burn::tensor::{Device, Tensor, Distribution};
use std::time::Instant;
fn main() {
    let d = Device::flex();
    for (k, n) in [(512usize, 1536usize), (512, 151936)] {
        let w: Tensor<2> = Tensor::random([n, k], Distribution::Default, &d);
        let wt = w.clone().transpose().into_data();
        let wt: Tensor<2> = Tensor::from_data(wt, &d);
        let x: Tensor<2> = Tensor::random([1, k], Distribution::Default, &d);
        for (name, f) in [("[out,in].T", 0), ("[in,out]", 1)] {
            let run = || if f == 0 { x.clone().matmul(w.clone().transpose()) } else { x.clone().matmul(wt.clone()) };
            let _ = run().into_data();
            let t = Instant::now();
            for _ in 0..20 { let _ = run().into_data(); }
            let s = t.elapsed().as_secs_f64() / 20.0;
            println!("{k}x{n} {name}: {:.3} ms, {:.1} GB/s", s * 1e3, (k * n * 4) as f64 / s / 1e9);
        }
    }
}
