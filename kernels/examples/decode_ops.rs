//! Micro-benchmark on CUDA: the decode step's matrix-vector products (Qwen3-4B shapes, bf16,
//! weight in HF `[out, in]` layout), each way burn can express them, timed as CUDA-graph
//! replays so host queuing is out of the figure. `cargo run --example decode_ops -p
//! inference-pio-kernels` on a machine with CUDA; prints one line per shape and variant.

use burn::tensor::{DType, Device, Distribution, Tensor, capture};
use std::time::Instant;

const ITERS: usize = 20;
const REPLAYS: usize = 5;

fn time_graph(device: &Device, mut op: impl FnMut() -> Tensor<2>) -> (f64, bool) {
    let mut graph = capture(device, move || {
        let mut out = op();
        for _ in 1..ITERS {
            out = op();
        }
        out
    });
    let hardware = graph.is_hardware();
    // SAFETY: the closure owns every tensor it reads (moved clones); replays and the read
    // below run on this thread's stream.
    let _ = unsafe { graph.replay() }.clone().into_data();
    let t = Instant::now();
    for _ in 0..REPLAYS {
        // SAFETY: as above.
        let _ = unsafe { graph.replay() };
    }
    // SAFETY: as above.
    let _ = unsafe { graph.replay() }.clone().into_data();
    (t.elapsed().as_secs_f64() / ((REPLAYS + 1) * ITERS) as f64, hardware)
}

fn values(t: Tensor<2>) -> Result<Vec<f32>, String> {
    let data = t.cast(DType::F32).try_into_data().map_err(|e| format!("{e:?}"))?;
    data.convert::<f32>().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))
}

fn main() {
    let device = if std::env::args().any(|a| a == "cpu") { Device::flex() } else { Device::cuda(0usize) };
    // Eager (queued from the host) for comparison with the replays below.
    {
        let w: Tensor<2> = Tensor::<2>::zeros([9728, 2560], (&device, DType::BF16));
        let x: Tensor<2> = Tensor::<2>::ones([1, 2560], (&device, DType::BF16));
        match values(x.clone().matmul(w.clone().transpose())) {
            Ok(v) => println!("zeros/ones matmul: {} values, first {:?}", v.len(), v.first()),
            Err(e) => println!("zeros/ones matmul failed: {e}"),
        }
        let t = Instant::now();
        for _ in 0..50 {
            let _ = x.clone().matmul(w.clone().transpose());
        }
        let _ = values(x.clone());
        println!("eager 2560 -> 9728 matmul, 50 queued: {:.1} us each", t.elapsed().as_secs_f64() / 50.0 * 1e6);
    }
    for (k, n) in [(2560usize, 4096usize), (2560, 9728), (9728, 2560), (2560, 151936)] {
        let w: Tensor<2> = Tensor::<2>::random([n, k], Distribution::Uniform(-0.05, 0.05), &device).cast(DType::BF16);
        let x: Tensor<2> = Tensor::<2>::random([1, k], Distribution::Uniform(-1.0, 1.0), &device).cast(DType::BF16);
        let bytes = (n * k * 2) as f64;
        let reference = match values(x.clone().matmul(w.clone().transpose())) {
            Ok(v) => v,
            Err(e) => {
                println!("{k} -> {n}: the reference matmul failed: {e}");
                continue;
            }
        };
        let variants: [(&str, Box<dyn Fn(Tensor<2>, Tensor<2>) -> Tensor<2>>); 3] = [
            ("x.matmul(w.T)", Box::new(|x: Tensor<2>, w: Tensor<2>| x.matmul(w.transpose()))),
            ("w.matmul(x.T).T", Box::new(|x: Tensor<2>, w: Tensor<2>| w.matmul(x.transpose()).transpose())),
            ("(x*w).sum_dim(1)", Box::new(|x: Tensor<2>, w: Tensor<2>| w.mul(x).cast(DType::F32).sum_dim(1).cast(DType::BF16).transpose())),
        ];
        for (name, f) in variants {
            let got = match values(f(x.clone(), w.clone())) {
                Ok(v) => v,
                Err(e) => {
                    println!("{k:>5} -> {n:>6} {name:<18} failed: {e}");
                    continue;
                }
            };
            let err = got.iter().zip(&reference).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt()
                / reference.iter().map(|b| b * b).sum::<f32>().sqrt();
            let (xc, wc) = (x.clone(), w.clone());
            let (s, hw) = time_graph(&device, move || f(xc.clone(), wc.clone()));
            println!("{k:>5} -> {n:>6} {name:<18} {:8.1} us {:7.0} GB/s  rel {err:.1e}  graph {hw}", s * 1e6, bytes / s / 1e9);
        }
    }
}
