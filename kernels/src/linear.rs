//! Linear layers with the weight in Hugging Face's `[out, in]` layout, as
//! `torch.nn.functional.linear` computes them: `y = x · wᵀ`.
//!
//! On GPUs the weight is kept split along `in` into `parts` column blocks, `[parts, out, in /
//! parts]`, and `y = Σ_p x_p · w_pᵀ` runs as one batched matmul over the blocks followed by an
//! f32 sum (split-K). Without autotuning, CubeCL's matmul launches one fixed tiled kernel, and
//! for a single row (a batch-1 decode step) that kernel is starved of parallelism: 2560 -> 9728
//! in bf16 takes 182 µs (273 GB/s) on an H200 and 9728 -> 2560 takes 735 µs, while the same
//! products split into blocks of about 300 columns take 40 µs and 49 µs (1,237 and 1,007 GB/s),
//! `benches/results/gpu-h200-2026-12-01-graphs.md`. Many rows (prefill) pay an extra f32 sum
//! over `parts` partial outputs. On the CPU (burn-flex) `parts` is 1 and this is the plain
//! matmul on the transposed `[out, in]` view. On CubeCL devices, products of one or two rows
//! (decode at batch 1 and 2) run through our own kernel instead ([`crate::matvec`]), which
//! reads the split layout in place. For prefill neither layout helps much: CubeCL's untuned
//! matmul multiplies 2,048 rows by 2560 -> 19456 in 5.2 ms on the plain `[out, in]` layout and
//! 6.5 ms split-K (about 40 and 31 TFLOP/s on an H200,
//! `benches/results/gpu-h200-2026-12-02-final/kernel_check.txt`), where cuBLAS would take
//! about 0.3 ms. So where cuBLAS is loadable ([`crate::cublas::available`]) weights are not
//! split (`parts` 1, the plain `[out, in]` layout) and every product of more than two rows
//! runs through cuBLAS on the weight in place; the split layout and CubeCL's matmul remain
//! the path without it.

use burn::tensor::{DType, Device, Tensor};
use std::cell::Cell;

/// Column blocks of at least this many `in` channels.
const MIN_BLOCK: usize = 256;
const MAX_PARTS: usize = 64;

thread_local! {
    /// Up to how many blocks weights loaded on the CPU are split ([`with_cpu_split`]).
    static CPU_PARTS: Cell<usize> = const { Cell::new(1) };
}

/// Runs `f` with weights loaded on the CPU on this thread split as on a GPU, into up to
/// `parts` blocks whatever their width: the GPU layout's tests, on a machine without one.
pub fn with_cpu_split<R>(parts: usize, f: impl FnOnce() -> R) -> R {
    let before = CPU_PARTS.replace(parts.max(1));
    let out = f();
    CPU_PARTS.set(before);
    out
}

/// How many column blocks a weight with `inp` input channels is split into on `device`: the
/// largest power of two up to 64 that divides `inp` into blocks of at least 256 on GPUs
/// without cuBLAS; 1 with it, and on the CPU unless [`with_cpu_split`] says otherwise.
pub fn split_parts(inp: usize, device: &Device) -> usize {
    if crate::cublas::available(device) {
        return 1;
    }
    let (most, min_block) = if crate::launch::is_cubecl(device) { (MAX_PARTS, MIN_BLOCK) } else { (CPU_PARTS.get(), 1) };
    let mut parts = 1;
    while parts * 2 <= most && inp.is_multiple_of(parts * 2) && inp / (parts * 2) >= min_block {
        parts *= 2;
    }
    parts
}

/// `w [out, in] -> [parts, out, in / parts]`, block `p` holding columns `p * in / parts ..`
/// (a contiguous copy; `parts` 1 is a view).
pub fn split_weight(w: Tensor<2>, parts: usize) -> Tensor<3> {
    let [out, inp] = w.dims();
    split_stacked(w.reshape([1, out, inp]), parts).reshape([parts.max(1), out, inp / parts.max(1)])
}

/// The split weights of several projections of one input (`[parts, out_i, in / parts]`, the
/// same `parts`) as one `[parts, sum of out_i, in / parts]`: one product computes them all,
/// its output columns in the order given.
pub fn concat_outputs(weights: Vec<Tensor<3>>) -> Tensor<3> {
    Tensor::cat(weights, 1)
}

/// [`split_weight`] for a stack of weights: `[batch, out, in] -> [batch, parts, out, in / parts]`.
pub fn split_stacked(w: Tensor<3>, parts: usize) -> Tensor<4> {
    let [batch, out, inp] = w.dims();
    if parts <= 1 {
        return w.reshape([batch, 1, out, inp]);
    }
    let block = inp / parts;
    Tensor::stack((0..parts).map(|p| w.clone().narrow(2, p * block, block)).collect(), 1)
}

/// `x [rows, in] · wᵀ -> [rows, out]`, `w` from [`split_weight`].
pub fn linear(x: Tensor<2>, w: &Tensor<3>) -> Tensor<2> {
    let [rows, inp] = x.dims();
    if x.dtype() == w.dtype() && crate::matvec::dense_kernel_applies(rows, &x.device()) {
        return crate::matvec::split_matvec(x, w);
    }
    let [_, out, _] = w.dims();
    batched_linear(x.reshape([1, rows, inp]), w.clone().unsqueeze_dim(0)).reshape([rows, out])
}

/// Whether a product of `x` with a weight of `w_dtype` goes through cuBLAS.
fn cublas_applies<const D: usize>(x: &Tensor<D>, w_dtype: DType) -> bool {
    x.dtype() == w_dtype && crate::cublas::supports(w_dtype) && crate::cublas::available(&x.device())
}

/// `a · b` per leading index (`[.., m, k] · [.., k, n]`, the same leading dimensions):
/// through cuBLAS where it is available, else burn's matmul.
pub fn batched_matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    let (ad, bd) = (a.dims(), b.dims());
    if D < 3 || ad[..D - 2] != bd[..D - 2] || !cublas_applies(&a, b.dtype()) {
        return a.matmul(b);
    }
    crate::cublas::matmul(a, b)
}

/// Per batch entry `b`: `x[b] [rows, in] · w[b]ᵀ -> [batch, rows, out]`, `w` from
/// [`split_stacked`] (`[batch, parts, out, in / parts]`).
pub fn batched_linear(x: Tensor<3>, w: Tensor<4>) -> Tensor<3> {
    let [batch, rows, _] = x.dims();
    let [_, parts, out, block] = w.dims();
    if parts == 1 {
        // The weight's transpose as a view: cuBLAS reads `[out, in]` in place.
        let w = w.reshape([batch, out, block]).swap_dims(1, 2);
        if cublas_applies(&x, w.dtype()) {
            return crate::cublas::matmul(x, w);
        }
        return x.matmul(w);
    }
    // One row per entry (decode): `[batch, 1, parts * block]` already lies in `[batch *
    // parts, 1, block]` order, so no copy is queued.
    let xs = if rows == 1 {
        x.reshape([batch * parts, 1, block])
    } else {
        x.reshape([batch, rows, parts, block]).swap_dims(1, 2).reshape([batch * parts, rows, block])
    };
    let partial = xs.matmul(w.reshape([batch * parts, out, block]).transpose()).reshape([batch, parts, rows, out]);
    let dtype = partial.dtype();
    let y = partial.cast(DType::F32).sum_dim(1).reshape([batch, rows, out]);
    if dtype == DType::F32 { y } else { y.cast(dtype) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn values<const D: usize>(x: Tensor<D>) -> Vec<f32> {
        x.cast(DType::F32).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        (num / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
    }

    #[test]
    fn split_weights_give_the_plain_product() {
        let d = Device::flex();
        let w: Tensor<2> = Tensor::random([48, 64], Distribution::Uniform(-1.0, 1.0), &d);
        for rows in [1, 5] {
            let x: Tensor<2> = Tensor::random([rows, 64], Distribution::Uniform(-1.0, 1.0), &d);
            let want = values(x.clone().matmul(w.clone().transpose()));
            for parts in [1, 2, 8] {
                let got = values(linear(x.clone(), &split_weight(w.clone(), parts)));
                assert!(rel_l2(&got, &want) < 1e-6, "rows {rows}, parts {parts}");
            }
            // bf16 in and out: within bf16 rounding of the f32 product.
            let got = values(linear(x.clone().cast(DType::BF16), &split_weight(w.clone().cast(DType::BF16), 8)));
            assert!(rel_l2(&got, &want) < 1e-2, "bf16, rows {rows}: {}", rel_l2(&got, &want));
        }
        // A stack: each entry its own weight and rows.
        let ws: Tensor<3> = Tensor::random([3, 16, 32], Distribution::Uniform(-1.0, 1.0), &d);
        let xs: Tensor<3> = Tensor::random([3, 2, 32], Distribution::Uniform(-1.0, 1.0), &d);
        let want = values(xs.clone().matmul(ws.clone().transpose()));
        for parts in [1, 4] {
            let got = values(batched_linear(xs.clone(), split_stacked(ws.clone(), parts)));
            assert!(rel_l2(&got, &want) < 1e-6, "stack, parts {parts}");
        }
    }

    #[test]
    fn split_blocks_hold_consecutive_columns() {
        let d = Device::flex();
        let w: Tensor<2> = Tensor::from_data(burn::tensor::TensorData::new((0..8).map(|v| v as f32).collect::<Vec<_>>(), [2, 4]), &d);
        // [[0,1,2,3],[4,5,6,7]] -> block 0 [[0,1],[4,5]], block 1 [[2,3],[6,7]].
        assert_eq!(values(split_weight(w, 2)), vec![0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
    }

    #[test]
    fn parts_follow_the_input_width_on_gpus_and_are_one_on_the_cpu() {
        assert_eq!(split_parts(9728, &Device::flex()), 1);
        let gpu = Device::cuda(0usize);
        // Constructing a device handle does not touch the driver.
        assert_eq!(split_parts(2560, &gpu), 8);
        assert_eq!(split_parts(9728, &gpu), 32);
        assert_eq!(split_parts(4096, &gpu), 16);
        assert_eq!(split_parts(768, &gpu), 2);
        assert_eq!(split_parts(100, &gpu), 1);
    }
}
