//! Attention over a paged KV cache (vLLM's PagedAttention: Kwon et al. 2023,
//! arXiv:2309.06180): the keys and values of every sequence live in one pool of fixed-size
//! blocks per layer, `[slots, kv_heads, head_dim]` with `slot = block * block_tokens +
//! offset`, and each sequence names its blocks in a block table. One step's queries are a flat
//! batch of spans, one per sequence: a decode row (one query token) or a prefill chunk whose
//! queries attend to the sequence's cached tokens plus the chunk itself, causally, optionally
//! within a sliding window (transformers' `sliding_window_causal_mask`: query `p` sees keys
//! `p - window < k <= p`).
//!
//! [`PagedLayout`] is built once per step from the spans (what the kernels read, or the
//! reference's slot indices and masks, made by the first layer that needs them) and used by
//! every layer; [`paged_attention`] is the operation. Its
//! reference, on every backend, gathers each sequence's slots and runs
//! [`crate::attention::gqa_attention`] (transformers' `eager_attention_forward`): all decode
//! rows together as one batch padded to the longest of them, then the prefill chunks, each
//! run of consecutive chunks of one shape (query tokens and context) as one batch.
//! The flat batch must list decode rows first, so the outputs concatenate in order.
//!
//! On the CPU, decode rows of f32 pools run through [`cpu_decode_attention`]: each (row, query
//! head) scores its keys straight from the pools' memory through the row's block table and
//! takes their softmax-weighted values, over rayon's threads (no gathered copy, mask or matrix
//! products: through burn's operations those cost more than the arithmetic at decode sizes).
//! Steps over rows of 256 keys or more do it in three phases (scores, softmax, values), so that
//! each key and value is read once and every thread has work however few key heads there are;
//! the arithmetic and its order are the same, so are the bits.
//!
//! On CubeCL devices decode rows run through our kernel instead ([`paged_decode_attention`]),
//! after flash-decoding (Dao et al. 2023) and vLLM's paged attention v2: one cube per (row,
//! key head, split of the context) serves all the query heads of that key head (each key and
//! value read once, not once per query head), reads the keys straight from the pool through
//! the row's block table (no gathered copy), and hides nothing through a mask: a row sees the
//! keys below its context length, within its window. Its planes (warps) take tiles of 32
//! consecutive keys (8 for GQA groups over 4) in turn: groups of four lanes score a key each
//! (one load instruction reads whole 64-byte runs of eight keys, and a score needs two
//! shuffles, not five), the tile moves an online softmax (Milakov & Gimelshein 2018,
//! arXiv:1805.02867; f32 inside) once, and all lanes then add the tile's values, several keys
//! side by side; planes merge through shared memory. When a step has too few rows to fill the
//! device, the context is split over several cubes whose partial results a second kernel
//! merges.
//!
//! The step's prefill chunks, of any lengths, run through the same kernel in one launch
//! ([`paged_prefill_attention`]): each query token is a row that sees its chunk's keys up to its
//! own position (causal, and its window) through its chunk's row of one block table, so no
//! keys are gathered, no mask is built and no score is materialised. A plane takes a row
//! (consecutive tokens of a chunk share a cube, so the keys one plane loads are in cache for
//! the next) and walks its keys itself. It walks them with f32 multiply-adds, so long chunks
//! (where the gathered reference's products run on cuBLAS's tensor cores) stay on the
//! reference: [`prefill_kernel_pays`] picks the cheaper way for each step and layer window from
//! a cost model measured on an H100. Both kernels are checked on the device against the
//! reference by `kernels/examples/kernel_check.rs` (group `attention`) and end to end by the
//! engine's parity runs (`benches/gpu/run_serving_4b.sh`).
//!
//! Pools of 8-bit codes ([`crate::kv_pages::KvPages::Coded`], `kv_cache_dtype = "int8"` or
//! `"fp8"`) are read in place by all three: the kernel turns each code into f32 through its bits
//! (int8 and E4M3 alike, as fast as bf16 values) and scales each key's score and each value's
//! weight by its slot's scale; the CPU loop converts a row of codes at a time; the reference
//! decodes the rows it gathers.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use crate::launch::{PLANE, is_cubecl, last_axis_contiguous};
use crate::kv_pages::{KvCodes, KvPages};
use std::cell::{OnceCell, RefCell};

/// Planes per cube of the decode kernel, taking tiles of the cube's keys in turn.
const PLANES: usize = 4;
/// The most keys a plane takes at a time (a tile: [`decode_passes`] score passes of
/// `PLANE / LANES_PER_KEY` keys), scored by groups of lanes and then summed into the values
/// by all lanes.
const TILE: usize = PLANE;
/// Cubes a decode launch aims for (twice the 132 multiprocessors of an H100/H200): a step with
/// fewer (rows x key heads) than this splits each row's context over several cubes.
const TARGET_CUBES: usize = 264;
/// The fewest keys one split covers with 8 or more key heads: two planes' tiles. Fewer keys a
/// split (more cubes with shorter chains) were slower on an H100 there: Qwen3-4B (8 key heads)
/// batch 1 at 243.2-243.3 tok/s with 64, 239.0-239.2 with 32, 232.1 with 16
/// (`benches/results/gpu-h100-2026-12-07l-small-kernel-shapes.md`).
const SPLIT_MIN_KEYS: usize = 2 * TILE;

/// The fewest keys one split covers with fewer than 8 key heads: one tile. A row then has half
/// the cubes at a split, and shorter splits paid: Qwen3-Coder-30B-A3B (4 key heads, 48 layers)
/// batch 1 on an H100 at 214.0-215.8 tok/s with 32 against 201.2-203.2 with 64, 211.2-211.9 with
/// 16 and 203.8-204.9 with 8 (`benches/results/gpu-h100-2026-12-08-30b-split-keys.md`).
const FEW_HEADS_SPLIT_MIN_KEYS: usize = TILE;

/// The fewest keys a split covers for `kv_heads` key heads ([`SPLIT_MIN_KEYS`],
/// [`FEW_HEADS_SPLIT_MIN_KEYS`]), unless `INFERENCE_PIO_SPLIT_MIN_KEYS` (8 to 1024) says
/// otherwise.
fn split_min_keys(kv_heads: usize) -> usize {
    static KEYS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let switch = *KEYS.get_or_init(|| crate::launch::env_number("INFERENCE_PIO_SPLIT_MIN_KEYS", |k| (8..=1024).contains(&k), "a number of keys from 8 to 1024"));
    switch.unwrap_or(if kv_heads < 8 { FEW_HEADS_SPLIT_MIN_KEYS } else { SPLIT_MIN_KEYS })
}

/// The most f32 registers a lane spends on its heads' output accumulators (query heads per
/// key head x vector width): past it the vector narrows, so a wide GQA group (GLM's 12) keeps
/// its accumulators in registers.
const ACCUMULATOR_REGISTERS: usize = 48;
/// Lanes that share one key's scores (each reads a quarter of the head, 16-byte vectors side by
/// side, so a load instruction reads whole 64-byte runs of 8 keys). At most 4: the kernel's
/// score reduction shuffles across 1 and 2 lanes.
const LANES_PER_KEY: usize = 4;
const _: () = assert!(LANES_PER_KEY <= 4 && LANES_PER_KEY.is_power_of_two());

/// Score passes a plane makes over its tile (each pass scores `32 / lpk` keys, `lpk` lanes a
/// key): four (a tile of 32 keys) up to 4 query heads per key head, one (8 keys) above, whose
/// accumulators and probabilities leave fewer registers for a tile's keys and values in
/// flight. H200, 2026-12-04 (`kernel_check attention`, bf16, 1 / 2 / 4 passes): Qwen3-4B at
/// 256 rows x 600 keys 305 / 355 / 311 µs and Qwen3-VL-2B at 64 rows 84 / 96 / 79 µs; the
/// 30B's 8 heads a key head at 256 rows 390 / 850 / 1,087 µs and GLM's 12 at 8 rows
/// 48 / 146 / 196 µs.
pub fn decode_passes(group: usize, lpk: usize) -> usize {
    if group > 4 { 1 } else { lpk }
}

/// How many cubes share one row's context, for `rows x kv_heads` cubes and a table of `width`
/// slots (each split takes an equal share of the row's own visible keys).
pub fn decode_splits(rows: usize, kv_heads: usize, width: usize) -> usize {
    TARGET_CUBES.div_ceil((rows * kv_heads).max(1)).min(width.div_ceil(split_min_keys(kv_heads))).max(1)
}

/// Elements per vector the decode kernel reads a head in, for `group` query heads per key
/// head: the widest of at most 16 bytes whose vectors per head divide a plane (so a plane's
/// value pass covers whole keys), narrowed while the accumulators would pass
/// [`ACCUMULATOR_REGISTERS`]; `None` when no width fits the head in one plane.
pub fn decode_vector(head_dim: usize, group: usize, dtype: DType) -> Option<usize> {
    let most = (16 / dtype.size()).max(1);
    let fits: Vec<usize> = [8usize, 4, 2, 1]
        .into_iter()
        .filter(|&v| v <= most && head_dim.is_multiple_of(v) && head_dim / v <= PLANE && PLANE.is_multiple_of(head_dim / v))
        .collect();
    fits.iter().copied().find(|&v| group * v <= ACCUMULATOR_REGISTERS).or(fits.first().copied())
}

/// The paged decode attention as a backend operation (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait PagedDecodeOps: Backend {
    /// `q [rows, heads, head_dim]`, pools `k`/`v [slots, kv_heads, head_dim]`, `table [rows,
    /// max_blocks]` (each row's blocks, padded), `lens [rows]` (keys each row sees: its query
    /// sits at `len - 1`), `window` (0: none), `passes` (score passes a plane makes over its
    /// tile, see [`decode_passes`]; 0: that choice): `[rows, heads, head_dim]`.
    #[fusion(dtype = q, shape = q)]
    #[allow(clippy::too_many_arguments)]
    fn paged_decode_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        table: IntTensor<Self>,
        lens: IntTensor<Self>,
        scale: f32,
        block_tokens: usize,
        window: usize,
        passes: usize,
    ) -> FloatTensor<Self>;

    /// Prefill chunks' attention in one launch: `q [tokens, heads, head_dim]` (every chunk's
    /// query tokens, in order), pools `k`/`v`, `table [sequences, max_blocks]` (each chunk's
    /// blocks, padded), `seqs [tokens]` (each token's row of the table), `lens [tokens]` (keys
    /// each token sees: its position + 1, causal), `window` (0: none): `[tokens, heads,
    /// head_dim]`.
    #[fusion(dtype = q, shape = q)]
    #[allow(clippy::too_many_arguments)]
    fn paged_prefill_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        table: IntTensor<Self>,
        seqs: IntTensor<Self>,
        lens: IntTensor<Self>,
        scale: f32,
        block_tokens: usize,
        window: usize,
    ) -> FloatTensor<Self>;

    /// [`Self::paged_decode_attention`] over coded pools: codes `k`/`v [slots, kv_heads,
    /// head_dim]` (i8: integers, or with `fp8` E4M3 bytes) and their scales `k_scales`/`v_scales
    /// [slots, kv_heads, 1]` (f32); `codes_via_bits`: how int8 codes become f32 (see
    /// [`DecodeTuning`]).
    #[fusion(dtype = q, shape = q)]
    #[allow(clippy::too_many_arguments)]
    fn paged_decode_attention_coded(
        q: FloatTensor<Self>,
        k: IntTensor<Self>,
        v: IntTensor<Self>,
        k_scales: FloatTensor<Self>,
        v_scales: FloatTensor<Self>,
        table: IntTensor<Self>,
        lens: IntTensor<Self>,
        scale: f32,
        block_tokens: usize,
        window: usize,
        passes: usize,
        fp8: bool,
        codes_via_bits: bool,
    ) -> FloatTensor<Self>;

    /// [`Self::paged_prefill_attention`] over coded pools (as [`Self::paged_decode_attention_coded`]).
    #[fusion(dtype = q, shape = q)]
    #[allow(clippy::too_many_arguments)]
    fn paged_prefill_attention_coded(
        q: FloatTensor<Self>,
        k: IntTensor<Self>,
        v: IntTensor<Self>,
        k_scales: FloatTensor<Self>,
        v_scales: FloatTensor<Self>,
        table: IntTensor<Self>,
        seqs: IntTensor<Self>,
        lens: IntTensor<Self>,
        scale: f32,
        block_tokens: usize,
        window: usize,
        fp8: bool,
        codes_via_bits: bool,
    ) -> FloatTensor<Self>;
}

impl PagedDecodeOps for CubeBackend {
    fn paged_decode_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        table: IntTensor<Self>,
        lens: IntTensor<Self>,
        scale: f32,
        block_tokens: usize,
        window: usize,
        passes: usize,
    ) -> FloatTensor<Self> {
        launch(q, k, v, None, table, None, lens, scale, block_tokens, window, passes, Conversion::Cast)
    }

    fn paged_prefill_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        table: IntTensor<Self>,
        seqs: IntTensor<Self>,
        lens: IntTensor<Self>,
        scale: f32,
        block_tokens: usize,
        window: usize,
    ) -> FloatTensor<Self> {
        launch(q, k, v, None, table, Some(seqs), lens, scale, block_tokens, window, 0, Conversion::Cast)
    }

    fn paged_decode_attention_coded(
        q: FloatTensor<Self>,
        k: IntTensor<Self>,
        v: IntTensor<Self>,
        k_scales: FloatTensor<Self>,
        v_scales: FloatTensor<Self>,
        table: IntTensor<Self>,
        lens: IntTensor<Self>,
        scale: f32,
        block_tokens: usize,
        window: usize,
        passes: usize,
        fp8: bool,
        codes_via_bits: bool,
    ) -> FloatTensor<Self> {
        launch(q, k, v, Some((k_scales, v_scales)), table, None, lens, scale, block_tokens, window, passes, conversion(fp8, codes_via_bits))
    }

    fn paged_prefill_attention_coded(
        q: FloatTensor<Self>,
        k: IntTensor<Self>,
        v: IntTensor<Self>,
        k_scales: FloatTensor<Self>,
        v_scales: FloatTensor<Self>,
        table: IntTensor<Self>,
        seqs: IntTensor<Self>,
        lens: IntTensor<Self>,
        scale: f32,
        block_tokens: usize,
        window: usize,
        fp8: bool,
        codes_via_bits: bool,
    ) -> FloatTensor<Self> {
        launch(q, k, v, Some((k_scales, v_scales)), table, Some(seqs), lens, scale, block_tokens, window, 0, conversion(fp8, codes_via_bits))
    }
}

/// The kernels, apart from burn's names (`Tensor`, `Int` are CubeCL's here).
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::num_traits::Zero;
    use burn_cubecl::cubecl::prelude::*;

    /// One cube per (key head, row, split): the `group` query heads of key head `CUBE_POS_X`
    /// of row `CUBE_POS_Y` over split `CUBE_POS_Z`'s share (`1 / splits`, rounded up) of the
    /// row's visible range. The queries, scaled, sit in shared memory. Planes take tiles of
    /// `passes * 32 / lpk` consecutive keys in turn, every load of a tile issued before any is
    /// used, in two steps:
    /// - scores: groups of `lpk` lanes score one key each (each lane a `1 / lpk` share of the
    ///   head, its vectors side by side with its neighbours', so one load instruction reads
    ///   whole runs of `32 / lpk` keys), `passes` times for the tile; the tile's maximum moves
    ///   the running one once (an online softmax, f32);
    /// - values: lanes hold one vector of the head each, `32 / per_head` keys side by side, and
    ///   add each key's value times its probability, shuffled from the lane that scored it.
    ///
    /// Keys past the range are clamped to the last one (a valid slot) with probability 0, so
    /// no lane branches. `split`: write the unnormalised partial (`part_acc`, and `part_ml`:
    /// running max and sum) for [`merge_splits_kernel`], else the normalised output.
    ///
    /// `plane_rows` (prefill): each plane takes a row of its own, `planes * CUBE_POS_Y + plane`
    /// (a query token of a chunk: consecutive tokens of one sequence share a cube, so the keys
    /// one plane loads are in cache for the others), its table row `seqs[row]`, and walks all
    /// the keys of its split itself: no merge across planes. Planes past the last row compute
    /// the last row again and write nothing.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_kernel<E: Float, K: Numeric, I: Int, N: Size>(
        q: &Tensor<Vector<E, N>>,
        k: &Tensor<Vector<K, N>>,
        v: &Tensor<Vector<K, N>>,
        k_scales: &[f32],
        v_scales: &[f32],
        table: &[I],
        seqs: &[I],
        lens: &[I],
        out: &mut Tensor<Vector<E, N>>,
        part_acc: &mut [Vector<f32, N>],
        part_ml: &mut [f32],
        scale: f32,
        max_blocks: usize,
        block_tokens: usize,
        window: usize,
        splits: usize,
        #[comptime] group: usize,
        #[comptime] planes: usize,
        #[comptime] per_head: usize,
        #[comptime] lpk: usize,
        #[comptime] passes: usize,
        #[comptime] split: bool,
        #[comptime] plane_rows: bool,
        #[comptime] scaled: bool,
        #[comptime] conversion: u32,
        #[define(E, K, I)] _dtypes: [ElemType; 3],
    ) {
        // Keys scored per pass, vectors each scoring lane reads, keys side by side in a value
        // pass.
        let kps = comptime!(32 / lpk);
        let cpl = comptime!(per_head / lpk);
        let kpp = comptime!(32 / per_head);
        // Keys a plane takes at a time, and the value passes over them.
        let tile = comptime!(passes * kps);
        let vpasses = comptime!(tile / kpp);
        let kvh = CUBE_POS_X as usize;
        let part = CUBE_POS_Z as usize;
        let lane = UNIT_POS_X as usize;
        let plane = UNIT_POS_Y as usize;
        let rows = q.shape(0);
        // The cube's row, or (`plane_rows`) the plane's; `r` a row that exists, `trow` its
        // row of the table.
        let mut row = CUBE_POS_Y as usize;
        if plane_rows {
            row = row * planes + plane;
        }
        let live_row = row < rows;
        let r = min(row, rows - 1);
        let mut trow = r;
        if plane_rows {
            trow = usize::cast_from(seqs[r]);
        }
        let heads = q.shape(1);
        let vs = k.vector_size();
        let k_slot = k.stride(0) / vs;
        let k_head = kvh * (k.stride(1) / vs);
        let v_slot = v.stride(0) / vs;
        let v_head = kvh * (v.stride(1) / vs);
        // Coded pools (`scaled`): the scale of slot `s`'s head sits at `s * kv_heads + kvh`.
        let kv_heads = k.shape(1);

        let len = usize::cast_from(lens[r]);
        let mut first = 0usize;
        if window > 0 && len > window {
            first = len - window;
        }
        // This split's share of the row's own visible keys (not of the padded table, so a
        // recorded step padded to a wide table keeps every split busy).
        // `ceil(span / splits)`; the span is at least one key (`len >= 1`, a window >= 1).
        let chunk = (len - first - 1) / splits + 1;
        let start = first + part * chunk;
        let end = min(len, start + chunk);

        // The queries, scaled: the cube's row's, or each plane's own (at `qbase`).
        let qrows = comptime!(if plane_rows { planes } else { 1 });
        let mut qs = Shared::<[Vector<f32, N>]>::new_slice(qrows * group * per_head);
        let qbase = plane * comptime!(if plane_rows { group * per_head } else { 0usize });
        let plane_offset = comptime!(if plane_rows { 0usize } else { 32usize });
        let stride = comptime!(if plane_rows { 32usize } else { 32usize * planes });
        let mut i = lane + plane * plane_offset;
        while i < group * per_head {
            let g = i / per_head;
            qs[qbase + i] = Vector::<f32, N>::cast_from(q[(r * heads + kvh * group + g) * per_head + i % per_head]) * Vector::new(scale);
            i += stride;
        }
        sync_cube();

        let sub = lane % lpk;
        let kin = lane / lpk;
        let half = lane / per_head;
        let chan = lane % per_head;
        let mut best = Array::<f32>::new(group);
        let mut sums = Array::<f32>::new(group);
        let mut acc = Array::<Vector<f32, N>>::new(group);
        #[unroll]
        for g in 0..group {
            best[g] = f32::new(-1.0e30);
            sums[g] = f32::new(0.0);
            acc[g] = Vector::<f32, N>::zero();
        }
        // The tile's probabilities, `[pass][head]`, and the slot of each pass's key.
        let mut probs = Array::<f32>::new(passes * group);
        let mut slots = Array::<u32>::new(passes);
        // Key-split mode: the planes take the cube's tiles in turn; `plane_rows`: each all of its own.
        let mut base = start + plane * comptime!(if plane_rows { 0usize } else { tile });
        let step = comptime!(if plane_rows { tile } else { planes * tile });
        while base < end {
            // Every load of a pass is issued before any is used: the tile's table entries, then
            // all its keys (`passes * cpl` vectors a lane), then, after the scores, all its values
            // (`vpasses` vectors a lane), so each lane has its whole share of the tile in
            // flight at once.
            #[unroll]
            for s in 0..passes {
                let at = min(base + s * kps + kin, end - 1);
                slots[s] = u32::cast_from(table[trow * max_blocks + at / block_tokens]) * u32::cast_from(block_tokens) + u32::cast_from(at % block_tokens);
            }
            let mut keys = Array::<Vector<K, N>>::new(passes * cpl);
            let mut key_scales = Array::<f32>::new(passes);
            #[unroll]
            for s in 0..passes {
                #[unroll]
                for j in 0..cpl {
                    keys[s * cpl + j] = k[usize::cast_from(slots[s]) * k_slot + k_head + j * lpk + sub];
                }
                if scaled {
                    key_scales[s] = k_scales[usize::cast_from(slots[s]) * kv_heads + kvh];
                }
            }
            let mut top = Array::<f32>::new(group);
            #[unroll]
            for g in 0..group {
                top[g] = best[g];
            }
            #[unroll]
            for s in 0..passes {
                let mut dots = Array::<f32>::new(group);
                #[unroll]
                for g in 0..group {
                    dots[g] = f32::new(0.0);
                }
                #[unroll]
                for j in 0..cpl {
                    let kv = to_f32(keys[s * cpl + j], conversion);
                    #[unroll]
                    for g in 0..group {
                        dots[g] += Vector::vector_sum(qs[qbase + g * per_head + j * lpk + sub] * kv);
                    }
                }
                let live = base + s * kps + kin < end;
                #[unroll]
                for g in 0..group {
                    let mut d = dots[g];
                    if comptime!(lpk > 1) {
                        d += plane_shuffle_xor(d, 1u32);
                    }
                    if comptime!(lpk > 2) {
                        d += plane_shuffle_xor(d, 2u32);
                    }
                    if scaled {
                        d *= key_scales[s];
                    }
                    if !live {
                        d = f32::new(-1.0e30);
                    }
                    probs[s * group + g] = d;
                    top[g] = max(top[g], d);
                }
            }
            // Key `i * kpp + half` of the tile, scored in pass `i * kpp / kps` by lane `src`.
            let mut values = Array::<Vector<K, N>>::new(vpasses);
            let mut value_scales = Array::<f32>::new(vpasses);
            #[unroll]
            for i in 0..vpasses {
                let src = u32::cast_from(((i * kpp + half) % kps) * lpk);
                let slot = usize::cast_from(plane_shuffle(slots[i * kpp / kps], src));
                values[i] = v[slot * v_slot + v_head + chan];
                if scaled {
                    value_scales[i] = v_scales[slot * kv_heads + kvh];
                }
            }
            #[unroll]
            for g in 0..group {
                let t = plane_max(top[g]);
                let carry = (best[g] - t).exp();
                let mut local = f32::new(0.0);
                #[unroll]
                for s in 0..passes {
                    let e = (probs[s * group + g] - t).exp();
                    probs[s * group + g] = e;
                    local += e;
                }
                // Each key's probability sits in all `lpk` lanes that scored it: count it once.
                if sub != 0 {
                    local = f32::new(0.0);
                }
                sums[g] = sums[g] * carry + local;
                acc[g] *= Vector::new(carry);
                best[g] = t;
            }
            #[unroll]
            for i in 0..vpasses {
                let src = u32::cast_from(((i * kpp + half) % kps) * lpk);
                let mut value = to_f32(values[i], conversion);
                if scaled {
                    value *= Vector::new(value_scales[i]);
                }
                #[unroll]
                for g in 0..group {
                    let p = plane_shuffle(probs[i * kpp / kps * group + g], src);
                    acc[g] += value * Vector::new(p);
                }
            }
            base += step;
        }

        if plane_rows {
            #[unroll]
            for g in 0..group {
                let a = fold_keys(acc[g], per_head);
                let total = plane_sum(sums[g]);
                let h = kvh * group + g;
                if split {
                    let at_part = (part * rows + row) * heads + h;
                    if live_row && lane < per_head {
                        part_acc[at_part * per_head + lane] = a;
                    }
                    if live_row && lane == 0 {
                        part_ml[2 * at_part] = best[g];
                        part_ml[2 * at_part + 1] = total;
                    }
                } else if live_row && lane < per_head {
                    out[(row * heads + h) * per_head + lane] = Vector::cast_from(a / Vector::new(max(total, f32::new(1.0e-30))));
                }
            }
        } else {
            // Key-split mode: the planes' running maxima, sums and accumulators merged through
            // shared memory, each plane finishing heads `plane, plane + planes, ...`.
            let mut bests = Shared::<[f32]>::new_slice(planes * group);
            let mut totals = Shared::<[f32]>::new_slice(planes * group);
            let mut accs = Shared::<[Vector<f32, N>]>::new_slice(planes * group * per_head);
            #[unroll]
            for g in 0..group {
                // The keys side by side in the value passes: onto the first `per_head` lanes.
                let a = fold_keys(acc[g], per_head);
                let total = plane_sum(sums[g]);
                if lane == 0 {
                    bests[plane * group + g] = best[g];
                    totals[plane * group + g] = total;
                }
                if lane < per_head {
                    accs[(plane * group + g) * per_head + lane] = a;
                }
            }
            sync_cube();
            // Plane p merges heads p, p + planes, ...
            let mut g = plane;
            while g < group {
                let mut top = bests[g];
                for p in 1usize..planes {
                    top = max(top, bests[p * group + g]);
                }
                let mut sum = f32::new(0.0);
                let mut merged = Vector::<f32, N>::zero();
                for p in 0usize..planes {
                    let w = (bests[p * group + g] - top).exp();
                    sum += totals[p * group + g] * w;
                    merged += accs[(p * group + g) * per_head + chan] * Vector::new(w);
                }
                let h = kvh * group + g;
                if split {
                    let at_part = (part * rows + row) * heads + h;
                    if lane < per_head {
                        part_acc[at_part * per_head + lane] = merged;
                    }
                    if lane == 0 {
                        part_ml[2 * at_part] = top;
                        part_ml[2 * at_part + 1] = sum;
                    }
                } else if lane < per_head {
                    out[(row * heads + h) * per_head + lane] = Vector::cast_from(merged / Vector::new(max(sum, f32::new(1.0e-30))));
                }
                g += planes;
            }
        }
    }

    /// A vector of keys or values as f32, by [`super::Conversion`] (as a number): `0` converted
    /// (dense values, int8 codes); `1` int8 codes through their bits, `float(c) = bits(0x4B40_0000
    /// + c) - 1.5 · 2^23` (exact for |c| < 2^22: 1.5 · 2^23's unit in the last place is 1), an
    /// integer and a float add where a conversion instruction runs at an eighth of the FMA
    /// rate; `2` E4M3 bytes: sign, exponent and mantissa moved into an f32's places (`(b & 0x7F)
    /// << 20`, `(b & 0x80) << 24`) and scaled by `2^(127 - 7)`, exact (E4M3's subnormals are
    /// then f32 subnormals: flushed to zero where the compiler flushes them, a change of at most
    /// 2^-6 of a code unit, 448 being the largest).
    #[cube]
    fn to_f32<K: Numeric, N: Size>(v: Vector<K, N>, #[comptime] conversion: u32) -> Vector<f32, N> {
        if comptime!(conversion == 1) {
            let bits = Vector::<i32, N>::cast_from(v) + Vector::new(0x4B40_0000i32);
            Vector::<f32, N>::reinterpret(bits) - Vector::new(f32::new(12_582_912.0))
        } else if comptime!(conversion == 2) {
            // The byte sign-extended (codes sit in i8s): the masks take its 8 bits.
            let b = Vector::<u32, N>::cast_from(v);
            let bits = ((b & Vector::new(0x7Fu32)) << Vector::new(20u32)) | ((b & Vector::new(0x80u32)) << Vector::new(24u32));
            let two_120 = comptime!(f32::from_bits(0x7B80_0000));
            Vector::<f32, N>::reinterpret(bits) * Vector::new(f32::new(two_120))
        } else {
            Vector::<f32, N>::cast_from(v)
        }
    }

    /// The sum of `a` over the lanes whose value passes held other keys of the same channels
    /// (`32 / per_head` keys side by side): onto the first `per_head` lanes.
    #[cube]
    fn fold_keys<N: Size>(a: Vector<f32, N>, #[comptime] per_head: usize) -> Vector<f32, N> {
        let mut a = a;
        if comptime!(per_head <= 16) {
            a += plane_shuffle_xor(a, 16u32);
        }
        if comptime!(per_head <= 8) {
            a += plane_shuffle_xor(a, 8u32);
        }
        if comptime!(per_head <= 4) {
            a += plane_shuffle_xor(a, 4u32);
        }
        if comptime!(per_head <= 2) {
            a += plane_shuffle_xor(a, 2u32);
        }
        if comptime!(per_head <= 1) {
            a += plane_shuffle_xor(a, 1u32);
        }
        a
    }

    /// One cube per (query head, row): the `splits` partial results of
    /// [`paged_decode_kernel`] rescaled to their common maximum and normalised.
    #[cube(launch_unchecked)]
    pub fn merge_splits_kernel<E: Float, N: Size>(
        part_acc: &[Vector<f32, N>],
        part_ml: &[f32],
        out: &mut Tensor<Vector<E, N>>,
        splits: usize,
        #[define(E)] _dtype: ElemType,
    ) {
        let h = CUBE_POS_X as usize;
        let row = CUBE_POS_Y as usize;
        let lane = UNIT_POS_X as usize;
        let rows = out.shape(0);
        let heads = out.shape(1);
        let per_head = out.shape(2) / out.vector_size();
        if lane < per_head {
            let mut top = f32::new(-1.0e30);
            for s in 0..splits {
                top = max(top, part_ml[2 * ((s * rows + row) * heads + h)]);
            }
            let mut sum = f32::new(0.0);
            let mut merged = Vector::<f32, N>::zero();
            for s in 0..splits {
                let i = (s * rows + row) * heads + h;
                let w = (part_ml[2 * i] - top).exp();
                sum += part_ml[2 * i + 1] * w;
                merged += part_acc[i * per_head + lane] * Vector::new(w);
            }
            out[(row * heads + h) * per_head + lane] = Vector::cast_from(merged / Vector::new(max(sum, f32::new(1.0e-30))));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn launch(q: CubeTensor, k: CubeTensor, v: CubeTensor, scales: Option<(CubeTensor, CubeTensor)>, table: CubeTensor, seqs: Option<CubeTensor>, lens: CubeTensor, scale: f32, block_tokens: usize, window: usize, passes: usize, conversion: Conversion) -> CubeTensor {
    let q = into_contiguous(q);
    let (k, v) = (last_axis_contiguous(k), last_axis_contiguous(v));
    // Coded pools' scales `[slots, kv_heads, 1]`, read at `slot * kv_heads + head`; dense pools
    // read none (a one-value buffer stands in).
    let scaled = scales.is_some();
    let (k_scales, v_scales) = match scales {
        Some((ks, vs)) => (into_contiguous(ks), into_contiguous(vs)),
        None => {
            let none = empty_device_contiguous_dtype(q.client.clone(), q.device.clone(), [1].into(), DType::F32);
            (none.clone(), none)
        }
    };
    assert_eq!(k.dtype, v.dtype, "paged attention: keys and values differ in dtype");
    let kv_dtype = k.dtype;
    let (table, lens) = (into_contiguous(table), into_contiguous(lens));
    // Prefill (`seqs`, each row's row of the table): a plane a row; decode: a cube a row, its
    // planes splitting the keys (the kernel reads no `seqs` then: the table stands in).
    let plane_rows = seqs.is_some();
    let seqs = seqs.map_or_else(|| table.clone(), into_contiguous);
    let shape = q.meta.shape().clone();
    let (rows, heads, head_dim) = (shape[0], shape[1], shape[2]);
    let kv_heads = k.meta.shape()[1];
    let group = heads / kv_heads;
    let max_blocks = table.meta.shape()[1];
    let width = max_blocks * block_tokens;
    let dtype = q.dtype;
    let int_dtype = table.dtype;
    let vector = decode_vector(head_dim, group, dtype).unwrap_or(1);
    let per_head = head_dim / vector;
    let lpk = LANES_PER_KEY.min(per_head);
    // A power of two from 1 to `lpk` (`lpk` is one), so the tile splits into whole passes.
    let passes = if passes == 0 { decode_passes(group, lpk) } else { 1 << passes.min(lpk).ilog2() };
    let row_cubes = if plane_rows { rows.div_ceil(PLANES) } else { rows };
    let splits = decode_splits(row_cubes, kv_heads, width);
    let out = empty_device_contiguous_dtype(q.client.clone(), q.device.clone(), shape.clone(), dtype);
    let split = splits > 1;
    let part_len = if split { splits * rows * heads } else { 1 };
    let part_acc = empty_device_contiguous_dtype(q.client.clone(), q.device.clone(), [part_len * if split { head_dim } else { vector }].into(), DType::F32);
    let part_ml = empty_device_contiguous_dtype(q.client.clone(), q.device.clone(), [2 * part_len].into(), DType::F32);
    let client = out.client.clone();
    // SAFETY: the grid is `kv_heads x row_cubes x splits`; coded pools' scales are read at `slot *
    // kv_heads + kvh` of a slot the keys are read at (`[slots, kv_heads, 1]`, contiguous),
    // dense pools read none; a plane past the last row (prefill)
    // reads the last row and writes nothing; heads `kvh * group + g < heads`; lanes read at
    // most the head's last vector; a row reads keys below its `len`, which the engine keeps
    // within the blocks its table row names (`len <= max_blocks * block_tokens`, the table
    // padded with the pool's scratch block; `seqs` entries are rows of the table), and every
    // table entry is a block of the pool; partial results are indexed below `splits * rows *
    // heads` (times the head's vectors).
    unsafe {
        device::paged_decode_kernel::launch_unchecked(
            &client,
            CubeCount::Static(kv_heads as u32, row_cubes as u32, splits as u32),
            CubeDim::new_2d(PLANE as u32, PLANES as u32),
            vector,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            k_scales.into_buffer_arg(),
            v_scales.into_buffer_arg(),
            table.into_buffer_arg(),
            seqs.into_buffer_arg(),
            lens.into_buffer_arg(),
            out.clone().into_tensor_arg(),
            part_acc.clone().into_buffer_arg(),
            part_ml.clone().into_buffer_arg(),
            scale,
            max_blocks,
            block_tokens,
            window,
            splits,
            group,
            PLANES,
            per_head,
            lpk,
            passes,
            split,
            plane_rows,
            scaled,
            conversion as u32,
            [dtype_to_storage_type(dtype), dtype_to_storage_type(kv_dtype), dtype_to_storage_type(int_dtype)],
        )
    };
    if split {
        // SAFETY: the grid is `heads x rows`; the partials were written for every (split, row,
        // head) by the launch above, on the same stream.
        unsafe {
            device::merge_splits_kernel::launch_unchecked(
                &client,
                CubeCount::Static(heads as u32, rows as u32, 1),
                CubeDim::new_1d(PLANE as u32),
                vector,
                part_acc.into_buffer_arg(),
                part_ml.into_buffer_arg(),
                out.clone().into_tensor_arg(),
                splits,
                dtype_to_storage_type(dtype),
            )
        };
    }
    out
}

/// Whether the decode kernel can run for heads of `head_dim` channels in `dtype` on `device`
/// (a CubeCL device, a head that fits one vector per lane, and query heads a whole multiple of
/// key heads).
pub fn decode_kernel_applies(heads: usize, kv_heads: usize, head_dim: usize, dtype: DType, device: &Device) -> bool {
    is_cubecl(device) && kv_heads > 0 && heads.is_multiple_of(kv_heads) && decode_vector(head_dim, heads / kv_heads.max(1), dtype).is_some()
}

/// How int8 codes become f32 in the attention kernel: through their bits (`true`) or by a
/// conversion instruction (`false`); both exact. Through the bits the int8 kernel ran as fast as
/// the bf16 one: at 256 rows 350 µs instead of 588 (bf16 325), at one row over 3,000 keys 20.9
/// µs instead of 23.8 (bf16 20.5; H100, `kernel_check attention`, 2026-12-06).
pub const INT8_CODES_VIA_BITS: bool = true;

/// How the attention kernel turns what the pools hold into f32 (the kernel's `to_f32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conversion {
    /// A conversion instruction: dense values, int8 codes.
    Cast = 0,
    /// Int8 codes through their bits.
    Int8Bits = 1,
    /// E4M3 bytes through their bits.
    Fp8Bits = 2,
}

fn conversion(fp8: bool, codes_via_bits: bool) -> Conversion {
    match (fp8, codes_via_bits) {
        (true, _) => Conversion::Fp8Bits,
        (false, true) => Conversion::Int8Bits,
        (false, false) => Conversion::Cast,
    }
}

/// The decode kernel's choices that do not change its result, for measuring them
/// (`kernels/examples/kernel_check.rs`); the default is what the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeTuning {
    /// Score passes a plane makes over its tile (`None`: [`decode_passes`]; else rounded down
    /// to a power of two of at most the lanes a key).
    pub passes: Option<usize>,
    /// How int8 codes become f32 (see [`INT8_CODES_VIA_BITS`]).
    pub codes_via_bits: bool,
}

impl Default for DecodeTuning {
    fn default() -> Self {
        Self { passes: None, codes_via_bits: INT8_CODES_VIA_BITS }
    }
}

/// Decode rows' attention by the kernel: `q [rows, heads, d]` over the pools through `table
/// [rows, max_blocks]` and `lens [rows]` (see [`PagedDecodeOps::paged_decode_attention`]);
/// `None` where the kernel does not apply ([`decode_kernel_applies`]).
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_attention(q: Tensor<3>, k: &KvPages, v: &KvPages, table: &Tensor<2, Int>, lens: &Tensor<1, Int>, block_tokens: usize, window: Option<usize>, scale: f64) -> Option<Tensor<3>> {
    paged_decode_attention_tuned(q, k, v, table, lens, block_tokens, window, scale, DecodeTuning::default())
}

/// [`paged_decode_attention`] with the kernel's choices made by `tuning`.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_attention_tuned(q: Tensor<3>, k: &KvPages, v: &KvPages, table: &Tensor<2, Int>, lens: &Tensor<1, Int>, block_tokens: usize, window: Option<usize>, scale: f64, tuning: DecodeTuning) -> Option<Tensor<3>> {
    let rows = q.dims()[0];
    if !kernel_takes(&q, k, v) || table.dims()[0] != rows || lens.dims()[0] != rows {
        return None;
    }
    let (scale, window, passes) = (scale as f32, window.unwrap_or(0), tuning.passes.map_or(0, |p| p.max(1)));
    let (table, lens) = (table.clone().into_dispatch(), lens.clone().into_dispatch());
    let out = match (k, v) {
        (KvPages::Dense(k), KvPages::Dense(v)) => {
            Dispatch::paged_decode_attention(q.into_dispatch(), k.clone().into_dispatch(), v.clone().into_dispatch(), table, lens, scale, block_tokens, window, passes)
        }
        (KvPages::Coded { format, codes: k, scales: ks }, KvPages::Coded { codes: v, scales: vs, .. }) => Dispatch::paged_decode_attention_coded(
            q.into_dispatch(),
            k.clone().into_dispatch(),
            v.clone().into_dispatch(),
            ks.clone().into_dispatch(),
            vs.clone().into_dispatch(),
            table,
            lens,
            scale,
            block_tokens,
            window,
            passes,
            *format == KvCodes::Fp8,
            tuning.codes_via_bits,
        ),
        _ => return None,
    };
    Some(Tensor::<3>::from_dispatch(out))
}

/// Whether the decode/prefill kernel reads these pools for `q [rows, heads, d]`: the kernel
/// applies ([`decode_kernel_applies`]), keys and values are stored alike, and dense pools
/// hold `q`'s dtype.
fn kernel_takes(q: &Tensor<3>, k: &KvPages, v: &KvPages) -> bool {
    let [_, heads, d] = q.dims();
    let stored_alike = match (k, v) {
        (KvPages::Dense(k), KvPages::Dense(v)) => k.dtype() == q.dtype() && v.dtype() == q.dtype(),
        (KvPages::Coded { format: fk, .. }, KvPages::Coded { format: fv, .. }) => fk == fv,
        _ => false,
    };
    stored_alike && k.dims() == v.dims() && k.dims()[2] == d && decode_kernel_applies(heads, k.dims()[1], d, q.dtype(), &q.device())
}

/// The prefill kernel's time a (query, key) pair and query head, in picoseconds: ~60-80 on an
/// H100 in bf16 (`kernel_check attention`, 2026-12-06: 16 x 512 tokens 5.4 ms, one 2,048-token
/// prompt 3.9 ms a layer). It walks keys with f32 multiply-adds, no tensor cores.
const PREFILL_KERNEL_PS: usize = 70;
/// The reference's time a pair of its rectangular products ([`reference_pairs`]) and query
/// head: ~8-20 ps (cuBLAS; the same runs, measured when every piece took its whole context:
/// 2.7 ms and 1.1 ms).
const PREFILL_REFERENCE_PS: usize = 15;
/// The reference's host-side cost a layer and run of chunks of one shape (gathers, masks, two
/// products and a softmax, each a launch): the time to first token of a 20-token prompt fell
/// from 37.5 to 24.9 ms with the kernel (36 layers, H100, 2026-12-06), ~350 µs a layer.
const PREFILL_REFERENCE_HOST_PS: usize = 300_000_000;

/// Runs of consecutive spans of one shape (queries and context): what the reference takes as
/// one batch.
fn same_shape_runs(spans: &[Span]) -> std::slice::ChunkBy<'_, Span, impl FnMut(&Span, &Span) -> bool> {
    spans.chunk_by(|a, b| a.queries == b.queries && a.context == b.context)
}

/// The (query, key) pairs the reference's rectangular products take for `span`'s chunk: each
/// piece of its query rows ([`reference_pieces`]) against the keys of [`piece_keys`].
fn reference_pairs(span: &Span, heads: usize, window: Option<usize>) -> usize {
    let (queries, context, cut) = (span.queries, span.context, causal_piece_rows());
    let (_, rows) = reference_pieces(1, queries, context, heads, MAX_SCORES, cut);
    (0..queries)
        .step_by(rows.max(1))
        .map(|r| {
            let n = rows.min(queries - r);
            let keys = piece_keys(queries, context, r, n, window, cut);
            n * keys.len()
        })
        .sum()
}

/// Keys seen in all by the query tokens of `span` (the last `queries` of `context`, causal),
/// each at most `window` of them.
fn causal_pairs(span: &Span, window: Option<usize>) -> usize {
    // Σ min(l, w) for l in a..=c: the part below the window, then w per length past it.
    let (a, c) = (span.context + 1 - span.queries, span.context);
    let w = window.unwrap_or(usize::MAX);
    let below = if a > w { 0 } else { (a + c.min(w)) * (c.min(w) + 1 - a) / 2 };
    let past = c.saturating_sub(w.max(a - 1));
    below + past * w.min(c)
}

/// Whether the prefill kernel beats the reference on a step's chunks for `heads` query heads
/// (a cost model from the H100 measurements above): the kernel wins on few or short chunks
/// (its one launch against the reference's launches per run of chunks of one shape) and
/// under a window (it walks only the keys the window leaves; the reference's products take
/// them all); the reference, on long chunks, where cuBLAS's tensor cores outrun the
/// kernel's multiply-adds.
pub fn prefill_kernel_pays(spans: &[Span], heads: usize, window: Option<usize>) -> bool {
    let causal: usize = spans.iter().map(|s| causal_pairs(s, window)).sum();
    let dense: usize = spans.iter().map(|s| reference_pairs(s, heads, window)).sum();
    let runs = same_shape_runs(spans).count();
    let kernel = causal.saturating_mul(heads).saturating_mul(PREFILL_KERNEL_PS);
    let reference = dense.saturating_mul(heads).saturating_mul(PREFILL_REFERENCE_PS).saturating_add(runs.saturating_mul(PREFILL_REFERENCE_HOST_PS));
    kernel < reference
}

/// Prefill chunks' attention by the kernel, all chunks in one launch: `q [tokens, heads, d]`
/// (the chunks' query tokens in order) over the pools through `table [chunks, max_blocks]`,
/// `seqs [tokens]` (each token's chunk) and `lens [tokens]` (the keys each token sees,
/// causally: see [`prefill_rows`]); `None` where the kernel does not apply
/// ([`decode_kernel_applies`]).
#[allow(clippy::too_many_arguments)]
pub fn paged_prefill_attention(q: Tensor<3>, k: &KvPages, v: &KvPages, table: &Tensor<2, Int>, seqs: &Tensor<1, Int>, lens: &Tensor<1, Int>, block_tokens: usize, window: Option<usize>, scale: f64) -> Option<Tensor<3>> {
    let tokens = q.dims()[0];
    if !kernel_takes(&q, k, v) || seqs.dims()[0] != tokens || lens.dims()[0] != tokens {
        return None;
    }
    let (scale, window) = (scale as f32, window.unwrap_or(0));
    let (table, seqs, lens) = (table.clone().into_dispatch(), seqs.clone().into_dispatch(), lens.clone().into_dispatch());
    let out = match (k, v) {
        (KvPages::Dense(k), KvPages::Dense(v)) => {
            Dispatch::paged_prefill_attention(q.into_dispatch(), k.clone().into_dispatch(), v.clone().into_dispatch(), table, seqs, lens, scale, block_tokens, window)
        }
        (KvPages::Coded { format, codes: k, scales: ks }, KvPages::Coded { codes: v, scales: vs, .. }) => Dispatch::paged_prefill_attention_coded(
            q.into_dispatch(),
            k.clone().into_dispatch(),
            v.clone().into_dispatch(),
            ks.clone().into_dispatch(),
            vs.clone().into_dispatch(),
            table,
            seqs,
            lens,
            scale,
            block_tokens,
            window,
            *format == KvCodes::Fp8,
            INT8_CODES_VIA_BITS,
        ),
        _ => return None,
    };
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

/// What attention reads for one step, shared by every layer.
pub struct PagedLayout {
    block_tokens: usize,
    /// The decode rows (`queries == 1`), if any.
    decode: Option<DecodeRows>,
    /// The prefill chunks' spans, in the step's order.
    prefill: Vec<Span>,
    windows: Vec<Option<usize>>,
    device: Device,
    /// The prefill kernel's inputs, made by the first layer that runs it.
    prefill_rows: OnceCell<PrefillRows>,
    /// The reference's inputs for the prefill chunks (consecutive ones of one shape together),
    /// made by the first layer that runs it.
    chunks: OnceCell<Vec<Chunk>>,
}

/// The prefill kernel's view of a step's chunks (see [`prefill_rows`]).
struct PrefillRows {
    table: Tensor<2, Int>,
    seqs: Tensor<1, Int>,
    lens: Tensor<1, Int>,
}

/// The prefill kernel's inputs for `spans` (prefill chunks, in order): the block table
/// `[spans * max_blocks]` (each chunk's blocks, padded with block 0) and `max_blocks`, and per
/// query token its row of the table and the keys it sees (its position + 1: the chunk's
/// queries are its last `queries` tokens of `context`).
pub fn prefill_rows(spans: &[Span], block_tokens: usize) -> (Vec<i64>, usize, Vec<i64>, Vec<i64>) {
    let (table, max_blocks) = padded_table(spans, block_tokens);
    let seqs = spans.iter().enumerate().flat_map(|(i, s)| std::iter::repeat_n(i as i64, s.queries)).collect();
    let lens = spans.iter().flat_map(|s| (s.context - s.queries + 1..=s.context).map(|l| l as i64)).collect();
    (table, max_blocks, seqs, lens)
}

/// The block table of `spans`, `[spans * max_blocks]` (each span's blocks for its context,
/// padded with block 0), and `max_blocks`.
fn padded_table(spans: &[Span], block_tokens: usize) -> (Vec<i64>, usize) {
    let max_blocks = spans.iter().map(|s| s.context.div_ceil(block_tokens)).max().unwrap_or(1).max(1);
    let table = spans
        .iter()
        .flat_map(|s| (0..max_blocks).map(|b| s.blocks.get(b).map_or(0, |&id| i64::from(id))))
        .collect();
    (table, max_blocks)
}

/// The decode rows of a step: each row's blocks, `table [rows, max_blocks]` (padded), and the
/// keys it sees, `lens [rows]` (its query sits at `len - 1`; a window hides what lies
/// further back).
pub struct DecodeRows {
    pub table: Tensor<2, Int>,
    pub lens: Tensor<1, Int>,
    /// The reference's inputs ([`Self::gathered`]), made by the first layer that needs them
    /// and kept for the step's other layers: the slots once, a mask per window.
    reference: RefCell<Option<ReferenceInputs>>,
    /// The table and lengths on the host for [`cpu_decode_attention`], read by the first
    /// layer: (table `[rows * max_blocks]`, lengths, max_blocks).
    host: RefCell<Option<HostTable>>,
}

/// Decode rows' block table `[rows * max_blocks]`, lengths and `max_blocks`, on the host.
type HostTable = (Vec<usize>, Vec<usize>, usize);

/// A step's gathered slots `[rows * width]` and, per window, the decode rows' mask.
type ReferenceInputs = (Tensor<1, Int>, Vec<(Option<usize>, Tensor<5>)>);

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
        let decode = (decode_rows > 0).then(|| {
            let (table, max_blocks) = padded_table(decode, block_tokens);
            DecodeRows::new(
                Tensor::<2, Int>::from_data(TensorData::new(table, [decode_rows, max_blocks]), device),
                ints(decode.iter().map(|s| s.context as i64).collect(), device),
            )
        });
        Self {
            block_tokens,
            decode,
            prefill: spans[decode_rows..].to_vec(),
            windows: windows.to_vec(),
            device: device.clone(),
            prefill_rows: OnceCell::new(),
            chunks: OnceCell::new(),
        }
    }

    /// Decode rows only, from tensors already on the device (what a recorded decode step
    /// reads, refreshed in place between replays).
    pub fn decode(block_tokens: usize, rows: DecodeRows) -> Self {
        let device = rows.table.device();
        Self {
            block_tokens,
            decode: Some(rows),
            prefill: Vec::new(),
            windows: Vec::new(),
            device,
            prefill_rows: OnceCell::new(),
            chunks: OnceCell::new(),
        }
    }

    fn prefill_rows(&self) -> &PrefillRows {
        self.prefill_rows.get_or_init(|| {
            let (table, max_blocks, seqs, lens) = prefill_rows(&self.prefill, self.block_tokens);
            let n = self.prefill.len();
            PrefillRows {
                table: Tensor::<2, Int>::from_data(TensorData::new(table, [n, max_blocks]), &self.device),
                seqs: ints(seqs, &self.device),
                lens: ints(lens, &self.device),
            }
        })
    }

    fn chunks(&self) -> &[Chunk] {
        self.chunks.get_or_init(|| {
            let (block_tokens, windows, device) = (self.block_tokens, &self.windows, &self.device);
            let spans = &self.prefill;
            let gather = |s: &Span, width: usize| -> Vec<i64> {
                (0..width).map(|i| if i < s.context { slot_of(&s.blocks, block_tokens, i) as i64 } else { 0 }).collect()
            };
            let f32_tensor = |values: Vec<f32>, dims: [usize; 5]| Tensor::<5>::from_data(TensorData::new(values, dims), (device, DType::F32));
            // Consecutive chunks of one shape run as one batch (one attention per group, not per
            // chunk: a step admitting many cache hits has many short chunks of one shape).
            same_shape_runs(spans)
                .map(|group| {
                    let (count, queries, context) = (group.len(), group[0].queries, group[0].context);
                    Chunk {
                        count,
                        queries,
                        context,
                        slots: ints(group.iter().flat_map(|s| gather(s, context)).collect(), device),
                        masks: windows
                            .iter()
                            .map(|&w| {
                                // One sequence's mask, built and uploaded once and repeated on the
                                // device (sixteen 512-token prompts: 1 MB from the host instead of 16 MB).
                                let one = f32_tensor(mask_values(queries, context, context, w), [1, 1, 1, queries, context]);
                                (w, if count == 1 { one } else { one.repeat_dim(0, count) })
                            })
                            .collect(),
                    }
                })
                .collect()
        })
    }
}

impl DecodeRows {
    pub fn new(table: Tensor<2, Int>, lens: Tensor<1, Int>) -> Self {
        Self { table, lens, reference: RefCell::new(None), host: RefCell::new(None) }
    }

    /// The reference's inputs, computed on the device from the table and lengths once per
    /// step (and window): the slot of each of a row's `max_blocks * block_tokens` keys `[rows
    /// * width]`, and the additive mask `[rows, 1, 1, 1, width]` hiding keys at or past its
    /// length and, with a window, those the window leaves behind (see [`mask_values`]).
    fn gathered(&self, block_tokens: usize, window: Option<usize>) -> (Tensor<1, Int>, Tensor<5>, usize) {
        let [rows, max_blocks] = self.table.dims();
        let width = max_blocks * block_tokens;
        let device = self.table.device();
        let bt = block_tokens as i64;
        let keys = || Tensor::<1, Int>::arange(0..width as i64, &device).reshape([1, width]).expand([rows, width]);
        let mut cache = self.reference.borrow_mut();
        let (slots, masks) = cache.get_or_insert_with(|| {
            let keys = keys();
            let slots = self.table.clone().gather(1, keys.clone().div_scalar(bt)).mul_scalar(bt).add(keys.remainder_scalar(bt));
            (slots.reshape([rows * width]), Vec::new())
        });
        if !masks.iter().any(|(w, _)| *w == window) {
            let keys = keys();
            let lens = self.lens.clone().reshape([rows, 1]).expand([rows, width]);
            let mut hidden: Tensor<2, Bool> = keys.clone().greater_equal(lens.clone());
            if let Some(w) = window {
                hidden = hidden.bool_or(keys.add_scalar(w as i64).lower_equal(lens.sub_scalar(1)));
            }
            let mask = Tensor::<2>::zeros([rows, width], (&device, DType::F32)).mask_fill(hidden, MASKED);
            masks.push((window, mask.reshape([rows, 1, 1, 1, width])));
        }
        (slots.clone(), pick(masks, window).clone(), width)
    }
}

fn pick(masks: &[(Option<usize>, Tensor<5>)], window: Option<usize>) -> &Tensor<5> {
    masks
        .iter()
        .find(|(w, _)| *w == window)
        .map(|(_, m)| m)
        .unwrap_or_else(|| panic!("the step's layout was built without window {window:?}"))
}

/// The most attention scores (query rows x keys, over all heads) one prefill launch
/// materialises: 2^26, 128 MiB in bf16. An 8,192-token step of four 2,048-token prompts of
/// Qwen3-4B (32 heads) would otherwise hold 4 x 32 x 2,048² scores, 1 GiB in bf16 per copy,
/// which ran an 80 GB H100 out of memory beside a KV cache sized to 0.9 of what was free.
pub const MAX_SCORES: usize = 1 << 26;

/// How a chunk of `count` sequences, each `queries` rows over `context` keys, is cut so that
/// no launch holds more than `max_scores` scores ([`MAX_SCORES`] in use): (sequences a piece, query rows a piece).
/// Whole sequences while one fits; else one sequence's rows in as few pieces as fit.
pub fn score_pieces(count: usize, queries: usize, context: usize, heads: usize, max_scores: usize) -> (usize, usize) {
    let per_seq = heads * queries * context;
    if per_seq <= max_scores {
        ((max_scores / per_seq.max(1)).clamp(1, count.max(1)), queries)
    } else {
        let rows = (max_scores / (heads * context).max(1)).max(1);
        // Even pieces: as few as the cap allows, of near-equal size.
        let pieces = queries.div_ceil(rows);
        (1, queries.div_ceil(pieces))
    }
}

/// The most query rows a piece of a long prefill chunk takes in the reference
/// ([`reference_pieces`]): each piece multiplies only the keys its rows can see
/// ([`piece_keys`]), so a chunk's causal triangle is computed in steps instead of as its whole
/// square. A 2,048-token prompt in four pieces takes 62.5 % of the square's scores (in two,
/// as [`MAX_SCORES`] alone cut it, 75 %).
pub const CAUSAL_PIECE_ROWS: usize = 512;

/// [`CAUSAL_PIECE_ROWS`], unless `INFERENCE_PIO_CAUSAL_PIECE_ROWS` says otherwise (16 to
/// 65,536 rows; 0: no such cut, every piece over its whole context, as before).
fn causal_piece_rows() -> Option<usize> {
    static ROWS: std::sync::OnceLock<Option<Option<usize>>> = std::sync::OnceLock::new();
    let switch = *ROWS.get_or_init(|| {
        crate::launch::env_number("INFERENCE_PIO_CAUSAL_PIECE_ROWS", |r| r == 0 || (16..=65_536).contains(&r), "0, or a number of rows from 16 to 65536")
            .map(|r| (r > 0).then_some(r))
    });
    switch.unwrap_or(Some(CAUSAL_PIECE_ROWS))
}

/// [`score_pieces`], with a chunk of more query rows than `cut` (in use:
/// [`causal_piece_rows`]) cut into even pieces of at most that many: (sequences a piece, query
/// rows a piece).
fn reference_pieces(count: usize, queries: usize, context: usize, heads: usize, max_scores: usize, cut: Option<usize>) -> (usize, usize) {
    let (seqs, rows) = score_pieces(count, queries, context, heads, max_scores);
    match cut {
        Some(most) if rows > most => (seqs, rows.div_ceil(rows.div_ceil(most))),
        _ => (seqs, rows),
    }
}

/// The keys query rows `first..first + rows` of a chunk (the last `queries` of `context`
/// tokens) can see between them: up to the last row's position (causal) and, with a window,
/// from the first row's oldest key in it. The keys past them are hidden from every row of the
/// piece, so leaving them out of its products changes no row's softmax (their weights are 0).
/// Without the causal cut (`cut` off: see [`causal_piece_rows`]) every piece takes the whole
/// context.
fn piece_keys(queries: usize, context: usize, first: usize, rows: usize, window: Option<usize>, cut: Option<usize>) -> std::ops::Range<usize> {
    if cut.is_none() {
        return 0..context;
    }
    let position = context - queries + first;
    let start = window.map_or(0, |w| (position + 1).saturating_sub(w));
    start..position + rows
}

/// `$name(t, f)`: `f` of float tensor `t`'s memory on the CPU as `$elem` values (contiguous),
/// without a copy; `None` for tensors elsewhere or of another dtype.
macro_rules! with_flex_floats {
    ($name:ident, $elem:ty) => {
        fn $name<R>(t: &Tensor<3>, f: impl FnOnce(&[$elem]) -> Option<R>) -> Option<R> {
            use burn::backend::{BackendTensor, DispatchTensorKind};
            match t.clone().into_dispatch().kind {
                DispatchTensorKind::Flex(BackendTensor::Float(tensor)) => f(tensor.as_slice::<$elem>()?),
                _ => None,
            }
        }
    };
}

with_flex_floats!(with_flex_f32, f32);
with_flex_floats!(with_flex_f16, half::f16);
with_flex_floats!(with_flex_bf16, half::bf16);

/// `f` of an i8 tensor's memory on the CPU (contiguous), without a copy; `None` for other
/// tensors.
fn with_flex_i8<R>(t: &Tensor<3, Int>, f: impl FnOnce(&[i8]) -> Option<R>) -> Option<R> {
    use burn::backend::{BackendTensor, DispatchTensorKind};
    match t.clone().into_dispatch().kind {
        DispatchTensorKind::Flex(BackendTensor::Int(tensor)) => f(tensor.as_slice::<i8>()?),
        _ => None,
    }
}

/// `f` of a pool's memory on the CPU, without a copy: f32, f16 or bf16 pages, or codes and
/// their scales; `None` for pages elsewhere or of other dtypes.
pub(crate) fn with_pool_rows<R>(pages: &KvPages, f: impl FnOnce(PoolRows<'_>) -> Option<R>) -> Option<R> {
    match pages {
        KvPages::Dense(t) => match t.dtype() {
            DType::F16 => with_flex_f16(t, |rows| f(PoolRows::F16(rows))),
            DType::BF16 => with_flex_bf16(t, |rows| f(PoolRows::Bf16(rows))),
            _ => with_flex_f32(t, |rows| f(PoolRows::F32(rows))),
        },
        KvPages::Coded { format, codes, scales } => with_flex_i8(codes, |codes| with_flex_f32(scales, |scales| f(PoolRows::Coded { format: *format, codes, scales }))),
    }
}

/// A pool's memory on the CPU, `[slots, kv_heads, d]`.
#[derive(Clone, Copy)]
pub(crate) enum PoolRows<'a> {
    F32(&'a [f32]),
    /// 16-bit pages of an f32 attention (`kv_cache_dtype = "f16"` on the CPU), widened a row
    /// at a time.
    F16(&'a [half::f16]),
    /// As [`Self::F16`], for `kv_cache_dtype = "bf16"`.
    Bf16(&'a [half::bf16]),
    /// Codes (their bytes, in i8s) of `format`, and one scale per (slot, head).
    Coded { format: KvCodes, codes: &'a [i8], scales: &'a [f32] },
}

impl<'a> PoolRows<'a> {
    /// Values in all (slots × heads × d), and scales (one per slot and head).
    fn lens(&self) -> (usize, Option<usize>) {
        match self {
            Self::F32(rows) => (rows.len(), None),
            Self::F16(rows) => (rows.len(), None),
            Self::Bf16(rows) => (rows.len(), None),
            Self::Coded { codes, scales, .. } => (codes.len(), Some(scales.len())),
        }
    }

    /// The head row at element `at` (a multiple of `buf.len()`) as f32 values, and its scale:
    /// f32 rows as they are (scale 1), others converted into `buf` ([`Self::widen`]).
    #[inline(always)]
    pub(crate) fn row<'b>(&'b self, at: usize, buf: &'b mut [f32]) -> (&'b [f32], f32) {
        let d = buf.len();
        if let Self::F32(rows) = self {
            return (&rows[at..at + d], 1.0);
        }
        self.widen(at, buf);
        (buf, self.scale_at(at, d))
    }

    /// Channels `channels` of the `n` (at most [`KEY_RUN`]) head rows of `d` values from element
    /// `at` (a multiple of `d`), `stride` apart, as f32: f32 pages in place (the rows `stride`
    /// apart from the returned slice's start), other pages converted into `buf` (`channels.len()`
    /// apart); and each row's scale into `scales` (1 but for codes).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run<'b>(&'b self, at: usize, stride: usize, n: usize, d: usize, channels: std::ops::Range<usize>, buf: &'b mut [f32], scales: &mut [f32; KEY_RUN]) -> (&'b [f32], usize) {
        if let Self::F32(rows) = self {
            scales[..n].fill(1.0);
            let end = at + (n - 1) * stride + channels.end;
            return (&rows[at + channels.start..end], stride);
        }
        let w = channels.len();
        for (i, out) in buf.chunks_exact_mut(w).take(n).enumerate() {
            let row = at + i * stride;
            self.widen(row + channels.start, out);
            scales[i] = self.scale_at(row, d);
        }
        (&buf[..n * w], w)
    }

    /// Values `from..from + out.len()` as f32 into `out`, unscaled: f32 copied, halves widened,
    /// codes decoded. One loop per format, each vectorised (bit moves and a product: no table,
    /// no branch).
    #[inline(always)]
    fn widen(&self, from: usize, out: &mut [f32]) {
        let to = from + out.len();
        match self {
            Self::F32(rows) => out.copy_from_slice(&rows[from..to]),
            Self::F16(rows) => out.iter_mut().zip(&rows[from..to]).for_each(|(o, h)| *o = crate::kv_pages::f16_bits_to_f32(h.to_bits())),
            Self::Bf16(rows) => out.iter_mut().zip(&rows[from..to]).for_each(|(o, h)| *o = crate::kv_pages::bf16_bits_to_f32(h.to_bits())),
            Self::Coded { format, codes, .. } => {
                let (out, codes) = (out.iter_mut(), &codes[from..to]);
                match format {
                    KvCodes::Int8 => out.zip(codes).for_each(|(o, &c)| *o = f32::from(c)),
                    KvCodes::Fp8 => out.zip(codes).for_each(|(o, &c)| *o = crate::kv_pages::e4m3_bits_to_f32(c as u8)),
                }
            }
        }
    }

    /// The scale of the head row of `d` values at element `at` (1 but for codes).
    #[inline(always)]
    fn scale_at(&self, at: usize, d: usize) -> f32 {
        match self {
            Self::Coded { scales, .. } => scales[at / d],
            _ => 1.0,
        }
    }

    /// The head row of `d` values at `at`: its first byte and the cache lines it spans.
    #[inline(always)]
    fn row_lines(&self, at: usize, d: usize) -> (*const i8, usize) {
        let (start, bytes): (*const i8, usize) = match self {
            Self::F32(rows) => (rows[at..at + d].as_ptr().cast(), 4 * d),
            Self::F16(rows) => (rows[at..at + d].as_ptr().cast(), 2 * d),
            Self::Bf16(rows) => (rows[at..at + d].as_ptr().cast(), 2 * d),
            Self::Coded { codes, .. } => (codes[at..at + d].as_ptr(), d),
        };
        (start, bytes.div_ceil(64))
    }

    /// Asks for the head row at `at` towards L1.
    #[inline(always)]
    fn prefetch(&self, at: usize, d: usize) {
        let (start, lines) = self.row_lines(at, d);
        for line in 0..lines {
            prefetch_address(start.wrapping_add(64 * line));
        }
    }
}

/// Decode rows' attention on the CPU, read straight from f32 pools `k`/`v [slots, kv_heads,
/// d]` through the rows' block tables: per (row, query head) the scores of the keys the row
/// sees (below its length, within `window`), their softmax in f32, and the weighted sum of
/// the values, over rayon's threads. `None` (the caller takes the gathered reference) off the
/// CPU, for other dtypes, or where a block lies outside the pool.
fn cpu_decode_attention(q: &Tensor<3>, k: &KvPages, v: &KvPages, rows: &DecodeRows, block_tokens: usize, window: Option<usize>, scale: f64) -> Option<Tensor<3>> {
    let device = q.device();
    if is_cubecl(&device) || q.dtype() != DType::F32 {
        return None;
    }
    let [_, heads, d] = q.dims();
    let [slots, kv_heads, dk] = k.dims();
    if dk != d || d > MAX_CPU_HEAD_DIM || v.dims() != k.dims() || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || block_tokens == 0 {
        return None;
    }
    with_pool_rows(k, |keys| with_pool_rows(v, |values| cpu_decode_over(q, keys, values, rows, [slots, kv_heads, d], block_tokens, window, scale)))
}

/// [`cpu_decode_attention`] over the pools' memory.
#[allow(clippy::too_many_arguments)]
fn cpu_decode_over(q: &Tensor<3>, keys: PoolRows<'_>, values: PoolRows<'_>, rows: &DecodeRows, [slots, kv_heads, d]: [usize; 3], block_tokens: usize, window: Option<usize>, scale: f64) -> Option<Tensor<3>> {
    let device = q.device();
    let [n, heads, _] = q.dims();
    let whole = |p: &PoolRows<'_>| {
        let (len, scales) = p.lens();
        len == slots * kv_heads * d && scales.is_none_or(|s| s == slots * kv_heads)
    };
    if !whole(&keys) || !whole(&values) {
        return None;
    }
    let mut host = rows.host.borrow_mut();
    if host.is_none() {
        let ints = |t: Tensor<2, Int>| t.into_data().convert::<i64>().try_into_vec::<i64>().ok();
        let [_, max_blocks] = rows.table.dims();
        let table = ints(rows.table.clone())?;
        let lens = ints(rows.lens.clone().reshape([1, n]))?;
        let to_usize = |v: Vec<i64>| v.into_iter().map(|x| usize::try_from(x).ok()).collect::<Option<Vec<usize>>>();
        *host = Some((to_usize(table)?, to_usize(lens)?, max_blocks));
    }
    let (table, lens, max_blocks) = host.as_ref()?;
    let max_blocks = *max_blocks;
    // Every block a row reads must lie in the pool.
    let pool_blocks = slots / block_tokens;
    let fits = lens.iter().enumerate().all(|(r, &len)| len <= max_blocks * block_tokens && table[r * max_blocks..r * max_blocks + len.div_ceil(block_tokens)].iter().all(|&b| b < pool_blocks));
    if lens.len() != n || table.len() != n * max_blocks || !fits {
        return None;
    }
    let queries = q.clone().into_data().convert::<f32>().try_into_vec::<f32>().ok()?;
    let group = heads / kv_heads;
    // Long rows: in three phases, each key and value read once, its loads asked for well ahead,
    // and every thread busy however few (row, key head) tasks there are (`attend_phased`).
    let threads = rayon::current_num_threads();
    let longest = lens.iter().map(|&len| len - first_key(len, window)).max().unwrap_or(0);
    if threads > 1 && longest >= PHASED_MIN_KEYS && phases_on() {
        let step = PhasedStep { keys, values, queries: &queries, table, lens, max_blocks, heads, kv_heads, d, block_tokens, window, scale: scale as f32 };
        let out = attend_phased(&step, threads);
        return Some(Tensor::<3>::from_data(TensorData::new(out, [n, heads, d]), (&device, DType::F32)));
    }
    let mut out = vec![0f32; n * heads * d];
    use rayon::prelude::*;
    // One task per (row, key head): the group's query heads are side by side in `queries` and
    // `out`, and each key and value is read once for all of them. With too few such tasks to
    // keep every thread busy (one decode row of a model with 3 key heads on 2 threads), one
    // task per query head instead.
    let per_task = if n * kv_heads >= 2 * rayon::current_num_threads() { group } else { 1 };
    let tasks_per_row = heads / per_task;
    out.par_chunks_mut(per_task * d).enumerate().for_each(|(i, o)| {
        let r = i / tasks_per_row;
        let kvh = (i % tasks_per_row) * per_task / group;
        let len = lens[r];
        let task = GroupTask {
            keys,
            values,
            queries: &queries[i * per_task * d..(i + 1) * per_task * d],
            table: &table[r * max_blocks..(r + 1) * max_blocks],
            first: first_key(len, window),
            len,
            block_tokens,
            kv_heads,
            kvh,
            d,
            scale: scale as f32,
        };
        attend_group(&task, o);
    });
    Some(Tensor::<3>::from_data(TensorData::new(out, [n, heads, d]), (&device, DType::F32)))
}

/// The first key a decode row of `len` keys sees within `window`.
fn first_key(len: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| len.saturating_sub(w))
}

/// The shortest row (keys a decode row sees) for which a step takes [`attend_phased`]: below
/// it the one-region tasks cost no more than two more parallel regions a layer (SmolLM2 after
/// 260 prompt tokens and the small Qwen3 after 300: the same speed both ways).
const PHASED_MIN_KEYS: usize = 256;

/// Whether few-task steps take [`attend_phased`] (unless `INFERENCE_PIO_CPU_DECODE_PHASES=0`:
/// the one-region tasks, for side-by-side measurements).
fn phases_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !crate::launch::switched_off("INFERENCE_PIO_CPU_DECODE_PHASES"))
}

/// How many keys ahead [`attend_phased`]'s scores ask for a key's cache lines, and its values
/// for a value's: a task reads one key head's rows, 256 bytes every `kv_heads * d * 4`, with
/// little arithmetic between them (least for the values: a share of a row times the group's
/// weights), so the rows come from memory further ahead than [`PREFETCH_KEYS`]. SmolLM2 Q4_1
/// after 2,000 prompt tokens, 2 threads, three alternating rounds (tok/s, median): 2 and 2
/// keys ahead 45.2, 16 and 16 54.5, 8 and 32 55.6, 32 and 32 52.9.
const PHASED_KEYS_AHEAD: usize = 8;
const PHASED_VALUES_AHEAD: usize = 32;

/// Keys a scores task of [`attend_phased`] takes.
const PHASED_TASK_KEYS: usize = 256;

/// A decode step's rows for [`attend_phased`]: what [`cpu_decode_over`] read (queries `[rows,
/// heads, d]`, the block table `[rows, max_blocks]`, the rows' lengths).
struct PhasedStep<'a> {
    keys: PoolRows<'a>,
    values: PoolRows<'a>,
    queries: &'a [f32],
    table: &'a [usize],
    lens: &'a [usize],
    max_blocks: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    block_tokens: usize,
    window: Option<usize>,
    scale: f32,
}

impl PhasedStep<'_> {
    /// Row `r`'s first key it sees and how many.
    fn span(&self, r: usize) -> (usize, usize) {
        let len = self.lens[r];
        let first = first_key(len, self.window);
        (first, len - first)
    }

    /// Where key `j` of row `r`'s head `kvh` starts in a pool, and how many of the next `left`
    /// keys (at most [`KEY_RUN`]) follow it in its block, `kv_heads * d` apart.
    #[inline(always)]
    fn run(&self, r: usize, kvh: usize, j: usize, left: usize) -> (usize, usize) {
        let (block, offset) = (j / self.block_tokens, j % self.block_tokens);
        let slot = self.table[r * self.max_blocks + block] * self.block_tokens + offset;
        (slot * self.kv_heads * self.d + kvh * self.d, (self.block_tokens - offset).min(left).min(KEY_RUN))
    }

    /// The rows of `pool` of keys `j..j + n` (`n` at most [`KEY_RUN`]) of row `r`'s head `kvh`,
    /// to ask for one a key while a run is read ([`Ahead`]).
    #[inline(always)]
    fn ahead(&self, pool: &PoolRows<'_>, r: usize, kvh: usize, j: usize, n: usize) -> Ahead {
        let mut ahead = Ahead { rows: [std::ptr::null(); KEY_RUN], n: 0, lines: 0 };
        while ahead.n < n {
            let (at, run) = self.run(r, kvh, j + ahead.n, n - ahead.n);
            for i in 0..run {
                let (row, lines) = pool.row_lines(at + i * self.kv_heads * self.d, self.d);
                ahead.rows[ahead.n + i] = row;
                ahead.lines = lines;
            }
            ahead.n += run;
        }
        ahead
    }
}

/// Rows asked for towards L1 while a run of keys is read, the `i`-th as the run's `i`-th key
/// is read: spread over the run, where asking for a run's rows at once stalled on the full
/// fill buffers. Addresses only (a prefetch cannot fault).
struct Ahead {
    /// Each row's first byte.
    rows: [*const i8; KEY_RUN],
    n: usize,
    /// Cache lines a row spans.
    lines: usize,
}

impl Ahead {
    /// No rows.
    const NONE: Ahead = Ahead { rows: [std::ptr::null(); KEY_RUN], n: 0, lines: 0 };

    /// Asks for row `i`, if there is one.
    #[inline(always)]
    fn fetch(&self, i: usize) {
        if i < self.n {
            for line in 0..self.lines {
                prefetch_address(self.rows[i].wrapping_add(64 * line));
            }
        }
    }
}

/// Keys [`PoolRows::run`] reads at a time: consecutive slots of a block, so one block-table
/// lookup and one division for all of them (a lookup and two divisions a key were a sixth of
/// the phases' time), and their rows converted in one loop.
const KEY_RUN: usize = 16;

/// [`cpu_decode_over`] for a step over long rows. With one task per (row, key head), a model
/// of 3 key heads on 2 threads left a thread idle for a third of the attention; with one per
/// query head, every key and value was read once per query head; and each task asked for its
/// rows only two keys ahead. Here each phase splits its work so that every thread has some,
/// each key and value is read once, and the rows are asked for further ahead:
/// 1. scores: tasks of (row, key head, [`PHASED_TASK_KEYS`] keys), each key against the group's
///    query heads;
/// 2. softmax: one task per (row, query head);
/// 3. values: tasks of (row, key head, a share of the channels), each channel summed over the
///    keys in order.
///
/// Every score, softmax and sum is the one-region path's own arithmetic in the same order (the
/// scores are independent, the softmax takes the same row, a channel's sum is over the same
/// keys in the same order), so the output has the same bits.
fn attend_phased(step: &PhasedStep<'_>, threads: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let (n, heads, kv_heads, d) = (step.lens.len(), step.heads, step.kv_heads, step.d);
    let group = heads / kv_heads;
    let spans: Vec<(usize, usize)> = (0..n).map(|r| step.span(r)).collect();
    // Row `r`'s scores start at `bases[r]`: `heads * width` of them, per key head a block of
    // `width * group` key-major (phase 1) and per query head a row of `width` (phase 2).
    let bases: Vec<usize> = spans.iter().scan(0, |at, &(_, width)| {
        let base = *at;
        *at += heads * width;
        Some(base)
    }).collect();
    let total = spans.iter().map(|&(_, width)| heads * width).sum();
    // 1. Scores, key-major in each (row, key head) block.
    let mut by_key = vec![0f32; total];
    let mut tasks = Vec::new();
    let mut rest = by_key.as_mut_slice();
    for (r, &(_, width)) in spans.iter().enumerate() {
        for kvh in 0..kv_heads {
            for k0 in (0..width).step_by(PHASED_TASK_KEYS) {
                let keys = PHASED_TASK_KEYS.min(width - k0);
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(keys * group);
                rest = tail;
                tasks.push((r, kvh, k0, mine));
            }
        }
    }
    tasks.into_par_iter().for_each(|(r, kvh, k0, mine)| phased_scores_simd(step, r, kvh, spans[r].0 + k0, mine));
    // 2. Each query head's row, gathered from its key head's block, and its softmax.
    let mut probs = vec![0f32; total];
    let mut rows = Vec::with_capacity(n * heads);
    let mut rest = probs.as_mut_slice();
    for (r, &(_, width)) in spans.iter().enumerate() {
        for h in 0..heads {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(width);
            rest = tail;
            rows.push((r, h, mine));
        }
    }
    rows.into_par_iter().for_each(|(r, h, row)| {
        let width = row.len();
        let block = &by_key[bases[r] + (h / group) * width * group..][..width * group];
        for (p, scores) in row.iter_mut().zip(block.chunks_exact(group)) {
            *p = scores[h % group];
        }
        softmax_simd(row);
    });
    // 3. The weighted values, by shares of the channels: enough tasks for the threads, each a
    // whole number of 16-channel runs where `d` allows.
    let per_row = n * kv_heads;
    let shares = (2 * threads).div_ceil(per_row.max(1)).clamp(1, (d / 16).max(1));
    let share = d.div_ceil(shares);
    let tasks: Vec<(usize, usize, usize)> = (0..n).flat_map(|r| (0..kv_heads).flat_map(move |kvh| (0..d).step_by(share).map(move |c0| (r, kvh, c0)))).collect();
    let sums: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(r, kvh, c0)| {
            let channels = c0..(c0 + share).min(d);
            let mut acc = vec![0f32; group * channels.len()];
            phased_values_simd(step, &probs[bases[r]..bases[r] + heads * spans[r].1], r, kvh, channels.clone(), &mut acc);
            acc
        })
        .collect();
    let mut out = vec![0f32; n * heads * d];
    for (&(r, kvh, c0), acc) in tasks.iter().zip(&sums) {
        let width = acc.len() / group;
        for (g, part) in acc.chunks_exact(width).enumerate() {
            let at = (r * heads + kvh * group + g) * d + c0;
            out[at..at + width].copy_from_slice(part);
        }
    }
    out
}

/// Phase 1 of [`attend_phased`]: keys `from..from + mine.len() / group` of row `r`'s head
/// `kvh` against the group's query heads, into `mine` key-major (the one-region path's
/// scores, [`key_scores`]), a run of keys within a block at a time ([`PoolRows::run`]).
#[inline(always)]
fn phased_scores(step: &PhasedStep<'_>, r: usize, kvh: usize, from: usize, mine: &mut [f32]) {
    let d = step.d;
    let group = step.heads / step.kv_heads;
    let queries = &step.queries[(r * step.heads + kvh * group) * d..][..group * d];
    let mut buf = vec![0f32; KEY_RUN * d];
    let mut scales = [1f32; KEY_RUN];
    let count = mine.len() / group;
    let mut k = 0;
    while k < count {
        let (at, n) = step.run(r, kvh, from + k, count - k);
        let ahead = step.ahead(&step.keys, r, kvh, from + k + PHASED_KEYS_AHEAD, n.min(count.saturating_sub(k + PHASED_KEYS_AHEAD)));
        let (rows, apart) = step.keys.run(at, step.kv_heads * d, n, d, 0..d, &mut buf, &mut scales);
        key_scores(rows, apart, n, d, queries, &scales, step.scale, &ahead, &mut mine[k * group..(k + n) * group]);
        k += n;
    }
}

/// `out[i · group + g] = key_i · queries[g] · scales[i] · scale` for the `n` keys of a run
/// (`rows`, `apart` values apart, `d` read from each) and the group's query heads (`queries
/// [group, d]`, `group = out.len() / n`): the scores of both decode paths, so that they agree to
/// the bit. Each dot product is summed in sixteen lanes (lane `k` takes channels `k, k + 16,
/// ...`, a product then an add), the lanes then pairwise (8 + 8, 4 + 4, 2 + 2, 1 + 1), then the
/// channels past the last 16 in order. On x86-64 with AVX-512 or AVX2 (heads a multiple of 16
/// wide) by explicit vectors, the run's keys in one call: the compiler's own vectorisation of
/// the portable form, inlined into the phases, ran the lanes two at a time, and a call a key
/// cost a model of 2 query heads a key more than its arithmetic.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn key_scores(rows: &[f32], apart: usize, n: usize, d: usize, queries: &[f32], scales: &[f32], scale: f32, ahead: &Ahead, out: &mut [f32]) {
    let group = out.len() / n.max(1);
    let fits = out.len() == n * group && scales.len() >= n && queries.len() >= group * d && (n == 0 || rows.len() >= (n - 1) * apart + d);
    assert!(fits, "key_scores: {n} keys of {d}, {group} query heads");
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) {
        if crate::quant::uses_avx512() {
            // SAFETY: the CPU has AVX-512F (detected at run time); the lengths are checked.
            unsafe { score_lanes::avx512(rows, apart, n, d, queries, scales, scale, ahead, out) };
            return;
        }
        if crate::quant::cpu_has_avx2() {
            // SAFETY: the CPU has AVX2 (detected at run time); the lengths are checked.
            unsafe { score_lanes::avx2(rows, apart, n, d, queries, scales, scale, ahead, out) };
            return;
        }
    }
    let runs = d / 16;
    for (i, scores) in out.chunks_exact_mut(group.max(1)).enumerate() {
        ahead.fetch(i);
        let key = &rows[i * apart..i * apart + d];
        for (g, s) in scores.iter_mut().enumerate() {
            let q = &queries[g * d..(g + 1) * d];
            let mut acc = [0f32; 16];
            for c in 0..runs {
                for k in 0..16 {
                    acc[k] += key[c * 16 + k] * q[c * 16 + k];
                }
            }
            let eight: [f32; 8] = std::array::from_fn(|k| acc[k] + acc[k + 8]);
            let four: [f32; 4] = std::array::from_fn(|k| eight[k] + eight[k + 4]);
            let tail: f32 = key[runs * 16..d].iter().zip(&q[runs * 16..]).map(|(x, y)| x * y).sum();
            *s = ((four[0] + four[2]) + (four[1] + four[3]) + tail) * (scales[i] * scale);
        }
    }
}

/// [`key_scores`] in explicit x86-64 vectors (heads a multiple of 16 wide; the caller checks
/// the lengths).
#[cfg(target_arch = "x86_64")]
mod score_lanes {
    use super::Ahead;
    use std::arch::x86_64::*;

    /// Four lanes `[a, b, c, d]` as `(a + c) + (b + d)`.
    #[inline(always)]
    unsafe fn pairs(four: __m128) -> f32 {
        // SAFETY: SSE is x86-64's baseline.
        unsafe {
            let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
            _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)))
        }
    }

    /// One 16-lane vector per query head, 4 heads at a time over each key.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(rows: &[f32], apart: usize, n: usize, d: usize, queries: &[f32], scales: &[f32], scale: f32, ahead: &Ahead, out: &mut [f32]) {
        let group = out.len() / n.max(1);
        for (i, scores) in out.chunks_exact_mut(group.max(1)).enumerate() {
            ahead.fetch(i);
            let key = &rows[i * apart..i * apart + d];
            let scale = scales[i] * scale;
            for (g0, out) in (0..group).step_by(4).zip(scores.chunks_mut(4)) {
                let mut acc = [_mm512_setzero_ps(); 4];
                for c in (0..d).step_by(16) {
                    // SAFETY: a slice of 16 values (bounds-checked).
                    let x = unsafe { _mm512_loadu_ps(key[c..c + 16].as_ptr()) };
                    for (g, acc) in acc.iter_mut().enumerate().take(out.len()) {
                        let at = (g0 + g) * d + c;
                        // SAFETY: as above.
                        let y = unsafe { _mm512_loadu_ps(queries[at..at + 16].as_ptr()) };
                        *acc = _mm512_add_ps(*acc, _mm512_mul_ps(x, y));
                    }
                }
                for (s, a) in out.iter_mut().zip(acc) {
                    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
                    let eight = _mm256_add_ps(_mm512_castps512_ps256(a), high);
                    let four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps::<1>(eight));
                    // SAFETY: SSE3 and below (baseline with AVX-512F).
                    *s = unsafe { pairs(four) } * scale;
                }
            }
        }
    }

    /// Two 8-lane vectors (lanes 0-7, 8-15) per query head, 4 heads at a time over each key.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(rows: &[f32], apart: usize, n: usize, d: usize, queries: &[f32], scales: &[f32], scale: f32, ahead: &Ahead, out: &mut [f32]) {
        let group = out.len() / n.max(1);
        for (i, scores) in out.chunks_exact_mut(group.max(1)).enumerate() {
            ahead.fetch(i);
            let key = &rows[i * apart..i * apart + d];
            let scale = scales[i] * scale;
            for (g0, out) in (0..group).step_by(4).zip(scores.chunks_mut(4)) {
                let mut acc = [(_mm256_setzero_ps(), _mm256_setzero_ps()); 4];
                for c in (0..d).step_by(16) {
                    // SAFETY: slices of 8 values (bounds-checked).
                    let (xl, xh) = unsafe { (_mm256_loadu_ps(key[c..c + 8].as_ptr()), _mm256_loadu_ps(key[c + 8..c + 16].as_ptr())) };
                    for (g, (lo, hi)) in acc.iter_mut().enumerate().take(out.len()) {
                        let at = (g0 + g) * d + c;
                        // SAFETY: as above.
                        let (yl, yh) = unsafe { (_mm256_loadu_ps(queries[at..at + 8].as_ptr()), _mm256_loadu_ps(queries[at + 8..at + 16].as_ptr())) };
                        *lo = _mm256_add_ps(*lo, _mm256_mul_ps(xl, yl));
                        *hi = _mm256_add_ps(*hi, _mm256_mul_ps(xh, yh));
                    }
                }
                for (s, (lo, hi)) in out.iter_mut().zip(acc) {
                    let eight = _mm256_add_ps(lo, hi);
                    let four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps::<1>(eight));
                    // SAFETY: SSE3 and below (baseline with AVX2).
                    *s = unsafe { pairs(four) } * scale;
                }
            }
        }
    }
}

/// Phase 3 of [`attend_phased`]: the `channels` of row `r`'s head `kvh`'s values weighted by
/// the group's probabilities (`probs`: the row's `heads` rows of weights), summed over the keys
/// in order into `acc` (`[group, channels]`), as the one-region path sums each channel. A run
/// of keys within a block at a time ([`PoolRows::run`]), all its channels and heads in one call
/// ([`add_values`]): the run's rows stay in L1 across the channels (channels outermost re-read
/// the rows from memory for every 16).
#[inline(always)]
fn phased_values(step: &PhasedStep<'_>, probs: &[f32], r: usize, kvh: usize, channels: std::ops::Range<usize>, acc: &mut [f32]) {
    let (d, group, cw) = (step.d, step.heads / step.kv_heads, channels.len());
    let (first, width) = step.span(r);
    let runs = cw.div_ceil(VALUE_RUN);
    // Per channel run, the group's sums side by side.
    let mut sums = vec![[0f32; VALUE_RUN]; runs * group];
    let mut buf = vec![0f32; KEY_RUN * cw];
    let mut scales = [1f32; KEY_RUN];
    let weights: Vec<&[f32]> = (0..group).map(|g| &probs[(kvh * group + g) * width..][..width]).collect();
    let mut k = 0;
    while k < width {
        let (at, n) = step.run(r, kvh, first + k, width - k);
        let ahead = step.ahead(&step.values, r, kvh, first + k + PHASED_VALUES_AHEAD, n.min(width.saturating_sub(k + PHASED_VALUES_AHEAD)));
        let (rows, apart) = step.values.run(at, step.kv_heads * d, n, d, channels.clone(), &mut buf, &mut scales);
        add_values(rows, apart, n, cw, &weights, k, &scales, &ahead, &mut sums);
        k += n;
    }
    for run in 0..runs {
        let c = run * VALUE_RUN;
        let lanes = VALUE_RUN.min(cw - c);
        for g in 0..group {
            acc[g * cw + c..g * cw + c + lanes].copy_from_slice(&sums[run * group + g][..lanes]);
        }
    }
}

/// Channels a run of [`phased_values`] sums in registers (one AVX-512 register, two AVX2 ones).
const VALUE_RUN: usize = 16;
/// Query heads a run of [`phased_values`] sums at once.
const VALUE_HEADS: usize = 4;

/// `sums[run · group + g][l] += weights[g][k + i] · scales[i] · rows[i · apart + run · 16 + l]`
/// for the run's `n` rows, its `cw` channels and the group's heads, each sum over the rows in
/// order (a product then an add): whole runs of 16 channels by [`value_lanes`] where the CPU
/// has the vectors, the rest by a portable loop.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn add_values(rows: &[f32], apart: usize, n: usize, cw: usize, weights: &[&[f32]], k: usize, scales: &[f32; KEY_RUN], ahead: &Ahead, sums: &mut [[f32; VALUE_RUN]]) {
    let group = weights.len();
    let done = if value_lanes::run(rows, apart, n, cw / VALUE_RUN, weights, k, scales, ahead, sums) { cw / VALUE_RUN } else { 0 };
    if done == 0 {
        (0..ahead.n).for_each(|i| ahead.fetch(i));
    }
    for run in done..cw.div_ceil(VALUE_RUN) {
        let c = run * VALUE_RUN;
        let lanes = VALUE_RUN.min(cw - c);
        for i in 0..n {
            let x = &rows[i * apart + c..][..lanes];
            for (sum, w) in sums[run * group..(run + 1) * group].iter_mut().zip(weights) {
                let w = w[k + i] * scales[i];
                for (o, v) in sum.iter_mut().zip(x) {
                    *o += w * v;
                }
            }
        }
    }
}

/// The sums of [`add_values`] over whole runs of 16 channels in explicit x86-64 vectors, all of
/// a run of keys in one call (the compiler's own vectorisation of the loop, inlined into the
/// phases, kept the sums in memory; a call per 16 channels and 4 heads cost more than their
/// arithmetic): each sum a product then an add, as the portable loop.
mod value_lanes {
    use super::{Ahead, KEY_RUN, VALUE_RUN};

    /// [`super::add_values`] for channel runs `0..runs` (`rows` holds 16 values at each row's
    /// `run · 16`); `false` (nothing done) without AVX2.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) fn run(rows: &[f32], apart: usize, n: usize, runs: usize, weights: &[&[f32]], k: usize, scales: &[f32; KEY_RUN], ahead: &Ahead, sums: &mut [[f32; VALUE_RUN]]) -> bool {
        let fits = n <= KEY_RUN && sums.len() >= runs * weights.len() && (n == 0 || runs == 0 || rows.len() >= (n - 1) * apart + runs * VALUE_RUN) && weights.iter().all(|w| w.len() >= k + n);
        assert!(fits, "value_lanes: a run of {n} rows, {runs} runs of channels");
        #[cfg(target_arch = "x86_64")]
        {
            if crate::quant::uses_avx512() {
                // SAFETY: the CPU has AVX-512F (detected at run time); the lengths are checked.
                unsafe { x86::avx512(rows, apart, n, runs, weights, k, scales, ahead, sums) };
                return true;
            }
            if crate::quant::cpu_has_avx2() {
                // SAFETY: the CPU has AVX2 (detected at run time); the lengths are checked.
                unsafe { x86::avx2(rows, apart, n, runs, weights, k, scales, ahead, sums) };
                return true;
            }
        }
        let _ = (rows, apart, n, runs, weights, k, scales, ahead, sums);
        false
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use super::super::VALUE_HEADS;
        use super::{Ahead, KEY_RUN, VALUE_RUN};
        use std::arch::x86_64::*;

        /// Every channel run, up to [`VALUE_HEADS`] heads at a time.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn avx512(rows: &[f32], apart: usize, n: usize, runs: usize, weights: &[&[f32]], k: usize, scales: &[f32; KEY_RUN], ahead: &Ahead, sums: &mut [[f32; VALUE_RUN]]) {
            let group = weights.len();
            for run in 0..runs {
                for g0 in (0..group).step_by(VALUE_HEADS) {
                    let (w, s) = (&weights[g0..group.min(g0 + VALUE_HEADS)], &mut sums[run * group + g0..run * group + group.min(g0 + VALUE_HEADS)]);
                    let c = run * VALUE_RUN;
                    // The next run's rows are asked for on the first pass over the keys.
                    let first = if run == 0 && g0 == 0 { ahead } else { &Ahead::NONE };
                    // SAFETY: as this function's (AVX-512F).
                    unsafe {
                        match w.len() {
                            1 => heads512::<1>(rows, apart, n, c, w, k, scales, first, s),
                            2 => heads512::<2>(rows, apart, n, c, w, k, scales, first, s),
                            3 => heads512::<3>(rows, apart, n, c, w, k, scales, first, s),
                            _ => heads512::<VALUE_HEADS>(rows, apart, n, c, w, k, scales, first, s),
                        }
                    }
                }
            }
        }

        /// `G` heads' sums of channels `c..c + 16`, one 16-lane vector each.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn heads512<const G: usize>(rows: &[f32], apart: usize, n: usize, c: usize, weights: &[&[f32]], k: usize, scales: &[f32; KEY_RUN], ahead: &Ahead, sums: &mut [[f32; VALUE_RUN]]) {
            // SAFETY: each sum is 16 values (G of them: the caller's slices).
            let mut acc: [__m512; G] = std::array::from_fn(|g| unsafe { _mm512_loadu_ps(sums[g].as_ptr()) });
            for i in 0..n {
                ahead.fetch(i);
                // SAFETY: 16 values of the slice (bounds-checked).
                let x = unsafe { _mm512_loadu_ps(rows[i * apart + c..i * apart + c + VALUE_RUN].as_ptr()) };
                for (acc, w) in acc.iter_mut().zip(weights) {
                    *acc = _mm512_add_ps(*acc, _mm512_mul_ps(_mm512_set1_ps(w[k + i] * scales[i]), x));
                }
            }
            for (sum, acc) in sums.iter_mut().zip(acc) {
                // SAFETY: as above.
                unsafe { _mm512_storeu_ps(sum.as_mut_ptr(), acc) };
            }
        }

        /// As [`avx512`], two 8-lane vectors a head.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2")]
        pub(super) unsafe fn avx2(rows: &[f32], apart: usize, n: usize, runs: usize, weights: &[&[f32]], k: usize, scales: &[f32; KEY_RUN], ahead: &Ahead, sums: &mut [[f32; VALUE_RUN]]) {
            let group = weights.len();
            for run in 0..runs {
                for g0 in (0..group).step_by(VALUE_HEADS) {
                    let (w, s) = (&weights[g0..group.min(g0 + VALUE_HEADS)], &mut sums[run * group + g0..run * group + group.min(g0 + VALUE_HEADS)]);
                    let c = run * VALUE_RUN;
                    // The next run's rows are asked for on the first pass over the keys.
                    let first = if run == 0 && g0 == 0 { ahead } else { &Ahead::NONE };
                    // SAFETY: as this function's (AVX2).
                    unsafe {
                        match w.len() {
                            1 => heads256::<1>(rows, apart, n, c, w, k, scales, first, s),
                            2 => heads256::<2>(rows, apart, n, c, w, k, scales, first, s),
                            3 => heads256::<3>(rows, apart, n, c, w, k, scales, first, s),
                            _ => heads256::<VALUE_HEADS>(rows, apart, n, c, w, k, scales, first, s),
                        }
                    }
                }
            }
        }

        /// `G` heads' sums of channels `c..c + 16`, two 8-lane vectors each.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2")]
        #[inline]
        unsafe fn heads256<const G: usize>(rows: &[f32], apart: usize, n: usize, c: usize, weights: &[&[f32]], k: usize, scales: &[f32; KEY_RUN], ahead: &Ahead, sums: &mut [[f32; VALUE_RUN]]) {
            // SAFETY: each sum is 16 values (G of them: the caller's slices).
            let mut acc: [(__m256, __m256); G] = std::array::from_fn(|g| unsafe { (_mm256_loadu_ps(sums[g].as_ptr()), _mm256_loadu_ps(sums[g][8..].as_ptr())) });
            for i in 0..n {
                ahead.fetch(i);
                let row = &rows[i * apart + c..i * apart + c + VALUE_RUN];
                // SAFETY: 8 + 8 values of the slice (bounds-checked).
                let (xl, xh) = unsafe { (_mm256_loadu_ps(row.as_ptr()), _mm256_loadu_ps(row[8..].as_ptr())) };
                for ((lo, hi), w) in acc.iter_mut().zip(weights) {
                    let w = _mm256_set1_ps(w[k + i] * scales[i]);
                    *lo = _mm256_add_ps(*lo, _mm256_mul_ps(w, xl));
                    *hi = _mm256_add_ps(*hi, _mm256_mul_ps(w, xh));
                }
            }
            for (sum, (lo, hi)) in sums.iter_mut().zip(acc) {
                // SAFETY: as above.
                unsafe {
                    _mm256_storeu_ps(sum.as_mut_ptr(), lo);
                    _mm256_storeu_ps(sum[8..].as_mut_ptr(), hi);
                }
            }
        }
    }
}

/// `$name($args)`: `$body($args)` compiled for AVX-512 or AVX2 + FMA where the CPU has them (as
/// [`attend_group_dispatch`]), else for the baseline. A named function, not a closure: a
/// closure called from a `target_feature` function is compiled for the baseline.
macro_rules! simd_dispatch {
    ($name:ident, $body:path, ($($arg:ident: $ty:ty),*)) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if crate::quant::uses_avx512() {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                // SAFETY: the CPU has AVX-512F, AVX2 and FMA (detected at run time).
                unsafe { avx512($($arg),*) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if crate::quant::cpu_has_avx2() {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                // SAFETY: the CPU has AVX2 and FMA (detected at run time).
                unsafe { avx2($($arg),*) };
                return;
            }
            $body($($arg),*)
        }
    };
}

simd_dispatch!(phased_scores_simd, phased_scores, (step: &PhasedStep<'_>, r: usize, kvh: usize, from: usize, mine: &mut [f32]));
simd_dispatch!(phased_values_simd, phased_values, (step: &PhasedStep<'_>, probs: &[f32], r: usize, kvh: usize, channels: std::ops::Range<usize>, acc: &mut [f32]));
simd_dispatch!(softmax_simd, crate::cpu_rows::softmax_in_place, (row: &mut [f32]));

/// One (row, key head) of [`cpu_decode_over`]: the keys and values it reads through the row's
/// block table and the `queries.len() / d` query heads that share them.
struct GroupTask<'a> {
    keys: PoolRows<'a>,
    values: PoolRows<'a>,
    queries: &'a [f32],
    table: &'a [usize],
    first: usize,
    len: usize,
    block_tokens: usize,
    kv_heads: usize,
    kvh: usize,
    d: usize,
    scale: f32,
}

/// [`GroupTask`]'s attention into `out` (its query heads' outputs side by side), compiled
/// for AVX2 + FMA where the CPU has them (the loops vectorise to the target) and for the
/// baseline otherwise. The scores live in a per-thread buffer kept between calls; it is taken
/// out of its thread-local here, outside the AVX2 function, because a closure run by
/// `LocalKey::with_borrow_mut` is compiled for the baseline (SSE2) even when called from an
/// AVX2 function (it was 22 % of a CPU decode at 600 tokens of context). A query head's
/// arithmetic does not depend on how heads are grouped into tasks, nor on the other rows of
/// the step (batched == one by one, to the bit).
fn attend_group(task: &GroupTask<'_>, out: &mut [f32]) {
    thread_local! {
        static SCORES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut scores = SCORES.take();
    attend_group_dispatch(task, out, &mut scores);
    SCORES.set(scores);
}

fn attend_group_dispatch(task: &GroupTask<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
    // The same loops compiled for AVX-512 where the products use it: sixteen lanes a vector
    // for the scores' sixteen-lane dot products and the values' sums, the same arithmetic (no
    // sum is reordered, no multiply-add fused), so the same bits.
    #[cfg(target_arch = "x86_64")]
    if crate::quant::uses_avx512() {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn avx512(task: &GroupTask<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
            attend_group_body(task, out, scores)
        }
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (detected at run time).
        unsafe { avx512(task, out, scores) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::cpu_has_avx2() {
        #[target_feature(enable = "avx2,fma")]
        fn avx2(task: &GroupTask<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
            attend_group_body(task, out, scores)
        }
        // SAFETY: the CPU has AVX2 and FMA (detected at run time).
        unsafe { avx2(task, out, scores) };
        return;
    }
    attend_group_body(task, out, scores)
}

/// How many keys ahead [`attend_group_body`] asks for the next key's and value's cache lines:
/// the pools' rows of one head are 256 bytes every `kv_heads * d * 4` bytes, from L3 at decode
/// (their loads were the attention's hot spots).
const PREFETCH_KEYS: usize = 2;

/// Asks the CPU to bring the cache line of `address` towards L1 (a hint: nothing on other
/// targets; any address, a prefetch cannot fault).
#[inline(always)]
fn prefetch_address(address: *const i8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch hint reads nothing and cannot fault, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

/// The widest head the CPU decode loop takes (wider ones go through the gathered reference).
const MAX_CPU_HEAD_DIM: usize = 512;

/// The scores of every key against each query head (in `scores`), their softmax, and the
/// weighted values: transformers' eager attention for one row, in f32.
#[inline(always)]
fn attend_group_body(task: &GroupTask<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
    let GroupTask { keys, values, queries, table, first, len, block_tokens, kv_heads, kvh, d, scale } = *task;
    let group = queries.len() / d;
    let width = len - first.min(len);
    // Where key `j`'s head `kvh` starts in a pool, for keys `first..len` in turn: a cursor
    // over (block, offset) per key and one for the key prefetched ahead (a closure dividing
    // by the block size four times a key was 7 % of an `int8` decode at 400 tokens).
    let start = |j: usize| KeyCursor { block: j / block_tokens, offset: j % block_tokens };
    let at = |c: &KeyCursor| (table[c.block] * block_tokens + c.offset) * kv_heads * d + kvh * d;
    scores.clear();
    scores.resize(group * width, 0.0);
    // A row of codes converted to f32 (f32 rows are read in place).
    let mut buf = [0f32; MAX_CPU_HEAD_DIM];
    let buf = &mut buf[..d];
    let (mut cur, mut ahead) = (start(first), start(first + PREFETCH_KEYS));
    for (k, j) in (first..len).enumerate() {
        if j + PREFETCH_KEYS < len {
            keys.prefetch(at(&ahead), d);
        }
        // f32 rows: a scale of 1, so the score is `dot · scale` to the bit.
        let (key, row_scale) = keys.row(at(&cur), buf);
        for g0 in (0..group).step_by(16) {
            let heads = 16.min(group - g0);
            let mut mine = [0f32; 16];
            key_scores(key, d, 1, d, &queries[g0 * d..], &[row_scale], scale, &Ahead::NONE, &mut mine[..heads]);
            for (g, s) in mine[..heads].iter().enumerate() {
                scores[(g0 + g) * width + k] = *s;
            }
        }
        cur.advance(block_tokens);
        ahead.advance(block_tokens);
    }
    for w in scores.chunks_exact_mut(width.max(1)) {
        crate::cpu_rows::softmax_in_place(w);
    }
    out.fill(0.0);
    let (mut cur, mut ahead) = (start(first), start(first + PREFETCH_KEYS));
    for (k, j) in (first..len).enumerate() {
        if j + PREFETCH_KEYS < len {
            values.prefetch(at(&ahead), d);
        }
        let (value, row_scale) = values.row(at(&cur), buf);
        for (g, o) in out.chunks_exact_mut(d).enumerate() {
            let w = scores[g * width + k] * row_scale;
            for (o, x) in o.iter_mut().zip(value) {
                *o += w * x;
            }
        }
        cur.advance(block_tokens);
        ahead.advance(block_tokens);
    }
}

/// A key's block (index into a row's block table) and offset in it.
struct KeyCursor {
    block: usize,
    offset: usize,
}

impl KeyCursor {
    /// The next key.
    #[inline(always)]
    fn advance(&mut self, block_tokens: usize) {
        self.offset += 1;
        if self.offset == block_tokens {
            self.offset = 0;
            self.block += 1;
        }
    }
}

/// Gathers `slots` from a pool `[pool_slots, kv_heads, d]` as `[batch, kv_heads, width, d]`
/// values in `dtype` (coded pages decoded).
fn gather(pool: &KvPages, slots: &Tensor<1, Int>, batch: usize, width: usize, dtype: DType) -> Tensor<4> {
    let [_, kv_heads, d] = pool.dims();
    pool.select(slots.clone(), dtype).reshape([batch, width, kv_heads, d]).swap_dims(1, 2)
}

/// Attention of the step's queries `q [tokens, heads, head_dim]` (decode rows first, then
/// each prefill chunk, as [`PagedLayout`] was built) over the pools `k`/`v [slots, kv_heads,
/// head_dim]` (this step's keys already written): `[tokens, heads, head_dim]`.
pub fn paged_attention(q: Tensor<3>, k: &KvPages, v: &KvPages, layout: &PagedLayout, window: Option<usize>, scale: f64) -> Tensor<3> {
    paged_attention_within(q, k, v, layout, window, scale, MAX_SCORES, causal_piece_rows(), PrefillPath::Cheaper)
}

/// Which way a step's prefill chunks go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PrefillPath {
    /// The kernel where it applies and [`prefill_kernel_pays`], else the reference.
    Cheaper,
    /// The kernel where it applies.
    Kernel,
    /// The reference.
    Reference,
}

/// [`paged_attention`] with the prefill chunks through the kernel wherever it applies, whatever
/// it costs: what `kernel_check` checks and times.
pub fn paged_attention_prefill_kernel(q: Tensor<3>, k: &KvPages, v: &KvPages, layout: &PagedLayout, window: Option<usize>, scale: f64) -> Tensor<3> {
    paged_attention_within(q, k, v, layout, window, scale, MAX_SCORES, causal_piece_rows(), PrefillPath::Kernel)
}

/// [`paged_attention`] with the prefill chunks through the reference (gathered keys and
/// values, masks and `gqa_attention`) on every device: what `kernel_check` compares the
/// prefill kernel with.
pub fn paged_attention_reference(q: Tensor<3>, k: &KvPages, v: &KvPages, layout: &PagedLayout, window: Option<usize>, scale: f64) -> Tensor<3> {
    paged_attention_within(q, k, v, layout, window, scale, MAX_SCORES, causal_piece_rows(), PrefillPath::Reference)
}

/// [`paged_attention`] with at most `max_scores` scores materialised a launch by the
/// reference and its chunks' rows in pieces of at most `cut` ([`reference_pieces`]), the
/// prefill chunks going the `path` way.
#[allow(clippy::too_many_arguments)]
fn paged_attention_within(q: Tensor<3>, k: &KvPages, v: &KvPages, layout: &PagedLayout, window: Option<usize>, scale: f64, max_scores: usize, cut: Option<usize>, path: PrefillPath) -> Tensor<3> {
    let [tokens, heads, d] = q.dims();
    let mut parts = Vec::with_capacity(2);
    let mut at = 0;
    if let Some(decode) = &layout.decode {
        let rows = decode.lens.dims()[0];
        let queries = q.clone().narrow(0, 0, rows);
        let on_device = paged_decode_attention(queries.clone(), k, v, &decode.table, &decode.lens, layout.block_tokens, window, scale);
        let out = match on_device.or_else(|| cpu_decode_attention(&queries, k, v, decode, layout.block_tokens, window, scale)) {
            Some(out) => out,
            None => {
                let (slots, mask, width) = decode.gathered(layout.block_tokens, window);
                let keys = gather(k, &slots, rows, width, q.dtype());
                let values = gather(v, &slots, rows, width, q.dtype());
                let out = crate::attention::gqa_attention(queries.reshape([rows, heads, 1, d]), &keys, &values, Some(&mask), scale);
                out.reshape([rows, heads, d])
            }
        };
        parts.push(out);
        at = rows;
    }
    let prefill_tokens: usize = layout.prefill.iter().map(|s| s.queries).sum();
    let on_device = (path != PrefillPath::Reference
        && prefill_tokens > 0
        && kernel_takes(&q, k, v)
        && (path == PrefillPath::Kernel || prefill_kernel_pays(&layout.prefill, heads, window)))
        .then(|| {
            let rows = layout.prefill_rows();
            let queries = q.clone().narrow(0, at, prefill_tokens);
            paged_prefill_attention(queries, k, v, &rows.table, &rows.seqs, &rows.lens, layout.block_tokens, window, scale)
        })
        .flatten();
    if let Some(out) = on_device {
        parts.push(out);
        at += prefill_tokens;
    }
    // On the CPU, in tiles read from the pools (f32 queries).
    if at < tokens && path != PrefillPath::Reference {
        let queries = q.clone().narrow(0, at, prefill_tokens);
        if let Some(out) = crate::cpu_attention::prefill_attention(&queries, k, v, &layout.prefill, layout.block_tokens, window, scale) {
            parts.push(out);
            at += prefill_tokens;
        }
    }
    let chunks: &[Chunk] = if at == tokens { &[] } else { layout.chunks() };
    for chunk in chunks {
        let (n, qn, context) = (chunk.count, chunk.queries, chunk.context);
        let keys = gather(k, &chunk.slots, n, context, q.dtype());
        let values = gather(v, &chunk.slots, n, context, q.dtype());
        let queries = q.clone().narrow(0, at, n * qn).reshape([n, qn, heads, d]).swap_dims(1, 2);
        // With `INFERENCE_PIO_PREFILL_FLASH=1` on CUDA: cubek's flash attention, where it applies
        // (never for the reference itself).
        let flash = (path != PrefillPath::Reference).then(|| crate::flash::chunk_attention(&queries, &keys, &values, window, scale)).flatten();
        if let Some(out) = flash {
            parts.push(out.swap_dims(1, 2).reshape([n * qn, heads, d]));
            at += n * qn;
            continue;
        }
        let mask = pick(&chunk.masks, window);
        // The scores are materialised: pieces of whole sequences, or of one sequence's query
        // rows, keep each launch's within `MAX_SCORES` (rows are independent, so the result is
        // the same as one launch).
        // Long chunks' rows also in pieces of at most `causal_piece_rows`, each over only the
        // keys its rows see (`piece_keys`): the causal triangle in steps, not the whole square.
        let (seqs, rows) = reference_pieces(n, qn, context, heads, max_scores, cut);
        let mut out = Vec::new();
        for s in (0..n).step_by(seqs) {
            let ns = seqs.min(n - s);
            let (keys, values) = (keys.clone().narrow(0, s, ns), values.clone().narrow(0, s, ns));
            for r in (0..qn).step_by(rows) {
                let nr = rows.min(qn - r);
                let seen = piece_keys(qn, context, r, nr, window, cut);
                let piece = queries.clone().narrow(0, s, ns).narrow(2, r, nr);
                let piece_mask = mask.clone().narrow(0, s, ns).narrow(3, r, nr).narrow(4, seen.start, seen.len());
                let (keys, values) = if seen.len() == context {
                    (keys.clone(), values.clone())
                } else {
                    (keys.clone().narrow(2, seen.start, seen.len()), values.clone().narrow(2, seen.start, seen.len()))
                };
                out.push(crate::attention::gqa_attention(piece, &keys, &values, Some(&piece_mask), scale));
            }
        }
        // Pieces back in the chunk's order: sequences, then query rows within each.
        let out = if out.len() == 1 {
            out.remove(0)
        } else if rows == qn {
            Tensor::cat(out, 0)
        } else {
            let per_seq = qn.div_ceil(rows);
            let seqs: Vec<Tensor<4>> = out.chunks(per_seq).map(|p| Tensor::cat(p.to_vec(), 2)).collect();
            Tensor::cat(seqs, 0)
        };
        parts.push(out.swap_dims(1, 2).reshape([n * qn, heads, d]));
        at += n * qn;
    }
    assert_eq!(at, tokens, "the layout covers {at} query tokens, the step has {tokens}");
    if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(parts, 0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_pages::KvStorage;
    use burn::tensor::Distribution;

    fn values<const D: usize>(x: Tensor<D>) -> Vec<f32> {
        x.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
    }

    #[test]
    fn the_decode_kernel_fits_a_head_in_one_plane_and_splits_short_batches() {
        let gpu = Device::cuda(0usize);
        // Qwen3-4B's heads (4 query heads a key head) in 16-byte vectors, 16 lanes a key in the
        // value pass; GLM's 12 and the 30B's 8 narrow to 8 bytes for their accumulators.
        assert_eq!(decode_vector(128, 4, DType::BF16), Some(8));
        assert_eq!(decode_vector(128, 4, DType::F32), Some(4));
        assert_eq!(decode_vector(128, 8, DType::BF16), Some(4));
        assert_eq!(decode_vector(128, 12, DType::BF16), Some(4));
        assert_eq!(decode_vector(256, 4, DType::BF16), Some(8));
        assert_eq!(decode_vector(16, 2, DType::F32), Some(4));
        // Vectors per head must divide a plane: 96 channels never do in 16-byte vectors.
        assert_eq!(decode_vector(96, 4, DType::BF16), None);
        // f32 heads of 256 channels need two 16-byte vectors per lane: the reference runs.
        assert_eq!(decode_vector(256, 4, DType::F32), None);
        assert!(decode_kernel_applies(32, 8, 128, DType::BF16, &gpu));
        assert!(!decode_kernel_applies(32, 8, 128, DType::BF16, &Device::flex()));
        assert!(!decode_kernel_applies(30, 8, 128, DType::BF16, &gpu));
        assert!(!decode_kernel_applies(32, 8, 256, DType::F32, &gpu));
        // One row of 8 key heads over 768 keys: 12 splits of 64 keys (96 cubes); 256 rows
        // fill the device unsplit; a short context is never split below 64 keys a cube.
        assert_eq!(decode_splits(1, 8, 768), 12);
        assert_eq!(decode_splits(32, 8, 768), 2);
        assert_eq!(decode_splits(256, 8, 768), 1);
        assert_eq!(decode_splits(1, 8, 48), 1);
        assert_eq!(decode_splits(1, 8, 3072), 33);
        // Four key heads (Qwen3-Coder-30B-A3B): splits of 32 keys, so a 384-key row takes 12
        // cubes a head instead of 6.
        assert_eq!(decode_splits(1, 4, 384), 12);
        assert_eq!(decode_splits(1, 4, 20), 1);
        // Tiles of 32 keys (four passes of 8, four lanes a key) up to 4 heads a key head, of
        // 8 keys above; a head of 2 vectors scores each key with 2 lanes.
        assert_eq!(decode_passes(4, 4), 4);
        assert_eq!(decode_passes(2, 4), 4);
        assert_eq!(decode_passes(8, 4), 1);
        assert_eq!(decode_passes(12, 4), 1);
        assert_eq!(decode_passes(2, 2), 2);
    }

    /// The three-phase decode attention gives the one-region tasks' bits (one task per (row,
    /// key head), and one per query head), and the dense attention: f32, int8, fp8, f16 and
    /// bf16 pages (each written through [`KvPages::write`]), with and without a window, one and
    /// two rows of unequal lengths over shuffled blocks, 2 and 3 threads' shares (a head of 48
    /// channels: shares of 16 and 24).
    #[test]
    fn phased_decode_attention_has_the_one_region_bits() {
        let device = Device::flex();
        let (heads, kv_heads, d, bt) = (6, 2, 48, 4);
        let group = heads / kv_heads;
        let pool_slots = 160 * bt;
        let kp: Tensor<3> = Tensor::random([pool_slots, kv_heads, d], Distribution::Uniform(-1.0, 1.0), &device);
        let vp: Tensor<3> = Tensor::random([pool_slots, kv_heads, d], Distribution::Uniform(-1.0, 1.0), &device);
        let all_slots = Tensor::<1, Int>::arange(0..pool_slots as i64, &device);
        let stored = |storage: KvStorage, pool: &Tensor<3>| (KvPages::zeroed(storage, [pool_slots, kv_heads, d], &device).write(all_slots.clone(), pool.clone()), storage.name());
        // Row 0 sees 601 keys (blocks reversed), row 1 333 (blocks from the middle, rotated).
        let lens = [601usize, 333];
        let max_blocks = 151;
        let mut table = vec![0usize; 2 * max_blocks];
        for b in 0..max_blocks {
            table[b] = 159 - b;
            table[max_blocks + b] = (b * 7 + 3) % 160;
        }
        let queries: Vec<f32> = values(Tensor::<3>::random([2, heads, d], Distribution::Uniform(-1.0, 1.0), &device));
        let storages = [KvStorage::Dense(DType::F32), KvStorage::Coded(KvCodes::Int8), KvStorage::Coded(KvCodes::Fp8), KvStorage::Dense(DType::F16), KvStorage::Dense(DType::BF16)];
        for ((k_pages, name), (v_pages, _)) in storages.map(|s| (stored(s, &kp), stored(s, &vp))) {
            let pages = (k_pages, v_pages);
            let (kv, vv) = (values(pages.0.values(DType::F32)), values(pages.1.values(DType::F32)));
            for window in [None, Some(100)] {
                for n in [1usize, 2] {
                    let got: Option<(Vec<f32>, Vec<f32>, Vec<f32>)> = with_pool_rows(&pages.0, |keys| {
                        with_pool_rows(&pages.1, |vals| {
                            let step = PhasedStep { keys, values: vals, queries: &queries[..n * heads * d], table: &table[..n * max_blocks], lens: &lens[..n], max_blocks, heads, kv_heads, d, block_tokens: bt, window, scale: 0.3 };
                            let (two, three) = (attend_phased(&step, 2), attend_phased(&step, 3));
                            // The one-region tasks: per (row, key head), and per query head.
                            let mut by_group = vec![0f32; n * heads * d];
                            let mut by_head = vec![0f32; n * heads * d];
                            for r in 0..n {
                                for h in 0..heads {
                                    for (per, out) in [(group, &mut by_group), (1, &mut by_head)] {
                                        if h % per != 0 {
                                            continue;
                                        }
                                        let task = GroupTask {
                                            keys,
                                            values: vals,
                                            queries: &queries[(r * heads + h) * d..(r * heads + h + per) * d],
                                            table: &table[r * max_blocks..(r + 1) * max_blocks],
                                            first: window.map_or(0, |w| lens[r].saturating_sub(w)),
                                            len: lens[r],
                                            block_tokens: bt,
                                            kv_heads,
                                            kvh: h / group,
                                            d,
                                            scale: 0.3,
                                        };
                                        attend_group(&task, &mut out[(r * heads + h) * d..(r * heads + h + per) * d]);
                                    }
                                }
                            }
                            assert_eq!(by_group, by_head, "{name}: the one-region tasks differ by grouping");
                            assert_eq!(three, two, "{name}, window {window:?}, {n} rows: 3 threads' shares against 2's");
                            Some((two, by_group, by_head))
                        })
                    });
                    let (phased, one_region, _) = got.expect("CPU pools");
                    assert_eq!(phased, one_region, "{name}, window {window:?}, {n} rows: phased against one region");
                    // And the attention itself.
                    for r in 0..n {
                        let slots = || (0..lens[r]).map(|j| table[r * max_blocks + j / bt] * bt + j % bt);
                        let (ks, vs) = (crate::attention::rows_at(&kv, slots(), kv_heads * d), crate::attention::rows_at(&vv, slots(), kv_heads * d));
                        let want = crate::attention::dense_reference(&queries[r * heads * d..(r + 1) * heads * d], &ks, &vs, 1, lens[r], heads, kv_heads, d, window, 0.3);
                        for (a, b) in phased[r * heads * d..(r + 1) * heads * d].iter().zip(&want) {
                            assert!((a - b).abs() < 1e-5, "{name}, window {window:?}, row {r}: {a} vs {b}");
                        }
                    }
                }
            }
        }
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
        let qv = values(q.clone());
        // The pools as every storage writes them: every slot written (rounded or quantized)
        // once.
        let all_slots = Tensor::<1, Int>::arange(0..pool_slots as i64, &device);
        let stored = |storage: KvStorage, pool: &Tensor<3>| KvPages::zeroed(storage, [pool_slots, kv_heads, d], &device).write(all_slots.clone(), pool.clone());
        let (dense, int8, fp8) = (KvStorage::Dense, KvStorage::Coded(KvCodes::Int8), KvStorage::Coded(KvCodes::Fp8));
        // Unlimited, and capped so that chunks run in pieces of sequences (the two 3 x 7
        // chunks: 84 scores each over 4 heads) and of query rows (5 x 11 x 4 = 220 > 100).
        // f32 pools: decode rows read the pools in place (`cpu_decode_attention`); bf16 ones
        // of a bf16 attention take the gathered reference, to bf16's rounding. Coded pages and
        // 16-bit pages of an f32 attention: decode rows and prefill tiles read them in place,
        // the reference gathers them widened; all give the attention of the stored values.
        for (window, cap, dtype, storage) in [
            (None, MAX_SCORES, DType::F32, dense(DType::F32)),
            (Some(3), MAX_SCORES, DType::F32, dense(DType::F32)),
            (None, 100, DType::F32, dense(DType::F32)),
            (Some(3), 100, DType::F32, dense(DType::F32)),
            (Some(3), MAX_SCORES, DType::BF16, dense(DType::BF16)),
            (None, MAX_SCORES, DType::F32, int8),
            (Some(3), 100, DType::F32, int8),
            (None, MAX_SCORES, DType::F32, fp8),
            (Some(3), 100, DType::F32, fp8),
            (None, MAX_SCORES, DType::F32, dense(DType::F16)),
            (Some(3), 100, DType::F32, dense(DType::F16)),
            (Some(3), MAX_SCORES, DType::F32, dense(DType::BF16)),
        ] {
            let (k, v) = (stored(storage, &kp), stored(storage, &vp));
            assert_eq!(k.storage(), storage);
            // What attention should see: the pages' values (coded: decoded).
            let (kv, vv) = (values(k.values(DType::F32)), values(v.values(DType::F32)));
            let layout = PagedLayout::new(&spans, bt, &[None, Some(3)], &device);
            let decode = layout.decode.as_ref().expect("decode rows");
            let fast = cpu_decode_attention(&q.clone().narrow(0, 0, 2).cast(dtype), &k, &v, decode, bt, window, 0.25);
            assert_eq!(fast.is_some(), dtype == DType::F32, "the in-place path takes f32 queries over f32, 16-bit or coded pools");
            let tolerance = if dtype == DType::F32 { 1e-5 } else { 3e-2 };
            // The default way, and the reference (gathered chunks) with and without its causal
            // cut (pieces of at most 2 rows here, each over only the keys its rows see).
            for (path, cut) in [(PrefillPath::Cheaper, Some(CAUSAL_PIECE_ROWS)), (PrefillPath::Reference, None), (PrefillPath::Reference, Some(2))] {
            let got = values(paged_attention_within(q.clone().cast(dtype), &k, &v, &layout, window, 0.25, cap, cut, path).cast(DType::F32));
            let mut at = 0;
            for s in &spans {
                // The sequence's keys and values, contiguous.
                let slots = || (0..s.context).map(|j| slot_of(&s.blocks, bt, j));
                let (ks, vs) = (crate::attention::rows_at(&kv, slots(), kv_heads * d), crate::attention::rows_at(&vv, slots(), kv_heads * d));
                let qs = &qv[at * heads * d..(at + s.queries) * heads * d];
                let want = crate::attention::dense_reference(qs, &ks, &vs, s.queries, s.context, heads, kv_heads, d, window, 0.25);
                let have = &got[at * heads * d..(at + s.queries) * heads * d];
                for (a, b) in have.iter().zip(&want) {
                    assert!((a - b).abs() < tolerance, "window {window:?}, cap {cap}, cut {cut:?}, {dtype:?} over {storage:?}, span {s:?}: {a} vs {b}");
                }
                at += s.queries;
            }
            }
        }
    }

    /// The prefill kernel's rows (each query token a row of its chunk's table, seeing up to its
    /// own position) are the chunks' causal attention: run as decode rows by the CPU's decode
    /// path (the kernel's arithmetic, one row at a time), they give the dense attention of
    /// each chunk, with and without a window.
    #[test]
    fn prefill_rows_are_each_tokens_causal_view_of_its_chunk() {
        let device = Device::flex();
        let (heads, kv_heads, d, bt) = (4, 2, 16, 4);
        let spans = vec![
            Span { queries: 5, context: 11, blocks: vec![3, 8, 1] },
            Span { queries: 3, context: 3, blocks: vec![12] },
            Span { queries: 2, context: 9, blocks: vec![0, 5, 9] },
        ];
        let (table, max_blocks, seqs, lens) = prefill_rows(&spans, bt);
        assert_eq!(max_blocks, 3);
        assert_eq!(seqs, [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]);
        assert_eq!(lens, [7, 8, 9, 10, 11, 1, 2, 3, 8, 9]);
        assert_eq!(&table[3..6], [12, 0, 0], "a short chunk's row is padded with block 0");
        let pool_slots = 13 * bt;
        let kp: Tensor<3> = Tensor::random([pool_slots, kv_heads, d], Distribution::Uniform(-1.0, 1.0), &device);
        let vp: Tensor<3> = Tensor::random([pool_slots, kv_heads, d], Distribution::Uniform(-1.0, 1.0), &device);
        let tokens = seqs.len();
        let q: Tensor<3> = Tensor::random([tokens, heads, d], Distribution::Uniform(-1.0, 1.0), &device);
        let (kv, vv, qv) = (values(kp.clone()), values(vp.clone()), values(q.clone()));
        // Each token's table row, as a decode row's.
        let per_token: Vec<i64> = seqs.iter().flat_map(|&s| table[s as usize * max_blocks..(s as usize + 1) * max_blocks].to_vec()).collect();
        let rows = DecodeRows::new(
            Tensor::<2, Int>::from_data(TensorData::new(per_token, [tokens, max_blocks]), &device),
            ints(lens.clone(), &device),
        );
        for window in [None, Some(3)] {
            let got = values(cpu_decode_attention(&q, &KvPages::Dense(kp.clone()), &KvPages::Dense(vp.clone()), &rows, bt, window, 0.25).expect("f32 pools on the CPU"));
            let mut at = 0;
            for s in &spans {
                let slots = || (0..s.context).map(|j| slot_of(&s.blocks, bt, j));
                let (ks, vs) = (crate::attention::rows_at(&kv, slots(), kv_heads * d), crate::attention::rows_at(&vv, slots(), kv_heads * d));
                let want = crate::attention::dense_reference(&qv[at * heads * d..(at + s.queries) * heads * d], &ks, &vs, s.queries, s.context, heads, kv_heads, d, window, 0.25);
                for (a, b) in got[at * heads * d..(at + s.queries) * heads * d].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "window {window:?}, span {s:?}: {a} vs {b}");
                }
                at += s.queries;
            }
        }
    }

    #[test]
    fn causal_pairs_count_each_tokens_visible_keys() {
        let span = |queries, context| Span { queries, context, blocks: Vec::new() };
        for (queries, context) in [(1, 1), (5, 11), (512, 512), (64, 2112), (3, 3)] {
            for window in [None, Some(1), Some(3), Some(64), Some(600), Some(5000)] {
                let want: usize = (context + 1 - queries..=context).map(|l| l.min(window.unwrap_or(usize::MAX))).sum();
                assert_eq!(causal_pairs(&span(queries, context), window), want, "{queries} over {context}, window {window:?}");
            }
        }
    }

    /// The measured cases (H100, bf16, Qwen3-4B's 32 heads) land on the faster side.
    #[test]
    fn the_prefill_kernel_runs_where_it_was_measured_faster() {
        let span = |queries, context| Span { queries, context, blocks: Vec::new() };
        // Short prompts: the kernel (time to first token 37.5 -> 24.9 ms at 20 tokens, 40 ->
        // 28 ms at 512).
        assert!(prefill_kernel_pays(&[span(20, 20)], 32, None));
        assert!(prefill_kernel_pays(&[span(512, 512)], 32, None));
        // Long chunks: the reference (2,048 tokens: 1.1 against 3.9 ms a layer; sixteen of 512:
        // 2.7 against 5.4 ms; the offline workload fell from 6,645 to 5,212 tokens/s on the
        // kernel alone).
        assert!(!prefill_kernel_pays(&[span(2048, 2048)], 32, None));
        assert!(!prefill_kernel_pays(&vec![span(512, 512); 16], 32, None));
        // A window hides most of a long context from the kernel, not from the reference.
        assert!(prefill_kernel_pays(&[span(200, 1000), span(33, 33), span(130, 130)], 32, Some(64)));
    }

    #[test]
    fn prefill_scores_are_cut_into_pieces_under_the_cap() {
        // Sixteen 512-token prompts of Qwen3-4B (32 heads): 8.4M scores each, 8 a piece.
        assert_eq!(score_pieces(16, 512, 512, 32, MAX_SCORES), (8, 512));
        // Four 2,112-token prompts: 143M scores each, so each runs in three pieces of rows.
        assert_eq!(score_pieces(4, 2112, 2112, 32, MAX_SCORES), (1, 704));
        // Small chunks run whole.
        assert_eq!(score_pieces(3, 5, 11, 4, MAX_SCORES), (3, 5));
        // The test above's cap of 100: sequences of 84 scores one at a time, 220 in 3 pieces.
        assert_eq!(score_pieces(2, 3, 7, 4, 100), (1, 3));
        assert_eq!(score_pieces(1, 5, 11, 4, 100), (1, 2));
        // Never a piece of nothing, even when one row is over the cap.
        assert_eq!(score_pieces(1, 3, 1000, 32, 100), (1, 1));
    }

    #[test]
    fn long_chunks_run_in_causal_pieces_over_the_keys_their_rows_see() {
        let cut = Some(CAUSAL_PIECE_ROWS);
        // One 2,048-token prompt of Qwen3-4B: four even pieces of 512 rows (the cap alone: two
        // of 1,024), over 512, 1,024, 1,536 and 2,048 keys: 62.5 % of the square.
        assert_eq!(reference_pieces(1, 2048, 2048, 32, MAX_SCORES, cut), (1, 512));
        assert_eq!(reference_pieces(1, 2048, 2048, 32, MAX_SCORES, None), (1, 1024));
        assert_eq!(piece_keys(2048, 2048, 1536, 512, None, cut), 0..2048);
        assert_eq!(piece_keys(2048, 2048, 0, 512, None, cut), 0..512);
        let span = |queries, context| Span { queries, context, blocks: Vec::new() };
        assert_eq!(reference_pairs(&span(2048, 2048), 32, None), 2048 * 2048 * 5 / 8);
        // A chunk over a cached prefix: its rows see the prefix and the chunk up to themselves.
        assert_eq!(piece_keys(2048, 8192, 512, 512, None, cut), 0..7168);
        // 600 rows: two even pieces of 300, not 512 and 88; sixteen 512-token prompts stay
        // whole, eight a piece.
        assert_eq!(reference_pieces(4, 600, 600, 32, MAX_SCORES, cut), (4, 300));
        assert_eq!(reference_pieces(16, 512, 512, 32, MAX_SCORES, cut), (8, 512));
        // A window also drops the keys before the first row's oldest: row 300 of 600 sees
        // keys 237..=300 with a window of 64.
        assert_eq!(piece_keys(600, 600, 300, 300, Some(64), cut), 237..600);
        assert_eq!(piece_keys(600, 600, 0, 300, Some(64), cut), 0..300);
        // Off: every piece over the whole context.
        assert_eq!(piece_keys(600, 600, 0, 300, Some(64), None), 0..600);
    }
}
