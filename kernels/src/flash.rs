//! cubek's flash attention (cubek-attention 0.3, the `BlackboxAccelerated` routine that
//! burn-cubecl 0.22's `flash_attention` launches: FlashAttention-2's tiles of queries against
//! tiles of keys with an online softmax, Dao 2023, arXiv:2307.08691, on CubeCL's cooperative
//! matrix operations, the scores never written) as a backend operation, so that `kernel_check
//! flash` can time it beside the reference prefill attention. Not on the engine's path: the
//! measurement decides whether a prompt chunk's attention should take it.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::attention::flash_attention;
use burn_std::AttentionModuleOptions;
use cubek::attention::forward::launch::{BlueprintStrategy, Strategy};
use cubek::attention::forward::routines::blackbox_accelerated::BlackboxAcceleratedStrategy;
use crate::launch::is_cubecl;

/// cubek's flash attention as a backend operation (CubeCL runtimes only).
#[backend_extension(Cube, Fusion)]
pub trait FlashAttentionOps: Backend {
    /// `q [batch, heads, queries, d]`, `k`/`v [batch, heads, keys, d]` (as many key heads as
    /// query heads), scale `1 / sqrt(d)`, causal (bottom-right aligned: the queries are the last
    /// of the keys) or not, `planes` planes a cube: `[batch, heads, queries, d]`.
    #[fusion(dtype = q, shape = q)]
    fn cubek_flash_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, causal: bool, planes: usize) -> FloatTensor<Self>;
}

impl FlashAttentionOps for CubeBackend {
    fn cubek_flash_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, causal: bool, planes: usize) -> FloatTensor<Self> {
        let planes = u8::try_from(planes).unwrap_or(u8::MAX);
        let strategy = Strategy::BlackboxAccelerated(BlueprintStrategy::Inferred(BlackboxAcceleratedStrategy { num_planes: planes, seq_q: 1, seq_kv: 1 }));
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: causal };
        // A measurement tool's operation: a shape the routine cannot take stops the check, naming why.
        flash_attention(q, k, v, None, None, options, strategy).unwrap_or_else(|e| panic!("cubek flash attention: {e:?}"))
    }
}

/// [`FlashAttentionOps::cubek_flash_attention`] on CubeCL devices; `None` elsewhere.
pub fn cubek_flash_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, causal: bool, planes: usize) -> Option<Tensor<4>> {
    is_cubecl(&q.device()).then(|| Tensor::from_dispatch(Dispatch::cubek_flash_attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch(), causal, planes)))
}
