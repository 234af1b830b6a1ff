//! Rotary position embeddings (RoFormer, arXiv:2104.09864) as transformers computes them
//! (`*RotaryEmbedding` + `_compute_default_rope_parameters` / `_compute_linear_scaling_rope_parameters`
//! / `_compute_llama3_parameters`): inverse frequencies from `theta`, scaled, then
//! `cos`/`sin` of `position * inv_freq` duplicated over both halves (`rotate_half` layout).

use crate::hf_config::{RopeConfig, RopeScaling};
use burn::tensor::{DType, Device, Tensor, TensorData};

/// Inverse frequencies for `rotary_dim` channels, with the config's scaling applied.
pub fn inverse_frequencies(rope: &RopeConfig, rotary_dim: usize) -> Vec<f32> {
    let base: Vec<f64> = (0..rotary_dim / 2)
        .map(|i| 1.0 / rope.theta.powf((2 * i) as f64 / rotary_dim as f64))
        .collect();
    let scaled: Vec<f64> = match &rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let low_wavelen = original_max_position_embeddings / low_freq_factor;
            let high_wavelen = original_max_position_embeddings / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    };
    scaled.into_iter().map(|f| f as f32).collect()
}

/// `cos` and `sin` for the given positions (`[batch][tokens]`), as `[batch, 1, tokens,
/// rotary_dim]` tensors in `dtype`. The angle is computed in f32 like transformers.
pub fn cos_sin(inv_freq: &[f32], positions: &[Vec<usize>], device: &Device, dtype: DType) -> (Tensor<4>, Tensor<4>) {
    let batch = positions.len();
    let tokens = positions.first().map_or(0, Vec::len);
    let rotary_dim = inv_freq.len() * 2;
    let mut cos = Vec::with_capacity(batch * tokens * rotary_dim);
    let mut sin = Vec::with_capacity(batch * tokens * rotary_dim);
    for row in positions {
        for &p in row {
            let angles: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
    }
    let shape = [batch, 1, tokens, rotary_dim];
    let make = |v: Vec<f32>| {
        let t = Tensor::<4>::from_data(TensorData::new(v, shape), (device, DType::F32));
        if dtype == DType::F32 { t } else { t.cast(dtype) }
    };
    (make(cos), make(sin))
}
