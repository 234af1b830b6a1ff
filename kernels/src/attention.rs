//! Grouped-query attention over a KV cache (GQA: Ainslie et al. 2023, arXiv:2305.13245), as
//! transformers' `eager_attention_forward` computes it: `softmax(q·kᵀ · scale + mask) · v`
//! with the scores and the softmax in f32.
//!
//! [`gqa_attention`] is the reference on every backend: the `group` query heads that share a
//! key head are stacked along the token axis, so keys are never repeated. The decode kernel
//! for one query token per row on CubeCL devices reads the paged KV cache and lives in
//! [`crate::paged`] (it replaced the kernel over a contiguous cache that was here).

use burn::tensor::Tensor;

/// Attention of `q [batch, heads, t, head_dim]` over `k`/`v [batch, kv_heads, total,
/// head_dim]` with an additive f32 `mask [batch, 1, 1, t, total]` (`None`: nothing hidden):
/// `[batch, heads, t, head_dim]` in `q`'s dtype (every backend): two batched products
/// ([`crate::batched_matmul`], cuBLAS where available) around the scaled, masked softmax
/// ([`crate::softmax`], one kernel on CubeCL devices).
pub fn gqa_attention(q: Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, mask: Option<&Tensor<5>>, scale: f64) -> Tensor<4> {
    let [batch, heads, t, d] = q.dims();
    let kv_heads = k.dims()[1];
    let group = heads / kv_heads;
    // The `group` query heads that share a key head, stacked along the token axis (without
    // a group, `q` as it is: a reshape of a view, such as heads narrowed from a larger
    // tensor, would copy it).
    let q = if group == 1 { q } else { q.reshape([batch, kv_heads, group * t, d]) };
    let scores = crate::batched_matmul(q, k.clone().transpose());
    let probs = crate::softmax::scaled_masked_softmax(scores, mask, scale, t);
    crate::batched_matmul(probs, v.clone()).reshape([batch, heads, t, d])
}

/// Tests' gather: the `width`-value rows of `pool` (`[slots, width]`) at `slots`, one after
/// another (a sequence's keys or values made contiguous for [`dense_reference`]).
#[cfg(test)]
pub(crate) fn rows_at(pool: &[f32], slots: impl Iterator<Item = usize>, width: usize) -> Vec<f32> {
    slots.flat_map(|slot| pool[slot * width..(slot + 1) * width].iter().copied()).collect()
}

/// Tests' reference: causal attention of one sequence's `queries` (the last of `context`
/// tokens; `q [queries, heads, d]`) over its own contiguous keys and values (`[context,
/// kv_heads, d]`), with an optional window, summed in f64.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_reference(q: &[f32], k: &[f32], v: &[f32], queries: usize, context: usize, heads: usize, kv_heads: usize, d: usize, window: Option<usize>, scale: f64) -> Vec<f32> {
    let mut out = vec![0.0; queries * heads * d];
    for i in 0..queries {
        let p = context - queries + i;
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            let seen: Vec<usize> = (0..=p).filter(|&j| window.is_none_or(|w| j + w > p)).collect();
            let scores: Vec<f64> = seen.iter().map(|&j| (0..d).map(|c| f64::from(q[(i * heads + h) * d + c]) * f64::from(k[(j * kv_heads + kvh) * d + c])).sum::<f64>() * scale).collect();
            let top = scores.iter().cloned().fold(f64::MIN, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
            let sum: f64 = w.iter().sum();
            for c in 0..d {
                out[(i * heads + h) * d + c] = seen.iter().zip(&w).map(|(&j, wj)| wj / sum * f64::from(v[(j * kv_heads + kvh) * d + c])).sum::<f64>() as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Device, Distribution, TensorData};

    fn values<const D: usize>(x: Tensor<D>) -> Vec<f32> {
        x.cast(DType::F32).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
    }

    #[test]
    fn the_reference_is_softmax_attention_per_head_with_shared_keys() {
        let d = Device::flex();
        let (heads, kv_heads, total, dim) = (4, 2, 5, 3);
        let q: Tensor<4> = Tensor::random([1, heads, 1, dim], Distribution::Uniform(-1.0, 1.0), &d);
        let k: Tensor<4> = Tensor::random([1, kv_heads, total, dim], Distribution::Uniform(-1.0, 1.0), &d);
        let v: Tensor<4> = Tensor::random([1, kv_heads, total, dim], Distribution::Uniform(-1.0, 1.0), &d);
        // The last slot hidden.
        let hide: Vec<f32> = (0..total).map(|s| if s + 1 == total { -1.0e9 } else { 0.0 }).collect();
        let mask = Tensor::<5>::from_data(TensorData::new(hide, [1, 1, 1, 1, total]), &d);
        let got = values(gqa_attention(q.clone(), &k, &v, Some(&mask), 0.5));
        let (qs, ks, vs) = (values(q), values(k), values(v));
        for h in 0..heads {
            let kv = h / (heads / kv_heads);
            let scores: Vec<f32> = (0..total - 1).map(|s| (0..dim).map(|c| qs[h * dim + c] * ks[(kv * total + s) * dim + c]).sum::<f32>() * 0.5).collect();
            let top = scores.iter().cloned().fold(f32::MIN, f32::max);
            let weights: Vec<f32> = scores.iter().map(|s| (s - top).exp()).collect();
            let sum: f32 = weights.iter().sum();
            for c in 0..dim {
                let want: f32 = weights.iter().enumerate().map(|(s, w)| w / sum * vs[(kv * total + s) * dim + c]).sum();
                assert!((got[h * dim + c] - want).abs() < 1e-5, "head {h} channel {c}: {} vs {want}", got[h * dim + c]);
            }
        }
    }
}
