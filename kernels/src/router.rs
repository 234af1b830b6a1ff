//! A mixture-of-experts router's softmax and top-k as one kernel (transformers'
//! `Qwen3MoeSparseMoeBlock`: `softmax(router_logits, dim=1, dtype=float)`, `torch.topk(...,
//! top_k)`, divided by their sum when `norm_topk_prob`; vLLM's `topk_softmax` CUDA kernel does
//! the same in one launch).
//!
//! burn queues the softmax's reductions and exponentials, then a sort-based `topk` and the
//! renormalisation, each a kernel of its own: under Nsight Compute the top-k alone took 21 µs a
//! layer of a batch-1 Qwen3-Coder-30B-A3B step on the H100 (2026-12-06), for 128 values. Here
//! one plane (32 lanes) takes a row: each lane holds every 32nd logit in registers, the plane
//! reduces the maximum and the sum of exponentials, then picks the `k` largest one at a time
//! (each lane's best untaken value, the plane's largest, the lowest index holding it, as
//! `torch.topk` orders equal values in practice) and writes their indices and weights.
//!
//! The layer's output is the chosen experts' outputs weighted and summed (transformers:
//! `final_hidden_states += expert_layer(...) * routing_weights[...]`, the weights cast to the
//! hidden states' dtype): [`combine`] does it in one kernel where burn queued a cast of the
//! weights, a product and a sum over the `k` rows (about 13 µs a layer of the batch-1 step
//! above), rounding as those operations do (each product to the dtype, the sum in f32).
//!
//! The references on every backend are [`softmax_top_k_reference`] and [`combine_reference`]
//! (burn's operations, what the engine ran before); the kernels are checked against them on
//! the device (`kernels/examples/kernel_check.rs`, group `elementwise`).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Int, Shape, Tensor, TensorData};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use crate::launch::{PLANE, is_cubecl};

/// Rows per cube, one plane each.
const ROWS_PER_CUBE: usize = 4;
/// The most experts the kernel takes (32 registers a lane).
pub const MOST_EXPERTS: usize = 32 * PLANE;

/// The kernel's output shape: each row's `k` indices (as f32) then their `k` weights.
pub fn picks_shape(logits: &Shape, k: usize) -> Shape {
    Shape::new([logits[0], 2 * k])
}

/// The router as a backend operation (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait RouterOps: Backend {
    /// `logits [rows, experts]` (any float dtype, read as f32): `[rows, 2k]` f32, each row's
    /// expert indices then weights.
    #[fusion(dtype = burn::tensor::DType::F32, shape = picks_shape(logits, *k))]
    fn fused_softmax_top_k(logits: FloatTensor<Self>, k: usize, normalize: bool) -> FloatTensor<Self>;

    /// `slots [rows * k, width]` (row `r`'s `k` outputs, token-major) weighted by `weights
    /// [rows, k]` (f32, any strides) and summed: `[rows, width]` in the slots' dtype.
    #[fusion(dtype = slots, shape = combined_shape(slots, weights))]
    fn fused_combine(slots: FloatTensor<Self>, weights: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The combined output's shape: `[rows, width]`.
pub fn combined_shape(slots: &Shape, weights: &Shape) -> Shape {
    Shape::new([weights[0], slots[1]])
}

impl RouterOps for CubeBackend {
    fn fused_softmax_top_k(logits: FloatTensor<Self>, k: usize, normalize: bool) -> FloatTensor<Self> {
        launch(logits, k, normalize)
    }

    fn fused_combine(slots: FloatTensor<Self>, weights: FloatTensor<Self>) -> FloatTensor<Self> {
        launch_combine(slots, weights)
    }
}

/// The kernel, apart from burn's names (`Tensor` is CubeCL's here).
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    #[cube(launch_unchecked)]
    pub fn softmax_top_k_kernel<E: Float>(
        logits: &Tensor<E>,
        out: &mut Tensor<f32>,
        rows: usize,
        #[comptime] experts: usize,
        #[comptime] k: usize,
        #[comptime] normalize: bool,
        #[define(E)] _dtype: ElemType,
    ) {
        // The whole plane leaves together (one plane per row).
        let row = (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) as usize;
        if row >= rows {
            terminate!();
        }
        let lane = UNIT_POS_X as usize;
        let per_lane = comptime!(experts.div_ceil(32));
        let start = row * logits.stride(0);
        // Lane `l` holds experts `l, l + 32, ...`; 0 marks one taken or past the end.
        let mut values = Array::<f32>::new(per_lane);
        let mut open = Array::<u32>::new(per_lane);
        let mut top = f32::new(-3.0e38);
        #[unroll]
        for j in 0..per_lane {
            let e = lane + j * 32;
            values[j] = f32::new(-3.0e38);
            open[j] = u32::new(0);
            if e < experts {
                values[j] = f32::cast_from(logits[start + e]);
                open[j] = u32::new(1);
                top = f32::max(top, values[j]);
            }
        }
        let most = plane_max(top);
        let mut sum = f32::new(0.0);
        #[unroll]
        for j in 0..per_lane {
            if open[j] == u32::new(1) {
                sum += (values[j] - most).exp();
            }
        }
        let total = plane_sum(sum);
        // The picks' exponentials (every lane holds them: the plane's values are uniform).
        let mut picked = Array::<f32>::new(k);
        let mut kept = f32::new(0.0);
        let o = row * 2 * k;
        #[unroll]
        for i in 0..k {
            // A lane's indices rise with `j`: `>` keeps its first of equal values.
            let mut best = f32::new(-3.0e38);
            let mut at = u32::cast_from(experts);
            #[unroll]
            for j in 0..per_lane {
                if open[j] == u32::new(1) && (values[j] > best || at == u32::cast_from(experts)) {
                    best = values[j];
                    at = u32::cast_from(lane + j * 32);
                }
            }
            let winner = plane_max(best);
            let mut mine = u32::cast_from(experts);
            if best == winner {
                mine = at;
            }
            let chosen = plane_min(mine);
            #[unroll]
            for j in 0..per_lane {
                if u32::cast_from(lane + j * 32) == chosen {
                    open[j] = u32::new(0);
                }
            }
            let e = (winner - most).exp();
            picked[i] = e;
            kept += e;
            if lane == 0 {
                out[o + i] = f32::cast_from(chosen);
            }
        }
        let mut denominator = total;
        if normalize {
            denominator = kept;
        }
        if lane == 0 {
            #[unroll]
            for i in 0..k {
                out[o + k + i] = picked[i] / denominator;
            }
        }
    }

    /// One unit per vector of the output: row `r`'s `k` slot rows, each times its weight
    /// rounded to the dtype, the product rounded to the dtype, summed in f32.
    #[cube(launch_unchecked)]
    pub fn combine_kernel<E: Float, N: Size>(
        slots: &Tensor<Vector<E, N>>,
        weights: &Tensor<f32>,
        out: &mut Tensor<Vector<E, N>>,
        #[comptime] k: usize,
        #[define(E)] _dtype: ElemType,
    ) {
        let index = ABSOLUTE_POS;
        if index >= out.len() {
            terminate!();
        }
        // Shapes count elements, indices count vectors.
        let width = out.shape(1) / out.vector_size();
        let (row, v) = (index / width, index % width);
        let mut sum = Vector::<f32, N>::new(0.0);
        #[unroll]
        for j in 0..k {
            let w = f32::cast_from(E::cast_from(weights[row * weights.stride(0) + j * weights.stride(1)]));
            let term = Vector::<E, N>::cast_from(Vector::<f32, N>::cast_from(slots[(row * k + j) * width + v]) * Vector::new(w));
            sum += Vector::<f32, N>::cast_from(term);
        }
        out[index] = Vector::cast_from(sum);
    }
}

fn launch(logits: CubeTensor, k: usize, normalize: bool) -> CubeTensor {
    let shape = logits.meta.shape().clone();
    let (rows, experts) = (shape[0], shape[1]);
    assert!(k >= 1 && k <= experts && experts <= MOST_EXPERTS, "router top-k: {k} of {experts} experts");
    let logits = into_contiguous(logits);
    let dtype = logits.dtype;
    let client = logits.client.clone();
    let out = empty_device_contiguous_dtype(client.clone(), logits.device.clone(), picks_shape(&shape, k), DType::F32);
    // SAFETY: row `row < rows` (checked in the kernel) starts at `row * stride(0)` of the
    // contiguous logits and has `experts` values (lanes read only `e < experts`); `out` is
    // contiguous `[rows, 2k]` and row `row`'s lane 0 writes its `2k` entries.
    unsafe {
        device::softmax_top_k_kernel::launch_unchecked(
            &client,
            CubeCount::Static(rows.div_ceil(ROWS_PER_CUBE) as u32, 1, 1),
            CubeDim::new_2d(PLANE as u32, ROWS_PER_CUBE as u32),
            logits.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows,
            experts,
            k,
            normalize,
            dtype_to_storage_type(dtype),
        )
    };
    out
}

/// The `k` largest softmax probabilities (in f32) of each row of `logits [rows, experts]` and
/// their expert indices, `([rows, k] ids, [rows, k] f32 weights)`, largest first; the weights
/// divided by their sum when `normalize`. burn's operations.
pub fn softmax_top_k_reference(logits: Tensor<2>, k: usize, normalize: bool) -> (Tensor<2, Int>, Tensor<2>) {
    let (weights, experts) = softmax(logits.cast(DType::F32), 1).topk_with_indices(k, 1);
    let weights = if normalize { weights.clone().div(weights.sum_dim(1)) } else { weights };
    (experts, weights)
}

/// [`softmax_top_k_reference`] by the kernel (CubeCL devices, f32, bf16 or f16 logits, at
/// most [`MOST_EXPERTS`] experts).
pub fn fused_softmax_top_k(logits: Tensor<2>, k: usize, normalize: bool) -> (Tensor<2, Int>, Tensor<2>) {
    let picks = Tensor::<2>::from_dispatch(Dispatch::fused_softmax_top_k(logits.into_dispatch(), k, normalize));
    (picks.clone().narrow(1, 0, k).int(), picks.narrow(1, k, k))
}

/// The router's softmax and top-k: the kernel on CubeCL devices, one loop over each row of f32
/// logits on the CPU ([`softmax_top_k_rows`]: the reference's softmax, six burn operations and
/// a sort, took a fortieth of a small Qwen3-MoE's one-thread decode), the reference elsewhere.
pub fn softmax_top_k(logits: Tensor<2>, k: usize, normalize: bool) -> (Tensor<2, Int>, Tensor<2>) {
    let [rows, experts] = logits.dims();
    let device = logits.device();
    if is_cubecl(&device) && matches!(logits.dtype(), DType::F32 | DType::BF16 | DType::F16) && k >= 1 && k <= experts && experts <= MOST_EXPERTS {
        fused_softmax_top_k(logits, k, normalize)
    } else if logits.dtype() == DType::F32
        && k >= 1
        && k <= experts
        && let Ok(values) = logits.clone().into_data().try_into_vec::<f32>()
    {
        let (ids, weights) = softmax_top_k_rows(&values, experts, k, normalize);
        (Tensor::from_data(TensorData::new(ids, [rows, k]), &device), Tensor::from_data(TensorData::new(weights, [rows, k]), (&device, DType::F32)))
    } else {
        softmax_top_k_reference(logits, k, normalize)
    }
}

/// [`softmax_top_k_reference`] of host rows `logits` (`experts` values a row): each row's
/// softmax in f32 (`exp(x - max) / Σ exp(x - max)`), its `k` largest probabilities, largest
/// first and the lowest index first among equal ones (as the kernel and `torch.topk` order
/// them), divided by their sum when `normalize`: `(ids, weights)`, `k` a row.
pub fn softmax_top_k_rows(logits: &[f32], experts: usize, k: usize, normalize: bool) -> (Vec<i64>, Vec<f32>) {
    let rows = logits.len() / experts.max(1);
    let (mut ids, mut weights) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
    let mut probs = vec![0f32; experts];
    let mut taken = vec![false; experts];
    for row in logits.chunks_exact(experts) {
        probs.copy_from_slice(row);
        crate::cpu_rows::softmax_in_place(&mut probs);
        taken.fill(false);
        let first = weights.len();
        for _ in 0..k {
            let mut best = None::<usize>;
            for (e, &p) in probs.iter().enumerate() {
                // `>` keeps the lowest index among equal values; NaN is never chosen over a number.
                if !taken[e] && best.is_none_or(|b| p > probs[b] || probs[b].is_nan() && !p.is_nan()) {
                    best = Some(e);
                }
            }
            let e = best.unwrap_or(0);
            taken[e] = true;
            ids.push(e as i64);
            weights.push(probs[e]);
        }
        if normalize {
            let total: f32 = weights[first..].iter().sum();
            for w in &mut weights[first..] {
                *w /= total;
            }
        }
    }
    (ids, weights)
}

/// Units per cube of the combine kernel.
const COMBINE_UNITS: u32 = 256;

fn launch_combine(slots: CubeTensor, weights: CubeTensor) -> CubeTensor {
    let (rows, k) = (weights.meta.shape()[0], weights.meta.shape()[1]);
    let shape = slots.meta.shape().clone();
    let width = shape[1];
    assert_eq!(weights.dtype, DType::F32, "combine: the weights are f32");
    assert_eq!(shape[0], rows * k, "combine: {} slot rows for {rows} rows of {k}", shape[0]);
    let slots = into_contiguous(slots);
    let dtype = slots.dtype;
    let vector = crate::launch::vector_width(width, dtype);
    let out = empty_device_contiguous_dtype(slots.client.clone(), slots.device.clone(), Shape::new([rows, width]), dtype);
    let units = rows * width / vector;
    let client = out.client.clone();
    // SAFETY: unit `index < out.len()` (checked, in vectors) reads row `r = index / (width /
    // vector)` of the output's `k` contiguous slot rows `r * k + j < rows * k` (asserted) and
    // weights `[r, j]` through their strides (`r < rows`, `j < k`: the weights' shape), and
    // writes the contiguous `out`.
    unsafe {
        device::combine_kernel::launch_unchecked(
            &client,
            CubeCount::Static((units as u32).div_ceil(COMBINE_UNITS), 1, 1),
            CubeDim::new_1d(COMBINE_UNITS),
            vector,
            slots.into_tensor_arg(),
            weights.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            k,
            dtype_to_storage_type(dtype),
        )
    };
    out
}

/// Row `r` of `slots [rows * k, width]` (token-major) summed over its `k` rows, each times
/// `weights [rows, k]` (f32) cast to the slots' dtype: `[rows, width]`. burn's operations.
pub fn combine_reference(slots: Tensor<2>, weights: Tensor<2>) -> Tensor<2> {
    let [rows, k] = weights.dims();
    let width = slots.dims()[1];
    let weights = weights.cast(slots.dtype()).reshape([rows, k, 1]);
    slots.reshape([rows, k, width]).mul(weights).sum_dim(1).reshape([rows, width])
}

/// [`combine_reference`] by the kernel (CubeCL devices only; f32 weights).
pub fn fused_combine(slots: Tensor<2>, weights: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::fused_combine(slots.into_dispatch(), weights.into_dispatch()))
}

/// The chosen experts' outputs weighted and summed: the kernel on CubeCL devices, the
/// reference elsewhere.
pub fn combine(slots: Tensor<2>, weights: Tensor<2>) -> Tensor<2> {
    if is_cubecl(&slots.device()) && weights.dtype() == DType::F32 && matches!(slots.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        fused_combine(slots, weights)
    } else {
        combine_reference(slots, weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn the_reference_picks_the_largest_and_renormalises() {
        let logits = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 2.0, 1.0, -1.0], [1, 4]), &Device::flex());
        let (ids, weights) = softmax_top_k(logits, 2, true);
        assert_eq!(ids.into_data().convert::<i64>().try_to_vec::<i64>().expect("ids"), vec![1, 2]);
        let w = weights.into_data().try_to_vec::<f32>().expect("weights");
        let e = 1.0f32.exp();
        assert!((w[0] - e / (e + 1.0)).abs() < 1e-6 && (w[1] - 1.0 / (e + 1.0)).abs() < 1e-6, "{w:?}");
    }

    /// The CPU's row loop against burn's operations over random rows, with and without the
    /// renormalisation, and equal logits taken lowest index first.
    #[test]
    fn the_cpu_rows_are_the_reference() {
        use burn::tensor::Distribution;
        let d = Device::flex();
        let (rows, experts) = (7, 32);
        let logits = Tensor::<2>::random([rows, experts], Distribution::Normal(0.0, 2.0), &d);
        let values = logits.clone().into_data().try_into_vec::<f32>().expect("f32");
        for (k, normalize) in [(4, true), (8, false), (1, true)] {
            let (ids, weights) = softmax_top_k_rows(&values, experts, k, normalize);
            let (want_ids, want_weights) = softmax_top_k_reference(logits.clone(), k, normalize);
            assert_eq!(ids, want_ids.into_data().convert::<i64>().try_to_vec::<i64>().expect("ids"), "top {k}");
            let want = want_weights.into_data().try_to_vec::<f32>().expect("weights");
            for (a, b) in weights.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "top {k}: {a} vs {b}");
            }
        }
        let (ids, _) = softmax_top_k_rows(&[1.0, 3.0, 3.0, 0.0, 3.0], 5, 3, true);
        assert_eq!(ids, vec![1, 2, 4], "equal values, lowest index first");
    }
}
