//! Weight-only quantized linear layers: a `[out, in]` weight kept as integer codes in groups
//! of consecutive input channels, each group with a scale and offset (f16 where they all are
//! f16 values, else f32: [`GroupScales`]), `w = scale · code + min`. Every format the engine loads reduces to this one form without loss: GGUF's `Q8_0`,
//! `Q4_0`, `Q4_1`, `Q4_K`, `Q5_K` and `Q6_K` blocks (llama.cpp `ggml-quants.c`,
//! `dequantize_row_*`; the 5- and 6-bit codes stored in 8 bits), and what the engine makes at
//! load from a bf16/f32 checkpoint: symmetric int8 per output channel (as LLM.int8's and
//! vLLM's W8A16 weights) and asymmetric int4 in groups of 128 with a zero point (GPTQ's / AWQ's
//! layout, round-to-nearest here).
//!
//! Codes are packed little-endian into `u32` words along each row (4-bit: element `8w + k` in
//! bits `4k..4k + 4` of word `w`; 8-bit: element `4w + k` in byte `k`), so a word never spans
//! two groups. On the CPU the weight stays in host memory and [`QuantizedMatrix::matmul`]
//! multiplies it over rayon's threads: by default decode rows of f32 activations exact against
//! codes converted in registers, or rounded to 8-bit blocks against the codes in integer
//! multiply-adds (llama.cpp's `ggml_vec_dot_q4_1_q8_1`, [`ActivationBlocks8`]); of bf16/f16
//! activations as 16-bit activation blocks (the same structure with 16-bit activations, see
//! [`ActivationBlocks`]). Prompt rows of f32 activations are
//! multiplied in dequantized tiles on x86-64 CPUs with AVX2 ([`QuantizedMatrix::matmul`]'s
//! tiled path: a block of weight rows dequantized once per task, then register-blocked dot
//! products with every activation row, as a GEMM micro-kernel); elsewhere
//! [`QuantizedLinear::forward`] sends them through the backend's matrix product against slices
//! of dequantized rows. The x86-64 loops come in AVX-512 (VNNI for 8-bit activations), AVX2 +
//! FMA (+ F16C for f16 group values) and portable versions, chosen at run time
//! ([`use_avx512`]); on aarch64 the 8-bit-activation loop is written for NEON (`simd::neon`)
//! and the others are the portable loops, which the compiler vectorises for NEON.
//!
//! On CubeCL devices the codes (in a device order, [`device_codes`]), scales and offsets are
//! device buffers. A product of up to [`QUANT_MAX_ROWS`] rows quantizes its activations to
//! 16-bit integers per block of 32 (split into high and low signed bytes) and multiplies them by
//! the codes in `dp4a` integer dot products, reading the codes once for all rows (the structure
//! of llama.cpp's `mul_mat_vec_q` with 16-bit instead of 8-bit activations); more rows
//! dequantize the weight to the activations' dtype and multiply it by cuBLAS (as vLLM's and
//! llama.cpp's dequantize-then-GEMM paths for prefill).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Device, Int, Shape, Tensor, TensorData};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use half::f16;
use rayon::prelude::*;
use std::sync::Arc;
use crate::launch::{PLANE, is_cubecl};

/// Up to this many rows of a product run through the matrix-vector kernel (the codes read once
/// for all rows, each row's sums in registers); more dequantize the weight for cuBLAS. The
/// kernel's time grows with the rows (Qwen3-4B's q/k/v in int8 on an H100: 9.0 µs at 1 row,
/// 28.9 at 8, 57.4 at 16, 151.5 at 32, where dequantizing for cuBLAS took 38.5-40.8 µs at 16
/// and 32; int4 at 16 rows 66.9 against 89.8; `kernel_check quant`, 2026-12-07). With the
/// dequantize kernel writing 16-byte vectors the crossing stays at about 8 rows (H200: int4
/// gate/up 74.9 µs by the kernel at 8 rows, 73.5 dequantized at 16; int8 57.4 against 77.4;
/// `benches/results/gpu-h200-2026-12-07c-dequantize-vectors.md`).
pub const QUANT_MAX_ROWS: usize = 8;
/// Output channels per cube (one plane each), unless `INFERENCE_PIO_QUANT_PLANES` (1 to 32, a
/// power of two) says otherwise. Eight: four and sixteen were within 0.6 µs of it on every
/// Qwen3-4B shape at one row but 4-bit down (10.9 and 12.5 against 11.2 µs; H100,
/// `benches/results/gpu-h100-2026-12-07n-quant-loads.md`).
const CHANNELS_PER_CUBE: u32 = 8;
/// 16-byte chunks of codes each lane of the matrix-vector kernel loads together before it
/// adds their terms, unless `INFERENCE_PIO_QUANT_LOADS` (1, 2, 4 or 8) says otherwise. One: on
/// an H100, Qwen3-4B batch-1 decode with four was slower (int4 346.5 against 355.8 tok/s, int8
/// 304.8 against 314.7); in `kernel_check quant` four were slower on every 4-bit shape (q/k/v
/// 9.9 against 8.4 µs, down 14.1 against 11.2) and faster only on the longest 8-bit row (down,
/// 19 chunks a lane: 11.6 against 14.9), two within 5 % but for an 8-bit q/k/v outlier
/// (`benches/results/gpu-h100-2026-12-07n-quant-loads.md`).
const QUANT_LOADS: usize = 1;

/// [`QUANT_LOADS`] or the switch's value.
fn quant_loads() -> usize {
    static LOADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LOADS.get_or_init(|| crate::launch::env_number("INFERENCE_PIO_QUANT_LOADS", |n| [1, 2, 4, 8].contains(&n), "1, 2, 4 or 8").unwrap_or(QUANT_LOADS))
}

/// [`CHANNELS_PER_CUBE`] or the switch's value.
fn quant_planes() -> u32 {
    static PLANES: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PLANES.get_or_init(|| {
        crate::launch::env_number("INFERENCE_PIO_QUANT_PLANES", |p| (1..=32).contains(&p) && p.is_power_of_two(), "a power of two from 1 to 32").map_or(CHANNELS_PER_CUBE, |p| p as u32)
    })
}
/// Why a quantized matrix cannot be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantError(pub String);

impl std::fmt::Display for QuantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QuantError {}

/// A quantized `[rows, cols]` matrix (HF `[out, in]`) in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedMatrix {
    pub rows: usize,
    pub cols: usize,
    /// Bits per code: 4 or 8.
    pub bits: u32,
    /// Consecutive elements of a row sharing a scale and an offset.
    pub group: usize,
    /// `rows * cols * bits / 32` packed words, row-major.
    pub codes: Vec<u32>,
    /// Scales and offsets, `[rows, cols / group]` each.
    pub groups: GroupScales,
    /// What a code stands for.
    pub format: CodeFormat,
}

/// How a [`QuantizedMatrix`]'s codes stand for values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CodeFormat {
    /// Integers: `w = scale · code + min` (GGUF's blocks, GPTQ/AWQ codes, the int8 and int4
    /// weights made at load).
    #[default]
    Affine,
    /// 8-bit OCP FP8 E4M3 numbers: `w = scale · e4m3(code)`, the offsets zero (Qwen's and
    /// DeepSeek's FP8 checkpoints, `quantization = "fp8"`; `crate::quant_e4m3`).
    E4m3,
}

/// A matrix's group scales and offsets as stored: f16 where every one of them is an f16
/// exactly (GGUF's `Q4_0`, `Q4_1` and `Q8_0` blocks store theirs in f16: a fifth of a 4-bit
/// weight's bytes in f32), else f32 (K-quants' products of a super-block scale and a 6-bit
/// one, GPTQ's zero points times scales, the engine's own int8/int4 scales). The CPU loops
/// read either, converting f16 in registers (F16C), with the same results.
#[derive(Clone, Debug, PartialEq)]
pub enum GroupScales {
    F32 { scales: Vec<f32>, mins: Vec<f32> },
    F16 { scales: Vec<f16>, mins: Vec<f16> },
}

impl GroupScales {
    /// f16 where every value converts exactly, else f32.
    pub fn new(scales: Vec<f32>, mins: Vec<f32>) -> Self {
        let exact = |v: &f32| f16::from_f32(*v).to_f32().to_bits() == v.to_bits();
        if scales.par_iter().all(exact) && mins.par_iter().all(exact) {
            let half = |v: Vec<f32>| v.par_iter().map(|&x| f16::from_f32(x)).collect();
            Self::F16 { scales: half(scales), mins: half(mins) }
        } else {
            Self::F32 { scales, mins }
        }
    }

    /// Groups (scales; as many offsets).
    pub fn len(&self) -> usize {
        match self {
            Self::F32 { scales, .. } => scales.len(),
            Self::F16 { scales, .. } => scales.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether they are kept in f16.
    pub fn is_f16(&self) -> bool {
        matches!(self, Self::F16 { .. })
    }

    /// Scale `i`.
    pub fn scale(&self, i: usize) -> f32 {
        match self {
            Self::F32 { scales, .. } => scales[i],
            Self::F16 { scales, .. } => scales[i].to_f32(),
        }
    }

    /// Offset `i`.
    pub fn min(&self, i: usize) -> f32 {
        match self {
            Self::F32 { mins, .. } => mins[i],
            Self::F16 { mins, .. } => mins[i].to_f32(),
        }
    }

    /// Every scale, f32.
    pub fn scales_f32(&self) -> Vec<f32> {
        match self {
            Self::F32 { scales, .. } => scales.clone(),
            Self::F16 { scales, .. } => scales.iter().map(|v| v.to_f32()).collect(),
        }
    }

    /// Every offset, f32.
    pub fn mins_f32(&self) -> Vec<f32> {
        match self {
            Self::F32 { mins, .. } => mins.clone(),
            Self::F16 { mins, .. } => mins.iter().map(|v| v.to_f32()).collect(),
        }
    }

    /// Bytes they take.
    pub fn bytes(&self) -> usize {
        match self {
            Self::F32 { scales, mins } => (scales.len() + mins.len()) * 4,
            Self::F16 { scales, mins } => (scales.len() + mins.len()) * 2,
        }
    }

    /// Groups `ranges` one after another, kept in the same type.
    fn select(&self, ranges: impl Iterator<Item = std::ops::Range<usize>> + Clone) -> Self {
        fn pick<T: Copy>(v: &[T], ranges: impl Iterator<Item = std::ops::Range<usize>>) -> Vec<T> {
            ranges.flat_map(|r| v[r].iter().copied()).collect()
        }
        match self {
            Self::F32 { scales, mins } => Self::F32 { scales: pick(scales, ranges.clone()), mins: pick(mins, ranges) },
            Self::F16 { scales, mins } => Self::F16 { scales: pick(scales, ranges.clone()), mins: pick(mins, ranges) },
        }
    }
}

/// A group scale or offset as stored (f32 or f16), for the CPU loops.
pub(crate) trait GroupValue: Copy + Send + Sync + 'static {
    /// Zero of this type.
    const ZERO: Self;
    /// The stored values, when `g` keeps this type.
    fn slices(g: &GroupScales) -> Option<(&[Self], &[Self])>;
    /// The value (portable code).
    fn get(self) -> f32;
    /// The value, converted in registers.
    ///
    /// # Safety
    /// The CPU has F16C (every x86-64 CPU with AVX2 does; the loops' checks include it).
    #[cfg(target_arch = "x86_64")]
    unsafe fn get_f16c(self) -> f32;
    /// `Σ values · sums`, in [`crate::dot`]'s order of additions (so either type gives the
    /// same sum).
    ///
    /// # Safety
    /// As [`Self::get_f16c`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_f16c(values: &[Self], sums: &[f32]) -> f32;
    /// Sixteen values from `p` where `mask` has bits (zeros elsewhere).
    ///
    /// # Safety
    /// The masked values are readable at `p`, and the CPU has AVX-512 F and BW.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_masked(mask: u16, p: *const Self) -> std::arch::x86_64::__m512;
    /// Sixteen values from `p`, as f32.
    ///
    /// # Safety
    /// Sixteen values are readable at `p`, and the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// Eight values from `p`, as f32.
    ///
    /// # Safety
    /// Eight values are readable at `p`, and the CPU has AVX and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl GroupValue for f32 {
    const ZERO: f32 = 0.0;

    fn slices(g: &GroupScales) -> Option<(&[f32], &[f32])> {
        match g {
            GroupScales::F32 { scales, mins } => Some((scales, mins)),
            GroupScales::F16 { .. } => None,
        }
    }

    #[inline(always)]
    fn get(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn get_f16c(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_f16c(values: &[f32], sums: &[f32]) -> f32 {
        crate::dot(values, sums)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_masked(mask: u16, p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's guarantees.
        unsafe { std::arch::x86_64::_mm512_maskz_loadu_ps(mask, p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's guarantees (16 readable values, AVX-512F).
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's guarantees (8 readable values, AVX).
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl GroupValue for f16 {
    const ZERO: f16 = f16::ZERO;

    fn slices(g: &GroupScales) -> Option<(&[f16], &[f16])> {
        match g {
            GroupScales::F16 { scales, mins } => Some((scales, mins)),
            GroupScales::F32 { .. } => None,
        }
    }

    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn get_f16c(self) -> f32 {
        // SAFETY: the caller's guarantee (F16C).
        unsafe { f16c_to_f32(self.to_bits()) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dot_f16c(values: &[f16], sums: &[f32]) -> f32 {
        // Plain loops, no closures: a closure is not compiled with its caller's F16C, and
        // each conversion would be a call.
        let mut acc = [0f32; 16];
        let (ca, cb) = (values.chunks_exact(16), sums.chunks_exact(16));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        let mut products = [0f32; 16];
        let rest = ra.len().min(rb.len());
        for k in 0..rest {
            // SAFETY: the caller's guarantee (F16C).
            products[k] = unsafe { f16c_to_f32(ra[k].to_bits()) } * rb[k];
        }
        let tail: f32 = products[..rest].iter().sum();
        for (x, y) in ca.zip(cb) {
            let mut xf = [0f32; 16];
            for k in 0..16 {
                // SAFETY: as above.
                xf[k] = unsafe { f16c_to_f32(x[k].to_bits()) };
            }
            for k in 0..16 {
                acc[k] += xf[k] * y[k];
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_masked(mask: u16, p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's guarantees: the masked halves are readable (a masked load of
        // 32 halves reads only those), AVX-512 F and BW.
        unsafe { _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(u32::from(mask), p as *const i16))) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's guarantees (16 readable halves, AVX-512F); an unaligned load.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's guarantees (8 readable halves, AVX and F16C); an unaligned load.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

/// An f16's bits as f32, in one conversion instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c")]
#[inline]
fn f16c_to_f32(bits: u16) -> f32 {
    use std::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

impl QuantizedMatrix {
    /// Packs one code per element (row-major, each below `2^bits`) with per-group scales and
    /// offsets (`[rows, cols / group]`).
    pub fn from_codes(rows: usize, cols: usize, bits: u32, group: usize, codes: &[u8], scales: Vec<f32>, mins: Vec<f32>) -> Result<Self, QuantError> {
        let per_word = Self::codes_per_word(cols, bits, group)?;
        let groups = rows * (cols / group);
        if codes.len() != rows * cols || scales.len() != groups || mins.len() != groups {
            return Err(QuantError(format!(
                "a [{rows}, {cols}] matrix in groups of {group} needs {} codes and {groups} scales and offsets, got {}, {} and {}",
                rows * cols,
                codes.len(),
                scales.len(),
                mins.len()
            )));
        }
        let mask = (1u32 << bits) - 1;
        if let Some(bad) = codes.par_iter().find_any(|&&c| u32::from(c) > mask) {
            return Err(QuantError(format!("code {bad} does not fit in {bits} bits")));
        }
        let packed = codes
            .par_chunks_exact(per_word)
            .map(|word| word.iter().enumerate().fold(0u32, |acc, (k, &c)| acc | (u32::from(c) << (k as u32 * bits))))
            .collect();
        Ok(Self { rows, cols, bits, group, codes: packed, groups: GroupScales::new(scales, mins), format: CodeFormat::Affine })
    }

    /// Takes codes already packed in this layout (4-bit: element `8w + k` in bits `4k..4k + 4`
    /// of word `w`; 8-bit: element `4w + k` in byte `k`; `rows * cols * bits / 32` words,
    /// row-major), with per-group scales and offsets, as GGUF's quantized blocks give them
    /// (`inference_pio_formats::gguf::packed_groups`). Every word is a valid set of codes, so
    /// only the shapes are checked.
    pub fn from_packed(rows: usize, cols: usize, bits: u32, group: usize, words: Vec<u32>, scales: Vec<f32>, mins: Vec<f32>) -> Result<Self, QuantError> {
        let per_word = Self::codes_per_word(cols, bits, group)?;
        let groups = rows * (cols / group);
        if words.len() * per_word != rows * cols || scales.len() != groups || mins.len() != groups {
            return Err(QuantError(format!(
                "a [{rows}, {cols}] matrix in groups of {group} needs {} words of {bits}-bit codes and {groups} scales and offsets, got {}, {} and {}",
                rows * cols / per_word,
                words.len(),
                scales.len(),
                mins.len()
            )));
        }
        Ok(Self { rows, cols, bits, group, codes: words, groups: GroupScales::new(scales, mins), format: CodeFormat::Affine })
    }

    /// Codes per word of `bits`-bit codes in groups of `group` along rows of `cols`, or why
    /// they cannot be laid out (4 or 8 bits; groups of whole words that tile the rows).
    fn codes_per_word(cols: usize, bits: u32, group: usize) -> Result<usize, QuantError> {
        if bits != 4 && bits != 8 {
            return Err(QuantError(format!("{bits}-bit codes are not supported (4 or 8)")));
        }
        let per_word = 32 / bits as usize;
        if group == 0 || !group.is_multiple_of(per_word) || !cols.is_multiple_of(group) {
            return Err(QuantError(format!("groups of {group} do not tile rows of {cols} in whole {bits}-bit words")));
        }
        Ok(per_word)
    }

    /// Symmetric int8 per output channel: `scale = max|w| / 127`, codes `round(w / scale) +
    /// 128` (offset `-128 · scale`).
    pub fn quantize_int8(values: &[f32], rows: usize, cols: usize) -> Result<Self, QuantError> {
        Self::check_values(values, rows, cols)?;
        let (codes, scales): (Vec<Vec<u8>>, Vec<f32>) = values
            .par_chunks(cols.max(1))
            .map(|row| {
                let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                (row.iter().map(|v| ((v / scale).round().clamp(-127.0, 127.0) + 128.0) as u8).collect(), scale)
            })
            .unzip();
        let mins = scales.iter().map(|s| -128.0 * s).collect();
        Self::from_codes(rows, cols, 8, cols, &codes.concat(), scales, mins)
    }

    /// Asymmetric int4 in groups of `group` input channels: per group `scale = (max - min) /
    /// 15`, codes `round((w - min) / scale)` (a zero point folded into the offset `min`).
    pub fn quantize_int4(values: &[f32], rows: usize, cols: usize, group: usize) -> Result<Self, QuantError> {
        Self::check_values(values, rows, cols)?;
        if group == 0 || !cols.is_multiple_of(group) {
            return Err(QuantError(format!("groups of {group} do not tile rows of {cols}")));
        }
        // Per group: its codes, scale and offset.
        let groups: Vec<(Vec<u8>, f32, f32)> = values
            .par_chunks(group)
            .map(|chunk| {
                let (lo, hi) = chunk.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                let scale = if hi > lo { (hi - lo) / 15.0 } else { 1.0 };
                (chunk.iter().map(|v| ((v - lo) / scale).round().clamp(0.0, 15.0) as u8).collect(), scale, lo)
            })
            .collect();
        let codes: Vec<u8> = groups.iter().flat_map(|g| g.0.iter().copied()).collect();
        let (scales, mins) = groups.iter().map(|g| (g.1, g.2)).unzip();
        Self::from_codes(rows, cols, 4, group, &codes, scales, mins)
    }

    fn check_values(values: &[f32], rows: usize, cols: usize) -> Result<(), QuantError> {
        if values.len() != rows * cols {
            return Err(QuantError(format!("{} values for a [{rows}, {cols}] matrix", values.len())));
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(QuantError("a weight that is not finite cannot be quantized".into()));
        }
        Ok(())
    }

    fn per_word(&self) -> usize {
        32 / self.bits as usize
    }

    /// Packed words per row.
    pub fn words_per_row(&self) -> usize {
        self.cols / self.per_word()
    }

    /// Groups per row.
    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group
    }

    /// The code of element `col` of row `row`.
    pub fn code(&self, row: usize, col: usize) -> u32 {
        let per_word = self.per_word();
        let word = self.codes[row * self.words_per_row() + col / per_word];
        (word >> ((col % per_word) as u32 * self.bits)) & ((1 << self.bits) - 1)
    }

    /// Row `row`'s values, f32, into `out` (`cols` long).
    fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let (per_word, bits, mask) = (self.per_word(), self.bits, (1u32 << self.bits) - 1);
        let words = &self.codes[row * self.words_per_row()..(row + 1) * self.words_per_row()];
        let groups = self.groups_per_row();
        if self.format == CodeFormat::E4m3 {
            for (g, chunk) in out.chunks_exact_mut(self.group).enumerate() {
                let scale = self.groups.scale(row * groups + g);
                let bytes = words[g * self.group / 4..(g + 1) * self.group / 4].iter().flat_map(|w| w.to_le_bytes());
                for (v, b) in chunk.iter_mut().zip(bytes) {
                    *v = scale * crate::kv_pages::e4m3_bits_to_f32(b);
                }
            }
            return;
        }
        for (g, chunk) in out.chunks_exact_mut(self.group).enumerate() {
            let (scale, min) = (self.groups.scale(row * groups + g), self.groups.min(row * groups + g));
            let first = g * self.group / per_word;
            for (w, vals) in chunk.chunks_exact_mut(per_word).enumerate() {
                let word = words[first + w];
                for (k, v) in vals.iter_mut().enumerate() {
                    *v = scale * ((word >> (k as u32 * bits)) & mask) as f32 + min;
                }
            }
        }
    }

    /// The values of rows `rows` (each below `self.rows`), f32, one after another.
    pub fn dequantize_rows(&self, rows: impl Iterator<Item = usize>) -> Vec<f32> {
        let mut out = Vec::new();
        for r in rows {
            let start = out.len();
            out.resize(start + self.cols, 0.0);
            self.dequantize_row(r, &mut out[start..]);
        }
        out
    }

    /// The values of rows `rows` (within `0..self.rows`), f32, row-major, over rayon's threads.
    pub fn dequantize_range(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let mut out = vec![0.0; rows.len() * self.cols];
        out.par_chunks_mut(self.cols.max(1)).enumerate().for_each(|(i, row)| self.dequantize_row(rows.start + i, row));
        out
    }

    /// Every value, f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_range(0..self.rows)
    }

    /// The rows in the order `order` gives (row `i` of the result is row `order[i]`).
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self, QuantError> {
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return Err(QuantError(format!("a row order of {} entries for {} rows", order.len(), self.rows)));
        }
        let (w, g) = (self.words_per_row(), self.groups_per_row());
        Ok(Self {
            codes: order.iter().flat_map(|&r| self.codes[r * w..(r + 1) * w].iter().copied()).collect(),
            groups: self.groups.select(order.iter().map(|&r| r * g..(r + 1) * g)),
            ..self.clone()
        })
    }

    /// Several matrices of the same columns, bits and groups stacked along rows (a fused
    /// q/k/v or gate/up projection); `None` when they differ.
    pub fn concat_rows(parts: &[Self]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.cols != first.cols || p.bits != first.bits || p.group != first.group || p.format != first.format) {
            return None;
        }
        Some(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            codes: parts.iter().flat_map(|p| p.codes.iter().copied()).collect(),
            groups: match parts.iter().all(|p| p.groups.is_f16() == first.groups.is_f16()) {
                // One type: kept.
                true => {
                    let mut all = first.groups.select(std::iter::once(0..first.groups.len()));
                    for p in &parts[1..] {
                        match (&mut all, &p.groups) {
                            (GroupScales::F32 { scales, mins }, GroupScales::F32 { scales: s, mins: m }) => (scales.extend_from_slice(s), mins.extend_from_slice(m)),
                            (GroupScales::F16 { scales, mins }, GroupScales::F16 { scales: s, mins: m }) => (scales.extend_from_slice(s), mins.extend_from_slice(m)),
                            _ => unreachable!("one type, checked above"),
                        };
                    }
                    all
                }
                false => GroupScales::F32 {
                    scales: parts.iter().flat_map(|p| p.groups.scales_f32()).collect(),
                    mins: parts.iter().flat_map(|p| p.groups.mins_f32()).collect(),
                },
            },
            ..first.clone()
        })
    }

    /// Bytes the codes, scales and offsets take.
    pub fn bytes(&self) -> u64 {
        (self.codes.len() * 4 + self.groups.bytes()) as u64
    }

    /// `x [n, cols] · Wᵀ -> [n, rows]` for `n` up to [`Self::fused_row_limit`] (decode rows and,
    /// for f32 activations of 4-bit codes, short prompts; more rows go
    /// through [`QuantizedLinear::forward`]'s matrix product), f32, row-major, output channels
    /// split over rayon's threads. The packed codes are read directly, per group `y += scale ·
    /// Σ code · x + min · Σ x` with the sums of `x` per group computed once; `activations`
    /// says how `Σ code · x` is formed: in f32 with the codes converted in registers
    /// ([`Activations::F32`]), or against [`ActivationBlocks`] in 32-bit integer
    /// multiply-adds ([`Activations::Blocks16`], where rows and groups split into 16-bit
    /// units; f32 otherwise). On x86-64 with AVX2 and FMA the loops are compiled for them
    /// (chosen at run time); elsewhere for the baseline target.
    pub fn matmul(&self, x: &[f32], n: usize, activations: Activations) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols, "matmul: {} inputs for {n} rows of {}", x.len(), self.cols);
        let limit = self.fused_row_limit(activations);
        assert!(n <= limit, "matmul: {n} rows, more than the {limit} it reads the codes for");
        if self.format == CodeFormat::E4m3 {
            return self.matmul_e4m3(x, n);
        }
        // Prompt rows.
        if activations == Activations::F32 && n > CPU_FUSED_ROWS && self.takes_tiles() {
            return self.matmul_tiled(x, n);
        }
        let mut out_t = vec![0f32; self.rows * n];
        let chunk = (self.rows / (4 * rayon::current_num_threads()).max(1)).clamp(1, 256);
        // Σ x per group of each input row: `[n, groups]`.
        let groups = self.groups_per_row();
        let blocks8: Option<Vec<ActivationBlocks8>> = (activations == Activations::Blocks8 && self.takes_activation_blocks8())
            .then(|| x.chunks_exact(self.cols).map(|row| ActivationBlocks8::new(row, self.bits)).collect());
        // Of the activations as the codes meet them: with 8-bit blocks the rounded values'
        // (`Σ scale · Σ q` per block, llama.cpp's `Q8_1` `s`), so that a group's offset meets
        // the same activations as its codes. With the exact sums the rounding errors were
        // weighed by the codes (0..15, or 1..255 for 8-bit codes stored offset by 128) instead
        // of by the weights: on SmolLM2 a mean KL of 0.0145 against llama.cpp's 0.0024.
        let sums: Vec<f32> = match &blocks8 {
            Some(rows) => {
                let per_group = self.group / ACTIVATION_BLOCK;
                rows.iter()
                    .flat_map(|a| a.scales.chunks_exact(per_group).zip(a.sums.chunks_exact(per_group)).map(|(s, q)| s.iter().zip(q).map(|(&s, &q)| s * q as f32).sum::<f32>()))
                    .collect()
            }
            None => x.chunks_exact(self.group).map(|g| g.iter().sum()).collect(),
        };
        // 8-bit blocks where the groups allow them, else 16-bit ones.
        let blocks: Option<Vec<ActivationBlocks>> = (activations != Activations::F32 && blocks8.is_none() && self.takes_activation_blocks())
            .then(|| x.chunks_exact(self.cols).map(|row| ActivationBlocks::new(row, self.bits)).collect());
        let blocks8_rows: Vec<&ActivationBlocks8> = blocks8.iter().flatten().collect();
        // One row of 8-bit activations, in units of blocks for the VNNI loop.
        // Rows of 8-bit activations in units of blocks for the VNNI loop (every row count takes
        // the same loop, each row in the same order of operations: a batch's rows equal each
        // row alone).
        let units: Option<Vec<ActivationUnits>> = blocks8.as_ref().filter(|_| simd::takes_units(self)).map(|b| b.iter().map(|a| ActivationUnits::new(a, self.bits)).collect());
        let unit_rows: Vec<&ActivationUnits> = units.iter().flatten().collect();
        // f32 activations of 4-bit codes: reordered once for every row's split-nibble loop.
        let split: Option<Vec<f32>> = (blocks.is_none() && blocks8.is_none() && self.bits == 4 && self.group.is_multiple_of(32)).then(|| split_nibble_order(x));
        // Per input row, for the several-row passes of reordered activations (a single decode
        // row needs neither list) and for the 8-bit blocks.
        let split_rows: Vec<&[f32]> = split.iter().filter(|_| n > 1).flat_map(|s| s.chunks_exact(self.cols)).collect();
        let sum_rows: Vec<&[f32]> = if split_rows.is_empty() && blocks8_rows.is_empty() { Vec::new() } else { sums.chunks_exact(groups).collect() };
        out_t.par_chunks_mut(chunk * n.max(1)).enumerate().for_each(|(c, block)| {
            if !blocks8_rows.is_empty() {
                // The chunk's output rows against passes of up to four activation rows (in units
                // for the VNNI loop where it applies). Each row takes the same operations in any
                // pass, so a batch's rows, and a prompt's, equal each row alone.
                let first = c * chunk;
                let pass = |k: usize, width: usize, part: &mut [f32]| {
                    if unit_rows.is_empty() {
                        simd::rows_dot_i8(self, first, &blocks8_rows[k..k + width], &sum_rows[k..k + width], part)
                    } else {
                        simd::rows_dot_units(self, first, &unit_rows[k..k + width], &sum_rows[k..k + width], part)
                    }
                };
                if n <= 4 {
                    pass(0, n, block);
                } else {
                    let count = block.len() / n;
                    let mut part = vec![0f32; count * 4];
                    for k in (0..n).step_by(4) {
                        let width = 4.min(n - k);
                        let part = &mut part[..count * width];
                        pass(k, width, part);
                        for (ys, p) in block.chunks_exact_mut(n).zip(part.chunks_exact(width)) {
                            ys[k..k + width].copy_from_slice(p);
                        }
                    }
                }
                return;
            }
            // Up to four decode rows of f32 activations of 8-bit codes: each through the one-row
            // loop (the codes read once per row), so that a batch's rows equal each row alone.
            if n > 1 && blocks.is_none() && split.is_none() && self.bits == 8 {
                let count = block.len() / n;
                let mut part = vec![0f32; count];
                let all = (0..n).all(|j| {
                    let done = simd::rows_dot_codes8(self, c * chunk, &x[j * self.cols..(j + 1) * self.cols], &sums[j * groups..(j + 1) * groups], &mut part);
                    for (ys, &y) in block.chunks_exact_mut(n).zip(&part) {
                        ys[j] = y;
                    }
                    done
                });
                if all {
                    return;
                }
            }
            // One decode row of reordered activations (4-bit codes) or in order (8-bit codes in
            // groups of whole 16s): the chunk's rows in one call.
            if n == 1 && blocks.is_none() {
                let done = match &split {
                    Some(split) => simd::rows_dot_split4(self, c * chunk, split, &sums, block),
                    None => simd::rows_dot_codes8(self, c * chunk, x, &sums, block),
                };
                if done {
                    return;
                }
            }
            for (i, ys) in block.chunks_exact_mut(n.max(1)).enumerate() {
                let row = c * chunk + i;
                // Several rows of reordered activations, in passes of up to four: each unit of
                // codes widened once for the pass.
                if n > 1 && !split_rows.is_empty() {
                    let passes = ys.chunks_mut(4).enumerate().all(|(k, out)| {
                        let (splits, sums) = (&split_rows[4 * k..4 * k + out.len()], &sum_rows[4 * k..4 * k + out.len()]);
                        match out {
                            [y] => simd::row_dot_split4(self, row, splits[0], sums[0]).map(|v| *y = v).is_some(),
                            _ => simd::row_dot_split4_rows(self, row, splits, sums, out),
                        }
                    });
                    if passes {
                        continue;
                    }
                }
                for (j, y) in ys.iter_mut().enumerate() {
                    let sums = &sums[j * groups..(j + 1) * groups];
                    let xs = &x[j * self.cols..(j + 1) * self.cols];
                    *y = match (&blocks, &split) {
                        (Some(blocks), _) => simd::row_dot_i16(self, row, &blocks[j], sums),
                        (None, Some(split)) => simd::row_dot_split4(self, row, &split[j * self.cols..(j + 1) * self.cols], sums)
                            .unwrap_or_else(|| simd::row_dot(self, row, xs, sums)),
                        (None, None) => simd::row_dot(self, row, xs, sums),
                    };
                }
            }
        });
        // `out_t` is `[rows, n]`; the product is `[n, rows]`.
        transpose(out_t, n)
    }
}

impl QuantizedMatrix {
    /// Whether products of more than [`CPU_FUSED_ROWS`] rows of f32 activations (of 8-bit
    /// codes: more than one) take [`Self::matmul_tiled`]: on an x86-64 CPU with AVX2 and FMA
    /// (AVX-512F loops where it has them), for rows of whole 16s and 4-bit codes in groups of
    /// whole 32s or 8-bit codes in groups of whole 16s.
    fn takes_tiles(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self.takes_tiles_shape() && simd::has_avx2();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Whether the matrix's shape suits [`Self::matmul_tiled`] (whatever the CPU).
    #[cfg(target_arch = "x86_64")]
    fn takes_tiles_shape(&self) -> bool {
        self.cols.is_multiple_of(16) && ((self.bits == 4 && self.group.is_multiple_of(32)) || (self.bits == 8 && self.group.is_multiple_of(16)))
    }

    /// [`Self::matmul`] of `n` rows of f32 activations in dequantized tiles: each rayon task
    /// dequantizes up to [`CPU_TILE_ROWS`] weight rows once and multiplies them by every
    /// activation row (`simd::avx512::rows_tiled`, four weight rows by four activation rows;
    /// `simd::avx2_tiles::rows_tiled`, two by four). The sums are those of the
    /// dequantized weight, in another order of additions.
    fn matmul_tiled(&self, x: &[f32], n: usize) -> Vec<f32> {
        let cols = self.cols;
        let n4 = n.div_ceil(4) * 4;
        let mut xs = if self.bits == 4 { split_nibble_order(x) } else { x.to_vec() };
        xs.resize(n4 * cols, 0.0);
        // Enough tasks for every thread to take several; whole fours of rows each.
        let threads = rayon::current_num_threads().max(1);
        let task = self.rows.div_ceil(4 * threads).div_ceil(4).clamp(1, CPU_TILE_ROWS / 4) * 4;
        let mut out_t = vec![0f32; self.rows * n];
        #[cfg(target_arch = "x86_64")]
        let wide = uses_avx512();
        // Each thread's tile is kept between calls: a fresh one of a few hundred KB is a fresh
        // map of the allocator's and a page fault per 4 KB, which cost more than the products
        // (3x on SmolLM2's gate/up at 32 rows). Rows past a task's count hold whatever they
        // held: their dots are dropped.
        thread_local! {
            static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        out_t.par_chunks_mut(task * n).enumerate().for_each(|(c, block)| {
            let count4 = (block.len() / n).div_ceil(4) * 4;
            TILE.with_borrow_mut(|tile| {
                if tile.len() < count4 * cols {
                    tile.resize(count4 * cols, 0.0);
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `takes_tiles` (the caller's check) found AVX2 and FMA, and `wide`
                // AVX-512F; the loops check the shapes.
                unsafe {
                    if wide {
                        simd::avx512::rows_tiled(self, &xs, n, c * task, block, tile)
                    } else {
                        simd::avx2_tiles::rows_tiled(self, &xs, n, c * task, block, tile)
                    }
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (c, block, tile);
            });
        });
        transpose(out_t, n)
    }
}

/// `[rows, n]` as `[n, rows]` (for one row, the same vector).
pub(crate) fn transpose(out_t: Vec<f32>, n: usize) -> Vec<f32> {
    if n <= 1 {
        return out_t;
    }
    let rows = out_t.len() / n;
    let mut out = vec![0f32; out_t.len()];
    // Sixteen rows at a time: each output row gets sixteen adjacent values per pass, read from
    // sixteen input rows that stay in L1 (one value at a time to a column, each write touched
    // a line of its own: a twelfth of a Qwen3-MoE prompt's time).
    const BLOCK: usize = 16;
    for r0 in (0..rows).step_by(BLOCK) {
        let block = BLOCK.min(rows - r0);
        for j in 0..n {
            let to = &mut out[j * rows + r0..j * rows + r0 + block];
            for (i, y) in to.iter_mut().enumerate() {
                *y = out_t[(r0 + i) * n + j];
            }
        }
    }
    out
}

/// The most weight rows one task of [`QuantizedMatrix::matmul_tiled`] dequantizes into its
/// tile (64 rows of SmolLM2's 1,536 inputs: 384 KB, within a core's L2).
pub const CPU_TILE_ROWS: usize = 64;

/// Activations reordered for 4-bit codes read 16 bytes at a time: within each 32, the even
/// positions, then the odd ones (`[x0, x2, … x30, x1, x3, … x31]`), the order in which a
/// unit's low and high nibbles hold its codes. `x.len()` is a multiple of 32 (whole groups).
pub fn split_nibble_order(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for unit in x.chunks_exact(32) {
        out.extend(unit.iter().step_by(2));
        out.extend(unit.iter().skip(1).step_by(2));
    }
    out
}

/// Up to this many input rows, [`QuantizedMatrix::matmul`] reads the codes in place (more
/// for f32 activations of 4-bit codes: [`QuantizedMatrix::fused_row_limit`]).
pub const CPU_FUSED_ROWS: usize = 4;

/// f32 activations of 4-bit codes in groups of whole 32s on an AVX2 CPU: up to this many
/// rows read the codes in place, four rows a pass. On the 2-core EPYC (SmolLM2's gate/up,
/// `cpu_matvec`) that took 158-207 µs a row at 8-32 rows against 283-699 µs for dequantized
/// slices through the matrix product, whose dequantization only pays for itself over many rows.
pub const CPU_FUSED_ROWS_SPLIT4: usize = 64;

impl QuantizedMatrix {
    /// The most input rows [`Self::matmul`] takes with these activations (more go through the
    /// linear's matrix product of dequantized slices).
    pub fn fused_row_limit(&self, activations: Activations) -> usize {
        if self.format == CodeFormat::E4m3 {
            return CPU_FUSED_ROWS;
        }
        if activations == Activations::F32 && self.takes_tiles() {
            return usize::MAX;
        }
        // 8-bit activations read the codes in place for any count of rows, in passes of four
        // (a prompt's rows in the same operations as decode rows).
        if activations == Activations::Blocks8 && self.takes_activation_blocks8() {
            return usize::MAX;
        }
        let many = simd::has_avx2()
            && match activations {
                Activations::F32 => self.bits == 4 && self.group.is_multiple_of(32),
                Activations::Blocks8 => self.takes_activation_blocks8(),
                Activations::Blocks16 => false,
            };
        if many { CPU_FUSED_ROWS_SPLIT4 } else { CPU_FUSED_ROWS }
    }
}

/// Activations per 16-bit block scale.
pub const ACTIVATION_BLOCK: usize = 32;

/// How a product of quantized weights takes its activations ([`QuantizedLinear::with_activations`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    /// As they are, in f32: the product of the dequantized weight, summed in another order
    /// (on CubeCL devices the weight is dequantized and multiplied by cuBLAS).
    F32,
    /// Rounded to [`ActivationBlocks`]: a relative error near 2^-16 of each block's largest
    /// value, far below that of bf16/f16 activations (2^-8 / 2^-11 of each value); on
    /// CubeCL devices the `dp4a` kernel's activations (their default).
    Blocks16,
    /// Rounded to [`ActivationBlocks8`] (llama.cpp's `Q8_1` activations, what its CPU
    /// products of quantized weights always take): a relative error near 2^-8 of each
    /// block's largest value, and 8-bit integer multiply-adds (`pmaddubsw`/`vpdpbusd`, 32 or
    /// 64 products an instruction): the fastest CPU product of 4- and 8-bit codes in groups
    /// of whole 32s (others take [`Self::Blocks16`]), prompt rows in the same passes as decode
    /// rows (a row's result does not depend on the rows beside it), at a cost in accuracy: on SmolLM2-135M a mean
    /// KL of 0.0021-0.0027 from the exact product, as llama.cpp's own products (0.0024;
    /// int8 weights: 0.0034; `plugins/llama/tests/quantization.rs`). CPU only (on CubeCL
    /// devices the kernel takes [`Self::Blocks16`]).
    Blocks8,
}

impl QuantizedMatrix {
    /// Whether the fused CPU product can take its activations as [`ActivationBlocks`]: rows
    /// of whole blocks, and groups of whole 16-code units (32 for 4-bit codes, whose unit is a
    /// block's 16 bytes).
    fn takes_activation_blocks(&self) -> bool {
        let unit = if self.bits == 4 { 32 } else { 16 };
        self.cols.is_multiple_of(ACTIVATION_BLOCK) && self.group.is_multiple_of(unit)
    }

    /// Whether the fused CPU product can take its activations as [`ActivationBlocks8`]:
    /// groups of whole blocks (a block's codes share one group scale).
    fn takes_activation_blocks8(&self) -> bool {
        self.group.is_multiple_of(ACTIVATION_BLOCK)
    }
}

/// One row of activations as 16-bit integers with one f32 scale per block of
/// [`ACTIVATION_BLOCK`] (`x ≈ scale · q`, `q` in ±32767, rounded to nearest): the integer
/// form of llama.cpp's `block_q8_1` activations (`quantize_row_q8_1`) at twice the bits, so
/// that codes and activations meet in 16-bit integer multiply-adds (`pmaddwd`, sixteen
/// products per instruction) while the rounding stays near f32's (a relative error below
/// 2^-16 of each block's largest value, against 2^-8 at 8 bits). For 4-bit codes each block
/// is stored as its even elements then its odd ones, the order a block's 16 code bytes give
/// when split into low and high nibbles.
#[derive(Clone, Debug)]
pub struct ActivationBlocks {
    pub q: Vec<i16>,
    pub scales: Vec<f32>,
}

impl ActivationBlocks {
    /// `x` (a multiple of [`ACTIVATION_BLOCK`] long) for codes of `bits` bits.
    pub fn new(x: &[f32], bits: u32) -> Self {
        let mut q = vec![0i16; x.len()];
        let mut scales = Vec::with_capacity(x.len() / ACTIVATION_BLOCK);
        for (xb, qb) in x.chunks_exact(ACTIVATION_BLOCK).zip(q.chunks_exact_mut(ACTIVATION_BLOCK)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 32767.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let quant = |v: f32| (v * inv).round_ties_even().clamp(-32767.0, 32767.0) as i16;
            if bits == 4 {
                let half = ACTIVATION_BLOCK / 2;
                for k in 0..half {
                    qb[k] = quant(xb[2 * k]);
                    qb[half + k] = quant(xb[2 * k + 1]);
                }
            } else {
                for (o, &v) in qb.iter_mut().zip(xb) {
                    *o = quant(v);
                }
            }
            scales.push(scale);
        }
        Self { q, scales }
    }
}

/// One row of activations as 8-bit integers with one f32 scale per block of
/// [`ACTIVATION_BLOCK`] (`x ≈ scale · q`, `q` in ±127, rounded to nearest, `scale = max|x| /
/// 127`), llama.cpp's `block_q8_1` (`quantize_row_q8_1`), and each block's `Σ q` (for 8-bit
/// codes stored with an offset of 128, and `scale · Σ q` for the groups' offsets, as
/// `block_q8_1`'s `s`). For 4-bit codes each block is stored as its even
/// elements then its odd ones (as [`ActivationBlocks`]).
#[derive(Clone, Debug)]
pub struct ActivationBlocks8 {
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    pub sums: Vec<i32>,
}

impl ActivationBlocks8 {
    /// `x` (a multiple of [`ACTIVATION_BLOCK`] long) for codes of `bits` bits.
    pub fn new(x: &[f32], bits: u32) -> Self {
        let blocks = x.len() / ACTIVATION_BLOCK;
        let mut q = vec![0i8; x.len()];
        let (mut scales, mut sums) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
        for (xb, qb) in x.chunks_exact(ACTIVATION_BLOCK).zip(q.chunks_exact_mut(ACTIVATION_BLOCK)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            // Round half to even by the f32 adder (1.5 · 2^23 leaves no fraction bits below
            // it): `round_ties_even` is a call to `rintf` on the baseline x86-64 target, which
            // has no rounding instruction, and took 1.5 % of a decode.
            const SHIFT: f32 = 12_582_912.0;
            let quant = |v: f32| (((v * inv).clamp(-127.0, 127.0) + SHIFT) - SHIFT) as i8;
            if bits == 4 {
                let half = ACTIVATION_BLOCK / 2;
                for k in 0..half {
                    qb[k] = quant(xb[2 * k]);
                    qb[half + k] = quant(xb[2 * k + 1]);
                }
            } else {
                for (o, &v) in qb.iter_mut().zip(xb) {
                    *o = quant(v);
                }
            }
            scales.push(scale);
            sums.push(qb.iter().map(|&v| i32::from(v)).sum());
        }
        Self { q, scales, sums }
    }
}

/// One row of activations rounded as [`ActivationBlocks8`] (the same values), laid out for
/// the VNNI loop that reads a row's codes 64 bytes at a time (`simd::vnni::rows_i8_units`):
/// a unit of four blocks of 4-bit codes or two of 8-bit codes. For 4-bit codes, per unit the
/// four blocks' even elements (`even`, 64 bytes) and odd elements (`odd`), the order a unit's
/// code bytes give as low and high nibbles; for 8-bit codes the elements in order (`even`;
/// `odd` empty). `scales`: each block's scale repeated over the 32-bit lanes its sums land in
/// (16 a unit). A last unit of fewer blocks is padded with zeros.
#[derive(Clone, Debug)]
pub struct ActivationUnits {
    pub bits: u32,
    pub even: Vec<i8>,
    pub odd: Vec<i8>,
    pub scales: Vec<f32>,
}

impl ActivationUnits {
    /// Blocks of codes of `bits` bits in a unit of 64 code bytes.
    pub const fn blocks_per_unit(bits: u32) -> usize {
        if bits == 4 { 4 } else { 2 }
    }

    /// `a`, rounded for codes of `bits` bits (4: each block's even elements, then its odd
    /// ones; 8: in order), in units.
    pub fn new(a: &ActivationBlocks8, bits: u32) -> Self {
        let per_unit = Self::blocks_per_unit(bits);
        let units = a.scales.len().div_ceil(per_unit);
        let lanes = 16 / per_unit;
        let half = ACTIVATION_BLOCK / 2;
        let (mut even, mut odd) = (vec![0i8; units * 64], vec![0i8; if bits == 4 { units * 64 } else { 0 }]);
        let mut scales = vec![0f32; units * 16];
        for (b, (qb, &scale)) in a.q.chunks_exact(ACTIVATION_BLOCK).zip(&a.scales).enumerate() {
            if bits == 4 {
                let at = (b / per_unit) * 64 + (b % per_unit) * half;
                even[at..at + half].copy_from_slice(&qb[..half]);
                odd[at..at + half].copy_from_slice(&qb[half..]);
            } else {
                even[b * ACTIVATION_BLOCK..(b + 1) * ACTIVATION_BLOCK].copy_from_slice(qb);
            }
            scales[b * lanes..(b + 1) * lanes].fill(scale);
        }
        Self { bits, even, odd, scales }
    }
}

/// Whether the CPU's f32-activation loops may take their AVX-512 versions (where the CPU has
/// AVX-512F; on by default). [`use_avx512`] sets it.
static AVX512_ALLOWED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Lets (`true`, the default) or stops the CPU products' f32-activation loops from using
/// AVX-512 where the CPU has it, for the whole process: the AVX2 loops then run, as on a CPU
/// without it. For side-by-side measurements (`kernels/examples/cpu_matvec.rs`) and tests;
/// results differ only in the order of additions.
pub fn use_avx512(allowed: bool) {
    AVX512_ALLOWED.store(allowed, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the CPU has AVX2 and FMA (detected once), for the crate's other CPU loops.
#[cfg(target_arch = "x86_64")]
pub(crate) fn cpu_has_avx2() -> bool {
    simd::has_avx2()
}

/// Whether the CPU products' f32-activation loops run their AVX-512 versions now.
pub fn uses_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return simd::has_avx2() && simd::has_avx512();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The CPU loops, written so that the compiler vectorises them, and compiled twice on x86-64:
/// for the baseline target and for AVX2 + FMA, picked at run time.
mod simd {
    use super::{ACTIVATION_BLOCK, ActivationBlocks, ActivationBlocks8, ActivationUnits, GroupValue, QuantizedMatrix};

    /// A group value (scale or offset) as f32, inside a loop compiled with F16C.
    #[cfg(target_arch = "x86_64")]
    macro_rules! v {
        ($x:expr) => {
            // SAFETY: used only in functions compiled for F16C (the AVX2 loops enable it,
            // AVX-512F implies it), which run only where the CPU has it (`has_avx2` checks it).
            unsafe { $crate::quant::GroupValue::get_f16c($x) }
        };
    }

    /// How many rows ahead the one-row f32-activation loops prefetch their codes. A decode
    /// step reads the whole model once, and on the 2-core Xeon VM these loops left memory
    /// time unused: 8 rows ahead took a SmolLM2-sized step of distinct matrices from 9.3-9.9
    /// to 6.8-7.9 ms (16 rows: 8.1-9.1).
    #[cfg(target_arch = "x86_64")]
    const PREFETCH_ROWS: usize = 8;

    /// `$call` with `$S` the type `$m` keeps its group values in (f16 or f32).
    macro_rules! by_groups {
        ($m:expr, $S:ident => $call:expr) => {
            if $m.groups.is_f16() {
                type $S = half::f16;
                $call
            } else {
                type $S = f32;
                $call
            }
        };
    }

    /// [`row_dot_i8_any_by`] for `m`'s group values.
    pub(super) fn row_dot_i8_any(m: &QuantizedMatrix, row: usize, a: &ActivationBlocks8, sums: &[f32]) -> f32 {
        by_groups!(m, S => row_dot_i8_any_by::<S>(m, row, a, sums))
    }

    /// `Σ offsets · sums` ([`GroupValue::dot_f16c`]) inside a loop compiled with F16C.
    #[cfg(target_arch = "x86_64")]
    macro_rules! offsets_dot {
        ($mins:expr, $sums:expr) => {
            // SAFETY: as `v!`.
            unsafe { $crate::quant::GroupValue::dot_f16c($mins, $sums) }
        };
    }

    /// [`GroupValue::dot_f16c`] compiled for AVX2, FMA and F16C, for callers that are not.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn offsets_dot_avx2<S: GroupValue>(mins: &[S], sums: &[f32]) -> f32 {
        offsets_dot!(mins, sums)
    }

    /// Row `row` of `m` (4- or 8-bit codes in groups of whole 32s: checked by the caller,
    /// `m.takes_activation_blocks8()`) times one row of [`ActivationBlocks8`], `sums` the f32
    /// sums of the activations per group: per block an exact integer `Σ code · q` (8-bit codes
    /// as `Σ (code - 128) · q + 128 · Σ q`), scaled by the group's and the block's scales,
    /// plus `Σ min · sums`.
    fn row_dot_i8_any_by<S: GroupValue>(m: &QuantizedMatrix, row: usize, a: &ActivationBlocks8, sums: &[f32]) -> f32 {
        let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
        let wpr = m.words_per_row();
        let words = &m.codes[row * wpr..(row + 1) * wpr];
        let groups = m.groups_per_row();
        let (scales, mins) = (&sc[row * groups..(row + 1) * groups], &mn[row * groups..(row + 1) * groups]);
        let blocks_per_group = m.group / ACTIVATION_BLOCK;
        let words_per_block = ACTIVATION_BLOCK * m.bits as usize / 32;
        let mut total = 0f32;
        for (b, (block_words, q)) in words.chunks_exact(words_per_block).zip(a.q.chunks_exact(ACTIVATION_BLOCK)).enumerate() {
            let isum = block_isum(m.bits, |i| ((block_words[i / 4] >> (8 * (i % 4))) & 0xff) as i32, q);
            total += isum as f32 * (scales[b / blocks_per_group].get() * a.scales[b]);
        }
        total + mins.iter().zip(sums).map(|(m, s)| m.get() * s).sum::<f32>()
    }

    /// `Σ code · q` of one block of [`ACTIVATION_BLOCK`] codes, exact in integers: `byte(i)` is
    /// the block's `i`th stored byte (4-bit codes: the low nibble meets `q[i]`, the high one
    /// `q[16 + i]`, the activations' even-then-odd order; 8-bit codes: one a byte, offset by
    /// 128 as stored, which the group's offset accounts for).
    #[inline(always)]
    pub(super) fn block_isum(bits: u32, byte: impl Fn(usize) -> i32, q: &[i8]) -> i32 {
        if bits == 4 {
            let half = ACTIVATION_BLOCK / 2;
            (0..half).map(|i| (byte(i) & 0xf) * i32::from(q[i]) + (byte(i) >> 4) * i32::from(q[half + i])).sum()
        } else {
            (0..ACTIVATION_BLOCK).map(|i| byte(i) * i32::from(q[i])).sum()
        }
    }

    /// One block of 32 codes at `bytes`, ready for [`block_i8`]: 4-bit codes as 32 bytes,
    /// the low nibbles (even codes) then the high ones (odd codes), twice; 8-bit codes less
    /// 128, as their magnitudes and themselves (the sign trick of `pmaddubsw`, whose first
    /// operand is unsigned).
    ///
    /// # Safety
    /// `BITS * 4` bytes are readable at `bytes`, and the CPU has AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block_codes<const BITS: u32>(bytes: *const u8) -> [std::arch::x86_64::__m256i; 2] {
        use std::arch::x86_64::*;
        if BITS == 4 {
            // SAFETY: the caller guarantees 16 readable bytes (an unaligned load).
            let b = unsafe { _mm_loadu_si128(bytes as *const __m128i) };
            let codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0f));
            [codes, codes]
        } else {
            // SAFETY: the caller guarantees 32 readable bytes (an unaligned load).
            let c = _mm256_xor_si256(unsafe { _mm256_loadu_si256(bytes as *const __m256i) }, _mm256_set1_epi8(-128));
            [_mm256_sign_epi8(c, c), c]
        }
    }

    /// `Σ code · q` of one block of [`block_codes`] against its 32 activations `q` (4-bit:
    /// even then odd), as eight 32-bit lanes; for 8-bit codes the block's `128 · Σ q` is the
    /// caller's.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn block_i8<const BITS: u32>(codes: [std::arch::x86_64::__m256i; 2], q: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let pairs = if BITS == 4 { _mm256_maddubs_epi16(codes[0], q) } else { _mm256_maddubs_epi16(codes[0], _mm256_sign_epi8(q, codes[1])) };
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    /// The shapes the 8-bit-activation pass loops (`rows_i8_avx2`, `vnni::rows_i8`,
    /// `neon::rows_i8`) rely on.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    struct I8Rows {
        groups: usize,
        blocks: usize,
        blocks_per_group: usize,
        block_bytes: usize,
        row_bytes: usize,
        /// Output rows (`out` is `[count, N]`).
        count: usize,
    }

    /// [`I8Rows`] of `bits`-bit `m` (group values `values` long) for output rows from `first`
    /// into `out_len` outputs against `acts` and their per-group `sums`, checked: groups of
    /// whole blocks, rows in the matrix, activations of its width.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[inline(always)]
    fn i8_rows_shape<const N: usize>(m: &QuantizedMatrix, bits: u32, values: usize, first: usize, out_len: usize, acts: &[&ActivationBlocks8; N], sums: &[&[f32]; N]) -> I8Rows {
        let groups = m.groups_per_row();
        let blocks = m.cols / ACTIVATION_BLOCK;
        let blocks_per_group = m.group / ACTIVATION_BLOCK;
        let block_bytes = ACTIVATION_BLOCK * bits as usize / 8;
        let row_bytes = blocks * block_bytes;
        let count = out_len / N;
        assert!(
            m.bits == bits
                && out_len == count * N
                && blocks_per_group * ACTIVATION_BLOCK == m.group
                && blocks * ACTIVATION_BLOCK == m.cols
                && (first + count) * row_bytes <= m.codes.len() * 4
                && (first + count) * groups <= values
                && acts.iter().all(|a| a.q.len() == m.cols && a.scales.len() == blocks && a.sums.len() == blocks)
                && sums.iter().all(|s| s.len() == groups),
            "rows of another width"
        );
        I8Rows { groups, blocks, blocks_per_group, block_bytes, row_bytes, count }
    }

    /// [`row_dot_i8_any`] with AVX2 for output rows `first .. first + out.len() / N` against
    /// `N` rows of activation blocks at once (each block's codes loaded once for every
    /// activation row), into `out` (`[rows, N]`): `Σ code · q` per block in `pmaddubsw` +
    /// `pmaddwd`, converted and scaled into one f32 accumulator per activation row. The
    /// matrix's shape is read once per call, not per row (two integer divisions a row cost
    /// as much as a short row's products).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_i8_avx2<S: GroupValue, const BITS: u32, const N: usize>(m: &QuantizedMatrix, first: usize, acts: [&ActivationBlocks8; N], sums: [&[f32]; N], out: &mut [f32]) {
        let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
        use std::arch::x86_64::*;
        let I8Rows { groups, blocks_per_group, block_bytes, row_bytes, count, .. } = i8_rows_shape(m, BITS, sc.len().min(mn.len()), first, out.len(), &acts, &sums);
        let codes = m.codes.as_ptr() as *const u8;
        let qp: [*const i8; N] = acts.map(|a| a.q.as_ptr());
        let (scales, mins) = (&sc[first * groups..(first + count) * groups], &mn[first * groups..(first + count) * groups]);
        for (r, ((ys, row_scales), row_mins)) in out.chunks_exact_mut(N).zip(scales.chunks_exact(groups)).zip(mins.chunks_exact(groups)).enumerate() {
            // SAFETY: row `first + r` lies in the matrix (asserted above): its `row_bytes` code bytes start here.
            let row_codes = unsafe { codes.add((first + r) * row_bytes) };
            // Two accumulators per row, taking blocks in turn (one would chain every block's
            // multiply-add on the last), swapped by name after each block (indexed by the
            // block's parity they were kept in memory, a store and reload per block). For every
            // count of rows alike, so that a row's sums do not depend on the rows beside it (a
            // batch's rows equal each row alone); at three or four rows some spill.
            let (mut acc, mut other) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
            let mut b = 0;
            for &scale in row_scales {
                let scale = v!(scale);
                // A prefetch reads nothing and faults on no address (the group's first code
                // line, `PREFETCH_ROWS` rows ahead).
                _mm_prefetch::<_MM_HINT_T0>(row_codes.wrapping_add(PREFETCH_ROWS * row_bytes + b * block_bytes) as *const i8);
                for _ in 0..blocks_per_group {
                    // SAFETY: `b < blocks`: the block's `block_bytes` code bytes lie in the row
                    // and its 32 activations in each `q` (`cols` long); unaligned loads;
                    // x86-64 is little-endian, so the words' bytes are the packed order.
                    let c = unsafe { block_codes::<BITS>(row_codes.add(b * block_bytes)) };
                    for j in 0..N {
                        // SAFETY: as above.
                        let q = unsafe { _mm256_loadu_si256(qp[j].add(b * ACTIVATION_BLOCK) as *const __m256i) };
                        let mut isum = block_i8::<BITS>(c, q);
                        if BITS == 8 {
                            isum = _mm256_add_epi32(isum, _mm256_setr_epi32(128 * acts[j].sums[b], 0, 0, 0, 0, 0, 0, 0));
                        }
                        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(scale * acts[j].scales[b]), acc[j]);
                    }
                    std::mem::swap(&mut acc, &mut other);
                    b += 1;
                }
            }
            for j in 0..N {
                ys[j] = hsum(_mm256_add_ps(acc[j], other[j])) + offsets_dot!(row_mins, sums[j]);
            }
        }
    }

    /// The shapes the tiled loops (`avx512::rows_tiled`, `avx2_tiles::rows_tiled`) rely on,
    /// checked: `(cols, count, count4, n4)`, `count` the output rows of `out` (`[count, n]`)
    /// and `count4`, `n4` it and `n` rounded up to fours (the tile's and `x`'s rows).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn tiled_shape(m: &QuantizedMatrix, x: &[f32], n: usize, out: &[f32], tile: &[f32]) -> (usize, usize, usize, usize) {
        let cols = m.cols;
        let count = out.len() / n.max(1);
        let (count4, n4) = (count.div_ceil(4) * 4, n.div_ceil(4) * 4);
        assert!(
            n > 0 && out.len() == count * n && cols.is_multiple_of(16) && x.len() == n4 * cols && tile.len() >= count4 * cols,
            "a tiled product of another shape"
        );
        (cols, count, count4, n4)
    }

    /// The shapes the tiles' dequantization relies on, checked: rows `first .. first +
    /// count` of `m` (4-bit codes in groups of whole 32s, 8-bit ones in groups of whole 16s)
    /// and a tile of as many rows; `(cols, groups, row_bytes)`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn tile_rows_shape(m: &QuantizedMatrix, first: usize, count: usize, tile: &[f32]) -> (usize, usize, usize) {
        let (cols, groups) = (m.cols, m.groups_per_row());
        let row_bytes = cols * m.bits as usize / 8;
        assert!(
            ((m.bits == 4 && m.group.is_multiple_of(32)) || (m.bits == 8 && m.group.is_multiple_of(16)))
                && tile.len() >= count * cols
                && (first + count) * row_bytes <= m.codes.len() * 4
                && (first + count) * groups <= m.groups.len(),
            "a tile of another width"
        );
        (cols, groups, row_bytes)
    }

    /// Writes a block of dots `d` (`[tile row][activation row]`, tile rows from `i`,
    /// activation rows from `j`) into `out` (`[count, n]`), dropping the padding rows'.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn store_dots<const W: usize>(out: &mut [f32], n: usize, count: usize, i: usize, j: usize, d: &[[f32; 4]; W]) {
        for (a, row) in d.iter().enumerate().take(count - i.min(count)) {
            for (b, &v) in row.iter().enumerate().take(n - j) {
                out[(i + a) * n + j + b] = v;
            }
        }
    }

    /// The dequantized tiles of [`avx512`]'s `rows_tiled` for CPUs with AVX2 + FMA only: eight
    /// lanes, and dots of four activation rows by two weight rows at a time (eight
    /// accumulators: sixteen vector registers hold them with their operands).
    #[cfg(target_arch = "x86_64")]
    pub(super) mod avx2_tiles {
        use super::QuantizedMatrix;
        use std::arch::x86_64::*;

        /// `avx512::dequantize_tile` with eight lanes (the same layout).
        ///
        /// # Safety
        /// The CPU has AVX2 and FMA (the shapes are checked here).
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dequantize_tile<S: super::super::GroupValue>(m: &QuantizedMatrix, first: usize, count: usize, tile: &mut [f32]) {
            let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
            let (cols, groups, row_bytes) = super::tile_rows_shape(m, first, count, tile);
            let codes = m.codes.as_ptr() as *const u8;
            for r in 0..count {
                let row = first + r;
                // SAFETY: row `row` lies in the matrix (asserted above).
                let mut bytes = unsafe { codes.add(row * row_bytes) };
                let mut out = tile[r * cols..(r + 1) * cols].as_mut_ptr();
                for g in 0..groups {
                    let (scale, min) = (_mm256_set1_ps(v!(sc[row * groups + g])), _mm256_set1_ps(v!(mn[row * groups + g])));
                    // SAFETY: each step reads the group's next code bytes (in the row) and
                    // writes as many values (in the tile's row); unaligned loads and stores.
                    unsafe {
                        if m.bits == 4 {
                            for _ in 0..m.group / 32 {
                                for (k, c) in super::unit_codes4(bytes).into_iter().enumerate() {
                                    _mm256_storeu_ps(out.add(8 * k), _mm256_fmadd_ps(c, scale, min));
                                }
                                bytes = bytes.add(16);
                                out = out.add(32);
                            }
                        } else {
                            for _ in 0..m.group / 16 {
                                let b = _mm_loadu_si128(bytes as *const __m128i);
                                let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
                                let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(b, b)));
                                _mm256_storeu_ps(out, _mm256_fmadd_ps(lo, scale, min));
                                _mm256_storeu_ps(out.add(8), _mm256_fmadd_ps(hi, scale, min));
                                bytes = bytes.add(16);
                                out = out.add(16);
                            }
                        }
                    }
                }
            }
        }

        /// The eight dot products of two weight rows at `w` and four activation rows at `x`
        /// (rows `cols` apart, `cols` a multiple of 8): `[w row][x row]`.
        ///
        /// # Safety
        /// Two rows of `cols` f32 are readable at `w`, four at `x`, and the CPU has AVX2 + FMA.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn dots_2x4(w: *const f32, x: *const f32, cols: usize) -> [[f32; 4]; 2] {
            let mut acc = [[_mm256_setzero_ps(); 4]; 2];
            let mut k = 0;
            while k < cols {
                // SAFETY: `k + 8 <= cols` in each row (the caller's guarantee); unaligned loads.
                unsafe {
                    let wv = [_mm256_loadu_ps(w.add(k)), _mm256_loadu_ps(w.add(cols + k))];
                    let xv = [_mm256_loadu_ps(x.add(k)), _mm256_loadu_ps(x.add(cols + k)), _mm256_loadu_ps(x.add(2 * cols + k)), _mm256_loadu_ps(x.add(3 * cols + k))];
                    for (acc_w, &w) in acc.iter_mut().zip(&wv) {
                        for (a, &xj) in acc_w.iter_mut().zip(&xv) {
                            *a = _mm256_fmadd_ps(w, xj, *a);
                        }
                    }
                }
                k += 8;
            }
            // The eight vectors halved into each other three times (21 shuffles and adds
            // instead of eight horizontal sums), as `avx512::reduce_16`: element `4l + e` of
            // `z` is the sum of `v[2e + l]`, `v[i]` being `acc[i / 4][i % 4]`.
            let v: [__m256; 8] = std::array::from_fn(|i| acc[i / 4][i % 4]);
            let s: [__m256; 4] = std::array::from_fn(|p| {
                let (a, b) = (v[2 * p], v[2 * p + 1]);
                _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(a, b), _mm256_permute2f128_ps::<0x31>(a, b))
            });
            let g: [__m256; 2] = std::array::from_fn(|q| {
                let (c, d) = (s[2 * q], s[2 * q + 1]);
                _mm256_add_ps(_mm256_shuffle_ps::<0x44>(c, d), _mm256_shuffle_ps::<0xEE>(c, d))
            });
            let z = _mm256_add_ps(_mm256_shuffle_ps::<0x88>(g[0], g[1]), _mm256_shuffle_ps::<0xDD>(g[0], g[1]));
            let mut sums = [0f32; 8];
            // SAFETY: `sums` holds eight f32; an unaligned store.
            unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), z) };
            std::array::from_fn(|a| std::array::from_fn(|b| sums[4 * (b % 2) + 2 * a + b / 2]))
        }

        /// `avx512::rows_tiled` with eight lanes, two weight rows by four activation rows.
        ///
        /// # Safety
        /// The CPU has AVX2 and FMA (the shapes are checked here).
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(in super::super) unsafe fn rows_tiled(m: &QuantizedMatrix, x: &[f32], n: usize, first: usize, out: &mut [f32], tile: &mut [f32]) {
            let (cols, count, count4, n4) = super::tiled_shape(m, x, n, out, tile);
            // SAFETY: AVX2 and FMA, as this function requires; `dequantize_tile` checks the rest.
            by_groups!(m, S => unsafe { dequantize_tile::<S>(m, first, count, tile) });
            for i in (0..count4).step_by(2) {
                for j in (0..n4).step_by(4) {
                    // SAFETY: rows `i .. i + 2` of the tile (`count4` rows, `i` even) and `j ..
                    // j + 4` of `x` (`n4` rows), each `cols` long, a multiple of 16 (checked).
                    let d = unsafe { dots_2x4(tile.as_ptr().add(i * cols), x.as_ptr().add(j * cols), cols) };
                    super::store_dots(out, n, count, i, j, &d);
                }
            }
        }
    }

    /// The 8-bit-activation loop of one to four activation rows again with AVX-512 VNNI: two
    /// blocks of 32 a step, their codes (unsigned bytes: 4-bit ones split into low and high nibbles, the
    /// activations' order; 8-bit ones as stored, offset by 128) against the activations in
    /// one `vpdpbusd`, which sums four unsigned-by-signed products into each 32-bit lane
    /// without the 16-bit saturation of `pmaddubsw` (so 8-bit codes need no sign trick), then
    /// one conversion and one multiply-add for both blocks. Chosen at run time where the CPU
    /// has AVX-512 F, BW and VNNI ([`super::use_avx512`]).
    #[cfg(target_arch = "x86_64")]
    pub(super) mod vnni {
        use super::{ACTIVATION_BLOCK, ActivationBlocks8, ActivationUnits, QuantizedMatrix};
        use std::arch::x86_64::*;

        /// Two consecutive blocks' codes at `bytes` as 64 unsigned bytes, each block's in
        /// its activations' order.
        ///
        /// # Safety
        /// `BITS * 8` bytes are readable at `bytes`, and the CPU has AVX-512 F and BW.
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn pair_codes<const BITS: u32>(bytes: *const u8) -> __m512i {
            if BITS == 4 {
                // SAFETY: the caller guarantees 32 readable bytes (an unaligned load).
                let y = unsafe { _mm256_loadu_si256(bytes as *const __m256i) };
                let low = _mm256_set1_epi8(0x0f);
                let lo = _mm256_and_si256(y, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(y, 4), low);
                // [b0 low, b1 low, b0 high, b1 high] -> [b0 low, b0 high, b1 low, b1 high].
                let z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                _mm512_shuffle_i64x2(z, z, 0b11_01_10_00)
            } else {
                // SAFETY: the caller guarantees 64 readable bytes (an unaligned load).
                unsafe { _mm512_loadu_epi8(bytes as *const i8) }
            }
        }

        /// Whether [`rows_i8_units`] takes `m`: 4- or 8-bit codes in groups of whole blocks
        /// that either divide a unit of 64 code bytes or are whole units, so that a unit's
        /// blocks take their scales from consecutive groups.
        pub(in super::super) fn takes_units(m: &QuantizedMatrix) -> bool {
            let per_group = m.group / ACTIVATION_BLOCK;
            let per_unit = ActivationUnits::blocks_per_unit(m.bits);
            (m.bits == 4 || m.bits == 8) && per_group * ACTIVATION_BLOCK == m.group && m.cols.is_multiple_of(ACTIVATION_BLOCK) && (per_unit.is_multiple_of(per_group) || per_group.is_multiple_of(per_unit))
        }

        /// Output rows `first .. first + out.len()` of `m` ([`takes_units`]) against one row
        /// of activations in units: per unit of 64 code bytes (four blocks of 4-bit codes,
        /// whose low and high nibbles meet the blocks' even and odd activations, or two of
        /// 8-bit codes) VNNI multiply-adds leave each block's sums in its own lanes (`16 /
        /// blocks` of them), then one conversion and one multiply-add by the lanes' code and
        /// activation scales. `sums` are the f32 sums of the activations per group (for the
        /// offsets).
        ///
        /// # Safety
        /// The CPU has AVX-512 F, BW and VNNI (the shapes are checked here).
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
        pub(in super::super) unsafe fn rows_i8_units<S: super::super::GroupValue, const BITS: u32, const N: usize>(m: &QuantizedMatrix, first: usize, acts: [&ActivationUnits; N], sums: [&[f32]; N], out: &mut [f32]) {
            let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
            let groups = m.groups_per_row();
            let blocks = m.cols / ACTIVATION_BLOCK;
            let per_group = m.group / ACTIVATION_BLOCK;
            let per_unit = ActivationUnits::blocks_per_unit(BITS);
            let block_bytes = ACTIVATION_BLOCK * BITS as usize / 8;
            let units = blocks.div_ceil(per_unit);
            let row_bytes = m.cols * BITS as usize / 8;
            let count = out.len() / N;
            assert!(
                m.bits == BITS
                    && out.len() == count * N
                    && takes_units(m)
                    && acts.iter().all(|a| a.bits == BITS && a.even.len() == units * 64 && a.odd.len() == if BITS == 4 { units * 64 } else { 0 } && a.scales.len() == units * 16)
                    && sums.iter().all(|s| s.len() == groups)
                    && (first + count) * row_bytes <= m.codes.len() * 4
                    && (first + count) * groups <= sc.len().min(mn.len()),
                "rows of another width"
            );
            let codes = m.codes.as_ptr() as *const u8;
            let low = _mm512_set1_epi8(0x0f);
            // Lane `i` holds block `i / lanes`'s sums; its scale is that of group `(i / lanes)
            // / per_group` counted from the unit's first group (the unit's one group where
            // groups are whole units).
            let lanes = 16 / per_unit;
            let index: [i32; 16] = std::array::from_fn(|i| if per_group >= per_unit { 0 } else { ((i / lanes) / per_group) as i32 });
            // SAFETY: 16 readable i32s.
            let index = unsafe { _mm512_loadu_si512(index.as_ptr() as *const _) };
            // A whole unit's groups: `groups_per_unit` of them where groups divide units, else
            // one of every `units_per_group` units.
            let groups_per_unit = (per_unit / per_group).max(1);
            let units_per_group = (per_group / per_unit).max(1);
            let full_scales: u16 = if per_group >= per_unit { 1 } else { (1u16 << groups_per_unit) - 1 };
            let (scales, mins) = (&sc[first * groups..(first + count) * groups], &mn[first * groups..(first + count) * groups]);
            for (r, ((ys, row_scales), row_mins)) in out.chunks_exact_mut(N).zip(scales.chunks_exact(groups)).zip(mins.chunks_exact(groups)).enumerate() {
                // SAFETY: row `first + r` lies in the matrix (asserted above): its
                // `row_bytes` code bytes start here.
                let row_codes = unsafe { codes.add((first + r) * row_bytes) };
                // Unit `u` into `acc` (one accumulator per activation row, each row's operations
                // the same whatever `N`, so that a row's result does not depend on the rows
                // beside it); `present` of its blocks in the row. (A macro: as a closure it was
                // not inlined.)
                macro_rules! unit {
                    ($u:expr, $present:expr, $acc:expr) => {{
                        let (u, present, acc): (usize, usize, &mut [__m512; N]) = ($u, $present, &mut $acc);
                        // (No division where groups divide units: it was the loop's bottleneck.)
                        let first_group = if per_group <= per_unit { u * groups_per_unit } else { u / units_per_group };
                        let scale_mask = if present == per_unit { full_scales } else if per_group >= per_unit { 1 } else { (1u16 << present.div_ceil(per_group)) - 1 };
                        // SAFETY: the unit's `present` blocks' code bytes lie in the row (masked
                        // loads read nothing past them), its groups' scales (`scale_mask`) in the
                        // row's scales, and its 64 (+ 64) activations and 16 lane scales in each
                        // row of `acts` (asserted above); unaligned loads.
                        unsafe {
                            let c = if present == per_unit {
                                _mm512_loadu_si512(row_codes.add(u * 64) as *const _)
                            } else {
                                _mm512_maskz_loadu_epi8((1u64 << (block_bytes * present)) - 1, row_codes.add(u * 64) as *const i8)
                            };
                            let (lo, hi) = if BITS == 4 { (_mm512_and_si512(c, low), _mm512_and_si512(_mm512_srli_epi16(c, 4), low)) } else { (c, c) };
                            let w = _mm512_permutexvar_ps(index, S::load16_masked(scale_mask, row_scales.as_ptr().add(first_group)));
                            for (a, acc) in acts.iter().zip(acc.iter_mut()) {
                                let even = _mm512_loadu_si512(a.even.as_ptr().add(u * 64) as *const _);
                                let isum = if BITS == 4 {
                                    let odd = _mm512_loadu_si512(a.odd.as_ptr().add(u * 64) as *const _);
                                    _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, even), hi, odd)
                                } else {
                                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, even)
                                };
                                let scale = _mm512_mul_ps(w, _mm512_loadu_ps(a.scales.as_ptr().add(u * 16)));
                                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, *acc);
                            }
                        }
                    }};
                }
                // Whole units in pairs (two chains of multiply-adds per row), then the rest.
                let (mut acc0, mut acc1) = ([_mm512_setzero_ps(); N], [_mm512_setzero_ps(); N]);
                let whole = blocks / per_unit;
                let mut u = 0;
                while u + 2 <= whole {
                    // A prefetch reads nothing and faults on no address (the two units' lines,
                    // `PREFETCH_ROWS` rows ahead).
                    let ahead = row_codes.wrapping_add(super::PREFETCH_ROWS * row_bytes + u * 64);
                    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64) as *const i8);
                    unit!(u, per_unit, acc0);
                    unit!(u + 1, per_unit, acc1);
                    u += 2;
                }
                if u < whole {
                    unit!(u, per_unit, acc0);
                    u += 1;
                }
                if u < units {
                    unit!(u, blocks - per_unit * u, acc1);
                }
                for j in 0..N {
                    ys[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[j], acc1[j])) + offsets_dot!(row_mins, sums[j]);
                }
            }
        }

        /// [`super::rows_i8_avx2`] with VNNI: output rows `first .. first + out.len() / N` of
        /// `m` against `N` rows of activation blocks (each pair of blocks' codes loaded once
        /// for all of them), into `out` (`[rows, N]`).
        ///
        /// # Safety
        /// The CPU has AVX-512 F, BW and VNNI (the shapes are checked here).
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
        pub(in super::super) unsafe fn rows_i8<S: super::super::GroupValue, const BITS: u32, const N: usize>(m: &QuantizedMatrix, first: usize, acts: [&ActivationBlocks8; N], sums: [&[f32]; N], out: &mut [f32]) {
            let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
            let super::I8Rows { groups, blocks, blocks_per_group, block_bytes, row_bytes, count } = super::i8_rows_shape(m, BITS, sc.len().min(mn.len()), first, out.len(), &acts, &sums);
            let codes = m.codes.as_ptr() as *const u8;
            let qp: [*const i8; N] = acts.map(|a| a.q.as_ptr());
            let (scales, mins) = (&sc[first * groups..(first + count) * groups], &mn[first * groups..(first + count) * groups]);
            for (r, ((ys, row_scales), row_mins)) in out.chunks_exact_mut(N).zip(scales.chunks_exact(groups)).zip(mins.chunks_exact(groups)).enumerate() {
                // SAFETY: row `first + r` lies in the matrix (asserted above): its `row_bytes`
                // code bytes start here.
                let row_codes = unsafe { codes.add((first + r) * row_bytes) };
                let mut acc = [_mm512_setzero_ps(); N];
                let mut b = 0;
                while b + 2 <= blocks {
                    // SAFETY: blocks `b` and `b + 1` lie in the row (`b + 2 <= blocks`): their
                    // `2 * block_bytes` code bytes, and their 64 activations in each `q`
                    // (`cols` long); unaligned loads.
                    let c = unsafe { pair_codes::<BITS>(row_codes.add(b * block_bytes)) };
                    let (w0, w1) = (v!(row_scales[b / blocks_per_group]), v!(row_scales[(b + 1) / blocks_per_group]));
                    for j in 0..N {
                        // SAFETY: as above.
                        let qv = unsafe { _mm512_loadu_epi8(qp[j].add(b * ACTIVATION_BLOCK)) };
                        let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, qv);
                        let scale = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(w0 * acts[j].scales[b]), _mm512_set1_ps(w1 * acts[j].scales[b + 1]));
                        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[j]);
                    }
                    b += 2;
                }
                for j in 0..N {
                    let a = acts[j];
                    let mut total = _mm512_reduce_add_ps(acc[j]);
                    if b < blocks {
                        // An odd last block, in scalars.
                        // SAFETY: block `b` lies in the row: its `block_bytes` code bytes.
                        let bytes = unsafe { std::slice::from_raw_parts(row_codes.add(b * block_bytes), block_bytes) };
                        let isum = super::block_isum(BITS, |i| i32::from(bytes[i]), &a.q[b * ACTIVATION_BLOCK..(b + 1) * ACTIVATION_BLOCK]);
                        total += isum as f32 * (v!(row_scales[b / blocks_per_group]) * a.scales[b]);
                    }
                    ys[j] = total + offsets_dot!(row_mins, sums[j]);
                }
            }
        }
    }

    /// Whether one row of 8-bit activations of `m` takes the unit loop
    /// (`vnni::rows_i8_units`): 4- or 8-bit codes in suitable groups on a CPU with AVX-512
    /// VNNI.
    pub(super) fn takes_units(m: &QuantizedMatrix) -> bool {
        #[cfg(target_arch = "x86_64")]
        return has_vnni() && vnni::takes_units(m);
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = m;
            false
        }
    }

    /// Output rows `first .. first + out.len()` of `m` against one row of activations in
    /// units ([`takes_units`] must hold).
    pub(super) fn rows_dot_units(m: &QuantizedMatrix, first: usize, acts: &[&ActivationUnits], sums: &[&[f32]], out: &mut [f32]) {
        let n = acts.len();
        assert!(takes_units(m), "rows_dot_units: the CPU or the matrix does not take the unit loop");
        assert!((1..=4).contains(&n) && sums.len() == n && out.len().is_multiple_of(n), "rows_dot_units: 1 to 4 activation rows, each with its sums");
        #[cfg(target_arch = "x86_64")]
        {
            macro_rules! pass {
                ($bits:literal) => {
                    // SAFETY: the CPU has AVX-512 F, BW and VNNI (asserted above, detected at
                    // run time).
                    unsafe {
                        match (acts, sums) {
                            (&[a], &[s]) => vnni::rows_i8_units::<S, $bits, 1>(m, first, [a], [s], out),
                            (&[a, b], &[s, t]) => vnni::rows_i8_units::<S, $bits, 2>(m, first, [a, b], [s, t], out),
                            (&[a, b, c], &[s, t, u]) => vnni::rows_i8_units::<S, $bits, 3>(m, first, [a, b, c], [s, t, u], out),
                            (&[a, b, c, d], &[s, t, u, v]) => vnni::rows_i8_units::<S, $bits, 4>(m, first, [a, b, c, d], [s, t, u, v], out),
                            _ => unreachable!("asserted above"),
                        }
                    }
                };
            }
            by_groups!(m, S => if m.bits == 4 { pass!(4) } else { pass!(8) });
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (first, acts, sums, out);
    }

    /// Output rows `first .. first + out.len() / acts.len()` of `m` times 1 to 4 rows of
    /// [`ActivationBlocks8`] (`sums` their per-group f32 sums), into `out` (`[rows,
    /// acts.len()]`).
    pub(super) fn rows_dot_i8(m: &QuantizedMatrix, first: usize, acts: &[&ActivationBlocks8], sums: &[&[f32]], out: &mut [f32]) {
        let n = acts.len();
        assert!((1..=4).contains(&n) && sums.len() == n && out.len().is_multiple_of(n), "rows_dot_i8: 1 to 4 activation rows, each with its sums");
        #[cfg(target_arch = "x86_64")]
        if has_vnni() {
            macro_rules! pass {
                ($bits:literal) => {
                    // SAFETY: the CPU has AVX-512 F, BW and VNNI (detected at run time).
                    unsafe {
                        match (acts, sums) {
                            (&[a], &[s]) => vnni::rows_i8::<S, $bits, 1>(m, first, [a], [s], out),
                            (&[a, b], &[s, t]) => vnni::rows_i8::<S, $bits, 2>(m, first, [a, b], [s, t], out),
                            (&[a, b, c], &[s, t, u]) => vnni::rows_i8::<S, $bits, 3>(m, first, [a, b, c], [s, t, u], out),
                            (&[a, b, c, d], &[s, t, u, v]) => vnni::rows_i8::<S, $bits, 4>(m, first, [a, b, c, d], [s, t, u, v], out),
                            _ => unreachable!("asserted above"),
                        }
                    }
                };
            }
            by_groups!(m, S => if m.bits == 4 { pass!(4) } else { pass!(8) });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            macro_rules! pass {
                ($bits:literal) => {
                    // SAFETY: the CPU has AVX2 and FMA (detected at run time).
                    unsafe {
                        match (acts, sums) {
                            (&[a], &[s]) => rows_i8_avx2::<S, $bits, 1>(m, first, [a], [s], out),
                            (&[a, b], &[s, t]) => rows_i8_avx2::<S, $bits, 2>(m, first, [a, b], [s, t], out),
                            (&[a, b, c], &[s, t, u]) => rows_i8_avx2::<S, $bits, 3>(m, first, [a, b, c], [s, t, u], out),
                            (&[a, b, c, d], &[s, t, u, v]) => rows_i8_avx2::<S, $bits, 4>(m, first, [a, b, c, d], [s, t, u, v], out),
                            _ => unreachable!("asserted above"),
                        }
                    }
                };
            }
            by_groups!(m, S => if m.bits == 4 { pass!(4) } else { pass!(8) });
            return;
        }
        #[cfg(target_arch = "aarch64")]
        {
            macro_rules! pass {
                ($bits:literal) => {
                    // SAFETY: NEON is part of the aarch64 baseline (every aarch64 target has it).
                    unsafe {
                        match (acts, sums) {
                            (&[a], &[s]) => neon::rows_i8::<S, $bits, 1>(m, first, [a], [s], out),
                            (&[a, b], &[s, t]) => neon::rows_i8::<S, $bits, 2>(m, first, [a, b], [s, t], out),
                            (&[a, b, c], &[s, t, u]) => neon::rows_i8::<S, $bits, 3>(m, first, [a, b, c], [s, t, u], out),
                            (&[a, b, c, d], &[s, t, u, v]) => neon::rows_i8::<S, $bits, 4>(m, first, [a, b, c, d], [s, t, u, v], out),
                            _ => unreachable!("asserted above"),
                        }
                    }
                };
            }
            by_groups!(m, S => if m.bits == 4 { pass!(4) } else { pass!(8) });
            return;
        }
        #[allow(unreachable_code)]
        for (r, ys) in out.chunks_exact_mut(n).enumerate() {
            for ((y, a), s) in ys.iter_mut().zip(acts).zip(sums) {
                *y = row_dot_i8_any(m, first + r, a, s);
            }
        }
    }

    /// The 8-bit-activation loop for aarch64 with NEON (baseline there, so no run-time check):
    /// per block of 32 codes, sixteen 8x8-bit products at a time (`smull`/`smull2`) summed
    /// pairwise into four 32-bit lanes (`sadalp`), llama.cpp's `ggml_vec_dot_q4_1_q8_1`
    /// structure without `sdot` (its intrinsic is not stable in Rust: CPUs with the dot-product
    /// extension take this loop too). Then one conversion and one multiply-add by the block's
    /// scales per activation row, as [`rows_i8_avx2`] does with eight lanes.
    #[cfg(target_arch = "aarch64")]
    mod neon {
        use super::{ACTIVATION_BLOCK, ActivationBlocks8, GroupValue, QuantizedMatrix};
        use std::arch::aarch64::*;

        /// `Σ code · q` of one block's 16 code bytes (`lo`, `hi`: 4-bit codes as low and high
        /// nibbles, which meet the block's even and odd activations `qe`, `qo`; 8-bit codes
        /// less 128 as `lo` and `hi` for the block's two halves `qe`, `qo`), as four lanes.
        #[target_feature(enable = "neon")]
        #[inline]
        fn block_sums(lo: int8x16_t, hi: int8x16_t, qe: int8x16_t, qo: int8x16_t) -> int32x4_t {
            let s = vpaddlq_s16(vmull_s8(vget_low_s8(lo), vget_low_s8(qe)));
            let s = vpadalq_s16(s, vmull_high_s8(lo, qe));
            let s = vpadalq_s16(s, vmull_s8(vget_low_s8(hi), vget_low_s8(qo)));
            vpadalq_s16(s, vmull_high_s8(hi, qo))
        }

        /// Output rows `first .. first + out.len() / N` of `m` (4- or 8-bit codes in groups
        /// of whole blocks) against `N` rows of activation blocks, into `out` (`[rows, N]`).
        #[target_feature(enable = "neon")]
        pub(super) fn rows_i8<S: GroupValue, const BITS: u32, const N: usize>(m: &QuantizedMatrix, first: usize, acts: [&ActivationBlocks8; N], sums: [&[f32]; N], out: &mut [f32]) {
            let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
            let super::I8Rows { groups, blocks_per_group, block_bytes, row_bytes, count, .. } = super::i8_rows_shape(m, BITS, sc.len().min(mn.len()), first, out.len(), &acts, &sums);
            let codes = m.codes.as_ptr() as *const u8;
            let qp: [*const i8; N] = acts.map(|a| a.q.as_ptr());
            let (low, offset) = (vdupq_n_u8(0x0f), vdupq_n_u8(0x80));
            for (r, ys) in out.chunks_exact_mut(N).enumerate() {
                let row = first + r;
                let (row_scales, row_mins) = (&sc[row * groups..(row + 1) * groups], &mn[row * groups..(row + 1) * groups]);
                // SAFETY: row `row` lies in the matrix (asserted above): its `row_bytes` code
                // bytes start here.
                let row_codes = unsafe { codes.add(row * row_bytes) };
                let mut acc = [vdupq_n_f32(0.0); N];
                let mut b = 0;
                for &scale in row_scales {
                    let scale = scale.get();
                    for _ in 0..blocks_per_group {
                        // SAFETY: `b < blocks`: the block's `block_bytes` code bytes lie in the
                        // row and its 32 activations in each `q` (`cols` long), asserted above.
                        let (lo, hi) = unsafe {
                            let at = row_codes.add(b * block_bytes);
                            if BITS == 4 {
                                let c = vld1q_u8(at);
                                (vreinterpretq_s8_u8(vandq_u8(c, low)), vreinterpretq_s8_u8(vshrq_n_u8::<4>(c)))
                            } else {
                                (vreinterpretq_s8_u8(veorq_u8(vld1q_u8(at), offset)), vreinterpretq_s8_u8(veorq_u8(vld1q_u8(at.add(16)), offset)))
                            }
                        };
                        for j in 0..N {
                            // SAFETY: as above.
                            let (qe, qo) = unsafe { (vld1q_s8(qp[j].add(b * ACTIVATION_BLOCK)), vld1q_s8(qp[j].add(b * ACTIVATION_BLOCK + 16))) };
                            let mut isum = block_sums(lo, hi, qe, qo);
                            if BITS == 8 {
                                // The codes were taken less 128: add `128 · Σ q` back.
                                isum = vsetq_lane_s32::<0>(vgetq_lane_s32::<0>(isum) + 128 * acts[j].sums[b], isum);
                            }
                            acc[j] = vfmaq_n_f32(acc[j], vcvtq_f32_s32(isum), scale * acts[j].scales[b]);
                        }
                        b += 1;
                    }
                }
                for j in 0..N {
                    ys[j] = vaddvq_f32(acc[j]) + row_mins.iter().zip(sums[j]).map(|(m, s)| m.get() * s).sum::<f32>();
                }
            }
        }
    }

    /// The sum of a vector's eight lanes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn hsum(v: std::arch::x86_64::__m256) -> f32 {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds eight f32.
        unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum()
    }

    /// `acc += code · x` lane by lane over one packed word's `PER` codes of `BITS` bits.
    #[inline(always)]
    fn word_fma<const BITS: u32, const PER: usize>(acc: &mut [f32; PER], word: u32, x: &[f32]) {
        let Ok(x) = <&[f32; PER]>::try_from(x) else { return };
        let mask = (1i32 << BITS) - 1;
        // Through i32 (codes are below 2^8): a signed conversion is one vector instruction.
        let word = word as i32;
        for k in 0..PER {
            acc[k] += (word.wrapping_shr(k as u32 * BITS) & mask) as f32 * x[k];
        }
    }

    /// Row `row` of `m` times `x` (`cols`), with `sums` the sums of `x` per group. The sums
    /// stay in `PER` lanes (one vector) until the row ends.
    #[inline(always)]
    fn row_dot_body<S: GroupValue, const BITS: u32, const PER: usize>(m: &QuantizedMatrix, row: usize, x: &[f32], sums: &[f32]) -> f32 {
        let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
        let wpr = m.words_per_row();
        let words = &m.codes[row * wpr..(row + 1) * wpr];
        let groups = m.groups_per_row();
        let (scales, mins) = (&sc[row * groups..(row + 1) * groups], &mn[row * groups..(row + 1) * groups]);
        let per_group = m.group / PER;
        let mut total = [0f32; PER];
        let mut offsets = 0f32;
        for (g, (group_words, xg)) in words.chunks_exact(per_group).zip(x.chunks_exact(m.group)).enumerate() {
            // Four independent accumulators, four words at a time.
            let mut acc = [[0f32; PER]; 4];
            let mut quads = group_words.chunks_exact(4).zip(xg.chunks_exact(4 * PER));
            for (ws, xs) in &mut quads {
                for q in 0..4 {
                    word_fma::<BITS, PER>(&mut acc[q], ws[q], &xs[q * PER..(q + 1) * PER]);
                }
            }
            let tail = group_words.len() / 4 * 4;
            for (w, xs) in group_words[tail..].iter().zip(xg[tail * PER..].chunks_exact(PER)) {
                word_fma::<BITS, PER>(&mut acc[0], *w, xs);
            }
            let scale = scales[g].get();
            for k in 0..PER {
                total[k] += scale * ((acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k]));
            }
            offsets += mins[g].get() * sums[g];
        }
        total.iter().sum::<f32>() + offsets
    }

    /// [`row_dot_body`] for `m`'s code width, compiled for the baseline target.
    #[inline(always)]
    pub(super) fn row_dot_any(m: &QuantizedMatrix, row: usize, x: &[f32], sums: &[f32]) -> f32 {
        by_groups!(m, S => if m.bits == 4 { row_dot_body::<S, 4, 8>(m, row, x, sums) } else { row_dot_body::<S, 8, 4>(m, row, x, sums) })
    }

    /// Row `row` of `m` times one row of [`ActivationBlocks`] (checked by the caller:
    /// `m.takes_activation_blocks()`), `sums` the f32 sums of the activations per group:
    /// per unit of `UNIT` codes an exact integer `Σ code · q`, scaled by the unit's group
    /// scale and block scale, plus `Σ min · sums`.
    #[inline(always)]
    fn row_dot_i16_body<S: GroupValue, const BITS: u32, const UNIT: usize>(m: &QuantizedMatrix, row: usize, a: &ActivationBlocks, sums: &[f32]) -> f32 {
        let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
        let wpr = m.words_per_row();
        let words = &m.codes[row * wpr..(row + 1) * wpr];
        let groups = m.groups_per_row();
        let (scales, mins) = (&sc[row * groups..(row + 1) * groups], &mn[row * groups..(row + 1) * groups]);
        let units_per_group = m.group / UNIT;
        let words_per_unit = UNIT * BITS as usize / 32;
        let mut total = 0f32;
        for (u, (unit_words, q)) in words.chunks_exact(words_per_unit).zip(a.q.chunks_exact(UNIT)).enumerate() {
            let mut isum = 0i32;
            if BITS == 4 {
                // Byte `b` of the unit holds elements `2b` (low nibble) and `2b + 1`; `q` holds
                // the block's even elements, then its odd ones.
                let half = UNIT / 2;
                for (b, qe) in q[..half].iter().enumerate() {
                    let byte = (unit_words[b / 4] >> (8 * (b % 4))) & 0xff;
                    isum += (byte & 0xf) as i32 * *qe as i32 + (byte >> 4) as i32 * q[half + b] as i32;
                }
            } else {
                for (k, &qk) in q.iter().enumerate() {
                    isum += ((unit_words[k / 4] >> (8 * (k % 4))) & 0xff) as i32 * qk as i32;
                }
            }
            total += isum as f32 * (scales[u / units_per_group].get() * a.scales[u * UNIT / super::ACTIVATION_BLOCK]);
        }
        total + mins.iter().zip(sums).map(|(m, s)| m.get() * s).sum::<f32>()
    }

    /// [`row_dot_i16_body`] for `m`'s code width and group, for the baseline target.
    pub(super) fn row_dot_i16_any(m: &QuantizedMatrix, row: usize, a: &ActivationBlocks, sums: &[f32]) -> f32 {
        by_groups!(m, S => match (m.bits, m.group.is_multiple_of(32)) {
            (4, _) => row_dot_i16_body::<S, 4, 32>(m, row, a, sums),
            (_, true) => row_dot_i16_body::<S, 8, 32>(m, row, a, sums),
            _ => row_dot_i16_body::<S, 8, 16>(m, row, a, sums),
        })
    }

    /// [`row_dot_i16_body`] with AVX2: a unit's codes widened to 16 bits (4-bit ones split
    /// into low and high nibbles), `pmaddwd` against the activations into eight 32-bit sums,
    /// converted and scaled into one of four f32 accumulators.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn row_dot_i16_avx2<S: GroupValue, const BITS: u32, const UNIT: usize>(m: &QuantizedMatrix, row: usize, a: &ActivationBlocks, sums: &[f32]) -> f32 {
        let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
        use std::arch::x86_64::*;
        let wpr = m.words_per_row();
        let groups = m.groups_per_row();
        let words = &m.codes[row * wpr..(row + 1) * wpr];
        let scales = &sc[row * groups..(row + 1) * groups];
        let units = m.cols / UNIT;
        let units_per_group = m.group / UNIT;
        assert!(
            words.len() * 4 == units * UNIT * BITS as usize / 8 && a.q.len() == m.cols && a.scales.len() * super::ACTIVATION_BLOCK == m.cols,
            "a row of another width"
        );
        let (bytes, qp) = (words.as_ptr() as *const u8, a.q.as_ptr());
        let nibble = _mm256_set1_epi16(0xf);
        // Four accumulators in rotation (each unit adds to the one least recently written).
        let (mut a0, mut a1, mut a2, mut a3) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        let mut u = 0;
        for &scale in scales {
            let scale = v!(scale);
            for _ in 0..units_per_group {
                // SAFETY: `u < units`: the unit's `UNIT * BITS / 8` code bytes lie in the row's
                // words and its `UNIT` activations in `q` (lengths asserted above); unaligned
                // loads; x86-64 is little-endian, so the words' bytes are the packed order.
                let isum = unsafe {
                    if BITS == 4 {
                        let w = _mm256_cvtepu8_epi16(_mm_loadu_si128(bytes.add(u * 16) as *const __m128i));
                        let lo = _mm256_and_si256(w, nibble);
                        let hi = _mm256_srli_epi16(w, 4);
                        let qe = _mm256_loadu_si256(qp.add(u * 32) as *const __m256i);
                        let qo = _mm256_loadu_si256(qp.add(u * 32 + 16) as *const __m256i);
                        _mm256_add_epi32(_mm256_madd_epi16(lo, qe), _mm256_madd_epi16(hi, qo))
                    } else if UNIT == 32 {
                        let c0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(bytes.add(u * 32) as *const __m128i));
                        let c1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(bytes.add(u * 32 + 16) as *const __m128i));
                        let q0 = _mm256_loadu_si256(qp.add(u * 32) as *const __m256i);
                        let q1 = _mm256_loadu_si256(qp.add(u * 32 + 16) as *const __m256i);
                        _mm256_add_epi32(_mm256_madd_epi16(c0, q0), _mm256_madd_epi16(c1, q1))
                    } else {
                        let c0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(bytes.add(u * 16) as *const __m128i));
                        _mm256_madd_epi16(c0, _mm256_loadu_si256(qp.add(u * 16) as *const __m256i))
                    }
                };
                let f = _mm256_set1_ps(scale * a.scales[u * UNIT / super::ACTIVATION_BLOCK]);
                let next = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), f, a0);
                (a0, a1, a2, a3) = (a1, a2, a3, next);
                u += 1;
            }
        }
        hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + offsets_dot!(&mn[row * groups..(row + 1) * groups], sums)
    }

    /// Row `row` of `m` times `x`, `sums` the sums of `x` per group of `m`.
    pub(super) fn row_dot(m: &QuantizedMatrix, row: usize, x: &[f32], sums: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA (detected at run time), the only requirement
            // of calling a function compiled for them.
            return by_groups!(m, S => unsafe { row_dot_avx2::<S>(m, row, x, sums) });
        }
        row_dot_any(m, row, x, sums)
    }

    /// Row `row` of `m` times one row of [`ActivationBlocks`].
    pub(super) fn row_dot_i16(m: &QuantizedMatrix, row: usize, a: &ActivationBlocks, sums: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA (detected at run time).
            return by_groups!(m, S => unsafe {
                match (m.bits, m.group.is_multiple_of(32)) {
                    (4, _) => row_dot_i16_avx2::<S, 4, 32>(m, row, a, sums),
                    (_, true) => row_dot_i16_avx2::<S, 8, 32>(m, row, a, sums),
                    _ => row_dot_i16_avx2::<S, 8, 16>(m, row, a, sums),
                }
            });
        }
        row_dot_i16_any(m, row, a, sums)
    }


    /// [`row_dot_body`] with AVX2 and FMA: eight codes per 256-bit vector (a 4-bit word, or
    /// two 8-bit words widened), `code · x` scaled by its group's scale into four
    /// accumulators that live across groups.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn row_dot_avx2<S: GroupValue>(m: &QuantizedMatrix, row: usize, x: &[f32], sums: &[f32]) -> f32 {
        let (_, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
        let groups = m.groups_per_row();
        if x.len() != m.cols || sums.len() != groups || !m.group.is_multiple_of(8) {
            return row_dot_any(m, row, x, sums);
        }
        let codes = if m.bits == 4 { row_codes_avx2::<S, 4>(m, row, x) } else { row_codes_avx2::<S, 8>(m, row, x) };
        codes + offsets_dot!(&mn[row * groups..(row + 1) * groups], sums)
    }

    /// `Σ_g scale_g · Σ_{k in g} code_k · x_k` over row `row` (`x` of `cols`, groups of a
    /// multiple of 8: checked by the caller).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn row_codes_avx2<S: GroupValue, const BITS: u32>(m: &QuantizedMatrix, row: usize, x: &[f32]) -> f32 {
        let (sc, _) = S::slices(&m.groups).expect("group values of the type the caller chose");
        use std::arch::x86_64::*;
        let wpr = m.words_per_row();
        let groups = m.groups_per_row();
        let words = &m.codes[row * wpr..(row + 1) * wpr];
        let scales = &sc[row * groups..(row + 1) * groups];
        let vectors_per_group = m.group / 8;
        assert!(words.len() * 32 / BITS as usize == x.len() && x.len() == groups * m.group, "a row of another width");
        let (wp, xp) = (words.as_ptr(), x.as_ptr());
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let nibble = _mm256_set1_epi32(0xf);
        // Vector `v`'s eight `code · x` products added to `acc` (a macro, not a closure:
        // closures are not compiled for the function's features).
        macro_rules! step {
            ($v:expr, $acc:ident) => {{
                let v: usize = $v;
                // SAFETY: `v < cols / 8`: its words lie in the row (`words.len() * 32 / BITS
                // == cols`) and its activations `v * 8 .. v * 8 + 8` in `x` (`x.len() ==
                // cols`), both asserted above.
                let (codes, xs) = unsafe {
                    let codes = if BITS == 4 {
                        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(*wp.add(v) as i32), shifts), nibble)
                    } else {
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64(wp.add(2 * v) as *const __m128i))
                    };
                    (codes, _mm256_loadu_ps(xp.add(v * 8)))
                };
                $acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes), xs, $acc);
            }};
        }
        // Per group, two partial sums of `code · x`, then scaled into one of two totals.
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut g = 0;
        while g < groups {
            let (mut p, mut q) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let first = g * vectors_per_group;
            let end = first + vectors_per_group;
            let mut v = first;
            while v + 2 <= end {
                step!(v, p);
                step!(v + 1, q);
                v += 2;
            }
            if v < end {
                step!(v, p);
            }
            let scale = _mm256_set1_ps(v!(scales[g]));
            if g % 2 == 0 {
                a0 = _mm256_fmadd_ps(_mm256_add_ps(p, q), scale, a0);
            } else {
                a1 = _mm256_fmadd_ps(_mm256_add_ps(p, q), scale, a1);
            }
            g += 1;
        }
        hsum(_mm256_add_ps(a0, a1))
    }

    /// One unit of 32 4-bit codes, the 16 bytes at `bytes`, as four vectors of f32 in
    /// [`super::split_nibble_order`]'s order: the low nibbles (even codes) of bytes 0-7 and
    /// 8-15, then the high nibbles (odd codes) of bytes 0-7 and 8-15.
    ///
    /// # Safety
    /// 16 bytes are readable at `bytes`, and the CPU has AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn unit_codes4(bytes: *const u8) -> [std::arch::x86_64::__m256; 4] {
        use std::arch::x86_64::*;
        // Each half of the 16 bytes widened to 32-bit lanes straight from memory (the load
        // folded in), then a lane's low nibble masked and its high one shifted down: the same
        // four vectors as unpacking the nibbles first, in fewer shuffles (which share one
        // port).
        let low = _mm256_set1_epi32(0x0f);
        // SAFETY: the caller guarantees 16 readable bytes (two unaligned 8-byte loads).
        let (h0, h1) = unsafe { (_mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes as *const __m128i)), _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.add(8) as *const __m128i))) };
        [
            _mm256_cvtepi32_ps(_mm256_and_si256(h0, low)),
            _mm256_cvtepi32_ps(_mm256_and_si256(h1, low)),
            _mm256_cvtepi32_ps(_mm256_srli_epi32(h0, 4)),
            _mm256_cvtepi32_ps(_mm256_srli_epi32(h1, 4)),
        ]
    }

    /// Group values as f32, in a buffer the loops broadcast from (a broadcast from memory
    /// takes no arithmetic port; one value converted in the loop took three to four
    /// instructions a group and row): eight converted at a time. For the AVX2 and the AVX-512
    /// loops (AVX-512F implies AVX2 and F16C).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn values_f32<S: GroupValue>(values: &[S]) -> Vec<f32> {
        use std::arch::x86_64::*;
        let mut out = vec![0f32; values.len()];
        let mut chunks = out.chunks_exact_mut(8);
        for (o, v) in (&mut chunks).zip(values.chunks_exact(8)) {
            // SAFETY: eight values at `v` and eight places at `o`; this function runs only
            // where the CPU has AVX2 and F16C.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), S::load8(v.as_ptr())) };
        }
        let tail = values.len() / 8 * 8;
        for (o, v) in chunks.into_remainder().iter_mut().zip(&values[tail..]) {
            *o = v!(*v);
        }
        out
    }

    /// [`rows_split4_avx2`]'s product against `N` rows of reordered activations at once: each
    /// unit's codes are widened and converted once and multiplied into every row's sum
    /// (batched decode rows, short prompts).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn row_codes4_split_avx2_rows<S: GroupValue, const N: usize>(m: &QuantizedMatrix, row: usize, splits: [&[f32]; N]) -> [f32; N] {
        if m.group == 32 {
            row_codes4_split_avx2_rows_units::<S, N, 1>(m, row, splits)
        } else {
            row_codes4_split_avx2_rows_units::<S, N, 0>(m, row, splits)
        }
    }

    /// [`row_codes4_split_avx2_rows`] for groups of `UNITS` units of 32 codes (0: `m.group /
    /// 32`, read at run time).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn row_codes4_split_avx2_rows_units<S: GroupValue, const N: usize, const UNITS: usize>(m: &QuantizedMatrix, row: usize, splits: [&[f32]; N]) -> [f32; N] {
        let (sc, _) = S::slices(&m.groups).expect("group values of the type the caller chose");
        use std::arch::x86_64::*;
        let wpr = m.words_per_row();
        let groups = m.groups_per_row();
        let words = &m.codes[row * wpr..(row + 1) * wpr];
        let scales = &sc[row * groups..(row + 1) * groups];
        let units_per_group = if UNITS == 0 { m.group / 32 } else { UNITS };
        assert!(
            splits.iter().all(|s| words.len() * 8 == s.len()) && words.len() * 8 == groups * m.group && units_per_group * 32 == m.group,
            "a row of another width"
        );
        let mut bytes = words.as_ptr() as *const u8;
        let mut xp: [*const f32; N] = splits.map(<[f32]>::as_ptr);
        // Each row in [`rows_split4_avx2`]'s one-row order of operations, so that a batch's
        // rows equal each row alone (at four rows some accumulators spill).
        let (mut a0, mut a1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        for (g, &scale) in scales.iter().enumerate() {
            let scale = v!(scale);
            let (mut p, mut q) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
            for _ in 0..units_per_group {
                // SAFETY: one unit of 32 codes per iteration, `cols / 32` in all: its 16 code
                // bytes lie in the row (`words.len() * 8 == cols`) and its 32 activations in
                // each of the `N` reordered rows (each `cols` long), all asserted above;
                // unaligned loads; x86-64 is little-endian.
                unsafe {
                    let [c0, c1, c2, c3] = unit_codes4(bytes);
                    for j in 0..N {
                        let x = xp[j];
                        p[j] = _mm256_fmadd_ps(c0, _mm256_loadu_ps(x), p[j]);
                        q[j] = _mm256_fmadd_ps(c1, _mm256_loadu_ps(x.add(8)), q[j]);
                        p[j] = _mm256_fmadd_ps(c2, _mm256_loadu_ps(x.add(16)), p[j]);
                        q[j] = _mm256_fmadd_ps(c3, _mm256_loadu_ps(x.add(24)), q[j]);
                        xp[j] = x.add(32);
                    }
                    bytes = bytes.add(16);
                }
            }
            let scale = _mm256_set1_ps(scale);
            for j in 0..N {
                if g % 2 == 0 {
                    a0[j] = _mm256_fmadd_ps(_mm256_add_ps(p[j], q[j]), scale, a0[j]);
                } else {
                    a1[j] = _mm256_fmadd_ps(_mm256_add_ps(p[j], q[j]), scale, a1[j]);
                }
            }
        }
        let mut out = [0f32; N];
        for j in 0..N {
            out[j] = hsum(_mm256_add_ps(a0[j], a1[j]));
        }
        out
    }

    /// Row `row` of a 4-bit `m` (groups of a multiple of 32) times 2 to 4 rows of reordered
    /// activations (`splits`, with `sums` their per-group sums), written to `out`; `false`
    /// (nothing written) without AVX2 or for another count of rows.
    pub(super) fn row_dot_split4_rows(m: &QuantizedMatrix, row: usize, splits: &[&[f32]], sums: &[&[f32]], out: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() && splits.len() == out.len() && sums.len() == out.len() {
            let groups = m.groups_per_row();
            let wide = has_avx512();
            by_groups!(m, S => {
            let mins = &S::slices(&m.groups).expect("the type `by_groups` chose").1[row * groups..(row + 1) * groups];
            // SAFETY: the CPU has AVX2 and FMA, and AVX-512F where `wide` (detected at run time).
            if wide {
                // SAFETY: the CPU has AVX-512F (detected at run time).
                let whole: &[f32] = &match (splits, sums) {
                    (&[a, b], &[sa, sb]) => unsafe { avx512::row_split4_rows::<S, 2>(m, row, [a, b], [sa, sb]) }.to_vec(),
                    (&[a, b, c], &[sa, sb, sc]) => unsafe { avx512::row_split4_rows::<S, 3>(m, row, [a, b, c], [sa, sb, sc]) }.to_vec(),
                    (&[a, b, c, d], &[sa, sb, sc, sd]) => unsafe { avx512::row_split4_rows::<S, 4>(m, row, [a, b, c, d], [sa, sb, sc, sd]) }.to_vec(),
                    _ => return false,
                };
                out.copy_from_slice(whole);
                return true;
            }
            let codes: &[f32] = &match *splits {
                [a, b] => unsafe { row_codes4_split_avx2_rows::<S, 2>(m, row, [a, b]) }.to_vec(),
                [a, b, c] => unsafe { row_codes4_split_avx2_rows::<S, 3>(m, row, [a, b, c]) }.to_vec(),
                [a, b, c, d] => unsafe { row_codes4_split_avx2_rows::<S, 4>(m, row, [a, b, c, d]) }.to_vec(),
                _ => return false,
            };
            for ((o, c), s) in out.iter_mut().zip(codes).zip(sums) {
                // SAFETY: the CPU has AVX2, FMA and F16C (detected at run time).
                *o = c + unsafe { offsets_dot_avx2(mins, s) };
            }
            });
            return true;
        }
        let _ = (m, row, splits, sums, out);
        false
    }

    /// `Σ_g scale_g · Σ_{k in g} code_k · x_k + Σ_g min_g · sums_g` for output rows `first ..
    /// first + out.len()` of a 4-bit `m` (groups of whole 32s), `split` being one row of
    /// activations reordered per 32 by [`super::split_nibble_order`]: each 16 bytes of codes
    /// (32 codes) give their even codes as the low nibbles and their odd codes as the high
    /// ones, which meet activations in that order, so no code is shifted into its lane one by
    /// one (variable shifts and broadcasts cost twice as much on the AMD EPYC this was measured
    /// on). The matrix's shape is read once per call (per row, its integer divisions cost as
    /// much as a short row's products).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_split4_avx2<S: GroupValue>(m: &QuantizedMatrix, first: usize, split: &[f32], sums: &[f32], out: &mut [f32]) {
        // Groups of one unit (GGUF's Q4_0 and Q4_1) get a loop compiled for them.
        if m.group == 32 {
            rows_split4_avx2_units::<S, 1>(m, first, split, sums, out)
        } else {
            rows_split4_avx2_units::<S, 0>(m, first, split, sums, out)
        }
    }

    /// [`rows_split4_avx2`] for groups of `UNITS` units of 32 codes (0: `m.group / 32`, read
    /// at run time).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_split4_avx2_units<S: GroupValue, const UNITS: usize>(m: &QuantizedMatrix, first: usize, split: &[f32], sums: &[f32], out: &mut [f32]) {
        let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
        use std::arch::x86_64::*;
        let groups = m.groups_per_row();
        let units_per_group = if UNITS == 0 { m.group / 32 } else { UNITS };
        let row_bytes = m.cols / 2;
        let count = out.len();
        assert!(
            m.bits == 4
                && m.group.is_multiple_of(32)
                && units_per_group * 32 == m.group
                && split.len() == m.cols
                && sums.len() == groups
                && (first + count) * row_bytes <= m.codes.len() * 4
                && (first + count) * groups <= sc.len().min(mn.len()),
            "rows of another width"
        );
        let codes = m.codes.as_ptr() as *const u8;
        let mins = &mn[first * groups..(first + count) * groups];
        let scales = values_f32(&sc[first * groups..(first + count) * groups]);
        // Two output rows a pass, as `avx512::rows_split4` (each row in its one-row order of
        // operations): each unit's activations loaded once for both rows.
        let pairs = count / 2;
        for pair in 0..pairs {
            let r = 2 * pair;
            let (sa, sb) = (&scales[r * groups..(r + 1) * groups], &scales[(r + 1) * groups..(r + 2) * groups]);
            // SAFETY: rows `first + r` and `first + r + 1` lie in the matrix (asserted above).
            let (mut ba, mut bb) = unsafe { (codes.add((first + r) * row_bytes), codes.add((first + r + 1) * row_bytes)) };
            let mut xp = split.as_ptr();
            let (mut a0, mut a1, mut b0, mut b1) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            for g in 0..groups {
                // A prefetch reads nothing and faults on no address.
                _mm_prefetch::<_MM_HINT_T0>(ba.wrapping_add(PREFETCH_ROWS * row_bytes) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(bb.wrapping_add(PREFETCH_ROWS * row_bytes) as *const i8);
                let (mut p, mut q, mut u, mut v) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
                for _ in 0..units_per_group {
                    // SAFETY: as in the one-row loop below, for both rows.
                    unsafe {
                        let x = [_mm256_loadu_ps(xp), _mm256_loadu_ps(xp.add(8)), _mm256_loadu_ps(xp.add(16)), _mm256_loadu_ps(xp.add(24))];
                        let [c0, c1, c2, c3] = unit_codes4(ba);
                        p = _mm256_fmadd_ps(c0, x[0], p);
                        q = _mm256_fmadd_ps(c1, x[1], q);
                        p = _mm256_fmadd_ps(c2, x[2], p);
                        q = _mm256_fmadd_ps(c3, x[3], q);
                        let [d0, d1, d2, d3] = unit_codes4(bb);
                        u = _mm256_fmadd_ps(d0, x[0], u);
                        v = _mm256_fmadd_ps(d1, x[1], v);
                        u = _mm256_fmadd_ps(d2, x[2], u);
                        v = _mm256_fmadd_ps(d3, x[3], v);
                        ba = ba.add(16);
                        bb = bb.add(16);
                        xp = xp.add(32);
                    }
                }
                let (scale_a, scale_b) = (_mm256_set1_ps(sa[g]), _mm256_set1_ps(sb[g]));
                if g % 2 == 0 {
                    a0 = _mm256_fmadd_ps(_mm256_add_ps(p, q), scale_a, a0);
                    b0 = _mm256_fmadd_ps(_mm256_add_ps(u, v), scale_b, b0);
                } else {
                    a1 = _mm256_fmadd_ps(_mm256_add_ps(p, q), scale_a, a1);
                    b1 = _mm256_fmadd_ps(_mm256_add_ps(u, v), scale_b, b1);
                }
            }
            out[r] = hsum(_mm256_add_ps(a0, a1)) + offsets_dot!(&mins[r * groups..(r + 1) * groups], sums);
            out[r + 1] = hsum(_mm256_add_ps(b0, b1)) + offsets_dot!(&mins[(r + 1) * groups..(r + 2) * groups], sums);
        }
        let rest = 2 * pairs;
        let tail = out[rest..].iter_mut().zip(scales[rest * groups..].chunks_exact(groups)).zip(mins[rest * groups..].chunks_exact(groups));
        for (i, ((y, row_scales), row_mins)) in tail.enumerate() {
            let r = rest + i;
            // SAFETY: row `first + r` lies in the matrix (asserted above): its `row_bytes`
            // code bytes start here.
            let mut bytes = unsafe { codes.add((first + r) * row_bytes) };
            let mut xp = split.as_ptr();
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for (g, &scale) in row_scales.iter().enumerate() {
                let (mut p, mut q) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for _ in 0..units_per_group {
                    // SAFETY: one unit of 32 codes per iteration, `cols / 32` in the row: its
                    // 16 code bytes lie in the row and its 32 activations in `split` (`cols`
                    // long); unaligned loads; x86-64 is little-endian.
                    unsafe {
                        let [c0, c1, c2, c3] = unit_codes4(bytes);
                        p = _mm256_fmadd_ps(c0, _mm256_loadu_ps(xp), p);
                        q = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xp.add(8)), q);
                        p = _mm256_fmadd_ps(c2, _mm256_loadu_ps(xp.add(16)), p);
                        q = _mm256_fmadd_ps(c3, _mm256_loadu_ps(xp.add(24)), q);
                        bytes = bytes.add(16);
                        xp = xp.add(32);
                    }
                }
                let scale = _mm256_set1_ps(scale);
                if g % 2 == 0 {
                    a0 = _mm256_fmadd_ps(_mm256_add_ps(p, q), scale, a0);
                } else {
                    a1 = _mm256_fmadd_ps(_mm256_add_ps(p, q), scale, a1);
                }
            }
            *y = hsum(_mm256_add_ps(a0, a1)) + offsets_dot!(row_mins, sums);
        }
    }

    /// `Σ_g scale_g · Σ_{k in g} code_k · x_k + Σ_g min_g · sums_g` for output rows `first ..
    /// first + out.len()` of an 8-bit `m` (groups of whole 16s) against one row `x`, sixteen
    /// codes a step widened to f32 in registers, the matrix's shape read once per call.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_codes8_avx2<S: GroupValue>(m: &QuantizedMatrix, first: usize, x: &[f32], sums: &[f32], out: &mut [f32]) {
        // Groups of 32 (GGUF's Q8_0) get a loop compiled for their two steps.
        if m.group == 32 {
            rows_codes8_avx2_steps::<S, 2>(m, first, x, sums, out)
        } else {
            rows_codes8_avx2_steps::<S, 0>(m, first, x, sums, out)
        }
    }

    /// [`rows_codes8_avx2`] for groups of `STEPS` steps of sixteen codes (0: `m.group / 16`,
    /// read at run time).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_codes8_avx2_steps<S: GroupValue, const STEPS: usize>(m: &QuantizedMatrix, first: usize, x: &[f32], sums: &[f32], out: &mut [f32]) {
        let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
        use std::arch::x86_64::*;
        let groups = m.groups_per_row();
        let steps_per_group = if STEPS == 0 { m.group / 16 } else { STEPS };
        let row_bytes = m.cols;
        let count = out.len();
        assert!(
            m.bits == 8
                && m.group.is_multiple_of(16)
                && steps_per_group * 16 == m.group
                && x.len() == m.cols
                && sums.len() == groups
                && (first + count) * row_bytes <= m.codes.len() * 4
                && (first + count) * groups <= sc.len().min(mn.len()),
            "rows of another width"
        );
        let codes = m.codes.as_ptr() as *const u8;
        let mins = &mn[first * groups..(first + count) * groups];
        let scales = values_f32(&sc[first * groups..(first + count) * groups]);
        for (r, ((y, row_scales), row_mins)) in out.iter_mut().zip(scales.chunks_exact(groups)).zip(mins.chunks_exact(groups)).enumerate() {
            // SAFETY: row `first + r` lies in the matrix (asserted above): its `cols` code
            // bytes start here.
            let mut bytes = unsafe { codes.add((first + r) * row_bytes) };
            let mut xp = x.as_ptr();
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for (g, &scale) in row_scales.iter().enumerate() {
                // A prefetch reads nothing and faults on no address.
                _mm_prefetch::<_MM_HINT_T0>(bytes.wrapping_add(PREFETCH_ROWS * row_bytes) as *const i8);
                let (mut p, mut q) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for _ in 0..steps_per_group {
                    // SAFETY: sixteen codes per iteration, `cols / 16` in the row: their bytes
                    // lie in the row and their activations in `x` (`cols` long); unaligned
                    // loads; x86-64 is little-endian, so the words' bytes are the packed order.
                    unsafe {
                        let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes as *const __m128i)));
                        let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.add(8) as *const __m128i)));
                        p = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xp), p);
                        q = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xp.add(8)), q);
                        bytes = bytes.add(16);
                        xp = xp.add(16);
                    }
                }
                let scale = _mm256_set1_ps(scale);
                if g % 2 == 0 {
                    a0 = _mm256_fmadd_ps(_mm256_add_ps(p, q), scale, a0);
                } else {
                    a1 = _mm256_fmadd_ps(_mm256_add_ps(p, q), scale, a1);
                }
            }
            *y = hsum(_mm256_add_ps(a0, a1)) + offsets_dot!(row_mins, sums);
        }
    }

    /// The f32-activation loops again with AVX-512 (F): sixteen lanes, so each unit of 32
    /// 4-bit codes is two conversions and two multiply-adds instead of four of each, and each
    /// sixteen 8-bit codes one. Same sums as the AVX2 loops, in a different order of
    /// additions. Chosen at run time where the CPU has AVX-512F ([`super::use_avx512`]).
    #[cfg(target_arch = "x86_64")]
    pub(super) mod avx512 {
        use super::QuantizedMatrix;
        use std::arch::x86_64::*;

        /// One unit of 32 4-bit codes, the 16 bytes at `bytes`, as two vectors of f32 in
        /// [`super::super::split_nibble_order`]'s order: the low nibbles (even codes), then
        /// the high ones (odd codes).
        ///
        /// # Safety
        /// 16 bytes are readable at `bytes`, and the CPU has AVX-512F.
        #[target_feature(enable = "avx512f,f16c")]
        #[inline]
        unsafe fn unit_codes4(bytes: *const u8) -> [__m512; 2] {
            // Each byte widened to a 32-bit lane (one instruction, the load folded in). A
            // lane's low nibble picks its value from a table of 0.0 .. 15.0 (`vpermps` reads
            // only an index's low four bits: no mask, no integer conversion; port 5), its high
            // nibble is shifted down and converted (port 0): the same values as masking both,
            // in fewer instructions, split between the two ports that also run the
            // multiply-adds (both halves through the table measured slower).
            let table = _mm512_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0);
            // SAFETY: the caller guarantees 16 readable bytes (an unaligned load).
            let b = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(bytes as *const __m128i) });
            [_mm512_permutexvar_ps(b, table), _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4))]
        }

        /// A group's sum of codes times activations after unit `k` of it: `c[1]·x[1] +
        /// c[0]·x[0]` for its first unit, added to `acc` for the next (one multiply and one
        /// multiply-add a unit, no zeroed accumulators and no add of two).
        ///
        /// # Safety
        /// The CPU has AVX-512F.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn unit_terms(k: usize, acc: __m512, c: [__m512; 2], x: [__m512; 2]) -> __m512 {
            let even = if k == 0 { _mm512_mul_ps(c[0], x[0]) } else { _mm512_fmadd_ps(c[0], x[0], acc) };
            _mm512_fmadd_ps(c[1], x[1], even)
        }

        /// A row's offsets `Σ_g min_g · sums_g` as a vector, to be added to the row's
        /// accumulators before their lanes are summed (one sum of lanes a row; a row's offsets
        /// summed one value after another took an eighth of the decode loop's time). The last
        /// groups short of sixteen are copied into a zeroed block and met by a masked load of
        /// their sums (zeros past them): one multiply-add where each took a conversion and a
        /// scalar multiply-add (the whole row's offsets of a 256-wide product, 8 groups, went
        /// that way).
        ///
        /// # Safety
        /// The CPU has AVX-512F.
        #[target_feature(enable = "avx512f,f16c")]
        #[inline]
        unsafe fn offsets16<S: super::super::GroupValue>(mins: &[S], sums: &[f32]) -> __m512 {
            let mut acc = _mm512_setzero_ps();
            let n = mins.len().min(sums.len());
            let whole = n / 16 * 16;
            for (m, s) in mins[..whole].chunks_exact(16).zip(sums[..whole].chunks_exact(16)) {
                // SAFETY: sixteen values at `m` and at `s`; the caller guarantees AVX-512F.
                acc = unsafe { _mm512_fmadd_ps(S::load16(m.as_ptr()), _mm512_loadu_ps(s.as_ptr()), acc) };
            }
            if whole < n {
                let mut tail = [S::ZERO; 16];
                tail[..n - whole].copy_from_slice(&mins[whole..n]);
                let mask = (1u16 << (n - whole)) - 1;
                // SAFETY: sixteen values in `tail`; the masked load reads only the `n - whole`
                // sums from `whole` (in `sums`); AVX-512F.
                acc = unsafe { _mm512_fmadd_ps(S::load16(tail.as_ptr()), _mm512_maskz_loadu_ps(mask, sums.as_ptr().add(whole)), acc) };
            }
            acc
        }

        /// [`super::rows_split4_avx2`] with sixteen lanes.
        ///
        /// # Safety
        /// The CPU has AVX-512F (the shapes are checked here).
        #[target_feature(enable = "avx512f,f16c")]
        pub(in super::super) unsafe fn rows_split4<S: super::super::GroupValue>(m: &QuantizedMatrix, first: usize, split: &[f32], sums: &[f32], out: &mut [f32]) {
            // Groups of one unit (GGUF's Q4_0 and Q4_1) get a loop compiled for them: no
            // loop over a group's units and no test of their count in each group.
            // SAFETY: this function's requirements.
            unsafe {
                if m.group == 32 {
                    rows_split4_units::<S, 1>(m, first, split, sums, out)
                } else {
                    rows_split4_units::<S, 0>(m, first, split, sums, out)
                }
            }
        }

        /// [`rows_split4`] for groups of `UNITS` units of 32 codes (0: `m.group / 32`, read at
        /// run time).
        ///
        /// # Safety
        /// The CPU has AVX-512F (the shapes are checked here).
        #[target_feature(enable = "avx512f,f16c")]
        unsafe fn rows_split4_units<S: super::super::GroupValue, const UNITS: usize>(m: &QuantizedMatrix, first: usize, split: &[f32], sums: &[f32], out: &mut [f32]) {
            let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
            let groups = m.groups_per_row();
            let units_per_group = if UNITS == 0 { m.group / 32 } else { UNITS };
            let row_bytes = m.cols / 2;
            let count = out.len();
            assert!(
                m.bits == 4
                    && m.group.is_multiple_of(32)
                    && units_per_group * 32 == m.group
                    && split.len() == m.cols
                    && sums.len() == groups
                    && (first + count) * row_bytes <= m.codes.len() * 4
                    && (first + count) * groups <= sc.len().min(mn.len()),
                "rows of another width"
            );
            let codes = m.codes.as_ptr() as *const u8;
            let mins = &mn[first * groups..(first + count) * groups];
            let scales = super::values_f32(&sc[first * groups..(first + count) * groups]);
            // Two output rows a pass (each with its own sums, in the one-row order of operations,
            // so a row's result does not depend on its neighbour): each unit's activations are
            // loaded once for both, and the two rows' chains run side by side (one row at a time
            // ran at half the code bandwidth of the 8-bit-activation loop, `cpu_matvec`).
            let pairs = count / 2;
            for pair in 0..pairs {
                let r = 2 * pair;
                let (sa, sb) = (&scales[r * groups..(r + 1) * groups], &scales[(r + 1) * groups..(r + 2) * groups]);
                // SAFETY: rows `first + r` and `first + r + 1` lie in the matrix (asserted above).
                let (mut ba, mut bb) = unsafe { (codes.add((first + r) * row_bytes), codes.add((first + r + 1) * row_bytes)) };
                let mut xp = split.as_ptr();
                let (mut a0, mut a1, mut b0, mut b1) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
                // One group of both rows: the two sums of its codes times its activations.
                macro_rules! group {
                    () => {{
                        let (mut p, mut u) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                        for k in 0..units_per_group {
                            // SAFETY: as in the one-row loop below, for both rows.
                            unsafe {
                                let x = [_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16))];
                                p = unit_terms(k, p, unit_codes4(ba), x);
                                u = unit_terms(k, u, unit_codes4(bb), x);
                                ba = ba.add(16);
                                bb = bb.add(16);
                                xp = xp.add(32);
                            }
                        }
                        (p, u)
                    }};
                }
                // Groups two at a time, the even one into `a0`/`b0`, the odd one into `a1`/`b1`
                // (no branch on the parity).
                let mut g = 0;
                while g < groups {
                    // A prefetch reads nothing and faults on no address.
                    _mm_prefetch::<_MM_HINT_T0>(ba.wrapping_add(super::PREFETCH_ROWS * row_bytes) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(bb.wrapping_add(super::PREFETCH_ROWS * row_bytes) as *const i8);
                    let (p, u) = group!();
                    a0 = _mm512_fmadd_ps(p, _mm512_set1_ps(sa[g]), a0);
                    b0 = _mm512_fmadd_ps(u, _mm512_set1_ps(sb[g]), b0);
                    if g + 1 < groups {
                        let (p, u) = group!();
                        a1 = _mm512_fmadd_ps(p, _mm512_set1_ps(sa[g + 1]), a1);
                        b1 = _mm512_fmadd_ps(u, _mm512_set1_ps(sb[g + 1]), b1);
                    }
                    g += 2;
                }
                // SAFETY: the CPU has AVX-512F (this function's requirement).
                let (oa, ob) = unsafe { (offsets16(&mins[r * groups..(r + 1) * groups], sums), offsets16(&mins[(r + 1) * groups..(r + 2) * groups], sums)) };
                out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), oa));
                out[r + 1] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(b0, b1), ob));
            }
            let rest = 2 * pairs;
            let tail = out[rest..].iter_mut().zip(scales[rest * groups..].chunks_exact(groups)).zip(mins[rest * groups..].chunks_exact(groups));
            for (i, ((y, row_scales), row_mins)) in tail.enumerate() {
                let r = rest + i;
                // SAFETY: row `first + r` lies in the matrix (asserted above): its
                // `row_bytes` code bytes start here.
                let mut bytes = unsafe { codes.add((first + r) * row_bytes) };
                let mut xp = split.as_ptr();
                let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for (g, &scale) in row_scales.iter().enumerate() {
                    let mut p = _mm512_setzero_ps();
                    for k in 0..units_per_group {
                        // SAFETY: one unit of 32 codes per iteration, `cols / 32` in the row:
                        // its 16 code bytes lie in the row and its 32 activations in `split`
                        // (`cols` long); unaligned loads; x86-64 is little-endian.
                        unsafe {
                            p = unit_terms(k, p, unit_codes4(bytes), [_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16))]);
                            bytes = bytes.add(16);
                            xp = xp.add(32);
                        }
                    }
                    let scale = _mm512_set1_ps(scale);
                    if g % 2 == 0 {
                        a0 = _mm512_fmadd_ps(p, scale, a0);
                    } else {
                        a1 = _mm512_fmadd_ps(p, scale, a1);
                    }
                }
                // SAFETY: the CPU has AVX-512F (this function's requirement).
                let offsets = unsafe { offsets16(row_mins, sums) };
                *y = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), offsets));
            }
        }

        /// [`super::row_codes4_split_avx2_rows`] with sixteen lanes, the offsets included (each
        /// input row's `sums`): the whole product of row `row` with each of the `N` rows.
        ///
        /// # Safety
        /// The CPU has AVX-512F (the shapes are checked here).
        #[target_feature(enable = "avx512f,f16c")]
        pub(in super::super) unsafe fn row_split4_rows<S: super::super::GroupValue, const N: usize>(m: &QuantizedMatrix, row: usize, splits: [&[f32]; N], sums: [&[f32]; N]) -> [f32; N] {
            // SAFETY: this function's requirements.
            unsafe {
                if m.group == 32 {
                    row_split4_rows_units::<S, N, 1>(m, row, splits, sums)
                } else {
                    row_split4_rows_units::<S, N, 0>(m, row, splits, sums)
                }
            }
        }

        /// [`row_split4_rows`] for groups of `UNITS` units of 32 codes (0: `m.group / 32`,
        /// read at run time), as [`rows_split4_units`].
        ///
        /// # Safety
        /// The CPU has AVX-512F (the shapes are checked here).
        #[target_feature(enable = "avx512f,f16c")]
        unsafe fn row_split4_rows_units<S: super::super::GroupValue, const N: usize, const UNITS: usize>(m: &QuantizedMatrix, row: usize, splits: [&[f32]; N], sums: [&[f32]; N]) -> [f32; N] {
            let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
            let wpr = m.words_per_row();
            let groups = m.groups_per_row();
            let words = &m.codes[row * wpr..(row + 1) * wpr];
            let scales = &sc[row * groups..(row + 1) * groups];
            let units_per_group = if UNITS == 0 { m.group / 32 } else { UNITS };
            assert!(
                splits.iter().all(|s| words.len() * 8 == s.len()) && words.len() * 8 == groups * m.group && units_per_group * 32 == m.group,
                "a row of another width"
            );
            let mut bytes = words.as_ptr() as *const u8;
            let mut xp: [*const f32; N] = splits.map(<[f32]>::as_ptr);
            // Each row in [`rows_split4`]'s one-row order of operations (per group one sum of
            // codes times activations, the groups alternating between two totals, the offsets
            // added to both before their lanes are summed), so that a batch's rows equal each
            // row alone.
            let (mut a0, mut a1) = ([_mm512_setzero_ps(); N], [_mm512_setzero_ps(); N]);
            for (g, &scale) in scales.iter().enumerate() {
                let scale = v!(scale);
                let mut p = [_mm512_setzero_ps(); N];
                for k in 0..units_per_group {
                    // SAFETY: one unit of 32 codes per iteration, `cols / 32` in all: its 16
                    // code bytes lie in the row and its 32 activations in each of the `N`
                    // reordered rows (each `cols` long), all asserted above; unaligned loads.
                    unsafe {
                        let c = unit_codes4(bytes);
                        for j in 0..N {
                            let x = xp[j];
                            p[j] = unit_terms(k, p[j], c, [_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16))]);
                            xp[j] = x.add(32);
                        }
                        bytes = bytes.add(16);
                    }
                }
                let scale = _mm512_set1_ps(scale);
                for j in 0..N {
                    if g % 2 == 0 {
                        a0[j] = _mm512_fmadd_ps(p[j], scale, a0[j]);
                    } else {
                        a1[j] = _mm512_fmadd_ps(p[j], scale, a1[j]);
                    }
                }
            }
            let mins = &mn[row * groups..(row + 1) * groups];
            std::array::from_fn(|j| {
                // SAFETY: the CPU has AVX-512F (this function's requirement).
                let offsets = unsafe { offsets16(mins, sums[j]) };
                _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0[j], a1[j]), offsets))
            })
        }

        /// [`super::rows_codes8_avx2`] with sixteen lanes: sixteen codes a step, one
        /// conversion and one multiply-add.
        ///
        /// # Safety
        /// The CPU has AVX-512F (the shapes are checked here).
        #[target_feature(enable = "avx512f,f16c")]
        pub(in super::super) unsafe fn rows_codes8<S: super::super::GroupValue>(m: &QuantizedMatrix, first: usize, x: &[f32], sums: &[f32], out: &mut [f32]) {
            // Groups of 32 (GGUF's Q8_0) get a loop compiled for their two steps.
            // SAFETY: this function's requirements.
            unsafe {
                if m.group == 32 {
                    rows_codes8_steps::<S, 2>(m, first, x, sums, out)
                } else {
                    rows_codes8_steps::<S, 0>(m, first, x, sums, out)
                }
            }
        }

        /// [`rows_codes8`] for groups of `STEPS` steps of sixteen codes (0: `m.group / 16`,
        /// read at run time).
        ///
        /// # Safety
        /// The CPU has AVX-512F (the shapes are checked here).
        #[target_feature(enable = "avx512f,f16c")]
        unsafe fn rows_codes8_steps<S: super::super::GroupValue, const STEPS: usize>(m: &QuantizedMatrix, first: usize, x: &[f32], sums: &[f32], out: &mut [f32]) {
            let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
            let groups = m.groups_per_row();
            let steps_per_group = if STEPS == 0 { m.group / 16 } else { STEPS };
            let row_bytes = m.cols;
            let count = out.len();
            assert!(
                m.bits == 8
                    && m.group.is_multiple_of(16)
                    && steps_per_group * 16 == m.group
                    && x.len() == m.cols
                    && sums.len() == groups
                    && (first + count) * row_bytes <= m.codes.len() * 4
                    && (first + count) * groups <= sc.len().min(mn.len()),
                "rows of another width"
            );
            let codes = m.codes.as_ptr() as *const u8;
            let mins = &mn[first * groups..(first + count) * groups];
            let scales = super::values_f32(&sc[first * groups..(first + count) * groups]);
            for (r, ((y, row_scales), row_mins)) in out.iter_mut().zip(scales.chunks_exact(groups)).zip(mins.chunks_exact(groups)).enumerate() {
                // SAFETY: row `first + r` lies in the matrix (asserted above): its `cols`
                // code bytes start here.
                let mut bytes = unsafe { codes.add((first + r) * row_bytes) };
                let mut xp = x.as_ptr();
                let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for (g, &scale) in row_scales.iter().enumerate() {
                    // A prefetch reads nothing and faults on no address.
                    _mm_prefetch::<_MM_HINT_T0>(bytes.wrapping_add(super::PREFETCH_ROWS * row_bytes) as *const i8);
                    // The group's codes times activations, sixteen a step: the first step a
                    // product, the others multiply-adds onto it.
                    let mut p = _mm512_setzero_ps();
                    for step in 0..steps_per_group {
                        // SAFETY: one step of sixteen codes, within the group's
                        // `steps_per_group`: their bytes lie in the row and their activations
                        // in `x` (`cols` long); unaligned loads.
                        unsafe {
                            let b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(bytes as *const __m128i)));
                            let x = _mm512_loadu_ps(xp);
                            p = if step == 0 { _mm512_mul_ps(b, x) } else { _mm512_fmadd_ps(b, x, p) };
                            bytes = bytes.add(16);
                            xp = xp.add(16);
                        }
                    }
                    let scale = _mm512_set1_ps(scale);
                    if g % 2 == 0 {
                        a0 = _mm512_fmadd_ps(p, scale, a0);
                    } else {
                        a1 = _mm512_fmadd_ps(p, scale, a1);
                    }
                }
                // SAFETY: the CPU has AVX-512F (this function's requirement).
                let offsets = unsafe { offsets16(row_mins, sums) };
                *y = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), offsets));
            }
        }

        /// Dequantizes rows `first .. first + count` of `m` into `tile` (`count` rows of
        /// `cols` f32, the rest of `tile` untouched): 4-bit codes (groups of whole 32s) in
        /// [`super::super::split_nibble_order`]'s order, so the activations they meet must be
        /// reordered alike; 8-bit codes (groups of whole 16s) in order.
        ///
        /// # Safety
        /// The CPU has AVX-512F (the shapes are checked here).
        #[target_feature(enable = "avx512f,f16c")]
        unsafe fn dequantize_tile<S: super::super::GroupValue>(m: &QuantizedMatrix, first: usize, count: usize, tile: &mut [f32]) {
            let (sc, mn) = S::slices(&m.groups).expect("group values of the type the caller chose");
            let (cols, groups, row_bytes) = super::tile_rows_shape(m, first, count, tile);
            let codes = m.codes.as_ptr() as *const u8;
            for r in 0..count {
                let row = first + r;
                // SAFETY: row `row` lies in the matrix (asserted above).
                let mut bytes = unsafe { codes.add(row * row_bytes) };
                let mut out = tile[r * cols..(r + 1) * cols].as_mut_ptr();
                for g in 0..groups {
                    let (scale, min) = (_mm512_set1_ps(v!(sc[row * groups + g])), _mm512_set1_ps(v!(mn[row * groups + g])));
                    // SAFETY: each step reads the group's next code bytes (in the row) and
                    // writes as many values (in the tile's row, `cols` long): `group` of
                    // each per group; unaligned loads and stores.
                    unsafe {
                        if m.bits == 4 {
                            for _ in 0..m.group / 32 {
                                let [c0, c1] = unit_codes4(bytes);
                                _mm512_storeu_ps(out, _mm512_fmadd_ps(c0, scale, min));
                                _mm512_storeu_ps(out.add(16), _mm512_fmadd_ps(c1, scale, min));
                                bytes = bytes.add(16);
                                out = out.add(32);
                            }
                        } else {
                            for _ in 0..m.group / 16 {
                                let c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(bytes as *const __m128i)));
                                _mm512_storeu_ps(out, _mm512_fmadd_ps(c, scale, min));
                                bytes = bytes.add(16);
                                out = out.add(16);
                            }
                        }
                    }
                }
            }
        }

        /// The sixteen dot products of four weight rows at `w` and four activation rows at
        /// `x` (each `cols` long, rows `cols` apart, `cols` a multiple of 16): `[w row][x row]`.
        ///
        /// # Safety
        /// Four rows of `cols` f32 are readable at `w` and at `x`, and the CPU has AVX-512F.
        #[target_feature(enable = "avx512f,f16c")]
        #[inline]
        unsafe fn dots_4x4(w: *const f32, x: *const f32, cols: usize) -> [[f32; 4]; 4] {
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            let mut k = 0;
            while k < cols {
                // SAFETY: `k + 16 <= cols` (a multiple of 16) in each of the four rows of
                // either (the caller's guarantee); unaligned loads.
                unsafe {
                    let wv = [_mm512_loadu_ps(w.add(k)), _mm512_loadu_ps(w.add(cols + k)), _mm512_loadu_ps(w.add(2 * cols + k)), _mm512_loadu_ps(w.add(3 * cols + k))];
                    let xv = [_mm512_loadu_ps(x.add(k)), _mm512_loadu_ps(x.add(cols + k)), _mm512_loadu_ps(x.add(2 * cols + k)), _mm512_loadu_ps(x.add(3 * cols + k))];
                    for (acc_w, &w) in acc.iter_mut().zip(&wv) {
                        for (a, &xj) in acc_w.iter_mut().zip(&xv) {
                            *a = _mm512_fmadd_ps(w, xj, *a);
                        }
                    }
                }
                k += 16;
            }
            // SAFETY: AVX-512F, as this function requires.
            let sums = unsafe { reduce_16(acc) };
            std::array::from_fn(|a| std::array::from_fn(|b| sums[4 * b + a]))
        }

        /// The sixteen sums of `acc[a][b]`'s lanes, as `[4 * b + a]`: the sixteen vectors
        /// halved into each other four times (45 shuffles and adds, where sixteen horizontal
        /// reductions take about 130; at SmolLM2's 576 inputs they cost as much as a third of
        /// the products' multiply-adds).
        ///
        /// # Safety
        /// The CPU has AVX-512F.
        #[target_feature(enable = "avx512f,f16c")]
        #[inline]
        unsafe fn reduce_16(acc: [[__m512; 4]; 4]) -> [f32; 16] {
            let v: [__m512; 16] = std::array::from_fn(|i| acc[i / 4][i % 4]);
            // 16 -> 8: vector `p` holds `v[2p]`'s partial sums in its low 256 bits, `v[2p + 1]`'s
            // in its high ones.
            let s: [__m512; 8] = std::array::from_fn(|p| {
                let (a, b) = (v[2 * p], v[2 * p + 1]);
                _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b))
            });
            // 8 -> 4: 128-bit lane `l` of vector `q` holds `v[4q + l]`'s partial sums.
            let t: [__m512; 4] = std::array::from_fn(|q| {
                let (c, d) = (s[2 * q], s[2 * q + 1]);
                _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(c, d), _mm512_shuffle_f32x4::<0xDD>(c, d))
            });
            // 4 -> 2: in lane `l` of vector `r`, elements 0-1 sum to `v[8r + l]`, 2-3 to `v[8r + 4 + l]`.
            let g: [__m512; 2] = std::array::from_fn(|r| {
                let (e, f) = (t[2 * r], t[2 * r + 1]);
                _mm512_add_ps(_mm512_shuffle_ps::<0x44>(e, f), _mm512_shuffle_ps::<0xEE>(e, f))
            });
            // 2 -> 1: element `e` of lane `l` is the sum of `v[4e + l]`.
            let z = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(g[0], g[1]), _mm512_shuffle_ps::<0xDD>(g[0], g[1]));
            let mut out = [0f32; 16];
            // SAFETY: `out` holds sixteen f32; an unaligned store.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), z) };
            // Element `4l + e` is `v[4e + l]`'s sum: `v[i]` is `acc[i / 4][i % 4]`, so element
            // `4b + a` is the sum of `acc[a][b]`.
            out
        }

        /// Output rows `first .. first + out.len() / n` of `m` (`out` being `[rows, n]`)
        /// against `n` activation rows `x` (reordered per 32 for 4-bit codes, as
        /// [`dequantize_tile`]; zero rows appended up to a multiple of four): the rows'
        /// weights are dequantized once into `tile`, and every four of them meet every four
        /// activation rows in sixteen vector accumulators. Prompt rows: the codes' conversion
        /// is paid once for all of them, not once per pass of four rows.
        ///
        /// # Safety
        /// The CPU has AVX-512F (the shapes are checked here).
        #[target_feature(enable = "avx512f,f16c")]
        pub(in super::super) unsafe fn rows_tiled(m: &QuantizedMatrix, x: &[f32], n: usize, first: usize, out: &mut [f32], tile: &mut [f32]) {
            let (cols, count, count4, n4) = super::tiled_shape(m, x, n, out, tile);
            // SAFETY: AVX-512F, as this function requires; `dequantize_tile` checks the rest.
            by_groups!(m, S => unsafe { dequantize_tile::<S>(m, first, count, tile) });
            for i in (0..count4).step_by(4) {
                for j in (0..n4).step_by(4) {
                    // SAFETY: rows `i .. i + 4` of the tile (`count4` rows) and `j .. j + 4`
                    // of `x` (`n4` rows), each `cols` long, a multiple of 16 (checked).
                    let d = unsafe { dots_4x4(tile.as_ptr().add(i * cols), x.as_ptr().add(j * cols), cols) };
                    super::store_dots(out, n, count, i, j, &d);
                }
            }
        }
    }

    /// Output rows `first .. first + out.len()` of an 8-bit `m` times one row `x` (`sums` its
    /// per-group sums), into `out`; `false` (nothing written) without AVX2 or for groups that
    /// are not whole 16s.
    pub(super) fn rows_dot_codes8(m: &QuantizedMatrix, first: usize, x: &[f32], sums: &[f32], out: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() && m.bits == 8 && m.group.is_multiple_of(16) {
            if has_avx512() {
                // SAFETY: the CPU has AVX-512F (detected at run time).
                by_groups!(m, S => unsafe { avx512::rows_codes8::<S>(m, first, x, sums, out) });
                return true;
            }
            // SAFETY: the CPU has AVX2 and FMA (detected at run time).
            by_groups!(m, S => unsafe { rows_codes8_avx2::<S>(m, first, x, sums, out) });
            return true;
        }
        let _ = (m, first, x, sums, out);
        false
    }

    /// Output rows `first .. first + out.len()` of a 4-bit `m` (groups of whole 32s) times
    /// one row of activations reordered by [`super::split_nibble_order`] (`sums` its per-group
    /// sums), into `out`; `false` (nothing written) without AVX2.
    pub(super) fn rows_dot_split4(m: &QuantizedMatrix, first: usize, split: &[f32], sums: &[f32], out: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            if has_avx512() {
                // SAFETY: the CPU has AVX-512F (detected at run time).
                by_groups!(m, S => unsafe { avx512::rows_split4::<S>(m, first, split, sums, out) });
                return true;
            }
            // SAFETY: the CPU has AVX2 and FMA (detected at run time).
            by_groups!(m, S => unsafe { rows_split4_avx2::<S>(m, first, split, sums, out) });
            return true;
        }
        let _ = (m, first, split, sums, out);
        false
    }

    /// Row `row` of a 4-bit `m` (groups of a multiple of 32) times activations reordered by
    /// [`super::split_nibble_order`]; `None` where the CPU lacks AVX2 (the caller then takes
    /// [`row_dot`] with the activations in order).
    pub(super) fn row_dot_split4(m: &QuantizedMatrix, row: usize, split: &[f32], sums: &[f32]) -> Option<f32> {
        let mut out = [0f32];
        rows_dot_split4(m, row, split, sums, &mut out).then_some(out[0])
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn has_avx2() -> bool {
        false
    }

    /// Whether the f32-activation loops take their AVX-512 versions: the CPU has AVX-512F
    /// and [`super::use_avx512`] has not turned them off.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn has_avx512() -> bool {
        use std::sync::OnceLock;
        use std::sync::atomic::Ordering;
        static HAS: OnceLock<bool> = OnceLock::new();
        super::AVX512_ALLOWED.load(Ordering::Relaxed) && *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }

    /// Whether the 8-bit-activation loops take their VNNI version: the CPU has AVX-512
    /// F, BW and VNNI and [`super::use_avx512`] has not turned AVX-512 off.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn has_vnni() -> bool {
        use std::sync::OnceLock;
        use std::sync::atomic::Ordering;
        static HAS: OnceLock<bool> = OnceLock::new();
        super::AVX512_ALLOWED.load(Ordering::Relaxed)
            && *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx512vnni"))
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) fn has_avx2() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c"))
    }
}

/// A quantized linear weight placed on a device.
#[derive(Clone)]
pub struct QuantizedLinear {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group: usize,
    pub format: CodeFormat,
    bytes: u64,
    storage: Storage,
    /// `None`: the default, [`Activations::F32`] for f32 activations on the CPU, else
    /// [`Activations::Blocks16`].
    activations: Option<Activations>,
}

#[derive(Clone)]
enum Storage {
    /// The CPU: host memory, multiplied by [`QuantizedMatrix::matmul`].
    Host(Arc<QuantizedMatrix>),
    /// CubeCL devices (boxed: three tensor handles are large beside an `Arc`).
    Device(Box<DeviceCodes>),
}

/// A quantized weight's device buffers: codes `[rows, words]` (u32), scales and offsets
/// `[rows, groups]` (f32).
#[derive(Clone)]
struct DeviceCodes {
    codes: Tensor<2, Int>,
    scales: Tensor<2>,
    mins: Tensor<2>,
}

impl QuantizedLinear {
    /// `matrix` on `device`; on the CPU the weight is shared with the caller's other users
    /// (the tied LM head and the embedding lookup of one table).
    pub fn shared(matrix: Arc<QuantizedMatrix>, device: &Device) -> Self {
        if is_cubecl(device) {
            return Self::new(Arc::unwrap_or_clone(matrix), device);
        }
        let (rows, cols, bits, group, format, bytes) = (matrix.rows, matrix.cols, matrix.bits, matrix.group, matrix.format, matrix.bytes());
        Self { rows, cols, bits, group, format, bytes, storage: Storage::Host(matrix), activations: None }
    }

    /// `matrix` on `device`.
    pub fn new(matrix: QuantizedMatrix, device: &Device) -> Self {
        let (rows, cols, bits, group, format, bytes) = (matrix.rows, matrix.cols, matrix.bits, matrix.group, matrix.format, matrix.bytes());
        let storage = if is_cubecl(device) {
            let (words, groups) = (matrix.words_per_row(), matrix.groups_per_row());
            // Uploaded flat, then viewed as rows. A 2-D upload gets pitched rows where a row's
            // bytes are not a multiple of their alignment (CubeCL's `optimal_align`: the next
            // power of two, at most 512 bytes on CUDA): a 4-bit row of 2,560 inputs (1,280 bytes)
            // is padded to 1,536, and the kernels' `into_contiguous` then copied the whole weight
            // on every product.
            let f32s = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [rows * groups]), (device, DType::F32)).reshape([rows, groups]);
            let (codes, mins) = device_codes(&matrix);
            Storage::Device(Box::new(DeviceCodes {
                codes: Tensor::<1, Int>::from_data(TensorData::new(codes, [rows * words]), (device, DType::U32)).reshape([rows, words]),
                scales: f32s(matrix.groups.scales_f32()),
                mins: f32s(mins),
            }))
        } else {
            Storage::Host(Arc::new(matrix))
        };
        Self { rows, cols, bits, group, format, bytes, storage, activations: None }
    }

    /// The weight with its products taking `activations`. Placed weights start with the
    /// default: on the CPU f32 activations exact ([`Activations::F32`]) and others as 16-bit
    /// blocks; on CubeCL devices the kernel's 16-bit blocks, which also stand for
    /// [`Activations::Blocks8`] there. E4M3 codes always take their activations unrounded:
    /// on the CPU every setting runs their row loop; on CubeCL devices [`Activations::F32`]
    /// dequantizes them for cuBLAS and the others run their matrix-vector kernel (the engine
    /// refuses the integer settings with FP8 weights).
    pub fn with_activations(self, activations: Activations) -> Self {
        Self { activations: Some(activations), ..self }
    }

    /// How the weight's products take activations of `dtype`.
    pub fn activations(&self, dtype: DType) -> Activations {
        match (self.activations, &self.storage) {
            (Some(a), _) => a,
            (None, Storage::Host(_)) if dtype == DType::F32 => Activations::F32,
            (None, _) => Activations::Blocks16,
        }
    }

    /// Bytes the weight takes on its device.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The matrix in host memory where the weight lives there (the CPU), for callers that
    /// multiply host rows themselves ([`QuantizedMatrix::matmul`] with [`Self::activations`]).
    pub fn host_matrix(&self) -> Option<&QuantizedMatrix> {
        match &self.storage {
            Storage::Host(m) => Some(m),
            Storage::Device(_) => None,
        }
    }

    /// `x [n, cols] · Wᵀ -> [n, rows]` in `x`'s dtype.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, cols] = x.dims();
        assert_eq!(cols, self.cols, "a quantized [{}, {}] weight times rows of {cols}", self.rows, self.cols);
        let dtype = x.dtype();
        let activations = self.activations(dtype);
        match &self.storage {
            Storage::Host(m) if n > m.fused_row_limit(activations) => {
                // Prompt rows: slices of about 8 MB of weight rows dequantized (f32) and
                // multiplied by the backend's matrix product, as a dense weight would be.
                let device = x.device();
                let x = if dtype == DType::F32 { x } else { x.cast(DType::F32) }.reshape([1, n, cols]);
                let slice = ((2 << 20) / cols.max(1)).clamp(1, self.rows.max(1));
                let parts: Vec<Tensor<2>> = (0..self.rows)
                    .step_by(slice)
                    .map(|start| {
                        let end = (start + slice).min(self.rows);
                        let w = m.dequantize_range(start..end);
                        let w = Tensor::<2>::from_data(TensorData::new(w, [end - start, cols]), (&device, DType::F32));
                        crate::linear::batched_linear(x.clone(), w.reshape([1, 1, end - start, cols])).reshape([n, end - start])
                    })
                    .collect();
                let y = if parts.len() == 1 { parts.into_iter().next().expect("one part") } else { Tensor::cat(parts, 1) };
                if dtype == DType::F32 { y } else { y.cast(dtype) }
            }
            Storage::Host(m) => {
                let device = x.device();
                let xs = x.cast(DType::F32).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 activations");
                let y = Tensor::<2>::from_data(TensorData::new(m.matmul(&xs, n, activations), [n, self.rows]), (&device, DType::F32));
                if dtype == DType::F32 { y } else { y.cast(dtype) }
            }
            Storage::Device(d) => {
                let DeviceCodes { codes, scales, mins } = d.as_ref();
                if self.format == CodeFormat::E4m3 {
                    if activations != Activations::F32 && crate::quant_e4m3::e4m3_kernel_applies(n, cols, self.group) && kernel_supports(dtype) {
                        let out = Dispatch::quant_matvec_e4m3(x.into_dispatch(), codes.clone().into_dispatch(), scales.clone().into_dispatch(), self.group);
                        return Tensor::from_dispatch(out);
                    }
                } else if activations != Activations::F32 && device_kernel_applies(n, cols, self.bits, self.group) && kernel_supports(dtype) {
                    let out = Dispatch::quant_matvec(
                        x.into_dispatch(),
                        codes.clone().into_dispatch(),
                        scales.clone().into_dispatch(),
                        mins.clone().into_dispatch(),
                        self.bits,
                        self.group,
                    );
                    return Tensor::from_dispatch(out);
                }
                let w = self.dequantize(dtype);
                crate::linear::batched_linear(x.reshape([1, n, cols]), w.reshape([1, 1, self.rows, cols])).reshape([n, self.rows])
            }
        }
    }

    /// The weight as a dense `[rows, cols]` tensor of `dtype` on its device.
    pub fn dequantize(&self, dtype: DType) -> Tensor<2> {
        match &self.storage {
            Storage::Host(m) => {
                let device = Device::flex();
                let w = Tensor::<2>::from_data(TensorData::new(m.dequantize(), [self.rows, self.cols]), (&device, DType::F32));
                if dtype == DType::F32 { w } else { w.cast(dtype) }
            }
            Storage::Device(d) => Tensor::from_dispatch(Dispatch::quant_dequantize(
                d.codes.clone().into_dispatch(),
                d.scales.clone().into_dispatch(),
                d.mins.clone().into_dispatch(),
                self.bits,
                self.group,
                self.format == CodeFormat::E4m3,
                dtype,
            )),
        }
    }
}

/// Activations the kernel reads: bf16, f16 and f32.
fn kernel_supports(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16 | DType::F32)
}

/// `[rows, words] -> [rows, words * 32 / bits]`.
pub fn dequantized_shape(codes: &Shape, bits: u32) -> Shape {
    Shape::new([codes[0], codes[1] * (32 / bits as usize)])
}

/// The quantized products as backend operations (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait QuantOps: Backend {
    /// `x [n, cols] · Wᵀ -> [n, rows]` for `W` given by `codes [rows, cols * bits / 32]`
    /// (u32), `scales`/`mins [rows, cols / group]` (f32).
    #[fusion(dtype = x, shape = Shape::new([x[0], codes[0]]))]
    fn quant_matvec(x: FloatTensor<Self>, codes: IntTensor<Self>, scales: FloatTensor<Self>, mins: FloatTensor<Self>, bits: u32, group: usize) -> FloatTensor<Self>;

    /// `W` as a dense `[rows, cols]` tensor of `dtype` (8-bit codes that are E4M3 numbers
    /// where `e4m3`).
    #[fusion(dtype = *dtype, shape = dequantized_shape(codes, *bits))]
    fn quant_dequantize(codes: IntTensor<Self>, scales: FloatTensor<Self>, mins: FloatTensor<Self>, bits: u32, group: usize, e4m3: bool, dtype: DType) -> FloatTensor<Self>;

    /// `x [n, cols] · Wᵀ -> [n, rows]` for `W` of E4M3 `codes [rows, cols / 4]` (u32) with
    /// `scales [rows, cols / group]` (f32) ([`crate::quant_e4m3`]).
    #[fusion(dtype = x, shape = Shape::new([x[0], codes[0]]))]
    fn quant_matvec_e4m3(x: FloatTensor<Self>, codes: IntTensor<Self>, scales: FloatTensor<Self>, group: usize) -> FloatTensor<Self>;
}

impl QuantOps for CubeBackend {
    fn quant_matvec(x: FloatTensor<Self>, codes: IntTensor<Self>, scales: FloatTensor<Self>, mins: FloatTensor<Self>, bits: u32, group: usize) -> FloatTensor<Self> {
        launch_matvec(x, codes, scales, mins, bits, group)
    }

    fn quant_dequantize(codes: IntTensor<Self>, scales: FloatTensor<Self>, mins: FloatTensor<Self>, bits: u32, group: usize, e4m3: bool, dtype: DType) -> FloatTensor<Self> {
        launch_dequantize(codes, scales, mins, bits, group, e4m3, dtype)
    }

    fn quant_matvec_e4m3(x: FloatTensor<Self>, codes: IntTensor<Self>, scales: FloatTensor<Self>, group: usize) -> FloatTensor<Self> {
        crate::quant_e4m3::launch_e4m3_matvec(x, codes, scales, group)
    }
}

/// The kernels, apart from burn's names.
mod device {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    /// Block `b` (32 values) of the activation rows `x` quantized as
    /// [`super::DeviceActivations`] holds them: its eight high-byte and eight low-byte words as
    /// vectors `2b, 2b + 1` of `hi` and `lo` (`N` is 4), its scale at `b` and its two sums of 16
    /// at `2b, 2b + 1`.
    #[cube]
    fn quantize_block<E: Float, N: Size>(
        x: &Tensor<E>,
        b: usize,
        hi: &mut [Vector<i32, N>],
        lo: &mut [Vector<i32, N>],
        scales: &mut [f32],
        sums: &mut [f32],
    ) {
        let base = b * 32;
        let mut amax = 0f32;
        let mut s0 = 0f32;
        let mut s1 = 0f32;
        #[unroll]
        for i in 0..16usize {
            let v = f32::cast_from(x[base + i]);
            s0 += v;
            amax = f32::max(amax, f32::abs(v));
        }
        #[unroll]
        for i in 16..32usize {
            let v = f32::cast_from(x[base + i]);
            s1 += v;
            amax = f32::max(amax, f32::abs(v));
        }
        let scale = amax / 32639.0;
        let inv = select(amax > 0.0, 32639.0 / amax, 0.0);
        #[unroll]
        for half in 0..2usize {
            let mut hv = Vector::<i32, N>::empty();
            let mut lv = Vector::<i32, N>::empty();
            #[unroll]
            for j in 0..4usize {
                let mut h = 0i32;
                let mut l = 0i32;
                #[unroll]
                for k in 0..4usize {
                    let q = i32::cast_from(f32::round(f32::cast_from(x[base + comptime!((half * 4 + j) * 4 + k)]) * inv));
                    let qh = (q + 128) >> 8;
                    let ql = q - qh * 256;
                    h |= (qh & 255) << comptime!(8 * k as i32);
                    l |= (ql & 255) << comptime!(8 * k as i32);
                }
                hv.insert(j, h);
                lv.insert(j, l);
            }
            hi[b * 2 + half] = hv;
            lo[b * 2 + half] = lv;
        }
        scales[b] = scale;
        sums[b * 2] = s0;
        sums[b * 2 + 1] = s1;
    }

    /// Activation rows as [`super::DeviceActivations`]: one unit per block of 32 values
    /// ([`quantize_block`]).
    #[cube(launch_unchecked)]
    pub fn quantize_activations_kernel<E: Float, N: Size>(
        x: &Tensor<E>,
        hi: &mut [Vector<i32, N>],
        lo: &mut [Vector<i32, N>],
        scales: &mut [f32],
        sums: &mut [f32],
        blocks_total: usize,
        #[define(E)] _dtype: ElemType,
    ) {
        let b = ABSOLUTE_POS;
        if b >= blocks_total {
            terminate!();
        }
        quantize_block(x, b, hi, lo, scales, sums);
    }

    /// The terms of one 16-byte chunk of a channel's codes (`wv`, codes `start ..`) for every
    /// activation row: the codes times the rows' activation bytes in `dp4a`s (high and low
    /// halves of the 16-bit activations), the exact integer sum scaled by the group's and the
    /// block's scales, plus the group's offset times the chunk's activation sum.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn chunk_terms<N: Size>(
        wv: Vector<u32, N>,
        start: usize,
        gs: f32,
        gm: f32,
        hi: &[Vector<i32, N>],
        lo: &[Vector<i32, N>],
        xscales: &[f32],
        xsums: &[f32],
        cols: usize,
        acc: &mut Array<f32>,
        #[comptime] bits: u32,
        #[comptime] nrows: usize,
    ) {
        let per_chunk = comptime!(128 / bits as usize);
        let xwords = comptime!(per_chunk / 4);
        let row_vectors = cols / 16;
        let row_blocks = cols / 32;
        let sixteens = cols / 16;
        // Vectors of activation words: 4 words each.
        let xv = start / 16;
        #[unroll]
        for r in 0..nrows {
            let mut ih = 0i32;
            let mut il = 0i32;
            let at = r * row_vectors + xv;
            #[unroll]
            for v in 0..comptime!(xwords / 4) {
                let h = hi[at + v];
                let l = lo[at + v];
                if comptime!(bits == 4) {
                    // Chunk word k holds codes 8k..8k+3 in its low nibbles and 8k+4..8k+7
                    // in its high ones; activation vector v covers codes 16v..16v+15.
                    #[unroll]
                    for j in 0..2usize {
                        let word = i32::reinterpret(wv.extract(comptime!(v * 2 + j)));
                        let low = word & 0x0F0F0F0F;
                        let high = (word >> 4) & 0x0F0F0F0F;
                        ih = dp4a(low, h.extract(comptime!(j * 2)), ih);
                        ih = dp4a(high, h.extract(comptime!(j * 2 + 1)), ih);
                        il = dp4a(low, l.extract(comptime!(j * 2)), il);
                        il = dp4a(high, l.extract(comptime!(j * 2 + 1)), il);
                    }
                } else {
                    #[unroll]
                    for k in 0..4usize {
                        let word = i32::reinterpret(wv.extract(k));
                        ih = dp4a(word, h.extract(k), ih);
                        il = dp4a(word, l.extract(k), il);
                    }
                }
            }
            let dot = f32::cast_from(ih * 256 + il);
            // The chunk's offset times its activations' sum (a chunk lies in one group).
            let mut xsum = xsums[r * sixteens + start / 16];
            if comptime!(bits == 4) {
                xsum += xsums[r * sixteens + start / 16 + 1];
            }
            acc[r] += gs * xscales[r * row_blocks + start / 32] * dot + gm * xsum;
        }
    }

    /// A lane's round of chunks loaded: `loads` 16-byte chunks of codes a plane apart from
    /// chunk `c`, with their groups' scales and offsets, issued together so that the lane waits
    /// on memory once for them all. Chunks past the row load the row's last chunk again
    /// ([`add_round`] adds nothing for them).
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn load_round<N: Size>(
        codes: &[Vector<u32, N>],
        scales: &[f32],
        mins: &[f32],
        first: usize,
        gbase: usize,
        c: usize,
        chunks: usize,
        wv: &mut Array<Vector<u32, N>>,
        gs: &mut Array<f32>,
        gm: &mut Array<f32>,
        #[comptime] bits: u32,
        #[comptime] group: usize,
        #[comptime] loads: usize,
    ) {
        let per_chunk = comptime!(128 / bits as usize);
        let step = PLANE_DIM as usize;
        let last = chunks - 1;
        #[unroll]
        for k in 0..loads {
            let ck = min(c + k * step, last);
            let g = gbase + ck * per_chunk / group;
            wv[k] = codes[first + ck];
            gs[k] = scales[g];
            gm[k] = mins[g];
        }
    }

    /// The terms of a round [`load_round`] loaded from chunk `c`, in chunk order.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn add_round<N: Size>(
        wv: &Array<Vector<u32, N>>,
        gs: &Array<f32>,
        gm: &Array<f32>,
        hi: &[Vector<i32, N>],
        lo: &[Vector<i32, N>],
        xscales: &[f32],
        xsums: &[f32],
        c: usize,
        chunks: usize,
        cols: usize,
        acc: &mut Array<f32>,
        #[comptime] bits: u32,
        #[comptime] nrows: usize,
        #[comptime] loads: usize,
    ) {
        let per_chunk = comptime!(128 / bits as usize);
        let step = PLANE_DIM as usize;
        #[unroll]
        for k in 0..loads {
            let ck = c + k * step;
            if ck < chunks {
                chunk_terms(wv[k], ck * per_chunk, gs[k], gm[k], hi, lo, xscales, xsums, cols, acc, bits, nrows);
            }
        }
    }

    /// The plane's sums of `acc` (one per activation row) written to `channel` of each row by
    /// its first lane.
    #[cube]
    fn write_channel<E: Float>(acc: &Array<f32>, out: &mut Tensor<E>, channel: usize, channels: usize, #[comptime] nrows: usize) {
        #[unroll]
        for r in 0..nrows {
            let total = plane_sum(acc[r]);
            if UNIT_POS_X == 0 {
                out[r * channels + channel] = E::cast_from(total);
            }
        }
    }

    /// One plane per output channel, all of the activation rows (`nrows`) at once: each lane
    /// takes 16-byte chunks of the channel's codes (32 4-bit or 16 8-bit codes, within one
    /// group and one activation block) a plane apart and adds their terms ([`chunk_terms`]),
    /// `loads` chunks a round ([`load_round`], [`super::quant_loads`]; one by default: four,
    /// which read a 2,560-wide row of 4-bit codes, 2.5 chunks a lane, in one wait on memory,
    /// measured slower in the engine). The terms are added in the same order whatever `loads`
    /// is, so the result is the same bits. (Before, two chunks read before either was used
    /// measured 7-10 % faster in `kernel_check quant` alone but 2 % slower in the engine's int8
    /// decode, 311 against 305 tok/s, H200, 2026-12-07.) With `early`
    /// ([`crate::launch::early_loads`]) the first round is loaded before the kernel waits for
    /// the activations' quantization: Qwen3-4B batch 1 on an H100 with one load a round, int8
    /// 301.1-302.5 -> 304.3-305.6 tok/s, int4 344.5-346.6 -> 349.0-349.1
    /// (`benches/results/gpu-h100-2026-12-07m-matvec-early-loads.md`).
    #[cube(launch_unchecked)]
    pub fn quant_matvec_kernel<E: Float, N: Size>(
        hi: &[Vector<i32, N>],
        lo: &[Vector<i32, N>],
        xscales: &[f32],
        xsums: &[f32],
        codes: &[Vector<u32, N>],
        scales: &[f32],
        mins: &[f32],
        out: &mut Tensor<E>,
        cols: usize,
        groups: usize,
        #[comptime] bits: u32,
        #[comptime] group: usize,
        #[comptime] nrows: usize,
        #[comptime] loads: usize,
        #[comptime] early: bool,
        #[define(E)] _dtype: ElemType,
    ) {
        let channel = (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) as usize;
        let channels = out.shape(1);
        if channel >= channels {
            terminate!();
        }
        let per_chunk = comptime!(128 / bits as usize);
        let chunks = cols / per_chunk;
        let mut acc = Array::<f32>::new(nrows);
        #[unroll]
        for r in 0..nrows {
            acc[r] = 0.0;
        }
        let round = loads * PLANE_DIM as usize;
        let first = channel * chunks;
        let gbase = channel * groups;
        let mut wv = Array::<Vector<u32, N>>::new(loads);
        let mut gs = Array::<f32>::new(loads);
        let mut gm = Array::<f32>::new(loads);
        let mut c = UNIT_POS_X as usize;
        if early {
            // The lane's first round of codes and their groups' scales and offsets, which no
            // kernel before this one writes, are loaded before the kernel waits for those
            // kernels (see `crate::launch::early_loads`).
            load_round(codes, scales, mins, first, gbase, c, chunks, &mut wv, &mut gs, &mut gm, bits, group, loads);
            gpu_asm!("griddepcontrol.wait;");
            gpu_asm!("griddepcontrol.launch_dependents;");
            add_round(&wv, &gs, &gm, hi, lo, xscales, xsums, c, chunks, cols, &mut acc, bits, nrows, loads);
            c += round;
        }
        while c < chunks {
            load_round(codes, scales, mins, first, gbase, c, chunks, &mut wv, &mut gs, &mut gm, bits, group, loads);
            add_round(&wv, &gs, &gm, hi, lo, xscales, xsums, c, chunks, cols, &mut acc, bits, nrows, loads);
            c += round;
        }
        write_channel(&acc, out, channel, channels, nrows);
    }

    /// Code `p` of a packed word (the device order, [`super::device_codes`]) as the number it
    /// stands for before its group's scale and offset: a 4-bit code (byte `j` holds code `j` in
    /// its low nibble and code `j + 4` in its high one), a signed byte (`code - 128`), or an
    /// E4M3 byte through its bits (`crate::kv_pages::e4m3_bits_to_f32`; its offsets are 0).
    #[cube]
    fn code_value(word: u32, p: u32, #[comptime] bits: u32, #[comptime] e4m3: bool) -> f32 {
        if comptime!(bits == 4) {
            f32::cast_from((word >> ((p % 4) * 8 + (p / 4) * 4)) & 15)
        } else if comptime!(e4m3) {
            let b = (word >> (8 * p)) & 0xFF;
            let two_120 = comptime!(f32::from_bits(0x7B80_0000));
            f32::reinterpret(((b & 0x7F) << 20) | ((b & 0x80) << 24)) * f32::new(two_120)
        } else {
            f32::cast_from((i32::reinterpret(word) << i32::cast_from(24 - 8 * p)) >> 24)
        }
    }

    /// One unit per output vector of `width` values (16 bytes of bf16/f16, so that a plane's
    /// stores are one contiguous 512-byte run; `width` divides the columns and the group, so a
    /// vector lies in one row and one group): the words holding its codes read, each code
    /// scaled and offset.
    #[cube(launch_unchecked)]
    pub fn quant_dequantize_kernel<E: Float, N: Size>(
        codes: &[u32],
        scales: &[f32],
        mins: &[f32],
        out: &mut Tensor<Vector<E, N>>,
        vectors_total: usize,
        words: usize,
        groups: usize,
        #[comptime] bits: u32,
        #[comptime] group: usize,
        #[comptime] e4m3: bool,
        #[comptime] width: usize,
        #[define(E)] _dtype: ElemType,
    ) {
        let at = ABSOLUTE_POS;
        if at >= vectors_total {
            terminate!();
        }
        let per_word = comptime!(32 / bits as usize);
        let cols = out.shape(1);
        let first = at * width;
        let (row, col) = (first / cols, first % cols);
        let g = row * groups + col / group;
        let (scale, min) = (scales[g], mins[g]);
        let base = row * words + col / per_word;
        let mut v = Vector::<E, N>::empty();
        if comptime!(width >= per_word) {
            // Whole words: `col` is a multiple of the word's codes.
            #[unroll]
            for w in 0..comptime!(width / per_word) {
                let word = codes[base + w];
                #[unroll]
                for j in 0..per_word {
                    v.insert(comptime!(w * per_word + j), E::cast_from(code_value(word, comptime!(j as u32), bits, e4m3) * scale + min));
                }
            }
        } else {
            // Part of one word, from code `col % per_word`.
            let word = codes[base];
            let p0 = (col % per_word) as u32;
            #[unroll]
            for k in 0..width {
                v.insert(k, E::cast_from(code_value(word, p0 + comptime!(k as u32), bits, e4m3) * scale + min));
            }
        }
        out[at] = v;
    }
}

/// Activation rows quantized for the matrix-vector kernel: 16-bit integers per block of 32
/// values (`x ≈ scale · q`, `q = round(x · 32639 / amax)`, so that `q = 256 · h + l` splits
/// into signed bytes `h` and `l`) stored as packed high bytes and low bytes, one f32 scale
/// per block and the f32 sums of `x` per 16 values.
struct DeviceActivations {
    hi: CubeTensor,
    lo: CubeTensor,
    scales: CubeTensor,
    sums: CubeTensor,
}

fn quantize_activations(x: CubeTensor) -> DeviceActivations {
    let x = into_contiguous(x);
    let (n, cols) = (x.meta.shape()[0], x.meta.shape()[1]);
    let alloc = |len: usize, dtype: DType| empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([n, len]), dtype);
    let acts = DeviceActivations { hi: alloc(cols / 4, DType::I32), lo: alloc(cols / 4, DType::I32), scales: alloc(cols / 32, DType::F32), sums: alloc(cols / 16, DType::F32) };
    let blocks = n * cols / 32;
    let units = 128u32;
    let client = x.client.clone();
    let dtype = x.dtype;
    // SAFETY: one unit per 32-value block, `b < n * cols / 32` checked: it reads `x[32b ..
    // 32b + 32]` and writes words `8b .. 8b + 8` (vectors `2b, 2b + 1` of four), scale `b` and
    // sums `2b, 2b + 1`, all within the buffers allocated above for `cols` a multiple of 32
    // (checked by the caller).
    unsafe {
        device::quantize_activations_kernel::launch_unchecked(
            &client,
            CubeCount::Static((blocks as u32).div_ceil(units), 1, 1),
            CubeDim::new_1d(units),
            4,
            x.into_tensor_arg(),
            acts.hi.clone().into_buffer_arg(),
            acts.lo.clone().into_buffer_arg(),
            acts.scales.clone().into_buffer_arg(),
            acts.sums.clone().into_buffer_arg(),
            blocks,
            dtype_to_storage_type(dtype),
        )
    };
    acts
}

fn launch_matvec(x: CubeTensor, codes: CubeTensor, scales: CubeTensor, mins: CubeTensor, bits: u32, group: usize) -> CubeTensor {
    let (codes, scales, mins) = (into_contiguous(codes), into_contiguous(scales), into_contiguous(mins));
    let (rows, words) = (codes.meta.shape()[0], codes.meta.shape()[1]);
    let groups = scales.meta.shape()[1];
    let (n, cols) = (x.meta.shape()[0], x.meta.shape()[1]);
    assert_eq!(cols, words * (32 / bits as usize), "quantized matvec: activations and weight disagree");
    assert!(device_kernel_applies(n, cols, bits, group), "quantized matvec: {n} rows of {cols} in {bits}-bit groups of {group}");
    let dtype = x.dtype;
    // The kernel reads its first codes, scales and offsets before waiting for the kernel before
    // it (`crate::launch::early_loads`), which is this quantization of the activations: any
    // copy of the codes into a contiguous layout above comes before it, and it waits for that
    // copy before it lets this kernel start.
    let acts = quantize_activations(x);
    let out = empty_device_contiguous_dtype(codes.client.clone(), codes.device.clone(), Shape::new([n, rows]), dtype);
    let client = out.client.clone();
    let (cube_count, cube_dim) = channel_planes(rows);
    // SAFETY: `channel < rows` (checked in the kernel); chunk `c < cols / per_chunk` of its
    // row's codes (a round's loads past the row clamped to its last chunk; `words` a multiple
    // of 4: `cols` of 32); a chunk's group `start / group < groups` and block `start / 32 <
    // cols / 32`; activation vectors `r * cols / 16 + start / 16 + v < n * cols / 16`; sums
    // `r * cols / 16 + start / 16 (+ 1 for a 32-code chunk) < n * cols / 16`; `r < n`.
    unsafe {
        device::quant_matvec_kernel::launch_unchecked(
            &client,
            cube_count,
            cube_dim,
            4,
            acts.hi.into_buffer_arg(),
            acts.lo.into_buffer_arg(),
            acts.scales.into_buffer_arg(),
            acts.sums.into_buffer_arg(),
            codes.into_buffer_arg(),
            scales.into_buffer_arg(),
            mins.into_buffer_arg(),
            out.clone().into_tensor_arg(),
            cols,
            groups,
            bits,
            group,
            n,
            quant_loads(),
            crate::launch::early_loads(),
            dtype_to_storage_type(dtype),
        )
    };
    out
}

/// The launch of a matrix-vector kernel with one plane per output channel of `rows`,
/// [`quant_planes`] planes a cube.
pub(crate) fn channel_planes(rows: usize) -> (CubeCount, CubeDim) {
    let planes = quant_planes();
    (CubeCount::Static((rows as u32).div_ceil(planes), 1, 1), CubeDim::new_2d(PLANE as u32, planes))
}

/// Whether the matrix-vector kernel takes `n` rows of `cols` against `bits`-bit codes in
/// groups of `group`: up to [`QUANT_MAX_ROWS`] rows of whole 32-value activation blocks,
/// groups of whole 16-byte chunks.
pub fn device_kernel_applies(n: usize, cols: usize, bits: u32, group: usize) -> bool {
    (1..=QUANT_MAX_ROWS).contains(&n) && cols.is_multiple_of(32) && group.is_multiple_of(128 / bits as usize)
}

/// Codes, scales and offsets in the device kernels' order: 4-bit words with byte `j` holding
/// code `j` in its low nibble and code `j + 4` in its high one (so that masking the word's low
/// or high nibbles gives four codes in consecutive bytes for `dp4a`), 8-bit codes as signed
/// bytes `code - 128` with the offsets raised by `128 · scale`.
pub fn device_codes(m: &QuantizedMatrix) -> (Vec<u32>, Vec<f32>) {
    if m.format == CodeFormat::E4m3 {
        // As stored (the kernels read the bytes as E4M3 numbers); no offsets.
        return (m.codes.clone(), m.groups.mins_f32());
    }
    if m.bits == 4 {
        let codes = m
            .codes
            .par_iter()
            .map(|&w| (0..4u32).fold(0u32, |acc, j| acc | (((w >> (4 * j)) & 15) << (8 * j)) | (((w >> (4 * (j + 4))) & 15) << (8 * j + 4))))
            .collect();
        (codes, m.groups.mins_f32())
    } else {
        let codes = m.codes.par_iter().map(|&w| w ^ 0x8080_8080).collect();
        (codes, m.groups.mins_f32().iter().zip(m.groups.scales_f32()).map(|(m, s)| m + 128.0 * s).collect())
    }
}

fn launch_dequantize(codes: CubeTensor, scales: CubeTensor, mins: CubeTensor, bits: u32, group: usize, e4m3: bool, dtype: DType) -> CubeTensor {
    let (codes, scales, mins) = (into_contiguous(codes), into_contiguous(scales), into_contiguous(mins));
    let (rows, words) = (codes.meta.shape()[0], codes.meta.shape()[1]);
    let groups = scales.meta.shape()[1];
    let cols = words * (32 / bits as usize);
    let out = empty_device_contiguous_dtype(codes.client.clone(), codes.device.clone(), Shape::new([rows, cols]), dtype);
    let client = out.client.clone();
    let width = dequantize_width(cols, group, dtype);
    let total = rows * cols / width;
    let units = 256u32;
    // SAFETY: one unit per output vector, `at < rows * cols / width` checked; `width` divides
    // `cols` and `group` (`dequantize_width`), so the vector's values lie in row `first / cols`
    // and in its group `col / group < groups`; the words it reads, `base ..= base + (width - 1)
    // / per_word`, lie in that row's `words`.
    unsafe {
        device::quant_dequantize_kernel::launch_unchecked(
            &client,
            CubeCount::Static((total as u32).div_ceil(units), 1, 1),
            CubeDim::new_1d(units),
            width,
            codes.into_buffer_arg(),
            scales.into_buffer_arg(),
            mins.into_buffer_arg(),
            out.clone().into_tensor_arg(),
            total,
            words,
            groups,
            bits,
            group,
            e4m3,
            width,
            dtype_to_storage_type(dtype),
        )
    };
    out
}

/// Values per unit of the dequantize kernel: the widest vector of `dtype` (at most 16 bytes,
/// [`crate::launch::vector_width`]) that divides both `cols` and `group`, i.e. their gcd.
pub fn dequantize_width(cols: usize, group: usize, dtype: DType) -> usize {
    crate::launch::vector_width(crate::quant_e4m3::gcd(cols, group), dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by the tests that switch AVX-512 off for the process ([`use_avx512`]) or rely
    /// on which loops run, so that they do not run into each other.
    static LOOPS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn loops_lock() -> std::sync::MutexGuard<'static, ()> {
        LOOPS.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn dense_matmul(x: &[f32], n: usize, w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..n).flat_map(|j| (0..rows).map(move |r| (0..cols).map(|c| x[j * cols + c] * w[r * cols + c]).sum::<f32>())).collect()
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        (num / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
    }

    /// The device kernels' arithmetic, step for step on the host: activations quantized as
    /// `quantize_activations_kernel` does, the codes in [`device_codes`]'s order multiplied
    /// in `dp4a`s as `quant_matvec_kernel` does, and the dense weight as
    /// `quant_dequantize_kernel` writes it.
    mod device_arithmetic {
        use super::super::{QuantizedMatrix, device_codes};

        fn dp4a(a: i32, b: i32, c: i32) -> i32 {
            a.to_le_bytes().into_iter().zip(b.to_le_bytes()).fold(c, |acc, (a, b)| acc + (a as i8 as i32) * (b as i8 as i32))
        }

        /// `(hi, lo, scales, sums)` of one row.
        fn quantize_row(x: &[f32]) -> (Vec<i32>, Vec<i32>, Vec<f32>, Vec<f32>) {
            let (mut hi, mut lo, mut scales, mut sums) = (vec![], vec![], vec![], vec![]);
            for b in x.chunks_exact(32) {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let inv = if amax > 0.0 { 32639.0 / amax } else { 0.0 };
                for w in b.chunks_exact(4) {
                    let (mut h, mut l) = (0i32, 0i32);
                    for (k, v) in w.iter().enumerate() {
                        let q = (v * inv).round() as i32;
                        let qh = (q + 128) >> 8;
                        let ql = q - qh * 256;
                        assert!((-128..128).contains(&qh) && (-128..128).contains(&ql), "{q} splits into {qh}, {ql}");
                        h |= (qh & 255) << (8 * k);
                        l |= (ql & 255) << (8 * k);
                    }
                    hi.push(h);
                    lo.push(l);
                }
                scales.push(amax / 32639.0);
                sums.push(b[..16].iter().sum());
                sums.push(b[16..].iter().sum());
            }
            (hi, lo, scales, sums)
        }

        pub fn matvec(m: &QuantizedMatrix, x: &[f32]) -> Vec<f32> {
            let (codes, mins) = device_codes(m);
            let (hi, lo, xs, sums) = quantize_row(x);
            let per_chunk = 128 / m.bits as usize;
            let (words, groups) = (m.words_per_row(), m.groups_per_row());
            (0..m.rows)
                .map(|ch| {
                    let mut acc = 0f32;
                    for c in 0..m.cols / per_chunk {
                        let wv = &codes[ch * words + 4 * c..ch * words + 4 * c + 4];
                        let start = c * per_chunk;
                        let (h, l) = (&hi[start / 4..], &lo[start / 4..]);
                        let (mut ih, mut il) = (0i32, 0i32);
                        if m.bits == 4 {
                            for (k, &w) in wv.iter().enumerate() {
                                let w = w as i32;
                                let (low, high) = (w & 0x0F0F_0F0F, (w >> 4) & 0x0F0F_0F0F);
                                ih = dp4a(high, h[2 * k + 1], dp4a(low, h[2 * k], ih));
                                il = dp4a(high, l[2 * k + 1], dp4a(low, l[2 * k], il));
                            }
                        } else {
                            for (k, &w) in wv.iter().enumerate() {
                                ih = dp4a(w as i32, h[k], ih);
                                il = dp4a(w as i32, l[k], il);
                            }
                        }
                        let xsum = if m.bits == 4 { sums[start / 16] + sums[start / 16 + 1] } else { sums[start / 16] };
                        let g = ch * groups + start / m.group;
                        acc += m.groups.scale(g) * xs[start / 32] * (ih * 256 + il) as f32 + mins[g] * xsum;
                    }
                    acc
                })
                .collect()
        }

        pub fn dequantize(m: &QuantizedMatrix) -> Vec<f32> {
            let (codes, mins) = device_codes(m);
            let per_word = 32 / m.bits as usize;
            let (words, groups) = (m.words_per_row(), m.groups_per_row());
            let mut out = vec![0f32; m.rows * m.cols];
            for (at, &word) in codes.iter().enumerate() {
                let (row, w) = (at / words, at % words);
                let g = row * groups + w / (m.group / per_word);
                for k in 0..per_word {
                    let code = if m.bits == 4 { ((word >> ((k % 4) * 8 + (k / 4) * 4)) & 15) as f32 } else { (((word as i32) << (24 - 8 * k)) >> 24) as f32 };
                    out[row * m.cols + w * per_word + k] = code * m.groups.scale(g) + mins[g];
                }
            }
            out
        }
    }

    #[test]
    fn dequantize_widths_fit_their_shapes() {
        // 16 bytes of the dtype, dividing the columns and the group.
        assert_eq!(dequantize_width(2560, 128, DType::BF16), 8);
        assert_eq!(dequantize_width(2560, 128, DType::F32), 4);
        assert_eq!(dequantize_width(2560, 16, DType::BF16), 8);
        assert_eq!(dequantize_width(36, 4, DType::BF16), 4);
        assert_eq!(dequantize_width(6, 2, DType::F32), 2);
    }

    #[test]
    fn the_device_arithmetic_is_the_dequantized_product_to_activation_rounding() {
        let (rows, cols) = (24, 256);
        let w = random(rows * cols, 11);
        let x = random(cols, 12);
        let mut layouts = vec![
            QuantizedMatrix::quantize_int8(&w, rows, cols).expect("int8"),
            QuantizedMatrix::quantize_int4(&w, rows, cols, 128).expect("int4/128"),
            QuantizedMatrix::quantize_int4(&w, rows, cols, 32).expect("int4/32"),
        ];
        // GGUF-like: 8-bit codes in 16s and 32s with offsets of both signs, every code used.
        for group in [16, 32] {
            let codes: Vec<u8> = (0..rows * cols).map(|i| (i * 37 % 256) as u8).collect();
            let scales = random(rows * cols / group, 13).iter().map(|v| v * 0.01).collect();
            let mins = random(rows * cols / group, 14);
            layouts.push(QuantizedMatrix::from_codes(rows, cols, 8, group, &codes, scales, mins).expect("8-bit"));
        }
        for m in layouts {
            let dense = m.dequantize();
            // The same values (8-bit offsets raised by 128 steps round in f32).
            let back = device_arithmetic::dequantize(&m);
            assert!(rel_l2(&back, &dense) < 1e-6, "{}-bit groups of {}: the device order dequantizes ({})", m.bits, m.group, rel_l2(&back, &dense));
            let want = dense_matmul(&x, 1, &dense, rows, cols);
            let got = device_arithmetic::matvec(&m, &x);
            // 16-bit activation blocks: a relative error near 2^-16.
            assert!(rel_l2(&got, &want) < 5e-5, "{}-bit groups of {}: {}", m.bits, m.group, rel_l2(&got, &want));
        }
    }

    #[test]
    fn codes_pack_little_endian_along_rows() {
        // 4-bit: element 8w + k in bits 4k.. of word w.
        let codes: Vec<u8> = (0..16).map(|i| i as u8).collect();
        let m = QuantizedMatrix::from_codes(1, 16, 4, 8, &codes, vec![1.0, 1.0], vec![0.0, 0.0]).expect("packs");
        assert_eq!(m.codes, vec![0x7654_3210, 0xfedc_ba98]);
        for c in 0..16 {
            assert_eq!(m.code(0, c), c as u32);
        }
        let m = QuantizedMatrix::from_codes(2, 4, 8, 4, &[1, 2, 3, 4, 250, 6, 7, 8], vec![0.5, 2.0], vec![-1.0, 1.0]).expect("packs");
        assert_eq!(m.codes, vec![0x0403_0201, 0x0807_06fa]);
        assert_eq!(m.dequantize(), vec![-0.5, 0.0, 0.5, 1.0, 501.0, 13.0, 15.0, 17.0]);
        // Words packed elsewhere (GGUF blocks) are taken as they are: the same matrix.
        let again = QuantizedMatrix::from_packed(2, 4, 8, 4, m.codes.clone(), m.groups.scales_f32(), m.groups.mins_f32()).expect("packed");
        assert_eq!(again, m);
        let e = QuantizedMatrix::from_packed(2, 4, 8, 4, vec![0; 3], vec![0.5, 2.0], vec![-1.0, 1.0]).expect_err("short");
        assert!(e.0.contains("needs 2 words") && e.0.contains("got 3"), "{e}");
        let e = QuantizedMatrix::from_packed(1, 12, 4, 12, vec![0; 2], vec![1.0], vec![0.0]).expect_err("group not in words");
        assert!(e.0.contains("groups of 12"), "{e}");
    }

    #[test]
    fn bad_shapes_and_codes_are_errors() {
        let e = QuantizedMatrix::from_codes(1, 12, 4, 12, &[0; 12], vec![1.0], vec![0.0]).expect_err("group not in words");
        assert!(e.0.contains("groups of 12"), "{e}");
        let e = QuantizedMatrix::from_codes(1, 8, 4, 8, &[16; 8], vec![1.0], vec![0.0]).expect_err("too wide");
        assert!(e.0.contains("16"), "{e}");
        let e = QuantizedMatrix::from_codes(1, 8, 3, 8, &[0; 8], vec![1.0], vec![0.0]).expect_err("3 bits");
        assert!(e.0.contains("3-bit"), "{e}");
        assert!(QuantizedMatrix::quantize_int8(&[f32::NAN; 4], 1, 4).is_err());
        assert!(QuantizedMatrix::quantize_int4(&[0.0; 8], 1, 8, 3).is_err());
    }

    #[test]
    fn quantizing_keeps_every_weight_within_half_a_step() {
        let (rows, cols) = (6, 256);
        let w = random(rows * cols, 1);
        let q8 = QuantizedMatrix::quantize_int8(&w, rows, cols).expect("int8");
        for (r, (row, back)) in w.chunks(cols).zip(q8.dequantize().chunks(cols)).enumerate() {
            let step = q8.groups.scale(r);
            assert!(row.iter().zip(back).all(|(a, b)| (a - b).abs() <= 0.5 * step + 1e-6), "int8 row {r}");
        }
        let q4 = QuantizedMatrix::quantize_int4(&w, rows, cols, 128).expect("int4");
        let back = q4.dequantize();
        for (i, (a, b)) in w.iter().zip(&back).enumerate() {
            let step = q4.groups.scale(i / 128);
            assert!((a - b).abs() <= 0.5 * step + 1e-6, "int4 element {i}: {a} vs {b}");
        }
        // A group's extremes come back exactly (the offset is its minimum, the top code its maximum).
        let lo = w[..128].iter().copied().fold(f32::INFINITY, f32::min);
        assert_eq!(back[..128].iter().copied().fold(f32::INFINITY, f32::min), lo);
        assert_eq!(q8.bytes(), (rows * cols + 8 * rows) as u64);
        assert_eq!(q4.bytes(), (rows * cols / 2 + 8 * rows * 2) as u64);
    }

    /// The blocked transpose is the element-by-element one, for shapes short of a block and
    /// not a multiple of it.
    #[test]
    fn the_transpose_moves_every_element() {
        for (rows, n) in [(37usize, 5usize), (3, 40), (16, 2), (33, 17), (5, 1)] {
            let v: Vec<f32> = (0..rows * n).map(|i| i as f32).collect();
            let t = transpose(v.clone(), n);
            for r in 0..rows {
                for j in 0..n {
                    assert_eq!(t[j * rows + r], v[r * n + j], "{rows}x{n}: ({r}, {j})");
                }
            }
        }
    }

    #[test]
    fn the_cpu_product_is_the_product_with_the_dequantized_weight() {
        let _loops = loops_lock();
        let (rows, cols) = (37, 96);
        let w = random(rows * cols, 2);
        for m in [QuantizedMatrix::quantize_int8(&w, rows, cols).expect("int8"), QuantizedMatrix::quantize_int4(&w, rows, cols, 32).expect("int4")] {
            let dense = m.dequantize();
            for n in [1, 3, 9, 70] {
                let x = random(n * cols, 3 + n as u64);
                // Rows beyond CPU_FUSED_ROWS go through the linear, which reads the codes in
                // place up to the matrix's fused_row_limit (64 for f32 activations of 4-bit
                // codes on AVX2) and multiplies dequantized slices above it.
                let prompt = |x: &[f32], a| {
                    let d = Device::flex();
                    let y = QuantizedLinear::new(m.clone(), &d).with_activations(a).forward(Tensor::<2>::from_data(TensorData::new(x.to_vec(), [n, cols]), &d));
                    y.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32")
                };
                let product = |a| if n <= CPU_FUSED_ROWS { m.matmul(&x, n, a) } else { prompt(&x, a) };
                let got = product(Activations::F32);
                let rounded = product(Activations::Blocks16);
                let want = dense_matmul(&x, n, &dense, rows, cols);
                assert!(rel_l2(&got, &want) < 1e-6, "bits {} rows {n}: {}", m.bits, rel_l2(&got, &want));
                // The dequantized tiles (what prompt rows of f32 activations take on an x86-64
                // CPU with AVX2), called directly, with AVX2 and with AVX-512 loops where the
                // CPU has them (the switch is process-wide: a test beside this one may flip it,
                // and both are correct).
                #[cfg(target_arch = "x86_64")]
                if simd::has_avx2() && m.takes_tiles_shape() {
                    for wide in [false, true] {
                        use_avx512(wide);
                        let tiled = m.matmul_tiled(&x, n);
                        assert!(rel_l2(&tiled, &want) < 1e-6, "tiles (AVX-512 {wide}), bits {} rows {n}: {}", m.bits, rel_l2(&tiled, &want));
                    }
                }
                // 8-bit activation blocks, rows up to the limit read the codes in place, more
                // take the linear's prompt path: either way the product of the rounded
                // activations.
                let limit = m.fused_row_limit(Activations::Blocks8);
                let coarse = if n <= limit { m.matmul(&x, n, Activations::Blocks8) } else { prompt(&x, Activations::Blocks8) };
                let want8 = dense_matmul(&rounded8(&x), n, &dense, rows, cols);
                assert!(rel_l2(&coarse, &want8) < 1e-5, "8-bit blocks, bits {} rows {n}: {}", m.bits, rel_l2(&coarse, &want8));
                assert!(rel_l2(&coarse, &want) < 2e-2, "8-bit blocks, bits {} rows {n}: {}", m.bits, rel_l2(&coarse, &want));
                // Up to CPU_FUSED_ROWS rows, 16-bit activation blocks round the activations.
                let bound = if n <= CPU_FUSED_ROWS { 5e-5 } else { 1e-6 };
                assert!(rel_l2(&rounded, &want) < bound, "bits {} rows {n}: {}", m.bits, rel_l2(&rounded, &want));
                // And close to the unquantized product.
                let exact = dense_matmul(&x, n, &w, rows, cols);
                assert!(rel_l2(&got, &exact) < if m.bits == 8 { 0.01 } else { 0.1 }, "bits {}: {}", m.bits, rel_l2(&got, &exact));
            }
        }
    }

    #[test]
    fn the_vector_loops_give_the_portable_loops_sums() {
        let _loops = loops_lock();
        // Each loop's AVX-512 version (where the CPU has it) and its AVX2 version; the switch
        // is process-wide, and both versions are correct, so tests beside this one are not
        // disturbed. The widths cover groups of one, several and an odd count of steps.
        for wide in [true, false] {
            use_avx512(wide);
            vector_loops_match(256);
            vector_loops_match(288);
        }
        use_avx512(true);
    }

    fn vector_loops_match(cols: usize) {
        let x = random(cols, 11);
        for (bits, group) in [(4, 32), (4, 128), (8, 16), (8, 256), (8, 48)] {
            if !cols.is_multiple_of(group) {
                continue;
            }
            let codes: Vec<u8> = random(3 * cols, 12 + group as u64).iter().map(|v| (((v + 1.0) * 127.99) as u32 % (1u32 << bits)) as u8).collect();
            let groups = 3 * cols / group;
            let m = QuantizedMatrix::from_codes(3, cols, bits, group, &codes, random(groups, 13), random(groups, 14)).expect("packs");
            let sums: Vec<f32> = x.chunks(group).map(|g| g.iter().sum()).collect();
            let dense = m.dequantize();
            for row in 0..3 {
                let want: f32 = dense[row * cols..(row + 1) * cols].iter().zip(&x).map(|(w, x)| w * x).sum();
                let portable = simd::row_dot_any(&m, row, &x, &sums);
                let dispatched = simd::row_dot(&m, row, &x, &sums);
                if bits == 8 {
                    // Rows `row..3` in one call, this row's first (groups of whole 16s).
                    let mut rows_out = vec![0f32; 3 - row];
                    if simd::rows_dot_codes8(&m, row, &x, &sums, &mut rows_out) {
                        assert!((rows_out[0] - want).abs() <= 1e-4 * want.abs().max(1.0), "8-bit rows from {row}, group {group}: {} vs {want}", rows_out[0]);
                    }
                }
                assert!((portable - want).abs() <= 1e-4 * want.abs().max(1.0), "bits {bits} group {group}: {portable} vs {want}");
                assert!((dispatched - want).abs() <= 1e-4 * want.abs().max(1.0), "bits {bits} group {group}: {dispatched} vs {want}");
                if bits == 4 {
                    // The split-nibble loops, over the reordered activations (None without AVX2).
                    if let Some(split) = simd::row_dot_split4(&m, row, &split_nibble_order(&x), &sums) {
                        assert!((split - want).abs() <= 1e-4 * want.abs().max(1.0), "split, group {group}: {split} vs {want}");
                    }
                    // Rows `row..3` in one call (pairs of rows and a last one alone), each checked.
                    let mut rows_out = vec![0f32; 3 - row];
                    if simd::rows_dot_split4(&m, row, &split_nibble_order(&x), &sums, &mut rows_out) {
                        for (k, &got) in rows_out.iter().enumerate() {
                            let r = row + k;
                            let want: f32 = dense[r * cols..(r + 1) * cols].iter().zip(&x).map(|(w, x)| w * x).sum();
                            assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "row {r} of rows from {row}, group {group}: {got} vs {want}");
                        }
                    }
                    // 2 to 4 activation rows at once: `x` and scaled copies of it.
                    for count in 2..=4 {
                        let rows: Vec<Vec<f32>> = (0..count).map(|k| x.iter().map(|v| v * (1.0 + k as f32)).collect()).collect();
                        let splits: Vec<Vec<f32>> = rows.iter().map(|r| split_nibble_order(r)).collect();
                        let row_sums: Vec<Vec<f32>> = rows.iter().map(|r| r.chunks(group).map(|g| g.iter().sum()).collect()).collect();
                        let mut out = vec![0f32; count];
                        let split_refs: Vec<&[f32]> = splits.iter().map(Vec::as_slice).collect();
                        let sum_refs: Vec<&[f32]> = row_sums.iter().map(Vec::as_slice).collect();
                        if simd::row_dot_split4_rows(&m, row, &split_refs, &sum_refs, &mut out) {
                            for (k, got) in out.iter().enumerate() {
                                let want = want * (1.0 + k as f32);
                                assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{count} rows, group {group}, row {k}: {got} vs {want}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn split_nibble_order_puts_each_unit_s_even_positions_first() {
        let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let s = split_nibble_order(&x);
        let want: Vec<f32> = [0u32, 32]
            .iter()
            .flat_map(|&base| (0..16).map(move |k| (base + 2 * k) as f32).chain((0..16).map(move |k| (base + 2 * k + 1) as f32)))
            .collect();
        assert_eq!(s, want);
    }

    #[test]
    fn activation_blocks_round_each_value_to_a_sixteen_bit_step_of_its_block() {
        let mut x = random(64, 21);
        x[40] = 100.0; // an outlier coarsens its own block only
        for bits in [4, 8] {
            let a = ActivationBlocks::new(&x, bits);
            assert_eq!((a.q.len(), a.scales.len()), (64, 2));
            assert_eq!(a.scales[1], 100.0 / 32767.0);
            for (i, &v) in x.iter().enumerate() {
                let (b, k) = (i / 32, i % 32);
                // 4-bit blocks hold the even elements, then the odd ones.
                let slot = if bits == 4 { b * 32 + k / 2 + (k % 2) * 16 } else { i };
                let back = a.scales[b] * a.q[slot] as f32;
                assert!((back - v).abs() <= 0.5 * a.scales[b] * (1.0 + 1e-6), "bits {bits} element {i}: {back} vs {v}");
            }
        }
        assert!(ActivationBlocks::new(&[0.0; 32], 8).q.iter().all(|&q| q == 0));
    }

    #[test]
    fn the_sixteen_bit_activation_loops_are_the_f32_product_to_rounding() {
        let cols = 256;
        let mut x = random(cols, 31);
        x[77] = -40.0;
        for (bits, group) in [(4, 32), (4, 128), (8, 16), (8, 32), (8, 256)] {
            let codes: Vec<u8> = random(3 * cols, 32 + group as u64).iter().map(|v| (((v + 1.0) * 127.99) as u32 % (1u32 << bits)) as u8).collect();
            let groups = 3 * cols / group;
            let m = QuantizedMatrix::from_codes(3, cols, bits, group, &codes, random(groups, 33), random(groups, 34)).expect("packs");
            assert!(m.takes_activation_blocks());
            let sums: Vec<f32> = x.chunks(group).map(|g| g.iter().sum()).collect();
            let a = ActivationBlocks::new(&x, bits);
            let dense = m.dequantize();
            for row in 0..3 {
                let w = &dense[row * cols..(row + 1) * cols];
                let want: f32 = w.iter().zip(&x).map(|(w, x)| w * x).sum();
                let size: f32 = w.iter().zip(&x).map(|(w, x)| (w * x).abs()).sum();
                for (name, got) in [("portable", simd::row_dot_i16_any(&m, row, &a, &sums)), ("dispatched", simd::row_dot_i16(&m, row, &a, &sums))] {
                    assert!((got - want).abs() <= 5e-5 * size, "{name} bits {bits} group {group}: {got} vs {want} (size {size})");
                }
            }
        }
        // Rows or groups that do not split into units take the f32 loop.
        let m = QuantizedMatrix::from_codes(1, 40, 8, 8, &[1; 40], vec![1.0; 5], vec![0.0; 5]).expect("packs");
        assert!(!m.takes_activation_blocks());
        assert_eq!(m.matmul(&[1.0; 40], 1, Activations::Blocks16), vec![40.0]);
    }

    #[test]
    fn eight_bit_activation_blocks_round_each_value_to_a_step_of_its_block() {
        let mut x = random(64, 41);
        x[40] = 100.0; // an outlier coarsens its own block only
        for bits in [4, 8] {
            let a = ActivationBlocks8::new(&x, bits);
            assert_eq!((a.q.len(), a.scales.len(), a.sums.len()), (64, 2, 2));
            assert_eq!(a.scales[1], 100.0 / 127.0);
            for b in 0..2 {
                assert_eq!(a.sums[b], a.q[b * 32..(b + 1) * 32].iter().map(|&q| i32::from(q)).sum::<i32>());
            }
            for (i, &v) in x.iter().enumerate() {
                let (b, k) = (i / 32, i % 32);
                let slot = if bits == 4 { b * 32 + k / 2 + (k % 2) * 16 } else { i };
                let back = a.scales[b] * f32::from(a.q[slot]);
                assert!((back - v).abs() <= 0.5 * a.scales[b] * (1.0 + 1e-6), "bits {bits} element {i}: {back} vs {v}");
            }
        }
        assert!(ActivationBlocks8::new(&[0.0; 32], 4).q.iter().all(|&q| q == 0));
    }

    #[test]
    fn the_eight_bit_activation_loops_are_the_product_of_the_rounded_activations() {
        let _loops = loops_lock();
        // The AVX-512 VNNI loop (one activation row, where the CPU has it) and the AVX2 ones;
        // 288 columns are an odd count of blocks (the VNNI loop takes blocks in pairs).
        for wide in [true, false] {
            use_avx512(wide);
            eight_bit_loops_match(256);
            eight_bit_loops_match(288);
        }
        use_avx512(true);
        // Groups that do not hold whole blocks take 16-bit blocks.
        let m = QuantizedMatrix::from_codes(1, 48, 8, 16, &[1; 48], vec![1.0; 3], vec![0.0; 3]).expect("packs");
        assert!(!m.takes_activation_blocks8());
        assert_eq!(m.matmul(&[1.0; 48], 1, Activations::Blocks8), vec![48.0]);
    }

    #[test]
    fn the_unit_loop_is_the_product_of_the_rounded_activations() {
        let _loops = loops_lock();
        // AVX-512 VNNI only: on other CPUs there is no unit loop to check.
        if !simd::takes_units(&QuantizedMatrix::from_codes(1, 32, 4, 32, &[0; 32], vec![1.0], vec![0.0]).expect("packs")) {
            eprintln!("no AVX-512 VNNI here: the unit loop is not checked");
            return;
        }
        // Whole units and last units of one to three blocks; groups of one, two, three, four
        // and eight blocks (groups that straddle units take the pair loop).
        for bits in [4u32, 8] {
            for cols in [32, 64, 96, 128, 288, 320, 352, 512] {
                let x = random(cols, 61 + cols as u64);
                for group in [32, 64, 96, 128, 256] {
                    if !cols.is_multiple_of(group) {
                        continue;
                    }
                    let top = (1u32 << bits) - 1;
                    let mut codes: Vec<u8> = random(5 * cols, 62 + group as u64).iter().map(|v| (((v + 1.0) * 0.5 * (top as f32 + 0.99)) as u32).min(top) as u8).collect();
                    codes[..4].copy_from_slice(&[0, top as u8, 0, top as u8]);
                    let groups = 5 * cols / group;
                    let m = QuantizedMatrix::from_codes(5, cols, bits, group, &codes, random(groups, 63), random(groups, 64)).expect("packs");
                    let per_unit = ActivationUnits::blocks_per_unit(bits);
                    let fits = per_unit.is_multiple_of(group / 32) || (group / 32).is_multiple_of(per_unit);
                    assert_eq!(simd::takes_units(&m), fits, "bits {bits} group {group}");
                    let a = ActivationBlocks8::new(&x, bits);
                    let sums = rounded_sums(&a, group);
                    let want: Vec<f32> = (0..5).map(|row| simd::row_dot_i8_any(&m, row, &a, &sums)).collect();
                    let size: f32 = m.dequantize().chunks(cols).map(|w| w.iter().zip(&x).map(|(w, x)| (w * x).abs()).sum::<f32>()).fold(0.0, f32::max);
                    if fits {
                        let units = ActivationUnits::new(&a, bits);
                        // Rows 1..5 (not from the first), as a rayon chunk takes them.
                        let mut got = vec![0f32; 4];
                        simd::rows_dot_units(&m, 1, &[&units], &[&sums], &mut got);
                        for (r, (g, w)) in got.iter().zip(&want[1..]).enumerate() {
                            assert!((g - w).abs() <= 1e-5 * size, "bits {bits} cols {cols} group {group} row {}: {g} vs {w}", r + 1);
                        }
                    }
                    // Through the product, which takes the unit loop for one row.
                    let got = m.matmul(&x, 1, Activations::Blocks8);
                    for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!((g - w).abs() <= 1e-5 * size, "matmul: bits {bits} cols {cols} group {group} row {r}: {g} vs {w}");
                    }
                }
            }
        }
    }

    /// `x` (a multiple of [`ACTIVATION_BLOCK`] long) rounded as [`ActivationBlocks8`] rounds
    /// it, `scale · q`, in order: what a product of 8-bit activations multiplies.
    fn rounded8(x: &[f32]) -> Vec<f32> {
        let a = ActivationBlocks8::new(x, 8);
        a.q.chunks_exact(ACTIVATION_BLOCK).zip(&a.scales).flat_map(|(qb, &s)| qb.iter().map(move |&q| s * f32::from(q))).collect()
    }

    /// The sums of `a`'s rounded values per group of `group`, as [`QuantizedMatrix::matmul`]
    /// gives its 8-bit loops.
    fn rounded_sums(a: &ActivationBlocks8, group: usize) -> Vec<f32> {
        let per = group / 32;
        a.scales.chunks(per).zip(a.sums.chunks(per)).map(|(s, q)| s.iter().zip(q).map(|(&s, &q)| s * q as f32).sum()).collect()
    }

    #[test]
    fn eight_bit_activation_products_are_the_weight_times_the_rounded_activations() {
        let _loops = loops_lock();
        // The offsets meet the rounded activations as the codes do, so the product is that of
        // the dequantized weight and the rounded activations (llama.cpp's `Q8_1` product):
        // with the exact sums the offsets' share kept the exact activations and the error
        // grew with the codes' distance from zero (8-bit codes are stored offset by 128).
        for wide in [true, false] {
            use_avx512(wide);
            for (bits, group, cols) in [(4, 32, 288), (4, 128, 256), (8, 32, 288), (8, 256, 256)] {
                let top = (1u32 << bits) - 1;
                let rows = 6;
                let codes: Vec<u8> = random(rows * cols, 71 + group as u64).iter().map(|v| (((v + 1.0) * 0.5 * (top as f32 + 0.99)) as u32).min(top) as u8).collect();
                let groups = rows * cols / group;
                let scales: Vec<f32> = random(groups, 72).iter().map(|v| 0.01 + 0.005 * v).collect();
                let mins: Vec<f32> = scales.iter().map(|s| -(top as f32 / 2.0) * s).collect();
                let m = QuantizedMatrix::from_codes(rows, cols, bits, group, &codes, scales, mins).expect("packs");
                let dense = m.dequantize();
                for n in [1, 2, 3, 4, 5] {
                    let x = random(n * cols, 73 + n as u64);
                    // Rows past the fused limit (without the tiles: not x86-64 with AVX2) go
                    // through the linear's prompt path.
                    let got = if n <= m.fused_row_limit(Activations::Blocks8) {
                        m.matmul(&x, n, Activations::Blocks8)
                    } else {
                        let d = Device::flex();
                        let y = QuantizedLinear::new(m.clone(), &d).with_activations(Activations::Blocks8).forward(Tensor::<2>::from_data(TensorData::new(x.clone(), [n, cols]), &d));
                        y.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32")
                    };
                    for j in 0..n {
                        let xr = &x[j * cols..(j + 1) * cols];
                        let rounded = rounded8(xr);
                        for r in 0..rows {
                            let w = &dense[r * cols..(r + 1) * cols];
                            let want: f32 = w.iter().zip(&rounded).map(|(w, x)| w * x).sum();
                            let size: f32 = w.iter().zip(xr).map(|(w, x)| (w * x).abs()).sum();
                            let g = got[j * rows + r];
                            assert!((g - want).abs() <= 1e-5 * size, "wide {wide} bits {bits} group {group} n {n} row {r}: {g} vs {want}");
                        }
                    }
                }
            }
        }
        use_avx512(true);
    }

    fn eight_bit_loops_match(cols: usize) {
        let mut x = random(4 * cols, 51);
        x[77] = -40.0;
        // Codes over the whole range (8-bit ones past 128 either way, the sign trick's edge).
        for (bits, group) in [(4, 32), (4, 128), (8, 32), (8, 256), (8, 96)] {
            if !cols.is_multiple_of(group) {
                continue;
            }
            let mut codes: Vec<u8> = random(3 * cols, 52 + group as u64).iter().map(|v| (((v + 1.0) * 127.99) as u32 % (1u32 << bits)) as u8).collect();
            let top = ((1u32 << bits) - 1) as u8;
            codes[..4].copy_from_slice(&[0, top, 0, top]);
            let groups = 3 * cols / group;
            let m = QuantizedMatrix::from_codes(3, cols, bits, group, &codes, random(groups, 53), random(groups, 54)).expect("packs");
            assert!(m.takes_activation_blocks8());
            let dense = m.dequantize();
            let rows: Vec<&[f32]> = x.chunks(cols).collect();
            let blocks: Vec<ActivationBlocks8> = rows.iter().map(|r| ActivationBlocks8::new(r, bits)).collect();
            let sums: Vec<Vec<f32>> = rows.iter().map(|r| r.chunks(group).map(|g| g.iter().sum()).collect()).collect();
            for row in 0..3 {
                let w = &dense[row * cols..(row + 1) * cols];
                for count in 1..=4 {
                    // Rows `row..3` at once, this row's products first.
                    let mut all = vec![0f32; (3 - row) * count];
                    let refs: Vec<&ActivationBlocks8> = blocks[..count].iter().collect();
                    let sum_refs: Vec<&[f32]> = sums[..count].iter().map(Vec::as_slice).collect();
                    simd::rows_dot_i8(&m, row, &refs, &sum_refs, &mut all);
                    let out = &all[..count];
                    for j in 0..count {
                        // The codes times the rounded activations, plus the offsets times the
                        // exact sums: what the loops compute, summed in another order.
                        let a = &blocks[j];
                        let rounded: Vec<f32> = (0..cols)
                            .map(|i| {
                                let (b, k) = (i / 32, i % 32);
                                let slot = if bits == 4 { b * 32 + k / 2 + (k % 2) * 16 } else { i };
                                a.scales[b] * f32::from(a.q[slot])
                            })
                            .collect();
                        let g = m.groups_per_row();
                        let codes_part: f32 = (0..cols).map(|i| (w[i] - m.groups.min(row * g + i / group)) * rounded[i]).sum();
                        let offsets: f32 = (0..g).map(|k| m.groups.min(row * g + k) * sums[j][k]).sum();
                        let want = codes_part + offsets;
                        let size: f32 = w.iter().zip(rows[j]).map(|(w, x)| (w * x).abs()).sum();
                        let portable = simd::row_dot_i8_any(&m, row, a, &sums[j]);
                        for (name, got) in [("portable", portable), ("dispatched", out[j])] {
                            assert!((got - want).abs() <= 1e-5 * size, "{name} bits {bits} group {group} rows {count}: {got} vs {want}");
                        }
                        // And near the f32 product: 8-bit activations lose about 2^-8 of a block's largest value.
                        let exact: f32 = w.iter().zip(rows[j]).map(|(w, x)| w * x).sum();
                        assert!((out[j] - exact).abs() <= 1e-2 * size, "bits {bits} group {group}: {} vs {exact}", out[j]);
                    }
                }
            }
        }
    }

    #[test]
    fn group_values_stay_f16_only_where_exact_and_give_the_f32_products_bit_for_bit() {
        let _loops = loops_lock();
        let exact = GroupScales::new(vec![0.5, 1.0 / 1024.0, -3.0], vec![-8.0, 0.0, 65504.0]);
        assert!(exact.is_f16() && exact.bytes() == 12 && exact.scale(1) == 1.0 / 1024.0 && exact.min(2) == 65504.0);
        for inexact in [vec![0.1f32, 1.0, 2.0], vec![1e-9, 1.0, 2.0], vec![1e6, 1.0, 2.0]] {
            assert!(!GroupScales::new(inexact, vec![0.0; 3]).is_f16());
        }
        assert!(!GroupScales::new(vec![1.0; 3], vec![0.0, 0.0, 0.3]).is_f16(), "offsets are checked too");
        // The same matrix with f16 and with f32 group values: every CPU path gives the same
        // bits (the loops convert in registers and add in the same order).
        for wide in [true, false] {
            use_avx512(wide);
            for (bits, group, cols) in [(4u32, 32, 576), (4, 128, 256), (8, 32, 288), (8, 16, 96)] {
                let rows = 40;
                let top = (1u32 << bits) - 1;
                let codes: Vec<u8> = random(rows * cols, 81 + group as u64).iter().map(|v| (((v + 1.0) * 0.5 * (top as f32 + 0.99)) as u32).min(top) as u8).collect();
                let groups = rows * cols / group;
                let to_f16 = |v: Vec<f32>| v.iter().map(|&x| f16::from_f32(x).to_f32()).collect::<Vec<f32>>();
                let scales = to_f16(random(groups, 82).iter().map(|v| 0.01 + 0.005 * v).collect());
                let mins = to_f16(random(groups, 83).iter().map(|v| -0.08 * v).collect());
                let half = QuantizedMatrix::from_codes(rows, cols, bits, group, &codes, scales.clone(), mins.clone()).expect("packs");
                assert!(half.groups.is_f16(), "bits {bits} group {group}");
                let full = QuantizedMatrix { groups: GroupScales::F32 { scales, mins }, ..half.clone() };
                assert!(half.bytes() < full.bytes());
                assert_eq!(half.dequantize(), full.dequantize());
                for activations in [Activations::F32, Activations::Blocks16, Activations::Blocks8] {
                    for n in [1, 2, 3, 4, 5, 8, 37] {
                        if n > full.fused_row_limit(activations) {
                            continue;
                        }
                        let x = random(n * cols, 84 + n as u64);
                        let (h, f) = (half.matmul(&x, n, activations), full.matmul(&x, n, activations));
                        assert!(h.iter().zip(&f).all(|(a, b)| a.to_bits() == b.to_bits()), "wide {wide} bits {bits} group {group} {activations:?} rows {n}");
                    }
                }
                // Kept through row orders and stacks; a stack with f32 values turns f32.
                let order: Vec<usize> = (0..rows).rev().collect();
                assert!(half.permute_rows(&order).expect("order").groups.is_f16());
                assert!(QuantizedMatrix::concat_rows(&[half.clone(), half.clone()]).expect("stack").groups.is_f16());
                let mixed = QuantizedMatrix::concat_rows(&[half.clone(), full.clone()]).expect("stack");
                assert!(!mixed.groups.is_f16());
                assert_eq!(mixed.dequantize_range(rows..2 * rows), full.dequantize());
            }
        }
        use_avx512(true);
    }

    #[test]
    fn a_batch_of_decode_rows_gives_each_row_what_it_gives_alone() {
        // Batched decode: a request's tokens must not depend on the requests beside it, so
        // each loop for 2 to 4 activation rows does each row's operations in the one-row
        // order. Bit for bit, 8-bit and exact activations, 4- and 8-bit codes, f16 and f32
        // group values, with AVX-512 (VNNI) and AVX2 loops where the CPU has them.
        let _loops = loops_lock();
        for wide in [true, false] {
            use_avx512(wide);
            for (bits, group, cols) in [(4u32, 32, 576), (4, 128, 256), (8, 32, 288), (8, 64, 512)] {
                let rows = 23;
                let top = (1u32 << bits) - 1;
                let codes: Vec<u8> = random(rows * cols, 91 + group as u64).iter().map(|v| (((v + 1.0) * 0.5 * (top as f32 + 0.99)) as u32).min(top) as u8).collect();
                let groups = rows * cols / group;
                for f16_values in [true, false] {
                    let round = |v: Vec<f32>| if f16_values { v.iter().map(|&x| f16::from_f32(x).to_f32()).collect() } else { v };
                    let scales = round(random(groups, 92).iter().map(|v| 0.01 + 0.005 * v).collect());
                    let mins = round(random(groups, 93).iter().map(|v| -0.08 * v).collect());
                    let m = QuantizedMatrix::from_codes(rows, cols, bits, group, &codes, scales, mins).expect("packs");
                    assert_eq!(m.groups.is_f16(), f16_values);
                    for activations in [Activations::Blocks8, Activations::F32] {
                        let x = random(9 * cols, 94);
                        let alone: Vec<Vec<f32>> = x.chunks(cols).map(|r| m.matmul(r, 1, activations)).collect();
                        // Past four rows exact activations take the tiles (prompts, another
                        // order of additions); 8-bit ones stay in passes of four.
                        let most = if activations == Activations::Blocks8 { 9 } else { 4 };
                        for n in 2..=most {
                            let together = m.matmul(&x[..n * cols], n, activations);
                            for (j, want) in alone.iter().take(n).enumerate() {
                                let got = &together[j * rows..(j + 1) * rows];
                                assert!(
                                    got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                                    "wide {wide} bits {bits} group {group} f16 {f16_values} {activations:?}: row {j} of {n}"
                                );
                            }
                        }
                    }
                }
            }
        }
        use_avx512(true);
    }

    #[test]
    fn permuted_and_concatenated_rows_are_those_rows() {
        let (rows, cols) = (4, 32);
        let w = random(rows * cols, 4);
        let m = QuantizedMatrix::quantize_int4(&w, rows, cols, 32).expect("int4");
        let dense = m.dequantize();
        let p = m.permute_rows(&[2, 0, 3, 1]).expect("order");
        let pd = p.dequantize();
        for (i, &r) in [2, 0, 3, 1].iter().enumerate() {
            assert_eq!(pd[i * cols..(i + 1) * cols], dense[r * cols..(r + 1) * cols]);
        }
        assert!(m.permute_rows(&[0, 1]).is_err());
        let both = QuantizedMatrix::concat_rows(&[m.clone(), p]).expect("same layout");
        assert_eq!(both.rows, 8);
        assert_eq!(both.dequantize()[..rows * cols], dense[..]);
        let q8 = QuantizedMatrix::quantize_int8(&w, rows, cols).expect("int8");
        assert!(QuantizedMatrix::concat_rows(&[m, q8]).is_none());
    }

    #[test]
    fn the_linear_on_the_cpu_multiplies_in_the_activations_dtype() {
        let (rows, cols) = (10, 64);
        let w = random(rows * cols, 5);
        let m = QuantizedMatrix::quantize_int4(&w, rows, cols, 32).expect("int4");
        let dense = m.dequantize();
        let d = Device::flex();
        // The CPU's default: f32 activations exact, others in 16-bit blocks; 8-bit blocks
        // when asked for.
        let lin = QuantizedLinear::new(m, &d);
        assert_eq!((lin.activations(DType::F32), lin.activations(DType::BF16)), (Activations::F32, Activations::Blocks16));
        let exact = lin.clone();
        let int8 = lin.clone().with_activations(Activations::Blocks8);
        let xs = random(2 * cols, 6);
        let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [2, cols]), &d);
        let got = exact.forward(x.clone()).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
        assert!(rel_l2(&got, &dense_matmul(&xs, 2, &dense, rows, cols)) < 1e-6);
        // 8-bit blocks: the weight times the activations rounded to 8-bit blocks, for decode
        // rows and prompt rows alike.
        for n in [2, 7] {
            let xn = random(n * cols, 16 + n as u64);
            let rounded = rounded8(&xn);
            let got = int8.forward(Tensor::<2>::from_data(TensorData::new(xn.clone(), [n, cols]), &d));
            let got = got.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
            let want = dense_matmul(&rounded, n, &dense, rows, cols);
            assert!(rel_l2(&got, &want) < 1e-6, "{n} rows: {}", rel_l2(&got, &want));
            assert!(rel_l2(&got, &dense_matmul(&xn, n, &dense, rows, cols)) > 1e-5, "{n} rows: the activations were not rounded");
        }
        let y = lin.forward(x.clone().cast(DType::BF16));
        assert_eq!(y.dtype(), DType::BF16);
        assert_eq!(y.dims(), [2, rows]);
        // bf16 activations go through the 16-bit blocks: the product to bf16's rounding.
        let xb = x.cast(DType::BF16).cast(DType::F32).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
        let yb = y.cast(DType::F32).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
        assert!(rel_l2(&yb, &dense_matmul(&xb, 2, &dense, rows, cols)) < 8e-3);
        let back = lin.dequantize(DType::F32).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
        assert_eq!(back, dense);
        // Prompt rows: the dense product of the dequantized weight, in slices of rows when the
        // weight is larger than one slice (4,100 rows of 1,024).
        let x7 = random(7 * cols, 7);
        let got = exact.forward(Tensor::<2>::from_data(TensorData::new(x7.clone(), [7, cols]), &d));
        let got = got.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
        assert!(rel_l2(&got, &dense_matmul(&x7, 7, &dense, rows, cols)) < 1e-6);
        let (big_rows, big_cols) = (4100, 1024);
        let big = QuantizedMatrix::quantize_int4(&random(big_rows * big_cols, 8), big_rows, big_cols, 128).expect("int4");
        let big_dense = big.dequantize();
        let xb = random(5 * big_cols, 9);
        let got = QuantizedLinear::new(big, &d).with_activations(Activations::F32).forward(Tensor::<2>::from_data(TensorData::new(xb.clone(), [5, big_cols]), &d));
        assert_eq!(got.dims(), [5, big_rows]);
        let got = got.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
        assert!(rel_l2(&got, &dense_matmul(&xb, 5, &big_dense, big_rows, big_cols)) < 1e-5);
    }
}
