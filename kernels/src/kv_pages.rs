//! One layer's keys or values in the paged KV cache ([`KvPages`]): in the attention's dtype,
//! or as 8-bit integers with one scale per token and key head.
//!
//! The int8 form is symmetric per (slot, key head): `scale = max|x| / 127`, `code =
//! round(x / scale)` (half to even) in ±127, `x ≈ scale · code` (the per-token, per-head
//! granularity of LMDeploy's online int8 KV cache, `lmdeploy/turbomind`'s `kv_cache_int8`,
//! and of KIVI's keys-per-token variant: Liu et al. 2024, arXiv:2402.02750, without the
//! zero point). Values are quantized when written ([`KvPages::write`]) and dequantized
//! where attention reads them: the CUDA kernels scale each key's score and each value's
//! weight by its slot's scale, the CPU decode loop converts a row at a time, and the
//! gathered reference dequantizes the rows it gathers ([`KvPages::select`]). A head of
//! `d` values then takes `d + 4` bytes instead of `2d` in bf16 (`4d` in f32).

use burn::tensor::{DType, Device, FloatDType, Int, IntDType, Tensor, TensorData};
use crate::kv_write::{fused_write_kv_int8, write_kv_slots, write_kv_slots_int, zeroed_kv_buffer, zeroed_kv_int_buffer};
use crate::launch::is_cubecl;

/// How a KV cache stores keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvStorage {
    /// As attention computes them, in this dtype.
    Dense(DType),
    /// Symmetric int8 codes and an f32 scale per (slot, key head).
    Int8,
}

impl KvStorage {
    /// Bytes one slot's head of `head_dim` values takes.
    pub fn head_bytes(self, head_dim: usize) -> u64 {
        match self {
            Self::Dense(dtype) => (head_dim * dtype.size()) as u64,
            Self::Int8 => head_dim as u64 + 4,
        }
    }

    /// `bf16`, `f32`, `int8`, …
    pub fn name(self) -> String {
        match self {
            Self::Dense(dtype) => format!("{dtype:?}").to_lowercase(),
            Self::Int8 => "int8".into(),
        }
    }
}

/// One layer's keys (or values), `[slots, kv_heads, head_dim]`. (Two per layer live for the
/// model's life, moved once a step: the int8 variant's second handle is not worth a box.)
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum KvPages {
    /// In the attention's dtype.
    Dense(Tensor<3>),
    /// `codes [slots, kv_heads, head_dim]` (i8) and `scales [slots, kv_heads, 1]` (f32): a
    /// value is `scale · code`.
    Int8 { codes: Tensor<3, Int>, scales: Tensor<3> },
}

impl KvPages {
    /// Zeroed pages of `shape` (on the CPU in anonymous memory, resident once written:
    /// [`zeroed_kv_buffer`]).
    pub fn zeroed(storage: KvStorage, shape: [usize; 3], device: &Device) -> Self {
        match storage {
            KvStorage::Dense(dtype) => Self::Dense(zeroed_kv_buffer(shape, dtype, device)),
            KvStorage::Int8 => Self::Int8 {
                codes: zeroed_kv_int_buffer(shape, DType::I8, device),
                scales: zeroed_kv_buffer([shape[0], shape[1], 1], DType::F32, device),
            },
        }
    }

    /// `[slots, kv_heads, head_dim]`.
    pub fn dims(&self) -> [usize; 3] {
        match self {
            Self::Dense(t) => t.dims(),
            Self::Int8 { codes, .. } => codes.dims(),
        }
    }

    pub fn storage(&self) -> KvStorage {
        match self {
            Self::Dense(t) => KvStorage::Dense(t.dtype()),
            Self::Int8 { .. } => KvStorage::Int8,
        }
    }

    /// Whether every tensor is uniquely owned, so writes land in place.
    pub fn can_mut(&self) -> bool {
        match self {
            Self::Dense(t) => t.can_mut(),
            Self::Int8 { codes, scales } => codes.can_mut() && scales.can_mut(),
        }
    }

    /// The pages with row `slots[i]` holding `values[i]` (`values [tokens, kv_heads,
    /// head_dim]`, quantized first for int8 pages: [`quantize_heads`]).
    pub fn write(self, slots: Tensor<1, Int>, values: Tensor<3>) -> Self {
        match self {
            Self::Dense(pool) => Self::Dense(write_kv_slots(pool, slots, values)),
            // On CubeCL devices one kernel quantizes and writes (burn's operations were about
            // nine launches a layer there, ~1 ms of a 4.4 ms Qwen3-4B decode step on an H100);
            // on the CPU one loop quantizes on the host.
            Self::Int8 { codes, scales } if is_cubecl(&codes.device()) => {
                let (codes, scales) = fused_write_kv_int8(codes, scales, slots, values);
                Self::Int8 { codes, scales }
            }
            Self::Int8 { codes, scales } => {
                let (q, s) = quantize_heads_on_host(values.clone()).unwrap_or_else(|| quantize_heads(values));
                Self::Int8 { codes: write_kv_slots_int(codes, slots.clone(), q), scales: write_kv_slots(scales, slots, s) }
            }
        }
    }

    /// Rows `slots` as `[slots.len(), kv_heads, head_dim]` values in `dtype` (int8 pages
    /// dequantized in f32, then rounded to `dtype`).
    pub fn select(&self, slots: Tensor<1, Int>, dtype: DType) -> Tensor<3> {
        match self {
            Self::Dense(t) => t.clone().select(0, slots).cast(dtype),
            Self::Int8 { codes, scales } => {
                let codes: Tensor<3> = codes.clone().select(0, slots.clone()).cast(FloatDType::F32);
                codes.mul(scales.clone().select(0, slots)).cast(dtype)
            }
        }
    }

    /// Every row's values in `dtype` (for tests and checks).
    pub fn values(&self, dtype: DType) -> Tensor<3> {
        match self {
            Self::Dense(t) => t.clone().cast(dtype),
            Self::Int8 { codes, scales } => codes.clone().cast(FloatDType::F32).mul(scales.clone()).cast(dtype),
        }
    }
}

/// `values [tokens, kv_heads, head_dim]` as int8 codes `[tokens, kv_heads, head_dim]` and
/// f32 scales `[tokens, kv_heads, 1]`: per (token, head) `scale = max|x| / 127` and `code =
/// round(x · 127 / max|x|)` (half to even; 0 for a head of zeros), in f32.
pub fn quantize_heads(values: Tensor<3>) -> (Tensor<3, Int>, Tensor<3>) {
    let x = values.cast(DType::F32);
    let amax = x.clone().abs().max_dim(2);
    let inv = amax.clone().clamp_min(f32::MIN_POSITIVE).recip().mul_scalar(127.0);
    let codes = x.mul(inv).round().clamp(-127.0, 127.0).cast(IntDType::I8);
    (codes, amax.div_scalar(127.0))
}

/// [`quantize_heads`] in a loop over the values on the host (the same arithmetic, the same
/// codes and scales), for CPU tensors: one read of the step's values and two tensors made,
/// where the operations were nine (5 % of a SmolLM2 decode step on 2 cores). `None` for
/// tensors on other devices.
fn quantize_heads_on_host(values: Tensor<3>) -> Option<(Tensor<3, Int>, Tensor<3>)> {
    let device = values.device();
    if is_cubecl(&device) {
        return None;
    }
    let [t, h, d] = values.dims();
    let x = values.into_data().convert::<f32>().try_into_vec::<f32>().ok()?;
    let mut codes = vec![0i8; x.len()];
    let mut scales = Vec::with_capacity(t * h);
    for (xs, qs) in x.chunks_exact(d.max(1)).zip(codes.chunks_exact_mut(d.max(1))) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = 127.0 / amax.max(f32::MIN_POSITIVE);
        for (q, &v) in qs.iter_mut().zip(xs) {
            *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
        scales.push(amax / 127.0);
    }
    let codes = Tensor::<3, Int>::from_data(TensorData::new(codes, [t, h, d]), (&device, DType::I8));
    let scales = Tensor::<3>::from_data(TensorData::new(scales, [t, h, 1]), (&device, DType::F32));
    Some((codes, scales))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32")
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
        let pages = KvPages::zeroed(KvStorage::Int8, [5, 2, 4], &device);
        assert_eq!((pages.dims(), pages.storage()), ([5, 2, 4], KvStorage::Int8));
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
            let (hq, hs) = quantize_heads_on_host(x).expect("a CPU tensor");
            let ints = |t: Tensor<3, Int>| t.into_data().convert::<i64>().try_into_vec::<i64>().expect("ints");
            assert_eq!(ints(hq), ints(q));
            assert_eq!(floats(hs), floats(s));
        }
    }

    #[test]
    fn a_head_of_int8_takes_its_values_and_one_scale() {
        assert_eq!(KvStorage::Int8.head_bytes(128), 132);
        assert_eq!(KvStorage::Dense(DType::BF16).head_bytes(128), 256);
        assert_eq!(KvStorage::Dense(DType::F32).head_bytes(64), 256);
        assert_eq!((KvStorage::Int8.name(), KvStorage::Dense(DType::BF16).name()), ("int8".to_string(), "bf16".to_string()));
    }
}
