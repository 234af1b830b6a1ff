//! Causal attention of prompt chunks on the CPU, read from the paged KV pools: transformers'
//! `eager_attention_forward` (`softmax(q·kᵀ · scale + causal mask) · v`, in f32) for every
//! query token of a step's prefill chunks, in tiles as FlashAttention computes it (Dao et al.
//! 2022, arXiv:2205.14135: a tile of query rows against blocks of keys, the scores never
//! written out for the whole chunk), with the whole row's softmax instead of the online
//! rescaling (a tile's rows fit in the cache).
//!
//! Through burn's operations (the reference, [`crate::attention::gqa_attention`] over gathered
//! keys) a chunk gathered its keys and values into new tensors, materialised every (query,
//! key) score including the causally hidden half, and took the masked softmax as three passes
//! with a tensor each: a fifth of a small Qwen3-MoE model's 256-token prompt steps (one thread)
//! and more of a 2,048-token one. Here:
//!
//! - the keys a sequence's chunk sees are gathered once per key head, keys transposed
//!   (`[d, keys]`, so a block of 32 keys is two 16-lane vectors per channel), coded pages
//!   decoded (their per-token scale kept aside, as the decode loop applies it);
//! - each task takes [`TILE_TOKENS`] query tokens of one key head, with the group's query heads
//!   as rows, and computes scores four rows by 32 keys at a time, only over the keys those
//!   rows see;
//! - the softmax of each row runs over exactly the keys it sees (the window's and the causal
//!   limit), with a vectorisable `exp`, and the weighted values are summed four rows at a
//!   time.
//!
//! A row's result depends only on its query, the keys it sees and their order, never on which
//! tile or chunk it fell in (scores are each a fused multiply-add chain over the channels;
//! keys a row does not see weigh exactly zero; its softmax sums in lanes counted from its own
//! first key), so a chunked prompt gives the bits of one pass and a batch those of its rows
//! alone.

// Only x86-64 runs the loops (see `prefill_attention`); elsewhere the reference does.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports))]

use crate::kv_pages::KvPages;
use crate::paged::{PoolRows, Span, slot_of, with_pool_rows};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

/// Query tokens a task covers (with its key head's group of query heads as rows).
const TILE_TOKENS: usize = 16;
/// Keys a step of the score loop covers: two 16-lane vectors.
const KEY_BLOCK: usize = 32;
/// Query rows a step of the score and value loops covers.
const ROW_BLOCK: usize = 4;
/// Channels a step of the value loop covers: four 16-lane vectors.
const VALUE_BLOCK: usize = 64;
/// The widest head taken (wider ones, or widths not a multiple of 16, take the reference).
const MAX_HEAD_DIM: usize = 512;

/// The keys and values of one (sequence, key head) that its chunk's queries see, from
/// `base` on: keys transposed, `kt [d, width]`, values `[width, d]`, both zero past the
/// context (`width` is the context from `base` rounded up to [`KEY_BLOCK`]), and each key's
/// and value's scale (1 for f32 pools).
struct Gathered {
    base: usize,
    width: usize,
    kt: Vec<f32>,
    kscale: Vec<f32>,
    v: Vec<f32>,
    vscale: Vec<f32>,
}

/// Attention of the step's prefill tokens `q [tokens, heads, d]` (the `spans`' queries one
/// after another) over the pools `k`/`v [slots, kv_heads, d]` (this step's keys already
/// written), `None` (the caller takes the reference) off the CPU, on CPUs without AVX2 and
/// FMA (x86-64 only: written portably, the loops did not vectorise and ran slower than the
/// reference), for queries other than f32, pools of other dtypes, head widths not a multiple
/// of 16, or a block outside the pool.
pub(crate) fn prefill_attention(q: &Tensor<3>, k: &KvPages, v: &KvPages, spans: &[Span], block_tokens: usize, window: Option<usize>, scale: f64) -> Option<Tensor<3>> {
    let device = q.device();
    if crate::launch::is_cubecl(&device) || q.dtype() != DType::F32 || !vector_loops() || !tiles_on() {
        return None;
    }
    let [tokens, heads, d] = q.dims();
    let [slots, kv_heads, dk] = k.dims();
    let shape_fits = dk == d && d.is_multiple_of(16) && d > 0 && d <= MAX_HEAD_DIM && v.dims() == k.dims() && kv_heads > 0 && heads.is_multiple_of(kv_heads) && block_tokens > 0;
    if !shape_fits || spans.iter().map(|s| s.queries).sum::<usize>() != tokens {
        return None;
    }
    let pool_blocks = slots / block_tokens;
    let blocks_fit = spans.iter().all(|s| {
        s.queries <= s.context && s.context <= s.blocks.len() * block_tokens && s.blocks[..s.context.div_ceil(block_tokens)].iter().all(|&b| (b as usize) < pool_blocks)
    });
    if !blocks_fit {
        return None;
    }
    let queries = q.clone().into_data().convert::<f32>().try_into_vec::<f32>().ok()?;
    let out = with_pool_rows(k, |keys| {
        with_pool_rows(v, |values| {
            let shape = Shape { heads, kv_heads, d, block_tokens, window, scale: scale as f32 };
            Some(attend(&queries, keys, values, spans, &shape))
        })
    })?;
    Some(Tensor::<3>::from_data(TensorData::new(out, [tokens, heads, d]), (&device, DType::F32)))
}

/// The step's shapes and settings, shared by every task.
#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    d: usize,
    block_tokens: usize,
    window: Option<usize>,
    scale: f32,
}

impl Shape {
    /// The first key position the query at position `pos` sees.
    fn first_seen(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }
}

/// One task: query tokens `t0..t1` of span `span` (its queries start at step token `at`),
/// key head `kvh`.
#[derive(Clone, Copy)]
struct Task {
    span: usize,
    at: usize,
    kvh: usize,
    t0: usize,
    t1: usize,
}

fn attend(queries: &[f32], keys: PoolRows<'_>, values: PoolRows<'_>, spans: &[Span], shape: &Shape) -> Vec<f32> {
    let Shape { heads, kv_heads, d, .. } = *shape;
    let gathered: Vec<Gathered> = (0..spans.len() * kv_heads).into_par_iter().map(|i| gather(keys, values, &spans[i / kv_heads], i % kv_heads, shape)).collect();
    let mut tasks = Vec::new();
    let mut at = 0;
    for (span, s) in spans.iter().enumerate() {
        for kvh in 0..kv_heads {
            for t0 in (0..s.queries).step_by(TILE_TOKENS) {
                tasks.push(Task { span, at, kvh, t0, t1: (t0 + TILE_TOKENS).min(s.queries) });
            }
        }
        at += s.queries;
    }
    let group = heads / kv_heads;
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|task| {
            let mut out = vec![0f32; (task.t1 - task.t0) * group * d];
            tile(queries, &gathered[task.span * kv_heads + task.kvh], &spans[task.span], task, shape, &mut out);
            out
        })
        .collect();
    let mut out = vec![0f32; at * heads * d];
    for (task, rows) in tasks.iter().zip(results) {
        for (i, token) in rows.chunks_exact(group * d).enumerate() {
            let start = ((task.at + task.t0 + i) * heads + task.kvh * group) * d;
            out[start..start + group * d].copy_from_slice(token);
        }
    }
    out
}

/// [`Gathered`] of span `s`, key head `kvh`.
fn gather(keys: PoolRows<'_>, values: PoolRows<'_>, s: &Span, kvh: usize, shape: &Shape) -> Gathered {
    let Shape { kv_heads, d, block_tokens, .. } = *shape;
    let base = shape.first_seen(s.context - s.queries);
    let width = (s.context - base).div_ceil(KEY_BLOCK) * KEY_BLOCK;
    let mut g = Gathered { base, width, kt: vec![0.0; d * width], kscale: vec![0.0; width], v: vec![0.0; width * d], vscale: vec![0.0; width] };
    let mut buf = [0f32; MAX_HEAD_DIM];
    let buf = &mut buf[..d];
    for j in base..s.context {
        let at = (slot_of(&s.blocks, block_tokens, j) * kv_heads + kvh) * d;
        let x = j - base;
        let (key, ks) = keys.row(at, buf);
        for (c, &value) in key.iter().enumerate() {
            g.kt[c * width + x] = value;
        }
        g.kscale[x] = ks;
        let (value, vs) = values.row(at, buf);
        g.v[x * d..(x + 1) * d].copy_from_slice(value);
        g.vscale[x] = vs;
    }
    g
}

/// Whether the tiles are on (unless `INFERENCE_PIO_CPU_PREFILL_TILES=0`: the reference, for
/// side-by-side measurements).
fn tiles_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !crate::launch::switched_off("INFERENCE_PIO_CPU_PREFILL_TILES"))
}

/// Whether this CPU runs the loops: AVX2 and FMA (AVX-512F where it has it, unless
/// [`crate::quant::use_avx512`] turned it off).
fn vector_loops() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::quant::cpu_has_avx2();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One task's rows into `out` (`[tokens, group, d]`), compiled for AVX-512 or AVX2 + FMA; its
/// buffers are per thread and kept between tasks.
fn tile(queries: &[f32], g: &Gathered, s: &Span, task: &Task, shape: &Shape, out: &mut [f32]) {
    thread_local! {
        static SCRATCH: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    }
    let mut scratch = SCRATCH.take();
    #[cfg(target_arch = "x86_64")]
    if crate::quant::uses_avx512() {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn avx512(queries: &[f32], g: &Gathered, s: &Span, task: &Task, shape: &Shape, out: &mut [f32], scratch: &mut (Vec<f32>, Vec<f32>)) {
            tile_body(queries, g, s, task, shape, out, scratch, true)
        }
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (detected at run time).
        unsafe { avx512(queries, g, s, task, shape, out, &mut scratch) };
    } else {
        #[target_feature(enable = "avx2,fma")]
        fn avx2(queries: &[f32], g: &Gathered, s: &Span, task: &Task, shape: &Shape, out: &mut [f32], scratch: &mut (Vec<f32>, Vec<f32>)) {
            tile_body(queries, g, s, task, shape, out, scratch, false)
        }
        // SAFETY: `prefill_attention` runs only where the CPU has AVX2 and FMA (`vector_loops`).
        unsafe { avx2(queries, g, s, task, shape, out, &mut scratch) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (queries, g, s, task, shape, out);
    SCRATCH.set(scratch);
}

/// The keys row `r` of a tile sees, relative to the gathered `base`: `[first, end)`.
#[inline(always)]
fn seen(shape: &Shape, s: &Span, g: &Gathered, group: usize, t0: usize, r: usize) -> (usize, usize) {
    let pos = s.context - s.queries + t0 + r / group;
    (shape.first_seen(pos) - g.base, pos + 1 - g.base)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_body(queries: &[f32], g: &Gathered, s: &Span, task: &Task, shape: &Shape, out: &mut [f32], (qbuf, scores): &mut (Vec<f32>, Vec<f32>), wide: bool) {
    let Shape { heads, kv_heads, d, scale, .. } = *shape;
    let group = heads / kv_heads;
    let rows = (task.t1 - task.t0) * group;
    let padded = rows.div_ceil(ROW_BLOCK) * ROW_BLOCK;
    // The tile's queries as rows (token, then head of the group), padded with zero rows.
    qbuf.clear();
    qbuf.resize(padded * d, 0.0);
    for i in task.t0..task.t1 {
        let from = ((task.at + i) * heads + task.kvh * group) * d;
        let to = (i - task.t0) * group * d;
        qbuf[to..to + group * d].copy_from_slice(&queries[from..from + group * d]);
    }
    // A padded row sees what the tile's last row sees (its result is dropped).
    let row_seen = |r: usize| seen(shape, s, g, group, task.t0, r.min(rows - 1));
    let width = g.width;
    scores.clear();
    scores.resize(padded * width, 0.0);
    let mut acc = [0f32; ROW_BLOCK * MAX_HEAD_DIM];
    for rb in (0..padded).step_by(ROW_BLOCK) {
        // The key blocks any of the four rows sees.
        let first = (rb..rb + ROW_BLOCK).map(|r| row_seen(r).0).min().unwrap_or(0) / KEY_BLOCK * KEY_BLOCK;
        let end = (rb..rb + ROW_BLOCK).map(|r| row_seen(r).1).max().unwrap_or(0).div_ceil(KEY_BLOCK) * KEY_BLOCK;
        score_block(&qbuf[rb * d..(rb + ROW_BLOCK) * d], g, d, first, end, scale, &mut scores[rb * width..(rb + ROW_BLOCK) * width], wide);
        for r in rb..rb + ROW_BLOCK {
            let (a, b) = row_seen(r);
            let row = &mut scores[r * width..(r + 1) * width];
            softmax_seen(&mut row[a..b]);
            row[first..a].fill(0.0);
            row[b..end].fill(0.0);
        }
        weigh_values(&scores[rb * width..(rb + ROW_BLOCK) * width], g, d, first, end, &mut acc[..ROW_BLOCK * d], wide);
        for (r, y) in (rb..rb + ROW_BLOCK).zip(acc.chunks_exact(d)) {
            if r < rows {
                out[r * d..(r + 1) * d].copy_from_slice(y);
            }
        }
    }
}

/// Scores of four query rows `q [4, d]` against keys `first..end` (multiples of
/// [`KEY_BLOCK`]) into `scores [4, width]`: each a fused multiply-add chain over the channels
/// in order, then times the key's scale and `scale` (AVX-512 where `wide`, else AVX2: the
/// same arithmetic, so the same bits).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_block(q: &[f32], g: &Gathered, d: usize, first: usize, end: usize, scale: f32, scores: &mut [f32], wide: bool) {
    let width = g.width;
    assert!(q.len() >= ROW_BLOCK * d && g.kt.len() >= d * width && end <= width && g.kscale.len() >= end && scores.len() >= ROW_BLOCK * width);
    for kb in (first..end).step_by(KEY_BLOCK) {
        // SAFETY: `tile` runs this only where the CPU has AVX2 and FMA, and AVX-512F where
        // `wide`; the assertion above keeps every read and write in bounds (`kb + KEY_BLOCK <=
        // end <= width`).
        unsafe {
            if wide {
                avx512::score_block(q, &g.kt, &g.kscale, width, d, kb, scale, scores);
            } else {
                avx2::score_block(q, &g.kt, &g.kscale, width, d, kb, scale, scores);
            }
        }
    }
}

/// The weighted sum of values `first..end` for four rows of probabilities `p [4, width]`
/// (zero where a row sees no key) into `acc [4, d]`: per channel a fused multiply-add chain
/// over the keys in order, each probability times its value's scale first.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weigh_values(p: &[f32], g: &Gathered, d: usize, first: usize, end: usize, acc: &mut [f32], wide: bool) {
    let width = g.width;
    assert!(p.len() >= ROW_BLOCK * width && end <= width && g.v.len() >= width * d && g.vscale.len() >= end && acc.len() >= ROW_BLOCK * d && d.is_multiple_of(16));
    // SAFETY: as in `score_block`; the assertion above keeps every read and write in bounds
    // (`c0 + 16 * V <= d`, `end <= width`).
    unsafe {
        if wide {
            for c0 in (0..d).step_by(VALUE_BLOCK) {
                match (d - c0).min(VALUE_BLOCK) / 16 {
                    4 => avx512::weigh_values::<4>(p, &g.v, &g.vscale, width, d, c0, first, end, acc),
                    3 => avx512::weigh_values::<3>(p, &g.v, &g.vscale, width, d, c0, first, end, acc),
                    2 => avx512::weigh_values::<2>(p, &g.v, &g.vscale, width, d, c0, first, end, acc),
                    _ => avx512::weigh_values::<1>(p, &g.v, &g.vscale, width, d, c0, first, end, acc),
                }
            }
        } else {
            for c0 in (0..d).step_by(16) {
                avx2::weigh_values(p, &g.v, &g.vscale, width, d, c0, first, end, acc);
            }
        }
    }
}

/// The loops with AVX-512 intrinsics: four rows by 32 keys, four rows by up to 64 channels.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{KEY_BLOCK, ROW_BLOCK};
    use std::arch::x86_64::*;

    /// Keys `kb..kb + 32` of [`super::score_block`].
    ///
    /// # Safety
    /// The CPU has AVX-512F; `q` holds 4 rows of `d`, `kt` `d` rows of `width`, `kscale` and
    /// each of `scores`' 4 rows of `width` reach `kb + 32`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn score_block(q: &[f32], kt: &[f32], kscale: &[f32], width: usize, d: usize, kb: usize, scale: f32, scores: &mut [f32]) {
        let mut acc = [[_mm512_setzero_ps(); 2]; ROW_BLOCK];
        for c in 0..d {
            // SAFETY: `c * width + kb + 32 <= d * width <= kt.len()` (the caller's bounds).
            let (k0, k1) = unsafe { (_mm512_loadu_ps(kt.as_ptr().add(c * width + kb)), _mm512_loadu_ps(kt.as_ptr().add(c * width + kb + 16))) };
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(q[r * d + c]);
                acc[0] = _mm512_fmadd_ps(x, k0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, k1, acc[1]);
            }
        }
        let scale = _mm512_set1_ps(scale);
        // SAFETY: `kb + 32 <= kscale.len()`, and row `r`'s `kb + 32 <= width` (the caller's bounds).
        unsafe {
            let ks = [_mm512_mul_ps(_mm512_loadu_ps(kscale.as_ptr().add(kb)), scale), _mm512_mul_ps(_mm512_loadu_ps(kscale.as_ptr().add(kb + 16)), scale)];
            for (r, acc) in acc.iter().enumerate() {
                for h in 0..KEY_BLOCK / 16 {
                    _mm512_storeu_ps(scores.as_mut_ptr().add(r * width + kb + 16 * h), _mm512_mul_ps(acc[h], ks[h]));
                }
            }
        }
    }

    /// Channels `c0..c0 + 16 * V` of [`super::weigh_values`].
    ///
    /// # Safety
    /// The CPU has AVX-512F; `p` holds 4 rows of `width`, `v` rows of `d` up to `end`, `acc`
    /// 4 rows of `d`, `c0 + 16 * V <= d`, `end <= width`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn weigh_values<const V: usize>(p: &[f32], v: &[f32], vscale: &[f32], width: usize, d: usize, c0: usize, first: usize, end: usize, acc: &mut [f32]) {
        let mut block = [[_mm512_setzero_ps(); V]; ROW_BLOCK];
        for j in first..end {
            let vs = vscale[j];
            // SAFETY: `j * d + c0 + 16 * V <= end * d <= v.len()` (the caller's bounds).
            let value: [__m512; V] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(v.as_ptr().add(j * d + c0 + 16 * i)) });
            for (r, block) in block.iter_mut().enumerate() {
                let w = _mm512_set1_ps(p[r * width + j] * vs);
                for i in 0..V {
                    block[i] = _mm512_fmadd_ps(w, value[i], block[i]);
                }
            }
        }
        for (r, block) in block.iter().enumerate() {
            for (i, &b) in block.iter().enumerate() {
                // SAFETY: `r * d + c0 + 16 * i + 16 <= 4 * d <= acc.len()` (the caller's bounds).
                unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add(r * d + c0 + 16 * i), b) };
            }
        }
    }
}

/// The same loops with AVX2 intrinsics (sixteen registers of eight lanes): four rows by 16
/// keys, twice a block, and four rows by 16 channels.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{KEY_BLOCK, ROW_BLOCK};
    use std::arch::x86_64::*;

    /// Keys `kb..kb + 32` of [`super::score_block`].
    ///
    /// # Safety
    /// As [`super::avx512::score_block`]'s, with AVX2 and FMA instead of AVX-512F.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn score_block(q: &[f32], kt: &[f32], kscale: &[f32], width: usize, d: usize, kb: usize, scale: f32, scores: &mut [f32]) {
        let scale = _mm256_set1_ps(scale);
        for h in (kb..kb + KEY_BLOCK).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; ROW_BLOCK];
            for c in 0..d {
                // SAFETY: `c * width + h + 16 <= d * width <= kt.len()` (the caller's bounds).
                let (k0, k1) = unsafe { (_mm256_loadu_ps(kt.as_ptr().add(c * width + h)), _mm256_loadu_ps(kt.as_ptr().add(c * width + h + 8))) };
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_ps(q[r * d + c]);
                    acc[0] = _mm256_fmadd_ps(x, k0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(x, k1, acc[1]);
                }
            }
            // SAFETY: `h + 16 <= kscale.len()`, and row `r`'s `h + 16 <= width` (the caller's bounds).
            unsafe {
                let ks = [_mm256_mul_ps(_mm256_loadu_ps(kscale.as_ptr().add(h)), scale), _mm256_mul_ps(_mm256_loadu_ps(kscale.as_ptr().add(h + 8)), scale)];
                for (r, acc) in acc.iter().enumerate() {
                    for half in 0..2 {
                        _mm256_storeu_ps(scores.as_mut_ptr().add(r * width + h + 8 * half), _mm256_mul_ps(acc[half], ks[half]));
                    }
                }
            }
        }
    }

    /// Channels `c0..c0 + 16` of [`super::weigh_values`].
    ///
    /// # Safety
    /// As [`super::avx512::weigh_values`]'s with `V = 1`, with AVX2 and FMA instead of AVX-512F.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn weigh_values(p: &[f32], v: &[f32], vscale: &[f32], width: usize, d: usize, c0: usize, first: usize, end: usize, acc: &mut [f32]) {
        let mut block = [[_mm256_setzero_ps(); 2]; ROW_BLOCK];
        for j in first..end {
            let vs = vscale[j];
            // SAFETY: `j * d + c0 + 16 <= end * d <= v.len()` (the caller's bounds).
            let value = unsafe { [_mm256_loadu_ps(v.as_ptr().add(j * d + c0)), _mm256_loadu_ps(v.as_ptr().add(j * d + c0 + 8))] };
            for (r, block) in block.iter_mut().enumerate() {
                let w = _mm256_set1_ps(p[r * width + j] * vs);
                block[0] = _mm256_fmadd_ps(w, value[0], block[0]);
                block[1] = _mm256_fmadd_ps(w, value[1], block[1]);
            }
        }
        for (r, block) in block.iter().enumerate() {
            for (half, &b) in block.iter().enumerate() {
                // SAFETY: `r * d + c0 + 8 * half + 8 <= 4 * d <= acc.len()` (the caller's bounds).
                unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(r * d + c0 + 8 * half), b) };
            }
        }
    }
}

/// The softmax of the scores a row sees, in place: `exp(x - max)` ([`exp_below_zero`]),
/// summed in sixteen lanes counted from the row's first key, each then divided by the sum.
#[inline(always)]
fn softmax_seen(row: &mut [f32]) {
    let mut top = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        for (t, &x) in top.iter_mut().zip(chunk) {
            *t = if x > *t { x } else { *t };
        }
    }
    let max = chunks.remainder().iter().chain(&top).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(chunk.iter_mut()) {
            *x = exp_below_zero(*x - max);
            *l += *x;
        }
    }
    for (l, x) in lanes.iter_mut().zip(chunks.into_remainder()) {
        *x = exp_below_zero(*x - max);
        *l += *x;
    }
    let total: f32 = lanes.iter().sum();
    for x in row.iter_mut() {
        *x /= total;
    }
}

/// `e^x` for `x <= 0` (a score less the row's maximum), as Cephes' `expf` computes it (range
/// reduction by `ln 2` in two parts, a degree-5 polynomial), the power of two formed in the
/// exponent bits; written without branches or integer conversions so that it vectorises, and
/// within 2 ulp of `f32::exp` (checked below). Below -87 (where `e^x` is under 2^-125) it
/// gives `e^-87`.
#[inline(always)]
fn exp_below_zero(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    // n + 127 (n = round(x / ln 2), from -126 to 0) as a float and in the low bits of `t`.
    let t = (x * LOG2E + 127.0) + ROUND;
    let n = (t - ROUND) - 127.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n: n + 127 shifted into the exponent field (the bits above it shift out).
    y * f32::from_bits(t.to_bits() << 23)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kv_pages::{KvCodes, KvStorage};
    use burn::tensor::{Device, Distribution, Int};

    fn values<const D: usize>(x: Tensor<D>) -> Vec<f32> {
        x.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_standard_library() {
        let mut x = 0.0f32;
        while x > -90.0 {
            let (got, want) = (exp_below_zero(x), x.exp());
            if x >= -87.0 {
                let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(ulp <= 2, "e^{x}: {got} vs {want} ({ulp} ulp)");
            } else {
                assert!(got <= (-87f32).exp() * 1.0001, "e^{x} clamps at e^-87: {got}");
            }
            x -= 0.0137;
        }
        assert_eq!(exp_below_zero(0.0), 1.0);
    }

    fn spans() -> Vec<Span> {
        // A 40-query chunk over 75 tokens (three tiles, the last short), a whole 37-token
        // prompt, a 1-query chunk, and one of 17 over 17; blocks of 8 shuffled over 30.
        vec![
            Span { queries: 40, context: 75, blocks: vec![3, 8, 1, 20, 11, 13, 27, 5, 29, 0] },
            Span { queries: 37, context: 37, blocks: vec![12, 2, 19, 7, 25] },
            Span { queries: 1, context: 9, blocks: vec![4, 14] },
            Span { queries: 17, context: 17, blocks: vec![6, 28, 9] },
        ]
    }

    /// Every prefill token's output equals the dense attention of its sequence's keys, for f32,
    /// int8 and fp8 pools, with and without a window, for head widths of 16 and 80 (a value
    /// block and a part of one), and 3 query heads a key head.
    #[test]
    fn tiles_give_each_chunks_causal_attention() {
        if !vector_loops() {
            return; // an x86-64 CPU without AVX2 and FMA: the reference runs
        }
        let device = Device::flex();
        let bt = 8;
        let pool_slots = 30 * bt;
        let spans = spans();
        let tokens: usize = spans.iter().map(|s| s.queries).sum();
        for (heads, kv_heads, d) in [(6, 2, 16), (3, 1, 80), (4, 4, 64)] {
            let kp: Tensor<3> = Tensor::random([pool_slots, kv_heads, d], Distribution::Uniform(-1.0, 1.0), &device);
            let vp: Tensor<3> = Tensor::random([pool_slots, kv_heads, d], Distribution::Uniform(-1.0, 1.0), &device);
            let q: Tensor<3> = Tensor::random([tokens, heads, d], Distribution::Uniform(-1.0, 1.0), &device);
            let qv = values(q.clone());
            let all_slots = Tensor::<1, Int>::arange(0..pool_slots as i64, &device);
            for codes in [None, Some(KvCodes::Int8), Some(KvCodes::Fp8)] {
                let (k, v) = match codes {
                    Some(format) => {
                        let coded = |pool: &Tensor<3>| KvPages::zeroed(KvStorage::Coded(format), [pool_slots, kv_heads, d], &device).write(all_slots.clone(), pool.clone());
                        (coded(&kp), coded(&vp))
                    }
                    None => (KvPages::Dense(kp.clone()), KvPages::Dense(vp.clone())),
                };
                let (kv, vv) = (values(k.values(DType::F32)), values(v.values(DType::F32)));
                for window in [None, Some(5), Some(40)] {
                    let got = values(prefill_attention(&q, &k, &v, &spans, bt, window, 0.3).expect("f32 queries on the CPU"));
                    let mut at = 0;
                    for s in &spans {
                        let slots = || (0..s.context).map(|j| slot_of(&s.blocks, bt, j));
                        let (ks, vs) = (crate::attention::rows_at(&kv, slots(), kv_heads * d), crate::attention::rows_at(&vv, slots(), kv_heads * d));
                        let want = crate::attention::dense_reference(&qv[at * heads * d..(at + s.queries) * heads * d], &ks, &vs, s.queries, s.context, heads, kv_heads, d, window, 0.3);
                        for (i, (a, b)) in got[at * heads * d..(at + s.queries) * heads * d].iter().zip(&want).enumerate() {
                            assert!((a - b).abs() < 2e-6, "{heads}/{kv_heads} heads of {d}, {codes:?}, window {window:?}, span {s:?}, value {i}: {a} vs {b}");
                        }
                        at += s.queries;
                    }
                }
            }
        }
    }

    /// A prompt cut into chunks at any point gives, token for token, the bits of one pass; a
    /// step of several sequences those of each alone.
    #[test]
    fn chunks_and_batches_give_the_bits_of_one_pass() {
        if !vector_loops() {
            return; // an x86-64 CPU without AVX2 and FMA: the reference runs
        }
        let device = Device::flex();
        let (heads, kv_heads, d, bt) = (6, 2, 32, 8);
        let pool_slots = 16 * bt;
        let kp: Tensor<3> = Tensor::random([pool_slots, kv_heads, d], Distribution::Uniform(-2.0, 2.0), &device);
        let vp: Tensor<3> = Tensor::random([pool_slots, kv_heads, d], Distribution::Uniform(-1.0, 1.0), &device);
        let (k, v) = (KvPages::Dense(kp), KvPages::Dense(vp));
        let blocks: Vec<u32> = vec![9, 3, 14, 0, 7, 11, 2, 5, 13];
        let context = 70;
        let q: Tensor<3> = Tensor::random([context, heads, d], Distribution::Uniform(-2.0, 2.0), &device);
        for window in [None, Some(21)] {
            let whole = values(prefill_attention(&q, &k, &v, &[Span { queries: context, context, blocks: blocks.clone() }], bt, window, 0.2).expect("CPU"));
            for cut in [1, 13, 16, 33, 69] {
                // Tokens `cut..` as a chunk over the whole context, beside an unrelated sequence.
                let other = Span { queries: 5, context: 5, blocks: vec![15] };
                let chunk = Span { queries: context - cut, context, blocks: blocks.clone() };
                let qs = Tensor::cat(vec![q.clone().narrow(0, 0, 5), q.clone().narrow(0, cut, context - cut)], 0);
                let got = values(prefill_attention(&qs, &k, &v, &[other, chunk], bt, window, 0.2).expect("CPU"));
                assert_eq!(&got[5 * heads * d..], &whole[cut * heads * d..], "window {window:?}, chunk from {cut}");
            }
        }
    }

    /// The AVX-512 loops (where the CPU has them) give the bits of the AVX2 loops (the switch is
    /// process-wide; tests beside this one are correct either way).
    #[test]
    fn the_avx512_loops_give_the_avx2_loops_bits() {
        if !vector_loops() {
            return; // an x86-64 CPU without AVX2 and FMA: the reference runs
        }
        let device = Device::flex();
        let (heads, kv_heads, d, bt) = (6, 2, 80, 8);
        let pool_slots = 30 * bt;
        let spans = spans();
        let tokens: usize = spans.iter().map(|s| s.queries).sum();
        let k = KvPages::Dense(Tensor::random([pool_slots, kv_heads, d], Distribution::Uniform(-1.0, 1.0), &device));
        let v = KvPages::Dense(Tensor::random([pool_slots, kv_heads, d], Distribution::Uniform(-1.0, 1.0), &device));
        let q: Tensor<3> = Tensor::random([tokens, heads, d], Distribution::Uniform(-1.0, 1.0), &device);
        let run = |wide: bool| {
            crate::quant::use_avx512(wide);
            values(prefill_attention(&q, &k, &v, &spans, bt, Some(40), 0.3).expect("CPU"))
        };
        let (narrow, wide) = (run(false), run(true));
        assert_eq!(narrow, wide);
    }

    #[test]
    fn other_shapes_and_bad_blocks_take_the_reference() {
        if !vector_loops() {
            return; // an x86-64 CPU without AVX2 and FMA: the reference runs
        }
        let device = Device::flex();
        let pool = |d: usize| KvPages::Dense(Tensor::zeros([32, 2, d], &device));
        let q = |d: usize| Tensor::<3>::zeros([4, 4, d], &device);
        let span = |blocks: Vec<u32>| vec![Span { queries: 4, context: 4, blocks }];
        assert!(prefill_attention(&q(16), &pool(16), &pool(16), &span(vec![3]), 8, None, 1.0).is_some());
        assert!(prefill_attention(&q(24), &pool(24), &pool(24), &span(vec![3]), 8, None, 1.0).is_none(), "24 channels: not a multiple of 16");
        assert!(prefill_attention(&q(16), &pool(16), &pool(16), &span(vec![4]), 8, None, 1.0).is_none(), "block 4 of a 4-block pool");
        assert!(prefill_attention(&q(16).cast(DType::BF16), &pool(16), &pool(16), &span(vec![3]), 8, None, 1.0).is_none(), "bf16 queries");
    }
}
