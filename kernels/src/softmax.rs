//! Attention's scaled, masked softmax over the slots, as one CubeCL kernel: transformers'
//! `eager_attention_forward` computes `softmax(dtype(scores * scale) + mask, dim=-1,
//! dtype=float32).to(dtype)`, which burn queues as a product, a cast, an add, the softmax's
//! reductions and exponentials and a cast back, each a pass over the `[heads, t, slots]`
//! scores in f32 (537 MB per layer for a 2,048-token Qwen3-4B prefill). Here one plane per
//! score row reads the row in 16-byte vectors twice (the maximum and the sum of exponentials
//! together, as an online softmax, then the output) and writes the probabilities once, in the
//! scores' dtype. (It replaced one cube of eight planes per row with three passes and two
//! cube-wide reductions: H200 prefill profiles put the old kernel at about 0.6 TB/s counting
//! one read and one write, 2026-12-03, and this one at 1.2 TB/s under Nsight Compute,
//! 2026-12-04.)
//!
//! The reference on every backend is [`scaled_masked_softmax_reference`], the operations
//! [`crate::attention::gqa_attention`] ran before; the kernel is checked against it on the
//! device (`kernels/examples/kernel_check.rs`, group `attention`).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Device, Tensor};
use std::sync::Mutex;
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use crate::launch::{PLANE, is_cubecl, last_axis_contiguous, row_vector_width, vector_width};

/// Rows per cube, one plane each.
const ROWS_PER_CUBE: usize = 8;

/// The softmax as a backend operation (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait SoftmaxOps: Backend {
    /// `scores [rows, slots]`, `mask [mask_rows, slots]` (f32, additive; row `r` of the scores
    /// takes mask row `(r / per_batch) * queries + r % queries`).
    #[fusion(dtype = scores, shape = scores)]
    fn fused_scaled_masked_softmax(
        scores: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        scale: f64,
        queries: usize,
        per_batch: usize,
    ) -> FloatTensor<Self>;
}

impl SoftmaxOps for CubeBackend {
    fn fused_scaled_masked_softmax(
        scores: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        scale: f64,
        queries: usize,
        per_batch: usize,
    ) -> FloatTensor<Self> {
        launch(scores, mask, scale, queries, per_batch)
    }
}

/// The kernel, apart from burn's names (`Tensor` is CubeCL's here).
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    /// Row `s`'s scores as transformers forms them (vector `s` of the row): rounded to the
    /// dtype after the scale, then in f32 plus the mask.
    #[cube]
    fn scores_at<E: Float, N: Size>(scores: &Tensor<Vector<E, N>>, start: usize, mask: &Tensor<Vector<f32, N>>, m_start: usize, s: usize, scale: f32) -> Vector<f32, N> {
        let scaled = Vector::<E, N>::cast_from(Vector::<f32, N>::cast_from(scores[start + s]) * Vector::new(scale));
        Vector::<f32, N>::cast_from(scaled) + mask[m_start + s]
    }

    /// One plane per row: each lane takes every 32nd vector of the row, keeping a running
    /// maximum and the sum of exponentials below it (an online softmax: Milakov & Gimelshein
    /// 2018), the plane combines them, and a second pass writes the probabilities.
    #[cube(launch_unchecked)]
    pub fn softmax_kernel<E: Float, N: Size>(
        scores: &Tensor<Vector<E, N>>,
        mask: &Tensor<Vector<f32, N>>,
        out: &mut Tensor<Vector<E, N>>,
        rows: usize,
        scale: f32,
        queries: usize,
        per_batch: usize,
        #[comptime] width: usize,
        #[define(E)] _dtype: ElemType,
    ) {
        // The whole plane leaves together (one plane per row).
        let row = (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) as usize;
        if row >= rows {
            terminate!();
        }
        let vectors = scores.shape(1) / width;
        let start = row * scores.stride(0) / width;
        let m_start = ((row / per_batch) * queries + row % queries) * mask.stride(0) / width;
        let mut best = f32::new(-3.0e38);
        let mut sum = f32::new(0.0);
        let mut s = UNIT_POS_X as usize;
        while s < vectors {
            let x = scores_at(scores, start, mask, m_start, s, scale);
            let mut top = x.extract(0usize);
            #[unroll]
            for i in 1..width {
                top = f32::max(top, x.extract(i));
            }
            let new = f32::max(best, top);
            sum = sum * (best - new).exp() + Vector::vector_sum((x - Vector::new(new)).exp());
            best = new;
            s += 32usize;
        }
        let most = plane_max(best);
        let inv = f32::new(1.0) / plane_sum(sum * (best - most).exp());
        let o_start = row * vectors;
        let mut s = UNIT_POS_X as usize;
        while s < vectors {
            let x = scores_at(scores, start, mask, m_start, s, scale);
            out[o_start + s] = Vector::cast_from((x - Vector::new(most)).exp() * Vector::new(inv));
            s += 32usize;
        }
    }
}

fn launch(scores: CubeTensor, mask: CubeTensor, scale: f64, queries: usize, per_batch: usize) -> CubeTensor {
    let shape = scores.meta.shape().clone();
    let (rows, slots) = (shape[0], shape[1]);
    let dtype = scores.dtype;
    assert_eq!(mask.dtype, DType::F32, "softmax: the mask is f32");
    assert_eq!(mask.meta.shape()[1], slots, "softmax: the mask's width differs from the scores'");
    assert!(queries > 0 && per_batch > 0 && per_batch.is_multiple_of(queries), "softmax: {per_batch} rows per batch entry of {queries} queries");
    assert!(rows.div_ceil(per_batch) * queries <= mask.meta.shape()[0], "softmax: the mask has too few rows");
    let scores = last_axis_contiguous(scores);
    let mask = into_contiguous(mask);
    let width = row_vector_width(vector_width(slots, dtype), &[&scores, &mask]);
    let client = scores.client.clone();
    let out = empty_device_contiguous_dtype(client.clone(), scores.device.clone(), shape, dtype);
    // SAFETY: row `row < rows` (checked) of the scores starts at `row * stride(0)` and spans
    // `slots` contiguous elements, `width` dividing both; its mask row is `< mask rows`
    // (asserted) and `slots` wide (asserted); `out` is contiguous `[rows, slots]`.
    unsafe {
        device::softmax_kernel::launch_unchecked(
            &client,
            CubeCount::Static(rows.div_ceil(ROWS_PER_CUBE) as u32, 1, 1),
            CubeDim::new_2d(PLANE as u32, ROWS_PER_CUBE as u32),
            width,
            scores.into_tensor_arg(),
            mask.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows,
            scale as f32,
            queries,
            per_batch,
            width,
            dtype_to_storage_type(dtype),
        )
    };
    out
}

/// `softmax(dtype(scores * scale) + mask)` over the slots, in f32, returned in the scores'
/// dtype: `scores [batch, kv_heads, group * t, slots]` (query `i` of head group `g` at row
/// `g * t + i`), `mask [batch, 1, 1, t, slots]` (f32, additive).
pub fn scaled_masked_softmax_reference(scores: Tensor<4>, mask: Option<&Tensor<5>>, scale: f64, t: usize) -> Tensor<4> {
    let [batch, kv_heads, rows, slots] = scores.dims();
    let dtype = scores.dtype();
    let scores = scores.mul_scalar(scale).cast(DType::F32).reshape([batch, kv_heads, rows / t, t, slots]);
    let scores = match mask {
        Some(m) => scores.add(m.clone()),
        None => scores,
    };
    softmax(scores, 4).cast(dtype).reshape([batch, kv_heads, rows, slots])
}

/// [`scaled_masked_softmax_reference`] by the kernel (CubeCL devices only; a mask is
/// required, as the prefills that run it have one).
pub fn fused_scaled_masked_softmax(scores: Tensor<4>, mask: &Tensor<5>, scale: f64, t: usize) -> Tensor<4> {
    let [batch, kv_heads, rows, slots] = scores.dims();
    let per_batch = kv_heads * rows;
    let scores = scores.reshape([batch * per_batch, slots]);
    let mask = mask.clone().reshape([batch * t, slots]);
    let out = Dispatch::fused_scaled_masked_softmax(scores.into_dispatch(), mask.into_dispatch(), scale, t, per_batch);
    Tensor::<2>::from_dispatch(out).reshape([batch, kv_heads, rows, slots])
}

/// [`scaled_masked_softmax_reference`] without a mask by the kernel (CubeCL devices only):
/// every row takes one zero mask row (`queries` 1, all rows one batch), so the kernel reads
/// the scores alone. A vision tower's full attention (Qwen3-VL: 16 heads x 7,056² scores at
/// 1344 pixels) ran burn's nine passes over the f32 scores before: 14 ms a block on the H200.
pub fn fused_scaled_softmax(scores: Tensor<4>, scale: f64) -> Tensor<4> {
    let [batch, kv_heads, rows, slots] = scores.dims();
    let total = batch * kv_heads * rows;
    let zeros = zero_row(&scores.device(), slots);
    let out = Dispatch::fused_scaled_masked_softmax(scores.reshape([total, slots]).into_dispatch(), zeros.into_dispatch(), scale, 1, total);
    Tensor::<2>::from_dispatch(out).reshape([batch, kv_heads, rows, slots])
}

/// A zero f32 row `[1, slots]` on `device`, kept for the next calls of that width (a vision
/// tower asks for the same one in each of its blocks; making it was a launch each). The last
/// [`ZERO_ROWS_KEPT`] widths are kept.
fn zero_row(device: &Device, slots: usize) -> Tensor<2> {
    static ROWS: Mutex<Vec<(Device, usize, Tensor<2>)>> = Mutex::new(Vec::new());
    let mut rows = ROWS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(i) = rows.iter().position(|(d, n, _)| d == device && *n == slots) {
        let kept = rows.remove(i);
        let row = kept.2.clone();
        rows.push(kept);
        return row;
    }
    let row = Tensor::<2>::zeros([1, slots], (device, DType::F32));
    if rows.len() == ZERO_ROWS_KEPT {
        rows.remove(0);
    }
    rows.push((device.clone(), slots, row.clone()));
    row
}

/// Zero rows kept by [`zero_row`]: a few image sizes in turn.
const ZERO_ROWS_KEPT: usize = 4;

/// The scaled, masked softmax: the kernel on CubeCL devices, the reference elsewhere.
pub fn scaled_masked_softmax(scores: Tensor<4>, mask: Option<&Tensor<5>>, scale: f64, t: usize) -> Tensor<4> {
    if !(is_cubecl(&scores.device()) && matches!(scores.dtype(), DType::F32 | DType::BF16 | DType::F16)) {
        return scaled_masked_softmax_reference(scores, mask, scale, t);
    }
    match mask {
        Some(m) => fused_scaled_masked_softmax(scores, m, scale, t),
        None => fused_scaled_softmax(scores, scale),
    }
}
