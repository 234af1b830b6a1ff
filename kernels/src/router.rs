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
//! The reference on every backend is [`softmax_top_k_reference`] (burn's operations, what the
//! engine ran before); the kernel is checked against it on the device
//! (`kernels/examples/kernel_check.rs`, group `elementwise`).

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Int, Shape, Tensor};
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
    /// `logits [rows, experts]` (f32): `[rows, 2k]` f32, each row's expert indices then weights.
    #[fusion(dtype = burn::tensor::DType::F32, shape = picks_shape(logits, *k))]
    fn fused_softmax_top_k(logits: FloatTensor<Self>, k: usize, normalize: bool) -> FloatTensor<Self>;
}

impl RouterOps for CubeBackend {
    fn fused_softmax_top_k(logits: FloatTensor<Self>, k: usize, normalize: bool) -> FloatTensor<Self> {
        launch(logits, k, normalize)
    }
}

/// The kernel, apart from burn's names (`Tensor` is CubeCL's here).
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    #[cube(launch_unchecked)]
    pub fn softmax_top_k_kernel(
        logits: &Tensor<f32>,
        out: &mut Tensor<f32>,
        rows: usize,
        #[comptime] experts: usize,
        #[comptime] k: usize,
        #[comptime] normalize: bool,
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
                values[j] = logits[start + e];
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
}

fn launch(logits: CubeTensor, k: usize, normalize: bool) -> CubeTensor {
    let shape = logits.meta.shape().clone();
    let (rows, experts) = (shape[0], shape[1]);
    assert_eq!(logits.dtype, DType::F32, "router top-k: the logits are f32");
    assert!(k >= 1 && k <= experts && experts <= MOST_EXPERTS, "router top-k: {k} of {experts} experts");
    let logits = into_contiguous(logits);
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
        )
    };
    out
}

/// The `k` largest softmax probabilities of each row of `logits [rows, experts]` (f32) and
/// their expert indices, `([rows, k] ids, [rows, k] f32 weights)`, largest first; the weights
/// divided by their sum when `normalize`. burn's operations.
pub fn softmax_top_k_reference(logits: Tensor<2>, k: usize, normalize: bool) -> (Tensor<2, Int>, Tensor<2>) {
    let (weights, experts) = softmax(logits, 1).topk_with_indices(k, 1);
    let weights = if normalize { weights.clone().div(weights.sum_dim(1)) } else { weights };
    (experts, weights)
}

/// [`softmax_top_k_reference`] by the kernel (CubeCL devices, f32 logits, at most
/// [`MOST_EXPERTS`] experts).
pub fn fused_softmax_top_k(logits: Tensor<2>, k: usize, normalize: bool) -> (Tensor<2, Int>, Tensor<2>) {
    let picks = Tensor::<2>::from_dispatch(Dispatch::fused_softmax_top_k(logits.into_dispatch(), k, normalize));
    (picks.clone().narrow(1, 0, k).int(), picks.narrow(1, k, k))
}

/// The router's softmax and top-k: the kernel on CubeCL devices, the reference elsewhere.
pub fn softmax_top_k(logits: Tensor<2>, k: usize, normalize: bool) -> (Tensor<2, Int>, Tensor<2>) {
    let experts = logits.dims()[1];
    if is_cubecl(&logits.device()) && logits.dtype() == DType::F32 && k >= 1 && k <= experts && experts <= MOST_EXPERTS {
        fused_softmax_top_k(logits, k, normalize)
    } else {
        softmax_top_k_reference(logits, k, normalize)
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
}
