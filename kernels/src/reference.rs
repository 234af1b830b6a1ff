//! Reference implementations, written to match Hugging Face transformers' numerics:
//! `Qwen3RMSNorm` / `LlamaRMSNorm` (normalise in f32, cast back, scale), `rotate_half` /
//! `apply_rotary_pos_emb` (RoFormer, arXiv:2104.09864, in the HF half-split convention) and
//! the SwiGLU gate (Shazeer 2020, arXiv:2002.05202); for vision towers, `nn.LayerNorm` (Ba et
//! al. 2016, arXiv:1607.06450) and both forms of GELU (Hendrycks & Gimpel 2016,
//! arXiv:1606.08415): torch's exact `nn.GELU()` and `gelu_pytorch_tanh`.

use burn::tensor::{DType, Tensor, activation::silu};

/// RMS normalisation over the last dimension: `weight * (x / sqrt(mean(x²) + eps))`, with the
/// statistics computed in f32 whatever the input dtype, the result cast back to the input
/// dtype before the weight is applied (as transformers does). `weight` broadcasts over the
/// leading axes: `[last]`, or e.g. `[heads, last]` for one weight per head.
pub fn rms_norm<const D: usize, const W: usize>(x: Tensor<D>, weight: &Tensor<W>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let x32 = if dtype == DType::F32 { x } else { x.cast(DType::F32) };
    let variance = x32.clone().powi_scalar(2).mean_dim(D - 1);
    let normed = x32.mul(variance.add_scalar(eps).sqrt().recip());
    let normed = if dtype == DType::F32 { normed } else { normed.cast(dtype) };
    normed.mul(weight.clone().unsqueeze())
}

/// `cat(-x2, x1)` over the last dimension, where `x1, x2` are its two halves.
pub fn rotate_half<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    let half = dims[D - 1] / 2;
    let x1 = x.clone().narrow(D - 1, 0, half);
    let x2 = x.narrow(D - 1, half, half);
    Tensor::cat(vec![x2.neg(), x1], D - 1)
}

/// Rotary position embedding on the first `cos.dims()[3]` channels of `x` `[batch, heads,
/// tokens, head_dim]`; the remaining channels (partial rotary) pass through unchanged.
/// `cos`/`sin` are `[batch, 1, tokens, rotary_dim]`.
pub fn apply_rotary(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let head_dim = x.dims()[3];
    let rotary_dim = cos.dims()[3];
    if rotary_dim == head_dim {
        return x.clone().mul(cos.clone()).add(rotate_half(x).mul(sin.clone()));
    }
    let rot = x.clone().narrow(3, 0, rotary_dim);
    let pass = x.narrow(3, rotary_dim, head_dim - rotary_dim);
    let rot = rot.clone().mul(cos.clone()).add(rotate_half(rot).mul(sin.clone()));
    Tensor::cat(vec![rot, pass], 3)
}

/// `silu(gate) * up`.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    silu(gate).mul(up)
}

/// [`swiglu`] of one projection whose last axis holds the gate, then the up half (`gate_proj`
/// and `up_proj` computed as one): `[.., 2 * inner] -> [.., inner]`.
pub fn swiglu_halves<const D: usize>(gate_up: Tensor<D>) -> Tensor<D> {
    let inner = gate_up.dims()[D - 1] / 2;
    swiglu(gate_up.clone().narrow(D - 1, 0, inner), gate_up.narrow(D - 1, inner, inner))
}

/// `nn.LayerNorm` over the last axis: `(x - mean) / sqrt(var + eps) * weight + bias`, all in
/// f32 (as torch computes it for bf16 inputs too), rounded to the input dtype at the end.
pub fn layer_norm<const D: usize>(x: Tensor<D>, weight: &Tensor<1>, bias: &Tensor<1>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let centered = x.clone().sub(x.mean_dim(D - 1));
    let variance = centered.clone().powi_scalar(2).mean_dim(D - 1);
    let normed = centered.mul(variance.add_scalar(eps).sqrt().recip());
    let y = normed.mul(weight.clone().cast(DType::F32).unsqueeze()).add(bias.clone().cast(DType::F32).unsqueeze());
    y.cast(dtype)
}

/// torch's exact GELU (`nn.GELU()`): `x / 2 * (1 + erf(x / sqrt(2)))`, in f32.
pub fn gelu_erf<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let y = x.clone().mul(x.mul_scalar(std::f64::consts::FRAC_1_SQRT_2).erf().add_scalar(1.0)).mul_scalar(0.5);
    y.cast(dtype)
}

/// GELU's tanh form (`gelu_pytorch_tanh`, `nn.GELU(approximate="tanh")`): `x / 2 * (1 +
/// tanh(sqrt(2 / pi) * (x + 0.044715 x³)))`, in f32.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let inner = x.clone().add(x.clone().powi_scalar(3).mul_scalar(0.044_715)).mul_scalar((2.0 / std::f64::consts::PI).sqrt());
    let y = x.mul(inner.tanh().add_scalar(1.0)).mul_scalar(0.5);
    y.cast(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(values, shape), &Device::flex())
    }

    fn values<const D: usize>(x: Tensor<D>) -> Vec<f32> {
        x.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
    }

    #[test]
    fn layer_norm_and_both_gelus_match_their_formulas() {
        let x = t(vec![1.0, -2.0, 3.0, 0.5, 0.0, 4.0], [2, 3]);
        let (w, b) = (t(vec![1.0, 0.5, 2.0], [3]), t(vec![0.1, -0.2, 0.0], [3]));
        let got = values(layer_norm(x.clone(), &w, &b, 1e-6));
        for (r, row) in [[1.0f64, -2.0, 3.0], [0.5, 0.0, 4.0]].iter().enumerate() {
            let mean = row.iter().sum::<f64>() / 3.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 3.0;
            for c in 0..3 {
                let want = (row[c] - mean) / (var + 1e-6).sqrt() * [1.0, 0.5, 2.0][c] + [0.1, -0.2, 0.0][c];
                assert!((f64::from(got[r * 3 + c]) - want).abs() < 1e-5, "{got:?}");
            }
        }
        // torch.nn.functional.gelu of these values, exact and tanh forms.
        let x = t(vec![-3.0, -1.0, 0.0, 0.5, 2.0], [5]);
        let exact = [-0.004_049_71, -0.158_655_25, 0.0, 0.345_731_14, 1.954_499_7];
        let tanh = [-0.003_637_39, -0.158_808_01, 0.0, 0.345_714_28, 1.954_597_7];
        for (got, want) in [(values(gelu_erf(x.clone())), exact), (values(gelu_tanh(x)), tanh)] {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn rms_norm_matches_the_formula() {
        let x = t(vec![1.0, -2.0, 3.0, 0.5, 0.0, 4.0], [2, 3]);
        let w = t(vec![1.0, 0.5, 2.0], [3]);
        let got = values(rms_norm(x, &w, 1e-6));
        let rows = [[1.0f64, -2.0, 3.0], [0.5, 0.0, 4.0]];
        let mut want = Vec::new();
        for row in rows {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / 3.0;
            let r = 1.0 / (ms + 1e-6).sqrt();
            want.extend(row.iter().zip([1.0, 0.5, 2.0]).map(|(v, w)| (v * r * w) as f32));
        }
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn rotate_half_negates_and_swaps_halves() {
        let x = t(vec![1.0, 2.0, 3.0, 4.0], [1, 4]);
        assert_eq!(values(rotate_half(x)), vec![-3.0, -4.0, 1.0, 2.0]);
    }

    #[test]
    fn rotary_rotates_pairs_and_passes_the_rest() {
        // head_dim 6 with rotary_dim 4: pairs (0,2) and (1,3) rotate by angles a0, a1.
        let x = t(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1, 1, 1, 6]);
        let (a0, a1) = (0.3f32, 1.1f32);
        let cos = t(vec![a0.cos(), a1.cos(), a0.cos(), a1.cos()], [1, 1, 1, 4]);
        let sin = t(vec![a0.sin(), a1.sin(), a0.sin(), a1.sin()], [1, 1, 1, 4]);
        let got = values(apply_rotary(x, &cos, &sin));
        let want = [
            1.0 * a0.cos() - 3.0 * a0.sin(),
            2.0 * a1.cos() - 4.0 * a1.sin(),
            3.0 * a0.cos() + 1.0 * a0.sin(),
            4.0 * a1.cos() + 2.0 * a1.sin(),
            5.0,
            6.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn swiglu_is_silu_gate_times_up() {
        let got = values(swiglu(t(vec![0.0, 1.0, -2.0], [3]), t(vec![5.0, 2.0, 3.0], [3])));
        let silu = |v: f32| v / (1.0 + (-v).exp());
        let want = [0.0, silu(1.0) * 2.0, silu(-2.0) * 3.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        // The same from one [gate | up] row.
        let halves = values(swiglu_halves(t(vec![0.0, 1.0, -2.0, 5.0, 2.0, 3.0], [1, 6])));
        for (g, w) in halves.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{halves:?}");
        }
    }
}
