//! cubek's flash attention (cubek-attention 0.3, the `BlackboxAccelerated` routine that
//! burn-cubecl 0.22's `flash_attention` launches: FlashAttention-2's tiles of queries against
//! tiles of keys with an online softmax, Dao 2023, arXiv:2307.08691, on CubeCL's cooperative
//! matrix operations, the scores never written) as a backend operation, so that `kernel_check
//! flash` can time it beside the reference prefill attention, and a prompt chunk's attention
//! can take it when `INFERENCE_PIO_PREFILL_FLASH=1` ([`chunk_attention`]; off by default until
//! measured against the reference end to end).

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::attention::{AttentionStrategy, attention, flash_attention};
use burn_cubecl::kernel::into_contiguous;
use burn_std::AttentionModuleOptions;
use cubek::attention::forward::launch::{BlueprintStrategy, Strategy};
use cubek::attention::forward::routines::blackbox_accelerated::BlackboxAcceleratedStrategy;
use crate::launch::is_cubecl;

/// cubek's flash attention as a backend operation (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait FlashAttentionOps: Backend {
    /// `q [batch, heads, queries, d]`, `k`/`v [batch, heads, keys, d]` (as many key heads as
    /// query heads; any strides: copied contiguous first), scale `1 / sqrt(d)`, causal
    /// (bottom-right aligned: the queries are the last of the keys) or not, `planes` planes a
    /// cube: `[batch, heads, queries, d]`. `strict`: a shape the routine refuses stops with its
    /// reason (what `kernel_check` wants); else it runs burn's materialised attention instead.
    #[fusion(dtype = q, shape = q)]
    fn cubek_flash_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, causal: bool, planes: usize, strict: bool) -> FloatTensor<Self>;
}

impl FlashAttentionOps for CubeBackend {
    fn cubek_flash_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, causal: bool, planes: usize, strict: bool) -> FloatTensor<Self> {
        let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
        let planes = u8::try_from(planes).unwrap_or(u8::MAX);
        let blueprint = BlackboxAcceleratedStrategy { num_planes: planes, seq_q: 1, seq_kv: 1 };
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: causal };
        if strict {
            let strategy = Strategy::BlackboxAccelerated(BlueprintStrategy::Inferred(blueprint));
            // A measurement tool's operation: a shape the routine cannot take stops the check,
            // naming why.
            flash_attention(q, k, v, None, None, options, strategy).unwrap_or_else(|e| panic!("cubek flash attention: {e:?}"))
        } else {
            // burn's dispatch: a configuration the routine refuses runs the materialised
            // attention (same result); other launch errors are burn's to report.
            attention(q, k, v, None, None, options, AttentionStrategy::FlashBlackboxAccelerated(blueprint)).unwrap_or_else(|e| panic!("cubek flash attention: {e:?}"))
        }
    }
}

/// [`FlashAttentionOps::cubek_flash_attention`] on CubeCL devices, strictly (see there);
/// `None` elsewhere.
pub fn cubek_flash_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, causal: bool, planes: usize) -> Option<Tensor<4>> {
    is_cubecl(&q.device()).then(|| Tensor::from_dispatch(Dispatch::cubek_flash_attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch(), causal, planes, true)))
}

/// `t [batch, kv_heads, keys, d]` with each key head repeated for the `heads / kv_heads` query
/// heads that share it (`heads` a multiple of `kv_heads`): `[batch, heads, keys, d]`, what
/// cubek takes (one key head per query head).
pub fn repeat_kv_heads(t: &Tensor<4>, heads: usize) -> Tensor<4> {
    let [n, kv_heads, keys, d] = t.dims();
    t.clone().unsqueeze_dim::<5>(2).expand([n, kv_heads, heads / kv_heads, keys, d]).reshape([n, heads, keys, d])
}

/// Planes a cube for the engine's chunks (the middle of what burn's autotune tries).
const CHUNK_PLANES: usize = 4;

/// Whether prompt chunks take cubek's flash attention: only with `INFERENCE_PIO_PREFILL_FLASH=1`.
fn chunks_take_flash() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("INFERENCE_PIO_PREFILL_FLASH").is_ok_and(|v| v == "1"))
}

/// A run of prefill chunks of one shape through cubek's flash attention, where it applies:
/// `queries [chunks, heads, rows, d]` (each chunk's rows the last of its `keys`), `keys` /
/// `values [chunks, kv_heads, context, d]` (gathered; repeated here to every query head),
/// no window, `scale` equal to `1 / sqrt(d)` (cubek's), bf16 or f16 on a CubeCL device, and
/// the switch on ([`chunks_take_flash`]): `[chunks, heads, rows, d]`; `None` otherwise (the
/// caller runs the reference).
pub fn chunk_attention(queries: &Tensor<4>, keys: &Tensor<4>, values: &Tensor<4>, window: Option<usize>, scale: f64) -> Option<Tensor<4>> {
    let [_, heads, _, d] = queries.dims();
    let kv_heads = keys.dims()[1];
    let applies = chunks_take_flash()
        && window.is_none()
        && (scale * (d as f64).sqrt() - 1.0).abs() < 1e-9
        && matches!(queries.dtype(), DType::BF16 | DType::F16)
        && keys.dtype() == queries.dtype()
        && values.dtype() == queries.dtype()
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && is_cubecl(&queries.device());
    if !applies {
        return None;
    }
    let (keys, values) = (repeat_kv_heads(keys, heads), repeat_kv_heads(values, heads));
    let out = Dispatch::cubek_flash_attention(queries.clone().into_dispatch(), keys.into_dispatch(), values.into_dispatch(), true, CHUNK_PLANES, false);
    Some(Tensor::from_dispatch(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn each_query_head_gets_its_key_heads_rows() {
        let device = Device::flex();
        // 2 key heads of 3 keys of 2 channels, for 6 query heads (3 a key head).
        let values: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let t = Tensor::<4>::from_data(TensorData::new(values.clone(), [1, 2, 3, 2]), &device);
        let got = repeat_kv_heads(&t, 6).into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
        for h in 0..6 {
            assert_eq!(&got[h * 6..(h + 1) * 6], &values[(h / 3) * 6..(h / 3 + 1) * 6], "query head {h}");
        }
    }
}
