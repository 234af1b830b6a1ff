//! Rotary position embeddings (RoFormer, arXiv:2104.09864) as transformers computes them
//! (`*RotaryEmbedding` + `_compute_default_rope_parameters` / `_compute_linear_scaling_rope_parameters`
//! / `_compute_llama3_parameters`): inverse frequencies from `theta`, scaled, then
//! `cos`/`sin` of `position * inv_freq` duplicated over both halves (`rotate_half` layout); and
//! Qwen3-VL's interleaved multimodal RoPE (`Qwen3VLTextRotaryEmbedding`, `get_rope_index`):
//! three position rows (temporal, height, width) shared out over the frequency slots.

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
    let angles = positions.iter().flatten().map(|&p| inv_freq.iter().map(|f| p as f32 * f).collect());
    cos_sin_of_angles(angles, [batch, 1, tokens, inv_freq.len() * 2], device, dtype)
}

/// `cos` and `sin` of each token's angles (`rotary_dim / 2` of them, in f32), each repeated
/// over both halves (the `rotate_half` layout), as `shape` (`[.., tokens, rotary_dim]`)
/// tensors in `dtype`: what every rotary embedding here builds its tables from.
pub fn cos_sin_of_angles(angles: impl Iterator<Item = Vec<f32>>, shape: [usize; 4], device: &Device, dtype: DType) -> (Tensor<4>, Tensor<4>) {
    let len = shape.iter().product();
    let (mut cos, mut sin) = (Vec::with_capacity(len), Vec::with_capacity(len));
    for row in angles {
        // Each angle's sine and cosine once, then the row repeated (the tables' 8,192 positions
        // of the built-in model took 5 ms of its start, computed twice).
        let start = cos.len();
        let (s, c): (Vec<f32>, Vec<f32>) = row.iter().map(|a| a.sin_cos()).unzip();
        cos.extend_from_slice(&c);
        sin.extend_from_slice(&s);
        cos.extend_from_within(start..);
        sin.extend_from_within(start..);
    }
    let make = |v: Vec<f32>| {
        let t = Tensor::<4>::from_data(TensorData::new(v, shape), (device, DType::F32));
        if dtype == DType::F32 { t } else { t.cast(dtype) }
    };
    (make(cos), make(sin))
}

/// Which position row (0: temporal, 1: height, 2: width) frequency slot `slot` takes in
/// Qwen3-VL's interleaved multimodal RoPE (transformers `Qwen3VLTextRotaryEmbedding.
/// apply_interleaved_mrope`, `mrope_section` = `section`): height for `slot % 3 == 1` below
/// `3 * section[1]`, width for `slot % 3 == 2` below `3 * section[2]`, else temporal (not
/// Qwen2.5-VL's contiguous sections).
pub fn mrope_row(slot: usize, section: [usize; 3]) -> usize {
    match slot % 3 {
        1 if slot < 3 * section[1] => 1,
        2 if slot < 3 * section[2] => 2,
        _ => 0,
    }
}

/// `cos` and `sin` for tokens at multimodal positions (`[temporal, height, width]` each), as
/// `[1, 1, tokens, rotary_dim]` tensors in `dtype`: each frequency slot's angle from the row
/// [`mrope_row`] picks, duplicated over both halves as [`cos_sin`] does. A token with the same
/// position in all three rows (text) gets exactly [`cos_sin`]'s values.
pub fn mrope_cos_sin(inv_freq: &[f32], positions: &[[usize; 3]], section: [usize; 3], device: &Device, dtype: DType) -> (Tensor<4>, Tensor<4>) {
    let angles = positions.iter().map(|p| inv_freq.iter().enumerate().map(|(j, f)| p[mrope_row(j, section)] as f32 * f).collect());
    cos_sin_of_angles(angles, [1, 1, positions.len(), inv_freq.len() * 2], device, dtype)
}

/// One stretch of a multimodal prompt, for [`mrope_positions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptStretch {
    /// This many text tokens.
    Text(usize),
    /// An image's tokens: its grid after the vision merger (`t` frames, `h` x `w` merged
    /// patches), one token per merged patch, row by row.
    Image { t: usize, h: usize, w: usize },
}

/// The three position rows of a prompt (transformers `Qwen3VLModel.get_rope_index`): text
/// tokens count on from where the last stretch ended, the same on all rows; an image starting
/// at `s` puts its patch (ti, hi, wi) at (s + ti, s + hi, s + wi), and what follows starts at
/// one past the largest position used. Also returns the rope delta: the decode token at
/// sequence index `i` takes position `i + delta` on every row.
pub fn mrope_positions(stretches: &[PromptStretch]) -> (Vec<[usize; 3]>, i64) {
    let mut positions = Vec::new();
    let mut next = 0usize;
    for stretch in stretches {
        match *stretch {
            PromptStretch::Text(n) => {
                positions.extend((next..next + n).map(|p| [p, p, p]));
                next += n;
            }
            PromptStretch::Image { t, h, w } => {
                for ti in 0..t {
                    for hi in 0..h {
                        for wi in 0..w {
                            positions.push([next + ti, next + hi, next + wi]);
                        }
                    }
                }
                next += t.max(h).max(w);
            }
        }
    }
    let delta = next as i64 - positions.len() as i64;
    (positions, delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32")
    }

    #[test]
    fn interleaved_mrope_takes_rows_by_slot_and_reduces_to_rope_for_text() {
        // Qwen3-VL's [24, 20, 20]: H at 1, 4, .., 58; W at 2, 5, .., 59; T elsewhere (60..63 too).
        let section = [24, 20, 20];
        let rows: Vec<usize> = (0..64).map(|j| mrope_row(j, section)).collect();
        assert_eq!(&rows[..6], &[0, 1, 2, 0, 1, 2]);
        assert_eq!(&rows[57..], &[0, 1, 2, 0, 0, 0, 0]);
        assert_eq!(rows.iter().filter(|&&r| r == 1).count(), 20);
        assert_eq!(rows.iter().filter(|&&r| r == 2).count(), 20);
        // Text (all rows equal) gives exactly ordinary RoPE.
        let rope = RopeConfig { theta: 5_000_000.0, partial_rotary_factor: 1.0, scaling: RopeScaling::None };
        let inv = inverse_frequencies(&rope, 128);
        let device = Device::flex();
        let text: Vec<[usize; 3]> = (0..9).map(|p| [p, p, p]).collect();
        let (c, s) = mrope_cos_sin(&inv, &text, section, &device, DType::F32);
        let (c0, s0) = cos_sin(&inv, &[(0..9).collect()], &device, DType::F32);
        assert_eq!(values(c), values(c0));
        assert_eq!(values(s), values(s0));
        // An image token: slot j's angle comes from its row's position.
        let (c, _) = mrope_cos_sin(&inv, &[[3, 5, 7]], [2, 1, 1], &device, DType::F32);
        let c = values(c);
        for (j, f) in inv.iter().enumerate() {
            let p = [3.0, 5.0, 7.0][mrope_row(j, [2, 1, 1])];
            assert_eq!(c[j], (p * f).cos(), "slot {j}");
            assert_eq!(c[j + 64], c[j], "both halves");
        }
        assert_eq!((mrope_row(1, [2, 1, 1]), mrope_row(2, [2, 1, 1]), mrope_row(4, [2, 1, 1]), mrope_row(5, [2, 1, 1])), (1, 2, 0, 0));
    }

    #[test]
    fn prompt_positions_follow_get_rope_index() {
        let (p, delta) = mrope_positions(&[PromptStretch::Text(2), PromptStretch::Image { t: 1, h: 2, w: 3 }, PromptStretch::Text(2)]);
        assert_eq!(
            p,
            vec![[0, 0, 0], [1, 1, 1], [2, 2, 2], [2, 2, 3], [2, 2, 4], [2, 3, 2], [2, 3, 3], [2, 3, 4], [5, 5, 5], [6, 6, 6]]
        );
        // 10 tokens, the next at 7: decode index i sits at i - 3.
        assert_eq!(delta, -3);
        let (p, delta) = mrope_positions(&[PromptStretch::Text(4)]);
        assert_eq!((p.len(), delta), (4, 0));
    }
}
