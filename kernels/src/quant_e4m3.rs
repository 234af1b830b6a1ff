//! FP8 weights kept as FP8: [`QuantizedMatrix`]es of OCP FP8 E4M3 codes
//! ([`CodeFormat::E4m3`], OCP "8-bit Floating Point Specification (OFP8)" rev. 1.0), one byte a
//! weight with a scale per group of inputs, `w = scale · e4m3(code)`.
//!
//! - Qwen's and DeepSeek's FP8 checkpoints store each linear weight as E4M3 bytes and a
//!   `weight_scale_inv` per block of `[128, 128]` that multiplies (transformers
//!   `integrations/finegrained_fp8.py`, `FP8Linear`): [`QuantizedMatrix::from_e4m3_blocks`]
//!   keeps the bytes and gives each row's groups their block's scale.
//! - `quantization = "fp8"` makes the same form at load from a bf16/f32 checkpoint
//!   ([`QuantizedMatrix::quantize_fp8`]: blocks of 128 x 128, `scale = max|w| / 448`, each
//!   weight the nearest E4M3 value), as vLLM's and transformers' block-wise FP8 quantization.
//!
//! Products read the bytes and convert them in registers through their bits: sign, exponent and
//! mantissa moved into an f32's places are the value times `2^-120`
//! ([`crate::kv_pages::e4m3_bits_to_f32`]). The activations are taken times `2^60` and the
//! group scale carries the other `2^60`, both exact, so that no product is subnormal unless its
//! activation is below `2^-57`. The activations are otherwise as they are: on the CPU a row loop for up to
//! [`crate::quant::CPU_FUSED_ROWS`] rows (more rows: dequantized slices through the matrix
//! product, as for integer codes); on CubeCL devices [`launch_e4m3_matvec`] for up to
//! [`E4M3_KERNEL_MAX_ROWS`] rows (one plane per output channel, as the integer kernel), more
//! rows dequantized to the activations' dtype for cuBLAS. (Hopper's FP8 tensor-core GEMM
//! would need the activations in FP8 too: not done.)

use crate::kv_pages::{e4m3_bits, e4m3_from_f32};
use crate::quant::{CodeFormat, GroupScales, QuantError, QuantizedMatrix};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Shape;
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use rayon::prelude::*;

/// The block [`QuantizedMatrix::quantize_fp8`] takes a scale over: 128 x 128 (Qwen's FP8
/// checkpoints' `weight_block_size`).
pub const FP8_BLOCK: usize = 128;

/// E4M3's largest finite value.
const E4M3_MAX: f32 = 448.0;

pub(crate) fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl QuantizedMatrix {
    /// E4M3 bytes `[rows, cols]` (row-major) with a scale per block of `[bo, bi]` (`scales`
    /// `[⌈rows / bo⌉, ⌈cols / bi⌉]`, row-major: the scale that multiplies, a checkpoint's
    /// `weight_scale_inv`), kept as they are. Each row's groups of `gcd(bi, cols)` inputs take
    /// their block's scale; the groups must be whole words (a multiple of 4).
    pub fn from_e4m3_blocks(rows: usize, cols: usize, bytes: &[u8], scales: &[f32], [bo, bi]: [usize; 2]) -> Result<Self, QuantError> {
        if bo == 0 || bi == 0 {
            return Err(QuantError(format!("FP8 blocks of [{bo}, {bi}]")));
        }
        let (block_rows, block_cols) = (rows.div_ceil(bo), cols.div_ceil(bi));
        if bytes.len() != rows * cols || scales.len() != block_rows * block_cols {
            return Err(QuantError(format!(
                "an FP8 [{rows}, {cols}] matrix in blocks of [{bo}, {bi}] needs {} bytes and {} scales, got {} and {}",
                rows * cols,
                block_rows * block_cols,
                bytes.len(),
                scales.len()
            )));
        }
        let group = gcd(bi, cols);
        if cols == 0 || !group.is_multiple_of(4) {
            return Err(QuantError(format!("FP8 blocks of {bi} inputs in rows of {cols}: groups of {group} are not whole 4-byte words")));
        }
        let groups = cols / group;
        let row_scales: Vec<f32> = (0..rows * groups).map(|i| scales[(i / groups / bo) * block_cols + (i % groups) * group / bi]).collect();
        Ok(Self::e4m3(rows, cols, group, bytes, row_scales))
    }

    /// FP8 E4M3 made from `values` (`[rows, cols]`, row-major): per block of [`FP8_BLOCK`] x
    /// [`FP8_BLOCK`] `scale = max|w| / 448`, each weight the E4M3 value nearest `w / scale`
    /// (ties to even). Rows of a width that is not a multiple of 4 cannot be laid out.
    pub fn quantize_fp8(values: &[f32], rows: usize, cols: usize) -> Result<Self, QuantError> {
        if values.len() != rows * cols {
            return Err(QuantError(format!("{} values for a [{rows}, {cols}] matrix", values.len())));
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(QuantError("a weight that is not finite cannot be quantized".into()));
        }
        let (b, block_cols) = (FP8_BLOCK, cols.div_ceil(FP8_BLOCK));
        let scales: Vec<f32> = (0..rows.div_ceil(b) * block_cols)
            .into_par_iter()
            .map(|i| {
                let (r0, c0) = ((i / block_cols) * b, (i % block_cols) * b);
                let amax = (r0..(r0 + b).min(rows)).flat_map(|r| &values[r * cols + c0..r * cols + (c0 + b).min(cols)]).fold(0f32, |m, v| m.max(v.abs()));
                if amax > 0.0 { amax / E4M3_MAX } else { 1.0 }
            })
            .collect();
        let bytes: Vec<u8> = values
            .par_iter()
            .enumerate()
            .map(|(i, &v)| e4m3_from_f32(v / scales[(i / cols / b) * block_cols + (i % cols) / b]))
            .collect();
        Self::from_e4m3_blocks(rows, cols, &bytes, &scales, [b, b])
    }

    /// E4M3 `bytes` with per-row group scales `[rows, cols / group]`.
    fn e4m3(rows: usize, cols: usize, group: usize, bytes: &[u8], scales: Vec<f32>) -> Self {
        let codes = bytes.par_chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
        let mins = vec![0f32; scales.len()];
        Self { rows, cols, bits: 8, group, codes, groups: GroupScales::new(scales, mins), format: CodeFormat::E4m3 }
    }

    /// [`QuantizedMatrix::matmul`] of E4M3 codes: `n` rows of f32 activations, each through
    /// the same one-row loop (a batch's rows equal each row alone), output channels split
    /// over rayon's threads. The activations are taken times `2^60` (exact) and the group
    /// scales times the other `2^60` of the `2^120` that turns a byte's bits into its value, so
    /// that no product of bits and activation is a subnormal (slow on x86 CPUs) unless the
    /// activation is below `2^-57`.
    pub(crate) fn matmul_e4m3(&self, x: &[f32], n: usize) -> Vec<f32> {
        let xs: Vec<f32> = x.iter().map(|v| v * TWO_60).collect();
        let mut out_t = vec![0f32; self.rows * n];
        let chunk = (self.rows / (4 * rayon::current_num_threads()).max(1)).clamp(1, 256);
        out_t.par_chunks_mut(chunk * n.max(1)).enumerate().for_each(|(c, block)| {
            for (i, ys) in block.chunks_exact_mut(n.max(1)).enumerate() {
                for (j, y) in ys.iter_mut().enumerate() {
                    *y = e4m3_row_dot(self, c * chunk + i, &xs[j * self.cols..(j + 1) * self.cols]);
                }
            }
        });
        crate::quant::transpose(out_t, n)
    }
}

/// `2^60`, half of the `2^(127 - 7)` between an E4M3 byte's bits moved into an f32's places and
/// its value.
const TWO_60: f32 = f32::from_bits((127 + 60) << 23);

/// Row `row` of E4M3 matrix `m` times `x` (activations times `2^60`): per group `scale · 2^60 ·
/// Σ bits(code) · x`.
fn e4m3_row_dot(m: &QuantizedMatrix, row: usize, x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::cpu_has_avx2() && m.group.is_multiple_of(16) {
        // SAFETY: the CPU has AVX2 and FMA (detected at run time), the only requirement of
        // calling a function compiled for them; the shapes are the matrix's own.
        return unsafe { e4m3_row_dot_avx2(m, row, x) };
    }
    e4m3_row_dot_portable(m, row, x)
}

/// [`e4m3_row_dot`] in AVX2 and FMA: sixteen bytes a step, widened to two vectors of eight
/// 32-bit lanes, moved into f32 places and multiplied into two accumulators per group.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn e4m3_row_dot_avx2(m: &QuantizedMatrix, row: usize, x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let words = m.words_per_row();
    let codes = &m.codes[row * words..(row + 1) * words];
    assert!(x.len() == m.cols && m.group.is_multiple_of(16), "an E4M3 row of {} in groups of {} against {} activations", m.cols, m.group, x.len());
    let groups = m.groups_per_row();
    let (seven_f, eighty) = (_mm256_set1_epi32(0x7F), _mm256_set1_epi32(0x80));
    let mut total = 0f32;
    for (g, (gx, gw)) in x.chunks_exact(m.group).zip(codes.chunks_exact(m.group / 4)).enumerate() {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (xs, ws) in gx.chunks_exact(16).zip(gw.chunks_exact(4)) {
            // SAFETY: `ws` is 4 words (16 bytes) and `xs` 16 f32s, both in bounds (chunks of
            // exactly those lengths); unaligned loads.
            let (v, x0, x1) = unsafe { (_mm_loadu_si128(ws.as_ptr().cast()), _mm256_loadu_ps(xs.as_ptr()), _mm256_loadu_ps(xs.as_ptr().add(8))) };
            let lo = _mm256_cvtepu8_epi32(v);
            let hi = _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(v));
            let bits = |b: __m256i| _mm256_castsi256_ps(_mm256_or_si256(_mm256_slli_epi32::<20>(_mm256_and_si256(b, seven_f)), _mm256_slli_epi32::<24>(_mm256_and_si256(b, eighty))));
            a0 = _mm256_fmadd_ps(bits(lo), x0, a0);
            a1 = _mm256_fmadd_ps(bits(hi), x1, a1);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 f32s.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(a0, a1)) };
        let sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        total += m.groups.scale(row * groups + g) * TWO_60 * sum;
    }
    total
}

/// [`e4m3_row_dot`] in portable code.
fn e4m3_row_dot_portable(m: &QuantizedMatrix, row: usize, x: &[f32]) -> f32 {
    let words = m.words_per_row();
    let codes = &m.codes[row * words..(row + 1) * words];
    let groups = m.groups_per_row();
    let mut total = 0f32;
    for (g, (gx, gw)) in x.chunks_exact(m.group).zip(codes.chunks_exact(m.group / 4)).enumerate() {
        let mut lanes = [0f32; 4];
        for (xs, w) in gx.chunks_exact(4).zip(gw) {
            for ((lane, &xv), b) in lanes.iter_mut().zip(xs).zip(w.to_le_bytes()) {
                *lane += e4m3_bits(b) * xv;
            }
        }
        total += m.groups.scale(row * groups + g) * TWO_60 * ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]));
    }
    total
}

/// Up to this many rows an FP8 product runs through [`launch_e4m3_matvec`]; more dequantize the
/// weight for cuBLAS. Each row costs the kernel about 11 µs more on Qwen3-4B's q/k/v (every
/// channel's plane reads the row's f32 activations from L2): 13.2 µs at 1 row, 21.6 at 2, 44.5
/// at 4, 91.7 at 8, where dequantizing for cuBLAS takes about 40 (H100, `kernel_check quant`,
/// 2026-12-07, `gpu-h100-2026-12-07b-fp8-kernel.md`).
pub const E4M3_KERNEL_MAX_ROWS: usize = 4;

/// Whether [`launch_e4m3_matvec`] takes `n` rows of `cols` against groups of `group`: up to
/// [`E4M3_KERNEL_MAX_ROWS`] rows, whole 16-byte chunks in each group.
pub fn e4m3_kernel_applies(n: usize, cols: usize, group: usize) -> bool {
    (1..=E4M3_KERNEL_MAX_ROWS).contains(&n) && cols.is_multiple_of(16) && group.is_multiple_of(16)
}

/// The kernel, apart from burn's names.
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    /// Element `i` of `x` as f32, times `2^60` (exact: half of the `2^120` that turns an E4M3
    /// byte's bits into its value, so that the matrix-vector kernel multiplies the bits by the
    /// activations directly and the other half joins the group scale).
    #[cube(launch_unchecked)]
    pub fn activations_f32_kernel<E: Float>(x: &Tensor<E>, out: &mut [f32], total: usize, #[define(E)] _dtype: ElemType) {
        let i = ABSOLUTE_POS;
        if i >= total {
            terminate!();
        }
        let two_60 = comptime!(f32::from_bits((127 + 60) << 23));
        out[i] = f32::cast_from(x[i]) * f32::new(two_60);
    }

    /// One plane per output channel, all of the activation rows (`nrows`, f32 times `2^60`) at
    /// once: each lane takes 16-byte chunks of the channel's codes (16 weights within one
    /// group), moves each byte's sign, exponent and mantissa into an f32's places and
    /// multiplies them by the rows' activations, the chunk's sum times its group's scale and
    /// `2^60`.
    #[cube(launch_unchecked)]
    pub fn e4m3_matvec_kernel<E: Float, N: Size>(
        x: &[Vector<f32, N>],
        codes: &[Vector<u32, N>],
        scales: &[f32],
        out: &mut Tensor<E>,
        cols: usize,
        groups: usize,
        #[comptime] group: usize,
        #[comptime] nrows: usize,
        #[define(E)] _dtype: ElemType,
    ) {
        let channel = (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) as usize;
        let channels = out.shape(1);
        if channel >= channels {
            terminate!();
        }
        let chunks = cols / 16;
        let mut acc = Array::<f32>::new(nrows);
        #[unroll]
        for r in 0..nrows {
            acc[r] = 0.0;
        }
        let two_60 = comptime!(f32::from_bits((127 + 60) << 23));
        let mut w = Array::<f32>::new(16usize);
        let step = PLANE_DIM as usize;
        let mut c = UNIT_POS_X as usize;
        while c < chunks {
            let wv = codes[channel * chunks + c];
            let start = c * 16;
            // The bytes' bits in an f32's places are their values times 2^-120: the activations
            // carry 2^60 of it, the group scale the rest. (A product is then at least 2^-69
            // times its activation: normal, and exact as a product of values, unless the
            // activation is below 2^-57.)
            let gs = scales[channel * groups + start / group] * f32::new(two_60);
            #[unroll]
            for k in 0..4usize {
                let word = wv.extract(k);
                #[unroll]
                for j in 0..4usize {
                    let b = (word >> comptime!(8 * j as u32)) & 0xFF;
                    w[k * 4 + j] = f32::reinterpret(((b & 0x7F) << 20) | ((b & 0x80) << 24));
                }
            }
            #[unroll]
            for r in 0..nrows {
                // Four vectors of four activations: inputs `start .. start + 16` of row `r`.
                let at = (r * cols + start) / 4;
                let mut s = 0f32;
                #[unroll]
                for k in 0..4usize {
                    let xv = x[at + k];
                    #[unroll]
                    for j in 0..4usize {
                        s += w[k * 4 + j] * xv.extract(j);
                    }
                }
                acc[r] += gs * s;
            }
            c += step;
        }
        #[unroll]
        for r in 0..nrows {
            let total = plane_sum(acc[r]);
            if UNIT_POS_X == 0 {
                out[r * channels + channel] = E::cast_from(total);
            }
        }
    }
}

/// `x` (contiguous, any float dtype) as f32 times `2^60` in a buffer of its own (aligned for the
/// matrix-vector kernel's 16-byte loads: it read each bf16 activation with a load of its own, and took 20 µs
/// for Qwen3-4B's q/k/v at one row, 16 µs more per row, on an H100, 2026-12-07).
fn activations_f32(x: CubeTensor) -> CubeTensor {
    let (n, cols) = (x.meta.shape()[0], x.meta.shape()[1]);
    let out = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([n, cols]), burn::tensor::DType::F32);
    let (client, dtype, total) = (x.client.clone(), x.dtype, n * cols);
    let units = 256u32;
    // SAFETY: one unit per element, `i < n * cols` checked; `x` is contiguous `[n, cols]`
    // (the caller's `into_contiguous`), `out` has `n * cols` f32s.
    unsafe {
        device::activations_f32_kernel::launch_unchecked(
            &client,
            CubeCount::Static((total as u32).div_ceil(units), 1, 1),
            CubeDim::new_1d(units),
            x.into_tensor_arg(),
            out.clone().into_buffer_arg(),
            total,
            dtype_to_storage_type(dtype),
        )
    };
    out
}

/// `x [n, cols] · Wᵀ -> [n, rows]` in `x`'s dtype, for `W` E4M3 `codes [rows, cols / 4]` (u32
/// words, byte `k` of word `w` the code of input `4w + k`) with `scales [rows, cols / group]`
/// (f32), `n` and the shapes as [`e4m3_kernel_applies`] says.
pub(crate) fn launch_e4m3_matvec(x: CubeTensor, codes: CubeTensor, scales: CubeTensor, group: usize) -> CubeTensor {
    let (x, codes, scales) = (into_contiguous(x), into_contiguous(codes), into_contiguous(scales));
    let (rows, words) = (codes.meta.shape()[0], codes.meta.shape()[1]);
    let groups = scales.meta.shape()[1];
    let (n, cols) = (x.meta.shape()[0], x.meta.shape()[1]);
    assert_eq!(cols, words * 4, "E4M3 matvec: activations and weight disagree");
    assert!(e4m3_kernel_applies(n, cols, group) && groups * group == cols, "E4M3 matvec: {n} rows of {cols} in groups of {group}");
    let dtype = x.dtype;
    let x = activations_f32(x);
    let out = empty_device_contiguous_dtype(codes.client.clone(), codes.device.clone(), Shape::new([n, rows]), dtype);
    let client = out.client.clone();
    let (cube_count, cube_dim) = crate::quant::channel_planes(rows);
    // SAFETY: `channel < rows` (checked in the kernel); chunk `c < cols / 16` of its row's
    // `cols / 16` 16-byte vectors; its group `16c / group < groups`; activation vectors `(r *
    // cols + 16c) / 4 + k < n * cols / 4` for `r < n`, `k < 4` (a fresh f32 buffer, `cols` a
    // multiple of 16); outputs `r * rows + channel < n * rows`.
    unsafe {
        device::e4m3_matvec_kernel::launch_unchecked(
            &client,
            cube_count,
            cube_dim,
            4,
            x.into_buffer_arg(),
            codes.into_buffer_arg(),
            scales.into_buffer_arg(),
            out.clone().into_tensor_arg(),
            cols,
            groups,
            group,
            n,
            dtype_to_storage_type(dtype),
        )
    };
    out
}

/// The dense form of `m`'s weights in the reference arithmetic (`e4m3_to_f32`, the table of
/// the OCP values), for tests.
#[cfg(test)]
fn reference_values(m: &QuantizedMatrix) -> Vec<f32> {
    (0..m.rows)
        .flat_map(|r| (0..m.cols).map(move |c| (r, c)))
        .map(|(r, c)| m.groups.scale(r * m.groups_per_row() + c / m.group) * crate::kv_pages::e4m3_to_f32(m.code(r, c) as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Activations;

    fn values(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        // Spread over several binades, with a few exact zeros and tiny values (E4M3 subnormals).
        (0..rows * cols)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) >> 8;
                let u = (h % 20_001) as f32 / 10_000.0 - 1.0;
                if i % 97 == 0 { 0.0 } else if i % 89 == 0 { u * 1e-5 } else { u * u * u * 3.0 }
            })
            .collect()
    }

    #[test]
    fn checkpoint_blocks_keep_their_bytes_and_each_group_takes_its_blocks_scale() {
        // [3, 8] in blocks of [2, 4]: scales [2, 2].
        let bytes: Vec<u8> = (0..24u8).map(|i| i.wrapping_mul(37) & 0x7E).collect();
        let scales = [1.0f32, 2.0, 0.5, 0.25];
        let m = QuantizedMatrix::from_e4m3_blocks(3, 8, &bytes, &scales, [2, 4]).expect("blocks");
        assert_eq!((m.group, m.format, m.bits), (4, CodeFormat::E4m3, 8));
        let want: Vec<f32> = (0..24).map(|i| crate::kv_pages::e4m3_to_f32(bytes[i]) * scales[(i / 8 / 2) * 2 + (i % 8) / 4]).collect();
        assert_eq!(m.dequantize(), want);
        for (i, &b) in bytes.iter().enumerate() {
            assert_eq!(m.code(i / 8, i % 8), u32::from(b));
        }
        // A block wider than the row (one group of the whole row), and a row of 6: groups of 2.
        assert_eq!(QuantizedMatrix::from_e4m3_blocks(3, 8, &bytes, &[1.0, 2.0], [2, 128]).expect("wide").group, 8);
        assert!(QuantizedMatrix::from_e4m3_blocks(4, 6, &bytes, &[1.0; 4], [2, 4]).is_err());
        assert!(QuantizedMatrix::from_e4m3_blocks(3, 8, &bytes, &scales[..3], [2, 4]).is_err());
    }

    #[test]
    fn quantized_fp8_is_within_half_a_step_of_each_weight() {
        let (rows, cols) = (130, 264);
        let v = values(rows, cols, 1);
        let m = QuantizedMatrix::quantize_fp8(&v, rows, cols).expect("fp8");
        assert_eq!((m.group, m.format), (8, CodeFormat::E4m3));
        let d = m.dequantize();
        assert_eq!(d, reference_values(&m));
        for (i, (&w, &q)) in v.iter().zip(&d).enumerate() {
            let (r, c) = (i / cols, i % cols);
            let block_max = (r / 128 * 128..(r / 128 * 128 + 128).min(rows))
                .flat_map(|rr| &v[rr * cols + c / 128 * 128..rr * cols + (c / 128 * 128 + 128).min(cols)])
                .fold(0f32, |a, x| a.max(x.abs()));
            let scale = block_max / 448.0;
            // Half a step: 1/16 of the value's binade (3 mantissa bits), at least half the
            // subnormal step 2^-9 of the scale.
            let bound = (w.abs() / 16.0).max(scale * 2f32.powi(-10)) * 1.0001;
            assert!((w - q).abs() <= bound, "w[{r}, {c}] = {w} became {q} (bound {bound})");
        }
        // The largest weight of the first block is exact (448 · scale).
        let (at, amax) = (0..128 * cols).filter(|i| i % cols < 128).map(|i| (i, v[i].abs())).fold((0, 0f32), |a, b| if b.1 > a.1 { b } else { a });
        assert!((d[at].abs() - amax).abs() <= amax * 1e-6, "{} against {amax}", d[at]);
    }

    #[test]
    fn the_row_loop_equals_the_dequantized_product_and_each_row_alone() {
        for (rows, cols) in [(37, 256), (9, 136), (5, 24)] {
            let m = QuantizedMatrix::quantize_fp8(&values(rows, cols, 2), rows, cols).expect("fp8");
            let w = reference_values(&m);
            let x: Vec<f32> = values(4, cols, 3).iter().map(|v| v * 2.0 - 0.1).collect();
            let y = m.matmul(&x, 4, Activations::F32);
            for j in 0..4 {
                for r in 0..rows {
                    let want: f64 = (0..cols).map(|c| f64::from(w[r * cols + c]) * f64::from(x[j * cols + c])).sum();
                    let norm: f64 = (0..cols).map(|c| (f64::from(w[r * cols + c]) * f64::from(x[j * cols + c])).abs()).sum();
                    let got = f64::from(y[j * rows + r]);
                    assert!((got - want).abs() <= 1e-6 * norm.max(1e-30), "[{rows}, {cols}] row {j} channel {r}: {got} against {want}");
                }
                let alone = m.matmul(&x[j * cols..(j + 1) * cols], 1, Activations::F32);
                assert_eq!(alone, y[j * rows..(j + 1) * rows], "row {j} of a batch of 4 against alone");
            }
        }
    }

    #[test]
    fn fused_projections_of_fp8_join_and_do_not_mix_with_integer_codes() {
        let a = QuantizedMatrix::quantize_fp8(&values(4, 128, 4), 4, 128).expect("a");
        let b = QuantizedMatrix::quantize_fp8(&values(3, 128, 5), 3, 128).expect("b");
        let ab = QuantizedMatrix::concat_rows(&[a.clone(), b.clone()]).expect("joined");
        assert_eq!(ab.format, CodeFormat::E4m3);
        assert_eq!(ab.dequantize(), [a.dequantize(), b.dequantize()].concat());
        let int8 = QuantizedMatrix::quantize_int8(&values(3, 128, 5), 3, 128).expect("int8");
        assert!(QuantizedMatrix::concat_rows(&[a, int8]).is_none());
    }
}
