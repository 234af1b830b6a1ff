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
//! rows together as one batch padded to the longest of them, then each prefill chunk alone.
//! The flat batch must list decode rows first, so the outputs concatenate in order.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

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
    block_tokens: usize,
    /// Decode rows (`queries == 1`): how many, the padded width, `[rows * width]` slots.
    decode_rows: usize,
    decode_width: usize,
    decode_slots: Option<Tensor<1, Int>>,
    /// Per window (`None` = full causal), the decode rows' mask `[rows, 1, 1, 1, width]`.
    decode_masks: Vec<(Option<usize>, Tensor<5>)>,
    /// Prefill chunks: (queries, context, `[context]` slots, masks per window `[1, 1, 1,
    /// queries, context]`).
    chunks: Vec<Chunk>,
}

struct Chunk {
    queries: usize,
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
        let chunks = spans[decode_rows..]
            .iter()
            .map(|s| Chunk {
                queries: s.queries,
                slots: ints(gather(s, s.context), device),
                masks: windows
                    .iter()
                    .map(|&w| (w, f32_tensor(mask_values(s.queries, s.context, s.context, w), [1, 1, 1, s.queries, s.context])))
                    .collect(),
            })
            .collect();
        Self { block_tokens, decode_rows, decode_width, decode_slots, decode_masks, chunks }
    }

    /// Decode rows only, from tensors already on the device: `slots [rows * width]` (each
    /// row's gathered slots, padded) and per window the mask `[rows, 1, 1, 1, width]` (see
    /// [`mask_values`]). What a recorded decode step reads, refreshed in place between replays.
    pub fn decode(rows: usize, width: usize, slots: Tensor<1, Int>, masks: Vec<(Option<usize>, Tensor<5>)>, block_tokens: usize) -> Self {
        Self { block_tokens, decode_rows: rows, decode_width: width, decode_slots: Some(slots), decode_masks: masks, chunks: Vec::new() }
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
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
        let keys = gather(k, slots, rows, width);
        let values = gather(v, slots, rows, width);
        let queries = q.clone().narrow(0, 0, rows).reshape([rows, heads, 1, d]);
        let mask = pick(&layout.decode_masks, window);
        let out = crate::attention::gqa_attention(queries, &keys, &values, Some(mask), scale);
        parts.push(out.reshape([rows, heads, d]));
        at = rows;
    }
    for chunk in &layout.chunks {
        let n = chunk.queries;
        let context = chunk.slots.dims()[0];
        let keys = gather(k, &chunk.slots, 1, context);
        let values = gather(v, &chunk.slots, 1, context);
        let queries = q.clone().narrow(0, at, n).reshape([1, n, heads, d]).swap_dims(1, 2);
        let out = crate::attention::gqa_attention(queries, &keys, &values, Some(pick(&chunk.masks, window)), scale);
        parts.push(out.swap_dims(1, 2).reshape([n, heads, d]));
        at += n;
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
        // Two decode rows and one prefill chunk of 5 queries over 11 tokens, blocks shuffled.
        let spans = vec![
            Span { queries: 1, context: 6, blocks: vec![7, 2] },
            Span { queries: 1, context: 9, blocks: vec![0, 5, 9] },
            Span { queries: 5, context: 11, blocks: vec![3, 8, 1] },
        ];
        let pool_slots = 10 * bt;
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
