//! Grouped-query attention over a KV cache (GQA: Ainslie et al. 2023, arXiv:2305.13245), as
//! transformers' `eager_attention_forward` computes it: `softmax(q·kᵀ · scale + mask) · v`
//! with the scores and the softmax in f32.
//!
//! [`gqa_attention`] is the reference on every backend, and what the engine runs: the `group`
//! query heads that share a key head are stacked along the token axis, so keys are never
//! repeated. [`decode_attention`] is our own kernel for one query token per row (a decode
//! step) on CubeCL devices, checked against it on the device: one cube per
//! (row, query head), whose planes (warps) each take every `planes`-th cached slot with an
//! online softmax (Milakov & Gimelshein 2018, arXiv:1805.02867) and are merged through shared
//! memory at the end, the single-pass form of flash-decoding (Dao et al. 2023). Everything
//! inside the kernel is f32; only the output is rounded to the input dtype. It would replace
//! the two small matmuls, the casts, the mask add and the softmax kernels of the reference,
//! once it is faster than they are (see [`decode_attention`]).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Device, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use crate::launch::{PLANE, is_cubecl, last_axis_contiguous, vector_width};

/// Planes (warps) per cube; each takes every `PLANES`-th slot. Each slot's score is a
/// reduction across the plane followed by the softmax update, a chain of dependent steps, so
/// the slots are spread over many planes: with 4 the kernel took 44 µs over 256 slots of the
/// 4B shapes on the H200, slower than the reference's 37 µs.
const PLANES: usize = 16;

/// The decode attention as a backend operation (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait DecodeAttentionOps: Backend {
    /// `q [batch, heads, head_dim]`, `k`/`v [batch, kv_heads, slots, head_dim]` (any strides
    /// but a contiguous last axis), every slot seen: `[batch, heads, head_dim]`.
    #[fusion(dtype = q, shape = q)]
    fn decode_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32) -> FloatTensor<Self>;

    /// [`Self::decode_attention`] with an additive f32 `mask [batch, slots]`.
    #[fusion(dtype = q, shape = q)]
    fn masked_decode_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: FloatTensor<Self>, scale: f32) -> FloatTensor<Self>;
}

impl DecodeAttentionOps for CubeBackend {
    fn decode_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        launch(q, k, v, None, scale)
    }

    fn masked_decode_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        launch(q, k, v, Some(mask), scale)
    }
}

/// The kernel, apart from burn's names.
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::num_traits::Zero;
    use burn_cubecl::cubecl::prelude::*;

    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention_kernel<E: Float, N: Size>(
        q: &Tensor<Vector<E, N>>,
        k: &Tensor<Vector<E, N>>,
        v: &Tensor<Vector<E, N>>,
        mask: ComptimeOption<&Tensor<f32>>,
        out: &mut Tensor<Vector<E, N>>,
        scale: f32,
        group: usize,
        #[comptime] planes: usize,
        #[define(E)] _dtype: ElemType,
    ) {
        let head = CUBE_POS_X as usize;
        let row = CUBE_POS_Y as usize;
        let lane = UNIT_POS_X as usize;
        let plane = UNIT_POS_Y as usize;
        let heads = q.shape(1);
        let width = q.shape(2) / q.vector_size();
        let slots = k.shape(2);
        let kv = head / group;
        // Lanes past the head's width read its last vector and count for nothing.
        let on = f32::cast_from(lane < width);
        let at = min(lane, width - 1);
        let vs = k.vector_size();
        let k_base = row * (k.stride(0) / vs) + kv * (k.stride(1) / vs) + at;
        let k_step = k.stride(2) / vs;
        let v_base = row * (v.stride(0) / vs) + kv * (v.stride(1) / vs) + at;
        let v_step = v.stride(2) / vs;
        let q_vec = Vector::<f32, N>::cast_from(q[(row * heads + head) * width + at]) * Vector::new(on * scale);

        let mut best = f32::new(-1.0e30);
        let mut total = f32::new(0.0);
        let mut acc = Vector::<f32, N>::zero();
        let mut s = plane;
        while s < slots {
            let key = Vector::<f32, N>::cast_from(k[k_base + s * k_step]);
            let mut score = plane_sum(Vector::vector_sum(key * q_vec));
            let hidden: ComptimeOption<f32> = mask.as_ref().map(|m| m[row * slots + s]);
            score += hidden.unwrap_or(0.0f32);
            let next = max(best, score);
            let carry = (best - next).exp();
            let p = (score - next).exp();
            total = total * carry + p;
            let value = Vector::<f32, N>::cast_from(v[v_base + s * v_step]);
            acc = acc * Vector::new(carry) + value * Vector::new(p);
            best = next;
            s += planes;
        }

        let mut bests = Shared::<[f32]>::new_slice(planes);
        let mut totals = Shared::<[f32]>::new_slice(planes);
        let mut accs = Shared::<[Vector<f32, N>]>::new_slice(planes * 32usize);
        if lane == 0 {
            bests[plane] = best;
            totals[plane] = total;
        }
        accs[plane * 32usize + lane] = acc;
        sync_cube();
        if plane == 0 && lane < width {
            let mut top = bests[0usize];
            for p in 1usize..planes {
                top = max(top, bests[p]);
            }
            let mut sum = f32::new(0.0);
            let mut merged = Vector::<f32, N>::zero();
            for p in 0usize..planes {
                let w = (bests[p] - top).exp();
                sum += totals[p] * w;
                merged += accs[p * 32usize + lane] * Vector::new(w);
            }
            out[(row * heads + head) * width + lane] = Vector::cast_from(merged / Vector::new(sum));
        }
    }
}

fn launch(q: CubeTensor, k: CubeTensor, v: CubeTensor, mask: Option<CubeTensor>, scale: f32) -> CubeTensor {
    let q = into_contiguous(q);
    let (k, v) = (last_axis_contiguous(k), last_axis_contiguous(v));
    let mask = mask.map(into_contiguous);
    let shape = q.meta.shape().clone();
    let (rows, heads, head_dim) = (shape[0], shape[1], shape[2]);
    let kv_heads = k.meta.shape()[1];
    let dtype = q.dtype;
    let out = empty_device_contiguous_dtype(q.client.clone(), q.device.clone(), shape, dtype);
    let vector = vector_width(head_dim, dtype);
    let client = out.client.clone();
    // SAFETY: `row < rows` and `head < heads` (the grid), lanes read at most the head's last
    // vector (`at < width`), slots stay below `k`'s slot count and `v` has the same shape
    // (checked by `decode_attention`), `kv = head / group < kv_heads`, and the mask has `rows
    // x slots` elements (reshaped so by the caller).
    unsafe {
        device::decode_attention_kernel::launch_unchecked(
            &client,
            CubeCount::Static(heads as u32, rows as u32, 1),
            CubeDim::new_2d(PLANE as u32, PLANES as u32),
            vector,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            mask.map(|m| m.into_tensor_arg()).into(),
            out.clone().into_tensor_arg(),
            scale,
            heads / kv_heads,
            PLANES,
            dtype_to_storage_type(dtype),
        )
    };
    out
}

/// Whether [`decode_attention`] can run for `t` query tokens per row of `head_dim` channels
/// in `dtype` on `device`: one token, a CubeCL device, and a head that fits one vector per
/// lane.
pub fn decode_kernel_applies(t: usize, head_dim: usize, dtype: DType, device: &Device) -> bool {
    t == 1 && is_cubecl(device) && head_dim / vector_width(head_dim, dtype) <= PLANE
}

/// [`gqa_attention`] for one query token per row by our kernel; `None` where it does not
/// apply ([`decode_kernel_applies`], or `k` and `v` of different shapes). The engine's decode
/// steps use it: on the H200 this 16-plane form took 14.7 µs over 256 slots of the Qwen3-4B
/// shapes in bf16 against the reference's 35.9 µs (CUDA-graph replays,
/// `benches/results/gpu-h200-2026-12-02-fused/kernel_check.txt`); the first form (4 planes per
/// cube) had taken 44 µs against 37 and was left out.
pub fn decode_attention(q: Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, mask: Option<&Tensor<5>>, scale: f64) -> Option<Tensor<4>> {
    let [batch, heads, t, d] = q.dims();
    let total = k.dims()[2];
    if !decode_kernel_applies(t, d, q.dtype(), &q.device()) || k.dims() != v.dims() {
        return None;
    }
    let q = q.reshape([batch, heads, d]).into_dispatch();
    let (k, v) = (k.clone().into_dispatch(), v.clone().into_dispatch());
    let out = match mask {
        Some(m) => Dispatch::masked_decode_attention(q, k, v, m.clone().reshape([batch, total]).into_dispatch(), scale as f32),
        None => Dispatch::decode_attention(q, k, v, scale as f32),
    };
    Some(Tensor::<3>::from_dispatch(out).reshape([batch, heads, 1, d]))
}

/// Attention of `q [batch, heads, t, head_dim]` over `k`/`v [batch, kv_heads, total,
/// head_dim]` with an additive f32 `mask [batch, 1, 1, t, total]` (`None`: nothing hidden):
/// `[batch, heads, t, head_dim]` in `q`'s dtype (every backend): two batched products
/// ([`crate::batched_matmul`], cuBLAS where available) around the scaled, masked softmax
/// ([`crate::softmax`], one kernel on CubeCL devices).
pub fn gqa_attention(q: Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, mask: Option<&Tensor<5>>, scale: f64) -> Tensor<4> {
    let [batch, heads, t, d] = q.dims();
    let kv_heads = k.dims()[1];
    let group = heads / kv_heads;
    // The `group` query heads that share a key head, stacked along the token axis.
    let q = q.reshape([batch, kv_heads, group * t, d]);
    let scores = crate::batched_matmul(q, k.clone().transpose());
    let probs = crate::softmax::scaled_masked_softmax(scores, mask, scale, t);
    crate::batched_matmul(probs, v.clone()).reshape([batch, heads, t, d])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    fn values<const D: usize>(x: Tensor<D>) -> Vec<f32> {
        x.cast(DType::F32).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
    }

    #[test]
    fn the_reference_is_softmax_attention_per_head_with_shared_keys() {
        let d = Device::flex();
        let (heads, kv_heads, total, dim) = (4, 2, 5, 3);
        let q: Tensor<4> = Tensor::random([1, heads, 1, dim], Distribution::Uniform(-1.0, 1.0), &d);
        let k: Tensor<4> = Tensor::random([1, kv_heads, total, dim], Distribution::Uniform(-1.0, 1.0), &d);
        let v: Tensor<4> = Tensor::random([1, kv_heads, total, dim], Distribution::Uniform(-1.0, 1.0), &d);
        // The last slot hidden.
        let hide: Vec<f32> = (0..total).map(|s| if s + 1 == total { -1.0e9 } else { 0.0 }).collect();
        let mask = Tensor::<5>::from_data(TensorData::new(hide, [1, 1, 1, 1, total]), &d);
        let got = values(gqa_attention(q.clone(), &k, &v, Some(&mask), 0.5));
        let (qs, ks, vs) = (values(q), values(k), values(v));
        for h in 0..heads {
            let kv = h / (heads / kv_heads);
            let scores: Vec<f32> = (0..total - 1).map(|s| (0..dim).map(|c| qs[h * dim + c] * ks[(kv * total + s) * dim + c]).sum::<f32>() * 0.5).collect();
            let top = scores.iter().cloned().fold(f32::MIN, f32::max);
            let weights: Vec<f32> = scores.iter().map(|s| (s - top).exp()).collect();
            let sum: f32 = weights.iter().sum();
            for c in 0..dim {
                let want: f32 = weights.iter().enumerate().map(|(s, w)| w / sum * vs[(kv * total + s) * dim + c]).sum();
                assert!((got[h * dim + c] - want).abs() < 1e-5, "head {h} channel {c}: {} vs {want}", got[h * dim + c]);
            }
        }
    }

    #[test]
    fn the_kernel_is_for_one_token_on_cubecl_devices() {
        let gpu = Device::cuda(0usize);
        assert!(decode_kernel_applies(1, 128, DType::BF16, &gpu));
        assert!(decode_kernel_applies(1, 128, DType::F32, &gpu));
        assert!(!decode_kernel_applies(2, 128, DType::BF16, &gpu));
        assert!(!decode_kernel_applies(1, 128, DType::BF16, &Device::flex()));
        // f32 heads of 256 channels need two vectors per lane: the reference runs.
        assert!(!decode_kernel_applies(1, 256, DType::F32, &gpu));
    }
}
