//! Attention's scaled, masked softmax over the slots, as one CubeCL kernel: transformers'
//! `eager_attention_forward` computes `softmax(dtype(scores * scale) + mask, dim=-1,
//! dtype=float32).to(dtype)`, which burn queues as a product, a cast, an add, the softmax's
//! reductions and exponentials and a cast back, each a pass over the `[heads, t, slots]`
//! scores in f32 (537 MB per layer for a 2,048-token Qwen3-4B prefill). Here one cube (eight
//! planes) per score row reads the row three times from cache (maximum, sum of
//! exponentials, output) and writes the probabilities once, in the scores' dtype.
//!
//! The reference on every backend is [`scaled_masked_softmax_reference`], the operations
//! [`crate::attention::gqa_attention`] ran before; the kernel is checked against it on the
//! device (`kernels/examples/kernel_check.rs`, group `attention`).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Tensor};
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use crate::launch::{PLANE, is_cubecl, last_axis_contiguous};

/// Planes per row: one cube of 256 units per row of slots.
const PLANES_PER_ROW: u32 = 8;

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
    use crate::launch::device::cube_reduce;

    const PLANES: usize = crate::softmax::PLANES_PER_ROW as usize;

    /// The score at `s` of a row as transformers forms it: rounded to the dtype after the
    /// scale, then in f32 plus the mask.
    #[cube]
    fn score<E: Float>(scores: &Tensor<E>, start: usize, mask: &Tensor<f32>, m_start: usize, s: usize, scale: f32) -> f32 {
        let scaled = E::cast_from(f32::cast_from(scores[start + s]) * scale);
        f32::cast_from(scaled) + mask[m_start + s]
    }

    #[cube(launch_unchecked)]
    pub fn softmax_kernel<E: Float>(
        scores: &Tensor<E>,
        mask: &Tensor<f32>,
        out: &mut Tensor<E>,
        rows: usize,
        scale: f32,
        queries: usize,
        per_batch: usize,
        #[define(E)] _dtype: ElemType,
    ) {
        // The whole cube leaves together (one cube per row).
        let row = CUBE_POS_X as usize;
        if row >= rows {
            terminate!();
        }
        let slots = scores.shape(1);
        let start = row * scores.stride(0);
        let m_start = ((row / per_batch) * queries + row % queries) * mask.stride(0);
        let step = CUBE_DIM as usize;
        let mut most = f32::new(-3.0e38);
        let mut s = UNIT_POS as usize;
        while s < slots {
            most = f32::max(most, score(scores, start, mask, m_start, s, scale));
            s += step;
        }
        let most = cube_reduce(most, PLANES, true);
        let mut sum = f32::new(0.0);
        let mut s = UNIT_POS as usize;
        while s < slots {
            sum += (score(scores, start, mask, m_start, s, scale) - most).exp();
            s += step;
        }
        let inv = f32::new(1.0) / cube_reduce(sum, PLANES, false);
        let o_start = row * slots;
        let mut s = UNIT_POS as usize;
        while s < slots {
            out[o_start + s] = E::cast_from((score(scores, start, mask, m_start, s, scale) - most).exp() * inv);
            s += step;
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
    let client = scores.client.clone();
    let out = empty_device_contiguous_dtype(client.clone(), scores.device.clone(), shape, dtype);
    // SAFETY: row `row < rows` (checked) of the scores starts at `row * stride(0)` and spans
    // `slots` contiguous elements; its mask row is `< mask rows` (asserted) and `slots` wide
    // (asserted); `out` is contiguous `[rows, slots]`.
    unsafe {
        device::softmax_kernel::launch_unchecked(
            &client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_2d(PLANE as u32, PLANES_PER_ROW),
            scores.into_tensor_arg(),
            mask.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows,
            scale as f32,
            queries,
            per_batch,
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
    let zeros = Tensor::<2>::zeros([1, slots], (&scores.device(), DType::F32));
    let out = Dispatch::fused_scaled_masked_softmax(scores.reshape([total, slots]).into_dispatch(), zeros.into_dispatch(), scale, 1, total);
    Tensor::<2>::from_dispatch(out).reshape([batch, kv_heads, rows, slots])
}

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
