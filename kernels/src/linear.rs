//! Linear layers with the weight in Hugging Face's `[out, in]` layout, as
//! `torch.nn.functional.linear` computes them: `y = x · wᵀ`, accumulated in f32.
//!
//! One row (a batch-1 decode step) is a matrix-vector product, which is bound by reading the
//! weight once. Without autotuning, CubeCL's matmul launches its default tiled kernel for it,
//! which reaches about 110 GB/s on an H200 (2560 -> 9728 bf16 in 311 µs,
//! `benches/results/gpu-h200-2026-12-01-graphs.md`). On such devices one row is computed as a
//! broadcast product and a row sum instead: `w * x` in f32 (exact products, as a bf16 GEMM
//! with f32 accumulation has), summed over `in`. That
//! reads the weight once at full bandwidth (and writes and reads an f32 product, so about five
//! times the weight's bytes move, still several times faster than the tiled kernel). The CPU
//! (burn-flex) keeps its matmul, which is already a matrix-vector kernel there.

use burn::tensor::{DType, Device, Tensor};

/// Whether `rows` rows on `device` take the product-and-sum form.
fn by_reduce(rows: usize, device: &Device) -> bool {
    rows == 1 && *device != Device::flex()
}

/// `x [rows, in] · w [out, in]ᵀ -> [rows, out]`.
pub fn linear(x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
    if by_reduce(x.dims()[0], &x.device()) {
        linear_by_reduce(x, w)
    } else {
        x.matmul(w.clone().transpose())
    }
}

/// [`linear`] of one row as a broadcast product summed in f32: `x [1, in]`.
pub fn linear_by_reduce(x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
    let dtype = x.dtype();
    let [rows, _] = x.dims();
    let out = w.dims()[0];
    let y = w.clone().cast(DType::F32).mul(x.cast(DType::F32)).sum_dim(1).reshape([rows, out]);
    if dtype == DType::F32 { y } else { y.cast(dtype) }
}

/// Per batch entry `b`: `x[b] [rows, in] · w[b] [out, in]ᵀ -> [batch, rows, out]`.
pub fn batched_linear(x: Tensor<3>, w: Tensor<3>) -> Tensor<3> {
    if by_reduce(x.dims()[1], &x.device()) {
        batched_linear_by_reduce(x, w)
    } else {
        x.matmul(w.transpose())
    }
}

/// [`batched_linear`] of one row per entry (`x [batch, 1, in]`) as a product summed in f32.
pub fn batched_linear_by_reduce(x: Tensor<3>, w: Tensor<3>) -> Tensor<3> {
    let dtype = x.dtype();
    let [batch, out, _] = w.dims();
    let y = w.cast(DType::F32).mul(x.cast(DType::F32)).sum_dim(2).reshape([batch, 1, out]);
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
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        (num / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
    }

    #[test]
    fn the_product_and_sum_form_equals_the_matmul() {
        let d = Device::flex();
        let w: Tensor<2> = Tensor::random([48, 40], Distribution::Uniform(-1.0, 1.0), &d);
        let x: Tensor<2> = Tensor::random([1, 40], Distribution::Uniform(-1.0, 1.0), &d);
        let want = values(x.clone().matmul(w.clone().transpose()));
        let got = values(linear_by_reduce(x.clone(), &w));
        assert_eq!(got.len(), 48);
        assert!(rel_l2(&got, &want) < 1e-6, "{got:?} vs {want:?}");
        // bf16 in, bf16 out, within bf16 rounding of the f32 result.
        let got = values(linear_by_reduce(x.clone().cast(DType::BF16), &w.clone().cast(DType::BF16)));
        assert!(rel_l2(&got, &want) < 1e-2, "bf16: {}", rel_l2(&got, &want));
        // Batched: three entries, each its own weight.
        let ws: Tensor<3> = Tensor::random([3, 16, 24], Distribution::Uniform(-1.0, 1.0), &d);
        let xs: Tensor<3> = Tensor::random([3, 1, 24], Distribution::Uniform(-1.0, 1.0), &d);
        let want = values(xs.clone().matmul(ws.clone().transpose()));
        let got = values(batched_linear_by_reduce(xs, ws));
        assert!(rel_l2(&got, &want) < 1e-6);
    }
}
