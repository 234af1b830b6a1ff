//! Qwen3's QK-norm and rotary embedding of queries and keys as one CubeCL kernel: transformers'
//! `Qwen3Attention` normalises each head (`q_norm`, `k_norm`, `Qwen3RMSNorm`), moves the heads
//! before the tokens and applies `apply_rotary_pos_emb` (RoFormer, arXiv:2104.09864, in the
//! half-split convention, partial rotary allowed). One plane (warp) per (row, token, head)
//! reads the head once from the fused q|k|v output (a strided view), sums its squares in f32,
//! and writes the rotated head to `[batch, heads, tokens, head_dim]`, rounding to the dtype
//! where transformers rounds in bf16: the normalised value, the weight's product, `x * cos`,
//! `rotate_half(x) * sin` and their sum.
//!
//! In a decode or prefill step the same kernel also writes the keys and the values into their
//! KV pages ([`rotate_into_pages`]: vLLM's `reshape_and_cache` folded into the rotation, as
//! llama.cpp fuses its rope with `set_rows`): one launch a layer instead of two (on an H100,
//! 2026-12-07: the tiny fixtures' logits unchanged to the bit, decode speed unchanged).
//!
//! The vision towers' rotary embedding (`apply_rotary_pos_emb_vision` of Qwen2-VL to
//! Qwen3-VL) is the same rotation without the normalisation, taken in f32 with f32 angles
//! and rounded once: `rotary_f32`, one plane per (row, token, head) likewise.
//!
//! burn's operations take about twenty kernels for this (the normalisation's eight, the
//! rotation's halves, negation, concatenation, two products and the sum). The reference on
//! every backend is [`qk_norm_rotary_reference`], which the kernel is checked against on the
//! device (`kernels/examples/kernel_check.rs`).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Int, Shape, Tensor};
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use crate::kv_pages::KvPages;
use crate::kv_write::writable;
use crate::launch::{PLANE, is_cubecl, last_axis_contiguous, row_vector_width, vector_width};

/// Heads per cube (one plane each).
const HEADS_PER_CUBE: u32 = 8;

/// `[batch, tokens, heads, head_dim] -> [batch, heads, tokens, head_dim]`.
pub fn heads_first(qk: &Shape) -> Shape {
    Shape::new([qk[0], qk[2], qk[1], qk[3]])
}

/// The fused normalisation and rotation as a backend operation (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait RotaryOps: Backend {
    /// `qk [batch, tokens, heads, head_dim]`, `weight [heads, head_dim]`, `cos`/`sin`
    /// `[batch, 1, tokens, rotary_dim]` -> `[batch, heads, tokens, head_dim]`.
    #[fusion(dtype = qk, shape = heads_first(qk))]
    fn fused_qk_norm_rotary(
        qk: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;

    /// [`Self::fused_qk_norm_rotary`] of the normalised heads (one `weight` row each) of `qkv
    /// [1, tokens, heads, head_dim]`, whose last `kv` normalised heads (the keys) also go to
    /// `k_pool [slots, kv, head_dim]` and whose remaining heads (the values) are copied to
    /// `v_pool`, at row `slots[token]`: `([1, weight rows, tokens, head_dim], k_pool, v_pool)`.
    #[fusion(meta = |qkv, weight, _cos, _sin, k_pool, v_pool, _slots, _eps| (normed_heads_first(qkv, weight), k_pool.clone(), v_pool.clone()))]
    #[allow(clippy::too_many_arguments)]
    fn fused_qk_norm_rotary_into_pages(
        qkv: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        k_pool: FloatTensor<Self>,
        v_pool: FloatTensor<Self>,
        slots: IntTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `qk [batch, tokens, heads, head_dim]` rotated in f32 by f32 `cos`/`sin`
    /// `[batch, 1, tokens, rotary_dim]`, rounded to `qk`'s dtype once:
    /// `[batch, heads, tokens, head_dim]`.
    #[fusion(dtype = qk, shape = heads_first(qk))]
    fn fused_rotary_f32(qk: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl RotaryOps for CubeBackend {
    fn fused_qk_norm_rotary(
        qk: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        launch(qk, weight, cos, sin, eps)
    }

    fn fused_qk_norm_rotary_into_pages(
        qkv: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        k_pool: FloatTensor<Self>,
        v_pool: FloatTensor<Self>,
        slots: IntTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        launch_with_pages(qkv, weight, cos, sin, eps, Some((k_pool, v_pool, slots)))
    }

    fn fused_rotary_f32(qk: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        launch_f32(qk, cos, sin)
    }
}

/// The output of [`RotaryOps::fused_qk_norm_rotary_into_pages`]: `qkv`'s normalised heads (one
/// per `weight` row) moved before the tokens.
fn normed_heads_first(qkv: &TensorSpec, weight: &TensorSpec) -> TensorSpec {
    let s = &qkv.shape;
    TensorSpec::new(Shape::new([s[0], weight.shape[0], s[1], s[3]]), qkv.dtype)
}

/// The kernel, apart from burn's names (`Tensor` is CubeCL's here).
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::num_traits::Zero;
    use burn_cubecl::cubecl::prelude::*;
    use crate::launch::device::row_start;
    use crate::norm::device::normalised;

    /// Vector `v` of a head normalised and scaled ([`normalised`]), in f32.
    #[cube]
    fn normed<E: Float, N: Size>(
        x: &Tensor<Vector<E, N>>,
        start: usize,
        weight: &Tensor<Vector<E, N>>,
        w_start: usize,
        v: usize,
        inv: f32,
    ) -> Vector<f32, N> {
        Vector::cast_from(normalised(Vector::cast_from(x[start + v]), inv, weight[w_start + v]))
    }

    /// One plane per (batch, token, head) of `qk`. The heads with a `weight` row are
    /// normalised and rotated into `out [batch, weight rows, tokens, head_dim]`. With `pages`
    /// (one batch), the last `kv` of those (the keys) also go to `k_pool [slots, kv,
    /// head_dim]` and the heads after them (the values, unnormalised) to `v_pool`, both at row
    /// `slots[token]` (a slot outside the pool is skipped), as `write_kv_pair` writes them.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn qk_norm_rotary_kernel<E: Float, I: Int, N: Size>(
        qk: &Tensor<Vector<E, N>>,
        weight: &Tensor<Vector<E, N>>,
        cos: &Tensor<Vector<E, N>>,
        sin: &Tensor<Vector<E, N>>,
        out: &mut Tensor<Vector<E, N>>,
        k_pool: &mut Tensor<Vector<E, N>>,
        v_pool: &mut Tensor<Vector<E, N>>,
        slots: &[I],
        rows: usize,
        eps: f32,
        #[comptime] pages: bool,
        #[define(E, I)] _dtypes: [ElemType; 2],
    ) {
        // The whole plane leaves together (the row depends on the plane only).
        let row = (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) as usize;
        if row >= rows {
            terminate!();
        }
        let (tokens, heads) = (qk.shape(1), qk.shape(2));
        let head = row % heads;
        let token = (row / heads) % tokens;
        let batch = row / (heads * tokens);
        let dim = qk.shape(3);
        let vectors = dim / qk.vector_size();
        let start = row_start(qk, row);
        let normed_heads = weight.shape(0);
        // Strides count elements, indices count vectors.
        let mut pool_row = 0usize;
        if comptime!(pages) {
            let slot = usize::cast_from(slots[token]);
            let kv = k_pool.shape(1);
            if head >= normed_heads {
                // A value head: copied into its page row.
                if slot < v_pool.shape(0) {
                    let to = (slot * v_pool.stride(0) + (head - normed_heads) * v_pool.stride(1)) / v_pool.vector_size();
                    let mut v = UNIT_POS_X as usize;
                    while v < vectors {
                        v_pool[to + v] = qk[start + v];
                        v += PLANE_DIM as usize;
                    }
                }
                terminate!();
            }
            if head + kv >= normed_heads && slot < k_pool.shape(0) {
                // A key head: its page row (1 + its offset; 0 writes none).
                pool_row = 1 + (slot * k_pool.stride(0) + (head + kv - normed_heads) * k_pool.stride(1)) / k_pool.vector_size();
            }
        }
        let rotary = cos.shape(3) / cos.vector_size();
        let half = rotary / 2;
        let w_start = head * weight.stride(0) / weight.vector_size();
        let angle_start = (batch * tokens + token) * rotary;
        let out_start = ((batch * normed_heads + head) * tokens + token) * vectors;
        let mut acc = Vector::<f32, N>::zero();
        let mut v = UNIT_POS_X as usize;
        while v < vectors {
            let value = Vector::<f32, N>::cast_from(qk[start + v]);
            acc += value * value;
            v += PLANE_DIM as usize;
        }
        let mean = plane_sum(Vector::vector_sum(acc)) / f32::cast_from(dim);
        let inv = f32::new(1.0) / (mean + eps).sqrt();
        let mut v = UNIT_POS_X as usize;
        while v < vectors {
            let x = normed(qk, start, weight, w_start, v, inv);
            // The rotated value, or past the rotated part the normalised one.
            let mut y = x;
            if v < rotary {
                // rotate_half: the first half pairs with -(second half), the second with the
                // first.
                let first = v < half;
                let partner = (v + half) % rotary;
                let p = normed(qk, start, weight, w_start, partner, inv);
                let c = Vector::<f32, N>::cast_from(cos[angle_start + v]);
                let s = Vector::<f32, N>::cast_from(sin[angle_start + v]);
                let xc = Vector::<f32, N>::cast_from(Vector::<E, N>::cast_from(x * c));
                let ps = Vector::<f32, N>::cast_from(Vector::<E, N>::cast_from(p * s));
                let sign = Vector::<f32, N>::new(select(first, f32::new(-1.0), f32::new(1.0)));
                y = xc + sign * ps;
            }
            let y = Vector::<E, N>::cast_from(y);
            out[out_start + v] = y;
            if comptime!(pages) && pool_row > 0 {
                k_pool[pool_row - 1 + v] = y;
            }
            v += PLANE_DIM as usize;
        }
    }

    #[cube(launch_unchecked)]
    pub fn rotary_f32_kernel<E: Float, F: Float, N: Size>(
        qk: &Tensor<Vector<E, N>>,
        cos: &Tensor<Vector<F, N>>,
        sin: &Tensor<Vector<F, N>>,
        out: &mut Tensor<Vector<E, N>>,
        rows: usize,
        #[define(E, F)] _dtypes: [ElemType; 2],
    ) {
        // The whole plane leaves together (the row depends on the plane only).
        let row = (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) as usize;
        if row >= rows {
            terminate!();
        }
        let (tokens, heads) = (qk.shape(1), qk.shape(2));
        let head = row % heads;
        let token = (row / heads) % tokens;
        let batch = row / (heads * tokens);
        let vectors = qk.shape(3) / qk.vector_size();
        let rotary = cos.shape(3) / cos.vector_size();
        let half = rotary / 2;
        let start = row_start(qk, row);
        let angle_start = (batch * tokens + token) * rotary;
        let out_start = ((batch * heads + head) * tokens + token) * vectors;
        let mut v = UNIT_POS_X as usize;
        while v < vectors {
            let x = Vector::<f32, N>::cast_from(qk[start + v]);
            if v < rotary {
                // rotate_half, as in the kernel above.
                let first = v < half;
                let partner = Vector::<f32, N>::cast_from(qk[start + (v + half) % rotary]);
                let c = Vector::<f32, N>::cast_from(cos[angle_start + v]);
                let s = Vector::<f32, N>::cast_from(sin[angle_start + v]);
                let sign = Vector::<f32, N>::new(select(first, f32::new(-1.0), f32::new(1.0)));
                out[out_start + v] = Vector::cast_from(x * c + sign * partner * s);
            } else {
                out[out_start + v] = Vector::cast_from(x);
            }
            v += PLANE_DIM as usize;
        }
    }
}

/// `[batch, tokens, heads, head_dim, rotary_dim]` of queries and keys `qk [batch, tokens,
/// heads, head_dim]` rotated by `cos`/`sin` `[batch, 1, tokens, rotary_dim]`, checked (`what`
/// names the operation in a failed check): both rotation kernels' launches.
fn rotation_shapes(what: &str, qk: &Shape, cos: &Shape, sin: &Shape) -> [usize; 5] {
    assert_eq!(qk.num_dims(), 4, "{what}: queries and keys are [batch, tokens, heads, head_dim]");
    let (batch, tokens, heads, dim) = (qk[0], qk[1], qk[2], qk[3]);
    let rotary = cos[3];
    assert!(
        cos[0] == batch && cos[2] == tokens && rotary <= dim && rotary.is_multiple_of(2),
        "{what}: angles {cos:?} for queries and keys {qk:?}"
    );
    assert_eq!(sin, cos, "{what}: sin and cos differ in shape");
    [batch, tokens, heads, dim, rotary]
}

fn launch_f32(qk: CubeTensor, cos: CubeTensor, sin: CubeTensor) -> CubeTensor {
    let shape = qk.meta.shape().clone();
    let [batch, tokens, heads, dim, rotary] = rotation_shapes("rotary_f32", &shape, cos.meta.shape(), sin.meta.shape());
    let dtype = qk.dtype;
    assert!(cos.dtype == DType::F32 && sin.dtype == DType::F32, "rotary_f32: the angles' cos and sin are f32");
    let qk = last_axis_contiguous(qk);
    let (cos, sin) = (into_contiguous(cos), into_contiguous(sin));
    // Vectors may not straddle the halves of the rotated part, nor a row's start, and span
    // at most 16 bytes of the f32 angles.
    let widest = vector_width(rotary / 2, DType::F32).min(vector_width(rotary / 2, dtype)).min(vector_width(dim, dtype));
    let vector = row_vector_width(widest, &[&qk]);
    let rows = batch * tokens * heads;
    let out = empty_device_contiguous_dtype(qk.client.clone(), qk.device.clone(), heads_first(&shape), dtype);
    let client = out.client.clone();
    // SAFETY: a row `row < rows` (checked) reads its head's `dim` contiguous elements from its
    // strided start and the angles of its (batch, token) within the contiguous `cos`/`sin`
    // (asserted shapes), and writes its slot of the contiguous `[batch, heads, tokens, dim]`
    // output; a partner vector stays within the rotated part (`rotary` even, vectors
    // dividing its half).
    unsafe {
        device::rotary_f32_kernel::launch_unchecked(
            &client,
            CubeCount::Static((rows as u32).div_ceil(HEADS_PER_CUBE), 1, 1),
            CubeDim::new_2d(PLANE as u32, HEADS_PER_CUBE),
            vector,
            qk.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows,
            [dtype_to_storage_type(dtype), dtype_to_storage_type(DType::F32)],
        )
    };
    out
}

fn launch(qk: CubeTensor, weight: CubeTensor, cos: CubeTensor, sin: CubeTensor, eps: f64) -> CubeTensor {
    launch_with_pages(qk, weight, cos, sin, eps, None).0
}

/// Three tensors: the pools and slots a launch writes keys and values into, and what it
/// returns (the output and the pools).
type Pages = (CubeTensor, CubeTensor, CubeTensor);

/// The kernel's launch: `(out [batch, weight rows, tokens, head_dim], k_pool, v_pool)`, the
/// pools written with `pages` (in place where burn holds them uniquely, else copied first),
/// else unused stand-ins.
fn launch_with_pages(qk: CubeTensor, weight: CubeTensor, cos: CubeTensor, sin: CubeTensor, eps: f64, pages: Option<Pages>) -> Pages {
    let shape = qk.meta.shape().clone();
    let [batch, tokens, heads, dim, rotary] = rotation_shapes("qk_norm_rotary", &shape, cos.meta.shape(), sin.meta.shape());
    let dtype = qk.dtype;
    let normed_heads = weight.meta.shape()[0];
    assert_eq!(weight.meta.shape(), &Shape::new([normed_heads, dim]), "qk_norm_rotary: one weight row of head_dim per head");
    assert!(weight.dtype == dtype && cos.dtype == dtype && sin.dtype == dtype, "qk_norm_rotary: mixed dtypes");
    let qk = last_axis_contiguous(qk);
    let (weight, cos, sin) = (into_contiguous(weight), into_contiguous(cos), into_contiguous(sin));
    let write_pages = pages.is_some();
    let (k_pool, v_pool, slots) = match pages {
        Some((k_pool, v_pool, slots)) => {
            let kv = k_pool.meta.shape()[1];
            assert_eq!(batch, 1, "qk_norm_rotary into pages: one batch row (slots are per token)");
            assert_eq!(heads, normed_heads + kv, "qk_norm_rotary into pages: q|k|v heads {heads} for {normed_heads} normalised and {kv} value heads");
            assert!(
                k_pool.meta.shape() == v_pool.meta.shape() && k_pool.meta.shape()[2] == dim && k_pool.dtype == dtype && v_pool.dtype == dtype && kv <= normed_heads,
                "qk_norm_rotary into pages: pools {:?} / {:?} for heads of {dim}",
                k_pool.meta.shape(),
                v_pool.meta.shape()
            );
            assert_eq!(slots.meta.shape()[0], tokens, "qk_norm_rotary into pages: one slot per token");
            (last_axis_contiguous(writable(k_pool)), last_axis_contiguous(writable(v_pool)), into_contiguous(slots))
        }
        None => {
            assert_eq!(heads, normed_heads, "qk_norm_rotary: one weight row per head");
            // Never read (`pages` off): one-vector stand-ins.
            let none = empty_device_contiguous_dtype(qk.client.clone(), qk.device.clone(), Shape::new([1, 1, dim]), dtype);
            let slots = empty_device_contiguous_dtype(qk.client.clone(), qk.device.clone(), Shape::new([1]), DType::I32);
            (none.clone(), none, slots)
        }
    };
    // Vectors may not straddle the halves of the rotated part, nor a row's start.
    let vector = row_vector_width(vector_width(rotary / 2, dtype).min(vector_width(dim, dtype)), &[&qk, &k_pool, &v_pool]);
    let rows = batch * tokens * heads;
    let out = empty_device_contiguous_dtype(qk.client.clone(), qk.device.clone(), Shape::new([batch, normed_heads, tokens, dim]), dtype);
    let client = out.client.clone();
    let int_dtype = slots.dtype;
    let cube_count = CubeCount::Static((rows as u32).div_ceil(HEADS_PER_CUBE), 1, 1);
    // SAFETY: a row `row < rows` (checked) reads its head's `dim` contiguous elements from its
    // strided start, weight row `head < normed_heads` (`[normed_heads, dim]` asserted; heads
    // past them are value heads, only with `pages`), angles of its (batch, token) within
    // `cos`/`sin` (asserted shapes), and writes its slot of the contiguous `[batch,
    // normed_heads, tokens, dim]` output; a partner vector stays within the rotated part
    // (`rotary` even, vectors dividing its half). With `pages`: token `< tokens` reads
    // `slots[token]` (one per token, asserted), and a pool row is written only below the
    // pool's slots, at a head below its `kv` heads (asserted pool shapes), `dim` elements.
    unsafe {
        device::qk_norm_rotary_kernel::launch_unchecked(
            &client,
            cube_count,
            CubeDim::new_2d(PLANE as u32, HEADS_PER_CUBE),
            vector,
            qk.into_tensor_arg(),
            weight.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            k_pool.clone().into_tensor_arg(),
            v_pool.clone().into_tensor_arg(),
            slots.into_buffer_arg(),
            rows,
            eps as f32,
            write_pages,
            [dtype_to_storage_type(dtype), dtype_to_storage_type(int_dtype)],
        )
    };
    (out, k_pool, v_pool)
}

/// The kernel (CubeCL devices only): `qk [batch, tokens, heads, head_dim]` (a view is
/// fine) normalised per head by `weight [heads, head_dim]`, then rotated by `cos`/`sin`
/// `[batch, 1, tokens, rotary_dim]`: `[batch, heads, tokens, head_dim]`.
pub fn fused_qk_norm_rotary(qk: Tensor<4>, weight: &Tensor<2>, cos: &Tensor<4>, sin: &Tensor<4>, eps: f64) -> Tensor<4> {
    Tensor::from_dispatch(Dispatch::fused_qk_norm_rotary(
        qk.into_dispatch(),
        weight.clone().into_dispatch(),
        cos.clone().into_dispatch(),
        sin.clone().into_dispatch(),
        eps,
    ))
}

/// What the kernel computes, with burn operations (every backend): [`crate::reference::rms_norm`]
/// per head, the heads moved before the tokens, [`crate::reference::apply_rotary`].
pub fn qk_norm_rotary_reference(qk: Tensor<4>, weight: &Tensor<2>, cos: &Tensor<4>, sin: &Tensor<4>, eps: f64) -> Tensor<4> {
    crate::reference::apply_rotary(crate::reference::rms_norm(qk, weight, eps).swap_dims(1, 2), cos, sin)
}

/// Rotary position embedding (see [`crate::reference::apply_rotary`]): one loop over each
/// row for f32 on the CPU (`crate::cpu_rows`), the reference elsewhere.
pub fn rotary(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    if !is_cubecl(&x.device())
        && let Some(out) = crate::cpu_rows::rotary(&x, cos, sin)
    {
        return out;
    }
    crate::reference::apply_rotary(x, cos, sin)
}

/// The kernel (CubeCL devices only): `qk [batch, tokens, heads, head_dim]` (a view is fine)
/// rotated in f32 by f32 `cos`/`sin` `[batch, 1, tokens, rotary_dim]`, rounded once:
/// `[batch, heads, tokens, head_dim]`.
pub fn fused_rotary_f32(qk: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(Dispatch::fused_rotary_f32(qk.into_dispatch(), cos.clone().into_dispatch(), sin.clone().into_dispatch()))
}

/// What [`rotary_f32`] computes, with burn operations (every backend): the heads moved first,
/// the rotation in f32, the result in `qk`'s dtype.
pub fn rotary_f32_reference(qk: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let dtype = qk.dtype();
    crate::reference::apply_rotary(qk.swap_dims(1, 2).cast(DType::F32), cos, sin).cast(dtype)
}

/// Rotary embedding in f32 (transformers' `apply_rotary_pos_emb_vision`): `qk [batch, tokens,
/// heads, head_dim]`, `cos`/`sin` f32 `[batch, 1, tokens, rotary_dim]` ->
/// `[batch, heads, tokens, head_dim]` in `qk`'s dtype; the kernel on CubeCL devices, the
/// reference elsewhere.
pub fn rotary_f32(qk: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    if is_cubecl(&qk.device()) && cos.dtype() == DType::F32 && sin.dtype() == DType::F32 {
        fused_rotary_f32(qk, cos, sin)
    } else {
        rotary_f32_reference(qk, cos, sin)
    }
}

/// Rotary embedding of a step's queries and keys, after their QK-norm where the model has one
/// (`norm [q + kv, head_dim]`: the query heads' weights, then the key heads'), with the keys
/// and values written into their pages: `qkv [1, tokens, q + 2 * kv, head_dim]` (the fused
/// projection, `kv_heads` key/value heads; a view is fine), `cos`/`sin` `[1, 1, tokens,
/// rotary_dim]`, each token's keys and values to pool row `slots[token]`: the queries
/// `[tokens, q, head_dim]` and the pools. One kernel ([`fused_rotate_into_pages`]) on CubeCL
/// devices with a QK-norm and dense pools of the step's dtype; elsewhere [`qk_norm_rotary`] or
/// [`rotary`], then [`KvPages::write_pair`].
#[allow(clippy::too_many_arguments)]
pub fn rotate_into_pages(qkv: Tensor<4>, norm: Option<&Tensor<2>>, kv_heads: usize, cos: &Tensor<4>, sin: &Tensor<4>, eps: f64, k_pool: KvPages, v_pool: KvPages, slots: Tensor<1, Int>) -> (Tensor<3>, KvPages, KvPages) {
    let [_, tokens, heads, dim] = qkv.dims();
    let (q, kv) = (heads - 2 * kv_heads, kv_heads);
    match (norm, k_pool, v_pool) {
        (Some(weight), KvPages::Dense(kp), KvPages::Dense(vp)) if is_cubecl(&qkv.device()) && kp.dtype() == qkv.dtype() && vp.dtype() == qkv.dtype() && kp.dims() == vp.dims() => {
            let (q, kp, vp) = fused_rotate_into_pages(qkv, weight, kv_heads, cos, sin, eps, kp, vp, slots);
            (q, KvPages::Dense(kp), KvPages::Dense(vp))
        }
        (norm, k_pool, v_pool) => {
            let qk = qkv.clone().narrow(2, 0, q + kv);
            let qk = match norm {
                Some(weight) => qk_norm_rotary(qk, weight, cos, sin, eps),
                None => rotary(qk.swap_dims(1, 2), cos, sin),
            };
            let k = qk.clone().narrow(1, q, kv).swap_dims(1, 2).reshape([tokens, kv, dim]);
            let v = qkv.narrow(2, q + kv, kv).reshape([tokens, kv, dim]);
            let (k_pool, v_pool) = KvPages::write_pair(k_pool, v_pool, slots, k, v);
            (queries(qk, q), k_pool, v_pool)
        }
    }
}

/// [`rotate_into_pages`]'s one kernel (CubeCL devices; dense pools `[slots, kv_heads,
/// head_dim]` of `qkv`'s dtype, a QK-norm): the queries `[tokens, q, head_dim]` and the pools
/// with the step's rows written.
#[allow(clippy::too_many_arguments)]
pub fn fused_rotate_into_pages(qkv: Tensor<4>, norm: &Tensor<2>, kv_heads: usize, cos: &Tensor<4>, sin: &Tensor<4>, eps: f64, k_pool: Tensor<3>, v_pool: Tensor<3>, slots: Tensor<1, Int>) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
    let q = qkv.dims()[2] - 2 * kv_heads;
    let (qk, kp, vp) = Dispatch::fused_qk_norm_rotary_into_pages(
        qkv.into_dispatch(),
        norm.clone().into_dispatch(),
        cos.clone().into_dispatch(),
        sin.clone().into_dispatch(),
        k_pool.into_dispatch(),
        v_pool.into_dispatch(),
        slots.into_dispatch(),
        eps,
    );
    (queries(Tensor::from_dispatch(qk), q), Tensor::from_dispatch(kp), Tensor::from_dispatch(vp))
}

/// The first `q` heads of rotated `qk [1, heads, tokens, head_dim]` as queries `[tokens, q,
/// head_dim]`.
fn queries(qk: Tensor<4>, q: usize) -> Tensor<3> {
    let [_, _, tokens, dim] = qk.dims();
    qk.narrow(1, 0, q).swap_dims(1, 2).reshape([tokens, q, dim])
}

/// QK-norm and rotary embedding of queries and keys together: the kernel on CubeCL devices,
/// one loop over each row for f32 on the CPU (`crate::cpu_rows`), the reference elsewhere.
pub fn qk_norm_rotary(qk: Tensor<4>, weight: &Tensor<2>, cos: &Tensor<4>, sin: &Tensor<4>, eps: f64) -> Tensor<4> {
    if is_cubecl(&qk.device()) {
        fused_qk_norm_rotary(qk, weight, cos, sin, eps)
    } else if let Some(out) = crate::cpu_rows::qk_norm_rotary(&qk, weight, cos, sin, eps) {
        out
    } else {
        qk_norm_rotary_reference(qk, weight, cos, sin, eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vision towers' rotation of queries and keys together from a fused q|k|v view is each
    /// part's rotation on its own (the way it was written before: heads moved first, cast to
    /// f32, rotated, rounded back).
    #[test]
    fn the_f32_rotation_of_a_qkv_view_is_each_part_rotated_alone() {
        use burn::tensor::{Device, Distribution};
        let d = Device::flex();
        let (tokens, heads, dim) = (5, 3, 8);
        let qkv = Tensor::<4>::random([1, tokens, 3 * heads, dim], Distribution::Uniform(-2.0, 2.0), &d);
        let angles = Tensor::<4>::random([1, 1, tokens, dim / 2], Distribution::Uniform(0.0, 10.0), &d);
        let angles = Tensor::cat(vec![angles.clone(), angles], 3);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let both = rotary_f32(qkv.clone().narrow(2, 0, 2 * heads), &cos, &sin);
        assert_eq!(both.dims(), [1, 2 * heads, tokens, dim]);
        let alone = |i: usize| crate::reference::apply_rotary(qkv.clone().narrow(2, i * heads, heads).swap_dims(1, 2), &cos, &sin);
        let values = |t: Tensor<4>| t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
        assert_eq!(values(both.clone().narrow(1, 0, heads)), values(alone(0)));
        assert_eq!(values(both.narrow(1, heads, heads)), values(alone(1)));
    }

    #[test]
    fn heads_move_before_tokens() {
        assert_eq!(heads_first(&Shape::new([2, 5, 40, 128])), Shape::new([2, 40, 5, 128]));
    }
}
