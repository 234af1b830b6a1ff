//! GPTQ and AWQ packed linear weights in safetensors checkpoints, as AutoGPTQ / GPTQModel and
//! AutoAWQ write them and transformers reads them (`quantization_config` in `config.json`;
//! transformers `integrations/awq.py`, optimum's GPTQ `QuantLinear` and AutoAWQ's
//! `WQLinear_GEMM.from_linear` for the packing):
//!
//! - GPTQ: `qweight` `[in · bits / 32, out]` (I32), input channel `i` of output `o` in bits
//!   `(i mod 32/bits) · bits` of `qweight[i / (32/bits), o]`; `qzeros` `[groups, out · bits /
//!   32]` (I32) packed the same way along outputs; `scales` `[groups, out]`; `g_idx` `[in]`
//!   (I32, optional) the group of each input channel. `w[o, i] = scale[g, o] · (q − z[g, o])`
//!   with `g = g_idx[i]`, and `z` the stored zero plus one in the original `gptq` format
//!   (`checkpoint_format = "gptq"`; none in `gptq_v2`).
//! - AWQ (`version = "gemm"`): `qweight` `[in, out / 8]` (I32) with the 8 outputs of a word in
//!   the order `0, 2, 4, 6, 1, 3, 5, 7` (output `8j + k` in nibble `[0, 4, 1, 5, 2, 6, 3, 7][k]`);
//!   `qzeros` `[groups, out / 8]` the same way; `scales` `[groups, out]`; groups of consecutive
//!   inputs. `w[o, i] = scale[i / group, o] · (q − z)`.
//!
//! - FP8 (`quant_method = "fp8"`, `fmt = "e4m3"`, Qwen's and DeepSeek's checkpoints): `weight`
//!   `[out, in]` in F8_E4M3 and `weight_scale_inv` `[⌈out / bo⌉, ⌈in / bi⌉]` for blocks of
//!   `weight_block_size = [bo, bi]`, which *multiplies*: `w = fp8 · scale_inv[o / bo, i / bi]`
//!   (transformers `integrations/finegrained_fp8.py`).
//!
//! GPTQ and AWQ reduce to [`AffineGroups`] over `[out, in]` rows (`scale · code − scale ·
//! zero`) when each group is a run of consecutive inputs; GPTQ's act-order (`desc_act`) puts
//! an input's group anywhere, and is given back as dense values, as FP8 blocks are.

use crate::FormatError;
use crate::gguf::AffineGroups;
use serde_json::Value;

/// Which packing a checkpoint's `quantization_config` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GPTQ; `zero_offset` is 1 for the original format (stored zeros are one less).
    Gptq { zero_offset: u32 },
    /// AWQ's GEMM layout.
    Awq,
    /// FP8 E4M3 weights with a scale per block of `[rows, columns]`.
    Fp8 { block: [usize; 2] },
}

/// A checkpoint's packed-weight layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub method: Method,
    /// 4 or 8 (AWQ: 4).
    pub bits: u32,
    /// Inputs per group; `None`: one group per output channel (`group_size = -1`).
    pub group: Option<usize>,
}

/// A packed weight unpacked: affine groups along `[out, in]` rows, or (act-order) dense values.
#[derive(Clone, Debug, PartialEq)]
pub enum Unpacked {
    Groups(AffineGroups),
    Dense(Vec<f32>),
}

impl Unpacked {
    /// Row-major `[out, in]` values.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Unpacked::Groups(a) => a.values(),
            Unpacked::Dense(v) => v.clone(),
        }
    }
}

/// The layout `config.json`'s `quantization_config` declares: `None` when there is none, an
/// error naming the field for a method or setting not read here.
pub fn layout(config: &Value) -> Result<Option<Layout>, FormatError> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    let bits = q.get("bits").or_else(|| q.get("w_bit")).and_then(Value::as_u64).unwrap_or(4);
    let group = q.get("group_size").or_else(|| q.get("q_group_size")).and_then(Value::as_i64).unwrap_or(128);
    let group = match group {
        -1 => None,
        g if g > 0 => Some(g as usize),
        g => return Err(FormatError(format!("quantization_config.group_size {g} is not a group size"))),
    };
    let method = match method {
        "gptq" => {
            let format = q.get("checkpoint_format").and_then(Value::as_str).unwrap_or("gptq");
            let zero_offset = match format {
                "gptq" => 1,
                "gptq_v2" => 0,
                other => return Err(FormatError(format!("quantization_config.checkpoint_format `{other}` is not supported (gptq, gptq_v2)"))),
            };
            if !matches!(bits, 4 | 8) {
                return Err(FormatError(format!("GPTQ with {bits}-bit weights is not supported (4 or 8)")));
            }
            Method::Gptq { zero_offset }
        }
        "fp8" => {
            let fmt = q.get("fmt").and_then(Value::as_str).unwrap_or("e4m3");
            if fmt != "e4m3" {
                return Err(FormatError(format!("FP8 format `{fmt}` is not supported (e4m3)")));
            }
            let block = match q.get("weight_block_size") {
                Some(Value::Array(b)) => match b.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>().as_deref() {
                    Some(&[r, c]) if r > 0 && c > 0 => [r as usize, c as usize],
                    _ => return Err(FormatError(format!("quantization_config.weight_block_size {b:?} is not two positive sizes"))),
                },
                _ => return Err(FormatError("FP8 without `weight_block_size` (per-tensor scales) is not supported".into())),
            };
            return Ok(Some(Layout { method: Method::Fp8 { block }, bits: 8, group: None }));
        }
        "awq" => {
            let version = q.get("version").and_then(Value::as_str).unwrap_or("gemm");
            if !version.eq_ignore_ascii_case("gemm") {
                return Err(FormatError(format!("AWQ version `{version}` is not supported (gemm)")));
            }
            if q.get("zero_point").and_then(Value::as_bool) == Some(false) {
                return Err(FormatError("AWQ without zero points is not supported".into()));
            }
            if bits != 4 {
                return Err(FormatError(format!("AWQ with {bits}-bit weights is not supported (4)")));
            }
            Method::Awq
        }
        other => {
            return Err(FormatError(format!(
                "quantization_config.quant_method `{other}` is not supported (gptq, awq, fp8; or a GGUF file, or `quantization` at load)"
            )));
        }
    };
    Ok(Some(Layout { method, bits: bits as u32, group }))
}

/// An E4M3 byte's value (OCP FP8: bias 7, subnormals, no infinities, `S.1111.111` is NaN).
pub fn e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (i32::from((b >> 3) & 15), f32::from(b & 7));
    if e == 15 && m == 7.0 {
        return f32::NAN;
    }
    sign * if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) }
}

/// One packed linear weight's tensors, as stored: little-endian I32 words, and scales as f32.
pub struct Packed<'a> {
    pub qweight: &'a [u8],
    pub qweight_shape: &'a [usize],
    pub qzeros: &'a [u8],
    pub qzeros_shape: &'a [usize],
    pub scales: Vec<f32>,
    pub scales_shape: &'a [usize],
    pub g_idx: Option<&'a [u8]>,
}

fn words(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Reads one 4- or 8-bit field of a packed tensor: `(row or group, column) -> value`.
type Field<'a> = Box<dyn Fn(usize, usize) -> u32 + 'a>;

/// AWQ's nibble of output `k` (0..8) within a word.
const AWQ_NIBBLE: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

impl Layout {
    /// The shapes of `qweight`, `qzeros` and `scales` for an `[out, in]` weight.
    pub fn shapes(&self, [out, inp]: [usize; 2]) -> Result<[[usize; 2]; 3], FormatError> {
        let per = 32 / self.bits as usize;
        let group = self.group.unwrap_or(inp);
        if group == 0 || !inp.is_multiple_of(group) || !out.is_multiple_of(per) {
            return Err(FormatError(format!("a [{out}, {inp}] weight does not pack in {}-bit words with groups of {group}", self.bits)));
        }
        let groups = inp / group;
        Ok(match self.method {
            Method::Gptq { .. } if inp.is_multiple_of(per) => [[inp / per, out], [groups, out / per], [groups, out]],
            Method::Gptq { .. } => return Err(FormatError(format!("{inp} inputs do not pack in {}-bit words", self.bits))),
            Method::Awq => [[inp, out / per], [groups, out / per], [groups, out]],
            Method::Fp8 { .. } => return Err(FormatError("FP8 weights are not packed in words".into())),
        })
    }

    /// `[⌈out / bo⌉, ⌈in / bi⌉]`: the shape of an FP8 weight's `weight_scale_inv`.
    pub fn fp8_scale_shape(&self, [out, inp]: [usize; 2]) -> Option<[usize; 2]> {
        match self.method {
            Method::Fp8 { block: [bo, bi] } => Some([out.div_ceil(bo), inp.div_ceil(bi)]),
            _ => None,
        }
    }

    /// An FP8 weight `[out, in]` (one E4M3 byte per value) times its block scales.
    pub fn dequantize_fp8(&self, weight: &[u8], scale_inv: &[f32], [out, inp]: [usize; 2]) -> Result<Vec<f32>, FormatError> {
        let (Method::Fp8 { block: [bo, bi] }, Some([so, si])) = (self.method, self.fp8_scale_shape([out, inp])) else {
            return Err(FormatError("not an FP8 layout".into()));
        };
        if weight.len() != out * inp || scale_inv.len() != so * si {
            return Err(FormatError(format!(
                "an FP8 [{out}, {inp}] weight needs {} bytes and {} scales, got {} and {}",
                out * inp,
                so * si,
                weight.len(),
                scale_inv.len()
            )));
        }
        Ok(weight
            .chunks_exact(inp.max(1))
            .enumerate()
            .flat_map(|(o, row)| row.iter().enumerate().map(move |(i, &b)| e4m3(b) * scale_inv[(o / bo) * si + i / bi]))
            .collect())
    }

    /// Unpacks one `[out, in]` weight, its shapes checked against [`Self::shapes`].
    pub fn unpack(&self, p: &Packed<'_>, [out, inp]: [usize; 2]) -> Result<Unpacked, FormatError> {
        let [qw, qz, sc] = self.shapes([out, inp])?;
        let (Method::Gptq { .. } | Method::Awq) = self.method else {
            return Err(FormatError("FP8 weights are not packed in words".into()));
        };
        for (what, got, want) in [("qweight", p.qweight_shape, qw), ("qzeros", p.qzeros_shape, qz), ("scales", p.scales_shape, sc)] {
            if got != want {
                return Err(FormatError(format!("`{what}` has shape {got:?}, expected {want:?} for a [{out}, {inp}] weight")));
            }
        }
        if p.qweight.len() != qw[0] * qw[1] * 4 || p.qzeros.len() != qz[0] * qz[1] * 4 || p.scales.len() != sc[0] * sc[1] {
            return Err(FormatError("packed tensors' byte counts disagree with their shapes".into()));
        }
        let bits = self.bits as usize;
        let per = 32 / bits;
        let mask = (1u32 << bits) - 1;
        let group = self.group.unwrap_or(inp);
        let groups = inp / group;
        let qweight: Vec<u32> = words(p.qweight).collect();
        let qzeros: Vec<u32> = words(p.qzeros).collect();
        // Code of output `o`, input `i`; zero of group `g`, output `o`.
        let (code, zero): (Field<'_>, Field<'_>) = match self.method {
            Method::Gptq { zero_offset } => (
                Box::new(move |o, i| (qweight[(i / per) * out + o] >> ((i % per) * bits)) & mask),
                Box::new(move |g, o| ((qzeros[g * (out / per) + o / per] >> ((o % per) * bits)) & mask) + zero_offset),
            ),
            _ => (
                Box::new(move |o, i| (qweight[i * (out / per) + o / per] >> (4 * AWQ_NIBBLE[o % per])) & mask),
                Box::new(move |g, o| (qzeros[g * (out / per) + o / per] >> (4 * AWQ_NIBBLE[o % per])) & mask),
            ),
        };
        let g_idx: Option<Vec<usize>> = match (self.method, p.g_idx) {
            (Method::Gptq { .. }, Some(bytes)) => {
                if bytes.len() != inp * 4 {
                    return Err(FormatError(format!("`g_idx` holds {} bytes, expected {} (I32 per input)", bytes.len(), inp * 4)));
                }
                let idx: Vec<usize> = words(bytes).map(|g| g as usize).collect();
                if let Some(bad) = idx.iter().find(|&&g| g >= groups) {
                    return Err(FormatError(format!("`g_idx` names group {bad} of {groups}")));
                }
                // Consecutive groups need no index.
                (idx.iter().enumerate().any(|(i, &g)| g != i / group)).then_some(idx)
            }
            _ => None,
        };
        let scale = |g: usize, o: usize| p.scales[g * out + o];
        if let Some(idx) = g_idx {
            let mut values = vec![0f32; out * inp];
            for (o, row) in values.chunks_exact_mut(inp).enumerate() {
                for (i, v) in row.iter_mut().enumerate() {
                    let g = idx[i];
                    *v = scale(g, o) * (code(o, i) as f32 - zero(g, o) as f32);
                }
            }
            return Ok(Unpacked::Dense(values));
        }
        let mut codes = vec![0u8; out * inp];
        let (mut scales, mut mins) = (Vec::with_capacity(out * groups), Vec::with_capacity(out * groups));
        for (o, row) in codes.chunks_exact_mut(inp).enumerate() {
            for (i, c) in row.iter_mut().enumerate() {
                *c = code(o, i) as u8;
            }
            for g in 0..groups {
                let s = scale(g, o);
                scales.push(s);
                mins.push(-s * zero(g, o) as f32);
            }
        }
        Ok(Unpacked::Groups(AffineGroups { bits: self.bits, group, codes, scales, mins }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pack_words(values: &[u32], bits: u32) -> Vec<u8> {
        let per = 32 / bits as usize;
        values
            .chunks(per)
            .map(|c| c.iter().enumerate().fold(0u32, |w, (k, &v)| w | (v << (k as u32 * bits))))
            .flat_map(u32::to_le_bytes)
            .collect()
    }

    #[test]
    fn configs_name_their_layout_or_are_refused() {
        let gptq = json!({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false}});
        assert_eq!(layout(&gptq).expect("gptq"), Some(Layout { method: Method::Gptq { zero_offset: 1 }, bits: 4, group: Some(128) }));
        let v2 = json!({"quantization_config": {"quant_method": "gptq", "bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2"}});
        assert_eq!(layout(&v2).expect("v2"), Some(Layout { method: Method::Gptq { zero_offset: 0 }, bits: 8, group: None }));
        let awq = json!({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true, "version": "gemm"}});
        assert_eq!(layout(&awq).expect("awq").map(|l| l.method), Some(Method::Awq));
        assert_eq!(layout(&json!({})).expect("none"), None);
        for (bad, says) in [
            (json!({"quantization_config": {"quant_method": "bitsandbytes"}}), "bitsandbytes"),
            (json!({"quantization_config": {"quant_method": "fp8"}}), "weight_block_size"),
            (json!({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}}), "e5m2"),
            (json!({"quantization_config": {"quant_method": "gptq", "bits": 3}}), "3-bit"),
            (json!({"quantization_config": {"quant_method": "awq", "version": "gemv"}}), "gemv"),
            (json!({"quantization_config": {"quant_method": "gptq", "group_size": 0}}), "group_size"),
        ] {
            let e = layout(&bad).expect_err(says);
            assert!(e.0.contains(says), "{e}");
        }
    }

    /// `w[o, i] = s · (q − z)` for every input of every output, read back from both packings.
    #[test]
    fn gptq_and_awq_words_unpack_to_their_codes_zeros_and_scales() {
        let (out, inp, group) = (8usize, 16usize, 8usize);
        let q = |o: usize, i: usize| ((o * 5 + i * 3) % 16) as u32;
        let z = |g: usize, o: usize| ((g + 2 * o) % 16) as u32;
        let s = |g: usize, o: usize| 0.5 + (g * out + o) as f32 / 64.0;
        let want: Vec<f32> = (0..out).flat_map(|o| (0..inp).map(move |i| s(i / group, o) * (q(o, i) as f32 - z(i / group, o) as f32))).collect();
        let scales: Vec<f32> = (0..inp / group).flat_map(|g| (0..out).map(move |o| s(g, o))).collect();
        // GPTQ: inputs packed down `qweight`'s rows; zeros stored one less.
        let qweight: Vec<u32> = (0..inp / 8).flat_map(|r| (0..out).map(move |o| (0..8).fold(0u32, |w, k| w | (q(o, 8 * r + k) << (4 * k))))).collect();
        let qzeros: Vec<u32> = (0..inp / group).flat_map(|g| (0..out / 8).map(move |c| (0..8).fold(0u32, |w, k| w | (((z(g, 8 * c + k) + 15) % 16) << (4 * k))))).collect();
        let gptq = Layout { method: Method::Gptq { zero_offset: 1 }, bits: 4, group: Some(group) };
        let bytes = |v: &[u32]| v.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
        let (qw, qz) = (bytes(&qweight), bytes(&qzeros));
        let packed = Packed { qweight: &qw, qweight_shape: &[inp / 8, out], qzeros: &qz, qzeros_shape: &[inp / group, out / 8], scales: scales.clone(), scales_shape: &[inp / group, out], g_idx: None };
        // Zero 0 is stored as 15 (one less, wrapped): unpacks to 16, as GPTQ's kernels compute it.
        let got = gptq.unpack(&packed, [out, inp]).expect("gptq");
        let zero_zero: Vec<usize> = (0..out * inp).filter(|&k| z((k % inp) / group, k / inp) == 0).collect();
        for (k, (g, w)) in got.values().iter().zip(&want).enumerate() {
            let (o, i) = (k / inp, k % inp);
            let expect = if zero_zero.contains(&k) { s(i / group, o) * (q(o, i) as f32 - 16.0) } else { *w };
            assert!((g - expect).abs() < 1e-6, "gptq [{o}, {i}]: {g} vs {expect}");
        }
        // AWQ: outputs packed along `qweight`'s rows in the order 0, 2, 4, 6, 1, 3, 5, 7.
        let order = [0usize, 2, 4, 6, 1, 3, 5, 7];
        let qweight: Vec<u32> = (0..inp).flat_map(|i| (0..out / 8).map(move |c| (0..8).fold(0u32, |w, p| w | (q(8 * c + order[p], i) << (4 * p))))).collect();
        let qzeros: Vec<u32> = (0..inp / group).flat_map(|g| (0..out / 8).map(move |c| (0..8).fold(0u32, |w, p| w | (z(g, 8 * c + order[p]) << (4 * p))))).collect();
        let (qw, qz) = (bytes(&qweight), bytes(&qzeros));
        let awq = Layout { method: Method::Awq, bits: 4, group: Some(group) };
        let packed = Packed { qweight: &qw, qweight_shape: &[inp, out / 8], qzeros: &qz, qzeros_shape: &[inp / group, out / 8], scales, scales_shape: &[inp / group, out], g_idx: None };
        let got = awq.unpack(&packed, [out, inp]).expect("awq");
        assert!(matches!(got, Unpacked::Groups(_)));
        for (k, (g, w)) in got.values().iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-6, "awq [{}, {}]: {g} vs {w}", k / inp, k % inp);
        }
        let e = awq.unpack(&Packed { qweight_shape: &[inp, out], ..packed }, [out, inp]).expect_err("shape");
        assert!(e.0.contains("qweight"), "{e}");
    }

    #[test]
    fn fp8_bytes_and_block_scales_dequantize() {
        // E4M3: 0x38 = 1.0, 0x40 = 2.0, 0xC0 = -2.0, 0x7E = 448 (the largest), 0x01 = 2^-9
        // (the smallest subnormal), 0x7F NaN.
        for (b, v) in [(0x38u8, 1.0f32), (0x40, 2.0), (0xC0, -2.0), (0x7E, 448.0), (0x01, 2f32.powi(-9)), (0x00, 0.0), (0x3C, 1.5)] {
            assert_eq!(e4m3(b), v, "{b:#04x}");
        }
        assert!(e4m3(0x7F).is_nan() && e4m3(0xFF).is_nan());
        let l = layout(&json!({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [2, 2]}})).expect("fp8").expect("some");
        // A [3, 3] weight in 2x2 blocks: scales [2, 2], the last row and column partial.
        assert_eq!(l.fp8_scale_shape([3, 3]), Some([2, 2]));
        let w = l.dequantize_fp8(&[0x38; 9], &[1.0, 2.0, 3.0, 4.0], [3, 3]).expect("dequantize");
        assert_eq!(w, vec![1.0, 1.0, 2.0, 1.0, 1.0, 2.0, 3.0, 3.0, 4.0]);
        assert!(l.dequantize_fp8(&[0x38; 8], &[1.0; 4], [3, 3]).is_err());
    }

    #[test]
    fn act_order_groups_come_back_dense_and_bad_indices_are_refused() {
        let (out, inp) = (8usize, 8usize);
        let l = Layout { method: Method::Gptq { zero_offset: 0 }, bits: 8, group: Some(4) };
        let codes: Vec<u32> = (0..inp * out).map(|k| (k * 7 % 256) as u32).collect();
        // qweight [in / 4, out]: input i of output o at byte i % 4 of row i / 4.
        let qweight: Vec<u32> = (0..inp / 4).flat_map(|r| (0..out).map(move |o| (r, o))).map(|(r, o)| (0..4).fold(0u32, |w, k| w | (codes[o * inp + 4 * r + k] << (8 * k)))).collect();
        let qw: Vec<u8> = qweight.iter().flat_map(|w| w.to_le_bytes()).collect();
        let qz = pack_words(&vec![128; 2 * out], 8);
        let scales: Vec<f32> = (0..2 * out).map(|k| 1.0 + k as f32).collect();
        let g_idx: Vec<u8> = [1u32, 0, 1, 0, 1, 0, 1, 0].iter().flat_map(|g| g.to_le_bytes()).collect();
        let p = Packed { qweight: &qw, qweight_shape: &[inp / 4, out], qzeros: &qz, qzeros_shape: &[2, out / 4], scales, scales_shape: &[2, out], g_idx: Some(&g_idx) };
        let Unpacked::Dense(v) = l.unpack(&p, [out, inp]).expect("act order") else { panic!("act order unpacks dense") };
        for o in 0..out {
            for i in 0..inp {
                let g = 1 - i % 2;
                assert_eq!(v[o * inp + i], (1.0 + (g * out + o) as f32) * (codes[o * inp + i] as f32 - 128.0), "[{o}, {i}]");
            }
        }
        let bad: Vec<u8> = [2u32; 8].iter().flat_map(|g| g.to_le_bytes()).collect();
        let e = l.unpack(&Packed { g_idx: Some(&bad), ..p }, [out, inp]).expect_err("bad g_idx");
        assert!(e.0.contains("group 2"), "{e}");
    }
}
