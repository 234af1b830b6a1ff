//! Micro-benchmark on CUDA: one-row linear layers (batch-1 decode, Qwen3-4B shapes, bf16)
//! in each form burn can express them, timed as CUDA-graph replays so host queuing is out of
//! the figure. Every iteration's output is summed into the graph's result, so none is elided.
//! `decode_ops` on a machine with CUDA (`decode_ops cpu` checks the forms on the CPU);
//! results in `benches/results/gpu-h200-2026-12-01-graphs.md`.

mod common;

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use common::{time_graph, values};

/// A contiguous copy (through the host: setup only).
fn contiguous<const D: usize>(t: Tensor<D>, device: &Device) -> Tensor<D> {
    let dtype = t.dtype();
    let data: TensorData = t.cast(DType::F32).into_data();
    Tensor::<D>::from_data(data, device).cast(dtype)
}

/// One named form of the product.
type Form<'a> = (&'static str, Box<dyn Fn() -> Tensor<2> + 'a>);

fn f32(t: Tensor<2>) -> Tensor<2> {
    t.cast(DType::F32)
}

fn main() {
    let device = if std::env::args().any(|a| a == "cpu") { Device::flex() } else { Device::cuda(0usize) };
    for (k, n) in [(2560usize, 9728usize), (9728, 2560), (2560, 151936)] {
        let w: Tensor<2> = Tensor::<2>::random([n, k], Distribution::Uniform(-0.05, 0.05), &device).cast(DType::BF16);
        let x: Tensor<2> = Tensor::<2>::random([1, k], Distribution::Uniform(-1.0, 1.0), &device).cast(DType::BF16);
        // [in, out] copy, and per split s the [s, out, in/s] copy.
        let wt = contiguous(w.clone().transpose(), &device);
        let split = |s: usize| contiguous(w.clone().reshape([n, s, k / s]).swap_dims(0, 1), &device);
        let (ws8, ws32) = (split(8), split(32));
        let bytes = (n * k * 2) as f64;
        let reference = match values(x.clone().matmul(w.clone().transpose())) {
            Ok(v) => v,
            Err(e) => {
                println!("{k} -> {n}: the reference matmul failed: {e}");
                continue;
            }
        };
        let prod = || f32(w.clone()).mul(f32(x.clone()));
        let prod_t = || f32(wt.clone()).mul(f32(x.clone()).transpose());
        let splitk = |ws: &Tensor<3>, s: usize| {
            let xs = x.clone().reshape([1, s, k / s]).swap_dims(0, 1);
            xs.matmul(ws.clone().transpose()).cast(DType::F32).sum_dim(0).reshape([1, n])
        };
        let variants: Vec<Form<'_>> = vec![
            ("x.matmul(w.T)", Box::new(|| x.clone().matmul(w.clone().transpose()))),
            ("w.matmul(x.T).T", Box::new(|| w.clone().matmul(x.clone().transpose()).reshape([1, n]))),
            ("x.matmul(wt) [in,out]", Box::new(|| x.clone().matmul(wt.clone()))),
            ("sum [out,in] axis 1", Box::new(|| prod().sum_dim(1).reshape([1, n]))),
            ("sum2 [out*16,in/16]", Box::new(|| prod().reshape([n * 16, k / 16]).sum_dim(1).reshape([n, 16]).sum_dim(1).reshape([1, n]))),
            ("sum2 [out*64,in/64]", Box::new(|| prod().reshape([n * 64, k / 64]).sum_dim(1).reshape([n, 64]).sum_dim(1).reshape([1, n]))),
            ("sum [in,out] axis 0", Box::new(|| prod_t().sum_dim(0))),
            ("sum2 [16,in/16,out]", Box::new(|| prod_t().reshape([16, k / 16, n]).sum_dim(1).sum_dim(0).reshape([1, n]))),
            ("sum2 [64,in/64,out]", Box::new(|| prod_t().reshape([64, k / 64, n]).sum_dim(1).sum_dim(0).reshape([1, n]))),
            ("split-k bmm s=8", Box::new(|| splitk(&ws8, 8))),
            ("split-k bmm s=32", Box::new(|| splitk(&ws32, 32))),
        ];
        for (name, f) in &variants {
            let got = match values(f()) {
                Ok(v) => v,
                Err(e) => {
                    println!("{k:>5} -> {n:>6} {name:<24} failed: {}", e.lines().last().unwrap_or_default());
                    continue;
                }
            };
            let err = got.iter().zip(&reference).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt()
                / reference.iter().map(|b| b * b).sum::<f32>().sqrt();
            match time_graph(&device, f.as_ref()) {
                Ok(s) => println!("{k:>5} -> {n:>6} {name:<24} {:8.1} us {:6.0} GB/s  rel {err:.1e}", s * 1e6, bytes / s / 1e9),
                Err(e) => println!("{k:>5} -> {n:>6} {name:<24} rel {err:.1e}, not timed: {}", e.lines().last().unwrap_or_default()),
            }
        }
    }
}
