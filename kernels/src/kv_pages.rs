//! One layer's keys or values in the paged KV cache ([`KvPages`]): in the attention's dtype,
//! or as 8-bit codes with one scale per token and key head ([`KvCodes`]: integers or FP8).
//!
//! The int8 form is symmetric per (slot, key head): `scale = max|x| / 127`, `code =
//! round(x / scale)` (half to even) in ±127, `x ≈ scale · code`. The FP8 form is the same with
//! `scale = max|x| / 448` and the code the nearest OCP FP8 E4M3 number (half to even; 448 is
//! E4M3's largest finite value, so no code is NaN): steps of at most 1/8 of each value instead
//! of one absolute step (vLLM's `fp8_e4m3` cache, with a scale per token and head instead of
//! per layer). Both take the per-token, per-head granularity of LMDeploy's online int8 KV
//! cache (`lmdeploy/turbomind`'s `kv_cache_int8`) and of KIVI's keys-per-token variant (Liu et
//! al. 2024, arXiv:2402.02750), without the zero point. Values are quantized when written ([`KvPages::write`]) and dequantized
//! where attention reads them: the CUDA kernels convert each code and scale each key's score
//! and each value's weight by its slot's scale, the CPU decode loop converts a row at a time,
//! and the gathered reference dequantizes the rows it gathers ([`KvPages::select`]). A head of
//! `d` values then takes `d + 4` bytes instead of `2d` in bf16 (`4d` in f32).

use burn::tensor::{DType, Device, FloatDType, IndexingUpdateOp, Int, IntDType, Tensor, TensorData};
use crate::kv_write::{fused_write_kv_codes, write_kv_pair, write_kv_slots, zeroed_kv_buffer, zeroed_kv_int_buffer};
use crate::launch::is_cubecl;

/// The 8-bit codes of a quantized KV cache, each head's scaled by `max|x| / largest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCodes {
    /// Integers in ±127.
    Int8,
    /// OCP FP8 E4M3 numbers in ±448.
    Fp8,
}

impl KvCodes {
    /// The largest code's value: a head's largest magnitude becomes it.
    pub fn largest(self) -> f32 {
        match self {
            Self::Int8 => 127.0,
            Self::Fp8 => 448.0,
        }
    }

    /// `int8`, `fp8`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Int8 => "int8",
            Self::Fp8 => "fp8",
        }
    }

    /// The code of `x` (within ±[`Self::largest`]) as its byte: the nearest code, ties to
    /// even.
    pub fn encode(self, x: f32) -> u8 {
        match self {
            Self::Int8 => x.round_ties_even().clamp(-127.0, 127.0) as i8 as u8,
            Self::Fp8 => e4m3_from_f32(x),
        }
    }

    /// The value of code byte `b`.
    pub fn decode(self, b: u8) -> f32 {
        match self {
            Self::Int8 => f32::from(b as i8),
            Self::Fp8 => e4m3_to_f32(b),
        }
    }

    /// Every code byte's value, by byte.
    pub fn table(self) -> [f32; 256] {
        std::array::from_fn(|b| self.decode(b as u8))
    }
}

/// The value of OCP FP8 E4M3 byte `b` (sign, 4 exponent bits of bias 7, 3 mantissa bits; no
/// infinities; `0x7F`/`0xFF` are NaN): `2^(e-7) · (1 + m/8)`, or `2^-6 · m/8` where `e` is 0.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let (e, m) = (i32::from((b >> 3) & 0xF), f32::from(b & 7));
    let magnitude = if b & 0x7F == 0x7F {
        f32::NAN
    } else if e == 0 {
        m / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    };
    if b & 0x80 != 0 { -magnitude } else { magnitude }
}

/// [`e4m3_to_f32`] through the byte's bits, as the CUDA kernels convert it: sign, exponent and
/// mantissa moved into an f32's places, times `2^(127 - 7)` (exact, NaN bytes aside: E4M3's
/// subnormals become f32 subnormals, which the product makes normal). The compiler vectorises
/// it, where a table lookup per value ran the fp8 KV cache's decode after 2,048 tokens at 0.76x
/// int8's (benches/results/cpu-2026-12-07-kv-codes.md).
#[inline(always)]
pub fn e4m3_bits_to_f32(b: u8) -> f32 {
    e4m3_bits(b) * f32::from_bits(0x7B80_0000)
}

/// An E4M3 byte's sign, exponent and mantissa in an f32's places: its value times `2^-120`
/// (what [`e4m3_bits_to_f32`] scales; the FP8 weights' loops take the `2^120` elsewhere).
#[inline(always)]
pub fn e4m3_bits(b: u8) -> f32 {
    let b = u32::from(b);
    f32::from_bits(((b & 0x7F) << 20) | ((b & 0x80) << 24))
}

/// The E4M3 byte nearest `x` (ties to the even mantissa), `x` clamped to ±448 (E4M3's largest
/// finite value), -0 read as 0 and NaN as 0: the CUDA write kernel's arithmetic
/// (`kv_write.rs`).
pub fn e4m3_from_f32(x: f32) -> u8 {
    let sign = if x < 0.0 { 0x80 } else { 0 };
    let a = if x.is_nan() { 0.0 } else { x.abs().min(448.0) };
    let code = if a < 2f32.powi(-6) {
        // Subnormal: steps of 2^-9 (the value 8 · 2^-9 is the smallest normal, code 0x08).
        (a * 512.0).round_ties_even() as u8
    } else {
        // Normal: the f32 mantissa rounded to 3 bits, half to even (a carry moves the
        // exponent up, which the bit layout does by itself).
        let bits = a.to_bits();
        let rounded = (bits + 0x7_FFFF + ((bits >> 20) & 1)) & !0xF_FFFF;
        let e = (rounded >> 23) as i32 - 127 + 7;
        ((e as u32) << 3 | ((rounded >> 20) & 7)) as u8
    };
    sign | code
}

/// The value of IEEE half-precision bits `h` as f32, exactly (infinities and NaNs kept): the
/// exponent and mantissa moved into an f32's places and scaled by `2^(127 - 15)` (subnormal
/// halves become f32 subnormals, which the product makes normal), an all-ones exponent set
/// to f32's. Bit moves, a product and a select, so a row's loop vectorises (the CPU decode
/// loop widens `kv_cache_dtype = "f16"` pages a row at a time).
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let finite = f32::from_bits((h & 0x7FFF) << 13) * f32::from_bits(0x7780_0000);
    let magnitude = if h & 0x7C00 == 0x7C00 { f32::from_bits(0x7F80_0000 | ((h & 0x3FF) << 13)) } else { finite };
    f32::from_bits(magnitude.to_bits() | ((h & 0x8000) << 16))
}

/// The value of bfloat16 bits `h` as f32: the upper half of the f32's bits.
#[inline(always)]
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// How a KV cache stores keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvStorage {
    /// As attention computes them, in this dtype; on the CPU also f16 or bf16 for an f32
    /// attention (rounded when written, widened where attention reads them).
    Dense(DType),
    /// 8-bit codes and an f32 scale per (slot, key head).
    Coded(KvCodes),
}

impl KvStorage {
    /// Bytes one slot's head of `head_dim` values takes.
    pub fn head_bytes(self, head_dim: usize) -> u64 {
        match self {
            Self::Dense(dtype) => (head_dim * dtype.size()) as u64,
            Self::Coded(_) => head_dim as u64 + 4,
        }
    }

    /// `bf16`, `f32`, `int8`, `fp8`, …
    pub fn name(self) -> String {
        match self {
            Self::Dense(dtype) => format!("{dtype:?}").to_lowercase(),
            Self::Coded(codes) => codes.name().into(),
        }
    }
}

/// One layer's keys (or values), `[slots, kv_heads, head_dim]`. (Two per layer live for the
/// model's life, moved once a step: the coded variant's second handle is not worth a box.)
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum KvPages {
    /// In the attention's dtype, or (on the CPU) f16/bf16 for an f32 attention.
    Dense(Tensor<3>),
    /// `codes [slots, kv_heads, head_dim]` (i8: each code's byte, whatever the format) and
    /// `scales [slots, kv_heads, 1]` (f32): a value is `scale · format.decode(code)`.
    Coded { format: KvCodes, codes: Tensor<3, Int>, scales: Tensor<3> },
}

impl KvPages {
    /// Zeroed pages of `shape` (on the CPU in anonymous memory, resident once written:
    /// [`zeroed_kv_buffer`]). A zero byte is the value 0 in both code formats.
    pub fn zeroed(storage: KvStorage, shape: [usize; 3], device: &Device) -> Self {
        match storage {
            KvStorage::Dense(dtype) => Self::Dense(zeroed_kv_buffer(shape, dtype, device)),
            KvStorage::Coded(format) => Self::Coded {
                format,
                codes: zeroed_kv_int_buffer(shape, DType::I8, device),
                scales: zeroed_kv_buffer([shape[0], shape[1], 1], DType::F32, device),
            },
        }
    }

    /// `[slots, kv_heads, head_dim]`.
    pub fn dims(&self) -> [usize; 3] {
        match self {
            Self::Dense(t) => t.dims(),
            Self::Coded { codes, .. } => codes.dims(),
        }
    }

    pub fn storage(&self) -> KvStorage {
        match self {
            Self::Dense(t) => KvStorage::Dense(t.dtype()),
            Self::Coded { format, .. } => KvStorage::Coded(*format),
        }
    }

    /// Whether every tensor is uniquely owned, so writes land in place.
    pub fn can_mut(&self) -> bool {
        match self {
            Self::Dense(t) => t.can_mut(),
            Self::Coded { codes, scales, .. } => codes.can_mut() && scales.can_mut(),
        }
    }

    /// The pages with row `slots[i]` holding `values[i]` (`values [tokens, kv_heads,
    /// head_dim]`, quantized first for coded pages: [`quantize_heads_on_host`]'s arithmetic).
    pub fn write(self, slots: Tensor<1, Int>, values: Tensor<3>) -> Self {
        match self {
            Self::Dense(pool) => Self::Dense(write_kv_slots(pool, slots, values)),
            // On CubeCL devices one kernel quantizes and writes (burn's operations were about
            // nine launches a layer there, ~1 ms of a 4.4 ms Qwen3-4B decode step on an H100);
            // on the CPU one loop quantizes on the host and burn's `select_assign` writes.
            Self::Coded { format, codes, scales } if is_cubecl(&codes.device()) => {
                let (codes, scales) = fused_write_kv_codes(format, codes, scales, slots, values);
                Self::Coded { format, codes, scales }
            }
            Self::Coded { format, codes, scales } => {
                let (q, s) = quantize_heads_on_host(format, values);
                let codes = codes.select_assign(0, slots.clone(), q, IndexingUpdateOp::Assign);
                Self::Coded { format, codes, scales: write_kv_slots(scales, slots, s) }
            }
        }
    }

    /// A layer's key and value pages written together ([`KvPages::write`] of each): dense
    /// pages on CubeCL devices in one launch ([`crate::kv_write::write_kv_pair`]).
    pub fn write_pair(keys: Self, values: Self, slots: Tensor<1, Int>, k: Tensor<3>, v: Tensor<3>) -> (Self, Self) {
        match (keys, values) {
            (Self::Dense(kp), Self::Dense(vp)) if kp.dtype() == vp.dtype() && kp.dims() == vp.dims() => {
                let (kp, vp) = write_kv_pair(kp, vp, slots, k, v);
                (Self::Dense(kp), Self::Dense(vp))
            }
            (keys, values) => (keys.write(slots.clone(), k), values.write(slots, v)),
        }
    }

    /// Rows `slots` as `[slots.len(), kv_heads, head_dim]` values in `dtype` (coded pages
    /// decoded in f32, then rounded to `dtype`).
    pub fn select(&self, slots: Tensor<1, Int>, dtype: DType) -> Tensor<3> {
        match self {
            Self::Dense(t) => t.clone().select(0, slots).cast(dtype),
            Self::Coded { format, codes, scales } => decode_codes(*format, codes.clone().select(0, slots.clone())).mul(scales.clone().select(0, slots)).cast(dtype),
        }
    }

    /// Every row's values in `dtype` (for tests and checks).
    pub fn values(&self, dtype: DType) -> Tensor<3> {
        match self {
            Self::Dense(t) => t.clone().cast(dtype),
            Self::Coded { format, codes, scales } => decode_codes(*format, codes.clone()).mul(scales.clone()).cast(dtype),
        }
    }
}

/// Code tensor `codes` (i8) as the f32 values of its codes: int8 converted, FP8 bytes looked
/// up in [`KvCodes::table`] (on the CPU in one loop on the host, where burn's operations took
/// 1.8x the prefill time of int8's conversion at 2,048 tokens of SmolLM2:
/// benches/results/cpu-2026-12-07-kv-codes.md).
fn decode_codes(format: KvCodes, codes: Tensor<3, Int>) -> Tensor<3> {
    match format {
        KvCodes::Int8 => codes.cast(FloatDType::F32),
        KvCodes::Fp8 if !is_cubecl(&codes.device()) => {
            let (dims, device) = (codes.dims(), codes.device());
            let table = format.table();
            let values: Vec<f32> = codes.into_data().iter::<i64>().map(|c| table[usize::from(c as u8)]).collect();
            Tensor::from_data(TensorData::new(values, dims), (&device, DType::F32))
        }
        KvCodes::Fp8 => fp8_by_table(codes),
    }
}

/// E4M3 codes (i8) as their values by a gather from [`e4m3_table_on`] (any device; on CubeCL
/// devices the gathered reference's way).
fn fp8_by_table(codes: Tensor<3, Int>) -> Tensor<3> {
    let dims = codes.dims();
    let table = e4m3_table_on(&codes.device());
    let index = codes.reshape([dims.iter().product::<usize>()]).cast(IntDType::I32).add_scalar(128);
    table.select(0, index).reshape(dims)
}

/// Every E4M3 byte's value on `device`, code `c` (the byte read as i8) at `c + 128`: made and
/// uploaded once per device (the gathered reference decodes every layer's pages of a chunk
/// through it, where an upload per call would wait on the host).
fn e4m3_table_on(device: &Device) -> Tensor<1> {
    static TABLES: std::sync::Mutex<Vec<(Device, Tensor<1>)>> = std::sync::Mutex::new(Vec::new());
    let mut tables = TABLES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, table)) = tables.iter().find(|(d, _)| d == device) {
        return table.clone();
    }
    let values: Vec<f32> = (-128i32..128).map(|c| KvCodes::Fp8.decode(c as u8)).collect();
    let table = Tensor::<1>::from_data(TensorData::new(values, [256]), (device, DType::F32));
    tables.push((device.clone(), table.clone()));
    table
}

/// `values [tokens, kv_heads, head_dim]` as int8 codes `[tokens, kv_heads, head_dim]` and
/// f32 scales `[tokens, kv_heads, 1]`: per (token, head) `scale = max|x| / 127` and `code =
/// round(x · 127 / max|x|)` (half to even; 0 for a head of zeros), in f32, by burn's
/// operations (the reference the CUDA write kernel is checked against).
pub fn quantize_heads(values: Tensor<3>) -> (Tensor<3, Int>, Tensor<3>) {
    let x = values.cast(DType::F32);
    let amax = x.clone().abs().max_dim(2);
    // One division, as the host loop and the CUDA kernel take it: a reciprocal and then a
    // product rounded twice, which put about one value in 40 test runs' 7,000 on the other side
    // of a half step.
    let inv = amax.ones_like().mul_scalar(127.0).div(amax.clone().clamp_min(f32::MIN_POSITIVE));
    let codes = x.mul(inv).round().clamp(-127.0, 127.0).cast(IntDType::I8);
    (codes, amax.div_scalar(127.0))
}

/// `values [tokens, kv_heads, head_dim]` as `format`'s codes (their bytes, i8) and f32 scales
/// `[tokens, kv_heads, 1]`, in a loop over the values on the host: per (token, head) `scale =
/// max|x| / largest`, `code = encode(x · largest / max|x|)` (for int8 the arithmetic of
/// [`quantize_heads`], the same codes and scales). For CPU tensors: one read of the step's
/// values and two tensors made, where burn's operations were nine (5 % of a SmolLM2 decode
/// step on 2 cores); also the reference `kernel_check` compares the CUDA kernel's FP8 codes
/// with. The tensors are made on the values' device.
pub fn quantize_heads_on_host(format: KvCodes, values: Tensor<3>) -> (Tensor<3, Int>, Tensor<3>) {
    let device = values.device();
    let [t, h, d] = values.dims();
    let x: Vec<f32> = values.into_data().iter::<f32>().collect();
    let mut codes = vec![0u8; x.len()];
    let mut scales = Vec::with_capacity(t * h);
    let largest = format.largest();
    for (xs, qs) in x.chunks_exact(d.max(1)).zip(codes.chunks_exact_mut(d.max(1))) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = largest / amax.max(f32::MIN_POSITIVE);
        for (q, &v) in qs.iter_mut().zip(xs) {
            *q = format.encode(v * inv);
        }
        scales.push(amax / largest);
    }
    let codes = TensorData::new(codes.into_iter().map(|b| b as i8).collect::<Vec<i8>>(), [t, h, d]);
    let codes = Tensor::<3, Int>::from_data(codes, (&device, DType::I8));
    let scales = Tensor::<3>::from_data(TensorData::new(scales, [t, h, 1]), (&device, DType::F32));
    (codes, scales)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32")
    }

    #[test]
    fn e4m3_bytes_convert_through_their_bits_as_the_reference_reads_them() {
        for b in (0..=255u8).filter(|b| b & 0x7F != 0x7F) {
            assert_eq!(e4m3_bits_to_f32(b).to_bits(), e4m3_to_f32(b).to_bits(), "byte {b:#04x}");
        }
    }

    /// Every half-precision bit pattern widens as the `half` crate widens it (NaNs stay
    /// NaNs), and every bfloat16 pattern likewise.
    #[test]
    fn sixteen_bit_pages_widen_every_pattern_exactly() {
        for h in 0..=u16::MAX {
            let (got, want) = (f16_bits_to_f32(h), half::f16::from_bits(h).to_f32());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "f16 {h:#06x}: {got} vs {want}");
            let (got, want) = (bf16_bits_to_f32(h), half::bf16::from_bits(h).to_f32());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "bf16 {h:#06x}: {got} vs {want}");
        }
    }

    /// f16 pages store each written value rounded to the nearest half (ties to even), and
    /// read back as exactly that.
    #[test]
    fn f16_pages_hold_each_value_rounded_to_the_nearest_half() {
        let device = Device::flex();
        let x: Tensor<3> = Tensor::random([5, 2, 16], burn::tensor::Distribution::Uniform(-70_000.0, 70_000.0), &device).mul(Tensor::random([5, 2, 16], burn::tensor::Distribution::Uniform(0.0, 1.0), &device).powf_scalar(6.0));
        let pages = KvPages::zeroed(KvStorage::Dense(DType::F16), [8, 2, 16], &device);
        let slots = Tensor::<1, Int>::from_data(TensorData::new(vec![6i64, 0, 3, 7, 1], [5]), &device);
        let pages = pages.write(slots.clone(), x.clone());
        assert_eq!((pages.storage(), pages.storage().head_bytes(16)), (KvStorage::Dense(DType::F16), 32));
        let got: Vec<f32> = pages.select(slots, DType::F32).into_data().iter::<f32>().collect();
        let want: Vec<f32> = x.into_data().iter::<f32>().map(|v| half::f16::from_f32(v).to_f32()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn int8_pages_hold_each_head_within_half_a_step_of_its_scale() {
        let device = Device::flex();
        // Three tokens, two heads of four: one head of zeros, one with a negative maximum.
        let values: Vec<f32> = vec![
            0.5, -1.0, 0.25, 0.0, /**/ 0.0, 0.0, 0.0, 0.0, //
            3.0, 2.9, -0.01, 1.5, /**/ -7.0, 6.9, 0.1, 3.5, //
            1e-3, -2e-3, 5e-4, 0.0, /**/ 100.0, -50.0, 25.0, -12.5,
        ];
        let x = Tensor::<3>::from_data(TensorData::new(values.clone(), [3, 2, 4]), &device);
        let int8 = KvStorage::Coded(KvCodes::Int8);
        let pages = KvPages::zeroed(int8, [5, 2, 4], &device);
        assert_eq!((pages.dims(), pages.storage()), ([5, 2, 4], int8));
        let slots = Tensor::<1, Int>::from_data(TensorData::new(vec![4i64, 0, 2], [3]), &device);
        let pages = pages.write(slots.clone(), x);
        let back = floats(pages.select(slots, DType::F32));
        for (head, (want, got)) in values.chunks(4).zip(back.chunks(4)).enumerate() {
            let step = want.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (w, g) in want.iter().zip(got) {
                assert!((w - g).abs() <= step * 0.5 * (1.0 + 1e-5), "head {head}: {w} read back as {g} (step {step})");
            }
            // The head's largest magnitude is exact (its code is ±127).
            let top = want.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            assert!(got.iter().any(|g| (g - top).abs() <= top.abs() * 1e-6), "head {head}: {top} in {got:?}");
        }
        // Slots not written stay zero; a head of zeros reads back as zeros.
        let all = floats(pages.values(DType::F32));
        assert!(all[8..16].iter().chain(&all[24..32]).all(|&v| v == 0.0));
        assert!(back[4..8].iter().all(|&v| v == 0.0));
        // Codes round half to even and stay within ±127.
        let (codes, scales) = quantize_heads(Tensor::<3>::from_data(TensorData::new(vec![127.0f32, 0.5, 1.5, -2.5], [1, 1, 4]), &device));
        assert_eq!(codes.into_data().convert::<i64>().try_to_vec::<i64>().expect("i64"), vec![127, 0, 2, -2]);
        assert_eq!(floats(scales), vec![1.0]);
    }

    #[test]
    fn the_host_loop_quantizes_as_the_operations_do() {
        let device = Device::flex();
        let x: Tensor<3> = Tensor::random([37, 3, 64], burn::tensor::Distribution::Normal(0.0, 2.0), &device);
        // Heads of zeros, and ties at half a step.
        let ties = Tensor::<3>::from_data(TensorData::new(vec![127.0f32, 0.5, 1.5, -2.5, 0.0, 0.0, 0.0, 0.0], [2, 1, 4]), &device);
        for x in [x, ties] {
            let (q, s) = quantize_heads(x.clone());
            let (hq, hs) = quantize_heads_on_host(KvCodes::Int8, x);
            let ints = |t: Tensor<3, Int>| t.into_data().convert::<i64>().try_into_vec::<i64>().expect("ints");
            assert_eq!(ints(hq), ints(q));
            assert_eq!(floats(hs), floats(s));
        }
    }

    #[test]
    fn a_head_of_int8_takes_its_values_and_one_scale() {
        let (int8, fp8) = (KvStorage::Coded(KvCodes::Int8), KvStorage::Coded(KvCodes::Fp8));
        assert_eq!((int8.head_bytes(128), fp8.head_bytes(128)), (132, 132));
        assert_eq!(KvStorage::Dense(DType::BF16).head_bytes(128), 256);
        assert_eq!(KvStorage::Dense(DType::F32).head_bytes(64), 256);
        assert_eq!((int8.name(), fp8.name(), KvStorage::Dense(DType::BF16).name()), ("int8".to_string(), "fp8".to_string(), "bf16".to_string()));
    }

    #[test]
    fn e4m3_codes_are_the_ocp_values_and_each_value_takes_the_nearest() {
        // Known codes: 1, the largest (448), the smallest normal and subnormal, a negative.
        for (b, v) in [(0x38u8, 1.0f32), (0x7E, 448.0), (0x08, 2f32.powi(-6)), (0x01, 2f32.powi(-9)), (0xC0, -2.0), (0x00, 0.0)] {
            assert_eq!(e4m3_to_f32(b), v, "code {b:#04x}");
            assert_eq!(e4m3_from_f32(v), b, "value {v}");
        }
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        // Every finite code reads back as itself (but -0, which is 0).
        assert_eq!(e4m3_from_f32(e4m3_to_f32(0x80)), 0x00);
        for b in (0..=255u8).filter(|b| b & 0x7F != 0x7F && *b != 0x80) {
            assert_eq!(e4m3_from_f32(e4m3_to_f32(b)), b, "code {b:#04x}");
        }
        // Ties go to the even mantissa; beyond 448 (and infinities) clamp; NaN reads as 0.
        assert_eq!(e4m3_from_f32(1.0625), 0x38);
        assert_eq!(e4m3_from_f32(1.1875), 0x3A);
        assert_eq!(e4m3_from_f32(2f32.powi(-10)), 0x00);
        assert_eq!(e4m3_from_f32(3.0 * 2f32.powi(-10)), 0x02);
        assert_eq!((e4m3_from_f32(1e6), e4m3_from_f32(f32::NEG_INFINITY), e4m3_from_f32(f32::NAN)), (0x7E, 0xFE, 0x00));
        // Any value within ±448 takes a nearest finite code.
        let finite: Vec<f32> = (0..=255u8).map(e4m3_to_f32).filter(|v| v.is_finite()).collect();
        let mut x = 0.37f32;
        for i in 0..20_000 {
            x = (x * 1.618_034 + 0.1).fract();
            let v = (x * 2.0 - 1.0) * 448.0 * if i % 3 == 0 { 1e-3 } else { 1.0 };
            let got = e4m3_to_f32(e4m3_from_f32(v));
            let best = finite.iter().map(|c| (c - v).abs()).fold(f32::INFINITY, f32::min);
            assert!((got - v).abs() <= best, "{v} took {got}, {best} away is nearer");
        }
    }

    #[test]
    fn the_device_table_and_the_host_loop_decode_every_fp8_byte_alike() {
        let device = Device::flex();
        let bytes: Vec<i8> = (0..=255u8).filter(|b| b & 0x7F != 0x7F).map(|b| b as i8).collect();
        let n = bytes.len();
        let codes = Tensor::<3, Int>::from_data(TensorData::new(bytes, [n, 1, 1]), (&device, DType::I8));
        let (by_table, on_host) = (floats(fp8_by_table(codes.clone())), floats(decode_codes(KvCodes::Fp8, codes)));
        assert_eq!(by_table.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), on_host.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert!(on_host.contains(&448.0) && on_host.contains(&-448.0) && on_host.contains(&2f32.powi(-9)));
    }

    #[test]
    fn fp8_pages_hold_each_value_within_half_a_relative_step() {
        let device = Device::flex();
        let x: Tensor<3> = Tensor::random([9, 2, 64], burn::tensor::Distribution::Normal(0.0, 3.0), &device);
        let values = floats(x.clone());
        let fp8 = KvStorage::Coded(KvCodes::Fp8);
        let pages = KvPages::zeroed(fp8, [12, 2, 64], &device);
        let slots = Tensor::<1, Int>::from_data(TensorData::new((0..9i64).map(|i| (i * 5) % 12).collect::<Vec<_>>(), [9]), &device);
        let pages = pages.write(slots.clone(), x);
        assert_eq!(pages.storage(), fp8);
        let back = floats(pages.select(slots, DType::F32));
        for (head, (want, got)) in values.chunks(64).zip(back.chunks(64)).enumerate() {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) / 448.0;
            for (w, g) in want.iter().zip(got) {
                // Half of E4M3's relative step (2^-3) above the subnormals, half a subnormal
                // step (2^-9 of the scale) below them; the largest magnitude is exact.
                let bound = (w.abs() / 16.0).max(scale * 2f32.powi(-10)) * (1.0 + 1e-5);
                assert!((w - g).abs() <= bound, "head {head}: {w} read back as {g} (scale {scale})");
            }
            let top = want.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            assert!(got.iter().any(|g| (g - top).abs() <= top.abs() * 1e-6), "head {head}: {top} in {got:?}");
        }
    }
}
