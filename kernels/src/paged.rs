//! Attention over a paged KV cache (vLLM's PagedAttention: Kwon et al. 2023,
//! arXiv:2309.06180): the keys and values of every sequence live in one pool of fixed-size
//! blocks per layer, `[slots, kv_heads, head_dim]` with `slot = block * block_tokens +
//! offset`, and each sequence names its blocks in a block table. One step's queries are a flat
//! batch of spans, one per sequence: a decode row (one query token) or a prefill chunk whose
//! queries attend to the sequence's cached tokens plus the chunk itself, causally, optionally
//! within a sliding window (transformers' `sliding_window_causal_mask`: query `p` sees keys
//! `p - window < k <= p`).
//!
//! [`PagedLayout`] is built once per step from the spans (the slot indices each sequence
//! reads, and its masks) and used by every layer; [`paged_attention`] is the operation. Its
//! reference, on every backend, gathers each sequence's slots and runs
//! [`crate::attention::gqa_attention`] (transformers' `eager_attention_forward`): all decode
//! rows together as one batch padded to the longest of them, then the prefill chunks, each
//! run of consecutive chunks of one shape (query tokens and context) as one batch.
//! The flat batch must list decode rows first, so the outputs concatenate in order.
//!
//! On CubeCL devices, from [`KERNEL_MIN_ROWS`] decode rows, they run through our kernel
//! instead ([`paged_decode_attention`]): one cube per (row, query head) reads each key and
//! value straight from the pool at the slot the row's table names (no gathered copy), with an
//! online softmax (Milakov & Gimelshein 2018, arXiv:1805.02867; the single-pass form of
//! flash-decoding, Dao et al. 2023): planes (warps) take every `PLANES`-th slot, are merged
//! through shared memory, f32 inside, masked slots skipped. Checked on the device against the
//! reference by `kernels/examples/kernel_check.rs` (group `attention`) and end to end by the
//! engine's parity runs (`benches/gpu/run_serving_4b.sh`).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use crate::launch::{PLANE, last_axis_contiguous, vector_width};

/// Planes per cube, each taking every `PLANES`-th slot (as the contiguous decode kernel).
const PLANES: usize = 16;

/// Decode rows from which the kernel runs instead of the gather + GQA reference. On the H200
/// (Qwen3-4B, bf16, CUDA graphs; benches/results/gpu-h200-2026-12-02-serving.md) the kernel
/// took steady decode from 798 to 927 tok/s at 256 rows, but from 1,417 to 1,318 at 32 rows
/// and from 146 to 93 at one row: one cube per (row, head) is too little parallelism for a
/// few rows, where reading each slot's index and mask before its key lengthens the chain.
pub const KERNEL_MIN_ROWS: usize = 128;

/// The paged decode attention as a backend operation (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait PagedDecodeOps: Backend {
    /// `q [rows, heads, head_dim]`, pools `k`/`v [slots, kv_heads, head_dim]`, `slots [rows *
    /// width]` (the pool slot of each row's `width` keys), additive f32 `mask [rows, width]`:
    /// `[rows, heads, head_dim]`.
    #[fusion(dtype = q, shape = q)]
    fn paged_decode_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slots: IntTensor<Self>,
        mask: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self>;
}

impl PagedDecodeOps for CubeBackend {
    fn paged_decode_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        slots: IntTensor<Self>,
        mask: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        launch(q, k, v, slots, mask, scale)
    }
}

/// The kernel, apart from burn's names (`Tensor`, `Int` are CubeCL's here).
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::num_traits::Zero;
    use burn_cubecl::cubecl::prelude::*;

    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_kernel<E: Float, I: Int, N: Size>(
        q: &Tensor<Vector<E, N>>,
        k: &Tensor<Vector<E, N>>,
        v: &Tensor<Vector<E, N>>,
        slots: &[I],
        mask: &Tensor<f32>,
        out: &mut Tensor<Vector<E, N>>,
        scale: f32,
        group: usize,
        width: usize,
        #[comptime] planes: usize,
        #[define(E, I)] _dtypes: [ElemType; 2],
    ) {
        let head = CUBE_POS_X as usize;
        let row = CUBE_POS_Y as usize;
        let lane = UNIT_POS_X as usize;
        let plane = UNIT_POS_Y as usize;
        let heads = q.shape(1);
        let per_head = q.shape(2) / q.vector_size();
        let kv = head / group;
        // Lanes past the head's width read its last vector and count for nothing.
        let on = f32::cast_from(lane < per_head);
        let at = min(lane, per_head - 1);
        let vs = k.vector_size();
        let k_slot = k.stride(0) / vs;
        let k_head = kv * (k.stride(1) / vs) + at;
        let v_slot = v.stride(0) / vs;
        let v_head = kv * (v.stride(1) / vs) + at;
        let q_vec = Vector::<f32, N>::cast_from(q[(row * heads + head) * per_head + at]) * Vector::new(on * scale);

        let mut best = f32::new(-1.0e30);
        let mut total = f32::new(0.0);
        let mut acc = Vector::<f32, N>::zero();
        let mut s = plane;
        while s < width {
            let hidden = mask[row * width + s];
            // Every lane of a plane takes the same slot: the branch is uniform per plane.
            if hidden > f32::new(-1.0e8) {
                let slot = usize::cast_from(slots[row * width + s]);
                let key = Vector::<f32, N>::cast_from(k[slot * k_slot + k_head]);
                let score = plane_sum(Vector::vector_sum(key * q_vec)) + hidden;
                let next = max(best, score);
                let carry = (best - next).exp();
                let p = (score - next).exp();
                total = total * carry + p;
                let value = Vector::<f32, N>::cast_from(v[slot * v_slot + v_head]);
                acc = acc * Vector::new(carry) + value * Vector::new(p);
                best = next;
            }
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
        if plane == 0 && lane < per_head {
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
            out[(row * heads + head) * per_head + lane] = Vector::cast_from(merged / Vector::new(sum));
        }
    }
}

fn launch(q: CubeTensor, k: CubeTensor, v: CubeTensor, slots: CubeTensor, mask: CubeTensor, scale: f32) -> CubeTensor {
    let q = into_contiguous(q);
    let (k, v) = (last_axis_contiguous(k), last_axis_contiguous(v));
    let (slots, mask) = (into_contiguous(slots), into_contiguous(mask));
    let shape = q.meta.shape().clone();
    let (rows, heads, head_dim) = (shape[0], shape[1], shape[2]);
    let kv_heads = k.meta.shape()[1];
    let width = mask.meta.shape()[1];
    let dtype = q.dtype;
    let int_dtype = slots.dtype;
    let out = empty_device_contiguous_dtype(q.client.clone(), q.device.clone(), shape, dtype);
    let vector = vector_width(head_dim, dtype);
    let client = out.client.clone();
    // SAFETY: `row < rows` and `head < heads` (the grid), lanes read at most the head's last
    // vector, `s < width` indexes the `rows x width` mask and slot table (checked by
    // `paged_decode_attention`), every slot in the table is a slot of the pool (the engine
    // writes table entries from its block tables, padding with its scratch block), and
    // `kv = head / group < kv_heads`.
    unsafe {
        device::paged_decode_kernel::launch_unchecked(
            &client,
            CubeCount::Static(heads as u32, rows as u32, 1),
            CubeDim::new_2d(PLANE as u32, PLANES as u32),
            vector,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            slots.into_buffer_arg(),
            mask.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            scale,
            heads / kv_heads,
            width,
            PLANES,
            [dtype_to_storage_type(dtype), dtype_to_storage_type(int_dtype)],
        )
    };
    out
}

/// Decode rows' attention by the kernel: `q [rows, heads, d]` over the pools through `slots
/// [rows * width]` with `mask [rows, 1, 1, 1, width]`; `None` where the kernel does not apply
/// (see [`crate::attention::decode_kernel_applies`]). [`paged_attention`] calls it from
/// [`KERNEL_MIN_ROWS`] rows.
pub fn paged_decode_attention(q: Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, slots: &Tensor<1, Int>, mask: &Tensor<5>, scale: f64) -> Option<Tensor<3>> {
    let [rows, _, d] = q.dims();
    let width = mask.dims()[4];
    if !crate::attention::decode_kernel_applies(1, d, q.dtype(), &q.device()) || k.dims() != v.dims() || slots.dims()[0] != rows * width {
        return None;
    }
    let out = Dispatch::paged_decode_attention(
        q.into_dispatch(),
        k.clone().into_dispatch(),
        v.clone().into_dispatch(),
        slots.clone().into_dispatch(),
        mask.clone().reshape([rows, width]).into_dispatch(),
        scale as f32,
    );
    Some(Tensor::<3>::from_dispatch(out))
}

/// The additive mask of a key a query may not see.
const MASKED: f32 = -1.0e9;

/// One sequence's part of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// Query tokens this step (1 for a decode row).
    pub queries: usize,
    /// Tokens in the cache once this step's keys are written (cached + `queries`).
    pub context: usize,
    /// The sequence's blocks, in order; at least `context` slots.
    pub blocks: Vec<u32>,
}

/// Slot indices and masks for one step, shared by every layer.
pub struct PagedLayout {
    /// Decode rows (`queries == 1`): how many, the padded width, `[rows * width]` slots.
    decode_rows: usize,
    decode_width: usize,
    decode_slots: Option<Tensor<1, Int>>,
    /// Per window (`None` = full causal), the decode rows' mask `[rows, 1, 1, 1, width]`.
    decode_masks: Vec<(Option<usize>, Tensor<5>)>,
    /// Prefill chunks, consecutive ones of one shape (queries and context) together.
    chunks: Vec<Chunk>,
}

/// `count` prefill chunks of `queries` query tokens over `context` keys each: their slots,
/// `count` times `context` of them, and per window the masks `[count, 1, 1, queries,
/// context]` (the same causal mask for each: the shapes are equal).
struct Chunk {
    count: usize,
    queries: usize,
    context: usize,
    slots: Tensor<1, Int>,
    masks: Vec<(Option<usize>, Tensor<5>)>,
}

/// Slot of token `i` of a sequence with these blocks.
pub fn slot_of(blocks: &[u32], block_tokens: usize, i: usize) -> usize {
    blocks[i / block_tokens] as usize * block_tokens + i % block_tokens
}

fn ints(values: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let n = values.len();
    Tensor::<1, Int>::from_data(TensorData::new(values, [n]), device)
}

/// The additive mask over `queries x width` keys: query `q` sits at position `context -
/// queries + q` and sees key `k < context` with `k <= p` and, with a window, `k > p - window`.
pub fn mask_values(queries: usize, context: usize, width: usize, window: Option<usize>) -> Vec<f32> {
    let mut out = Vec::with_capacity(queries * width);
    for q in 0..queries {
        let p = context - queries + q;
        for k in 0..width {
            let seen = k <= p && window.is_none_or(|w| k + w > p);
            out.push(if seen { 0.0 } else { MASKED });
        }
    }
    out
}

impl PagedLayout {
    /// The layout of `spans` (decode rows first) for the `windows` the layers use.
    pub fn new(spans: &[Span], block_tokens: usize, windows: &[Option<usize>], device: &Device) -> Self {
        let decode_rows = spans.iter().take_while(|s| s.queries == 1).count();
        let decode = &spans[..decode_rows];
        let decode_width = decode.iter().map(|s| s.context).max().unwrap_or(0);
        let gather = |s: &Span, width: usize| -> Vec<i64> {
            (0..width).map(|i| if i < s.context { slot_of(&s.blocks, block_tokens, i) as i64 } else { 0 }).collect()
        };
        let decode_slots = (decode_rows > 0).then(|| ints(decode.iter().flat_map(|s| gather(s, decode_width)).collect(), device));
        let f32_tensor = |values: Vec<f32>, dims: [usize; 5]| Tensor::<5>::from_data(TensorData::new(values, dims), (device, DType::F32));
        let decode_masks = if decode_rows == 0 {
            Vec::new()
        } else {
            windows
                .iter()
                .map(|&w| {
                    let values = decode.iter().flat_map(|s| mask_values(1, s.context, decode_width, w)).collect();
                    (w, f32_tensor(values, [decode_rows, 1, 1, 1, decode_width]))
                })
                .collect()
        };
        // Consecutive chunks of one shape run as one batch (one attention per group, not per
        // chunk: a step admitting many cache hits has many short chunks of one shape).
        let mut chunks: Vec<Chunk> = Vec::new();
        let rest = &spans[decode_rows..];
        let mut i = 0;
        while i < rest.len() {
            let (queries, context) = (rest[i].queries, rest[i].context);
            let count = rest[i..].iter().take_while(|s| s.queries == queries && s.context == context).count();
            let group = &rest[i..i + count];
            chunks.push(Chunk {
                count,
                queries,
                context,
                slots: ints(group.iter().flat_map(|s| gather(s, context)).collect(), device),
                masks: windows
                    .iter()
                    .map(|&w| {
                        let one = mask_values(queries, context, context, w);
                        let values: Vec<f32> = (0..count).flat_map(|_| one.iter().copied()).collect();
                        (w, f32_tensor(values, [count, 1, 1, queries, context]))
                    })
                    .collect(),
            });
            i += count;
        }
        Self { decode_rows, decode_width, decode_slots, decode_masks, chunks }
    }

    /// Decode rows only, from tensors already on the device: `slots [rows * width]` (each
    /// row's gathered slots, padded) and per window the mask `[rows, 1, 1, 1, width]` (see
    /// [`mask_values`]). What a recorded decode step reads, refreshed in place between replays.
    pub fn decode(rows: usize, width: usize, slots: Tensor<1, Int>, masks: Vec<(Option<usize>, Tensor<5>)>) -> Self {
        Self { decode_rows: rows, decode_width: width, decode_slots: Some(slots), decode_masks: masks, chunks: Vec::new() }
    }
}

fn pick(masks: &[(Option<usize>, Tensor<5>)], window: Option<usize>) -> &Tensor<5> {
    masks
        .iter()
        .find(|(w, _)| *w == window)
        .map(|(_, m)| m)
        .unwrap_or_else(|| panic!("the step's layout was built without window {window:?}"))
}

/// Gathers `slots` from a pool `[pool_slots, kv_heads, d]` as `[batch, kv_heads, width, d]`.
fn gather(pool: &Tensor<3>, slots: &Tensor<1, Int>, batch: usize, width: usize) -> Tensor<4> {
    let [_, kv_heads, d] = pool.dims();
    pool.clone().select(0, slots.clone()).reshape([batch, width, kv_heads, d]).swap_dims(1, 2)
}

/// Attention of the step's queries `q [tokens, heads, head_dim]` (decode rows first, then
/// each prefill chunk, as [`PagedLayout`] was built) over the pools `k`/`v [slots, kv_heads,
/// head_dim]` (this step's keys already written): `[tokens, heads, head_dim]`.
pub fn paged_attention(q: Tensor<3>, k: &Tensor<3>, v: &Tensor<3>, layout: &PagedLayout, window: Option<usize>, scale: f64) -> Tensor<3> {
    let [tokens, heads, d] = q.dims();
    let mut parts = Vec::with_capacity(1 + layout.chunks.len());
    let mut at = 0;
    if let Some(slots) = &layout.decode_slots {
        let (rows, width) = (layout.decode_rows, layout.decode_width);
        let mask = pick(&layout.decode_masks, window);
        let queries = q.clone().narrow(0, 0, rows);
        let kernel = if rows >= KERNEL_MIN_ROWS { paged_decode_attention(queries.clone(), k, v, slots, mask, scale) } else { None };
        let out = match kernel {
            Some(out) => out,
            None => {
                let keys = gather(k, slots, rows, width);
                let values = gather(v, slots, rows, width);
                let out = crate::attention::gqa_attention(queries.reshape([rows, heads, 1, d]), &keys, &values, Some(mask), scale);
                out.reshape([rows, heads, d])
            }
        };
        parts.push(out);
        at = rows;
    }
    for chunk in &layout.chunks {
        let (n, qn, context) = (chunk.count, chunk.queries, chunk.context);
        let keys = gather(k, &chunk.slots, n, context);
        let values = gather(v, &chunk.slots, n, context);
        let queries = q.clone().narrow(0, at, n * qn).reshape([n, qn, heads, d]).swap_dims(1, 2);
        let out = crate::attention::gqa_attention(queries, &keys, &values, Some(pick(&chunk.masks, window)), scale);
        parts.push(out.swap_dims(1, 2).reshape([n * qn, heads, d]));
        at += n * qn;
    }
    assert_eq!(at, tokens, "the layout covers {at} query tokens, the step has {tokens}");
    if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(parts, 0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn values<const D: usize>(x: Tensor<D>) -> Vec<f32> {
        x.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
    }

    /// Plain attention of one sequence's queries over its own contiguous keys.
    #[allow(clippy::too_many_arguments)]
    fn dense(q: &[f32], k: &[f32], v: &[f32], queries: usize, context: usize, heads: usize, kv_heads: usize, d: usize, window: Option<usize>) -> Vec<f32> {
        let mut out = vec![0.0; queries * heads * d];
        for i in 0..queries {
            let p = context - queries + i;
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let seen: Vec<usize> = (0..=p).filter(|&j| window.is_none_or(|w| j + w > p)).collect();
                let scores: Vec<f32> = seen
                    .iter()
                    .map(|&j| (0..d).map(|c| q[(i * heads + h) * d + c] * k[(j * kv_heads + kvh) * d + c]).sum::<f32>() * 0.25)
                    .collect();
                let top = scores.iter().cloned().fold(f32::MIN, f32::max);
                let w: Vec<f32> = scores.iter().map(|s| (s - top).exp()).collect();
                let sum: f32 = w.iter().sum();
                for c in 0..d {
                    out[(i * heads + h) * d + c] = seen.iter().zip(&w).map(|(&j, wj)| wj / sum * v[(j * kv_heads + kvh) * d + c]).sum();
                }
            }
        }
        out
    }

    #[test]
    fn scattered_blocks_give_the_attention_of_contiguous_keys() {
        let device = Device::flex();
        let (heads, kv_heads, d, bt) = (4, 2, 16, 4);
        // Two decode rows, then prefill chunks: 5 queries over 11 tokens, two of 3 over 7 (one
        // group of one shape), one of 3 over 3; blocks shuffled.
        let spans = vec![
            Span { queries: 1, context: 6, blocks: vec![7, 2] },
            Span { queries: 1, context: 9, blocks: vec![0, 5, 9] },
            Span { queries: 5, context: 11, blocks: vec![3, 8, 1] },
            Span { queries: 3, context: 7, blocks: vec![10, 4] },
            Span { queries: 3, context: 7, blocks: vec![6, 11] },
            Span { queries: 3, context: 3, blocks: vec![12] },
        ];
        let pool_slots = 13 * bt;
        let kp: Tensor<3> = Tensor::random([pool_slots, kv_heads, d], Distribution::Uniform(-1.0, 1.0), &device);
        let vp: Tensor<3> = Tensor::random([pool_slots, kv_heads, d], Distribution::Uniform(-1.0, 1.0), &device);
        let tokens: usize = spans.iter().map(|s| s.queries).sum();
        let q: Tensor<3> = Tensor::random([tokens, heads, d], Distribution::Uniform(-1.0, 1.0), &device);
        let (kv, vv, qv) = (values(kp.clone()), values(vp.clone()), values(q.clone()));
        for window in [None, Some(3)] {
            let layout = PagedLayout::new(&spans, bt, &[None, Some(3)], &device);
            let got = values(paged_attention(q.clone(), &kp, &vp, &layout, window, 0.25));
            let mut at = 0;
            for s in &spans {
                // The sequence's keys and values, contiguous.
                let row = |pool: &[f32], j: usize| {
                    let slot = slot_of(&s.blocks, bt, j);
                    pool[slot * kv_heads * d..(slot + 1) * kv_heads * d].to_vec()
                };
                let ks: Vec<f32> = (0..s.context).flat_map(|j| row(&kv, j)).collect();
                let vs: Vec<f32> = (0..s.context).flat_map(|j| row(&vv, j)).collect();
                let qs = &qv[at * heads * d..(at + s.queries) * heads * d];
                let want = dense(qs, &ks, &vs, s.queries, s.context, heads, kv_heads, d, window);
                let have = &got[at * heads * d..(at + s.queries) * heads * d];
                for (a, b) in have.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "window {window:?}, span {s:?}: {a} vs {b}");
                }
                at += s.queries;
            }
        }
    }
}
